"""pinn_jax.train.PtychoLoss against hand computations (numpy float64) on tiny inputs.

The network is replaced by a fixed-output double (``autoencoder_apply`` /
``diffraction_to_obj_apply`` return arrays held in ``params``), so every term of the loss is
checked as arithmetic on known arrays: the supervised loss (complex MAE over the central N/2
square, against the target itself and not its conjugate) and the PINN loss's three terms
(``nll_weight * PoissonNLL + mae_weight * MAE(amp, sX) + realspace_weight * realspace_loss``),
including the ones the training runs in the suite never switch on.

Tolerance: each term is a float32 mean over N*N = 64 values of size <= ~30; the float32 result
differs from the float64 one by about sqrt(64) * eps32 * mean|x| (< 1e-5 relative), so the checks
use rtol 1e-5 (atol 1e-6 for values near 0). The mutations they guard against (mask dropped,
target conjugated, a weight ignored) change the values by > 10%.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pinn_jax.model as model_mod
from backend_api.config import ModelConfig, TrainingConfig
from pinn_jax.train import PtychoLoss, make_loss_fn

N, B, S = 8, 2, 2.0  # patch side, batch, intensity scale (float32-exact)
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def fixed_network(monkeypatch):
    """Network outputs come straight from params: autoencoder -> (obj, amp, inten),
    diffraction_to_obj -> obj. Also records the scaled input the loss hands the network."""
    seen = {}

    def autoencoder(graphdef, state, xs, coords):
        seen["xs"] = xs
        p = state[0]
        return p["obj"], p["amp"], p["inten"]

    def d2o(graphdef, state, xs, coords):
        seen["xs"] = xs
        return state[0]["obj"]

    monkeypatch.setattr(model_mod, "autoencoder_apply", autoencoder)
    monkeypatch.setattr(model_mod, "diffraction_to_obj_apply", d2o)
    return seen


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    shape = (B, N, N, 1)
    X = rng.uniform(0.5, 3.0, shape).astype(np.float32)
    params = {
        "obj": (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64),
        "amp": rng.uniform(0.5, 6.0, shape).astype(np.float32),
        "inten": rng.uniform(0.5, 30.0, shape).astype(np.float32),
    }
    return X, params


def _loss(**kw):
    base = dict(graphdef=None, model_type="pinn", intensity_scale=S, N=N)
    base.update(kw)
    return PtychoLoss(**base)


def _batch(X, **extra):
    b = {"X": jnp.asarray(X), "coords": jnp.zeros((B, 1, 2, 1), jnp.float32)}
    b.update({k: jnp.asarray(v) for k, v in extra.items()})
    return b


def _mask64():
    m = np.zeros((N, N, 1))
    m[N // 4 : 3 * N // 4, N // 4 : 3 * N // 4] = 1.0
    return m


# ------------------------------------------------------------------------- hand computations


def _nll(inten, xs):
    i, t = inten.astype(np.float64), xs.astype(np.float64) ** 2
    return (i - t * np.log(i)).mean(axis=(1, 2, 3))


def _mae(a, b):
    return np.abs(a.astype(np.complex128) - b.astype(np.complex128)).mean(axis=(1, 2, 3))


def _supervised(obj, target):
    m = _mask64()
    err = np.abs(obj.astype(np.complex128) - target.astype(np.complex128)) * m
    return err.sum(axis=(1, 2, 3)) / m.sum()


# ------------------------------------------------------------------------- supervised


def _target_with_own_conjugate_far(obj, rng):
    """A target with a large imaginary part of the same sign as obj's, so |obj - conj(t)| is much
    larger than |obj - t|."""
    return (obj.real + 0.2 * rng.normal(size=obj.shape)
            + 1j * (obj.imag + np.sign(obj.imag) * 2.0)).astype(np.complex64)


def test_supervised_loss_equals_masked_complex_mae(fixed_network):
    rng = np.random.default_rng(1)
    X, p = _arrays(1)
    target = _target_with_own_conjugate_far(p["obj"], rng)
    loss, aux = _loss(model_type="supervised")(p, None, _batch(X, Yc=target), None)
    want = _supervised(p["obj"], target)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(aux["supervised_mae"]), want, rtol=RTOL, atol=ATOL)
    # the input was the scaled data
    np.testing.assert_array_equal(np.asarray(fixed_network["xs"]), X * np.float32(S))
    # the conjugated target would give a clearly different value: the test input can tell
    assert np.all(_supervised(p["obj"], np.conj(target)) > 1.5 * want)


def test_supervised_loss_ignores_errors_outside_the_central_square():
    """Prediction equals the target inside the central N/2 square and is wildly off outside it:
    the loss is exactly 0 (an unmasked mean would be > 1)."""
    X, p = _arrays(2)
    rng = np.random.default_rng(2)
    target = p["obj"].copy()
    outside = np.broadcast_to(_mask64() == 0, target.shape)
    target[outside] += (5 + 5j) * rng.uniform(0.5, 1.0, size=int(outside.sum()))
    loss, _ = _loss(model_type="supervised")(p, None, _batch(X, Yc=target), None)
    assert np.all(np.asarray(loss) == 0.0)
    assert np.all(_mae(p["obj"], target) > 1.0)  # without the mask it would not be 0


def test_supervised_loss_counts_an_error_inside_the_square_once_per_mask_pixel():
    """One pixel inside the square off by 3+4j (|.| = 5): loss = 5 / (N/2)^2 for that sample,
    0 for the other."""
    X, p = _arrays(3)
    target = p["obj"].copy()
    target[0, N // 2, N // 2 - 1, 0] += 3 + 4j
    loss, _ = _loss(model_type="supervised")(p, None, _batch(X, Yc=target), None)
    np.testing.assert_allclose(np.asarray(loss), [5.0 / (N // 2) ** 2, 0.0], rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------- PINN terms


def test_pinn_nll_only_equals_hand_value():
    X, p = _arrays(4)
    xs = X * np.float32(S)
    loss, aux = _loss()(p, None, _batch(X), None)
    want = _nll(p["inten"], xs)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(aux["nll_loss"]), want, rtol=RTOL, atol=ATOL)
    assert set(aux) == {"nll_loss"}  # zero-weight terms are not computed


@pytest.mark.parametrize("w", [0.5, 3.0])
def test_pinn_mae_weight_adds_exactly_its_term(w):
    X, p = _arrays(5)
    xs = X * np.float32(S)
    base, _ = _loss()(p, None, _batch(X), None)
    loss, aux = _loss(mae_weight=w)(p, None, _batch(X), None)
    mae = _mae(p["amp"], xs)
    np.testing.assert_allclose(np.asarray(aux["mae_loss"]), mae, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(loss), _nll(p["inten"], xs) + w * mae, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(np.asarray(loss) - np.asarray(base), w * mae, rtol=1e-4, atol=1e-4)


def test_pinn_mae_only_without_nll():
    X, p = _arrays(6)
    loss, aux = _loss(nll_weight=0.0, mae_weight=2.0)(p, None, _batch(X), None)
    np.testing.assert_allclose(np.asarray(loss), 2.0 * _mae(p["amp"], X * np.float32(S)), rtol=RTOL, atol=ATOL)
    assert "nll_loss" not in aux


@pytest.mark.parametrize("probe_big", [True, False])
@pytest.mark.parametrize("w,rs_mae", [(1.0, 1.0), (0.25, 2.0)])
def test_pinn_realspace_weight_adds_exactly_its_term(probe_big, w, rs_mae):
    """realspace_loss = realspace_mae_weight * mean|obj' - Yc_amp| with obj' = obj (probe_big) or
    obj * centre mask (not probe_big); the total gains realspace_weight times that."""
    X, p = _arrays(7)
    rng = np.random.default_rng(7)
    target = rng.uniform(0.0, 2.0, (B, N, N, 1)).astype(np.float32)
    xs = X * np.float32(S)
    kw = dict(realspace_mae_weight=rs_mae, probe_big=probe_big)
    base, _ = _loss(realspace_weight=0.0, **kw)(p, None, _batch(X, Yc_amp=target), None)
    loss, aux = _loss(realspace_weight=w, **kw)(p, None, _batch(X, Yc_amp=target), None)
    pred = p["obj"] if probe_big else p["obj"] * _mask64()
    term = rs_mae * _mae(pred, target)
    np.testing.assert_allclose(np.asarray(aux["realspace_loss"]), term, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(loss), _nll(p["inten"], xs) + w * term, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(np.asarray(loss) - np.asarray(base), w * term, rtol=1e-4, atol=1e-4)
    # the masked and unmasked variants differ on this input, so probe_big is really tested
    other = p["obj"] * _mask64() if probe_big else p["obj"]
    assert np.all(np.abs(_mae(other, target) - _mae(pred, target)) > 0.1)


def test_all_three_terms_together_under_jit():
    """As the train step runs it (jitted): total = nll + 0.7 MAE + 1.5 * 0.5 realspace MAE."""
    X, p = _arrays(8)
    target = np.random.default_rng(8).uniform(0.0, 2.0, (B, N, N, 1)).astype(np.float32)
    xs = X * np.float32(S)
    fn = _loss(mae_weight=0.7, realspace_weight=1.5, realspace_mae_weight=0.5)
    loss, aux = jax.jit(fn)(p, None, _batch(X, Yc_amp=target), None)
    want = _nll(p["inten"], xs) + 0.7 * _mae(p["amp"], xs) + 1.5 * 0.5 * _mae(p["obj"], target)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=RTOL, atol=1e-5)
    assert set(aux) == {"nll_loss", "mae_loss", "realspace_loss"}


def test_make_loss_fn_carries_the_config_weights():
    """The weights and switches reach the loss from a TrainingConfig (a dropped weight would make
    the realspace/MAE terms silently absent in training)."""
    cfg = TrainingConfig(model=ModelConfig(N=64, gridsize=1, probe_big=False), mae_weight=0.3,
                         nll_weight=0.0, realspace_weight=2.0, realspace_mae_weight=0.5, backend="jax")
    fn = make_loss_fn(None, cfg, 7.5)
    assert (fn.model_type, fn.nll_weight, fn.mae_weight, fn.realspace_weight, fn.realspace_mae_weight,
            fn.probe_big, fn.N, fn.intensity_scale) == ("pinn", 0.0, 0.3, 2.0, 0.5, False, 64, 7.5)


def test_supervised_target_keeps_the_complex_ground_truth():
    """The supervised target prepared for training (train._center_channel0) is channel 0 of the
    complex ground-truth patch moved into the group frame by -coords: unchanged for zero offsets
    (not conjugated, not reduced to its amplitude), moved by whole pixels for integer offsets
    (content at (r, c) goes to (r - dy, c - dx))."""
    from pinn_jax.train import _center_channel0

    rng = np.random.default_rng(9)
    Y = (rng.normal(size=(3, N, N, 4)) + 1j * rng.normal(size=(3, N, N, 4))).astype(np.complex64)
    zero = np.zeros((3, 1, 2, 4), np.float32)
    np.testing.assert_array_equal(_center_channel0(Y, zero), Y[..., :1])
    coords = zero.copy()
    coords[:, 0, :, 0] = [2.0, 1.0]  # dx = 2, dy = 1
    out = _center_channel0(Y, coords)
    np.testing.assert_allclose(out[:, : N - 1, : N - 2, 0], Y[:, 1:, 2:, 0], rtol=0, atol=1e-6)
    assert np.all(out[:, N - 1 :, :, 0] == 0) and np.all(out[:, :, N - 2 :, 0] == 0)
