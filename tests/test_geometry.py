"""Tests for pinn_jax.geometry: translation, pad/crop, in-group merge/extract, global stitching."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pinn_jax import geometry as g

TF = "tf_reference"


def _rand(rng, *shape, complex_=True):
    x = rng.standard_normal(shape)
    if complex_:
        x = x + 1j * rng.standard_normal(shape)
        return x.astype(np.complex64)
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------- translation
def _delta(H=10, W=10, r=4, c=4):
    return jnp.zeros((H, W), jnp.float32).at[r, c].set(1.0)


@pytest.mark.parametrize("shift, where", [((2, 0), (4, 6)), ((0, -1), (3, 4)), ((0, 2), (6, 4)),
                                          ((-3, 1), (5, 1))])
def test_translate_sign(shift, where):
    out = np.asarray(g.translate(_delta(), jnp.array(shift, jnp.float32)))
    assert [tuple(i) for i in np.argwhere(out != 0)] == [where]
    assert out[where] == 1.0


def test_translate_half_pixel_and_border():
    out = np.asarray(g.translate(_delta(), jnp.array([0.5, 0.0])))
    np.testing.assert_array_equal(out[4, 3:7], [0.0, 0.5, 0.5, 0.0])
    out = np.asarray(g.translate(_delta(), jnp.array([0.25, 0.5])))
    np.testing.assert_allclose(out[4:6, 4:6], [[0.375, 0.125], [0.375, 0.125]], rtol=1e-6)
    assert out.sum() == pytest.approx(1.0)
    # content leaving the image is dropped; per-corner zero fill (no clamping at the border)
    img = jnp.ones((6, 6), jnp.float32)
    out = np.asarray(g.translate(img, jnp.array([0.5, 0.0])))
    np.testing.assert_allclose(out[:, 0], 0.5)
    np.testing.assert_allclose(out[:, 1:], 1.0)
    out = np.asarray(g.translate(img, jnp.array([10.0, 0.0])))
    np.testing.assert_array_equal(out, 0.0)


def test_translate_complex_is_real_and_imag_separately():
    rng = np.random.default_rng(0)
    z = _rand(rng, 12, 12)
    t = jnp.array([1.3, -0.7])
    out = np.asarray(g.translate(z, t))
    assert out.dtype == np.complex64
    np.testing.assert_allclose(out.real, np.asarray(g.translate(z.real, t)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.imag, np.asarray(g.translate(z.imag, t)), rtol=1e-6, atol=1e-7)


def test_translate_matches_map_coordinates():
    rng = np.random.default_rng(1)
    img = _rand(rng, 16, 20, complex_=False)
    t = np.array([2.3, -1.6], np.float32)
    yy, xx = np.meshgrid(np.arange(16), np.arange(20), indexing="ij")
    ref = jax.scipy.ndimage.map_coordinates(img, [yy - t[1], xx - t[0]], order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(np.asarray(g.translate(img, t)), np.asarray(ref), rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(a=st.integers(-5, 5), b=st.integers(-5, 5), seed=st.integers(0, 2**31 - 1))
def test_translate_integer_roundtrip(a, b, seed):
    rng = np.random.default_rng(seed)
    img = _rand(rng, 16, 18)
    back = np.asarray(g.translate(g.translate(img, jnp.array([a, b], jnp.float32)),
                                  jnp.array([-a, -b], jnp.float32)))
    H, W = img.shape
    inner = (slice(abs(b), H - abs(b)), slice(abs(a), W - abs(a)))
    np.testing.assert_array_equal(back[inner], img[inner])


def test_translate_parity_center_channels_gs2(fixtures_dir):
    """TF center_channels (translate by -coords_relative) on 16 gs2 groups with sub-pixel offsets."""
    d = np.load(fixtures_dir / TF / "center_channels_gs2_first16.npz")
    shifts = -d["input_positions"][:, 0, :, 0]                     # channel 0, [x, y]
    out = np.asarray(jax.vmap(g.translate)(d["Y_amp_channel0"], shifts))
    ref = d["target_realspace"][..., 0]
    rng_ = float(ref.max() - ref.min())
    assert np.abs(out - ref).max() <= 1e-5 * rng_


# ---------------------------------------------------------------------------------- pad / crop
@pytest.mark.parametrize("N", [64, 128, 256])
@pytest.mark.parametrize("gs", [1, 2])
def test_padded_size_and_center_mask(N, gs):
    P = g.padded_size(N, gs)
    assert P == N + (10 if gs == 1 else 14)
    m = np.asarray(g.center_mask(N))
    assert m.shape == (N, N) and m.sum() == (N // 2) ** 2
    assert m[N // 4, N // 4] == 1 and m[N // 4 - 1, N // 4] == 0 and m[3 * N // 4 - 1, 3 * N // 4 - 1] == 1
    assert m[3 * N // 4, N // 2] == 0
    mp = np.asarray(g.center_mask(N, P))
    assert mp.shape == (P, P) and mp.sum() == m.sum()
    np.testing.assert_array_equal(np.asarray(g.center_crop(mp, N)), m)


def test_pad_crop_roundtrip_and_errors():
    rng = np.random.default_rng(2)
    x = _rand(rng, 8, 8, 3)
    p = np.asarray(g.pad_to(x, 12))
    assert p.shape == (12, 12, 3)
    np.testing.assert_array_equal(p[2:10, 2:10], x)
    assert np.all(p[:2] == 0) and np.all(p[:, 10:] == 0)
    np.testing.assert_array_equal(np.asarray(g.center_crop(p, 8)), x)
    np.testing.assert_array_equal(np.asarray(g.center_crop(x, 8)), x)
    with pytest.raises(ValueError, match="even"):
        g.pad_to(x, 11)
    with pytest.raises(ValueError, match="even"):
        g.center_crop(x, 5)
    with pytest.raises(ValueError, match="even"):
        g.padded_size(64, 2, offset=3)
    with pytest.raises(ValueError, match="N"):
        g.center_mask(30)


# ---------------------------------------------------------------------------------- merge / extract
def _offsets(rng, C, spread=3.0):
    o = rng.uniform(-spread, spread, (2, C)).astype(np.float32)
    return o - o.mean(axis=1, keepdims=True)


def test_merge_group_formula_gs1():
    """gs1, zero offset: canvas = pad(patch) / (pad(centre_mask) + 0.001)."""
    rng = np.random.default_rng(3)
    N, P = 16, 26
    p = _rand(rng, N, N, 1)
    out = np.asarray(g.merge_group(p, np.zeros((2, 1), np.float32), P))
    expected = np.asarray(g.pad_to(p[..., 0], P)) / (np.asarray(g.center_mask(N, P)) + 0.001)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    k = (P - N) // 2
    np.testing.assert_allclose(out[k + N // 2, k + N // 2], p[N // 2, N // 2, 0] / 1.001, rtol=1e-6)


def test_merge_group_matches_independent_formula_gs2():
    rng = np.random.default_rng(4)
    N, C = 16, 4
    P = g.padded_size(N, 2)
    patches = _rand(rng, N, N, C)
    off = _offsets(rng, C)
    out = np.asarray(g.merge_group(patches, off, P))
    num = sum(np.asarray(g.translate(np.asarray(g.pad_to(patches[..., c], P)), -off[:, c])) for c in range(C))
    den = sum(np.asarray(g.translate(np.asarray(g.center_mask(N, P)), -off[:, c])) for c in range(C)) + 0.001
    np.testing.assert_allclose(out, num / den, rtol=2e-5, atol=1e-5 * np.abs(num / den).max())


def test_merge_sign_places_patch_at_true_relative_position():
    """coords_relative = -(pos - mean): a patch whose position is +3 px right of the group mean
    (offset x = -3) lands 3 px right of the canvas centre."""
    N, P = 16, 30
    patch = np.zeros((N, N, 2), np.complex64)
    patch[N // 2, N // 2, 0] = 1.0
    off = np.array([[-3.0, 3.0], [0.0, 0.0]], np.float32)
    out = np.asarray(g.merge_group(patch, off, P))
    c = P // 2
    r, col = np.unravel_index(np.argmax(np.abs(out)), out.shape)
    assert (r, col) == (c, c + 3)
    # extraction with the same offsets brings the delta back to the patch centre of channel 0
    ex = np.asarray(g.extract_group(out, off, N))
    assert np.unravel_index(np.argmax(np.abs(ex[..., 0])), (N, N)) == (N // 2, N // 2)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), gs=st.sampled_from([1, 2]))
def test_merge_then_extract_consistent_object(seed, gs):
    """Patches cut from one object (integer offsets) come back after merge + extract on their
    central N/2 square, up to the reference's coverage / (coverage + 0.001) factor."""
    rng = np.random.default_rng(seed)
    N, C = 16, gs * gs
    P = g.padded_size(N, gs)
    lim = (P - N) // 2
    obj = _rand(rng, P, P)
    off = rng.integers(-lim, lim + 1, (2, C)).astype(np.float32)
    cm = np.asarray(g.center_mask(N))[..., None]
    # the merge numerator is not masked, so a consistent object means patches that are the object
    # on their central square and zero outside (what the model's centre head produces)
    patches = np.asarray(g.extract_group(obj, off, N)) * cm
    merged = g.merge_group(patches, off, P, recenter=False)
    back = np.asarray(g.extract_group(merged, off, N))
    sl = slice(N // 4, 3 * N // 4)
    # coverage / (coverage + 0.001) with coverage >= 1 on every central square
    np.testing.assert_allclose(back[sl, sl], patches[sl, sl], rtol=1.5e-3, atol=1e-5)


def test_merge_recenter_is_noop_for_centred_offsets():
    rng = np.random.default_rng(5)
    patches = _rand(rng, 16, 16, 4)
    off = _offsets(rng, 4)
    a = np.asarray(g.merge_group(patches, off, 30))
    b = np.asarray(g.merge_group(patches, off, 30, recenter=False))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    c = np.asarray(g.merge_group(patches, off + 2.0, 30))     # recentring removes a common shift
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_per_sample_merge_at_batch16_gs2():
    """B*C = 64 (the size where the reference collapses the batch): each sample merges alone."""
    rng = np.random.default_rng(6)
    B, N, C = 16, 16, 4
    P = g.padded_size(N, 2)
    patches = _rand(rng, B, N, N, C)
    offs = np.stack([_offsets(rng, C) for _ in range(B)])[:, None]     # (B, 1, 2, C)
    batched = np.asarray(jax.jit(lambda p, o: g.merge_groups(p, o, P))(patches, offs))
    assert batched.shape == (B, P, P, 1)
    for b in range(B):
        alone = np.asarray(g.merge_group(patches[b], offs[b, 0], P))
        np.testing.assert_allclose(batched[b, ..., 0], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    ex = np.asarray(g.extract_groups(batched, offs, N))
    assert ex.shape == (B, N, N, C)
    np.testing.assert_allclose(ex[3], np.asarray(g.extract_group(batched[3, ..., 0], offs[3, 0], N)),
                               rtol=1e-5, atol=1e-6)


def test_offset_helpers():
    o = np.arange(2 * 2 * 4, dtype=np.float32).reshape(2, 1, 2, 4)
    np.testing.assert_array_equal(np.asarray(g.group_offsets(o)), o[:, 0])
    np.testing.assert_array_equal(np.asarray(g.group_offsets(o[0])), o[0, 0])
    flat = np.asarray(g.flatten_offsets(o))
    assert flat.shape == (8, 2)
    np.testing.assert_array_equal(flat[1 * 4 + 2], [o[1, 0, 0, 2], o[1, 0, 1, 2]])   # b*C + c, [x, y]
    with pytest.raises(ValueError, match=r"\(B, 1, 2, C\)"):
        g.group_offsets(np.zeros((2, 2, 4)))


def test_merge_bad_shapes():
    with pytest.raises(ValueError, match="offsets"):
        g.merge_group(np.zeros((16, 16, 4), np.complex64), np.zeros((2, 3), np.float32), 30)
    with pytest.raises(ValueError, match="patches"):
        g.merge_group(np.zeros((16, 15, 4), np.complex64), np.zeros((2, 4), np.float32), 30)


@pytest.mark.parametrize("N", [64, 128, 256])
@pytest.mark.parametrize("gs", [1, 2])
def test_merge_extract_shapes(N, gs):
    C = gs * gs
    P = g.padded_size(N, gs)
    patches = jnp.ones((N, N, C), jnp.complex64)
    off = jnp.zeros((2, C), jnp.float32)
    canvas = g.merge_group(patches, off, P)
    assert canvas.shape == (P, P) and canvas.dtype == jnp.complex64
    ex = g.extract_group(canvas, off, N)
    assert ex.shape == (N, N, C) and ex.dtype == jnp.complex64


# ---------------------------------------------------------------------------------- stitching
@pytest.mark.parametrize("gs", [1, 2])
def test_reassemble_position_parity(fixtures_dir, gs):
    d = np.load(fixtures_dir / TF / f"reassemble_gs{gs}.npz")
    out = np.asarray(g.reassemble_position(d["patches"], d["global_offsets"].astype(np.float64), int(d["M"])))
    ref = d["canvas"]
    assert out.shape == ref.shape and out.dtype == np.complex64
    scale = float(np.abs(ref).max())
    assert np.abs(out - ref).max() <= 1e-5 * scale


def test_reassemble_position_chunk_invariance_and_layout(fixtures_dir):
    d = np.load(fixtures_dir / TF / "reassemble_gs2.npz")
    a = np.asarray(g.reassemble_position(d["patches"], d["global_offsets"], 20))
    b = np.asarray(g.reassemble_position(d["patches"], d["global_offsets"][:, 0, :, 0], 20, chunk=5))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
    centred, pad, S = g.stitch_canvas_geometry(d["global_offsets"], 20)
    assert S == a.shape[0] and pad % 2 == 0 and pad >= np.abs(centred).max()


def _gt_patches(obj, pos, N):
    """GT convention (get_image_patches): patch spans [x - N/2, x + N/2) around position x."""
    padded = np.pad(obj, N // 2)
    out = []
    for x, y in pos:
        t = np.asarray(g.translate(padded, -np.array([x, y], np.float32)))
        out.append(t[:N, :N])
    return np.stack(out)[..., None]


def test_reassemble_on_grid_recovers_object():
    rng = np.random.default_rng(7)
    H, W, N, M = 40, 48, 16, 8
    obj = _rand(rng, H, W)
    ys, xs = np.meshgrid(np.arange(8, 33, 5), np.arange(8, 41, 5), indexing="ij")
    pos = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)      # [x, y]
    patches = _gt_patches(obj, pos, N)
    np.testing.assert_allclose(patches[0, N // 2, N // 2, 0], obj[8, 8])   # centre pixel at (x, y)
    out, w = g.reassemble_on_grid_with_weights(patches, pos, (H, W), M, chunk=7)
    out, w = np.asarray(out), np.asarray(w)
    assert out.shape == (H, W) and w.shape == (H, W)
    covered = w > 0.5
    # crop M=8 around x covers [x-4, x+4): x in 8..38, y in 8..28
    assert covered[4:32, 4:42].all() and not covered[32:].any() and not covered[:, 42:].any()
    assert not covered[:4].any() and not covered[:, :4].any()
    np.testing.assert_allclose(out[covered], obj[covered], rtol=1e-5, atol=1e-5)
    assert np.all(out[~covered] == 0)
    np.testing.assert_allclose(np.asarray(g.reassemble_on_grid(patches, pos, (H, W), M)), out, rtol=1e-5, atol=1e-6)


def test_reassemble_on_grid_subpixel_and_edges():
    """Sub-pixel positions: a constant object is reproduced wherever coverage is complete;
    patches hanging over the object edge or entirely outside are clipped, not wrapped."""
    N, M = 16, 8
    pos = np.array([[10.3, 10.6], [14.75, 11.2], [0.5, 1.0], [-30.0, 5.0], [70.0, 70.0]])
    patches = np.full((len(pos), N, N, 1), 2 - 1j, np.complex64)
    out, w = g.reassemble_on_grid_with_weights(patches, pos, (24, 24), M)
    out, w = np.asarray(out), np.asarray(w)
    full = w > 0.999
    assert full.sum() > 40
    np.testing.assert_allclose(out[full], 2 - 1j, rtol=1e-5)
    assert np.all(np.isfinite(out))


def test_reassemble_on_grid_agrees_with_reassemble_position():
    rng = np.random.default_rng(8)
    N, M, n = 16, 10, 12
    pos = np.stack([rng.uniform(20, 40, n), rng.uniform(15, 35, n)], 1)
    pos -= pos.mean(0) - np.round(pos.mean(0))        # integer mean: canvases are pixel-aligned
    patches = _rand(rng, n, N, N, 1)
    canvas = np.asarray(g.reassemble_position(patches, pos[:, None, :, None], M))[..., 0]
    _, pad, S = g.stitch_canvas_geometry(pos, M)
    mx, my = np.round(pos.mean(0)).astype(int)
    grid = np.asarray(g.reassemble_on_grid(patches, pos, (64, 64), M))
    r0, c0 = my - (M // 2 + pad), mx - (M // 2 + pad)   # object pixel of canvas (0, 0)
    np.testing.assert_allclose(grid[r0 : r0 + S, c0 : c0 + S], canvas, rtol=1e-4, atol=1e-5)


def test_reassemble_many_patches_memory_sane():
    rng = np.random.default_rng(9)
    n, N, M = 3000, 16, 8
    patches = np.ones((n, N, N, 1), np.complex64)
    pos = rng.uniform(10, 200, (n, 2))
    out, w = g.reassemble_on_grid_with_weights(patches, pos, (210, 210), M, chunk=512)
    full = np.asarray(w) > 0.999
    np.testing.assert_allclose(np.asarray(out)[full], 1.0, rtol=1e-5)


def test_reassemble_bad_inputs():
    with pytest.raises(ValueError, match="global_offsets"):
        g.reassemble_position(np.zeros((3, 16, 16, 1), np.complex64), np.zeros((4, 2)), 8)
    with pytest.raises(ValueError, match="M"):
        g.reassemble_position(np.zeros((3, 16, 16, 1), np.complex64), np.zeros((3, 2)), 7)
    with pytest.raises(ValueError, match="object_shape"):
        g.reassemble_on_grid(np.zeros((3, 16, 16, 1), np.complex64), np.zeros((3, 2)), (0, 5), 8)


# ---------------------------------------------------------------------------------- jit parity
def _jit_cases():
    rng = np.random.default_rng(10)
    N, C = 16, 4
    P = g.padded_size(N, 2)
    patches = _rand(rng, N, N, C)
    off = _offsets(rng, C)
    canvas = _rand(rng, P, P)
    return {
        "translate": (g.translate, (_rand(rng, 12, 14), np.array([1.3, -2.6], np.float32))),
        "pad_to": (lambda x: g.pad_to(x, P), (patches,)),
        "center_crop": (lambda x: g.center_crop(x, N), (canvas,)),
        "center_mask": (lambda: g.center_mask(N, P), ()),
        "merge_group": (lambda p, o: g.merge_group(p, o, P), (patches, off)),
        "extract_group": (lambda c, o: g.extract_group(c, o, N), (canvas, off)),
        "merge_groups": (lambda p, o: g.merge_groups(p, o, P), (patches[None], off[None, None])),
        "extract_groups": (lambda c, o: g.extract_groups(c, o, N), (canvas[None], off[None, None])),
        "flatten_offsets": (g.flatten_offsets, (off[None, None],)),
    }


@pytest.mark.parametrize("name", sorted(_jit_cases()))
@pytest.mark.parametrize("use_jit", [False, True], ids=["nojit", "jit"])
def test_with_and_without_jit(name, use_jit):
    fn, args = _jit_cases()[name]
    ref = np.asarray(fn(*args))
    out = np.asarray((jax.jit(fn) if use_jit else fn)(*args))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * (np.abs(ref).max() + 1))


def test_gradients_through_merge_extract_and_forward_are_finite():
    """The model differentiates through merge -> extract -> illuminate -> diffract -> NLL."""
    from pinn_jax import physics as ph
    from pinn_jax.probe import default_probe, normalize_probe

    rng = np.random.default_rng(11)
    N, C = 16, 4
    P = g.padded_size(N, 2)
    probe = normalize_probe(default_probe(N), 4.0)
    amp = jnp.asarray(rng.random((N, N, C)).astype(np.float32) + 0.1)
    off = jnp.asarray(_offsets(rng, C))
    target = jnp.asarray(rng.random((N, N)).astype(np.float32))

    def loss(a):
        canvas = g.merge_group(a.astype(jnp.complex64), off, P)
        patches = g.extract_group(canvas, off, N)
        inten = jax.vmap(lambda p: ph.diffraction_amplitude(ph.illuminate(probe, p)) ** 2, 2, 2)(patches)
        return ph.poisson_nll(inten + 1e-6, jnp.broadcast_to(target[..., None], inten.shape))

    val, grad = jax.jit(jax.value_and_grad(loss))(amp)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))
    assert np.abs(np.asarray(grad)).max() > 0
