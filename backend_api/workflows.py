"""Backend-dispatching workflow entry points with the reference's names and return values.

These mirror ``ptycho.workflows.components`` / ``ptycho.workflows.backend_selector``:

- :func:`run_cdi_example` and :func:`train_cdi_model` fill the legacy ``params.cfg`` from the
  config (CONFIG-001) *before* looking at ``config.backend``, dispatch to that backend and set
  ``results['backend']``;
- :func:`load_inference_bundle` checks the model folder like the reference, reads the
  archive's backend tag, lets that backend load it, and restores ``params.cfg`` from the
  bundle's params snapshot;
- :func:`save_model`, :func:`save_outputs` and :func:`reassemble_cdi_image` complete the set.

No backend is imported here; :mod:`backend_api.backends` finds it by name. matplotlib is
imported only inside :func:`save_outputs`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from backend_api.canvas import STITCH_CROP

from backend_api import archive as _archive
from backend_api import params as _params
from backend_api.backends import get_backend

__all__ = [
    "run_cdi_example",
    "train_cdi_model",
    "load_inference_bundle",
    "save_model",
    "save_outputs",
    "reassemble_cdi_image",
]

logger = logging.getLogger(__name__)


def _bridge(config: Any) -> None:
    """CONFIG-001: fill the live ``params.cfg`` from the config before anything else."""
    from backend_api.config import update_legacy_dict  # config imports nothing heavy

    update_legacy_dict(_params.cfg, config)


def _backend_name(config: Any) -> str:
    name = getattr(config, "backend", None)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"{type(config).__name__}.backend={name!r}: expected a backend name such as "
            "'jax', 'tensorflow' or 'pytorch'"
        )
    return name


def run_cdi_example(
    train_data: Any,
    test_data: Any,
    config: Any,
    flip_x: bool = False,
    flip_y: bool = False,
    transpose: bool = False,
    M: int = STITCH_CROP,
    do_stitching: bool = False,
) -> tuple[Any, Any, dict]:
    """Train on ``train_data`` with ``config.backend`` and, when ``do_stitching`` and test data
    are given, stitch the test reconstruction.

    Returns ``(amplitude (H,W) float | None, phase (H,W) float | None, results)``; ``results``
    holds the reference keys (``history``, ``model_instance``, ...) plus ``'backend'``.
    Nothing is saved (use :func:`save_model`).
    """
    _bridge(config)
    backend = get_backend(_backend_name(config))
    amplitude, phase, results = backend.run_cdi_example(
        train_data,
        test_data,
        config,
        flip_x=flip_x,
        flip_y=flip_y,
        transpose=transpose,
        M=M,
        do_stitching=do_stitching,
    )
    results["backend"] = config.backend
    return amplitude, phase, results


def train_cdi_model(train_data: Any, test_data: Any, config: Any, *, on_epoch_end: Any = None,
                    seed: int | None = None) -> dict:
    """Train only; returns the backend's results dict with ``results['backend']`` set.

    ``on_epoch_end(epoch, logs)`` and ``seed`` go to the backend when given (see
    :class:`backend_api.backends.Backend`); left out, the backend's own defaults apply and the
    call is the reference's three-argument one.
    """
    _bridge(config)
    backend = get_backend(_backend_name(config))
    extra: dict[str, Any] = {}
    if on_epoch_end is not None:
        extra["on_epoch_end"] = on_epoch_end
    if seed is not None:
        extra["seed"] = int(seed)
    results = backend.train_cdi_model(train_data, test_data, config, **extra)
    results["backend"] = config.backend
    return results


def load_inference_bundle(model_dir: str | os.PathLike) -> tuple[Any, dict]:
    """Load the model saved in ``model_dir/wts.h5.zip`` with the backend that wrote it.

    Returns ``(model, cfg)`` where ``model.predict([X * intensity_scale, offsets])`` gives the
    ``(B, N, N, 1)`` complex64 object patches and ``cfg`` is a copy of ``params.cfg`` after it
    was updated with the bundle's params snapshot (N, gridsize, intensity_scale, probe, ...).

    Errors: ValueError when ``model_dir`` does not exist or is not a directory;
    FileNotFoundError naming ``wts.h5.zip`` when the archive is missing; ValueError for an
    unknown backend tag; RuntimeError when the writing backend is not installed.
    """
    model_dir = Path(model_dir)
    archive_path = _archive.bundle_archive_path(model_dir)
    manifest = _archive.read_manifest(archive_path)
    tag = manifest["backend"]
    if tag == "unknown":
        raise ValueError(
            f"{archive_path}: cannot tell which backend wrote this archive (manifest "
            f"version {manifest['version']!r}, no 'backend' tag)"
        )
    try:
        backend = get_backend(tag)
    except RuntimeError as exc:
        if tag != "tensorflow":
            raise
        # say how to get a jax model out of it, but never load it with another backend silently
        raise RuntimeError(
            f"{archive_path} was written by the TensorFlow reference. {exc} Alternatively, "
            "convert it for the jax backend with `pinn-jax convert <in> <out>` and load the "
            "converted bundle."
        ) from exc
    model, bundle_params = backend.load_inference_bundle(model_dir)
    if isinstance(bundle_params, Mapping):
        restored = dict(bundle_params)
        restored.pop("_version", None)
        _params.cfg.update(restored)
    return model, dict(_params.cfg)


def save_model(results_or_model: Any, output_dir: str | os.PathLike, config: Any) -> Path:
    """Save a trained model as ``output_dir/wts.h5.zip`` with ``config.backend``.

    ``results_or_model``: the results dict of :func:`run_cdi_example`/:func:`train_cdi_model`
    (its ``'model_instance'`` is saved) or the model itself. Returns the archive path.
    """
    if isinstance(results_or_model, Mapping) and "model_instance" in results_or_model:
        model = results_or_model["model_instance"]
    else:
        model = results_or_model
    backend = get_backend(_backend_name(config))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return Path(backend.save_model(model, output_dir, config))


def save_outputs(amplitude: Any, phase: Any, results: Any, output_prefix: str | os.PathLike) -> None:
    """Create ``output_prefix`` and, when both arrays are given, write
    ``reconstructed_amplitude.png`` (gray, with colour bar) and ``reconstructed_phase.png``
    (viridis), 8x8 inch figures. ``results`` is ignored, as in the reference.

    amplitude, phase: arrays that squeeze to 2-D (H, W).
    """
    out = Path(output_prefix)
    out.mkdir(parents=True, exist_ok=True)
    if amplitude is None or phase is None:
        return
    amp = np.squeeze(np.asarray(amplitude))
    ph = np.squeeze(np.asarray(phase))
    for label, arr in (("amplitude", amp), ("phase", ph)):
        if arr.ndim != 2:
            raise ValueError(
                f"save_outputs: {label} has shape {np.shape(arr)} after squeeze; expected 2-D (H, W)"
            )
    from backend_api.outputs import save_amplitude_phase

    save_amplitude_phase(amp, ph, out, title="Reconstructed {Label}")


def reassemble_cdi_image(
    test_data: Any,
    config: Any,
    flip_x: bool = False,
    flip_y: bool = False,
    transpose: bool = False,
    M: int = STITCH_CROP,
    coord_scale: float = 1.0,
    *,
    model: Any = None,
) -> tuple[Any, Any, dict]:
    """Predict every group of ``test_data`` with ``model`` and stitch the full object.

    The reference uses its module-level trained model; here the model is explicit:
    ``model=results['model_instance']`` or the model from :func:`load_inference_bundle`.
    Returns ``(recon_amp (H,W), recon_phase (H,W), results)`` with results keys
    ``obj_tensor_full``, ``global_offsets``, ``recon_amp``, ``recon_phase``.
    """
    if model is None:
        raise ValueError(
            "reassemble_cdi_image: model=None; pass model=results['model_instance'] or the model "
            "returned by load_inference_bundle"
        )
    _bridge(config)
    backend = get_backend(_backend_name(config))
    extra: dict[str, Any] = {}
    # only non-default options are forwarded, so a backend without them still works
    if flip_x:
        extra["flip_x"] = True
    if flip_y:
        extra["flip_y"] = True
    if transpose:
        extra["transpose"] = True
    if coord_scale != 1.0:
        extra["coord_scale"] = coord_scale
    amp, phase, results = backend.reconstruct(model, test_data, config=config, M=M, **extra)
    results = dict(results)
    results.setdefault("recon_amp", amp)
    results.setdefault("recon_phase", phase)
    return amp, phase, results
