"""Physics refinement: the training forward model, optimised over the object instead of the network.

Given measured diffraction amplitudes ``sqrt(counts)`` ``(n, N, N)``, scan positions ``(n, 2)``
``[x, y]`` (object pixels, patch centre at patch pixel ``N/2``), a probe ``(N, N)`` and an
initial object ``(H, W)`` complex on the object grid, :func:`refine_object` minimises the data
misfit of the model ``|F(P * O_i)| / N`` (the simulator's sub-pixel bilinear patch extraction,
:func:`pinn_jax.geometry.extract_patch`, :func:`pinn_jax.physics.illuminate` and
:func:`pinn_jax.physics.diffraction_amplitude`) over the object on minibatches of positions —
PIE-like gradient steps preconditioned by the batch's probe illumination (default) or optax
Adam — one jitted update per minibatch (state donated), the per-position model vmapped; with
``full_batch_from``, later passes are one update each along the gradient over every position
(converging at low dose, see :class:`RefineOptions`). The jitted pieces are in
:mod:`pinn_jax.refine_steps`.

Noise models (``noise``):

- ``"gaussian"``: the amplitude misfit ``mean (A_model - A_measured)**2``, robust and fast;
- ``"poisson"``: the Poisson negative log-likelihood of the counts less its minimum (half the
  deviance, ``mean (lam - k - k log(lam / k))`` with ``lam = A_model**2``, ``k`` the counts),
  the right model at low dose.

The photon scale of the data is unknown to the model; it is estimated once from the initial
object (the least-squares gain ``g`` between modelled and measured amplitudes) and folded into
the object while it is optimised. The object that comes back is divided by ``g`` again, so it is
in the initial object's units (a network's object stays in the network's units, and a flat start
of ones gives amplitudes relative to one): the data are ``g * |F(P * O_i)| / N``. Metrics compare
up to a global gain and phase (:func:`pinn_jax.metrics.eval_reconstruction`).

The object is optimised as a real ``(2, H, W)`` float32 array (real and imaginary parts), so
optax's Adam sees plain real parameters. Every patch must lie inside the object grid (checked
before any work: the extraction would otherwise clamp at the border).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from pinn_jax.refine_steps import (GAIN_POSITIONS, NOISE_MODELS, as_complex, cached_builder, chunk_statistics,
                                   data_misfit, host_real, hyper, illumination, make_refine_step, model_amplitudes,
                                   object_transform, padded_chunks, photon_gain, position_corrections,
                                   position_corrections_jit, precondition, total_variation, zero_sums)

__all__ = ["RefineOptions", "RefineResult", "refine_object", "model_amplitudes", "data_misfit",
           "position_corrections", "fix_phase_gauge", "illumination_footprint", "inside_grid",
           # the jitted pieces live in pinn_jax.refine_steps; these names stay importable from here
           "illumination", "precondition", "total_variation", "make_refine_step"]


GAUGES = ("none", "offset", "ramp")
# the TV prior's smoothing, relative to the object's mean amplitude: quadratic (a smoothness
# prior) for pixel differences below ~10 % of the mean amplitude, where noise lives, linear (TV,
# edges kept) above. Measured at 1e4 photons per pattern: the same SSIM as 1e-3 (which
# approximates plain TV), but full-batch steps settle instead of oscillating ~1 % per pass
_TV_EPS = 0.1
OPTIMIZERS = ("pie", "adam")
# default steps, measured on the reference test scan (512 positions, 1e9 photons, flat start):
# the preconditioned step at 1.0 reaches amplitude SSIM 0.98 in 2 passes; Adam at 0.01-0.02
# (relative) in 5-7, and at 0.05 it stalls at 0.81 after 15 passes (its sign-like steps of a
# fixed size are too coarse for a low-contrast object)
DEFAULT_STEP = {"pie": 1.0, "adam": 0.02}


def _check_number(name: str, value: Any, *, minimum: float, strict: bool) -> None:
    ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
          and math.isfinite(value) and (value > minimum if strict else value >= minimum))
    if not ok:
        raise ValueError(f"RefineOptions.{name}: expected a number {'>' if strict else '>='} {minimum:g}, "
                         f"got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"RefineOptions.{name}: expected an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RefineOptions:
    """How :func:`refine_object` runs.

    ``iterations``: passes over all positions; ``batch_size``: positions per update;
    ``optimizer``: ``"pie"`` (default) — gradient steps preconditioned by the batch's probe
    illumination, as ePIE/rPIE/LSQML step (:func:`precondition`, ``pie_alpha`` mixing in
    the maximum illumination), ``learning_rate`` the relaxation of that step (default 1) — or
    ``"adam"`` (optax Adam, ``learning_rate`` relative to the object's mean amplitude, so it
    does not depend on the data's photon scale; default 0.02); ``noise``: ``"gaussian"`` or
    ``"poisson"``;
    ``seed``: the minibatch order (deterministic for a seed); ``final_learning_rate``: the
    fraction of the steps reached by the last update through a cosine decay (1 = constant; a
    decay averages out the minibatch noise at low dose); ``tv_weight``: a total-variation prior
    on the object (smoothed: quadratic below pixel differences of ~10 % of the mean amplitude),
    relative to the mean counts per pixel and the object's mean amplitude (0 = none; at ~1e4
    photons per pattern ~0.05 lifts SSIM, at high dose it only blurs). The low-dose recipe:
    ``noise="poisson", full_batch_from=3, tv_weight=0.05``.

    Optional, each off by default:

    - ``refine_probe``: the probe is optimised too (Adam, step ``probe_learning_rate`` relative
      to its mean amplitude) from pass ``probe_start_pass`` (0-based) on;
    - ``refine_positions``: each position gets a damped Gauss-Newton correction from its own
      amplitude residual once per pass from ``position_start_pass`` on, at most
      ``max_position_step`` pixels per update and ``max_position_shift`` pixels from where it
      started; the mean correction is removed (a common shift of all positions only
      translates the object);
    - ``full_batch_from``: from this pass (0-based) on, each pass is one update along the
      gradient over every position (accumulated ``batch_size`` positions at a time, so memory
      stays that of one minibatch; the pie step is preconditioned by the illumination of all
      positions) with Nesterov momentum ``full_batch_momentum``. Minibatch steps hover around
      the solution with a noise that the data's noise sets; full-batch steps converge to it: at
      low dose, the maximum-likelihood (with ``tv_weight``, maximum a posteriori) object. The
      history of those passes is the exact misfit over every position before the update;
    - ``exact_misfit``: the history re-evaluates the misfit over every position after each pass
      (else it is the pass's mean minibatch misfit, each taken before its update);
    - ``gauge``: ``"offset"`` removes the object's mean phase, ``"ramp"`` also its linear phase
      ramp, moving both into the returned probe so the pair explains the data as before (the
      split between object and probe is ambiguous when the probe is refined).
    """

    iterations: int = 20
    batch_size: int = 32
    learning_rate: float | None = None
    noise: str = "gaussian"
    optimizer: str = "pie"
    pie_alpha: float = 0.1
    seed: int = 0
    final_learning_rate: float = 1.0
    tv_weight: float = 0.0
    refine_probe: bool = False
    probe_learning_rate: float = 0.05
    probe_start_pass: int = 1
    refine_positions: bool = False
    position_start_pass: int = 2
    max_position_step: float = 0.5
    max_position_shift: float = 4.0
    gauge: str = "none"
    exact_misfit: bool = False
    full_batch_from: int | None = None
    full_batch_momentum: float = 0.9

    @property
    def step_size(self) -> float:
        """``learning_rate``, or the optimizer's default (:data:`DEFAULT_STEP`)."""
        return float(DEFAULT_STEP[self.optimizer] if self.learning_rate is None else self.learning_rate)

    def __post_init__(self) -> None:
        _check_int("iterations", self.iterations, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("probe_start_pass", self.probe_start_pass, 0)
        _check_int("position_start_pass", self.position_start_pass, 0)
        if self.learning_rate is not None:
            _check_number("learning_rate", self.learning_rate, minimum=0, strict=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"RefineOptions.optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check_number("pie_alpha", self.pie_alpha, minimum=0, strict=False)
        if self.pie_alpha > 1:
            raise ValueError(f"RefineOptions.pie_alpha: expected a number in [0, 1], got {self.pie_alpha!r}")
        _check_number("final_learning_rate", self.final_learning_rate, minimum=0, strict=True)
        _check_number("tv_weight", self.tv_weight, minimum=0, strict=False)
        if self.final_learning_rate > 1:
            raise ValueError(f"RefineOptions.final_learning_rate: expected a fraction in (0, 1], "
                             f"got {self.final_learning_rate!r}")
        _check_number("probe_learning_rate", self.probe_learning_rate, minimum=0, strict=True)
        _check_number("max_position_step", self.max_position_step, minimum=0, strict=True)
        _check_number("max_position_shift", self.max_position_shift, minimum=0, strict=True)
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"RefineOptions.noise: expected one of {NOISE_MODELS}, got {self.noise!r}")
        if self.gauge not in GAUGES:
            raise ValueError(f"RefineOptions.gauge: expected one of {GAUGES}, got {self.gauge!r}")
        if self.full_batch_from is not None:
            _check_int("full_batch_from", self.full_batch_from, 0)
        _check_number("full_batch_momentum", self.full_batch_momentum, minimum=0, strict=False)
        if self.full_batch_momentum >= 1:
            raise ValueError(f"RefineOptions.full_batch_momentum: expected a number in [0, 1), "
                             f"got {self.full_batch_momentum!r}")
        for name in ("refine_probe", "refine_positions", "exact_misfit"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"RefineOptions.{name}: expected True or False, got {getattr(self, name)!r}")


@dataclasses.dataclass
class RefineResult:
    """``obj``: ``(H, W)`` complex64 refined object in the initial object's units; ``history``:
    the data misfit, ``iterations + 1`` values: over every position before any update, then per
    pass the mean minibatch misfit (each before its update) or, with ``exact_misfit``, over
    every position after the pass; ``scale``:
    the photon gain ``g`` (data = ``g * |F(P * O)| / N``); ``probe``: ``(N, N)`` complex64 (the input probe
    unless refined or gauge-fixed); ``positions``: ``(n, 2)`` float64 ``[x, y]`` (the input
    positions unless refined); ``pass_metrics``: quality per pass, filled by callers that have
    a ground truth (:func:`pinn_jax.pipeline.refine`); ``seconds``: wall time since the start
    after each pass (``iterations + 1`` values, compilation included, ``on_pass_end`` excluded)."""

    obj: np.ndarray
    history: list[float]
    scale: float
    probe: np.ndarray
    positions: np.ndarray
    pass_metrics: list[dict] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)


def fix_phase_gauge(obj: Any, probe: Any, mask: Any, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Move the object's mean phase (``mode="offset"``) and linear phase ramp (``"ramp"``)
    into the probe: ``O' = O exp(-i(a x + b y + c))``, ``P' = P exp(+i(a u + b v + c))`` with
    ``(u, v)`` the probe's pixel coordinates, so every modelled pattern changes by a constant
    phase only (exactly for the offset; for the ramp, up to the bilinear extraction's
    interpolation of it). The ramp is estimated from the phase of neighbouring-pixel
    correlations (``a = arg sum O[y, x+1] conj(O[y, x])``, insensitive to phase wrapping) and
    the offset as ``arg sum O exp(-i(a x + b y))``, both over ``mask`` ``(H, W)`` bool weighted
    by amplitude. Returns ``(obj, probe)`` complex64; ``"none"`` returns them unchanged."""
    obj = np.asarray(obj, np.complex64)
    probe = np.asarray(probe, np.complex64)
    if mode == "none":
        return obj, probe
    if mode not in GAUGES:
        raise ValueError(f"gauge: expected one of {GAUGES}, got {mode!r}")
    m = np.asarray(mask, bool)
    o = obj.astype(np.complex128)
    a = b = 0.0
    if mode == "ramp":
        a = float(np.angle(np.sum((o[:, 1:] * np.conj(o[:, :-1]))[m[:, 1:] & m[:, :-1]])))
        b = float(np.angle(np.sum((o[1:, :] * np.conj(o[:-1, :]))[m[1:, :] & m[:-1, :]])))
    H, W = obj.shape
    yy, xx = np.mgrid[0:H, 0:W]
    ramp = np.exp(-1j * (a * xx + b * yy))
    c = float(np.angle(np.sum((o * ramp)[m]))) if m.any() else 0.0
    N = probe.shape[0]
    vv, uu = np.mgrid[0:N, 0:N]
    obj_out = (o * ramp * np.exp(-1j * c)).astype(np.complex64)
    probe_out = (probe * np.exp(1j * (a * uu + b * vv + c))).astype(np.complex64)
    return obj_out, probe_out


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
    bad = ~inside_grid(pos, N, (H, W))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"positions: {int(bad.sum())} of {n} patches do not lie inside the {H} x {W} object grid "
            f"(first: #{i} at x={pos[i, 0]:.6g}, y={pos[i, 1]:.6g}; centres must lie in x "
            f"[{N / 2:g}, {W + 1 - N / 2:g}), y [{N / 2:g}, {H + 1 - N / 2:g}))")
    return amp, pos, pr.astype(np.complex64), obj.astype(np.complex64)


def illumination_footprint(positions: Any, N: int, shape: tuple[int, int]) -> np.ndarray:
    """How many patches cover each pixel: ``(H, W)`` float32 for patch centres ``positions``
    ``(n, 2)`` ``[x, y]`` (the extraction's ``N``-pixel window from ``floor(centre - N/2)``,
    clipped to the grid), by a summed-area table: O(n + H W)."""
    H, W = int(shape[0]), int(shape[1])
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    lo = np.floor(pos - N / 2).astype(np.int64)
    x0, y0 = np.clip(lo[:, 0], 0, W), np.clip(lo[:, 1], 0, H)
    x1, y1 = np.clip(lo[:, 0] + N, 0, W), np.clip(lo[:, 1] + N, 0, H)
    diff = np.zeros((H + 1, W + 1), np.int64)
    np.add.at(diff, (y0, x0), 1)
    np.add.at(diff, (y0, x1), -1)
    np.add.at(diff, (y1, x0), -1)
    np.add.at(diff, (y1, x1), 1)
    return np.cumsum(np.cumsum(diff, axis=0), axis=1)[:H, :W].astype(np.float32)


def inside_grid(positions: Any, N: int, shape: tuple[int, int]) -> np.ndarray:
    """``(n,)`` bool: whether each patch centre's ``N``-pixel window lies inside the grid."""
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    lo = np.floor(pos - N / 2)
    H, W = shape
    return (lo[:, 0] >= 0) & (lo[:, 1] >= 0) & (lo[:, 0] + N <= W) & (lo[:, 1] + N <= H)


def _step_sizes(lr: float, final_fraction: float, steps: int) -> np.ndarray:
    """``steps`` step sizes: constant ``lr``, or a cosine decay to ``lr * final_fraction``
    (``optax.cosine_decay_schedule``'s curve, computed on the host: the step is a traced
    argument of the compiled update, so changing it never recompiles)."""
    if final_fraction >= 1.0:
        return np.full(steps, lr, np.float64)
    t = np.minimum(np.arange(steps), steps) / max(steps, 1)
    return lr * ((1.0 - final_fraction) * 0.5 * (1.0 + np.cos(np.pi * t)) + final_fraction)


def _position_bounds(N: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Patch centres ``[x, y]`` the extraction accepts on an ``(H, W)`` grid: ``[lo, hi]``."""
    H, W = shape
    lo = np.array([N / 2, N / 2], np.float64)
    hi = np.array([W + 1 - N / 2, H + 1 - N / 2], np.float64) - 1e-3
    return lo, hi


def _refine_mesh(devices: Sequence[Any], batch: int):
    from jax.sharding import Mesh

    devs = list(devices)
    if not devs:
        raise ValueError("devices: expected at least one device")
    if batch % len(devs):
        raise ValueError(f"batch_size {batch}: split over {len(devs)} devices it must be a multiple of {len(devs)}")
    return Mesh(np.array(devs), ("data",))


def _placers(mesh: Any):
    """``(put, put_batch)``: ``put(tree)`` replicates host values over ``mesh``;
    ``put_batch(rows)`` / ``put_batch(array, idx)`` splits a minibatch (``array[idx]``) over
    it, each process reading only the rows its devices take. Without a mesh ``put`` puts the
    values on the default device (so a step sees one kind of argument from its first call on)
    and ``put_batch`` hands the rows through."""
    if mesh is None:
        return jax.device_put, (lambda a, idx=None: a if idx is None else a[idx])
    from jax.sharding import NamedSharding, PartitionSpec

    rep, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))

    def put(tree):
        return jax.device_put(jax.device_get(tree), rep)

    def put_batch(a, idx=None):
        rows = np.arange(len(a)) if idx is None else np.asarray(idx)
        shape = (len(rows),) + tuple(np.shape(a)[1:])
        return jax.make_array_from_callback(shape, split, lambda index: np.asarray(a[rows[index[0]]]))

    return put, put_batch


def refine_object(amplitudes: Any, positions: Any, probe: Any, initial: Any,
                  options: RefineOptions = RefineOptions(), *,
                  on_pass_end: Callable[[int, float, np.ndarray], None] | None = None,
                  progress: bool = False, devices: Sequence[Any] | None = None) -> RefineResult:
    """Refine ``initial`` ``(H, W)`` complex to fit ``amplitudes`` ``(n, N, N)`` measured at
    ``positions`` ``(n, 2)`` ``[x, y]`` with ``probe`` ``(N, N)`` (see the module docstring;
    probe and positions too where ``options`` ask).

    Each pass visits every position once in a seeded random order, in minibatches of
    ``options.batch_size`` (a last partial batch is dropped from that pass's order and the
    positions are reshuffled next pass, so every update has one shape: one compilation).
    ``on_pass_end(pass, mean_loss, obj)`` is called after each pass with the (gauge-fixed)
    object, e.g. for metrics; ``progress`` shows a tqdm bar over the passes.
    Returns :class:`RefineResult`. Bad shapes, non-finite values and patches off the grid
    raise ``ValueError`` before any work.

    ``devices``: split every minibatch over these devices (a 1-D mesh; ``batch_size`` must be
    a multiple of their number), the object replicated; default: every device of every process
    in a multi-process run, one device otherwise. Each process then reads only its part of each
    minibatch, and every process returns the same result.
    """
    amp, pos, pr, obj0 = _check_inputs(amplitudes, positions, probe, initial)
    opts = options
    if devices is None and jax.process_count() > 1:
        devices = jax.devices()
    mesh = None if devices is None else _refine_mesh(devices, min(int(opts.batch_size), len(pos)))
    t_start = time.perf_counter()
    in_callbacks = 0.0
    n, N = len(pos), pr.shape[0]
    B = min(int(opts.batch_size), n)
    # the photon gain (on the first 256 positions) and, later, every exact misfit: one compiled
    # chunk program (padded chunks of one shape)
    chunks = padded_chunks(n, min(n, GAIN_POSITIONS))
    gain = photon_gain(obj0, pr, pos, amp, noise=opts.noise)
    obj0 = obj0 * np.complex64(gain)
    scale = float(np.mean(np.abs(obj0))) or 1.0
    iterations = int(opts.iterations)
    full_from = iterations if opts.full_batch_from is None else min(int(opts.full_batch_from), iterations)
    # step sizes, one per minibatch update (the decay spans the minibatch passes; full-batch
    # passes take constant steps): Adam's step is relative to the object's mean amplitude
    pie = opts.optimizer == "pie"
    object_steps = _step_sizes(opts.step_size * (1.0 if pie else scale), opts.final_learning_rate,
                               max(1, full_from * (n // B)))
    probe_scale = float(np.mean(np.abs(pr))) or 1.0
    probe_steps = _step_sizes(opts.probe_learning_rate * probe_scale, opts.final_learning_rate, len(object_steps))
    # the TV weight is relative: misfit per pixel scales with the counts, the object's gradients
    # with its mean amplitude
    with_tv = bool(opts.tv_weight)
    hp = hyper(alpha=float(opts.pie_alpha), tv_weight=float(opts.tv_weight) * float(np.mean(np.square(amp))) / scale,
               tv_eps=_TV_EPS * scale, n=n)
    structure = dict(with_tv=with_tv, preconditioned=pie, mesh=mesh)
    minibatch_spec = ("sgd",) if pie else ("adam",)
    put, put_batch = _placers(mesh)
    x = put(host_real(obj0))
    x_state = put(object_transform(*minibatch_spec).init(x))
    probe_j = put(np.asarray(pr))
    if opts.refine_probe:
        p = put(host_real(pr))
        p_state = put(object_transform("adam").init(p))  # the probe always takes Adam steps
    pos0 = pos.astype(np.float64)
    cur = pos0.copy()
    lo, hi = _position_bounds(N, obj0.shape)
    update_count = 0

    def current_probe():
        return as_complex(p) if opts.refine_probe else probe_j

    def mean_loss() -> float:
        total, probe_now = 0.0, current_probe()
        for rows, weights in chunks:
            _, _, misfit = chunk_statistics(x, probe_now, put(cur[rows].astype(np.float32)), put(amp[rows]),
                                            put(weights), noise=opts.noise)
            total += float(misfit)
        return total / n

    def host_complex(stack) -> np.ndarray:
        a = np.asarray(stack)
        return (a[0] + 1j * a[1]).astype(np.complex64)

    def outputs():
        obj = host_complex(x) / np.complex64(gain)
        probe_out = host_complex(p) if opts.refine_probe else pr
        if opts.gauge != "none":
            from pinn_jax.metrics import scan_region_mask

            obj, probe_out = fix_phase_gauge(obj, probe_out, scan_region_mask(cur, obj.shape, 20), opts.gauge)
        return obj, probe_out

    def correct_positions(idx, pb_host) -> None:
        d = np.asarray(position_corrections_jit(as_complex(x), current_probe(), put(pb_host), put(amp[idx]),
                                                max_step=float(opts.max_position_step)), np.float64)
        cur[idx] = cur[idx] + d

    def minibatch_pass(order, fit_probe: bool, fit_positions: bool) -> float:
        nonlocal x, x_state, p, p_state, update_count
        step = cached_builder("minibatch", minibatch_spec, opts.noise, probe=fit_probe, **structure)
        batch_misfits = []
        for s in range(0, n - B + 1, B):
            idx = order[s:s + B]
            pb_host = cur[idx].astype(np.float32)
            pb = put_batch(pb_host)
            mb = put_batch(amp, idx)
            k = min(update_count, len(object_steps) - 1)
            h = {**hp, "step": np.float32(object_steps[k]), "probe_step": np.float32(probe_steps[k])}
            update_count += 1
            if fit_probe:
                x, x_state, p, p_state, m = step(x, x_state, p, p_state, pb, mb, h)
            else:
                x, x_state, m = step(x, x_state, current_probe(), pb, mb, h)
            batch_misfits.append(m)
            if fit_positions:
                correct_positions(idx, pb_host)
        # the pass's mean minibatch misfit (each before its update, as Keras reports an epoch's loss)
        return float(np.mean(jax.device_get(batch_misfits)))

    if full_from < iterations:
        # every chunk has B rows (one compilation): the last is padded with weight-0 rows
        gradient_chunks = padded_chunks(n, B)
        m = float(opts.full_batch_momentum)
        # the pie step goes on with momentum; Adam with its state and its final step size
        full_spec = (("nesterov", m) if m > 0 else ("sgd",)) if pie else minibatch_spec
        full_hp = {**hp, "step": np.float32(opts.step_size if pie else object_steps[-1]),
                   "probe_step": np.float32(probe_steps[-1])}

    def full_batch_pass(fit_probe: bool, fit_positions: bool) -> float:
        nonlocal x, x_state, p, p_state
        accumulate = cached_builder("accumulate", (), opts.noise, probe=fit_probe, mesh=mesh)
        update = cached_builder("full", full_spec, opts.noise, probe=fit_probe, N=N, **structure)
        sums = put(zero_sums(obj0.shape, N, with_probe=fit_probe))
        p_arg = p if fit_probe else current_probe()
        for idx, weights in gradient_chunks:
            pb_host = cur[idx].astype(np.float32)
            sums = accumulate(sums, x, p_arg, put_batch(pb_host), put_batch(amp, idx), put_batch(weights))
            if fit_positions:
                real = weights > 0
                correct_positions(idx[real], pb_host[real])
        misfit = float(sums["misfit"]) / n
        if fit_probe:
            x, x_state, p, p_state = update(x, x_state, p, p_state, sums, full_hp)
        else:
            x, x_state = update(x, x_state, sums, full_hp)
        return misfit

    history = [mean_loss()]
    seconds = [time.perf_counter() - t_start]
    rng = np.random.default_rng(opts.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, desc="refine", unit="pass", leave=True)
    try:
        for it in range(iterations):
            fit_probe = opts.refine_probe and it >= opts.probe_start_pass
            fit_positions = opts.refine_positions and it >= opts.position_start_pass
            if it < full_from:
                misfit = minibatch_pass(rng.permutation(n), fit_probe, fit_positions)
            else:
                if it == full_from and full_spec != minibatch_spec:
                    x_state = put(object_transform(*full_spec).init(x))
                misfit = full_batch_pass(fit_probe, fit_positions)
            if fit_positions:
                shift = cur - pos0
                shift -= shift.mean(axis=0)
                length = np.linalg.norm(shift, axis=1, keepdims=True)
                shift *= np.minimum(1.0, opts.max_position_shift / np.maximum(length, 1e-12))
                cur = np.clip(pos0 + shift, lo, hi)
            # exact_misfit re-evaluates every position after the pass (+~45 % time on minibatch passes)
            history.append(mean_loss() if opts.exact_misfit else misfit)
            seconds.append(time.perf_counter() - t_start - in_callbacks)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(misfit=f"{history[-1]:.4g}")
            if on_pass_end is not None:
                t_cb = time.perf_counter()
                on_pass_end(it, history[-1], outputs()[0])
                in_callbacks += time.perf_counter() - t_cb
    finally:
        if bar is not None:
            bar.close()
    obj, probe_out = outputs()
    return RefineResult(obj.astype(np.complex64), history, float(gain), probe_out.astype(np.complex64), cur,
                        seconds=seconds)
