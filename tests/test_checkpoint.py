"""pinn_jax.checkpoint: wts.h5.zip <-> PtychoPINN (bitwise), archive layout, errors."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from backend_api import archive
from backend_api import params as legacy
from backend_api.config import ModelConfig, TrainingConfig
from pinn_jax import checkpoint
from pinn_jax.inference import InferenceModel
from pinn_jax.model import build_model
from pinn_jax.probe import default_probe

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _fresh_legacy_cfg():
    legacy.reset()
    yield
    legacy.reset()


def tiny_model(*, probe_trainable=False, scale_trainable=False, seed=1, N=64, gridsize=1):
    mc = ModelConfig(N=N, gridsize=gridsize, n_filters_scale=1)
    probe = np.asarray(default_probe(N)) * (1 + 0.3j)
    return build_model(mc, probe, 988.2117, probe_trainable=probe_trainable,
                       intensity_scale_trainable=scale_trainable, seed=seed)


def inputs(B=5, N=64, C=1, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((B, N, N, C)) * 50).astype(np.float32)
    off = rng.normal(size=(B, 1, 2, C)).astype(np.float32)
    return x, off


@pytest.mark.parametrize("probe_trainable,scale_trainable", [(False, False), (True, True)])
def test_save_load_predict_is_bitwise(tmp_path, probe_trainable, scale_trainable):
    model = tiny_model(probe_trainable=probe_trainable, scale_trainable=scale_trainable)
    cfg = TrainingConfig(model=ModelConfig(N=64, n_filters_scale=1), nepochs=3)
    path = checkpoint.save_model(model, tmp_path, cfg)
    assert path == tmp_path / "wts.h5.zip"
    loaded, params = checkpoint.load_model(tmp_path)
    # every array identical, same trainable switches
    a = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
    b = jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded)))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert loaded.probe_trainable == probe_trainable
    assert loaded.intensity_scale_trainable == scale_trainable
    assert params["nepochs"] == 3 and params["N"] == 64
    if probe_trainable:
        return  # identical arrays and graph; predicting again would only recompile
    x, off = inputs()
    p1 = InferenceModel(model).predict([x, off])
    p2 = InferenceModel(loaded).predict([x, off])
    assert p1.dtype == np.complex64 and p1.shape == (5, 64, 64, 1)
    np.testing.assert_array_equal(p1, p2)


def test_archive_layout_manifest_and_snapshot(tmp_path):
    model = tiny_model(gridsize=2)
    path = checkpoint.save_model(model, tmp_path)
    manifest = archive.read_manifest(path)
    assert manifest["backend"] == "jax"
    assert manifest["models"] == ["autoencoder", "diffraction_to_obj"]
    assert manifest["version"] == checkpoint.ARCHIVE_VERSION
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        snap = json.loads(zf.read("diffraction_to_obj/params.json"))
    for m in ("autoencoder", "diffraction_to_obj"):
        assert f"{m}/params.dill" in names
        assert any(n.startswith(f"{m}/state/") and n.endswith("_CHECKPOINT_METADATA") for n in names)
    assert snap["N"] == 64 and snap["gridsize"] == 2 and snap["backend"] == "jax"
    assert snap["intensity_scale"] == pytest.approx(float(model.intensity_scale))
    assert snap["jax_model_spec"]["n_filters_scale"] == 1
    contents = archive.read_archive(path, tmp_path / "x", expected_backend="jax")
    probe = contents.models["diffraction_to_obj"].params["probe"]
    assert probe.shape == (64, 64, 1) and probe.dtype == np.complex64
    np.testing.assert_array_equal(probe[..., 0], np.asarray(model.probe))


def test_load_from_archive_file_path_and_restores_legacy_keys(tmp_path):
    model = tiny_model()
    path = checkpoint.save_model(model, tmp_path / "out")
    loaded, params = checkpoint.load_model(path)  # the .zip itself
    assert loaded.spec == model.spec
    assert params["object.big"] is True and params["probe.big"] is True


def test_tensorflow_archive_gives_cross_backend_error_with_convert_hint(tmp_path):
    src = FIX / "tf_archive_small" / "tf_meta_only.zip"
    dst = tmp_path / "wts.h5.zip"
    shutil.copy(src, dst)
    with pytest.raises(archive.ArchiveBackendError) as err:
        checkpoint.load_model(tmp_path)
    msg = str(err.value)
    assert "tensorflow" in msg and "jax" in msg and "pinn-jax convert" in msg


def test_missing_archive_and_corrupt_state(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.load_model(tmp_path / "nothing")
    # An archive whose state does not match its spec (state saved for another width).
    a = tiny_model()
    other = build_model(ModelConfig(N=64, n_filters_scale=2), np.asarray(default_probe(64)), 10.0, seed=0)
    good = checkpoint.save_model(a, tmp_path / "a")
    bad_state = tmp_path / "bad_state"
    checkpoint.save_state(bad_state, nnx.to_pure_dict(nnx.state(other)))
    snap = checkpoint.params_snapshot(a)
    archive.write_archive(tmp_path / "b" / "wts.h5.zip",
                          {"diffraction_to_obj": archive.ModelEntry(params=snap, files={"state": bad_state})},
                          backend="jax", version=checkpoint.ARCHIVE_VERSION)
    with pytest.raises(archive.ArchiveFormatError, match="does not match"):
        checkpoint.load_model(tmp_path / "b")
    assert good.is_file()


def test_snapshot_overlays_config_and_legacy_cfg(tmp_path):
    legacy.cfg["label"] = "from-legacy"
    model = tiny_model()
    snap = checkpoint.params_snapshot(model, TrainingConfig(model=ModelConfig(N=64), nepochs=7),
                                      base=legacy.cfg)
    assert snap["label"] == "from-legacy" and snap["nepochs"] == 7
    # The model's truth wins over the config (n_filters_scale 1 here, config says 2).
    assert snap["n_filters_scale"] == 1 and snap["N"] == 64


def test_snapshot_never_reads_the_live_legacy_cfg():
    legacy.cfg["my_key"] = "from-legacy"  # not a DEFAULT_CFG key
    legacy.cfg["nepochs"] = 99
    model = tiny_model()
    snap = checkpoint.params_snapshot(model)
    assert "my_key" not in snap and snap["nepochs"] == legacy.DEFAULT_CFG["nepochs"]
    assert set(legacy.DEFAULT_CFG) <= set(snap)  # every legacy key, as the reference's snapshot
    snap = checkpoint.params_snapshot(model, TrainingConfig(model=ModelConfig(N=64), nepochs=7))
    assert snap["nepochs"] == 7 and "my_key" not in snap
    assert checkpoint.params_snapshot(model, base={"my_key": "mine"})["my_key"] == "mine"


# ---------------------------------------------------------------------------------------------
# failing saves and loads leave nothing behind


def _listing(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_failed_save_keeps_the_archive_and_leaves_no_temp(tmp_path, monkeypatch):
    model = tiny_model()
    path = checkpoint.save_model(model, tmp_path)
    before = _listing(tmp_path)

    def broken_state(directory, tree):
        Path(directory).mkdir()
        (Path(directory) / "partial").write_bytes(b"half")
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_state", broken_state)
        with pytest.raises(OSError, match="simulated"):
            checkpoint.save_model(model, tmp_path)
    assert _listing(tmp_path) == before

    calls = {"n": 0}
    real = archive._add_member

    def flaky(zf, name, src):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full while zipping (simulated)")
        return real(zf, name, src)

    monkeypatch.setattr(archive, "_add_member", flaky)
    with pytest.raises(OSError, match="while zipping"):
        checkpoint.save_model(model, tmp_path)
    assert calls["n"] == 5
    assert _listing(tmp_path) == before


_KILLED_SAVE = """
import sys, time
import numpy as np
from backend_api import archive
from backend_api.config import ModelConfig
from pinn_jax import checkpoint
from pinn_jax.model import build_model
from pinn_jax.probe import default_probe

