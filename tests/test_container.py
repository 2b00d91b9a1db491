"""PtychoDataContainer: reference loader semantics on numpy arrays."""

from __future__ import annotations

import numpy as np
import pytest

from backend_api.container import PtychoDataContainer
from backend_api.raw_data import RawData

REF = "tf_reference"


@pytest.fixture(scope="module")
def ref_raw(fixtures_dir):
    return RawData.from_file(fixtures_dir / REF / "dataset_n64_lines.npz")


@pytest.fixture(scope="module")
def grouped_gs2(ref_raw):
    return ref_raw.generate_grouped_data(64, K=7, nsamples=128, gridsize=2,
                                         sequential_sampling=True)


def _toy_raw(n=40, H=8, with_object=True, seed=0):
    r = np.random.RandomState(seed)
    obj = (r.rand(48, 48) * np.exp(1j * r.rand(48, 48))).astype(np.complex64) if with_object else None
    return RawData.from_coords_without_pc(
        r.uniform(10, 38, n), r.uniform(10, 38, n), r.rand(n, H, H).astype(np.float32),
        (r.rand(H, H) + 1j * r.rand(H, H)).astype(np.complex64), None, objectGuess=obj)


@pytest.mark.parametrize("gs", [1, 2])
def test_from_grouped_matches_reference_loader(ref_raw, fixtures_dir, gs):
    ns = 512 if gs == 1 else 128
    g = ref_raw.generate_grouped_data(64, K=7, nsamples=ns, gridsize=gs, sequential_sampling=True)
    c = PtychoDataContainer.from_grouped(g, ref_raw.probeGuess, nphotons=1e9)
    C = gs * gs
    assert len(c) == ns
    assert c.X.shape == (ns, 64, 64, C) and c.X.dtype == np.float32
    assert c.Y_I.dtype == np.float32 and c.Y_phi.dtype == np.float32
    head = c.subset(np.arange(8))
    assert head.Y.dtype == np.complex64 and head.Y.shape == (8, 64, 64, C)
    assert c.coords_nominal.shape == (ns, 1, 2, C) and c.coords_nominal.dtype == np.float32
    assert c.coords is c.coords_nominal
    np.testing.assert_array_equal(c.coords_true, g["coords_start_relative"])
    assert c.global_offsets.shape == (ns, 1, 2, 1) and c.global_offsets.dtype == np.float64
    assert c.local_offsets.shape == (ns, 1, 2, C) and c.local_offsets.dtype == np.float64
    np.testing.assert_array_equal(c.global_offsets, g["coords_offsets"])
    np.testing.assert_array_equal(c.nn_indices, g["nn_indices"])
    assert c.probe.shape == (64, 64) and c.probe.dtype == np.complex64
    assert c.has_ground_truth and c.YY_full is None
    np.testing.assert_allclose(head.Y, g["Y"][:8], rtol=1e-5, atol=1e-5)
    ref = np.load(fixtures_dir / REF / f"intensity_scale_gs{gs}.npz")
    # reference computes norm_Y_I in float32 TF reductions; ours accumulates in float64
    np.testing.assert_allclose(c.norm_Y_I, float(ref["norm_Y_I_loader"]), rtol=1e-5)


def test_no_ground_truth_placeholders():
    raw = _toy_raw(with_object=False)
    c = PtychoDataContainer.from_grouped(
        raw.generate_grouped_data(8, K=4, nsamples=10, gridsize=2, seed=0), raw.probeGuess)
    assert not c.has_ground_truth
    assert c.Y_I.shape == c.X.shape and (c.Y_I == 1).all() and (c.Y_phi == 0).all()
    assert c.Y_I.dtype == np.float32
    sub = c.subset([0, 3])
    assert len(sub) == 2 and not sub.has_ground_truth and sub.Y_I.shape == (2, 8, 8, 4)


