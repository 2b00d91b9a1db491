"""The GPU measurements in one process, within a time budget (run by ``benchmarks/gpu.sh``).

On whatever jax device is present (it runs on the CPU too, slowly: that is how it is tested),
with the reference network (n_filters_scale 2, gridsize 1, synthetic data; timings do not
depend on the values):

* ``train``: steady-state train steps (:func:`pinn_jax.train.make_train_step`, state donated)
  at N = 64 and 128 for each ``--batch-sizes``: groups/s (``train_speed.worker``);
* ``inference``: the same network's ``diffraction_to_obj``, numpy in / numpy out through
  :class:`pinn_jax.inference.InferenceModel` (what ``predict`` costs a caller, transfers
  included) and device-resident (inputs already on the device, outputs left there: the
  network alone), patterns/s per batch size;
* ``precision``: the device-resident inference and a train step under
  ``jax.default_matmul_precision`` ``'highest'`` (true float32) against the backend's default
  (TF32 tensor cores for float32 convolutions on NVIDIA GPUs), with the largest relative
  difference of the outputs, so that the faster policy is kept only where it is accurate;
* ``fit``: :func:`pinn_jax.loop.fit` with the data sharded over every visible device, 2 epochs
  on 4,096 synthetic groups (the multi-device path end to end: groups/s of the last epoch);
* ``refine``: :func:`pinn_jax.refine.refine_object` on a simulated 512-position scan, passes/s
  after the first pass (which compiles).

Each part is skipped (and says so) once ``--budget-s`` is spent. Writes JSON after every part.

Usage::

    python benchmarks/gpu_bench.py --out gpu.json [--budget-s 270] [--batch-sizes 16 64 256 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _timed(fn, reps: int) -> float:
    import jax

    jax.block_until_ready(fn())
    wall = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t0)
    return statistics.median(wall)


def _model(N: int, nfs: int, seed: int = 0):
    from backend_api.config import ModelConfig, TrainingConfig
    from pinn_jax import probe as probe_mod
    from pinn_jax import train
    from pinn_jax.model import build_model

    cfg = TrainingConfig(model=ModelConfig(N=N, gridsize=1, n_filters_scale=nfs))
    s = train.intensity_scale_for(cfg.nphotons, N)
    probe = probe_mod.normalize_probe(probe_mod.default_probe(N), cfg.model.probe_scale)
    return build_model(cfg.model, np.asarray(probe), s, seed=seed), cfg, s


def part_train(N: int, B: int, args) -> dict:
    import train_speed

    ns = argparse.Namespace(N=[N], gridsize=1, n_filters_scale=args.n_filters_scale, batch_size=B, seed=0,
                            steps=args.steps, blocked_steps=5, predict_batch=[B],
                            predict_patterns=args.predict_patterns, predict_repeats=3)
    r = train_speed.worker(ns)
    return {k: r[k] for k in ("N", "batch_size", "compile_s", "train_step_s", "train_groups_per_s",
                              "train_step_gflop", "train_achieved_gflops", "final_loss_finite")
            if k in r} | {"inference_numpy_patterns_per_s": r["inference"][str(B)]["patterns_per_s"],
                          "matmul_gflops": r["matmul"]["wall_gflops"]}


def part_inference_device(N: int, batches: list[int], args) -> dict:
    """Device-resident inference patterns/s per batch size, and the precision comparison."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pinn_jax.model import diffraction_to_obj_apply

    model, _, s = _model(N, args.n_filters_scale)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, x, o: diffraction_to_obj_apply(graphdef, st, x, o))
    rng = np.random.default_rng(0)
    out = {"N": N, "device_patterns_per_s": {}}
    for B in batches:
        x = jnp.asarray(rng.random((B, N, N, 1), dtype=np.float32) * np.float32(s))
        o = jnp.zeros((B, 1, 2, 1), jnp.float32)
        t = _timed(lambda: fn(state, x, o), 5)
        out["device_patterns_per_s"][str(B)] = B / t
    B = max(batches)
    x = jnp.asarray(rng.random((B, N, N, 1), dtype=np.float32) * np.float32(s))
    o = jnp.zeros((B, 1, 2, 1), jnp.float32)
    results = {}
    for policy in ("default", "highest"):
        with jax.default_matmul_precision(None if policy == "default" else "highest"):
            f = jax.jit(lambda st, x, o: diffraction_to_obj_apply(graphdef, st, x, o))
            t = _timed(lambda: f(state, x, o), 5)
            results[policy] = (B / t, np.asarray(f(state, x, o)))
    ref = results["highest"][1]
    out["precision"] = {"batch": B, "default_patterns_per_s": results["default"][0],
                        "highest_patterns_per_s": results["highest"][0],
                        "default_vs_highest_max_rel_diff": float(np.abs(results["default"][1] - ref).max()
                                                                 / max(np.abs(ref).max(), 1e-30))}
    return out


