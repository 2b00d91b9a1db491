"""Training: the Keras-equivalent optimiser and callbacks, one jitted train step, the epoch loop.

Sections, in order: optimiser (Keras Adam) -> learning-rate plateau and early stopping (pure
state machines) -> validation split -> train state and the jitted step -> the epoch loop
(``fit``) with Orbax run checkpoints -> the PtychoPINN losses and ``train_model``, which wires a
:class:`pinn_jax.model.PtychoPINN` and a data container into ``fit``.

The reference (Keras ``model.fit``) semantics reproduced here:

* Adam with lr 1e-3, beta 0.9/0.999 and Keras' epsilon placement (``eps`` is added to
  ``sqrt(v)`` of the *biased* second moment, see :func:`scale_by_keras_adam`);
* the last ``validation_split`` fraction of the samples (unshuffled) is held out; the rest is
  reshuffled every epoch; the final partial batch is kept (masked here, so shapes stay static);
* the epoch ``loss`` is the sample-weighted mean of the per-batch losses, each computed before
  that batch's update; ``val_loss`` is the mean over the held-out samples after the epoch;
* ReduceLROnPlateau(val_loss, factor 0.5, patience 2, min_lr 1e-4, min_delta 1e-4, cooldown 0)
  then EarlyStopping(loss, patience 3, min_delta 0) at each epoch end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from backend_api.fileio import write_json

__all__ = [
    "KerasAdamState",
    "scale_by_keras_adam",
    "keras_adam",
    "make_optimizer",
    "get_learning_rate",
    "set_learning_rate",
    "PlateauState",
    "plateau_update",
    "EarlyStoppingState",
    "early_stopping_update",
    "validation_split_index",
    "FitOptions",
    "FitResult",
    "TrainState",
    "init_train_state",
    "seed_key_data",
    "TrainingDivergedError",
    "make_mesh",
    "make_train_step",
    "make_eval_step",
    "fit",
    "save_history",
    "intensity_scale_for",
    "make_loss_fn",
    "PtychoLoss",
    "prepare_training",
    "TrainingSetup",
    "TrainOutcome",
    "fit_options_from_config",
    "train_model",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Optimiser: Adam with Keras' epsilon convention
# ---------------------------------------------------------------------------------------------


class KerasAdamState(NamedTuple):
    """Adam slots: ``count`` (int32 scalar), biased first/second moments shaped like the params."""

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_keras_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    """Adam direction exactly as Keras computes it (without the learning rate and sign).

    Keras updates ``theta -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)`` with the
    *biased* moments ``m``, ``v``. Written with optax' bias-corrected moments this is
    ``m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2**t))``: the effective epsilon grows early in
    training, so ``optax.scale_by_adam(eps=1e-7)`` is not the same update. We compute the Keras
    form directly (same operation order as Keras), which is exact rather than an approximation.
    Real-valued parameters only (complex parameters are stored as real/imag pairs by the model).
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return KerasAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1.0 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (jnp.square(g) - v) * (1.0 - b2), state.nu, updates)
        alpha = jnp.sqrt(1.0 - jnp.power(jnp.float32(b2), t)) / (1.0 - jnp.power(jnp.float32(b1), t))
        direction = jax.tree.map(lambda m, v: (m * alpha) / (jnp.sqrt(v) + eps), mu, nu)
        return direction, KerasAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def keras_adam(
    learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    """Keras-equivalent Adam: :func:`scale_by_keras_adam` followed by ``-learning_rate``."""
    return optax.chain(scale_by_keras_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))


