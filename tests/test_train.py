"""Tests of pinn_jax.train: Keras-Adam equivalence, callback state machines, the epoch loop
(toy model), determinism, resume, NaN handling, multi-device equivalence."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pinn_jax import train as T
from pinn_jax.checkpoint import _RunCheckpoints

# ---------------------------------------------------------------------------------------------
# Keras Adam
# ---------------------------------------------------------------------------------------------


def keras_adam_numpy(params, grads_seq, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
    """Keras 3 Adam.update_step transcribed to numpy (float32), one param array."""
    p = params.astype(np.float32).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads_seq, start=1):
        alpha = np.float32(lr) * np.sqrt(np.float32(1) - np.float32(b2) ** t) / (np.float32(1) - np.float32(b1) ** t)
        m = m + (g - m) * np.float32(1 - b1)
        v = v + (np.square(g) - v) * np.float32(1 - b2)
        p = p - (m * alpha) / (np.sqrt(v) + np.float32(eps))
    return p


@pytest.mark.parametrize("use_jit", [False, True])
def test_keras_adam_matches_numpy_keras_update(use_jit):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(7, 3)).astype(np.float32)
    # Tiny gradients make the epsilon placement matter (|g| ~ eps).
    grads = [(rng.normal(size=p0.shape) * s).astype(np.float32) for s in (1e-7, 1e-6, 1.0, 1e-3, 10.0, 1e-8)]
    expected = keras_adam_numpy(p0, grads)

    opt = T.make_optimizer(1e-3)
    params = {"w": jnp.asarray(p0)}
    state = opt.init(params)

    def step(params, state, g):
        upd, state = opt.update({"w": g}, state, params)
        return jax.tree.map(lambda a, b: a + b, params, upd), state

    step = jax.jit(step) if use_jit else step
    for g in grads:
        params, state = step(params, state, jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=2e-6, atol=1e-9)


def test_keras_adam_differs_from_optax_adam_with_same_eps():
    """Documents why a custom transform is needed: optax.adam(eps=1e-7) is a different update."""
    import optax

    g = {"w": jnp.full((3,), 1e-7, jnp.float32)}
    p = {"w": jnp.zeros(3, jnp.float32)}
    ours, _ = T.keras_adam(1e-3).update(g, T.keras_adam(1e-3).init(p), p)
    theirs, _ = optax.adam(1e-3, eps=1e-7).update(g, optax.adam(1e-3, eps=1e-7).init(p), p)
    assert not np.allclose(np.asarray(ours["w"]), np.asarray(theirs["w"]), rtol=1e-3)
    # ...but it equals optax' bias-corrected form with eps / sqrt(1 - b2^t) (brief §2.7).
    expected = -1e-3 * 1e-7 / (1e-7 + 1e-7 / math.sqrt(1 - 0.999))
    np.testing.assert_allclose(np.asarray(ours["w"]), expected, rtol=1e-5)


def test_set_learning_rate_changes_update_scale():
    opt = T.make_optimizer(1e-3)
    p = {"w": jnp.ones(2)}
    s = opt.init(p)
    s2 = T.set_learning_rate(s, 5e-4)
    assert float(T.get_learning_rate(s2)) == pytest.approx(5e-4)
    u1, _ = opt.update({"w": jnp.ones(2)}, s, p)
    u2, _ = opt.update({"w": jnp.ones(2)}, s2, p)
    np.testing.assert_allclose(np.asarray(u2["w"]), 0.5 * np.asarray(u1["w"]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Callback state machines
# ---------------------------------------------------------------------------------------------


def run_plateau(values, lr=1e-3, **kw):
    s = T.PlateauState(lr=lr)
    lrs = []
    for v in values:
        lrs.append(s.lr)  # the rate used during that epoch
        s = T.plateau_update(s, v, **kw)
    return lrs, s


def test_plateau_halves_after_patience_epochs_without_improvement():
    lrs, s = run_plateau([5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0])
    # epochs 3 and 4 do not improve -> halved after epoch index 3; again after index 5.
    assert lrs == [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    assert s.lr == 2.5e-4 and s.best == 3.0 and s.wait == 0


def test_plateau_min_delta_and_floor():
    # Improvements smaller than min_delta (1e-4) do not count.
    lrs, _ = run_plateau([1.0, 1.0 - 5e-5, 1.0 - 9e-5, 0.5])
    assert lrs[-1] == 5e-4
    # The rate never goes below min_lr, and stops changing once there.
    lrs, s = run_plateau([1.0] * 12, lr=3e-4)
    assert min(lrs) == 1e-4 and s.lr == 1e-4
    assert lrs[:5] == [3e-4, 3e-4, 3e-4, 1.5e-4, 1.5e-4]


def test_plateau_ignores_missing_monitor_and_honours_cooldown():
    s = T.PlateauState(lr=1e-3)
    assert T.plateau_update(s, None) == s
    lrs, _ = run_plateau([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], cooldown=2)
    # reduced after index 2; two cooldown epochs reset wait; next reduction after index 6.
    assert lrs == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 5e-4]


def run_early(values, patience=3, **kw):
    s = T.EarlyStoppingState()
    for epoch, v in enumerate(values):
        s = T.early_stopping_update(s, v, epoch, patience=patience, **kw)
        if s.stop:
            return epoch, s
    return None, s


def test_early_stopping_after_patience_epochs_without_improvement():
    stopped, s = run_early([3.0, 2.0, 2.0, 2.5, 2.0, 1.0])
    assert stopped == 4 and s.best == 2.0
    stopped, _ = run_early([3.0, 2.0, 1.9, 1.8, 1.7, 1.6])
    assert stopped is None


def test_early_stopping_min_delta_and_epoch_zero():
    stopped, _ = run_early([1.0, 0.99, 0.98, 0.97], min_delta=0.05)
    assert stopped == 3
    # patience 0 never stops at epoch 0 (Keras: epoch > 0).
    stopped, _ = run_early([1.0, 2.0], patience=0)
    assert stopped == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=30))
def test_plateau_lr_is_monotone_and_floored(values):
    lrs, s = run_plateau(values)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.lr >= 1e-4 - 1e-12


def test_validation_split_index_matches_keras_reference():
    assert T.validation_split_index(1024, 0.05) == 973  # reference run: 973 train + 51 val
    assert T.validation_split_index(64, 0.05) == 61
    assert T.validation_split_index(10, 0.0) == 10
    with pytest.raises(ValueError, match="validation_split"):
        T.validation_split_index(10, 1.5)


# ---------------------------------------------------------------------------------------------
# The loop on a toy model
# ---------------------------------------------------------------------------------------------


def toy_problem(n=100, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=d).astype(np.float32)
    y = (x @ w + 0.5).astype(np.float32)
    params = {"w": jnp.zeros(d, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    rest = {"scale": jnp.ones((), jnp.float32)}
    return {"x": x, "y": y}, params, rest, w


def toy_loss(params, rest, batch, key):
    r = batch["x"] @ params["w"] + rest["scale"] * params["b"] - batch["y"]
    return r**2, {"mae": jnp.abs(r)}


def opts(tmp_path=None, **kw):
    base = dict(nepochs=4, batch_size=16, learning_rate=0.05, progress=False, seed=3)
    if tmp_path is not None:
        base["checkpoint_dir"] = tmp_path / "ckpt"
    base.update(kw)
    return T.FitOptions(**base)


def test_fit_learns_and_reports_history(tmp_path):
    data, params, rest, w = toy_problem()
    res = T.fit(toy_loss, params, rest, data, opts(nepochs=25))
    h = res.history
    assert res.epochs_run == 25 and len(h["loss"]) == 25
    assert set(h) >= {"loss", "val_loss", "mae", "val_mae", "learning_rate", "epoch_time_s"}
    assert h["loss"][-1] < 1e-2 * h["loss"][0]
    np.testing.assert_allclose(np.asarray(res.params["w"]), w, atol=0.05)
    path = T.save_history(h, tmp_path / "history.json")
    assert json.loads(path.read_text())["loss"] == pytest.approx(h["loss"])


def test_epoch_loss_is_sample_weighted_mean_before_updates():
    """With lr -> tiny the weights barely move, so epoch loss == dataset mean at init."""
    data, params, rest, _ = toy_problem(n=40)
    res = T.fit(toy_loss, params, rest, data, opts(nepochs=1, learning_rate=1e-12, batch_size=16,
                                                    validation_split=0.05))
    n_train = T.validation_split_index(40, 0.05)  # 38 -> batches of 16, 16, 6 (partial batch)
    expected = float(np.mean(data["y"][:n_train] ** 2))
    assert res.history["loss"][0] == pytest.approx(expected, rel=1e-5)
    assert res.history["val_loss"][0] == pytest.approx(float(np.mean(data["y"][n_train:] ** 2)), rel=1e-5)


def test_same_seed_gives_identical_weights_and_other_seed_differs():
    data, params, rest, _ = toy_problem()
    a = T.fit(toy_loss, params, rest, data, opts(seed=7))
    b = T.fit(toy_loss, params, rest, data, opts(seed=7))
    c = T.fit(toy_loss, params, rest, data, opts(seed=8))
    for la, lb in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert a.history["loss"] == b.history["loss"]
    assert not np.array_equal(np.asarray(a.params["w"]), np.asarray(c.params["w"]))


def test_resume_after_interruption_reproduces_uninterrupted_run(tmp_path):
    data, params, rest, _ = toy_problem()
    full = T.fit(toy_loss, params, rest, data, opts(tmp_path / "full", nepochs=5))

    class Interrupted(Exception):
        pass

    def boom(epoch, logs):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        T.fit(toy_loss, params, rest, data, opts(tmp_path / "cut", nepochs=5), on_epoch_end=boom)
    resumed = T.fit(toy_loss, params, rest, data, opts(tmp_path / "cut", nepochs=5, resume=True))
    assert resumed.epochs_run == 5
    for la, lb in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.history["learning_rate"] == full.history["learning_rate"]
    assert int(resumed.state.step) == int(full.state.step)


def test_resume_without_checkpoint_starts_fresh_and_fresh_run_clears_old(tmp_path):
    data, params, rest, _ = toy_problem()
    a = T.fit(toy_loss, params, rest, data, opts(tmp_path, nepochs=2, resume=True))
    assert a.epochs_run == 2
    b = T.fit(toy_loss, params, rest, data, opts(tmp_path, nepochs=2))  # not resuming: restart
    assert b.epochs_run == 2 and b.history["loss"] == a.history["loss"]
    with pytest.raises(ValueError, match="n_samples"):
        small = {k: v[:50] for k, v in data.items()}
        T.fit(toy_loss, params, rest, small, opts(tmp_path, nepochs=3, resume=True))


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    data, params, rest, _ = toy_problem()
    good = T.fit(toy_loss, params, rest, data, opts(tmp_path, nepochs=2))
    # The same run continued on data with a NaN target: epoch 3 diverges.
    bad = dict(data, y=np.where(np.arange(len(data["y"])) == 3, np.nan, data["y"]).astype(np.float32))
    with pytest.raises(T.TrainingDivergedError, match="not finite at epoch 3.*after epoch 2"):
        T.fit(toy_loss, params, rest, bad, opts(tmp_path, nepochs=4, resume=True))
    ck = _RunCheckpoints(tmp_path / "ckpt", 2)
    try:
        assert ck.latest_step() == 2
    finally:
        ck.close()
    # Resuming on good data from the kept checkpoint finishes the run.
    again = T.fit(toy_loss, params, rest, data, opts(tmp_path, nepochs=3, resume=True))
    assert again.epochs_run == 3 and again.history["loss"][:2] == good.history["loss"]


def test_fit_rejects_bad_inputs():
    data, params, rest, _ = toy_problem()
    with pytest.raises(ValueError, match="nepochs"):
        T.fit(toy_loss, params, rest, data, opts(nepochs=0))
    with pytest.raises(ValueError, match="batch_size"):
        T.fit(toy_loss, params, rest, data, opts(batch_size=0))
    with pytest.raises(ValueError, match="leading"):
        T.fit(toy_loss, params, rest, {"x": data["x"], "y": data["y"][:5]}, opts())
    with pytest.raises(ValueError, match="checkpoint_dir"):
        T.fit(toy_loss, params, rest, data, opts(resume=True))


def test_train_step_donates_state():
    data, params, rest, _ = toy_problem(n=32)
    opt = T.make_optimizer(1e-3)
    step = T.make_train_step(toy_loss, opt)
    state = T.init_train_state(params, rest, opt, seed=0)
    old_w = state.params["w"]
    state2, sums = step(state, {k: jnp.asarray(v) for k, v in data.items()}, jnp.arange(16, dtype=jnp.int32))
    assert old_w.is_deleted()
    assert int(state2.step) == 1 and float(sums["count"]) == 16.0


MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, jax, jax.numpy as jnp
    sys.path.insert(0, sys.argv[1])
    from test_train import toy_problem, toy_loss
    from pinn_jax import train as T
    assert len(jax.devices()) == 4, jax.devices()
    data, params, rest, _ = toy_problem(n=70)
    out = {}
    for name, devs in (("one", jax.devices()[:1]), ("four", jax.devices())):
        opt = T.make_optimizer(1e-2)
        mesh = T.make_mesh(devs)
        step = T.make_train_step(toy_loss, opt, mesh=mesh)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = jax.device_put(jax.device_get(T.init_train_state(params, rest, opt)), rep)
        d = jax.device_put({k: jnp.asarray(v) for k, v in data.items()}, rep)
        idx = jax.device_put(jnp.asarray(np.r_[np.arange(14), [-1, -1]], jnp.int32), rep)
        for _ in range(3):
            state, sums = step(state, d, idx)
        res = T.fit(toy_loss, params, rest, data,
                    T.FitOptions(nepochs=3, batch_size=10, progress=False, devices=devs, learning_rate=0.01))
        out[name] = {"w": np.asarray(state.params["w"]).tolist(), "loss": float(sums["loss"]),
                     "fit_w": np.asarray(res.params["w"]).tolist(), "fit_loss": res.history["loss"],
                     "nshards": len(state.params["w"].sharding.device_set)}
    print(json.dumps(out))
    """
)


