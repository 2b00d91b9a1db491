"""The demo as a function: simulate two objects, train on one, reconstruct and score the other.

:func:`run_demo` is what ``pinn-jax demo`` runs (the command only parses flags and prints);
import it from a notebook or a script to run the same thing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from backend_api.canvas import STITCH_CROP

__all__ = ["run_demo"]


def run_demo(out_dir: str | os.PathLike, *, N: int = 64, gridsize: int = 1, n_filters_scale: int = 1,
             epochs: int = 12, batch_size: int = 4, n_images: int = 384, object_size: int = 128,
             kind: str = "lines", nphotons: float = 1e9, seed: int = 0, progress: bool = True,
             log=print) -> dict:
    """Simulate ``n_images`` positions over two ``object_size`` px objects of ``kind``
    (half train, half test), train ``epochs`` epochs, save ``wts.h5.zip``, reconstruct the test
    object on its grid (stitch crop :data:`~backend_api.canvas.STITCH_CROP`) and write to
    ``out_dir``: ``wts.h5.zip``, ``reconstructed_amplitude.png``/``reconstructed_phase.png``
    (inside the scanned region), ``comparison.png``, ``loss_curve.png``, ``history.json``,
    ``metrics.json`` and ``reconstruction.npz`` (``object_on_grid``, ``ground_truth``,
    ``region``). ``log`` receives the progress lines (``print`` by default).

    Returns the report written to ``metrics.json`` (``metrics``, ``config``, ``timing_s``,
    ``final_loss``, ``final_val_loss``, ``epochs_run``) plus ``archive`` (its path).
    Raises ValueError for settings the simulation or the config refuse, before anything is
    written.
    """
    from backend_api.config import ModelConfig, TrainingConfig
    from backend_api.grouping import default_n_groups
    from pinn_jax import metrics, pipeline, report, simulate

    out = Path(out_dir)
    t_start = time.perf_counter()
    train_raw, test_raw = simulate.simulate_dataset(N=N, object_size=object_size, n_images=n_images, kind=kind,
                                                    nphotons=nphotons, seed=seed, probe_scale=None)
    n_train = len(train_raw.xcoords)
    cfg = TrainingConfig(
        model=ModelConfig(N=N, gridsize=gridsize, n_filters_scale=n_filters_scale),
        nepochs=epochs, batch_size=batch_size, n_groups=default_n_groups(n_train, gridsize),
        nphotons=nphotons, output_dir=out, backend="jax",
    )
    out.mkdir(parents=True, exist_ok=True)
    t_sim = time.perf_counter() - t_start
    log(f"simulated {n_train} training and {len(test_raw.xcoords)} test patterns "
        f"(N={N}, {object_size}px '{kind}' objects) in {t_sim:.1f} s")
    t0 = time.perf_counter()
    results, archive = pipeline.train(train_raw, None, cfg, seed=seed, progress=progress,
                                      history_path=out / "history.json", save_to=out)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    obj_shape = tuple(np.shape(test_raw.objectGuess))
    grouping = pipeline.GroupingOptions(neighbor_count=cfg.neighbor_count)
    _, _, res = pipeline.reconstruct(results["model_instance"], test_raw, grouping=grouping, M=STITCH_CROP,
                                     object_shape=obj_shape, seed=seed, nphotons=cfg.nphotons)
    t_inf = time.perf_counter() - t0
    summary = pipeline.evaluate(res, test_raw.objectGuess, M=STITCH_CROP)
    positions = res["global_offsets"][:, 0, :, 0]
    region = metrics.scan_region_mask(positions, obj_shape, STITCH_CROP)
    on_grid = res["object_on_grid"]
    report.save_amplitude_phase(np.where(region, np.abs(on_grid), np.nan),
                                np.where(region, np.angle(on_grid), np.nan), out)
    report.save_comparison(test_raw.objectGuess, on_grid, region, out / "comparison.png")
    h = results["history"]
    report.save_loss_curve(h, out / "loss_curve.png")
    doc = {
        "metrics": summary,
        "config": {"N": N, "gridsize": gridsize, "n_filters_scale": n_filters_scale, "epochs": epochs,
                   "batch_size": batch_size, "n_images": n_images, "object_size": object_size, "seed": seed,
                   "nphotons": nphotons},
        "timing_s": {"simulate": t_sim, "train": t_train, "reconstruct": t_inf,
                     "total": time.perf_counter() - t_start},
        "final_loss": h["loss"][-1],
        "final_val_loss": h.get("val_loss", [None])[-1],
        "epochs_run": len(h["loss"]),
    }
    report.write_json(doc, out / "metrics.json")
    report.write_npz(out / "reconstruction.npz", object_on_grid=on_grid.astype(np.complex64),
                     ground_truth=np.asarray(test_raw.objectGuess, np.complex64), region=region)
    log(f"trained {len(h['loss'])} epochs in {t_train:.1f} s (loss {h['loss'][0]:.5g} -> {h['loss'][-1]:.5g}); "
        f"reconstructed {len(positions)} test patterns in {t_inf:.1f} s")
    log(report.format_metrics(summary))
    log(f"wrote {archive.name}, reconstructed_amplitude.png, reconstructed_phase.png, comparison.png, "
        f"loss_curve.png, history.json, metrics.json, reconstruction.npz to {out} "
        f"({time.perf_counter() - t_start:.0f} s in total)")
    return {**doc, "archive": archive}
