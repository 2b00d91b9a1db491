"""The native Winograd convolutions F(2x2, 3x3) and F(4x4, 3x3)
(pinn_jax.native.conv3x3_winograd) and where the CNN's layers use them (pinn_jax.models.conv).

Reference: the exact convolution in float64 on the host (``native._exact_same_conv``). Bound per
element (``native._winograd_bound``, derived in its docstring): ``r * eps32`` times the Winograd
sum computed on absolute values (plus ``|bias|``), ``r`` the roundings a term passes through at
most (``native._winograd_roundings``: ``Ci + 23`` for F(2x2, 3x3), ``Ci + 33`` for F(4x4, 3x3)).
It depends on the algorithm's order of operations, not on the machine's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pinn_jax import native
from pinn_jax.models import conv

DN = ("NHWC", "HWIO", "NHWC")
SAME = ((1, 1), (1, 1))
TARGET = "pinn_jax_conv_winograd"
CALL = "@pinn_jax_conv_winograd("  # as the lowered program names the calls
KERNEL_GRAD_CALL = "@pinn_jax_conv_winograd_kernel_grad("


@pytest.fixture
def winograd(monkeypatch):
    if native.library_path() is None:
        pytest.skip("the native kernels cannot be built here (no C++ compiler?)")
    monkeypatch.setenv(native.ENV, "1")
    monkeypatch.delenv(native.WINOGRAD_ENV, raising=False)
    return True


def _arrays(shape, co, transpose=False, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k_shape = (3, 3, co, shape[-1]) if transpose else (3, 3, shape[-1], co)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
    b = jnp.asarray(rng.standard_normal((co,)), jnp.float32) if bias else None
    return x, k, b


def _check_within_bound(got, x, k, b=None, transpose=False, relu=False, tile=None):
    want = native._exact_same_conv(x, k, b, transpose)
    if relu:  # |relu(a) - relu(b)| <= |a - b|: the same bound holds
        want = np.maximum(want, 0.0)
    bound = native._winograd_bound(x, k, b, transpose, tile)
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    excess = np.abs(got - want) / (bound + 1e-300)
    assert excess.max() <= 1.0, f"{excess.max():.3f} x the bound"


CASES = [
    # (x shape, Co, transpose_kernel, relu): odd heights and widths (partial tiles), output
    # blocks of 16/32/48/64 and 64 + remainder, 16-256 input channels, the input-gradient form,
    # tile blocks of 6-96 split over threads
    ((2, 5, 7, 16), 48, False, True),
    ((1, 7, 6, 32), 16, True, False),
    ((3, 8, 8, 64), 112, False, False),
    ((2, 9, 9, 256), 32, False, True),
    ((4, 16, 16, 16), 64, True, False),
    ((2, 12, 10, 128), 96, True, False),
    ((16, 16, 16, 64), 64, False, True),
]


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape,co,transpose,relu", CASES)
def test_winograd_is_the_convolution_within_its_bound(shape, co, transpose, relu, tile, jit, winograd):
    x, k, b = _arrays(shape, co, transpose, bias=not transpose)

    def ours(x, k, b):
        return native.conv3x3_winograd(x, k, b, relu=relu, transpose_kernel=transpose, tile=tile)

    got = (jax.jit(ours) if jit else ours)(x, k, b)
    _check_within_bound(got, x, k, b, transpose, relu, tile)
    assert TARGET in jax.jit(ours).lower(x, k, b).as_text()


KERNEL_GRAD_CASES = [
    # (x shape, Co): partial tiles, output widths 16-112, tiles split over threads and blocks
    ((2, 5, 7, 16), 48),
    ((1, 7, 6, 32), 16),
    ((3, 8, 8, 64), 112),
    ((2, 9, 9, 256), 32),
    ((16, 16, 16, 64), 64),
]


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape,co", KERNEL_GRAD_CASES)
def test_winograd_kernel_gradient_is_exact_within_its_bound(shape, co, tile, jit, winograd):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.standard_normal((*shape[:3], co)), jnp.float32)

    def ours(x, g):
        return native.conv3x3_winograd_kernel_grad(x, g, tile=tile)

    got = np.asarray((jax.jit(ours) if jit else ours)(x, g), np.float64)
    want = native._exact_kernel_grad(x, g)
    assert got.shape == want.shape == (3, 3, shape[-1], co)
    excess = np.abs(got - want) / native._winograd_kernel_grad_bound(x, g, tile, native._threads())
    assert excess.max() <= 1.0, f"{excess.max():.3f} x the bound"
    assert KERNEL_GRAD_CALL in jax.jit(ours).lower(x, g).as_text()


def test_winograd_kernel_gradient_off_unsupported_and_bad_shapes(winograd, monkeypatch):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 16)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 6, 6, 32)), jnp.float32)
    monkeypatch.setenv(native.WINOGRAD_ENV, "0")
    np.testing.assert_array_equal(np.asarray(native.conv3x3_winograd_kernel_grad(x, g)),
                                  np.asarray(native._xla_kernel_grad(x, g, (3, 3), SAME)))
    monkeypatch.delenv(native.WINOGRAD_ENV)
    hlo = jax.jit(native.conv3x3_winograd_kernel_grad).lower(x[..., :12], g).as_text()  # 12 channels
    assert KERNEL_GRAD_CALL not in hlo
    with pytest.raises(ValueError, match=r"x of shape \(2, 6, 6, 16\) and g of shape \(2, 5, 6, 32\)"):
        native.conv3x3_winograd_kernel_grad(x, g[:, :5])
    with pytest.raises(ValueError, match="tile 8, expected 2 or 4"):
        native.conv3x3_winograd_kernel_grad(x, g, tile=8)


def test_roundings_and_tile_choice():
    assert native._winograd_roundings(2, 64) == 64 + 23
    assert native._winograd_roundings(4, 64) == 64 + 33
    # kernel gradient: B^T 2 x 3 (F2) or 2 x 5 (F4), A 2 x 3 or 2 x 5, G^T 2 x 4 or 2 x 7 (inexact 1/6)
    assert native._winograd_kernel_grad_roundings(2, 1000, 2) == 20 + 1000 + 2
    assert native._winograd_kernel_grad_roundings(4, 1000, 2) == 34 + 1000 + 2
    assert native.winograd_tile((16, 64, 64, 64)) == 4
    assert native.winograd_tile((16, native.WINOGRAD_F4_MIN_SIZE - 1, 64, 64)) == 2
    with pytest.raises(ValueError, match="tile 3, expected 2 or 4"):
        native.conv3x3_winograd(*_arrays((1, 4, 4, 16), 16), tile=3)


@pytest.mark.parametrize("tile", [2, 4])
def test_the_bound_is_tight_enough_to_catch_a_wrong_tap(tile, winograd):
    """The bound is worth testing against: a kernel with one tap moved by one pixel is far outside it."""
    x, k, b = _arrays((2, 6, 6, 16), 16)
    got = native.conv3x3_winograd(x, jnp.roll(k, 1, axis=1), b, tile=tile)
    want = native._exact_same_conv(x, k, b)
    assert np.max(np.abs(np.asarray(got) - want) / native._winograd_bound(x, k, b, tile=tile)) > 10


def test_the_input_gradient_form_is_xla_own_input_gradient(winograd):
    x, k, _ = _arrays((2, 8, 6, 32), 48, bias=False)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 6, 48)), jnp.float32)
    want = jax.vjp(lambda x: jax.lax.conv_general_dilated(x, k, (1, 1), SAME, dimension_numbers=DN), x)[1](g)[0]
    got = native.conv3x3_winograd(g, k, transpose_kernel=True)
    # XLA's own sum carries up to 9 * Co * eps of the direct absolute sum on top
    scale = jax.vjp(lambda x: jax.lax.conv_general_dilated(x, jnp.abs(k), (1, 1), SAME, dimension_numbers=DN),
                    x)[1](jnp.abs(g))[0]
    bound = native._winograd_bound(g, k, None, True) + 9 * 48 * float(np.finfo(np.float32).eps) * np.asarray(scale)
    assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= bound)


def test_off_unsupported_channels_and_float64_are_xla(winograd, monkeypatch):
    x, k, b = _arrays((2, 6, 6, 16), 32)
    monkeypatch.setenv(native.WINOGRAD_ENV, "0")
    assert not native.winograd_enabled()
    got = native.conv3x3_winograd(x, k, b, relu=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(native._xla_same_conv(x, k, b, True, False)))
    assert TARGET not in jax.jit(lambda x, k, b: native.conv3x3_winograd(x, k, b)).lower(x, k, b).as_text()
    monkeypatch.delenv(native.WINOGRAD_ENV)
    x12, k12, b12 = _arrays((2, 6, 6, 12), 32)  # input channels not a multiple of 16
    hlo = jax.jit(lambda x, k, b: native.conv3x3_winograd(x, k, b)).lower(x12, k12, b12).as_text()
    assert TARGET not in hlo
    with jax.enable_x64(True):
        x64, k64 = x.astype(jnp.float64), k.astype(jnp.float64)
        got = native.conv3x3_winograd(x64, k64, transpose_kernel=False)
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(got), np.asarray(native._xla_same_conv(x64, k64, None, False, False)))


def test_bad_shapes_are_refused_naming_them():
    x, k, b = _arrays((2, 6, 6, 16), 32)
    with pytest.raises(ValueError, match=r"kernel of shape \(2, 2, 16, 32\), expected .* \(3, 3, Ci, Co\)"):
        native.conv3x3_winograd(x, k[:2, :2], b)
    with pytest.raises(ValueError, match=r"expected x \(\.\.\., 32\) and bias \(16,\)"):
        native.conv3x3_winograd(x, k, b, transpose_kernel=True)
    with pytest.raises(ValueError, match=r"bias \(31,\)"):
        native.conv3x3_winograd(x, k, b[:31])


def test_suits_follows_shapes_threshold_and_setting(winograd, monkeypatch):
    big = (16, 64, 64, 64)
    assert native.winograd_suits(big, (3, 3, 64, 64), SAME)
    assert native.winograd_suits(big, (3, 3, 128, 64), SAME, transpose_kernel=True)
    assert not native.winograd_suits(big, (3, 3, 128, 64), SAME)  # channels disagree
    assert not native.winograd_suits(big, (2, 2, 64, 64), SAME)
    assert not native.winograd_suits(big, (3, 3, 64, 64), ((0, 0), (0, 0)))
    assert not native.winograd_suits((16, 64, 64, 8), (3, 3, 8, 64), SAME)
    assert not native.winograd_suits(big, (3, 3, 64, 40), SAME)
    # the CNN's 16 x 16 x 64 -> 64 layer at batch 16 is at the threshold, batch 8 under it
    assert native.winograd_suits((16, 16, 16, 64), (3, 3, 64, 64), SAME)
    assert not native.winograd_suits((8, 16, 16, 64), (3, 3, 64, 64), SAME)
    monkeypatch.setenv(native.WINOGRAD_ENV, "off")
    assert not native.winograd_suits(big, (3, 3, 64, 64), SAME)
    monkeypatch.setenv(native.WINOGRAD_ENV, "1")
    monkeypatch.setenv(native.ENV, "0")  # Winograd is one of the native kernels
    assert not native.winograd_suits(big, (3, 3, 64, 64), SAME)


def test_vmap_runs_each_element(winograd):
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 16)), jnp.float32)
    _, k, b = _arrays((2, 6, 6, 16), 16)
    got = jax.jit(jax.vmap(lambda x: native.conv3x3_winograd(x, k, b)))(xs)
    for i in range(3):
        _check_within_bound(got[i], xs[i], k, b)


@pytest.mark.parametrize("layer", ["bias_relu", "bias"])
def test_cnn_layers_take_it_where_it_suits_with_their_gradients(layer, winograd, monkeypatch):
    """With the threshold lowered to 0, a small 'same' layer runs by Winograd (forward, input and
    kernel gradients, seen in the program): its value and gradients within the bounds of the
    exact ones (computed from the same output gradient), its bias gradient the sum to float32
    order."""
    monkeypatch.setattr(native, "WINOGRAD_MIN_MACS_PER_TAP", 0)
    x, k, b = _arrays((2, 6, 8, 32), 16)
    rng = np.random.default_rng(3)
    g = jnp.asarray(rng.standard_normal((2, 6, 8, 16)), jnp.float32)
    if layer == "bias_relu":
        if not conv._fuses_bias_relu(k):
            pytest.skip("the fused bias + ReLU layer runs in oneDNN, not available here")

        def f(x, k, b):
            return conv.conv3x3_bias_relu(x, k, b)
    else:
        def f(x, k, b):
            return conv.conv3x3_bias(x, k, b)
    y, vjp = jax.vjp(f, x, k, b)
    _check_within_bound(y, x, k, b, relu=layer == "bias_relu")
    dx, dk, db = vjp(g)
    gm = np.where(np.asarray(y) > 0, np.asarray(g), 0.0) if layer == "bias_relu" else np.asarray(g)
    _check_within_bound(dx, jnp.asarray(gm, jnp.float32), k, None, transpose=True)
    eps = float(np.finfo(np.float32).eps)
    n = 2 * 6 * 8
    gm32 = jnp.asarray(gm, jnp.float32)
    assert np.all(np.abs(np.asarray(dk, np.float64) - native._exact_kernel_grad(x, gm32))
                  <= native._winograd_kernel_grad_bound(x, gm32, threads=native._threads()))
    np.testing.assert_allclose(np.asarray(db), gm.sum(axis=(0, 1, 2)), rtol=0,
                               atol=2 * n * eps * float(np.abs(gm).sum(axis=(0, 1, 2)).max()))
    hlo = jax.jit(jax.value_and_grad(lambda x, k, b: jnp.vdot(f(x, k, b), g), argnums=(0, 1, 2))).lower(
        x, k, b).as_text()
    assert hlo.count(CALL) == 2  # the forward and the input gradient
    assert hlo.count(KERNEL_GRAD_CALL) == 1


def test_cnn_layers_keep_direct_convolutions_when_off(winograd, monkeypatch):
    monkeypatch.setattr(native, "WINOGRAD_MIN_MACS_PER_TAP", 0)
    monkeypatch.setenv(native.WINOGRAD_ENV, "0")
    x, k, b = _arrays((2, 6, 8, 32), 16)
    hlo = jax.jit(jax.grad(lambda x, k, b: jnp.sum(conv.conv3x3_bias(x, k, b)), argnums=(0, 1, 2))).lower(
        x, k, b).as_text()
    assert TARGET not in hlo


def test_under_bfloat16_math_the_forward_stays_onednn_and_the_kernel_gradient_winograd(winograd, monkeypatch):
    """Where oneDNN computes in bfloat16 (AMX) its direct forward and input-gradient convolutions
    are faster than float32 Winograd: those stay oneDNN's, the kernel gradient (float32 either
    way) keeps Winograd. Decided when the step is traced; nothing runs here, so oneDNN's
    process-wide math is untouched."""
    from pinn_jax import runtime
    from pinn_jax.models import onednn

    if not onednn.enabled():
        pytest.skip("oneDNN convolutions are not used here")
    monkeypatch.setattr(native, "WINOGRAD_MIN_MACS_PER_TAP", 0)
    monkeypatch.setattr(runtime, "conv_math_in_effect", lambda environ=None: "bfloat16")
    x, k, b = _arrays((2, 6, 8, 32), 16)

    def lowered():
        return jax.jit(jax.value_and_grad(lambda x, k, b: jnp.sum(conv.conv3x3_bias_relu(x, k, b) ** 2),
                                          argnums=(0, 1, 2))).lower(x, k, b).as_text()

    monkeypatch.setattr(conv, "_cpu_has_bfloat16", lambda: True)
    hlo = lowered()
    assert CALL not in hlo and KERNEL_GRAD_CALL in hlo and "__onednn$convolution" in hlo
    monkeypatch.setattr(conv, "_cpu_has_bfloat16", lambda: False)  # oneDNN would compute in float32
    assert lowered().count(CALL) == 2


def test_cpu_has_bfloat16_reads_the_flags():
    from pinn_jax import runtime

    assert runtime.cpu_has_bfloat16("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    assert runtime.cpu_has_bfloat16("flags : fpu avx512_bf16\n")
    assert not runtime.cpu_has_bfloat16("flags : fpu sse avx2 avx512f\nbugs : amx_bf16\n")
    assert not runtime.cpu_has_bfloat16("")
