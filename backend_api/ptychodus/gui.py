"""The PtychoPINN-JAX parameter panel in ptychodus's desktop GUI (PyQt5).

ptychodus 1.7 picks the panel under Processing -> Algorithm from a fixed list of
``ReconstructorViewControllerFactory`` objects that ``ControllerCore`` hands to
``ProcessingController`` (``ptychodus/controller/core.py``), matched by library name
(``ptychodus/controller/processing/core.py``, ``_populate_stacked_widget``); any other library
gets a grey "<name> not found!" label. :func:`install` replaces the name
``ProcessingController`` in ``ptychodus.controller.core`` with a subclass that appends
:class:`PtychoPINNJaxViewControllerFactory` to that list when the processing API it is given
carries our library (see :mod:`.registration`), so the panel is ours for both
``ptychopinn-jax_pinn`` and ``ptychopinn-jax_supervised``.

The panel is built with ptychodus's own ``ParameterViewBuilder`` and parameter view
controllers (spin boxes, power-of-two spin box, sliders, check boxes, combo boxes, decimal line
edits), bound to the very parameter objects :class:`~.settings.PtychoPINNJaxSettings` reads when
a job starts: editing a widget changes what the next train/reconstruct uses, and ``settings.ini``
and the panel stay in step (ptychodus's widgets observe the parameters).

Importing this module imports PyQt5 and ptychodus's controller package; :mod:`.registration`
imports it only when PyQt5 is importable, so batch mode and headless use never need Qt.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

from PyQt5.QtWidgets import QLabel, QWidget

from ptychodus.controller.parameters import (
    CheckBoxParameterViewController,
    ComboBoxParameterViewController,
    DecimalLineEditParameterViewController,
    DecimalSliderParameterViewController,
    ParameterViewBuilder,
    ParameterViewController,
    PowerTwoSpinBoxParameterViewController,
    SpinBoxParameterViewController,
)
from ptychodus.controller.processing import ReconstructorViewControllerFactory
from ptychodus.model.product import ProductRepositoryObserver

from .settings import (
    AMP_ACTIVATIONS,
    OWN_GROUP,
    REFINE_NOISE_MODELS,
    STITCH_MODES,
    PtychoPINNJaxSettings,
)

__all__ = ["PtychoPINNJaxViewControllerFactory", "install", "uninstall", "is_installed"]

logger = logging.getLogger(__name__)

_MARKER = "_ptychopinn_jax_original"


class _RefreshOnDataset(ProductRepositoryObserver):
    """Calls ``refresh`` whenever a product is added or removed or its dataset changes."""

    def __init__(self, refresh: Any) -> None:
        self._refresh = refresh

    def handle_item_inserted(self, index: int, item: Any) -> None:
        self._refresh()

    def handle_dataset_changed(self, index: int, item: Any) -> None:
        self._refresh()

    def handle_item_removed(self, index: int, item: Any) -> None:
        self._refresh()

    def handle_state_changed(self, index: int, item: Any) -> None:
        self._refresh()

    def handle_metadata_changed(self, index: int, item: Any) -> None:
        pass

    def handle_probe_positions_changed(self, index: int, item: Any) -> None:
        pass

    def handle_probe_changed(self, index: int, item: Any) -> None:
        pass

    def handle_object_changed(self, index: int, item: Any) -> None:
        pass

    def handle_losses_changed(self, index: int, losses: Any) -> None:
        pass


class _PatchSizeViewController(ParameterViewController):
    """A read-only label: N is not a setting, it is the diffraction patterns' size."""

    def __init__(self, product_repository: Any = None) -> None:
        self._repository = product_repository
        self._widget = QLabel()
        self._widget.setToolTip(
            "PtychoPINN's patch size N is the side of the diffraction patterns (after "
            "ptychodus's crop/binning in the Diffraction view); it is read from the data "
            "when training starts, and a model only infers on patterns of its own N."
        )
        self.refresh()
        if product_repository is not None:
            self._observer = _RefreshOnDataset(self.refresh)
            product_repository.add_observer(self._observer)

    def get_widget(self) -> QWidget:
        return self._widget

    def sizes(self) -> list[int]:
        """Pattern sizes of the products that have diffraction data (best effort)."""
        found: list[int] = []
        repository = self._repository
        if repository is None:
            return found
        try:
            for index in range(len(repository)):
                dataset = repository[index].get_dataset()
                if dataset is None:
                    continue
                extent = dataset.get_processed_image_extent()
                found.append(int(extent.width_px))
        except Exception:  # the label is informative only; never break the panel
            logger.debug("could not read the pattern size", exc_info=True)
        return found

    def refresh(self) -> None:
        sizes = sorted(set(self.sizes()))
        if not sizes:
            text = "from the diffraction data"
        else:
            text = ", ".join(f"{n} x {n}" for n in sizes) + " (from the diffraction data)"
        self._widget.setText(text)


