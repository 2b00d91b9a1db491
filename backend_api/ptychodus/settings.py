"""Settings for the PtychoPINN-JAX reconstructors, read from ptychodus's settings registry.

ptychodus builds its reconstructor libraries *before* it applies ``settings.ini`` and lets
users change values live, so nothing here caches a value: every ``snapshot_*`` call reads the
parameters as they are at that moment (call it when a job starts).

Groups:

- ``PtychoPINNModel`` / ``PtychoPINNTraining`` / ``PtychoPINNInference``: ptychodus's own
  PtychoPINN groups. When ptychodus has already created them (it always does inside
  ``ModelCore``) we reuse them, so the existing PtychoPINN settings panel and ``settings.ini``
  sections drive our backend too. When they do not exist (a bare registry), we create groups
  with the same parameter names under ``PtychoPINNJaxModel`` / ``PtychoPINNJaxTraining`` /
  ``PtychoPINNJaxInference`` — different names, so ptychodus's own library can still be built
  on the same registry afterwards without a "Group already exists" error.
- ``PtychoPINNJax``: options only this integration has (always ours): the backend name, the
  random seed, the number of training groups, the stitching crop size and ``DiffractionKind``
  (``auto`` | ``amplitude`` | ``intensity``: what ptychodus's diffraction data hold; ``auto``
  classifies, see :mod:`backend_api.diffraction`), ``StitchMode`` (``blend`` | ``crop``) and
  the ``Refine*`` options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend_api.diffraction import check_diffraction_kind

__all__ = [
    "OWN_GROUP",
    "PtychoPINNJaxSettings",
    "ModelSnapshot",
    "TrainingSnapshot",
    "InferenceSnapshot",
]

#: Group that holds the options specific to this integration.
OWN_GROUP = "PtychoPINNJax"

_SHARED_GROUPS = {
    "model": ("PtychoPINNModel", "PtychoPINNJaxModel"),
    "training": ("PtychoPINNTraining", "PtychoPINNJaxTraining"),
    "inference": ("PtychoPINNInference", "PtychoPINNJaxInference"),
}

#: Amplitude activations the model accepts (ptychodus offers the same four in its panel).
AMP_ACTIVATIONS = ("sigmoid", "swish", "softplus", "relu")


@dataclass(frozen=True)
class ModelSnapshot:
    """Model-architecture settings at one moment (names follow backend_api.config.ModelConfig)."""

    gridsize: int
    n_filters_scale: int
    amp_activation: str
    object_big: bool
    probe_big: bool
    probe_mask: bool
    pad_object: bool
    probe_scale: float
    gaussian_smoothing_sigma: float


@dataclass(frozen=True)
class TrainingSnapshot:
    """Training settings at one moment (names follow backend_api.config.TrainingConfig)."""

    batch_size: int
    nepochs: int
    mae_weight: float
    nll_weight: float
    realspace_mae_weight: float
    realspace_weight: float
    nphotons: float
    n_groups: int
    positions_provided: bool
    probe_trainable: bool
    intensity_scale_trainable: bool
    diffraction_kind: str = "auto"


@dataclass(frozen=True)
class InferenceSnapshot:
    """Inference settings at one moment."""

    n_nearest_neighbors: int
    n_samples: int
    stitch_crop_size: int
    diffraction_kind: str = "auto"
    stitch_mode: str = "blend"
    refine_iterations: int = 0
    refine_noise: str = "gaussian"
    refine_probe: bool = False
    refine_positions: bool = False
    refine_tv_weight: float = 0.0
    refine_full_batch_from: int = -1  # -1: never (minibatch passes only)


def _create_model_group(registry: Any, name: str) -> Any:
    group = registry.create_group(name)
    group.create_integer_parameter("GridSize", 1, minimum=1, maximum=5)
    group.create_integer_parameter("NumFiltersScale", 2, minimum=1, maximum=4)
    group.create_string_parameter("AmpActivation", "sigmoid")
    group.create_boolean_parameter("ObjectBig", True)
    group.create_boolean_parameter("ProbeBig", True)
    group.create_boolean_parameter("ProbeMask", False)
    group.create_boolean_parameter("PadObject", True)
    group.create_real_parameter("ProbeScale", 4.0, minimum=0.0)
    group.create_real_parameter("GaussianSmoothingSigma", 0.0, minimum=0.0)
    return group


def _create_training_group(registry: Any, name: str) -> Any:
    group = registry.create_group(name)
    # ptychodus's default photon count (1e6), not the reference's 1e9: users of this group
    # in ptychodus already rely on it.
    group.create_real_parameter("NumPhotons", 1e6, minimum=0.0)
    group.create_integer_parameter("BatchSize", 16, minimum=1, maximum=1 << 30)
    group.create_integer_parameter("NumEpochs", 50, minimum=1)
    group.create_real_parameter("MAEWeight", 0.0, minimum=0.0, maximum=1.0)
    group.create_real_parameter("NLLWeight", 1.0, minimum=0.0, maximum=1.0)
    group.create_real_parameter("RealspaceMAEWeight", 0.0, minimum=0.0, maximum=1.0)
    group.create_real_parameter("RealspaceWeight", 0.0, minimum=0.0, maximum=1.0)
    group.create_boolean_parameter("PositionsProvided", True)
    group.create_boolean_parameter("ProbeTrainable", False)
    group.create_boolean_parameter("IntensityScaleTrainable", True)
    return group


def _create_inference_group(registry: Any, name: str) -> Any:
    group = registry.create_group(name)
    group.create_path_parameter("ModelPath", Path("/path/to/model.zip"))
    group.create_integer_parameter("NumNearestNeighbors", 7, minimum=0)
    group.create_integer_parameter("NumSamples", 1, minimum=1)
    return group


def _create_own_group(registry: Any) -> Any:
    group = registry.create_group(OWN_GROUP)
    # 'jax' is ours; any name known to backend_api.backends works (e.g. 'tensorflow' when
    # the upstream package is installed), because the child only speaks the Backend protocol.
    group.create_string_parameter("Backend", "jax")
    group.create_integer_parameter("Seed", 0, minimum=0)
    # Groups drawn per epoch for training (the reference's n_groups); capped by the data.
    group.create_integer_parameter("NumGroups", 512, minimum=1)
    # Central crop (pixels) of each predicted patch used for stitching (the reference's M).
    group.create_integer_parameter("StitchCropSize", 20, minimum=2)
    _add_diffraction_kind(group)
    _add_refinement(group)
    _add_stitch_mode(group)
    return group


#: How the network's patches become the product's object (RefineIterations = 0):
#: 'blend' fills each position's footprint (probe-intensity weights over the part of the patch
#: the network reconstructs), 'crop' keeps only each patch's central StitchCropSize square
#: (the reference's stitching, which leaves gaps between the patches of a sparse scan).
STITCH_MODES = ("blend", "crop")


def _add_stitch_mode(group: Any) -> None:
    if "StitchMode" not in group.parameters():
        group.create_string_parameter("StitchMode", "blend")


# Passes of physics refinement after the network (pinn_jax.refine): on the reference test scan
# (512 positions) 20 passes from the network's object take a few seconds on 2 CPU cores and
# lift amplitude SSIM from ~0.4 to > 0.98 (benchmarks/README.md); 0 gives the network's object.
DEFAULT_REFINE_ITERATIONS = 20
REFINE_NOISE_MODELS = ("gaussian", "poisson")


def _add_refinement(group: Any) -> None:
    # Added to an existing group too, so settings files from before refinement keep working.
    params = group.parameters()
    if "RefineIterations" not in params:
        group.create_integer_parameter("RefineIterations", DEFAULT_REFINE_ITERATIONS, minimum=0)
    if "RefineNoise" not in params:
        group.create_string_parameter("RefineNoise", "gaussian")
    if "RefineProbe" not in params:
        group.create_boolean_parameter("RefineProbe", False)
    if "RefinePositions" not in params:
        group.create_boolean_parameter("RefinePositions", False)
    # the low-dose recipe (pinn_jax.refine.RefineOptions): RefineNoise poisson, RefineTVWeight
    # 0.05, RefineFullBatchFrom 3; -1 = minibatch passes only
    if "RefineTVWeight" not in params:
        group.create_real_parameter("RefineTVWeight", 0.0, minimum=0.0)
    if "RefineFullBatchFrom" not in params:
        group.create_integer_parameter("RefineFullBatchFrom", -1, minimum=-1)


def _add_diffraction_kind(group: Any) -> None:
    # What ptychodus's patterns hold: 'auto' (classify; intensity unless the data show
    # otherwise), 'amplitude' (never take the square root) or 'intensity' (always).
    if "DiffractionKind" not in group.parameters():
        group.create_string_parameter("DiffractionKind", "auto")


def _get_or_create(registry: Any, preferred: str, fallback: str, factory: Any) -> Any:
    for name in (preferred, fallback):
        if name in set(registry):
            return registry[name]
    return factory(registry, fallback)


class PtychoPINNJaxSettings:
    """Handles on the settings groups; values are read only through the ``snapshot_*`` calls.

    Args:
        registry: a ``ptychodus.api.settings.SettingsRegistry`` (duck-typed: ``create_group``,
            ``__iter__`` over group names, ``__getitem__``).
    """

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self.model_group = _get_or_create(registry, *_SHARED_GROUPS["model"], _create_model_group)
        self.training_group = _get_or_create(
            registry, *_SHARED_GROUPS["training"], _create_training_group
        )
        self.inference_group = _get_or_create(
            registry, *_SHARED_GROUPS["inference"], _create_inference_group
        )
        if OWN_GROUP in set(registry):
            self.own_group = registry[OWN_GROUP]
            _add_diffraction_kind(self.own_group)
            _add_refinement(self.own_group)
            _add_stitch_mode(self.own_group)
        else:
            self.own_group = _create_own_group(registry)

    @property
    def shares_ptychodus_groups(self) -> bool:
        """True when the model/training/inference groups are ptychodus's own PtychoPINN ones."""
        return self.model_group is _lookup(self._registry, _SHARED_GROUPS["model"][0])

    @staticmethod
    def _get(group: Any, name: str) -> Any:
        return group.parameters()[name].get_value()

    def parameter(self, group: str, name: str) -> Any:
        """The live parameter object ``name`` of ``group`` ('model', 'training', 'inference',
        'own'); for tests and for code that wants to set a value."""
        groups = {
            "model": self.model_group,
            "training": self.training_group,
            "inference": self.inference_group,
            "own": self.own_group,
        }
        return groups[group].parameters()[name]

    def backend(self) -> str:
        return str(self._get(self.own_group, "Backend")).strip() or "jax"

    def seed(self) -> int:
        return int(self._get(self.own_group, "Seed"))

    def diffraction_kind(self) -> str:
        """``PtychoPINNJax.DiffractionKind``, checked (``ValueError`` naming the setting)."""
        value = str(self._get(self.own_group, "DiffractionKind")).strip().lower()
        return check_diffraction_kind(value, name=f"{OWN_GROUP}.DiffractionKind")

    def stitch_mode(self) -> str:
        """``PtychoPINNJax.StitchMode``, checked (``ValueError`` naming the setting)."""
        value = str(self._get(self.own_group, "StitchMode")).strip().lower()
        if value not in STITCH_MODES:
            raise ValueError(f"{OWN_GROUP}.StitchMode is {value!r}; expected one of {STITCH_MODES}")
        return value

    def nepochs(self) -> int:
        return int(self._get(self.training_group, "NumEpochs"))

    def snapshot_model(self) -> ModelSnapshot:
        g = self.model_group
        activation = str(self._get(g, "AmpActivation")).strip().lower()
        if activation not in AMP_ACTIVATIONS:
            raise ValueError(
                f"PtychoPINNModel.AmpActivation is {activation!r}; expected one of "
                f"{AMP_ACTIVATIONS}."
            )
        return ModelSnapshot(
            gridsize=int(self._get(g, "GridSize")),
            n_filters_scale=int(self._get(g, "NumFiltersScale")),
            amp_activation=activation,
            object_big=bool(self._get(g, "ObjectBig")),
            probe_big=bool(self._get(g, "ProbeBig")),
            probe_mask=bool(self._get(g, "ProbeMask")),
            pad_object=bool(self._get(g, "PadObject")),
            probe_scale=float(self._get(g, "ProbeScale")),
            gaussian_smoothing_sigma=float(self._get(g, "GaussianSmoothingSigma")),
        )

    def snapshot_training(self) -> TrainingSnapshot:
        g = self.training_group
        return TrainingSnapshot(
            batch_size=int(self._get(g, "BatchSize")),
            nepochs=int(self._get(g, "NumEpochs")),
            mae_weight=float(self._get(g, "MAEWeight")),
            nll_weight=float(self._get(g, "NLLWeight")),
            realspace_mae_weight=float(self._get(g, "RealspaceMAEWeight")),
            realspace_weight=float(self._get(g, "RealspaceWeight")),
            nphotons=float(self._get(g, "NumPhotons")),
            n_groups=int(self._get(self.own_group, "NumGroups")),
            positions_provided=bool(self._get(g, "PositionsProvided")),
            probe_trainable=bool(self._get(g, "ProbeTrainable")),
            intensity_scale_trainable=bool(self._get(g, "IntensityScaleTrainable")),
            diffraction_kind=self.diffraction_kind(),
        )

    def snapshot_inference(self) -> InferenceSnapshot:
        g = self.inference_group
        return InferenceSnapshot(
            n_nearest_neighbors=int(self._get(g, "NumNearestNeighbors")),
            n_samples=int(self._get(g, "NumSamples")),
            stitch_crop_size=int(self._get(self.own_group, "StitchCropSize")),
            diffraction_kind=self.diffraction_kind(),
            stitch_mode=self.stitch_mode(),
            **self._refinement(),
        )

    def _refinement(self) -> dict:
        g = self.own_group
        iterations = int(self._get(g, "RefineIterations"))
        if iterations < 0:
            raise ValueError(f"{OWN_GROUP}.RefineIterations is {iterations}; expected an integer >= 0")
        noise = str(self._get(g, "RefineNoise")).strip().lower()
        if noise not in REFINE_NOISE_MODELS:
            raise ValueError(f"{OWN_GROUP}.RefineNoise is {noise!r}; expected one of {REFINE_NOISE_MODELS}")
        tv_weight = float(self._get(g, "RefineTVWeight"))
        if not (tv_weight >= 0.0 and tv_weight < float("inf")):
            raise ValueError(f"{OWN_GROUP}.RefineTVWeight is {tv_weight!r}; expected a finite number >= 0")
        full_from = int(self._get(g, "RefineFullBatchFrom"))
        if full_from < -1:
            raise ValueError(f"{OWN_GROUP}.RefineFullBatchFrom is {full_from}; expected -1 (never) or a pass >= 0")
        return {"refine_iterations": iterations, "refine_noise": noise,
                "refine_probe": bool(self._get(g, "RefineProbe")),
                "refine_positions": bool(self._get(g, "RefinePositions")),
                "refine_tv_weight": tv_weight, "refine_full_batch_from": full_from}


def _lookup(registry: Any, name: str) -> Any:
    return registry[name] if name in set(registry) else None
