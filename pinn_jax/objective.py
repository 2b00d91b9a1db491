"""The PtychoPINN objective and the whole training run.

:class:`PtychoLoss` (the reference's compiled losses, per sample), :func:`prepare_training`
(model, data arrays on the host, loss) and :func:`train_model`, which wires a
:class:`pinn_jax.model.PtychoPINN` and a data container into :func:`pinn_jax.loop.fit`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pinn_jax import geometry, physics
# The network functions are looked up on the module at call time (as the former call-time
# import did): tests replace them on pinn_jax.model.
from pinn_jax import model as model_mod
from pinn_jax import probe as probe_mod
from pinn_jax.data_shards import LocalSamples
from pinn_jax.loop import FitOptions, LossFn, fit, save_history

__all__ = [
    "intensity_scale_for",
    "make_loss_fn",
    "PtychoLoss",
    "prepare_training",
    "TrainingSetup",
    "TrainOutcome",
    "fit_options_from_config",
    "train_model",
]


def intensity_scale_for(nphotons: float, N: int) -> float:
    """The reference's training-time scale ``sqrt(nphotons) / (N / 2)`` (brief §3)."""
    if not (nphotons > 0 and math.isfinite(nphotons)):
        raise ValueError(f"nphotons: expected a positive finite number, got {nphotons!r}")
    return float(math.sqrt(nphotons) / (N / 2))


