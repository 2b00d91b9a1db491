"""Grouping: parity with the TensorFlow reference fixtures, randomness rules, oversampling."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

from backend_api import grouping
from backend_api._translate import translate
from backend_api.grouping import group_indices, normalize_data, normalization_factor
from backend_api.raw_data import RawData

REF = "tf_reference"
SMALL_KEYS = ("coords_offsets", "coords_relative", "coords_start_offsets",
              "coords_start_relative", "coords_nn", "coords_start_nn")


@pytest.fixture(scope="module")
def ref_raw(fixtures_dir):
    return RawData.from_file(fixtures_dir / REF / "dataset_n64_lines.npz")


def _toy_raw(n=60, H=8, seed=0, dtype=np.float64, with_object=False):
    r = np.random.RandomState(seed)
    x = r.uniform(10, 40, n).astype(dtype)
    y = r.uniform(10, 40, n).astype(dtype)
    diff = r.rand(n, H, H).astype(np.float32)
    probe = (r.rand(H, H) + 1j * r.rand(H, H)).astype(np.complex64)
    obj = (r.rand(50, 50) + 1j * r.rand(50, 50)).astype(np.complex64) if with_object else None
    return RawData.from_coords_without_pc(x, y, diff, probe, np.zeros(n, int), objectGuess=obj)


# --------------------------------------------------------------------------------------------
# Parity with the reference fixtures (sequential sampling)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gs,ns,nb", [(1, 512, 64), (2, 128, 16)])
def test_sequential_parity_with_reference(ref_raw, fixtures_dir, gs, ns, nb):
    g = ref_raw.generate_grouped_data(64, K=7, nsamples=ns, gridsize=gs, sequential_sampling=True)
    ref = np.load(fixtures_dir / REF / f"grouped_gs{gs}_index_coords.npz")
    # Index arrays: bit for bit, with the reference's dtypes (int64 for C=1, int32 for C>1).
    np.testing.assert_array_equal(g["nn_indices"], ref["nn_indices"])
    assert g["nn_indices"].dtype == (np.int64 if gs == 1 else np.int32)
    # Coordinates: the dataset stores float32 positions; we reproduce the reference exactly.
    for key in SMALL_KEYS:
        assert g[key].shape == ref[key].shape, key
        assert g[key].dtype == np.float32, key
        np.testing.assert_array_equal(g[key], ref[key], err_msg=key)
    assert normalization_factor(g["diffraction"], 64) == ref["x_full_norm_scalar"]
    big = np.load(fixtures_dir / REF / f"grouped_gs{gs}_arrays_first{nb}.npz")
    np.testing.assert_array_equal(g["diffraction"][:nb], big["diffraction"])
    np.testing.assert_array_equal(g["X_full"][:nb], big["X_full"])
    assert g["X_full"].dtype == np.float32 and g["X_full"].shape == (ns, 64, 64, gs * gs)
    assert g["Y"].dtype == np.complex64 and g["Y"].shape == (ns, 64, 64, gs * gs)
    # Y: same float32 sample positions and weights; only the blend's rounding order differs
    # from XLA's, so values agree to ~2 ulp (|Y| ~ 6 -> 1 ulp ~ 4.8e-7).
    np.testing.assert_allclose(g["Y"][:nb], big["Y"], rtol=0, atol=1.5e-6)
    assert np.mean(g["Y"][:nb] == big["Y"]) > 0.5
    assert g["objectGuess"] is ref_raw.objectGuess
    assert "sample_indices" not in g


def test_sequential_ignores_seed_and_is_deterministic(ref_raw):
    a = group_indices(ref_raw.xcoords, ref_raw.ycoords, nsamples=50, K=7, gridsize=2,
                      sequential_sampling=True)
    b = group_indices(ref_raw.xcoords, ref_raw.ycoords, nsamples=50, K=7, gridsize=2,
                      sequential_sampling=True, seed=123)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Random sampling == the reference's algorithm with its legacy draw order
# --------------------------------------------------------------------------------------------

def _literal_reference_groups(x, y, nsamples, K, C, seed, sequential=False):
    """Slow, literal transcription of the reference algorithm (brief §2.3 step 4).

    The reference seeds the global RNG and calls np.random.choice; a RandomState(seed) gives
    the identical stream, which keeps this test off the global RNG.
    """
    rs = np.random.RandomState(0 if sequential else seed)
    n = len(x)
    if sequential:
        seeds = np.arange(min(nsamples, n))
    else:
        n_actual = min(nsamples, n)
        seeds = (rs.choice(np.arange(n), n_actual, replace=False) if n_actual < n
                 else np.arange(n))
    if C == 1:
        return seeds.reshape(-1, 1)
    pts = np.column_stack([x, y])
    tree = cKDTree(pts)
    out = []
    for s in seeds:
        _, row = tree.query(pts[s], k=min(K + 1, n))
        row = np.atleast_1d(row)
        nb = row[1:K + 1] if len(row) > K else row[:K]
        out.append(rs.choice(nb, C, replace=False))
    return np.array(out, dtype=np.int32)


@pytest.mark.parametrize("gs,K,ns,seed", [(1, 4, 40, 3), (2, 7, 200, 11), (2, 4, 30, 0),
                                          (2, 6, 300, 5), (3, 12, 50, 7)])
def test_random_sampling_matches_reference_draw_order(gs, K, ns, seed):
    raw = _toy_raw(n=300, seed=seed)
    got = group_indices(raw.xcoords, raw.ycoords, nsamples=ns, K=K, gridsize=gs, seed=seed)
    want = _literal_reference_groups(raw.xcoords, raw.ycoords, ns, K, gs * gs, seed)
    np.testing.assert_array_equal(got, want)


def test_sequential_gs2_matches_literal_reference():
    raw = _toy_raw(n=100, seed=4)
    got = group_indices(raw.xcoords, raw.ycoords, nsamples=80, K=7, gridsize=2,
                        sequential_sampling=True)
    want = _literal_reference_groups(raw.xcoords, raw.ycoords, 80, 7, 4, None, sequential=True)
    np.testing.assert_array_equal(got, want)


def test_explicit_randomstate_is_advanced_like_the_reference():
    raw = _toy_raw(n=120, seed=1)
    rs = np.random.RandomState(9)
    group_indices(raw.xcoords, raw.ycoords, nsamples=50, K=7, gridsize=2, rng=rs)
    rs2 = np.random.RandomState(9)
    _ = rs2.choice(np.arange(120), 50, replace=False)
    for _i in range(50):
        rs2.choice(np.arange(7), 4, replace=False)
    assert rs.randint(0, 2**31) == rs2.randint(0, 2**31)


@pytest.mark.parametrize("L,C,rows", [(7, 4, 333), (4, 4, 50), (9, 9, 20), (16, 9, 40), (5, 4, 1)])
def test_legacy_permutation_emulation(L, C, rows):
    rs = np.random.RandomState(L * 100 + rows)
    got = grouping._legacy_permutation_heads(rs, rows, L, C)
    rs2 = np.random.RandomState(L * 100 + rows)
    want = np.array([rs2.permutation(L)[:C] for _ in range(rows)])
    np.testing.assert_array_equal(got, want)
    assert rs.randint(0, 2**31) == rs2.randint(0, 2**31)


def test_seed_determinism_and_variation():
    raw = _toy_raw(n=200)
    a = raw.generate_grouped_data(8, K=6, nsamples=50, gridsize=2, seed=1)
    b = raw.generate_grouped_data(8, K=6, nsamples=50, gridsize=2, seed=1)
    c = raw.generate_grouped_data(8, K=6, nsamples=50, gridsize=2, seed=2)
    for key in a:
        if a[key] is None:
            assert b[key] is None
        else:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["nn_indices"], c["nn_indices"])


def test_generator_rng_supported():
    raw = _toy_raw(n=150)
    a = group_indices(raw.xcoords, raw.ycoords, nsamples=40, K=7, gridsize=2,
                      rng=np.random.default_rng(5))
    b = group_indices(raw.xcoords, raw.ycoords, nsamples=40, K=7, gridsize=2,
                      rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (40, 4)
    assert all(len(set(r)) == 4 for r in a.tolist())


def test_bad_rng_rejected():
    raw = _toy_raw(n=20)
    with pytest.raises(ValueError, match="rng"):
        group_indices(raw.xcoords, raw.ycoords, nsamples=5, rng="nope")


@pytest.mark.parametrize("kw", [
    dict(nsamples=50, gridsize=2, seed=3),
    dict(nsamples=50, gridsize=1, seed=3),
    dict(nsamples=50, gridsize=2, sequential_sampling=True),
    dict(nsamples=500, gridsize=2, seed=3, enable_oversampling=True, neighbor_pool_size=7),
    dict(nsamples=500, gridsize=2, enable_oversampling=True, neighbor_pool_size=7),
    dict(nsamples=50, gridsize=2),  # no seed: fresh entropy, still not the global RNG
])
def test_global_numpy_rng_untouched(kw):
    raw = _toy_raw(n=100, with_object=True)
    # (the test only reads the global state; it never seeds it)
    before = np.random.get_state()
    raw.generate_grouped_data(8, K=7, **kw)
    after = np.random.get_state()
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


# --------------------------------------------------------------------------------------------
# Group geometry and the dictionary
# --------------------------------------------------------------------------------------------

def test_groups_are_neighbours_excluding_seed():
    raw = _toy_raw(n=150, seed=2)
    K = 6
    nn = group_indices(raw.xcoords, raw.ycoords, nsamples=150, K=K, gridsize=2,
                       sequential_sampling=True)
    pts = np.column_stack([raw.xcoords, raw.ycoords])
    _, knn = cKDTree(pts).query(pts, k=K + 1)
    for s, row in enumerate(nn):
        assert len(set(row.tolist())) == 4
        assert set(row.tolist()) <= set(knn[s, 1:].tolist())


def test_dict_keys_shapes_dtypes_float64_coords():
    raw = _toy_raw(n=40, H=8, with_object=True)
    g = raw.generate_grouped_data(8, K=5, nsamples=10, gridsize=2, seed=0)
    assert set(g) == {"diffraction", "Y", "coords_offsets", "coords_relative",
                      "coords_start_offsets", "coords_start_relative", "coords_nn",
                      "coords_start_nn", "nn_indices", "objectGuess", "X_full"}
    assert g["diffraction"].shape == (10, 8, 8, 4) and g["diffraction"].dtype == np.float32
    assert g["X_full"].shape == (10, 8, 8, 4) and g["X_full"].dtype == np.float32
    assert g["Y"].shape == (10, 8, 8, 4) and g["Y"].dtype == np.complex64
    assert g["coords_nn"].shape == (10, 1, 2, 4) and g["coords_nn"].dtype == np.float64
    assert g["coords_offsets"].shape == (10, 1, 2, 1)
    nn = g["nn_indices"]
    np.testing.assert_array_equal(g["coords_nn"][:, 0, 0, :], raw.xcoords[nn])
    np.testing.assert_array_equal(g["coords_nn"][:, 0, 1, :], raw.ycoords[nn])
    np.testing.assert_allclose(g["coords_offsets"][..., 0], g["coords_nn"].mean(axis=3))
    np.testing.assert_allclose(g["coords_relative"], -(g["coords_nn"] - g["coords_offsets"]))
    np.testing.assert_allclose(g["coords_relative"].sum(axis=3), 0, atol=1e-12)
    for c in range(4):
        np.testing.assert_array_equal(g["diffraction"][..., c], raw.diff3d[nn[:, c]])


def test_Y_none_without_object_and_from_raw_Y():
    raw = _toy_raw(n=30, H=8)
    assert raw.generate_grouped_data(8, K=4, nsamples=5, gridsize=1, seed=0)["Y"] is None
    Yp = (np.random.RandomState(0).rand(30, 8, 8) * np.exp(1j)).astype(np.complex64)
    raw2 = RawData(raw.xcoords, raw.ycoords, None, None, raw.diff3d, raw.probeGuess, None, Y=Yp)
    g = raw2.generate_grouped_data(8, K=4, nsamples=5, gridsize=2, seed=0)
    for c in range(4):
        np.testing.assert_array_equal(g["Y"][..., c], Yp[g["nn_indices"][:, c]])


def test_Y_patch_centred_on_scan_position_gs1():
    # A delta object: the gs1 patch of a position on the delta has it at the centre pixel.
    H = 8
    obj = np.zeros((40, 40), np.complex64)
    obj[20, 17] = 1 + 1j
    x = np.array([17.0, 5.0, 30.0])
    y = np.array([20.0, 5.0, 30.0])
    raw = RawData.from_coords_without_pc(x, y, np.ones((3, H, H), np.float32),
                                         np.ones((H, H), np.complex64), None, objectGuess=obj)
    g = raw.generate_grouped_data(H, nsamples=3, gridsize=1, sequential_sampling=True)
    assert g["Y"][0, H // 2, H // 2, 0] == obj[20, 17]
    assert np.count_nonzero(g["Y"][0]) == 1


def test_sample_indices_passed_through():
    raw = _toy_raw(n=30)
    raw.sample_indices = np.arange(30) * 2
    g = raw.generate_grouped_data(8, nsamples=5, gridsize=1, seed=0)
    np.testing.assert_array_equal(g["sample_indices"], np.arange(30) * 2)


def test_gridsize_none_uses_params_cfg():
    from backend_api import params
    raw = _toy_raw(n=40)
    old = params.cfg.get("gridsize", 1)
    try:
        params.cfg["gridsize"] = 2
        g = raw.generate_grouped_data(8, K=4, nsamples=10, seed=0)
        assert g["nn_indices"].shape == (10, 4)
        params.cfg["gridsize"] = 1
        g = raw.generate_grouped_data(8, K=4, nsamples=10, seed=0)
        assert g["nn_indices"].shape == (10, 1)
    finally:
        params.cfg["gridsize"] = old


def test_dataset_path_ignored_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = _toy_raw(n=30)
    raw.generate_grouped_data(8, K=4, nsamples=5, gridsize=2, seed=0,
                              dataset_path=str(tmp_path / "x.npz"))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Caps, errors and oversampling (OVERSAMPLING-001)
# --------------------------------------------------------------------------------------------

def test_gs1_caps_at_n_points_with_warning():
    raw = _toy_raw(n=20)
    with pytest.warns(UserWarning, match="exceeds"):
        g = raw.generate_grouped_data(8, nsamples=50, gridsize=1, seed=0)
    assert g["nn_indices"].shape == (20, 1)
    assert sorted(g["nn_indices"][:, 0].tolist()) == list(range(20))
    g = raw.generate_grouped_data(8, nsamples=30, gridsize=1, sequential_sampling=True)
    assert g["nn_indices"].shape == (20, 1)


def test_exactly_n_points_needs_no_oversampling():
    raw = _toy_raw(n=25)
    g = raw.generate_grouped_data(8, K=6, nsamples=25, gridsize=2, seed=0)
    assert g["nn_indices"].shape == (25, 4)


def test_oversampling_not_enabled_message():
    raw = _toy_raw(n=50)
    with pytest.raises(ValueError) as e:
        raw.generate_grouped_data(8, K=7, nsamples=60, gridsize=2, seed=0)
    msg = str(e.value)
    assert "K choose C oversampling is required but not enabled" in msg
    assert "enable_oversampling" in msg and "OVERSAMPLING-001" in msg


def test_oversampling_pool_too_small_message():
    raw = _toy_raw(n=50)
    with pytest.raises(ValueError) as e:
        raw.generate_grouped_data(8, K=7, nsamples=60, gridsize=2, seed=0,
                                  enable_oversampling=True, neighbor_pool_size=3)
    assert "neighbor_pool_size >= C" in str(e.value) and "OVERSAMPLING-001" in str(e.value)


@pytest.mark.parametrize("pool", [5, 6, 7, 8])
def test_oversampling_returns_requested_groups(pool):
    raw = _toy_raw(n=100)
    g = raw.generate_grouped_data(8, K=4, nsamples=150, gridsize=2, seed=1,
                                  enable_oversampling=True, neighbor_pool_size=pool)
    nn = g["nn_indices"]
    assert nn.shape == (150, 4) and nn.dtype == np.int64
    assert all(len(set(r)) == 4 for r in nn.tolist())
    assert len({tuple(r) for r in nn.tolist()}) == 150  # drawn without replacement from a pool
    assert g["X_full"].shape[0] == 150


def test_oversampling_seeded_determinism():
    raw = _toy_raw(n=100)
    kw = dict(K=7, nsamples=200, gridsize=2, enable_oversampling=True, neighbor_pool_size=7)
    a = raw.generate_grouped_data(8, seed=1, **kw)["nn_indices"]
    b = raw.generate_grouped_data(8, seed=1, **kw)["nn_indices"]
    c = raw.generate_grouped_data(8, seed=2, **kw)["nn_indices"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_oversampling_sequential_returns_more_than_n():
    raw = _toy_raw(n=40)
    nn = group_indices(raw.xcoords, raw.ycoords, nsamples=50, K=7, gridsize=2,
                       sequential_sampling=True, enable_oversampling=True, neighbor_pool_size=7)
    assert nn.shape == (50, 4)


def test_oversampling_pool_with_replacement_warns():
    raw = _toy_raw(n=5)
    # 5 points, pool 4 -> each seed has C(4,4) = 1 combination; 5 seeds can give at most 5.
    with pytest.warns(UserWarning, match="replacement"):
        nn = group_indices(raw.xcoords, raw.ycoords, nsamples=8, K=4, gridsize=2, seed=0,
                           enable_oversampling=True, neighbor_pool_size=4)
    assert nn.shape == (8, 4)


def test_K_smaller_than_C():
    raw = _toy_raw(n=50)
    with pytest.raises(ValueError, match="K=3 must be >= C=4"):
        raw.generate_grouped_data(8, K=3, nsamples=10, gridsize=2, seed=0)


def test_too_few_points_for_C():
    raw = _toy_raw(n=3)
    with pytest.raises(ValueError, match="n_points=3"):
        raw.generate_grouped_data(8, K=4, nsamples=2, gridsize=2, seed=0)


@pytest.mark.parametrize("kw,key", [(dict(nsamples=0), "nsamples"), (dict(nsamples=1.5), "nsamples"),
                                    (dict(K=0), "K"), (dict(gridsize=0), "gridsize"),
                                    (dict(neighbor_pool_size=0), "neighbor_pool_size")])
def test_bad_arguments_named(kw, key):
    raw = _toy_raw(n=20)
    args = dict(nsamples=5, K=4, gridsize=1, seed=0)
    args.update(kw)
    with pytest.raises(ValueError, match=key):
        group_indices(raw.xcoords, raw.ycoords, **args)


@pytest.mark.parametrize("x,y,key", [
    (np.zeros(5), np.zeros(4), "ycoords"),
    (np.zeros((5, 1)), np.zeros(5), "xcoords"),
    (np.array(["a"] * 5), np.zeros(5), "xcoords"),
    (np.zeros(5), np.array([0, 1, np.nan, 3, 4.0]), "ycoords"),
])
def test_bad_coordinates_named(x, y, key):
    with pytest.raises(ValueError, match=rf"^{key}: expected") as info:
        group_indices(x, y, nsamples=2, K=4, gridsize=1, seed=0)
    assert "got" in str(info.value) or "non-finite" in str(info.value)


def test_tiny_dataset_keeps_self():
    # n_points <= K: the reference keeps every hit, self included.
    raw = _toy_raw(n=5)
    nn = group_indices(raw.xcoords, raw.ycoords, nsamples=5, K=6, gridsize=2, seed=0)
    assert nn.shape == (5, 4)
    want = _literal_reference_groups(raw.xcoords, raw.ycoords, 5, 6, 4, 0)
    np.testing.assert_array_equal(nn, want)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 60), gs=st.integers(1, 2), K=st.integers(4, 9),
       ns=st.integers(1, 80), seed=st.integers(0, 2**31 - 1), seq=st.booleans())
def test_group_indices_properties(n, gs, K, ns, seed, seq):
    r = np.random.RandomState(seed % 1000)
    x, y = r.uniform(0, 100, n), r.uniform(0, 100, n)
    C = gs * gs
    if ns > n and C > 1:
        with pytest.raises(ValueError, match="OVERSAMPLING-001"):
            group_indices(x, y, nsamples=ns, K=K, gridsize=gs, seed=seed,
                          sequential_sampling=seq)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn = group_indices(x, y, nsamples=ns, K=K, gridsize=gs, seed=seed, sequential_sampling=seq)
    assert nn.shape == (min(ns, n), C)
    assert nn.min() >= 0 and nn.max() < n
    assert all(len(set(row)) == C for row in nn.tolist())
    if seq and C == 1:
        np.testing.assert_array_equal(nn[:, 0], np.arange(min(ns, n)))


# --------------------------------------------------------------------------------------------
# normalize_data and the translation kernel
# --------------------------------------------------------------------------------------------

def test_normalize_data_energy_and_dtype():
    d = np.random.RandomState(0).rand(6, 8, 8, 4).astype(np.float32) * 3
    X = normalize_data(d, 16)
    assert X.dtype == np.float32 and X.shape == d.shape
    energy = (X.astype(np.float64) ** 2).sum(axis=(1, 2)).mean()
    np.testing.assert_allclose(energy, 64.0, rtol=1e-5)
    np.testing.assert_array_equal(normalize_data({"diffraction": d}, 16), X)


def test_normalize_data_uint16_safe():
    d16 = np.random.RandomState(1).randint(0, 65535, size=(5, 8, 8, 1)).astype(np.uint16)
    X16 = normalize_data(d16, 8)
    X64 = normalize_data(d16.astype(np.float64), 8)
    assert X16.dtype == np.float32 and X64.dtype == np.float32
    np.testing.assert_array_equal(X16, X64)
    ref = d16.astype(np.float64) * np.sqrt(16.0 / np.mean(np.sum(d16.astype(np.float64) ** 2, axis=(1, 2))))
    np.testing.assert_allclose(X16, ref, rtol=1e-6)


def test_normalize_data_rejects_zero_and_bad_rank():
    with pytest.raises(ValueError, match="diffraction"):
        normalize_data(np.zeros((2, 4, 4, 1), np.float32), 4)
    with pytest.raises(ValueError, match="diffraction"):
        normalize_data(np.ones((2, 4, 4), np.float32), 4)


def test_translate_sign_convention():
    img = np.zeros((9, 9), np.float32)
    img[4, 4] = 1.0
    out = translate(img, [2, 0])
    assert out[4, 6] == 1.0 and out.sum() == 1.0
    out = translate(img, [0, -1])
    assert out[3, 4] == 1.0 and out.sum() == 1.0
    out = translate(img, [0.5, 0])
    assert out[4, 4] == pytest.approx(0.5) and out[4, 5] == pytest.approx(0.5)
    # corners outside are zero, not clamped
    ones = np.ones((5, 5), np.float32)
    out = translate(ones, [0.5, 0])
    assert out[2, 0] == pytest.approx(0.5) and out[2, 4] == pytest.approx(1.0)
    c = translate(img.astype(np.complex64) * (1 + 2j), [1, 1])
    assert c.dtype == np.complex64 and c[5, 5] == 1 + 2j



def _naive_translate(img, tx, ty):
    H, W = img.shape
    out = np.zeros((H, W), np.complex128)
    for r in range(H):
        for c in range(W):
            sx, sy = c - tx, r - ty
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            fx, fy = sx - x0, sy - y0
            for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                    if 0 <= yy < H and 0 <= xx < W:
                        out[r, c] += wy * wx * img[yy, xx]
    return out


@settings(max_examples=30, deadline=None)
@given(tx=st.floats(-12, 12), ty=st.floats(-12, 12), seed=st.integers(0, 100),
       shape=st.sampled_from([(7, 7), (6, 9), (10, 4)]))
def test_translate_matches_naive_bilinear(tx, ty, seed, shape):
    r = np.random.RandomState(seed)
    img = (r.rand(*shape) + 1j * r.rand(*shape)).astype(np.complex64)
    got = translate(img, [tx, ty])
    assert got.shape == shape
    np.testing.assert_allclose(got, _naive_translate(img, np.float32(tx), np.float32(ty)),
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------
# GroupingOptions: the one grouping default of every run

def test_default_n_groups_uses_every_position_about_once():
    from backend_api.grouping import default_n_groups

    assert default_n_groups(100, 1) == 100
    assert default_n_groups(100, 2) == 25
    assert default_n_groups(3, 2) == 1  # never zero groups
    assert default_n_groups(101, 3) == 11


def test_grouping_options_resolve_caps_unless_oversampling():
    from backend_api.grouping import GroupingOptions

    assert GroupingOptions().resolve_n_groups(100, 2) == 25
    assert GroupingOptions(n_groups=10).resolve_n_groups(100, 2) == 10
    assert GroupingOptions(n_groups=500).resolve_n_groups(100, 2) == 25
    assert GroupingOptions(n_groups=500, enable_oversampling=True,
                           neighbor_pool_size=6).resolve_n_groups(100, 2) == 500


@pytest.mark.parametrize("kwargs, name", [({"n_groups": 0}, "n_groups"), ({"neighbor_count": 0}, "neighbor_count"),
                                          ({"neighbor_pool_size": -1}, "neighbor_pool_size"),
                                          ({"n_groups": 2.5}, "n_groups")])
def test_grouping_options_refuse_bad_values_naming_the_field(kwargs, name):
    from backend_api.grouping import GroupingOptions

    with pytest.raises(ValueError, match=name):
        GroupingOptions(**kwargs)


def test_grouping_options_are_frozen_and_hashable():
    import dataclasses

    from backend_api.grouping import GroupingOptions

    g = GroupingOptions(n_groups=4, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.n_groups = 5  # type: ignore[misc]
    assert hash(g) == hash(GroupingOptions(n_groups=4, seed=1))


def test_get_neighbor_indices_reference_contract():
    from backend_api.grouping import get_neighbor_indices

    # A 1-D row of points: each point's nearest are itself, then its neighbours by distance.
    x = np.array([0.0, 1.0, 3.0, 7.0])
    y = np.zeros(4)
    idx = get_neighbor_indices(x, y, K=2)
    assert idx.shape == (4, 3) and np.issubdtype(idx.dtype, np.integer)
    assert idx[:, 0].tolist() == [0, 1, 2, 3]  # self first
    assert idx[0].tolist() == [0, 1, 2] and idx[3].tolist() == [3, 2, 1]
    # K + 1 above the number of points: capped at M columns, still (M, M)
    assert get_neighbor_indices(x, y, K=10).shape == (4, 4)
    assert get_neighbor_indices(x, y).shape == (4, 4)  # default K=3
