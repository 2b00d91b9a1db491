"""Float32 error bounds used by the parity tests, derived from the computation (not tuned).

Why these and not a fixed ``rtol``: two programs that compute the same float32 expression
(ours under XLA, the reference under TensorFlow/Eigen, or ours compiled twice with different
XLA flags) round the same way element by element, but they do NOT add in the same order. XLA's
CPU emitter, YNNPACK and Eigen each split a reduction over a different number of vector lanes
and threads (4 lanes with SSE, 8 with AVX2, 16 with AVX-512), so a sum's rounding depends on the
host CPU. The bounds below do not depend on the order.

Notation: ``EPS`` = float32 machine epsilon 2**-23, ``U`` = unit round-off 2**-24 = EPS / 2.
"""

from __future__ import annotations

import numpy as np

EPS = float(np.finfo(np.float32).eps)
U = EPS / 2


def sum_error_bound(terms: np.ndarray, *, fail_prob: float = 1e-6) -> float:
    """Bound on ``|fl(sum(terms)) - sum(terms)|`` for a float32 sum in ANY order.

    Every order (sequential, pairwise, lane-split, threaded) is a tree of at most ``n - 1``
    dependent additions. The deterministic worst case ``gamma_{n-1} sum|x|`` (Higham eq. 4.4) is
    ~n u: 3.9e-3 for n = 2**16, 1.6e-2 for 2**18, too loose to tell a one-pixel shift of an image
    from round-off. Used instead: the probabilistic bound of Higham & Mary (SIAM J. Sci. Comput.
    41 (2019) A2815, Thm 3.1 / 4.2): modelling the round-offs as independent, mean-zero,
    ``|fl(s) - s| <= gamma~_{n-1}(lam) sum|x|`` with ``gamma~_k(lam) = exp(lam sqrt(k) u +
    k u^2 / (1 - u)) - 1`` holds with probability at least ``1 - 2 k exp(-lam^2 (1-u)^2 / 2)``;
    ``lam`` is chosen so that this failure probability is ``fail_prob``. It does not depend on the
    order, so not on the CPU's vector width nor on XLA / YNNPACK / Eigen (~1.1e-4 relative for
    n = 2**16; a fully sequential float32 sum of the gs1 NLL terms is off by 4.3e-5, XLA's on
    AVX-512 by 1.1e-5). ``terms``: the exact (float64) terms.
    """
    t = np.asarray(terms, np.float64).ravel()
    k = max(t.size - 1, 1)
    lam = np.sqrt(2.0 * np.log(2.0 * k / fail_prob)) / (1.0 - U)
    gamma_tilde = np.expm1(lam * np.sqrt(k) * U + k * U * U / (1.0 - U))
    return float(gamma_tilde) * float(np.abs(t).sum())


def mean_error_bound(terms: np.ndarray) -> float:
    """``sum_error_bound / n`` plus the one rounding of the division by ``n``."""
    t = np.asarray(terms).ravel()
    return sum_error_bound(t) / t.size + U * abs(float(np.asarray(t, np.float64).mean()))


def conv_net_tol(kernel_shapes) -> float:
    """Relative tolerance, w.r.t. the output's scale, for the output of a float32 conv net.

    Each output of a ``kh x kw x c_in`` convolution is a dot product of ``K = kh kw c_in``
    terms; with independent round-offs its error is about ``sqrt(K) u`` times the scale of the
    terms, and the errors of successive layers add in quadrature, so the network output carries
    ``sqrt(sum_l K_l) u`` of its scale. Two independent implementations (ours and TF's, or two
    XLA fusion settings) differ by up to twice one of them: ``sqrt(sum_l K_l) * EPS``. Summing
    ``K_l`` over every conv layer of the model (both decoder branches, not only the longest
    path) over-counts the serial depth, which keeps the bound conservative.

    ``kernel_shapes``: iterable of ``(kh, kw, c_in, c_out)`` kernel shapes.
    """
    total = sum(int(s[0]) * int(s[1]) * int(s[2]) for s in kernel_shapes)
    return float(np.sqrt(total)) * EPS


def within(ours, ref, *, rtol: float, atol: float) -> bool:
    """``|ours - ref| <= atol + rtol |ref|`` everywhere (shapes must match): the comparison of
    ``np.testing.assert_allclose``, as a bool so a test can assert that a perturbed input FAILS
    the same tolerance."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return bool(np.all(np.abs(ours.astype(np.complex128) - ref) <= atol + rtol * np.abs(ref)))


def poisson_nll_elementwise_bound(pred, tgt, *, tf_form: bool = False) -> np.ndarray:
    """Bound on the error of one float32 Poisson NLL term ``p - t log p`` (float64 array).

    With ``log`` accurate to 2 ulp (``|d log| <= 2 EPS |log p|``) and one rounding for each of
    ``*`` and ``-``: ``|err| <= EPS (|p| + 3 |t log p|)``. TF's ``log_poisson_loss`` evaluates
    ``exp(log p) - t log p``; ``exp`` (2 ulp) turns the log's absolute error into a relative
    error of ``p``: ``|err| <= EPS (3 |p| (1 + |log p|) + 3 |t log p|)`` (``tf_form=True``).
    """
    p, t = np.asarray(pred, np.float64), np.asarray(tgt, np.float64)
    tl = np.abs(t * np.log(p))
    if tf_form:
        return EPS * (3 * np.abs(p) * (1 + np.abs(np.log(p))) + 3 * tl)
    return EPS * (np.abs(p) + 3 * tl)


def model_conv_tol(model) -> float:
    """``conv_net_tol`` over every convolution kernel of a ``PtychoPINN`` (an nnx module)."""
    import jax
    from flax import nnx

    kernels = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model))
               if "kernel" in jax.tree_util.keystr(path)]
    return conv_net_tol(kernels)
