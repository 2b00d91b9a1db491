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

from backend_api.canvas import STITCH_CROP, fill_uncovered
from backend_api.grouping import GroupingOptions, default_n_groups

__all__ = ["GroupingOptions", "group_for_inference", "reconstruct", "evaluate", "write_reconstruction",
           "train", "grouping_from_config", "write_test_stitch", "refine", "refine_start", "network_start",
           "object_grid", "write_refinement", "score_on_grid",
           "refinement_history", "pass_summary"]


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


def reconstruct_streaming(model: Any, raw: Any, *, M: int = STITCH_CROP, chunk: int | None = None,
                          object_shape: Sequence[int] | None = None, batch_size: int = 64,
                          on_chunk: Any = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`reconstruct` of a gridsize-1 model on the object grid, in bounded memory
    (:func:`pinn_jax.streaming.reconstruct_on_grid_streaming`): ``raw.diff3d`` (best
    memory-mapped, ``RawData.from_file(..., mmap=True)``) is read ``chunk`` patterns at a time,
    every position once, in file order, and no patch array is kept.

    ``object_shape``: the grid (default :func:`object_grid`). Returns ``(amplitude (H, W),
    phase (H, W), results)`` with ``object_on_grid``, ``object_weights``, ``amplitude_on_grid``,
    ``phase_on_grid``, ``global_offsets`` ``(n, 1, 2, 1)`` (the positions) and
    ``stitched_obj`` (the grid object: there is no separate canvas), so
    :func:`write_reconstruction` and :func:`evaluate` take it as they take :func:`reconstruct`'s.
    """
    from pinn_jax.streaming import DEFAULT_CHUNK, reconstruct_on_grid_streaming

    shape = object_grid(raw) if object_shape is None else tuple(int(v) for v in object_shape)
    pos = np.column_stack([np.asarray(raw.xcoords, np.float64), np.asarray(raw.ycoords, np.float64)])
    obj, weights = reconstruct_on_grid_streaming(model, raw.diff3d, pos, shape, M=M,
                                                 chunk=DEFAULT_CHUNK if chunk is None else int(chunk),
                                                 batch_size=batch_size, on_chunk=on_chunk)
    amp, phase = np.abs(obj).astype(np.float32), np.angle(obj).astype(np.float32)
    results = {"object_on_grid": obj, "object_weights": weights, "amplitude_on_grid": amp, "phase_on_grid": phase,
               "global_offsets": pos.reshape(-1, 1, 2, 1), "stitched_obj": obj}
    return amp, phase, results


def score_on_grid(obj: Any, ground_truth: Any, positions: Any, *, M: int = STITCH_CROP) -> dict:
    """Score an ``(H, W)`` complex object against the ground truth on the same grid inside the
    region the scan ``positions`` ``(n, 2)`` cover (:func:`pinn_jax.metrics.eval_reconstruction`,
    corrected protocol); returns the JSON-ready summary (:func:`pinn_jax.report.metrics_summary`)."""
    from pinn_jax import metrics, report

    return report.metrics_summary(metrics.eval_reconstruction(obj, ground_truth, positions=positions, M=M))


def evaluate(results: dict, ground_truth: Any, *, M: int = STITCH_CROP) -> dict:
    """:func:`score_on_grid` of ``results['object_on_grid']`` at the groups' positions."""
    return score_on_grid(results["object_on_grid"], ground_truth, results["global_offsets"][:, 0, :, 0], M=M)


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
          on_epoch_end: Any = None, shard_data: bool | None = None) -> tuple[dict, Path | None]:
    """Train a PtychoPINN with ``config`` (a validated TrainingConfig, ``backend='jax'``).

    Fills the legacy ``params.cfg`` from the config first (CONFIG-001, as
    ``backend_api.workflows`` does), trains with :class:`~pinn_jax.backend.JaxBackend`
    (``checkpoint_dir``/``resume``: run checkpoints; ``history_path``: ``history.json``
    written each epoch; ``shard_data``: see :class:`~pinn_jax.backend.JaxBackend`), and, with
    ``save_to``, writes ``save_to/wts.h5.zip``. Returns
    ``(results, archive path or None)``; ``results`` as ``JaxBackend.train_cdi_model``.
    Raises ``pinn_jax.train.TrainingDivergedError`` on a non-finite loss and lets
    ``KeyboardInterrupt`` through (checkpoints stay).
    """
    from backend_api import params as legacy
    from backend_api.config import update_legacy_dict
    from pinn_jax.backend import JaxBackend

    update_legacy_dict(legacy.cfg, config)
    backend = JaxBackend(seed=seed, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                         shard_data=shard_data)
    results = backend.train_cdi_model(train_data, test_data, config, history_path=history_path,
                                      on_epoch_end=on_epoch_end)
    archive = None
    if save_to is not None:
        Path(save_to).mkdir(parents=True, exist_ok=True)
        archive = backend.save_model(results["model_instance"], save_to, config)
    return results, archive