def test_all_zero_or_empty_patterns_rejected_with_named_key():
    raw = _toy_raw()
    g = raw.generate_grouped_data(8, K=4, nsamples=5, gridsize=1, seed=0)
    zero = dict(g, X_full=np.zeros_like(g["X_full"]))
    with pytest.raises(ValueError, match="X: mean per-pattern energy is 0.0; expected a positive"):
        PtychoDataContainer.from_grouped(zero, raw.probeGuess)
    empty = dict(g, X_full=g["X_full"][:0])
    with pytest.raises(ValueError, match=r"X: expected at least one group.*\(0, 8, 8, 1\)"):
        PtychoDataContainer.from_grouped(empty, raw.probeGuess)


def test_norm_Y_I_formula():
    raw = _toy_raw()
    g = raw.generate_grouped_data(8, K=4, nsamples=20, gridsize=2, seed=1)
    c = PtychoDataContainer.from_grouped(g, raw.probeGuess, nphotons=1e6)
    X = g["X_full"].astype(np.float64)
    want = np.sqrt(1e6 / np.mean(np.sum(X ** 2, axis=(1, 2))))
    np.testing.assert_allclose(c.norm_Y_I, want, rtol=1e-12)
    # X_full is normalised to mean energy (N/2)^2, so norm_Y_I = sqrt(nphotons)/(N/2)
    np.testing.assert_allclose(c.norm_Y_I, np.sqrt(1e6) / 4, rtol=1e-5)


def test_subset_and_split(grouped_gs2, ref_raw):
    c = PtychoDataContainer.from_grouped(grouped_gs2, ref_raw.probeGuess)
    idx = np.array([5, 1, 7])
    s = c.subset(idx)
    assert len(s) == 3
    for key in ("X", "Y_I", "Y_phi", "coords_nominal", "coords_true", "nn_indices",
                "global_offsets", "local_offsets"):
        np.testing.assert_array_equal(getattr(s, key), getattr(c, key)[idx], err_msg=key)
    assert s.norm_Y_I == c.norm_Y_I
    np.testing.assert_array_equal(s.probe, c.probe)
    mask = np.zeros(len(c), bool)
    mask[::2] = True
    assert len(c.subset(mask)) == 64
    head, tail = c.split(0.8)
    assert len(head) == int(128 * 0.8) and len(head) + len(tail) == 128
    np.testing.assert_array_equal(tail.X, c.X[len(head):])
    with pytest.raises(ValueError, match="indices"):
        c.subset([200])
    with pytest.raises(ValueError, match="indices"):
        c.subset(np.ones(3, bool))
    with pytest.raises(ValueError, match="train_fraction"):
        c.split(1.5)


def test_validation_errors(grouped_gs2, ref_raw):
    g = dict(grouped_gs2)
    with pytest.raises(ValueError, match="probe"):
        PtychoDataContainer.from_grouped(g, np.ones((32, 32), np.complex64))
    bad = dict(g)
    bad["Y"] = g["Y"][..., :1]
    with pytest.raises(ValueError, match="Channel mismatch"):
        PtychoDataContainer.from_grouped(bad, ref_raw.probeGuess)
    missing = dict(g)
    del missing["X_full"]
    with pytest.raises(ValueError, match="X_full"):
        PtychoDataContainer.from_grouped(missing, ref_raw.probeGuess)
    with pytest.raises(ValueError, match="nphotons"):
        PtychoDataContainer.from_grouped(g, ref_raw.probeGuess, nphotons=-1)


def test_to_npz(tmp_path):
    raw = _toy_raw()
    c = PtychoDataContainer.from_grouped(
        raw.generate_grouped_data(8, K=4, nsamples=6, gridsize=1, seed=0), raw.probeGuess)
    p = tmp_path / "c.npz"
    c.to_npz(p)
    with np.load(p) as z:
        assert set(z.files) == {"X", "Y_I", "Y_phi", "coords_nominal", "coords_true",
                                "nn_indices", "global_offsets", "local_offsets", "probe",
                                "norm_Y_I", "has_ground_truth"}
        for key in ("X", "Y_I", "Y_phi", "coords_nominal", "local_offsets", "global_offsets",
                    "nn_indices", "probe"):
            np.testing.assert_array_equal(z[key], getattr(c, key), err_msg=key)
            assert z[key].dtype == getattr(c, key).dtype, key
        assert float(z["norm_Y_I"]) == c.norm_Y_I and bool(z["has_ground_truth"])


