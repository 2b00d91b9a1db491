"""Inference: batched ``diffraction_to_obj``, stitching, and the reference-like model object.

* :class:`InferenceModel` wraps a trained :class:`~pinn_jax.model.PtychoPINN` with the Keras
  call ptychodus makes: ``model.predict([X * intensity_scale, local_offsets])`` ->
  ``(B, N, N, 1)`` complex64 numpy. Batches have a fixed size (the last one is padded), so
  one compiled function serves every dataset size.
* :func:`reconstruct` predicts every group of a data container and stitches the patches with
  ``reassemble_position`` (the reference workflow), optionally also onto a given object grid.
* :func:`load_inference_bundle` reads ``<dir>/wts.h5.zip`` and restores ``params.cfg``.
"""

from __future__ import annotations

import functools

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from backend_api.canvas import STITCH_CROP

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "InferenceModel",
    "predict_autoencoder",
    "reconstruct",
    "stitch",
    "check_stitch_inputs",
    "load_inference_bundle",
]

DEFAULT_BATCH_SIZE = 64


@functools.lru_cache(maxsize=16)
def _jitted(kind: str, graphdef):
    """One jitted apply function per (kind, graph): models of equal architecture share their
    compiled code (a GraphDef is hashable by structure). At most 16 are kept, least recently
    used first out (a long-lived process that loads many architectures stays bounded)."""
    import jax

    from pinn_jax.model import autoencoder_apply, diffraction_to_obj_apply

    apply = diffraction_to_obj_apply if kind == "d2o" else autoencoder_apply
    return jax.jit(lambda state, x, o: apply(graphdef, state, x, o))


def _padded_batches(fn, state, x: np.ndarray, offsets: np.ndarray, batch_size: int):
    """Run ``fn(state, xb, ob)`` over batches of ``batch_size`` rows; the last batch is
    zero-padded so every call has the same shape (one compilation). Everything is dispatched
    before anything is fetched. Yields ``(start, m, outputs)`` with ``m`` valid rows."""
    pending = []
    for start in range(0, x.shape[0], batch_size):
        xb, ob = x[start : start + batch_size], offsets[start : start + batch_size]
        m = xb.shape[0]
        if m < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - m,) + xb.shape[1:], xb.dtype)])
            ob = np.concatenate([ob, np.zeros((batch_size - m,) + ob.shape[1:], ob.dtype)])
        pending.append((start, m, fn(state, xb, ob)))
    yield from pending


class InferenceModel:
    """The inference model (``diffraction_to_obj``) with a Keras-like ``predict``.

    Attributes: ``model`` (the PtychoPINN), ``params`` (the params snapshot it was loaded
    with, or {}), ``N``, ``gridsize``, ``intensity_scale`` (float, ``exp(log_s)``).
    """

    def __init__(self, model, params: Mapping[str, Any] | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE):
        from flax import nnx

        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.model = model
        self.params = dict(params or {})
        self.batch_size = int(batch_size)
        self._graphdef, self._state = nnx.split(model)
        self._fn = _jitted("d2o", self._graphdef)

    @property
    def N(self) -> int:
        return int(self.model.spec.N)

    @property
    def gridsize(self) -> int:
        return int(self.model.spec.gridsize)

    @property
    def intensity_scale(self) -> float:
        return float(np.asarray(self.model.intensity_scale))

    def _check(self, x: np.ndarray, offsets: np.ndarray) -> None:
        N, C = self.N, self.gridsize**2
        if x.ndim != 4 or x.shape[1:] != (N, N, C):
            raise ValueError(
                f"predict: input 0 (X * intensity_scale) has shape {x.shape}, expected (B, {N}, {N}, {C})"
            )
        if offsets.shape != (x.shape[0], 1, 2, C):
            raise ValueError(
                f"predict: input 1 (local offsets) has shape {offsets.shape}, expected ({x.shape[0]}, 1, 2, {C})"
            )

    def predict(self, inputs: Sequence[Any], batch_size: int | None = None, verbose: Any = 0, **_: Any) -> np.ndarray:
        """``inputs = [X * intensity_scale (B,N,N,C) float32, offsets (B,1,2,C)]`` ->
        ``(B, N, N, 1)`` complex64 numpy (the object in normalised units, group-centred)."""
        del verbose
        if isinstance(inputs, Mapping):
            inputs = [inputs["input"], inputs["input_positions"]]
        if len(inputs) != 2:
            raise ValueError(f"predict: expected [X * intensity_scale, offsets], got {len(inputs)} inputs")
        x = np.asarray(inputs[0], np.float32)
        offsets = np.asarray(inputs[1], np.float32)
        self._check(x, offsets)
        bs = self.batch_size if batch_size is None else int(batch_size)
        out = np.empty((x.shape[0], self.N, self.N, 1), np.complex64)
        for start, m, res in _padded_batches(self._fn, self._state, x, offsets, bs):
            out[start : start + m] = np.asarray(res)[:m]
        return out

    __call__ = predict

    def predict_on_batch(self, inputs: Sequence[Any]) -> np.ndarray:
        return self.predict(inputs, batch_size=max(1, len(np.asarray(inputs[0]))))