def object_grid(raw: Any) -> tuple[int, int]:
    """The object grid ``(H, W)`` refinement works on: ``raw.objectGuess``'s shape, else the
    smallest grid from the origin holding every patch (patch centres ``xcoords``/``ycoords`` in
    object pixels, patches ``N`` wide). Positions whose patch would reach below pixel 0 have no
    such grid and are refused, naming the first."""
    if raw.objectGuess is not None:
        return tuple(int(v) for v in np.shape(raw.objectGuess)[:2])
    N = int(np.shape(raw.diff3d)[-1])
    pos = np.column_stack([np.asarray(raw.xcoords, np.float64), np.asarray(raw.ycoords, np.float64)])
    if len(pos) == 0 or not np.isfinite(pos).all():
        raise ValueError("positions: expected finite xcoords/ycoords for at least one pattern")
    lo = np.floor(pos - N / 2)
    low = (lo < 0).any(axis=1)
    if low.any():
        i = int(np.flatnonzero(low)[0])
        raise ValueError(
            f"positions: the data have no objectGuess to fix the object grid, and {int(low.sum())} of {len(pos)} "
            f"patches reach below pixel 0 (first: #{i} at x={pos[i, 0]:.6g}, y={pos[i, 1]:.6g}; with {N}x{N} "
            f"patches, centres must be >= {N / 2:g}); shift the positions or add an objectGuess")
    top = lo.max(axis=0) + N
    return int(top[1]), int(top[0])


def network_start(results: dict) -> np.ndarray:
    """The network's object on the grid from :func:`reconstruct` results (``object_on_grid``,
    ``object_weights``) as a refinement start ``(H, W)`` complex64: pixels no patch covers
    take the mean covered value."""
    return fill_uncovered(results["object_on_grid"], results["object_weights"])


def refine_start(raw: Any, shape: tuple[int, int], *, model: Any = None, initial: Any = None,
                 grouping: GroupingOptions | None = None, seed: int | None = 0,
                 nphotons: float = 1e9) -> np.ndarray:
    """The refinement's initial object ``(H, W)`` complex64 on the grid ``shape``: ``initial``
    when given (its shape must be ``shape``), else the network's object stitched on the grid
    (:func:`reconstruct`, :func:`network_start`), else flat ones."""
    if initial is not None and model is not None:
        raise ValueError("refine: give a model or an initial object to start from, not both")
    if initial is not None:
        start = np.asarray(initial)
        if start.shape != shape:
            raise ValueError(f"refine: the initial object has shape {start.shape}, expected {shape} (the object grid)")
        if not np.isfinite(start).all():
            raise ValueError("refine: the initial object has non-finite values")
        return start.astype(np.complex64)
    if model is None:
        return np.ones(shape, np.complex64)
    _, _, res = reconstruct(model, raw, grouping=grouping, object_shape=shape, seed=seed, nphotons=nphotons)
    return network_start(res)


