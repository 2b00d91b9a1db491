"""PtychoPINN: configuration, shapes for every variant, trainable switches, per-sample semantics."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numerics import model_conv_tol, within

from pinn_jax import geometry
from pinn_jax import probe as probe_mod
from pinn_jax.model import (
    ModelSpec,
    PhysicsConst,
    PhysicsParam,
    PtychoPINN,
    autoencoder_apply,
    build_model,
    diffraction_to_obj_apply,
    model_config_dict,
    split_model,
    trainable_filter,
)


def _abstract(cfg: dict, **kw) -> PtychoPINN:
    N = cfg.get("N", 64)
    return nnx.eval_shape(
        lambda: PtychoPINN(cfg, np.ones((N, N), np.complex64), 100.0, rngs=nnx.Rngs(0), **kw)
    )


def _filled(cfg: dict, *, seed: int = 0, intensity_scale: float = 100.0, **kw) -> PtychoPINN:
    """Concrete model with numpy-drawn weights (random init per conv shape is slow on CPU)."""
    model = _abstract(cfg, **kw)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model.generator, nnx.Param)):
        shape = var.get_value().shape
        if len(shape) == 4:
            bound = math.sqrt(6.0 / (9 * (shape[2] + shape[3])))
            var.set_value(jnp.asarray(rng.uniform(-bound, bound, shape), jnp.float32))
        else:
            var.set_value(jnp.asarray(rng.normal(0, 0.05, shape), jnp.float32))
    N = model.spec.N
    model.set_probe(np.asarray(probe_mod.default_probe(N)))
    model.set_intensity_scale(intensity_scale)
    return model


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def test_spec_from_modelconfig_and_dict():
    from backend_api.config import ModelConfig

    spec = ModelSpec.from_config(ModelConfig())
    assert (spec.N, spec.gridsize, spec.n_filters_scale, spec.amp_activation) == (64, 1, 2, "sigmoid")
    assert spec.object_big and spec.probe_big and spec.pad_object and not spec.probe_mask
    assert spec.gaussian_smoothing_sigma == 0.0 and spec.P == 74
    cfg = ModelConfig(N=128, gridsize=2, n_filters_scale=1, amp_activation="softplus", object_big=False)
    spec2 = ModelSpec.from_config(cfg)
    assert (spec2.N, spec2.C, spec2.C_out, spec2.P) == (128, 4, 1, 142)
    d = model_config_dict(spec2)
    assert ModelSpec.from_config(d) == spec2
    assert set(d) >= {"N", "gridsize", "n_filters_scale", "amp_activation", "object_big",
                      "probe_big", "probe_mask", "pad_object", "gaussian_smoothing_sigma"}


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"N": 100}, "N=100"),
        ({"gridsize": 0}, "gridsize=0"),
        ({"amp_activation": "tanh"}, "amp_activation='tanh'"),
        ({"object_big": "yes"}, "object_big='yes'"),
        ({"gaussian_smoothing_sigma": -1.0}, "gaussian_smoothing_sigma"),
        ({"gridsize": 2, "offset": 3}, "must be even"),
        ({"architecture": "fno"}, "architecture='fno'"),
        ({"n_filter_scale": 2}, r"unknown key\(s\) \['n_filter_scale'\]"),
    ],
)
def test_spec_rejects_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec.from_config(cfg)


def test_bad_inputs():
    model = _abstract({"N": 64, "gridsize": 2, "n_filters_scale": 1})
    g, s = nnx.split(model)
    f32 = jnp.float32
    with pytest.raises(ValueError, match=r"x_scaled: got shape \(2, 64, 64, 1\), expected \(B, 64, 64, 4\)"):
        jax.eval_shape(lambda s: autoencoder_apply(g, s, jnp.zeros((2, 64, 64, 1), f32),
                                                   jnp.zeros((2, 1, 2, 4), f32)), s)
    with pytest.raises(ValueError, match=r"offsets: got shape \(2, 2, 4\), expected \(2, 1, 2, 4\)"):
        jax.eval_shape(lambda s: diffraction_to_obj_apply(g, s, jnp.zeros((2, 64, 64, 4), f32),
                                                          jnp.zeros((2, 2, 4), f32)), s)
    with pytest.raises(ValueError, match=r"probe: got shape \(32, 32\)"):
        PtychoPINN({"N": 64}, np.ones((32, 32)), 1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="intensity_scale"):
        _abstract({"N": 64}).set_intensity_scale(0.0)


# ---------------------------------------------------------------------------------------------
# shapes of every supported variant (abstract evaluation: no compilation)
# ---------------------------------------------------------------------------------------------
# Every supported (N, gridsize, object_big, pad_object, probe_big): 3 x 2 x 2 x 4 = 48 cases
# (pad_object=False ignores probe_big in the generator, but probe_big is still a model flag).
# Abstract evaluation only (nnx.eval_shape / jax.eval_shape: no compile, no weights).
_SHAPE_CASES = [
    (N, gs, ob, po, pb)
    for N in (64, 128, 256)
    for gs in (1, 2)
    for ob in (True, False)
    for po in (True, False)
    for pb in (True, False)
]


@pytest.fixture(scope="module")
def _cheap_tracer_errors():
    """Abstract nnx construction probes ``hasattr(tracer, 'sharding')`` per variable; jax builds a
    full error message (pretty-printing the whole trace) for each probe, which is most of the
    cost of an abstract model. The message is never shown (hasattr swallows it): skip it here."""
    from jax._src.interpreters import partial_eval as pe

    if not hasattr(pe.DynamicJaxprTracer, "_origin_msg"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pe.DynamicJaxprTracer, "_origin_msg", lambda self: "")
        yield


@pytest.mark.parametrize("N, gridsize, object_big, pad_object, probe_big", _SHAPE_CASES)
def test_shapes(N, gridsize, object_big, pad_object, probe_big, _cheap_tracer_errors):
    cfg = dict(N=N, gridsize=gridsize, n_filters_scale=1, object_big=object_big,
               pad_object=pad_object, probe_big=probe_big, probe_mask=True,
               gaussian_smoothing_sigma=0.5 if gridsize == 2 else 0.0)
    model = _abstract(cfg)
    C = gridsize**2
    assert model.generator.C_out == (C if object_big else 1)
    g, s = nnx.split(model)
    x = jax.ShapeDtypeStruct((3, N, N, C), jnp.float32)
    o = jax.ShapeDtypeStruct((3, 1, 2, C), jnp.float32)
    obj, amp, inten = jax.eval_shape(partial(autoencoder_apply, g), s, x, o)
    assert (obj.shape, obj.dtype) == ((3, N, N, 1), jnp.complex64)
    assert (amp.shape, amp.dtype) == ((3, N, N, C), jnp.float32)
    assert (inten.shape, inten.dtype) == ((3, N, N, C), jnp.float32)
    if N == 64:     # diffraction_to_obj is the first half of autoencoder: every flag combination at N=64
        d2o = jax.eval_shape(partial(diffraction_to_obj_apply, g), s, x, o)
        assert (d2o.shape, d2o.dtype) == ((3, N, N, 1), jnp.complex64)


# ---------------------------------------------------------------------------------------------
# trainable switches
# ---------------------------------------------------------------------------------------------
def test_trainable_defaults_frozen_and_toggle():
    model = _abstract({"N": 64, "n_filters_scale": 1})
    assert not model.probe_trainable and not model.intensity_scale_trainable
    assert isinstance(model.probe_ri, PhysicsConst) and isinstance(model.log_s, PhysicsConst)
    _, params, rest = split_model(model)
    assert "probe_ri" not in params and "log_s" not in params
    assert "probe_ri" in rest and "log_s" in rest
    model.set_trainable(probe=True)
    _, params, rest = nnx.split(model, trainable_filter(model), ...)
    assert "probe_ri" in params and "log_s" not in params
    assert isinstance(model.probe_ri, PhysicsParam) and isinstance(model.probe_ri, nnx.Param)
    model.set_trainable(probe=False, intensity_scale=True)
    _, params, _ = split_model(model)
    assert "probe_ri" not in params and "log_s" in params


def _nll_loss(graphdef, params, rest, x, offsets):
    _, _, inten = autoencoder_apply(graphdef, (params, rest), x, offsets)
    target = jnp.square(x)
    return jnp.mean(inten - target * jnp.log(inten))


def test_gradients_only_when_trainable():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, (1, 64, 64, 1)), jnp.float32) * 50
    o = jnp.zeros((1, 1, 2, 1), jnp.float32)
    # frozen (default): the gradient tree has no probe / log_s entry at all
    frozen = _abstract({"N": 64, "n_filters_scale": 1})
    g, params, rest = split_model(frozen)
    grads = jax.eval_shape(jax.grad(partial(_nll_loss, g)), params, rest, x, o)
    assert "probe_ri" not in grads and "log_s" not in grads
    # trainable: both get finite, non-zero gradients. Differentiate w.r.t. the physics
    # variables only (a PhysicsParam filter) to keep the test's compile small.
    model = _filled({"N": 64, "n_filters_scale": 1}, intensity_scale=50.0,
                    probe_trainable=True, intensity_scale_trainable=True)
    g, phys, rest = nnx.split(model, PhysicsParam, ...)
    assert set(phys.keys()) == {"probe_ri", "log_s"}
    grads = jax.jit(jax.grad(partial(_nll_loss, g)))(phys, rest, x, o)
    gp, gs = np.asarray(grads["probe_ri"][...]), np.asarray(grads["log_s"][...])
    assert gp.shape == (64, 64, 2) and np.all(np.isfinite(gp)) and np.abs(gp).max() > 0
    assert gs.shape == () and np.isfinite(gs) and gs != 0


def _sum_of_squares_step(graphdef, tx):
    """A donated, jitted optimiser step on ``split_model``'s trainable state. The loss (sum of
    squares of EVERY model variable, trainable or not) is cheap to compile and has a non-zero
    gradient for every non-zero trainable array, so it shows which state the step can move."""

    def loss_fn(params, rest):
        m = nnx.merge(graphdef, params, rest)
        return sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(nnx.state(m)))

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest):
        grads = jax.grad(loss_fn)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    return step


def test_optimizer_step_moves_only_trainable_state():
    """Frozen (default) probe / log_s: no gradient entry and bit-identical after optimiser steps
    while the generator moves; after ``set_trainable`` (re-split) both get gradients and move."""
    model = _filled({"N": 64, "n_filters_scale": 1}, intensity_scale=50.0)
    tx = optax.sgd(1e-2)      # any optax optimiser: it only ever sees the trainable state
    for trainable in (False, True):
        model.set_trainable(probe=trainable, intensity_scale=trainable)
        probe0, log_s0 = np.asarray(model.probe_ri[...]), np.asarray(model.log_s[...])
        kernel0 = np.asarray(model.generator.amp.head_center.kernel[...])
        graphdef, params, rest = split_model(model)
        assert ("probe_ri" in params) == ("log_s" in params) == trainable
        opt_state = tx.init(params)
        step = _sum_of_squares_step(graphdef, tx)
        params, opt_state, grads = step(params, opt_state, rest)
        if trainable:
            assert np.abs(np.asarray(grads["probe_ri"][...])).max() > 0 and float(grads["log_s"][...]) != 0
        else:
            assert "probe_ri" not in grads and "log_s" not in grads
        params, opt_state, _ = step(params, opt_state, rest)   # donated inputs: feed outputs back
        nnx.update(model, params)
        assert not np.array_equal(np.asarray(model.generator.amp.head_center.kernel[...]), kernel0)
        probe1, log_s1 = np.asarray(model.probe_ri[...]), np.asarray(model.log_s[...])
        if trainable:
            assert not np.array_equal(probe1, probe0) and log_s1 != log_s0
        else:
            np.testing.assert_array_equal(probe1, probe0)
            assert log_s1 == log_s0
            np.testing.assert_array_equal(np.asarray(rest["probe_ri"][...]), probe0)


# ---------------------------------------------------------------------------------------------
# numerics of the forward pass (one compilation, several states / inputs)
# ---------------------------------------------------------------------------------------------
def test_gs2_per_sample_merge_scale_and_probe():
    model = _filled({"N": 64, "gridsize": 2, "n_filters_scale": 1}, intensity_scale=30.0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(0.0, 2.0, (2, 64, 64, 4)) * 30.0, jnp.float32)
    off = rng.uniform(-5, 5, (2, 1, 2, 4)).astype(np.float32)
    off -= off.mean(axis=3, keepdims=True)  # coords_relative are group-centred
    o = jnp.asarray(off)
    g, s = nnx.split(model)
    ae = jax.jit(partial(autoencoder_apply, g))
    obj, amp, inten = ae(s, x, o)

    # every sample is independent of its batch mate (no reference-style batch collapse)
    obj2, amp2, _ = ae(s, x.at[1].set(0.0), o.at[1].set(0.0))
    np.testing.assert_array_equal(np.asarray(obj2[0]), np.asarray(obj[0]))
    np.testing.assert_array_equal(np.asarray(amp2[0]), np.asarray(amp[0]))
    np.testing.assert_array_equal(np.asarray(inten), np.asarray(amp) ** 2)

    # the network sees x / s and the amplitude is multiplied by s: rescaling s and x together
    # leaves the object unchanged and scales the amplitude
    model.set_intensity_scale(60.0)
    _, s60 = nnx.split(model)
    obj60, amp60, _ = ae(s60, x * 2.0, o)
    np.testing.assert_allclose(np.asarray(obj60), np.asarray(obj), rtol=1e-5, atol=1e-5 * np.abs(obj).max())
    np.testing.assert_allclose(np.asarray(amp60), 2.0 * np.asarray(amp), rtol=1e-4, atol=1e-6 * np.abs(amp).max())

    # the merge/extract/physics chain against the helpers, for sample 0
    model.set_intensity_scale(30.0)
    a, phi = model.generator(x[:1] / model.intensity_scale)
    patches = jax.lax.complex(a * jnp.cos(phi), a * jnp.sin(phi))[0]
    canvas = geometry.merge_group(patches, o[0, 0], model.spec.P)
    # the jitted autoencoder and this eager chain are two programs over the same float32 conv
    # net: they agree to its round-off, numerics.conv_net_tol (here 1.2e-5), relative to each
    # element plus that fraction of the max; the conjugated object fails the same tolerance
    tol = model_conv_tol(model)
    ours, expect = np.asarray(obj[0, ..., 0]), np.asarray(geometry.center_crop(canvas, 64))
    np.testing.assert_allclose(ours, expect, rtol=tol, atol=tol * np.abs(expect).max())
    assert not within(np.conj(ours), expect, rtol=tol, atol=tol * np.abs(expect).max())

    # a zero probe gives zero diffraction (the probe is used as given)
    model.set_probe(np.zeros((64, 64), np.complex64))
    _, s0 = nnx.split(model)
    _, amp0, _ = ae(s0, x, o)
    assert not np.any(np.asarray(amp0))


def test_object_big_false_passes_the_patch_through():
    model = _filled({"N": 64, "gridsize": 1, "n_filters_scale": 1, "object_big": False,
                     "pad_object": True, "probe_big": False}, intensity_scale=10.0)
    x = jnp.asarray(np.random.default_rng(2).uniform(0, 20, (1, 64, 64, 1)), jnp.float32)
    o = jnp.zeros((1, 1, 2, 1), jnp.float32)
    g, s = nnx.split(model)
    obj = jax.jit(partial(diffraction_to_obj_apply, g))(s, x, o)
    a, phi = model.generator(x / model.intensity_scale)
    # jitted vs eager: two programs over the same float32 conv net, so its round-off
    # (numerics.conv_net_tol, 1.2e-5) relative to each element plus that fraction of the max
    tol = model_conv_tol(model)
    expect = np.asarray(jax.lax.complex(a * jnp.cos(phi), a * jnp.sin(phi)))
    np.testing.assert_allclose(np.asarray(obj), expect, rtol=tol, atol=tol * np.abs(expect).max())
    assert not within(np.conj(np.asarray(obj)), expect, rtol=tol, atol=tol * np.abs(expect).max())
    # pad_object without probe_big: nothing outside the central N/2 square
    q = 16
    border = np.ones((64, 64), bool)
    border[q:-q, q:-q] = False
    assert not np.any(np.asarray(obj)[0, border, 0])


def test_build_model_defaults():
    model = build_model({"N": 64, "n_filters_scale": 1}, None, 988.2117688, seed=0)
    assert not model.probe_trainable and not model.intensity_scale_trainable
    # default probe = the reference's un-normalised fallback
    np.testing.assert_array_equal(np.asarray(model.probe), np.asarray(probe_mod.default_probe(64)))
    # log_s is float32(log(s)), as the reference's tf.Variable
    assert float(model.log_s[...]) == float(np.float32(np.log(988.2117688)))
    assert math.isclose(float(model.intensity_scale), 988.2117688, rel_tol=1e-6)
    k = np.asarray(model.generator.encoder[0].conv_a.kernel[...])
    assert k.shape == (3, 3, 1, 32) and np.abs(k).max() <= math.sqrt(6 / (9 * 33))
    cfg, probe = model_config_dict(model), np.asarray(model.probe)
    rebuilt = nnx.eval_shape(lambda: build_model(cfg, probe, 1.0))
    assert rebuilt.spec == model.spec


def test_trainable_filter_is_the_param_type_for_any_model():
    from pinn_jax.model import TRAINABLE

    assert TRAINABLE is nnx.Param
    assert trainable_filter() is TRAINABLE and trainable_filter(object()) is TRAINABLE
