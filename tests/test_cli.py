"""The pinn-jax command line: help, one-line errors (exit 2), and a real run in subprocesses
(simulate -> train 2 epochs -> interrupted/resumed train -> infer) on 64 tiny patterns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pinn_jax.cli import main

COMMANDS = ("demo", "simulate", "train", "infer", "convert", "ptychodus")


def run_main(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_every_command(capsys, cmd):
    rc, out, _ = run_main(capsys, cmd, "--help")
    assert rc == 0
    assert "usage: pinn-jax" in out
    expected = {
        "demo": ["--epochs", "--n-images", "--output-dir"],
        "simulate": ["--output-dir", "--n-images", "--N"],
        "train": ["--train_data_file", "--test_data_file", "--output_dir", "--nepochs", "--batch_size",
                  "--n_groups", "--gridsize", "--N", "--resume", "--nll_weight", "--probe_trainable",
                  "--model_type", "--do_stitching"],
        "infer": ["--model_path", "--test_data", "--output_dir"],
        "convert": ["input", "output"],
        "ptychodus": ["ptychodus"],
    }[cmd]
    for flag in expected:
        assert flag in out, (cmd, flag)


def test_top_level_help_lists_commands(capsys):
    rc, out, _ = run_main(capsys, "--help")
    assert rc == 0 and all(c in out for c in COMMANDS)
    rc, _, _ = run_main(capsys)
    assert rc == 2


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["train", "--nepochs", "two"], "expected an integer"),
        (["train", "--N", "100"], "invalid choice"),
        (["train", "--probe_trainable", "maybe"], "true/false"),
        (["train", "--model_type", "gan"], "invalid choice"),
        (["train", "--nepochs", "2"], "--train_data_file is required"),
        (["train", "--train_data_file", "/no/such/file.npz"], "file not found"),
        (["infer", "--model_path", "/no/such/dir", "--test_data", "x.npz"], "model path not found"),
        (["infer", "--test_data", "x.npz"], "file not found"),
        (["infer", "--output_dir", "o"], "required"),
        (["convert", "/no/such/wts.h5.zip", "out"], "not found"),
        (["simulate"], "required"),
        (["demo", "--epochs", "0"], "positive integer"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(capsys, argv, pattern):
    rc, _, err = run_main(capsys, *argv)
    assert rc == 2
    line = one_line_error(err)
    assert pattern in line
    assert line.startswith("pinn-jax")


def test_bad_values_detected_after_parsing(capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    rc, _, err = run_main(capsys, "train", "--train_data_file", str(bad), "--output_dir", str(tmp_path / "o"))
    assert rc == 2 and "cannot read" in one_line_error(err)
    rc, _, err = run_main(capsys, "train", "--train_data_file", str(bad), "--batch_size", "0")
    assert rc == 2 and "batch_size" in one_line_error(err)
    rc, _, err = run_main(capsys, "train", "--train_data_file", str(bad), "--resume",
                          "--output_dir", str(tmp_path / "none"))
    assert rc == 2 and "--resume" in one_line_error(err)
    (tmp_path / "m").mkdir()
    rc, _, err = run_main(capsys, "infer", "--model_path", str(tmp_path / "m"), "--test_data", str(bad))
    assert rc == 2 and "no wts.h5.zip" in one_line_error(err)


def test_tensorflow_archive_in_infer_says_convert(capsys, tmp_path):
    import shutil

    fix = Path(__file__).parent / "fixtures" / "tf_archive_small" / "tf_meta_only.zip"
    (tmp_path / "tf").mkdir()
    shutil.copy(fix, tmp_path / "tf" / "wts.h5.zip")
    data = tmp_path / "d.npz"
    _tiny_npz(tmp_path, data)
    rc, _, err = run_main(capsys, "infer", "--model_path", str(tmp_path / "tf"), "--test_data", str(data))
    assert rc == 2 and "pinn-jax convert" in one_line_error(err)
    rc, _, err = run_main(capsys, "convert", str(tmp_path / "tf"), str(tmp_path / "out.zip"))
    assert rc == 2


def _tiny_npz(tmp_path: Path, path: Path) -> None:
    from backend_api.raw_data import RawData

    rng = np.random.default_rng(0)
    n = 8
    raw = RawData.from_coords_without_pc(rng.uniform(40, 60, n), rng.uniform(40, 60, n),
                                         rng.random((n, 64, 64)).astype(np.float32),
                                         np.ones((64, 64), np.complex64), np.zeros(n, np.int64))
    raw.to_file(path)


# ---------------------------------------------------------------------------------------------
# the real thing, in subprocesses
# ---------------------------------------------------------------------------------------------


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    # share the suite's persistent compilation cache (conftest) when there is one
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    return env


@pytest.mark.slow
def test_train_interrupt_resume_infer(capsys, tmp_path):
    """simulate (in process) -> `python -m pinn_jax train` in a subprocess, interrupted with
    SIGTERM (handled like Ctrl-C) after its first epoch checkpoint -> `train --resume` -> `infer`."""
    import signal
    import time

    data = tmp_path / "data"
    rc, _, _ = run_main(capsys, "simulate", "--output-dir", str(data), "--n-images", "128", "--N", "64",
                        "--object-size", "128", "--seed", "1", "--quiet")
    assert rc == 0
    train_npz, test_npz = data / "train_data.npz", data / "test_data.npz"
    assert train_npz.is_file() and test_npz.is_file()

    out = tmp_path / "run"
    args = ["train", "--train_data_file", str(train_npz), "--test_data_file", str(test_npz),
            "--output_dir", str(out), "--n_groups", "64", "--gridsize", "1", "--N", "64",
            "--n_filters_scale", "1", "--batch_size", "16", "--nepochs", "4", "--no_progress", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "pinn_jax"] + args, env=_env(tmp_path / "xla_cache"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "checkpoints" / "1"
    deadline = time.monotonic() + 540
    while proc.poll() is None and not first.is_dir() and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None:
        # SIGTERM: train stops like on Ctrl-C (SIGINT itself is ignored in background jobs of
        # non-interactive shells, as CI runners start them).
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), stderr[-3000:]
    if proc.returncode == 130:
        assert "--resume" in stderr and "Traceback" not in stderr
        assert not (out / "wts.h5.zip").exists()
    done = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert done and 1 <= done[-1] <= 4

    rc, stdout, err = run_main(capsys, *(args + ["--resume", "--do_stitching"]))
    assert rc == 0, err
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["loss"]) == 4 and all(np.isfinite(hist["loss"]))
    assert (out / "wts.h5.zip").is_file()
    assert (out / "reconstructed_amplitude.png").is_file() and (out / "reconstructed_phase.png").is_file()
    assert "trained 4 epochs" in stdout

    inf = tmp_path / "inf"
    rc, stdout, err = run_main(capsys, "infer", "--model_path", str(out), "--test_data", str(test_npz),
                               "--output_dir", str(inf), "--quiet")
    assert rc == 0, err
    for name in ("reconstructed_amplitude.png", "reconstructed_phase.png", "reconstruction.npz", "metrics.json"):
        assert (inf / name).is_file(), name
    rec = np.load(inf / "reconstruction.npz")
    assert rec["object"].dtype == np.complex64 and rec["object"].ndim == 2
    assert rec["object_on_grid"].shape == (128, 128)
    assert json.loads((inf / "metrics.json").read_text())["ssim"]["amplitude"] <= 1.0


@pytest.mark.slow
def test_demo_runs_in_process(capsys, tmp_path):
    rc = main(["demo", "--output-dir", str(tmp_path / "demo"), "--epochs", "1", "--n-images", "128",
               "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("wts.h5.zip", "reconstructed_amplitude.png", "reconstructed_phase.png", "comparison.png",
                 "loss_curve.png", "metrics.json", "history.json", "reconstruction.npz"):
        assert (tmp_path / "demo" / name).is_file(), name
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(m["metrics"]) >= {"ssim", "psnr", "frc50"}
    assert "SSIM" in out and "wrote" in out


def test_ptychodus_command_delegates_its_arguments(monkeypatch):
    import backend_api.ptychodus.launcher as launcher

    seen = {}

    def fake_main(argv=None):
        seen["argv"] = list(argv)
        return 0

    monkeypatch.setattr(launcher, "main", fake_main)
    assert main(["ptychodus", "-b", "train", "-i", "IN", "-o", "OUT", "--verbose"]) == 0
    assert seen["argv"] == ["-b", "train", "-i", "IN", "-o", "OUT", "--verbose"]
