"""Child-process side of the PtychoPINN-JAX ptychodus integration.

Runs inside the spawned process started by :mod:`backend_api.ptychodus._spawn`. It imports
neither ptychodus nor a GUI toolkit; jax (through the selected backend) is imported only here,
after :data:`~backend_api.ptychodus._spawn.JAX_CHILD_ENVIRONMENT` has been applied.

The parent sends plain data (numpy arrays, numbers, strings, paths) in a :class:`TrainJob`
or :class:`ReconstructJob` and gets plain data back:

- train: ``('epoch', epoch, train_loss, val_loss)`` per finished epoch (streamed when the
  backend accepts an ``on_epoch_end`` callback, otherwise replayed from the training history
  when training ends), then ``('model_saved', path_to_archive)``;
- reconstruct: ``('object', stitched (H, W) complex64, coverage (H, W) float32, info dict)``;
  ``info['stitch']`` says how the patches were stitched (``StitchMode``) and what fraction of
  the object grid and of the scan's bounding box they cover.

Everything the child does with a backend goes through the backend-neutral contract:
``backend_api.workflows`` (train, save, load) and the loaded model's
``predict([X * intensity_scale, local_offsets])``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backend_api.archive import ARCHIVE_NAME  # numpy + stdlib only: cheap here
from backend_api.canvas import check_positions_overlap, fill_uncovered

from .convert import (
    blend_on_grid,
    blend_window,
    coverage_report,
    first_probe_mode,
    intensity_to_amplitude,
    stitch_on_grid,
)

__all__ = [
    "TrainJob",
    "ReconstructJob",
    "run_train",
    "run_reconstruct",
    "load_ptychodus_training_npz",
    "ARCHIVE_NAME",
]

logger = logging.getLogger(__name__)


Send = Callable[[tuple[Any, ...]], None]


@dataclass(frozen=True)
class TrainJob:
    """Everything a training child needs (picklable, no ptychodus objects)."""

    backend: str
    model: Mapping[str, Any]  # ModelConfig fields except N (taken from the data)
    training: Mapping[str, Any]  # TrainingConfig fields
    input_path: Path
    output_path: Path
    seed: int = 0
    backend_registrations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReconstructJob:
    """Everything an inference child needs (picklable, no ptychodus objects).

    Positions are in object pixels in the PtychoPINN convention (patch pixel N/2 on the
    position), already shifted from ptychodus's convention by the parent.
    """

    backend: str
    model_file: Path
    amplitude: np.ndarray  # (n, N, N) float32
    xcoords: np.ndarray  # (n,) float64
    ycoords: np.ndarray  # (n,) float64
    probe: np.ndarray  # (N, N) complex64
    object_shape: tuple[int, int]
    n_nearest_neighbors: int
    n_samples: int
    stitch_crop_size: int
    stitch_mode: str = "blend"  # 'blend' | 'crop' (PtychoPINNJax.StitchMode)
    gridsize: int = 1
    seed: int = 0
    refine_iterations: int = 0
    refine_noise: str = "gaussian"
    refine_probe: bool = False
    refine_positions: bool = False
    refine_tv_weight: float = 0.0
    refine_full_batch_from: int = -1  # -1: never
    backend_registrations: Mapping[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _apply_registrations(registrations: Mapping[str, str]) -> None:
    """Re-register non-default backends in this fresh interpreter (the registry is per process)."""
    if not registrations:
        return
    from backend_api.backends import register_backend

    for name, target in registrations.items():
        # replace=True: a test double may stand in for a builtin name such as 'jax'.
        register_backend(name, target, replace=True)


def load_ptychodus_training_npz(path: Path, *, diffraction_kind: str = "auto") -> Any:
    """Read a PtychoPINN training NPZ *as ptychodus exports it* into a ``RawData``.

    ptychodus's export (``save_ptychopinn_training_data``) stores ``diff3d`` as detector
    **intensity** in the source dtype (bad pixels already inpainted) and ``probeGuess`` as the
    ``(modes, H, W)`` stack. The PtychoPINN contract wants amplitude and a ``(H, W)`` probe,
    so this takes ``sqrt`` (per ``diffraction_kind``, see
    :func:`~backend_api.ptychodus.convert.intensity_to_amplitude`: ``'auto'`` leaves data that
    are already amplitudes alone) and keeps mode 0. Missing ``*_start`` coordinates default to
    the coordinates and a missing ``scan_index`` to zeros, as in the reference loader.

    A file that is not a readable NPZ raises :class:`backend_api.raw_data.DataFileError`
    naming it.
    """
    from backend_api.raw_data import DataFileError, RawData, open_npz, read_npz_member

    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise ValueError(
            f"training data file {str(path)!r} does not exist; export train_data.npz and "
            "test_data.npz from ptychodus (Export Training Data) into the input directory first"
        )
    with open_npz(path, allow_pickle=False) as f:
        missing = [k for k in ("xcoords", "ycoords", "diff3d", "probeGuess") if k not in f.files]
        if missing:
            raise DataFileError(
                f"{path}: missing key(s) {missing}; found {sorted(f.files)}; expected a "
                "PtychoPINN NPZ (xcoords, ycoords, diff3d, probeGuess[, objectGuess, scan_index])"
            )

        def get(key: str) -> np.ndarray:
            return read_npz_member(path, f, key)

        x = np.asarray(get("xcoords"), dtype=np.float64)
        y = np.asarray(get("ycoords"), dtype=np.float64)
        xs = np.asarray(get("xcoords_start"), dtype=np.float64) if "xcoords_start" in f.files else x
        ys = np.asarray(get("ycoords_start"), dtype=np.float64) if "ycoords_start" in f.files else y
        diff3d = intensity_to_amplitude(get("diff3d"), name=f"{path.name}: diff3d",
                                        kind=diffraction_kind)
        probe = first_probe_mode(get("probeGuess"), name=f"{path.name}: probeGuess")
        obj = None
        if "objectGuess" in f.files:
            obj = np.asarray(get("objectGuess"))
            if obj.ndim < 2:
                obj = None
            else:
                while obj.ndim > 2:
                    obj = obj[0]
                obj = obj.astype(np.complex64)
        scan_index = (
            np.asarray(get("scan_index"), dtype=np.int64)
            if "scan_index" in f.files
            else np.zeros(len(x), dtype=np.int64)
        )
    if not (len(x) == len(y) == diff3d.shape[0]):
        raise ValueError(
            f"{path.name}: {len(x)} xcoords, {len(y)} ycoords and {diff3d.shape[0]} patterns; "
            "expected one position per pattern"
        )
    if diff3d.shape[1] != diff3d.shape[2]:
        raise ValueError(f"{path.name}: diff3d patterns are {diff3d.shape[1:]}; expected square")
    if probe.shape != diff3d.shape[1:]:
        raise ValueError(
            f"{path.name}: probeGuess is {probe.shape}; expected the pattern shape {diff3d.shape[1:]}"
        )
    try:
        return RawData(x, y, xs, ys, diff3d, probe, scan_index, objectGuess=obj,
                       diffraction_kind="amplitude")  # converted above
    except ValueError as exc:
        raise DataFileError(f"{path}: {exc}") from None


def _build_configs(job: TrainJob, n_pixels: int, train_path: Path, test_path: Path) -> Any:
    from backend_api.config import ModelConfig, TrainingConfig

    model = ModelConfig(N=n_pixels, **dict(job.model))
    training = dict(job.training)
    cfg = TrainingConfig(
        model=model,
        train_data_file=train_path,
        test_data_file=test_path,
        output_dir=Path(job.output_path),
        backend=job.backend,
        **training,
    )
    return cfg


def _logs_losses(logs: Any) -> tuple[float, float]:
    """``(loss, val_loss)`` of one epoch's logs (the Backend protocol's ``on_epoch_end``)."""
    logs = logs if isinstance(logs, Mapping) else {}
    val = logs.get("val_loss", math.nan)
    return float(logs.get("loss", math.nan)), float(math.nan if val is None else val)


# ----------------------------------------------------------------------------- training


def run_train(job: TrainJob, send: Send) -> None:
    """Child entry point: train on ``input_path/{train,test}_data.npz``, save the archive."""
    from backend_api import workflows
    from backend_api.backends import configure_runtime, get_backend

    _apply_registrations(job.backend_registrations)
    in_dir, out_dir = Path(job.input_path), Path(job.output_path)
    train_path, test_path = in_dir / "train_data.npz", in_dir / "test_data.npz"
    kind = str(job.training.get("diffraction_kind", "auto"))
    train = load_ptychodus_training_npz(train_path, diffraction_kind=kind)
    test = (load_ptychodus_training_npz(test_path, diffraction_kind=kind)
            if test_path.is_file() else None)
    if test is None:
        logger.warning("%s not found; training without validation data.", test_path)
    n_pixels = int(train.diff3d.shape[-1])
    if test is not None and test.diff3d.shape[-1] != n_pixels:
        raise ValueError(
            f"train_data.npz patterns are {n_pixels} px but test_data.npz patterns are "
            f"{test.diff3d.shape[-1]} px; expected the same size"
        )
    # gridsize > 1 with more groups than points needs the reference's oversampling switch (and
    # backends group the test set with the same n_groups); cap instead, so a small ptychodus
    # export trains out of the box.
    training = dict(job.training)
    sizes = [len(train.xcoords)]
    if test is not None and int(job.model.get("gridsize", 1)) > 1:
        sizes.append(len(test.xcoords))
    training["n_groups"] = int(min([training.get("n_groups", 512), *sizes]))
    job = dataclasses.replace(job, training=training)
    cfg = _build_configs(job, n_pixels, train_path, test_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    streamed: list[int] = []

    def on_epoch_end(epoch: int, logs: Any = None) -> None:
        train_loss, val_loss = _logs_losses(logs if logs is not None else {})
        # Backends count epochs from 0 (Keras) or 1; report 1-based.
        number = len(streamed) + 1
        streamed.append(number)
        send(("epoch", number, train_loss, val_loss))

    logger.info(
        "Training PtychoPINN (%s backend, N=%d, %d epochs) on %d patterns.",
        job.backend, n_pixels, cfg.nepochs, len(train.xcoords),
    )
    backend = get_backend(cfg.backend)
    configure_runtime(backend)
    if hasattr(backend, "progress"):
        backend.progress = False  # ptychodus shows progress itself; no tqdm bar on its console
    results = workflows.train_cdi_model(train, test, cfg, on_epoch_end=on_epoch_end, seed=int(job.seed))
    archive = Path(workflows.save_model(results, out_dir, cfg))
    send(("model_saved", str(archive)))


# ----------------------------------------------------------------------------- inference


def _model_dir(model_file: Path, scratch: Path) -> Path:
    """A directory holding ``wts.h5.zip`` for ``load_inference_bundle``.

    Accepts a model directory, a ``wts.h5.zip`` inside one, or a single model file of any
    name (what ptychodus's Save/Load Model and batch mode's ``model.zip`` use).
    """
    model_file = Path(model_file)
    if model_file.is_dir():
        return model_file
    if model_file.name == ARCHIVE_NAME:
        return model_file.parent
    if not zipfile.is_zipfile(model_file):
        raise ValueError(f"model file {str(model_file)!r} is not a zip archive")
    target = scratch / ARCHIVE_NAME
    shutil.copyfile(model_file, target)
    return scratch


def _stitch(backend: Any, patches: np.ndarray, positions: np.ndarray,
            shape: tuple[int, int], crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Stitch on the object grid; returns ``(object (H, W) complex, coverage (H, W) float)``.

    Uses the backend's own on-grid stitcher when it has one (the Backend protocol's optional
    ``reassemble_on_grid_with_weights``: the jax backend's is the one its ``reconstruct`` uses),
    else the numpy stitcher in :mod:`.convert` (same bilinear placement).
    """
    crop = max(2, min(int(crop), patches.shape[-1]))
    crop -= crop % 2  # the reference crop is centred on N/2 and must be even
    helper = getattr(backend, "reassemble_on_grid_with_weights", None)
    if helper is not None:
        obj, weight = helper(patches[..., None], positions, shape, crop)
        return np.asarray(obj).reshape(shape), np.asarray(weight, dtype=np.float64).reshape(shape)
    return stitch_on_grid(patches, positions, shape, crop)