def refine(raw: Any, *, model: Any = None, initial: Any = None, options: Any = None,
           grouping: GroupingOptions | None = None, seed: int | None = 0, nphotons: float = 1e9,
           object_shape: Sequence[int] | None = None, on_pass_end: Any = None, track_metrics: bool = True,
           progress: bool = False) -> tuple[np.ndarray, Any]:
    """Physics refinement of the object on the input grid (:func:`pinn_jax.refine.refine_object`).

    ``raw``: RawData (diffraction amplitudes, ``xcoords``/``ycoords`` patch centres, probe);
    the grid is ``object_shape``, else :func:`object_grid`'s. Start
    (:func:`refine_start`): ``initial``, else with ``model`` the network's object, else flat.
    ``options``: :class:`~pinn_jax.refine.RefineOptions`. With ``track_metrics`` and a ground
    truth in ``raw.objectGuess``, ``result.pass_metrics`` holds the corrected-protocol summary
    (:func:`evaluate`'s) of the start and after every pass, each with its ``"pass"`` (0 = the
    start) and ``"seconds"``. Returns ``(object (H, W) complex64, RefineResult)``.
    """
    from pinn_jax import report
    from pinn_jax.refine import RefineOptions, refine_object

    if object_shape is None:
        object_shape = object_grid(raw)
    shape = (int(object_shape[0]), int(object_shape[1]))
    options = options or RefineOptions()
    start = refine_start(raw, shape, model=model, initial=initial, grouping=grouping, seed=seed, nphotons=nphotons)
    positions = np.column_stack([np.asarray(raw.xcoords), np.asarray(raw.ycoords)])
    truth = raw.objectGuess if (track_metrics and raw.objectGuess is not None and np.shape(raw.objectGuess) == shape
                                and report.has_signal(raw.objectGuess)) else None
    tracked: list[dict] = []

    def score(obj) -> dict:
        return score_on_grid(obj, truth, positions)

    def after_pass(it, loss, obj):
        if truth is not None:
            tracked.append({"pass": it + 1, **score(obj)})
        if on_pass_end is not None:
            on_pass_end(it, loss, obj)

    if truth is not None:
        tracked.append({"pass": 0, **score(start)})
    result = refine_object(raw.diff3d, positions, raw.probeGuess, start, options, on_pass_end=after_pass,
                           progress=progress)
    for entry in tracked:
        entry["seconds"] = result.seconds[entry["pass"]]
    result.pass_metrics = tracked
    return result.obj, result


def refinement_history(result: Any) -> dict:
    """The JSON history of a :class:`~pinn_jax.refine.RefineResult`: ``loss`` and ``seconds``
    per pass and, when tracked, ``metrics`` per pass."""
    hist = {"loss": [float(v) for v in result.history], "seconds": [float(v) for v in result.seconds]}
    if result.pass_metrics:
        hist["metrics"] = result.pass_metrics
    return hist


def pass_summary(entry: dict) -> dict:
    """One ``pass_metrics`` entry as a metrics summary (without its ``pass`` and ``seconds``)."""
    return {k: v for k, v in entry.items() if k not in ("pass", "seconds")}


def write_refinement(out_dir: str | os.PathLike, result: Any, *, network: dict | None = None,
                     phase_vmin: float | None = None, phase_vmax: float | None = None) -> list[Path]:
    """The refinement's files in ``out_dir`` (created): ``reconstructed_amplitude.png``,
    ``reconstructed_phase.png`` (the refined object), ``reconstruction.npz`` (``object_on_grid``
    (H, W) complex64, ``probe`` (N, N) complex64 and ``positions`` (n, 2) ``[x, y]`` as refined
    or given, and with ``network`` (:func:`reconstruct` results on the same grid) also
    ``network_object_on_grid``/``network_object_weights``), ``history.json`` (``loss`` and
    ``seconds`` per pass, and ``metrics`` per pass when tracked), ``convergence.png`` and, when
    ``result.pass_metrics`` is filled, ``metrics.json`` (the final pass's summary, with the
    start's under ``"start"``). With ``network``, also ``network_amplitude.png`` /
    ``network_phase.png``. Returns the paths."""
    from pinn_jax import report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    obj = np.asarray(result.obj, np.complex64)
    written = list(report.save_amplitude_phase(np.abs(obj), np.angle(obj), out, phase_vmin=phase_vmin,
                                               phase_vmax=phase_vmax, title="Refined {label}"))
    arrays = {"object_on_grid": obj, "probe": np.asarray(result.probe, np.complex64),
              "positions": np.asarray(result.positions, np.float64)}
    if network is not None:
        net = np.asarray(network["object_on_grid"], np.complex64)
        arrays["network_object_on_grid"] = net
        arrays["network_object_weights"] = np.asarray(network["object_weights"], np.float32)
        written += report.save_amplitude_phase(np.abs(net), np.angle(net), out, phase_vmin=phase_vmin,
                                               phase_vmax=phase_vmax, title="Network {label}", stem="network")
    written.append(report.write_npz(out / "reconstruction.npz", **arrays))
    written.append(report.write_json(refinement_history(result), out / "history.json"))
    written.append(report.save_convergence(result.history, out / "convergence.png",
                                           pass_metrics=result.pass_metrics or None))
    if result.pass_metrics:
        final = pass_summary(result.pass_metrics[-1])
        final["start"] = pass_summary(result.pass_metrics[0])
        final["passes"] = int(result.pass_metrics[-1]["pass"])
        written.append(report.write_json(final, out / "metrics.json"))
    return written
