"""Tests for pinn_jax.physics: illumination, FFT convention, simulation forward, losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pinn_jax import physics as ph
from pinn_jax.geometry import center_mask
from pinn_jax.probe import probe_mask
from jit_parity import assert_jit_matches_eager
from numerics import mean_error_bound, poisson_nll_elementwise_bound

TF = "tf_reference"


@pytest.fixture(scope="module")
def fwd(fixtures_dir):
    return dict(np.load(fixtures_dir / TF / "forward_illuminate_and_diffract.npz"))


@pytest.fixture(scope="module")
def io_gs1(fixtures_dir):
    d = dict(np.load(fixtures_dir / TF / "batch16_gs1_io.npz"))
    d.update(np.load(fixtures_dir / TF / "probe_variable_gs1.npz"))
    return d


def _rand_field(rng, N):
    return (rng.standard_normal((N, N)) + 1j * rng.standard_normal((N, N))).astype(np.complex64)


# ---------------------------------------------------------------------------------- parity
def test_diffraction_amplitude_parity(fwd):
    """TF pad_and_diffract / diffract_obj on the illuminated object: rtol 1e-5, atol 0."""
    obj = fwd["illuminated_obj"][..., 0]
    out = np.asarray(jax.vmap(ph.diffraction_amplitude)(obj))
    ref = fwd["amp_noiseless"][..., 0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=0)
    np.testing.assert_allclose(out, fwd["pad_and_diffract_amp"][..., 0], rtol=1e-5, atol=0)


def test_illuminate_and_diffract_parity(fwd):
    """TF diffsim.illuminate_and_diffract, noiseless: scale rtol 1e-6; X and Y_I rtol 1e-5 with
    atol 1e-6 of the max (FFT round-off floor for the near-zero far-field pixels); Y_phi exact."""
    X, Y_I, Y_phi, s = ph.illuminate_and_diffract(fwd["Y_I_in"], fwd["Y_phi_in"], fwd["probe"],
                                                  nphotons=1e9)
    np.testing.assert_allclose(float(s), float(fwd["intensity_scale"]), rtol=1e-6)
    X = np.asarray(X)
    ref = fwd["amp_noiseless_over_scale"]
    assert X.shape == ref.shape == (4, 64, 64, 1) and X.dtype == np.float32
    # rtol 1e-5 everywhere the amplitude is above FFT round-off (atol 1e-6 of the peak).
    np.testing.assert_allclose(X, ref, rtol=1e-5, atol=1e-6 * ref.max())
    np.testing.assert_allclose(np.asarray(Y_I), fwd["Y_I_out"], rtol=1e-5, atol=1e-6 * fwd["Y_I_out"].max())
    np.testing.assert_array_equal(np.asarray(Y_phi), fwd["Y_phi_out"])


def test_illuminate_and_diffract_given_scale_and_3d_input(fwd):
    s_ref = float(fwd["intensity_scale"])
    X, Y_I, _, s = ph.illuminate_and_diffract(fwd["Y_I_in"][..., 0], fwd["Y_phi_in"][..., 0],
                                              fwd["probe"], intensity_scale=s_ref)
    assert X.shape == (4, 64, 64)
    np.testing.assert_allclose(np.asarray(X), fwd["amp_noiseless_over_scale"][..., 0],
                               rtol=1e-5, atol=1e-6 * fwd["amp_noiseless_over_scale"].max())


def test_illuminate_and_diffract_noise_statistics(fwd):
    """Poisson counts: per-pattern totals match the noiseless expectation and the TF draw."""
    key = jax.random.key(7)
    X, _, _, s = ph.illuminate_and_diffract(fwd["Y_I_in"], fwd["Y_phi_in"], fwd["probe"],
                                            nphotons=1e9, key=key)
    s = float(s)
    counts = (np.asarray(X, np.float64) * s) ** 2
    np.testing.assert_allclose(counts, np.round(counts), atol=counts.max() * 1e-6 + 1e-2)
    expected = ((fwd["amp_noiseless"].astype(np.float64)) ** 2).sum(axis=(1, 2, 3))
    tot = counts.sum(axis=(1, 2, 3))
    assert np.all(np.abs(tot - expected) < 6 * np.sqrt(expected) + 1e-3 * expected)
    tf_tot = ((fwd["X_noisy_out"].astype(np.float64) * s) ** 2).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(tot, tf_tot, rtol=1e-3)
    # mean photons per pattern over the 4 patches is nphotons by construction of s
    np.testing.assert_allclose(expected.mean(), 1e9, rtol=1e-4)
    # same key -> same draw; another key -> another draw
    X2 = ph.illuminate_and_diffract(fwd["Y_I_in"], fwd["Y_phi_in"], fwd["probe"], key=key)[0]
    np.testing.assert_array_equal(np.asarray(X), np.asarray(X2))
    X3 = ph.illuminate_and_diffract(fwd["Y_I_in"], fwd["Y_phi_in"], fwd["probe"],
                                    key=jax.random.key(8))[0]
    assert not np.array_equal(np.asarray(X), np.asarray(X3))


def test_model_forward_parity_gs1(io_gs1):
    """gs1: extraction is the centre crop, so TF amp = exp(log_s) * A(probe * trimmed_obj).

    Tolerance: amplitude rtol 1e-5, intensity rtol 3e-5 (one squaring), both with atol 1e-6 of the
    max (resp. max**2) for FFT round-off in the dark far-field pixels."""
    probe = io_gs1["__probe_variable__"][0, :, :, 0]
    s = np.exp(np.float32(io_gs1["__log_scale__"]))

    def fwd1(o):
        return s * ph.diffraction_amplitude(ph.illuminate(probe, o))

    amp = np.asarray(jax.vmap(fwd1)(io_gs1["ae_obj"][..., 0]))
    ref = io_gs1["ae_pred_amp_scaled"][..., 0]
    np.testing.assert_allclose(amp, ref, rtol=1e-5, atol=1e-6 * ref.max())
    np.testing.assert_allclose(amp ** 2, io_gs1["ae_pred_intensity"][..., 0], rtol=3e-5,
                               atol=1e-6 * ref.max() ** 2)


def _nll_terms64(pred, tgt):
    """The exact (float64) elementwise NLL terms ``p - t log p`` of the float32 inputs."""
    p, t = np.asarray(pred, np.float64), np.asarray(tgt, np.float64)
    return p - t * np.log(p)


def test_poisson_nll_elementwise_parity(io_gs1):
    """Each term ``p - t log p``, ours and TF's, against the float64 value of the same float32
    inputs (one ``poisson_nll`` per element: no reduction, so no order dependence).

    Bounds (``numerics.poisson_nll_elementwise_bound``; log accurate to 2 ulp, one rounding per
    * and -): ours ``|err| <= EPS (|p| + 3 |t log p|)`` (seen 0.9 EPS (|p| + |t log p|)); TF
    evaluates ``exp(log p) - t log p`` (``log_poisson_loss``), where exp turns the log's error
    ``2 EPS |log p|`` into a relative error of ``p``, so ``|err| <= EPS (3 |p| (1 + |log p|) +
    3 |t log p|)``. A perturbed input (a one-pixel shift of the prediction, target and prediction
    swapped) must fail the same bound."""
    pred, tgt = io_gs1["ae_pred_intensity"].ravel(), io_gs1["target_intensity"].ravel()
    x64 = _nll_terms64(pred, tgt)
    bound_ours = poisson_nll_elementwise_bound(pred, tgt)
    bound_tf = poisson_nll_elementwise_bound(pred, tgt, tf_form=True)
    per_element = jax.jit(jax.vmap(ph.poisson_nll))

    def ours(p, t):
        return np.asarray(per_element(p[:, None], t[:, None]), np.float64)

    assert np.all(np.abs(ours(pred, tgt) - x64) <= bound_ours)
    assert np.all(np.abs(io_gs1["nll_elementwise"].ravel().astype(np.float64) - x64) <= bound_tf)
    for bad_pred, bad_tgt in ((np.roll(pred, 1), tgt), (tgt + 1, pred)):
        assert not np.all(np.abs(ours(bad_pred, bad_tgt) - x64) <= bound_ours)


def test_poisson_nll_parity(io_gs1):
    """Mean Poisson NLL, ours and TF's, against the float64 mean of the same float32 inputs.

    Bound: ``numerics.mean_error_bound`` of the exact terms (independent of the summation order:
    the Higham-Mary probabilistic bound ``~lam sqrt(n) u sum|x| / n``, failure probability 1e-6,
    n = 65,536: 1.1e-4 relative here; XLA and TF reduce in CPU-dependent orders, XLA seen 1.1e-5
    off on AVX-512, a fully sequential float32 sum 4.3e-5) plus the mean of the elementwise bounds
    of ``test_poisson_nll_elementwise_parity`` (TF's form, the larger; 7.8e-7 relative). TF's
    elementwise terms, averaged in float64, are held to the elementwise bound alone. A one-pixel
    shift of the prediction (2.8e-2 relative) and swapping prediction and target (6.3e-3) must
    fail the same bound."""
    pred, tgt = io_gs1["ae_pred_intensity"], io_gs1["target_intensity"]
    x64 = _nll_terms64(pred, tgt)
    m64 = float(x64.mean())
    elem = float(poisson_nll_elementwise_bound(pred, tgt, tf_form=True).mean())
    bound = mean_error_bound(x64) + elem
    assert abs(float(ph.poisson_nll(pred, tgt)) - m64) <= bound
    assert abs(float(io_gs1["loss_nll_mean_manual"]) - m64) <= bound
    assert abs(float(io_gs1["nll_elementwise"].astype(np.float64).mean()) - m64) <= elem
    for bad_pred, bad_tgt in ((np.roll(pred, 1, axis=2), tgt), (tgt + 1, pred)):
        assert abs(float(ph.poisson_nll(bad_pred, bad_tgt)) - m64) > bound


# ---------------------------------------------------------------------------------- properties
@settings(max_examples=15, deadline=None)
@given(N=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**31 - 1))
def test_parseval(N, seed):
    f = _rand_field(np.random.default_rng(seed), N)
    inten = np.asarray(ph.diffraction_intensity(f), np.float64)
    np.testing.assert_allclose(inten.sum(), (np.abs(f.astype(np.complex128)) ** 2).sum(), rtol=1e-5)
    amp = np.asarray(ph.diffraction_amplitude(f), np.float64)
    np.testing.assert_allclose(amp ** 2, inten, rtol=1e-5, atol=1e-6 * inten.max())


def test_fft_convention_dc_position_and_no_preshift():
    N = 16
    # constant field: all energy at DC, which sits at [N/2, N/2]
    a = np.asarray(ph.diffraction_amplitude(jnp.ones((N, N), jnp.complex64)))
    assert np.unravel_index(np.argmax(a), a.shape) == (N // 2, N // 2)
    np.testing.assert_allclose(a[N // 2, N // 2], N, rtol=1e-6)   # sqrt(N^4 / N^2)
    # a real-space shift only changes the phase of F: amplitude unchanged (no ifftshift needed)
    f = _rand_field(np.random.default_rng(0), N)
    np.testing.assert_allclose(np.asarray(ph.diffraction_amplitude(np.roll(f, (3, 5), (0, 1)))),
                               np.asarray(ph.diffraction_amplitude(f)), rtol=1e-4, atol=1e-4)
    # matches an independent numpy evaluation
    ref = np.sqrt(np.fft.fftshift(np.abs(np.fft.fft2(f.astype(np.complex128))) ** 2 / N**2))
    np.testing.assert_allclose(np.asarray(ph.diffraction_amplitude(f)), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- illumination
def _np_smooth(field, sigma):
    k = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * sigma**2))
    k /= k.sum()
    k2 = np.outer(k, k)
    out = np.zeros(field.shape, np.complex128)
    for part, unit in ((field.real, 1), (field.imag, 1j)):
        p = np.pad(part.astype(np.float64), 1, mode="reflect")
        acc = np.zeros(field.shape)
        H, W = field.shape
        for i in range(3):
            for j in range(3):
                acc += k2[i, j] * p[i : i + H, j : j + W]
        out += unit * acc
    return out


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_smooth_complex(sigma):
    f = _rand_field(np.random.default_rng(1), 12)
    out = np.asarray(ph.gaussian_smooth_complex(f, sigma))
    assert out.dtype == np.complex64
    np.testing.assert_allclose(out, _np_smooth(f, sigma), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(ph.gaussian_kernel_1d(sigma).sum()), 1.0, rtol=1e-6)


def test_illuminate_order_and_options():
    N = 16
    rng = np.random.default_rng(2)
    probe, patch = _rand_field(rng, N), _rand_field(rng, N)
    np.testing.assert_allclose(np.asarray(ph.illuminate(probe, patch)), probe * patch, rtol=1e-6)
    m = np.asarray(probe_mask(N))
    out = np.asarray(ph.illuminate(probe, patch, smoothing_sigma=1.0, mask=m))
    np.testing.assert_allclose(out, m * _np_smooth(probe * patch, 1.0), rtol=1e-5, atol=1e-5)
    assert out.dtype == np.complex64
    with pytest.raises(ValueError, match="probe and patch"):
        ph.illuminate(probe, patch[:8])


# ---------------------------------------------------------------------------------- losses
def test_poisson_nll_formula_and_eps():
    pred = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    tgt = np.array([[0.0, 1.0], [2.0, 5.0]], np.float32)
    expected = np.mean(pred - tgt * np.log(pred))
    np.testing.assert_allclose(float(ph.poisson_nll(pred, tgt)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(ph.poisson_nll(pred, tgt, eps=1e-3)),
                               np.mean(pred - tgt * np.log(pred + 1e-3)), rtol=1e-5)
    # gradient wrt pred is 1 - t/p (per element / count)
    g = np.asarray(jax.grad(ph.poisson_nll)(jnp.asarray(pred), jnp.asarray(tgt)))
    np.testing.assert_allclose(g, (1 - tgt / pred) / pred.size, rtol=1e-6)


def test_mean_absolute_error():
    a = np.array([1.0, -2.0, 3.0], np.float32)
    b = np.array([0.0, 0.0, 0.0], np.float32)
    np.testing.assert_allclose(float(ph.mean_absolute_error(a, b)), 2.0)
    c = np.array([3 + 4j], np.complex64)
    np.testing.assert_allclose(float(ph.mean_absolute_error(c, np.zeros(1, np.float32))), 5.0, rtol=1e-6)


def test_realspace_loss():
    B, N = 2, 16
    rng = np.random.default_rng(3)
    pred = (rng.standard_normal((B, N, N, 1)) + 1j * rng.standard_normal((B, N, N, 1))).astype(np.complex64)
    tgt = rng.random((B, N, N, 1)).astype(np.float32)
    assert float(ph.realspace_loss(pred, tgt, probe_big=True, realspace_mae_weight=0.0)) == 0.0
    mae = np.mean(np.abs(pred - tgt))
    np.testing.assert_allclose(float(ph.realspace_loss(pred, tgt, probe_big=True, realspace_mae_weight=2.0)),
                               2 * mae, rtol=1e-5)
    cm = np.asarray(center_mask(N))[None, :, :, None]
    mae_masked = np.mean(np.abs(pred * cm - tgt))
    np.testing.assert_allclose(float(ph.realspace_loss(pred, tgt, probe_big=False, realspace_mae_weight=1.0)),
                               mae_masked, rtol=1e-5)
    p = pred[..., 0]
    tv = sum(np.sum(np.diff(part, axis=ax) ** 2) for part in (p.real, p.imag) for ax in (1, 2))
    np.testing.assert_allclose(float(ph.realspace_loss(pred, tgt, probe_big=True, realspace_mae_weight=0.0,
                                                       tv_weight=0.5)), 0.5 * tv, rtol=1e-5)


# ---------------------------------------------------------------------------------- poisson
def test_poisson_sample_statistics_and_large_rates():
    # one (4, 64, 64) call (the shape the forward-model test uses: one compile of the sampler)
    key = jax.random.key(0)
    amp = np.zeros((4, 64, 64), np.float32)
    amp[:2] = np.sqrt(50.0)
    amp[2] = 1e5                       # rate 1e10: normal-approximation branch
    c = np.asarray(ph.poisson_sample(key, jnp.asarray(amp)), np.float64) ** 2
    small = c[:2]
    np.testing.assert_allclose(small, np.round(small), atol=1e-3)
    assert abs(small.mean() - 50) < 0.5 and abs(small.var() - 50) < 5
    big = c[2]
    assert np.all(np.isfinite(big)) and abs(big.mean() - 1e10) < 5 * 1e5 / 64
    np.testing.assert_array_equal(c[3], 0.0)


# ---------------------------------------------------------------------------------- jit / shapes
# jit vs eager for every pure function of the module. Each function is wrapped in jax.jit ONCE
# (module level) so hypothesis only redraws values at fixed shapes: one compile per function.
_N = 16
_MASK = np.asarray(probe_mask(_N))


def _c(rng, *shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _pos(rng, *shape, lo=0.1):
    return (rng.random(shape) + lo).astype(np.float32)


_JIT_CASES = {
    # name: (function, rng -> args)
    "gaussian_kernel_1d": (ph.gaussian_kernel_1d, lambda r: (np.float32(0.3 + 2 * r.random()),)),
    "gaussian_smooth_complex": (lambda a: ph.gaussian_smooth_complex(a, 1.0), lambda r: (_c(r, _N, _N),)),
    "illuminate": (lambda a, b: ph.illuminate(a, b, smoothing_sigma=0.7, mask=_MASK),
                   lambda r: (_c(r, _N, _N), _c(r, _N, _N))),
    "diffraction_intensity": (ph.diffraction_intensity, lambda r: (_c(r, _N, _N),)),
    "diffraction_amplitude": (ph.diffraction_amplitude, lambda r: (_c(r, _N, _N),)),
    "scale_nphotons": (lambda a: ph.scale_nphotons(a, 1e6), lambda r: (_pos(r, 3, _N, _N, 1),)),
    "illuminate_and_diffract": (lambda a, b, c: ph.illuminate_and_diffract(a, b, c),
                                lambda r: (_pos(r, 3, _N, _N, 1), _pos(r, 3, _N, _N, 1), _c(r, _N, _N))),
    "illuminate_and_diffract_scale": (
        lambda a, b, c: ph.illuminate_and_diffract(a, b, c, intensity_scale=3.0),
        lambda r: (_pos(r, 3, _N, _N), _pos(r, 3, _N, _N), _c(r, _N, _N))),
    "poisson_nll": (ph.poisson_nll, lambda r: (_pos(r, 2, _N, _N, 1), _pos(r, 2, _N, _N, 1, lo=0))),
    "mean_absolute_error": (ph.mean_absolute_error, lambda r: (_c(r, 2, _N, _N, 1), _pos(r, 2, _N, _N, 1))),
    "total_variation_complex": (ph.total_variation_complex, lambda r: (_c(r, 2, _N, _N, 1),)),
    "realspace_loss": (lambda a, b: ph.realspace_loss(a, b, probe_big=False, realspace_mae_weight=1.0,
                                                      tv_weight=0.1),
                       lambda r: (_c(r, 2, _N, _N, 1), _pos(r, 2, _N, _N, 1))),
}
_JITTED = {name: jax.jit(fn) for name, (fn, _) in _JIT_CASES.items()}


# poisson_sample is jax.jit-decorated at definition, so its eager call already IS the jitted
# program (a second, nested compile of the costly sampler would only cost ~8 s); its statistics
# and key determinism are tested above.
_JIT_EXEMPT = {"poisson_sample"}


def test_jit_cases_cover_the_module():
    """Every public function of pinn_jax.physics is in the jit-vs-eager table (or exempt)."""
    assert set(ph.__all__) - _JIT_EXEMPT <= {n.removesuffix("_scale") for n in _JIT_CASES}
    assert hasattr(ph.poisson_sample, "lower")      # i.e. a jax.jit-wrapped function


@pytest.mark.parametrize("name", sorted(_JIT_CASES))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_with_and_without_jit(name, seed):
    """jax.jit(f)(x) == f(x) to rtol 2e-5 (+1e-6 of the max: XLA may fuse/reorder float ops)."""
    fn, make_args = _JIT_CASES[name]
    assert_jit_matches_eager(fn, _JITTED[name], make_args(np.random.default_rng(seed)), rtol=2e-5)


@pytest.mark.parametrize("N", [64, 128, 256])
def test_shapes_and_dtypes(N):
    """Shapes/dtypes at every supported N, evaluated abstractly (jax.eval_shape: no compile)."""
    f32, c64 = jnp.float32, jnp.complex64
    probe = jax.ShapeDtypeStruct((N, N), c64)
    patch = jax.ShapeDtypeStruct((N, N), c64)
    psi = jax.eval_shape(lambda p, x: ph.illuminate(p, x, smoothing_sigma=0.5, mask=probe_mask(N)), probe, patch)
    assert psi.shape == (N, N) and psi.dtype == c64
    a = jax.eval_shape(ph.diffraction_amplitude, psi)
    assert a.shape == (N, N) and a.dtype == f32
    batch = jax.eval_shape(jax.vmap(lambda x: ph.diffraction_amplitude(ph.illuminate(probe, x))),
                           jax.ShapeDtypeStruct((3, N, N), c64))
    assert batch.shape == (3, N, N) and batch.dtype == f32
    yi = jax.ShapeDtypeStruct((3, N, N, 1), f32)
    X, Y_I, Y_phi, s = jax.eval_shape(lambda a, b, p: ph.illuminate_and_diffract(a, b, p), yi, yi, probe)
    assert X.shape == Y_I.shape == Y_phi.shape == (3, N, N, 1) and X.dtype == f32 and s.shape == ()
    obj = jax.ShapeDtypeStruct((3, N, N, 1), c64)
    loss = jax.eval_shape(lambda o, t: ph.realspace_loss(o, t, probe_big=False, realspace_mae_weight=1.0,
                                                         tv_weight=1.0), obj, yi)
    assert loss.shape == () and loss.dtype == f32
