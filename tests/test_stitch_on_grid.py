"""On-grid stitching compared VALUE BY VALUE with an independent numpy computation.

``reassemble_on_grid(_with_weights)`` (pinn_jax.geometry) is the path behind every
``metrics.json``, ``inference.stitch(object_shape=...)`` and the ptychodus products; the numpy
``backend_api.ptychodus.convert.stitch_on_grid`` is the child's fallback with the same contract.
Convention (function docstrings; reference model_physics.md §5.1/§5.3): patch pixel
``(N/2, N/2)`` lands on object point ``(x, y)`` = (column, row); the central ``M x M`` crop is
placed bilinearly (crop pixel ``(i, j)`` sits at row ``y - M/2 + i``, column ``x - M/2 + j``);
``obj = sum / (1e-9 + coverage)``, 0 where nothing covers; pixels off the object are dropped,
never wrapped.

The inputs are chosen so that the usual mistakes change values: every patch carries a distinct
value plus a row ramp (real part) and a column ramp (imaginary part), so a patch placed
elsewhere, transposed or swapped with another is visible; the object grid is not square; no
position has x == y; some patches hang over an edge and some lie entirely outside (on the left
and top, where negative indices would wrap onto the far side, and on the right and bottom).
"""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from pinn_jax import geometry, inference, metrics

N, M = 16, 8
SHAPE = (30, 44)  # (H, W): not square

# [x, y], never x == y. Comments: the crop spans columns x-4..x+3, rows y-4..y+3.
INTEGER_POSITIONS = np.array([
    [10, 6], [12, 8],      # overlapping pair inside
    [25, 12], [31, 17],    # inside, asymmetric in x/y
    [2, 15],               # hangs over the left edge (columns -2..5)
    [30, -2],              # hangs over the top edge (rows -6..1)
    [42, 28],              # hangs over the bottom-right corner
    [-20, 10],             # entirely left of the object (negative indices would wrap)
    [-30, 3],              # further left: a wrapped window would land fully on the object
    [20, -15],             # entirely above
    [-9, -13],             # entirely above-left
    [60, 5], [7, 40],      # entirely right / below
], dtype=np.float64)

SUBPIXEL_POSITIONS = np.array([
    [10.3, 6.6], [12.75, 8.2], [25.5, 12.25], [31.1, 17.9],
    [2.4, 15.6], [30.6, -1.3], [41.8, 27.4],
    [-20.5, 10.5], [-29.7, 3.3], [20.2, -14.6], [60.5, 5.5],
], dtype=np.float64)


def _patches(n: int) -> np.ndarray:
    """(n, N, N, 1) complex64; patch k = 10 (k+1) + 0.5 row + 1j (0.25 col - k): distinct per
    patch, and the real/imag ramps tell rows from columns."""
    r = np.arange(N)[:, None]
    c = np.arange(N)[None, :]
    k = np.arange(n)[:, None, None]
    p = 10.0 * (k + 1) + 0.5 * r + 1j * (0.25 * c - k)
    return p[..., None].astype(np.complex64)


def _independent_integer(patches, pos, shape, m):
    """Plain loop: crop pixel (i, j) of patch k adds to object (y - m/2 + i, x - m/2 + j) when
    that lies on the grid. Returns (mean (H, W) complex128, count (H, W) float64)."""
    H, W = shape
    n_pix = patches.shape[1]
    lo = n_pix // 2 - m // 2
    num = np.zeros(shape, np.complex128)
    cnt = np.zeros(shape, np.float64)
    for k, (x, y) in enumerate(pos):
        x, y = int(x), int(y)
        for i in range(m):
            for j in range(m):
                r, c = y - m // 2 + i, x - m // 2 + j
                if 0 <= r < H and 0 <= c < W:
                    num[r, c] += patches[k, lo + i, lo + j, 0]
                    cnt[r, c] += 1.0
    return np.where(cnt > 0, num / np.maximum(cnt, 1e-300), 0), cnt


def _tent(d):
    return np.maximum(0.0, 1.0 - np.abs(d))


