"""pinn-jax's own XLA:CPU kernel, built on the user's machine at first use.

:func:`conv_kernel_grad` is the kernel gradient of a stride-1 NHWC convolution
(``conv_kernel_grad.cc``, an XLA FFI handler). XLA:CPU computes that gradient as an Eigen
convolution over the batch after transposing the input, ~100-160 GFLOP/s on the PtychoPINN
CNN's layers where the forward convolutions run at ~290 in oneDNN; the handler is a
register-tiled matrix product over the positions, split over the cores.

It is compiled from the shipped source with the host's C++ compiler (``$CXX``, else ``g++``,
``c++`` or ``clang++``; ``-O3 -march=native`` against jaxlib's FFI headers) into a cache
directory (``$PINN_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/pinn_jax``, else
``~/.cache/pinn_jax``), named by a hash of everything the binary depends on (source, jaxlib,
compiler, flags, CPU), and written atomically (``backend_api.fileio``). A new build is checked
against XLA's own gradient in a child process before use (a fault in native code would end the
process; a passing check is recorded beside the library). Where there is no compiler, the build
or the check fails, jax computes elsewhere than on one CPU device (under a data-parallel mesh
XLA would gather the batch into the call), or ``PINN_JAX_NATIVE=0``, :func:`conv_kernel_grad`
is XLA's own gradient. ``PINN_JAX_NATIVE=1`` skips the platform checks (not the build).
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

__all__ = ["ENV", "cache_dir", "conv_kernel_grad", "enabled", "library_path", "self_test"]

ENV = "PINN_JAX_NATIVE"
_SOURCE = Path(__file__).with_name("conv_kernel_grad.cc")
_SYMBOL = "PinnJaxConvKernelGrad"
_TARGET = "pinn_jax_conv_kernel_grad"
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
    parts = [_SOURCE.read_bytes(), jaxlib.__version__.encode(), compiler.encode(), version.encode(),
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
        cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        fileio.write_bytes(target, out.read_bytes())


@functools.cache
def library_path() -> Path | None:
    """The built library for this host (building it, and checking a new build in a child
    process, on first call), or None where it cannot be built or fails its check."""
    compiler = _compiler()
    if compiler is None or not _SOURCE.exists():
        return None
    path = cache_dir() / f"conv_kernel_grad-{_build_key(compiler)}.so"
    marker = path.with_suffix(".checked")
    try:
        if not path.exists():
            _build(compiler, path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"pinn-jax: the native kernel gradient was not built ({err}); XLA's is used",
                      RuntimeWarning, stacklevel=2)
        return None
    if os.environ.get("_PINN_JAX_NATIVE_CHECKING") == "1" or marker.exists():
        return path
    # the child, started with this environment, finds this library and checks it (and does not
    # start a check of its own)
    if not self_test_in_child(__name__, {"_PINN_JAX_NATIVE_CHECKING": "1", ENV: "1"}, timeout=600):
        warnings.warn(f"pinn-jax: the native kernel gradient {path} failed its check against XLA's; XLA's is used",
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
        handler = getattr(lib, _SYMBOL)
    except (OSError, AttributeError) as err:  # e.g. a cache on a noexec mount
        warnings.warn(f"pinn-jax: the native kernel gradient {path} could not be loaded ({err}); XLA's is used",
                      RuntimeWarning, stacklevel=2)
        return False
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler), platform="cpu")
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
    return True
