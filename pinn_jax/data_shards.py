"""Training samples split over the devices: each device (and so each process) holds only its shard.

By default :func:`pinn_jax.loop.fit` replicates the whole dataset on every device and draws each
batch from one global permutation. With ``FitOptions.shard_data`` (the default in a
multi-process run) the ``n_train`` training samples are cut into ``D`` contiguous shards, one
per device of the mesh, sizes as equal as possible (``np.array_split``); every epoch each shard
is permuted on its own (key ``fold_in(epoch_key, d)``) and every step takes
``batch_size / D`` samples from each, so a device only ever reads its own shard — no
cross-device gather, and a process needs the rows of its own devices' shards only
(:func:`process_rows`). The validation samples (the last ``n - n_train``) stay replicated.

The schedule depends on the number of devices ``D`` and the seed only, not on how the devices
are spread over processes: two processes with two devices each train exactly like one process
with four devices and ``shard_data``. With one device it is the unsharded schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ShardLayout", "LocalSamples", "shard_layout", "process_rows", "local_shard_indices"]


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """``n`` samples, the first ``n_train`` training, split into ``n_shards`` device shards;
    ``batch_size`` global samples per step, ``batch_size / n_shards`` from each shard."""

    n: int
    n_train: int
    n_shards: int
    batch_size: int

    @property
    def bounds(self) -> np.ndarray:
        """``(n_shards + 1,)`` int64: shard ``d`` is training rows ``[bounds[d], bounds[d+1])``."""
        sizes = np.full(self.n_shards, self.n_train // self.n_shards, np.int64)
        sizes[: self.n_train % self.n_shards] += 1
        return np.concatenate([[0], np.cumsum(sizes)])

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(v) for v in np.diff(self.bounds))

    @property
    def shard_capacity(self) -> int:
        """Rows each device holds (the largest shard; shorter ones are zero-padded)."""
        return max(self.sizes)

    @property
    def per_device_batch(self) -> int:
        return self.batch_size // self.n_shards

    @property
    def n_steps(self) -> int:
        """Steps per epoch: enough to visit every sample of the largest shard once."""
        return max(1, -(-self.shard_capacity // self.per_device_batch))

    def shard_rows(self, d: int) -> np.ndarray:
        """The global training rows of shard ``d``."""
        b = self.bounds
        return np.arange(b[d], b[d + 1], dtype=np.int64)

    def validation_rows(self) -> np.ndarray:
        return np.arange(self.n_train, self.n, dtype=np.int64)


def shard_layout(n: int, n_train: int, n_shards: int, batch_size: int) -> ShardLayout:
    """A checked :class:`ShardLayout`: ``batch_size`` must be a multiple of ``n_shards`` (each
    device takes the same number of samples per step) and every shard must hold a sample."""
    if not 0 < n_train <= n:
        raise ValueError(f"n_train: expected 0 < n_train <= n={n}, got {n_train}")
    if n_shards < 1:
        raise ValueError(f"n_shards: expected >= 1, got {n_shards}")
    if batch_size % n_shards:
        raise ValueError(f"batch_size {batch_size}: with the training data sharded over {n_shards} devices "
                         f"it must be a multiple of {n_shards} (each device takes batch_size / {n_shards} "
                         f"samples per step); pick another batch size or do not shard the data")
    if n_train < n_shards:
        raise ValueError(f"{n_train} training samples cannot be sharded over {n_shards} devices "
                         "(each needs at least one); use fewer devices or do not shard the data")
    return ShardLayout(int(n), int(n_train), int(n_shards), int(batch_size))


def process_rows(layout: ShardLayout, shards: Sequence[int]) -> np.ndarray:
    """The global sample rows a process needs: the training rows of ``shards`` (in that order),
    then every validation row. A :class:`LocalSamples` holds exactly these rows."""
    parts = [layout.shard_rows(int(d)) for d in shards] + [layout.validation_rows()]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def local_shard_indices(mesh: Any, process_index: int | None = None) -> list[int]:
    """The shards (positions in the mesh's flat device order) whose devices belong to process
    ``process_index`` (default: this one)."""
    import jax

    me = jax.process_index() if process_index is None else int(process_index)
    return [i for i, dev in enumerate(np.asarray(mesh.devices).flat) if dev.process_index == me]


@dataclasses.dataclass
class LocalSamples:
    """This process's part of an ``n``-sample dataset: ``arrays`` hold the rows
    ``process_rows(layout, local shards)`` (in that order) of every array, as produced by
    :func:`pinn_jax.sharded_grouping.local_training_container`. :func:`pinn_jax.loop.fit` takes
    it in place of the full dataset when the data are sharded."""

    arrays: Mapping[str, Any]
    n: int

    def __post_init__(self) -> None:
        sizes = {k: int(np.shape(v)[0]) for k, v in self.arrays.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"LocalSamples: arrays must share the leading (sample) axis, got sizes {sizes}")
        if not sizes:
            raise ValueError("LocalSamples: expected at least one array")

    @property
    def local_count(self) -> int:
        return int(np.shape(next(iter(self.arrays.values())))[0])
