"""The end-to-end run, in one place: train, reconstruct, evaluate, write the outputs.

The ``pinn-jax`` commands (:mod:`pinn_jax.cli`), the demo (:func:`pinn_jax.demo.run_demo`),
:class:`pinn_jax.backend.JaxBackend` (and through it ``backend_api.workflows`` and the
ptychodus child, which stitches with the same on-grid stitcher) and the benchmarks call these
functions; none of them wires the steps itself. Options are typed: a
``backend_api.config.TrainingConfig`` for training and a
:class:`backend_api.grouping.GroupingOptions` for how positions are grouped at inference.

The grouping rule, stated once: without ``n_groups`` every position is used about once
(:func:`backend_api.grouping.default_n_groups`: all positions at gridsize 1, ``n // C``
groups otherwise); a given ``n_groups`` is used as it is (callers that must not exceed the
default, such as ``pinn-jax infer --n_groups``, resolve it first with
:meth:`GroupingOptions.resolve_n_groups`). The stitch crop is
:data:`backend_api.canvas.STITCH_CROP` unless a caller asks for another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backend_api.canvas import STITCH_CROP
from backend_api.grouping import GroupingOptions, default_n_groups

__all__ = ["GroupingOptions", "group_for_inference", "reconstruct", "evaluate", "write_reconstruction",
           "train", "grouping_from_config", "write_test_stitch", "refine"]


def grouping_from_config(config: Any) -> GroupingOptions:
    """The inference grouping a Training/InferenceConfig asks for (its ``n_groups``,
    ``neighbor_count``, ``enable_oversampling``, ``neighbor_pool_size``); ``None`` -> defaults."""
    if config is None:
        return GroupingOptions()
    return GroupingOptions(
        n_groups=getattr(config, "n_groups", None) or None,
        neighbor_count=int(getattr(config, "neighbor_count", 4)),
        enable_oversampling=bool(getattr(config, "enable_oversampling", False)),
        neighbor_pool_size=getattr(config, "neighbor_pool_size", None),
    )


def group_for_inference(net: Any, raw: Any, grouping: GroupingOptions, *, seed: int | None,
                        nphotons: float = 1e9):
    """Group ``raw`` (RawData) with the model's ``N``/gridsize (the bundle wins, as in the
    reference) into a ``PtychoDataContainer``; ``grouping.seed`` overrides ``seed``."""
    from backend_api.container import PtychoDataContainer

    N, gs = int(net.spec.N), int(net.spec.gridsize)
    diff = np.asarray(raw.diff3d)
    if diff.ndim != 3 or diff.shape[1:] != (N, N):
        raise ValueError(f"raw data diff3d has shape {diff.shape}, but the model expects (n, {N}, {N}) patterns")
    nsamples = int(grouping.n_groups) if grouping.n_groups else default_n_groups(diff.shape[0], gs)
    dset = raw.generate_grouped_data(
        N, K=int(grouping.neighbor_count), nsamples=nsamples,
        seed=seed if grouping.seed is None else grouping.seed, gridsize=gs,
        enable_oversampling=bool(grouping.enable_oversampling), neighbor_pool_size=grouping.neighbor_pool_size,
    )
    return PtychoDataContainer.from_grouped(dset, raw.probeGuess, nphotons=float(nphotons))


def reconstruct(
    model: Any,
    data: Any,
    *,
    grouping: GroupingOptions | None = None,
    M: int = STITCH_CROP,
    object_shape: Sequence[int] | None = None,
    seed: int | None = 0,
    nphotons: float = 1e9,
    flip_x: bool = False,
    flip_y: bool = False,
    transpose: bool = False,
    coord_scale: float = 1.0,
    batch_size: int = 64,
    max_canvas_pixels: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The one reconstruction: group (RawData) or take a container, predict every group,
    stitch.

    ``model``: an :class:`~pinn_jax.inference.InferenceModel`, a ``PtychoPINN`` or a results
    dict holding ``model_instance``; ``data``: RawData (grouped per ``grouping``, see the module
    docstring) or a PtychoDataContainer. Returns ``(amplitude (S, S) float32, phase (S, S)
    float32, results)`` as :func:`pinn_jax.inference.reconstruct`, plus ``results['container']``
    and, with ``object_shape=(H, W)``, ``object_on_grid`` ``(H, W)`` complex64 (patch centres
    at the groups' scan positions in object pixels), ``object_weights``,
    ``amplitude_on_grid`` and ``phase_on_grid``. Huge canvases and positions off the object
    grid are refused before the network runs (``max_canvas_pixels``).
    """
    from pinn_jax import inference
    from pinn_jax.backend import _unwrap

    net = _unwrap(model)
    im = model if isinstance(model, inference.InferenceModel) else inference.InferenceModel(net)
    if hasattr(data, "X") and hasattr(data, "global_offsets"):
        container = data
    elif hasattr(data, "diff3d"):
        container = group_for_inference(net, data, grouping or GroupingOptions(), seed=seed, nphotons=nphotons)
    else:
        raise TypeError(f"data: expected RawData or PtychoDataContainer, got {type(data).__name__}")
    amp, phase, results = inference.reconstruct(
        im, container, M=M, flip_x=flip_x, flip_y=flip_y, transpose=transpose, coord_scale=coord_scale,
        object_shape=object_shape, batch_size=batch_size, max_canvas_pixels=max_canvas_pixels,
    )
    results["container"] = container
    if object_shape is not None:
        results["amplitude_on_grid"] = np.abs(results["object_on_grid"]).astype(np.float32)
        results["phase_on_grid"] = np.angle(results["object_on_grid"]).astype(np.float32)
    return amp, phase, results


