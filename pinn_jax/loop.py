"""The epoch loop: train state, the jitted train/eval steps and :func:`fit` (Keras ``model.fit``).

Reference semantics reproduced here:

* the last ``validation_split`` fraction of the samples (unshuffled) is held out; the rest is
  reshuffled every epoch; the final partial batch is kept (masked here, so shapes stay static);
* the epoch ``loss`` is the sample-weighted mean of the per-batch losses, each computed before
  that batch's update; ``val_loss`` is the mean over the held-out samples after the epoch;
* the epoch-end callbacks of :mod:`pinn_jax.schedules` (plateau, then early stopping).

Everything lives on the devices; per epoch the host dispatches steps and fetches the metrics
once (one ``jax.device_get``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from pinn_jax.checkpoint import _RunCheckpoints
from pinn_jax.data_shards import LocalSamples, ShardLayout, local_shard_indices, process_rows, shard_layout
from pinn_jax.optim import make_optimizer, set_learning_rate
from pinn_jax.schedules import (
    STREAMING_THRESHOLD,
    EarlyStoppingState,
    PlateauState,
    early_stopping_update,
    plateau_update,
    validation_split_index,
)

__all__ = [
    "FitOptions",
    "FitResult",
    "LossFn",
    "TrainState",
    "init_train_state",
    "seed_key_data",
    "TrainingDivergedError",
    "make_mesh",
    "make_train_step",
    "make_eval_step",
    "fit",
    "save_history",
]

log = logging.getLogger(__name__)


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


def _gather_sharded_batch(data: Mapping[str, jax.Array], idx: jax.Array, mesh: Mesh):
    """Sharded data (:mod:`pinn_jax.data_shards`): ``data`` arrays ``(D, S, ...)`` and ``idx``
    ``(D, b)`` shard-local rows (-1 padding), both split over the mesh on axis 0. Every device
    takes its rows from its own shard (no communication); the batch is ``(D * b, ...)``, device
    ``d`` holding rows ``[d b, (d + 1) b)``, exactly the layout :func:`_gather_batch` gives."""
    from jax import shard_map

    def take(block, rows):
        safe = jnp.where(rows[0] >= 0, rows[0], 0)
        return {k: jnp.take(v[0], safe, axis=0) for k, v in block.items()}

    spec = P("data")
    batch = shard_map(take, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(data, idx)
    mask = jax.lax.with_sharding_constraint((idx >= 0).reshape(-1), NamedSharding(mesh, spec))
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
    sharded_data: bool = False,
) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """The jitted ``train_step(state, data, idx) -> (state, sums)``; ``state`` is donated.

    ``data``: dict of device arrays with a common leading sample axis (the whole dataset,
    replicated); ``idx``: (B,) int32 sample indices, -1 for padding (masked out, so a final
    partial batch keeps a static shape). The loss is the mean over the valid samples, as Keras
    averages a partial batch over its true size. ``sums`` holds on-device float32 scalars:
    masked sums of the loss and aux terms before the update, and ``count``.
    The per-step RNG key is ``fold_in(key(state.rng), state.step)`` (no key threading).
    ``sharded_data``: ``data`` is split over the devices instead (``(D, S, ...)`` arrays,
    ``idx`` ``(D, b)`` shard-local rows; see :mod:`pinn_jax.data_shards`); the rest of the step
    is the same.
    """
    mesh = make_mesh() if mesh is None else mesh
    replicated = NamedSharding(mesh, P())
    gather = _gather_sharded_batch if sharded_data else _gather_batch

    def step(state: TrainState, data, idx):
        batch, mask = gather(data, idx, mesh)
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


_STEP_CACHE_SIZE = 8


@functools.lru_cache(maxsize=_STEP_CACHE_SIZE)
def _cached_steps(loss_fn: LossFn, adam: tuple[float, float, float], mesh: Mesh, sharded_data: bool = False):
    """Memo of jitted (train_step, eval_step) pairs keyed by (loss_fn, adam betas/eps, mesh).

    A hashable loss (e.g. :class:`pinn_jax.objective.PtychoLoss`, which hashes its graphdef and
    weights) then reuses its compiled executables across fit() calls; least recently used pairs
    beyond ``_STEP_CACHE_SIZE`` are dropped (their executables with them). The learning rate is
    not part of the key: it lives in the optimiser state.
    """
    return _build_steps(loss_fn, adam, mesh, sharded_data)


def _build_steps(loss_fn: LossFn, adam: tuple[float, float, float], mesh: Mesh, sharded_data: bool = False):
    optimizer = make_optimizer(1e-3, *adam)
    return (make_train_step(loss_fn, optimizer, mesh=mesh, sharded_data=sharded_data),
            make_eval_step(loss_fn, mesh=mesh))


def _compiled_steps(loss_fn: LossFn, adam: tuple, mesh: Mesh, sharded_data: bool = False):
    """The (train_step, eval_step) pair for ``loss_fn``: memoised when the key is hashable,
    built afresh otherwise (e.g. a closure over a dict)."""
    adam = tuple(float(a) for a in adam)
    try:
        hash((loss_fn, adam, mesh))
    except TypeError:
        return _build_steps(loss_fn, adam, mesh, sharded_data)
    return _cached_steps(loss_fn, adam, mesh, bool(sharded_data))


def _epoch_batches(key: jax.Array, n_train: int, n_steps: int, batch: int, width: int) -> jax.Array:
    """n_steps (width,) int32 rows: a permutation of range(n_train) cut into batches of ``batch``
    (the last one partial), each padded with -1 to ``width`` (a multiple of the device count)."""
    perm = jax.random.permutation(key, n_train).astype(jnp.int32)
    perm = jnp.concatenate([perm, jnp.full((n_steps * batch - n_train,), -1, jnp.int32)])
    return _rows(_pad_columns(perm.reshape(n_steps, batch), width))


def _sharded_epoch_batches(key: jax.Array, sizes: tuple[int, ...], n_steps: int, batch: int,
                           shuffle: bool = True) -> tuple[jax.Array, ...]:
    """n_steps ``(D, batch)`` int32 rows for sharded data: shard ``d`` (``sizes[d]`` samples)
    permuted with ``fold_in(key, d)`` (``key`` itself for one shard, so one device gives
    :func:`_epoch_batches`' table) or in order, cut into ``batch``-sized pieces, -1 padded."""
    rows = []
    for d, size in enumerate(sizes):
        if shuffle:
            k = key if len(sizes) == 1 else jax.random.fold_in(key, d)
            perm = jax.random.permutation(k, size).astype(jnp.int32)
        else:
            perm = jnp.arange(size, dtype=jnp.int32)
        perm = jnp.concatenate([perm, jnp.full((n_steps * batch - size,), -1, jnp.int32)])
        rows.append(perm.reshape(n_steps, batch))
    return _rows(jnp.stack(rows, axis=1))


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
    ``shard_data``: split the training samples over the devices instead of replicating them
    (:mod:`pinn_jax.data_shards`; ``batch_size`` must then be a multiple of the device count);
    None: on in a multi-process run, off otherwise.
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
    # None: shard in a multi-process run (each process holds only its devices' shards), replicate
    # otherwise. See pinn_jax.data_shards.
    shard_data: bool | None = None
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



def _put_copy(tree, sharding):
    """Fresh device buffers for ``tree``: the step donates its state and the caller's arrays
    must stay valid. (device_put(..., may_alias=False) still aliases the first shard of a
    replicated multi-device array in jax 0.10, so the copy goes through the host.)"""
    return jax.device_put(jax.device_get(tree), sharding)


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


@dataclasses.dataclass
class _Placed:
    """One fit call's data, index tables and compiled steps on the mesh (built once).

    ``n``: samples; the first ``n_train`` train, in ``n_steps`` batches of ``batch_size`` each
    padded with -1 to ``width`` (a multiple of the device count). ``val_batches`` /
    ``fixed_train``: lists of (width,) int32 device rows (None: no validation samples);
    ``epoch_batches(key)``: the jitted shuffled table of the epoch's key. With sharded data the
    rows are ``(D, batch_size / D)`` shard-local indices and ``val_data`` holds the (replicated)
    validation samples.
    """

    n: int
    n_train: int
    n_steps: int
    batch_size: int
    width: int
    replicated: NamedSharding
    device_data: dict
    train_step: Callable
    eval_step: Callable
    val_batches: list | None
    fixed_train: list
    shuffle_key: jax.Array
    epoch_batches: Callable
    # sharded data: the replicated validation arrays (device_data holds the training shards)
    val_data: dict | None = None


@dataclasses.dataclass
class _LoopState:
    """The host-side loop state a run checkpoint records: callbacks, history, epochs done."""

    plateau: PlateauState
    early: EarlyStoppingState
    history: dict[str, list]
    start_epoch: int = 0

    def record(self, epochs_done: int, n: int, batch_size: int) -> dict:
        """The JSON loop record of a run checkpoint (the keys of ``_LOOP_KEYS``)."""
        return {
            "epochs_done": epochs_done,
            "n_samples": n,
            "batch_size": batch_size,
            "history": _jsonable(self.history),
            "plateau": dataclasses.asdict(self.plateau),
            "early_stopping": dataclasses.asdict(self.early),
        }


def _sample_count(data: Mapping[str, Any]) -> int:
    """The common leading (sample) axis of ``data``'s arrays (the global count of a
    :class:`~pinn_jax.data_shards.LocalSamples`)."""
    if isinstance(data, LocalSamples):
        return int(data.n)
    if not data:
        raise ValueError("data must contain at least one array")
    sizes = {k: int(np.shape(v)[0]) for k, v in data.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"data arrays must share the leading (sample) axis, got sizes {sizes}")
    return n


def _shard_data_wanted(options: FitOptions, data) -> bool:
    if isinstance(data, LocalSamples):
        if options.shard_data is False:
            raise ValueError("data: a LocalSamples holds only this process's shards; it needs shard_data")
        return True
    return jax.process_count() > 1 if options.shard_data is None else bool(options.shard_data)


def _sharded_blocks(data, layout: ShardLayout, mesh: Mesh) -> tuple[dict, dict]:
    """``data``'s training rows as ``(D, S, ...)`` global arrays split over the mesh (each
    device given only its shard, zero-padded to ``S``) and its validation rows (numpy)."""
    shards = local_shard_indices(mesh)
    if isinstance(data, LocalSamples):
        want = len(process_rows(layout, shards))
        if data.local_count != want:
            raise ValueError(f"data: this process holds {data.local_count} rows, but its shards {shards} "
                             f"and the {layout.n - layout.n_train} validation samples are {want} rows")
        arrays = dict(data.arrays)
        starts, at = {}, 0
        for d in shards:
            starts[d] = at
            at += layout.sizes[d]
        val_start = at
    else:
        arrays = dict(data)
        starts = {d: int(layout.bounds[d]) for d in shards}
        val_start = layout.n_train
    sharding = NamedSharding(mesh, P("data"))
    train, val = {}, {}
    cap = layout.shard_capacity
    for key, value in arrays.items():
        shape = (layout.n_shards, cap) + tuple(np.shape(value)[1:])
        singles = []
        for dev, index in sharding.addressable_devices_indices_map(shape).items():
            d = int(index[0].start or 0)
            block = np.zeros((1,) + shape[1:], np.asarray(value[:0]).dtype)
            block[0, : layout.sizes[d]] = np.asarray(value[starts[d]: starts[d] + layout.sizes[d]])
            singles.append(jax.device_put(block, dev))
        train[key] = jax.make_array_from_single_device_arrays(shape, sharding, singles)
        val[key] = np.asarray(value[val_start: val_start + layout.n - layout.n_train])
    return train, val


def _place_on_mesh(loss_fn: LossFn, params, rest, data, n: int, options: FitOptions) -> tuple[_Placed, TrainState]:
    """Put the data (replicated, or split over the devices with ``shard_data``), a fresh
    TrainState (copies: the step donates it) and the fixed index tables on the devices; fetch
    the compiled steps from the memo."""
    vsplit = options.validation_split if n <= STREAMING_THRESHOLD else 0.0
    n_train = validation_split_index(n, vsplit)
    devices = list(jax.devices() if options.devices is None else options.devices)
    mesh = make_mesh(devices)
    replicated = NamedSharding(mesh, P())
    sharded = _shard_data_wanted(options, data)
    if sharded:
        layout = shard_layout(n, n_train, len(devices), options.batch_size)
        width, n_steps = options.batch_size, layout.n_steps
    else:
        # Pad the global batch to a multiple of the device count; padding rows are masked out.
        width = -(-options.batch_size // len(devices)) * len(devices)
        n_steps = -(-n_train // options.batch_size)

    optimizer = make_optimizer(options.learning_rate, options.adam_beta1, options.adam_beta2, options.adam_epsilon)
    val_data = None
    if sharded:
        device_data, val_host = _sharded_blocks(data, layout, mesh)
        if n_train < n:
            val_data = jax.device_put(val_host, replicated)
    else:
        device_data = jax.device_put(
            {k: v if isinstance(v, jax.Array) else np.asarray(v) for k, v in data.items()}, replicated
        )
    params = _put_copy(params, replicated)
    rest = _put_copy(rest, replicated)
    state = jax.device_put(init_train_state(params, rest, optimizer, options.seed), replicated)

    train_step, eval_step = _compiled_steps(
        loss_fn, (options.adam_beta1, options.adam_beta2, options.adam_epsilon), mesh, sharded
    )
    val_batches = None
    if n_train < n:
        first, last = (0, n - n_train) if sharded else (n_train, n)
        val_batches = jax.device_put(list(_fixed_batches(first, last, options.batch_size, width)), replicated)
    shuffle_key = jax.random.fold_in(jax.random.key(options.seed), 0x5EED)
    if sharded:
        table = jax.jit(_sharded_epoch_batches, static_argnums=(1, 2, 3, 4), out_shardings=replicated)
        sizes, per_device = layout.sizes, layout.per_device_batch

        def epoch_batches(key):
            return table(key, sizes, n_steps, per_device, True)

        fixed_train = table(shuffle_key, sizes, n_steps, per_device, False)
    else:
        table = jax.jit(_epoch_batches, static_argnums=(1, 2, 3, 4), out_shardings=replicated)
        bs = options.batch_size

        def epoch_batches(key):
            return table(key, n_train, n_steps, bs, width)

        fixed_train = jax.device_put(list(_fixed_batches(0, n_train, bs, width)), replicated)
    placed = _Placed(
        n=n,
        n_train=n_train,
        n_steps=n_steps,
        batch_size=options.batch_size,
        width=width,
        replicated=replicated,
        device_data=device_data,
        train_step=train_step,
        eval_step=eval_step,
        val_batches=val_batches,
        fixed_train=list(fixed_train),
        shuffle_key=shuffle_key,
        epoch_batches=epoch_batches,
        val_data=val_data,
    )
    return placed, state


def _restore_or_clear(
    ckpt: _RunCheckpoints, options: FitOptions, run: _Placed, state: TrainState, loop: _LoopState
) -> tuple[TrainState, _LoopState]:
    """``resume``: the latest checkpoint's state and loop record (it must be of the same
    ``n_samples``/``batch_size``); otherwise old checkpoints are removed (a fresh run)."""
    latest = ckpt.latest_step()
    if options.resume and latest is not None:
        state, record = ckpt.restore(latest, _abstract(state, run.replicated))
        if record.get("n_samples") != run.n or record.get("batch_size") != options.batch_size:
            raise ValueError(
                f"cannot resume from {ckpt.directory}: it was written for n_samples="
                f"{record.get('n_samples')}, batch_size={record.get('batch_size')}, but this run has "
                f"n_samples={run.n}, batch_size={options.batch_size}"
            )
        loop = _LoopState(
            plateau=PlateauState(**record["plateau"]),
            early=EarlyStoppingState(**record["early_stopping"]),
            history={k: list(v) for k, v in record["history"].items()},
            start_epoch=int(record["epochs_done"]),
        )
        log.info("resuming from %s after epoch %d", ckpt.directory, loop.start_epoch)
    elif latest is not None:
        log.info("starting afresh: removing the old run checkpoints in %s", ckpt.directory)
        ckpt.clear()
    return state, loop


def _run_epoch(run: _Placed, state: TrainState, epoch: int, options: FitOptions) -> tuple[TrainState, dict]:
    """Dispatch one epoch's train steps, then the validation steps, and fetch their sums once.

    Returns the new state and the epoch logs (``loss``, aux terms, ``val_*``; python floats).
    """
    if options.shuffle:
        batches = run.epoch_batches(jax.random.fold_in(run.shuffle_key, epoch))
    else:
        batches = run.fixed_train
    sums = []
    val_sums = []
    with _guard(options.transfer_guard):
        for idx in batches:
            state, s = run.train_step(state, run.device_data, idx)
            sums.append(s)
        val_data = run.device_data if run.val_data is None else run.val_data
        for idx in run.val_batches or ():
            val_sums.append(run.eval_step(state.params, state.rest, val_data, idx))
    # The only host synchronisation of the epoch.
    sums, val_sums = jax.device_get((sums, val_sums))
    logs = _reduce(sums)
    if val_sums:
        logs.update({f"val_{k}": v for k, v in _reduce(val_sums).items()})
    return state, logs


def _check_finite(logs: Mapping[str, float], epoch: int, ckpt: _RunCheckpoints | None) -> None:
    """Raise :class:`TrainingDivergedError` when a ``*loss`` of the epoch is NaN/inf."""
    if all(math.isfinite(v) for k, v in logs.items() if k.endswith("loss")):
        return
    good = None if ckpt is None else ckpt.latest_step()
    where = f"; the last good checkpoint (after epoch {good}) is in {ckpt.directory}" if good else ""
    raise TrainingDivergedError(
        f"training loss is not finite at epoch {epoch + 1} (loss={logs.get('loss')}, "
        f"val_loss={logs.get('val_loss')}){where}. Lower the learning rate, check the data "
        "normalisation/intensity_scale, or resume from the checkpoint."
    )


def _step_callbacks(loop: _LoopState, state: TrainState, logs: Mapping[str, float], epoch: int,
                    options: FitOptions) -> TrainState:
    """Keras' epoch-end callbacks in order: plateau on ``val_loss`` (a new rate goes into the
    optimiser state), then early stopping on ``loss``. Updates ``loop`` in place."""
    loop.plateau = plateau_update(
        loop.plateau,
        logs.get("val_loss"),
        factor=options.plateau_factor,
        patience=options.plateau_patience,
        min_lr=options.plateau_min_lr,
        min_delta=options.plateau_min_delta,
        cooldown=options.plateau_cooldown,
    )
    if loop.plateau.lr != logs["learning_rate"]:
        state = state._replace(opt_state=set_learning_rate(state.opt_state, loop.plateau.lr))
    if options.early_stopping_patience is not None:
        loop.early = early_stopping_update(
            loop.early,
            logs["loss"],
            epoch,
            patience=options.early_stopping_patience,
            min_delta=options.early_stopping_min_delta,
        )
    return state


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
    ``n - validation_split_index(n)`` samples validate. With sharded data
    (``options.shard_data``) it may instead be a :class:`~pinn_jax.data_shards.LocalSamples`:
    only this process's rows. Everything is put on the devices once;
    per epoch the host only dispatches steps and fetches the metrics at the end.
    ``on_epoch_end(epoch, logs)`` runs after the epoch's checkpoint is written (0-based epoch).
    Raises :class:`TrainingDivergedError` when the epoch loss is not finite (the checkpoint of
    the previous epoch stays the latest one).
    """
    options = FitOptions() if options is None else options
    options.validate()
    n = _sample_count(data)
    run, state = _place_on_mesh(loss_fn, params, rest, data, n, options)
    loop = _LoopState(plateau=PlateauState(lr=float(options.learning_rate)), early=EarlyStoppingState(), history={})
    ckpt = None
    bar = None
    try:
        # Inside the try: a failed restore must still close the manager (its async machinery
        # otherwise dies with the interpreter and prints tracebacks).
        if options.checkpoint_dir is not None:
            ckpt = _RunCheckpoints(Path(options.checkpoint_dir), options.max_checkpoints)
            state, loop = _restore_or_clear(ckpt, options, run, state, loop)
        bar = _progress(options, loop.start_epoch)
        stopped_early = bool(loop.early.stop)
        for epoch in range(loop.start_epoch, options.nepochs):
            if loop.early.stop:
                break
            t0 = time.perf_counter()
            state, logs = _run_epoch(run, state, epoch, options)
            logs["learning_rate"] = loop.plateau.lr
            _check_finite(logs, epoch, ckpt)
            state = _step_callbacks(loop, state, logs, epoch, options)
            logs["epoch_time_s"] = time.perf_counter() - t0
            for k, v in logs.items():
                loop.history.setdefault(k, []).append(v)
            if ckpt is not None:
                ckpt.save(epoch + 1, state, loop.record(epoch + 1, n, options.batch_size))
            if bar is not None:
                bar.set_postfix(_postfix(logs), refresh=False)
                bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(epoch, logs)
            if loop.early.stop:
                stopped_early = True
                log.info("early stopping after epoch %d (loss did not improve for %d epochs)",
                         epoch + 1, options.early_stopping_patience)
                break
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
    return FitResult(
        params=state.params,
        rest=state.rest,
        history=loop.history,
        epochs_run=len(loop.history.get("loss", [])),
        state=state,
        stopped_early=stopped_early,
    )


def _guard(level: str | None):
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
