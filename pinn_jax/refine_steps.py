"""The jitted pieces of a physics refinement (:mod:`pinn_jax.refine` runs the loop).

The forward model of one scan position — bilinear sub-pixel patch extraction from the object
(:mod:`pinn_jax.simulate`'s), probe illumination, far-field amplitude ``|F(P * O_i)| / N`` —
vmapped over positions; the data misfits; a total-variation prior; the PIE preconditioner; and
the update steps built from them:

* :func:`make_refine_step` / :func:`make_object_probe_step`: one minibatch update;
* :func:`make_gradient_accumulator` + :func:`make_full_batch_update`: one update along the
  gradient over every position, accumulated a chunk of positions at a time.

The object is a real ``(2, H, W)`` float32 stack (real and imaginary parts), the probe a
complex ``(N, N)`` array or, when it is refined, a ``(2, N, N)`` stack. Every numeric knob that
changes from run to run (step sizes, the PIE mixing ``alpha``, the TV weight, the number of
positions) is a *traced* argument, the ``hyper`` dict of :func:`hyper`; only structure is
static (noise model, optimizer kind, whether a prior or the preconditioner is on, the mesh).
:func:`cached_builder` keeps one compiled step per structure, so a second refinement in a
process (another scan, another GUI run, a benchmark row) does not compile again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pinn_jax.geometry import extract_patch
from pinn_jax.physics import diffraction_intensity, illuminate

__all__ = ["model_amplitudes", "data_misfit", "total_variation", "illumination", "precondition",
           "precondition_with", "hyper", "object_transform", "make_refine_step", "make_object_probe_step",
           "make_gradient_accumulator", "zero_sums", "make_full_batch_update", "position_corrections",
           "chunk_statistics", "padded_chunks", "photon_gain", "cached_builder", "host_real"]

NOISE_MODELS = ("gaussian", "poisson")
_POISSON_EPS = 1e-6
_AMPLITUDE_EPS = 1e-10


# --------------------------------------------------------------------------------------------
# the forward model, for one position, vmapped


def _extract(obj: jax.Array, position: jax.Array, N: int) -> jax.Array:
    return extract_patch(jnp.pad(obj, ((0, 1), (0, 1))), position, N)


def _amplitude(obj: jax.Array, probe: jax.Array, position: jax.Array) -> jax.Array:
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


def _pixel_misfit(model_amp: jax.Array, measured_amp: jax.Array, noise: str) -> jax.Array:
    """The misfit of every pixel (shape of the inputs): see :func:`data_misfit`."""
    if noise == "gaussian":
        return jnp.square(model_amp - measured_amp)
    lam = jnp.square(model_amp)
    k = jnp.square(measured_amp)
    return lam - k - k * jnp.log((lam + _POISSON_EPS) / (k + _POISSON_EPS))


def data_misfit(model_amp: jax.Array, measured_amp: jax.Array, noise: str) -> jax.Array:
    """Mean misfit over the batch and pixels: amplitude least squares (``"gaussian"``) or the
    Poisson NLL of the counts ``k = measured_amp**2`` less its value at a perfect fit
    (``"poisson"``: ``lam - k - k log((lam + eps) / (k + eps))``, half the Poisson deviance: 0
    when ``lam = k``, so values compare across subsets of positions; same gradient as the NLL)."""
    return jnp.mean(_pixel_misfit(model_amp, measured_amp, noise))


def as_complex(x: jax.Array) -> jax.Array:
    """``(2, ...)`` real/imaginary stack -> complex ``(...)``."""
    return jax.lax.complex(x[0], x[1])


def as_real(z: Any) -> jax.Array:
    """complex ``(...)`` -> ``(2, ...)`` float32 real/imaginary stack."""
    z = jnp.asarray(z, jnp.complex64)
    return jnp.stack([z.real, z.imag]).astype(jnp.float32)


def _loss(x: jax.Array, probe, positions, measured, noise: str) -> jax.Array:
    return data_misfit(model_amplitudes(as_complex(x), probe, positions), measured, noise)


@functools.partial(jax.jit, static_argnames=("noise",))
def chunk_statistics(x: jax.Array, probe: jax.Array, positions: jax.Array, measured: jax.Array, weights: jax.Array,
                     noise: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For one chunk of positions, with the model amplitudes ``A_i`` of the object stack ``x``
    ``(2, H, W)`` and the data ``M_i``, each position weighted by ``weights`` ``(b,)`` (0 for
    padding): ``(sum_i w_i <A_i, M_i>, sum_i w_i <A_i, A_i>, sum_i w_i misfit_i)`` with
    ``misfit_i`` the pixel mean of :func:`data_misfit`'s terms. The first two give the
    least-squares photon gain, the last the exact misfit; one compiled program serves both."""
    A = model_amplitudes(as_complex(x), probe, positions)
    w = weights[:, None, None]
    per_position = jnp.mean(_pixel_misfit(A, measured, noise), axis=(1, 2))
    return jnp.sum(w * A * measured), jnp.sum(w * A * A), jnp.sum(weights * per_position)


