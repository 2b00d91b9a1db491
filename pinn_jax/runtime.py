"""XLA runtime settings for the CPU backend, applied before jax creates its backends.

XLA reads ``XLA_FLAGS`` once, when the first backend is initialised (the first ``jax.devices()``,
array or jitted call), not when ``jax`` is imported. :func:`configure_cpu_runtime` therefore
has to run before that. ``import pinn_jax`` does **not** call it (a library should not change
its host process on import): the entry points do (``pinn_jax.cli.main``, the benchmarks, the
ptychodus child through :meth:`pinn_jax.backend.JaxBackend.configure_runtime`), and a script
opts in with ``pinn_jax.configure_cpu_runtime()`` (re-exported by the package) before its
first jax computation. It only *adds* flags the user has not set: an entry already in
``XLA_FLAGS`` (``--name=value``, ``--name`` or ``--noname``) always wins.

What it sets, and why (measured on the 2-core AMD EPYC (Zen 3, AVX2, no AVX-512) development
machine, jax/jaxlib 0.10.2; numbers in ``benchmarks/train_speed.py`` output and the perf notes):

``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no YNNPACK fusions)
    jaxlib 0.10 routes convolutions, dots and reductions through YNNPACK ("ynn" fusions) by
    default. For convolutions that is a large loss here: the weight-gradient convolution of a
    3x3 'same' layer (XLA expresses it as a convolution with an H x W window over the batch)
    runs at ~6 GFLOP/s per core in YNNPACK against ~40 with XLA's own (Eigen) convolution, and
    the forward / input-gradient convolutions are also ~10-20 % faster with Eigen. With the flag
    the PtychoPINN CNN train step (N=64, gridsize 1, batch 16, n_filters_scale 2) costs 1.56
    instead of 2.64 CPU-seconds (-41 %; 3.7 -> 1.7 in an earlier, more loaded measurement), and
    ``diffraction_to_obj`` inference is ~1.2x faster. Keeping dots/reductions on YNNPACK and
    taking only convolutions off it (``...=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,
    LIBRARY_FUSION_TYPE_REDUCE``) trained as fast but inferred no faster, so the simpler setting
    is kept. Outputs agree to float32 rounding: forward object/amplitude differ by ~1e-6
    relative (L2); gradients differ by no more than a 1e-7 relative perturbation of the input
    changes them (the Poisson-NLL gradient is that ill-conditioned).

Flags that were measured and NOT kept are listed in ``REJECTED`` with the reason.

Opt out with ``PINN_JAX_XLA_DEFAULTS=0`` in the environment (or set the flags yourself).

Also here, each applied by the entry points, never on import: :func:`configure_compile_cache`
(jax's persistent compilation cache), :func:`configure_malloc` (huge pages for XLA's buffers) and
:func:`configure_conv_math` (bfloat16 math for the network's oneDNN convolutions, opt-in with
``--conv_math bfloat16`` or ``PINN_JAX_CONV_MATH=bfloat16``).
"""

from __future__ import annotations

import importlib.util
import logging
import mmap
import os
import shlex
import sys
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path

__all__ = [
    "CPU_XLA_FLAGS",
    "REJECTED",
    "OPT_OUT_ENV",
    "flag_name",
    "merge_xla_flags",
    "supported_flags",
    "recommended_xla_flags",
    "configure_cpu_runtime",
    "configure_compile_cache",
    "configure_malloc",
    "HUGE_PAGES_OPT_OUT_ENV",
    "MALLOC_TUNABLE",
    "CONV_MATH_ENV",
    "CONV_MATHS",
    "ONEDNN_FPMATH_ENV",
    "configure_conv_math",
    "conv_math_in_effect",
    "cpu_has_bfloat16",
]

log = logging.getLogger(__name__)

OPT_OUT_ENV = "PINN_JAX_XLA_DEFAULTS"
# what turns one of pinn-jax's environment switches off, or forces it on (case and surrounding
# spaces ignored; anything else, unset included, leaves the switch's automatic rule)
OFF_VALUES = ("0", "false", "no", "off")
ON_VALUES = ("1", "true", "yes", "on")


