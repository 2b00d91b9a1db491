"""Reconstruction quality metrics: SSIM, MS-SSIM, PSNR, FRC, with two evaluation protocols.

Everything here runs on the host in float64 (numpy/scipy); exactness matters more than speed.

Two protocols are provided (see ``DESIGN.md``, "Deliberate differences"):

* :func:`eval_reconstruction` -- the corrected protocol. The reconstruction has already been
  placed on the ground truth's pixel grid (``pinn_jax.geometry.reassemble_on_grid``), and the
  metrics are computed over the scanned region (a boolean mask, given or derived from the scan
  positions with :func:`scan_region_mask`). A ground truth scored against itself is perfect:
  SSIM 1, FRC 1 at every ring, MAE/MSE 0, PSNR at its cap (:data:`PSNR_CAP_DB` for peak 255).
  Global phase offsets and phase ramps of the reconstruction are removed relative to the ground
  truth (robust to phase wrapping); the amplitude is rescaled by the mean ratio.

* :func:`reference_protocol` -- what the TensorFlow reference does, for comparison with its
  published numbers: crop the ground truth from ``int(min) - M/2`` to ``int(max) + M/2`` of the
  scan coordinates, centre-crop both images to their common shape, trim ``offset // 2`` pixels,
  remove a least-squares phase plane from each image independently, rescale the amplitude by the
  mean ratio, then the metrics below. The reference's crop is misaligned with its stitched canvas
  by a few pixels; this function reproduces that on purpose.

Metric definitions (both protocols), matching the reference (model_physics.md §6):

* SSIM: 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample (N-1) covariance, mean of the SSIM map
  over pixels whose whole window lies inside the image (or the region mask). Amplitude uses
  ``data_range = max(target) - min(target)``; phase is mapped to ``(phi + pi) / (2 pi)`` and
  uses ``data_range = 1``.
* PSNR: ``20 log10(peak / (rmse + eps))`` with ``peak = 255`` and ``eps`` the float64 machine
  epsilon -- OpenCV's ``cv2.PSNR`` definition that the reference reports, so identical images give
  the finite cap :data:`PSNR_CAP_DB` rather than ``inf``.
* FRC: rings of integer radius ``round(sqrt(r^2 + c^2))`` around the ``fftshift`` centre,
  ring means, ``|<F1 F2*>| / sqrt(<|F1|^2> <|F2|^2>)``; the curve runs to the corner ring.
  FRC50 / FRC1/7 are the first crossings below 0.5 / (1/7) in ring-index units (linear
  interpolation), 0 if the first ring is already below, ``len(curve)`` if never below.
* MS-SSIM: the reference's own variant (full SSIM at every level, plain 2x decimation, data range
  fixed at level 0, amplitude pre-smoothed with a Gaussian of ``ms_ssim_sigma``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "PSNR_CAP_DB",
    "MS_SSIM_WEIGHTS",
    "ssim",
    "ms_ssim",
    "psnr",
    "frc",
    "frc_cutoff",
    "fit_plane",
    "remove_phase_plane",
    "align_phase_to",
    "scale_amplitude",
    "scan_region_mask",
    "reference_crop",
    "reference_crop_offset",
    "eval_reference",
    "reference_protocol",
    "eval_reconstruction",
    "evaluate_patches",
]

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


# --------------------------------------------------------------------------------------------
# alignment helpers


def fit_plane(values: Any, mask: Any = None) -> np.ndarray:
    """Least-squares plane ``a*x + b*y + c`` (x = column, y = row) fitted over ``mask``.

    Returns the plane evaluated on the full ``(H, W)`` grid (float64).
    """
    v = _as_real_2d("values", values)
    sel = np.ones(v.shape, bool) if mask is None else _check_mask(mask, v.shape)
    yy, xx = np.indices(v.shape, dtype=np.float64)
    design = np.stack([xx[sel], yy[sel], np.ones(int(sel.sum()))], axis=1)
    coef, *_ = np.linalg.lstsq(design, v[sel], rcond=None)
    return coef[0] * xx + coef[1] * yy + coef[2]


def remove_phase_plane(phase: Any, mask: Any = None) -> np.ndarray:
    """The reference's ``fit_and_remove_plane``: subtract a least-squares plane (no unwrapping)."""
    p = _as_real_2d("phase", phase)
    return p - fit_plane(p, mask)


