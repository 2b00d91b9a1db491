"""Configuration dataclasses and the bridge to the legacy flat parameter dict.

Three dataclasses carry every setting explicitly:

* :class:`ModelConfig` -- network/physics settings (mutable: ptychodus assigns ``model.N``
  after construction, so call :meth:`ModelConfig.validate` after mutating it);
* :class:`TrainingConfig` -- a ``ModelConfig`` plus data, loss and optimiser settings;
* :class:`InferenceConfig` -- a ``ModelConfig`` plus the model archive and test data.

Field names, types and defaults follow the PtychoPINN reference, with two additions:
``backend`` also accepts ``'jax'`` and defaults to it here, and ``TrainingConfig`` /
``InferenceConfig`` have ``diffraction_kind`` (``'auto'``, ``'amplitude'`` or ``'intensity'``).

Unlike the reference (which only validates on an explicit call), every config is checked
in ``__post_init__`` and again by ``validate()``. Bad values raise ``ValueError`` naming the
class, the field, the value seen and what is allowed. ``validate()`` also normalises values:
``str``/``os.PathLike`` paths become :class:`pathlib.Path` and numpy scalars become builtin
``int``/``float``/``bool``, so a config always bridges to a JSON-serialisable dict.

The bridge (:func:`dataclass_to_legacy_dict`, :func:`update_legacy_dict`) reproduces the
reference's flat legacy dict: the ``model`` fields are flattened into the top level, the nine
:data:`KEY_MAPPINGS` rename fields to their legacy (partly dotted) keys and paths become
strings. ``update_legacy_dict`` skips ``None`` values and never deletes keys.

This module imports only the standard library (numpy scalars are handled via ``numbers``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from types import MappingProxyType
from typing import Any, Literal, MutableMapping, Optional, get_args

__all__ = [
    "ModelConfig",
    "TrainingConfig",
    "InferenceConfig",
    "KEY_MAPPINGS",
    "SUPPORTED_N",
    "BACKENDS",
    "ARCHITECTURES",
    "DIFFRACTION_KINDS",
    "DEFAULT_N_GROUPS",
    "TORCH_ONLY_FIELDS",
    "torch_only_overrides",
    "dataclass_to_legacy_dict",
    "update_legacy_dict",
    "validate_model_config",
    "validate_training_config",
    "validate_inference_config",
]

# ---------------------------------------------------------------------------------------------
# Allowed literal values. The Literal aliases are the single source of truth; the tuples are
# derived from them so annotations and runtime checks cannot drift apart.

Backend = Literal["jax", "tensorflow", "pytorch"]
Architecture = Literal["cnn", "ffno", "fno", "fno_vanilla", "neuralop_uno"]
ModelType = Literal["pinn", "supervised"]
AmpActivation = Literal["sigmoid", "swish", "softplus", "relu"]
FnoInputTransform = Literal["none", "sqrt", "log1p", "instancenorm"]
GeneratorOutputMode = Literal["real_imag", "amp_phase_logits", "amp_phase"]
TorchLossMode = Literal["poisson", "mae"]
GradientClipAlgorithm = Literal["norm", "value", "agc"]
Optimizer = Literal["adam", "adamw", "sgd"]
Scheduler = Literal["Default", "Exponential", "WarmupCosine", "ReduceLROnPlateau"]
#: What the data files' diffraction holds (a data property, so it lives on the training and
#: inference configs): see :mod:`backend_api.diffraction` for the ``'auto'`` rule.
DiffractionKind = Literal["auto", "amplitude", "intensity"]

BACKENDS: tuple[str, ...] = get_args(Backend)
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
DIFFRACTION_KINDS: tuple[str, ...] = get_args(DiffractionKind)

#: Patch sizes each architecture supports. The reference CNN's encoder/decoder depth is tied to
#: N, so only these three sizes build. Architectures not listed accept any positive even N.
SUPPORTED_N: MappingProxyType = MappingProxyType({"cnn": (64, 128, 256)})

#: ``TrainingConfig.n_groups`` when neither it nor the deprecated ``n_images`` is given.
DEFAULT_N_GROUPS = 512

#: Dataclass field name -> legacy ``params.cfg`` key. Exactly the reference's nine entries.
KEY_MAPPINGS: MappingProxyType = MappingProxyType(
    {
        "object_big": "object.big",
        "probe_big": "probe.big",
        "probe_mask": "probe.mask",
        "probe_trainable": "probe.trainable",
        "intensity_scale_trainable": "intensity_scale.trainable",
        "positions_provided": "positions.provided",
        "output_dir": "output_prefix",
        "train_data_file": "train_data_file_path",
        "test_data_file": "test_data_file_path",
    }
)


# ---------------------------------------------------------------------------------------------
# Declarative field checks. Each field carries a small spec in its metadata; one generic loop
# checks and normalises all of them, so adding a field means adding one line.


@dataclass(frozen=True)
class _Check:
    kind: str  # 'int' | 'float' | 'bool' | 'choice' | 'path'
    optional: bool = False
    lo: float | None = None
    lo_open: bool = False  # True: value must be > lo, else >= lo
    hi: float | None = None
    hi_open: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "bool":
            text = "a bool"
        elif self.kind == "path":
            text = "a path (str or os.PathLike)"
        else:
            text = "an integer" if self.kind == "int" else "a finite real number"
            bounds = []
            if self.lo is not None:
                bounds.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
            if self.hi is not None:
                bounds.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
            if bounds:
                text += " " + " and ".join(bounds)
        if self.optional:
            text += " (or None)"
        return text


def _meta(kind: str, **kw: Any) -> dict:
    return {"check": _Check(kind, **kw)}


def _int(lo: int | None = None, **kw: Any) -> dict:
    return _meta("int", lo=lo, **kw)


def _float(lo: float | None = None, **kw: Any) -> dict:
    return _meta("float", lo=lo, **kw)


def _bool() -> dict:
    return _meta("bool")


def _choice(alias: Any) -> dict:
    return _meta("choice", choices=get_args(alias))


def _path(optional: bool = False) -> dict:
    return _meta("path", optional=optional)


def _fail(owner: str, name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{owner}.{name}={value!r} is invalid: expected {expected}")


def _normalise(owner: str, name: str, value: Any, chk: _Check) -> Any:
    """Check one value against its spec; return it in canonical builtin form."""
    if value is None:
        if chk.optional:
            return None
        raise _fail(owner, name, value, chk.describe())
    kind = chk.kind
    if kind == "bool":
        # bool subclasses int, so a numeric 0/1 must not slip through; numpy.bool_ is accepted
        # (it is not an int subclass) by its type name.
        if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
            return bool(value)
        raise _fail(owner, name, value, chk.describe())
    if kind == "choice":
        if isinstance(value, str) and value in chk.choices:
            return value
        raise _fail(owner, name, value, chk.describe())
    if kind == "path":
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _fail(owner, name, value, chk.describe())
    # numeric kinds
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        raise _fail(owner, name, value, chk.describe())
    if kind == "int":
        if not isinstance(value, numbers.Integral):
            # Accept integral floats such as 512.0 coming from JSON/YAML, but nothing lossy.
            integral = (
                isinstance(value, numbers.Real)
                and math.isfinite(value)
                and float(value).is_integer()
            )
            if integral:
                value = int(value)
            else:
                raise _fail(owner, name, value, chk.describe())
        out: float = int(value)
    else:
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise _fail(owner, name, value, chk.describe())
        out = float(value)
    if chk.lo is not None and (out <= chk.lo if chk.lo_open else out < chk.lo):
        raise _fail(owner, name, value, chk.describe())
    if chk.hi is not None and (out >= chk.hi if chk.hi_open else out > chk.hi):
        raise _fail(owner, name, value, chk.describe())
    return out


def _check_fields(obj: Any) -> None:
    owner = type(obj).__name__
    for f in dataclasses.fields(obj):
        chk = f.metadata.get("check")
        if chk is None:
            continue
        value = getattr(obj, f.name)
        new = _normalise(owner, f.name, value, chk)
        if new is not value:
            # object.__setattr__ keeps this usable should a subclass ever be frozen.
            object.__setattr__(obj, f.name, new)


def _check_model_field(obj: Any) -> None:
    model = getattr(obj, "model")
    if not isinstance(model, ModelConfig):
        raise ValueError(
            f"{type(obj).__name__}.model={model!r} is invalid: expected a ModelConfig instance"
        )
    model.validate()


def _apply_n_images_alias(obj: Any) -> None:
    """The reference rule: a given ``n_images`` fills an unset ``n_groups``, with a warning.

    When both are given ``n_groups`` wins silently and ``n_images`` keeps its value.
    """
    # Check n_images first so a bad alias is reported under the name the caller used.
    spec = next(f for f in dataclasses.fields(obj) if f.name == "n_images").metadata["check"]
    n_images = _normalise(type(obj).__name__, "n_images", obj.n_images, spec)
    object.__setattr__(obj, "n_images", n_images)
    if obj.n_images is not None and obj.n_groups is None:
        warnings.warn(
            f"{type(obj).__name__}: 'n_images' is deprecated; use 'n_groups' instead "
            f"(n_groups set to n_images={obj.n_images!r})",
            DeprecationWarning,
            stacklevel=4,  # warn -> this helper -> __post_init__ -> __init__ -> caller
        )
        object.__setattr__(obj, "n_groups", obj.n_images)


# ---------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(unsafe_hash=True)
class ModelConfig:
    """Network and physics settings (reference ``ModelConfig``, made mutable).

    Hashable by value like the reference's frozen class (so it can be a ``jax.jit`` static
    argument or a cache key); the hash follows the current field values, so do not mutate an
    instance while it is a key in a dict.

    ``N`` is the patch / diffraction size in pixels; ``gridsize**2`` is the number of
    channels (patterns) per group. Torch-only fields (``fno_*``, ``learned_input_channels``,
    ``max_hidden_channels``, ``resnet_width``, ``generator_output_mode`` ...) are kept so a
    config round-trips through every backend; the JAX backend ignores what it does not use.
    """

    N: int = field(default=64, metadata=_int(lo=1))
    gridsize: int = field(default=1, metadata=_int(lo=1))
    n_filters_scale: int = field(default=2, metadata=_int(lo=1))
    model_type: ModelType = field(default="pinn", metadata=_choice(ModelType))
    architecture: Architecture = field(default="cnn", metadata=_choice(Architecture))
    fno_modes: int = field(default=12, metadata=_int(lo=1))
    fno_width: int = field(default=32, metadata=_int(lo=1))
    fno_blocks: int = field(default=4, metadata=_int(lo=1))
    fno_cnn_blocks: int = field(default=2, metadata=_int(lo=0))
    learned_input_channels: int = field(default=1, metadata=_int(lo=1))
    max_hidden_channels: Optional[int] = field(default=None, metadata=_int(lo=1, optional=True))
    resnet_width: Optional[int] = field(default=None, metadata=_int(lo=1, optional=True))
    fno_input_transform: FnoInputTransform = field(
        default="none", metadata=_choice(FnoInputTransform)
    )
    generator_output_mode: GeneratorOutputMode = field(
        default="real_imag", metadata=_choice(GeneratorOutputMode)
    )
    amp_activation: AmpActivation = field(default="sigmoid", metadata=_choice(AmpActivation))
    object_big: bool = field(default=True, metadata=_bool())
    probe_big: bool = field(default=True, metadata=_bool())
    probe_mask: bool = field(default=False, metadata=_bool())
    probe_mask_sigma: float = field(default=1.0, metadata=_float(lo=0, lo_open=True))
    probe_mask_diameter: Optional[float] = field(
        default=None, metadata=_float(lo=0, lo_open=True, optional=True)
    )
    pad_object: bool = field(default=True, metadata=_bool())
    probe_scale: float = field(default=4.0, metadata=_float(lo=0, lo_open=True))
    gaussian_smoothing_sigma: float = field(default=0.0, metadata=_float(lo=0))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "ModelConfig":
        """Check (and normalise) every field; call again after mutating. Returns ``self``."""
        _check_fields(self)
        allowed = SUPPORTED_N.get(self.architecture)
        if allowed is not None and self.N not in allowed:
            raise ValueError(
                f"ModelConfig.N={self.N!r} is invalid for architecture "
                f"{self.architecture!r}: expected one of {', '.join(map(str, allowed))}"
            )
        if allowed is None and self.N % 2:
            raise ValueError(
                f"ModelConfig.N={self.N!r} is invalid: expected an even integer >= 2 "
                f"(the diffraction centre sits at N/2)"
            )
        return self


@dataclass
class TrainingConfig:
    """Training settings (reference ``TrainingConfig`` plus ``backend='jax'``).

    ``n_groups`` is the number of groups (solution regions) to train on; it defaults to 512.
    ``n_images`` is its deprecated alias: when given without ``n_groups`` it is copied into
    ``n_groups`` with a :class:`DeprecationWarning`; both are bridged to the legacy dict.
    Loss weights must be >= 0 and ``nphotons`` > 0. ``diffraction_kind`` (not in the
    reference) says whether the data files hold amplitude or intensity (``'auto'``: classify,
    :mod:`backend_api.diffraction`); it is bridged to the legacy dict under its own name.
    """

    model: ModelConfig
    train_data_file: Optional[Path] = field(default=None, metadata=_path(optional=True))
    test_data_file: Optional[Path] = field(default=None, metadata=_path(optional=True))
    batch_size: int = field(default=16, metadata=_int(lo=1))
    nepochs: int = field(default=50, metadata=_int(lo=1))
    mae_weight: float = field(default=0.0, metadata=_float(lo=0))
    nll_weight: float = field(default=1.0, metadata=_float(lo=0))
    realspace_mae_weight: float = field(default=0.0, metadata=_float(lo=0))
    realspace_weight: float = field(default=0.0, metadata=_float(lo=0))
    nphotons: float = field(default=1e9, metadata=_float(lo=0, lo_open=True))
    n_groups: Optional[int] = field(default=None, metadata=_int(lo=1))
    n_images: Optional[int] = field(default=None, metadata=_int(lo=1, optional=True))
    n_subsample: Optional[int] = field(default=None, metadata=_int(lo=0, optional=True))
    subsample_seed: Optional[int] = field(default=None, metadata=_int(lo=0, optional=True))
    neighbor_count: int = field(default=4, metadata=_int(lo=1))
    enable_oversampling: bool = field(default=False, metadata=_bool())
    neighbor_pool_size: Optional[int] = field(default=None, metadata=_int(lo=1, optional=True))
    positions_provided: bool = field(default=True, metadata=_bool())
    probe_trainable: bool = field(default=False, metadata=_bool())
    intensity_scale_trainable: bool = field(default=True, metadata=_bool())
    output_dir: Path = field(default=Path("training_outputs"), metadata=_path())
    sequential_sampling: bool = field(default=False, metadata=_bool())
    backend: Backend = field(default="jax", metadata=_choice(Backend))
    torch_loss_mode: TorchLossMode = field(default="poisson", metadata=_choice(TorchLossMode))
    torch_mae_pred_l2_match_target: bool = field(default=False, metadata=_bool())
    gradient_clip_val: Optional[float] = field(default=None, metadata=_float(lo=0, optional=True))
    gradient_clip_algorithm: GradientClipAlgorithm = field(
        default="norm", metadata=_choice(GradientClipAlgorithm)
    )
    optimizer: Optimizer = field(default="adam", metadata=_choice(Optimizer))
    momentum: float = field(default=0.9, metadata=_float(lo=0))
    weight_decay: float = field(default=0.0, metadata=_float(lo=0))
    adam_beta1: float = field(default=0.9, metadata=_float(lo=0, hi=1, hi_open=True))
    adam_beta2: float = field(default=0.999, metadata=_float(lo=0, hi=1, hi_open=True))
    scheduler: Scheduler = field(default="Default", metadata=_choice(Scheduler))
    lr_warmup_epochs: int = field(default=0, metadata=_int(lo=0))
    lr_min_ratio: float = field(default=0.1, metadata=_float(lo=0))
    plateau_factor: float = field(
        default=0.5, metadata=_float(lo=0, lo_open=True, hi=1, hi_open=True)
    )
    plateau_patience: int = field(default=2, metadata=_int(lo=0))
    plateau_min_lr: float = field(default=5e-5, metadata=_float(lo=0))
    plateau_threshold: float = field(default=0.0, metadata=_float(lo=0))
    diffraction_kind: DiffractionKind = field(default="auto", metadata=_choice(DiffractionKind))

    def __post_init__(self) -> None:
        _apply_n_images_alias(self)
        if self.n_groups is None:
            self.n_groups = DEFAULT_N_GROUPS
        self.validate()

    def validate(self) -> "TrainingConfig":
        """Check (and normalise) every field, the nested model included. Returns ``self``.

        With ``backend='jax'``, a torch-only field (:data:`TORCH_ONLY_FIELDS`) set away from its
        default draws one ``UserWarning`` naming those fields: the jax backend ignores them.
        """
        _check_model_field(self)
        _check_fields(self)
        _warn_torch_only(self)
        return self


#: TrainingConfig fields only the PyTorch backend reads; the jax backend trains with the TF
#: reference's fixed Adam + ReduceLROnPlateau schedule (``pinn_jax.train.FitOptions``).
TORCH_ONLY_FIELDS: tuple[str, ...] = (
    "torch_loss_mode", "torch_mae_pred_l2_match_target", "gradient_clip_val",
    "gradient_clip_algorithm", "optimizer", "momentum", "weight_decay", "scheduler",
    "lr_warmup_epochs", "lr_min_ratio", "plateau_factor", "plateau_patience", "plateau_min_lr",
    "plateau_threshold",
)


def torch_only_overrides(config: "TrainingConfig") -> list[str]:
    """The :data:`TORCH_ONLY_FIELDS` of ``config`` that differ from their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}
    return [n for n in TORCH_ONLY_FIELDS if getattr(config, n) != defaults[n]]


