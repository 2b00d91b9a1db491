"""oneDNN convolutions inside XLA:CPU programs (pinn_jax.models.onednn).

Values are compared with XLA's own convolution under the float32 summation bound of
``tests/test_conv.py``: per element, n * eps32 * (the same sum over absolute values), n the
number of products summed (kh * kw * Ci forward, kh * kw * Co for the input gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pinn_jax.models import onednn

EPS = float(np.finfo(np.float32).eps)
DN = ("NHWC", "HWIO", "NHWC")


needs_onednn = pytest.mark.skipif(not onednn.automatic(), reason="the oneDNN path is off on this host or jaxlib")


def _lax(x, k, padding):
    return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=DN)


def _assert_within_bound(got, want, scale, n):
    assert got.shape == want.shape
    excess = np.abs(np.asarray(got) - np.asarray(want)) / (n * EPS * np.asarray(scale) + 1e-30)
    assert excess.max() <= 1.0, f"{excess.max():.2f} x the float32 bound"


PADDINGS = [(3, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))), (2, ((0, 0), (0, 0))), (3, ((0, 2), (2, 1))),
            (1, ((0, 0), (0, 0)))]


@needs_onednn
@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("kh,padding", PADDINGS)
@pytest.mark.parametrize("ci,co", [(1, 16), (5, 7), (64, 32)])
def test_conv2d_and_its_input_gradient_are_xla_convolutions(kh, padding, ci, co, jit, monkeypatch):
    monkeypatch.setenv(onednn.ENV, "1")
    rng = np.random.default_rng(ci + co + kh)
    x = jnp.asarray(rng.standard_normal((3, 9, 7, ci)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kh, ci, co)), jnp.float32)
    want, vjp = jax.vjp(lambda v: _lax(v, k, padding), x)
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)

    def fwd(x, k):
        return onednn.conv2d(x, k, padding)

    def bwd(g, k):
        return onednn.conv2d_input_grad(g, k, padding)

    if jit:
        fwd, bwd = jax.jit(fwd), jax.jit(bwd)
    _assert_within_bound(fwd(x, k), want, _lax(jnp.abs(x), jnp.abs(k), padding), kh * kh * ci)
    scale = jax.vjp(lambda v: _lax(v, jnp.abs(k), padding), x)[1](jnp.abs(g))[0]
    _assert_within_bound(bwd(g, k), vjp(g)[0], scale, kh * kh * co)


@needs_onednn
@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("kh,padding", [(3, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1)))])
def test_bias_and_relu_post_ops_are_relu_of_the_convolution_plus_bias(kh, padding, jit, monkeypatch):
    """``conv2d(x, k, padding, bias)`` is ``relu(conv + bias)``: within the float32 bound of a
    sum of kh * kh * Ci products plus the bias (ReLU is exact), and the compiled program asks
    oneDNN for both post-ops (no separate pass)."""
    monkeypatch.setenv(onednn.ENV, "1")
    rng = np.random.default_rng(kh)
    x = jnp.asarray(rng.standard_normal((3, 9, 7, 6)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kh, 6, 8)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((8,)), jnp.float32)

    def fused(x, k, b):
        return onednn.conv2d(x, k, padding, b)

    got = (jax.jit(fused) if jit else fused)(x, k, b)
    want = jax.nn.relu(_lax(x, k, padding) + b)
    # |relu(a) - relu(c)| <= |a - c|
    _assert_within_bound(got, want, _lax(jnp.abs(x), jnp.abs(k), padding) + jnp.abs(b), kh * kh * 6 + 1)
    assert float(jnp.min(got)) == 0.0 and float(jnp.max(got)) > 0.0
    text = jax.jit(fused).lower(x, k, b).compile().as_text()
    assert "__onednn$convolution" in text and '"BIAS","RELU"' in text.replace(" ", "").replace("\\", "")


def test_bias_relu_without_onednn_and_a_wrong_bias(monkeypatch):
    """Disabled, ``conv2d`` with a bias is XLA's ``relu(conv + bias)`` (bitwise); a bias that is
    not ``(Co,)`` is refused, naming both shapes."""
    monkeypatch.setenv(onednn.ENV, "0")
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
    p = ((1, 1), (1, 1))
    np.testing.assert_array_equal(np.asarray(onednn.conv2d(x, k, p, b)), np.asarray(jax.nn.relu(_lax(x, k, p) + b)))
    with pytest.raises(ValueError, match=r"bias of shape \(3,\), expected \(4,\)"):
        onednn.conv2d(x, k, p, b[:3])


@needs_onednn
def test_vmap_with_a_bias(monkeypatch):
    """The fused call under vmap: the mapped axis folds into the batch when kernel and bias are
    shared; a mapped bias runs XLA's convolution per element."""
    monkeypatch.setenv(onednn.ENV, "1")
    rng = np.random.default_rng(6)
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
    bs = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    p = ((1, 1), (1, 1))
    def scale(bs):
        return jax.vmap(lambda x, b: _lax(jnp.abs(x), jnp.abs(k), p) + jnp.abs(b))(xs, bs)

    shared = jnp.broadcast_to(bs[0], bs.shape)
    want = jax.vmap(lambda x, b: jax.nn.relu(_lax(x, k, p) + b))
    _assert_within_bound(jax.jit(jax.vmap(lambda x: onednn.conv2d(x, k, p, bs[0])))(xs), want(xs, shared),
                         scale(shared), 37)
    _assert_within_bound(jax.jit(jax.vmap(lambda x, b: onednn.conv2d(x, k, p, b)))(xs, bs), want(xs, bs), scale(bs), 37)


