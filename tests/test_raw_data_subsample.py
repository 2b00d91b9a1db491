"""RawData.subsample: a seeded random subset of positions, the same draw as the CLI's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from backend_api.raw_data import RawData


def _raw(M=12, H=8, seed=0, **kw):
    r = np.random.RandomState(seed)
    return RawData(
        r.uniform(5, 30, M), r.uniform(5, 30, M), r.uniform(5, 30, M), r.uniform(5, 30, M),
        r.rand(M, H, H).astype(np.float32),
        (r.rand(H, H) + 1j * r.rand(H, H)).astype(np.complex64),
        np.arange(M, dtype=np.int64) % 3,
        objectGuess=np.ones((40, 40), np.complex64),
        Y=(r.rand(M, H, H) + 0j).astype(np.complex64),
        norm_Y_I=2.5,
        metadata={"a": 1},
        **kw,
    )


def test_subset_indexes_every_per_position_field_in_file_order():
    raw = _raw()
    sub = raw.subsample(5, seed=3)
    idx = np.sort(np.random.default_rng(3).choice(12, size=5, replace=False))
    assert len(sub) == 5
    np.testing.assert_array_equal(sub.sample_indices, idx)
    assert sub.subsample_seed == 3
    for key in ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d", "scan_index",
                "Y"):
        np.testing.assert_array_equal(getattr(sub, key), getattr(raw, key)[idx])
    assert sub.probeGuess is raw.probeGuess and sub.objectGuess is raw.objectGuess
    assert sub.norm_Y_I == 2.5
    assert sub.metadata == {"a": 1} and sub.metadata is not raw.metadata
    assert raw.sample_indices is None and len(raw) == 12  # the original is untouched


def test_same_seed_same_subset_as_the_cli_draw():
    """The draw the CLI's --n_subsample always made (and results were recorded with): the
    sorted ``default_rng(seed).choice(n, k, replace=False)``."""
    raw = _raw()
    for seed in (0, 7, 12345):
        idx = np.sort(np.random.default_rng(seed).choice(len(raw), size=4, replace=False))
        a = raw.subsample(4, seed=seed)
        for key in ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d", "scan_index", "Y"):
            np.testing.assert_array_equal(getattr(a, key), getattr(raw, key)[idx])
        np.testing.assert_array_equal(a.probeGuess, raw.probeGuess)


def test_n_at_least_len_returns_self():
    raw = _raw()
    assert raw.subsample(12, seed=1) is raw
    assert raw.subsample(100) is raw


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_n_is_refused(n):
    with pytest.raises(ValueError, match="subsample: n"):
        _raw().subsample(n)


def test_bad_pixels_kept_and_not_reapplied():
    mask = np.zeros((8, 8), bool)
    mask[1, 2] = True
    with pytest.warns(UserWarning, match="bad_pixels"):
        raw = _raw(bad_pixels=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second bad-pixel warning
        sub = raw.subsample(3, seed=0)
    assert sub.bad_pixels is raw.bad_pixels
    assert not sub.diff3d[:, 1, 2].any()


def test_subset_of_a_subset_composes_sample_indices():
    raw = _raw()
    first = raw.subsample(8, seed=1)
    second = first.subsample(3, seed=2)
    inner = np.sort(np.random.default_rng(2).choice(8, size=3, replace=False))
    np.testing.assert_array_equal(second.sample_indices, first.sample_indices[inner])
    np.testing.assert_array_equal(second.xcoords, raw.xcoords[second.sample_indices])
