"""Stitching canvases are checked before anything is allocated (issue 9 §2).

Positions far apart (wrong unit) would make ``reassemble_position`` allocate terabytes; positions
off the object grid would leave an empty on-grid reconstruction. Both are refused with a
ValueError subclass naming the canvas size and memory, or the count of stray positions.
"""

from __future__ import annotations

import numpy as np
import pytest

from backend_api import canvas
from backend_api.canvas import CanvasTooLargeError, PositionsOutsideObjectError
from backend_api.ptychodus.convert import stitch_on_grid
from pinn_jax import geometry, inference

N, M = 16, 8


def _patches(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, N, N)) + 1j * rng.standard_normal((n, N, N))).astype(np.complex64)


def _no_stitching(monkeypatch):
    """Make the jitted stitch kernel fail the test if reached (nothing may be allocated)."""

    def boom(*a, **k):
        raise AssertionError("the stitch kernel ran: the canvas was allocated")

    monkeypatch.setattr(geometry, "_shift_and_sum", boom)


@pytest.fixture(autouse=True)
def _no_env_bound(monkeypatch):
    monkeypatch.delenv(canvas.MAX_CANVAS_PIXELS_ENV, raising=False)


# ------------------------------------------------------------------------------ the bound


def test_bound_default_keyword_and_environment(monkeypatch):
    assert canvas.resolve_max_canvas_pixels() == canvas.DEFAULT_MAX_CANVAS_PIXELS == 2**28
    assert canvas.resolve_max_canvas_pixels(1000) == 1000
    monkeypatch.setenv(canvas.MAX_CANVAS_PIXELS_ENV, "5000")
    assert canvas.resolve_max_canvas_pixels() == 5000
    assert canvas.resolve_max_canvas_pixels(7) == 7  # the keyword wins over the environment


@pytest.mark.parametrize("value", [0, -3, 2.5, "10", True])
def test_bad_keyword_bound_is_refused(value):
    with pytest.raises(ValueError, match="max_canvas_pixels: expected a positive integer"):
        canvas.resolve_max_canvas_pixels(value)


@pytest.mark.parametrize("text", ["lots", "0", "-1", "1e9"])
def test_bad_environment_bound_is_refused_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv(canvas.MAX_CANVAS_PIXELS_ENV, text)
    with pytest.raises(ValueError, match=f"{canvas.MAX_CANVAS_PIXELS_ENV}.*{text}"):
        canvas.resolve_max_canvas_pixels()


def test_format_bytes():
    assert canvas.format_bytes(512) == "512 B"
    assert canvas.format_bytes(3 * 2**30) == "3.0 GiB"
    assert canvas.format_bytes(1.5 * 2**40) == "1.5 TiB"


# ------------------------------------------------------------------------------ huge spread


def test_canvas_shape_helper_matches_the_stitcher():
    rng = np.random.default_rng(1)
    pos = rng.uniform(-37.3, 52.9, (6, 2))
    out = np.asarray(geometry.reassemble_position(_patches(6), pos, M))
    assert geometry.stitch_canvas_shape(pos, M) == out.shape[:2]
    _, _, S = geometry.stitch_canvas_geometry(pos, M)
    assert (S, S) == out.shape[:2]


def test_huge_spread_refused_with_size_and_memory_before_allocating(monkeypatch):
    _no_stitching(monkeypatch)
    pos = np.array([[0.0, 0.0], [1e6, 0.0], [0.0, 1e6], [1e6, 1e6]])
    # centred offsets are +-5e5, so pad = 500000 and S = M + 2 * pad
    S = M + 2 * 500000
    with pytest.raises(CanvasTooLargeError) as info:
        geometry.reassemble_position(_patches(4), pos, M)
    msg = str(info.value)
    assert f"{S} x {S} pixels" in msg
    # memory of what the stitcher allocates: the canvas plus its margins, 12 bytes a pixel
    side = S + 2 * (M + 3)
    assert canvas.format_bytes(side * side * 12) in msg and "TiB" in msg
    assert f"max_canvas_pixels={2**28}" in msg and canvas.MAX_CANVAS_PIXELS_ENV in msg
    assert "1e+06 x 1e+06 pixels" in msg  # the positions' span