def align_phase_to(recon: Any, target: Any, mask: Any = None) -> np.ndarray:
    """Remove a global phase offset and a linear phase ramp of ``recon`` relative to ``target``.

    Robust to phase wrapping: the ramp is first estimated from the mean phase of neighbouring
    products of ``d = recon * conj(target)`` along x and y (exact for ramps below pi per pixel),
    the offset from the phase of ``sum(d)``, and a final least-squares plane on the (now small)
    residual phase. Only ``recon``'s phase changes; its modulus is untouched.

    Args:
      recon, target: complex ``(H, W)``.
      mask: optional boolean ``(H, W)`` region used for every estimate.

    Returns:
      complex128 ``(H, W)``: ``recon * exp(-i * plane)``.
    """
    r = _as_complex_2d("recon", recon)
    t = _as_complex_2d("target", target)
    _check_same_shape(r, t, "recon", "target")
    sel = np.ones(r.shape, bool) if mask is None else _check_mask(mask, r.shape)
    d = r * np.conj(t)
    d = np.where(sel, d, 0)
    yy, xx = np.indices(r.shape, dtype=np.float64)
    # Neighbour products vanish where either pixel is outside the mask.
    gx = np.sum(d[:, 1:] * np.conj(d[:, :-1]))
    gy = np.sum(d[1:, :] * np.conj(d[:-1, :]))
    a = float(np.angle(gx)) if abs(gx) > 0 else 0.0
    b = float(np.angle(gy)) if abs(gy) > 0 else 0.0
    ramp = a * xx + b * yy
    d1 = d * np.exp(-1j * ramp)
    s = np.sum(d1)
    c = float(np.angle(s)) if abs(s) > 0 else 0.0
    plane = ramp + c
    resid = np.angle(d * np.exp(-1j * plane))
    ok = sel & (np.abs(d) > 0)
    if ok.sum() >= 3:
        plane = plane + fit_plane(np.where(ok, resid, 0.0), ok)
    return r * np.exp(-1j * plane)


def scale_amplitude(pred_amp: Any, target_amp: Any, mask: Any = None) -> np.ndarray:
    """Rescale ``pred_amp`` by ``mean(target) / mean(pred)`` (means over ``mask``)."""
    p = _as_real_2d("pred_amp", pred_amp)
    t = _as_real_2d("target_amp", target_amp)
    _check_same_shape(p, t, "pred_amp", "target_amp")
    sel = np.ones(p.shape, bool) if mask is None else _check_mask(mask, p.shape)
    mp = float(p[sel].mean())
    if mp == 0.0:
        return p.copy()
    return p * (float(t[sel].mean()) / mp)