def _independent_bilinear(patches, pos, shape, m):
    """Float64 splatting: crop pixel (i, j) of patch k spreads onto object row r / column c with
    tent weights tent(r - (y - m/2 + i)) * tent(c - (x - m/2 + j)) -- the adjoint form of a
    bilinear translation with zero fill, computed without any index clipping. Returns
    (num (H, W) complex128, coverage (H, W) float64)."""
    H, W = shape
    n_pix = patches.shape[1]
    lo = n_pix // 2 - m // 2
    rows, cols, taps = np.arange(H)[:, None], np.arange(W)[:, None], np.arange(m)[None, :]
    num = np.zeros(shape, np.complex128)
    cov = np.zeros(shape, np.float64)
    for k, (x, y) in enumerate(pos):
        wy = _tent(rows - (y - m / 2 + taps))            # (H, m)
        wx = _tent(cols - (x - m / 2 + taps))            # (W, m)
        crop = patches[k, lo : lo + m, lo : lo + m, 0].astype(np.complex128)
        num += wy @ crop @ wx.T
        cov += wy @ np.ones((m, m)) @ wx.T
    return num, cov


def _jax_eager(p, pos, shape, m):
    obj, w = geometry.reassemble_on_grid_with_weights(p, pos, shape, m, chunk=3)
    return np.asarray(obj), np.asarray(w)


def _jax_jit(p, pos, shape, m):
    fn = jax.jit(lambda pp, qq: geometry.reassemble_on_grid_with_weights(pp, qq, shape, m, chunk=4))
    obj, w = fn(p, np.asarray(pos, np.float32))
    return np.asarray(obj), np.asarray(w)


def _numpy_fallback(p, pos, shape, m):
    """The numpy kernel behind ``convert.stitch_on_grid`` (the public function adds the
    position guard, which warns about or refuses these deliberately stray patches: tested in
    test_numpy_fallback_guards_the_stray_positions and tests/test_canvas_guard.py)."""
    from backend_api.ptychodus.convert import splat_on_grid

    return splat_on_grid(p[..., 0], pos, shape, m)


STITCHERS = {"jax": _jax_eager, "jax-jit": _jax_jit, "numpy-fallback": _numpy_fallback}


@pytest.mark.parametrize("name", list(STITCHERS))
def test_integer_positions_match_independent_loop(name):
    """Integer positions: bilinear weights are exactly 0/1, so object and coverage must equal the
    plain loop up to float32 rounding of a mean of <= 2 values of size <= 140
    (rtol 1e-6, atol 1e-4). A one-pixel, x/y or wrap error changes values by >= 0.25."""
    pos = INTEGER_POSITIONS
    patches = _patches(len(pos))
    want, cnt = _independent_integer(patches, pos, SHAPE, M)
    obj, w = STITCHERS[name](patches, pos, SHAPE, M)
    assert obj.shape == SHAPE and w.shape == SHAPE
    np.testing.assert_allclose(w, cnt, rtol=0, atol=1e-6)
    np.testing.assert_allclose(obj, want, rtol=1e-6, atol=1e-4)
    assert np.all(obj[cnt == 0] == 0)
    # the inputs do exercise what they claim: overlaps, edge clipping, and a non-trivial layout
    assert cnt.max() == 2 and 0 < (cnt > 0).mean() < 1


@pytest.mark.parametrize("name", list(STITCHERS))
def test_off_grid_patches_do_not_wrap(name):
    """Only the patches entirely outside the object: nothing may land anywhere (a wrapped
    negative index would put them on the far columns/rows)."""
    outside = np.array([[-20, 10], [-30, 3], [20, -15], [-9, -13], [60, 5], [7, 40],
                        [-30.5, 12.25], [15.5, -30.75]])
    obj, w = STITCHERS[name](_patches(len(outside)), outside, SHAPE, M)
    assert np.all(w == 0) and np.all(obj == 0)


def test_numpy_fallback_guards_the_stray_positions():
    """The public numpy stitcher gives the kernel's result when a minority of the patches miss
    the grid (warning how many), and refuses a scan that misses it entirely."""
    from backend_api.canvas import PositionsOutsideObjectError
    from backend_api.ptychodus.convert import stitch_on_grid

    pos = INTEGER_POSITIONS
    patches = _patches(len(pos))
    with pytest.warns(UserWarning, match=r"6 of 13 positions lie outside the 30 x 44 object grid"):
        obj, w = stitch_on_grid(patches, pos, SHAPE, M)
    want, cnt = _independent_integer(patches, pos, SHAPE, M)
    np.testing.assert_allclose(w, cnt, rtol=0, atol=1e-6)
    np.testing.assert_allclose(obj, want, rtol=1e-6, atol=1e-4)
    with pytest.raises(PositionsOutsideObjectError, match=r"6 of 6 positions"):
        stitch_on_grid(patches[7:], pos[7:], SHAPE, M)


