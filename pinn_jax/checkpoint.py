"""Persistence: a trained :class:`~pinn_jax.model.PtychoPINN` <-> ``wts.h5.zip``.

The archive keeps the reference's outer layout through :mod:`backend_api.archive` (manifest
tagged ``backend: 'jax'``, one folder per model, a params snapshot in each) and stores the
model's state as an Orbax checkpoint (a directory, zipped as a tree)::

    wts.h5.zip
      manifest.json / manifest.dill         {"models": [...], "version": "1.0-jax", "backend": "jax"}
      autoencoder/params.json|.dill         legacy cfg snapshot + N, gridsize, intensity_scale, probe
      autoencoder/state/...                 Orbax checkpoint of nnx.to_pure_dict(nnx.state(model))
      diffraction_to_obj/params.json|.dill
      diffraction_to_obj/state/...

Both entries hold the same weights (as in the reference, where the two Keras models share
layers); the loader reads ``diffraction_to_obj``. The snapshot's ``jax_model_spec`` (the
:class:`~pinn_jax.model.ModelSpec` fields) and the two ``*.trainable`` flags rebuild the exact
architecture; the state is restored into an abstract model (``nnx.eval_shape``), so loading
is bitwise: save -> load -> predict gives the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "ARCHIVE_VERSION",
    "MODEL_NAMES",
    "CheckpointError",
    "params_snapshot",
    "save_model",
    "load_model",
    "save_state",
    "restore_state",
    "one_line",
]

ARCHIVE_VERSION = "1.0-jax"
MODEL_NAMES = ("autoencoder", "diffraction_to_obj")
_STATE_DIR = "state"
#: prefix of the scratch folder save_model writes the Orbax checkpoint into (inside output_dir)
SAVE_TEMP_PREFIX = ".pinn_jax_save_"


class CheckpointError(ValueError):
    """An Orbax run checkpoint that cannot be read (corrupt, truncated, incomplete, or for
    another model). ``path``: the checkpoint step folder."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``exc`` as one short line for an error message: its first line, without tensorstore's
    JSON spec dumps, whitespace collapsed, cut to ``limit`` characters."""
    text = str(exc).strip() or type(exc).__name__
    text = text.splitlines()[0]
    text = re.split(r" \[tensorstore_spec", text, maxsplit=1)[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _is_closed_loop_noise(unraisable: Any) -> bool:
    exc = getattr(unraisable, "exc_value", None)
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _raised_in_orbax(exc: BaseException | None) -> bool:
    tb = getattr(exc, "__traceback__", None)
    return any(f"{os.sep}orbax{os.sep}" in frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb))


def _from_checkpoint_read(exc: BaseException | None) -> bool:
    """An Orbax read task's error, or a tensorstore read future's (which has no traceback
    through Orbax: it is recognised by the tensorstore spec its message carries)."""
    return _raised_in_orbax(exc) or (exc is not None and "[tensorstore_spec" in str(exc))


class _UnretrievedOrbaxTasks(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" records for the reads of a
    failed Orbax restore."""

    _NOISE = ("Task exception was never retrieved", "Future exception was never retrieved")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        noise = str(record.msg).startswith(self._NOISE) and _from_checkpoint_read(exc)
        return not noise


_ASYNCIO_FILTER = _UnretrievedOrbaxTasks()
#: the read coroutines of Orbax/tensorstore that an aborted restore leaves unawaited (seen:
#: ``Store._get_array_metadatas``, ``_read_array_index_and_device_put``)
_UNAWAITED_ORBAX_READ = (r"coroutine '(Store\._get_array_metadatas|_read_array_index_and_device_put|"
                         r"[A-Za-z_.]*(read|restore|metadata)[A-Za-z_.]*)' was never awaited")


