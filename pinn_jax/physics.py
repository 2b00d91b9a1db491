"""Forward physics and losses of PtychoPINN in JAX (reference brief model_physics.md §1.4-1.6, §4).

All functions are pure and jit-safe; per-patch functions take ONE ``(N, N)`` field and are
``vmap``-ped by callers. Real data are float32 and fields complex64. Diffraction data are
**amplitudes** (sqrt of counts) in the fftshifted layout, DC at ``[N/2, N/2]``.

FFT convention (reference ``pad_and_diffract`` with ``pad=False``): no shift before the FFT,
``I = |fft2(psi)|**2 / N**2`` (so ``sum(I) == sum(|psi|**2)``), then ``fftshift``, then ``sqrt``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .geometry import center_mask

__all__ = [
    "gaussian_kernel_1d",
    "gaussian_smooth_complex",
    "illuminate",
    "diffraction_intensity",
    "diffraction_amplitude",
    "poisson_sample",
    "scale_nphotons",
    "illuminate_and_diffract",
    "poisson_nll",
    "mean_absolute_error",
    "total_variation_complex",
    "realspace_loss",
]


# --------------------------------------------------------------------------------------------
# illumination
# --------------------------------------------------------------------------------------------
def gaussian_kernel_1d(sigma: float) -> jax.Array:
    """3-tap kernel ``softmax(-[1, 0, 1] / (2 sigma**2))`` (taps -1, 0, +1), float32, sums to 1."""
    x2 = jnp.array([1.0, 0.0, 1.0], jnp.float32)
    return jax.nn.softmax(-x2 / (2.0 * jnp.float32(sigma) ** 2))


@partial(jax.jit, static_argnames=("sigma",))
def gaussian_smooth_complex(field: jax.Array, sigma: float) -> jax.Array:
    """3x3 Gaussian blur of a complex ``(N, N)`` field (reference ``complex_gaussian_filter2d``).

    Real and imaginary parts are filtered with the same separable 3x3 kernel
    (:func:`gaussian_kernel_1d` outer itself) after 1-pixel 'reflect' padding (edge not repeated).
    ``sigma`` must be positive; ``illuminate`` skips smoothing when its sigma is 0.
    """
    field = jnp.asarray(field)
    if field.ndim != 2:
        raise ValueError(f"gaussian_smooth_complex: field must be (N, N), got shape {field.shape}")
    k = gaussian_kernel_1d(sigma)
    p = jnp.pad(field, 1, mode="reflect")
    H, W = field.shape
    rows = k[0] * p[:, 0:W] + k[1] * p[:, 1 : W + 1] + k[2] * p[:, 2 : W + 2]       # (H+2, W)
    out = k[0] * rows[0:H] + k[1] * rows[1 : H + 1] + k[2] * rows[2 : H + 2]         # (H, W)
    return out.astype(field.dtype)


@partial(jax.jit, static_argnames=("smoothing_sigma",))
def illuminate(probe: jax.Array, patch: jax.Array, *, smoothing_sigma: float = 0.0,
               mask: jax.Array | None = None) -> jax.Array:
    """Exit wave of one patch: ``mask * smooth_sigma(probe * patch)`` (reference ``ProbeIllumination``).

    Args:
      probe: ``(N, N)`` complex64 probe (already normalised by the caller).
      patch: ``(N, N)`` complex64 object patch.
      smoothing_sigma: static Python float; 0 disables the 3x3 complex Gaussian smoothing.
      mask: optional ``(N, N)`` real mask (e.g. :func:`pinn_jax.probe.probe_mask`) applied last.

    Returns:
      ``(N, N)`` complex64 exit wave.
    """
    probe = jnp.asarray(probe)
    patch = jnp.asarray(patch)
    if probe.shape != patch.shape or probe.ndim != 2:
        raise ValueError(
            f"illuminate: probe and patch must both be (N, N); got {probe.shape} and {patch.shape}"
        )
    psi = (probe * patch).astype(jnp.complex64)
    if smoothing_sigma:
        psi = gaussian_smooth_complex(psi, smoothing_sigma)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != psi.shape:
            raise ValueError(f"illuminate: mask must be {psi.shape}, got {mask.shape}")
        psi = psi * mask
    return psi.astype(jnp.complex64)


# --------------------------------------------------------------------------------------------
# diffraction
# --------------------------------------------------------------------------------------------
@jax.jit
def diffraction_intensity(field: jax.Array) -> jax.Array:
    """Far-field intensity ``fftshift(|fft2(field)|**2 / (N_rows * N_cols))``, float32 ``(N, N)``.

    No shift before the FFT (the patch centre at N/2 only adds a phase ramp). Parseval:
    ``sum(I) == sum(|field|**2)``.
    """
    field = jnp.asarray(field, jnp.complex64)
    if field.ndim != 2:
        raise ValueError(f"diffraction_intensity: field must be (N, N), got shape {field.shape}")
    F = jnp.fft.fft2(field)
    inten = (jnp.real(F) ** 2 + jnp.imag(F) ** 2) / jnp.float32(field.shape[0] * field.shape[1])
    return jnp.fft.fftshift(inten).astype(jnp.float32)


@jax.jit
def diffraction_amplitude(field: jax.Array) -> jax.Array:
    """Far-field amplitude ``sqrt(fftshift(|fft2(field)|**2 / N**2))``, float32 ``(N, N)``, DC at ``[N/2, N/2]``.

    The square root is taken of the (shifted) intensity, as in the reference; its gradient is
    infinite at exact zeros, which the probe's 1e-9 floor keeps away in practice.
    """
    return jnp.sqrt(diffraction_intensity(field))


# --------------------------------------------------------------------------------------------
# simulation
# --------------------------------------------------------------------------------------------
#: Above this rate (counts) Poisson draws use the normal approximation ``lam + sqrt(lam) z``:
#: int32 counts would overflow for very bright pixels and the two laws agree to <1e-3 there.
POISSON_NORMAL_THRESHOLD = 1e7


@jax.jit
def poisson_sample(key: jax.Array, amplitude: jax.Array) -> jax.Array:
    """Noisy amplitude ``sqrt(Poisson(amplitude**2))`` (float32, same shape), keyed by ``key``.

    Rates above :data:`POISSON_NORMAL_THRESHOLD` use the normal approximation (clipped at 0).
    Jitted at definition: the exact sampler is costly to compile, so one compile per shape is shared
    by jitted and un-jitted callers.
    """
    amplitude = jnp.asarray(amplitude, jnp.float32)
    lam = amplitude ** 2
    k1, k2 = jax.random.split(key)
    small = jnp.minimum(lam, POISSON_NORMAL_THRESHOLD)
    counts = jax.random.poisson(k1, small, shape=lam.shape).astype(jnp.float32)
    approx = jnp.maximum(lam + jnp.sqrt(lam) * jax.random.normal(k2, lam.shape, jnp.float32), 0.0)
    counts = jnp.where(lam > POISSON_NORMAL_THRESHOLD, jnp.round(approx), counts)
    return jnp.sqrt(counts)


def scale_nphotons(illuminated_amplitude: jax.Array, nphotons: float) -> jax.Array:
    """Reference ``scale_nphotons``: ``sqrt(nphotons / mean_patches(sum_xy |A|**2))``.

    Args:
      illuminated_amplitude: ``(M, N, N[, 1])`` float32 ``Y_I * |probe|`` (or diffraction
        amplitudes; by Parseval both give the same photon count).
      nphotons: mean photons per pattern wanted.

    Returns:
      float32 scalar ``s``; ``s * amplitude`` then carries ``nphotons`` counts per pattern on average.
    """
    a = jnp.asarray(illuminated_amplitude, jnp.float32)
    per_patch = jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)
    return jnp.sqrt(jnp.asarray(nphotons, jnp.float32) / jnp.mean(per_patch))


@jax.jit
def _noiseless_forward(amp, phi, probe, intensity_scale, nphotons):
    """``(A, |obj| / s, s)`` for ``obj = s * amp * exp(i phi) * probe``; see :func:`illuminate_and_diffract`."""
    if intensity_scale is None:
        s = scale_nphotons(amp * jnp.abs(probe), nphotons)
    else:
        s = intensity_scale
    obj = s * (amp * jnp.exp(1j * phi.astype(jnp.complex64))).astype(jnp.complex64) * probe
    A = jax.vmap(diffraction_amplitude)(obj)
    return A, jnp.abs(obj) / s, s


def illuminate_and_diffract(Y_I: jax.Array, Y_phi: jax.Array, probe: jax.Array, *,
                            nphotons: float = 1e9, intensity_scale: float | jax.Array | None = None,
                            key: jax.Array | None = None):
    """Simulation forward model, as the reference ``diffsim.illuminate_and_diffract`` computes it.

    Args:
      Y_I: ``(M, N, N)`` or ``(M, N, N, 1)`` float32 object amplitude patches.
      Y_phi: same shape, float32 object phase patches.
      probe: ``(N, N)`` or ``(N, N, 1)`` complex64 probe.
      nphotons: mean photons per pattern (used only when ``intensity_scale`` is None).
      intensity_scale: the scale ``s``; None computes ``scale_nphotons(Y_I * |probe|, nphotons)``
        over all M patches (one scalar; the probe phase does not enter).
      key: ``jax.random`` key for Poisson noise; None returns the noiseless amplitude.

    Returns:
      ``(X, Y_I_out, Y_phi_out, s)``: ``X = sqrt(Poisson(A**2)) / s`` (or ``A / s`` noiseless)
      with ``A = diffraction_amplitude(s * Y_I * exp(i Y_phi) * probe)`` per patch;
      ``Y_I_out = |s * Y_I * exp(i Y_phi) * probe| / s`` (the *illuminated* amplitude);
      ``Y_phi_out = Y_phi`` (without the probe phase); ``s`` float32 scalar. Shapes follow the
      input (a trailing 1 is kept).
    """
    Y_I = jnp.asarray(Y_I, jnp.float32)
    Y_phi = jnp.asarray(Y_phi, jnp.float32)
    probe = jnp.asarray(probe, jnp.complex64)
    if Y_I.shape != Y_phi.shape:
        raise ValueError(f"illuminate_and_diffract: Y_I {Y_I.shape} and Y_phi {Y_phi.shape} differ")
    trailing = Y_I.ndim == 4
    if trailing and Y_I.shape[-1] != 1 or Y_I.ndim not in (3, 4):
        raise ValueError(
            f"illuminate_and_diffract: Y_I must be (M, N, N) or (M, N, N, 1), got {Y_I.shape}"
        )
    if probe.ndim == 3 and probe.shape[-1] == 1:
        probe = probe[..., 0]
    if probe.shape != Y_I.shape[1:3]:
        raise ValueError(
            f"illuminate_and_diffract: probe must be {Y_I.shape[1:3]} to match the patches, "
            f"got {probe.shape}"
        )
    amp = Y_I[..., 0] if trailing else Y_I
    phi = Y_phi[..., 0] if trailing else Y_phi
    if intensity_scale is not None:
        intensity_scale = jnp.asarray(intensity_scale, jnp.float32)
    A, Y_I_out, s = _noiseless_forward(amp, phi, probe, intensity_scale, nphotons)
    if key is not None:
        # kept outside the jitted forward so that its (costly) compile is shared per shape
        A = poisson_sample(key, A)
    X = A / s
    if trailing:
        X, Y_I_out = X[..., None], Y_I_out[..., None]
    return X, Y_I_out, Y_phi, s


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("eps",))
def poisson_nll(pred_intensity: jax.Array, target_intensity: jax.Array, *, eps: float = 0.0) -> jax.Array:
    """Poisson negative log-likelihood without the ``log y!`` term, mean over ALL elements.

    ``mean(pred - target * log(pred + eps))`` (reference ``negloglik`` / ``log_poisson_loss`` with
    ``compute_full_loss=False``). ``eps`` defaults to 0 as in the reference, so ``pred`` must be
    > 0. Inputs: same-shape float32 intensities (counts), e.g. ``(B, N, N, C)``. Returns a float32
    scalar.
    """
    pred = jnp.asarray(pred_intensity, jnp.float32)
    target = jnp.asarray(target_intensity, jnp.float32)
    return jnp.mean(pred - target * jnp.log(pred + eps) if eps else pred - target * jnp.log(pred))


def mean_absolute_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``mean(|pred - target|)`` over all elements (real or complex: modulus of the difference)."""
    return jnp.mean(jnp.abs(jnp.asarray(pred) - jnp.asarray(target)))


