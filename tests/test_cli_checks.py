"""pinn-jax checks every path and flag before it works (issue 9 §5).

Fail-fast cases run in process through ``pinn_jax.cli.main`` with every loader replaced by a
recorder that fails the test if it is called, so "failed before loading" is asserted directly
(not by timing). Unreadable data files run as real subprocesses: exit status 2, exactly one
line on stderr, no traceback.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from pinn_jax import cli

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _tiny_npz(path: Path, *, x=None, y=None, object_guess=None) -> Path:
    """8 random 64x64 patterns around (50, 50), as the contract's NPZ."""
    from backend_api.raw_data import RawData

    rng = np.random.default_rng(0)
    n = 8
    x = rng.uniform(40, 60, n) if x is None else np.asarray(x, float)
    y = rng.uniform(40, 60, n) if y is None else np.asarray(y, float)
    raw = RawData.from_coords_without_pc(x, y, rng.random((n, 64, 64)).astype(np.float32),
                                         np.ones((64, 64), np.complex64), np.zeros(n, np.int64),
                                         objectGuess=object_guess)
    raw.to_file(path)
    return path


def _run_main(capsys, argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _snapshot(folder: Path) -> dict:
    """Every path below ``folder`` with its bytes (None for folders)."""
    return {p.relative_to(folder): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


class _Recorder:
    """Stands in for a loader/worker: records the call and fails the test."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __call__(self, *args, **kwargs):
        self.calls.append(self.name)
        raise AssertionError(f"{self.name} was called although the command should have failed first")


@pytest.fixture
def no_work(monkeypatch):
    """Replace every data/model loader and every worker the commands use; returns the calls."""
    import backend_api.archive as archive
    import pinn_jax.backend as jb
    import pinn_jax.inference as inference
    import pinn_jax.pipeline as pipeline
    import pinn_jax.simulate as simulate
    from backend_api.raw_data import RawData

    calls: list = []
    monkeypatch.setattr(RawData, "from_file", classmethod(lambda cls, *a, **k: _Recorder("RawData.from_file", calls)()))
    monkeypatch.setattr(inference, "load_inference_bundle", _Recorder("load_inference_bundle", calls))
    monkeypatch.setattr(jb.JaxBackend, "train_cdi_model", _Recorder("train_cdi_model", calls))
    monkeypatch.setattr(pipeline, "reconstruct", _Recorder("reconstruct", calls))
    monkeypatch.setattr(simulate, "simulate_to_npz", _Recorder("simulate_to_npz", calls))
    monkeypatch.setattr(simulate, "simulate_dataset", _Recorder("simulate_dataset", calls))
    monkeypatch.setattr(archive, "read_manifest", _Recorder("read_manifest", calls))
    return calls


@pytest.fixture
def work(tmp_path):
    """A folder with a valid data file, a stand-in model folder and an existing regular file."""
    data = _tiny_npz(tmp_path / "data.npz")
    model = tmp_path / "model"
    model.mkdir()
    (model / "wts.h5.zip").write_bytes(b"never read by these tests")
    blocker = tmp_path / "taken"
    blocker.write_bytes(b"an existing file that must survive\n")
    return {"dir": tmp_path, "data": data, "model": model, "file": blocker}


# ---------------------------------------------------------------------------------------------
# output folders: an existing file, a file as parent, not writable
# ---------------------------------------------------------------------------------------------

_OUTPUT_CASES = {
    "infer --output_dir": (lambda w, out: ["infer", "--model_path", w["model"], "--test_data", w["data"],
                                           "--output_dir", out], "--output_dir"),
    "train --output_dir": (lambda w, out: ["train", "--train_data_file", w["data"], "--output_dir", out],
                           "--output_dir"),
    "train --checkpoint_dir": (lambda w, out: ["train", "--train_data_file", w["data"], "--output_dir",
                                               w["dir"] / "run", "--checkpoint_dir", out], "--checkpoint_dir"),
    "simulate --output-dir": (lambda w, out: ["simulate", "--output-dir", out, "--n-images", "8"], "--output-dir"),
    "demo --output-dir": (lambda w, out: ["demo", "--output-dir", out, "--n-images", "8", "--epochs", "1"],
                          "--output-dir"),
    "convert output": (lambda w, out: ["convert", w["model"], out], "output"),
}


@pytest.mark.parametrize("case", sorted(_OUTPUT_CASES))
def test_output_dir_that_is_a_file_fails_before_any_work(capsys, no_work, work, case):
    argv_of, flag = _OUTPUT_CASES[case]
    before = _snapshot(work["dir"])
    rc, out, err = _run_main(capsys, argv_of(work, work["file"]))
    assert rc == 2
    line = _one_line(err)
    assert flag in line and str(work["file"]) in line and "regular file" in line
    assert no_work == []                       # nothing was loaded, simulated or trained
    assert _snapshot(work["dir"]) == before    # nothing written; the file is byte-identical


@pytest.mark.parametrize("case", sorted(_OUTPUT_CASES))
def test_output_dir_below_a_file_fails_before_any_work(capsys, no_work, work, case):
    argv_of, flag = _OUTPUT_CASES[case]
    before = _snapshot(work["dir"])
    target = work["file"] / "sub" / "deeper"
    rc, _, err = _run_main(capsys, argv_of(work, target))
    assert rc == 2
    line = _one_line(err)
    assert flag in line and str(target) in line and "is not a directory" in line
    assert no_work == []
    assert _snapshot(work["dir"]) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.parametrize("case", sorted(_OUTPUT_CASES))
def test_output_dir_in_a_read_only_folder_fails_before_any_work(capsys, no_work, work, case):
    argv_of, flag = _OUTPUT_CASES[case]
    locked = work["dir"] / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, _, err = _run_main(capsys, argv_of(work, locked / "out"))
        assert rc == 2
        line = _one_line(err)
        assert flag in line and "not writable" in line
        assert no_work == [] and list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# input files, model paths, numeric and conflicting flags
# ---------------------------------------------------------------------------------------------

_FLAG_CASES = {
    "infer odd --M": (["infer", "--model_path", "{model}", "--test_data", "{data}", "--M", "7"], ["--M", "even", "7"]),
    "infer --M 0": (["infer", "--model_path", "{model}", "--test_data", "{data}", "--M", "0"], ["--M", "positive"]),
    "infer vmin >= vmax": (["infer", "--model_path", "{model}", "--test_data", "{data}", "--phase_vmin", "2",
                            "--phase_vmax", "1"], ["--phase_vmin 2", "--phase_vmax 1"]),
    "infer --max_canvas_pixels 0": (["infer", "--model_path", "{model}", "--test_data", "{data}",
                                     "--max_canvas_pixels", "0"], ["--max_canvas_pixels", "positive"]),
    "infer model path a plain file": (["infer", "--model_path", "{file}", "--test_data", "{data}"],
                                      ["--model_path", "neither a directory nor a .zip"]),
    "infer model zip of another name": (["infer", "--model_path", "{dir}/other.zip", "--test_data", "{data}"],
                                        ["--model_path", "other.zip", "wts.h5.zip"]),
    "infer test data a folder": (["infer", "--model_path", "{model}", "--test_data", "{dir}"],
                                 ["--test_data", "not a file"]),
    "train --max_canvas_pixels -5": (["train", "--train_data_file", "{data}", "--max_canvas_pixels", "-5"],
                                     ["--max_canvas_pixels", "positive"]),
    "train --nepochs 0": (["train", "--train_data_file", "{data}", "--output_dir", "{dir}/run", "--nepochs", "0"],
                          ["nepochs"]),
    "train --batch_size 0": (["train", "--train_data_file", "{data}", "--output_dir", "{dir}/run",
                              "--batch_size", "0"], ["batch_size"]),
    "train test data a folder": (["train", "--train_data_file", "{data}", "--test_data_file", "{dir}",
                                  "--output_dir", "{dir}/run"], ["--test_data_file", "is a directory, not an NPZ file"]),
    "train missing test data": (["train", "--train_data_file", "{data}", "--test_data_file", "{dir}/no.npz",
                                 "--output_dir", "{dir}/run"], ["--test_data_file", "file not found"]),
    "train --do_stitching without test data": (["train", "--train_data_file", "{data}", "--output_dir",
                                                "{dir}/run", "--do_stitching"], ["--do_stitching", "--test_data_file"]),
    "train --resume without checkpoints": (["train", "--train_data_file", "{data}", "--output_dir", "{dir}/run",
                                            "--resume"], ["--resume"]),
    "simulate --train-fraction 1.5": (["simulate", "--output-dir", "{dir}/sim", "--train-fraction", "1.5"],
                                      ["--train-fraction", "1.5"]),
    "demo --gridsize too large": (["demo", "--output-dir", "{dir}/demo", "--n-images", "8", "--gridsize", "3"],
                                  ["--gridsize 3", "9 positions", "--n-images 8"]),
    "convert output named .zip": (["convert", "{model}", "{dir}/out.zip"], ["output", "folder"]),
}


@pytest.mark.parametrize("case", sorted(_FLAG_CASES))
def test_bad_flag_fails_before_any_work(capsys, no_work, work, case):
    argv, expected = _FLAG_CASES[case]
    fill = {k: str(v) for k, v in work.items()}
    (work["dir"] / "other.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip of another name
    before = _snapshot(work["dir"])
    rc, _, err = _run_main(capsys, [a.format(**fill) for a in argv])
    assert rc == 2
    line = _one_line(err)
    for text in expected:
        assert text in line, (text, line)
    assert no_work == []
    assert _snapshot(work["dir"]) == before


def test_infer_M_larger_than_the_model_patch_fails_before_the_network(capsys, monkeypatch, work, saved_model):
    from pinn_jax import inference

    calls: list = []
    monkeypatch.setattr(inference.InferenceModel, "predict", _Recorder("predict", calls))
    out = work["dir"] / "inf"
    rc, _, err = _run_main(capsys, ["infer", "--model_path", saved_model, "--test_data", work["data"],
                                    "--output_dir", out, "--M", "80"])
    assert rc == 2 and "--M 80 exceeds the model's 64x64 patches" in _one_line(err)
    assert calls == [] and not out.exists()


# ---------------------------------------------------------------------------------------------
# unreadable data files: exit 2, one line, no traceback (real subprocesses)
# ---------------------------------------------------------------------------------------------


def _bad_file(kind: str, folder: Path) -> Path:
    good = _tiny_npz(folder / "good.npz").read_bytes()
    path = folder / f"{kind}.npz"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros((4, 64, 64), np.float32))
    elif kind == "text":
        path.write_text("x,y\n1,2\n")
    elif kind == "corrupt_member":
        # a valid zip directory, but the diff3d member's bytes are damaged (CRC mismatch)
        with zipfile.ZipFile(folder / "good.npz") as zf:
            info = zf.getinfo("diff3d.npy")
        data = bytearray(good)
        start = info.header_offset + 30 + len(info.filename) + 400
        data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
        path.write_bytes(bytes(data))
    (folder / "good.npz").unlink()
    return path


_DATA_KINDS = {"truncated": "truncated or corrupt", "empty": "empty", "npy": ".npy",
               "text": "not an NPZ", "corrupt_member": "diff3d"}


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(_DATA_KINDS))
@pytest.mark.parametrize("command", ["train", "infer"])
def test_unreadable_data_file_exit_2_one_line(tmp_path, command, kind):
    bad = _bad_file(kind, tmp_path)
    original = bad.read_bytes()
    out = tmp_path / "out"
    if command == "train":
        argv = ["train", "--train_data_file", bad, "--output_dir", out, "--nepochs", "1"]
        flag = "--train_data_file"
    else:
        model = tmp_path / "model"
        model.mkdir()
        (model / "wts.h5.zip").write_bytes(b"not read: the data fail first")
        argv = ["infer", "--model_path", model, "--test_data", bad, "--output_dir", out]
        flag = "--test_data"
    proc = subprocess.run([sys.executable, "-m", "pinn_jax.cli"] + [str(a) for a in argv], cwd=tmp_path,
                          env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"pinn-jax {command}: error: {flag}: cannot read")
    assert str(bad) in lines[0] and _DATA_KINDS[kind] in lines[0]
    assert not out.exists() and bad.read_bytes() == original


_LOADER_ERRORS = {
    "EOFError": EOFError("No data left in file"),
    "BadZipFile": zipfile.BadZipFile("Bad CRC-32 for file 'diff3d.npy'"),
    "zlib.error": zlib.error("Error -3 while decompressing data: invalid stored block lengths"),
    "TypeError": TypeError("'numpy.ndarray' object does not support the context manager protocol"),
    "KeyError": KeyError("diff3d"),
    "OSError": OSError(5, "Input/output error"),
    "UnpicklingError": pickle.UnpicklingError("invalid load key, 'x'."),
    "multi-line ValueError": ValueError("first line\nsecond line"),
}


@pytest.mark.parametrize("name", sorted(_LOADER_ERRORS))
@pytest.mark.parametrize("command", ["train", "infer"])
def test_any_loader_failure_becomes_one_line_naming_flag_and_file(capsys, monkeypatch, work, command, name):
    """Whatever numpy's loader lets through while reading a data file is mapped to exit 2."""
    from backend_api.raw_data import RawData

    exc = _LOADER_ERRORS[name]

    def fail(cls, path, *a, **k):
        raise exc

    monkeypatch.setattr(RawData, "from_file", classmethod(fail))
    out = work["dir"] / "out"
    if command == "train":
        argv, flag = ["train", "--train_data_file", work["data"], "--output_dir", out], "--train_data_file"
    else:
        argv = ["infer", "--model_path", work["model"], "--test_data", work["data"], "--output_dir", out]
        flag = "--test_data"
    rc, _, err = _run_main(capsys, argv)
    assert rc == 2
    line = _one_line(err)
    assert f"{flag}: cannot read {work['data']}" in line
    assert " ".join(str(exc).split()) in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the stitching canvas is checked before training / before the network runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """An untrained N=64 jax model archive (load_inference_bundle reads it for real)."""
    from backend_api import params as legacy
    from backend_api.config import ModelConfig
    from pinn_jax import checkpoint
    from pinn_jax.model import build_model
    from pinn_jax.probe import default_probe

    folder = tmp_path_factory.mktemp("model")
    model = build_model(ModelConfig(N=64, gridsize=1, n_filters_scale=1), np.asarray(default_probe(64)),
                        988.2, seed=3)
    checkpoint.save_model(model, folder)
    legacy.reset()
    return folder


def test_infer_refuses_a_huge_canvas_before_the_network(capsys, monkeypatch, work, saved_model):
    from pinn_jax import inference

    calls: list = []
    monkeypatch.setattr(inference.InferenceModel, "predict", _Recorder("predict", calls))
    x = np.full(8, 50.0)
    x[3] = 1e6
    data = _tiny_npz(work["dir"] / "spread.npz", x=x)
    out = work["dir"] / "inf"
    rc, _, err = _run_main(capsys, ["infer", "--model_path", saved_model, "--test_data", data, "--output_dir", out])
    assert rc == 2
    line = _one_line(err)
    assert "--test_data" in line and "pixels" in line and " x " in line and "TiB" in line
    assert "max_canvas_pixels" in line
    assert calls == [] and not out.exists()


def test_infer_max_canvas_pixels_flag_reaches_the_check(capsys, monkeypatch, work, saved_model):
    """Positions spanning 300 px: a 20 + 2 * 150 = 320 px square canvas, refused under 1000 px."""
    from pinn_jax import inference

    calls: list = []
    monkeypatch.setattr(inference.InferenceModel, "predict", _Recorder("predict", calls))
    x = np.linspace(0, 300, 8)
    data = _tiny_npz(work["dir"] / "wide.npz", x=x, y=x)
    rc, _, err = _run_main(capsys, ["infer", "--model_path", saved_model, "--test_data", data,
                                    "--output_dir", work["dir"] / "inf", "--max_canvas_pixels", "1000"])
    assert rc == 2
    line = _one_line(err)
    assert "max_canvas_pixels=1000" in line and "320 x 320 pixels" in line
    assert calls == []


def test_infer_refuses_positions_outside_the_object_before_the_network(capsys, monkeypatch, work, saved_model):
    from pinn_jax import inference

    calls: list = []
    monkeypatch.setattr(inference.InferenceModel, "predict", _Recorder("predict", calls))
    x = np.full(8, 60.0)
    x[[1, 2, 4, 5, 7]] = 5000.0  # most of the scan misses the object: refused (a few would warn)
    data = _tiny_npz(work["dir"] / "outside.npz", x=x, object_guess=np.ones((128, 128), np.complex64))
    out = work["dir"] / "inf"
    rc, _, err = _run_main(capsys, ["infer", "--model_path", saved_model, "--test_data", data, "--output_dir", out])
    assert rc == 2
    line = _one_line(err)
    assert "5 of 8 positions" in line and "128 x 128" in line and "x=5000" in line
    assert calls == [] and not out.exists()


def test_train_do_stitching_refuses_a_huge_canvas_before_training(capsys, monkeypatch, work):
    import pinn_jax.backend as jb

    calls: list = []
    monkeypatch.setattr(jb.JaxBackend, "train_cdi_model", _Recorder("train_cdi_model", calls))
    y = np.full(8, 50.0)
    y[0] = -2e6
    test = _tiny_npz(work["dir"] / "spread.npz", y=y)
    out = work["dir"] / "run"
    rc, _, err = _run_main(capsys, ["train", "--train_data_file", work["data"], "--test_data_file", test,
                                    "--output_dir", out, "--do_stitching", "--nepochs", "1"])
    assert rc == 2
    line = _one_line(err)
    assert line.startswith("pinn-jax train: error: --test_data_file:") and "pixels" in line and "TiB" in line
    assert calls == [] and not out.exists()