def _quiet_unraisable(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_noise(unraisable):
            previous(unraisable)

    hook._pinn_jax_quiet = True
    return hook


@contextlib.contextmanager
def quiet_aborted_restore() -> Iterator[None]:
    """Silence the echoes of an Orbax restore that failed; the failure itself propagates.

    When one array of a checkpoint cannot be read, Orbax's ``asyncio.gather`` fails and its
    event loop is closed while tensorstore still completes the other reads: each completion
    then calls ``loop.call_soon_threadsafe`` on the closed loop, which tensorstore reports as
    a "RuntimeError: Event loop is closed" traceback through ``sys.unraisablehook``, and the
    other failed read tasks and tensorstore futures are later logged by asyncio as "Task (or
    Future) exception was never retrieved". Both arrive asynchronously, even after the error
    has been handled, and carry nothing the error does not. The filters (chained: everything else passes) are removed
    after a successful restore and kept for the stragglers after a failed one.
    """
    asyncio_log = logging.getLogger("asyncio")
    added_filter = _ASYNCIO_FILTER not in asyncio_log.filters
    asyncio_log.addFilter(_ASYNCIO_FILTER)
    previous = sys.unraisablehook
    hook = None
    if not getattr(previous, "_pinn_jax_quiet", False):
        hook = sys.unraisablehook = _quiet_unraisable(previous)
    try:
        yield  # an exception from the body propagates and leaves the filters installed
    except BaseException:
        # The aborted reads' coroutines are garbage-collected unawaited, later (often at
        # interpreter exit): Python warns "coroutine '...' was never awaited" for each.
        warnings.filterwarnings("ignore", message=_UNAWAITED_ORBAX_READ, category=RuntimeWarning)
        raise
    if hook is not None and sys.unraisablehook is hook:
        sys.unraisablehook = previous
    if added_filter:
        asyncio_log.removeFilter(_ASYNCIO_FILTER)


def _this_process_only():
    """Orbax options for a file only this process reads or writes (a model archive's state):
    without them, in a multi-process run Orbax waits at barriers for the other processes."""
    import jax
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return {}
    me = jax.process_index()
    return {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})}


def save_state(directory: str | os.PathLike, tree: Any) -> Path:
    """Write a pytree of arrays as a finalised Orbax checkpoint at ``directory`` (must not exist),
    from this process alone (the arrays are fetched to the host first)."""
    import jax
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    tree = jax.device_get(tree)
    with ocp.StandardCheckpointer(**_this_process_only()) as ckptr:
        ckptr.save(directory, tree)
        ckptr.wait_until_finished()
    return directory


def restore_state(directory: str | os.PathLike, abstract_tree: Any) -> Any:
    """Read an Orbax checkpoint into the structure/dtypes of ``abstract_tree`` (arrays or
    ``jax.ShapeDtypeStruct``); ``ValueError`` when a stored array's shape differs."""
    import jax
    import orbax.checkpoint as ocp

    with quiet_aborted_restore(), ocp.StandardCheckpointer(**_this_process_only()) as ckptr:
        restored = ckptr.restore(Path(directory).absolute(), abstract_tree)
    # Orbax restores host (numpy) arrays as stored, whatever the target says: check explicitly
    flat_want = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_got = jax.tree.leaves(restored)
    if len(flat_got) != len(flat_want):
        raise ValueError(f"{directory}: {len(flat_got)} arrays stored, {len(flat_want)} expected")
    for (path, want), got in zip(flat_want, flat_got):
        if tuple(np.shape(got)) != tuple(want.shape):
            raise ValueError(f"{directory}: array {jax.tree_util.keystr(path)} has shape {tuple(np.shape(got))}, "
                             f"expected {tuple(want.shape)}")
    return jax.tree.map(jax.numpy.asarray, restored)


# The loop record every run checkpoint carries (what fit needs to resume).
_LOOP_KEYS = frozenset({"epochs_done", "n_samples", "batch_size", "history", "plateau", "early_stopping"})