def total_variation_complex(field: jax.Array) -> jax.Array:
    """Sum over everything of squared neighbour differences of the real and imaginary parts.

    ``field``: ``(..., H, W[, 1])``; the two image axes are the last two (or the two before a
    trailing channel axis of size 1). Returns a float32 scalar summed over the whole batch.
    """
    f = jnp.asarray(field)
    if f.ndim >= 3 and f.shape[-1] == 1:
        f = f[..., 0]
    tv = jnp.float32(0.0)
    for part in (jnp.real(f), jnp.imag(f)):
        dy = part[..., 1:, :] - part[..., :-1, :]
        dx = part[..., :, 1:] - part[..., :, :-1]
        tv = tv + jnp.sum(dx ** 2) + jnp.sum(dy ** 2)
    return tv.astype(jnp.float32)


@partial(jax.jit, static_argnames=("probe_big", "realspace_mae_weight", "tv_weight"))
def realspace_loss(pred_obj: jax.Array, target_amp: jax.Array, *, probe_big: bool,
                   realspace_mae_weight: float, tv_weight: float = 0.0) -> jax.Array:
    """Reference ``realspace_loss`` (weight it with ``realspace_weight`` outside).

    Args:
      pred_obj: ``(B, N, N, 1)`` complex64 predicted object (``trimmed_obj``).
      target_amp: ``(B, N, N, 1)`` float32 ground-truth amplitude in the group frame.
      probe_big: when False the prediction is multiplied by the centre mask (N/2 square) first.
      realspace_mae_weight, tv_weight: static Python floats; a term is skipped when its weight is 0.

    Returns:
      float32 scalar ``tv_weight * TV(pred) + realspace_mae_weight * mean|pred - target|``
      (0.0 when both weights are 0).
    """
    pred = jnp.asarray(pred_obj)
    if pred.ndim != 4 or pred.shape[1] != pred.shape[2]:
        raise ValueError(f"realspace_loss: pred_obj must be (B, N, N, 1), got shape {pred.shape}")
    if not probe_big:
        pred = pred * center_mask(pred.shape[1])[None, :, :, None]
    loss = jnp.float32(0.0)
    if tv_weight > 0:
        loss = loss + jnp.float32(tv_weight) * total_variation_complex(pred)
    if realspace_mae_weight > 0:
        loss = loss + jnp.float32(realspace_mae_weight) * mean_absolute_error(pred, target_amp)
    return loss
