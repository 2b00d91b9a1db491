"""benchmarks/parity.py without running a backend: rows of missing backends carry no numbers,
the table and the seed spread are built from what ran, the children get one seed each."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def parity():
    return load_benchmark("parity.py", "parity_script")


def _ok_row(backend, seed, ssim):
    q = {"ssim": [ssim, 0.9], "psnr": [50.0, 65.0], "frc50": [2.0, 3.0]}
    return {"backend": backend, "status": "ok", "seed": seed, "multi_seed": True, "epoch_s": 1.0,
            "step_s": 0.1, "patterns_per_s": 10.0, "peak_rss_mb": 100.0, "archive_mb": 1.0,
            "quality": {"reference_protocol": q, "corrected_protocol": q}}


def test_missing_backend_row_has_no_numbers(parity, monkeypatch, tmp_path):
    monkeypatch.setattr(parity, "_installed", lambda b: False)
    args = parity._parser().parse_args(["--train", "a.npz", "--test", "b.npz", "--epochs", "1",
                                        "--out", str(tmp_path / "p.json")])
    row = parity._run_backend("pytorch", args, [])
    assert row == {"backend": "pytorch", "status": "not installed"}
    table = parity.markdown([row])
    line = table.splitlines()[-1]
    assert "not installed" in line and not any(c.isdigit() for c in line)
    assert line.count("|") == table.splitlines()[0].count("|")


def test_whole_run_with_nothing_installed_writes_only_not_installed(parity, monkeypatch, tmp_path):
    monkeypatch.setattr(parity, "_installed", lambda b: False)
    f = tmp_path / "d.npz"
    f.write_bytes(b"")
    out = tmp_path / "p.json"
    assert parity.main(["--train", str(f), "--test", str(f), "--epochs", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["status"] for r in rep["rows"]] == ["not installed"] * 3
    assert "versions" in rep and "machine" in rep


def test_spread_over_seeds_and_option_dropping(parity):
    rows = [_ok_row("jax", s, v) for s, v in ((0, 0.2), (1, 0.3), (2, 0.4))]
    rows.append({"backend": "tensorflow", "status": "failed (exit 1): x", "seed": 0})
    sp = parity.spread(rows)
    m = sp["jax"]["reference_protocol.ssim"]
    assert sp["jax"]["n"] == 3 and m["mean"][0] == pytest.approx(0.3) and m["sd"][0] == pytest.approx(0.1)
    assert sp["tensorflow"]["n"] == 0
    assert "| jax | 3 |" in parity.spread_markdown(sp)
    argv = ["--train", "a", "--seeds", "0", "1", "--epochs", "2", "--seed=3"]
    assert parity._drop_option(parity._drop_option(argv, "--seeds"), "--seed") == ["--train", "a", "--epochs", "2"]


def test_bad_arguments_are_refused(parity, tmp_path):
    with pytest.raises(SystemExit, match="--epochs=0"):
        parity.main(["--train", "a", "--test", "b", "--epochs", "0"])
    with pytest.raises(SystemExit, match="unknown"):
        parity.main(["--train", "a", "--test", "b", "--epochs", "1", "--backends", "mxnet"])
    with pytest.raises(SystemExit, match="no such file"):
        parity.main(["--train", str(tmp_path / "nope.npz"), "--test", "b", "--epochs", "1"])
