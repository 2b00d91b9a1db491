"""Is a diffraction stack amplitude or intensity? One documented rule, numpy only.

The PtychoPINN data contract stores diffraction **amplitude** (``sqrt`` of the counts); a file
or a ptychodus product may instead hold **intensity** (the counts themselves, or counts times a
constant). Training on intensities as if they were amplitudes trains on the wrong quantity
without any error, so every loader classifies float data with :func:`classify_diffraction`
unless the caller says what the data are (``diffraction_kind='amplitude' | 'intensity'``).

The rule (first one that fires decides; evaluated on at most :data:`SAMPLE_PATTERNS` patterns
spread evenly over the stack, :data:`CHUNK_PATTERNS` at a time, so memory stays bounded):

1. **integer dtype** -> intensity (detector counts).
2. **photon count** (only with ``nphotons``, given or ``metadata['nphotons']``): let
   ``S1 = mean sum(d)`` and ``S2 = mean sum(d**2)`` over the patterns. Amplitudes in count units
   have ``S2 ~ nphotons``, intensities ``S1 ~ nphotons``. It decides when one is within a factor
   :data:`NPHOTONS_MATCH` of ``nphotons`` and the other more than :data:`NPHOTONS_MISMATCH` away;
   otherwise (data in other units, e.g. scaled by the photon scale) it abstains.
3. **quantised values** -> intensity: counts, and counts times one constant, are integer
   multiples of a quantum ``q`` (the smallest positive value, or 1): at least
   :data:`QUANTISED_FRACTION` of the values ``v`` with ``1.5 <= v/q <= 4096`` (at least
   :data:`QUANTISED_MIN_VALUES` of them) are within :data:`QUANTISED_TOL` of an integer.
   Integer-valued float counts are the case ``q = 1``. Amplitudes ``sqrt(counts)`` are integral
   only at perfect squares, so they fail this test.
4. **quantised squares** -> amplitude: the same test on ``d**2`` (``sqrt(counts)`` squared is
   the counts again).
5. **dynamic range** -> intensity: the median over patterns of
   ``log10(p99.9 / median)`` of each pattern's positive values exceeds
   :data:`DYNAMIC_RANGE_LOG10` (4.5, a factor ~3e4). Squaring doubles this number; an amplitude
   range of 3e4 would be an intensity range of 1e9 between a pattern's brightest pixels and its
   median, beyond what a detector records in one frame. On ``pinn_jax.simulate`` data (N=64,
   1e4..1e9 photons, with and without Poisson noise) amplitudes give 1.3..3.4 and noise-free or
   bright intensities 5.9..6.8; the faint noisy intensities below the threshold are caught by 3.
6. otherwise ``assume`` (``'amplitude'`` for the NPZ contract, ``'intensity'`` for ptychodus,
   which hands over intensities).

Thresholds were chosen on simulated amplitudes and their squares (``pinn_jax.simulate``,
``lines`` and ``grf`` objects, counts and scaled units, noisy and noise-free); see
``tests/test_diffraction_kind.py``. When in doubt the caller's override decides.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from .config import DIFFRACTION_KINDS

__all__ = [
    "DIFFRACTION_KINDS",
    "classify_diffraction",
    "check_diffraction_kind",
    "override_hint",
]

SAMPLE_PATTERNS = 256
CHUNK_PATTERNS = 32
NPHOTONS_MATCH = 2.0
NPHOTONS_MISMATCH = 4.0
QUANTISED_FRACTION = 0.99
QUANTISED_MIN_VALUES = 32
# float32 data: v and q each carry a relative rounding error <= 2**-24, squaring doubles it, so
# v/q <= 4096 is off an integer by at most 4096 * 4 * 2**-24 ~ 1e-3; 1e-2 leaves a 10x margin
# while an unquantised value lands that close to an integer only 2% of the time.
QUANTISED_TOL = 1e-2
QUANTISED_MAX_RATIO = 4096.0
DYNAMIC_RANGE_LOG10 = 4.5
DYNAMIC_RANGE_MIN_PIXELS = 16


def check_diffraction_kind(value: Any, *, name: str = "diffraction_kind") -> str:
    """``value`` if it is one of :data:`DIFFRACTION_KINDS`, else ``ValueError`` naming it."""
    if isinstance(value, str) and value in DIFFRACTION_KINDS:
        return value
    raise ValueError(f"{name}={value!r} is invalid: expected one of "
                     f"{', '.join(repr(k) for k in DIFFRACTION_KINDS)}")


def override_hint(kind: str) -> str:
    """The sentence telling a user how to force ``kind``."""
    return (f"if this is wrong, pass diffraction_kind='{kind}' (command line: "
            f"--diffraction_kind {kind}; ptychodus: PtychoPINNJax.DiffractionKind = {kind})")


def _sample_indices(n: int) -> np.ndarray:
    if n <= SAMPLE_PATTERNS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, SAMPLE_PATTERNS).round().astype(np.int64))


def _chunks(data: np.ndarray, idx: np.ndarray, square: bool = False):
    """Yield float64 ``(k, H*W)`` chunks of the sampled patterns (``d**2`` when ``square``)."""
    for s in range(0, idx.size, CHUNK_PATTERNS):
        part = np.asarray(data[idx[s:s + CHUNK_PATTERNS]], dtype=np.float64)
        part = part.reshape(part.shape[0], -1)
        # Negative values (dark-subtracted data) are no evidence either way.
        yield np.square(np.clip(part, 0.0, None)) if square else part


def _is_quantised(data: np.ndarray, idx: np.ndarray, square: bool, tiny: float
                  ) -> tuple[bool, Optional[float]]:
    """Whether the sampled values (or squares) are integer multiples of one quantum.

    Returns ``(quantised, q)``; ``q`` is the quantum that passed (or None).
    """
    q_min = math.inf
    for part in _chunks(data, idx, square):
        pos = part[part > 0]
        if pos.size:
            q_min = min(q_min, float(pos.min()))
    # Subnormal values are all multiples of the smallest subnormal: no evidence.
    if not math.isfinite(q_min) or q_min < tiny:
        return False, None
    candidates = [q_min] + ([1.0] if q_min >= 1.0 else [])
    for q in candidates:
        n_in = n_int = 0
        for part in _chunks(data, idx, square):
            r = part[part > 0] / q
            r = r[(r >= 1.5) & (r <= QUANTISED_MAX_RATIO)]
            n_in += r.size
            n_int += int(np.count_nonzero(np.abs(r - np.round(r)) <= QUANTISED_TOL))
        if n_in >= QUANTISED_MIN_VALUES and n_int >= QUANTISED_FRACTION * n_in:
            return True, q
    return False, None


def _dynamic_range(data: np.ndarray, idx: np.ndarray) -> Optional[float]:
    """Median over patterns of ``log10(p99.9 / median)`` of the positive values (or None)."""
    values = []
    for part in _chunks(data, idx):
        for row in part:
            pos = row[row > 0]
            if pos.size < DYNAMIC_RANGE_MIN_PIXELS:
                continue
            hi, mid = np.quantile(pos, [0.999, 0.5])
            values.append(math.log10(hi / mid))
    return float(np.median(values)) if values else None


def _photon_sums(data: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    s1 = s2 = 0.0
    for part in _chunks(data, idx):
        part = np.clip(part, 0.0, None)
        s1 += float(part.sum())
        s2 += float((part * part).sum())
    return s1 / idx.size, s2 / idx.size


def _nphotons_from(nphotons: Any, metadata: Optional[Mapping]) -> Optional[float]:
    value = nphotons
    if value is None and isinstance(metadata, Mapping):
        value = metadata.get("nphotons")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def classify_diffraction(data: Any, *, nphotons: Optional[float] = None,
                         metadata: Optional[Mapping] = None,
                         assume: str = "amplitude") -> tuple[str, str]:
    """Classify a diffraction stack as ``'amplitude'`` or ``'intensity'`` (rule in the module
    docstring).

    Args:
        data: ``(M, H, W)`` real array (any int/float dtype; finite values expected, negative
            values are ignored by the value tests). Not copied: patterns are read in chunks.
        nphotons: expected photons per pattern, when the caller knows it; else
            ``metadata['nphotons']`` is used when present.
        metadata: the dataset's metadata dict (or None).
        assume: the answer when no rule fires.

    Returns:
        ``(kind, reason)``: ``kind`` is ``'amplitude'`` or ``'intensity'``; ``reason`` names
        the rule that fired and the numbers it saw, for a warning.
    """
    if assume not in ("amplitude", "intensity"):
        raise ValueError(f"assume={assume!r} is invalid: expected 'amplitude' or 'intensity'")
    d = np.asarray(data) if not isinstance(data, np.ndarray) else data
    if d.ndim < 2 or d.shape[0] == 0:
        raise ValueError(f"diffraction data: expected a non-empty (M, H, W) stack, got shape "
                         f"{d.shape}")
    if d.dtype.kind in "iu":
        return "intensity", f"integer dtype {d.dtype} (detector counts)"
    if d.dtype.kind != "f":
        raise ValueError(f"diffraction data: expected an integer or float array, got dtype "
                         f"{d.dtype}")
    idx = _sample_indices(d.shape[0])
    n_ph = _nphotons_from(nphotons, metadata)
    if n_ph is not None:
        s1, s2 = _photon_sums(d, idx)
        off1 = abs(math.log(max(s1, 1e-300) / n_ph))
        off2 = abs(math.log(max(s2, 1e-300) / n_ph))
        match, mismatch = math.log(NPHOTONS_MATCH), math.log(NPHOTONS_MISMATCH)
        if off1 <= match and off2 > mismatch:
            return "intensity", (f"the patterns sum to {s1:.4g} on average, matching "
                                 f"nphotons={n_ph:.4g} (their squares sum to {s2:.4g})")
        if off2 <= match and off1 > mismatch:
            return "amplitude", (f"the squared patterns sum to {s2:.4g} on average, matching "
                                 f"nphotons={n_ph:.4g}")
    tiny = float(np.finfo(d.dtype).tiny)
    quantised, q = _is_quantised(d, idx, square=False, tiny=tiny)
    if quantised:
        what = ("integer-valued (float counts)" if q == 1.0 else
                f"integer multiples of {q:.6g} (scaled counts)")
        return "intensity", f"the values are {what}"
    quantised, q = _is_quantised(d, idx, square=True, tiny=tiny)
    if quantised:
        return "amplitude", (f"the squared values are integer multiples of {q:.6g} "
                             f"(square roots of counts)")
    dr = _dynamic_range(d, idx)
    if dr is not None and dr > DYNAMIC_RANGE_LOG10:
        return "intensity", (f"the dynamic range is 10^{dr:.2f} (99.9th percentile over the "
                             f"median of each pattern), above the 10^{DYNAMIC_RANGE_LOG10} "
                             f"that amplitudes reach")
    return assume, "no rule fired; taken as " + assume
