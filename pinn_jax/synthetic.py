"""Synthetic ground truth for simulations: complex objects and scan positions (numpy, seeded).

:func:`make_object` draws a ``lines`` or ``grf`` (Gaussian random field) texture as a complex
object; :func:`random_positions` / :func:`raster_positions` place scan positions ``[x, y]`` in
object pixels inside :func:`position_bounds`. Every random draw takes ``seed`` (an int, a numpy
Generator/SeedSequence or a JAX key) and is deterministic for it. :mod:`pinn_jax.simulate`
builds data sets from these and re-exports them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage, special

__all__ = ["OBJECT_KINDS", "make_object", "position_bounds", "random_positions", "raster_positions"]

OBJECT_KINDS = ("lines", "grf")

# --------------------------------------------------------------------------------------------
# randomness


def _as_generator(seed: Any) -> np.random.Generator:
    """int | numpy Generator | SeedSequence | JAX key -> numpy Generator (deterministic)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, np.random.SeedSequence):
        return np.random.default_rng(seed)
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed}")
        return np.random.default_rng(int(seed))
    if isinstance(seed, jax.Array):
        data = jax.random.key_data(seed) if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) \
            else seed
        words = np.asarray(data, dtype=np.uint32).ravel()
        return np.random.default_rng(np.random.SeedSequence(words.tolist()))
    raise ValueError(
        f"seed: expected an int, numpy Generator, SeedSequence or JAX key, got {type(seed).__name__}")


# --------------------------------------------------------------------------------------------
# objects


