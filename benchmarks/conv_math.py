"""Does bfloat16 convolution math (or the convolution algorithm) keep the trained network's
quality? Train and infer the same data with each convolution setting and several seeds, and
compare the test quality with the seed-to-seed spread.

Settings (``--maths``): ``float32`` (the default: float32 math, Winograd convolutions where
:func:`pinn_jax.native.winograd_suits`), ``bfloat16`` (:func:`pinn_jax.runtime.configure_conv_math`),
``float32-direct`` (float32, ``PINN_JAX_WINOGRAD=0``: every convolution a direct one, as before
the Winograd kernels).

Each run is the real command line, in its own process: ``pinn-jax train --conv_math M --seed S``
on ``--train``, then ``pinn-jax infer --conv_math M`` of the trained model on ``--test`` (with
the setting's environment)
(``metrics.json``: the reference protocol's SSIM, PSNR, FRC50 and MAE of amplitude and phase).
Reported per run: the metrics, the training wall time (the process, compilation included) and
the median epoch time from ``history.json``, the final training loss; per math: mean and sample
standard deviation over the seeds; and, for every math against float32, the difference of the
means next to float32's own seed-to-seed spread (its sample sd; the quality holds where every
difference is within it), and, since a seed gives each math the same initial weights and batch
order, the paired difference per seed and the seeds whose difference exceeds twice that spread
in an SSIM or FRC50.

Usage::

    D=../shared/fixtures/tf_reference_run
    python benchmarks/conv_math.py --train $D/train.npz --test $D/test.npz --n-groups 1024 \\
        --epochs 8 --seeds 0 1 2 --out benchmarks/results/conv_math.json

``--quick`` is a small smoke run on simulated data (a few minutes on 2 cores).
``--from-json A.json B.json ...`` merges the runs of earlier reports (more seeds) into one table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# setting -> (--conv_math, extra environment); rows keep the setting's name under "math"
SETTINGS = {"float32": ("float32", {}), "bfloat16": ("bfloat16", {}),
            "float32-direct": ("float32", {"PINN_JAX_WINOGRAD": "0"})}
MATHS = tuple(SETTINGS)
METRICS = ("ssim", "psnr", "frc50", "mae")
PARTS = ("amplitude", "phase")


def _pinn_jax(args: list[str], env: dict) -> float:
    """Run ``python -m pinn_jax ARGS``; its wall seconds. Raises with the command's stderr on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pinn_jax", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pinn-jax {' '.join(args)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_one(train: Path, test: Path, math: str, seed: int, workdir: Path, args) -> dict:
    """Train and infer once; the row of this (math, seed)."""
    out = workdir / f"{math}_seed{seed}"
    conv_math, extra = SETTINGS[math]
    env = dict(os.environ)
    env.pop("ONEDNN_DEFAULT_FPMATH_MODE", None)  # the --conv_math flag alone decides
    env.pop("PINN_JAX_WINOGRAD", None)
    env.update(extra)
    train_s = _pinn_jax(["train", "--train_data_file", str(train), "--n_groups", str(args.n_groups),
                         "--gridsize", "1", "--n_filters_scale", str(args.n_filters_scale),
                         "--nepochs", str(args.epochs), "--batch_size", str(args.batch_size), "--seed", str(seed),
                         "--output_dir", str(out), "--conv_math", conv_math, "--no_progress", "--quiet"], env)
    infer_s = _pinn_jax(["infer", "--model_path", str(out), "--test_data", str(test), "--output_dir",
                         str(out / "infer"), "--conv_math", conv_math, "--quiet"], env)
    metrics = json.loads((out / "infer" / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    return {"math": math, "seed": seed, "train_wall_s": train_s, "infer_wall_s": infer_s,
            "epoch_s_median": statistics.median(history["epoch_time_s"]),
            "final_loss": history["loss"][-1],
            "metrics": {m: {p: metrics[m][p] for p in PARTS} for m in METRICS}}


def summarise(rows: list[dict]) -> dict:
    """Per math: mean and sample sd of every metric, epoch time and loss over the seeds; per math
    against float32: the difference of the means, float32's spread, the paired differences and
    the seeds that differ by more than twice that spread in an SSIM or FRC50."""
    out: dict = {"by_math": {}, "against_float32": {}}
    keys = [(m, p) for m in METRICS for p in PARTS]
    for math in MATHS:
        rs = [r for r in rows if r["math"] == math]
        if not rs:
            continue
        entry = {}
        for m, p in keys:
            vals = [r["metrics"][m][p] for r in rs]
            entry[f"{m}_{p}"] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None}
        for k in ("epoch_s_median", "train_wall_s", "final_loss"):
            vals = [r[k] for r in rs]
            entry[k] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None}
        entry["seeds"] = [r["seed"] for r in rs]
        out["by_math"][math] = entry
    base = out["by_math"].get("float32")
    for math, entry in out["by_math"].items():
        if math == "float32" or base is None:
            continue
        comp = {}
        for m, p in keys:
            k = f"{m}_{p}"
            paired = [next(r for r in rows if r["math"] == math and r["seed"] == s)["metrics"][m][p]
                      - next(r for r in rows if r["math"] == "float32" and r["seed"] == s)["metrics"][m][p]
                      for s in entry["seeds"] if s in base["seeds"]]
            diff = entry[k]["mean"] - base[k]["mean"]
            spread = base[k]["sd"]
            comp[k] = {"difference": diff, "float32_spread": spread,
                       "within_spread": None if spread is None else abs(diff) <= spread, "paired": paired}
        outliers = set()
        for k in (f"{m}_{p}" for m in ("ssim", "frc50") for p in PARTS):
            if comp[k]["float32_spread"] is not None:
                outliers.update(s for s, d in zip(entry["seeds"], comp[k]["paired"])
                                if abs(d) > 2 * comp[k]["float32_spread"])
        comp["seeds_outside_twice_the_spread"] = sorted(outliers)
        comp["epoch_time_ratio"] = base["epoch_s_median"]["mean"] / entry["epoch_s_median"]["mean"]
        out["against_float32"][math] = comp
    return out


