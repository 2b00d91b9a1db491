"""Training from ptychodus's Processing view: loss curve, progress, and Infer afterwards.

ptychodus 1.7's own training task (``ptychodus/model/processing/monitor.py``,
``TrainBackgroundTask``) iterates ``train()`` for its ``progress`` only: the
``TrainOutput.training_loss`` it yields is dropped, so the Processing view's loss plot (which
draws the *selected product's* ``losses``, ``controller/processing/parameters.py``,
``ProcessingStatusController.plot_losses``) stays empty; and ``ProcessingController._train``
re-syncs the Infer button right after *queuing* the task, before any model exists, so Infer
stays disabled until the algorithm selection changes.

:func:`make_processing_api` builds a ``ProcessingAPI`` subclass (installed by
:mod:`.registration` in place of the one ``ProcessingCore`` creates) whose ``train`` runs
PtychoPINN-JAX reconstructors in :class:`TrainWithLossesTask` instead. That task, in
ptychodus's worker thread:

- reports progress (epochs done / ``NumEpochs``) as ptychodus's task does;
- after each epoch queues a foreground task (run by ptychodus in the GUI thread) that puts the
  training losses so far on the product being trained on, so the loss plot grows per epoch
  (and an Infer on that product later carries its model's training curve);
- when training ends (finished, stopped or failed) queues a notification of the algorithm
  parameter, which makes ``ProcessingController`` re-sync its buttons: Infer is enabled as soon
  as the model is loaded.

Other reconstructors go through ptychodus's own ``train`` unchanged. The class also carries
``ptychopinn_jax_library`` so :mod:`.gui` can find the library's settings.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["TrainWithLossesTask", "make_processing_api", "set_product_losses"]

logger = logging.getLogger(__name__)


def set_product_losses(item: Any, losses: Sequence[Any]) -> None:
    """Give the product repository item ``item`` these ``LossValue``\\ s and tell its observers.

    ptychodus 1.7 has no public setter for a product's losses alone: ``assign(product)`` also
    re-assigns metadata, positions, probe and object (turning the object into a "from memory"
    one). So this sets the item's loss list and raises the same repository notification
    ``assign`` does; only if the item lacks those internals does it fall back to ``assign``.
    """
    parent = getattr(item, "_parent", None)
    if hasattr(item, "_losses") and hasattr(parent, "handle_losses_changed"):
        item._losses = list(losses)
        parent.handle_losses_changed(item)
        return
    name = item.get_name()
    item.assign(dataclasses.replace(item.get_product(), losses=list(losses)))
    item.set_name(name)


class _SetLossesTask:
    def __init__(self, item: Any, losses: Sequence[Any]) -> None:
        self._item = item
        self._losses = list(losses)

    def __call__(self) -> None:
        set_product_losses(self._item, self._losses)


class _NotifyTask:
    def __init__(self, observable: Any) -> None:
        self._observable = observable

    def __call__(self) -> None:
        self._observable.notify_observers()


@dataclasses.dataclass(frozen=True)
class TrainWithLossesTask:
    """ptychodus background task: train, streaming losses to ``product_item`` (see module)."""

    task_monitor: Any
    foreground: Any  # ptychodus ForegroundTaskManager
    trainer: Any
    input_path: Path
    output_path: Path
    product_item: Any
    algorithm_parameter: Any

    def __call__(self) -> None:
        try:
            with self.task_monitor as monitor:
                goal = self.trainer.get_progress_goal()
                monitor.update_progress(0, goal)
                tic = time.perf_counter()
                for result in self.trainer.train(self.input_path, self.output_path):
                    monitor.update_progress(result.progress, goal)
                    if result.training_loss:
                        self.foreground.put_foreground_task(
                            _SetLossesTask(self.product_item, result.training_loss))
                    if monitor.is_stopping:
                        break
                logger.info(f"Training time {time.perf_counter() - tic:.4f} seconds.")
        finally:
            # Infer's enabled state follows is_model_loaded(); re-sync the GUI in its thread.
            self.foreground.put_foreground_task(_NotifyTask(self.algorithm_parameter))


def make_processing_api(base: type, library: Any) -> type:
    """A subclass of ptychodus's ``ProcessingAPI`` class ``base`` (see the module docstring)."""
    from .library import PtychoPINNJaxReconstructor

    class ProcessingAPI(base):  # type: ignore[misc, valid-type]
        __doc__ = base.__doc__
        ptychopinn_jax_library = library

        def __init__(self, task_manager: Any, product_api: Any, algorithm: Any,
                     task_monitor: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(task_manager, product_api, algorithm, task_monitor, *args, **kwargs)
            self._pj_task_manager = task_manager
            self._pj_product_api = product_api
            self._pj_algorithm = algorithm
            self._pj_monitor = task_monitor

        def train(self, input_path: Path, output_path: Path, *, product_index: int,
                  algorithm: str | None = None, block: bool = False) -> None:
            self.set_reconstructor_if_provided(algorithm)
            trainer = self._pj_algorithm.get_current_reconstructor()
            if not isinstance(trainer, PtychoPINNJaxReconstructor):
                super().train(input_path, output_path, product_index=product_index, block=block)
                return
            # As ptychodus does: fails early (no dataset) before anything is queued.
            self.get_reconstruct_input(product_index=product_index)
            task = TrainWithLossesTask(
                self._pj_monitor, self._pj_task_manager, trainer, Path(input_path),
                Path(output_path), self._pj_product_api.get_item(product_index),
                self._pj_algorithm,
            )
            snapshot = self._pj_monitor.get_completed_runs()
            self._pj_task_manager.put_background_task(task)
            if block:
                wait_s = getattr(type(self._pj_task_manager), "WAIT_TIME_S", 0.1)
                while not self._pj_task_manager.is_stopping:
                    if self._pj_monitor.wait_for_completion_after(snapshot, timeout=wait_s):
                        self._pj_task_manager.run_foreground_tasks()
                        break
                self._pj_monitor.raise_if_failed()

    ProcessingAPI.__module__ = __name__
    ProcessingAPI.__qualname__ = "ProcessingAPI"
    return ProcessingAPI
