"""The CNN's 3x3 convolutions (pinn_jax.models.conv): every formulation is XLA's convolution,
its input gradient and its kernel gradient, up to float32 summation order.

Bound used throughout, per element, for a sum of n products in any order: n * eps32 * (the
same sum of absolute values), computed with XLA's own convolution on |x|, |k|, |g|.

Every test runs on four paths: XLA's convolutions only (``PINN_JAX_ONEDNN=0``,
``PINN_JAX_NATIVE=0``); where the host and jaxlib run them, the oneDNN forward and
input-gradient convolutions (:mod:`pinn_jax.models.onednn`); where it builds, pinn-jax's native
kernel gradient (:mod:`pinn_jax.native`) with XLA's other two; and both. Claims of bitwise
equality hold for the first only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pinn_jax import native
from pinn_jax.models import conv, onednn

EPS = float(np.finfo(np.float32).eps)


ONEDNN_HERE = onednn.automatic()


NATIVE_HERE = native.library_path() is not None


@pytest.fixture(autouse=True, params=["xla", "onednn", "native", "onednn+native"])
def conv_path(request, monkeypatch):
    """Which convolutions the layers run (read when a function is traced): XLA's only; oneDNN's
    forward and input gradients; pinn-jax's native kernel gradient with XLA's other two; both
    (the default on the development host)."""
    parts = request.param.split("+")
    if "onednn" in parts and not ONEDNN_HERE:
        pytest.skip("the oneDNN path is off on this host or jaxlib")
    if "native" in parts and not NATIVE_HERE:
        pytest.skip("the native kernel gradient cannot be built here (no C++ compiler?)")
    monkeypatch.setenv(onednn.ENV, "1" if "onednn" in parts else "0")
    monkeypatch.setenv(native.ENV, "1" if "native" in parts else "0")
    return request.param


def _ref(x, k):
    return conv._xla_conv(x, k)


def _with_grads(f, x, k, g):
    y, vjp = jax.vjp(f, x, k)
    return (y, *vjp(g))


def _assert_within_summation_bound(ours, x, k, g, n_terms, ref=_ref):
    """``ours`` = (y, dx, dk) of a formulation; compared with XLA's on the same x, k, g."""
    exact = _with_grads(ref, x, k, g)
    scale = _with_grads(ref, jnp.abs(x), jnp.abs(k), jnp.abs(g))
    for name, a, b, s, n in zip(("forward", "input gradient", "kernel gradient"), ours, exact, scale, n_terms):
        assert a.shape == b.shape, name
        excess = np.abs(np.asarray(a) - np.asarray(b)) / (n * EPS * np.asarray(s) + 1e-30)
        assert excess.max() <= 1.0, f"{name}: {excess.max():.2f} x the float32 bound"


def _arrays(shape, co, seed=1, out_hw=None):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, shape[-1], co)), jnp.float32)
    out_hw = out_hw or shape[1:3]
    g = jnp.asarray(rng.standard_normal((shape[0], *out_hw, co)), jnp.float32)
    return x, k, g


