"""Numpy bilinear sub-pixel translation with the reference sign and edge conventions.

Convention (reference brief model_physics.md §5.1): translating an image by ``t = [tx, ty]``
moves its content by ``+tx`` columns and ``+ty`` rows, i.e. output pixel ``(row y, col x)``
samples the source at ``(y - ty, x - tx)``. Interpolation is bilinear; each of the four
corner samples is independently zero when it lies outside the image (fill mode 'zeros'), so
integer shifts are exact copies and partially-outside samples fade linearly.

``pinn_jax.geometry.translate`` implements the same rule in JAX; this copy exists because
``backend_api`` must not import jax (it is used to cut ground-truth patches).
"""

from __future__ import annotations

import numpy as np

__all__ = ["translate", "sample_windows"]


def sample_windows(img: np.ndarray, origins: np.ndarray, N: int) -> np.ndarray:
    """Bilinearly sample ``n`` windows of ``N x N`` pixels from one image.

    Window ``k`` pixel ``(r, c)`` takes the value of ``img`` at the (fractional) position
    ``(row, col) = (origins[k, 1] + r, origins[k, 0] + c)``; corners outside the image count
    as zero.

    Args:
        img: ``(H, W)`` real or complex array.
        origins: ``(n, 2)`` float array of ``[x, y]`` (column, row) positions of each window's
            top-left sample, in pixels.
        N: window side in pixels.

    Returns:
        ``(n, N, N)`` array; complex64 for complex input, float32 otherwise (bilinear weights
        and blending in float32, like the reference).
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"img: expected a 2-D (H, W) array, got shape {img.shape}")
    origins = np.asarray(origins, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(origins).all():
        raise ValueError("origins: expected finite window positions, got non-finite values")
    H, W = img.shape
    cplx = np.iscomplexobj(img)
    out_dtype = np.complex64 if cplx else np.float32
    # A pure translation has the same fractional offset at every pixel of a window, so each
    # window is a fixed 4-tap blend of the (N+1)x(N+1) integer block at floor(origin).
    # Zero margins of N+1 make every out-of-image corner read 0 (per-corner zero fill);
    # blocks entirely outside are clipped onto the margin, which is all zeros as well.
    P = N + 1
    padded = np.zeros((H + 2 * P, W + 2 * P), dtype=img.dtype)
    padded[P:P + H, P:P + W] = img
    blocks_view = np.lib.stride_tricks.sliding_window_view(padded, (N + 1, N + 1))
    f32 = np.float32
    one = f32(1)
    ar = np.arange(N, dtype=f32)
    # Sample positions in float32, per pixel, as the reference's float32 warp computes them
    # (fl(origin + index) can differ from origin + index in the last bits; matching it
    # brings Y patches to within ~2 ulp of the reference).
    o32 = origins.astype(f32)
    base = np.floor(o32)  # (n, 2) integer block corner
    sx = o32[:, 0:1] + ar[None, :]  # (n, N) float32
    sy = o32[:, 1:2] + ar[None, :]
    wx = sx - np.floor(sx)
    wy = sy - np.floor(sy)
    # fl(origin + i) may round up onto the next integer: the sample is then exactly the next
    # tap, which the (i, i+1) blend gives with weight 1.
    wx = np.where(np.floor(sx) > base[:, 0:1] + ar[None, :], one, wx)
    wy = np.where(np.floor(sy) > base[:, 1:2] + ar[None, :], one, wy)
    xi = np.clip(base[:, 0], -P, W).astype(np.int64) + P
    yi = np.clip(base[:, 1], -P, H).astype(np.int64) + P
    blk = blocks_view[yi, xi]  # (n, N+1, N+1) gathered copy
    # Blend on the real view (complex -> interleaved re/im pairs) in float32.
    k = 2 if cplx else 1
    real = np.ascontiguousarray(blk.astype(out_dtype)).view(np.float32)  # (n, N+1, k*(N+1))
    wxk = np.repeat(wx, k, axis=1)[:, None, :]  # (n, 1, k*N)
    wyk = wy[:, :, None]  # (n, N, 1)
    a = real[:, :N, :k * N]
    b = real[:, :N, k:]
    c = real[:, 1:, :k * N]
    d = real[:, 1:, k:]
    flat = ((one - wxk) * (one - wyk) * a + wxk * (one - wyk) * b
            + (one - wxk) * wyk * c + wxk * wyk * d)
    return np.ascontiguousarray(flat).view(out_dtype)


def translate(img: np.ndarray, shift) -> np.ndarray:
    """Translate one image by ``shift = [tx, ty]`` pixels (content moves +tx cols, +ty rows).

    Args:
        img: ``(H, W)`` real or complex array.
        shift: length-2 ``[tx, ty]`` in pixels.

    Returns:
        ``(H, W)`` array of the same shape; complex64 for complex input, float32 otherwise.
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"img: expected a 2-D (H, W) array, got shape {img.shape}")
    H, W = img.shape
    shift = np.asarray(shift, dtype=np.float64)
    if shift.size != 2:
        raise ValueError(f"shift: expected [tx, ty] (2 values), got shape {shift.shape}")
    tx, ty = (float(v) for v in shift.reshape(2))
    # sample_windows produces square windows: sample one covering both sides, then crop
    # (a no-op for square images).
    return sample_windows(img, np.array([[-tx, -ty]]), max(H, W))[0][:H, :W]