def predict_autoencoder(model, X_scaled: Any, offsets: Any, *, batch_size: int = DEFAULT_BATCH_SIZE):
    """Batched ``autoencoder``: ``(obj (B,N,N,1) c64, amp_scaled (B,N,N,C) f32, intensity
    (B,N,N,C) f32)`` as numpy (the reference's three training outputs)."""
    from flax import nnx

    model = model.model if isinstance(model, InferenceModel) else model
    graphdef, state = nnx.split(model)
    fn = _jitted("ae", graphdef)
    x = np.asarray(X_scaled, np.float32)
    o = np.asarray(offsets, np.float32)
    outs: list[list[np.ndarray]] = [[], [], []]
    for _, m, res in _padded_batches(fn, state, x, o, int(batch_size)):
        for acc, arr in zip(outs, res):
            acc.append(np.asarray(arr)[:m])
    return tuple(np.concatenate(a) for a in outs)


def _stitch_offsets(global_offsets: Any, flip_x: bool, flip_y: bool, coord_scale: float) -> np.ndarray:
    """The ``(n, 1, 2, C)`` float64 offsets the stitcher uses: sign flips, then scaling."""
    offsets = np.array(global_offsets, dtype=np.float64, copy=True)
    if flip_x:
        offsets[:, 0, 0, :] *= -1
    if flip_y:
        offsets[:, 0, 1, :] *= -1
    offsets *= float(coord_scale)
    return offsets


def _grid_positions(offsets: np.ndarray, positions: Any) -> np.ndarray:
    """``(n, 2)`` [x, y] patch-centre positions on the object grid."""
    return offsets[:, 0, :, 0] if positions is None else np.asarray(positions, np.float64).reshape(-1, 2)


def check_stitch_inputs(
    global_offsets: Any,
    *,
    M: int,
    patch_size: int,
    object_shape: Sequence[int] | None = None,
    positions: Any = None,
    max_canvas_pixels: int | None = None,
) -> None:
    """Refuse a stitch that cannot work, before anything is predicted or allocated.

    ``global_offsets``: ``(n, 1, 2, C)`` offsets as :func:`stitch` uses them (after flips and
    scaling). Raises ``backend_api.canvas.CanvasTooLargeError`` when the
    ``reassemble_position`` canvas (or ``object_shape``) exceeds ``max_canvas_pixels``, and
    ``backend_api.canvas.PositionsOutsideObjectError`` when, with ``object_shape``, a patch of
    side ``patch_size`` centred at a position cannot overlap the object grid at all (the
    positions would belong to another object or be in another unit). Both are ValueErrors.
    """
    from backend_api.canvas import check_positions_overlap
    from pinn_jax import geometry

    geometry.check_position_canvas(global_offsets, int(M), max_canvas_pixels=max_canvas_pixels)
    if object_shape is not None:
        geometry.check_stitch_canvas(tuple(object_shape), int(M), max_canvas_pixels=max_canvas_pixels,
                                     what="the object grid")
        pos = _grid_positions(np.asarray(global_offsets, np.float64), positions)
        check_positions_overlap(pos, tuple(object_shape), patch_size, what="stitch positions")


