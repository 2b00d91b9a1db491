"""Several processes, one computation: ``jax.distributed`` for train, infer and reconstruct.

JAX's own distributed runtime does the work; this module only decides *whether* to start it and
with which arguments, and says which process writes files.

* Explicit: ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and
  ``process_id`` (the CLI's ``--coordinator_address/--num_processes/--process_id``).
* Implicit: inside a multi-task SLURM step (``SLURM_NTASKS`` > 1) or an Open MPI launch
  (``OMPI_COMM_WORLD_SIZE`` > 1), ``jax.distributed.initialize()`` detects everything itself.
* Otherwise nothing happens: a single-process run never touches the distributed runtime.

On CPU the cross-process collectives go through gloo (``jax_cpu_collectives_implementation``),
so the multi-process path runs — and is tested — on any machine. Once initialised,
``jax.devices()`` lists every process's devices and :func:`pinn_jax.loop.fit`'s 1-D mesh spans
them all: the global batch is sharded over all devices of all processes, the state replicated,
with the same jitted step as one process. Only process 0 writes files and shows progress
(:func:`is_primary`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

__all__ = ["DistributedOptions", "initialize", "is_primary", "process_count", "cluster_environment"]

log = logging.getLogger(__name__)

#: JAX's own default; a dead peer is noticed within about this many seconds.
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """``coordinator_address`` ``host:port``; ``num_processes`` >= 1; ``process_id`` in
    ``[0, num_processes)``; ``heartbeat_timeout_s``: how long a silent peer may stay silent
    before the others fail (seconds); ``initialization_timeout_s``: how long to wait for all
    processes to join."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S
    initialization_timeout_s: int = 300

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))

    def check(self) -> None:
        """``ValueError`` naming the flag when the explicit settings are incomplete or wrong."""
        if not self.explicit:
            return
        missing = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id")
                   if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a multi-process run needs --coordinator_address, --num_processes and "
                             f"--process_id together; missing {', '.join(missing)}")
        host, sep, port = str(self.coordinator_address).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator_address: expected host:port, got {self.coordinator_address!r}")
        if int(self.num_processes) < 1:
            raise ValueError(f"--num_processes: expected an integer >= 1, got {self.num_processes}")
        if not 0 <= int(self.process_id) < int(self.num_processes):
            raise ValueError(f"--process_id: expected 0 <= process_id < {self.num_processes}, "
                             f"got {self.process_id}")
        for name in ("heartbeat_timeout_s", "initialization_timeout_s"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive number of seconds, got {getattr(self, name)}")


def cluster_environment(env: Mapping[str, str] | None = None) -> str | None:
    """``"slurm"`` or ``"openmpi"`` when ``env`` (default ``os.environ``) describes a launch of
    more than one task that ``jax.distributed.initialize()`` can detect by itself, else None."""
    env = os.environ if env is None else env

    def more_than_one(key: str) -> bool:
        try:
            return int(env.get(key, "1")) > 1
        except ValueError:
            return False

    if more_than_one("SLURM_NTASKS") and "SLURM_PROCID" in env:
        return "slurm"
    if more_than_one("OMPI_COMM_WORLD_SIZE") and "OMPI_COMM_WORLD_RANK" in env:
        return "openmpi"
    return None


_started = False


def initialize(options: DistributedOptions | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """Start ``jax.distributed`` when asked (explicit ``options``) or launched by SLURM/Open MPI
    (:func:`cluster_environment`); return whether this is a multi-process run. Must run before
    the first JAX computation. Idempotent. A single process with no cluster environment: nothing
    happens, False."""
    global _started
    options = DistributedOptions() if options is None else options
    options.check()
    if _started:
        return True
    cluster = None if options.explicit else cluster_environment(env)
    if not options.explicit and cluster is None:
        return False
    if options.explicit and int(options.num_processes) == 1:
        return False
    import jax

    # gloo: the CPU backend's cross-process collectives (no effect on GPU/TPU backends)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=int(options.initialization_timeout_s),
                  heartbeat_timeout_seconds=int(options.heartbeat_timeout_s))
    if options.explicit:
        jax.distributed.initialize(coordinator_address=options.coordinator_address,
                                   num_processes=int(options.num_processes), process_id=int(options.process_id),
                                   **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
    _started = True
    log.info("jax.distributed: process %d of %d (%s), %d local of %d devices", jax.process_index(),
             jax.process_count(), cluster or options.coordinator_address, jax.local_device_count(), jax.device_count())
    return True


def process_count() -> int:
    """Processes in this run (1 unless :func:`initialize` started the distributed runtime)."""
    if not _started:
        return 1
    import jax

    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes files, logs progress and prints results (process 0)."""
    if not _started:
        return True
    import jax

    return jax.process_index() == 0
