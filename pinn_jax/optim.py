"""The optimiser: Adam with Keras' epsilon convention, the learning rate held in its state.

Reference semantics: Adam with lr 1e-3, beta 0.9/0.999 and Keras' epsilon placement (``eps`` is
added to ``sqrt(v)`` of the *biased* second moment, see :func:`scale_by_keras_adam`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "KerasAdamState",
    "scale_by_keras_adam",
    "keras_adam",
    "make_optimizer",
    "get_learning_rate",
    "set_learning_rate",
]


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