class PtychoPINNJaxViewControllerFactory(ReconstructorViewControllerFactory):
    """Builds the PtychoPINN-JAX panel (one per reconstructor: PINN, Supervised).

    Args:
        settings: the library's :class:`~.settings.PtychoPINNJaxSettings` (live parameters).
        file_dialog_factory: ptychodus's ``FileDialogFactory`` (kept for its builder).
        product_repository: ptychodus's ``ProductRepository``, to show N from the data.
    """

    def __init__(self, settings: PtychoPINNJaxSettings, file_dialog_factory: Any = None,
                 product_repository: Any = None) -> None:
        super().__init__()
        self._settings = settings
        self._file_dialog_factory = file_dialog_factory
        self._product_repository = product_repository
        self.widgets: dict[str, dict[tuple[str, str], QWidget]] = {}

    @property
    def name(self) -> str:
        from .library import LIBRARY_NAME

        return LIBRARY_NAME

    def create_view_controller(self, reconstructor_name: str) -> QWidget:
        s = self._settings
        is_pinn = reconstructor_name.casefold() == "pinn"
        builder = ParameterViewBuilder(self._file_dialog_factory)
        made: dict[tuple[str, str], Any] = {}

        def add(kind: str, group: str, setting: str, label: str, *, items: Iterable[str] = (),
                tip: str = "") -> None:
            parameter = s.parameter(group, setting)
            if kind == "spin":
                vc: ParameterViewController = SpinBoxParameterViewController(parameter, tool_tip=tip)
            elif kind == "pow2":
                vc = PowerTwoSpinBoxParameterViewController(parameter, tool_tip=tip)
            elif kind == "check":
                vc = CheckBoxParameterViewController(parameter, "", tool_tip=tip)
            elif kind == "combo":
                values = list(items)
                current = str(parameter.get_value())
                if current not in values:
                    values.append(current)  # show a value from settings.ini as it is
                vc = ComboBoxParameterViewController(parameter, values, tool_tip=tip)
            elif kind == "decimal":
                vc = DecimalLineEditParameterViewController(parameter, tool_tip=tip)
            elif kind == "slider":
                vc = DecimalSliderParameterViewController(parameter, tool_tip=tip)
            else:  # pragma: no cover - programming error
                raise ValueError(kind)
            builder.add_view_controller(vc, label, group=_section(group, setting))
            made[group, setting] = vc

        patch_size = _PatchSizeViewController(self._product_repository)
        builder.add_view_controller(patch_size, "Patch Size N:", group=_SECTIONS["model"])
        add("spin", "model", "GridSize", "Grid Size:",
            tip="Patterns per solution region (gridsize 2 = 2x2 neighbouring patterns).")
        add("spin", "model", "NumFiltersScale", "Num. Filters Scale Factor:",
            tip="Scale factor for the number of convolution filters.")
        add("combo", "model", "AmpActivation", "Amplitude Activation:", items=AMP_ACTIVATIONS)
        add("check", "model", "ObjectBig", "Object Big",
            tip="One real-space reconstruction per pattern of a group, then averaged.")
        add("check", "model", "ProbeBig", "Probe Big",
            tip="Low-resolution reconstruction of the outer region of the N x N grid.")
        add("check", "model", "PadObject", "Pad Object",
            tip="Reconstruct only the central N/2 x N/2 (strict oversampling).")
        if is_pinn:
            add("decimal", "model", "ProbeScale", "Probe Scale Factor:",
                tip="Scaling factor for the probe amplitude.")
            add("check", "model", "ProbeMask", "Probe Mask",
                tip="Apply a circular mask to the probe.")
            add("decimal", "model", "GaussianSmoothingSigma", "Gaussian Smoothing Sigma:",
                tip="Gaussian smoothing of the probe illumination (0 = off).")

        add("spin", "training", "NumEpochs", "Number of Epochs:")
        add("pow2", "training", "BatchSize", "Batch Size:")
        if is_pinn:
            add("slider", "training", "NLLWeight", "Poisson NLL Weight:")
            add("slider", "training", "MAEWeight", "Diffraction MAE Weight:")
            add("slider", "training", "RealspaceMAEWeight", "Realspace MAE Weight:")
            add("slider", "training", "RealspaceWeight", "Realspace Weight:")
        add("decimal", "training", "NumPhotons", "Number of Photons:",
            tip="Photon count the intensity scale is derived from (PtychoPINN's nphotons).")
        add("spin", "own", "NumGroups", "Number of Groups:",
            tip="Groups drawn from the training data (capped by the number of patterns).")
        if is_pinn:
            add("check", "training", "ProbeTrainable", "Probe Trainable",
                tip="Optimise the probe during training.")
            add("check", "training", "IntensityScaleTrainable", "Intensity Scale Trainable",
                tip="Optimise the model's intensity scale during training.")
        add("spin", "own", "Seed", "Random Seed:",
            tip="Seeds grouping, shuffling and initialisation (same seed, same model).")

        add("spin", "inference", "NumNearestNeighbors", "Number of Neighbors:")
        add("spin", "inference", "NumSamples", "Number of Samples:")
        add("combo", "own", "StitchMode", "Stitching:", items=STITCH_MODES,
            tip="blend: each pattern fills its footprint, weighted by the probe intensity "
                "over the part the network reconstructs; crop: the central crop only "
                "(the reference's M).")
        add("spin", "own", "StitchCropSize", "Stitch Crop Size:",
            tip="Side of the central crop (pixels) used by 'crop' stitching.")
        add("spin", "own", "RefineIterations", "Refinement Iterations:",
            tip="Passes of physics refinement after the network (0 = the network's object).")
        add("combo", "own", "RefineNoise", "Refinement Noise Model:", items=REFINE_NOISE_MODELS)
        add("check", "own", "RefineProbe", "Refine Probe")
        add("check", "own", "RefinePositions", "Refine Positions")
        add("decimal", "own", "RefineTVWeight", "Refinement TV Weight:",
            tip="Total-variation prior of the refinement (0 = none; ~0.05 at ~1e4 photons per pattern).")
        add("spin", "own", "RefineFullBatchFrom", "Full-Batch Passes From:",
            tip="From this pass on, one update per pass over every position: converges at low dose "
                "(-1 = never; ~3 with the poisson noise model and a TV weight).")

        from backend_api.backends import available_backends

        add("combo", "own", "Backend", "Backend:", items=available_backends(),
            tip="The backend_api backend that trains and infers (jax is pinn-jax).")
        add("combo", "own", "DiffractionKind", "Diffraction Data Are:",
            items=("auto", "intensity", "amplitude"),
            tip="What the patterns hold; 'auto' takes the square root of intensities and "
                "never of data that are already amplitudes.")

        widget = builder.build_widget()
        self.widgets[reconstructor_name.casefold()] = {
            key: vc.get_widget() for key, vc in made.items()
        }
        self.widgets[reconstructor_name.casefold()]["model", "N"] = patch_size.get_widget()
        widget.ptychopinn_jax_patch_size = patch_size  # type: ignore[attr-defined]
        return widget