def _center_channel0(Y: np.ndarray, coords: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Reference ``center_channels(Y, coords)[..., :1]``: channel 0 of each group translated by
    ``-coords`` into the group frame. ``Y`` (n, N, N, C) real or complex; coords (n, 1, 2, C).
    Returns (n, N, N, 1) of Y's dtype."""
    fn = jax.jit(jax.vmap(lambda img, off: geometry.translate(img, -off)))
    out = []
    for i in range(0, Y.shape[0], chunk):
        img = jnp.asarray(Y[i : i + chunk, :, :, 0])
        off = jnp.asarray(coords[i : i + chunk, 0, :, 0], jnp.float32)
        out.append(np.asarray(fn(img, off)))
    return np.concatenate(out)[..., None]


@dataclasses.dataclass
class TrainingSetup:
    """Everything :func:`fit` needs for one PtychoPINN run (also what the speed benchmark times).

    ``graphdef``/``params``/``rest``: the split model; ``data``: dict of host arrays (``X``
    (n,N,N,C) f32 normalised amplitudes, ``coords`` (n,1,2,C) f32, and ``Yc`` / ``Yc_amp``
    (n,N,N,1) targets when a loss term needs ground truth); ``loss_fn``: per-sample loss;
    ``intensity_scale``: the data-side scale ``s`` (model input ``X * s``).
    """

    graphdef: Any
    params: Any
    rest: Any
    data: dict
    loss_fn: LossFn
    intensity_scale: float
    model_type: str


@dataclasses.dataclass(frozen=True)
class PtychoLoss:
    """The reference's compiled loss as per-sample values; a hashable callable, so that equal
    losses (same graph, weights and scale) share one compiled train step.

    ``model_type='pinn'``: ``nll_weight * PoissonNLL((sA)^2, (sX)^2) + mae_weight * MAE(sA, sX)
    + realspace_weight * realspace_loss(obj, Yc_amp)``, each a mean over the sample's N*N*C
    elements (so the batch mean equals Keras' mean over all elements). ``'supervised'``: mean
    complex MAE between the predicted object and the ground-truth patch (group frame) over the
    central N/2 square, the region the network reconstructs and the stitching uses.
    Batch keys: ``X`` (B,N,N,C) f32, ``coords`` (B,1,2,C) f32, ``Yc`` / ``Yc_amp`` (B,N,N,1).
    """

    graphdef: Any
    model_type: str
    intensity_scale: float
    nll_weight: float = 1.0
    mae_weight: float = 0.0
    realspace_weight: float = 0.0
    realspace_mae_weight: float = 0.0
    probe_big: bool = True
    N: int = 64

    def __call__(self, params, rest, batch, key):
        del key
        s = jnp.float32(self.intensity_scale)
        xs = batch["X"] * s
        if self.model_type == "supervised":
            mask = geometry.center_mask(self.N)[None, :, :, None]
            obj = model_mod.diffraction_to_obj_apply(self.graphdef, (params, rest), xs, batch["coords"])
            loss = jnp.sum(jnp.abs(obj - batch["Yc"]) * mask, axis=(1, 2, 3)) / jnp.sum(mask)
            return loss, {"supervised_mae": loss}

        def per_sample(fn):
            return jax.vmap(lambda a, b: fn(a[None], b[None]))

        obj, amp, inten = model_mod.autoencoder_apply(self.graphdef, (params, rest), xs, batch["coords"])
        total = jnp.zeros(xs.shape[0], jnp.float32)
        aux = {}
        if self.nll_weight:
            aux["nll_loss"] = per_sample(physics.poisson_nll)(inten, jnp.square(xs))
            total = total + self.nll_weight * aux["nll_loss"]
        if self.mae_weight:
            aux["mae_loss"] = per_sample(physics.mean_absolute_error)(amp, xs)
            total = total + self.mae_weight * aux["mae_loss"]
        if self.realspace_weight:
            rs = per_sample(
                lambda p, t: physics.realspace_loss(
                    p, t, probe_big=self.probe_big, realspace_mae_weight=self.realspace_mae_weight
                )
            )
            aux["realspace_loss"] = rs(obj, batch["Yc_amp"])
            total = total + self.realspace_weight * aux["realspace_loss"]
        return total, aux


def make_loss_fn(graphdef, config, intensity_scale: float) -> PtychoLoss:
    """:class:`PtychoLoss` for a ``TrainingConfig`` (checks model_type and the weights)."""
    model_type = config.model.model_type
    if model_type not in ("pinn", "supervised"):
        raise ValueError(f"model_type={model_type!r}: expected 'pinn' or 'supervised'")
    w = dict(
        nll_weight=float(config.nll_weight),
        mae_weight=float(config.mae_weight),
        realspace_weight=float(config.realspace_weight),
        realspace_mae_weight=float(config.realspace_mae_weight),
    )
    if model_type == "pinn" and w["nll_weight"] == 0 and w["mae_weight"] == 0 and w["realspace_weight"] == 0:
        raise ValueError("loss weights: nll_weight, mae_weight and realspace_weight are all 0; nothing to train")
    return PtychoLoss(
        graphdef=graphdef,
        model_type=model_type,
        intensity_scale=float(intensity_scale),
        probe_big=bool(config.model.probe_big),
        N=int(config.model.N),
        **w,
    )


def prepare_training(container, config, *, seed: int = 0, model=None) -> TrainingSetup:
    """Build (or take) the model, split it, and collect the training arrays and loss.

    ``container``: :class:`backend_api.container.PtychoDataContainer`; ``config``:
    ``TrainingConfig``. A new model gets the container's probe normalised with
    ``config.model.probe_scale`` (the reference's ``set_probe_guess``), ``log_s = log(s)`` with
    ``s = sqrt(nphotons)/(N/2)``, and the config's trainable switches; weights from ``seed``.
    """
    mc = config.model
    N, C = int(mc.N), int(mc.gridsize) ** 2
    X = np.asarray(container.X, np.float32)
    if X.ndim != 4 or X.shape[1:] != (N, N, C):
        raise ValueError(
            f"train data X: got shape {X.shape}, expected (n, {N}, {N}, {C}) for N={N}, "
            f"gridsize={mc.gridsize} (check --N/--gridsize against the data)"
        )
    if mc.model_type not in ("pinn", "supervised"):
        raise ValueError(f"model_type={mc.model_type!r}: expected 'pinn' or 'supervised'")
    s = intensity_scale_for(float(config.nphotons), N)
    if model is None:
        probe = probe_mod.normalize_probe(jnp.asarray(container.probe, jnp.complex64), float(mc.probe_scale))
        model = model_mod.build_model(
            mc,
            np.asarray(probe),
            s,
            probe_trainable=bool(config.probe_trainable),
            intensity_scale_trainable=bool(config.intensity_scale_trainable),
            seed=seed,
        )
    graphdef, params, rest = model_mod.split_model(model)
    coords = np.asarray(container.coords_nominal, np.float32)
    data = {"X": X, "coords": coords}
    needs_gt = mc.model_type == "supervised" or float(config.realspace_weight) > 0
    if needs_gt and not getattr(container, "has_ground_truth", False):
        raise ValueError(
            f"model_type={mc.model_type!r} / realspace_weight={config.realspace_weight} needs ground-truth "
            "patches, but the training data have none (give objectGuess or Y in the NPZ)"
        )
    if mc.model_type == "supervised":
        data["Yc"] = _center_channel0(np.asarray(container.Y, np.complex64), coords)
    elif float(config.realspace_weight) > 0:
        data["Yc_amp"] = _center_channel0(np.asarray(container.Y_I, np.float32), coords)
    return TrainingSetup(
        graphdef=graphdef,
        params=params,
        rest=rest,
        data=data,
        loss_fn=make_loss_fn(graphdef, config, s),
        intensity_scale=s,
        model_type=mc.model_type,
    )


@dataclasses.dataclass
class TrainOutcome:
    """Result of :func:`train_model`: the trained ``model`` (PtychoPINN), its ``history`` and the
    data-side ``intensity_scale`` used for the inputs."""

    model: Any
    history: dict
    intensity_scale: float
    epochs_run: int
    stopped_early: bool


def fit_options_from_config(config, **overrides) -> FitOptions:
    """:class:`FitOptions` from a ``TrainingConfig`` (nepochs, batch_size, Adam betas); the
    schedule keeps the TF reference's fixed values (its ``plateau_*`` fields are torch-only)."""
    kw = dict(
        nepochs=int(config.nepochs),
        batch_size=int(config.batch_size),
        adam_beta1=float(config.adam_beta1),
        adam_beta2=float(config.adam_beta2),
    )
    kw.update(overrides)
    return FitOptions(**kw)


def train_model(
    container,
    config,
    *,
    seed: int = 0,
    model=None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    devices: Sequence[Any] | None = None,
    history_path: str | os.PathLike | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    shard_data: bool | None = None,
    n_samples: int | None = None,
) -> TrainOutcome:
    """Train a PtychoPINN on a data container with the reference's loop (see :func:`fit`).

    ``seed`` fixes both the weight initialisation and the shuffling. With ``checkpoint_dir``,
    an Orbax run checkpoint is written after every epoch and ``resume=True`` continues from
    the latest one. ``history_path`` (JSON) is written at the end. ``shard_data``: see
    :class:`FitOptions`; ``n_samples``: the container holds only this process's rows of an
    ``n_samples``-group dataset (:func:`pinn_jax.sharded_grouping.local_training_container`).
    """
    setup = prepare_training(container, config, seed=seed, model=model)
    options = fit_options_from_config(
        config,
        seed=int(seed),
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        resume=bool(resume),
        progress=bool(progress),
        devices=devices,
        shard_data=True if n_samples is not None else shard_data,
    )
    data = setup.data if n_samples is None else LocalSamples(setup.data, int(n_samples))
    result = fit(setup.loss_fn, setup.params, setup.rest, data, options, on_epoch_end=on_epoch_end)
    trained = nnx.merge(setup.graphdef, result.params, result.rest)
    if history_path is not None:
        save_history(result.history, history_path)
    return TrainOutcome(
        model=trained,
        history=result.history,
        intensity_scale=setup.intensity_scale,
        epochs_run=result.epochs_run,
        stopped_early=result.stopped_early,
    )