def stitch(
    patches: np.ndarray,
    global_offsets: Any,
    *,
    M: int = STITCH_CROP,
    flip_x: bool = False,
    flip_y: bool = False,
    transpose: bool = False,
    coord_scale: float = 1.0,
    object_shape: Sequence[int] | None = None,
    positions: Any = None,
    max_canvas_pixels: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Stitch predicted ``(n,N,N,1)`` patches like the reference ``reassemble_cdi_image`` (see
    :func:`reconstruct`); returns ``(amplitude, phase, results)``. Canvases above
    ``max_canvas_pixels`` and, with ``object_shape``, positions off the object grid are
    refused first (:func:`check_stitch_inputs`)."""
    from pinn_jax import geometry

    patches = np.asarray(patches)
    if transpose:
        patches = np.transpose(patches, (0, 2, 1, 3))
    offsets = _stitch_offsets(global_offsets, flip_x, flip_y, coord_scale)
    check_stitch_inputs(offsets, M=M, patch_size=patches.shape[1], object_shape=object_shape,
                        positions=positions, max_canvas_pixels=max_canvas_pixels)
    stitched = np.asarray(geometry.reassemble_position(patches, offsets, M=M, max_canvas_pixels=max_canvas_pixels))
    img = np.squeeze(stitched, axis=-1) if stitched.ndim == 3 else stitched
    amp = np.abs(img).astype(np.float32)
    phase = np.angle(img).astype(np.float32)
    results: dict[str, Any] = {
        "obj_tensor_full": patches,
        "global_offsets": offsets,
        "recon_amp": amp,
        "recon_phase": phase,
        "stitched_obj": img,
    }
    if object_shape is not None:
        pos = _grid_positions(offsets, positions)
        obj, weights = geometry.reassemble_on_grid_with_weights(patches, pos, tuple(object_shape), M,
                                                                max_canvas_pixels=max_canvas_pixels)
        results["object_on_grid"] = np.asarray(obj)
        results["object_weights"] = np.asarray(weights)
    return amp, phase, results


def reconstruct(
    model,
    container,
    *,
    intensity_scale: float | None = None,
    M: int = STITCH_CROP,
    flip_x: bool = False,
    flip_y: bool = False,
    transpose: bool = False,
    coord_scale: float = 1.0,
    object_shape: Sequence[int] | None = None,
    positions: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_canvas_pixels: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Predict every group of ``container`` and stitch the full object.

    Follows the reference ``reassemble_cdi_image``: ``diffraction_to_obj([X * s,
    local_offsets])`` (``s``: ``intensity_scale``, default the model's ``exp(log_s)``), optional
    transpose of the patch axes and sign flips / scaling of the global offsets, then
    ``reassemble_position(patches, global_offsets, M)``.

    With ``object_shape=(H, W)``, the patches are also placed on that object pixel grid
    (``reassemble_on_grid``; patch centre at each group's centre position, or at
    ``positions`` ``(n, 2)`` [x, y] when given): ``results['object_on_grid']`` (H, W)
    complex64 and ``results['object_weights']``.

    Before the network runs, :func:`check_stitch_inputs` refuses a stitching canvas above
    ``max_canvas_pixels`` (default ``$PINN_JAX_MAX_CANVAS_PIXELS`` or 2**28 pixels) and, with
    ``object_shape``, positions whose patch cannot overlap the object grid (ValueErrors).

    Returns ``(amplitude (S,S) float32, phase (S,S) float32, results)`` with results keys
    ``obj_tensor_full``, ``global_offsets``, ``recon_amp``, ``recon_phase``, ``stitched_obj``.
    """
    im = model if isinstance(model, InferenceModel) else InferenceModel(model, batch_size=batch_size)
    check_stitch_inputs(_stitch_offsets(container.global_offsets, flip_x, flip_y, coord_scale), M=M,
                        patch_size=im.N, object_shape=object_shape, positions=positions,
                        max_canvas_pixels=max_canvas_pixels)
    s = im.intensity_scale if intensity_scale is None else float(intensity_scale)
    X = np.asarray(container.X, np.float32)
    patches = predict_across_processes(im, X * np.float32(s), np.asarray(container.local_offsets, np.float32),
                                       batch_size=batch_size)
    return stitch(
        patches,
        container.global_offsets,
        M=M,
        flip_x=flip_x,
        flip_y=flip_y,
        transpose=transpose,
        coord_scale=coord_scale,
        object_shape=object_shape,
        positions=positions,
        max_canvas_pixels=max_canvas_pixels,
    )


def predict_across_processes(im: "InferenceModel", x: np.ndarray, offsets: np.ndarray, *,
                             batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """``im.predict([x, offsets])`` with the rows shared out among the processes of a
    multi-process run (:mod:`pinn_jax.distributed`): process ``p`` predicts the ``p``-th
    contiguous chunk and every process receives all patches (``process_allgather``), in input
    order. One process: exactly ``im.predict``."""
    import jax

    P = jax.process_count()
    if P == 1:
        return im.predict([x, offsets], batch_size=batch_size)
    from jax.experimental import multihost_utils

    n = len(x)
    chunk = -(-n // P)
    lo = min(jax.process_index() * chunk, n)
    hi = min(lo + chunk, n)
    mine_x, mine_o = x[lo:hi], offsets[lo:hi]
    if hi - lo < chunk:  # equal shapes for the gather: pad with copies of row 0, dropped below
        pad = chunk - (hi - lo)
        mine_x = np.concatenate([mine_x, np.repeat(x[:1], pad, axis=0)])
        mine_o = np.concatenate([mine_o, np.repeat(offsets[:1], pad, axis=0)])
    local = np.asarray(im.predict([mine_x, mine_o], batch_size=batch_size))
    gathered = np.asarray(multihost_utils.process_allgather(local, tiled=True))
    return gathered[:n]


def load_inference_bundle(model_dir: str | os.PathLike, *, batch_size: int = DEFAULT_BATCH_SIZE):
    """Load ``model_dir/wts.h5.zip`` written by the jax backend: ``(InferenceModel, cfg)``.

    Checks like the reference: ValueError when ``model_dir`` is missing or not a directory,
    FileNotFoundError naming ``wts.h5.zip`` when the archive is missing. A TensorFlow archive
    raises ``ArchiveBackendError`` (ValueError) that says to run ``pinn-jax convert``.
    Side effect (as the reference): the legacy ``backend_api.params.cfg`` is updated with the
    bundle's params snapshot; ``cfg`` is a copy of it afterwards.
    """
    from backend_api import archive
    from backend_api import params as legacy
    from pinn_jax.checkpoint import load_model

    archive_path = archive.bundle_archive_path(model_dir)
    model, params = load_model(archive_path)
    restored = dict(params)
    restored.pop("_version", None)
    legacy.cfg.update(restored)
    return InferenceModel(model, params, batch_size=batch_size), dict(legacy.cfg)
