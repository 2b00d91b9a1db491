"""Training and inference throughput of the jax backend: tuned runtime vs plain, beside the TF reference.

For each patch size N (gridsize 1 by default, optionally 2) and each *variant*, a fresh Python
process (XLA reads ``XLA_FLAGS`` only when its backend starts) builds the project's real model
(:func:`pinn_jax.model.build_model`, reference CNN with the probe_big border branch) and real
train step (:func:`pinn_jax.train.make_train_step`: forward, Poisson NLL, gradient, Keras-Adam
update, state donated) and times

* training: steady-state steps of ``--batch-size`` groups, both one blocked step at a time
  (wall and process-CPU seconds) and ``--steps`` steps dispatched back to back with one sync at
  the end (what the epoch loop does; this gives groups/s);
* inference: ``diffraction_to_obj`` through :class:`pinn_jax.inference.InferenceModel`
  (numpy in / numpy out, as ``model.predict`` is called) for each ``--predict-batch``.

Variants (all measured in the same run, interleaved ``--rounds`` times):

* ``plain``: no pinn_jax runtime flags (``PINN_JAX_XLA_DEFAULTS=0``), i.e. jax's defaults plus
  whatever the caller's ``XLA_FLAGS`` holds;
* ``tuned``: :func:`pinn_jax.runtime.configure_cpu_runtime` and
  :func:`pinn_jax.runtime.configure_malloc` applied (what the ``pinn-jax`` command does; the
  ptychodus child applies the first only);
* ``tuned-xla-conv``: ``tuned`` with ``PINN_JAX_ONEDNN=0`` and ``PINN_JAX_NATIVE=0``: every
  convolution and gradient XLA's own, none through oneDNN (:mod:`pinn_jax.models.onednn`) or
  pinn-jax's native kernel gradient (:mod:`pinn_jax.native`), to show what those give;
* ``tuned-no-native`` (on request, ``--only``): ``tuned`` with ``PINN_JAX_NATIVE=0`` (oneDNN
  on, XLA's kernel gradients);
* ``tuned-direct`` (on request, ``--only``): ``tuned`` with ``PINN_JAX_WINOGRAD=0``: every
  forward and input-gradient convolution oneDNN's direct one, none by the native Winograd
  kernel (:func:`pinn_jax.native.conv3x3_winograd`), to show what Winograd gives;
* ``tuned-bf16`` (on request, ``--only``): ``tuned`` with bfloat16 convolution math
  (:func:`pinn_jax.runtime.configure_conv_math`: oneDNN rounds the convolutions' inputs to
  bfloat16 and sums in float32; the kernel gradients and everything else stay float32). With
  ``--upstream-python``, upstream is then also timed with bfloat16 math (row ``upstream-tf-bf16``:
  oneDNN's ``ONEDNN_DEFAULT_FPMATH_MODE=BF16`` and TensorFlow's own
  ``TF_SET_ONEDNN_FPMATH_MODE=BF16``), and the table adds the like-for-like ratio;
* any ``--variant NAME=XLA_FLAGS`` given on the command line.

Same-machine TensorFlow rows (each worker in its own process, in the same interleaved rounds):

* ``--upstream-python PY``: the real upstream PtychoPINN (``upstream_tf_baseline.py``, run by a
  Python in which TensorFlow and upstream's ``ptycho`` package import): its own model builder,
  compiled losses and ``train_on_batch``, and its ``diffraction_to_obj`` with
  ``predict_on_batch`` in batches of 32 (``UPSTREAM_PREDICT_BATCH``; upstream collapses batches
  of 64 or more into one object, see that script). Row ``upstream-tf``; the table adds a
  "pinn-jax tuned / upstream TF (same run)" row: training steps/s from the median of
  individually timed (blocked) steps of both, inference patterns/s at each one's best batch.
  This is the headline comparison. The worker runs with ``PINN_JAX_XLA_DEFAULTS=0`` and the
  caller's ``XLA_FLAGS`` less pinn-jax's jaxlib-only flags (TensorFlow aborts on unknown flags).
* ``--keras-python PY``: the same network rebuilt in Keras (``keras_baseline.py``), row
  ``keras`` (secondary).

The TF reference figures (reference/tf_reference_run.md §3; TF 2.19 on a 2-core CPU host of the
development machines' kind, N=64, gridsize 1, n_filters_scale 2, batch 16) are printed beside as
constants: they were not measured in this run. Each worker also times a 2048^2 float32 matmul
and reports the train step's FLOPs (XLA cost analysis), so that achieved GFLOP/s can be compared
with what the host can do at all. Data are synthetic (timings do not depend on the values).

Runs on any jax device (CPU, GPU); the runtime flags only concern the CPU backend.

Usage::

    python benchmarks/train_speed.py                              # N=64 and 128, plain vs tuned
    python benchmarks/train_speed.py --N 64 --rounds 3 --out benchmarks/results/train_speed.json
    python benchmarks/train_speed.py --N 64 --variant ynn_off=--xla_cpu_experimental_ynn_fusion_type=
    python benchmarks/train_speed.py --N 64 128 --rounds 2 --only tuned --upstream-python /work/refvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_TF_CPU = {
    "source": "reference/tf_reference_run.md §3 (TF 2.19.1, 2 CPU cores; not measured in this run)",
    "N": 64,
    "gridsize": 1,
    "n_filters_scale": 2,
    "batch_size": 16,
    "train_step_s": 0.356,
    "train_groups_per_s": 44.9,
    "first_step_s": 13.7,
    "inference_patterns_per_s": {"predict(batch 32), 512 patterns": 146.0, "1024 patterns": 159.0,
                                 "predict_on_batch(64)": 171.0},
    "gs2_train_groups_per_s": 27.5,
    "gs2_inference_patterns_per_s": 590.0,
}

DEFAULT_VARIANTS = ("plain", "tuned", "tuned-xla-conv")
# the last three only when named in --only
BUILTIN_VARIANTS = (*DEFAULT_VARIANTS, "tuned-no-native", "tuned-direct", "tuned-bf16")
KERAS_VARIANT = "keras"  # the same network in TensorFlow/Keras on this host (--keras-python)
UPSTREAM_VARIANT = "upstream-tf"  # the real upstream PtychoPINN on this host (--upstream-python)
UPSTREAM_BF16_VARIANT = "upstream-tf-bf16"  # the same under oneDNN's BF16 math (with tuned-bf16)
# upstream's diffraction_to_obj merges a call of >= 64 patterns into one object (upstream_tf_baseline.py)
UPSTREAM_PREDICT_BATCH = 32

# The caller's XLA_FLAGS before anything here can touch them (importing pinn_jax may add the
# runtime's flags to os.environ, which must not leak into the 'plain' variant).
_CALLER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")


# ---------------------------------------------------------------------------------------------
# worker: one (N, gridsize, variant) in its own process
# ---------------------------------------------------------------------------------------------


def _blocked(fn, reps: int) -> tuple[list[float], list[float]]:
    import jax

    wall, cpu = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn())
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return wall, cpu


def _matmul_gflops() -> dict:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    wall, cpu = _blocked(lambda: f(a), 5)
    flop = 2.0 * n**3
    return {"wall_gflops": flop / min(wall) / 1e9, "per_cpu_second_gflops": flop / statistics.median(cpu) / 1e9}


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from backend_api.config import ModelConfig, TrainingConfig
    from pinn_jax import probe as probe_mod
    from pinn_jax import train
    from pinn_jax.inference import InferenceModel
    from pinn_jax import native, runtime
    from pinn_jax.model import build_model, split_model
    from pinn_jax.models import onednn

    N, gs, B = args.N[0], args.gridsize, args.batch_size
    C = gs * gs
    cfg = TrainingConfig(model=ModelConfig(N=N, gridsize=gs, n_filters_scale=args.n_filters_scale), batch_size=B)
    s = train.intensity_scale_for(cfg.nphotons, N)
    probe = probe_mod.normalize_probe(probe_mod.default_probe(N), cfg.model.probe_scale)
    model = build_model(cfg.model, np.asarray(probe), s, seed=args.seed)
    graphdef, params, rest = split_model(model)

    rng = np.random.default_rng(args.seed)
    n = max(4 * B, 64)
    X = (rng.random((n, N, N, C), dtype=np.float32) * 0.5).astype(np.float32)
    coords = (rng.standard_normal((n, 1, 2, C)) * (2.0 if gs > 1 else 0.0)).astype(np.float32)

    loss_fn = train.make_loss_fn(graphdef, cfg, s)
    opt = train.make_optimizer(1e-3)
    mesh = train.make_mesh()
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = train.make_train_step(loss_fn, opt, mesh=mesh)
    state = jax.device_put(train.init_train_state(params, rest, opt, args.seed), rep)
    data = jax.device_put({"X": jnp.asarray(X), "coords": jnp.asarray(coords)}, rep)
    batches = [jax.device_put(jnp.asarray(rng.choice(n, B, replace=False), jnp.int32), rep)
               for _ in range(max(args.steps, args.blocked_steps) + 1)]

    out: dict = {"N": N, "gridsize": gs, "batch_size": B, "n_filters_scale": args.n_filters_scale,
                 "xla_flags": os.environ.get("XLA_FLAGS", "")}
    t0 = time.perf_counter()
    compiled = step.lower(state, data, batches[0]).compile()
    out["compile_s"] = time.perf_counter() - t0
    out["onednn_convolutions"] = onednn.enabled()
    out["native_kernel_gradient"] = native.enabled()
    out["conv_math"] = runtime.conv_math_in_effect()
    try:
        counted = compiled
        if out["onednn_convolutions"] or out["native_kernel_gradient"]:
            # XLA's cost analysis does not count custom calls: the FLOPs are those of the same
            # step with XLA's convolutions (a second trace and compile, outside the timings)
            settings = {name: os.environ.get(name) for name in (onednn.ENV, native.ENV)}
            os.environ.update({name: "0" for name in settings})
            try:
                counted = train.make_train_step(loss_fn, opt, mesh=mesh).lower(state, data, batches[0]).compile()
            finally:
                for name, setting in settings.items():
                    if setting is None:
                        del os.environ[name]
                    else:
                        os.environ[name] = setting
        ca = counted.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["train_step_gflop"] = float(ca["flops"]) / 1e9
    except Exception:  # cost analysis is best effort (not every backend provides it)
        out["train_step_gflop"] = None

    t0 = time.perf_counter()
    state, m = step(state, data, batches[0])
    jax.block_until_ready(m)
    out["first_step_s"] = time.perf_counter() - t0
    state, m = step(state, data, batches[1])  # one more warm-up step
    jax.block_until_ready(m)

    box = [state]
    it = iter(range(10**9))

    def one():
        box[0], mm = step(box[0], data, batches[1 + next(it) % (len(batches) - 1)])
        return mm

    wall, cpu = _blocked(one, args.blocked_steps)
    out["train_step_s_blocked_median"] = statistics.median(wall)
    out["train_step_cpu_s_median"] = statistics.median(cpu)
    pipelined = []
    for _ in range(2):
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(args.steps):
            box[0], m = step(box[0], data, batches[1 + i])
        jax.block_until_ready(m)
        pipelined.append((time.perf_counter() - t0, time.process_time() - c0))
    best = min(pipelined)
    out["train_step_s"] = best[0] / args.steps
    out["train_step_cpu_s"] = best[1] / args.steps
    out["train_groups_per_s"] = B / out["train_step_s"]
    out["train_patterns_per_s"] = B * C / out["train_step_s"]
    if out["train_step_gflop"]:
        out["train_achieved_gflops"] = out["train_step_gflop"] / out["train_step_s"]
    out["final_loss_finite"] = bool(np.isfinite(float(m["loss"])))

    from flax import nnx

    model = nnx.merge(graphdef, box[0].params, box[0].rest)
    inf = {}
    for pb in args.predict_batch:
        im = InferenceModel(model, batch_size=pb)
        total = max(pb, args.predict_patterns)
        xi = np.resize(X, (total, N, N, C)) * np.float32(s)
        oi = np.resize(coords, (total, 1, 2, C))
        t0 = time.perf_counter()
        im.predict([xi[:pb], oi[:pb]])
        first = time.perf_counter() - t0
        wall, cpu = _blocked(lambda: im.predict([xi, oi]), args.predict_repeats)
        inf[str(pb)] = {"patterns": total * C, "first_call_s": first, "s_median": statistics.median(wall),
                        "cpu_s_median": statistics.median(cpu),
                        "patterns_per_s": total * C / statistics.median(wall)}
    out["inference"] = inf
    out["inference_patterns_per_s_best"] = max(v["patterns_per_s"] for v in inf.values())
    out["matmul"] = _matmul_gflops()
    return out


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def _variant_env(name: str, flags: str | None) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = _CALLER_XLA_FLAGS
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # time real compilation, never a cache hit
    if name == "plain":
        env["PINN_JAX_XLA_DEFAULTS"] = "0"
    elif name in ("tuned", "tuned-xla-conv", "tuned-no-native", "tuned-direct", "tuned-bf16"):
        env.pop("PINN_JAX_XLA_DEFAULTS", None)
        from pinn_jax import runtime  # noqa: F401  (imports jax lazily; no backend is started)

        runtime.configure_cpu_runtime(env)
        runtime.configure_malloc(env)  # what the pinn-jax command restarts itself with
        from pinn_jax import native
        from pinn_jax.models import onednn

        if name == "tuned-xla-conv":
            env[onednn.ENV] = "0"
        if name in ("tuned-xla-conv", "tuned-no-native"):
            env[native.ENV] = "0"
        if name == "tuned-direct":
            env[native.WINOGRAD_ENV] = "0"
        runtime.configure_conv_math("bfloat16" if name == "tuned-bf16" else "float32", env)
    else:
        env["PINN_JAX_XLA_DEFAULTS"] = "0"
        env["XLA_FLAGS"] = " ".join(x for x in (_CALLER_XLA_FLAGS, flags or "") if x)
    return env


def _timing_flags(N: int, args, predict_batch: list[int] | None = None) -> list[str]:
    """The measurement flags all workers (jax, ``keras_baseline.py``, ``upstream_tf_baseline.py``) take."""
    return ["--N", str(N), "--batch-size", str(args.batch_size), "--n-filters-scale", str(args.n_filters_scale),
            "--steps", str(args.steps), "--blocked-steps", str(args.blocked_steps), "--seed", str(args.seed),
            "--predict-patterns", str(args.predict_patterns), "--predict-repeats", str(args.predict_repeats),
            "--predict-batch", *map(str, predict_batch or args.predict_batch)]


def _run_worker(N: int, name: str, flags: str | None, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--gridsize", str(args.gridsize),
           *_timing_flags(N, args)]
    with tempfile.NamedTemporaryFile("r", suffix=".json") as fh:
        proc = subprocess.run(cmd + ["--out", fh.name], env=_variant_env(name, flags), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker N={N} variant={name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(fh.name).read_text())


def _run_keras_worker(N: int, args) -> dict:
    """The same-machine TensorFlow/Keras baseline (``keras_baseline.py``) under ``--keras-python``."""
    script = Path(__file__).with_name("keras_baseline.py")
    cmd = [str(args.keras_python), str(script), *_timing_flags(N, args)]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "keras.json"
        proc = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"keras baseline N={N} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(out.read_text())
    r.setdefault("compile_s", 0.0)  # Keras traces inside its first step (counted in first_step_s)
    r.setdefault("xla_flags", "")
    return r


def _upstream_env(math: str = "float32") -> dict:
    """Environment of the upstream TensorFlow worker: pinn_jax's runtime flags off and removed from
    the caller's ``XLA_FLAGS`` (TensorFlow's XLA aborts the process on a flag it does not know);
    oneDNN's math mode set for ``math`` (``'float32'`` or ``'bfloat16'``)."""
    from pinn_jax.runtime import CPU_XLA_FLAGS, OPT_OUT_ENV, configure_conv_math, flag_name

    env = dict(os.environ)
    env[OPT_OUT_ENV] = "0"
    configure_conv_math(math, env)
    # TensorFlow's own switch for its oneDNN operations' math mode (besides oneDNN's variable)
    if math == "bfloat16":
        env["TF_SET_ONEDNN_FPMATH_MODE"] = "BF16"
    else:
        env.pop("TF_SET_ONEDNN_FPMATH_MODE", None)
    try:
        tokens = shlex.split(_CALLER_XLA_FLAGS)
    except ValueError:
        tokens = _CALLER_XLA_FLAGS.split()
    kept = [t for t in tokens if flag_name(t) not in CPU_XLA_FLAGS]
    if kept:
        env["XLA_FLAGS"] = " ".join(kept)
    else:
        env.pop("XLA_FLAGS", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run_upstream_worker(N: int, args, math: str = "float32") -> dict:
    """The real upstream TensorFlow PtychoPINN (``upstream_tf_baseline.py``) under ``--upstream-python``."""
    script = Path(__file__).with_name("upstream_tf_baseline.py")
    cmd = [str(args.upstream_python), str(script), *_timing_flags(N, args, [UPSTREAM_PREDICT_BATCH])]
    env = _upstream_env(math)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "upstream.json"
        proc = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"upstream TF worker N={N} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
                               f"\n{proc.stdout[-1000:]}")
        r = json.loads(out.read_text())
    r.setdefault("compile_s", 0.0)  # Keras traces inside its first step (counted in first_step_s)
    r["xla_flags"] = env.get("XLA_FLAGS", "")
    return r


