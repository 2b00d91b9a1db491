"""The pinn-jax command line: help, one-line errors (exit 2), and a real run in subprocesses
(simulate -> train 2 epochs -> interrupted/resumed train -> infer) on 64 tiny patterns."""

from __future__ import annotations

import json
import os
import stat
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


def _checkpoint_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _model_leaves(run_dir: Path) -> list[np.ndarray]:
    import jax
    from flax import nnx

    from pinn_jax.checkpoint import load_model

    model, _ = load_model(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


INTERRUPT_EPOCHS = 6


@pytest.mark.slow
def test_train_interrupt_resume_infer(capsys, tmp_path):
    """simulate (in process) -> `python -m pinn_jax train` in a subprocess, interrupted with
    SIGTERM (handled like Ctrl-C) after its first epoch checkpoint -> the same command plus
    `--resume` -> `infer`; the resumed run equals an uninterrupted run with the same seed.

    The interruption is made certain, not left to timing: as soon as checkpoint 1 appears the
    child is frozen (SIGSTOP), the test checks that it has not finished (fewer checkpoints than
    epochs, no archive), queues SIGTERM and lets it continue (SIGCONT), so the signal lands
    mid-run. It must then exit 130 with fewer epochs done than requested and no model written.

    Resumed vs uninterrupted: the resume restores the float32 TrainState, loop state, learning
    rate schedule and history exactly, and the per-epoch shuffle derives from (seed, epoch), so
    both runs execute the same XLA programs on the same inputs in the same order on one CPU
    device. XLA's CPU programs are deterministic run to run, but the interrupted epochs ran in
    another process whose compilation may differ (the tuned CPU runtime can change a reduction
    order), so losses are compared to rtol 1e-5 (float32 sums of <= 64*64*64 terms, amplified by
    at most a few optimiser steps) and weights to rtol 1e-4, atol 1e-6; a missed or repeated
    epoch, a lost optimiser state or a different shuffle moves them by > 1e-3."""
    import signal
    import time

    data = tmp_path / "data"
    rc, _, _ = run_main(capsys, "simulate", "--output-dir", str(data), "--n-images", "128", "--N", "64",
                        "--object-size", "128", "--seed", "1", "--quiet")
    assert rc == 0
    train_npz, test_npz = data / "train_data.npz", data / "test_data.npz"
    assert train_npz.is_file() and test_npz.is_file()

    out = tmp_path / "run"
    common = ["--train_data_file", str(train_npz), "--test_data_file", str(test_npz),
              "--n_groups", "64", "--gridsize", "1", "--N", "64", "--n_filters_scale", "1",
              "--batch_size", "16", "--nepochs", str(INTERRUPT_EPOCHS), "--seed", "3", "--do_stitching",
              "--no_progress", "--quiet"]
    args = ["train", "--output_dir", str(out)] + common
    proc = subprocess.Popen([sys.executable, "-m", "pinn_jax"] + args, env=_env(tmp_path / "xla_cache"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "checkpoints" / "1"
    deadline = time.monotonic() + 540
    try:
        while proc.poll() is None and not first.is_dir() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "training ended before its first checkpoint was seen"
        assert first.is_dir(), "no checkpoint within the time limit"
        proc.send_signal(signal.SIGSTOP)
        at_signal = _checkpoint_steps(out)
        assert at_signal and at_signal[-1] < INTERRUPT_EPOCHS, at_signal
        assert not (out / "wts.h5.zip").exists()
        proc.send_signal(signal.SIGTERM)  # queued while stopped; delivered on SIGCONT
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not (out / "wts.h5.zip").exists() and not (out / "history.json").exists()
    done = _checkpoint_steps(out)
    assert done and done[-1] < INTERRUPT_EPOCHS, done

    rc, stdout, err = run_main(capsys, *(args + ["--resume"]))
    assert rc == 0, err
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["loss"]) == INTERRUPT_EPOCHS and all(np.isfinite(hist["loss"]))
    assert (out / "wts.h5.zip").is_file()
    assert (out / "reconstructed_amplitude.png").is_file() and (out / "reconstructed_phase.png").is_file()
    assert f"trained {INTERRUPT_EPOCHS} epochs" in stdout

    ref = tmp_path / "uninterrupted"
    rc, _, err = run_main(capsys, "train", "--output_dir", str(ref), *common)
    assert rc == 0, err
    ref_hist = json.loads((ref / "history.json").read_text())
    for key in ("loss", "val_loss"):
        assert len(ref_hist[key]) == INTERRUPT_EPOCHS
        np.testing.assert_allclose(hist[key], ref_hist[key], rtol=1e-5, err_msg=key)
    got, want = _model_leaves(out), _model_leaves(ref)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

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

    # --stream: chunks of 17 patterns straight onto the grid, every position once; the same
    # object as the grouped path at gridsize 1 (sums in another order: 1e-5 of the peak)
    streamed = tmp_path / "inf_stream"
    rc, stdout, err = run_main(capsys, "infer", "--model_path", str(out), "--test_data", str(test_npz),
                               "--output_dir", str(streamed), "--stream", "--chunk", "17", "--quiet")
    assert rc == 0, err
    assert "positions (streamed)" in stdout
    with np.load(streamed / "reconstruction.npz") as s:
        ref = rec["object_on_grid"]
        np.testing.assert_allclose(s["object_on_grid"], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_array_equal(s["object"], s["object_on_grid"])
    assert (streamed / "metrics.json").is_file() and (streamed / "reconstructed_amplitude.png").is_file()
    rc, _, err = run_main(capsys, "infer", "--model_path", str(out), "--test_data", str(test_npz),
                          "--output_dir", str(tmp_path / "never"), "--stream", "--n_groups", "10")
    assert rc == 2 and "--stream reconstructs every position once" in err
    assert not (tmp_path / "never").exists()


def _png_shape(path: Path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and np.all(np.isfinite(img)), path
    return img.shape[:2]


def _figure_pixels(width_in: float, height_in: float) -> tuple[int, int]:
    """(rows, cols) of a PNG saved from a Figure of that size with the current rc dpi."""
    import matplotlib

    dpi = matplotlib.rcParams["savefig.dpi"]
    dpi = matplotlib.rcParams["figure.dpi"] if dpi == "figure" else dpi
    return int(round(height_in * dpi)), int(round(width_in * dpi))


@pytest.mark.slow
def test_demo_runs_in_process(capsys, tmp_path):
    """Demo (2 epochs, 128 images): the files exist and hold sensible values -- finite losses
    that go down, metrics in their ranges, finite reconstruction arrays of the object's shape,
    and decodable images of the figure sizes."""
    demo = tmp_path / "demo"
    old_umask = os.umask(0o027)  # every file must honour the umask (group may read, others not)
    try:
        rc = main(["demo", "--output-dir", str(demo), "--epochs", "2", "--n-images", "128", "--quiet"])
    finally:
        os.umask(old_umask)
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("wts.h5.zip", "reconstructed_amplitude.png", "reconstructed_phase.png", "comparison.png",
                 "loss_curve.png", "metrics.json", "history.json", "reconstruction.npz", "refined_amplitude.png",
                 "refined_phase.png", "convergence.png", "refine_history.json"):
        assert (demo / name).is_file(), name
        assert stat.S_IMODE((demo / name).stat().st_mode) == 0o640, (name, oct((demo / name).stat().st_mode))
    for name in ("train_data.npz", "test_data.npz", "diffraction.npz", "diffraction.h5", "product.h5",
                 "ground_truth.h5"):  # the demo's data for the ptychodus GUI
        assert (demo / "ptychodus" / name).is_file(), name
        assert stat.S_IMODE((demo / "ptychodus" / name).stat().st_mode) == 0o640, name
    assert "SSIM" in out and "wrote" in out

    hist = json.loads((demo / "history.json").read_text())
    loss = hist["loss"]
    assert len(loss) == 2 and all(np.isfinite(loss)) and loss[-1] < loss[0]
    assert all(np.isfinite(hist["val_loss"]))

    report = json.loads((demo / "metrics.json").read_text())
    m = report["metrics"]
    assert set(m) >= {"ssim", "psnr", "frc50", "mae", "region_pixels"}
    for part in ("amplitude", "phase"):
        assert 0.0 < m["ssim"][part] <= 1.0, (part, m["ssim"])
        assert np.isfinite(m["psnr"][part]) and m["psnr"][part] > 0, (part, m["psnr"])
        assert np.isfinite(m["mae"][part]) and m["mae"][part] >= 0, (part, m["mae"])
        assert m["frc50"][part] >= 0, (part, m["frc50"])
    assert report["epochs_run"] == 2 and report["final_loss"] == pytest.approx(loss[-1])
    # the network's first look, then 20 passes of physics refinement seeded by it: on this
    # noiseless-ish (1e9 photons) 64-position test scan the refined object is far sharper
    refined = report["refined_metrics"]
    assert refined["ssim"]["amplitude"] > max(0.8, m["ssim"]["amplitude"]), (refined["ssim"], m["ssim"])
    steps = json.loads((demo / "refine_history.json").read_text())
    assert len(steps["loss"]) == len(steps["metrics"]) == 21  # the start, then every pass
    assert steps["metrics"][-1]["ssim"] == refined["ssim"]

    rec = np.load(demo / "reconstruction.npz")
    gt, on_grid, region = rec["ground_truth"], rec["object_on_grid"], rec["region"]
    assert gt.shape == on_grid.shape == region.shape == (128, 128)
    assert on_grid.dtype == gt.dtype == np.complex64 and region.dtype == bool
    assert np.all(np.isfinite(on_grid)) and np.all(np.isfinite(gt))
    assert region.sum() == m["region_pixels"] > 0
    assert np.abs(on_grid[region]).min() > 0  # the scanned region is covered
    assert rec["refined_object_on_grid"].shape == gt.shape

    assert _png_shape(demo / "reconstructed_amplitude.png") == _figure_pixels(8, 8)
    assert _png_shape(demo / "reconstructed_phase.png") == _figure_pixels(8, 8)
    assert _png_shape(demo / "comparison.png") == _figure_pixels(13.5, 8.5)  # truth, network, refined
    assert _png_shape(demo / "loss_curve.png") == _figure_pixels(6, 4)


def test_ptychodus_command_delegates_its_arguments(monkeypatch):
    import backend_api.ptychodus.launcher as launcher

    seen = {}

    def fake_main(argv=None):
        seen["argv"] = list(argv)
        return 0

    monkeypatch.setattr(launcher, "main", fake_main)
    assert main(["ptychodus", "-b", "train", "-i", "IN", "-o", "OUT", "--verbose"]) == 0
    assert seen["argv"] == ["-b", "train", "-i", "IN", "-o", "OUT", "--verbose"]
