"""Image-quality measures of a reconstruction against its ground truth, as the reference
computes them: SSIM (7x7 uniform window, skimage-compatible), MS-SSIM, PSNR (OpenCV's cap)
and FRC with its cut-offs, plus the input checks they share. Pure numpy/scipy, float64.
:mod:`pinn_jax.metrics` (alignment, the two evaluation protocols) re-exports them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["PSNR_CAP_DB", "MS_SSIM_WEIGHTS", "ssim", "ms_ssim", "psnr", "frc", "frc_cutoff"]

_EPS64 = float(np.finfo(np.float64).eps)
#: PSNR (dB) of identical images at peak 255: ``20 log10(255 / eps64)`` (OpenCV's cap).
PSNR_CAP_DB = 20.0 * math.log10(255.0 / _EPS64)
#: Level weights of the reference's MS-SSIM.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# --------------------------------------------------------------------------------------------
# input checks


def _as_real_2d(name: str, img: Any) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D image (H, W) or (H, W, 1), got shape {a.shape}")
    if np.iscomplexobj(a):
        raise ValueError(f"{name}: expected a real image, got dtype {a.dtype}")
    return a.astype(np.float64)


def _as_complex_2d(name: str, img: Any) -> np.ndarray:
    a = np.asarray(img)
    # (1, H, W, 1) is how the reference passes a stitched object; accept it.
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D complex image (H, W), (H, W, 1) or (1, H, W, 1), "
            f"got shape {a.shape}"
        )
    return a.astype(np.complex128)


def _check_same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same shape, got {a.shape} and {b.shape}")


def _check_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != tuple(shape):
        raise ValueError(f"mask: expected shape {tuple(shape)}, got {m.shape}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("mask: no pixel selected (the evaluation region is empty)")
    return m


# --------------------------------------------------------------------------------------------
# SSIM / MS-SSIM


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, win_size: int, k1: float,
              k2: float) -> np.ndarray:
    # Local statistics with a uniform window; sample covariance as in Wang et al.'s reference
    # implementation and skimage's default (use_sample_covariance=True).
    filt = lambda a: ndimage.uniform_filter(a, size=win_size, mode="reflect")  # noqa: E731
    npix = win_size * win_size
    cov_norm = npix / (npix - 1.0)
    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def _window_interior(mask: np.ndarray, win_size: int) -> np.ndarray:
    # Pixels whose whole window lies in the mask; with an all-True mask this is exactly the
    # (win_size - 1) // 2 border crop that skimage applies before averaging.
    st = np.ones((win_size, win_size), dtype=bool)
    return ndimage.binary_erosion(mask, structure=st, border_value=0)


def ssim(img1: Any, img2: Any, *, data_range: float, win_size: int = 7, k1: float = 0.01,
         k2: float = 0.03, mask: Any = None) -> float:
    """Mean structural similarity of two real images.

    Args:
      img1, img2: real ``(H, W)`` arrays (any float dtype; computed in float64).
      data_range: dynamic range used for the stabilising constants (the reference passes
        ``max(target) - min(target)`` for amplitude and 1.0 for normalised phase).
      win_size: odd side of the uniform window (7, like skimage's default).
      mask: optional boolean ``(H, W)`` region; the SSIM map is averaged over the pixels whose
        whole window lies inside it (if none do, over the mask itself).

    Returns:
      The mean SSIM as a Python float (1.0 for identical images).
    """
    x = _as_real_2d("img1", img1)
    y = _as_real_2d("img2", img2)
    _check_same_shape(x, y, "img1", "img2")
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size: expected an odd integer >= 3, got {win_size}")
    if min(x.shape) < win_size:
        raise ValueError(f"img1: image shape {x.shape} is smaller than the window {win_size}")
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range: expected a positive finite number, got {data_range}")
    full = np.ones(x.shape, dtype=bool) if mask is None else _check_mask(mask, x.shape)
    sel = _window_interior(full, win_size)
    if not sel.any():
        sel = full
    smap = _ssim_map(x, y, float(data_range), win_size, k1, k2)
    return float(smap[sel].mean())


def ms_ssim(img1: Any, img2: Any, *, sigma: float = 0.0, weights=MS_SSIM_WEIGHTS,
            win_size: int = 7) -> float:
    """The reference's multi-scale SSIM variant (not the standard Wang et al. MS-SSIM).

    Full SSIM at every level, product of ``ssim_l ** w_l``; the next level is plain ``[::2, ::2]``
    decimation; stops once the smaller side drops below ``win_size``. The data range is fixed at
    level 0 as ``max(range(img1), range(img2))``. Negative level SSIMs are clamped to 1e-4; a NaN
    result becomes 0. ``sigma > 0`` pre-smooths both images with a Gaussian (the reference does
    this for amplitude with sigma 1).
    """
    x = _as_real_2d("img1", img1)
    y = _as_real_2d("img2", img2)
    _check_same_shape(x, y, "img1", "img2")
    if sigma > 0:
        x = ndimage.gaussian_filter(x, sigma)
        y = ndimage.gaussian_filter(y, sigma)
    drange = max(float(x.max() - x.min()), float(y.max() - y.min()))
    if drange <= 0:
        return 1.0 if np.array_equal(x, y) else 0.0
    out = 1.0
    for w in weights:
        if min(x.shape) < win_size:
            break
        s = ssim(x, y, data_range=drange, win_size=win_size)
        out *= max(s, 1e-4) ** w
        x, y = x[::2, ::2], y[::2, ::2]
    return 0.0 if math.isnan(out) else float(out)


# --------------------------------------------------------------------------------------------
# PSNR


def psnr(target: Any, pred: Any, *, peak: float = 255.0, mask: Any = None) -> float:
    """PSNR in dB, OpenCV's definition: ``20 log10(peak / (rmse + eps64))``.

    The reference calls ``cv2.PSNR`` with its default ``peak = 255`` even for amplitudes of
    order 1; keep that default for comparable numbers. Identical images give the finite cap
    ``20 log10(peak / eps64)`` (:data:`PSNR_CAP_DB` for 255), never ``inf``.
    """
    t = _as_real_2d("target", target)
    p = _as_real_2d("pred", pred)
    _check_same_shape(t, p, "target", "pred")
    sel = np.ones(t.shape, bool) if mask is None else _check_mask(mask, t.shape)
    rmse = math.sqrt(float(np.mean((t[sel] - p[sel]) ** 2)))
    return 20.0 * math.log10(peak / (rmse + _EPS64))


# --------------------------------------------------------------------------------------------
# FRC


def _center_square(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    n = min(h, w)
    r0, c0 = (h - n) // 2, (w - n) // 2
    return a[r0:r0 + n, c0:c0 + n]


def frc(img1: Any, img2: Any, *, sigma: float = 0.0) -> np.ndarray:
    """Fourier ring correlation curve of two real images (the reference's FSC variant).

    Non-square inputs are centre-cropped to a square of side ``n``. Ring ``k`` holds the
    pixels of the ``fftshift``-ed spectra whose distance from ``(floor(n/2), floor(n/2))`` rounds
    to ``k``; the curve has one value per ring up to the corners (``round(n / sqrt 2) + 1``
    values for even ``n``) and is ``|<F1 F2*>| / sqrt(<|F1|^2> <|F2|^2>)`` with ring means.
    A ring where either image has no power gives NaN. ``sigma > 0`` smooths the curve with a 1-D
    Gaussian (the reference's ``frc_sigma``).

    Returns:
      float64 array of shape ``(n_rings,)``.
    """
    a = _center_square(_as_real_2d("img1", img1))
    b = _center_square(_as_real_2d("img2", img2))
    _check_same_shape(a, b, "img1", "img2")
    n = a.shape[0]
    f1 = np.fft.fftshift(np.fft.fft2(a))
    f2 = np.fft.fftshift(np.fft.fft2(b))
    r = np.arange(n) - n // 2
    ring = np.rint(np.hypot(r[:, None], r[None, :])).astype(np.int64).ravel()
    count = np.bincount(ring)
    cross = f1 * np.conj(f2)
    c_re = np.bincount(ring, cross.real.ravel()) / count
    c_im = np.bincount(ring, cross.imag.ravel()) / count
    p1 = np.bincount(ring, (np.abs(f1) ** 2).ravel()) / count
    p2 = np.bincount(ring, (np.abs(f2) ** 2).ravel()) / count
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.hypot(c_re, c_im) / np.sqrt(np.abs(p1 * p2))
    if sigma > 0:
        curve = ndimage.gaussian_filter1d(curve, sigma)
    return curve


def frc_cutoff(curve: Any, threshold: float) -> float:
    """First crossing of ``curve`` below ``threshold``, in ring-index units.

    Linear interpolation between the first index ``i`` with ``curve[i] < threshold`` and
    ``i - 1``. Returns 0.0 if ``curve[0]`` is already below and ``len(curve)`` if no value is.
    NaN entries never count as "below".
    """
    c = np.asarray(curve, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"curve: expected a non-empty 1-D array, got shape {c.shape}")
    below = np.nonzero(c < threshold)[0]
    if below.size == 0:
        return float(c.size)
    i = int(below[0])
    if i == 0:
        return 0.0
    hi, lo = c[i - 1], c[i]
    if not np.isfinite(hi):
        return float(i)
    return float((i - 1) + (hi - threshold) / (hi - lo))