def markdown(rows: list[dict], summary: dict) -> str:
    lines = ["| math | seed | amp SSIM | phase SSIM | amp PSNR | phase PSNR | amp FRC50 | phase FRC50 | epoch s | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['math']} | {r['seed']} | {m['ssim']['amplitude']:.3f} | {m['ssim']['phase']:.3f} | "
                     f"{m['psnr']['amplitude']:.2f} | {m['psnr']['phase']:.2f} | {m['frc50']['amplitude']:.2f} | "
                     f"{m['frc50']['phase']:.2f} | {r['epoch_s_median']:.1f} | {r['final_loss']:.4g} |")

    def ms(e, k, fmt=".3f"):
        sd = e[k]["sd"]
        return f"{e[k]['mean']:{fmt}}" + (f" ± {sd:{fmt}}" if sd is not None else "")

    for math, e in summary["by_math"].items():
        lines.append(f"| **{math}** | mean ± sd | {ms(e, 'ssim_amplitude')} | {ms(e, 'ssim_phase')} | {ms(e, 'psnr_amplitude', '.2f')} | "
                     f"{ms(e, 'psnr_phase', '.2f')} | {ms(e, 'frc50_amplitude', '.2f')} | {ms(e, 'frc50_phase', '.2f')} | "
                     f"{ms(e, 'epoch_s_median', '.1f')} | |")
    for math, c in summary["against_float32"].items():
        held = [k for k, v in c.items() if isinstance(v, dict) and v["within_spread"] is False]
        lines.append("")
        lines.append(f"{math} against float32: epochs {c['epoch_time_ratio']:.2f}x as fast; "
                     + ("every metric's difference of means within float32's seed spread"
                        if not held else f"differences of means beyond float32's seed spread: {', '.join(held)}")
                     + "; seeds differing by more than twice that spread in an SSIM or FRC50: "
                     + (", ".join(map(str, c["seeds_outside_twice_the_spread"])) or "none"))
    return "\n".join(lines)


def _quick_data(folder: Path) -> tuple[Path, Path]:
    subprocess.run([sys.executable, "-m", "pinn_jax", "simulate", "--n-images", "256", "--object-size", "128",
                    "--seed", "1", "--no-ptychodus-files", "--output-dir", str(folder)], check=True, capture_output=True)
    return folder / "train_data.npz", folder / "test_data.npz"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, help="training NPZ (the data contract's keys)")
    p.add_argument("--test", type=Path, help="test NPZ with objectGuess (for the metrics)")
    p.add_argument("--n-groups", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-filters-scale", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--maths", nargs="+", choices=MATHS, default=["float32", "bfloat16"],
                   help="convolution settings to compare (see above)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the trained models here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="small simulated smoke run")
    p.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="JSON",
                   help="merge the runs of these reports into one table (nothing is run)")
    p.add_argument("--out", type=Path, default=Path("conv_math.json"))
    args = p.parse_args(argv)
    if args.from_json:
        rows = []
        for path in args.from_json:
            if not path.is_file():
                p.error(f"--from-json {path}: no such file")
            rows += json.loads(path.read_text())["rows"]
        seen = [(r["math"], r["seed"]) for r in rows]
        if len(set(seen)) != len(seen):
            p.error("--from-json: the reports share a (math, seed) run")
        print(markdown(rows, summarise(rows)))
        return 0
    if args.quick:
        args.n_groups, args.epochs, args.n_filters_scale, args.seeds = 64, 1, 1, args.seeds[:2]
    elif not (args.train and args.test):
        p.error("--train and --test are required (or --quick)")
    for name in ("train", "test"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            p.error(f"--{name} {path}: no such file")
    if args.epochs < 1 or args.n_groups < 1 or not args.seeds:
        p.error("--epochs and --n-groups must be positive and --seeds non-empty")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        train, test = _quick_data(workdir / "data") if args.quick else (args.train, args.test)
        rows = []
        t0 = time.perf_counter()
        for seed in args.seeds:  # maths interleaved, so host drift hits both alike
            for math in args.maths:
                rows.append(run_one(train, test, math, seed, workdir, args))
                r = rows[-1]
                print(f"{math} seed {seed}: amp/phase SSIM {r['metrics']['ssim']['amplitude']:.3f} / "
                      f"{r['metrics']['ssim']['phase']:.3f}, epoch {r['epoch_s_median']:.1f} s", flush=True)
        summary = summarise(rows)
    import platform

    import jax
    import jaxlib

    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "host": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                       "jax": jax.__version__, "jaxlib": jaxlib.__version__},
              "rows": rows, "summary": summary, "wall_s": time.perf_counter() - t0}
    text = markdown(rows, summary)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