@needs_onednn
def test_the_compiled_program_calls_onednn_only_where_enabled(monkeypatch):
    x, k = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))

    def compiled_text():
        return jax.jit(lambda x, k: onednn.conv2d(x, k, ((1, 1), (1, 1)))).lower(x, k).compile().as_text()

    monkeypatch.setenv(onednn.ENV, "1")
    assert "__onednn$convolution" in compiled_text()
    monkeypatch.setenv(onednn.ENV, "0")
    assert "__onednn$convolution" not in compiled_text()


def test_float64_and_disabled_runs_are_xla_convolutions(monkeypatch):
    monkeypatch.setenv(onednn.ENV, "0")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    p = ((1, 1), (1, 1))
    np.testing.assert_array_equal(np.asarray(onednn.conv2d(x, k, p)), np.asarray(_lax(x, k, p)))
    g = jnp.ones((2, 6, 6, 4), jnp.float32)
    dx = jax.vjp(lambda v: _lax(v, k, p), x)[1](g)[0]
    np.testing.assert_allclose(np.asarray(onednn.conv2d_input_grad(g, k, p)), np.asarray(dx), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_vmap_over_the_input_and_over_both(monkeypatch):
    monkeypatch.setenv(onednn.ENV, "1")
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((4, 2, 6, 6, 3)), jnp.float32)
    ks = jnp.asarray(rng.standard_normal((4, 3, 3, 3, 5)), jnp.float32)
    p = ((1, 1), (1, 1))
    tol = {"rtol": 0, "atol": 27 * EPS * float(jnp.max(_lax(jnp.abs(xs[0]), jnp.abs(ks[0]), p))) * 4}
    got = jax.vmap(lambda x: onednn.conv2d(x, ks[0], p))(xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.vmap(lambda x: _lax(x, ks[0], p))(xs)), **tol)
    got = jax.jit(jax.vmap(lambda x, k: onednn.conv2d(x, k, p)))(xs, ks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.vmap(lambda x, k: _lax(x, k, p))(xs, ks)), rtol=1e-5,
                               atol=1e-4)


def test_an_input_gradient_pad_beyond_the_kernel_is_refused():
    with pytest.raises(ValueError, match="exceeds the kernel"):
        onednn.conv2d_input_grad(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), ((3, 0), (1, 1)))


@needs_onednn
def test_self_test_passes_here_and_in_a_child():
    assert onednn.self_test()
    onednn._child_self_test.cache_clear()
    assert onednn._child_self_test()


def test_enabled_follows_the_setting_the_host_and_the_jaxlib(monkeypatch):
    import jaxlib

    monkeypatch.setenv(onednn.ENV, "0")
    assert not onednn.enabled()
    monkeypatch.setenv(onednn.ENV, "on")
    assert onednn.enabled()
    monkeypatch.delenv(onednn.ENV)
    monkeypatch.setattr(onednn, "_supported_host", lambda: False)
    assert not onednn.enabled()
    monkeypatch.setattr(onednn, "_supported_host", lambda: True)
    monkeypatch.setattr(jax, "device_count", lambda: 4)  # a data-parallel run: XLA's convolutions
    assert not onednn.enabled()
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # jax computes elsewhere
    assert not onednn.enabled()
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    # a jaxlib not checked here: the child's self-test decides
    monkeypatch.setattr(jaxlib, "__version__", "0.0.0-unchecked")
    for verdict in (True, False):
        monkeypatch.setattr(onednn, "_child_self_test", lambda verdict=verdict: verdict)
        assert onednn.enabled() is verdict