def test_huge_spread_refused_by_inference_stitch_and_reconstruct_before_the_network(monkeypatch):
    _no_stitching(monkeypatch)
    off = np.array([[0.0, 0.0], [3e5, 0.0]]).reshape(2, 1, 2, 1)
    with pytest.raises(CanvasTooLargeError, match=r"\d+ x \d+ pixels .*(GiB|TiB)"):
        inference.stitch(_patches(2)[..., None], off, M=M)

    class NoNetwork(inference.InferenceModel):
        """Fails the test if predict runs; reconstruct must refuse first."""

        N = 64
        intensity_scale = 1.0

        def __init__(self):
            pass

        def predict(self, *a, **k):
            raise AssertionError("the network ran before the canvas check")

    class Container:
        X = np.zeros((2, 64, 64, 1), np.float32)
        local_offsets = np.zeros((2, 1, 2, 1))
        global_offsets = off

    with pytest.raises(CanvasTooLargeError, match="stitching canvas would be"):
        inference.reconstruct(NoNetwork(), Container(), M=20)
    # coord_scale applies before the check: scaled down, the same positions are admitted up to predict
    with pytest.raises(AssertionError, match="network ran"):
        inference.reconstruct(NoNetwork(), Container(), M=20, coord_scale=1e-3)


def test_override_admits_and_environment_refuses_a_small_canvas(monkeypatch):
    pos = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    S = geometry.stitch_canvas_shape(pos, M)[0]
    assert S == M + 2 * 68  # max |centred| = 66.67 -> ceil 67 -> even 68
    with pytest.raises(CanvasTooLargeError, match=f"{S} x {S} pixels.*max_canvas_pixels=1000"):
        geometry.reassemble_position(_patches(3), pos, M, max_canvas_pixels=1000)
    admitted = np.asarray(geometry.reassemble_position(_patches(3), pos, M, max_canvas_pixels=S * S))
    default = np.asarray(geometry.reassemble_position(_patches(3), pos, M))
    np.testing.assert_array_equal(admitted, default)  # the bound changes nothing else
    monkeypatch.setenv(canvas.MAX_CANVAS_PIXELS_ENV, str(S * S - 1))
    with pytest.raises(CanvasTooLargeError, match=f"max_canvas_pixels={S * S - 1}"):
        geometry.reassemble_position(_patches(3), pos, M)


def test_object_grid_above_the_bound_is_refused(monkeypatch):
    _no_stitching(monkeypatch)
    pos = np.array([[20.0, 20.0]])
    with pytest.raises(CanvasTooLargeError, match="object grid would be 100 x 200 pixels"):
        geometry.reassemble_on_grid_with_weights(_patches(1), pos, (100, 200), M, max_canvas_pixels=10000)
    with pytest.raises(CanvasTooLargeError, match="object grid would be 100 x 200 pixels.*complex128"):
        stitch_on_grid(_patches(1), pos, (100, 200), M, max_canvas_pixels=10000)


# ------------------------------------------------------------------------------ off the object


def test_positions_outside_the_object_refused_naming_the_count(monkeypatch):
    _no_stitching(monkeypatch)
    pos = np.array([[20.0, 20.0], [30.0, 25.0], [5000.0, 20.0], [20.0, -400.0]])
    off = pos.reshape(4, 1, 2, 1)
    with pytest.raises(PositionsOutsideObjectError) as info:
        inference.stitch(_patches(4)[..., None], off, M=M, object_shape=(48, 64))
    msg = str(info.value)
    assert "2 of 4 positions" in msg and "48 x 64 object grid" in msg and "x=5000" in msg
    with pytest.raises(PositionsOutsideObjectError, match="2 of 4 positions"):
        stitch_on_grid(_patches(4), pos, (48, 64), M)


