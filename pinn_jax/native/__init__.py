"""pinn-jax's own XLA:CPU kernels, built on the user's machine at first use.

* :func:`conv_kernel_grad` is the kernel gradient of a stride-1 NHWC convolution
  (``conv_kernel_grad.cc``, an XLA FFI handler). XLA:CPU computes that gradient as an Eigen
  convolution over the batch after transposing the input, ~100-160 GFLOP/s on the PtychoPINN
  CNN's layers where the forward convolutions run at ~290 in oneDNN; the handler is a
  register-tiled matrix product over the positions, split over the cores.
* :func:`conv3x3_winograd` is a 'same' 3x3 convolution (optionally with bias and ReLU, or the
  input gradient's form) by Winograd's minimal filtering (``conv_winograd.cc``): F(4x4, 3x3),
  2.25 products per output pixel and channel pair instead of 9, or F(2x2, 3x3), 4, on small
  images (:func:`winograd_tile`); faster than oneDNN's direct convolution on the CNN's larger
  layers (:func:`winograd_suits` says which; ``benchmarks/README.md`` has the figures). Its
  values differ from the direct sum's by float32 roundings of the transformed terms (bounded,
  :func:`_winograd_bound`, and tested in ``tests/test_native_winograd.py``);
  ``PINN_JAX_WINOGRAD=0`` turns it off.

They are compiled from the shipped sources with the host's C++ compiler (``$CXX``, else ``g++``,
``c++`` or ``clang++``; ``-O3 -march=native`` against jaxlib's FFI headers) into a cache
directory (``$PINN_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/pinn_jax``, else
``~/.cache/pinn_jax``), named by a hash of everything the binary depends on (source, jaxlib,
compiler, flags, CPU), and written atomically (``backend_api.fileio``). A new build is checked
against XLA's own gradient in a child process before use (a fault in native code would end the
process; a passing check is recorded beside the library). Where there is no compiler, the build
or the check fails, jax computes elsewhere than on one CPU device (under a data-parallel mesh
XLA would gather the batch into the call), or ``PINN_JAX_NATIVE=0``, :func:`conv_kernel_grad`
is XLA's own gradient and :func:`conv3x3_winograd` XLA's convolution. ``PINN_JAX_NATIVE=1``
skips the platform checks (not the build).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from backend_api import fileio
from pinn_jax.runtime import self_test_in_child, switched_off, switched_on

__all__ = ["ENV", "WINOGRAD_ENV", "cache_dir", "conv3x3_winograd", "conv3x3_winograd_kernel_grad", "conv_kernel_grad",
           "enabled", "library_path", "self_test", "winograd_enabled", "winograd_suits", "winograd_tile"]

ENV = "PINN_JAX_NATIVE"
WINOGRAD_ENV = "PINN_JAX_WINOGRAD"
_SOURCES = (Path(__file__).with_name("conv_kernel_grad.cc"), Path(__file__).with_name("conv_winograd.cc"))
# FFI handler symbol -> the target name it is registered under
_TARGETS = {"PinnJaxConvKernelGrad": "pinn_jax_conv_kernel_grad", "PinnJaxConvWinograd": "pinn_jax_conv_winograd",
            "PinnJaxConvWinogradKernelGrad": "pinn_jax_conv_winograd_kernel_grad"}
_TARGET = _TARGETS["PinnJaxConvKernelGrad"]
_WINOGRAD_TARGET = _TARGETS["PinnJaxConvWinograd"]
_WINOGRAD_KERNEL_GRAD_TARGET = _TARGETS["PinnJaxConvWinogradKernelGrad"]
_SAME = ((1, 1), (1, 1))
# Winograd runs a layer from this many multiply-adds per tap (B * H * W * Ci * Co): at batch 16
# the CNN's smallest layers (8 x 8 x 128 -> 128, 16 x 16 x 64 -> 64; 2^24) still ran 1.15-1.25x
# faster than oneDNN's direct convolution (forward + input gradient), the larger ones 1.4-2.1x
# (benchmarks/README.md); below, the calls' fixed costs (threads, the kernel transform) weigh more
WINOGRAD_MIN_MACS_PER_TAP = 1 << 24
# Image sides from which it uses F(4x4, 3x3) rather than F(2x2, 3x3) (:func:`winograd_tile`):
# on 8 x 8 maps F(4x4, 3x3)'s 4 tiles an image, each with a 6 x 6 patch, ran 1.4-1.5x slower
WINOGRAD_F4_MIN_SIZE = 16
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def cache_dir() -> Path:
    """Where built libraries are kept: ``$PINN_JAX_CACHE_DIR``, ``$XDG_CACHE_HOME/pinn_jax`` or
    ``~/.cache/pinn_jax``, then ``native/``."""
    root = os.environ.get("PINN_JAX_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pinn_jax"
    return Path(root) / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU's model and feature flags (``-march=native`` builds for them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(lines)))


def _build_key(compiler: str) -> str:
    import jaxlib

    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    parts = [*(src.read_bytes() for src in _SOURCES), jaxlib.__version__.encode(), compiler.encode(), version.encode(),
             " ".join(_FLAGS).encode(), platform.machine().encode(), _cpu_signature().encode()]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part + b"\0")
    return digest.hexdigest()[:20]


def _build(compiler: str, target: Path) -> None:
    """Compile into a private temporary folder, then write the library into place atomically
    (``backend_api.fileio``: a concurrent build or a reader never sees half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with fileio.writer_temp_dir(target.parent, ".build-") as tmp:
        out = tmp / target.name
        cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), *(str(src) for src in _SOURCES), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        fileio.write_bytes(target, out.read_bytes())