def padded_chunks(n: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(rows, weights)`` covering ``range(n)`` in chunks of ``size`` rows, the last padded with
    weight-0 copies of the first rows, so every chunk has one shape (one compilation)."""
    n_pad = -(-n // size) * size
    rows = np.concatenate([np.arange(n), np.arange(n_pad - n) % n])
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(n_pad - n, np.float32)])
    return [(rows[s:s + size], weights[s:s + size]) for s in range(0, n_pad, size)]


def total_variation(x: jax.Array, eps: Any) -> jax.Array:
    """Mean isotropic total variation ``mean sqrt(|dO/dx|**2 + |dO/dy|**2 + eps**2)`` of the
    complex object given as its ``(2, H, W)`` real/imaginary stack (forward differences)."""
    dx = x[:, :, 1:] - x[:, :, :-1]
    dy = x[:, 1:, :] - x[:, :-1, :]
    g2 = jnp.sum(jnp.square(dx[:, :-1, :]), axis=0) + jnp.sum(jnp.square(dy[:, :, :-1]), axis=0)
    return jnp.mean(jnp.sqrt(g2 + eps * eps))


def illumination(probe: jax.Array, positions: jax.Array, shape: tuple[int, int],
                 weights: jax.Array | None = None) -> jax.Array:
    """``sum_i c_i |P(r - x_i)|**2`` ``(H, W)`` float32 on the object grid: the adjoint of the
    bilinear patch extraction applied to the probe intensity, for patch centres ``positions``
    ``(n, 2)``, each weighted by ``weights`` ``(n,)`` (default 1)."""
    N = probe.shape[0]
    intensity = jnp.square(jnp.abs(probe)).astype(jnp.float32)

    def extract_all(o):
        o_pad = jnp.pad(o, ((0, 1), (0, 1)))
        return jax.vmap(lambda p: extract_patch(o_pad, p, N))(positions)

    cot = jnp.broadcast_to(intensity, (positions.shape[0], N, N))
    if weights is not None:
        cot = cot * weights[:, None, None]
    _, adjoint = jax.vjp(extract_all, jnp.zeros(shape, jnp.float32))
    (w,) = adjoint(cot)
    return w


def precondition(g: jax.Array, probe: jax.Array, positions: jax.Array, noise: str, alpha: Any) -> jax.Array:
    """The gradient ``g`` ``(2, H, W)`` of the mean misfit turned into a PIE-like projection
    step: times ``B N**2 / 2`` (``/ 4`` for the Poisson NLL, whose gradient is twice the
    amplitude misfit's near the data), divided by ``(1 - alpha) w + alpha max(w)`` with
    ``w`` the batch's :func:`illumination`. For one position and ``alpha = 0`` a unit step
    puts the exit wave on its Fourier-magnitude projection (ePIE: ``alpha = 1``; rPIE mixes)."""
    B, N = positions.shape[0], probe.shape[0]
    return precondition_with(g * (B * N * N), illumination(probe, positions, g.shape[1:]), noise, alpha)


def precondition_with(g_sum: jax.Array, w: jax.Array, noise: str, alpha: Any) -> jax.Array:
    """:func:`precondition` from ``g_sum`` ``(2, H, W)``, the gradient of the misfit summed
    over the positions' pixels (the mean's gradient times ``B N**2``), and those positions'
    :func:`illumination` ``w`` ``(H, W)``: ``g_sum / 2`` (``/ 4`` for Poisson) over
    ``(1 - alpha) w + alpha max(w)``."""
    denom = (1.0 - alpha) * w + alpha * jnp.max(w) + 1e-12 * jnp.max(w)
    return g_sum * ((0.25 if noise == "poisson" else 0.5) / denom)


# --------------------------------------------------------------------------------------------
# steps


def hyper(step: float = 1.0, *, alpha: float = 0.1, tv_weight: float = 0.0, tv_eps: float = 0.0,
          probe_step: float = 0.0, n: int = 1) -> dict[str, np.float32]:
    """The traced numbers of a step: ``step`` (the object's step size: the PIE relaxation, or
    Adam's step in object units), ``alpha`` (PIE mixing), ``tv_weight``/``tv_eps`` (the prior,
    absolute units), ``probe_step`` (Adam's step on the probe), ``n`` (positions of a
    full-batch update)."""
    return {"step": np.float32(step), "alpha": np.float32(alpha), "tv_weight": np.float32(tv_weight),
            "tv_eps": np.float32(tv_eps), "probe_step": np.float32(probe_step), "n": np.float32(n)}


def object_transform(kind: str, momentum: float = 0.0) -> optax.GradientTransformation:
    """The update direction without its step size (the step is ``hyper["step"]``, traced):
    ``"sgd"`` the (preconditioned) gradient itself, ``"adam"`` Adam's scaled gradient,
    ``"nesterov"`` the gradient with Nesterov momentum ``momentum``."""
    if kind == "sgd":
        return optax.identity()
    if kind == "adam":
        return optax.scale_by_adam()
    if kind == "nesterov":
        return optax.trace(decay=momentum, nesterov=True)
    raise ValueError(f"object_transform: unknown kind {kind!r}")


def _jit_update(step: Callable, donate: tuple[int, ...], mesh: Any) -> Callable:
    """``step`` jitted with its state donated; over a ``mesh`` its outputs stay replicated
    (the batch is split over the devices, the gradient summed by the compiler)."""
    if mesh is None:
        return jax.jit(step, donate_argnums=donate)
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.jit(step, donate_argnums=donate, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _prior(x: jax.Array, hp: dict, with_tv: bool) -> jax.Array:
    return hp["tv_weight"] * total_variation(x, hp["tv_eps"]) if with_tv else jnp.zeros((), jnp.float32)


def _apply(transform: optax.GradientTransformation, g, state, x, step):
    u, state = transform.update(g, state, x)
    return x - step * u, state


def make_refine_step(transform: optax.GradientTransformation, noise: str, *, with_tv: bool = False,
                     preconditioned: bool = False, mesh: Any = None) -> Callable:
    """One jitted minibatch update of the object ``(x, state, probe, positions_b, measured_b,
    hp) -> (x, state, misfit)`` (``x`` and ``state`` donated; ``misfit``: the batch's data
    misfit before the update): ``x - hp["step"] * transform(g)`` with ``g`` the gradient of the
    mean misfit plus, ``with_tv``, the TV prior, :func:`precondition`-ed (``hp["alpha"]``) when
    ``preconditioned``. ``x`` ``(2, H, W)``; ``probe`` ``(N, N)`` complex; ``hp``:
    :func:`hyper`; ``state``: ``transform.init(x)``. ``mesh``: a 1-D device mesh the minibatch
    is split over (outputs replicated)."""

    def objective(x, probe, positions, measured, hp):
        misfit = _loss(x, probe, positions, measured, noise)
        return misfit + _prior(x, hp, with_tv), misfit

    def step(x, state, probe, positions, measured, hp):
        (_, misfit), g = jax.value_and_grad(objective, has_aux=True)(x, probe, positions, measured, hp)
        if preconditioned:
            g = precondition(g, probe, positions, noise, hp["alpha"])
        x, state = _apply(transform, g, state, x, hp["step"])
        return x, state, misfit

    return _jit_update(step, (0, 1), mesh)


def make_object_probe_step(transform: optax.GradientTransformation, probe_transform: optax.GradientTransformation,
                           noise: str, *, with_tv: bool = False, preconditioned: bool = False,
                           mesh: Any = None) -> Callable:
    """One jitted minibatch update of object and probe together ``(x, x_state, p, p_state,
    positions_b, measured_b, hp) -> (x, x_state, p, p_state, misfit)`` (state donated); ``p``
    ``(2, N, N)`` steps by ``hp["probe_step"] * probe_transform(gradient)``."""

    def objective(params, positions, measured, hp):
        x, p = params
        misfit = _loss(x, as_complex(p), positions, measured, noise)
        return misfit + _prior(x, hp, with_tv), misfit

    def step(x, x_state, p, p_state, positions, measured, hp):
        (_, misfit), (gx, gp) = jax.value_and_grad(objective, has_aux=True)((x, p), positions, measured, hp)
        if preconditioned:
            gx = precondition(gx, as_complex(p), positions, noise, hp["alpha"])
        x, x_state = _apply(transform, gx, x_state, x, hp["step"])
        p, p_state = _apply(probe_transform, gp, p_state, p, hp["probe_step"])
        return x, x_state, p, p_state, misfit

    return _jit_update(step, (0, 1, 2, 3), mesh)


def _misfit_sum(x: jax.Array, probe: jax.Array, positions: jax.Array, measured: jax.Array, weights: jax.Array,
                noise: str) -> jax.Array:
    """``sum_i weights_i * mean_pixels misfit_i``: the chunk's share of a full-batch misfit."""
    per_position = jnp.mean(_pixel_misfit(model_amplitudes(as_complex(x), probe, positions), measured, noise),
                            axis=(1, 2))
    return jnp.sum(per_position * weights)


def make_gradient_accumulator(noise: str, *, with_probe: bool = False, mesh: Any = None) -> Callable:
    """One jitted chunk of a full-batch gradient ``(sums, x, p, positions_c, measured_c,
    weights_c) -> sums`` (``sums`` donated): adds the chunk's summed misfit (``"misfit"``), its
    gradient with respect to ``x`` (``"gx"``, ``(2, H, W)``), its :func:`illumination` (``"w"``,
    ``(H, W)``) and, ``with_probe``, the gradient with respect to the probe stack ``p``
    (``"gp"``, ``(2, N, N)``; else ``p`` is the complex probe). ``weights_c`` ``(b,)``: 1 for a
    position, 0 for the padding that gives every chunk one shape. Start from :func:`zero_sums`."""

    def accumulate(sums, x, p, positions, measured, weights):
        probe = as_complex(p) if with_probe else p
        if with_probe:
            value, (gx, gp) = jax.value_and_grad(
                lambda x_, p_: _misfit_sum(x_, as_complex(p_), positions, measured, weights, noise),
                argnums=(0, 1))(x, p)
        else:
            value, gx = jax.value_and_grad(_misfit_sum)(x, probe, positions, measured, weights, noise)
        out = {"misfit": sums["misfit"] + value, "gx": sums["gx"] + gx,
               "w": sums["w"] + illumination(probe, positions, x.shape[1:], weights)}
        if with_probe:
            out["gp"] = sums["gp"] + gp
        return out

    return _jit_update(accumulate, (0,), mesh)


def zero_sums(shape: tuple[int, int], N: int, *, with_probe: bool = False) -> dict:
    """Empty accumulators for :func:`make_gradient_accumulator` on an ``(H, W)`` grid."""
    sums = {"misfit": jnp.zeros((), jnp.float32), "gx": jnp.zeros((2,) + tuple(shape), jnp.float32),
            "w": jnp.zeros(tuple(shape), jnp.float32)}
    if with_probe:
        sums["gp"] = jnp.zeros((2, N, N), jnp.float32)
    return sums


def make_full_batch_update(transform: optax.GradientTransformation, noise: str, N: int, *,
                           probe_transform: optax.GradientTransformation | None = None, with_tv: bool = False,
                           preconditioned: bool = False, mesh: Any = None) -> Callable:
    """One jitted full-batch update from ``sums`` accumulated over all ``hp["n"]`` positions
    (:func:`make_gradient_accumulator`) of ``N x N`` patterns: ``(x, x_state, sums, hp) -> (x,
    x_state)`` or, with a ``probe_transform``, ``(x, x_state, p, p_state, sums, hp) -> (x,
    x_state, p, p_state)`` (state donated). The object steps along the gradient of the mean
    misfit (plus the prior) — ``preconditioned`` by the illumination of every position
    (:func:`precondition_with`) — and the probe stack ``p`` along its mean gradient."""

    def object_step(x, x_state, sums, hp):
        n = hp["n"]
        g = sums["gx"] / n
        if with_tv:
            g = g + jax.grad(lambda x_: _prior(x_, hp, True))(x)
        if preconditioned:
            g = precondition_with(g * (n * N * N), sums["w"], noise, hp["alpha"])
        return _apply(transform, g, x_state, x, hp["step"])

    if probe_transform is None:
        return _jit_update(object_step, (0, 1), mesh)

    def update(x, x_state, p, p_state, sums, hp):
        x, x_state = object_step(x, x_state, sums, hp)
        p, p_state = _apply(probe_transform, sums["gp"] / hp["n"], p_state, p, hp["probe_step"])
        return x, x_state, p, p_state

    return _jit_update(update, (0, 1, 2, 3), mesh)


def cached_builder(kind: str, transform_spec: tuple, noise: str, *, probe: bool = False, with_tv: bool = False,
                   preconditioned: bool = False, N: int = 0, mesh: Any = None) -> Callable:
    """One compiled step per structure: ``kind`` ``"minibatch"`` (:func:`make_refine_step`, or
    :func:`make_object_probe_step` with ``probe``), ``"accumulate"``
    (:func:`make_gradient_accumulator`) or ``"full"`` (:func:`make_full_batch_update`);
    ``transform_spec``: :func:`object_transform`'s arguments. The probe, when refined, always
    takes Adam steps. Arguments a kind does not use are not part of its key."""
    if kind == "accumulate":
        transform_spec, with_tv, preconditioned, N = (), False, False, 0
    elif kind == "minibatch":
        N = 0
    return _build(kind, tuple(transform_spec), noise, bool(probe), bool(with_tv), bool(preconditioned), int(N), mesh)


@functools.cache
def _build(kind: str, transform_spec: tuple, noise: str, probe: bool, with_tv: bool, preconditioned: bool, N: int,
           mesh: Any) -> Callable:
    transform = object_transform(*transform_spec) if transform_spec else None
    probe_transform = optax.scale_by_adam() if probe else None
    if kind == "minibatch":
        if probe:
            return make_object_probe_step(transform, probe_transform, noise, with_tv=with_tv,
                                          preconditioned=preconditioned, mesh=mesh)
        return make_refine_step(transform, noise, with_tv=with_tv, preconditioned=preconditioned, mesh=mesh)
    if kind == "accumulate":
        return make_gradient_accumulator(noise, with_probe=probe, mesh=mesh)
    if kind == "full":
        return make_full_batch_update(transform, noise, N, probe_transform=probe_transform, with_tv=with_tv,
                                      preconditioned=preconditioned, mesh=mesh)
    raise ValueError(f"cached_builder: unknown kind {kind!r}")


cached_builder.cache_info = _build.cache_info  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# positions and the photon gain


def position_corrections(obj: Any, probe: Any, positions: Any, measured: Any, *,
                         max_step: float = 0.5, damping: float = 0.1) -> jax.Array:
    """Damped Gauss-Newton position updates ``(n, 2)`` ``[dx, dy]`` pixels for ``positions``
    ``(n, 2)``: for each pattern, the step minimising the amplitude least squares
    ``|A(pos + d) - measured|**2`` linearised in ``d`` (the 2x2 normal equations, damped by
    ``damping`` times their mean diagonal), its length capped at ``max_step``. ``obj`` ``(H, W)``
    and ``probe`` ``(N, N)`` complex, ``measured`` ``(n, N, N)`` amplitudes in the model's units."""
    obj = jnp.asarray(obj, jnp.complex64)
    probe = jnp.asarray(probe, jnp.complex64)

    def one(pos, meas):
        amp = _amplitude(obj, probe, pos)
        jac = jax.jacfwd(lambda q: _amplitude(obj, probe, q))(pos)           # (N, N, 2)
        r = (amp - meas).reshape(-1)
        J = jac.reshape(-1, 2)
        h = J.T @ J
        g = J.T @ r
        h = h + (damping * 0.5 * jnp.trace(h) + 1e-12) * jnp.eye(2, dtype=h.dtype)
        d = -jnp.linalg.solve(h, g)
        norm = jnp.sqrt(jnp.sum(d * d))
        return d * jnp.minimum(1.0, max_step / jnp.maximum(norm, 1e-12))

    return jax.vmap(one)(jnp.asarray(positions, jnp.float32), jnp.asarray(measured, jnp.float32))


position_corrections_jit = jax.jit(position_corrections, static_argnames=("max_step", "damping"))

GAIN_POSITIONS = 256


def host_real(z: Any) -> np.ndarray:
    """complex ``(...)`` -> ``(2, ...)`` float32 real/imaginary stack, on the host (numpy: no
    small device programs to compile at start-up)."""
    z = np.asarray(z)
    return np.stack([z.real, z.imag]).astype(np.float32)


def photon_gain(obj, probe, positions, amp, noise: str = "gaussian") -> float:
    """Least-squares gain g with ``g * A_model(obj) ~ A_measured`` (on the first 256 positions).
    ``noise`` only picks the :func:`chunk_statistics` program (its misfit is not used), so a
    refinement can share the one it compiles for its exact misfits."""
    k = min(len(positions), GAIN_POSITIONS)
    am, aa, _ = chunk_statistics(host_real(obj), jnp.asarray(probe, jnp.complex64),
                                 np.asarray(positions[:k], np.float32), np.asarray(amp[:k], np.float32),
                                 np.ones(k, np.float32), noise=noise)
    num, den = float(am), float(aa)
    return num / den if den > 0 and num > 0 else 1.0