def _lines_texture(rng: np.random.Generator, size: int, n_lines: int) -> np.ndarray:
    """Random straight segments, rasterised and blurred at two scales, mapped to [0, 1]."""
    img = np.zeros((size, size), np.float64)
    # Segments start anywhere (a margin outside too, so lines also cross the borders).
    start = rng.uniform(-0.1 * size, 1.1 * size, size=(n_lines, 2))
    angle = rng.uniform(0.0, np.pi, size=n_lines)
    length = rng.uniform(0.2 * size, 0.8 * size, size=n_lines)
    for (x0, y0), a, ln in zip(start, angle, length):
        npts = int(2 * ln) + 2
        s = np.linspace(0.0, ln, npts)
        xs = np.rint(x0 + s * np.cos(a)).astype(np.int64)
        ys = np.rint(y0 + s * np.sin(a)).astype(np.int64)
        ok = (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
        # Unique pixels per segment so a line has uniform weight along its length.
        pix = np.unique(ys[ok] * size + xs[ok])
        np.add.at(img.ravel(), pix, 1.0)
    t = ndimage.gaussian_filter(img, 1.0) + 0.5 * ndimage.gaussian_filter(img, 4.0)
    # Saturate the brightest 0.5 % (crossings) so the bulk of the lines spans the range.
    hi = float(np.quantile(t, 0.995))
    return np.clip(t / hi, 0.0, 1.0) if hi > 0 else t


def _grf_texture(rng: np.random.Generator, size: int, feature_size: float) -> np.ndarray:
    """Gaussian random field (Gaussian covariance of width ``feature_size`` px) mapped to [0, 1].

    The field is standardised and passed through the normal CDF, so values are ~uniform in
    (0, 1) whatever the correlation length.
    """
    noise = rng.standard_normal((size, size))
    f = ndimage.gaussian_filter(noise, feature_size, mode="wrap")
    f = (f - f.mean()) / (f.std() + 1e-30)
    return special.ndtr(f)


def make_object(kind: str = "lines", size: int = 224, seed: Any = 0, *,
                amp_range: tuple[float, float] = (0.3, 1.0),
                phase_range: tuple[float, float] = (-0.5, 0.5),
                n_lines: int = 400, feature_size: float = 4.0) -> np.ndarray:
    """A synthetic complex object ``(size, size)`` complex64, deterministic for ``seed``.

    Amplitude and phase come from two independent textures ``t`` in ``[0, 1]`` of the chosen
    kind: ``amp = amp_range[0] + (amp_range[1] - amp_range[0]) * t_amp`` and likewise for the
    phase (radians). Independent textures mean the phase cannot be read off the amplitude.

    Args:
      kind: ``'lines'`` (random straight segments, blurred at 1 and 4 px) or ``'grf'`` (Gaussian
        random field with correlation length ``feature_size`` px).
      size: side in pixels (the object is square).
      seed: int, numpy Generator or JAX key.
      amp_range: (min, max) amplitude, ``0 <= min <= max``.
      phase_range: (min, max) phase in radians.
      n_lines: segments per texture for ``'lines'``.
      feature_size: GRF correlation length in pixels.
    """
    if kind not in OBJECT_KINDS:
        raise ValueError(f"kind: expected one of {OBJECT_KINDS}, got {kind!r}")
    if int(size) != size or size < 8:
        raise ValueError(f"size: expected an int >= 8, got {size!r}")
    size = int(size)
    a0, a1 = (float(v) for v in amp_range)
    if not (0.0 <= a0 <= a1) or not math.isfinite(a1):
        raise ValueError(f"amp_range: expected 0 <= min <= max (finite), got {amp_range!r}")
    p0, p1 = (float(v) for v in phase_range)
    if not (p0 <= p1) or not (math.isfinite(p0) and math.isfinite(p1)):
        raise ValueError(f"phase_range: expected finite min <= max, got {phase_range!r}")
    if kind == "lines" and n_lines < 1:
        raise ValueError(f"n_lines: expected >= 1, got {n_lines}")
    if kind == "grf" and not feature_size > 0:
        raise ValueError(f"feature_size: expected > 0, got {feature_size}")
    rng = _as_generator(seed)
    if kind == "lines":
        ta = _lines_texture(rng, size, n_lines)
        tp = _lines_texture(rng, size, n_lines)
    else:
        ta = _grf_texture(rng, size, feature_size)
        tp = _grf_texture(rng, size, feature_size)
    amp = a0 + (a1 - a0) * ta
    phase = p0 + (p1 - p0) * tp
    return (amp * np.exp(1j * phase)).astype(np.complex64)


# --------------------------------------------------------------------------------------------
# scan positions


def position_bounds(extent: int, N: int, margin: float = 0.0, start: int = 0
                    ) -> tuple[float, float]:
    """Allowed patch-centre range ``[start + N/2 + margin, start + extent - N/2 - margin]``.

    A centre in this range keeps the whole ``[x - N/2, x + N/2)`` patch inside the
    ``extent`` pixels that begin at ``start``.
    """
    lo = start + N / 2 + margin
    hi = start + extent - N / 2 - margin
    if hi < lo:
        raise ValueError(
            f"object extent {extent} px is too small for N={N} with margin {margin}: "
            f"patch centres would need {lo} <= c <= {hi}")
    return float(lo), float(hi)


def _check_shape2(object_shape) -> tuple[int, int]:
    if len(tuple(object_shape)) != 2:
        raise ValueError(f"object_shape: expected (H, W), got {object_shape!r}")
    return int(object_shape[0]), int(object_shape[1])


def random_positions(n: int, object_shape: Sequence[int], N: int, *, seed: Any = 0,
                     margin: float = 0.0, rows: tuple[int, int] | None = None) -> np.ndarray:
    """``n`` uniform random patch centres, ``(n, 2)`` float64 ``[x, y]`` in object pixels.

    Args:
      n: number of positions (>= 1).
      object_shape: ``(H, W)``.
      N: patch side.
      seed: int, numpy Generator or JAX key.
      margin: extra pixels kept free between every patch and the region border.
      rows: optional ``(r0, r1)`` band of object rows the patches must stay in (default all).
    """
    h, w = _check_shape2(object_shape)
    if int(n) != n or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    r0, r1 = (0, h) if rows is None else (int(rows[0]), int(rows[1]))
    xlo, xhi = position_bounds(w, N, margin)
    ylo, yhi = position_bounds(r1 - r0, N, margin, start=r0)
    rng = _as_generator(seed)
    xy = rng.uniform(size=(int(n), 2))
    return np.stack([xlo + (xhi - xlo) * xy[:, 0], ylo + (yhi - ylo) * xy[:, 1]], axis=1)


def raster_positions(n: int, object_shape: Sequence[int], N: int, *, margin: float = 0.0,
                     jitter: float = 0.0, seed: Any = 0, rows: tuple[int, int] | None = None
                     ) -> np.ndarray:
    """A row-major raster of ``n`` patch centres, ``(n, 2)`` float64 ``[x, y]``.

    The grid has ``nx = max(1, round(sqrt(n * W / H)))`` columns and ``ny = ceil(n / nx)`` rows
    evenly spread over the allowed range (see :func:`position_bounds`); the first ``n`` points in
    row-major order are returned (a perfect-square ``n`` on a square region is a full grid).
    ``jitter > 0`` adds uniform noise in ``[-jitter, jitter]`` px, clipped to the range.
    """
    h, w = _check_shape2(object_shape)
    if int(n) != n or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if jitter < 0:
        raise ValueError(f"jitter: expected >= 0, got {jitter}")
    r0, r1 = (0, h) if rows is None else (int(rows[0]), int(rows[1]))
    xlo, xhi = position_bounds(w, N, margin)
    ylo, yhi = position_bounds(r1 - r0, N, margin, start=r0)
    nx = max(1, int(round(math.sqrt(n * (xhi - xlo + 1) / (yhi - ylo + 1)))))
    nx = min(nx, int(n))
    ny = int(math.ceil(n / nx))
    xs = np.linspace(xlo, xhi, nx) if nx > 1 else np.array([(xlo + xhi) / 2])
    ys = np.linspace(ylo, yhi, ny) if ny > 1 else np.array([(ylo + yhi) / 2])
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    pos = np.stack([gx.ravel(), gy.ravel()], axis=1)[: int(n)]
    if jitter > 0:
        rng = _as_generator(seed)
        pos = pos + rng.uniform(-jitter, jitter, size=pos.shape)
        pos[:, 0] = np.clip(pos[:, 0], xlo, xhi)
        pos[:, 1] = np.clip(pos[:, 1], ylo, yhi)
    return pos.astype(np.float64)