@functools.cache
def library_path() -> Path | None:
    """The built library for this host (building it, and checking a new build in a child
    process, on first call), or None where it cannot be built or fails its check."""
    compiler = _compiler()
    if compiler is None or not all(src.exists() for src in _SOURCES):
        return None
    path = cache_dir() / f"kernels-{_build_key(compiler)}.so"
    marker = path.with_suffix(".checked")
    try:
        if not path.exists():
            _build(compiler, path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"pinn-jax: the native kernels were not built ({err}); XLA's are used",
                      RuntimeWarning, stacklevel=2)
        return None
    if os.environ.get("_PINN_JAX_NATIVE_CHECKING") == "1" or marker.exists():
        return path
    # the child, started with this environment, finds this library and checks it (and does not
    # start a check of its own)
    if not self_test_in_child(__name__, {"_PINN_JAX_NATIVE_CHECKING": "1", ENV: "1"}, timeout=600):
        warnings.warn(f"pinn-jax: the native kernels {path} failed their check against XLA's; XLA's are used",
                      RuntimeWarning, stacklevel=2)
        return None
    try:
        fileio.write_bytes(marker, b"self_test passed\n")
    except OSError:
        pass
    return path


@functools.cache
def _registered() -> bool:
    path = library_path()
    if path is None:
        return False
    try:
        lib = ctypes.CDLL(str(path))
        handlers = {target: getattr(lib, symbol) for symbol, target in _TARGETS.items()}
    except (OSError, AttributeError) as err:  # e.g. a cache on a noexec mount
        warnings.warn(f"pinn-jax: the native kernels {path} could not be loaded ({err}); XLA's are used",
                      RuntimeWarning, stacklevel=2)
        return False
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return True


def enabled() -> bool:
    """Whether :func:`conv_kernel_grad` runs the native kernel (read when a function is traced):
    ``PINN_JAX_NATIVE`` off -> no; on -> wherever it builds; unset -> on Linux with jax computing
    on one CPU device, where it builds and passes its check."""
    setting = os.environ.get(ENV)
    if switched_off(setting):
        return False
    forced = switched_on(setting)
    if not forced and (not sys.platform.startswith("linux") or jax.default_backend() != "cpu"
                       or jax.device_count() != 1):
        return False
    return _registered()


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _xla_kernel_grad(x, g, kernel_hw, padding):
    kernel = jnp.zeros((*kernel_hw, x.shape[-1], g.shape[-1]), x.dtype)

    def conv(k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_DIMENSION_NUMBERS)

    return jax.vjp(conv, kernel)[1](g)[0]