def switched_off(value: str | None) -> bool:
    """Whether an environment switch's value (None when unset) turns it off."""
    return (value or "").strip().lower() in OFF_VALUES


def switched_on(value: str | None) -> bool:
    """Whether an environment switch's value (None when unset) forces it on."""
    return (value or "").strip().lower() in ON_VALUES


def self_test_in_child(module: str, env: Mapping[str, str], timeout: float) -> bool:
    """Whether ``module.self_test()`` returns true in a fresh Python process with ``env`` added
    to this one's environment (CPU only). For checks of native code, which may end the process
    it runs in instead of raising; a child that fails to start or overruns ``timeout`` seconds
    counts as failed."""
    import subprocess

    code = f"import sys; from {module} import self_test; sys.exit(0 if self_test() else 1)"
    child_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0

# name -> value. Every name and enum value is looked up in the installed jaxlib before use: XLA
# aborts the process on an unknown flag, and these are "experimental" flags that may be renamed.
CPU_XLA_FLAGS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "",
}

# Measured on the same machine and not kept (see the module docstring for the method).
REJECTED: dict[str, str] = {
    "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE":
        "convolutions off YNNPACK only: training as fast as all-off, inference ~15 % slower",
    "--xla_cpu_multi_thread_eigen=false":
        "single-threaded Eigen convolutions: within noise of the default under load; not kept",
    "--xla_cpu_use_xnnpack / --xla_cpu_experimental_xnn_fusion_type=...CONVOLUTION / xnn_graph_fusion_mode":
        "no effect: this jaxlib does not route convolutions to XNNPACK (compiled HLO unchanged)",
    "--xla_cpu_use_onednn / --xla_cpu_experimental_onednn_custom_call / onednn_fusion_type":
        "no effect: no oneDNN custom calls or fusions appear for convolutions in this jaxlib "
        "(its runtime does execute them: pinn_jax.models.onednn emits the calls itself)",
    "--xla_cpu_enable_fast_math=true":
        "not numerically safe for the physics (exp/log/sqrt, inf/NaN semantics); gain within noise",
}


def flag_name(entry: str) -> str | None:
    """The flag name of one ``XLA_FLAGS`` entry (``'--name=v'``, ``'--name'``, ``'--noname'`` ->
    ``'name'``); ``None`` for something that is not a ``--flag``. ``--no`` prefixes are stripped
    only for boolean spellings (no ``=``), as XLA's parser does."""
    if not entry.startswith("--") or len(entry) <= 2:
        return None
    body = entry[2:]
    if "=" in body:
        return body.split("=", 1)[0]
    if body.startswith("no") and len(body) > 2:
        return body[2:]
    return body


def _split(flags: str) -> list[str]:
    try:
        return shlex.split(flags)
    except ValueError:  # unbalanced quotes: fall back to XLA's plain whitespace split
        return flags.split()


def merge_xla_flags(existing: str, recommended: Mapping[str, str]) -> tuple[str, list[str]]:
    """Add ``--name=value`` for every ``recommended`` name not already in ``existing``.

    Args:
      existing: the current ``XLA_FLAGS`` string (may be empty).
      recommended: flag name (without ``--``) -> value.
    Returns ``(merged XLA_FLAGS string, list of the entries added)``. The user's entries are
    kept verbatim and first; nothing of theirs is overridden or reordered.
    """
    tokens = _split(existing)
    present = {flag_name(t) for t in tokens}
    added = [f"--{name}={value}" for name, value in recommended.items() if name not in present]
    if not added:
        return existing, []
    merged = " ".join(([existing.strip()] if existing.strip() else []) + added)
    return merged, added


def _jaxlib_binaries() -> list[Path]:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or spec.origin is None:
        return []
    root = Path(spec.origin).parent
    # The XLA flag table lives in the big shared library; look there first.
    return sorted(root.glob("*.so"), key=lambda p: -p.stat().st_size) + sorted(root.glob("*.pyd"))


