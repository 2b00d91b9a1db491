"""Probe construction and normalisation (reference brief model_physics.md §1.3).

* :func:`default_probe` -- the reference's default illumination: a disk (threshold of a separable
  Gaussian window at 0.5) blurred by a sigma=1 Gaussian, plus a 1e-9 floor. Built once on the host
  with numpy/scipy (it is a constant); deterministic.
* :func:`probe_mask` -- the circular mask ``r < N // 4`` with ``r`` measured from ``(N - 1) / 2``.
* :func:`normalize_probe` -- ``probe / (probe_scale * mean(|mask * probe|))`` (jit-safe).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["default_probe", "probe_mask", "normalize_probe"]


def _check_N(N, fn: str) -> int:
    if int(N) != N or N < 4 or N % 2:
        raise ValueError(f"{fn}: N must be an even int >= 4, got {N!r}")
    return int(N)


def default_probe(N: int, scale: float = 0.7) -> jax.Array:
    """Default (un-normalised) probe, ``(N, N)`` complex64, real-valued, ``>= 1e-9`` everywhere.

    Args:
      N: patch side in pixels.
      scale: ``default_probe_scale``; the Gaussian window has ``std = N / (scale * pi**2)``.

    The disk is ``outer(g, g) > 0.5`` for the max-normalised symmetric window ``g`` (radius
    ~0.171 N at the default scale: 376 px at N=64), then ``scipy.ndimage.gaussian_filter(sigma=1,
    mode='reflect')`` in float64, ``+ 1e-9`` and a cast to complex64. Its centre is at
    ``(N - 1) / 2`` (half a pixel from the patch centre ``N / 2``, as in the reference).
    """
    from scipy.ndimage import gaussian_filter   # host-only constant construction
    from scipy.signal.windows import gaussian

    N = _check_N(N, "default_probe")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"default_probe: scale must be a positive finite float, got {scale!r}")
    g = gaussian(N, std=N / (scale * math.pi ** 2), sym=True)
    g = g / g.max()
    disk = (np.outer(g, g) > 0.5).astype(np.float64)
    probe = gaussian_filter(disk, sigma=1.0, mode="reflect") + 1e-9
    return jnp.asarray(probe.astype(np.complex64))


def probe_mask(N: int) -> jax.Array:
    """Circular probe mask ``(N, N)`` float32: 1 where ``sqrt(x**2 + y**2) < N // 4``.

    ``x, y = arange(N) - N // 2 + 0.5``, i.e. distances from pixel ``(N - 1) / 2``.
    """
    N = _check_N(N, "probe_mask")
    a = np.arange(N, dtype=np.float64) - N // 2 + 0.5
    r = np.sqrt(a[:, None] ** 2 + a[None, :] ** 2)
    return jnp.asarray((r < N // 4).astype(np.float32))


def normalize_probe(probe: jax.Array, probe_scale: float) -> jax.Array:
    """Scale a probe so that ``mean(|probe_mask * probe|) == 1 / probe_scale``.

    Args:
      probe: ``(N, N)`` (or ``(N, N, 1)``) complex probe guess (any units).
      probe_scale: positive float (``ModelConfig.probe_scale``, default 4.0; legacy params 10).

    Returns:
      ``(N, N)`` complex64: ``probe / (probe_scale * mean_{N*N px}(|mask * probe|))``. The mask is
      always applied in this statistic, whatever the ``probe_mask`` model flag says.
    """
    probe = jnp.asarray(probe)
    if probe.ndim == 3 and probe.shape[-1] == 1:
        probe = probe[..., 0]
    if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
        raise ValueError(f"normalize_probe: probe must be (N, N) or (N, N, 1), got shape {probe.shape}")
    if isinstance(probe_scale, (int, float)) and not probe_scale > 0:
        raise ValueError(f"normalize_probe: probe_scale must be > 0, got {probe_scale!r}")
    probe = probe.astype(jnp.complex64)
    mask = probe_mask(probe.shape[0])
    denom = jnp.float32(probe_scale) * jnp.mean(jnp.abs(mask * probe))
    return (probe / denom).astype(jnp.complex64)