def conv_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int],
                     padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The gradient, with respect to the kernel, of
    ``lax.conv_general_dilated(x, kernel, (1, 1), padding)`` (NHWC / HWIO) for the output
    gradient ``g``: ``x (B, H, W, Ci)``, ``g (B, Ho, Wo, Co)``, ``kernel_hw (kh, kw)``,
    ``padding ((top, bottom), (left, right))`` -> ``(kh, kw, Ci, Co)``. The native kernel where
    :func:`enabled` and both are float32, else XLA's; the same sums in another float32 order."""
    kh, kw = (int(v) for v in kernel_hw)
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    if min(min(p) for p in padding) < 0:
        raise ValueError(f"conv_kernel_grad: negative padding {padding}")
    if x.ndim != 4:
        raise ValueError(f"conv_kernel_grad: x of shape {x.shape}, expected (B, H, W, Ci)")
    b, h, w, _ = x.shape
    want = (b, h + sum(padding[0]) - kh + 1, w + sum(padding[1]) - kw + 1)
    if g.ndim != 4 or tuple(g.shape[:3]) != want:
        raise ValueError(f"conv_kernel_grad: g of shape {g.shape}, expected {want} + (Co,) for x {x.shape}, "
                         f"a {kh}x{kw} kernel and padding {padding}")
    if x.dtype != jnp.float32 or g.dtype != jnp.float32 or not enabled():
        return _xla_kernel_grad(x, g, (kh, kw), padding)
    out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], g.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")
    return call(x, g, pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]),
                threads=np.int64(_threads()))


def winograd_enabled() -> bool:
    """Whether :func:`conv3x3_winograd` may run the native kernel (read when a function is
    traced): where :func:`enabled`, unless ``PINN_JAX_WINOGRAD`` is off."""
    return not switched_off(os.environ.get(WINOGRAD_ENV)) and enabled()


def winograd_suits(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], padding, *,
                   transpose_kernel: bool = False) -> bool:
    """Whether :func:`conv3x3_winograd` takes a layer, judged by static shapes (the caller then
    uses it; elsewhere oneDNN's or XLA's convolution): a 4-d ``x``, a 3x3 kernel, 'same'
    padding, input and output channels multiples of 16 (the kernel's vector width), at least
    ``WINOGRAD_MIN_MACS_PER_TAP`` multiply-adds per tap, and :func:`winograd_enabled`.
    ``transpose_kernel``: the kernel is read as for an input gradient, ``(3, 3, Co, Ci)``."""
    if len(x_shape) != 4 or len(kernel_shape) != 4 or tuple(kernel_shape[:2]) != (3, 3):
        return False
    if tuple(tuple(int(v) for v in p) for p in padding) != _SAME:
        return False
    ci, co = (kernel_shape[3], kernel_shape[2]) if transpose_kernel else kernel_shape[2:]
    if x_shape[3] != ci or ci % 16 or co % 16:
        return False
    if x_shape[0] * x_shape[1] * x_shape[2] * ci * co < WINOGRAD_MIN_MACS_PER_TAP:
        return False
    return winograd_enabled()


def winograd_tile(x_shape: tuple[int, ...]) -> int:
    """The output tile :func:`conv3x3_winograd` uses for an input of this shape: 4 (F(4x4, 3x3),
    36 / 16 = 2.25 products per output pixel and channel pair) where the image is at least
    ``WINOGRAD_F4_MIN_SIZE`` on both sides, else 2 (F(2x2, 3x3), 4 products, fewer roundings)."""
    return 4 if min(x_shape[1], x_shape[2]) >= WINOGRAD_F4_MIN_SIZE else 2