class _RunCheckpoints:
    """Orbax run checkpoints of :func:`pinn_jax.loop.fit`: one step folder per finished epoch
    holding the ``TrainState`` (arrays, item ``state``) and a JSON record of the loop state
    (item ``loop``: the keys of ``_LOOP_KEYS``); at most ``max_to_keep`` are kept."""

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

    def save(self, epoch_done: int, state: Any, loop: dict) -> None:
        ocp = self._ocp
        self.manager.save(
            epoch_done,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)),
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The TrainState and loop record of ``step``; a checkpoint that cannot be read (garbled
        or truncated array files, missing metadata, a loop record without its keys) raises
        :class:`~pinn_jax.checkpoint.CheckpointError`, one line naming the step folder."""
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


def _plain_value(v: Any) -> Any:
    if isinstance(v, os.PathLike):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return None
    return v


def params_snapshot(model, config: Any = None, *, base: Mapping[str, Any] | None = None) -> dict:
    """The params snapshot stored with each archived model (a plain dict).

    Starts from ``base`` (default: the reference's constant defaults
    ``backend_api.params.DEFAULT_CFG``, so the snapshot has every legacy key as the reference's
    whole-cfg snapshot does), overlays ``config`` (a Training/InferenceConfig, via
    ``dataclass_to_legacy_dict``, ``None`` values skipped), then the model's own truth: ``N``,
    ``gridsize`` and the other architecture keys, ``intensity_scale = exp(log_s)``, ``probe``
    ``(N, N, 1)`` complex64, the trainable flags and ``jax_model_spec``.

    The live legacy dict ``backend_api.params.cfg`` is never read here (it is written by the
    workflow bridge and the bundle loader only); a caller that wants it in the snapshot passes
    it: ``params_snapshot(model, config, base=backend_api.params.cfg)``.
    """
    from backend_api import params as legacy
    from backend_api.config import dataclass_to_legacy_dict

    snap = dict(legacy.DEFAULT_CFG if base is None else base)
    if config is not None:
        for k, v in dataclass_to_legacy_dict(config).items():
            if v is not None:
                snap[k] = v
    spec = model.spec
    snap.update(
        {
            "N": int(spec.N),
            "gridsize": int(spec.gridsize),
            "n_filters_scale": int(spec.n_filters_scale),
            "amp_activation": spec.amp_activation,
            "object.big": bool(spec.object_big),
            "probe.big": bool(spec.probe_big),
            "probe.mask": bool(spec.probe_mask),
            "pad_object": bool(spec.pad_object),
            "gaussian_smoothing_sigma": float(spec.gaussian_smoothing_sigma),
            "offset": int(spec.offset),
            "max_position_jitter": int(spec.max_position_jitter),
            "intensity_scale": float(np.asarray(model.intensity_scale)),
            "probe": np.asarray(model.probe, np.complex64).reshape(spec.N, spec.N, 1),
            "probe.trainable": bool(model.probe_trainable),
            "intensity_scale.trainable": bool(model.intensity_scale_trainable),
            "jax_model_spec": spec.to_dict(),
            "backend": "jax",
        }
    )
    return {k: _plain_value(v) for k, v in snap.items()}


def save_model(model, output_dir: str | os.PathLike, config: Any = None, *, params: Mapping | None = None) -> Path:
    """Write ``output_dir/wts.h5.zip`` (atomically) for a trained PtychoPINN; returns its path.

    ``config``: the Training/InferenceConfig the model was trained with (goes into the params
    snapshot); ``params``: the base snapshot (see :func:`params_snapshot`: default the
    reference's legacy defaults; pass ``backend_api.params.cfg`` for the live dict). Scratch files
    (``.pinn_jax_save_<pid>@<host>.*``, ``.wts.h5.zip.<pid>@<host>.*.tmp``) of earlier saves
    into ``output_dir`` that were killed midway are removed first; a failure leaves none of
    its own and keeps a previous archive byte-identical.
    """
    from flax import nnx

    from backend_api import archive

    snapshot = params_snapshot(model, config, base=params)
    pure = nnx.to_pure_dict(nnx.state(model))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The scratch folder carries this process's PID and is locked while in use, so a save
    # killed midway leaves one that the next save into output_dir removes (remove_stale_temps).
    with archive.writer_temp_dir(output_dir, SAVE_TEMP_PREFIX) as tmp:
        state_dir = save_state(tmp / _STATE_DIR, pure)
        entries = {
            name: archive.ModelEntry(params=snapshot, files={_STATE_DIR: state_dir}) for name in MODEL_NAMES
        }
        return archive.write_archive(
            output_dir / archive.ARCHIVE_NAME, entries, backend="jax", version=ARCHIVE_VERSION
        )


def _spec_from_snapshot(params: Mapping[str, Any]):
    from pinn_jax.model import ModelSpec

    spec = params.get("jax_model_spec")
    if isinstance(spec, Mapping):
        return ModelSpec.from_config(dict(spec))
    # A snapshot without our spec (hand-made archive): fall back to the legacy keys.
    return ModelSpec(
        N=int(params["N"]),
        gridsize=int(params["gridsize"]),
        n_filters_scale=int(params.get("n_filters_scale", 2)),
        amp_activation=params.get("amp_activation", "sigmoid"),
        object_big=bool(params.get("object.big", True)),
        probe_big=bool(params.get("probe.big", True)),
        probe_mask=bool(params.get("probe.mask", False)),
        pad_object=bool(params.get("pad_object", True)),
        gaussian_smoothing_sigma=float(params.get("gaussian_smoothing_sigma", 0.0)),
        offset=int(params.get("offset", 4)),
        max_position_jitter=int(params.get("max_position_jitter", 10)),
    )


def load_model(path: str | os.PathLike, *, model_name: str = "diffraction_to_obj", limits=None):
    """Load a JAX ``wts.h5.zip`` (or the folder holding it): ``(PtychoPINN, params_snapshot)``.

    A TensorFlow (or other) archive raises ``backend_api.archive.ArchiveBackendError`` (a
    ValueError) naming both backends and suggesting ``pinn-jax convert``; every other bad file
    an ``ArchiveError`` naming it (see :func:`backend_api.archive.read_archive`). ``limits``:
    an ``archive.ExtractionLimits`` (default: from the environment).
    """
    import jax
    from flax import nnx

    from backend_api import archive
    from pinn_jax.model import PtychoPINN

    with tempfile.TemporaryDirectory(prefix="pinn_jax_load_") as tmp:
        contents = archive.read_archive(path, tmp, expected_backend="jax", limits=limits)
        if model_name not in contents.models:
            raise KeyError(
                f"{contents.path}: model {model_name!r} not in archive; available: {sorted(contents.models)}"
            )
        entry = contents.models[model_name]
        params = dict(entry.params)
        spec = _spec_from_snapshot(params)
        state_dir = entry.dir / _STATE_DIR
        if not state_dir.is_dir():
            raise archive.ArchiveFormatError(
                f"{contents.path}: model {model_name!r} has no '{_STATE_DIR}/' Orbax checkpoint"
            )
        probe_trainable = bool(params.get("probe.trainable", False))
        scale_trainable = bool(params.get("intensity_scale.trainable", False))
        N = spec.N

        def blank():
            return PtychoPINN(
                spec,
                np.ones((N, N), np.complex64),
                1.0,
                probe_trainable=probe_trainable,
                intensity_scale_trainable=scale_trainable,
                rngs=nnx.Rngs(0),
            )

        abstract = nnx.eval_shape(blank)
        graphdef, abstract_state = nnx.split(abstract)
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(abstract_state)
        )
        try:
            restored = restore_state(state_dir, target)
        except Exception as exc:  # orbax raises several types for a mismatched tree
            raise archive.ArchiveFormatError(
                f"{contents.path}: the '{model_name}/{_STATE_DIR}' checkpoint is unreadable or does "
                f"not match the architecture in its params snapshot ({spec}): {one_line(exc)}"
            ) from exc
    nnx.replace_by_pure_dict(abstract_state, restored)
    model = nnx.merge(graphdef, abstract_state)
    return model, params