def _print_round(N: int, rnd: int, name: str, r: dict, args) -> None:
    print(f"N={N} gs={args.gridsize} round {rnd + 1}/{args.rounds} {name:>8}: "
          f"{r['train_step_s']:.3f} s/step ({r['train_groups_per_s']:.1f} groups/s, "
          f"{r['train_step_cpu_s']:.2f} CPU-s/step), inference "
          f"{r['inference_patterns_per_s_best']:.1f} patterns/s", flush=True)


def _median_row(runs: list[dict]) -> dict:
    keys = ("train_step_s", "train_step_cpu_s", "train_step_s_blocked_median", "train_step_cpu_s_median",
            "train_groups_per_s", "train_patterns_per_s", "compile_s", "first_step_s",
            "inference_patterns_per_s_best")
    row = {k: statistics.median(r[k] for r in runs) for k in keys}
    row["train_step_gflop"] = runs[0].get("train_step_gflop")
    if row["train_step_gflop"]:
        row["train_achieved_gflops"] = row["train_step_gflop"] / row["train_step_s"]
    if all("matmul" in r for r in runs):
        row["matmul_wall_gflops"] = statistics.median(r["matmul"]["wall_gflops"] for r in runs)
    row["inference"] = {pb: statistics.median(r["inference"][pb]["patterns_per_s"] for r in runs)
                        for pb in runs[0]["inference"]}
    row["xla_flags"] = runs[0].get("xla_flags", "")
    for k in ("framework", "tensorflow", "keras", "params", "jit_compile", "upstream"):
        if k in runs[0]:
            row[k] = runs[0][k]
    return row


