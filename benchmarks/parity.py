"""Cross-backend parity: every backend that backend_api can load here, on the same data with the
same configuration, through ``backend_api.workflows`` (train, save, load, predict, stitch).

Each backend runs in its own child process (so peak memory is its own, and the XLA flags that
pinn_jax sets for jaxlib never reach TensorFlow's XLA, which aborts on them). Per backend:

* train: ``workflows.train_cdi_model`` on ``--n-groups`` positions of TRAIN (drawn with
  ``--subsample-seed``), ``--epochs`` epochs, batch 16, Poisson NLL, n_filters_scale 2, frozen
  intensity scale (the quality.py configuration); seconds per epoch and per optimizer step are
  the training call's wall time divided by the epochs and by epochs x ceil(groups / batch), so
  they include the backend's one-time setup (grouping, graph build or jit compilation);
* save (``workflows.save_model``: archive size) and load (``workflows.load_inference_bundle``);
* predict: the loaded model's ``predict([X * intensity_scale, offsets])`` on every TEST
  position grouped once by backend_api (seed 0, K=4, the same groups for every backend);
  patterns/s after one warm-up batch;
* stitch: the backend's own ``workflows.reassemble_cdi_image`` (timed, and scored with the
  reference protocol), and the predicted patches stitched by one common stitcher and scored as
  benchmarks/quality.py does: the reference protocol and the corrected (on-grid) protocol;
* peak memory: the child's peak resident set size (``ru_maxrss``).

A backend whose packages are missing gets the row "not installed" and no numbers.

Usage::

    python benchmarks/parity.py --train TRAIN.npz --test TEST.npz --epochs 2 --n-groups 256 \\
        [--backends jax tensorflow pytorch] --out parity.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BACKENDS = ("jax", "tensorflow", "pytorch")
M = 20  # the reference's stitch crop
# distributions whose versions go into the report (those installed)
_VERSIONED = ("numpy", "jax", "jaxlib", "flax", "optax", "tensorflow", "tensorflow-cpu", "keras",
              "tf-keras", "tensorflow-probability", "torch", "lightning", "ptychopinn")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}


# ---------------------------------------------------------------------------------------------
# child: one backend


def _config(backend: str, args, out_dir: Path, n_groups: int):
    from backend_api.config import ModelConfig, TrainingConfig

    return TrainingConfig(
        model=ModelConfig(N=args.N, gridsize=1, n_filters_scale=args.n_filters_scale),
        batch_size=args.batch_size, n_groups=n_groups, neighbor_count=4, nphotons=1e9,
        nll_weight=1.0, mae_weight=0.0, realspace_weight=0.0, probe_trainable=False,
        intensity_scale_trainable=False, nepochs=args.epochs, subsample_seed=args.subsample_seed,
        output_dir=out_dir, backend=backend,
    )


def _pairs(m: dict) -> dict:
    from quality import _pairs as pairs

    return pairs(m)


def run_child(backend: str, args) -> dict:
    """Train/save/load/predict/stitch with one backend; the row's numbers."""
    if backend == "jax":
        from pinn_jax.runtime import configure_cpu_runtime

        configure_cpu_runtime()  # an entry point: jax's CPU settings before it computes
    from backend_api import workflows
    from backend_api.container import PtychoDataContainer
    from backend_api.raw_data import RawData

    row: dict = {"backend": backend, "status": "ok"}
    train_raw = RawData.from_file(args.train).subsample(args.n_groups, args.subsample_seed)
    test_raw = RawData.from_file(args.test)
    if getattr(test_raw, "objectGuess", None) is None:
        raise ValueError(f"{args.test}: no objectGuess, so quality cannot be scored")
    if int(np.shape(train_raw.diff3d)[-1]) != args.N:
        raise ValueError(f"{args.train}: patterns are {np.shape(train_raw.diff3d)[1:]}, --N is {args.N}")
    work = Path(args.workdir) / backend
    work.mkdir(parents=True, exist_ok=True)
    cfg = _config(backend, args, work, args.n_groups)

    t0 = time.perf_counter()
    results = workflows.train_cdi_model(train_raw, None, cfg, seed=args.seed)
    train_s = time.perf_counter() - t0
    hist = results.get("history") or {}
    loss = hist.get("loss") or hist.get("train_loss") or []
    epochs_run = len(loss) or args.epochs
    steps = epochs_run * math.ceil(args.n_groups / args.batch_size)
    row.update(train_s=train_s, epochs_run=epochs_run, epoch_s=train_s / epochs_run, steps=steps,
               step_s=train_s / steps, final_loss=float(loss[-1]) if len(loss) else None)

    t0 = time.perf_counter()
    archive = workflows.save_model(results, work, cfg)
    row["save_s"] = time.perf_counter() - t0
    row["archive_mb"] = Path(archive).stat().st_size / 1e6
    t0 = time.perf_counter()
    model, params_cfg = workflows.load_inference_bundle(work)
    row["load_s"] = time.perf_counter() - t0
    scale = float(params_cfg["intensity_scale"])
    row["intensity_scale"] = scale

    # the same test groups for every backend: every position, K=4, seed 0
    n_test = len(test_raw.xcoords)
    dset = test_raw.generate_grouped_data(args.N, K=4, nsamples=n_test, seed=0, gridsize=1)
    cont = PtychoDataContainer.from_grouped(dset, test_raw.probeGuess, nphotons=1e9)
    x, off = cont.X * scale, cont.local_offsets
    model.predict([x[:16], off[:16]])  # warm-up: graph tracing / jit compilation
    t0 = time.perf_counter()
    patches = np.asarray(model.predict([x, off]))
    predict_s = time.perf_counter() - t0
    if patches.shape != (n_test, args.N, args.N, 1) or not np.all(np.isfinite(patches)):
        raise RuntimeError(f"predict returned {patches.shape} (finite: {np.all(np.isfinite(patches))}); "
                           f"expected ({n_test}, {args.N}, {args.N}, 1) finite")
    row.update(predict_s=predict_s, patterns_per_s=n_test / predict_s, n_test=n_test)

    from pinn_jax import inference, metrics

    obj = np.asarray(test_raw.objectGuess)
    _, _, res = inference.stitch(patches, cont.global_offsets, M=M, object_shape=obj.shape)
    positions = res["global_offsets"][:, 0, :, 0]
    row["quality"] = {
        "reference_protocol": _pairs(metrics.reference_protocol(res["stitched_obj"], obj, positions, M=M)),
        "corrected_protocol": _pairs(metrics.eval_reconstruction(res["object_on_grid"], obj,
                                                                 positions=positions, M=M)),
    }

    # the backend's own stitch through the workflow (its own grouping of every test position)
    test_cfg = _config(backend, args, work, n_test)
    t0 = time.perf_counter()
    amp, phase, own = workflows.reassemble_cdi_image(test_raw, test_cfg, model=model, M=M)
    row["own_stitch_s"] = time.perf_counter() - t0
    img = np.asarray(amp) * np.exp(1j * np.asarray(phase))
    own_pos = np.asarray(own["global_offsets"])[:, 0, :, 0]
    row["own_stitch_shape"] = list(np.shape(amp))
    row["quality"]["own_stitch_reference_protocol"] = _pairs(metrics.reference_protocol(img, obj, own_pos, M=M))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


