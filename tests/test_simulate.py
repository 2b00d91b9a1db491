"""Tests for pinn_jax.simulate: objects, positions, patch extraction, physics parity, NPZ files."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pinn_jax import simulate as S

N = 64


# ------------------------------------------------------------------------------------- objects


@pytest.mark.parametrize("kind", S.OBJECT_KINDS)
def test_make_object_deterministic_and_in_range(kind):
    a = S.make_object(kind, 96, 3, amp_range=(0.2, 0.9), phase_range=(-0.4, 0.7))
    b = S.make_object(kind, 96, np.random.default_rng(3), amp_range=(0.2, 0.9),
                      phase_range=(-0.4, 0.7))
    c = S.make_object(kind, 96, 4, amp_range=(0.2, 0.9), phase_range=(-0.4, 0.7))
    assert a.shape == (96, 96) and a.dtype == np.complex64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    amp, ph = np.abs(a), np.angle(a)
    assert amp.min() >= 0.2 - 1e-6 and amp.max() <= 0.9 + 1e-6
    assert ph.min() >= -0.4 - 1e-6 and ph.max() <= 0.7 + 1e-6
    # textures are not flat, and the phase is not a function of the amplitude
    assert amp.std() > 0.05 and ph.std() > 0.05
    assert abs(np.corrcoef(amp.ravel(), ph.ravel())[0, 1]) < 0.5


def test_make_object_accepts_jax_key_and_rejects_bad_input():
    k = jax.random.key(7)
    np.testing.assert_array_equal(S.make_object("grf", 32, k), S.make_object("grf", 32, k))
    with pytest.raises(ValueError, match="kind"):
        S.make_object("stars", 32, 0)
    with pytest.raises(ValueError, match="amp_range"):
        S.make_object("grf", 32, 0, amp_range=(1.0, 0.5))
    with pytest.raises(ValueError, match="seed"):
        S.make_object("grf", 32, "zero")


# ------------------------------------------------------------------------------------- positions


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 50), size=st.integers(64, 200), Np=st.sampled_from([16, 32, 64]),
       margin=st.integers(0, 4), seed=st.integers(0, 2**31))
def test_random_positions_keep_patch_inside(n, size, Np, margin, seed):
    if size < Np + 2 * margin:
        with pytest.raises(ValueError, match="too small"):
            S.random_positions(n, (size, size), Np, seed=seed, margin=margin)
        return
    p = S.random_positions(n, (size, size), Np, seed=seed, margin=margin)
    assert p.shape == (n, 2) and p.dtype == np.float64
    assert p.min() >= Np / 2 + margin and p.max() <= size - Np / 2 - margin
    np.testing.assert_array_equal(p, S.random_positions(n, (size, size), Np, seed=seed,
                                                        margin=margin))


def test_raster_positions_grid_and_rows():
    p = S.raster_positions(16, (128, 128), 32)
    assert p.shape == (16, 2)
    assert sorted(set(p[:, 0])) == pytest.approx([16, 48, 80, 112])
    assert sorted(set(p[:, 1])) == pytest.approx([16, 48, 80, 112])
    # row-major: x varies fastest
    assert p[1, 1] == p[0, 1] and p[1, 0] > p[0, 0]
    q = S.raster_positions(10, (128, 128), 32, rows=(64, 128), jitter=2.0, seed=1)
    assert q.shape == (10, 2)
    assert q[:, 1].min() >= 64 + 16 and q[:, 1].max() <= 128 - 16


# ------------------------------------------------------------------------------------- patches / physics


def test_extract_patches_integer_positions_are_exact_crops():
    obj = S.make_object("grf", 80, 0)
    pos = np.array([[32.0, 32.0], [48.0, 40.0], [16.0, 64.0]])
    P = S.extract_patches(obj, pos, 32)
    for (x, y), p in zip(pos.astype(int), P):
        np.testing.assert_array_equal(p, obj[y - 16:y + 16, x - 16:x + 16])
    # half-pixel shift in x is the mean of the two neighbouring columns
    h = S.extract_patches(obj, np.array([[32.5, 32.0]]), 32)[0]
    want = 0.5 * (obj[16:48, 16:48] + obj[16:48, 17:49])
    np.testing.assert_allclose(h, want, atol=1e-6)
    # position on the far edge (x = W - N/2) is allowed
    S.extract_patches(obj, np.array([[64.0, 64.0]]), 32)
    with pytest.raises(ValueError, match="outside"):
        S.extract_patches(obj, np.array([[64.01, 40.0]]), 32)


def test_extract_patches_match_reference_ground_truth_patches(fixtures_dir):
    d = np.load(fixtures_dir / "tf_reference" / "dataset_n64_lines.npz")
    g = np.load(fixtures_dir / "tf_reference" / "grouped_gs1_index_coords.npz")
    a = np.load(fixtures_dir / "tf_reference" / "grouped_gs1_arrays_first64.npz")
    pos = g["coords_nn"][:16, 0, :, 0].astype(np.float64)
    want = a["Y"][:16, ..., 0]
    got = S.extract_patches(d["objectGuess"], pos, N)
    np.testing.assert_allclose(got, want, atol=5e-5 * np.abs(want).max())


def test_forward_and_photon_scale_match_reference(fixtures_dir):
    f = np.load(fixtures_dir / "tf_reference" / "forward_illuminate_and_diffract.npz")
    Y = (f["Y_I_in"] * np.exp(1j * f["Y_phi_in"]))[..., 0]
    amps = S.diffraction_patterns(Y, f["probe"])
    s = S.photon_scale(amps, 1e9)
    assert s == pytest.approx(float(f["intensity_scale"]), rel=1e-5)
    np.testing.assert_allclose(amps * s, f["amp_noiseless"][..., 0], rtol=1e-4,
                               atol=1e-4 * f["amp_noiseless"].max())
    # Poisson draws of the reference are statistically compatible: same total counts
    ref_counts = (f["X_noisy_out"].astype(np.float64) * s) ** 2
    assert ref_counts.sum() == pytest.approx(((amps.astype(np.float64) * s) ** 2).sum(), rel=1e-3)


def test_poisson_amplitudes_statistics():
    rate = np.full((200, 50), 7.0)           # amplitude 7 -> 49 counts expected
    x = S.poisson_amplitudes(rate, seed=0)
    counts = x.astype(np.float64) ** 2
    np.testing.assert_allclose(counts, np.rint(counts), atol=1e-3)
    assert counts.mean() == pytest.approx(49.0, rel=0.02)
    assert counts.var() == pytest.approx(49.0, rel=0.1)
    np.testing.assert_array_equal(x, S.poisson_amplitudes(rate, seed=0))


# ------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def small_sets():
    return S.simulate_dataset(N=N, object_size=112, n_images=24, train_fraction=0.5,
                              kind="lines", nphotons=1e5, seed=11, as_raw=False,
                              include_patches=True)


def test_simulate_dataset_contract(small_sets):
    train, test = small_sets
    for s, n in ((train, 12), (test, 12)):
        assert s.diff3d.shape == (n, N, N) and s.diff3d.dtype == np.float32
        assert s.xcoords.dtype == np.float64 and s.ycoords.shape == (n,)
        assert s.probeGuess.shape == (N, N) and s.probeGuess.dtype == np.complex64
        assert s.objectGuess.shape == (112, 112) and s.objectGuess.dtype == np.complex64
        assert s.scan_index.dtype == np.int64
        assert s.Y.shape == (n, N, N)
        counts = s.diff3d.astype(np.float64) ** 2
        np.testing.assert_allclose(counts, np.rint(counts), atol=1e-2)  # sqrt(counts)
        assert s.metadata["nphotons"] == 1e5
        assert s.positions.min() >= N / 2 and s.positions.max() <= 112 - N / 2
    # mean counts per training pattern ~ nphotons (Poisson: relative sd ~ 1e-3 here)
    assert (train.diff3d.astype(np.float64) ** 2).sum(axis=(1, 2)).mean() == pytest.approx(
        1e5, rel=0.01)
    # separate objects by default: test is not a copy of train
    assert not np.allclose(train.objectGuess, test.objectGuess)
    assert train.metadata["intensity_scale"] == test.metadata["intensity_scale"]


def test_simulate_dataset_noiseless_equals_forward_model(small_sets):
    train, _ = small_sets
    clean, _ = S.simulate_dataset(N=N, object_size=112, n_images=24, nphotons=1e5, seed=11,
                                  poisson=False, as_raw=False)
    np.testing.assert_array_equal(clean.objectGuess, train.objectGuess)
    np.testing.assert_array_equal(clean.xcoords, train.xcoords)
    patches = S.extract_patches(clean.objectGuess, clean.positions, N)
    amp = S.diffraction_patterns(patches, clean.probeGuess) * clean.metadata["intensity_scale"]
    np.testing.assert_allclose(clean.diff3d, amp, rtol=1e-5, atol=1e-3)
    assert (clean.diff3d.astype(np.float64) ** 2).sum(axis=(1, 2)).mean() == pytest.approx(
        1e5, rel=1e-5)


def test_simulate_dataset_deterministic_and_seed_dependent(small_sets):
    train, test = small_sets
    again = S.simulate_dataset(N=N, object_size=112, n_images=24, nphotons=1e5, seed=11,
                               as_raw=False)
    np.testing.assert_array_equal(again[0].diff3d, train.diff3d)
    np.testing.assert_array_equal(again[1].diff3d, test.diff3d)
    other = S.simulate_dataset(N=N, object_size=112, n_images=24, nphotons=1e5, seed=12,
                               as_raw=False)
    assert not np.array_equal(other[0].xcoords, train.xcoords)


def test_split_halves_disjoint_rows_and_scaled_units():
    train, test = S.simulate_dataset(N=32, object_size=96, n_images=20, train_fraction=0.5,
                                     kind="grf", split="halves", scan="raster", nphotons=1e4,
                                     seed=1, diff_units="scaled", poisson=False, as_raw=False)
    np.testing.assert_array_equal(train.objectGuess, test.objectGuess)
    # every training patch lies in rows [0, 48), every test patch in [48, 96)
    assert train.ycoords.max() + 16 <= 48 <= test.ycoords.min() - 16
    s = train.metadata["intensity_scale"]
    assert train.metadata["diff_units"] == "scaled"
    assert (train.diff3d.astype(np.float64) ** 2).sum(axis=(1, 2)).mean() * s**2 == (
        pytest.approx(1e4, rel=1e-5))
    with pytest.raises(ValueError, match="halves"):
        S.simulate_dataset(N=32, object_size=60, n_images=4, split="halves")


def test_simulate_dataset_bad_input():
    with pytest.raises(ValueError, match="train_fraction"):
        S.simulate_dataset(N=32, object_size=64, n_images=4, train_fraction=1.0)
    with pytest.raises(ValueError, match="probe"):
        S.simulate_dataset(N=32, object_size=64, n_images=4, probe=np.ones((16, 16)))
    with pytest.raises(ValueError, match="nphotons"):
        S.simulate_dataset(N=32, object_size=64, n_images=4, nphotons=-1)
    with pytest.raises(ValueError, match="object_size"):
        S.simulate_dataset(N=32, object_size=16, n_images=4)


def test_given_probe_and_normalisation():
    probe = np.ones((32, 32), np.complex64) * np.exp(0.3j)
    tr, _ = S.simulate_dataset(N=32, object_size=64, n_images=4, probe=probe, probe_scale=4.0,
                               poisson=False, as_raw=False)
    from pinn_jax.probe import normalize_probe

    np.testing.assert_allclose(tr.probeGuess, np.asarray(normalize_probe(probe, 4.0)), rtol=1e-6)


# ------------------------------------------------------------------------------------- files


def test_simulate_to_npz_atomic_contract(tmp_path):
    p_tr, p_te = S.simulate_to_npz(tmp_path / "sim", N=32, object_size=64, n_images=6,
                                   nphotons=1e4, seed=2)
    assert p_tr.name == "train_data.npz" and p_te.name == "test_data.npz"
    assert sorted(x.name for x in (tmp_path / "sim").iterdir()) == ["test_data.npz",
                                                                     "train_data.npz"]
    want = {"xcoords": np.float64, "ycoords": np.float64, "xcoords_start": np.float64,
            "ycoords_start": np.float64, "diff3d": np.float32, "probeGuess": np.complex64,
            "objectGuess": np.complex64, "scan_index": np.int64}
    with np.load(p_tr, allow_pickle=False) as z:
        assert set(z.files) == set(want) | {"_metadata"}
        for k, dt in want.items():
            assert z[k].dtype == dt, k
        meta = json.loads(str(z["_metadata"]))
        assert meta["nphotons"] == 1e4 and meta["simulation"]["role"] == "train"
        np.testing.assert_array_equal(z["xcoords"], z["xcoords_start"])
    # explicit pair of paths
    a, b = S.simulate_to_npz((tmp_path / "a.npz", tmp_path / "b" / "t.npz"), N=32,
                             object_size=64, n_images=4)
    assert a.exists() and b.exists()


def test_npz_loads_as_rawdata(tmp_path):
    raw_data = pytest.importorskip("backend_api.raw_data")
    p_tr, _ = S.simulate_to_npz(tmp_path, N=32, object_size=64, n_images=6, seed=3)
    raw = raw_data.RawData.from_file(p_tr)
    assert raw.diff3d.shape == (3, 32, 32)
    assert raw.metadata["nphotons"] == 1e9
    tr, _ = S.simulate_dataset(N=32, object_size=64, n_images=6, seed=3)
    assert isinstance(tr, raw_data.RawData)
    np.testing.assert_array_equal(np.asarray(tr.diff3d), np.asarray(raw.diff3d))


@settings(max_examples=25, deadline=None)
@given(x=st.floats(32.0, 95.99), y=st.floats(32.0, 95.99))
def test_patch_extraction_is_the_bilinear_translate_of_its_window(x, y):
    """The simulator's extraction (static-slice taps) equals the general bilinear translate of
    the (N + 1)-pixel window by -frac, then cropped: both are the same two-tap sums of float32
    products, the weights computed differently (frac vs i + frac - floor): rtol 1e-6 of the peak."""
    import jax.numpy as jnp

    from pinn_jax.geometry import translate
    from pinn_jax.geometry import extract_patch as _extract_one

    rng = np.random.default_rng(7)
    obj = (rng.random((128, 128)) + 1j * rng.random((128, 128))).astype(np.complex64)
    op = jnp.pad(jnp.asarray(obj), ((0, 1), (0, 1)))
    pos = jnp.asarray([x, y], jnp.float32)
    corner = np.asarray(pos, np.float64) - 32
    start = np.floor(corner).astype(int)
    frac = jnp.asarray(np.asarray(pos - 32) - start, jnp.float32)
    window = op[start[1]:start[1] + 65, start[0]:start[0] + 65]
    want = np.asarray(translate(window, -frac))[:64, :64]
    got = np.asarray(_extract_one(op, pos, 64))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