@pytest.mark.parametrize("jit", [True, False])
def test_conv3x3_is_nnx_conv_with_a_faster_bias_gradient(jit, conv_path):
    """Conv3x3 has nnx.Conv's parameters and forward values (the same XLA convolution: bitwise),
    and its gradients: input and kernel gradients are XLA's own (bitwise), the bias gradient is
    the same float32 sum over 2 x 16 x 16 terms in another order (rtol 1e-5 of the largest)."""
    ours = conv.Conv3x3(5, 7, kernel_size=(3, 3), padding="SAME", rngs=nnx.Rngs(0))
    ref = nnx.Conv(5, 7, kernel_size=(3, 3), padding="SAME", rngs=nnx.Rngs(0))
    ours.bias[...] = ref.bias[...] = jnp.linspace(-1, 1, 7)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 5)), jnp.float32)

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))

    grad = nnx.grad(loss, argnums=(0, 1))
    if jit:
        grad = nnx.jit(grad)
    (g_ours, gx_ours), (g_ref, gx_ref) = grad(ours, x), grad(ref, x)
    b_ours, b_ref = np.asarray(g_ours.bias[...]), np.asarray(g_ref.bias[...])
    np.testing.assert_allclose(b_ours, b_ref, rtol=0, atol=1e-5 * np.abs(b_ref).max())
    if conv_path == "xla":
        np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(ref(x)))
        np.testing.assert_array_equal(np.asarray(gx_ours), np.asarray(gx_ref))
        np.testing.assert_array_equal(np.asarray(g_ours.kernel[...]), np.asarray(g_ref.kernel[...]))
        return
    # oneDNN sums the 45 (forward) and 63 (input gradient) products in its own order, the
    # native kernel gradient its 512; the gradients then see sin's derivative at slightly
    # different points: 1e-5 of the largest
    y_ref = np.asarray(ref(x))
    scale = np.asarray(conv._xla_conv(jnp.abs(x), jnp.abs(ours.kernel[...]))) + np.abs(np.asarray(ours.bias[...]))
    assert np.all(np.abs(np.asarray(ours(x)) - y_ref) <= 46 * EPS * scale)
    for a, r in ((gx_ours, gx_ref), (g_ours.kernel[...], g_ref.kernel[...])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=1e-5 * float(np.abs(np.asarray(r)).max()))


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("shape", [(2, 16, 16, 5), (3, 8, 12, 60), (1, 32, 32, 64)])
def test_one_channel_heads_are_the_same_convolution(shape, jit):
    """The heads' per-tap formulation (``Ci -> 1``); n = 9 * Ci for the forward, 9 for the
    input gradient, B * H * W for the kernel gradient."""
    x, k, g = _arrays(shape, 1)
    # the heads do take the per-tap path (no XLA convolution in it)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(conv.conv3x3)(x, k))
    f = (lambda: _with_grads(conv.conv3x3, x, k, g))
    ours = jax.jit(f)() if jit else f()
    _assert_within_summation_bound(ours, x, k, g, (9 * shape[-1], 9, shape[0] * shape[1] * shape[2]))


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("shape,co", [((2, 8, 8, 16), 12), ((3, 4, 6, 60), 1), ((1, 16, 16, 64), 1), ((2, 5, 5, 8), 4)])
def test_convolution_of_an_upsampled_map_is_computed_on_the_map(shape, co, jit):
    """``conv3x3(h, k, upsampled=True)`` is XLA's convolution of ``upsample_2x(h)`` (and its
    gradients, taken through the upsampling), without the upsampled copy: the source pixel's
    taps are summed first, so n = 9 * Ci for the forward, 9 * Co for the input gradient
    (summed over the 4 upsampled copies too: 36 * Co), 4 * B * H * W for the kernel gradient."""
    x, k, g = _arrays(shape, co, out_hw=(2 * shape[1], 2 * shape[2]))
    assert shape[-1] >= conv.SUBPIXEL_MIN_IN_CHANNELS  # the sub-pixel path, not a plain upsampling
    jaxpr = str(jax.make_jaxpr(lambda x, k: conv.conv3x3(x, k, True))(x, k))
    b, hh, ww, ci = shape
    assert f"f32[{b},{2 * hh},{2 * ww},{ci}]" not in jaxpr  # no upsampled copy of h
    f = (lambda: _with_grads(lambda x, k: conv.conv3x3(x, k, True), x, k, g))
    ours = jax.jit(f)() if jit else f()
    n = (9 * shape[-1], 36 * co, 4 * shape[0] * shape[1] * shape[2])
    _assert_within_summation_bound(ours, x, k, g, n, ref=lambda x, k: conv._xla_conv(conv.upsample_2x(x), k))


def test_few_input_channels_take_the_plain_upsampling(conv_path):
    """Below SUBPIXEL_MIN_IN_CHANNELS the upsampled copy is small; the layer convolves it (the
    same XLA convolution: bitwise; oneDNN's: within the bound, n = 9 * Ci)."""
    ci = conv.SUBPIXEL_MIN_IN_CHANNELS - 1
    x, k, _ = _arrays((2, 6, 6, ci), 16)
    got, want = np.asarray(conv.conv3x3(x, k, True)), np.asarray(conv._xla_conv(conv.upsample_2x(x), k))
    if conv_path == "xla":
        np.testing.assert_array_equal(got, want)
    else:
        scale = np.asarray(conv._xla_conv(conv.upsample_2x(jnp.abs(x)), jnp.abs(k)))
        assert np.all(np.abs(got - want) <= 9 * ci * EPS * scale)


