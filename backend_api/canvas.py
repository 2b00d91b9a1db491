"""Guards for stitching canvases, checked before anything is allocated (numpy only).

A stitcher allocates a canvas whose size follows from the scan positions: ``reassemble_position``
a square of side ``M + 2 * ceil(max |position - mean|)``, the on-grid stitchers the object grid.
Positions in the wrong unit (nanometres or motor counts taken for pixels) make that canvas
terabytes large, and positions that belong to another object land nowhere on the object grid
and leave an empty reconstruction (a few stray positions only warn, see
:func:`check_positions_overlap`). Both are refused here with a :class:`ValueError` subclass
that names the canvas size, the memory it would take, or how many positions miss the grid.

The bound on the canvas is ``max_canvas_pixels`` (keyword of every stitcher), else the
environment variable ``PINN_JAX_MAX_CANVAS_PIXELS``, else :data:`DEFAULT_MAX_CANVAS_PIXELS`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "STITCH_CROP",
    "DEFAULT_MAX_CANVAS_PIXELS",
    "MAX_CANVAS_PIXELS_ENV",
    "STITCH_BYTES_PER_PIXEL",
    "CanvasTooLargeError",
    "PositionsOutsideObjectError",
    "resolve_max_canvas_pixels",
    "format_bytes",
    "check_canvas_size",
    "positions_outside_grid",
    "check_positions_overlap",
    "fill_uncovered",
]

#: Side of the central square of each reconstructed patch that stitching keeps (the reference's
#: ``M``, pixels): the network reconstructs the patch centre well and its border poorly.
STITCH_CROP = 20

#: Default bound on a stitching canvas: 2**28 pixels, a 16384 x 16384 object. That is several
#: times the side of the largest objects ptychography scans reconstruct (typically 1k-8k pixels
#: per side), and at :data:`STITCH_BYTES_PER_PIXEL` it needs 3 GiB, which a workstation has.
#: Canvases beyond it come from positions in the wrong unit, not from real scans; a genuinely
#: larger object can raise the bound.
DEFAULT_MAX_CANVAS_PIXELS = 2**28

#: Environment variable overriding :data:`DEFAULT_MAX_CANVAS_PIXELS` (a positive integer).
MAX_CANVAS_PIXELS_ENV = "PINN_JAX_MAX_CANVAS_PIXELS"

#: Bytes a stitcher holds per canvas pixel: a complex64 sum (8) and float32 weights (4).
STITCH_BYTES_PER_PIXEL = 12


class CanvasTooLargeError(ValueError):
    """The stitching canvas implied by the positions exceeds ``max_canvas_pixels``."""


class PositionsOutsideObjectError(ValueError):
    """Scan positions whose patch cannot overlap the object grid (or that are not finite)."""


def resolve_max_canvas_pixels(value: int | None = None) -> int:
    """The canvas bound in pixels: ``value`` if given, else ``$PINN_JAX_MAX_CANVAS_PIXELS``,
    else :data:`DEFAULT_MAX_CANVAS_PIXELS`. ValueError naming the source when not a positive int."""
    source = "max_canvas_pixels"
    if value is None:
        text = os.environ.get(MAX_CANVAS_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_CANVAS_PIXELS
        source = f"environment variable {MAX_CANVAS_PIXELS_ENV}"
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{source}: expected a positive integer number of pixels, got {text!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{source}: expected a positive integer number of pixels, got {value!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """``n`` bytes as ``'3.0 GiB'`` (binary units, one decimal)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024.0 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    raise AssertionError("unreachable")  # pragma: no cover


def check_canvas_size(
    shape: Sequence[int],
    *,
    max_pixels: int | None = None,
    allocated_shape: Sequence[int] | None = None,
    what: str = "stitching canvas",
    detail: str = "",
    bytes_per_pixel: int = STITCH_BYTES_PER_PIXEL,
    storage: str = "a complex64 sum plus float32 weights",
) -> None:
    """Refuse a canvas of ``shape = (H, W)`` pixels larger than the bound, before allocating it.

    ``allocated_shape``: what the stitcher really allocates (with its margins; default
    ``shape``), used for the memory figure at ``bytes_per_pixel`` (described by ``storage``).
    ``detail`` is appended to the message (e.g. the extent of the positions). Raises
    :class:`CanvasTooLargeError`.
    """
    limit = resolve_max_canvas_pixels(max_pixels)
    H, W = (int(v) for v in shape)
    pixels = H * W  # Python ints: no overflow however absurd the positions
    if pixels <= limit:
        return
    aH, aW = (int(v) for v in (allocated_shape if allocated_shape is not None else shape))
    need = format_bytes(aH * aW * int(bytes_per_pixel))
    msg = (
        f"{what} would be {H} x {W} pixels ({pixels:.3g} pixels, about {need} as {storage}), "
        f"more than max_canvas_pixels={limit} ({format_bytes(limit * int(bytes_per_pixel))})"
    )
    if detail:
        msg += f"; {detail}"
    msg += (
        f". Are the positions in object pixels? To stitch anyway raise the bound "
        f"(max_canvas_pixels=, --max_canvas_pixels or {MAX_CANVAS_PIXELS_ENV})"
    )
    raise CanvasTooLargeError(msg)