def scan_region_mask(positions: Any, shape: tuple[int, int], M: int = 20) -> np.ndarray:
    """Pixels covered by the central ``M x M`` crops of patches at the given scan positions.

    A patch at ``(x, y)`` (object pixels) contributes its central crop, which covers object
    columns ``[x - M/2, x + M/2)`` and rows ``[y - M/2, y + M/2)`` -- what stitching with crop
    size ``M`` fills. A pixel counts as covered when its index lies in that range for some
    position (fractional positions cover the pixels whose integer index falls inside).

    Args:
      positions: ``(n, 2)`` float, rows ``[x, y]`` in object pixels.
      shape: ``(H, W)`` of the object grid.
      M: side of the central crop used by the stitching (reference default 20).

    Returns:
      bool ``(H, W)``.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] == 0:
        raise ValueError(f"positions: expected shape (n, 2) with n >= 1, got {pos.shape}")
    if len(shape) != 2:
        raise ValueError(f"shape: expected (H, W), got {shape}")
    if M <= 0:
        raise ValueError(f"M: expected a positive crop size, got {M}")
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), dtype=bool)
    half = M / 2.0
    for x, y in pos:
        c0 = max(int(math.ceil(x - half)), 0)
        c1 = min(int(math.ceil(x + half)), w)
        r0 = max(int(math.ceil(y - half)), 0)
        r1 = min(int(math.ceil(y + half)), h)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


# --------------------------------------------------------------------------------------------
# shared metric bundle


def _metric_bundle(pred_amp, tgt_amp, pred_phi, tgt_phi, sel, *, psnr_peak, frc_sigma,
                   ms_ssim_sigma, frc_fill) -> dict:
    """All metrics on aligned images; ``sel`` is the region (bool (H, W))."""
    out: dict[str, Any] = {}
    out["mae"] = (float(np.mean(np.abs(tgt_amp[sel] - pred_amp[sel]))),
                  float(np.mean(np.abs(tgt_phi[sel] - pred_phi[sel]))))
    out["mse"] = (float(np.mean((tgt_amp[sel] - pred_amp[sel]) ** 2)),
                  float(np.mean((tgt_phi[sel] - pred_phi[sel]) ** 2)))
    out["psnr"] = (psnr(tgt_amp, pred_amp, peak=psnr_peak, mask=sel),
                   psnr(tgt_phi, pred_phi, peak=psnr_peak, mask=sel))
    amp_range = float(tgt_amp[sel].max() - tgt_amp[sel].min())
    tgt_phs = (tgt_phi + np.pi) / (2 * np.pi)
    pred_phs = (pred_phi + np.pi) / (2 * np.pi)
    full = bool(sel.all())
    m = None if full else sel
    out["ssim"] = (
        ssim(tgt_amp, pred_amp, data_range=amp_range if amp_range > 0 else 1.0, mask=m),
        ssim(tgt_phs, pred_phs, data_range=1.0, mask=m),
    )
    def _filled(t, p):
        # Outside the region both images get the target's in-region mean: a constant shared
        # by both, so it adds no spurious structure that one image has and the other lacks.
        if full:
            return t, p
        fill = float(t[sel].mean()) if frc_fill is None else float(frc_fill)
        rows, cols = np.nonzero(sel)
        sl = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        return np.where(sel, t, fill)[sl], np.where(sel, p, fill)[sl]

    ta_f, pa_f = _filled(tgt_amp, pred_amp)
    ts_f, ps_f = _filled(tgt_phs, pred_phs)
    out["ms_ssim"] = (ms_ssim(ta_f, pa_f, sigma=ms_ssim_sigma), ms_ssim(ts_f, ps_f))

    def _frc_pair(t, p):
        if not np.any(t[sel]):
            return float("nan"), float("nan"), np.full(1, np.nan)
        t, p = _filled(t, p)
        curve = frc(t, p, sigma=frc_sigma)
        return frc_cutoff(curve, 0.5), frc_cutoff(curve, 1.0 / 7.0), curve

    a50, a17, acurve = _frc_pair(tgt_amp, pred_amp)
    p50, p17, pcurve = _frc_pair(tgt_phi, pred_phi)
    out["frc50"] = (a50, p50)
    out["frc1over7"] = (a17, p17)
    out["frc"] = (acurve, pcurve)
    return out


# --------------------------------------------------------------------------------------------
# reference protocol


def reference_crop(stitched: Any, ground_truth: Any, positions: Any, M: int = 20
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ``align_for_evaluation`` crop (reproduced, misalignment included).

    1. Cut the ground truth to rows ``[int(min_y) - M//2, int(max_y) + M//2)`` and columns
       ``[int(min_x) - M//2, int(max_x) + M//2)``, clamped to the image.
    2. Centre-crop both images to their common ``(min H, min W)`` (start ``(L - l) // 2``).

    The stitched canvas of ``reassemble_position`` is centred on the *mean* scan position,
    whereas this crop is anchored on the min/max, so the two disagree by a few pixels in
    general -- that is the reference's behaviour.

    Args:
      stitched: complex ``(S, S)``, ``(S, S, 1)`` or ``(1, S, S, 1)`` canvas.
      ground_truth: complex ``(H, W)`` object.
      positions: ``(n, 2)`` scan positions ``[x, y]`` (object pixels).
      M: the stitching crop size (reference 20).

    Returns:
      ``(recon_crop, gt_crop)``, complex128 arrays of equal shape.
    """
    rec = _as_complex_2d("stitched", stitched)
    gt = _as_complex_2d("ground_truth", ground_truth)
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] == 0:
        raise ValueError(f"positions: expected shape (n, 2) [x, y], got {pos.shape}")
    h, w = gt.shape
    half = M // 2
    r0 = max(int(pos[:, 1].min()) - half, 0)
    r1 = min(int(pos[:, 1].max()) + half, h)
    c0 = max(int(pos[:, 0].min()) - half, 0)
    c1 = min(int(pos[:, 0].max()) + half, w)
    gt = gt[r0:r1, c0:c1]
    hh = min(rec.shape[0], gt.shape[0])
    ww = min(rec.shape[1], gt.shape[1])

    def _cc(a):
        a0 = (a.shape[0] - hh) // 2
        b0 = (a.shape[1] - ww) // 2
        return a[a0:a0 + hh, b0:b0 + ww]

    return _cc(rec), _cc(gt)


