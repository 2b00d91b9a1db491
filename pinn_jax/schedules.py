"""Keras' epoch-end callbacks as pure host-side state machines, and the validation split.

* ReduceLROnPlateau(val_loss, factor 0.5, patience 2, min_lr 1e-4, min_delta 1e-4, cooldown 0)
  then EarlyStopping(loss, patience 3, min_delta 0) at each epoch end;
* the last ``validation_split`` fraction of the samples (unshuffled) is held out, except above
  :data:`STREAMING_THRESHOLD` samples, where the reference streams without a split.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "PlateauState",
    "plateau_update",
    "EarlyStoppingState",
    "early_stopping_update",
    "validation_split_index",
    "STREAMING_THRESHOLD",
]


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