# ---------------------------------------------------------------------------------------------
# parent: one child per backend, table


def _installed(backend: str) -> bool:
    from backend_api.backends import is_backend_installed

    return is_backend_installed(backend)


def _run_backend(backend: str, args, argv: list[str], tag: str = "") -> dict:
    if not _installed(backend):
        return {"backend": backend, "status": "not installed"}
    with tempfile.TemporaryDirectory(prefix=f"parity_{backend}_") as tmp:
        result = Path(tmp) / "row.json"
        env = dict(os.environ)
        if backend != "jax":
            env["PINN_JAX_XLA_DEFAULTS"] = "0"  # nothing of pinn_jax's jaxlib flags for TF's XLA
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", backend,
               "--child-result", str(result), "--workdir", str(Path(tmp) / "work")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        log = Path(args.out).with_suffix(f".{backend}{tag}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        if proc.returncode != 0 or not result.is_file():
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
            return {"backend": backend, "status": f"failed (exit {proc.returncode}): {tail[0][:300]}",
                    "log": str(log), "wall_s": wall}
        row = json.loads(result.read_text())
        row["wall_s"] = wall
        row["log"] = str(log)
        return row


def _seed(r: dict) -> str:
    return f" (seed {r['seed']})" if r.get("multi_seed") else ""


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    head = ("| backend | status | s/epoch | s/step | inference patterns/s | peak RSS MB | archive MB "
            "| ref. SSIM amp, phase | ref. PSNR | ref. FRC50 | corr. SSIM amp, phase | corr. PSNR "
            "| corr. FRC50 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['backend']}{_seed(r)} | {r['status']} |" + " - |" * (head.count("|") - 3))
            continue
        q = r["quality"]

        def pair(proto, k, spec=".3f"):
            a, p = q[proto].get(k, (None, None))
            return f"{_fmt(a, spec)}, {_fmt(p, spec)}"

        lines.append(
            f"| {r['backend']}{_seed(r)} | ok | {_fmt(r['epoch_s'], '.1f')} | {_fmt(r['step_s'], '.3f')} "
            f"| {_fmt(r['patterns_per_s'], '.1f')} | {_fmt(r['peak_rss_mb'], '.0f')} "
            f"| {_fmt(r['archive_mb'], '.1f')} | {pair('reference_protocol', 'ssim')} "
            f"| {pair('reference_protocol', 'psnr', '.2f')} | {pair('reference_protocol', 'frc50', '.2f')} "
            f"| {pair('corrected_protocol', 'ssim')} | {pair('corrected_protocol', 'psnr', '.2f')} "
            f"| {pair('corrected_protocol', 'frc50', '.2f')} |"
        )
    return "\n".join(lines)


def _drop_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name`` and its values (``--name v ...`` up to the next option, or
    ``--name=v``)."""
    out, skipping = [], False
    for a in argv:
        if a == name:
            skipping = True
            continue
        if a.startswith(name + "="):
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


_SPREAD = (("reference_protocol", "ssim"), ("reference_protocol", "psnr"), ("reference_protocol", "frc50"),
           ("corrected_protocol", "ssim"), ("corrected_protocol", "psnr"), ("corrected_protocol", "frc50"))


def spread(rows: list[dict]) -> dict:
    """Per backend, per metric (amplitude, phase): mean, sample sd, min, max over the seeds
    that ran; ``n`` says how many."""
    out: dict = {}
    for b in dict.fromkeys(r["backend"] for r in rows):
        ok = [r for r in rows if r["backend"] == b and r.get("status") == "ok"]
        entry: dict = {"n": len(ok), "seeds": [r["seed"] for r in ok]}
        for proto, k in _SPREAD:
            vals = np.array([r["quality"][proto][k] for r in ok if k in r["quality"][proto]], dtype=float)
            if len(vals) == 0:
                continue
            entry[f"{proto}.{k}"] = {
                "mean": vals.mean(axis=0).tolist(),
                "sd": (vals.std(axis=0, ddof=1) if len(vals) > 1 else np.zeros(2)).tolist(),
                "min": vals.min(axis=0).tolist(), "max": vals.max(axis=0).tolist(),
            }
        out[b] = entry
    return out


def spread_markdown(sp: dict) -> str:
    cols = [f"{'ref.' if p.startswith('ref') else 'corr.'} {k.upper()}" for p, k in _SPREAD]
    lines = ["| backend | seeds | " + " | ".join(c + " amp, phase (mean ± sd)" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for b, e in sp.items():
        cells = []
        for p, k in _SPREAD:
            m = e.get(f"{p}.{k}")
            if m is None:
                cells.append("-")
                continue
            d = 2 if k != "ssim" else 3
            cells.append(f"{m['mean'][0]:.{d}f} ± {m['sd'][0]:.{d}f}, {m['mean'][1]:.{d}f} ± {m['sd'][1]:.{d}f}")
        lines.append(f"| {b} | {e['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, required=True, help="training NPZ")
    p.add_argument("--test", type=Path, required=True, help="test NPZ with objectGuess")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS))
    p.add_argument("--n-groups", type=int, default=1024, help="training positions (one group each)")
    p.add_argument("--subsample-seed", type=int, default=42)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--n-filters-scale", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0,
                   help="weights/shuffling seed (the reference backends take none and say so)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every backend once per seed and add a seed-spread table (overrides --seed)")
    p.add_argument("--out", type=Path, default=Path("parity.json"))
    p.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    for name, v in (("--epochs", args.epochs), ("--n-groups", args.n_groups), ("--batch-size", args.batch_size)):
        if v < 1:
            raise SystemExit(f"{name}={v}: expected >= 1")
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; known: {list(BACKENDS)}")
    if args.child:
        try:
            row = run_child(args.child, args)
        except Exception:
            traceback.print_exc()
            return 1
        args.child_result.write_text(json.dumps(row))
        return 0
    for path in (args.train, args.test):
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
    seeds = args.seeds if args.seeds else [args.seed]
    # the children get one --seed each; the parent's --seeds/--seed are not passed on
    base = _drop_option(_drop_option(argv, "--seeds"), "--seed")
    rows: list[dict] = []
    for seed in seeds:
        for b in args.backends:
            print(f"[{b} seed {seed}] ...", flush=True)
            row = _run_backend(b, args, [*base, "--seed", str(seed)],
                               tag=f".seed{seed}" if len(seeds) > 1 else "")
            row["seed"] = seed
            row["multi_seed"] = len(seeds) > 1
            rows.append(row)
            print(f"[{b} seed {seed}] {row['status']}", flush=True)
            # written after every row, so an interrupted run keeps what it measured
            _write_report(args, seeds, rows, done=False)
    table = _write_report(args, seeds, rows, done=True)
    print(table)
    print(f"wrote {args.out}")
    return 0


def _write_report(args, seeds: list[int], rows: list[dict], *, done: bool) -> str:
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "versions": _versions(),
        "config": {"epochs": args.epochs, "n_groups": args.n_groups, "subsample_seed": args.subsample_seed,
                   "N": args.N, "n_filters_scale": args.n_filters_scale, "batch_size": args.batch_size,
                   "seeds": seeds, "train": str(args.train), "test": str(args.test), "M": M},
        "complete": done,  # False: the run was interrupted after these rows
        "rows": rows,
    }
    table = markdown(rows)
    if len(seeds) > 1:
        report["spread"] = spread(rows)
        table += "\n\n" + spread_markdown(report["spread"])
    report["markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out)
    return table


if __name__ == "__main__":
    sys.exit(main())