def _xla_same_conv(x, kernel, bias, relu, transpose_kernel):
    if transpose_kernel:
        kernel = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), _SAME, dimension_numbers=_DIMENSION_NUMBERS)
    if bias is not None:
        y = y + bias
    return jax.nn.relu(y) if relu else y


def conv3x3_winograd(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, relu: bool = False,
                     transpose_kernel: bool = False, tile: int | None = None) -> jax.Array:
    """``act(conv(x, kernel) + bias)``, 'same', stride 1, NHWC / HWIO: ``x (B, H, W, Ci)``,
    ``kernel (3, 3, Ci, Co)``, ``bias (Co,)`` or None -> ``(B, H, W, Co)``; ``act`` is ReLU
    with ``relu``. With ``transpose_kernel`` the kernel is ``(3, 3, Co, Ci)`` and is applied
    flipped in space with its channels swapped: the input gradient of a 'same' convolution by
    that kernel, for the output gradient ``x``.

    By Winograd's F(m x m, 3x3), ``m = tile`` (2 or 4; by default :func:`winograd_tile`), in the
    native kernel where :func:`winograd_enabled` and all are float32 with channels multiples of
    16 (call it where :func:`winograd_suits` says it pays); XLA's convolution otherwise. Not
    differentiable itself: :mod:`pinn_jax.models.conv` gives the gradients."""
    if tile not in (None, 2, 4):
        raise ValueError(f"conv3x3_winograd: tile {tile!r}, expected 2 or 4 (or None)")
    if x.ndim != 4 or kernel.ndim != 4 or tuple(kernel.shape[:2]) != (3, 3):
        raise ValueError(f"conv3x3_winograd: x of shape {x.shape} and kernel of shape {kernel.shape}, "
                         "expected (B, H, W, Ci) and (3, 3, Ci, Co)")
    ci, co = (kernel.shape[3], kernel.shape[2]) if transpose_kernel else kernel.shape[2:]
    if x.shape[3] != ci or (bias is not None and tuple(bias.shape) != (co,)):
        raise ValueError(f"conv3x3_winograd: x of shape {x.shape}, kernel {kernel.shape} "
                         f"(transpose_kernel={transpose_kernel}) and bias {None if bias is None else bias.shape} "
                         f"do not agree: expected x (..., {ci}) and bias ({co},)")
    arrays = (x, kernel) if bias is None else (x, kernel, bias)
    if ci % 16 or co % 16 or any(a.dtype != jnp.float32 for a in arrays) or not winograd_enabled():
        return _xla_same_conv(x, kernel, bias, relu, transpose_kernel)
    if tile is None:
        tile = winograd_tile(x.shape)
    call = jax.ffi.ffi_call(_WINOGRAD_TARGET, jax.ShapeDtypeStruct((*x.shape[:3], co), jnp.float32),
                            vmap_method="sequential")
    return call(x, kernel, jnp.zeros((co,), jnp.float32) if bias is None else bias, flip=transpose_kernel,
                swap_io=transpose_kernel, relu=bool(relu), tile=np.int64(tile), threads=np.int64(_threads()))


# F(m x m, 3x3)'s matrices B^T, G, A^T by output tile m (as in conv_winograd.cc)
_WINOGRAD_MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)),
}


def _stage_roundings(mat: np.ndarray) -> int:
    """Roundings one stage of a transform (``out = mat @ in``, applied to columns or rows) adds
    to a term, at most: one per nonzero coefficient of ``mat``'s widest row plus one for its
    product, plus one if a coefficient is not exact in float32 (G's 1/6, 1/12, 1/24)."""
    exact = all(float(np.float32(v)) == v for v in mat.ravel())
    return int(np.count_nonzero(mat, axis=1).max()) + 1 + (0 if exact else 1)


