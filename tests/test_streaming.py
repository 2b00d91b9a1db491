"""pinn_jax.streaming: the gridsize-1 network object on the grid, chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest

from backend_api.config import ModelConfig
from pinn_jax import pipeline, simulate
from pinn_jax.inference import InferenceModel
from pinn_jax.model import build_model
from pinn_jax.probe import default_probe
from pinn_jax.streaming import reconstruct_on_grid_streaming


@pytest.fixture(scope="module")
def setup():
    _, test = simulate.simulate_dataset(N=64, object_size=128, n_images=300, seed=4)  # 150 test positions
    net = build_model(ModelConfig(N=64, gridsize=1, n_filters_scale=1), np.asarray(default_probe(64)), 988.2, seed=2)
    return test, InferenceModel(net)


def test_streaming_equals_the_pipeline_object_on_grid(setup, tmp_path):
    """Chunks of 64 from a memory-mapped file: the object and weights of pipeline.reconstruct
    (every pattern one group) to float32 round-off (sums in another order: 1e-5 of the peak)."""
    raw, im = setup
    shape = tuple(raw.objectGuess.shape)
    _, _, res = pipeline.reconstruct(im, raw, object_shape=shape)
    path = tmp_path / "amp.npy"
    np.save(path, np.asarray(raw.diff3d, np.float32))
    amp = np.load(path, mmap_mode="r")
    pos = np.column_stack([raw.xcoords, raw.ycoords])
    seen = []
    obj, w = reconstruct_on_grid_streaming(im, amp, pos, shape, chunk=64, on_chunk=lambda d, t: seen.append(d))
    assert seen == [64, 128, 150]
    ref = res["object_on_grid"]
    np.testing.assert_allclose(w, res["object_weights"], rtol=0, atol=1e-5 * res["object_weights"].max())
    np.testing.assert_allclose(obj, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_streaming_checks_its_inputs(setup):
    raw, im = setup
    pos = np.column_stack([raw.xcoords, raw.ycoords])
    with pytest.raises(ValueError, match=r"amplitudes: expected \(n, 64, 64\)"):
        reconstruct_on_grid_streaming(im, np.zeros((3, 32, 32)), pos[:3], (128, 128))
    with pytest.raises(ValueError, match=r"positions: expected \(150, 2\)"):
        reconstruct_on_grid_streaming(im, raw.diff3d, pos[:5], (128, 128))
    with pytest.raises(ValueError, match="chunk"):
        reconstruct_on_grid_streaming(im, raw.diff3d, pos, (128, 128), chunk=0)
    with pytest.raises(ValueError, match="mean per-pattern energy"):
        reconstruct_on_grid_streaming(im, np.zeros((3, 64, 64)), pos[:3], (128, 128))
