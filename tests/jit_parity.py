"""Shared check for the "same result with and without jax.jit" property tests."""

from __future__ import annotations

import jax
import numpy as np


def assert_jit_matches_eager(fn, jitted, args, *, rtol: float) -> None:
    """``jitted(*args)`` equals ``fn(*args)`` leaf by leaf: same shapes and dtypes, values to
    ``rtol`` plus an absolute floor of 1e-6 of the largest magnitude (XLA may fuse or reorder
    float operations under jit)."""
    ref = fn(*args)
    out = jitted(*args)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6 * (np.abs(b).max() + 1))
