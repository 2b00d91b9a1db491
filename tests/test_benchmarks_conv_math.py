"""benchmarks/conv_math.py: the summary against float32's seed spread and the --from-json merge
(on made-up rows; the real runs train networks, minutes each)."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("conv_math.py", "bench_conv_math")


def _row(bench, math, seed, ssim_amp, frc_phase=9.0, epoch=10.0):
    metrics = {m: {p: 0.5 for p in bench.PARTS} for m in bench.METRICS}
    metrics["ssim"]["amplitude"] = ssim_amp
    metrics["frc50"]["phase"] = frc_phase
    return {"math": math, "seed": seed, "train_wall_s": 1.0, "infer_wall_s": 1.0, "epoch_s_median": epoch,
            "final_loss": -1.0, "metrics": metrics}


def test_summary_compares_with_float32s_spread_and_names_outlying_seeds(bench):
    rows = [_row(bench, "float32", 0, 0.38), _row(bench, "float32", 1, 0.40), _row(bench, "float32", 2, 0.39),
            _row(bench, "bfloat16", 0, 0.39, epoch=5.0), _row(bench, "bfloat16", 1, 0.39, frc_phase=3.0, epoch=5.0),
            _row(bench, "bfloat16", 2, 0.39, epoch=5.0)]
    s = bench.summarise(rows)
    f32 = s["by_math"]["float32"]
    assert f32["ssim_amplitude"]["mean"] == pytest.approx(0.39) and f32["ssim_amplitude"]["sd"] == pytest.approx(0.01)
    comp = s["against_float32"]["bfloat16"]
    assert comp["ssim_amplitude"]["within_spread"] is True
    assert comp["ssim_amplitude"]["paired"] == pytest.approx([0.01, -0.01, 0.0])
    # float32's phase FRC50 does not vary at all, so seed 1's drop to 3.0 is outside it
    assert comp["frc50_phase"]["float32_spread"] == 0 and comp["frc50_phase"]["within_spread"] is False
    assert comp["seeds_outside_twice_the_spread"] == [1]
    assert comp["epoch_time_ratio"] == pytest.approx(2.0)
    text = bench.markdown(rows, s)
    assert "2.00x as fast" in text and "frc50_phase" in text and "twice that spread in an SSIM or FRC50: 1" in text


def test_from_json_merges_reports_and_refuses_a_run_twice(bench, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": [_row(bench, "float32", 0, 0.38), _row(bench, "bfloat16", 0, 0.37)]}))
    b.write_text(json.dumps({"rows": [_row(bench, "float32", 1, 0.40), _row(bench, "bfloat16", 1, 0.41)]}))
    assert bench.main(["--from-json", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.count("| float32 |") == 2 and out.count("| bfloat16 |") == 2 and "mean ± sd" in out
    with pytest.raises(SystemExit):
        bench.main(["--from-json", str(a), str(a)])
    assert "share a (math, seed) run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--from-json", str(tmp_path / "none.json")])
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("setting,conv_math,winograd", [("float32", "float32", None),
                                                        ("float32-direct", "float32", "0"),
                                                        ("bfloat16", "bfloat16", None)])
def test_each_setting_runs_the_cli_with_its_math_and_environment(bench, tmp_path, monkeypatch, setting, conv_math,
                                                                 winograd):
    monkeypatch.setenv("PINN_JAX_WINOGRAD", "1")  # the caller's setting never leaks into a run
    calls = []

    def fake(args, env):
        calls.append((args, env))
        out = tmp_path / f"{setting}_seed3"
        if args[0] == "train":
            out.mkdir(parents=True, exist_ok=True)
            (out / "history.json").write_text(json.dumps({"epoch_time_s": [2.0, 1.0, 3.0], "loss": [5.0, 4.0]}))
        else:
            (out / "infer").mkdir(parents=True, exist_ok=True)
            (out / "infer" / "metrics.json").write_text(json.dumps(
                {m: {p: 0.25 for p in bench.PARTS} for m in bench.METRICS}))
        return 1.5

    monkeypatch.setattr(bench, "_pinn_jax", fake)
    args = type("A", (), {"n_groups": 8, "n_filters_scale": 1, "epochs": 1, "batch_size": 4})()
    row = bench.run_one(tmp_path / "train.npz", tmp_path / "test.npz", setting, 3, tmp_path, args)
    assert row["math"] == setting and row["seed"] == 3 and row["epoch_s_median"] == 2.0 and row["final_loss"] == 4.0
    assert [c[0][0] for c in calls] == ["train", "infer"]
    for cli, env in calls:
        assert cli[cli.index("--conv_math") + 1] == conv_math
        assert env.get("PINN_JAX_WINOGRAD") == winograd
