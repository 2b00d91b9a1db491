"""Pure-numpy conversions between ptychodus data and the PtychoPINN data contract.

Nothing here imports ptychodus, jax or any backend: the functions take plain arrays (the
parent extracts them from ptychodus objects) so that the spawned child can use them too.

Conventions (the ones that matter):

- ptychodus hands over diffraction **intensities** (integer counts or floats after its own
  preprocessing); the PtychoPINN contract wants **amplitudes** ``sqrt(intensity)``, float32,
  DC at ``[N/2, N/2]``. Data that are already amplitudes (e.g. a PtychoPINN NPZ opened in
  ptychodus) must not be square-rooted again: the ``DiffractionKind`` setting (``auto`` by
  default) decides with :func:`backend_api.diffraction.classify_diffraction`, assuming
  intensity when no rule fires.
- ptychodus maps a probe position to object pixels with the centred convention: pixel
  ``(W-1)/2`` sits at the object centre, and the probe array's own centre ``(N-1)/2`` lands
  on the position (``ProbeGeometry.resolve_patch_bounds``), so object pixel
  ``X = x_px - (N-1)/2 + i`` meets probe pixel ``i``. PtychoPINN puts patch pixel ``N/2`` on
  the position (``model_physics.md`` §1.2), i.e. ``X = x - N/2 + i``. The two agree when
  ``x = x_px + 0.5``; :data:`PTYCHODUS_TO_PINN_SHIFT_PX` is that half pixel, applied where
  positions are used to place patches on the object grid (stitching). Training only sees
  relative offsets, which the shift leaves unchanged, so exported files keep ptychodus's own
  coordinates.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from backend_api.canvas import check_canvas_size, check_positions_overlap
from backend_api.diffraction import check_diffraction_kind, classify_diffraction, override_hint

__all__ = [
    "PTYCHODUS_TO_PINN_SHIFT_PX",
    "intensity_to_amplitude",
    "first_probe_mode",
    "splat_on_grid",
    "stitch_on_grid",
    "compose_object",
    "blend_window",
    "blend_on_grid",
    "coverage_report",
    "BLEND_INTENSITY_FLOOR",
]

#: Add to ptychodus object-pixel positions to get PtychoPINN patch-centre positions.
PTYCHODUS_TO_PINN_SHIFT_PX = 0.5


def intensity_to_amplitude(intensity: np.ndarray, *, name: str = "diff3d",
                           kind: str = "intensity") -> np.ndarray:
    """Diffraction data ``(n, H, W)`` (any int/float dtype, may be read-only) to amplitudes
    ``(n, H, W)`` float32.

    ``kind``: ``'intensity'`` takes the square root; ``'amplitude'`` casts only (negative values
    are refused); ``'auto'`` classifies with
    :func:`~backend_api.diffraction.classify_diffraction` (``assume='intensity'``, what
    ptychodus hands over) and warns when it finds amplitudes and so takes no square root.
    Negative intensities (dark-subtracted or inpainted floats can dip below zero) are clipped
    to zero before the square root; non-finite values are rejected.
    """
    kind = check_diffraction_kind(kind, name=f"{name}: diffraction_kind")
    arr = np.asarray(intensity)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a (n, H, W) stack of patterns, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: got no diffraction patterns (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name}: expected integer or float intensities, got dtype {arr.dtype}")
    as_float = arr.astype(np.float64)
    if not np.all(np.isfinite(as_float)):
        raise ValueError(f"{name}: intensities contain NaN or inf")
    if kind == "auto":
        kind, reason = classify_diffraction(arr, assume="intensity")
        if kind == "amplitude":
            warnings.warn(f"{name}: the diffraction data look like amplitudes, not intensities: "
                          f"{reason}; using them without a square root; "
                          f"{override_hint('intensity')}", UserWarning, stacklevel=2)
    if kind == "amplitude":
        if (as_float < 0).any():
            raise ValueError(f"{name}: diffraction_kind='amplitude' but the data have negative "
                             f"values (min {as_float.min():.6g}); amplitudes are >= 0")
        return as_float.astype(np.float32)
    return np.sqrt(np.clip(as_float, 0.0, None)).astype(np.float32)


def first_probe_mode(probe: np.ndarray, *, name: str = "probeGuess") -> np.ndarray:
    """The first incoherent mode of a ``(H, W)``, ``(modes, H, W)`` or
    ``(opr, modes, H, W)`` probe, as ``(H, W)`` complex64.

    PtychoPINN models a single coherent probe; ptychodus exports the whole mode stack.
    """
    arr = np.asarray(probe)
    if arr.ndim < 2 or arr.ndim > 4:
        raise ValueError(f"{name}: expected a 2-, 3- or 4-D probe array, got shape {arr.shape}")
    while arr.ndim > 2:
        arr = arr[0]
    return arr.astype(np.complex64)


def _bilinear_splat(
    canvas: np.ndarray, values: np.ndarray, top: float, left: float
) -> None:
    """Add ``values`` (h, w) into ``canvas`` with its pixel (0, 0) at real position
    (top, left), spreading each value over the 4 nearest pixels with bilinear weights.

    This is the same as translating the zero-padded patch by a sub-pixel shift with
    bilinear interpolation and summing, which is how the reference stitches.
    """
    H, W = canvas.shape
    h, w = values.shape
    r0 = int(np.floor(top))
    c0 = int(np.floor(left))
    fr = top - r0
    fc = left - c0
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        if wr == 0.0:
            continue
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            if wc == 0.0:
                continue
            rr0, cc0 = r0 + dr, c0 + dc
            # Clip the destination window to the canvas.
            a0, a1 = max(rr0, 0), min(rr0 + h, H)
            b0, b1 = max(cc0, 0), min(cc0 + w, W)
            if a0 >= a1 or b0 >= b1:
                continue
            canvas[a0:a1, b0:b1] += (wr * wc) * values[a0 - rr0 : a1 - rr0, b0 - cc0 : b1 - cc0]


def _patch_stack(patches: Any) -> np.ndarray:
    """``(n, N, N)`` from ``(n, N, N)`` or ``(n, N, N, 1)`` patches (ValueError otherwise)."""
    p = np.asarray(patches)
    if p.ndim == 4 and p.shape[-1] == 1:
        p = p[..., 0]
    if p.ndim != 3 or p.shape[1] != p.shape[2]:
        raise ValueError(f"patches: expected (n, N, N[, 1]), got shape {np.shape(patches)}")
    return p


def stitch_on_grid(
    patches: np.ndarray,
    positions: np.ndarray,
    object_shape: tuple[int, int],
    crop: int,
    *,
    max_canvas_pixels: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Average the central ``crop x crop`` of each patch onto an object grid (numpy).

    Refused before anything is allocated (ValueError subclasses from :mod:`backend_api.canvas`):
    an object grid above ``max_canvas_pixels`` (default ``$PINN_JAX_MAX_CANVAS_PIXELS`` or
    2**28), and positions whose patch cannot overlap the grid at all (positions of another
    object or in another unit would otherwise leave an empty reconstruction).

    Args:
        patches: ``(n, N, N)`` or ``(n, N, N, 1)`` complex patches; patch pixel ``N/2`` is the
            patch centre.
        positions: ``(n, 2)`` float, ``[x, y]`` in object pixels (PtychoPINN convention: the
            patch centre lands on pixel column x, row y).
        object_shape: ``(H, W)`` of the output grid.
        crop: side of the central square kept from each patch (the reference's ``M``).

    Returns:
        ``(obj, weight)``: ``obj (H, W)`` complex128, the weighted mean of the patches where
        ``weight > 0`` and 0 elsewhere; ``weight (H, W)`` float64, the summed bilinear
        coverage (about the number of overlapping crops).
    """
    p = _patch_stack(patches)
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (p.shape[0], 2):
        raise ValueError(f"positions: expected ({p.shape[0]}, 2) [x, y], got shape {pos.shape}")
    n_patch = p.shape[1]
    crop = int(min(max(crop, 1), n_patch))
    H, W = (int(object_shape[0]), int(object_shape[1]))
    check_canvas_size((H, W), max_pixels=max_canvas_pixels, what="the object grid",
                      bytes_per_pixel=24, storage="a complex128 sum plus float64 weights")
    check_positions_overlap(pos, (H, W), n_patch, what="positions")
    return splat_on_grid(p, pos, (H, W), crop)