def _winograd_roundings(tile: int, ci: int) -> int:
    """How many float32 roundings a term of :func:`conv3x3_winograd`'s sum passes through, at
    most: two stages each of the input (``B^T``), kernel (``G``) and output (``A^T``)
    transforms (:func:`_stage_roundings`), ``ci`` in the accumulation over input channels, one
    for the bias."""
    bt, g, at = _WINOGRAD_MATRICES[tile]
    return 2 * (_stage_roundings(bt) + _stage_roundings(g) + _stage_roundings(at)) + ci + 1


def _winograd_kernel_grad_roundings(tile: int, tiles: int, threads: int) -> int:
    """The same for :func:`conv3x3_winograd_kernel_grad`: two stages each of the input
    (``B^T``), output-gradient (``A``) and final (``G^T``) transforms, the accumulation over
    ``tiles`` tiles and the sum of up to ``threads`` partial sums."""
    bt, g, at = _WINOGRAD_MATRICES[tile]
    return 2 * (_stage_roundings(bt) + _stage_roundings(at.T) + _stage_roundings(g.T)) + tiles + threads


def _winograd_bound(x, kernel, bias=None, transpose_kernel=False, tile=None) -> np.ndarray:
    """An elementwise bound on :func:`conv3x3_winograd`'s distance from the exact value, float64
    on the host (for tests and the self-test); ``tile`` as the call chose it
    (:func:`winograd_tile` by default).

    To first order in float32's unit roundoff ``eps``, every term of the sum carries at most
    ``r * eps`` of relative error, ``r`` from :func:`_winograd_roundings` (F(2x2, 3x3): ``Ci +
    23``; F(4x4, 3x3): ``Ci + 33``). So the output's error is at most ``r * eps`` times ``W``, the
    same transforms computed on absolute values (``|A|^T (sum over Ci of (|B|^T |d| |B|) .
    (|G| |k| |G|^T)) |A|``) plus ``|bias|`` (``W`` is at least the direct sum of absolute values;
    F(4x4, 3x3)'s larger coefficients make it larger, which is its known loss of accuracy)."""
    x = np.abs(np.asarray(x, np.float64))
    k = np.abs(np.asarray(kernel, np.float64))
    if transpose_kernel:
        k = k[::-1, ::-1].transpose(0, 1, 3, 2)
    b, h, w, ci = x.shape
    if tile is None:
        tile = winograd_tile(x.shape)
    bt, gm, at = (np.abs(mat) for mat in _WINOGRAD_MATRICES[tile])
    v = np.einsum("ia,nyaxsc,js->nyxijc", bt, _tile_patches(x, tile, tile + 2, 1), bt)
    u = np.einsum("ia,asco,js->ijco", gm, k, gm)
    m = np.einsum("nyxijc,ijco->nyxijo", v, u)
    th, tw = m.shape[1], m.shape[2]
    y = np.einsum("pi,nyxijo,qj->nypxqo", at, m, at).reshape(b, tile * th, tile * tw, -1)[:, :h, :w]
    if bias is not None:
        y = y + np.abs(np.asarray(bias, np.float64))
    return _winograd_roundings(tile, ci) * float(np.finfo(np.float32).eps) * y


def _exact_same_conv(x, kernel, bias=None, transpose_kernel=False) -> np.ndarray:
    """The 'same' 3x3 convolution (plus bias) in float64 on the host: the reference for
    :func:`_winograd_bound`."""
    x = np.asarray(x, np.float64)
    k = np.asarray(kernel, np.float64)
    if transpose_kernel:
        k = k[::-1, ::-1].transpose(0, 1, 3, 2)
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + w], k[i, j]) for i in range(3) for j in range(3))
    return y if bias is None else y + np.asarray(bias, np.float64)


def _exact_kernel_grad(x, g) -> np.ndarray:
    """The 'same' 3x3 convolution's kernel gradient in float64 on the host."""
    x = np.asarray(x, np.float64)
    g = np.asarray(g, np.float64)
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.stack([np.stack([np.einsum("bhwc,bhwo->co", xp[:, i:i + h, j:j + w], g) for j in range(3)])
                     for i in range(3)])


