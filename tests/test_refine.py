"""pinn_jax.refine: the training forward model optimised over the object (issue 11's core)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pinn_jax import metrics, simulate
from pinn_jax.refine import RefineOptions, data_misfit, make_refine_step, model_amplitudes, refine_object


@pytest.fixture(scope="module")
def scan():
    """200 positions over a 128 px 'lines' object, N=64, 1e9 photons (Poisson), and the same
    scan without noise."""
    _, test = simulate.simulate_dataset(N=64, object_size=128, n_images=400, kind="lines", nphotons=1e9, seed=3)
    _, clean = simulate.simulate_dataset(N=64, object_size=128, n_images=400, kind="lines", nphotons=1e9, seed=3,
                                         poisson=False)
    pos = np.column_stack([test.xcoords, test.ycoords])
    return {"obj": np.asarray(test.objectGuess), "pos": pos, "probe": np.asarray(test.probeGuess),
            "amp": np.asarray(test.diff3d), "clean": np.asarray(clean.diff3d)}


def _ssim(obj, scan):
    m = metrics.eval_reconstruction(obj, scan["obj"], positions=scan["pos"], M=20)
    return m["ssim"]


def test_the_model_reproduces_the_simulator(scan):
    """The refinement's forward model is the simulator's: on the true object, times the photon
    scale, it gives the noiseless data (float32 FFTs of 64x64: rtol 1e-4 of the peak)."""
    a = np.asarray(model_amplitudes(scan["obj"], scan["probe"], scan["pos"][:16]), np.float64)
    want = scan["clean"][:16].astype(np.float64)
    s = np.sum(a * want) / np.sum(a * a)
    np.testing.assert_allclose(s * a, want, rtol=0, atol=1e-4 * want.max())


def test_ground_truth_is_a_fixed_point(scan):
    """From the true object on noiseless data the misfit is ~0 and a few passes barely move
    the object (relative change < 1e-3; Adam's first steps are bounded by the learning rate)."""
    r = refine_object(scan["clean"], scan["pos"], scan["probe"], scan["obj"],
                      RefineOptions(iterations=3, learning_rate=1e-4))
    gt = scan["obj"] * r.scale
    region = metrics.scan_region_mask(scan["pos"], scan["obj"].shape, 20)
    change = np.linalg.norm((r.obj - gt)[region]) / np.linalg.norm(gt[region])
    assert change < 1e-3, change
    # Adam's steps have size ~lr whatever the gradient, so the misfit leaves its ~0 start a
    # little; it stays a tiny fraction of the data's mean squared amplitude
    assert r.history[0] < 1e-6 * np.mean(scan["clean"] ** 2)
    assert r.history[-1] < 1e-4 * np.mean(scan["clean"] ** 2)


@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
def test_flat_start_converges(scan, noise):
    """A flat start reaches amplitude and phase SSIM >= 0.9 in 10 passes; the misfit falls."""
    r = refine_object(scan["amp"], scan["pos"], scan["probe"], np.ones_like(scan["obj"]),
                      RefineOptions(iterations=10, learning_rate=0.05, noise=noise))
    h = np.asarray(r.history)
    assert np.all(np.isfinite(h)) and h[-1] < 0.1 * h[0] if noise == "gaussian" else h[-1] < h[0]
    assert np.mean(np.diff(h) < 0) >= 0.8  # decreasing on average (minibatch noise allowed)
    amp_ssim, phase_ssim = _ssim(r.obj, scan)
    assert amp_ssim >= 0.9 and phase_ssim >= 0.9, (amp_ssim, phase_ssim)


def test_minibatch_order_is_deterministic_for_a_seed(scan):
    kw = dict(iterations=1, batch_size=50)
    a = refine_object(scan["amp"], scan["pos"], scan["probe"], np.ones_like(scan["obj"]), RefineOptions(seed=1, **kw))
    b = refine_object(scan["amp"], scan["pos"], scan["probe"], np.ones_like(scan["obj"]), RefineOptions(seed=1, **kw))
    c = refine_object(scan["amp"], scan["pos"], scan["probe"], np.ones_like(scan["obj"]), RefineOptions(seed=2, **kw))
    np.testing.assert_array_equal(a.obj, b.obj)
    assert not np.array_equal(a.obj, c.obj)


def test_step_with_and_without_jit_agree(scan):
    """One update jitted and eagerly: the gradients are float32 sums of 8 x 64 x 64 terms in
    another order; Adam's first step is lr * g / (|g| + 1e-8), so where g is tiny the step's
    size (<= lr) is ill-conditioned: atol 1e-3 * lr on the object, rtol 1e-4 on the loss."""
    opt = optax.adam(0.01)
    H, W = scan["obj"].shape
    x0 = jnp.stack([jnp.ones((H, W)), jnp.zeros((H, W))]).astype(jnp.float32)
    args = (jnp.asarray(scan["probe"], jnp.complex64), jnp.asarray(scan["pos"][:8], jnp.float32),
            jnp.asarray(scan["amp"][:8]))
    step = make_refine_step(opt, "gaussian")
    xj, _, lj = step(jnp.array(x0), opt.init(x0), *args)
    with jax.disable_jit():
        xe, _, le = step(jnp.array(x0), opt.init(x0), *args)
    np.testing.assert_allclose(np.asarray(xj), np.asarray(xe), rtol=0, atol=1e-3 * 0.01)
    np.testing.assert_allclose(float(lj), float(le), rtol=1e-4)


def test_misfits():
    a = jnp.array([1.0, 2.0])
    assert float(data_misfit(a, a, "gaussian")) == 0.0
    # Poisson NLL is minimal at the measured counts
    m = jnp.array([2.0, 3.0])
    nll = [float(data_misfit(m * f, m, "poisson")) for f in (0.9, 1.0, 1.1)]
    assert nll[1] < nll[0] and nll[1] < nll[2]


def test_bad_inputs_are_refused_before_work(scan):
    flat = np.ones_like(scan["obj"])
    with pytest.raises(ValueError, match=r"positions: 1 of 200 patches do not lie inside the 128 x 128"):
        pos = scan["pos"].copy()
        pos[5] = [5.0, 60.0]
        refine_object(scan["amp"], pos, scan["probe"], flat)
    with pytest.raises(ValueError, match=r"probe: expected \(64, 64\)"):
        refine_object(scan["amp"], scan["pos"], scan["probe"][:32, :32], flat)
    with pytest.raises(ValueError, match=r"positions: expected \(200, 2\)"):
        refine_object(scan["amp"], scan["pos"][:10], scan["probe"], flat)
    with pytest.raises(ValueError, match="RefineOptions.noise"):
        RefineOptions(noise="laplace")
    with pytest.raises(ValueError, match="RefineOptions.batch_size"):
        RefineOptions(batch_size=0)


# ---------------------------------------------------------------------------------------------
# pinn-jax reconstruct


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    _, test = simulate.simulate_dataset(N=64, object_size=128, n_images=400, kind="lines", nphotons=1e9, seed=3)
    path = tmp_path_factory.mktemp("rc") / "test.npz"
    test.to_file(path)
    return path


def _main(capsys, argv):
    from pinn_jax.cli import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_cli_reconstruct_from_a_flat_start(scan_file, tmp_path, capsys):
    import json

    out = tmp_path / "out"
    rc, io = _main(capsys, ["reconstruct", "--test_data", scan_file, "--iterations", 6, "--output_dir", out])
    assert rc == 0, io.err
    for name in ("reconstructed_amplitude.png", "reconstructed_phase.png", "reconstruction.npz", "history.json",
                 "convergence.png", "metrics.json"):
        assert (out / name).is_file(), name
    hist = json.loads((out / "history.json").read_text())["loss"]
    assert len(hist) == 7 and hist[-1] < 0.1 * hist[0]
    m = json.loads((out / "metrics.json").read_text())
    assert m["ssim"]["amplitude"] >= 0.9 and m["ssim"]["phase"] >= 0.9, m["ssim"]
    with np.load(out / "reconstruction.npz") as z:
        assert z["object_on_grid"].shape == (128, 128) and np.isfinite(z["object_on_grid"]).all()
    assert "from a flat object" in io.out


def test_cli_reconstruct_seeded_by_a_model(scan_file, tmp_path, capsys):
    from backend_api.config import ModelConfig
    from pinn_jax import checkpoint
    from pinn_jax.model import build_model
    from pinn_jax.probe import default_probe

    net = build_model(ModelConfig(N=64, gridsize=1, n_filters_scale=1), np.asarray(default_probe(64)), 988.2, seed=1)
    checkpoint.save_model(net, tmp_path / "model", None)
    out = tmp_path / "out"
    rc, io = _main(capsys, ["reconstruct", "--test_data", scan_file, "--model_path", tmp_path / "model",
                            "--iterations", 2, "--output_dir", out])
    assert rc == 0, io.err
    assert "from the network's object" in io.out and (out / "reconstruction.npz").is_file()


def test_cli_reconstruct_refuses_bad_input_before_writing(tmp_path, capsys):
    from backend_api.raw_data import RawData

    rng = np.random.default_rng(0)
    raw = RawData.from_coords_without_pc(rng.uniform(40, 60, 8), rng.uniform(40, 60, 8),
                                         rng.random((8, 64, 64)).astype(np.float32),
                                         np.ones((64, 64), np.complex64), np.zeros(8, np.int64))
    no_truth = tmp_path / "no_truth.npz"
    raw.to_file(no_truth)
    out = tmp_path / "out"
    rc, io = _main(capsys, ["reconstruct", "--test_data", no_truth, "--output_dir", out])
    assert rc == 2 and "no objectGuess" in io.err and not out.exists()
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    rc, io = _main(capsys, ["reconstruct", "--test_data", text, "--output_dir", out])
    assert rc == 2 and str(text) in io.err and not out.exists()
    rc, io = _main(capsys, ["reconstruct", "--test_data", no_truth, "--iterations", 0, "--output_dir", out])
    assert rc == 2 and "--iterations" in io.err and not out.exists()