def supported_flags(flags: Mapping[str, str]) -> dict[str, str]:
    """The subset of ``flags`` whose name and (upper-case, comma-separated) enum values all occur
    in the installed jaxlib binary. An unknown ``XLA_FLAGS`` entry aborts the process at backend
    initialisation, so a flag that cannot be confirmed is dropped. Cost: one memory-mapped
    search of the jaxlib library (~30 ms when cached by the OS)."""
    needles = {name: [name.encode()] + [v.encode() for v in value.split(",") if v.isupper()]
               for name, value in flags.items()}
    wanted = {n for ns in needles.values() for n in ns}
    found: set[bytes] = set()
    for path in _jaxlib_binaries():
        try:
            with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                for n in wanted - found:
                    if mm.find(n) >= 0:
                        found.add(n)
        except (OSError, ValueError):
            continue
        if found == wanted:
            break
    return {name: flags[name] for name, ns in needles.items() if all(n in found for n in ns)}


def recommended_xla_flags() -> dict[str, str]:
    """The CPU flags :func:`configure_cpu_runtime` would add (those this jaxlib supports)."""
    return supported_flags(CPU_XLA_FLAGS)


def _backends_initialised() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # private API moved: assume the worst only if devices were created
        return False


def configure_cpu_runtime(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Add the measured-beneficial CPU XLA flags to ``XLA_FLAGS`` (only the ones not set yet).

    The one public call for this (also ``pinn_jax.configure_cpu_runtime``); nothing calls it on
    import. Must run before jax initialises its backends; if they already exist, nothing is changed and
    a ``RuntimeWarning`` says so. Set ``PINN_JAX_XLA_DEFAULTS=0`` to disable. Idempotent.

    Args:
      environ: the environment mapping to edit (default ``os.environ``; a dict for tests).
    Returns the list of ``XLA_FLAGS`` entries added (empty when nothing changed).
    """
    env = os.environ if environ is None else environ
    if switched_off(env.get(OPT_OUT_ENV)):
        return []
    existing = env.get("XLA_FLAGS", "")
    present = {flag_name(t) for t in _split(existing)}
    missing = {k: v for k, v in CPU_XLA_FLAGS.items() if k not in present}
    if not missing:
        return []
    if environ is None and _backends_initialised():
        warnings.warn(
            "pinn_jax.runtime.configure_cpu_runtime: jax backends are already initialised, so the "
            f"CPU XLA flags {sorted(missing)} cannot take effect in this process (call "
            "pinn_jax.configure_cpu_runtime() before running any jax computation, or set "
            "XLA_FLAGS yourself)",
            RuntimeWarning,
            stacklevel=2,
        )
        return []
    merged, added = merge_xla_flags(existing, supported_flags(missing))
    if added:
        env["XLA_FLAGS"] = merged
        log.debug("XLA_FLAGS += %s", " ".join(added))
    return added


COMPILE_CACHE_OPT_OUT_ENV = "PINN_JAX_COMPILE_CACHE"
# XLA:CPU cannot serialise a program that calls oneDNN (pinn_jax.models.onednn); jax then warns,
# once per such program, that writing its cache entry failed with this error. The program still
# runs; it is compiled again in the next process (~0.5 s for the N=64 inference, ~5 s for the
# train step on the 2-core development host).
UNCACHEABLE_ONEDNN_WARNING = r"Error writing persistent compilation cache entry for .*std::bad_alloc"
# jax keeps only programs that took >= 1 s to compile by default; a refinement step takes ~0.8 s
COMPILE_CACHE_MIN_SECONDS = "0.1"


def configure_compile_cache(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Cache compiled XLA programs across runs: the train step takes tens of seconds to compile
    on a laptop CPU, a refinement step ~1 s, a cache hit ~0.05 s.

    The folder is ``$XDG_CACHE_HOME/pinn_jax/xla`` (default ``~/.cache/pinn_jax/xla``) unless
    ``JAX_COMPILATION_CACHE_DIR`` is set; programs that took at least 0.1 s to compile are kept
    unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is set; ``PINN_JAX_COMPILE_CACHE=0``
    turns it off. Entry points call it (the CLI, the ptychodus child), never an import. Before
    jax is imported it sets those variables (jax reads them on import); afterwards it updates
    jax's configuration (effective for programs compiled from then on). Programs with oneDNN
    convolutions cannot be stored (:data:`UNCACHEABLE_ONEDNN_WARNING`); jax's warning about
    each is silenced, they compile in every process.

    Args:
      environ: the environment mapping to edit (default ``os.environ``; a dict for tests, in
        which case jax's configuration is left alone).
    Returns the cache folder, or None when disabled.
    """
    env = os.environ if environ is None else environ
    if switched_off(env.get(COMPILE_CACHE_OPT_OUT_ENV)):
        return None
    folder = env.get("JAX_COMPILATION_CACHE_DIR")
    if not folder:
        base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        folder = env["JAX_COMPILATION_CACHE_DIR"] = str(base / "pinn_jax" / "xla")
    min_seconds = env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", COMPILE_CACHE_MIN_SECONDS)
    if environ is None:
        warnings.filterwarnings("ignore", message=UNCACHEABLE_ONEDNN_WARNING, category=UserWarning)
    if environ is None and "jax" in sys.modules:
        import jax

        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_seconds))
    return folder


