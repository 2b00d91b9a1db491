"""pinn_jax.refine: the training forward model optimised over the object (issue 11's core)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pinn_jax import metrics, simulate
from pinn_jax.refine import RefineOptions, data_misfit, make_refine_step, model_amplitudes, refine_object
from pinn_jax.refine_steps import hyper


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
    gt = scan["obj"]  # the result is in the initial object's units
    region = metrics.scan_region_mask(scan["pos"], scan["obj"].shape, 20)
    change = np.linalg.norm((r.obj - gt)[region]) / np.linalg.norm(gt[region])
    assert change < 1e-3, change
    # Adam's steps have size ~lr whatever the gradient, so the misfit leaves its ~0 start a
    # little; it stays a tiny fraction of the data's mean squared amplitude
    assert r.history[0] < 1e-6 * np.mean(scan["clean"] ** 2)
    assert r.history[-1] < 1e-4 * np.mean(scan["clean"] ** 2)


@pytest.mark.parametrize("optimizer", ["pie", "adam"])
@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
def test_flat_start_converges(scan, noise, optimizer):
    """A flat start reaches amplitude and phase SSIM >= 0.9 in 10 passes with either update at
    its default step; the misfit falls."""
    r = refine_object(scan["amp"], scan["pos"], scan["probe"], np.ones_like(scan["obj"]),
                      RefineOptions(iterations=10, noise=noise, optimizer=optimizer))
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
    opt = optax.scale_by_adam()   # the step size is the traced hp["step"]: optax.adam(0.01)
    H, W = scan["obj"].shape
    x0 = jnp.stack([jnp.ones((H, W)), jnp.zeros((H, W))]).astype(jnp.float32)
    args = (jnp.asarray(scan["probe"], jnp.complex64), jnp.asarray(scan["pos"][:8], jnp.float32),
            jnp.asarray(scan["amp"][:8]), hyper(0.01))
    step = make_refine_step(opt, "gaussian")
    xj, _, lj = step(jnp.array(x0), opt.init(x0), *args)
    with jax.disable_jit():
        xe, _, le = step(jnp.array(x0), opt.init(x0), *args)
    np.testing.assert_allclose(np.asarray(xj), np.asarray(xe), rtol=0, atol=1e-3 * 0.01)
    np.testing.assert_allclose(float(lj), float(le), rtol=1e-4)


def test_preconditioned_step_with_and_without_jit_agree(scan):
    """The PIE step (SGD on the illumination-preconditioned gradient): its size is proportional
    to the gradient, so jit and eager agree to float32 reduction-order round-off (the sums over
    8 x 64 x 64 terms: rtol 1e-4 of the step's largest element)."""
    opt = optax.identity()
    H, W = scan["obj"].shape
    x0 = jnp.stack([jnp.ones((H, W)), jnp.zeros((H, W))]).astype(jnp.float32)
    args = (jnp.asarray(scan["probe"], jnp.complex64), jnp.asarray(scan["pos"][:8], jnp.float32),
            jnp.asarray(scan["amp"][:8]), hyper(1.0, alpha=0.1))
    step = make_refine_step(opt, "gaussian", preconditioned=True)
    xj, _, _ = step(jnp.array(x0), opt.init(x0), *args)
    with jax.disable_jit():
        xe, _, _ = step(jnp.array(x0), opt.init(x0), *args)
    dj, de = np.asarray(xj) - np.asarray(x0), np.asarray(xe) - np.asarray(x0)
    np.testing.assert_allclose(dj, de, rtol=0, atol=1e-4 * np.abs(de).max())


def test_illumination_is_the_adjoint_of_the_extraction(scan):
    """<extract(o), |P|^2> = <o, illumination> for a random real o (float32 sums: rtol 1e-5),
    and a single position at an integer centre puts |P|^2 on its patch."""
    from pinn_jax.refine import illumination
    from pinn_jax.geometry import extract_patch as _extract_one

    rng = np.random.default_rng(0)
    o = rng.random(scan["obj"].shape).astype(np.float32)
    pos = jnp.asarray(scan["pos"][:5], jnp.float32)
    P2 = np.abs(scan["probe"]) ** 2
    w = np.asarray(illumination(jnp.asarray(scan["probe"]), pos, o.shape))
    op = jnp.pad(jnp.asarray(o), ((0, 1), (0, 1)))
    lhs = sum(float(np.sum(np.asarray(_extract_one(op, p, 64)) * P2)) for p in pos)
    assert np.sum(o * w) == pytest.approx(lhs, rel=1e-5)
    w1 = np.asarray(illumination(jnp.asarray(scan["probe"]), jnp.array([[40.0, 50.0]]), (128, 128)))
    np.testing.assert_allclose(w1[18:82, 8:72], P2, rtol=1e-5, atol=1e-6 * P2.max())
    assert w1.sum() == pytest.approx(P2.sum(), rel=1e-5)


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


def test_cli_reconstruct_low_dose_recipe(scan_file, tmp_path, capsys):
    """--full_batch_from/--full_batch_momentum/--tv_weight reach the refinement: the run equals
    refine_object with those options (same arrays: bitwise), the history has a value per pass."""
    import json

    from backend_api.raw_data import RawData

    out = tmp_path / "out"
    rc, io = _main(capsys, ["reconstruct", "--test_data", scan_file, "--iterations", 3, "--noise", "poisson",
                            "--full_batch_from", 1, "--full_batch_momentum", 0.8, "--tv_weight", 0.05,
                            "--output_dir", out, "--no_progress"])
    assert rc == 0, io.err
    assert len(json.loads((out / "history.json").read_text())["loss"]) == 4
    raw = RawData.from_file(scan_file)
    want = refine_object(raw.diff3d, np.column_stack([raw.xcoords, raw.ycoords]), raw.probeGuess,
                         np.ones(np.shape(raw.objectGuess), np.complex64),
                         RefineOptions(iterations=3, noise="poisson", full_batch_from=1, full_batch_momentum=0.8,
                                       tv_weight=0.05))
    with np.load(out / "reconstruction.npz") as z:
        np.testing.assert_array_equal(z["object_on_grid"], want.obj)
    rc, io = _main(capsys, ["reconstruct", "--test_data", scan_file, "--full_batch_momentum", 1.5,
                            "--output_dir", tmp_path / "bad"])
    assert rc == 2 and "--full_batch_momentum" in io.err and not (tmp_path / "bad").exists()


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
    xs = rng.uniform(40, 60, 8)
    xs[3] = 20.0  # a 64 px patch centred at x=20 reaches x=-12
    raw = RawData.from_coords_without_pc(xs, rng.uniform(40, 60, 8), rng.random((8, 64, 64)).astype(np.float32),
                                         np.ones((64, 64), np.complex64), np.zeros(8, np.int64))
    no_grid = tmp_path / "no_grid.npz"
    raw.to_file(no_grid)
    out = tmp_path / "out"
    rc, io = _main(capsys, ["reconstruct", "--test_data", no_grid, "--output_dir", out])
    assert rc == 2 and "no objectGuess" in io.err and "#3 at x=20" in io.err and not out.exists()
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    rc, io = _main(capsys, ["reconstruct", "--test_data", text, "--output_dir", out])
    assert rc == 2 and str(text) in io.err and not out.exists()
    rc, io = _main(capsys, ["reconstruct", "--test_data", no_grid, "--iterations", 0, "--output_dir", out])
    assert rc == 2 and "--iterations" in io.err and not out.exists()
    rc, io = _main(capsys, ["reconstruct", "--test_data", no_grid, "--gauge", "tilt", "--output_dir", out])
    assert rc == 2 and "--gauge" in io.err and not out.exists()
    rc, io = _main(capsys, ["reconstruct", "--test_data", no_grid, "--probe_learning_rate", "-1",
                            "--output_dir", out])
    assert rc == 2 and "--probe_learning_rate" in io.err and not out.exists()


def test_cli_reconstruct_without_ground_truth_uses_the_positions_grid(tmp_path, capsys):
    """Measured data have no objectGuess: the grid is the smallest holding every patch, and no
    metrics.json is written."""
    from backend_api.raw_data import RawData

    _, test = simulate.simulate_dataset(N=64, object_size=128, n_images=200, kind="lines", nphotons=1e9, seed=3)
    raw = RawData.from_coords_without_pc(test.xcoords, test.ycoords, test.diff3d, test.probeGuess,
                                         np.zeros(len(test.xcoords), np.int64))
    path = tmp_path / "measured.npz"
    raw.to_file(path)
    out = tmp_path / "out"
    rc, io = _main(capsys, ["reconstruct", "--test_data", path, "--iterations", 2, "--no_progress",
                            "--output_dir", out])
    assert rc == 0, io.err
    lo = np.floor(np.column_stack([test.xcoords, test.ycoords]) - 32).max(axis=0) + 64
    with np.load(out / "reconstruction.npz") as z:
        assert z["object_on_grid"].shape == (int(lo[1]), int(lo[0]))
        np.testing.assert_array_equal(z["positions"], np.column_stack([test.xcoords, test.ycoords]))
    assert not (out / "metrics.json").exists() and (out / "convergence.png").is_file()


def test_cli_reconstruct_tracks_quality_per_pass_and_refines_positions(scan_file, tmp_path, capsys):
    import json

    out = tmp_path / "out"
    rc, io = _main(capsys, ["reconstruct", "--test_data", scan_file, "--iterations", 4, "--refine_positions",
                            "--gauge", "offset", "--output_dir", out])
    assert rc == 0, io.err
    hist = json.loads((out / "history.json").read_text())
    assert [m["pass"] for m in hist["metrics"]] == [0, 1, 2, 3, 4] and len(hist["seconds"]) == 5
    ssim = [m["ssim"]["amplitude"] for m in hist["metrics"]]
    assert ssim[-1] > ssim[0] + 0.3
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["passes"] == 4 and summary["ssim"]["amplitude"] == ssim[-1] and "start" in summary
    assert "refine" in io.err  # the progress bar
    with np.load(out / "reconstruction.npz") as z:
        assert z["positions"].shape == (200, 2) and z["probe"].shape == (64, 64)


def test_cli_infer_with_refinement(scan_file, tmp_path, capsys):
    """infer --refine_iterations K: the network's object seeds K passes; the refined object is
    the result (reconstructed_*.png, object_on_grid), the network's is kept beside it."""
    import json

    from backend_api.config import ModelConfig
    from pinn_jax import checkpoint
    from pinn_jax.model import build_model
    from pinn_jax.probe import default_probe

    net = build_model(ModelConfig(N=64, gridsize=1, n_filters_scale=1), np.asarray(default_probe(64)), 988.2, seed=1)
    checkpoint.save_model(net, tmp_path / "model", None)
    out = tmp_path / "out"
    rc, io = _main(capsys, ["infer", "--model_path", tmp_path / "model", "--test_data", scan_file,
                            "--refine_iterations", 3, "--output_dir", out])
    assert rc == 0, io.err
    for name in ("reconstructed_amplitude.png", "network_amplitude.png", "network_phase.png", "convergence.png",
                 "history.json", "metrics.json"):
        assert (out / name).is_file(), name
    with np.load(out / "reconstruction.npz") as z:
        assert z["object_on_grid"].shape == z["network_object_on_grid"].shape == (128, 128)
        assert not np.allclose(z["object_on_grid"], z["network_object_on_grid"])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["passes"] == 3 and summary["ssim"]["amplitude"] > summary["start"]["ssim"]["amplitude"]
    rc, io = _main(capsys, ["infer", "--model_path", tmp_path / "model", "--test_data", scan_file,
                            "--refine_iterations", "-1", "--output_dir", tmp_path / "bad"])
    assert rc == 2 and "--refine_iterations" in io.err and not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# optional probe / position refinement, gauge fix


def _rms_position_error(found, true):
    return float(np.sqrt(np.mean(np.sum((np.asarray(found) - true) ** 2, axis=1))))


def test_defaults_return_the_input_probe_and_positions(scan):
    r = refine_object(scan["amp"], scan["pos"], scan["probe"], np.ones_like(scan["obj"]), RefineOptions(iterations=1))
    np.testing.assert_array_equal(r.probe, scan["probe"].astype(np.complex64))
    np.testing.assert_array_equal(r.positions, scan["pos"])
    assert r.pass_metrics == []


def test_position_refinement_recovers_perturbed_positions(scan):
    """Positions off by up to 1.5 px (zero mean: a common shift only translates the object):
    with refine_positions the rms error falls from ~1.2 px to < 0.2 px and the object beats the
    fixed-position solve; the misfit ends far lower."""
    rng = np.random.default_rng(0)
    err = rng.uniform(-1.5, 1.5, scan["pos"].shape)
    err -= err.mean(axis=0)
    bad = np.clip(scan["pos"] + err, 32, 128 + 1 - 32 - 1e-3)
    flat = np.ones_like(scan["obj"])
    fixed = refine_object(scan["amp"], bad, scan["probe"], flat, RefineOptions(iterations=12))
    moved = refine_object(scan["amp"], bad, scan["probe"], flat, RefineOptions(iterations=12, refine_positions=True))
    assert _rms_position_error(bad, scan["pos"]) > 0.8
    assert _rms_position_error(moved.positions, scan["pos"]) < 0.2
    assert moved.history[-1] < 0.1 * fixed.history[-1]
    assert _ssim(moved.obj, scan)[0] > _ssim(fixed.obj, scan)[0] + 0.02
    # every refined position still lies where the extraction accepts it
    assert np.all(moved.positions >= 32) and np.all(moved.positions < 128 + 1 - 32)


def test_position_corrections_point_back_to_the_truth(scan):
    """On the true object, the Gauss-Newton step from a position shifted by (0.3, -0.2) px points
    back to the truth: one step halves the error at least (bilinear interpolation makes the model
    piecewise linear, so one linearisation is not exact) and three more land within 0.05 px."""
    from pinn_jax.refine import position_corrections

    gt = scan["obj"] * refine_object(scan["clean"][:8], scan["pos"][:8], scan["probe"], scan["obj"],
                                     RefineOptions(iterations=0)).scale
    shifted = scan["pos"][:8] + np.array([0.3, -0.2])
    d = np.asarray(position_corrections(gt, scan["probe"], shifted, scan["clean"][:8], max_step=1.0, damping=1e-3))
    first = np.linalg.norm(shifted + d - scan["pos"][:8], axis=1)
    assert np.all(first < 0.5 * np.hypot(0.3, 0.2)), first
    for _ in range(3):
        shifted = shifted + np.asarray(position_corrections(gt, scan["probe"], shifted, scan["clean"][:8],
                                                            max_step=1.0, damping=1e-3))
    np.testing.assert_allclose(shifted, scan["pos"][:8], atol=0.05)


def test_probe_refinement_corrects_a_wrong_probe(scan):
    """Start from the probe defocused (quadratic phase) and blurred (relative error ~0.12):
    fixed, the object absorbs the error; refined, the probe error and misfit fall and the object's
    SSIM reaches >= 0.98."""
    from scipy.ndimage import gaussian_filter

    P = scan["probe"]
    N = P.shape[0]
    v, u = np.mgrid[0:N, 0:N] - N / 2
    wrong = P * np.exp(1j * 1.5 * (u ** 2 + v ** 2) / (N / 2) ** 2)
    wrong = (gaussian_filter(wrong.real, 1.5) + 1j * gaussian_filter(wrong.imag, 1.5)).astype(np.complex64)

    def probe_error(q):
        g = np.vdot(q, P) / np.vdot(q, q)
        return float(np.linalg.norm(g * q - P) / np.linalg.norm(P))

    flat = np.ones_like(scan["obj"])
    fixed = refine_object(scan["amp"], scan["pos"], wrong, flat, RefineOptions(iterations=15))
    fitted = refine_object(scan["amp"], scan["pos"], wrong, flat, RefineOptions(iterations=15, refine_probe=True))
    assert probe_error(fitted.probe) < 0.5 * probe_error(wrong)
    assert fitted.history[-1] < 0.1 * fixed.history[-1]
    amp_ssim, phase_ssim = _ssim(fitted.obj, scan)
    assert amp_ssim >= 0.98 and phase_ssim >= 0.98 and amp_ssim > _ssim(fixed.obj, scan)[0]


def test_probe_refinement_keeps_the_truth(scan):
    """From the true object and probe on noiseless data, refining both barely moves them."""
    r = refine_object(scan["clean"], scan["pos"], scan["probe"], scan["obj"],
                      RefineOptions(iterations=2, learning_rate=1e-4, refine_probe=True, probe_learning_rate=1e-4,
                                    probe_start_pass=0))
    P = scan["probe"]
    assert np.linalg.norm(r.probe - P) / np.linalg.norm(P) < 1e-3


@pytest.mark.parametrize("mode", ["offset", "ramp"])
def test_gauge_fix_moves_the_phase_into_the_probe_and_keeps_the_data(scan, mode):
    """An object with a known phase ramp (0.03, -0.02) rad/px and offset 0.7 rad: the gauge fix
    removes them (fixing the tilted and the original object gives the same result) and the modelled data are unchanged: exactly
    for the offset (float32 FFT round-off, rtol 1e-5 of the peak); for the ramp, to the bilinear
    extraction's O(a**2) interpolation error (1e-3 of the peak)."""
    from pinn_jax.refine import fix_phase_gauge

    H, W = scan["obj"].shape
    yy, xx = np.mgrid[0:H, 0:W]
    a, b, c = (0.03, -0.02, 0.7) if mode == "ramp" else (0.0, 0.0, 0.7)
    tilted = (scan["obj"] * np.exp(1j * (a * xx + b * yy + c))).astype(np.complex64)
    mask = metrics.scan_region_mask(scan["pos"], (H, W), 20)
    obj, probe = fix_phase_gauge(tilted, scan["probe"], mask, mode)
    before = np.asarray(model_amplitudes(tilted, scan["probe"], scan["pos"][:16]))
    after = np.asarray(model_amplitudes(obj, probe, scan["pos"][:16]))
    tol = 1e-5 if mode == "offset" else 1e-3
    np.testing.assert_allclose(after, before, rtol=0, atol=tol * before.max())
    # the fix is what removes the ambiguity: the tilted object and the original, both fixed,
    # agree (up to float32 round-off of the phase factors)
    reference, _ = fix_phase_gauge(scan["obj"], scan["probe"], mask, mode)
    residual = np.angle(obj[mask] * np.conj(reference[mask]))
    assert np.max(np.abs(residual)) < 1e-4
    unchanged = fix_phase_gauge(tilted, scan["probe"], mask, "none")
    np.testing.assert_array_equal(unchanged[0], tilted)


def test_refine_with_gauge_and_progress(scan, capsys):
    """gauge='offset' returns an object whose mean phase over the scan is ~0; progress=True
    draws a bar on stderr."""
    r = refine_object(scan["amp"], scan["pos"], scan["probe"], np.ones_like(scan["obj"]) * np.exp(1j * 0.9),
                      RefineOptions(iterations=2, gauge="offset"), progress=True)
    mask = metrics.scan_region_mask(scan["pos"], scan["obj"].shape, 20)
    assert abs(np.angle(np.sum(r.obj[mask]))) < 1e-3
    assert "refine" in capsys.readouterr().err


def test_new_options_are_checked():
    for kw, name in [(dict(gauge="tilt"), "gauge"), (dict(refine_probe="yes"), "refine_probe"),
                     (dict(probe_learning_rate=0), "probe_learning_rate"),
                     (dict(max_position_shift=float("nan")), "max_position_shift"),
                     (dict(position_start_pass=-1), "position_start_pass")]:
        with pytest.raises(ValueError, match=f"RefineOptions.{name}"):
            RefineOptions(**kw)


def test_illumination_footprint_counts_the_patches_covering_each_pixel():
    from pinn_jax.refine import illumination_footprint

    rng = np.random.default_rng(1)
    pos = rng.uniform(-5, 45, (30, 2))
    N, shape = 16, (40, 50)
    want = np.zeros(shape)
    for x, y in pos:
        x0, y0 = int(np.floor(x - N / 2)), int(np.floor(y - N / 2))
        want[max(y0, 0):max(y0 + N, 0), max(x0, 0):max(x0 + N, 0)] += 1
    np.testing.assert_array_equal(illumination_footprint(pos, N, shape), want)


def test_backend_refine_on_grid_leaves_out_patches_off_the_grid(scan):
    """The Backend protocol's refine_on_grid (what the ptychodus child calls): positions whose
    patch leaves the grid are counted and left out instead of refusing the whole scan."""
    from pinn_jax.backend import JaxBackend

    pos = scan["pos"].copy()
    pos[:3] = [[5.0, 60.0], [60.0, 125.0], [10.0, 10.0]]
    obj, footprint, info = JaxBackend.refine_on_grid(scan["amp"], pos, scan["probe"], np.ones_like(scan["obj"]),
                                                     iterations=3)
    assert info["positions_used"] == 197 and info["positions_outside_grid"] == 3
    assert info["misfit"][1] < info["misfit"][0]
    assert obj.shape == footprint.shape == scan["obj"].shape and footprint.max() > 1
    with pytest.raises(ValueError, match="none of the 2 patches"):
        JaxBackend.refine_on_grid(scan["amp"][:2], pos[:2] * 0, scan["probe"], np.ones_like(scan["obj"]),
                                  iterations=1)
    # the low-dose options (ptychodus RefineTVWeight / RefineFullBatchFrom): the same as refine_object's
    low, _, info = JaxBackend.refine_on_grid(scan["amp"][3:], scan["pos"][3:], scan["probe"], np.ones_like(scan["obj"]),
                                             iterations=3, noise="poisson", tv_weight=0.05, full_batch_from=2)
    want = refine_object(scan["amp"][3:], scan["pos"][3:], scan["probe"], np.ones_like(scan["obj"]),
                         RefineOptions(iterations=3, noise="poisson", tv_weight=0.05, full_batch_from=2))
    np.testing.assert_array_equal(low, want.obj)


def test_learning_rate_decay_schedule():
    """The host-side step sizes follow optax's cosine decay (float64 here, float32 there: rtol 1e-6)."""
    from pinn_jax.refine import _step_sizes

    np.testing.assert_array_equal(_step_sizes(0.5, 1.0, 100), np.full(100, 0.5))
    steps = _step_sizes(0.5, 0.1, 100)
    assert steps[0] == pytest.approx(0.5) and steps[50] == pytest.approx(0.5 * (0.1 + 0.9 * 0.5))
    sched = optax.cosine_decay_schedule(0.5, 100, alpha=0.1)
    np.testing.assert_allclose(steps, [float(sched(i)) for i in range(100)], rtol=1e-6)


def test_total_variation_prior_helps_at_low_dose():
    """At 1e4 photons per pattern, plain Poisson refinement fits the noise; a TV prior
    (tv_weight 0.03) with a decaying step gives a better object (200 positions, 15 passes; the
    512-position figures are in benchmarks/README.md)."""
    from pinn_jax.refine import total_variation

    _, low = simulate.simulate_dataset(N=64, object_size=128, n_images=400, kind="lines", nphotons=1e4, seed=3)
    pos = np.column_stack([low.xcoords, low.ycoords])
    flat = np.ones_like(low.objectGuess)
    kw = dict(iterations=15, noise="poisson", final_learning_rate=0.1)
    plain = refine_object(low.diff3d, pos, low.probeGuess, flat, RefineOptions(**kw))
    prior = refine_object(low.diff3d, pos, low.probeGuess, flat, RefineOptions(tv_weight=0.03, **kw))
    score = [metrics.eval_reconstruction(r.obj, low.objectGuess, positions=pos, M=20)["ssim"][0] for r in (plain, prior)]
    assert score[1] > score[0], score
    x = jnp.stack([jnp.ones((8, 8)), jnp.zeros((8, 8))])
    assert float(total_variation(x, 1e-3)) == pytest.approx(1e-3)  # flat: only eps


def test_exact_misfit_only_changes_the_history(scan):
    """exact_misfit re-evaluates every position after each pass; the default reports the pass's
    mean minibatch misfit (before each update, so it lags the exact one). Same object either
    way; both histories start at the same exact value and fall."""
    kw = dict(iterations=3, noise="poisson")
    flat = np.ones_like(scan["obj"])
    a = refine_object(scan["amp"], scan["pos"], scan["probe"], flat, RefineOptions(**kw))
    b = refine_object(scan["amp"], scan["pos"], scan["probe"], flat, RefineOptions(exact_misfit=True, **kw))
    np.testing.assert_array_equal(a.obj, b.obj)
    assert a.history[0] == b.history[0] and a.history[0] > 0  # the deviance: 0 only at a perfect fit
    assert a.history[-1] < a.history[0] and b.history[-1] < b.history[0]
    assert all(x >= y for x, y in zip(a.history[1:], b.history[1:]))  # minibatch misfits lag


def test_full_batch_sums_equal_one_batch_of_every_position(scan):
    """The chunked full-batch accumulation (48 positions a chunk, the last padded with weight-0
    rows) equals one chunk holding every position: misfit, object gradient and illumination
    are float32 sums of 200 x 64 x 64 terms in another order (rtol 1e-5 of the largest value),
    and a weight-0 row adds nothing."""
    from pinn_jax.refine_steps import as_real, make_gradient_accumulator, zero_sums

    n, B = 200, 48
    pos = scan["pos"][:n].astype(np.float32)
    amp = scan["amp"][:n]
    probe = jnp.asarray(scan["probe"], jnp.complex64)
    x = as_real(np.ones_like(scan["obj"]) * 0.9)
    acc = make_gradient_accumulator("poisson")
    shape = scan["obj"].shape
    whole = acc(zero_sums(shape, 64), x, probe, jnp.asarray(pos), jnp.asarray(amp), jnp.ones(n, jnp.float32))
    rows = np.concatenate([np.arange(n), np.arange(-n % B)])
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(-n % B, np.float32)])
    sums = zero_sums(shape, 64)
    for s in range(0, len(rows), B):
        idx = rows[s:s + B]
        sums = acc(sums, x, probe, jnp.asarray(pos[idx]), jnp.asarray(amp[idx]), jnp.asarray(weights[s:s + B]))
    for key in ("misfit", "gx", "w"):
        a, b = np.asarray(sums[key]), np.asarray(whole[key])
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max(), err_msg=key)


