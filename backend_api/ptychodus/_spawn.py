"""Run one job in a freshly spawned child process and stream its messages back.

Why a child: a JAX process keeps its accelerator memory until it exits (and by default
preallocates most of it). ptychodus runs several backends in one GUI process, so every
train/reconstruct call runs in a ``multiprocessing`` *spawn* child that exits when the job
ends, releasing the device for the next backend.

Wire format over a ``multiprocessing`` queue (the child is the only producer, so order holds):

- ``('log', levelno, logger_name, message)`` — replayed into the parent's logging tree;
- ``('error', traceback_text, exception_pickle_or_None, type_name)`` — re-raised here;
- any other tuple — a job message, yielded to the caller (e.g. ``('epoch', ...)``);
- ``None`` — end of stream (always last).

This module is imported by the child before anything else, so it must stay light: stdlib
only, no ptychodus, no jax.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import queue as queue_module
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["PtychoPINNChildError", "JAX_CHILD_ENVIRONMENT", "run_in_child"]

logger = logging.getLogger(__name__)

#: Set in the child before anything can import jax: allocate accelerator memory on demand
#: instead of preallocating ~75 % of the device at start-up, so other backends in the same
#: ptychodus session are not starved while the job runs. (JAX's caching allocator is kept —
#: the 'platform' allocator would return memory sooner but slows training a lot; everything is
#: returned anyway when the child exits at the end of the call.)
JAX_CHILD_ENVIRONMENT = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


class PtychoPINNChildError(RuntimeError):
    """The child died or raised something that could not be re-created in the parent."""


class _QueueLogHandler(logging.Handler):
    def __init__(self, out: Any) -> None:
        super().__init__()
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.put(("log", record.levelno, record.name, self.format(record)))
        except Exception:  # logging must never kill the job
            pass


def _child_main(entry_point: str, payload: Any, out: Any, log_level: int) -> None:
    """Target of the spawned process: environment, logging, then ``entry(payload, send)``."""
    for key, value in JAX_CHILD_ENVIRONMENT.items():
        # A value the user set explicitly (e.g. a memory fraction policy) wins.
        os.environ.setdefault(key, value)
    handler = _QueueLogHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(log_level)
    try:
        module_name, _, func_name = entry_point.partition(":")
        func = getattr(importlib.import_module(module_name), func_name)
        func(payload, out.put)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        text = traceback.format_exc()
        try:
            blob: bytes | None = pickle.dumps(exc)
        except Exception:
            blob = None
        try:
            out.put(("error", text, blob, type(exc).__name__))
        except Exception:
            pass
    finally:
        root.removeHandler(handler)
        out.put(None)


def _reraise(text: str, blob: bytes | None, type_name: str) -> None:
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if isinstance(exc, Exception):
        exc.add_note(f"(raised in the PtychoPINN-JAX child process)\n{text}")
        raise exc
    raise PtychoPINNChildError(f"PtychoPINN-JAX child process raised {type_name}:\n{text}")


@contextmanager
def run_in_child(
    entry_point: str,
    payload: Any,
    *,
    poll_s: float = 0.5,
    grace_s: float = 10.0,
) -> Iterator[Iterator[tuple[Any, ...]]]:
    """Start ``entry_point`` ('package.module:function') in a spawn child with ``payload``.

    Yields an iterator over the job messages. Leaving the ``with`` block (normally, by an
    exception, or because the consumer stopped early) terminates the child if it still runs.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    level = logging.getLogger().getEffectiveLevel()
    process = ctx.Process(
        target=_child_main,
        args=(entry_point, payload, out, level),
        name="ptychopinn-jax-child",
    )
    process.start()

    def events() -> Iterator[tuple[Any, ...]]:
        while True:
            try:
                item = out.get(timeout=poll_s)
            except queue_module.Empty:
                if not process.is_alive():
                    # The sentinel may still be in flight right after exit.
                    try:
                        item = out.get(timeout=poll_s)
                    except queue_module.Empty:
                        raise PtychoPINNChildError(
                            "PtychoPINN-JAX child process exited without finishing "
                            f"(exit code {process.exitcode}); killed for memory?"
                        ) from None
                else:
                    continue
            if item is None:
                return
            tag = item[0]
            if tag == "log":
                _, levelno, name, message = item
                logging.getLogger(name).log(levelno, message)
            elif tag == "error":
                _reraise(item[1], item[2], item[3])
            else:
                yield item

    try:
        yield events()
    finally:
        if process.is_alive():
            process.join(timeout=0.2)
        if process.is_alive():
            logger.info("Stopping the PtychoPINN-JAX child process.")
            process.terminate()
            process.join(timeout=grace_s)
            if process.is_alive():
                process.kill()
                process.join()
        else:
            process.join()
        out.close()
        out.join_thread()