def positions_outside_grid(positions, object_shape: Sequence[int], patch_size: float) -> np.ndarray:
    """``(n,)`` bool: True where a ``patch_size`` patch centred at ``[x, y]`` cannot overlap the
    ``(H, W)`` object grid at all (or the position is not finite).

    A patch centred at ``x`` spans columns ``[x - P/2, x + P/2)``; one extra pixel is allowed
    for the bilinear tap, so only patches that are certainly off the grid are flagged.
    """
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    (x_lo, x_hi), (y_lo, y_hi) = _centre_bounds(object_shape, patch_size)
    x, y = pos[:, 0], pos[:, 1]
    with np.errstate(invalid="ignore"):
        inside = (x > x_lo) & (x < x_hi) & (y > y_lo) & (y < y_hi)
    return ~inside  # NaN compares False, so non-finite positions count as outside


def _centre_bounds(object_shape: Sequence[int], patch_size: float):
    """Open intervals ``((x_lo, x_hi), (y_lo, y_hi))`` of patch centres that can touch the grid."""
    H, W = (int(v) for v in object_shape)
    half = float(patch_size) / 2.0
    return (-half - 1.0, W + half), (-half - 1.0, H + half)


def check_positions_overlap(positions, object_shape: Sequence[int], patch_size: float, *,
                            what: str = "scan positions") -> None:
    """Check positions ``(n, 2)`` ``[x, y]`` (object pixels) against the ``(H, W)`` object grid.

    A patch that cannot overlap the grid contributes nothing to an on-grid stitch (it costs no
    memory: the canvas is the grid). A few such positions (a stray motor reading) are dropped
    with a ``UserWarning`` naming how many; when at least half of the scan misses the grid, the
    positions are in another unit or belong to another object and the reconstruction would be
    mostly empty, so :class:`PositionsOutsideObjectError` is raised, naming how many miss, the
    first one, and the range the positions would need to lie in. Non-finite positions are
    always refused.
    """
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    bad = positions_outside_grid(pos, object_shape, patch_size)
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return
    H, W = (int(v) for v in object_shape)
    (x_lo, x_hi), (y_lo, y_hi) = _centre_bounds(object_shape, patch_size)
    i = int(np.flatnonzero(bad)[0])
    finite = np.isfinite(pos).all(axis=1)
    n_nonfinite = int(np.count_nonzero(~finite))
    if n_nonfinite == 0 and 2 * n_bad < len(pos):
        warnings.warn(
            f"{what}: {n_bad} of {len(pos)} positions lie outside the {H} x {W} object grid "
            f"(first: #{i} at x={pos[i, 0]:.6g}, y={pos[i, 1]:.6g}); their patches are left out",
            UserWarning, stacklevel=2)
        return
    extent = ""
    if finite.any():
        lo, hi = pos[finite].min(axis=0), pos[finite].max(axis=0)
        extent = f"; the positions span x {lo[0]:.6g}..{hi[0]:.6g}, y {lo[1]:.6g}..{hi[1]:.6g}"
    nonfinite = f" ({n_nonfinite} not finite)" if n_nonfinite else ""
    raise PositionsOutsideObjectError(
        f"{what}: {n_bad} of {len(pos)} positions{nonfinite} lie so far outside the {H} x {W} "
        f"object grid that their {int(patch_size)}-pixel patch cannot overlap it (first: #{i} at "
        f"x={pos[i, 0]:.6g}, y={pos[i, 1]:.6g}; patch centres must lie strictly between x "
        f"{x_lo:g} and {x_hi:g}, y {y_lo:g} and {y_hi:g})"
        f"{extent}. Are the positions in object pixels of this object?"
    )


def fill_uncovered(obj: np.ndarray, weights: np.ndarray, *, min_weight: float = 1e-3) -> np.ndarray:
    """A stitched ``(H, W)`` object as a start for refinement: pixels whose stitching
    ``weights`` are ``<= min_weight`` (no patch covered them) take the mean covered value (1 when
    nothing is covered). Returns ``(H, W)`` complex64."""
    covered = np.asarray(weights) > min_weight
    start = np.asarray(obj, np.complex64)
    fill = start[covered].mean() if covered.any() else np.complex64(1.0)
    return np.where(covered, start, fill).astype(np.complex64)