def splat_on_grid(patches: np.ndarray, positions: np.ndarray, object_shape: tuple[int, int],
                  crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The unchecked kernel of :func:`stitch_on_grid`: ``patches (n, N, N)`` complex,
    ``positions (n, 2)`` float64 ``[x, y]``, ``crop`` already clamped to ``1..N``. Pixels that
    fall off the grid are dropped, never wrapped; a patch entirely off the grid adds nothing.
    Returns ``(obj (H, W) complex128, weight (H, W) float64)`` as :func:`stitch_on_grid`."""
    p = np.asarray(patches)
    pos = np.asarray(positions, dtype=np.float64)
    n_patch = p.shape[1]
    H, W = (int(object_shape[0]), int(object_shape[1]))
    start = n_patch // 2 - crop // 2
    crops = p[:, start : start + crop, start : start + crop].astype(np.complex128)
    ones = np.ones((crop, crop), dtype=np.float64)
    acc = np.zeros((H, W), dtype=np.complex128)
    weight = np.zeros((H, W), dtype=np.float64)
    for k in range(p.shape[0]):
        x, y = pos[k]
        # Crop pixel j is patch pixel start + j, which sits at object x - N/2 + start + j.
        left = x - n_patch // 2 + start
        top = y - n_patch // 2 + start
        _bilinear_splat(acc, crops[k], top, left)
        _bilinear_splat(weight, ones, top, left)
    obj = np.zeros_like(acc)
    covered = weight > 0
    obj[covered] = acc[covered] / weight[covered]
    return obj, weight


def compose_object(
    stitched: np.ndarray,
    coverage: np.ndarray,
    input_object: np.ndarray,
    *,
    min_coverage: float = 1e-3,
) -> np.ndarray:
    """Put a stitched reconstruction onto the input object's array.

    Args:
        stitched: ``(H, W)`` complex reconstruction on the input object's grid.
        coverage: ``(H, W)`` stitching weights; pixels with ``coverage <= min_coverage`` were
            not reconstructed.
        input_object: ``(layers, H, W)`` complex, the input product's object.

    Returns:
        ``(layers, H, W)`` with the input's complex dtype (complex64 at least): layer 0 holds
        the reconstruction where covered and the input's own values elsewhere (so pixels the
        scan never illuminated keep the starting guess); further layers (PtychoPINN is a
        single-slice model) are set to ``1 + 0j`` so the layer product equals the
        reconstruction. Non-finite values are replaced by the input's.
    """
    obj_in = np.asarray(input_object)
    if obj_in.ndim == 2:
        obj_in = obj_in[np.newaxis]
    if obj_in.ndim != 3:
        raise ValueError(f"input object: expected (layers, H, W), got shape {obj_in.shape}")
    if stitched.shape != obj_in.shape[1:] or coverage.shape != obj_in.shape[1:]:
        raise ValueError(
            f"stitched object {stitched.shape} / coverage {coverage.shape} do not match the "
            f"input object grid {obj_in.shape[1:]}"
        )
    dtype = np.result_type(obj_in.dtype, np.complex64)
    out = np.ones(obj_in.shape, dtype=dtype)
    base = obj_in[0].astype(dtype)
    good = (coverage > min_coverage) & np.isfinite(stitched)
    layer0 = np.where(good, stitched.astype(dtype), base)
    # A non-finite starting guess must not leak into the product either.
    layer0 = np.where(np.isfinite(layer0), layer0, 1.0 + 0.0j)
    out[0] = layer0
    return out


#: Pixels of a patch whose probe intensity is below this fraction of the peak get no weight in
#: blend stitching (10 % of the peak amplitude): outside the illuminated footprint a pattern
#: does not constrain the object.
BLEND_INTENSITY_FLOOR = 0.01


def blend_window(probe: np.ndarray, *, pad_object: bool = True,
                 floor: float = BLEND_INTENSITY_FLOOR) -> np.ndarray:
    """The per-pixel weight ``(N, N)`` float64 of one patch in blend stitching.

    ``|probe|**2 / max |probe|**2`` (where a pattern measures the object best, it weighs most),
    set to zero below ``floor`` and, with ``pad_object`` (the network reconstructs only the
    central ``N/2 x N/2``; the border is zero or a low-resolution fill), outside that centre.
    A probe with no intensity at all gives a flat window over the reconstructed part.
    """
    p = np.asarray(probe)
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"probe: expected a square (N, N) array, got shape {p.shape}")
    if not (0.0 <= floor < 1.0):
        raise ValueError(f"floor: expected a value in [0, 1), got {floor!r}")
    n = p.shape[0]
    intensity = np.abs(p.astype(np.complex128)) ** 2
    peak = float(intensity.max()) if intensity.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        window = np.ones((n, n), dtype=np.float64)
    else:
        window = intensity / peak
        window[window < floor] = 0.0
    if pad_object:
        keep = np.zeros((n, n), dtype=bool)
        lo = n // 4
        keep[lo:lo + n // 2, lo:lo + n // 2] = True
        window = np.where(keep, window, 0.0)
        if not window.any():  # a probe brighter outside the centre than inside: keep the centre
            window = keep.astype(np.float64)
    return window


def blend_on_grid(patches: np.ndarray, positions: np.ndarray, object_shape: tuple[int, int],
                  window: np.ndarray, *, max_canvas_pixels: int | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted blend of whole patches onto an object grid (numpy): every position fills its
    footprint (where ``window > 0``) and overlapping patches are averaged with the weights.

    Args:
        patches: ``(n, N, N)`` or ``(n, N, N, 1)`` complex; patch pixel ``N/2`` on the position.
        positions: ``(n, 2)`` ``[x, y]`` object pixels (PtychoPINN convention).
        object_shape: ``(H, W)``.
        window: ``(N, N)`` non-negative weights (:func:`blend_window`).

    Returns:
        ``(obj (H, W) complex128, weight (H, W) float64)``: the weighted mean where
        ``weight > 0`` (0 elsewhere) and the summed weights. Refused like
        :func:`stitch_on_grid` (canvas size, positions that miss the grid).
    """
    p = _patch_stack(patches)
    w = np.asarray(window, dtype=np.float64)
    if w.shape != p.shape[1:]:
        raise ValueError(f"window: shape {w.shape} does not match the patches {p.shape[1:]}")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError("window: expected finite, non-negative weights")
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (p.shape[0], 2):
        raise ValueError(f"positions: expected ({p.shape[0]}, 2) [x, y], got shape {pos.shape}")
    n_patch = p.shape[1]
    H, W = int(object_shape[0]), int(object_shape[1])
    check_canvas_size((H, W), max_pixels=max_canvas_pixels, what="the object grid",
                      bytes_per_pixel=24, storage="a complex128 sum plus float64 weights")
    check_positions_overlap(pos, (H, W), n_patch, what="positions")
    acc = np.zeros((H, W), dtype=np.complex128)
    weight = np.zeros((H, W), dtype=np.float64)
    for k in range(p.shape[0]):
        x, y = pos[k]
        top, left = y - n_patch // 2, x - n_patch // 2
        values = p[k].astype(np.complex128)
        _bilinear_splat(acc, w * np.where(np.isfinite(values), values, 0.0), top, left)
        _bilinear_splat(weight, w * np.isfinite(values), top, left)
    obj = np.zeros_like(acc)
    covered = weight > 0
    obj[covered] = acc[covered] / weight[covered]
    return obj, weight


def coverage_report(weight: np.ndarray, positions: np.ndarray, *,
                    min_coverage: float = 1e-3) -> dict:
    """How much of the object the stitched patches cover: ``{'covered_fraction'`` (of the whole
    grid), ``'scan_area_covered_fraction'`` (of the positions' bounding box; below 1 the scan
    leaves gaps there), ``'covered_pixels'``}``."""
    wt = np.asarray(weight)
    covered = wt > min_coverage
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    H, W = wt.shape
    x0, x1 = int(np.clip(np.floor(pos[:, 0].min()), 0, W - 1)), int(np.clip(np.ceil(pos[:, 0].max()), 0, W - 1))
    y0, y1 = int(np.clip(np.floor(pos[:, 1].min()), 0, H - 1)), int(np.clip(np.ceil(pos[:, 1].max()), 0, H - 1))
    box = covered[y0:y1 + 1, x0:x1 + 1]
    return {"covered_fraction": float(covered.mean()),
            "scan_area_covered_fraction": float(box.mean()) if box.size else 0.0,
            "covered_pixels": int(covered.sum())}
