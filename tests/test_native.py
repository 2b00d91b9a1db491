"""pinn-jax's native kernel gradient (pinn_jax.native): XLA's kernel gradient of a stride-1
NHWC convolution, to float32 summation order, and how it is built, checked and chosen.

Bound per element, as in ``tests/test_conv.py``: n * eps32 * (the same sum over absolute
values), n = B * Ho * Wo products summed.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pinn_jax import native

EPS = float(np.finfo(np.float32).eps)
DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module")
def built():
    if native.library_path() is None:
        pytest.skip("the native kernel gradient cannot be built here (no C++ compiler?)")
    return True


def _xla_dk(x, g, kh, kw, padding):
    k = jnp.zeros((kh, kw, x.shape[-1], g.shape[-1]), x.dtype)
    return jax.vjp(lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=DN), k)[1](g)[0]


def _case(shape, co, kh, kw, padding, seed=0):
    rng = np.random.default_rng(seed)
    b, h, w, _ = shape
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.standard_normal((b, h + sum(padding[0]) - kh + 1, w + sum(padding[1]) - kw + 1, co)),
                    jnp.float32)
    return x, g


CASES = [
    # (x shape, Co, kh, kw, padding): every tile height (Ci % 6), vector widths 64/32/16 and
    # the scalar columns (Co % 16), 2x2 and uneven pads, one input channel, rows split over
    # threads and chunks
    ((2, 5, 7, 3), 5, 3, 3, ((1, 1), (1, 1))),
    ((3, 6, 4, 13), 37, 2, 2, ((1, 1), (1, 1))),
    ((2, 8, 8, 16), 80, 3, 3, ((0, 2), (2, 1))),
    ((1, 9, 9, 1), 64, 3, 3, ((1, 1), (1, 1))),
    ((2, 7, 5, 11), 113, 3, 2, ((0, 0), (1, 0))),
    ((4, 32, 32, 64), 64, 3, 3, ((1, 1), (1, 1))),
    ((2, 16, 16, 256), 48, 2, 2, ((1, 1), (1, 1))),
]


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("shape,co,kh,kw,padding", CASES)
def test_native_kernel_gradient_is_xla_own(shape, co, kh, kw, padding, jit, built, monkeypatch):
    monkeypatch.setenv(native.ENV, "1")
    x, g = _case(shape, co, kh, kw, padding)

    def ours(x, g):
        return native.conv_kernel_grad(x, g, (kh, kw), padding)

    got = (jax.jit(ours) if jit else ours)(x, g)
    want = _xla_dk(x, g, kh, kw, padding)
    scale = _xla_dk(jnp.abs(x), jnp.abs(g), kh, kw, padding)
    n = g.shape[0] * g.shape[1] * g.shape[2]
    assert got.shape == want.shape == (kh, kw, shape[-1], co)
    excess = np.abs(np.asarray(got) - np.asarray(want)) / (n * EPS * np.asarray(scale) + 1e-30)
    assert excess.max() <= 1.0, f"{excess.max():.2f} x the float32 bound"
    assert "pinn_jax_conv_kernel_grad" in jax.jit(ours).lower(x, g).as_text()


def test_disabled_is_xla_and_bad_shapes_are_refused(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    x, g = _case((2, 6, 6, 3), 4, 3, 3, ((1, 1), (1, 1)))
    p = ((1, 1), (1, 1))
    np.testing.assert_array_equal(np.asarray(native.conv_kernel_grad(x, g, (3, 3), p)),
                                  np.asarray(_xla_dk(x, g, 3, 3, p)))
    assert "pinn_jax_conv_kernel_grad" not in jax.jit(lambda x, g: native.conv_kernel_grad(x, g, (3, 3), p)).lower(
        x, g).as_text()
    with pytest.raises(ValueError, match=r"g of shape \(2, 5, 6, 4\), expected \(2, 6, 6\)"):
        native.conv_kernel_grad(x, g[:, :5], (3, 3), p)
    with pytest.raises(ValueError, match="negative padding"):
        native.conv_kernel_grad(x, jnp.zeros((2, 2, 4, 4)), (3, 3), ((-1, -1), (-1, -1)))


def test_float64_takes_xla(built, monkeypatch):
    monkeypatch.setenv(native.ENV, "1")
    with jax.enable_x64(True):
        x, g = _case((1, 5, 5, 2), 3, 3, 3, ((1, 1), (1, 1)))
        x, g = x.astype(jnp.float64), g.astype(jnp.float64)
        got = native.conv_kernel_grad(x, g, (3, 3), ((1, 1), (1, 1)))
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(got), np.asarray(_xla_dk(x, g, 3, 3, ((1, 1), (1, 1)))))


def test_vmap_runs_each_element(built, monkeypatch):
    monkeypatch.setenv(native.ENV, "1")
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4)), jnp.float32)
    gs = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 5)), jnp.float32)
    p = ((1, 1), (1, 1))
    got = jax.jit(jax.vmap(lambda x, g: native.conv_kernel_grad(x, g, (3, 3), p)))(xs, gs)
    want = jax.vmap(lambda x, g: _xla_dk(x, g, 3, 3, p))(xs, gs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=72 * EPS * float(jnp.abs(want).max()) * 8)


def test_self_test_passes(built, monkeypatch):
    monkeypatch.setenv(native.ENV, "1")
    assert native.self_test()


def test_enabled_follows_the_setting_and_the_platform(built, monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert not native.enabled()
    monkeypatch.setenv(native.ENV, "on")
    assert native.enabled()
    monkeypatch.delenv(native.ENV)
    assert native.enabled() is (jax.default_backend() == "cpu" and jax.device_count() == 1)
    monkeypatch.setattr(jax, "device_count", lambda: 4)  # a data-parallel run: XLA's gradient
    assert not native.enabled()
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not native.enabled()


def test_build_writes_the_library_and_its_check_by_rename(tmp_path, monkeypatch):
    """A fresh cache directory: one library and its check marker appear, no temporary file is
    left; the name changes with what the binary depends on (here the flags)."""
    if native._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("PINN_JAX_CACHE_DIR", str(tmp_path))
    native.library_path.cache_clear()
    try:
        path = native.library_path()
        assert path is not None and path.parent == tmp_path / "native"
        assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".checked").name])
        key = path.name
        monkeypatch.setattr(native, "_FLAGS", (*native._FLAGS, "-DPINN_JAX_TEST_FLAG"))
        assert native._build_key(native._compiler()) not in key
    finally:
        native.library_path.cache_clear()


def test_a_failing_compiler_leaves_nothing_and_falls_back(tmp_path, monkeypatch):
    false = "/bin/false" if os.path.exists("/bin/false") else None
    if false is None:
        pytest.skip("no /bin/false")
    monkeypatch.setenv("PINN_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", false)
    native.library_path.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native kernels were not built"):
            assert native.library_path() is None
        assert list((tmp_path / "native").iterdir()) == []
    finally:
        native.library_path.cache_clear()


def test_a_library_that_cannot_be_loaded_falls_back(built, monkeypatch):
    """A built library the loader refuses (e.g. a cache on a noexec mount): a warning, and
    XLA's gradient."""
    import ctypes

    def refuse(path):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    monkeypatch.setenv(native.ENV, "1")
    native._registered.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be loaded"):
            assert not native.enabled()
        x, g = _case((1, 5, 5, 2), 3, 3, 3, ((1, 1), (1, 1)))
        assert "pinn_jax_conv_kernel_grad" not in jax.jit(
            lambda x, g: native.conv_kernel_grad(x, g, (3, 3), ((1, 1), (1, 1)))).lower(x, g).as_text()
    finally:
        monkeypatch.undo()
        native._registered.cache_clear()
