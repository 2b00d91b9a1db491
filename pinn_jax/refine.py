"""Physics refinement: the training forward model, optimised over the object instead of the network.

Given measured diffraction amplitudes ``sqrt(counts)`` ``(n, N, N)``, scan positions ``(n, 2)``
``[x, y]`` (object pixels, patch centre at patch pixel ``N/2``), a probe ``(N, N)`` and an
initial object ``(H, W)`` complex on the object grid, :func:`refine_object` minimises the data
misfit of the model ``|F(P * O_i)| / N`` (the sub-pixel bilinear patch extraction of
:mod:`pinn_jax.simulate`, :func:`pinn_jax.physics.illuminate` and
:func:`pinn_jax.physics.diffraction_amplitude`) over the object, with optax Adam on minibatches
of positions: one jitted update per minibatch (state donated), the per-position model vmapped.

Noise models (``noise``):

- ``"gaussian"``: the amplitude misfit ``mean (A_model - A_measured)**2``, robust and fast;
- ``"poisson"``: the Poisson negative log-likelihood of the counts, ``mean (A_model**2 -
  counts * log(A_model**2 + eps))``, the right model at low dose.

The photon scale of the data is unknown to the model; it is estimated once from the initial
object (the least-squares gain between modelled and measured amplitudes) and folded into the
object, so the object that comes back is in the data's units (metrics compare up to a global
gain and phase, :func:`pinn_jax.metrics.eval_reconstruction`).

The object is optimised as a real ``(2, H, W)`` float32 array (real and imaginary parts), so
optax's Adam sees plain real parameters. Every patch must lie inside the object grid (checked
before any work: the extraction would otherwise clamp at the border).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["RefineOptions", "RefineResult", "refine_object", "model_amplitudes", "data_misfit"]

NOISE_MODELS = ("gaussian", "poisson")
_POISSON_EPS = 1e-6
_AMPLITUDE_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class RefineOptions:
    """``iterations``: passes over all positions; ``batch_size``: positions per update;
    ``learning_rate``: Adam step on the object (relative to its mean amplitude, so it does not
    depend on the data's photon scale); ``noise``: ``"gaussian"`` or ``"poisson"``;
    ``seed``: the minibatch order (deterministic for a seed)."""

    iterations: int = 20
    batch_size: int = 32
    learning_rate: float = 0.05
    noise: str = "gaussian"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "iterations" else 1):
                raise ValueError(f"RefineOptions.{name}: expected an integer >= "
                                 f"{0 if name == 'iterations' else 1}, got {v!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"RefineOptions.learning_rate: expected a positive number, got {self.learning_rate!r}")
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"RefineOptions.noise: expected one of {NOISE_MODELS}, got {self.noise!r}")


class RefineResult(NamedTuple):
    """``obj``: ``(H, W)`` complex64 refined object (data units); ``history``: mean misfit
    per pass (``iterations + 1`` values, the first before any update); ``scale``: the photon
    scale folded into the initial object."""

    obj: np.ndarray
    history: list[float]
    scale: float


# --------------------------------------------------------------------------------------------
# the forward model, for one position, vmapped


def _extract(obj: jax.Array, position: jax.Array, N: int) -> jax.Array:
    from pinn_jax.simulate import _extract_one

    obj_pad = jnp.pad(obj, ((0, 1), (0, 1)))
    return _extract_one(obj_pad, position, N)


def _amplitude(obj: jax.Array, probe: jax.Array, position: jax.Array) -> jax.Array:
    from pinn_jax.physics import diffraction_intensity, illuminate

    # sqrt(I + eps): the far-field intensity of a flat start has exact zeros, where the plain
    # square root's gradient is infinite; eps (model units, where the mean intensity is ~1e-3)
    # changes amplitudes by < 1e-5
    field = illuminate(probe, _extract(obj, position, probe.shape[0]))
    return jnp.sqrt(diffraction_intensity(field) + _AMPLITUDE_EPS)


def model_amplitudes(obj: Any, probe: Any, positions: Any) -> jax.Array:
    """``sqrt(|F(P * O_i)|**2 / N**2 + 1e-10)`` ``(n, N, N)`` float32 for ``obj (H, W)`` complex, ``probe (N, N)``
    complex and ``positions (n, 2)`` ``[x, y]`` object pixels (the simulator's forward model)."""
    obj = jnp.asarray(obj, jnp.complex64)
    probe = jnp.asarray(probe, jnp.complex64)
    return jax.vmap(lambda p: _amplitude(obj, probe, p))(jnp.asarray(positions, jnp.float32))


def data_misfit(model_amp: jax.Array, measured_amp: jax.Array, noise: str) -> jax.Array:
    """Mean misfit over the batch and pixels: amplitude least squares (``"gaussian"``) or the
    Poisson NLL of the counts ``measured_amp**2`` without its constant (``"poisson"``)."""
    if noise == "gaussian":
        return jnp.mean(jnp.square(model_amp - measured_amp))
    lam = jnp.square(model_amp)
    return jnp.mean(lam - jnp.square(measured_amp) * jnp.log(lam + _POISSON_EPS))


def _as_complex(x: jax.Array) -> jax.Array:
    return jax.lax.complex(x[0], x[1])


def _loss(x: jax.Array, probe, positions, measured, noise: str) -> jax.Array:
    return data_misfit(model_amplitudes(_as_complex(x), probe, positions), measured, noise)


def make_refine_step(optimizer: optax.GradientTransformation, noise: str) -> Callable:
    """One jitted minibatch update ``(x, opt_state, probe, positions_b, measured_b) ->
    (x, opt_state, loss)`` with the state donated; ``x`` is the ``(2, H, W)`` real object."""

    def step(x, opt_state, probe, positions, measured):
        loss, g = jax.value_and_grad(_loss)(x, probe, positions, measured, noise)
        updates, opt_state = optimizer.update(g, opt_state, x)
        return optax.apply_updates(x, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _check_inputs(amplitudes, positions, probe, initial) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    amp = np.asarray(amplitudes, np.float32)
    pos = np.asarray(positions, np.float64)
    pr = np.asarray(probe)
    if pr.ndim == 3 and pr.shape[-1] == 1:
        pr = pr[..., 0]
    obj = np.asarray(initial)
    if amp.ndim != 3 or amp.shape[1] != amp.shape[2]:
        raise ValueError(f"amplitudes: expected (n, N, N), got shape {amp.shape}")
    n, N = amp.shape[0], amp.shape[1]
    if pr.shape != (N, N):
        raise ValueError(f"probe: expected ({N}, {N}) to match the amplitudes, got shape {pr.shape}")
    if pos.shape != (n, 2):
        raise ValueError(f"positions: expected ({n}, 2) [x, y], got shape {pos.shape}")
    if obj.ndim != 2:
        raise ValueError(f"initial object: expected (H, W) complex, got shape {obj.shape}")
    if not (np.isfinite(amp).all() and np.isfinite(pos).all() and np.isfinite(obj).all()):
        raise ValueError("amplitudes, positions and the initial object must be finite")
    H, W = obj.shape
    # the extraction reads the (N + 1)-pixel window from floor(centre - N/2) of the object padded
    # by one zero row/column at the far end
    lo = np.floor(pos - N / 2)
    bad = (lo[:, 0] < 0) | (lo[:, 1] < 0) | (lo[:, 0] + N > W) | (lo[:, 1] + N > H)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"positions: {int(bad.sum())} of {n} patches do not lie inside the {H} x {W} object grid "
            f"(first: #{i} at x={pos[i, 0]:.6g}, y={pos[i, 1]:.6g}; centres must lie in x "
            f"[{N / 2:g}, {W + 1 - N / 2:g}), y [{N / 2:g}, {H + 1 - N / 2:g}))")
    return amp, pos.astype(np.float32), pr.astype(np.complex64), obj.astype(np.complex64)


def _photon_gain(obj, probe, positions, amp) -> float:
    """Least-squares gain g with ``g * A_model(obj) ~ A_measured`` (on up to 256 positions)."""
    k = min(len(positions), 256)
    model = np.asarray(model_amplitudes(obj, probe, positions[:k]), np.float64)
    num = float(np.sum(model * amp[:k]))
    den = float(np.sum(model * model))
    return num / den if den > 0 and num > 0 else 1.0


def refine_object(amplitudes: Any, positions: Any, probe: Any, initial: Any,
                  options: RefineOptions = RefineOptions(), *,
                  on_pass_end: Callable[[int, float, np.ndarray], None] | None = None) -> RefineResult:
    """Refine ``initial`` ``(H, W)`` complex to fit ``amplitudes`` ``(n, N, N)`` measured at
    ``positions`` ``(n, 2)`` ``[x, y]`` with ``probe`` ``(N, N)`` (see the module docstring).

    Each pass visits every position once in a seeded random order, in minibatches of
    ``options.batch_size`` (a last partial batch is dropped from that pass's order and the
    positions are reshuffled next pass, so every update has one shape: one compilation).
    ``on_pass_end(pass, mean_loss, obj)`` is called after each pass (e.g. for metrics).
    Returns :class:`RefineResult`. Bad shapes, non-finite values and patches off the grid
    raise ``ValueError`` before any work.
    """
    amp, pos, pr, obj0 = _check_inputs(amplitudes, positions, probe, initial)
    n = len(pos)
    B = min(int(options.batch_size), n)
    gain = _photon_gain(obj0, pr, pos, amp)
    obj0 = obj0 * np.complex64(gain)
    scale = float(np.mean(np.abs(obj0))) or 1.0
    optimizer = optax.adam(options.learning_rate * scale)
    step = make_refine_step(optimizer, options.noise)
    x = jnp.stack([jnp.asarray(obj0.real), jnp.asarray(obj0.imag)]).astype(jnp.float32)
    opt_state = optimizer.init(x)
    probe_j = jnp.asarray(pr)
    full_loss = jax.jit(lambda x, p, m: _loss(x, probe_j, p, m, options.noise))

    def mean_loss(x) -> float:
        total = 0.0
        for s in range(0, n, 256):
            total += float(full_loss(x, pos[s:s + 256], amp[s:s + 256])) * len(pos[s:s + 256])
        return total / n

    history = [mean_loss(x)]
    rng = np.random.default_rng(options.seed)
    for it in range(int(options.iterations)):
        order = rng.permutation(n)
        losses = []
        for s in range(0, n - B + 1, B):
            idx = order[s:s + B]
            x, opt_state, loss = step(x, opt_state, probe_j, pos[idx], amp[idx])
            losses.append(loss)
        history.append(mean_loss(x))
        if on_pass_end is not None:
            on_pass_end(it, history[-1], np.asarray(_as_complex(x)))
    return RefineResult(np.asarray(_as_complex(x), np.complex64), history, float(gain))
