"""Large scans in bounded memory: the network's object on the grid, chunk by chunk.

:func:`reconstruct_on_grid_streaming` is :func:`pinn_jax.pipeline.reconstruct`'s on-grid
result for gridsize 1 (every pattern its own group) without holding more than one chunk of
patterns: it reads ``amplitudes[lo:hi]`` (a numpy array, an ``np.memmap`` or an h5py dataset
all work, only the chunk is read), scales it like the grouping does
(:func:`backend_api.grouping.normalization_from_energy` of a chunked :func:`~backend_api.grouping.sum_of_squares`), predicts it, and
adds the chunk's stitched sum and coverage into two ``(H, W)`` accumulators on the device. The
host never holds an ``(n, N, N)`` copy; memory is O(chunk N**2 + H W).

In a multi-process run (:mod:`pinn_jax.distributed`) the chunks are shared out round-robin and
the accumulators summed across processes at the end, so every process returns the whole object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backend_api.canvas import STITCH_CROP

__all__ = ["reconstruct_on_grid_streaming", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 4096


def _normalization(amplitudes: Any, N: int, chunk: int) -> np.float32:
    """The grouping's ``X_full`` factor, read in chunks so an h5py dataset or a memmap is never
    loaded whole."""
    from backend_api.grouping import normalization_from_energy, sum_of_squares

    return normalization_from_energy(sum_of_squares(amplitudes, chunk) / max(len(amplitudes), 1), N,
                                     key="amplitudes")


def reconstruct_on_grid_streaming(model: Any, amplitudes: Any, positions: Any, object_shape: Sequence[int], *,
                                  M: int = STITCH_CROP, chunk: int = DEFAULT_CHUNK, batch_size: int = 64,
                                  on_chunk: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The gridsize-1 network object on the ``object_shape`` ``(H, W)`` grid for a scan of
    ``amplitudes`` ``(n, N, N)`` (diffraction amplitudes, any array-like that slices) at
    ``positions`` ``(n, 2)`` ``[x, y]`` object pixels (patch centres).

    ``model``: an :class:`~pinn_jax.inference.InferenceModel` (or what
    :func:`pinn_jax.pipeline.reconstruct` accepts) of gridsize 1; ``M``: the stitch crop;
    ``chunk``: patterns read and predicted at a time (the memory knob); ``on_chunk(done,
    total)`` after each chunk (progress). Returns ``(object (H, W) complex64, weights (H, W)
    float32)`` as :func:`pinn_jax.geometry.reassemble_on_grid_with_weights` (``object`` is 0
    where nothing covers). Shapes, gridsize and positions off the grid are checked first.
    """
    import jax
    import jax.numpy as jnp

    from pinn_jax import inference
    from pinn_jax.backend import _unwrap
    from pinn_jax.geometry import reassemble_on_grid_with_weights
    from pinn_jax.inference import check_stitch_inputs

    net = _unwrap(model)
    im = model if isinstance(model, inference.InferenceModel) else inference.InferenceModel(net)
    if int(im.gridsize) != 1:
        raise ValueError(f"streaming reconstruction is for gridsize 1; the model has gridsize {im.gridsize} "
                         "(use pinn_jax.pipeline.reconstruct)")
    shape = tuple(int(v) for v in object_shape)
    n = len(amplitudes)
    N = int(im.N)
    if tuple(np.shape(amplitudes)[1:]) != (N, N):
        raise ValueError(f"amplitudes: expected (n, {N}, {N}) for this model, got shape {tuple(np.shape(amplitudes))}")
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    if len(pos) != n:
        raise ValueError(f"positions: expected ({n}, 2) [x, y], got shape {np.shape(positions)}")
    if not (isinstance(chunk, (int, np.integer)) and chunk >= 1):
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    check_stitch_inputs(pos.reshape(-1, 1, 2, 1), M=M, patch_size=N, object_shape=shape)
    scale = _normalization(amplitudes, N, int(chunk)) * np.float32(im.intensity_scale)

    P, me = jax.process_count(), jax.process_index()
    total = jnp.zeros(shape, jnp.complex64)
    weights = jnp.zeros(shape, jnp.float32)
    starts = list(range(0, n, int(chunk)))
    for k, lo in enumerate(starts):
        if k % P != me:
            continue
        hi = min(lo + int(chunk), n)
        x = np.asarray(amplitudes[lo:hi], np.float32)[..., None] * scale
        offsets = np.zeros((hi - lo, 1, 2, 1), np.float32)
        patches = im.predict([x, offsets], batch_size=batch_size)
        obj, w = reassemble_on_grid_with_weights(patches, pos[lo:hi], shape, int(M))
        # the stitcher returns sum / (1e-9 + w): undo it to add sums
        total = total + obj * (w + 1e-9)
        weights = weights + w
        if on_chunk is not None:
            on_chunk(hi, n)
    if P > 1:
        from jax.experimental import multihost_utils

        both = multihost_utils.process_allgather(jnp.stack([total, weights.astype(jnp.complex64)]))
        summed = np.asarray(both).sum(axis=0)
        total, weights = jnp.asarray(summed[0]), jnp.asarray(summed[1].real.astype(np.float32))
    obj = total / (1e-9 + weights)
    return np.asarray(obj, np.complex64), np.asarray(weights, np.float32)