def _refine(backend: Any, backend_name: str, job: ReconstructJob, obj: np.ndarray,
            weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Physics refinement seeded by the stitched network object (the Backend protocol's
    optional ``refine_on_grid``); pixels the network did not cover start from the mean covered
    value. Returns ``(object, footprint, info)``."""
    from backend_api.backends import get_backend

    helper = getattr(backend, "refine_on_grid", None)
    if helper is None and backend_name != "jax":
        # The refinement is physics, not the network: the jax backend's serves any backend's object.
        try:
            helper = getattr(get_backend("jax"), "refine_on_grid", None)
        except Exception:
            helper = None
    if helper is None:
        raise ValueError(
            f"PtychoPINNJax.RefineIterations is {job.refine_iterations}, but the {backend_name!r} backend has no "
            "physics refinement" + ("" if backend_name == "jax" else " and no 'jax' backend with one is installed")
            + "; set RefineIterations to 0")
    start = fill_uncovered(obj, weight)
    positions = np.column_stack([np.asarray(job.xcoords, np.float64), np.asarray(job.ycoords, np.float64)])
    # the low-dose options only when set, so a backend's own refine_on_grid without them still serves
    low_dose = {k: v for k, v in (("tv_weight", float(job.refine_tv_weight)),
                                  ("full_batch_from", int(job.refine_full_batch_from))) if v not in (0.0, -1)}
    refined, footprint, info = helper(job.amplitude, positions, job.probe, start,
                                      iterations=int(job.refine_iterations), noise=job.refine_noise,
                                      refine_probe=job.refine_probe, refine_positions=job.refine_positions,
                                      seed=int(job.seed), **low_dose)
    return np.asarray(refined).reshape(start.shape), np.asarray(footprint, np.float64).reshape(start.shape), info


def run_reconstruct(job: ReconstructJob, send: Send) -> None:
    """Child entry point: load the model, predict every pattern, stitch on the object grid."""
    from backend_api import workflows
    from backend_api.archive import read_manifest
    from backend_api.backends import configure_runtime, get_backend
    from backend_api.container import PtychoDataContainer
    from backend_api.raw_data import RawData

    _apply_registrations(job.backend_registrations)
    n_pat, n_pixels = int(job.amplitude.shape[0]), int(job.amplitude.shape[-1])
    with tempfile.TemporaryDirectory(prefix="ptychopinn-jax-") as scratch:
        model_dir = _model_dir(Path(job.model_file), Path(scratch))
        # The archive says which backend wrote it (load_inference_bundle uses that one too);
        # its process-wide settings go in before it computes anything.
        backend_name = str(read_manifest(model_dir / ARCHIVE_NAME).get("backend", job.backend))
        try:
            backend = get_backend(backend_name)
        except Exception:
            backend = None  # load_inference_bundle below names the problem
        configure_runtime(backend)
        model, params = workflows.load_inference_bundle(model_dir)
        params = dict(params or {})
        model_n = int(params.get("N", n_pixels))
        if model_n != n_pixels:
            raise ValueError(
                f"the loaded model was trained on {model_n}x{model_n} patterns but the "
                f"diffraction data are {n_pixels}x{n_pixels}; crop/bin the data in ptychodus "
                "or train a model for this size"
            )
        # The trained network fixes the group size; the UI value only matters for training.
        gridsize = int(params.get("gridsize", job.gridsize))
        if "intensity_scale" not in params:
            raise ValueError("the model archive has no 'intensity_scale' in its params")
        scale = float(params["intensity_scale"])
        raw = RawData.from_coords_without_pc(
            job.xcoords, job.ycoords, job.amplitude, job.probe,
            np.zeros(n_pat, dtype=np.int64), objectGuess=None,
            diffraction_kind="amplitude",  # the parent converted per its DiffractionKind
        )
        n_channels = gridsize * gridsize
        if n_channels == 1:
            # One group per pattern, in file order (the reference glue asked for
            # NumSamples=1 group, i.e. a single pattern).
            dset = raw.generate_grouped_data(
                n_pixels, K=max(job.n_nearest_neighbors, 1), nsamples=n_pat,
                gridsize=1, sequential_sampling=True, seed=job.seed,
            )
        else:
            n_groups = n_pat * max(job.n_samples, 1)
            k = max(job.n_nearest_neighbors, n_channels)
            dset = raw.generate_grouped_data(
                n_pixels, K=k, nsamples=n_groups, gridsize=gridsize, seed=job.seed,
                enable_oversampling=n_groups > n_pat, neighbor_pool_size=k,
            )
        container = PtychoDataContainer.from_grouped(dset, job.probe)
        # Positions of another object (or in another unit) would stitch to nothing: refuse first.
        check_positions_overlap(np.asarray(container.global_offsets, np.float64).reshape(-1, 2),
                                tuple(job.object_shape), n_pixels, what="scan positions")
        x_in = np.asarray(container.X, dtype=np.float32) * np.float32(scale)
        offsets = np.asarray(container.local_offsets, dtype=np.float32)
        patches = np.asarray(model.predict([x_in, offsets]))
        if patches.ndim == 4:
            patches = patches[..., 0]
        centres = np.asarray(container.global_offsets, dtype=np.float64).reshape(-1, 2)

        if job.stitch_mode == "blend":
            # Each position fills its illuminated footprint (of the part the network
            # reconstructs), so a sparse scan gives no separate squares; see convert.blend_window.
            window = blend_window(job.probe, pad_object=bool(params.get("pad_object", True)))
            obj, weight = blend_on_grid(patches, centres, tuple(job.object_shape), window)
        elif job.stitch_mode == "crop":
            obj, weight = _stitch(backend, patches, centres, tuple(job.object_shape),
                                  job.stitch_crop_size)
        else:
            raise ValueError(f"PtychoPINNJax.StitchMode is {job.stitch_mode!r}; expected 'blend' or 'crop'")
        stitch_info = {"mode": job.stitch_mode, **coverage_report(weight, centres)}
        refined = None
        if job.refine_iterations > 0:
            obj, weight, refined = _refine(backend, backend_name, job, obj, weight)
    info = {
        "backend": backend_name,
        "gridsize": gridsize,
        "n_groups": int(patches.shape[0]),
        "intensity_scale": scale,
        "stitch": stitch_info,
    }
    if refined is not None:
        info["refine"] = refined
    send(("object", obj.astype(np.complex64), weight.astype(np.float32), info))