real = archive._add_member
count = [0]
def slow(zf, name, src):
    count[0] += 1
    if count[0] == 4:  # the zip is half written: wait to be killed
        print("WRITING", flush=True)
        time.sleep(120)
    return real(zf, name, src)
archive._add_member = slow
model = build_model(ModelConfig(N=64, gridsize=1, n_filters_scale=1), np.asarray(default_probe(64)), 10.0, seed=2)
checkpoint.save_model(model, sys.argv[1])
"""


@pytest.mark.slow
def test_save_killed_midway_leaves_old_archive_and_next_save_removes_its_temps(tmp_path):
    """A save SIGKILLed while zipping: the previous archive stays byte-identical, its scratch
    folder and half-written zip stay behind, and the next save into the folder removes both."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    old = checkpoint.save_model(tiny_model(), out)
    before = old.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "WRITING"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = sorted(p.name for p in out.iterdir() if p.name != archive.ARCHIVE_NAME)
    assert len(left) == 2, left
    assert left[0].startswith(f"{checkpoint.SAVE_TEMP_PREFIX}{child.pid}@")
    assert left[1].startswith(f".wts.h5.zip.{child.pid}@") and left[1].endswith(".tmp")
    assert old.read_bytes() == before

    model = tiny_model(seed=3)
    checkpoint.save_model(model, out)
    assert sorted(p.name for p in out.iterdir()) == [archive.ARCHIVE_NAME]
    loaded, _ = checkpoint.load_model(out)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))),
                    jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _bad_archive(tmp_path: Path, kind: str) -> tuple[Path, str]:
    folder = tmp_path / "model"
    folder.mkdir()
    p = folder / archive.ARCHIVE_NAME
    if kind == "text":
        p.write_text("not a model\n")
        return p, "it is a text file"
    if kind == "hdf5":
        import h5py

        with h5py.File(p, "w") as h5:
            h5.create_dataset("kernel", data=np.ones(3))
        return p, "it is an HDF5 file"
    if kind == "empty":
        p.touch()
        return p, "the file is empty"
    if kind == "truncated":
        good = checkpoint.save_model(tiny_model(), tmp_path / "good").read_bytes()
        p.write_bytes(good[: len(good) // 3])
        return p, "truncated or corrupt"
    if kind == "folder":
        (folder / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
        return folder, "is a directory without a wts.h5.zip"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["text", "hdf5", "empty", "truncated", "folder"])
def test_load_model_names_a_bad_file_and_leaves_no_temp(tmp_path, monkeypatch, kind):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bad, what = _bad_archive(tmp_path, kind)
    before = _listing(bad.parent)
    with pytest.raises(archive.ArchiveError) as err:
        checkpoint.load_model(bad)
    msg = str(err.value)
    assert what in msg and str(bad) in msg and "\n" not in msg
    assert list(scratch.iterdir()) == []
    assert _listing(bad.parent) == before


def test_load_model_passes_extraction_limits(tmp_path):
    path = checkpoint.save_model(tiny_model(), tmp_path)
    with pytest.raises(archive.ArchiveLimitError, match="per-member limit of 64 KiB"):
        checkpoint.load_model(path, limits=archive.ExtractionLimits(max_member_bytes=64 << 10))
    model, _ = checkpoint.load_model(path, limits=archive.ExtractionLimits(max_ratio=1e9))
    assert model.spec.N == 64


# ---------------------------------------------------------------------------------------------
# the command line: archive errors are one line, exit 2


def _tiny_data(path: Path) -> Path:
    from backend_api.raw_data import RawData

    rng = np.random.default_rng(0)
    n = 16
    raw = RawData.from_coords_without_pc(rng.uniform(40, 60, n), rng.uniform(40, 60, n),
                                         rng.random((n, 64, 64)).astype(np.float32),
                                         np.ones((64, 64), np.complex64), np.zeros(n, np.int64))
    raw.to_file(path)
    return path


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("kind", ["text", "hdf5", "empty", "truncated"])
@pytest.mark.parametrize("command", ["infer", "convert"])
def test_cli_bad_model_archive_is_one_line_exit_2(tmp_path, capsys, kind, command):
    from pinn_jax.cli import main

    bad, what = _bad_archive(tmp_path, kind)
    data = _tiny_data(tmp_path / "d.npz")
    if command == "infer":
        argv = ["infer", "--model_path", str(bad), "--test_data", str(data), "--output_dir", str(tmp_path / "o")]
    else:
        argv = ["convert", str(bad), str(tmp_path / "o")]
    rc = main(argv)
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"pinn-jax {command}: error:") and str(bad) in line and what in line
    assert "Traceback" not in line and not (tmp_path / "o").exists()


def test_cli_infer_refuses_an_archive_file_with_another_name(tmp_path, capsys):
    """--model_path x.zip used to load the sibling wts.h5.zip (or fail about it)."""
    from pinn_jax.cli import main

    other = tmp_path / "other.zip"
    shutil.copy(checkpoint.save_model(tiny_model(), tmp_path / "m"), other)
    rc = main(["infer", "--model_path", str(other), "--test_data", str(_tiny_data(tmp_path / "d.npz")),
               "--output_dir", str(tmp_path / "o")])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and str(other) in line and "rename it to wts.h5.zip" in line


def test_cli_infer_archive_over_the_environment_limit(tmp_path, capsys, monkeypatch):
    from pinn_jax.cli import main

    checkpoint.save_model(tiny_model(), tmp_path / "m")
    monkeypatch.setenv(archive.ENV_MAX_MEMBER_BYTES, "64K")
    rc = main(["infer", "--model_path", str(tmp_path / "m"), "--test_data", str(_tiny_data(tmp_path / "d.npz")),
               "--output_dir", str(tmp_path / "o")])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and "per-member limit of 64 KiB" in line and archive.ENV_MAX_MEMBER_BYTES in line


# ---------------------------------------------------------------------------------------------
# resuming from a corrupt run checkpoint


def _toy():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x @ np.arange(1, 5, dtype=np.float32) + 0.5).astype(np.float32)
    params = {"w": jnp.zeros(4, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    rest = {"scale": jnp.ones((), jnp.float32)}

    def loss(params, rest, batch, key):
        r = batch["x"] @ params["w"] + rest["scale"] * params["b"] - batch["y"]
        return r**2, {}

    return loss, params, rest, {"x": x, "y": y}


def _fit_options(ckpt_dir: Path, **kw):
    from pinn_jax import train

    base = dict(nepochs=2, batch_size=16, learning_rate=0.05, progress=False, seed=3, checkpoint_dir=ckpt_dir)
    base.update(kw)
    return train.FitOptions(**base)


def corrupt_checkpoint(step_dir: Path, how: str) -> None:
    """Damage one Orbax step folder as a crash or a bad disk would."""
    state = step_dir / "state"
    if how == "garbled_arrays":  # every array data file cut to 10 bytes
        for f in [*state.glob("d/*"), *state.glob("ocdbt.process_*/d/*")]:
            f.write_bytes(f.read_bytes()[:10])
    elif how == "truncated_manifest":
        for f in state.rglob("manifest.ocdbt"):
            f.write_bytes(f.read_bytes()[:5])
    elif how == "no_metadata":
        (state / "_METADATA").unlink()
    elif how == "garbled_loop":
        (step_dir / "loop" / "metadata").write_text("{not json")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["garbled_arrays", "truncated_manifest", "no_metadata", "garbled_loop"])
def test_resume_from_corrupt_checkpoint_is_one_short_line(tmp_path, how):
    from pinn_jax import train

    loss, params, rest, data = _toy()
    ckpt = tmp_path / "ckpt"
    train.fit(loss, params, rest, data, _fit_options(ckpt))
    corrupt_checkpoint(ckpt / "2", how)
    before = _listing(ckpt)
    with pytest.raises(checkpoint.CheckpointError) as err:
        train.fit(loss, params, rest, data, _fit_options(ckpt, nepochs=3, resume=True))
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {ckpt / '2'} is unreadable (")
    assert msg.endswith("; delete it or start without --resume")
    assert "\n" not in msg and len(msg) < 400 and "tensorstore_spec" not in msg
    assert err.value.path == ckpt / "2" and isinstance(err.value, ValueError)
    assert _listing(ckpt) == before  # nothing deleted or rewritten
    # the advice works: without the broken step, the run resumes from step 1
    shutil.rmtree(ckpt / "2")
    res = train.fit(loss, params, rest, data, _fit_options(ckpt, nepochs=3, resume=True))
    assert res.epochs_run == 3


def test_one_line_cuts_long_and_multiline_messages():
    long = ValueError('OUT_OF_RANGE: Error reading "x" ' + "y" * 500 + ' [tensorstore_spec=\'{"a": 1}\']\nmore')
    text = checkpoint.one_line(long)
    assert len(text) == 200 and text.endswith("...") and "tensorstore" not in text
    assert checkpoint.one_line(ValueError("pytree structure error:\n  at key")) == "pytree structure error:"
    assert checkpoint.one_line(KeyError()) == "KeyError"


_REPEATED_RESUME = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import test_checkpoint as t
from pinn_jax import checkpoint, train

loss, params, rest, data = t._toy()
for _ in range(5):
    try:
        train.fit(loss, params, rest, data, t._fit_options(Path(sys.argv[1]), nepochs=3, resume=True))
    except checkpoint.CheckpointError as exc:
        print("REFUSED", exc, file=sys.stderr)
"""


@pytest.mark.slow
def test_failed_restores_print_no_traceback(tmp_path):
    """Five failed restores in one process (the asyncio "Event loop is closed" reports came
    about one time in three): stderr holds the five messages and nothing else."""
    import subprocess
    import sys

    from pinn_jax import train

    loss, params, rest, data = _toy()
    ckpt = tmp_path / "ckpt"
    train.fit(loss, params, rest, data, _fit_options(ckpt))
    corrupt_checkpoint(ckpt / "2", "garbled_arrays")
    proc = subprocess.run([sys.executable, "-c", _REPEATED_RESUME, str(ckpt), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 5 and all(ln.startswith(f"REFUSED checkpoint {ckpt / '2'} is unreadable") for ln in lines), \
        proc.stderr[-3000:]


@pytest.mark.slow
def test_cli_resume_from_corrupt_checkpoint(tmp_path, capsys):
    """`pinn-jax train --resume` on a damaged latest checkpoint, three times in fresh processes:
    exit 2, one line naming the checkpoint and the way out, no traceback."""
    import os
    import subprocess
    import sys

    from pinn_jax.cli import main

    data = _tiny_data(tmp_path / "d.npz")
    out = tmp_path / "run"
    args = ["train", "--train_data_file", str(data), "--output_dir", str(out), "--n_groups", "16",
            "--gridsize", "1", "--N", "64", "--n_filters_scale", "1", "--batch_size", "16",
            "--no_progress", "--quiet"]
    assert main(args + ["--nepochs", "1"]) == 0
    capsys.readouterr()
    step = out / "checkpoints" / "1"
    corrupt_checkpoint(step, "garbled_arrays")
    archive_before = (out / "wts.h5.zip").read_bytes()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-m", "pinn_jax", *args, "--nepochs", "2", "--resume"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_line_error(proc.stderr)
        assert line.startswith(f"pinn-jax train: error: checkpoint {step} is unreadable (")
        assert line.endswith("delete it or start without --resume") and len(line) < 450
        assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr
    assert (out / "wts.h5.zip").read_bytes() == archive_before


def test_asyncio_noise_filter_drops_only_checkpoint_read_echoes():
    """The filter installed by quiet_aborted_restore drops asyncio's never-retrieved reports of
    tensorstore read errors (Task or Future) and lets every other asyncio record through."""
    import logging

    def record(msg, exc):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None,
                                 (type(exc), exc, None) if exc is not None else None)

    ts_error = ValueError('OUT_OF_RANGE: Error reading "w/.zarray" [tensorstore_spec=\'{"driver":"zarr"}\']')
    f = checkpoint._ASYNCIO_FILTER
    assert not f.filter(record("Future exception was never retrieved\nfuture: <Future>", ts_error))
    assert not f.filter(record("Task exception was never retrieved\ntask: <Task>", ts_error))
    assert f.filter(record("Future exception was never retrieved", ValueError("user code failed")))
    assert f.filter(record("Executing <Task> took 0.2 seconds", None))


def test_a_failed_restore_silences_its_unawaited_read_coroutines():
    """After a restore fails, Python's "coroutine '...' was never awaited" warnings for the
    aborted Orbax reads (they come late, often at exit) are filtered; others are not."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError):
            with checkpoint.quiet_aborted_restore():
                raise RuntimeError("read failed")
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("coroutine 'Store._get_array_metadatas' was never awaited", RuntimeWarning)
            warnings.warn("coroutine 'my_code' was never awaited", RuntimeWarning)
        assert [str(w.message) for w in seen] == ["coroutine 'my_code' was never awaited"]