def evaluate(results: dict, ground_truth: Any, *, M: int = STITCH_CROP) -> dict:
    """Score ``results['object_on_grid']`` against the ``(H, W)`` complex ground truth on its
    grid (:func:`pinn_jax.metrics.eval_reconstruction`, corrected protocol); returns the
    JSON-ready summary (:func:`pinn_jax.report.metrics_summary`)."""
    from pinn_jax import metrics, report

    m = metrics.eval_reconstruction(results["object_on_grid"], ground_truth,
                                    positions=results["global_offsets"][:, 0, :, 0], M=M)
    return report.metrics_summary(m)


def write_reconstruction(out_dir: str | os.PathLike, amplitude: Any, phase: Any, results: dict, *,
                         phase_vmin: float | None = None, phase_vmax: float | None = None) -> list[Path]:
    """``reconstructed_amplitude.png``, ``reconstructed_phase.png`` and ``reconstruction.npz``
    (``object``, ``amplitude``, ``phase``, ``global_offsets`` and, when stitched on a grid,
    ``object_on_grid``/``object_weights``) in ``out_dir`` (created). Returns the paths."""
    from pinn_jax import report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = report.save_amplitude_phase(amplitude, phase, out, phase_vmin=phase_vmin, phase_vmax=phase_vmax)
    arrays = {"object": results["stitched_obj"].astype(np.complex64), "amplitude": amplitude, "phase": phase,
              "global_offsets": results["global_offsets"]}
    if "object_on_grid" in results:
        arrays["object_on_grid"] = results["object_on_grid"].astype(np.complex64)
        arrays["object_weights"] = results["object_weights"].astype(np.float32)
    return [*pngs, report.write_npz(out / "reconstruction.npz", **arrays)]


