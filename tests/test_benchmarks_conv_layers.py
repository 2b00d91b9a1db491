"""benchmarks/conv_layers.py: its layer list is the generator's, and one layer times both forms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import conv_layers

from pinn_jax.models.cnn import CNNGenerator
from pinn_jax.models.conv import Conv3x3


@pytest.mark.parametrize("N,nfs", [(64, 2), (128, 1)])
def test_layer_list_is_the_generators(N, nfs):
    gen = nnx.eval_shape(lambda: CNNGenerator(N, 1, 1, n_filters_scale=nfs, rngs=nnx.Rngs(0)))
    kernels = sorted((m.kernel.shape[2], m.kernel.shape[3]) for _, m in nnx.iter_graph(gen) if isinstance(m, Conv3x3))
    listed = sorted((r["ci"], r["co"]) for r in conv_layers.layer_shapes(N, nfs) for _ in range(r["count"]))
    assert listed == kernels


def test_one_layer_is_timed_in_both_forms():
    layer = next(r for r in conv_layers.layer_shapes(64, 1) if r["upsampled"] and r["co"] == 1)
    r = conv_layers.time_layer(layer, batch=1, reps=1)
    for form in ("xla", "pinn_jax"):
        for part in ("forward", "input_gradient", "kernel_gradient"):
            assert r[f"{form}_{part}_ms"] > 0 and r[f"{form}_{part}_gflops"] > 0
    assert "| 64 | 1 |" in conv_layers._markdown([{"N": 64, **r}])