def _low_dose_scan():
    _, low = simulate.simulate_dataset(N=64, object_size=128, n_images=400, kind="lines", nphotons=1e4, seed=3)
    return low, np.column_stack([low.xcoords, low.ycoords])


def test_full_batch_passes_converge_where_minibatches_hover():
    """At 1e4 photons per pattern, Poisson misfit with a TV prior: after 3 minibatch passes,
    full-batch passes (gradient over every position, Nesterov momentum) settle at the
    maximum-a-posteriori object -- the exact misfit they report levels off and the object
    stops moving -- while constant-step minibatch passes keep jumping around it; the settled
    object is the better one (measured on the 512-position `pinn-jax simulate --nphotons 1e4
    --seed 3` scan: amplitude SSIM 0.914 -> 0.949; here 200 positions, 20 passes)."""
    low, pos = _low_dose_scan()
    flat = np.ones_like(low.objectGuess)
    kw = dict(iterations=20, noise="poisson", tv_weight=0.03)
    seen = {}

    def keep(tag):
        def cb(i, loss, obj):
            seen.setdefault(tag, []).append(obj)
        return cb

    mini = refine_object(low.diff3d, pos, low.probeGuess, flat, RefineOptions(**kw), on_pass_end=keep("mini"))
    full = refine_object(low.diff3d, pos, low.probeGuess, flat, RefineOptions(full_batch_from=3, **kw),
                         on_pass_end=keep("full"))
    region = metrics.scan_region_mask(pos, flat.shape, 20)

    def last_move(objs):
        return np.linalg.norm((objs[-1] - objs[-2])[region]) / np.linalg.norm(objs[-1][region])

    assert last_move(seen["full"]) < 0.1 * last_move(seen["mini"]), (last_move(seen["full"]), last_move(seen["mini"]))
    h = np.asarray(full.history)
    assert abs(h[-1] - h[-2]) < 1e-3 * h[-1]  # levelled off
    score = [metrics.eval_reconstruction(r.obj, low.objectGuess, positions=pos, M=20)["ssim"] for r in (mini, full)]
    assert score[1][0] > score[0][0] and score[1][1] > score[0][1], score


