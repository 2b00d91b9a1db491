"""benchmarks/refine.py: its alternative simulator and a --quick smoke run (no pty-chi, no timings asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("refine.py", "bench_refine")


def test_fourier_upsampling_keeps_the_coarse_samples(bench):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 12)) + 1j * rng.normal(size=(16, 12))
    up = bench._fourier_upsample2(a)
    assert up.shape == (32, 24)
    np.testing.assert_allclose(up[::2, ::2], a, atol=1e-12)
    # a real array stays real (the Nyquist terms are split symmetrically)
    r = rng.normal(size=(10, 10))
    assert np.abs(bench._fourier_upsample2(r).imag).max() < 1e-12


def test_quick_run_writes_rows_and_the_flat_refinement_improves(bench, tmp_path):
    out = tmp_path / "refine.json"
    assert bench.main(["--quick", "--no-ptychi", "--scenario", "reference", "no-inverse-crime",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    names = [s["name"] for s in res["scenarios"]]
    assert names == ["synthetic", "no-inverse-crime"]
    for sc in res["scenarios"]:
        rows = {r["method"]: r for r in sc["rows"]}
        flat = rows["pinn-jax gaussian (flat)"]
        assert [c["pass"] for c in flat["curve"]] == list(range(6))
        assert flat["curve"][-1]["ssim"][0] > flat["curve"][0]["ssim"][0] + 0.1
        assert rows["pinn-jax gaussian (network)"]["status"] == "no model given"
        assert rows["pty-chi LSQML (gaussian)"]["status"].startswith("disabled")
    checks = res["scenarios"][1]["checks"]
    # the other forward model differs from the solver's by clearly more than the Poisson noise,
    # but not grossly; the given (bilinear-simulated) data match the solver's model to the floor
    assert checks["poisson_floor"] < checks["residual_model_vs_clean"] < 0.2
    assert checks["residual_model_vs_reference_data"] < 3 * checks["poisson_floor"]


def test_a_photon_count_scan_is_taken_as_it_is_and_gets_the_low_dose_rows(bench, tmp_path):
    """A `pinn-jax simulate` file (diff3d in sqrt(counts), metadata diff_units "counts") keeps its
    amplitudes and its nominal photon count; its gain s scales the solver's model of the ground
    truth onto the data (the residual is the Poisson noise, ~0.5 / sqrt(mean counts per pixel)
    ~ 0.16 here; a wrong scale by 2x would give > 0.5); at <= 1e6 photons the scan gets the
    low-dose rows, the full-batch recipe first."""
    from pinn_jax import simulate
    from pinn_jax.refine import model_amplitudes

    _, test = simulate.simulate_to_npz(tmp_path / "data", N=32, object_size=96, n_images=128, nphotons=1e4, seed=2)
    scan = bench.load_reference(test)
    with np.load(test) as z:
        np.testing.assert_array_equal(scan.amp, z["diff3d"].astype(np.float32))
    assert scan.info["nphotons"] == 1e4 and "1e+04" in scan.name
    model = np.asarray(model_amplitudes(scan.gt, scan.probe, scan.positions), np.float64)
    assert np.linalg.norm(scan.s * model - scan.amp) / np.linalg.norm(scan.amp) < 0.3
    out = tmp_path / "refine.json"
    assert bench.main(["--quick", "--no-ptychi", "--test", str(test), "--scenario", "reference",
                       "--out", str(out)]) == 0
    rows = [r["method"] for r in json.loads(out.read_text())["scenarios"][0]["rows"]]
    assert rows[0].startswith("pinn-jax poisson, full_batch_from 3, tv_weight 0.05")
    assert "pinn-jax poisson (flat)" in rows and "pty-chi LSQML (poisson)" in rows


def test_quick_run_with_a_model_times_the_seed_and_the_refinement_after_the_first_look(bench, tmp_path):
    """With --model_path: the network-seeded row's clock includes the network's prediction, the
    'first look given' row starts from the same object with the prediction outside its clock
    (recorded as first_look_s). An untrained N=64 model on a 48-position scan: the rows' arithmetic, not its quality."""
    from backend_api import params as legacy
    from backend_api.config import ModelConfig
    from pinn_jax import checkpoint, simulate
    from pinn_jax.model import build_model
    from pinn_jax.probe import default_probe

    model = build_model(ModelConfig(N=64, gridsize=1, n_filters_scale=1), np.asarray(default_probe(64)), 988.2,
                        seed=3)
    checkpoint.save_model(model, tmp_path / "model")
    legacy.reset()
    _, scan = simulate.simulate_to_npz(tmp_path / "sim", N=64, object_size=128, n_images=96)
    out = tmp_path / "refine.json"
    assert bench.main(["--quick", "--no-ptychi", "--test", str(scan), "--scenario", "reference",
                       "--model_path", str(tmp_path / "model"), "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["scenarios"][0]["rows"]}
    seeded, given = rows["pinn-jax gaussian (network)"], rows["pinn-jax gaussian (network, first look given)"]
    assert seeded["start"] == "network" and given["start"] == "first look"
    assert [c["pass"] for c in given["curve"]] == [c["pass"] for c in seeded["curve"]] == list(range(6))
    # both start from the same network object, scored alike
    assert given["curve"][0]["ssim"] == pytest.approx(seeded["curve"][0]["ssim"], abs=1e-6)
    assert given["first_look_s"] > 0 and "first_look_s" not in seeded
    # the seeded clock carries the prediction; the first-look clock starts at the refinement
    assert seeded["setup_s"] > given["setup_s"]
