"""The 'jax' backend end to end through backend_api.workflows (tiny data: 64 patterns, N=64,
n_filters_scale 1, 2 epochs), save/load round trip, reconstruct, TF archives, convert."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from backend_api import archive, workflows
from backend_api import params as legacy
from backend_api.backends import Backend, get_backend
from backend_api.config import ModelConfig, TrainingConfig
from pinn_jax import simulate
from pinn_jax.backend import JaxBackend
from pinn_jax.inference import InferenceModel

FIX = Path(__file__).parent / "fixtures"

pytestmark = pytest.mark.slow


def tiny_config(**kw):
    base = dict(model=ModelConfig(N=64, gridsize=1, n_filters_scale=1), nepochs=2, batch_size=16,
                n_groups=64, backend="jax")
    base.update(kw)
    return TrainingConfig(**base)


@pytest.fixture(scope="module")
def data():
    return simulate.simulate_dataset(N=64, object_size=128, n_images=128, seed=0)


@pytest.fixture(scope="module")
def run(data):
    legacy.reset()
    backend = get_backend("jax")
    backend.progress = False
    train, test = data
    amp, phase, results = workflows.run_cdi_example(train, test, tiny_config(), do_stitching=True)
    yield amp, phase, results
    legacy.reset()


def test_registry_gives_jax_backend():
    b = get_backend("jax")
    assert isinstance(b, JaxBackend) and b.name == "jax"
    assert isinstance(b, Backend)


def test_run_cdi_example_returns_reference_results(run):
    amp, phase, results = run
    for key in ("history", "history_epochs", "model_instance", "train_container", "test_container",
                "reconstructed_obj", "pred_amp", "reconstructed_obj_cdi", "stitched_obj",
                "obj_tensor_full", "global_offsets", "recon_amp", "recon_phase"):
        assert key in results, key
    assert results["backend"] == "jax"
    h = results["history"]
    assert len(h["loss"]) == 2 and len(h["val_loss"]) == 2 and h["train_loss"] == h["loss"]
    assert results["history_epochs"] == [0, 1]
    assert all(np.isfinite(h["loss"]))
    n_test = len(results["test_container"])
    assert results["reconstructed_obj"].shape == (n_test, 64, 64, 1)
    assert results["obj_tensor_full"].dtype == np.complex64
    assert amp.ndim == 2 and amp.shape == phase.shape == results["recon_amp"].shape
    assert np.isfinite(amp).all() and np.abs(phase).max() <= np.pi + 1e-6
    assert isinstance(results["model_instance"], InferenceModel)
    # the workflow bridged the config and stored the training scale, as the reference does
    assert legacy.cfg["intensity_scale"] == pytest.approx(np.sqrt(1e9) / 32)


def test_save_load_predict_bitwise_through_workflows(run, tmp_path):
    _, _, results = run
    cfg = tiny_config()
    path = workflows.save_model(results, tmp_path, cfg)
    assert path == tmp_path / "wts.h5.zip" and archive.read_manifest(path)["backend"] == "jax"
    model, cfg_dict = workflows.load_inference_bundle(tmp_path)
    assert cfg_dict["N"] == 64 and cfg_dict["gridsize"] == 1
    c = results["test_container"]
    x = np.asarray(c.X, np.float32) * np.float32(cfg_dict["intensity_scale"])
    before = results["model_instance"].predict([x, c.local_offsets])
    after = model.predict([x, c.local_offsets])
    assert after.shape == (len(c), 64, 64, 1) and after.dtype == np.complex64
    np.testing.assert_array_equal(before, after)
    # reassemble_cdi_image with the loaded model reproduces the stitched object
    amp, phase, rr = workflows.reassemble_cdi_image(c, cfg, model=model)
    np.testing.assert_allclose(amp, results["recon_amp"], rtol=1e-5, atol=1e-6)


def test_reconstruct_raw_data_on_object_grid(run, data):
    _, _, results = run
    _, test = data
    shape = tuple(test.objectGuess.shape)
    amp, phase, res = JaxBackend(seed=0).reconstruct(results["model_instance"], test, M=20, object_shape=shape)
    assert res["object_on_grid"].shape == shape
    assert res["amplitude_on_grid"].shape == shape and res["phase_on_grid"].shape == shape
    assert amp.ndim == 2
    assert len(res["global_offsets"]) == len(test.xcoords)  # every position, one group each


def test_same_seed_same_weights(data):
    """Two trainings with the same seed give identical weights (grouping, init, shuffling)."""
    from flax import nnx
    import jax

    train, _ = data
    b = JaxBackend(seed=5, progress=False)
    r1 = b.train_cdi_model(train, None, tiny_config(nepochs=1))
    r2 = b.train_cdi_model(train, None, tiny_config(nepochs=1))
    l1 = jax.tree.leaves(nnx.state(r1["model_instance"].model))
    l2 = jax.tree.leaves(nnx.state(r2["model_instance"].model))
    for a, c in zip(l1, l2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert r1["history"]["loss"] == r2["history"]["loss"]


def _tf_archive(tmp_path: Path) -> Path:
    parts = sorted((FIX / "tf_archive_small").glob("wts.h5.zip.part*"))
    if not parts:
        pytest.skip("tf_archive_small parts not present")
    out = tmp_path / "tf" / "wts.h5.zip"
    out.parent.mkdir(parents=True)
    with open(out, "wb") as fh:
        for p in parts:
            fh.write(p.read_bytes())
    return out


def test_tensorflow_archive_through_workflows_names_convert(tmp_path):
    shutil.copy(FIX / "tf_archive_small" / "tf_meta_only.zip", tmp_path / "wts.h5.zip")
    with pytest.raises((RuntimeError, ValueError), match="pinn-jax convert"):
        workflows.load_inference_bundle(tmp_path)
    with pytest.raises(archive.ArchiveBackendError, match="pinn-jax convert"):
        get_backend("jax").load_inference_bundle(tmp_path)


def test_convert_tensorflow_archive_then_load_matches_reference_outputs(tmp_path):
    from pinn_jax.cli import main

    src = _tf_archive(tmp_path)
    assert main(["convert", str(src), str(tmp_path / "jax"), "--quiet"]) == 0
    model, cfg = get_backend("jax").load_inference_bundle(tmp_path / "jax")
    assert cfg["backend"] == "jax" and cfg["N"] == 64
    # Same inputs as the archive's reference outputs (tf_archive_small README §2: the inputs
    # are those of tf_reference/batch16_gs1_io.npz).
    inputs = FIX / "tf_reference" / "batch16_gs1_io.npz"
    outputs = FIX / "tf_archive_small" / "io_outputs.npz"
    if not (inputs.is_file() and outputs.is_file()):
        pytest.skip("reference io fixtures not present")
    x = np.load(inputs)
    ref = np.load(outputs)
    out = model.predict([x["input_diffraction_scaled"], x["input_positions"]])
    centre = (slice(None), slice(16, 48), slice(16, 48))
    np.testing.assert_allclose(out[centre], ref["d2o_obj"][centre], rtol=2e-3, atol=2e-3)


def test_pinn_loss_matches_tensorflow_on_converted_weights(tmp_path):
    """PtychoLoss on the imported TF model equals the reference's Keras loss on the same batch."""
    import jax.numpy as jnp
    from flax import nnx

    from pinn_jax.interop import load_tf_archive
    from pinn_jax.train import make_loss_fn

    src = _tf_archive(tmp_path)
    inputs = FIX / "tf_reference" / "batch16_gs1_io.npz"
    outputs = FIX / "tf_archive_small" / "io_outputs.npz"
    if not (inputs.is_file() and outputs.is_file()):
        pytest.skip("reference io fixtures not present")
    model, params = load_tf_archive(src)
    x, ref = np.load(inputs), np.load(outputs)
    s = float(ref["intensity_scale"])
    graphdef, trainable, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = make_loss_fn(graphdef, tiny_config(), s)
    batch = {"X": jnp.asarray(x["X_unscaled"]), "coords": jnp.asarray(x["input_positions"])}
    per_sample, aux = loss_fn(trainable, rest, batch, None)
    assert per_sample.shape == (16,)
    np.testing.assert_allclose(float(np.mean(per_sample)), float(ref["loss_nll_mean_manual"]), rtol=1e-5)
