"""The reference CNN generator: architecture, parameter counts, initialisation, head variants."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pinn_jax.models.cnn import AMP_ACTIVATIONS, CNNGenerator, _conv, _host_rng, border_mask

HEADS = [  # (pad_object, probe_big)
    (True, True),
    (True, False),
    (False, False),
]


def _abstract(N, C_in, C_out, nfs=1, act="sigmoid", pad_object=True, probe_big=True):
    return nnx.eval_shape(
        lambda: CNNGenerator(N, C_in, C_out, nfs, act, pad_object, probe_big, rngs=nnx.Rngs(0))
    )


def _filled(N, C_in, C_out, nfs=1, act="sigmoid", pad_object=True, probe_big=True, seed=0):
    """A generator with numpy-drawn glorot-like weights (avoids slow per-shape random init)."""
    gen = _abstract(N, C_in, C_out, nfs, act, pad_object, probe_big)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(gen, nnx.Param)):
        shape = var.get_value().shape
        if len(shape) == 4:
            bound = math.sqrt(6.0 / (9 * (shape[2] + shape[3])))
            var.set_value(jnp.asarray(rng.uniform(-bound, bound, shape), jnp.float32))
        else:
            var.set_value(jnp.asarray(rng.normal(0, 0.1, shape), jnp.float32))
    return gen


def _n_params(gen) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(gen, nnx.Param)))


@pytest.mark.parametrize("N", [64, 128, 256])
@pytest.mark.parametrize("head", HEADS)
def test_output_shapes(N, head):
    C = 4
    gen = _abstract(N, C, C, 1, "sigmoid", *head)
    graphdef, state = nnx.split(gen)
    x = jax.ShapeDtypeStruct((2, N, N, C), jnp.float32)
    amp, phase = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert amp.shape == phase.shape == (2, N, N, C)
    assert amp.dtype == phase.dtype == jnp.float32
    # encoder ends at 8 x 8 x 128*nfs whatever N
    h = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, x)
    assert h.shape == (2, 8, 8, 128)


def test_parameter_counts_match_reference():
    # model_summary_gs1.txt (N=64, nfs=2, gs1, probe_big + pad_object): 2,331,772 parameters;
    # tf_archive_small README (nfs=1): 585,244.
    assert _n_params(_abstract(64, 1, 1, 2)) == 2_331_772
    assert _n_params(_abstract(64, 1, 1, 1)) == 585_244


def test_head_variant_layers():
    full = _abstract(64, 1, 1, 1, "sigmoid", True, True)
    assert full.amp.head_center is not None and full.amp.head_outer is not None
    assert full.amp.head_center.kernel.shape == (3, 3, 28, 1)   # all but the last 4 channels
    assert full.amp.outer.conv_a.kernel.shape == (3, 3, 4, 32)  # the last 4 channels, nfs*2048/N
    small = _abstract(64, 1, 1, 1, "sigmoid", True, False)
    assert small.amp.outer is None and small.amp.head_outer is None
    nopad = _abstract(128, 4, 1, 1, "sigmoid", False, True)
    assert nopad.phase.head_center is None
    assert nopad.phase.outer.conv_a.kernel.shape == (3, 3, 32, 16)
    assert nopad.phase.head_outer.kernel.shape == (3, 3, 16, 1)


@pytest.mark.parametrize("host", [False, True])
def test_keras_initialisers(host):
    # Every convolution is made by cnn._conv: jax glorot_uniform under tracing, the same
    # distribution drawn on the host (numpy Generator from the nnx key) when built eagerly.
    rngs = nnx.Rngs(3)
    conv = _conv(128, 128, rngs, _host_rng(rngs) if host else None)
    k = np.asarray(conv.kernel[...])
    assert k.shape == (3, 3, 128, 128)
    bound = math.sqrt(6.0 / (9 * 128 + 9 * 128))  # glorot_uniform with the 3x3 receptive field
    assert np.abs(k).max() <= bound
    assert np.isclose(k.var(), bound**2 / 3, rtol=0.05)
    assert abs(k.mean()) < 0.05 * bound
    assert not np.any(np.asarray(conv.bias[...]))


def test_eager_init_is_seeded():
    a = CNNGenerator(64, 1, 1, 1, rngs=nnx.Rngs(0))
    b = CNNGenerator(64, 1, 1, 1, rngs=nnx.Rngs(0))
    c = CNNGenerator(64, 1, 1, 1, rngs=nnx.Rngs(1))
    ka, kb, kc = (np.asarray(g.amp.head_center.kernel[...]) for g in (a, b, c))
    np.testing.assert_array_equal(ka, kb)
    assert not np.array_equal(ka, kc)

    # every convolution of a built generator: glorot-uniform kernel (Keras bound with the 3x3
    # receptive field, matching variance where the kernel is large enough), zero bias
    convs = [m for _, m in nnx.iter_graph(a) if isinstance(m, nnx.Conv)]
    assert len(convs) == 22
    for conv in convs:
        k, bias = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
        bound = math.sqrt(6.0 / (9 * (k.shape[2] + k.shape[3])))
        assert np.abs(k).max() <= bound and not np.any(bias)
        if k.size >= 10_000:
            assert np.isclose(k.var(), bound**2 / 3, rtol=0.1)


def test_amp_activations_formulas():
    x = jnp.linspace(-6, 6, 101)
    xs = np.asarray(x, np.float64)
    sig = 1 / (1 + np.exp(-xs))
    expected = {
        "sigmoid": sig,
        "swish": xs * sig,
        "softplus": np.log1p(np.exp(xs)),
        "relu": np.maximum(xs, 0),
    }
    assert set(AMP_ACTIVATIONS) == set(expected)
    for name, fn in AMP_ACTIVATIONS.items():
        np.testing.assert_allclose(np.asarray(fn(x)), expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", sorted(AMP_ACTIVATIONS))
def test_every_amp_activation_builds(act):
    gen = _abstract(64, 1, 1, 1, act)
    assert gen.amp_activation == act
    # the amplitude decoder's central head uses it; the phase head is always pi * tanh
    assert gen.amp.act is AMP_ACTIVATIONS[act]
    np.testing.assert_allclose(np.asarray(gen.phase.act(jnp.array([-1.0, 0.5]))),
                               math.pi * np.tanh([-1.0, 0.5]), rtol=1e-6)


@pytest.mark.parametrize("nfs", [1, 3])
def test_n_filters_scale_multiplies_every_layer(nfs):
    gen = _abstract(128, 4, 4, nfs, "sigmoid", True, True)
    assert gen.encoder[0].conv_a.kernel.shape == (3, 3, 4, 16 * nfs)
    assert gen.encoder[-1].conv_b.kernel.shape == (3, 3, 128 * nfs, 128 * nfs)
    assert gen.amp.base[-1].conv_b.kernel.shape == (3, 3, 32 * nfs, 32 * nfs)
    assert gen.phase.outer.conv_a.kernel.shape == (3, 3, 4, 16 * nfs)     # nfs * 2048 / N
    assert gen.amp.head_center.kernel.shape == (3, 3, 32 * nfs - 4, 4)


@pytest.mark.parametrize("head", HEADS)
def test_head_semantics(head):
    pad_object, probe_big = head
    N = 64
    gen = _filled(N, 1, 1, 1, "sigmoid", pad_object, probe_big, seed=1)
    graphdef, state = nnx.split(gen)
    x = jax.random.uniform(jax.random.key(0), (1, N, N, 1))
    amp, phase = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    amp, phase = np.asarray(amp)[0, ..., 0], np.asarray(phase)[0, ..., 0]
    centre = border_mask(N)[..., 0] == 0
    assert np.all((amp[centre] > 0) & (amp[centre] < 1))  # sigmoid
    assert np.all(np.abs(phase[centre]) < math.pi)  # pi * tanh
    if pad_object and not probe_big:
        assert not np.any(amp[~centre]) and not np.any(phase[~centre])  # zero support outside
    elif pad_object and probe_big:
        # swish border for both heads: >= min(x sigmoid x) = -0.2785, not bounded above
        assert np.any(amp[~centre] != 0) and np.any(phase[~centre] != 0)
        assert amp[~centre].min() >= -0.2785 and phase[~centre].min() >= -0.2785
    else:
        assert np.all((amp > 0) & (amp < 1)) and np.all(np.abs(phase) < math.pi)


def test_batch_elements_independent():
    gen = _filled(64, 1, 1)
    graphdef, state = nnx.split(gen)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 1))
    a1, _ = f(state, x)
    a2, _ = f(state, x.at[1].set(0.0))
    np.testing.assert_array_equal(np.asarray(a1[0]), np.asarray(a2[0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="N=100"):
        CNNGenerator(100, 1, 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="amp_activation='tanh'"):
        CNNGenerator(64, 1, 1, 1, "tanh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_filters_scale"):
        CNNGenerator(64, 1, 1, 0, rngs=nnx.Rngs(0))
    gen = _abstract(64, 4, 4)
    graphdef, state = nnx.split(gen)
    with pytest.raises(ValueError, match=r"expected \(B, 64, 64, 4\)"):
        jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32))


@pytest.mark.parametrize("jit", [True, False])
def test_max_pool_is_the_block_maximum_with_its_gradient(jit):
    """The strided-slice max-pool and its written-out gradient equal the reshape reduction and
    autodiff's gradient of it, bitwise, ties included (a tie shares the gradient equally)."""
    from pinn_jax.models.cnn import _max_pool_2x2

    rng = np.random.default_rng(5)
    x = jnp.asarray(np.round(rng.standard_normal((2, 8, 6, 3)) * 2) / 2, jnp.float32)  # many ties
    x = x.at[0, :2, :2, 0].set(1.5)  # a four-way tie

    def ref(x):
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

    def loss(pool):
        return lambda x: jnp.sum(jnp.sin(3 * pool(x)) * jnp.arange(36.0).reshape(1, 4, 3, 3))

    ours = (jax.jit(_max_pool_2x2), jax.jit(jax.grad(loss(_max_pool_2x2)))) if jit else \
        (_max_pool_2x2, jax.grad(loss(_max_pool_2x2)))
    np.testing.assert_array_equal(np.asarray(ours[0](x)), np.asarray(ref(x)))
    np.testing.assert_array_equal(np.asarray(ours[1](x)), np.asarray(jax.grad(loss(ref))(x)))
