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

from backend_api.canvas import STITCH_CROP

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

# The image-quality measures (SSIM, MS-SSIM, PSNR, FRC) and the input checks: their own
# module, pinn_jax.image_quality; re-exported here.
from pinn_jax.image_quality import (  # noqa: E402
    MS_SSIM_WEIGHTS,
    PSNR_CAP_DB,
    _as_complex_2d,
    _as_real_2d,
    _check_mask,
    _check_same_shape,
    frc,
    frc_cutoff,
    ms_ssim,
    psnr,
    ssim,
)


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


def scan_region_mask(positions: Any, shape: tuple[int, int], M: int = STITCH_CROP) -> np.ndarray:
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


def reference_crop(stitched: Any, ground_truth: Any, positions: Any, M: int = STITCH_CROP
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
                          positions: Any, M: int = STITCH_CROP) -> tuple[float, float]:
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


def reference_protocol(stitched: Any, ground_truth: Any, positions: Any, *, M: int = STITCH_CROP,
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
                        M: int = STITCH_CROP, phase_align: str = "relative", psnr_peak: float = 255.0,
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


def evaluate_patches(patches: Any, positions: Any, ground_truth: Any, *, M: int = STITCH_CROP,
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