def test_a_minority_of_stray_positions_only_warns_and_is_left_out(monkeypatch):
    """1 of 4 positions off the grid: a warning naming it, and the other three are stitched as
    if it were absent (its patch contributes nothing)."""
    pos = np.array([[20.0, 20.0], [30.0, 25.0], [25.0, 30.0], [5000.0, 20.0]])
    p = _patches(4)
    with pytest.warns(UserWarning, match=r"1 of 4 positions lie outside the 48 x 64 object grid"):
        obj, w = stitch_on_grid(p, pos, (48, 64), M)
    obj3, w3 = stitch_on_grid(p[:3], pos[:3], (48, 64), M)
    np.testing.assert_array_equal(obj, obj3)
    np.testing.assert_array_equal(w, w3)


def test_non_finite_positions_count_as_outside():
    pos = np.array([[20.0, 20.0], [np.nan, 20.0]])
    with pytest.raises(PositionsOutsideObjectError, match=r"1 of 2 positions \(1 not finite\)"):
        stitch_on_grid(_patches(2), pos, (48, 64), M)


def test_the_overlap_limit_is_exact():
    """A patch centred at x spans [x - N/2, x + N/2); one more pixel is allowed for the bilinear
    tap, so centres strictly inside (-N/2 - 1, W + N/2) are admitted, the limits themselves not."""
    H, W = 48, 64
    lo, hi = -N / 2 - 1, W + N / 2
    inside = np.array([[lo + 1e-6, 10.0], [hi - 1e-6, 10.0], [10.0, lo + 1e-6], [10.0, H + N / 2 - 1e-6]])
    assert not canvas.positions_outside_grid(inside, (H, W), N).any()
    outside = np.array([[lo, 10.0], [hi, 10.0], [10.0, lo], [10.0, H + N / 2]])
    assert canvas.positions_outside_grid(outside, (H, W), N).all()


def test_partly_overlapping_patches_are_still_stitched():
    """Only patches that cannot touch the grid are refused: one hanging over the edge is kept."""
    # the second patch spans columns -10..5 and its crop -6..1: columns 0 and 1 come from it alone
    pos = np.array([[30.0, 20.0], [-2.0, 20.0]])
    obj, w = stitch_on_grid(_patches(2), pos, (48, 64), M)
    assert w[20, 0] == pytest.approx(1.0) and w[20, 1] == pytest.approx(1.0) and w[20, 2] == 0
    obj_j, w_j = geometry.reassemble_on_grid_with_weights(_patches(2), pos, (48, 64), M)
    np.testing.assert_allclose(np.asarray(w_j), w, atol=1e-6)


def test_normal_data_unaffected():
    """Simulated-like positions well inside the object: results equal an explicit huge bound."""
    rng = np.random.default_rng(4)
    pos = rng.uniform(10, 40, (7, 2))
    p = _patches(7, seed=4)
    base = np.asarray(geometry.reassemble_position(p, pos, M))
    big = np.asarray(geometry.reassemble_position(p, pos, M, max_canvas_pixels=2**40))
    np.testing.assert_array_equal(base, big)
    a, b, res = inference.stitch(p[..., None], pos.reshape(7, 1, 2, 1), M=M, object_shape=(50, 52))
    obj, w = geometry.reassemble_on_grid_with_weights(p, pos, (50, 52), M)
    np.testing.assert_array_equal(res["object_on_grid"], np.asarray(obj))
    np.testing.assert_array_equal(res["object_weights"], np.asarray(w))
    obj2, w2 = stitch_on_grid(p, pos, (50, 52), M)
    assert obj2.shape == (50, 52) and (w2 > 0).sum() > 0


def test_fill_uncovered_gives_uncovered_pixels_the_mean_covered_value():
    from backend_api.canvas import fill_uncovered

    obj = np.array([[1 + 1j, 3 + 0j], [0j, 0j]], np.complex64)
    w = np.array([[1.0, 2.0], [0.0, 1e-4]])
    out = fill_uncovered(obj, w)
    assert out.dtype == np.complex64
    np.testing.assert_array_equal(out, [[1 + 1j, 3 + 0j], [2 + 0.5j, 2 + 0.5j]])
    np.testing.assert_array_equal(fill_uncovered(obj, np.zeros((2, 2))), np.ones((2, 2), np.complex64))