def write_test_stitch(results: dict, out_dir: str | os.PathLike, *, M: int = STITCH_CROP,
                      max_canvas_pixels: int | None = None) -> tuple[Path, Path]:
    """After training with test data: stitch the test set's predicted patches
    (``results['reconstructed_obj']`` at ``results['test_container'].global_offsets``, the
    reference's ``reassemble_position``) and write the amplitude/phase PNGs to ``out_dir``."""
    from pinn_jax import inference, report

    amp, phase, _ = inference.stitch(results["reconstructed_obj"], results["test_container"].global_offsets,
                                     M=M, max_canvas_pixels=max_canvas_pixels)
    return report.save_amplitude_phase(amp, phase, out_dir)


def train(train_data: Any, test_data: Any, config: Any, *, seed: int = 0,
          checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
          history_path: str | os.PathLike | None = None, save_to: str | os.PathLike | None = None,
          on_epoch_end: Any = None) -> tuple[dict, Path | None]:
    """Train a PtychoPINN with ``config`` (a validated TrainingConfig, ``backend='jax'``).

    Fills the legacy ``params.cfg`` from the config first (CONFIG-001, as
    ``backend_api.workflows`` does), trains with :class:`~pinn_jax.backend.JaxBackend`
    (``checkpoint_dir``/``resume``: run checkpoints; ``history_path``: ``history.json``
    written each epoch), and, with ``save_to``, writes ``save_to/wts.h5.zip``. Returns
    ``(results, archive path or None)``; ``results`` as ``JaxBackend.train_cdi_model``.
    Raises ``pinn_jax.train.TrainingDivergedError`` on a non-finite loss and lets
    ``KeyboardInterrupt`` through (checkpoints stay).
    """
    from backend_api import params as legacy
    from backend_api.config import update_legacy_dict
    from pinn_jax.backend import JaxBackend

    update_legacy_dict(legacy.cfg, config)
    backend = JaxBackend(seed=seed, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    results = backend.train_cdi_model(train_data, test_data, config, history_path=history_path,
                                      on_epoch_end=on_epoch_end)
    archive = None
    if save_to is not None:
        Path(save_to).mkdir(parents=True, exist_ok=True)
        archive = backend.save_model(results["model_instance"], save_to, config)
    return results, archive


def refine(raw: Any, *, model: Any = None, options: Any = None, grouping: GroupingOptions | None = None,
           seed: int | None = 0, nphotons: float = 1e9, object_shape: Sequence[int] | None = None,
           on_pass_end: Any = None) -> tuple[np.ndarray, Any]:
    """Physics refinement of the object on the input grid (:func:`pinn_jax.refine.refine_object`).

    ``raw``: RawData (diffraction amplitudes, ``xcoords``/``ycoords`` patch centres, probe);
    the grid is ``object_shape``, else ``raw.objectGuess``'s shape. Start: with ``model``, the
    network's object stitched on the grid (:func:`reconstruct`; pixels no patch covers take
    the mean covered value), else a flat object. ``options``: :class:`~pinn_jax.refine.
    RefineOptions`. Returns ``(object (H, W) complex64, RefineResult)``.
    """
    from pinn_jax.refine import RefineOptions, refine_object

    if object_shape is None:
        if raw.objectGuess is None:
            raise ValueError("refine: the object grid is unknown: the data have no objectGuess; pass object_shape")
        object_shape = np.shape(raw.objectGuess)
    shape = (int(object_shape[0]), int(object_shape[1]))
    if model is not None:
        _, _, res = reconstruct(model, raw, grouping=grouping, object_shape=shape, seed=seed, nphotons=nphotons)
        covered = np.asarray(res["object_weights"]) > 1e-3
        start = np.asarray(res["object_on_grid"], np.complex64)
        fill = start[covered].mean() if covered.any() else np.complex64(1.0)
        start = np.where(covered, start, fill).astype(np.complex64)
    else:
        start = np.ones(shape, np.complex64)
    positions = np.column_stack([np.asarray(raw.xcoords), np.asarray(raw.ycoords)])
    result = refine_object(raw.diff3d, positions, raw.probeGuess, start, options or RefineOptions(),
                           on_pass_end=on_pass_end)
    return result.obj, result
