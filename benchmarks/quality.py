"""Reconstruction quality of the jax backend on the TF reference run's data, beside its numbers.

Trains with the reference configuration (reference/tf_reference_run.md §2 and the fixture
folder's README: gridsize 1, 1024 groups drawn from the training positions with
subsample seed 42, neighbor_count 4, batch 16, Keras-Adam lr 1e-3 with plateau/early stopping,
validation split 0.05, Poisson NLL only, n_filters_scale 2, intensity scale sqrt(nphotons)/32,
frozen like the reference under Keras 3), evaluates on the test set after 10, 25 and 50
epochs (one run; the later legs resume from the run checkpoint, which reproduces an
uninterrupted run exactly), and reports amplitude/phase SSIM, PSNR, FRC50 with

* the reference protocol (``reassemble_position(M=20)`` -> the reference's crop/alignment ->
  ``eval_reconstruction``), comparable with the published table, and
* the corrected protocol (the reconstruction placed on the ground truth's pixel grid).

Usage (the reference data are NOT read by default)::

    python benchmarks/quality.py --train /path/to/train.npz --test /path/to/test.npz \\
        --epochs 10 25 50 --out quality.json

Long: ~61 steps per epoch at the reference size. Use --epochs 2 --n-groups 256 for a smoke run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend_api.canvas import STITCH_CROP  # noqa: E402

# reference/tf_reference_run.md §4, gridsize 1, test object: (amplitude, phase)
REFERENCE_TEST = {
    10: {"ssim": (0.285, 0.916), "psnr": (49.76, 67.77), "frc50": (3.84, 7.23), "ms_ssim": (0.572, 0.669)},
    25: {"ssim": (0.313, 0.912), "psnr": (49.68, 67.18), "frc50": (3.66, 7.17), "ms_ssim": (0.595, 0.658)},
    50: {"ssim": (0.329, 0.910), "psnr": (49.76, 65.47), "frc50": (3.97, 7.16), "ms_ssim": (0.620, 0.686)},
}
REFERENCE_TRAIN = {
    10: {"ssim": (0.385, 0.934), "psnr": (55.73, 70.77), "frc50": (5.77, 8.79)},
    25: {"ssim": (0.453, 0.936), "psnr": (55.93, 71.03), "frc50": (9.72, 10.45)},
    50: {"ssim": (0.475, 0.943), "psnr": (56.16, 69.64), "frc50": (9.90, 15.65)},
}
KEYS = ("ssim", "psnr", "frc50", "ms_ssim", "mae")


def _pairs(m: dict) -> dict:
    out = {}
    for k in KEYS:
        if k in m:
            a, p = m[k]
            out[k] = [float(a), float(p)]
    return out


def reconstruct_for_quality(model, raw, *, M: int = STITCH_CROP, seed: int = 0):
    """The benchmark's reconstruction of one RawData with ground truth: every position one
    group (``n_groups = n``), K=4, on the ``objectGuess`` grid, through the one pipeline
    (:func:`pinn_jax.pipeline.reconstruct`). Returns its ``(amplitude, phase, results)``."""
    from pinn_jax import pipeline

    grouping = pipeline.GroupingOptions(n_groups=len(raw.xcoords), neighbor_count=4)
    return pipeline.reconstruct(model, raw, grouping=grouping, M=M, object_shape=np.shape(raw.objectGuess),
                                seed=seed, nphotons=1e9)


def evaluate(model, raw, *, M: int = STITCH_CROP, seed: int = 0) -> dict:
    """Both protocols on one RawData with ground truth (``objectGuess``)."""
    from pinn_jax import metrics

    obj = np.asarray(raw.objectGuess)
    _, _, res = reconstruct_for_quality(model, raw, M=M, seed=seed)
    positions = res["global_offsets"][:, 0, :, 0]
    ref = metrics.reference_protocol(res["stitched_obj"], obj, positions, M=M)
    cor = metrics.eval_reconstruction(res["object_on_grid"], obj, positions=positions, M=M)
    return {"reference_protocol": _pairs(ref), "on_grid": _pairs(cor)}


def main(argv=None) -> int:
    from pinn_jax.runtime import configure_cpu_runtime

    configure_cpu_runtime()  # an entry point: the CPU XLA settings, before jax computes
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, required=True, help="training NPZ (reference: train.npz)")
    p.add_argument("--test", type=Path, required=True, help="test NPZ with objectGuess (reference: test.npz)")
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 25, 50], help="evaluate after these epochs")
    p.add_argument("--n-groups", type=int, default=1024)
    p.add_argument("--subsample-seed", type=int, default=42)
    p.add_argument("--n-filters-scale", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="weights/shuffling seed")
    p.add_argument("--intensity-scale-trainable", action="store_true",
                   help="train log_s (the reference effectively freezes it)")
    p.add_argument("--eval-train", action="store_true", help="also evaluate on the training object")
    p.add_argument("--workdir", type=Path, default=None, help="run checkpoints (default: a temp folder)")
    p.add_argument("--out", type=Path, default=Path("quality.json"))
    args = p.parse_args(argv)

    from backend_api.config import ModelConfig, TrainingConfig
    from backend_api.container import PtychoDataContainer
    from backend_api.raw_data import RawData
    from pinn_jax.train import train_model

    train_raw = RawData.from_file(args.train)
    test_raw = RawData.from_file(args.test)
    N = int(train_raw.diff3d.shape[-1])
    sub = train_raw.subsample(args.n_groups, args.subsample_seed)
    cfg = TrainingConfig(
        model=ModelConfig(N=N, gridsize=1, n_filters_scale=args.n_filters_scale),
        batch_size=args.batch_size, n_groups=args.n_groups, neighbor_count=4, nphotons=1e9,
        nll_weight=1.0, mae_weight=0.0, realspace_weight=0.0, probe_trainable=False,
        intensity_scale_trainable=bool(args.intensity_scale_trainable), nepochs=max(args.epochs),
    )
    container = PtychoDataContainer.from_raw_data(sub, cfg, seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pinn_jax_quality_") as tmp:
        ckpt = args.workdir or Path(tmp)
        t_total = 0.0
        for i, e in enumerate(sorted(args.epochs)):
            cfg.nepochs = e
            t0 = time.perf_counter()
            out = train_model(container, cfg, seed=args.seed, checkpoint_dir=ckpt, resume=i > 0)
            t_total += time.perf_counter() - t0
            row = {"epoch": e, "epochs_run": out.epochs_run, "train_time_s": t_total,
                   "loss": out.history["loss"][-1], "val_loss": out.history.get("val_loss", [None])[-1],
                   "test": evaluate(out.model, test_raw, seed=args.seed)}
            if args.eval_train:
                row["train"] = evaluate(out.model, train_raw, seed=args.seed)
            rows.append(row)
            _print_row(row)
            if out.stopped_early:
                print(f"early stopping after epoch {out.epochs_run}")
                break
    report = {"config": {"n_groups": args.n_groups, "subsample_seed": args.subsample_seed, "N": N,
                         "n_filters_scale": args.n_filters_scale, "batch_size": args.batch_size,
                         "seed": args.seed, "intensity_scale_trainable": bool(args.intensity_scale_trainable)},
              "results": rows,
              "reference_tf": {"test": {str(k): v for k, v in REFERENCE_TEST.items()},
                               "train": {str(k): v for k, v in REFERENCE_TRAIN.items()}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from backend_api.fileio import write_json

    write_json(args.out, report, indent=1)
    print(f"wrote {args.out}")
    return 0


def _print_row(row: dict) -> None:
    e = row["epoch"]
    ref = REFERENCE_TEST.get(e)
    print(f"epoch {e} (ran {row['epochs_run']}, {row['train_time_s']:.0f} s), loss {row['loss']:.6g}")
    for proto in ("reference_protocol", "on_grid"):
        m = row["test"][proto]
        parts = [f"{k.upper()} {m[k][0]:.3f}/{m[k][1]:.3f}" for k in ("ssim", "psnr", "frc50") if k in m]
        print(f"  test {proto:<18} " + "  ".join(parts))
    if ref:
        parts = [f"{k.upper()} {ref[k][0]:.3f}/{ref[k][1]:.3f}" for k in ("ssim", "psnr", "frc50")]
        print(f"  test {'TF reference':<18} " + "  ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