def _warn_torch_only(config: "TrainingConfig") -> None:
    if config.backend != "jax":
        return
    changed = torch_only_overrides(config)
    if changed:
        # A warning, not an error: a config written for the torch backend stays loadable.
        warnings.warn(
            f"TrainingConfig: backend='jax' ignores the torch-only field(s) "
            f"{', '.join(f'{n}={getattr(config, n)!r}' for n in changed)} "
            f"(the jax backend trains with the reference's fixed Adam/plateau schedule)",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first frame outside this module and outside the
    dataclass-generated ``__init__`` (so the warning names the user's line)."""
    frame, level = sys._getframe(2), 3  # the caller of _warn_torch_only's caller
    while frame is not None and (frame.f_code.co_filename == __file__ or (
            frame.f_code.co_filename == "<string>" and frame.f_code.co_name == "__init__")):
        frame, level = frame.f_back, level + 1
    return level - 1


@dataclass
class InferenceConfig:
    """Inference settings (reference ``InferenceConfig`` plus ``backend='jax'``).

    ``model_path`` is the directory holding ``wts.h5.zip``. ``n_groups`` stays ``None`` when
    not given (use every scan position); ``n_images`` is its deprecated alias.
    ``diffraction_kind`` as in :class:`TrainingConfig`.
    """

    model: ModelConfig
    model_path: Path = field(metadata=_path())
    test_data_file: Path = field(metadata=_path())
    n_groups: Optional[int] = field(default=None, metadata=_int(lo=1, optional=True))
    n_images: Optional[int] = field(default=None, metadata=_int(lo=1, optional=True))
    n_subsample: Optional[int] = field(default=None, metadata=_int(lo=0, optional=True))
    subsample_seed: Optional[int] = field(default=None, metadata=_int(lo=0, optional=True))
    neighbor_count: int = field(default=4, metadata=_int(lo=1))
    enable_oversampling: bool = field(default=False, metadata=_bool())
    neighbor_pool_size: Optional[int] = field(default=None, metadata=_int(lo=1, optional=True))
    debug: bool = field(default=False, metadata=_bool())
    output_dir: Path = field(default=Path("inference_outputs"), metadata=_path())
    backend: Backend = field(default="jax", metadata=_choice(Backend))
    diffraction_kind: DiffractionKind = field(default="auto", metadata=_choice(DiffractionKind))

    def __post_init__(self) -> None:
        _apply_n_images_alias(self)
        self.validate()

    def validate(self) -> "InferenceConfig":
        """Check (and normalise) every field, the nested model included. Returns ``self``.

        Does not touch the file system; see :func:`validate_inference_config` for that.
        """
        _check_model_field(self)
        _check_fields(self)
        return self


# ---------------------------------------------------------------------------------------------
# Reference-named explicit validators (thin wrappers; kept for callers ported from upstream).


def _validate_as(config: Any, cls: type) -> None:
    if not isinstance(config, cls):
        raise ValueError(f"expected a {cls.__name__}, got {type(config).__name__}")
    config.validate()


def validate_model_config(config: ModelConfig) -> None:
    """Raise ``ValueError`` if ``config`` is not a valid :class:`ModelConfig`."""
    _validate_as(config, ModelConfig)


def validate_training_config(config: TrainingConfig) -> None:
    """Raise ``ValueError`` if ``config`` is not a valid :class:`TrainingConfig`."""
    _validate_as(config, TrainingConfig)


def validate_inference_config(config: InferenceConfig) -> None:
    """Validate ``config`` and check that ``model_path`` points at a model archive.

    A directory must contain ``wts.h5.zip``. A non-directory path must exist, or exist with a
    ``.zip`` suffix added (``wts.h5`` -> ``wts.h5.zip``), as in the reference.
    """
    _validate_as(config, InferenceConfig)
    path = config.model_path
    if path.is_dir():
        if not (path / "wts.h5.zip").is_file():
            raise ValueError(
                f"InferenceConfig.model_path={str(path)!r}: model archive not found "
                f"(expected the file {str(path / 'wts.h5.zip')!r})"
            )
        return
    candidates = [path, path.with_name(path.name + ".zip")]
    if not any(c.exists() for c in candidates):
        raise ValueError(
            f"InferenceConfig.model_path={str(path)!r} does not exist: expected a directory "
            f"containing wts.h5.zip or the archive file itself"
        )


# ---------------------------------------------------------------------------------------------
# Legacy-dict bridge


def dataclass_to_legacy_dict(obj: Any) -> dict:
    """Flatten a config dataclass into the reference's legacy key space.

    * the nested ``model`` fields are merged into the top level;
    * the nine :data:`KEY_MAPPINGS` fields are renamed to their legacy keys
      (``object_big`` -> ``'object.big'``, ``output_dir`` -> ``'output_prefix'``, ...);
    * every :class:`~pathlib.PurePath` value becomes ``str``;
    * ``None`` values are kept (``update_legacy_dict`` is what skips them).

    Deliberate difference: the reference stringifies only the mapped path fields and leaves
    ``model_path`` a ``Path``; we stringify all paths so the result is JSON/pickle-safe for
    archives read with a restricted unpickler.

    Returns a new dict; the config is not modified.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise ValueError(
            f"dataclass_to_legacy_dict: expected a config dataclass instance, got "
            f"{type(obj).__name__}"
        )
    flat = dataclasses.asdict(obj)
    nested = flat.pop("model", None)
    if isinstance(nested, dict):
        flat.update(nested)
    out: dict = {}
    for key, value in flat.items():
        if isinstance(value, PurePath):
            value = str(value)
        out[KEY_MAPPINGS.get(key, key)] = value
    return out


def update_legacy_dict(cfg: MutableMapping[str, Any], obj: Any) -> None:
    """Write ``obj``'s settings into the legacy dict ``cfg`` in place.

    Values that are ``None`` are skipped, so an older value survives; keys are never deleted;
    paths are written as ``str``. Writes go straight to the mapping (no validation hook and no
    seal warning), matching the reference bridge.
    """
    for key, value in dataclass_to_legacy_dict(obj).items():
        if value is None:
            continue
        cfg[key] = str(value) if isinstance(value, PurePath) else value