_SECTIONS = {"model": "Model", "training": "Training", "inference": "Inference",
             "own": OWN_GROUP}
# Where the own-group settings appear (the panel groups by meaning, not by settings group).
_OWN_SECTION = {"NumGroups": "Training", "Seed": "Training", "StitchMode": "Inference",
                "StitchCropSize": "Inference", "RefineIterations": "Inference",
                "RefineNoise": "Inference", "RefineProbe": "Inference",
                "RefinePositions": "Inference", "RefineTVWeight": "Inference",
                "RefineFullBatchFrom": "Inference", "Backend": "PtychoPINN-JAX",
                "DiffractionKind": "PtychoPINN-JAX"}


def _section(group: str, setting: str) -> str:
    if group == "own":
        return _OWN_SECTION.get(setting, "PtychoPINN-JAX")
    return _SECTIONS[group]


# ------------------------------------------------------------------------------ loss plot


def _plot_nonpositive_losses_linearly(controller: Any, repository: Any, status_view: Any) -> None:
    """ptychodus draws a product's losses with ``semilogy``
    (``ProcessingStatusController.plot_losses``), which shows nothing for losses <= 0 -- and a
    PtychoPINN's Poisson negative log-likelihood is usually negative. Wrap the status controller's
    ``plot_losses`` so that, only when the product has such values, the same curve is shown on a
    linear axis; positive losses keep ptychodus's log plot unchanged."""
    status = getattr(controller, "_status_controller", None)
    original = getattr(status, "plot_losses", None)
    if original is None:  # pragma: no cover - another ptychodus version
        return

    def plot_losses(product_index: int) -> None:
        try:
            values = [float(loss.value) for loss in repository[product_index].get_losses()]
        except Exception:
            values = []
        with warnings.catch_warnings():  # matplotlib: "no positive values ... log-scaled"
            warnings.filterwarnings("ignore", "Data has no positive values", UserWarning)
            original(product_index)
        if values and min(values) <= 0:
            axes = status_view.axes
            axes.set_yscale("linear")
            axes.set_ylabel("Loss (linear: has values <= 0)")
            axes.relim()
            axes.autoscale_view()
            status_view.figure_canvas.draw()

    status.plot_losses = plot_losses  # what the repository observer calls per epoch
    combo = controller._product_view_controller.get_widget()
    try:  # and what a change of the selected product calls
        combo.currentIndexChanged.disconnect(original)
    except (TypeError, RuntimeError):  # pragma: no cover - not connected that way
        pass
    combo.currentIndexChanged.connect(plot_losses)


