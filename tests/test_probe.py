"""Tests for pinn_jax.probe: default probe, probe mask, normalisation (parity with the TF reference)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pinn_jax import probe as P


@pytest.fixture(scope="module")
def tf_probe_guess(fixtures_dir):
    # dataset (a) used get_default_probe(N=64) as probeGuess; the forward fixture stores it.
    return np.load(fixtures_dir / "tf_reference" / "forward_illuminate_and_diffract.npz")["probe"]


def test_default_probe_matches_tf_exactly(tf_probe_guess):
    """get_default_probe(64) of the reference: bit-identical (tolerance 0)."""
    p = np.asarray(P.default_probe(64))
    assert p.dtype == np.complex64 and p.shape == (64, 64)
    np.testing.assert_array_equal(p, tf_probe_guess)


@pytest.mark.parametrize("N, disk_px", [(64, 376), (128, 1500)])
def test_default_probe_disk_size(N, disk_px):
    p = np.asarray(P.default_probe(N))
    assert (np.abs(p) > 0.5).sum() == disk_px          # blur keeps the 0.5 contour of the disk
    assert np.all(np.abs(p) >= 1e-9) and np.all(p.imag == 0)
    # centred at (N-1)/2: symmetric under flips
    np.testing.assert_allclose(p, p[::-1, ::-1], atol=1e-7)


def test_default_probe_deterministic():
    np.testing.assert_array_equal(np.asarray(P.default_probe(32)), np.asarray(P.default_probe(32)))


@pytest.mark.parametrize("N", [64, 128, 256])
def test_probe_mask(N):
    m = np.asarray(P.probe_mask(N))
    assert m.dtype == np.float32 and m.shape == (N, N)
    assert set(np.unique(m)) <= {0.0, 1.0}
    np.testing.assert_array_equal(m, m[::-1, :])
    np.testing.assert_array_equal(m, m.T)
    # radius N/4: area close to pi (N/4)^2
    assert abs(m.sum() - np.pi * (N / 4) ** 2) / (np.pi * (N / 4) ** 2) < 0.05
    # strict inequality on distance from (N-1)/2
    a = np.arange(N) - N // 2 + 0.5
    np.testing.assert_array_equal(m, (np.hypot(a[:, None], a[None, :]) < N // 4).astype(np.float32))


def test_normalize_probe_matches_tf_probe_variable(fixtures_dir, tf_probe_guess):
    """The TF in-model probe (set_probe_guess, probe_scale 4): rtol 1e-6, atol 0."""
    ref = np.load(fixtures_dir / "tf_reference" / "probe_variable_gs1.npz")["__probe_variable__"]
    out = np.asarray(P.normalize_probe(tf_probe_guess, 4.0))
    assert out.shape == (64, 64) and out.dtype == np.complex64
    np.testing.assert_allclose(out, ref[0, :, :, 0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [4.0, 10.0])
def test_normalize_probe_statistic(scale):
    p = P.default_probe(64)
    out = np.asarray(P.normalize_probe(p, scale))
    m = np.asarray(P.probe_mask(64))
    np.testing.assert_allclose(np.mean(np.abs(m * out)), 1.0 / scale, rtol=1e-5)
    # brief §1.3 example numbers
    if scale == 4.0:
        np.testing.assert_allclose(np.abs(out).max(), 2.72, atol=0.01)
        np.testing.assert_allclose((np.abs(out) ** 2).sum(), 2505, rtol=2e-3)
    else:
        np.testing.assert_allclose(np.abs(out).max(), 1.09, atol=0.01)
        np.testing.assert_allclose((np.abs(out) ** 2).sum(), 401, rtol=2e-3)


def test_normalize_probe_accepts_trailing_axis():
    p = P.default_probe(32)
    a = np.asarray(P.normalize_probe(p[..., None], 4.0))
    np.testing.assert_allclose(a, np.asarray(P.normalize_probe(p, 4.0)), rtol=1e-6)


_normalize_jit = jax.jit(P.normalize_probe)     # one compile per shape, shared by all examples


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.5, 20.0))
def test_normalize_probe_with_and_without_jit(seed, scale):
    """jit vs eager (probe_scale traced under jit): equal to rtol 1e-6."""
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal((32, 32)) + 1j * rng.standard_normal((32, 32))).astype(np.complex64)
    np.testing.assert_allclose(np.asarray(_normalize_jit(p, scale)),
                               np.asarray(P.normalize_probe(p, scale)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("N", [64, 128, 256])
def test_constructors_with_and_without_jit(N):
    """default_probe / probe_mask are host-built constants; inside jit they are the same values."""
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda: P.default_probe(N))()),
                                  np.asarray(P.default_probe(N)))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda: P.probe_mask(N))()),
                                  np.asarray(P.probe_mask(N)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="N"):
        P.default_probe(63)
    with pytest.raises(ValueError, match="N"):
        P.probe_mask(0)
    with pytest.raises(ValueError, match="probe"):
        P.normalize_probe(np.ones((4, 5), np.complex64), 4.0)
    with pytest.raises(ValueError, match="probe_scale"):
        P.normalize_probe(np.ones((4, 4), np.complex64), 0.0)