def test_to_npz_failure_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    raw = _toy_raw()
    c = PtychoDataContainer.from_grouped(
        raw.generate_grouped_data(8, K=4, nsamples=6, gridsize=1, seed=0), raw.probeGuess)
    p = tmp_path / "c.npz"
    c.to_npz(p)
    before = p.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="simulated"):
        c.subset([0, 1]).to_npz(p)
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["c.npz"]


# --------------------------------------------------------------------------------------------
# from_raw_data with the config dataclasses
# --------------------------------------------------------------------------------------------

config = pytest.importorskip("backend_api.config")


def test_from_raw_data_training_config():
    raw = _toy_raw(n=60)
    cfg = config.TrainingConfig(model=config.ModelConfig(N=64, gridsize=2), n_groups=25,
                                neighbor_count=6, nphotons=1e7)
    # N in the config is only used for normalisation/Y patch size; patterns here are 8x8,
    # so use a matching N.
    cfg.model.N = 8
    c = PtychoDataContainer.from_raw_data(raw, cfg, seed=3)
    g = raw.generate_grouped_data(8, K=6, nsamples=25, gridsize=2, seed=3)
    np.testing.assert_array_equal(c.nn_indices, g["nn_indices"])
    np.testing.assert_array_equal(c.X, g["X_full"])
    np.testing.assert_allclose(c.norm_Y_I, np.sqrt(1e7) / 4, rtol=1e-5)
    assert c.X.shape == (25, 8, 8, 4)


def test_from_raw_data_sequential_and_oversampling():
    raw = _toy_raw(n=30)
    cfg = config.TrainingConfig(model=config.ModelConfig(N=64, gridsize=2), n_groups=50,
                                neighbor_count=7, sequential_sampling=True,
                                enable_oversampling=True, neighbor_pool_size=7)
    cfg.model.N = 8
    c = PtychoDataContainer.from_raw_data(raw, cfg)
    assert len(c) == 50
    cfg.enable_oversampling = False
    with pytest.raises(ValueError, match="OVERSAMPLING-001"):
        PtychoDataContainer.from_raw_data(raw, cfg)


def test_from_raw_data_inference_config_all_points(tmp_path):
    raw = _toy_raw(n=20)
    cfg = config.InferenceConfig(model=config.ModelConfig(N=64, gridsize=1),
                                 model_path=tmp_path, test_data_file=tmp_path / "t.npz")
    cfg.model.N = 8
    assert cfg.n_groups is None
    c = PtychoDataContainer.from_raw_data(raw, cfg, seed=0)
    assert len(c) == 20  # n_groups None -> every scan position
    np.testing.assert_allclose(c.norm_Y_I, np.sqrt(1e9) / 4, rtol=1e-5)


def test_from_raw_data_rejects_non_config():
    with pytest.raises(ValueError, match="config"):
        PtychoDataContainer.from_raw_data(_toy_raw(), object())


def test_from_raw_data_ignores_legacy_cfg():
    """Our code decides from the dataclass, never from params.cfg (only the reference-style
    call with gridsize=None falls back to it)."""
    from backend_api import params

    raw = _toy_raw(n=40)
    cfg = config.TrainingConfig(model=config.ModelConfig(N=64, gridsize=1), n_groups=10)
    cfg.model.N = 8
    try:
        params.cfg["gridsize"] = 3
        params.cfg["N"] = 256
        c = PtychoDataContainer.from_raw_data(raw, cfg, seed=0)
    finally:
        params.reset()
    assert c.X.shape == (10, 8, 8, 1)