def test_full_batch_with_probe_and_position_refinement_runs():
    """The full-batch passes carry probe (Adam on the mean probe gradient) and position
    corrections (per chunk) too: finite results, the probe changes, positions move by at most
    max_position_shift."""
    low, pos = _low_dose_scan()
    r = refine_object(low.diff3d[:96], pos[:96], low.probeGuess, np.ones_like(low.objectGuess),
                      RefineOptions(iterations=4, batch_size=40, noise="poisson", full_batch_from=2, refine_probe=True,
                                    probe_start_pass=1, refine_positions=True, position_start_pass=1))
    assert np.isfinite(r.obj).all() and np.isfinite(r.probe).all() and np.isfinite(r.history).all()
    assert not np.array_equal(r.probe, np.asarray(low.probeGuess, np.complex64))
    assert np.linalg.norm(r.positions - pos[:96], axis=1).max() <= RefineOptions().max_position_shift + 1e-9


def test_a_second_refinement_compiles_nothing(scan):
    """Every jitted piece is built once per structure and takes its numbers (step sizes, TV
    weight, PIE alpha, positions count) as traced arguments: refining another scan of the same
    shapes with other numbers reuses the compiled steps."""
    from pinn_jax.refine_steps import cached_builder

    kw = dict(iterations=2, noise="poisson", full_batch_from=1, tv_weight=0.03)
    flat = np.ones_like(scan["obj"])
    refine_object(scan["amp"], scan["pos"], scan["probe"], flat, RefineOptions(**kw))
    builders_before = cached_builder.cache_info().currsize
    compiled = [cached_builder(kind, spec, "poisson", **extra)._cache_size()
                for kind, spec, extra in (("minibatch", ("sgd",), dict(with_tv=True, preconditioned=True)),
                                          ("accumulate", (), {}),
                                          ("full", ("nesterov", 0.9), dict(with_tv=True, preconditioned=True, N=64)))]
    assert all(c >= 1 for c in compiled), compiled  # (earlier tests may have compiled other shapes)
    refine_object(scan["amp"][::-1], scan["pos"][::-1], scan["probe"], flat * 2,
                  RefineOptions(learning_rate=0.7, pie_alpha=0.2, final_learning_rate=0.5, **{**kw, "tv_weight": 0.05}))
    assert cached_builder.cache_info().currsize == builders_before
    again = [cached_builder(kind, spec, "poisson", **extra)._cache_size()
             for kind, spec, extra in (("minibatch", ("sgd",), dict(with_tv=True, preconditioned=True)),
                                       ("accumulate", (), {}),
                                       ("full", ("nesterov", 0.9), dict(with_tv=True, preconditioned=True, N=64)))]
    assert again == compiled


def test_full_batch_options_are_checked():
    with pytest.raises(ValueError, match="full_batch_from"):
        RefineOptions(full_batch_from=-1)
    with pytest.raises(ValueError, match="full_batch_momentum"):
        RefineOptions(full_batch_momentum=1.0)
    assert RefineOptions(full_batch_from=0, full_batch_momentum=0.0).full_batch_from == 0