def part_fit(args) -> dict:
    import jax

    from pinn_jax import train
    from pinn_jax.model import split_model

    N, n = 64, args.fit_groups
    model, cfg, s = _model(N, args.n_filters_scale)
    graphdef, params, rest = split_model(model)
    rng = np.random.default_rng(0)
    data = {"X": rng.random((n, N, N, 1), dtype=np.float32) * 0.5, "coords": np.zeros((n, 1, 2, 1), np.float32)}
    D = len(jax.devices())
    B = max(args.fit_batch // D, 1) * D
    res = train.fit(train.make_loss_fn(graphdef, cfg, s), params, rest, data,
                    train.FitOptions(nepochs=2, batch_size=B, progress=False, shard_data=True,
                                     early_stopping_patience=None))
    epoch = float(res.history["epoch_time_s"][-1])
    n_train = train.validation_split_index(n, 0.05)
    return {"devices": D, "batch_size": B, "groups": n, "epoch_s": epoch, "groups_per_s": n_train / epoch,
            "first_epoch_s": float(res.history["epoch_time_s"][0])}


def part_refine(args) -> dict:
    from pinn_jax import simulate
    from pinn_jax.refine import RefineOptions, refine_object

    _, test = simulate.simulate_dataset(N=64, object_size=232, n_images=1024, seed=3)  # 512 test positions
    pos = np.column_stack([test.xcoords, test.ycoords])
    init = np.ones(test.objectGuess.shape, np.complex64)
    out = {"positions": int(len(pos))}
    for B in args.refine_batches:
        r = refine_object(test.diff3d, pos, test.probeGuess, init, RefineOptions(iterations=args.refine_passes,
                                                                                  batch_size=B))
        sec = np.diff(r.seconds)
        out[f"batch_{B}"] = {"passes_per_s_after_first": float((len(sec) - 1) / sec[1:].sum()),
                             "first_pass_s": float(sec[0]), "final_misfit": float(r.history[-1])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=270.0)
    ap.add_argument("--N", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[16, 64, 256, 1024])
    ap.add_argument("--n-filters-scale", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--predict-patterns", type=int, default=16384)
    ap.add_argument("--fit-groups", type=int, default=4096)
    ap.add_argument("--fit-batch", type=int, default=256)
    ap.add_argument("--refine-batches", type=int, nargs="*", default=[32, 128])
    ap.add_argument("--refine-passes", type=int, default=20)
    ap.add_argument("--device-batches", type=int, nargs="*", default=None,
                    help="batch sizes of the device-resident inference (default: --batch-sizes and 4096)")
    args = ap.parse_args(argv)

    import jax

    t_start = time.perf_counter()
    dev = jax.devices()[0]
    doc = {"platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)), "devices": len(jax.devices()),
           "jax": jax.__version__, "parts": []}
    try:
        import flax

        doc["flax"] = flax.__version__
    except ImportError:
        pass

    def run(name, fn, *a):
        spent = time.perf_counter() - t_start
        if spent > args.budget_s:
            doc["parts"].append({"part": name, "skipped": f"time budget spent ({spent:.0f} s)"})
            print(f"{name}: skipped (budget)", flush=True)
        else:
            t0 = time.perf_counter()
            try:
                res = fn(*a)
                res = {"part": name, **res, "part_s": time.perf_counter() - t0}
            except Exception as exc:  # one part failing must not lose the others' figures
                res = {"part": name, "error": f"{type(exc).__name__}: {exc}"}
            doc["parts"].append(res)
            print(json.dumps(res), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))

    for N in args.N:
        batches = args.device_batches or sorted(set(args.batch_sizes) | {4096})
        run(f"inference_N{N}", part_inference_device, N, batches, args)
    for N in args.N:
        for B in args.batch_sizes:
            run(f"train_N{N}_B{B}", part_train, N, B, args)
    run("fit_sharded", part_fit, args)
    run("refine", part_refine, args)
    doc["total_s"] = time.perf_counter() - t_start
    args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
