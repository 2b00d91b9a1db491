"""Neighbour grouping: scan positions -> the reference's grouped-data dictionary.

This module holds the work behind :meth:`backend_api.raw_data.RawData.generate_grouped_data`.
It reproduces the reference ``RawData.generate_grouped_data`` (brief data_config_persistence.md
§2.3-2.5): the same keys, shapes, dtypes and coordinate conventions, and -- given the same
seed -- the same groups, because the reference's legacy ``numpy.random`` draw order is replayed
on a *local* ``numpy.random.RandomState``. Nothing here reads, reseeds or consumes numpy's
global RNG.

Conventions
-----------
* ``C = gridsize**2`` channels, channels last; coordinates ``(B, 1, 2, C)`` with axis 2 =
  ``[x, y]`` (x = column, y = row), in object-pixel units.
* ``coords_offsets = mean_c(coords_nn)`` (group centre, not centred globally) and
  ``coords_relative = -(coords_nn - coords_offsets)`` (the reference's ``local_offset_sign = -1``).
* ``X_full = s * diffraction`` with ``s = sqrt((N/2)**2 / mean_{b,c} sum_{h,w} diffraction**2)``
  over all groups of the call.

Randomness
----------
``rng`` (a ``RandomState``, a ``Generator`` or an int seed) wins when given. Otherwise the
standard branch uses ``RandomState(0)`` for sequential sampling (the reference ignores ``seed``
there and seeds 0) and ``RandomState(seed)`` for random sampling (``seed=None`` -> fresh OS
entropy, i.e. not reproducible, like the reference's unseeded global RNG). The oversampling
branch uses ``RandomState(seed)`` when a seed is given (as the reference does, even when
sequential), else ``RandomState(0)`` for sequential sampling, else fresh entropy. A
``RandomState`` reproduces the reference bit for bit; a ``Generator`` gives statistically
equivalent groups (different draws).

Oversampling (the reference's ``_generate_groups_with_oversampling``, reconstructed from the
brief; no fixture pins its exact draws): ``n_seeds = min(2*ceil(nsamples/comb(K, C)), M)``
seed points, each contributing the lexicographic C-combinations of its K nearest neighbours
(self excluded) to a pool that stops growing at ``2*nsamples`` entries; ``nsamples`` rows are
then drawn from the pool without replacement (with replacement, and a warning, if the pool is
smaller).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from scipy.spatial import cKDTree

from ._translate import sample_windows

__all__ = [
    "GroupingOptions",
    "default_n_groups",
    "generate_grouped_data",
    "group_indices",
    "normalize_data",
    "group_energy",
    "grouped_rows",
    "normalization_factor",
    "normalization_from_energy",
    "mean_pattern_energy",
    "sum_of_squares",
    "get_relative_coords",
    "get_image_patches",
    "get_neighbor_indices",
    "LOCAL_OFFSET_SIGN",
]

#: Sign of the in-group relative offsets: ``coords_relative = sign * (coords_nn - centre)``.
LOCAL_OFFSET_SIGN = -1

RngLike = Union[None, int, np.integer, np.random.RandomState, np.random.Generator]


def default_n_groups(n_positions: int, gridsize: int) -> int:
    """The number of groups a run makes when none is asked for: every position at gridsize 1,
    else ``n_positions // gridsize**2`` (at least 1), so that each position is used about once."""
    C = int(gridsize) ** 2
    return int(n_positions) if C == 1 else max(1, int(n_positions) // C)


@dataclass(frozen=True)
class GroupingOptions:
    """How the scan positions of a data set are grouped into the network's inputs.

    ``n_groups``: groups to make; ``None`` -> :func:`default_n_groups`, and a request above
    that is capped to it unless ``enable_oversampling`` is set (see :meth:`resolve_n_groups`).
    ``neighbor_count``: the K nearest neighbours each group is drawn from (gridsize > 1).
    ``enable_oversampling`` / ``neighbor_pool_size``: the K-choose-C opt-in for more groups than
    positions (OVERSAMPLING-001). ``seed``: the grouping's random seed (``None``: unseeded).
    """

    n_groups: Optional[int] = None
    neighbor_count: int = 4
    enable_oversampling: bool = False
    neighbor_pool_size: Optional[int] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.n_groups is not None:
            _check_int("n_groups", self.n_groups, minimum=1)
        _check_int("neighbor_count", self.neighbor_count, minimum=1)
        if self.neighbor_pool_size is not None:
            _check_int("neighbor_pool_size", self.neighbor_pool_size, minimum=1)

    def resolve_n_groups(self, n_positions: int, gridsize: int) -> int:
        """The number of groups to make from ``n_positions`` at ``gridsize``: ``n_groups``
        capped to :func:`default_n_groups` (no cap with oversampling), or that default."""
        default = default_n_groups(n_positions, gridsize)
        if self.n_groups is None:
            return default
        return int(self.n_groups) if self.enable_oversampling else min(int(self.n_groups), default)


# ---------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------

def _rng_from(rng: RngLike, fallback_seed: Optional[int]):
    """Return a local RandomState/Generator; never the global numpy RNG."""
    if rng is not None:
        if isinstance(rng, (np.random.RandomState, np.random.Generator)):
            return rng
        if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            return np.random.RandomState(int(rng))
        raise ValueError(
            f"rng: expected None, an int seed, numpy.random.RandomState or numpy.random.Generator, "
            f"got {type(rng).__name__}"
        )
    return np.random.RandomState(fallback_seed)


def _interval_mask(i: int) -> int:
    """Smallest all-ones bit mask >= i (numpy's legacy ``random_interval`` mask)."""
    return (1 << int(i).bit_length()) - 1


def _legacy_permutation_heads(rs: np.random.RandomState, n_rows: int, L: int, C: int) -> np.ndarray:
    """Vectorised ``[rs.permutation(L)[:C] for _ in range(n_rows)]`` with the same draws.

    The legacy ``RandomState.choice(a, C, replace=False)`` is ``a[permutation(len(a))[:C]]``,
    and ``permutation`` is a Fisher-Yates shuffle that, for ``i = L-1 .. 1``, draws
    ``j = interval(i)`` by rejection: 32-bit words ``w`` are read until ``w & mask(i) <= i``.
    Calling that 100k times from Python is slow, so we read a block of raw 32-bit words once
    and find, for every row, which words its draws accept. Rows are sequential in the stream
    (row g starts where row g-1 stopped); the start of every row is found with pointer
    doubling over the "one whole row" transition map, which is fully vectorised. Afterwards
    the RandomState is rewound and advanced by exactly the number of words consumed, so it
    ends in the same state as the per-row loop would leave it.

    Returns:
        ``(n_rows, C)`` int64 indices into ``range(L)``.
    """
    steps = list(range(L - 1, 0, -1))  # the i of every draw of one row, in stream order
    if n_rows == 0:
        return np.zeros((0, C), dtype=np.int64)
    if not steps:  # L == 1: nothing is drawn
        return np.zeros((n_rows, C), dtype=np.int64)
    saved = rs.get_state()
    # Expected words per draw is (mask+1)/(i+1) <= 2; start a little above the mean.
    per_row = sum((_interval_mask(i) + 1) / (i + 1) for i in steps)
    n_words = int(n_rows * per_row * 1.1) + 64 * len(steps) + 64
    while True:
        rs.set_state(saved)
        words = rs.randint(0, 2**32, size=n_words, dtype=np.uint32).astype(np.int64)
        FAIL = n_words + 1
        # Positions run over 0..n_words (n_words = "stream exhausted") plus FAIL.
        nxt = []
        ar = np.arange(n_words, dtype=np.int64)
        for i in steps:
            ok = (words & _interval_mask(i)) <= i
            cand = np.where(ok, ar, FAIL)
            first = np.minimum.accumulate(cand[::-1])[::-1]
            nxt.append(np.concatenate([first, [FAIL, FAIL]]))
        # One row's transition: position p -> position after its last accepted word.
        row_map = np.arange(n_words + 2, dtype=np.int64)
        for table in nxt:
            q = table[row_map]
            row_map = np.where(q >= FAIL, FAIL, q + 1)
        # starts[g] = row_map^g(0) for g = 0..n_rows, by binary decomposition of g.
        g = np.arange(n_rows + 1, dtype=np.int64)
        starts = np.zeros(n_rows + 1, dtype=np.int64)
        power = row_map
        bit = 0
        while (n_rows >> bit) > 0:
            sel = ((g >> bit) & 1).astype(bool)
            starts[sel] = power[starts[sel]]
            power = power[power]
            bit += 1
        if starts[-1] < FAIL:
            break
        n_words *= 2  # unlucky stream: too few accepted words; retry with a longer block
    consumed = int(starts[-1])
    rs.set_state(saved)
    if consumed:
        rs.randint(0, 2**32, size=consumed, dtype=np.uint32)  # leave rs where the loop would
    perm = np.tile(np.arange(L, dtype=np.int64), (n_rows, 1))
    rows = np.arange(n_rows)
    pos = starts[:-1]
    for table, i in zip(nxt, steps):
        q = table[pos]
        j = words[q] & _interval_mask(i)
        a_i = perm[rows, i].copy()
        perm[rows, i] = perm[rows, j]
        perm[rows, j] = a_i
        pos = q + 1
    return perm[:, :C]


def _choose_rows(rng, n_rows: int, L: int, C: int) -> np.ndarray:
    """Per row, C distinct indices of range(L) in random order -> (n_rows, C) int64."""
    if isinstance(rng, np.random.RandomState):
        return _legacy_permutation_heads(rng, n_rows, L, C)
    keys = rng.random((n_rows, L))
    return np.argsort(keys, axis=1, kind="stable")[:, :C].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Group indices
# ---------------------------------------------------------------------------------------------

def _check_counts(n_points: int, K: int, C: int) -> None:
    if n_points < C:
        raise ValueError(
            f"n_points={n_points}: need at least C={C} scan positions to form groups of "
            f"gridsize**2={C}"
        )
    if K < C:
        raise ValueError(
            f"K={K} must be >= C={C} (neighbor_count must be at least gridsize**2 so that C "
            f"distinct neighbours can be drawn)"
        )


def _standard_groups(points: np.ndarray, nsamples: int, K: int, C: int, rng,
                     seed_indices: Optional[np.ndarray]) -> np.ndarray:
    """Reference ``_generate_groups_efficiently``: one group per seed point."""
    n_points = points.shape[0]
    _check_counts(n_points, K, C)
    if seed_indices is None:
        n_actual = min(int(nsamples), n_points)
        if n_actual < int(nsamples):
            warnings.warn(
                f"nsamples={nsamples} exceeds the {n_points} scan positions; using {n_actual} "
                f"groups", UserWarning, stacklevel=4)
        if n_actual < n_points:
            seeds = np.asarray(rng.choice(np.arange(n_points), n_actual, replace=False),
                               dtype=np.int64)
        else:
            seeds = np.arange(n_points, dtype=np.int64)
    else:
        seeds = np.asarray(seed_indices, dtype=np.int64)
    if C == 1:
        return seeds.reshape(-1, 1).astype(np.int64)

    k = min(K + 1, n_points)
    tree = cKDTree(points)
    _, nbr = tree.query(points[seeds], k=k)
    nbr = np.asarray(nbr, dtype=np.int64).reshape(len(seeds), k)
    # Drop the first hit (normally the point itself) when more than K came back; a tiny
    # dataset (n_points <= K) keeps every hit, self included, like the reference.
    nbr = nbr[:, 1:K + 1] if k > K else nbr[:, :K]
    L = nbr.shape[1]
    if L < C:  # unreachable with n_points >= C and K >= C; kept for safety
        nbr = np.concatenate([seeds[:, None], nbr], axis=1)
        L = nbr.shape[1]
    if L < C:
        pick = np.stack([rng.choice(L, C, replace=True) for _ in range(len(seeds))])
    else:
        pick = _choose_rows(rng, len(seeds), L, C)
    return np.take_along_axis(nbr, pick, axis=1).astype(np.int32)


def _oversampled_groups(points: np.ndarray, nsamples: int, K: int, C: int, rng,
                        seed_indices: Optional[np.ndarray]) -> np.ndarray:
    """Reference ``_generate_groups_with_oversampling``: a pool of K-choose-C combinations."""
    n_points = points.shape[0]
    _check_counts(n_points, K, C)
    max_combos = math.comb(K, C)
    min_seeds = math.ceil(nsamples / max_combos)
    n_seeds = min(2 * min_seeds, n_points)
    if seed_indices is not None and len(seed_indices) >= min_seeds:
        seeds = np.asarray(seed_indices[:n_seeds], dtype=np.int64)
    elif n_seeds >= n_points:
        seeds = np.arange(n_points, dtype=np.int64)
    else:
        seeds = np.asarray(rng.choice(n_points, n_seeds, replace=False), dtype=np.int64)
    k = min(K + 1, n_points)
    tree = cKDTree(points)
    _, nbr = tree.query(points[seeds], k=k)
    nbr = np.asarray(nbr, dtype=np.int64).reshape(len(seeds), k)[:, 1:K + 1]
    target = 2 * int(nsamples)
    pool: list = []
    if nbr.shape[1] >= C:
        for row in nbr:
            for combo in itertools.combinations(row.tolist(), C):
                pool.append(combo)
                if len(pool) >= target:
                    break
            if len(pool) >= target:
                break
    if not pool:
        raise ValueError(
            f"No valid combinations could be generated (n_points={n_points}, K={K}, C={C})")
    pool_arr = np.asarray(pool, dtype=np.int64)
    if len(pool_arr) >= nsamples:
        take = rng.choice(len(pool_arr), int(nsamples), replace=False)
    else:
        warnings.warn(
            f"only {len(pool_arr)} distinct groups exist for nsamples={nsamples}; drawing with "
            f"replacement", UserWarning, stacklevel=4)
        take = rng.choice(len(pool_arr), int(nsamples), replace=True)
    return pool_arr[np.asarray(take, dtype=np.int64)]


def group_indices(xcoords: np.ndarray, ycoords: np.ndarray, *, nsamples: int, K: int = 4,
                  gridsize: int = 1, seed: Optional[int] = None,
                  sequential_sampling: bool = False, enable_oversampling: bool = False,
                  neighbor_pool_size: Optional[int] = None, rng: RngLike = None) -> np.ndarray:
    """Choose the scan-position indices of every group.

    Args:
        xcoords, ycoords: ``(M,)`` scan positions (object pixels).
        nsamples: requested number of groups (capped at M unless oversampling applies).
        K: neighbour pool size for the standard branch (the seed point itself excluded).
        gridsize: ``C = gridsize**2`` positions per group.
        seed, sequential_sampling, enable_oversampling, neighbor_pool_size, rng: as in
            :func:`generate_grouped_data`.

    Returns:
        ``(B, C)`` indices: int32 for ``C > 1`` standard grouping, int64 for ``C == 1`` or
        oversampling (the reference's dtypes).

    Raises:
        ValueError: OVERSAMPLING-001 (more groups than points with ``C > 1`` and oversampling
        off or ``neighbor_pool_size < C``), ``K < C``, fewer points than ``C``.
    """
    _check_int("nsamples", nsamples, minimum=1)
    _check_int("K", K, minimum=1)
    _check_int("gridsize", gridsize, minimum=1)
    if neighbor_pool_size is not None:
        _check_int("neighbor_pool_size", neighbor_pool_size, minimum=1)
    x = np.asarray(xcoords)
    y = np.asarray(ycoords)
    for key, a in (("xcoords", x), ("ycoords", y)):
        if a.ndim != 1 or a.dtype.kind not in "fiu":
            raise ValueError(f"{key}: expected a 1-D real array of scan positions, got shape "
                             f"{a.shape} dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError(f"{key}: expected finite scan positions, found non-finite values")
    if y.shape != x.shape:
        raise ValueError(f"ycoords: expected shape {x.shape} to match xcoords, got {y.shape}")
    points = np.column_stack([x, y]).astype(np.float64)
    n_points = points.shape[0]
    C = int(gridsize) ** 2
    effective_K = int(neighbor_pool_size) if neighbor_pool_size is not None else int(K)
    needs_oversampling = int(nsamples) > n_points and C > 1
    if needs_oversampling:
        if not enable_oversampling:
            raise ValueError(
                f"nsamples={nsamples} groups requested from {n_points} scan positions with "
                f"gridsize={gridsize} (C={C}): K choose C oversampling is required but not "
                f"enabled. Set enable_oversampling=True (and neighbor_pool_size >= C) or "
                f"request at most {n_points} groups. [OVERSAMPLING-001]")
        if effective_K < C:
            raise ValueError(
                f"neighbor_pool_size={effective_K} is too small for oversampling: need "
                f"neighbor_pool_size >= C (C = gridsize**2 = {C}). [OVERSAMPLING-001]")
    seed_indices = (np.arange(min(int(nsamples), n_points), dtype=np.int64)
                    if sequential_sampling else None)
    if needs_oversampling:
        fallback = seed if seed is not None else (0 if sequential_sampling else None)
        r = _rng_from(rng, fallback)
        return _oversampled_groups(points, int(nsamples), effective_K, C, r, seed_indices)
    r = _rng_from(rng, 0 if sequential_sampling else seed)
    return _standard_groups(points, int(nsamples), int(K), C, r, seed_indices)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")


# ---------------------------------------------------------------------------------------------
# Per-group arrays
# ---------------------------------------------------------------------------------------------

def get_relative_coords(coords_nn: np.ndarray):
    """Group centres and relative offsets from ``coords_nn (B, 1, 2, C)``.

    Returns:
        ``(offsets (B,1,2,1), relative (B,1,2,C))`` in the dtype of ``coords_nn``, with
        ``relative = -(coords_nn - offsets)``.
    """
    coords_nn = np.asarray(coords_nn)
    if coords_nn.ndim != 4:
        raise ValueError(f"coords_nn: expected a 4-D (B, 1, 2, C) array, got {coords_nn.shape}")
    offsets = np.mean(coords_nn, axis=3)[..., None]
    relative = LOCAL_OFFSET_SIGN * (coords_nn - offsets)
    return offsets, relative


def get_neighbor_indices(xcoords: np.ndarray, ycoords: np.ndarray, K: int = 3) -> np.ndarray:
    """``(M, min(K+1, M))`` int indices of each point's K+1 nearest points (itself usually first).

    The reference's legacy helper (name contract, data_config_persistence.md §2.5: "legacy and
    unused on the main path"); kept for callers written against it. Grouping itself uses
    :func:`group_indices`.
    """
    points = np.column_stack([np.asarray(xcoords), np.asarray(ycoords)]).astype(np.float64)
    _, idx = cKDTree(points).query(points, k=min(K + 1, len(points)))
    return np.asarray(idx).reshape(len(points), -1)


def get_image_patches(gt_image: np.ndarray, global_offsets: np.ndarray,
                      local_offsets: np.ndarray, N: int, gridsize: Optional[int] = None,
                      chunk: int = 512) -> np.ndarray:
    """Ground-truth object patches, exactly where the reference cuts them.

    The object is zero-padded by ``N//2`` on every side and translated by
    ``-(global + local)``; the top-left ``N x N`` window is kept. With the reference's
    ``local = -(pos - centre)`` the window of channel c is centred on ``2*centre - pos_c``
    (the point reflection of the scan position through the group centre; exactly ``pos`` for
    gridsize 1). Bilinear interpolation, corners outside the object are zero.

    Args:
        gt_image: ``(H, W)`` complex object.
        global_offsets: ``(B, 1, 2, 1)`` group centres ``[x, y]``.
        local_offsets: ``(B, 1, 2, C)`` relative offsets ``[x, y]``.
        N: patch side.
        gridsize: unused (C is read from ``local_offsets``); kept for call compatibility.

    Returns:
        ``(B, N, N, C)`` complex64 numpy array.
    """
    img = np.asarray(gt_image)
    if img.ndim != 2:
        raise ValueError(f"objectGuess: expected a 2-D (H, W) array, got shape {img.shape}")
    g = np.asarray(global_offsets)
    loc = np.asarray(local_offsets)
    if g.ndim != 4 or g.shape[1:3] != (1, 2):
        raise ValueError(f"global_offsets: expected (B, 1, 2, 1), got {g.shape}")
    if loc.ndim != 4 or loc.shape[1:3] != (1, 2) or loc.shape[0] != g.shape[0]:
        raise ValueError(f"local_offsets: expected (B, 1, 2, C) with B={g.shape[0]}, got {loc.shape}")
    B, C = loc.shape[0], loc.shape[3]
    h = N // 2
    padded = np.pad(img.astype(np.complex64), ((h, h), (h, h)))
    # The reference hands float32 offsets to its translation layer.
    offs = (g + loc).astype(np.float32)  # (B,1,2,C)
    origins = np.transpose(offs[:, 0], (0, 2, 1)).reshape(B * C, 2).astype(np.float64)
    out = np.empty((B * C, N, N), dtype=np.complex64)
    for s in range(0, B * C, chunk):
        out[s:s + chunk] = sample_windows(padded, origins[s:s + chunk], N)
    return np.ascontiguousarray(out.reshape(B, C, N, N).transpose(0, 2, 3, 1))


def sum_of_squares(patterns: Any, chunk: int = 1024) -> float:
    """``sum patterns**2`` over everything, accumulated in float64 over chunks of the leading
    axis: no float64 copy of the whole array, and an array-like that slices (``np.memmap``, an
    h5py dataset) is read one chunk at a time."""
    total = 0.0
    for s in range(0, len(patterns), chunk):
        part = np.asarray(patterns[s:s + chunk], dtype=np.float64)
        axes = "".join(chr(ord("a") + i) for i in range(part.ndim))  # one einsum over every axis
        total += float(np.einsum(f"{axes},{axes}->", part, part))
    return total


def mean_pattern_energy(patterns: np.ndarray, chunk: int = 1024, *,
                        key: str = "diffraction") -> float:
    """``mean_{b,c} sum_{h,w} patterns**2`` of a ``(B, H, W, C)`` array, as a Python float.

    Squares are accumulated in float64 (uint16 counts would overflow otherwise), in chunks
    of groups so no float64 copy of the whole array is made (:func:`sum_of_squares`). Shared by
    the ``X_full`` normalisation here and the container's ``norm_Y_I``; ``key`` names the array
    in errors.
    """
    d = np.asarray(patterns)
    if d.ndim != 4:
        raise ValueError(f"{key}: expected a 4-D (B, H, W, C) array, got shape {d.shape}")
    if d.shape[0] == 0 or d.shape[3] == 0:
        raise ValueError(f"{key}: expected at least one group and channel, got shape {d.shape}")
    return sum_of_squares(d, chunk) / (d.shape[0] * d.shape[3])


def normalization_from_energy(mean_energy: float, N: int, *, key: str = "diffraction") -> np.float32:
    """``float32(sqrt((N/2)**2 / mean_energy))`` for a mean per-pattern energy; ``ValueError``
    naming ``key`` when it is not positive and finite."""
    if not np.isfinite(mean_energy) or mean_energy <= 0:
        raise ValueError(
            f"{key}: mean per-pattern energy is {mean_energy!r}; expected a positive "
            f"finite value (all-zero or non-finite patterns cannot be normalised)")
    return np.float32(np.sqrt((N / 2) ** 2 / mean_energy))


def normalization_factor(diffraction: np.ndarray, N: int, chunk: int = 1024) -> np.float32:
    """``float32(sqrt((N/2)**2 / mean_{b,c} sum_{h,w} diffraction**2))``
    (see :func:`mean_pattern_energy`)."""
    return normalization_from_energy(mean_pattern_energy(diffraction, chunk), N)


def normalize_data(diffraction, N: int) -> np.ndarray:
    """``X_full``: the diffraction amplitudes scaled so the mean pattern energy is ``(N/2)**2``.

    Args:
        diffraction: ``(B, H, W, C)`` amplitudes of any real dtype (float32/float64/uint16...),
            or a grouped dict holding it under ``'diffraction'`` (the reference's call form).
        N: model patch size (only enters the target energy).

    Returns:
        ``(B, H, W, C)`` float32 ``= float32(s) * diffraction.astype(float32)``.
    """
    if isinstance(diffraction, dict):
        diffraction = diffraction["diffraction"]
    s = normalization_factor(diffraction, N)
    out = np.asarray(diffraction).astype(np.float32)  # always a fresh array
    out *= s
    return out


# ---------------------------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------------------------

def generate_grouped_data(raw, N: int, K: int = 4, nsamples: int = 1, dataset_path=None,
                          seed: Optional[int] = None, sequential_sampling: bool = False,
                          gridsize: Optional[int] = None, enable_oversampling: bool = False,
                          neighbor_pool_size: Optional[int] = None,
                          rng: RngLike = None) -> dict:
    """Group the scan positions of ``raw`` (a :class:`~backend_api.raw_data.RawData`).

    Args:
        raw: the RawData (reads ``xcoords, ycoords, xcoords_start, ycoords_start, diff3d,
            objectGuess, Y, sample_indices``).
        N: model patch size: enters the ``X_full`` normalisation and the ``Y`` patch size.
        K: neighbours per seed point (standard branch).
        nsamples: number of groups (see OVERSAMPLING-001 for ``nsamples > M`` with C > 1).
        dataset_path: accepted and ignored (no cache files are written).
        seed: random seed (ignored for ``sequential_sampling``, which uses seed 0).
        sequential_sampling: seeds are the first ``nsamples`` points in file order.
        gridsize: ``None`` -> ``backend_api.params.cfg['gridsize']`` (1 if the key was
            removed; the legacy default is 2). This is the one read of the legacy dict that
            decides something, kept on purpose: it is the reference's name contract
            (data_config_persistence.md: "ptychodus never passes it"), so a caller written
            against the reference gets the reference's groups. Every caller in this project
            passes ``gridsize`` explicitly; new code should too.
        enable_oversampling, neighbor_pool_size: the K-choose-C oversampling opt-in.
        rng: explicit ``RandomState``/``Generator``/int seed; overrides ``seed``.

    Returns:
        dict with keys ``diffraction (B,H,W,C)`` (diff3d dtype), ``Y (B,N,N,C) complex64 | None``,
        ``coords_offsets (B,1,2,1)``, ``coords_relative (B,1,2,C)``, ``coords_start_offsets``,
        ``coords_start_relative``, ``coords_nn``, ``coords_start_nn`` (coordinate dtype),
        ``nn_indices (B,C)``, ``objectGuess``, ``X_full (B,H,W,C) float32`` and, only when
        ``raw.sample_indices`` is set, ``sample_indices``.
    """
    del dataset_path
    _check_int("N", N, minimum=1)
    if gridsize is None:
        from . import params as _params  # lazy: params is optional for this module
        gridsize = _params.cfg.get("gridsize", 1)
    nn = group_indices(raw.xcoords, raw.ycoords, nsamples=nsamples, K=K, gridsize=gridsize,
                       seed=seed, sequential_sampling=sequential_sampling,
                       enable_oversampling=enable_oversampling,
                       neighbor_pool_size=neighbor_pool_size, rng=rng)
    return _dataset_from_groups(raw, nn, int(N))


def _stack_coords(x: np.ndarray, y: np.ndarray, nn: np.ndarray) -> np.ndarray:
    return np.stack([x[nn], y[nn]], axis=1)[:, None, :, :]  # (B,1,2,C)


def group_energy(diff3d: Any, nn: np.ndarray, chunk: int = 1024) -> float:
    """``sum_{b,c} sum_{h,w} diff3d[nn[b, c]]**2`` (float64) for groups ``nn`` ``(B, C)``: the
    numerator of the ``X_full`` normalisation, read ``chunk`` groups and one channel at a time
    (a memory-mapped ``diff3d`` is read only where the groups point). Sums of disjoint row
    sets add up to the sum of their union, which is how processes holding different groups
    agree on one normalisation."""
    nn = np.asarray(nn)
    total = 0.0
    for s in range(0, len(nn), chunk):
        for c in range(nn.shape[1]):
            total += sum_of_squares(np.asarray(diff3d[np.sort(nn[s:s + chunk, c])]), chunk)
    return total


def grouped_rows(raw, nn: np.ndarray, N: int, normalization: float) -> dict:
    """:func:`generate_grouped_data`'s dict for the given groups ``nn`` ``(B, C)`` (rows of a
    larger grouping), scaled by a ``normalization`` computed over the whole grouping (see
    :func:`group_energy`, :func:`normalization_from_energy`) instead of over these rows."""
    return _dataset_from_groups(raw, np.asarray(nn), int(N), normalization=np.float32(normalization))


def _dataset_from_groups(raw, nn: np.ndarray, N: int, normalization: np.float32 | None = None) -> dict:
    B, C = nn.shape
    diff3d = raw.diff3d
    H, W = diff3d.shape[1:3]
    diffraction = np.empty((B, H, W, C), dtype=diff3d.dtype)
    for c in range(C):  # channel by channel: no (B,C,H,W) temporary
        diffraction[..., c] = diff3d[nn[:, c]]
    coords_nn = _stack_coords(np.asarray(raw.xcoords), np.asarray(raw.ycoords), nn)
    coords_start_nn = _stack_coords(np.asarray(raw.xcoords_start),
                                    np.asarray(raw.ycoords_start), nn)
    coords_offsets, coords_relative = get_relative_coords(coords_nn)
    coords_start_offsets, coords_start_relative = get_relative_coords(coords_start_nn)

    if getattr(raw, "Y", None) is not None:
        Yr = np.asarray(raw.Y)
        Y = np.empty((B,) + Yr.shape[1:3] + (C,), dtype=np.complex64)
        for c in range(C):
            Y[..., c] = Yr[nn[:, c]]
    elif getattr(raw, "objectGuess", None) is not None:
        Y = get_image_patches(raw.objectGuess, coords_offsets, coords_relative, N)
    else:
        Y = None

    dset = {
        "diffraction": diffraction,
        "Y": Y,
        "coords_offsets": coords_offsets,
        "coords_relative": coords_relative,
        "coords_start_offsets": coords_start_offsets,
        "coords_start_relative": coords_start_relative,
        "coords_nn": coords_nn,
        "coords_start_nn": coords_start_nn,
        "nn_indices": nn,
        "objectGuess": getattr(raw, "objectGuess", None),
    }
    if getattr(raw, "sample_indices", None) is not None:
        dset["sample_indices"] = raw.sample_indices
    if normalization is None:
        dset["X_full"] = normalize_data(diffraction, N)
    else:
        dset["X_full"] = diffraction.astype(np.float32)
        dset["X_full"] *= normalization
    return dset
