"""PtychoPINN in Flax NNX: generator + intensity scaler + in-group merge + physics.

Forward pass (reference brief ``model_physics.md`` §0; ``s = exp(log_s)``)::

    xn     = x_scaled / s                          # the caller passes X * intensity_scale
    a, phi = generator(xn)                         # (B, N, N, Cout), Cout = C if object_big else 1
    O      = a cos(phi) + i a sin(phi)             # complex64 object patches
    canvas = merge_group(O, offsets, P)            # per sample; object_big=False: pad O to P
    obj    = center_crop(canvas, N)                # output 0, (B, N, N, 1) complex64
    p_c    = extract_group(canvas, offsets, N)     # C patches at the group offsets
    psi_c  = illuminate(probe, p_c, smoothing_sigma, mask)
    amp    = s * diffraction_amplitude(psi_c)      # output 1, (B, N, N, C) float32
    inten  = amp ** 2                              # output 2, (B, N, N, C) float32

Every batch element is processed independently (the merge is vmapped per sample), unlike the
reference, which sums all groups of a batch onto one canvas when ``B * C >= 64``.

State: the generator's weights are ``nnx.Param``; the probe (stored as float32 ``(N, N, 2)``
real/imaginary pair so that optimisers see real numbers) and ``log_s`` (float32 scalar) are
:class:`PhysicsParam` (a ``nnx.Param`` subclass) when trainable and :class:`PhysicsConst` (a
plain ``nnx.Variable``) when frozen. ``nnx.split(model, TRAINABLE, ...)`` therefore
puts exactly the trainable arrays in the first state. :class:`PtychoPINN` and :func:`build_model`
freeze both unless told otherwise, which is what the reference does in practice under Keras 3
(its ``trainable`` flags are inert there). Training goes through ``TrainingConfig``, whose
defaults are ``probe_trainable=False`` and ``intensity_scale_trainable=True``: so
``pinn_jax.train`` *trains* ``log_s`` by default (set ``intensity_scale_trainable=False`` for the
reference's frozen scale).

The probe is used exactly as given: normalisation (``probe.normalize_probe``) is the caller's job,
as in the reference where ``probe.set_probe_guess`` normalises before the model is built.

Pure functional use (for ``jax.jit`` with donated buffers)::

    graphdef, params, rest = nnx.split(model, TRAINABLE, ...)   # or split_model(model)
    obj, amp, inten = autoencoder_apply(graphdef, (params, rest), x_scaled, offsets)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pinn_jax import geometry
from pinn_jax.models.cnn import AMP_ACTIVATIONS, SUPPORTED_N, CNNGenerator

__all__ = [
    "ModelSpec",
    "PhysicsParam",
    "PhysicsConst",
    "PtychoPINN",
    "build_model",
    "TRAINABLE",
    "trainable_filter",
    "split_model",
    "autoencoder_apply",
    "diffraction_to_obj_apply",
    "model_config_dict",
]

# The ModelConfig fields the JAX cnn model uses; a plain dict of these (plus the two canvas
# keys below) rebuilds the model (checkpoints store it).
MODEL_CONFIG_FIELDS = (
    "N",
    "gridsize",
    "n_filters_scale",
    "amp_activation",
    "object_big",
    "probe_big",
    "probe_mask",
    "pad_object",
    "gaussian_smoothing_sigma",
)
# Legacy params.cfg keys (not ModelConfig fields) that set the merge canvas size P.
CANVAS_FIELDS = ("offset", "max_position_jitter")


class PhysicsParam(nnx.Param):
    """A trainable physics quantity of :class:`PtychoPINN` (probe, log intensity scale)."""


class PhysicsConst(nnx.Variable):
    """A frozen physics quantity of :class:`PtychoPINN`; not an ``nnx.Param``, so not trained."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The hashable subset of ``ModelConfig`` the model is built from (plus the canvas keys)."""

    N: int = 64
    gridsize: int = 1
    n_filters_scale: int = 2
    amp_activation: str = "sigmoid"
    object_big: bool = True
    probe_big: bool = True
    probe_mask: bool = False
    pad_object: bool = True
    gaussian_smoothing_sigma: float = 0.0
    offset: int = 4
    max_position_jitter: int = 10

    def __post_init__(self):
        def bad(name, expected):
            return ValueError(f"model config {name}={getattr(self, name)!r}: expected {expected}")

        if self.N not in SUPPORTED_N:
            raise bad("N", f"one of {SUPPORTED_N} for the cnn generator")
        for name in ("gridsize", "n_filters_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise bad(name, "a positive integer")
            object.__setattr__(self, name, int(v))
        for name in ("offset", "max_position_jitter"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 0:
                raise bad(name, "a non-negative integer")
            object.__setattr__(self, name, int(v))
        if self.amp_activation not in AMP_ACTIVATIONS:
            raise bad("amp_activation", f"one of {sorted(AMP_ACTIVATIONS)}")
        for name in ("object_big", "probe_big", "probe_mask", "pad_object"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise bad(name, "a bool")
            object.__setattr__(self, name, bool(v))
        sigma = float(self.gaussian_smoothing_sigma)
        if not math.isfinite(sigma) or sigma < 0:
            raise bad("gaussian_smoothing_sigma", "a finite float >= 0")
        object.__setattr__(self, "gaussian_smoothing_sigma", sigma)
        # padded_size raises a ValueError naming the sizes if P - N is odd or zero.
        geometry.padded_size(self.N, self.gridsize, self.offset, self.max_position_jitter)

    @property
    def C(self) -> int:
        return self.gridsize**2

    @property
    def C_out(self) -> int:
        return self.C if self.object_big else 1

    @property
    def P(self) -> int:
        return geometry.padded_size(self.N, self.gridsize, self.offset, self.max_position_jitter)

    @classmethod
    def from_config(cls, config: Any) -> "ModelSpec":
        """From a ``ModelConfig``, a ``ModelSpec``, or a mapping of :data:`MODEL_CONFIG_FIELDS`.

        Unknown mapping keys raise ``ValueError``; missing ones take the ModelConfig defaults.
        Objects (dataclasses) contribute only the known fields, so a full ModelConfig with its
        torch-only fields is accepted. ``architecture`` other than 'cnn' is refused.
        """
        if isinstance(config, cls):
            return config
        known = MODEL_CONFIG_FIELDS + CANVAS_FIELDS
        if isinstance(config, Mapping):
            extra = sorted(set(config) - set(known) - {"architecture"})
            if extra:
                raise ValueError(
                    f"model config: unknown key(s) {extra}; expected a subset of {list(known)}"
                )
            values = {k: config[k] for k in known if k in config}
            arch = config.get("architecture", "cnn")
        else:
            values = {k: getattr(config, k) for k in known if hasattr(config, k)}
            arch = getattr(config, "architecture", "cnn")
        if arch != "cnn":
            raise ValueError(f"model config architecture={arch!r}: the JAX backend implements only 'cnn'")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_config_dict(model_or_config: Any) -> dict:
    """Plain, JSON-safe dict that rebuilds the model: ``build_model(model_config_dict(m), ...)``."""
    if isinstance(model_or_config, PtychoPINN):
        return model_or_config.spec.to_dict()
    return ModelSpec.from_config(model_or_config).to_dict()


def _physics():
    # Imported lazily so that the CNN and the weight table stay usable on their own.
    from pinn_jax import physics, probe

    return physics, probe


class PtychoPINN(nnx.Module):
    """Generator + physics (see the module docstring for the forward pass).

    Args:
      model_config: ``ModelConfig``, :class:`ModelSpec` or a plain dict of its fields.
      probe: ``(N, N)`` (or ``(N, N, 1)`` / ``(1, N, N, 1)``) complex probe, used as given (the
        caller normalises it, e.g. ``probe.normalize_probe(probeGuess, probe_scale)``).
      intensity_scale: ``s > 0``; ``log_s`` is initialised to ``float32(log(s))`` as in the
        reference (so ``intensity_scale`` reads back ``exp`` of that float32).
      probe_trainable, intensity_scale_trainable: make the probe / ``log_s`` an ``nnx.Param``.
        Default False = the reference's observed (Keras 3) behaviour.
      rngs: ``nnx.Rngs`` for the generator's initialisation.
    """

    def __init__(
        self,
        model_config: Any,
        probe: Any,
        intensity_scale: float,
        *,
        probe_trainable: bool = False,
        intensity_scale_trainable: bool = False,
        rngs: nnx.Rngs,
    ):
        spec = ModelSpec.from_config(model_config)
        # validate the cheap arguments before the (slow) weight initialisation
        probe_ri = _probe_to_ri(probe, spec.N)
        log_s = _log_scale(intensity_scale)
        self.spec = spec
        self.generator = CNNGenerator(
            spec.N,
            spec.C,
            spec.C_out,
            spec.n_filters_scale,
            spec.amp_activation,
            spec.pad_object,
            spec.probe_big,
            rngs=rngs,
        )
        self.probe_ri = PhysicsConst(probe_ri)
        self.log_s = PhysicsConst(jnp.asarray(log_s))
        self.set_trainable(probe=probe_trainable, intensity_scale=intensity_scale_trainable)

    # -- state --------------------------------------------------------------------------------
    def set_trainable(self, *, probe: bool | None = None, intensity_scale: bool | None = None) -> None:
        """Switch the probe / ``log_s`` between trainable (``PhysicsParam``) and frozen.

        Changes the graph definition: re-``split`` the model afterwards.
        """
        if probe is not None:
            self.probe_ri = _retype(self.probe_ri, bool(probe))
        if intensity_scale is not None:
            self.log_s = _retype(self.log_s, bool(intensity_scale))

    @property
    def probe_trainable(self) -> bool:
        return isinstance(self.probe_ri, nnx.Param)

    @property
    def intensity_scale_trainable(self) -> bool:
        return isinstance(self.log_s, nnx.Param)

    @property
    def probe(self) -> jax.Array:
        """The in-model probe, ``(N, N)`` complex64."""
        ri = self.probe_ri[...]
        return jax.lax.complex(ri[..., 0], ri[..., 1])

    def set_probe(self, probe: Any) -> None:
        """Replace the probe values (shape ``(N, N)`` complex), keeping its trainable status."""
        self.probe_ri.set_value(_probe_to_ri(probe, self.spec.N))

    @property
    def intensity_scale(self) -> jax.Array:
        """``exp(log_s)``, float32 scalar (what the reference saves as the model's scale)."""
        return jnp.exp(self.log_s[...])

    def set_intensity_scale(self, intensity_scale: float) -> None:
        self.log_s.set_value(jnp.asarray(_log_scale(intensity_scale)))

    # -- forward ------------------------------------------------------------------------------
    def _check_inputs(self, x, offsets):
        N, C = self.spec.N, self.spec.C
        if x.ndim != 4 or tuple(x.shape[1:]) != (N, N, C):
            raise ValueError(
                f"x_scaled: got shape {tuple(x.shape)}, expected (B, {N}, {N}, {C}) "
                f"(diffraction amplitude * intensity_scale, C = gridsize**2)"
            )
        if offsets.ndim != 4 or tuple(offsets.shape[1:]) != (1, 2, C) or offsets.shape[0] != x.shape[0]:
            raise ValueError(
                f"offsets: got shape {tuple(offsets.shape)}, expected ({x.shape[0]}, 1, 2, {C}) "
                f"(coords_relative [x, y])"
            )

    def object_canvas(self, x_scaled: jax.Array, offsets: jax.Array) -> jax.Array:
        """Merged object canvas ``(B, P, P)`` complex64 (before trimming)."""
        x = jnp.asarray(x_scaled, jnp.float32)
        offsets = jnp.asarray(offsets, jnp.float32)
        self._check_inputs(x, offsets)
        spec = self.spec
        xn = x / jnp.exp(self.log_s[...])
        amp, phi = self.generator(xn)
        obj = jax.lax.complex(amp * jnp.cos(phi), amp * jnp.sin(phi))       # (B, N, N, Cout)
        if spec.object_big:
            merge = lambda o, off: geometry.merge_group(o, off, spec.P)
            return jax.vmap(merge)(obj, offsets[:, 0])
        return jax.vmap(lambda o: geometry.pad_to(o, spec.P))(obj[..., 0])

    def _trim(self, canvas: jax.Array) -> jax.Array:
        N = self.spec.N
        return jax.vmap(lambda c: geometry.center_crop(c, N))(canvas)[..., None]

    def diffraction_to_obj(self, x_scaled: jax.Array, offsets: jax.Array) -> jax.Array:
        """Inference model: ``(B, N, N, C)`` float32 ``X * s`` + ``(B, 1, 2, C)`` offsets ->
        ``(B, N, N, 1)`` complex64 object, centred on the group centroid."""
        return self._trim(self.object_canvas(x_scaled, offsets))

    def autoencoder(
        self, x_scaled: jax.Array, offsets: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Training model: ``(obj (B,N,N,1) c64, amp_scaled (B,N,N,C) f32, intensity (B,N,N,C) f32)``.

        ``amp_scaled`` compares with ``s * X`` (MAE) and ``intensity`` with ``(s * X)**2``
        (Poisson NLL).
        """
        physics, probe_mod = _physics()
        spec = self.spec
        canvas = self.object_canvas(x_scaled, offsets)
        obj = self._trim(canvas)
        offs = jnp.asarray(offsets, jnp.float32)[:, 0]                       # (B, 2, C)
        patches = jax.vmap(lambda c, o: geometry.extract_group(c, o, spec.N))(canvas, offs)
        probe = self.probe
        mask = probe_mod.probe_mask(spec.N) if spec.probe_mask else None

        def one_patch(p):
            field = physics.illuminate(
                probe, p, smoothing_sigma=spec.gaussian_smoothing_sigma, mask=mask
            )
            return physics.diffraction_amplitude(field)

        # (B, N, N, C): vmap over channels (axis 2 of each group), then over the batch.
        per_group = jax.vmap(one_patch, in_axes=2, out_axes=2)
        amp = jax.vmap(per_group)(patches)
        amp_scaled = jnp.exp(self.log_s[...]) * amp
        return obj, amp_scaled, jnp.square(amp_scaled)

    def __call__(self, x_scaled, offsets):
        return self.autoencoder(x_scaled, offsets)


def _retype(var: nnx.Variable, trainable: bool) -> nnx.Variable:
    cls = PhysicsParam if trainable else PhysicsConst
    if type(var) is cls:
        return var
    return cls(var.get_value())


def _probe_to_ri(probe: Any, N: int) -> jax.Array:
    p = probe if isinstance(probe, jax.Array) else np.asarray(probe)
    shape = tuple(p.shape)
    if len(shape) == 4 and shape[0] == 1 and shape[-1] == 1:
        p = p[0, ..., 0]
    elif len(shape) == 3 and shape[-1] == 1:
        p = p[..., 0]
    if tuple(p.shape) != (N, N):
        raise ValueError(f"probe: got shape {shape}, expected ({N}, {N}) complex (N = {N})")
    if not isinstance(p, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(p))):
        raise ValueError("probe: contains non-finite values")
    p = jnp.asarray(p, jnp.complex64)
    return jnp.stack([p.real, p.imag], axis=-1).astype(jnp.float32)


def _log_scale(intensity_scale: Any) -> np.ndarray:
    s = np.asarray(intensity_scale, np.float64)
    if s.shape != () or not np.isfinite(s) or s <= 0:
        raise ValueError(f"intensity_scale: got {intensity_scale!r}, expected a finite scalar > 0")
    # The reference initialises a float32 variable with float(np.log(s)).
    return np.asarray(np.log(s), np.float32)


# -------------------------------------------------------------------------------------------
# functional API
# -------------------------------------------------------------------------------------------
#: The nnx filter selecting trainable state: network weights plus the probe / ``log_s`` when
#: their trainable switch is on (those are then ``PhysicsParam``, a ``nnx.Param`` subclass). The
#: switches live in the variable types, so one filter serves every model.
TRAINABLE = nnx.Param


def trainable_filter(model: PtychoPINN | None = None):
    """:data:`TRAINABLE` (``nnx.Param``). ``model`` is accepted for callers that pass one and is
    not consulted: a model's trainable switches are already encoded in its variable types."""
    del model
    return TRAINABLE


def split_model(model: PtychoPINN):
    """``(graphdef, trainable_state, rest_state)`` = ``nnx.split(model, TRAINABLE, ...)``."""
    return nnx.split(model, TRAINABLE, ...)


def _merge(graphdef, state) -> PtychoPINN:
    if isinstance(state, (tuple, list)):
        return nnx.merge(graphdef, *state)
    return nnx.merge(graphdef, state)


def autoencoder_apply(graphdef, state, x_scaled, offsets):
    """Pure :meth:`PtychoPINN.autoencoder`: ``state`` is one ``nnx.State`` or a tuple of the
    states ``nnx.split`` returned (e.g. ``(params, rest)``). jit/grad-safe."""
    return _merge(graphdef, state).autoencoder(x_scaled, offsets)


def diffraction_to_obj_apply(graphdef, state, x_scaled, offsets):
    """Pure :meth:`PtychoPINN.diffraction_to_obj` (same ``state`` convention)."""
    return _merge(graphdef, state).diffraction_to_obj(x_scaled, offsets)


def build_model(
    model_config: Any,
    probe: Any = None,
    intensity_scale: float = 1.0,
    *,
    probe_trainable: bool = False,
    intensity_scale_trainable: bool = False,
    seed: int = 0,
) -> PtychoPINN:
    """Build a :class:`PtychoPINN` with generator weights drawn from ``nnx.Rngs(seed)``.

    ``probe=None`` uses the un-normalised ``probe.default_probe(N)``, which is what the reference
    model falls back to when no probe of the right size was set.
    """
    spec = ModelSpec.from_config(model_config)
    if probe is None:
        _, probe_mod = _physics()
        probe = probe_mod.default_probe(spec.N)
    return PtychoPINN(
        spec,
        probe,
        intensity_scale,
        probe_trainable=probe_trainable,
        intensity_scale_trainable=intensity_scale_trainable,
        rngs=nnx.Rngs(int(seed)),
    )