def test_multi_device_step_equals_single_device_step(tmp_path):
    script = tmp_path / "md.py"
    script.write_text(MULTI_DEVICE_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(script), os.path.dirname(__file__)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["four"]["nshards"] == 4 and out["one"]["nshards"] == 1
    np.testing.assert_allclose(out["four"]["w"], out["one"]["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["four"]["loss"], out["one"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(out["four"]["fit_w"], out["one"]["fit_w"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["four"]["fit_loss"], out["one"]["fit_loss"], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# PtychoPINN training (tiny data)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_container():
    from backend_api.config import ModelConfig, TrainingConfig
    from backend_api.container import PtychoDataContainer
    from pinn_jax import simulate

    train, _ = simulate.simulate_dataset(N=64, object_size=128, n_images=128, seed=0)
    cfg = TrainingConfig(model=ModelConfig(N=64, gridsize=1, n_filters_scale=1), n_groups=64)
    return PtychoDataContainer.from_raw_data(train, cfg, seed=0)


def tiny_training_config(**kw):
    from backend_api.config import ModelConfig, TrainingConfig

    model_kw = {k: kw.pop(k) for k in ("model_type",) if k in kw}
    return TrainingConfig(model=ModelConfig(N=64, gridsize=1, n_filters_scale=1, **model_kw),
                          n_groups=64, batch_size=16, nepochs=1, **kw)


@pytest.mark.slow
def test_supervised_model_trains_on_ground_truth_patches(tiny_container):
    cfg = tiny_training_config(model_type="supervised")
    out = T.train_model(tiny_container, cfg, seed=0, progress=False)
    h = out.history
    assert "supervised_mae" in h and np.isfinite(h["loss"][0])
    assert h["loss"][0] == pytest.approx(h["supervised_mae"][0])
    # the setup carries the group-frame ground truth patch
    setup = T.prepare_training(tiny_container, cfg, seed=0)
    assert setup.data["Yc"].shape == (len(tiny_container), 64, 64, 1)
    np.testing.assert_allclose(setup.data["Yc"][..., 0], np.asarray(tiny_container.Y)[..., 0], atol=1e-5)


def test_prepare_training_checks_inputs(tiny_container):
    with pytest.raises(ValueError, match="nothing to train"):
        T.prepare_training(tiny_container, tiny_training_config(nll_weight=0.0))
    with pytest.raises(ValueError, match=r"expected \(n, 128, 128, 1\)"):
        from backend_api.config import ModelConfig, TrainingConfig

        T.prepare_training(tiny_container, TrainingConfig(model=ModelConfig(N=128)))
    setup = T.prepare_training(tiny_container, tiny_training_config(realspace_weight=1.0, realspace_mae_weight=1.0))
    assert "Yc_amp" in setup.data and setup.loss_fn.realspace_weight == 1.0
    assert setup.intensity_scale == pytest.approx(math.sqrt(1e9) / 32)


def test_trainable_flags_select_trained_arrays(tiny_container):
    frozen = T.prepare_training(tiny_container, tiny_training_config(intensity_scale_trainable=False))
    both = T.prepare_training(tiny_container, tiny_training_config(intensity_scale_trainable=True,
                                                                      probe_trainable=True))
    names = lambda st: {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(st)[0]}
    assert not any("log_s" in n or "probe_ri" in n for n in names(frozen.params))
    assert any("log_s" in n for n in names(both.params)) and any("probe_ri" in n for n in names(both.params))


def test_epoch_loop_makes_no_implicit_transfers():
    """Only explicit device_put/device_get in the loop (big_vision's transfer-guard discipline)."""
    data, params, rest, _ = toy_problem()
    res = T.fit(toy_loss, params, rest, data, opts(nepochs=3, transfer_guard="disallow"))
    assert res.epochs_run == 3