def make_optimizer(
    learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    """Keras Adam with the learning rate held in the optimiser state (float32 scalar).

    The plateau schedule changes the rate between epochs with :func:`set_learning_rate`, so the
    jitted step never retraces and the current rate is saved with the run checkpoint.
    """
    return optax.inject_hyperparams(keras_adam, static_args=("b1", "b2", "eps"))(
        learning_rate=learning_rate, b1=b1, b2=b2, eps=eps
    )


def get_learning_rate(opt_state) -> jax.Array:
    """The current learning rate (device scalar) of a :func:`make_optimizer` state."""
    return opt_state.hyperparams["learning_rate"]


def set_learning_rate(opt_state, learning_rate: float):
    """A copy of a :func:`make_optimizer` state with a new learning rate (same dtype/sharding)."""
    old = opt_state.hyperparams["learning_rate"]
    new = jax.device_put(np.asarray(learning_rate, dtype=old.dtype), old.sharding)
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = new
    return opt_state._replace(hyperparams=hyper)


# ---------------------------------------------------------------------------------------------
# Callbacks as pure state machines (host side, once per epoch)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlateauState:
    """Keras ReduceLROnPlateau state (mode 'min'). ``lr`` is the rate for the next epoch."""

    lr: float
    best: float = math.inf
    wait: int = 0
    cooldown_counter: int = 0


def plateau_update(
    state: PlateauState,
    monitored: float | None,
    *,
    factor: float = 0.5,
    patience: int = 2,
    min_lr: float = 1e-4,
    min_delta: float = 1e-4,
    cooldown: int = 0,
) -> PlateauState:
    """One epoch-end step of Keras' ReduceLROnPlateau on a minimised quantity.

    An epoch improves when ``monitored < best - min_delta``. After ``patience`` epochs without
    improvement the rate becomes ``max(lr * factor, min_lr)`` (only while ``lr > min_lr``) and the
    wait counter restarts. ``monitored=None`` (no validation data) leaves the state unchanged,
    as Keras does when the monitored key is missing.
    """
    if monitored is None:
        return state
    lr, best, wait, cool = state.lr, state.best, state.wait, state.cooldown_counter
    in_cooldown = cool > 0
    if in_cooldown:
        cool -= 1
        wait = 0
    if monitored < best - min_delta:
        best = float(monitored)
        wait = 0
    elif not in_cooldown:
        wait += 1
        if wait >= patience:
            # Keras compares in float32 (the variable's dtype); keeps min_lr a true floor.
            if np.float32(lr) > np.float32(min_lr):
                lr = float(max(lr * factor, min_lr))
                cool = cooldown
                wait = 0
    return PlateauState(lr=lr, best=best, wait=wait, cooldown_counter=cool)


@dataclasses.dataclass(frozen=True)
class EarlyStoppingState:
    """Keras EarlyStopping state (mode 'min', no baseline, no weight restore)."""

    best: float | None = None
    wait: int = 0
    stop: bool = False
    stopped_epoch: int | None = None


def early_stopping_update(
    state: EarlyStoppingState,
    monitored: float | None,
    epoch: int,
    *,
    patience: int = 3,
    min_delta: float = 0.0,
) -> EarlyStoppingState:
    """One epoch-end step of Keras' EarlyStopping on a minimised quantity.

    ``epoch`` is 0-based. An epoch improves when ``monitored + min_delta < best`` (the first
    epoch always does). Training stops once ``patience`` epochs in a row did not improve
    (and never at epoch 0), i.e. after epoch ``best_epoch + patience``.
    """
    if monitored is None:
        return state
    wait = state.wait + 1
    if state.best is None or (monitored + abs(min_delta)) < state.best:
        return EarlyStoppingState(best=float(monitored), wait=0, stop=False)
    if wait >= patience and epoch > 0:
        return EarlyStoppingState(best=state.best, wait=wait, stop=True, stopped_epoch=epoch)
    return EarlyStoppingState(best=state.best, wait=wait, stop=False)


# ---------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------

# The reference streams datasets above this size through tf.data without a validation split.
STREAMING_THRESHOLD = 10000


def validation_split_index(n: int, validation_split: float = 0.05) -> int:
    """Number of leading samples used for training; the rest (the last ones) validate.

    Keras keeps ``ceil(n * (1 - validation_split))`` samples for training (the reference run:
    1024 groups -> 973 train + 51 validation). Returns ``n`` when no sample is left over.
    """
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
    if n < 1:
        raise ValueError(f"training needs at least one sample, got n={n}")
    split = int(math.ceil(n * (1.0 - validation_split)))
    return min(max(split, 1), n)


# ---------------------------------------------------------------------------------------------
# Train state and the jitted step
# ---------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """Everything the step donates and returns.

    ``step``: int32 scalar (global optimiser steps so far); ``params``: trainable pytree;
    ``rest``: non-trainable pytree (constants the loss reads, never updated by the optimiser);
    ``opt_state``: :func:`make_optimizer` state; ``rng``: uint32 key data of the run's base
    PRNG key (an argument rather than a constant, so one compiled step serves every seed).
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array


def seed_key_data(seed: int) -> jax.Array:
    """uint32 key data of ``jax.random.key(seed)`` (what :class:`TrainState` stores)."""
    return jax.random.key_data(jax.random.key(int(seed)))


def init_train_state(params, rest, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """A fresh :class:`TrainState` (step 0) for ``params``/``rest``."""
    return TrainState(
        step=jnp.zeros([], jnp.int32), params=params, rest=rest, opt_state=optimizer.init(params),
        rng=seed_key_data(seed),
    )


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN/inf; the last good run checkpoint is kept."""


# A loss function maps (params, rest, batch, key) to per-sample losses (B,) float32 and a dict
# of per-sample auxiliary terms (each (B,)), which are averaged into the history.
LossFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh named ``'data'`` over ``devices`` (default: all devices)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("devices must name at least one device")
    return Mesh(np.array(devs), ("data",))


def _gather_batch(data: Mapping[str, jax.Array], idx: jax.Array, mesh: Mesh):
    """Rows ``idx`` (padding entries are -1) of every array; batch axis sharded over the mesh."""
    mask = idx >= 0
    safe = jnp.where(mask, idx, 0)
    batch = {k: jnp.take(v, safe, axis=0) for k, v in data.items()}
    batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P("data")))
    mask = jax.lax.with_sharding_constraint(mask, NamedSharding(mesh, P("data")))
    return batch, mask.astype(jnp.float32)


def _masked_sums(per_sample: jax.Array, aux: Mapping[str, jax.Array], mask: jax.Array) -> dict:
    sums = {"loss": jnp.sum(per_sample * mask)}
    for k, v in aux.items():
        sums[k] = jnp.sum(v * mask)
    sums["count"] = jnp.sum(mask)
    return sums


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """The jitted ``train_step(state, data, idx) -> (state, sums)``; ``state`` is donated.

    ``data``: dict of device arrays with a common leading sample axis (the whole dataset,
    replicated); ``idx``: (B,) int32 sample indices, -1 for padding (masked out, so a final
    partial batch keeps a static shape). The loss is the mean over the valid samples, as Keras
    averages a partial batch over its true size. ``sums`` holds on-device float32 scalars:
    masked sums of the loss and aux terms before the update, and ``count``.
    The per-step RNG key is ``fold_in(key(state.rng), state.step)`` (no key threading).
    """
    mesh = make_mesh() if mesh is None else mesh
    replicated = NamedSharding(mesh, P())

    def step(state: TrainState, data, idx):
        batch, mask = _gather_batch(data, idx, mesh)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def objective(params):
            per_sample, aux = loss_fn(params, state.rest, batch, key)
            n_valid = jnp.maximum(jnp.sum(mask), 1.0)
            return jnp.sum(per_sample * mask) / n_valid, (per_sample, aux)

        grads, (per_sample, aux) = jax.grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, _masked_sums(per_sample, aux, mask)

    return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def make_eval_step(loss_fn: LossFn, *, mesh: Mesh | None = None):
    """The jitted ``eval_step(params, rest, data, idx) -> sums`` (no update, nothing donated;
    the loss gets a fixed key)."""
    mesh = make_mesh() if mesh is None else mesh
    replicated = NamedSharding(mesh, P())

    def step(params, rest, data, idx):
        key = jax.random.key(0)
        batch, mask = _gather_batch(data, idx, mesh)
        per_sample, aux = loss_fn(params, rest, batch, key)
        return _masked_sums(per_sample, aux, mask)

    return jax.jit(step, out_shardings=replicated)


def _rows(batches: jax.Array) -> tuple[jax.Array, ...]:
    """The rows of a (n_steps, width) index table as separate device arrays (one dispatch,
    so the step loop never indexes with host integers)."""
    return tuple(batches[i] for i in range(batches.shape[0]))


def _pad_columns(rows: jax.Array, width: int) -> jax.Array:
    pad = width - rows.shape[1]
    if pad == 0:
        return rows
    return jnp.concatenate([rows, jnp.full((rows.shape[0], pad), -1, rows.dtype)], axis=1)


# Memo of jitted (train_step, eval_step) pairs keyed by (loss_fn, adam betas/eps, mesh):
# a hashable loss (e.g. PtychoLoss) then reuses its compiled executables across fit() calls.
# The learning rate is not part of the key: it lives in the optimiser state.
_STEP_CACHE: dict = {}
_STEP_CACHE_SIZE = 8


def _compiled_steps(loss_fn: LossFn, adam: tuple, mesh: Mesh):
    key = (loss_fn, tuple(float(a) for a in adam), mesh)
    try:
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _STEP_CACHE:
        return _STEP_CACHE[key]
    optimizer = make_optimizer(1e-3, *adam)
    steps = (
        make_train_step(loss_fn, optimizer, mesh=mesh),
        make_eval_step(loss_fn, mesh=mesh),
    )
    if key is not None:
        if len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = steps
    return steps


def _epoch_batches(key: jax.Array, n_train: int, n_steps: int, batch: int, width: int) -> jax.Array:
    """n_steps (width,) int32 rows: a permutation of range(n_train) cut into batches of ``batch``
    (the last one partial), each padded with -1 to ``width`` (a multiple of the device count)."""
    perm = jax.random.permutation(key, n_train).astype(jnp.int32)
    perm = jnp.concatenate([perm, jnp.full((n_steps * batch - n_train,), -1, jnp.int32)])
    return _rows(_pad_columns(perm.reshape(n_steps, batch), width))


def _fixed_batches(start: int, stop: int, batch: int, width: int) -> np.ndarray:
    idx = np.arange(start, stop, dtype=np.int32)
    n_steps = max(1, -(-idx.size // batch))
    out = np.full((n_steps, width), -1, np.int32)
    flat = np.full(n_steps * batch, -1, np.int32)
    flat[: idx.size] = idx
    out[:, :batch] = flat.reshape(n_steps, batch)
    return out


# ---------------------------------------------------------------------------------------------
# The epoch loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FitOptions:
    """Hyper-parameters of :func:`fit` (defaults: the reference's Keras settings).

    ``checkpoint_dir``: Orbax run checkpoints are written there after every epoch (None: no
    checkpoints). ``resume``: continue from the latest checkpoint in ``checkpoint_dir`` (a fresh
    start when there is none). ``devices``: data-parallel devices (default all).
    """

    nepochs: int = 50
    batch_size: int = 16
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-7
    validation_split: float = 0.05
    shuffle: bool = True
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    plateau_min_lr: float = 1e-4
    plateau_min_delta: float = 1e-4
    plateau_cooldown: int = 0
    early_stopping_patience: int | None = 3
    early_stopping_min_delta: float = 0.0
    seed: int = 0
    checkpoint_dir: Path | None = None
    resume: bool = False
    max_checkpoints: int = 2
    progress: bool = True
    devices: Sequence[Any] | None = None
    # e.g. "disallow": jax.transfer_guard around the steps of each epoch (a debugging aid
    # that proves the loop makes no implicit host<->device copies).
    transfer_guard: str | None = None

    def validate(self) -> None:
        if not (isinstance(self.nepochs, int) and self.nepochs >= 1):
            raise ValueError(f"nepochs must be an int >= 1, got {self.nepochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0.0 <= self.validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {self.validation_split!r}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (where the run checkpoints are)")


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: final ``params``/``rest`` (device pytrees), ``history`` (dict of
    per-epoch lists: loss, val_loss, learning_rate, aux terms, epoch_time_s), ``epochs_run`` and
    the full final ``state``."""

    params: Any
    rest: Any
    history: dict[str, list]
    epochs_run: int
    state: TrainState
    stopped_early: bool = False


def save_history(history: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``history`` as JSON atomically (:func:`backend_api.fileio.write_json`); non-finite
    floats become strings (``"nan"``), numpy scalars and arrays plain numbers and lists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, _jsonable(history), indent=1)


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def _plain(x: float | None):
    return None if x is None else float(x)


_LOOP_KEYS = frozenset({"epochs_done", "n_samples", "batch_size", "history", "plateau", "early_stopping"})


class _RunCheckpoints:
    """Orbax run checkpoints: the TrainState (arrays) plus a JSON record of the loop state."""

    def __init__(self, directory: Path, max_to_keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        directory = Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "loop"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def clear(self) -> None:
        for s in list(self.manager.all_steps()):
            self.manager.delete(s)

    def save(self, epoch_done: int, state: TrainState, loop: dict) -> None:
        ocp = self._ocp
        self.manager.save(
            epoch_done,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)),
        )

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """The TrainState and loop record of ``step``; a checkpoint that cannot be read (garbled
        or truncated array files, missing metadata, a loop record without its keys) raises
        :class:`~pinn_jax.checkpoint.CheckpointError`, one line naming the step folder."""
        from pinn_jax.checkpoint import CheckpointError, one_line, quiet_aborted_restore

        ocp = self._ocp
        step_dir = self.directory / str(step)
        try:
            with quiet_aborted_restore():
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()
                    ),
                )
            state, loop = out["state"], out["loop"]
            if not isinstance(loop, dict) or not _LOOP_KEYS <= set(loop):
                raise ValueError(f"its loop record lacks {sorted(_LOOP_KEYS - set(loop or {}))}")
        except Exception as exc:  # orbax/tensorstore raise ValueError, KeyError, OSError, ...
            raise CheckpointError(
                f"checkpoint {step_dir} is unreadable ({type(exc).__name__}: {one_line(exc)}); "
                "delete it or start without --resume",
                path=step_dir,
            ) from exc
        return state, loop

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _put_copy(tree, sharding):
    """Fresh device buffers for ``tree``: the step donates its state and the caller's arrays
    must stay valid. (device_put(..., may_alias=False) still aliases the first shard of a
    replicated multi-device array in jax 0.10, so the copy goes through the host.)"""
    return jax.device_put(jax.device_get(tree), sharding)


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def fit(
    loss_fn: LossFn,
    params,
    rest,
    data: Mapping[str, Any],
    options: FitOptions | None = None,
    *,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Train ``params`` to minimise ``loss_fn`` over ``data`` with the reference's Keras loop.

    ``data``: dict of arrays (numpy or jax) sharing the leading sample axis ``n``; the last
    ``n - validation_split_index(n)`` samples validate. Everything is put on the devices once;
    per epoch the host only dispatches steps and fetches the metrics at the end.
    ``on_epoch_end(epoch, logs)`` runs after the epoch's checkpoint is written (0-based epoch).
    Raises :class:`TrainingDivergedError` when the epoch loss is not finite (the checkpoint of
    the previous epoch stays the latest one).
    """
    options = FitOptions() if options is None else options
    options.validate()
    if not data:
        raise ValueError("data must contain at least one array")
    sizes = {k: int(np.shape(v)[0]) for k, v in data.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"data arrays must share the leading (sample) axis, got sizes {sizes}")

    vsplit = options.validation_split if n <= STREAMING_THRESHOLD else 0.0
    n_train = validation_split_index(n, vsplit)
    devices = list(jax.devices() if options.devices is None else options.devices)
    mesh = make_mesh(devices)
    replicated = NamedSharding(mesh, P())
    # Pad the global batch to a multiple of the device count; padding rows are masked out.
    batch = -(-options.batch_size // len(devices)) * len(devices)
    n_steps = -(-n_train // options.batch_size)

    optimizer = make_optimizer(options.learning_rate, options.adam_beta1, options.adam_beta2, options.adam_epsilon)
    device_data = jax.device_put(
        {k: v if isinstance(v, jax.Array) else np.asarray(v) for k, v in data.items()}, replicated
    )
    params = _put_copy(params, replicated)
    rest = _put_copy(rest, replicated)
    state = jax.device_put(init_train_state(params, rest, optimizer, options.seed), replicated)

    train_step, eval_step = _compiled_steps(
        loss_fn, (options.adam_beta1, options.adam_beta2, options.adam_epsilon), mesh
    )
    val_batches = None
    if n_train < n:
        val_batches = jax.device_put(list(_fixed_batches(n_train, n, options.batch_size, batch)), replicated)
    shuffle_key = jax.random.fold_in(jax.random.key(options.seed), 0x5EED)
    epoch_batches = jax.jit(_epoch_batches, static_argnums=(1, 2, 3, 4), out_shardings=replicated)
    fixed_train = jax.device_put(list(_fixed_batches(0, n_train, options.batch_size, batch)), replicated)

    plateau = PlateauState(lr=float(options.learning_rate))
    early = EarlyStoppingState()
    history: dict[str, list] = {}
    start_epoch = 0
    ckpt = None
    bar = None
    try:
        # Inside the try: a failed restore must still close the manager (its async machinery
        # otherwise dies with the interpreter and prints tracebacks).
        if options.checkpoint_dir is not None:
            ckpt = _RunCheckpoints(Path(options.checkpoint_dir), options.max_checkpoints)
            latest = ckpt.latest_step()
            if options.resume and latest is not None:
                state, loop = ckpt.restore(latest, _abstract(state, replicated))
                if loop.get("n_samples") != n or loop.get("batch_size") != options.batch_size:
                    raise ValueError(
                        f"cannot resume from {ckpt.directory}: it was written for n_samples="
                        f"{loop.get('n_samples')}, batch_size={loop.get('batch_size')}, but this run has "
                        f"n_samples={n}, batch_size={options.batch_size}"
                    )
                start_epoch = int(loop["epochs_done"])
                history = {k: list(v) for k, v in loop["history"].items()}
                plateau = PlateauState(**loop["plateau"])
                early = EarlyStoppingState(**loop["early_stopping"])
                log.info("resuming from %s after epoch %d", ckpt.directory, start_epoch)
            elif latest is not None:
                log.info("starting afresh: removing the old run checkpoints in %s", ckpt.directory)
                ckpt.clear()

        bar = _progress(options, start_epoch)
        stopped_early = bool(early.stop)
        epoch = start_epoch
        for epoch in range(start_epoch, options.nepochs):
            if early.stop:
                break
            t0 = time.perf_counter()
            if options.shuffle:
                batches = epoch_batches(jax.random.fold_in(shuffle_key, epoch), n_train, n_steps, options.batch_size, batch)
            else:
                batches = fixed_train
            sums = []
            val_sums = []
            with _guard(options.transfer_guard):
                for idx in batches:
                    state, s = train_step(state, device_data, idx)
                    sums.append(s)
                for idx in val_batches or ():
                    val_sums.append(eval_step(state.params, state.rest, device_data, idx))
            # The only host synchronisation of the epoch.
            sums, val_sums = jax.device_get((sums, val_sums))
            logs = _reduce(sums)
            if val_sums:
                logs.update({f"val_{k}": v for k, v in _reduce(val_sums).items()})
            logs["learning_rate"] = plateau.lr
            if not all(math.isfinite(v) for k, v in logs.items() if k.endswith("loss")):
                good = None if ckpt is None else ckpt.latest_step()
                where = f"; the last good checkpoint (after epoch {good}) is in {ckpt.directory}" if good else ""
                raise TrainingDivergedError(
                    f"training loss is not finite at epoch {epoch + 1} (loss={logs.get('loss')}, "
                    f"val_loss={logs.get('val_loss')}){where}. Lower the learning rate, check the data "
                    "normalisation/intensity_scale, or resume from the checkpoint."
                )
            plateau = plateau_update(
                plateau,
                logs.get("val_loss"),
                factor=options.plateau_factor,
                patience=options.plateau_patience,
                min_lr=options.plateau_min_lr,
                min_delta=options.plateau_min_delta,
                cooldown=options.plateau_cooldown,
            )
            if plateau.lr != logs["learning_rate"]:
                state = state._replace(opt_state=set_learning_rate(state.opt_state, plateau.lr))
            if options.early_stopping_patience is not None:
                early = early_stopping_update(
                    early,
                    logs["loss"],
                    epoch,
                    patience=options.early_stopping_patience,
                    min_delta=options.early_stopping_min_delta,
                )
            logs["epoch_time_s"] = time.perf_counter() - t0
            for k, v in logs.items():
                history.setdefault(k, []).append(v)
            if ckpt is not None:
                ckpt.save(
                    epoch + 1,
                    state,
                    {
                        "epochs_done": epoch + 1,
                        "n_samples": n,
                        "batch_size": options.batch_size,
                        "history": _jsonable(history),
                        "plateau": dataclasses.asdict(plateau),
                        "early_stopping": dataclasses.asdict(early),
                    },
                )
            if bar is not None:
                bar.set_postfix(_postfix(logs), refresh=False)
                bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(epoch, logs)
            if early.stop:
                stopped_early = True
                log.info("early stopping after epoch %d (loss did not improve for %d epochs)",
                         epoch + 1, options.early_stopping_patience)
                break
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
    epochs_run = len(history.get("loss", []))
    return FitResult(
        params=state.params,
        rest=state.rest,
        history=history,
        epochs_run=epochs_run,
        state=state,
        stopped_early=stopped_early,
    )


def _guard(level: str | None):
    import contextlib

    return contextlib.nullcontext() if level is None else jax.transfer_guard(level)


def _reduce(sums: list[dict]) -> dict[str, float]:
    total = {k: float(np.sum([np.float64(s[k]) for s in sums])) for k in sums[0]}
    count = max(total.pop("count"), 1.0)
    return {k: v / count for k, v in total.items()}


def _postfix(logs: Mapping[str, float]) -> dict[str, str]:
    out = {"loss": f"{logs['loss']:.5g}"}
    if "val_loss" in logs:
        out["val_loss"] = f"{logs['val_loss']:.5g}"
    out["lr"] = f"{logs['learning_rate']:.2g}"
    return out


def _progress(options: FitOptions, start_epoch: int):
    if not options.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=options.nepochs, initial=start_epoch, desc="epoch", unit="epoch", leave=True)


# ---------------------------------------------------------------------------------------------
# PtychoPINN: losses, data on device, and the whole training run
# ---------------------------------------------------------------------------------------------


def intensity_scale_for(nphotons: float, N: int) -> float:
    """The reference's training-time scale ``sqrt(nphotons) / (N / 2)`` (brief §3)."""
    if not (nphotons > 0 and math.isfinite(nphotons)):
        raise ValueError(f"nphotons: expected a positive finite number, got {nphotons!r}")
    return float(math.sqrt(nphotons) / (N / 2))


def _center_channel0(Y: np.ndarray, coords: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Reference ``center_channels(Y, coords)[..., :1]``: channel 0 of each group translated by
    ``-coords`` into the group frame. ``Y`` (n, N, N, C) real or complex; coords (n, 1, 2, C).
    Returns (n, N, N, 1) of Y's dtype."""
    from pinn_jax import geometry

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
        from pinn_jax import geometry, physics
        from pinn_jax.model import autoencoder_apply, diffraction_to_obj_apply

        s = jnp.float32(self.intensity_scale)
        xs = batch["X"] * s
        if self.model_type == "supervised":
            mask = geometry.center_mask(self.N)[None, :, :, None]
            obj = diffraction_to_obj_apply(self.graphdef, (params, rest), xs, batch["coords"])
            loss = jnp.sum(jnp.abs(obj - batch["Yc"]) * mask, axis=(1, 2, 3)) / jnp.sum(mask)
            return loss, {"supervised_mae": loss}

        def per_sample(fn):
            return jax.vmap(lambda a, b: fn(a[None], b[None]))

        obj, amp, inten = autoencoder_apply(self.graphdef, (params, rest), xs, batch["coords"])
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
    from pinn_jax import probe as probe_mod
    from pinn_jax.model import build_model, split_model

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
        model = build_model(
            mc,
            np.asarray(probe),
            s,
            probe_trainable=bool(config.probe_trainable),
            intensity_scale_trainable=bool(config.intensity_scale_trainable),
            seed=seed,
        )
    graphdef, params, rest = split_model(model)
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
        adam_beta1=float(getattr(config, "adam_beta1", 0.9)),
        adam_beta2=float(getattr(config, "adam_beta2", 0.999)),
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
) -> TrainOutcome:
    """Train a PtychoPINN on a data container with the reference's loop (see :func:`fit`).

    ``seed`` fixes both the weight initialisation and the shuffling. With ``checkpoint_dir``,
    an Orbax run checkpoint is written after every epoch and ``resume=True`` continues from
    the latest one. ``history_path`` (JSON) is written at the end.
    """
    from flax import nnx

    setup = prepare_training(container, config, seed=seed, model=model)
    options = fit_options_from_config(
        config,
        seed=int(seed),
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        resume=bool(resume),
        progress=bool(progress),
        devices=devices,
    )
    result = fit(setup.loss_fn, setup.params, setup.rest, setup.data, options, on_epoch_end=on_epoch_end)
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