def reference_crop_offset(stitched_shape: tuple[int, int], ground_truth_shape: tuple[int, int],
                          positions: Any, M: int = 20) -> tuple[float, float]:
    """Misalignment ``(dx, dy)`` that :func:`reference_crop` introduces, in pixels.

    Assumes ``stitched`` is a ``reassemble_position`` canvas, whose centre pixel ``S/2`` is the
    mean scan position. Pixel ``(r, c)`` of the cropped reconstruction then shows the object
    point that sits at pixel ``(r + dy, c + dx)`` of the cropped ground truth. Zero means the
    crop is aligned; the reference's own test set gives ``(+1.29, -2.56)``.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] == 0:
        raise ValueError(f"positions: expected shape (n, 2) [x, y], got {pos.shape}")
    S_h, S_w = (int(v) for v in stitched_shape[:2])
    h, w = (int(v) for v in ground_truth_shape[:2])
    half = M // 2
    r0 = max(int(pos[:, 1].min()) - half, 0)
    r1 = min(int(pos[:, 1].max()) + half, h)
    c0 = max(int(pos[:, 0].min()) - half, 0)
    c1 = min(int(pos[:, 0].max()) + half, w)
    hh, ww = min(S_h, r1 - r0), min(S_w, c1 - c0)
    # object coordinate of pixel (0, 0) of each crop
    x_rec = (S_w - ww) // 2 - S_w / 2 + pos[:, 0].mean()
    y_rec = (S_h - hh) // 2 - S_h / 2 + pos[:, 1].mean()
    x_gt = c0 + ((c1 - c0) - ww) // 2
    y_gt = r0 + ((r1 - r0) - hh) // 2
    return float(x_rec - x_gt), float(y_rec - y_gt)


def eval_reference(recon: Any, ground_truth: Any, *, offset: int = 4, phase_align: str = "plane",
                   psnr_peak: float = 255.0, frc_sigma: float = 0.0,
                   ms_ssim_sigma: float = 1.0) -> dict:
    """The reference's ``eval_reconstruction`` on two already-cropped, equal-shape images.

    Trims ``offset // 2`` pixels per side, removes a phase plane from each image independently
    (``phase_align='plane'``) or each image's mean phase (``'mean'``), rescales the predicted
    amplitude by the mean ratio, then computes every metric.

    Returns:
      dict with keys ``mae, mse, psnr, ssim, ms_ssim, frc50, frc1over7, frc``; each value is an
      ``(amplitude, phase)`` tuple (``frc`` holds the two curves).
    """
    rec = _as_complex_2d("recon", recon)
    gt = _as_complex_2d("ground_truth", ground_truth)
    _check_same_shape(rec, gt, "recon", "ground_truth")
    if offset < 0 or offset % 2:
        raise ValueError(f"offset: expected an even non-negative integer, got {offset}")
    t = offset // 2
    if t:
        rec, gt = rec[t:-t, t:-t], gt[t:-t, t:-t]
    if min(rec.shape) < 7:
        raise ValueError(f"recon: trimmed image {rec.shape} is too small for a 7x7 SSIM window")
    pphi, tphi = np.angle(rec), np.angle(gt)
    if phase_align == "plane":
        pphi, tphi = remove_phase_plane(pphi), remove_phase_plane(tphi)
    elif phase_align == "mean":
        pphi, tphi = pphi - pphi.mean(), tphi - tphi.mean()
    else:
        raise ValueError(f"phase_align: expected 'plane' or 'mean', got {phase_align!r}")
    tamp = np.abs(gt)
    pamp = scale_amplitude(np.abs(rec), tamp)
    sel = np.ones(tamp.shape, bool)
    return _metric_bundle(pamp, tamp, pphi, tphi, sel, psnr_peak=psnr_peak, frc_sigma=frc_sigma,
                          ms_ssim_sigma=ms_ssim_sigma, frc_fill=None)


def reference_protocol(stitched: Any, ground_truth: Any, positions: Any, *, M: int = 20,
                       offset: int = 4, phase_align: str = "plane", psnr_peak: float = 255.0,
                       frc_sigma: float = 0.0, ms_ssim_sigma: float = 1.0) -> dict:
    """Evaluate exactly as the reference does, for comparison with its published numbers.

    ``stitched`` is the output of ``reassemble_position(patches, global_offsets, M)`` (canvas
    centred on the mean scan position); ``positions`` are the ``(n, 2)`` ``[x, y]`` scan
    coordinates of the reconstructed patterns. Crop with :func:`reference_crop`, then
    :func:`eval_reference`. The returned dict also carries ``'aligned'``:
    ``(recon_crop, gt_crop)`` before trimming.
    """
    rec, gt = reference_crop(stitched, ground_truth, positions, M)
    out = eval_reference(rec, gt, offset=offset, phase_align=phase_align, psnr_peak=psnr_peak,
                         frc_sigma=frc_sigma, ms_ssim_sigma=ms_ssim_sigma)
    out["aligned"] = (rec, gt)
    return out


# --------------------------------------------------------------------------------------------
# corrected protocol


def eval_reconstruction(recon: Any, ground_truth: Any, *, mask: Any = None, positions: Any = None,
                        M: int = 20, phase_align: str = "relative", psnr_peak: float = 255.0,
                        frc_sigma: float = 0.0, ms_ssim_sigma: float = 1.0) -> dict:
    """Score a reconstruction that already lies on the ground truth's pixel grid.

    Args:
      recon: complex ``(H, W)`` (or ``(H, W, 1)``), e.g. from
        ``pinn_jax.geometry.reassemble_on_grid``; pixels outside the region are ignored.
      ground_truth: complex ``(H, W)`` object (``objectGuess``).
      mask: boolean ``(H, W)`` evaluation region. If None it is built from ``positions`` with
        :func:`scan_region_mask` (``M``); if both are None the whole image is used.
      positions: ``(n, 2)`` scan positions ``[x, y]`` in object pixels.
      M: stitching crop size used to derive the region from ``positions``.
      phase_align: ``'relative'`` (default: global offset + linear ramp of the reconstruction
        removed relative to the ground truth, wrap-safe, see :func:`align_phase_to`),
        ``'plane'`` (the reference's independent plane removal, over the region) or ``'mean'``.
      psnr_peak: PSNR peak (255 like the reference's ``cv2.PSNR``).

    Returns:
      dict with ``mae, mse, psnr, ssim, ms_ssim, frc50, frc1over7, frc`` as ``(amp, phase)``
      tuples (like the reference) plus ``'region_pixels'`` (int). Amplitude metrics use the
      reconstruction rescaled by ``mean(|gt|) / mean(|recon|)`` over the region.
    """
    rec = _as_complex_2d("recon", recon)
    gt = _as_complex_2d("ground_truth", ground_truth)
    _check_same_shape(rec, gt, "recon", "ground_truth")
    if mask is not None:
        sel = _check_mask(mask, gt.shape)
    elif positions is not None:
        sel = _check_mask(scan_region_mask(positions, gt.shape, M), gt.shape)
    else:
        sel = np.ones(gt.shape, dtype=bool)
    if phase_align not in ("relative", "plane", "mean"):
        raise ValueError(
            f"phase_align: expected 'relative', 'plane' or 'mean', got {phase_align!r}")
    rows, cols = np.nonzero(sel)
    if rows.max() - rows.min() + 1 < 7 or cols.max() - cols.min() + 1 < 7:
        raise ValueError(
            f"mask: the evaluation region spans rows {rows.min()}..{rows.max()} and columns "
            f"{cols.min()}..{cols.max()}; need at least 7x7 pixels for SSIM")
    if not np.all(np.isfinite(rec[sel])):
        raise ValueError("recon: non-finite values inside the evaluation region")
    # Work on the region's bounding box: cheaper, and the window/FRC geometry is local to it.
    sl = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    rec, gt, sel = rec[sl], gt[sl], sel[sl]
    if phase_align == "relative":
        rec = align_phase_to(rec, gt, sel)
        pphi, tphi = np.angle(rec), np.angle(gt)
    elif phase_align == "plane":
        pphi = remove_phase_plane(np.angle(rec), sel)
        tphi = remove_phase_plane(np.angle(gt), sel)
    else:
        pphi, tphi = np.angle(rec), np.angle(gt)
        pphi = pphi - pphi[sel].mean()
        tphi = tphi - tphi[sel].mean()
    tamp = np.abs(gt)
    pamp = scale_amplitude(np.abs(rec), tamp, sel)
    out = _metric_bundle(pamp, tamp, pphi, tphi, sel, psnr_peak=psnr_peak, frc_sigma=frc_sigma,
                         ms_ssim_sigma=ms_ssim_sigma, frc_fill=None)
    out["region_pixels"] = int(sel.sum())
    return out


def evaluate_patches(patches: Any, positions: Any, ground_truth: Any, *, M: int = 20,
                     reference: bool = True, **kwargs) -> dict:
    """Stitch predicted patches and score them under both protocols (convenience).

    Args:
      patches: ``(n, N, N, 1)`` or ``(n, N, N)`` complex predicted object patches, patch centre
        pixel ``N/2`` at the scan position.
      positions: ``(n, 2)`` ``[x, y]`` scan positions in object pixels (``xcoords, ycoords``).
      ground_truth: complex ``(H, W)`` object (``objectGuess``).
      M: central crop kept by the stitching (reference workflows use 20).
      reference: also run :func:`reference_protocol` on a ``reassemble_position`` canvas.
      kwargs: passed to both protocols (``psnr_peak``, ``frc_sigma``, ``ms_ssim_sigma``).

    Returns:
      ``{'corrected': dict, 'reference': dict | None, 'recon_on_grid': (H, W) complex64,
      'region': bool (H, W)}``; the region is the stitching coverage (weights > 0) intersected
      with :func:`scan_region_mask`.
    """
    from .geometry import reassemble_on_grid_with_weights, reassemble_position

    gt = _as_complex_2d("ground_truth", ground_truth)
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions: expected shape (n, 2) [x, y], got {pos.shape}")
    grid, weights = reassemble_on_grid_with_weights(patches, pos, gt.shape, M)
    grid = np.asarray(grid)
    region = (np.asarray(weights) > 0) & scan_region_mask(pos, gt.shape, M)
    out: dict[str, Any] = {
        "corrected": eval_reconstruction(grid, gt, mask=region, **kwargs),
        "reference": None, "recon_on_grid": grid, "region": region,
    }
    if reference:
        canvas = np.asarray(reassemble_position(patches, pos, M))
        out["reference"] = reference_protocol(canvas, gt, pos, M=M, **kwargs)
    return out