HUGE_PAGES_OPT_OUT_ENV = "PINN_JAX_HUGE_PAGES"
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def configure_malloc(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask glibc's malloc to back its large allocations with transparent huge pages, for the
    processes started from this environment: ``GLIBC_TUNABLES`` gains ``glibc.malloc.hugetlb=1``
    (glibc >= 2.35; older glibc and other C libraries ignore it).

    Why: XLA:CPU allocates a program's intermediate buffers afresh on every run and glibc maps
    large ones from the kernel each time, so every run first-touches them page by page: ~33,000
    page faults per batch of 64 inferred N=64 patterns. With huge pages (the kernel's
    ``transparent_hugepage`` in ``madvise`` mode, the common default) the N=64 train step took
    0.372-0.375 s instead of 0.403-0.406 and inference 173-174 patterns/s instead of 157-166
    (2-core Sapphire Rapids, alternated runs).

    glibc reads the variable when a process starts, so it takes effect in children and, for the
    ``pinn-jax`` command, in the process it re-executes itself as (:func:`pinn_jax.cli.main`).
    Only on Linux; not when the user's ``GLIBC_TUNABLES`` already sets ``glibc.malloc.hugetlb``,
    nor with ``PINN_JAX_HUGE_PAGES=0`` or ``PINN_JAX_XLA_DEFAULTS=0``. Returns whether it
    added the tunable.
    """
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return False
    if switched_off(env.get(HUGE_PAGES_OPT_OUT_ENV)) or switched_off(env.get(OPT_OUT_ENV)):
        return False
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return False
    env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLE}" if current else MALLOC_TUNABLE
    return True


CONV_MATH_ENV = "PINN_JAX_CONV_MATH"
ONEDNN_FPMATH_ENV = "ONEDNN_DEFAULT_FPMATH_MODE"
# pinn-jax's name -> oneDNN's default floating-point math mode
CONV_MATHS = {"float32": "STRICT", "bfloat16": "BF16"}


def conv_math_in_effect(environ: Mapping[str, str] | None = None) -> str:
    """The math of oneDNN convolutions under ``environ`` (default ``os.environ``), from oneDNN's
    default math mode ``ONEDNN_DEFAULT_FPMATH_MODE``: ``'float32'`` (unset or STRICT),
    ``'bfloat16'`` (BF16), or ``'oneDNN <MODE>'`` for another mode set outside pinn-jax."""
    env = os.environ if environ is None else environ
    mode = (env.get(ONEDNN_FPMATH_ENV) or "").strip().upper() or "STRICT"
    return next((name for name, m in CONV_MATHS.items() if m == mode), f"oneDNN {mode}")


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU has bfloat16 instructions (``amx_bf16`` or ``avx512_bf16`` among the
    flags of ``/proc/cpuinfo``, or of ``cpuinfo`` where given): where oneDNN's bfloat16 math
    (:func:`configure_conv_math`) computes in bfloat16 rather than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def configure_conv_math(math: str | None = None, environ: MutableMapping[str, str] | None = None) -> str:
    """Choose the arithmetic of the network's oneDNN convolutions for this process (and the
    processes it starts): ``'float32'`` (the default: float32 products and sums) or
    ``'bfloat16'`` (inputs and weights rounded to bfloat16, products summed in float32).

    Why: on x86 CPUs with bfloat16 instructions (measured with the AMX tiles of Sapphire Rapids)
    oneDNN's bfloat16 convolutions run much faster than its float32 ones, and faster than
    pinn-jax's float32 Winograd kernels, so under bfloat16 the forward and input-gradient
    convolutions stay oneDNN's (:mod:`pinn_jax.models.conv`). On the 2-core Sapphire Rapids host
    the N=64 train step took 0.198 instead of 0.250 s (float32 with Winograd; inference equal),
    with the trained models' test quality within float32's seed-to-seed spread over six seeds
    (``benchmarks/conv_math.py``; figures in ``benchmarks/README.md``). It is the CPU counterpart
    of the TF32 that GPUs use for float32 convolutions by default. The physics, losses,
    optimiser and the kernel gradients (:mod:`pinn_jax.native`) stay float32; so does
    everything where oneDNN is not used (:func:`pinn_jax.models.onednn.enabled`). On a CPU
    without bfloat16 instructions oneDNN computes in float32 either way.

    The mode is oneDNN's process-wide default (its ``ONEDNN_DEFAULT_FPMATH_MODE`` variable),
    read once, when the process creates its first oneDNN convolution: so this must run before
    the first one (the entry points call it first: the ``pinn-jax`` command with
    ``--conv_math``, the ptychodus child); later calls warn and change nothing in this process.

    Args:
      math: ``'float32'`` or ``'bfloat16'``; None takes ``$PINN_JAX_CONV_MATH`` (default
        ``'float32'``). An explicit choice replaces a ``ONEDNN_DEFAULT_FPMATH_MODE`` already in
        the environment; the default leaves one alone.
      environ: the environment mapping to edit (default ``os.environ``; a dict for tests).
    Returns the math the oneDNN convolutions will use (:func:`conv_math_in_effect`).
    Raises ValueError (naming the setting and the choices) for another value.
    """
    env = os.environ if environ is None else environ
    source = "conv_math"
    if math is None:
        math, source = env.get(CONV_MATH_ENV), CONV_MATH_ENV
        if not (math or "").strip():
            return conv_math_in_effect(env)
    choice = str(math).strip().lower()
    if choice not in CONV_MATHS:
        raise ValueError(f"{source}={math!r}: expected one of {sorted(CONV_MATHS)}")
    if conv_math_in_effect(env) == choice:
        return choice
    if environ is None and _onednn_convolutions_created():
        warnings.warn(
            f"pinn_jax.runtime.configure_conv_math({choice!r}): this process has already run "
            "oneDNN convolutions, whose math mode oneDNN fixed then; set it before the first "
            f"(or start the process with {CONV_MATH_ENV}={choice})",
            RuntimeWarning,
            stacklevel=2,
        )
        return conv_math_in_effect(env)
    env[ONEDNN_FPMATH_ENV] = CONV_MATHS[choice]
    log.debug("%s=%s (convolutions in %s)", ONEDNN_FPMATH_ENV, CONV_MATHS[choice], choice)
    return choice


def _onednn_convolutions_created() -> bool:
    onednn = sys.modules.get("pinn_jax.models.onednn")
    return bool(onednn is not None and onednn.calls_compiled())
