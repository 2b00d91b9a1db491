"""The ``PtychoPINN-JAX`` reconstructor library for ptychodus 1.7 (parent side).

ptychodus lists a reconstructor as ``f'{library.name.casefold()}_{reconstructor.name.casefold()}'``
and splits that key at the first ``_``, so the library name has none: the keys are
``ptychopinn-jax_pinn`` and ``ptychopinn-jax_supervised``.

This module runs inside ptychodus's process (GUI thread for export/save/load, a worker thread
for train/reconstruct). It imports ptychodus and numpy only; all backend work happens in a
spawned child (:mod:`backend_api.ptychodus.child`), one per call, so that JAX's device memory
is returned when the call ends.
"""

from __future__ import annotations

import logging
import math
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ptychodus.api.object import Object
from ptychodus.api.preprocess.diffraction import inpaint_bad_pixels
from ptychodus.api.product import LossValue, Product
from ptychodus.api.reconstruct import (
    ReconstructInput,
    ReconstructOutput,
    Reconstructor,
    ReconstructorLibrary,
    TrainableReconstructor,
    TrainOutput,
)

from backend_api.fileio import atomic_write

from ._spawn import run_in_child
from .child import ARCHIVE_NAME, ReconstructJob, TrainJob
from .convert import (
    PTYCHODUS_TO_PINN_SHIFT_PX,
    compose_object,
    first_probe_mode,
    intensity_to_amplitude,
)
from .settings import PtychoPINNJaxSettings

__all__ = [
    "LIBRARY_NAME",
    "MODEL_FILE_EXTENSION",
    "PtychoPINNJaxReconstructor",
    "PtychoPINNJaxReconstructorLibrary",
]

logger = logging.getLogger(__name__)

#: The name ptychodus shows (and casefolds into the algorithm key); must not contain '_'.
LIBRARY_NAME = "PtychoPINN-JAX"
#: A model file is the backend's ``wts.h5.zip`` archive itself, under any name.
MODEL_FILE_EXTENSION = ".zip"
#: Written next to ``wts.h5.zip`` after training, so ``ptychodus -b reconstruct -i OUT``
#: (which looks for ``model{ext}``) finds the model without a Save Model step.
BATCH_MODEL_NAME = f"model{MODEL_FILE_EXTENSION}"

_TRAIN_ENTRY = "backend_api.ptychodus.child:run_train"
_RECONSTRUCT_ENTRY = "backend_api.ptychodus.child:run_reconstruct"