@pytest.mark.parametrize("name", list(STITCHERS))
def test_subpixel_positions_match_independent_splatting(name):
    """Sub-pixel positions against the float64 tent-weight splatting. The stitchers use float32
    positions/weights: each weight is off by <= ~|x| eps32 ~ 4e-6, a pixel sums <= 2 patches x 4
    taps of values <= 140, so the sum (num) agrees to atol 5e-3 and the coverage to 1e-5; the
    mean is compared where coverage > 0.1 (division amplifies by <= 10): atol 5e-2, still far
    below the >= 0.25 that a misplaced or transposed crop produces."""
    pos = SUBPIXEL_POSITIONS
    patches = _patches(len(pos))
    num, cov = _independent_bilinear(patches, pos, SHAPE, M)
    obj, w = STITCHERS[name](patches, pos, SHAPE, M)
    np.testing.assert_allclose(w, cov, rtol=0, atol=1e-5)
    np.testing.assert_allclose(obj * (w + geometry.STITCH_EPS), num, rtol=0, atol=5e-3)
    sel = cov > 0.1
    assert sel.sum() > 300
    np.testing.assert_allclose(obj[sel], num[sel] / cov[sel], rtol=0, atol=5e-2)
    assert np.all(obj[w == 0] == 0)


def test_subpixel_translation_consistency():
    """Moving every position by a whole pixel (dx, dy) = (3, -2) moves the stitched result by
    exactly that many columns/rows (same fractional parts, so identical float32 weights up to
    rounding of the position itself: atol 1e-3 on values <= 140)."""
    pos = SUBPIXEL_POSITIONS[:4]
    patches = _patches(len(pos))
    a, wa = _jax_eager(patches, pos, SHAPE, M)
    b, wb = _jax_eager(patches, pos + [3.0, -2.0], SHAPE, M)
    np.testing.assert_allclose(b[:-2, 3:], a[2:, :-3], atol=1e-3)
    np.testing.assert_allclose(wb[:-2, 3:], wa[2:, :-3], atol=1e-5)


def test_inference_stitch_object_on_grid_uses_x_as_column():
    """inference.stitch(object_shape=...) takes the positions from the (n, 1, 2, 1) global
    offsets ([x, y] on axis 2) and must give the independent result."""
    pos = INTEGER_POSITIONS[:7]
    patches = _patches(len(pos))
    _, _, res = inference.stitch(patches, pos.reshape(-1, 1, 2, 1), M=M, object_shape=SHAPE)
    want, cnt = _independent_integer(patches, pos, SHAPE, M)
    np.testing.assert_allclose(res["object_weights"], cnt, atol=1e-6)
    np.testing.assert_allclose(res["object_on_grid"], want, rtol=1e-6, atol=1e-4)


def test_evaluate_patches_recon_on_grid_matches_independent():
    """metrics.evaluate_patches stitches [x, y] positions onto the ground truth's (H, W) grid;
    its recon_on_grid and region must follow the independent placement."""
    pos = INTEGER_POSITIONS[:4]
    patches = _patches(len(pos))
    rng = np.random.default_rng(0)
    gt = (rng.random(SHAPE) + 0.5) * np.exp(1j * rng.random(SHAPE))
    out = metrics.evaluate_patches(patches, pos, gt, M=M, reference=False)
    want, cnt = _independent_integer(patches, pos, SHAPE, M)
    np.testing.assert_allclose(out["recon_on_grid"], want, rtol=1e-6, atol=1e-4)
    assert not np.any(out["region"] & (cnt == 0))


@pytest.mark.parametrize("backend_name", ["jax", "other"], ids=["jax-helper", "numpy-fallback"])
def test_ptychodus_child_stitch_matches_independent(backend_name):
    """The ptychodus child's _stitch (the jax backend's own on-grid stitcher, reached through
    the Backend protocol, or the numpy fallback for backends without one) receives (n, N, N)
    patches and [x, y] positions."""
    from backend_api.ptychodus.child import _stitch
    from pinn_jax.backend import JaxBackend

    backend = JaxBackend() if backend_name == "jax" else types.SimpleNamespace(name="other")
    pos = INTEGER_POSITIONS
    patches = _patches(len(pos))
    if backend.name == "jax":
        obj, w = _stitch(backend, patches[..., 0], pos, SHAPE, M)
    else:  # the numpy fallback warns about the 6 deliberately stray patches
        with pytest.warns(UserWarning, match=r"6 of 13 positions"):
            obj, w = _stitch(backend, patches[..., 0], pos, SHAPE, M)
    want, cnt = _independent_integer(patches, pos, SHAPE, M)
    np.testing.assert_allclose(w, cnt, atol=1e-6)
    np.testing.assert_allclose(obj, want, rtol=1e-6, atol=1e-4)
