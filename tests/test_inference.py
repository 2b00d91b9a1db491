"""pinn_jax.inference: the Keras-like predict, batched prediction, stitching, bundle loading."""

from __future__ import annotations

import numpy as np
import pytest

from backend_api import params as legacy
from backend_api.config import ModelConfig
from pinn_jax import checkpoint, geometry, inference
from pinn_jax.model import build_model
from pinn_jax.probe import default_probe
from numerics import model_conv_tol, within


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(N=64, gridsize=1, n_filters_scale=1), np.asarray(default_probe(64)),
                       988.2117, seed=3)


class _Container:
    """The attributes inference.reconstruct reads from a PtychoDataContainer."""

    def __init__(self, n=12, seed=0):
        rng = np.random.default_rng(seed)
        self.X = (rng.random((n, 64, 64, 1)) * 0.5).astype(np.float32)
        self.local_offsets = np.zeros((n, 1, 2, 1))
        pos = rng.uniform(40, 90, size=(n, 2))
        self.global_offsets = pos.reshape(n, 1, 2, 1)


def test_predict_matches_diffraction_to_obj_and_pads_last_batch(model):
    rng = np.random.default_rng(1)
    x = (rng.random((70, 64, 64, 1)) * 30).astype(np.float32)
    off = rng.normal(size=(70, 1, 2, 1)).astype(np.float32)
    im = inference.InferenceModel(model)  # batches of 64: 64 + 6 (padded)
    out = im.predict([x, off])
    assert out.shape == (70, 64, 64, 1) and out.dtype == np.complex64
    # padding rows do not leak into real rows: the tail equals a prediction of the tail alone
    np.testing.assert_allclose(out[64:], im.predict([x[64:], off[64:]]), rtol=1e-6, atol=1e-6)
    # eager batch of 8 vs the jitted batch of 64: two programs over the same float32 conv net,
    # so they agree to its round-off (numerics.conv_net_tol) relative to each element plus that
    # fraction of the max; a conjugated object fails the same tolerance
    direct = np.asarray(model.diffraction_to_obj(x[:8], off[:8]))
    tol = model_conv_tol(model)
    np.testing.assert_allclose(out[:8], direct, rtol=tol, atol=tol * np.abs(direct).max())
    assert not within(np.conj(out[:8]), direct, rtol=tol, atol=tol * np.abs(direct).max())
    # the same call twice is bitwise identical; a Keras-style dict input works too
    np.testing.assert_array_equal(out, im.predict([x, off]))
    np.testing.assert_array_equal(out, im.predict({"input": x, "input_positions": off}))
    assert im.N == 64 and im.gridsize == 1
    assert im.intensity_scale == pytest.approx(988.2117, rel=1e-6)


def test_predict_rejects_bad_shapes(model):
    im = inference.InferenceModel(model)
    with pytest.raises(ValueError, match=r"input 0 .*\(B, 64, 64, 1\)"):
        im.predict([np.zeros((2, 32, 32, 1)), np.zeros((2, 1, 2, 1))])
    with pytest.raises(ValueError, match=r"input 1 .*\(2, 1, 2, 1\)"):
        im.predict([np.zeros((2, 64, 64, 1)), np.zeros((3, 1, 2, 1))])
    with pytest.raises(ValueError, match="expected"):
        im.predict([np.zeros((2, 64, 64, 1))])
    with pytest.raises(ValueError, match="batch_size"):
        inference.InferenceModel(model, batch_size=0)


def test_reconstruct_stitches_like_reassemble_position(model):
    c = _Container()
    amp, phase, res = inference.reconstruct(model, c, M=20)
    patches = res["obj_tensor_full"]
    expected = np.asarray(geometry.reassemble_position(patches, c.global_offsets, M=20))[..., 0]
    np.testing.assert_allclose(res["stitched_obj"], expected, rtol=1e-6, atol=1e-6)
    assert amp.shape == phase.shape == expected.shape
    np.testing.assert_allclose(amp, np.abs(expected), rtol=1e-6)
    assert set(res) >= {"obj_tensor_full", "global_offsets", "recon_amp", "recon_phase"}
    # flips negate the offsets that go into stitching
    _, _, flipped = inference.reconstruct(model, c, M=20, flip_x=True)
    np.testing.assert_array_equal(flipped["global_offsets"][:, 0, 0], -c.global_offsets[:, 0, 0])


def test_reconstruct_on_object_grid(model):
    c = _Container()
    _, _, res = inference.reconstruct(model, c, M=20, object_shape=(140, 150))
    obj, w = res["object_on_grid"], res["object_weights"]
    assert obj.shape == (140, 150) and obj.dtype == np.complex64 and w.shape == (140, 150)
    # covered exactly around the scan positions, zero far away
    x, y = c.global_offsets[0, 0, :, 0]
    assert w[int(round(y)), int(round(x))] > 0.5
    assert w[0, 0] == 0 and obj[0, 0] == 0


def test_load_inference_bundle_round_trip_and_errors(tmp_path, model):
    legacy.reset()
    try:
        checkpoint.save_model(model, tmp_path / "m")
        im, cfg = inference.load_inference_bundle(tmp_path / "m")
        assert isinstance(im, inference.InferenceModel)
        assert cfg["N"] == 64 and cfg["gridsize"] == 1
        assert legacy.cfg["intensity_scale"] == pytest.approx(float(model.intensity_scale))  # side effect
        rng = np.random.default_rng(2)
        x = (rng.random((3, 64, 64, 1)) * 30).astype(np.float32)
        off = np.zeros((3, 1, 2, 1), np.float32)
        np.testing.assert_array_equal(im.predict([x, off]), inference.InferenceModel(model).predict([x, off]))
    finally:
        legacy.reset()
    with pytest.raises(ValueError, match="does not exist"):
        inference.load_inference_bundle(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        inference.load_inference_bundle(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="wts.h5.zip"):
        inference.load_inference_bundle(tmp_path / "empty")


def test_predict_autoencoder_outputs(model):
    rng = np.random.default_rng(4)
    x = (rng.random((3, 64, 64, 1)) * 30).astype(np.float32)
    off = np.zeros((3, 1, 2, 1), np.float32)
    obj, amp, inten = inference.predict_autoencoder(model, x, off)
    assert obj.shape == (3, 64, 64, 1) and amp.shape == inten.shape == (3, 64, 64, 1)
    np.testing.assert_allclose(inten, amp**2, rtol=1e-5)
