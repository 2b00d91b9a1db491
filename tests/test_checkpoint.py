"""pinn_jax.checkpoint: wts.h5.zip <-> PtychoPINN (bitwise), archive layout, errors."""

from __future__ import annotations

import json
import shutil
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
    snap = checkpoint.params_snapshot(model, TrainingConfig(model=ModelConfig(N=64), nepochs=7))
    assert snap["label"] == "from-legacy" and snap["nepochs"] == 7
    # The model's truth wins over the config (n_filters_scale 1 here, config says 2).
    assert snap["n_filters_scale"] == 1 and snap["N"] == 64