# ------------------------------------------------------------------------------ install


def is_installed() -> bool:
    import ptychodus.controller.core as controller_core

    return hasattr(controller_core.ProcessingController, _MARKER)


def install() -> None:
    """Make every ``ControllerCore`` built afterwards show our panel (idempotent)."""
    import ptychodus.controller.core as controller_core

    original = getattr(controller_core.ProcessingController, _MARKER,
                       controller_core.ProcessingController)

    class ProcessingController(original):  # type: ignore[misc, valid-type]
        __doc__ = original.__doc__

        def __init__(self, algorithm_parameter: Any, processing_api: Any,
                     product_repository: Any, product_table_model: Any, globus: Any,
                     genesis: Any, view: Any, status_view: Any, file_dialog_factory: Any,
                     view_controller_factories: Any, *args: Any, **kwargs: Any) -> None:
            factories = list(view_controller_factories)
            library = getattr(processing_api, "ptychopinn_jax_library", None)
            self.ptychopinn_jax_view_controller_factory = None
            if library is not None and not any(
                    f.name.casefold() == library.name.casefold() for f in factories):
                factory = PtychoPINNJaxViewControllerFactory(
                    library.settings, file_dialog_factory, product_repository)
                factories.append(factory)
                self.ptychopinn_jax_view_controller_factory = factory
            super().__init__(algorithm_parameter, processing_api, product_repository,
                             product_table_model, globus, genesis, view, status_view,
                             file_dialog_factory, factories, *args, **kwargs)
            if self.ptychopinn_jax_view_controller_factory is not None:
                _plot_nonpositive_losses_linearly(self, product_repository, status_view)

    setattr(ProcessingController, _MARKER, original)
    ProcessingController.__module__ = __name__
    ProcessingController.__qualname__ = "ProcessingController"
    controller_core.ProcessingController = ProcessingController


def uninstall() -> None:
    import ptychodus.controller.core as controller_core

    original = getattr(controller_core.ProcessingController, _MARKER, None)
    if original is not None:
        controller_core.ProcessingController = original