def _tile_patches(x: np.ndarray, tile: int, size: int, offset: int) -> np.ndarray:
    """``x (b, h, w, c)`` zero-padded and cut into its tiles' ``size x size`` patches (tile
    ``(ty, tx)`` starts at ``tile * (ty, tx) - offset``): ``(b, th, size, tw, size, c)``."""
    b, h, w, c = x.shape
    th, tw = -(-h // tile), -(-w // tile)
    xp = np.zeros((b, tile * th + size, tile * tw + size, c))
    xp[:, offset:offset + h, offset:offset + w] = x
    idx_y = tile * np.arange(th)[:, None] + np.arange(size)[None, :]
    idx_x = tile * np.arange(tw)[:, None] + np.arange(size)[None, :]
    return xp[:, idx_y][:, :, :, idx_x]


def _winograd_kernel_grad_bound(x, g, tile=None, threads=2) -> np.ndarray:
    """An elementwise bound on :func:`conv3x3_winograd_kernel_grad`'s distance from the exact
    kernel gradient (float64, host): :func:`_winograd_kernel_grad_roundings` times ``eps``
    times the same sum on absolute values, ``|G|^T (sum over tiles of (|B|^T |d| |B|) .
    (|A| |g| |A|^T)) |G|`` (as :func:`_winograd_bound` for the forward)."""
    x = np.abs(np.asarray(x, np.float64))
    g = np.abs(np.asarray(g, np.float64))
    if tile is None:
        tile = winograd_tile(x.shape)
    bt, gm, at = (np.abs(mat) for mat in _WINOGRAD_MATRICES[tile])
    v = np.einsum("ia,nyaxsc,js->nyxijc", bt, _tile_patches(x, tile, tile + 2, 1), bt)
    gt = np.einsum("ai,nyaxso,sj->nyxijo", at, _tile_patches(g, tile, tile, 0), at)
    sums = np.einsum("nyxijc,nyxijo->ijco", v, gt)
    w = np.einsum("ai,abco,bj->ijco", gm, sums, gm)
    tiles = v.shape[0] * v.shape[1] * v.shape[2]
    return _winograd_kernel_grad_roundings(tile, tiles, threads) * float(np.finfo(np.float32).eps) * w


def conv3x3_winograd_kernel_grad(x: jax.Array, g: jax.Array, tile: int | None = None) -> jax.Array:
    """The kernel gradient of a 'same' 3x3 stride-1 convolution, NHWC / HWIO: ``x (B, H, W, Ci)``,
    the output gradient ``g (B, H, W, Co)`` -> ``(3, 3, Ci, Co)``; :func:`conv_kernel_grad`'s
    value with 'same' padding.

    By Winograd's F(m x m, 3x3) adjoint, ``m = tile`` (as :func:`conv3x3_winograd`): per tile,
    ``(B^T d B) . (A g A^T)`` summed over the tiles, then ``G^T (.) G``; 4 (m = 2) or 2.25
    (m = 4) products per position and channel pair instead of 9. In the native kernel where
    :func:`winograd_enabled` and both are float32 with channels multiples of 16 (call it where
    :func:`winograd_suits` says it pays); XLA's gradient otherwise."""
    if x.ndim != 4 or g.ndim != 4 or tuple(x.shape[:3]) != tuple(g.shape[:3]):
        raise ValueError(f"conv3x3_winograd_kernel_grad: x of shape {x.shape} and g of shape {g.shape}, "
                         "expected (B, H, W, Ci) and (B, H, W, Co)")
    if tile not in (None, 2, 4):
        raise ValueError(f"conv3x3_winograd_kernel_grad: tile {tile!r}, expected 2 or 4 (or None)")
    ci, co = x.shape[3], g.shape[3]
    if ci % 16 or co % 16 or x.dtype != jnp.float32 or g.dtype != jnp.float32 or not winograd_enabled():
        return _xla_kernel_grad(x, g, (3, 3), _SAME)
    call = jax.ffi.ffi_call(_WINOGRAD_KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct((3, 3, ci, co), jnp.float32),
                            vmap_method="sequential")
    return call(x, g, tile=np.int64(winograd_tile(x.shape) if tile is None else tile), threads=np.int64(_threads()))


def self_test() -> bool:
    """Whether the native kernel gives XLA's kernel gradients, to float32 summation order, on
    shapes that reach every code path (channel remainders, a 2x2 kernel, uneven padding)."""
    if not _registered():
        return False
    rng = np.random.default_rng(0)
    cases = [((2, 5, 7, 3), 5, 3, ((1, 1), (1, 1))), ((3, 6, 4, 13), 37, 2, ((1, 1), (1, 1))),
             ((2, 8, 8, 16), 80, 3, ((0, 2), (2, 1))), ((1, 9, 9, 1), 64, 3, ((1, 1), (1, 1))),
             ((4, 16, 16, 8), 128, 3, ((1, 1), (1, 1)))]
    for shape, co, k, padding in cases:
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        b, h, w, _ = shape
        g = jnp.asarray(rng.standard_normal((b, h + sum(padding[0]) - k + 1, w + sum(padding[1]) - k + 1, co)),
                        jnp.float32)
        out = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((k, k, shape[-1], co), jnp.float32))(
            x, g, pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]), threads=np.int64(2))
        want = _xla_kernel_grad(x, g, (k, k), padding)
        scale = _xla_kernel_grad(jnp.abs(x), jnp.abs(g), (k, k), padding)
        n = b * g.shape[1] * g.shape[2]
        if out.shape != want.shape or not bool(jnp.all(jnp.abs(out - want) <= n * 1.2e-7 * scale + 1e-30)):
            return False
    # Winograd, both tiles: sizes not multiples of the tile, 16/32/64-wide output blocks, bias
    # and ReLU, the input-gradient form, blocks split over threads
    for shape, co, transpose, relu, tile in [((2, 5, 7, 16), 48, False, True, 2), ((3, 6, 6, 32), 16, True, False, 4),
                                             ((2, 9, 8, 64), 96, False, False, 2), ((2, 9, 10, 64), 96, False, True, 4),
                                             ((4, 16, 16, 16), 64, True, False, 2), ((4, 16, 16, 16), 64, True, False, 4)]:
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        k_shape = (3, 3, co, shape[-1]) if transpose else (3, 3, shape[-1], co)
        k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
        b = None if transpose else jnp.asarray(rng.standard_normal((co,)), jnp.float32)
        out = np.asarray(jax.ffi.ffi_call(_WINOGRAD_TARGET, jax.ShapeDtypeStruct((*shape[:3], co), jnp.float32))(
            x, k, jnp.zeros((co,), jnp.float32) if b is None else b, flip=transpose, swap_io=transpose, relu=relu,
            tile=np.int64(tile), threads=np.int64(2)))
        want = _exact_same_conv(x, k, b, transpose)
        if relu:
            want = np.maximum(want, 0.0)
        if out.shape != want.shape or not np.all(np.abs(out - want) <= _winograd_bound(x, k, b, transpose, tile)):
            return False
        if not transpose:  # its kernel gradient for an output gradient of the output's shape
            g = jnp.asarray(rng.standard_normal((*shape[:3], co)), jnp.float32)
            dk = np.asarray(jax.ffi.ffi_call(_WINOGRAD_KERNEL_GRAD_TARGET,
                                             jax.ShapeDtypeStruct((3, 3, shape[-1], co), jnp.float32))(
                x, g, tile=np.int64(tile), threads=np.int64(2)))
            exact = _exact_kernel_grad(x, g)
            if dk.shape != exact.shape or not np.all(np.abs(dk - exact) <= _winograd_kernel_grad_bound(x, g, tile)):
                return False
    return True