def _atomic_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` atomically (:func:`backend_api.fileio.atomic_write`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, atomic_write(dest) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _check_model_file(path: Path) -> Path:
    """Resolve what the user picked to the archive file; ValueError when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / ARCHIVE_NAME
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"model file {str(path)!r} is not a zip archive (expected a wts.h5.zip)")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    if not ({"manifest.json", "manifest.dill"} & names):
        raise ValueError(
            f"model file {str(path)!r} has no manifest.json/manifest.dill at its root; "
            "expected a PtychoPINN wts.h5.zip archive"
        )
    return path


class PtychoPINNJaxReconstructor(TrainableReconstructor):
    """One PtychoPINN mode ('PINN' or 'Supervised') behind ptychodus's TrainableReconstructor.

    Args:
        name: 'PINN' or 'Supervised' (the model_type is its lower-case form).
        settings: the shared settings handles; values are read when a call starts.
        is_developer_mode_enabled: kept for parity with ptychodus's libraries (more logging).
        backend_registrations: extra ``backend_api.backends`` entries ``{name: 'module:attr'}``
            to register in the child before use (the registry is per process).
    """

    def __init__(
        self,
        name: str,
        settings: PtychoPINNJaxSettings,
        *,
        is_developer_mode_enabled: bool = False,
        backend_registrations: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self._name = name
        self._settings = settings
        self._developer = is_developer_mode_enabled
        self._registrations = dict(backend_registrations or {})
        self._model_path: Path | None = None
        self.last_info: dict = {}

    # -- Reconstructor -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def is_trainable(self) -> bool:  # the GUI checks this attribute on SubprocessReconstructors
        return True

    @property
    def model_path(self) -> Path | None:
        """The archive the next reconstruct() will use (None until trained or loaded)."""
        return self._model_path

    def get_progress_goal(self) -> int:
        # Progress is counted in training epochs; reconstruct() reports the goal when done.
        return self._settings.nepochs()

    def _make_reconstruct_job(self, parameters: ReconstructInput) -> ReconstructJob:
        if self._model_path is None:
            raise RuntimeError(
                f"{LIBRARY_NAME}/{self._name}: no model loaded; train one or use Load Model first"
            )
        patterns = np.asarray(parameters.diffraction_patterns)
        if patterns.ndim != 3 or patterns.shape[-1] != patterns.shape[-2]:
            raise ValueError(
                f"diffraction_patterns: expected (n, N, N) square patterns, got {patterns.shape}"
            )
        bad = np.asarray(parameters.bad_pixels, dtype=bool)
        if bad.shape != patterns.shape[1:]:
            raise ValueError(
                f"bad_pixels: shape {bad.shape} does not match the pattern shape {patterns.shape[1:]}"
            )
        product = parameters.product
        n_pos = len(product.probe_positions)
        if n_pos != patterns.shape[0]:
            raise ValueError(
                f"product has {n_pos} probe positions for {patterns.shape[0]} patterns; "
                "expected one each (use prepare_reconstruct_input)"
            )
        # Same repair as ptychodus's training-data export, so inference sees what training saw.
        repaired = inpaint_bad_pixels(patterns, bad) if bad.any() else patterns
        inference = self._settings.snapshot_inference()
        amplitude = intensity_to_amplitude(repaired, name="diffraction_patterns",
                                           kind=inference.diffraction_kind)
        geometry = product.object_.get_geometry()
        x = geometry.map_probe_positions_to_object_x_px(product.probe_positions)
        y = geometry.map_probe_positions_to_object_y_px(product.probe_positions)
        probe = first_probe_mode(product.probes.get_probe_no_opr().get_array(), name="probe")
        if probe.shape != patterns.shape[1:]:
            raise ValueError(
                f"probe: shape {probe.shape} does not match the pattern shape {patterns.shape[1:]}"
            )
        model = self._settings.snapshot_model()
        return ReconstructJob(
            backend=self._settings.backend(),
            model_file=self._model_path,
            amplitude=amplitude,
            xcoords=np.asarray(x, dtype=np.float64) + PTYCHODUS_TO_PINN_SHIFT_PX,
            ycoords=np.asarray(y, dtype=np.float64) + PTYCHODUS_TO_PINN_SHIFT_PX,
            probe=probe,
            object_shape=(geometry.height_px, geometry.width_px),
            n_nearest_neighbors=inference.n_nearest_neighbors,
            n_samples=inference.n_samples,
            stitch_crop_size=inference.stitch_crop_size,
            stitch_mode=inference.stitch_mode,
            refine_iterations=inference.refine_iterations,
            refine_noise=inference.refine_noise,
            refine_probe=inference.refine_probe,
            refine_positions=inference.refine_positions,
            refine_tv_weight=inference.refine_tv_weight,
            refine_full_batch_from=inference.refine_full_batch_from,
            gridsize=model.gridsize,
            seed=self._settings.seed(),
            backend_registrations=self._registrations,
        )

    def reconstruct(self, parameters: ReconstructInput) -> Iterator[ReconstructOutput]:
        """Infer the object for ``parameters`` with the loaded model.

        Yields one ``ReconstructOutput`` whose object has the input object's shape, pixel
        geometry, centre and layer spacing; pixels no pattern covered keep the input
        object's values (layer 0; extra layers become ``1+0j``). Probes, positions and
        metadata pass through unchanged.
        """
        job = self._make_reconstruct_job(parameters)
        result: tuple[Any, ...] | None = None
        with run_in_child(_RECONSTRUCT_ENTRY, job) as events:
            for event in events:
                if event[0] == "object":
                    result = event
        if result is None:
            raise RuntimeError(f"{LIBRARY_NAME}: the inference child returned no object")
        _, stitched, coverage, info = result
        self.last_info = dict(info)  # what the child reported (stitch coverage, refinement)
        logger.info("Reconstructed %d groups with the %s backend.", info["n_groups"], info["backend"])
        stitch = info.get("stitch")
        if stitch:
            logger.info("Stitched the patches (%s): they cover %.1f%% of the object grid and "
                        "%.1f%% of the scanned area (the positions' bounding box)%s.",
                        stitch["mode"], 100 * stitch["covered_fraction"],
                        100 * stitch["scan_area_covered_fraction"],
                        "; the rest keeps the input object" if stitch["covered_fraction"] < 1 else "")
        if "refine" in info:
            r = info["refine"]
            logger.info("Refined the object for %d passes over %d positions (misfit %.4g -> %.4g)%s.",
                        r["passes"], r["positions_used"], r["misfit"][0], r["misfit"][1],
                        f"; {r['positions_outside_grid']} positions outside the object grid were left out"
                        if r["positions_outside_grid"] else "")
        object_in = parameters.product.object_
        array = compose_object(stitched, coverage, object_in.get_array())
        object_out = Object(
            array=array,
            pixel_geometry=object_in.get_pixel_geometry(),
            center=object_in.get_center(),
            layer_spacing_m=list(object_in.layer_spacing_m),
        )
        product = Product(
            metadata=parameters.product.metadata,
            probe_positions=parameters.product.probe_positions,
            probes=parameters.product.probes,
            object_=object_out,
            losses=list(parameters.product.losses),
        )
        yield ReconstructOutput(product=product, progress=self.get_progress_goal(), status=0)

    # -- TrainableReconstructor ----------------------------------------------------------

    def is_model_loaded(self) -> bool:
        return self._model_path is not None

    def get_model_file_filter(self) -> str:
        return f"PtychoPINN-JAX Model (*{MODEL_FILE_EXTENSION})"

    def get_model_file_extension(self) -> str:
        return MODEL_FILE_EXTENSION

    def load_model_from_file(self, file_path: Path) -> None:
        """Remember the model archive (checked to be one); the child loads it per call."""
        self._model_path = _check_model_file(Path(file_path)).resolve()
        logger.info("%s/%s: model %s", LIBRARY_NAME, self._name, self._model_path)

    def save_model(self, file_path: Path) -> None:
        """Write the current model archive to ``file_path`` (one file, written atomically)."""
        if self._model_path is None:
            raise RuntimeError(f"{LIBRARY_NAME}/{self._name}: no model to save; train or load one")
        dest = Path(file_path)
        if dest.is_dir():
            dest = dest / BATCH_MODEL_NAME
        if dest.exists() and dest.resolve() == self._model_path:
            return
        _atomic_copy(self._model_path, dest)

    def get_training_data_file_filter(self) -> str:
        return "NumPy Zipped Archive (*.npz)"

    def export_training_data(self, file_path: Path, parameters: ReconstructInput) -> None:
        """Write ``parameters`` as a PtychoPINN training NPZ in ptychodus's own format.

        The file is exactly what ptychodus's PtychoPINN export writes (intensity ``diff3d``
        with bad pixels inpainted, ``(modes, H, W)`` probe, object-pixel coordinates), so it
        works with either library; ``train()`` converts it to amplitudes. Written atomically.
        """
        from ptychodus.api.io import save_ptychopinn_training_data

        dest = Path(file_path)
        if dest.suffix != ".npz":
            dest = dest.with_name(dest.name + ".npz")  # what numpy.savez would do
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(dest) as handle:
            save_ptychopinn_training_data(handle, parameters)  # type: ignore[arg-type]

    def _make_train_job(self, input_path: Path, output_path: Path) -> TrainJob:
        model = self._settings.snapshot_model()
        training = self._settings.snapshot_training()
        model_fields = dict(model.__dict__)
        model_fields["model_type"] = self._name.lower()
        return TrainJob(
            backend=self._settings.backend(),
            model=model_fields,
            training=dict(training.__dict__),
            input_path=Path(input_path),
            output_path=Path(output_path),
            seed=self._settings.seed(),
            backend_registrations=self._registrations,
        )

    def train(self, input_path: Path, output_path: Path) -> Iterator[TrainOutput]:
        """Train on ``input_path/train_data.npz`` (+ ``test_data.npz``), write the model.

        Yields a ``TrainOutput`` per finished epoch with the loss curves so far and
        ``progress`` = epochs done (goal: :meth:`get_progress_goal`). Afterwards the model is
        loaded (``is_model_loaded()``), and ``output_path`` holds ``wts.h5.zip`` plus a copy
        named ``model.zip`` for batch-mode reconstruction. ``input_path`` may equal
        ``output_path``. Stopping the iteration early stops the child.
        """
        job = self._make_train_job(input_path, output_path)
        train_losses: list[LossValue] = []
        val_losses: list[LossValue] = []
        saved: Path | None = None
        with run_in_child(_TRAIN_ENTRY, job) as events:
            for event in events:
                if event[0] == "epoch":
                    _, epoch, train_loss, val_loss = event
                    train_losses.append(LossValue(int(epoch), float(train_loss)))
                    if not math.isnan(val_loss):
                        val_losses.append(LossValue(int(epoch), float(val_loss)))
                    yield TrainOutput(
                        training_loss=list(train_losses),
                        validation_loss=list(val_losses),
                        progress=int(epoch),
                        status=0,
                    )
                elif event[0] == "model_saved":
                    saved = Path(event[1])
        if saved is None:
            raise RuntimeError(f"{LIBRARY_NAME}: training finished without saving a model")
        self._model_path = _check_model_file(saved).resolve()
        batch_copy = Path(output_path) / BATCH_MODEL_NAME
        if batch_copy.resolve() != self._model_path:
            _atomic_copy(self._model_path, batch_copy)
        logger.info("%s/%s: trained model %s", LIBRARY_NAME, self._name, self._model_path)


class PtychoPINNJaxReconstructorLibrary(ReconstructorLibrary):
    """ptychodus ``ReconstructorLibrary`` named ``PtychoPINN-JAX`` with ``PINN`` and
    ``Supervised`` reconstructors.

    Args:
        settings_registry: ptychodus's ``SettingsRegistry``. ptychodus's own PtychoPINN
            settings groups are reused when present (see :mod:`.settings`).
        is_developer_mode_enabled: as ptychodus passes it to its libraries.
        backend_registrations: extra ``{name: 'module:attr'}`` backends to make known to the
            child process (for backends registered at run time, e.g. in tests).
    """

    def __init__(
        self,
        settings_registry: Any,
        is_developer_mode_enabled: bool = False,
        *,
        backend_registrations: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__("backend_api.ptychodus")
        self.settings = PtychoPINNJaxSettings(settings_registry)
        self._reconstructors: list[PtychoPINNJaxReconstructor] = [
            PtychoPINNJaxReconstructor(
                mode,
                self.settings,
                is_developer_mode_enabled=is_developer_mode_enabled,
                backend_registrations=backend_registrations,
            )
            for mode in ("PINN", "Supervised")
        ]

    @property
    def name(self) -> str:
        return LIBRARY_NAME

    def __iter__(self) -> Iterator[Reconstructor]:
        return iter(self._reconstructors)

    def __getitem__(self, name: str) -> PtychoPINNJaxReconstructor:
        for reconstructor in self._reconstructors:
            if reconstructor.name.casefold() == name.casefold():
                return reconstructor
        raise KeyError(f"{LIBRARY_NAME} has no reconstructor {name!r}; have PINN, Supervised")