def _markdown(summary: dict) -> str:
    # step s: back-to-back steps; blocked s: median of individually synced steps
    lines = ["| N | gs | variant | step s | blocked s | groups/s | patterns/s | CPU-s/step | x plain | compile s | "
             "infer patterns/s (best batch) | x plain |",  # compile s = lower+compile + first step
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, rows in summary.items():
        N, gs = key.split("/")
        base = rows.get("plain")
        for name, r in rows.items():
            sp = base["train_step_s"] / r["train_step_s"] if base else float("nan")
            si = r["inference_patterns_per_s_best"] / base["inference_patterns_per_s_best"] if base else float("nan")
            lines.append(f"| {N} | {gs} | {name} | {r['train_step_s']:.3f} | {r['train_step_s_blocked_median']:.3f} | "
                         f"{r['train_groups_per_s']:.1f} | "
                         f"{r['train_patterns_per_s']:.1f} | {r['train_step_cpu_s']:.2f} | {sp:.2f} | "
                         f"{r['compile_s'] + r['first_step_s']:.1f} | "
                         f"{r['inference_patterns_per_s_best']:.1f} | {si:.2f} |")
        tuned = rows.get("tuned")
        for ours, theirs, label, bold in (
                ("tuned", UPSTREAM_VARIANT, "pinn-jax tuned / upstream TF (same run)", "**"),
                ("tuned-bf16", UPSTREAM_BF16_VARIANT,
                 "pinn-jax tuned-bf16 / upstream TF bf16 (same run, both bfloat16 conv math)", "")):
            a, b = rows.get(ours), rows.get(theirs)
            if a and b:
                # training steps/s from the blocked-step medians of both; inference at each one's best batch
                st = b["train_step_s_blocked_median"] / a["train_step_s_blocked_median"]
                si = a["inference_patterns_per_s_best"] / b["inference_patterns_per_s_best"]
                lines.append(f"| {N} | {gs} | {bold}{label}{bold} | | {bold}x{st:.2f} steps/s{bold} | | | "
                             f"| | | {bold}x{si:.2f} patterns/s{bold} | |")
        tf_here = rows.get(KERAS_VARIANT)
        if tf_here and tuned:
            lines.append(f"| {N} | {gs} | tuned / keras (same run) | x{tf_here['train_step_s'] / tuned['train_step_s']:.2f} "
                         f"speed | | | | | | | x{tuned['inference_patterns_per_s_best'] / tf_here['inference_patterns_per_s_best']:.2f} "
                         f"speed | |")
    ref = REFERENCE_TF_CPU
    lines.append(f"| 64 | 1 | TF reference (constant, other run) | {ref['train_step_s']:.3f} | - | "
                 f"{ref['train_groups_per_s']:.1f} | {ref['train_groups_per_s']:.1f} | - | - | "
                 f"{ref['first_step_s']:.1f} | ~150 | - |")
    return "\n".join(lines)


def _versions() -> dict:
    import flax
    import jax
    import jaxlib

    d = jax.devices()[0]
    return {"device_platform": d.platform, "device_kind": d.device_kind, "device_count": len(jax.devices()),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "python": platform.python_version(), "host": platform.node(), "machine": platform.machine(),
            "processor": _cpu_name(), "cpu_count": os.cpu_count()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, nargs="+", default=[64, 128], help="patch sizes (default: 64 128)")
    p.add_argument("--gridsize", type=int, default=1)
    p.add_argument("--n-filters-scale", type=int, default=2, help="reference default 2")
    p.add_argument("--batch-size", type=int, default=16, help="groups per train step (reference 16)")
    p.add_argument("--steps", type=int, default=10, help="back-to-back timed train steps")
    p.add_argument("--blocked-steps", type=int, default=5, help="individually synced train steps")
    p.add_argument("--predict-batch", type=int, nargs="+", default=[64, 256], help="inference batch sizes")
    p.add_argument("--predict-patterns", type=int, default=512, help="patterns per inference timing")
    p.add_argument("--predict-repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every variant")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=XLA_FLAGS",
                   help="extra variant: plain + these XLA flags (repeatable)")
    p.add_argument("--only", nargs="+", default=None, help="run only these variant names")
    p.add_argument("--keras-python", type=Path, default=None, metavar="PYTHON",
                   help="a Python with TensorFlow: also time the same network in Keras (keras_baseline.py) "
                        "in the same interleaved rounds, as a same-machine baseline")
    p.add_argument("--upstream-python", type=Path, default=None, metavar="PYTHON",
                   help="a Python with TensorFlow and upstream's ptycho package: also time the real upstream "
                        "PtychoPINN (upstream_tf_baseline.py) in the same interleaved rounds, and print "
                        "pinn-jax tuned / upstream ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("train_speed.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = worker(args)
        args.out.write_text(json.dumps(result))
        return 0

    if args.keras_python and args.gridsize != 1:
        raise SystemExit(f"--keras-python: the Keras baseline is built for gridsize 1, got --gridsize {args.gridsize}")
    if args.keras_python and not args.keras_python.is_file():
        raise SystemExit(f"--keras-python {args.keras_python}: no such file (expected a Python with TensorFlow)")
    if args.upstream_python and args.gridsize != 1:
        raise SystemExit(f"--upstream-python: the upstream baseline is timed at gridsize 1, got --gridsize {args.gridsize}")
    if args.upstream_python and not args.upstream_python.is_file():
        raise SystemExit(f"--upstream-python {args.upstream_python}: no such file (expected a Python with "
                         "TensorFlow and upstream's ptycho package)")
    variants: dict[str, str | None] = {v: None for v in DEFAULT_VARIANTS}
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        if not name or name in BUILTIN_VARIANTS:
            raise SystemExit(f"--variant {spec!r}: expected NAME=XLA_FLAGS with a new NAME")
        variants[name] = flags
    if args.only:
        known = {**{v: None for v in BUILTIN_VARIANTS}, **variants}
        unknown = set(args.only) - set(known)
        if unknown:
            raise SystemExit(f"--only: unknown variants {sorted(unknown)}; known {sorted(known)}")
        variants = {k: v for k, v in known.items() if k in args.only}

    runs: dict[str, dict[str, list]] = {}
    t_start = time.perf_counter()
    for N in args.N:
        key = f"{N}/{args.gridsize}"
        runs[key] = {name: [] for name in variants}
        if args.upstream_python:
            runs[key][UPSTREAM_VARIANT] = []
            if "tuned-bf16" in variants:
                runs[key][UPSTREAM_BF16_VARIANT] = []
        if args.keras_python:
            runs[key][KERAS_VARIANT] = []
        for rnd in range(args.rounds):
            for name, flags in variants.items():
                runs[key][name].append(_run_worker(N, name, flags, args))
                _print_round(N, rnd, name, runs[key][name][-1], args)
            if args.upstream_python:
                runs[key][UPSTREAM_VARIANT].append(_run_upstream_worker(N, args))
                _print_round(N, rnd, UPSTREAM_VARIANT, runs[key][UPSTREAM_VARIANT][-1], args)
                if UPSTREAM_BF16_VARIANT in runs[key]:
                    runs[key][UPSTREAM_BF16_VARIANT].append(_run_upstream_worker(N, args, "bfloat16"))
                    _print_round(N, rnd, UPSTREAM_BF16_VARIANT, runs[key][UPSTREAM_BF16_VARIANT][-1], args)
            if args.keras_python:
                runs[key][KERAS_VARIANT].append(_run_keras_worker(N, args))
                _print_round(N, rnd, KERAS_VARIANT, runs[key][KERAS_VARIANT][-1], args)
    summary = {key: {name: _median_row(rs) for name, rs in per.items() if rs} for key, per in runs.items()}
    report = {"versions": _versions(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items() if k != "worker"},
              "variants": {k: (v if v is not None else k) for k, v in variants.items()},
              "summary": summary, "runs": runs, "reference_tf_cpu": REFERENCE_TF_CPU,
              "wall_s": time.perf_counter() - t_start}
    v = report["versions"]
    print(f"\n{v['device_platform']} ({v['device_kind']}, {v['processor']}, {v['cpu_count']} CPUs); "
          f"jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}\n")
    print(_markdown(summary))
    for key, rows in summary.items():
        for name, r in rows.items():
            print(f"  N/gs={key} {name}: XLA_FLAGS={r['xla_flags']!r}; achieved "
                  f"{r.get('train_achieved_gflops') or float('nan'):.0f} GFLOP/s in training "
                  f"({r['train_step_gflop'] or float('nan'):.1f} GFLOP/step); host 2048^2 matmul "
                  f"{r.get('matmul_wall_gflops', float('nan')):.0f} GFLOP/s; inference by batch {r['inference']}")
    ref = REFERENCE_TF_CPU
    gflop64 = next((r["train_step_gflop"] for key, rows in summary.items() if key == "64/1"
                    for r in rows.values() if r.get("train_step_gflop")), None)
    if gflop64 and args.batch_size == ref["batch_size"] and args.n_filters_scale == ref["n_filters_scale"]:
        print(f"  the TF reference's {ref['train_step_s']} s/step implies {gflop64 / ref['train_step_s']:.0f} GFLOP/s "
              f"for the same {gflop64:.1f} GFLOP step ({ref['source']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from backend_api.fileio import write_json

    write_json(args.out, report, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
