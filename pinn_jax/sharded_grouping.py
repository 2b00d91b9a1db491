"""Each process groups the whole scan but assembles only its own shard of the training data.

The neighbour grouping itself works on the positions alone (two floats per pattern: 10^6
positions group in seconds), so every process computes the same global group table ``nn``
``(n, C)``, with the same seed, exactly as one process would. What is expensive is the grouped
diffraction ``X`` ``(n, N, N, C)``: each process builds only the rows its devices train on
(:func:`pinn_jax.data_shards.process_rows`: its shards plus the small validation set), reading
only the patterns those groups point at from a memory-mapped ``diff3d``
(``RawData.from_file(..., mmap=True)``). The ``X_full`` normalisation is a statistic of all
groups: each process sums the pattern energies of the rows it owns
(:func:`backend_api.grouping.group_energy`) and the partial sums are added across processes, so
every process scales its rows by the factor one process would have computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["local_training_container", "sum_across_processes"]


def sum_across_processes(value: float) -> float:
    """``value`` summed over all processes (float64); the value itself in a single process."""
    import jax

    if jax.process_count() == 1:
        return float(value)
    from jax.experimental import multihost_utils

    parts = multihost_utils.process_allgather(np.asarray([value], np.float64))
    return float(np.asarray(parts, np.float64).sum())


def local_training_container(raw: Any, config: Any, *, seed: int, batch_size: int | None = None,
                             devices: Sequence[Any] | None = None, n_shards: int | None = None,
                             validation_split: float | None = None, shards: Sequence[int] | None = None,
                             counts_validation: bool | None = None,
                             reduce: Callable[[float], float] = sum_across_processes) -> tuple[Any, int]:
    """``(container, n)``: this process's rows of the grouping ``PtychoDataContainer.from_raw_data
    (raw, config, seed=seed)`` would give (``n`` groups in all), for training with the data
    sharded over ``devices`` (default: every device of every process).

    The rows are ``process_rows(layout, local shards)``: the training rows of the shards held
    by this process's devices, then every validation row; ``X`` is scaled with the global
    normalisation. ``batch_size`` (default ``config.batch_size``) and ``validation_split``
    (default :class:`pinn_jax.loop.FitOptions`') must be those the training uses: they fix the
    layout, which :func:`pinn_jax.loop.fit` checks. ``shards`` (default: this process's,
    :func:`~pinn_jax.data_shards.local_shard_indices`), ``n_shards`` (default: the mesh's device count), ``counts_validation`` (whether this
    process adds the validation rows' energy; default: process 0) and ``reduce`` (the
    cross-process sum) are there to emulate one process of several in a test.
    """
    from backend_api.container import PtychoDataContainer
    from backend_api.grouping import group_energy, group_indices, grouped_rows, normalization_from_energy
    from pinn_jax.data_shards import local_shard_indices, process_rows, shard_layout
    from pinn_jax.loop import FitOptions, make_mesh
    from pinn_jax.schedules import STREAMING_THRESHOLD, validation_split_index

    model = config.model
    N, gridsize = int(model.N), int(model.gridsize)
    n_groups = getattr(config, "n_groups", None)
    nn = group_indices(raw.xcoords, raw.ycoords, nsamples=len(raw.xcoords) if n_groups is None else int(n_groups),
                       K=int(getattr(config, "neighbor_count", 4)), gridsize=gridsize, seed=seed,
                       sequential_sampling=bool(getattr(config, "sequential_sampling", False)),
                       enable_oversampling=bool(getattr(config, "enable_oversampling", False)),
                       neighbor_pool_size=getattr(config, "neighbor_pool_size", None))
    n, C = nn.shape
    vsplit = FitOptions().validation_split if validation_split is None else float(validation_split)
    n_train = validation_split_index(n, vsplit if n <= STREAMING_THRESHOLD else 0.0)
    mesh = make_mesh(devices) if n_shards is None or shards is None else None
    D = int(mesh.size) if n_shards is None else int(n_shards)
    layout = shard_layout(n, n_train, D, int(config.batch_size if batch_size is None else batch_size))
    shards = local_shard_indices(mesh) if shards is None else [int(d) for d in shards]
    rows = process_rows(layout, shards)
    if counts_validation is None:
        import jax

        counts_validation = jax.process_index() == 0
    # every group counted once over all processes: by its shard's owner; validation by process 0
    owned = [layout.shard_rows(d) for d in shards] + ([layout.validation_rows()] if counts_validation else [])
    own = np.concatenate(owned) if owned else np.zeros(0, np.int64)
    energy = reduce(group_energy(raw.diff3d, nn[own]))
    scale = normalization_from_energy(energy / (n * C), N)
    dset = grouped_rows(raw, nn[rows], N, scale)
    nphotons = float(getattr(config, "nphotons", 1e9))
    # the container's norm_Y_I = sqrt(nphotons / mean energy of X), X = scale * diffraction
    norm = float(np.sqrt(nphotons / (float(scale) ** 2 * energy / (n * C))))
    return PtychoDataContainer.from_grouped(dset, raw.probeGuess, nphotons=nphotons, norm_Y_I=norm), int(n)
