"""Training: the public face of the training modules (names importable from here, as before).

The work lives in modules with one job each:

* :mod:`pinn_jax.optim`: Adam with Keras' epsilon convention, the learning rate in its state;
* :mod:`pinn_jax.schedules`: ReduceLROnPlateau / EarlyStopping as pure state machines and the
  validation split;
* :mod:`pinn_jax.loop`: the train state, the jitted train/eval steps and the epoch loop
  (:func:`fit`, Orbax run checkpoints via :class:`pinn_jax.checkpoint._RunCheckpoints`);
* :mod:`pinn_jax.objective`: the PtychoPINN losses and :func:`train_model`, which wires a
  :class:`pinn_jax.model.PtychoPINN` and a data container into :func:`fit`.
"""

from __future__ import annotations

from pinn_jax.loop import (
    FitOptions,
    FitResult,
    TrainingDivergedError,
    TrainState,
    fit,
    init_train_state,
    make_eval_step,
    make_mesh,
    make_train_step,
    save_history,
    seed_key_data,
)
from pinn_jax.objective import (
    PtychoLoss,
    TrainingSetup,
    _center_channel0,  # noqa: F401  (tests/test_losses.py reaches for it here)
    TrainOutcome,
    fit_options_from_config,
    intensity_scale_for,
    make_loss_fn,
    prepare_training,
    train_model,
)
from pinn_jax.optim import (
    KerasAdamState,
    get_learning_rate,
    keras_adam,
    make_optimizer,
    scale_by_keras_adam,
    set_learning_rate,
)
from pinn_jax.schedules import (
    EarlyStoppingState,
    PlateauState,
    early_stopping_update,
    plateau_update,
    validation_split_index,
)

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