@pytest.mark.parametrize("upsampled", [False, True])
def test_conv3x3_bias_gradients_match_autodiff(upsampled):
    """The custom VJP (bias gradient as a matrix-vector product, stored-input barrier) gives
    autodiff's gradients of ``conv3x3(x, k, upsampled) + b``, to float32 order."""
    x, k, _ = _arrays((2, 8, 8, 16), 8, seed=3)
    b = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)

    def ours(x, k, b):
        return jnp.sum(jnp.sin(conv.conv3x3_bias(x, k, b, upsampled)))

    def plain(x, k, b):
        return jnp.sum(jnp.sin(conv.conv3x3(x, k, upsampled) + b))

    for a, r in zip(jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, k, b), jax.grad(plain, argnums=(0, 1, 2))(x, k, b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-4 * float(np.abs(r).max()))


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("shape,upsampled,stored_input", [
    ((2, 8, 8, 16), False, False),
    ((2, 8, 8, 16), False, True),
    ((2, 6, 6, 16), True, False),  # the sub-pixel form: the post-ops run before the interleave
    ((2, 6, 6, 4), True, True),  # few input channels: the plain upsampling
])
def test_conv3x3_bias_relu_is_relu_of_the_layer(shape, upsampled, stored_input, jit, conv_path):
    """``conv3x3_bias_relu`` (oneDNN's bias and ReLU post-ops on that path) is
    ``relu(conv3x3(x, k, upsampled) + b)``: values within the bound of a sum of 9 * Ci products
    plus the bias; gradients (through the mask ``output > 0``) as autodiff's of that expression,
    to float32 order, ``stored_input`` or not. The data keep every pre-activation farther from 0
    than its bound (checked), so the two masks are the same on any CPU."""
    co = 8
    h, w = (2 * shape[1], 2 * shape[2]) if upsampled else shape[1:3]
    x, k, g = _arrays(shape, co, seed=7, out_hw=(h, w))
    b = jnp.linspace(-0.5, 0.5, co, dtype=jnp.float32)

    def xla(x, k):
        return conv._xla_conv(conv.upsample_2x(x) if upsampled else x, k)

    pre = np.asarray(xla(x, k) + b)
    bound = (9 * shape[-1] + 1) * EPS * np.asarray(xla(jnp.abs(x), jnp.abs(k)) + jnp.abs(b))
    assert np.all(np.abs(pre) > 2 * bound)

    def fused(x, k, b):
        return conv.conv3x3_bias_relu(x, k, b, upsampled, stored_input)

    def plain(x, k, b):
        return jax.nn.relu(conv.conv3x3(x, k, upsampled) + b)

    def with_grads(f):
        y, vjp = jax.vjp(f, x, k, b)
        return (y, *vjp(g))

    ours = jax.jit(lambda: with_grads(fused))() if jit else with_grads(fused)
    assert np.all(np.abs(np.asarray(ours[0]) - np.maximum(pre, 0)) <= bound)
    for a, r in zip(ours[1:], with_grads(plain)[1:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))
    layer = conv.Conv3x3(shape[-1], co, kernel_size=(3, 3), padding="SAME", rngs=nnx.Rngs(0))
    layer.kernel[...], layer.bias[...] = k, b
    np.testing.assert_array_equal(np.asarray(layer.relu(x, upsampled=upsampled)), np.asarray(fused(x, k, b)))


def test_relu_output_is_buffer_only_for_a_onednn_call_result(conv_path):
    """The next layer may skip the stored-input barrier only after a oneDNN call's own result:
    not after a sub-pixel interleave, a one-channel head, or XLA's convolution."""
    on = "onednn" in conv_path
    assert conv.relu_output_is_buffer(64, 64) is on
    assert conv.relu_output_is_buffer(4, 64, upsampled=True) is on  # plain upsampling, then the call
    assert not conv.relu_output_is_buffer(64, 64, upsampled=True)
    assert not conv.relu_output_is_buffer(64, 1)


def test_of_upsampled_is_the_layer_on_the_upsampled_map():
    layer = conv.Conv3x3(16, 4, kernel_size=(3, 3), padding="SAME", rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.linspace(-1, 1, 4)
    h = jnp.asarray(np.random.default_rng(4).standard_normal((2, 6, 6, 16)), jnp.float32)
    np.testing.assert_allclose(np.asarray(layer.of_upsampled(h)), np.asarray(layer(conv.upsample_2x(h))),
                               rtol=0, atol=1e-5 * float(np.abs(layer(conv.upsample_2x(h))).max()))


def test_conv3x3_gradients_with_a_nan_kernel_are_xla_own():
    """The stored-input barrier of the kernel gradient (``_unfused_input``) has a second branch
    that runs only for a kernel whose first tap is NaN: the gradients are then NaN exactly
    where XLA's own are."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32).at[0, 0, 0, 0].set(jnp.nan)
    b = jnp.zeros((4,), jnp.float32)

    def ours(x, k, b):
        return jnp.sum(jnp.sin(conv.conv3x3_bias(x, k, b)))

    def ref(x, k, b):
        return jnp.sum(jnp.sin(conv._xla_conv(x, k) + b))

    for a, r in zip(jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, k, b), jax.grad(ref, argnums=(0, 1, 2))(x, k, b)):
        np.testing.assert_array_equal(np.isnan(np.asarray(a)), np.isnan(np.asarray(r)))
