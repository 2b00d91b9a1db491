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
             kind: str = "lines", nphotons: float = 1e9, seed: int = 0, refine_iterations: int = 20,
             progress: bool = True, log=print) -> dict:
    """Simulate ``n_images`` positions over two ``object_size`` px objects of ``kind``
    (half train, half test), train ``epochs`` epochs, save ``wts.h5.zip``, reconstruct the test
    object on its grid (stitch crop :data:`~backend_api.canvas.STITCH_CROP`): the network's
    first look; then, with ``refine_iterations`` > 0, refine it with the physics model for that
    many passes (:func:`pinn_jax.pipeline.refine`, seeded by the network). Writes to ``out_dir``:
    ``wts.h5.zip``, ``reconstructed_amplitude.png``/``reconstructed_phase.png`` (the network's,
    inside the scanned region), ``comparison.png`` (ground truth, network and refined object),
    ``loss_curve.png``, ``history.json``, ``metrics.json``, ``reconstruction.npz``
    (``object_on_grid``, ``ground_truth``, ``region``) and, when refined,
    ``refined_amplitude.png``/``refined_phase.png``, ``convergence.png``,
    ``refine_history.json`` and ``refined_object_on_grid`` in the NPZ; and ``ptychodus/``: the
    data for ptychodus's GUI (``train_data.npz``, ``test_data.npz`` and the test scan as
    ``diffraction.npz``/``diffraction.h5``/``product.h5``/``ground_truth.h5``). ``log`` receives the
    progress lines (``print`` by default).

    Returns the report written to ``metrics.json`` (``metrics`` = the network's,
    ``refined_metrics`` when refined, ``config``, ``timing_s``, ``final_loss``,
    ``final_val_loss``, ``epochs_run``) plus ``archive`` (its path).
    Raises ValueError for settings the simulation or the config refuse, before anything is
    written.
    """
    from backend_api.config import ModelConfig, TrainingConfig
    from backend_api.grouping import default_n_groups
    from pinn_jax import metrics, pipeline, report, simulate
    from pinn_jax.refine import RefineOptions

    out = Path(out_dir)
    refine_options = RefineOptions(iterations=refine_iterations, seed=seed) if refine_iterations else None
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
    _write_ptychodus_folder(out / "ptychodus", train_raw, test_raw)
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
    refined = None
    t_ref = 0.0
    if refine_options is not None:
        t0 = time.perf_counter()
        _, refined = pipeline.refine(test_raw, initial=pipeline.network_start(res), options=refine_options,
                                     object_shape=obj_shape, progress=progress)
        t_ref = time.perf_counter() - t0
        ref_obj = refined.obj
        report.save_amplitude_phase(np.where(region, np.abs(ref_obj), np.nan),
                                    np.where(region, np.angle(ref_obj), np.nan), out, title="Refined {label}",
                                    stem="refined")
        report.save_convergence(refined.history, out / "convergence.png", pass_metrics=refined.pass_metrics)
        report.write_json(pipeline.refinement_history(refined), out / "refine_history.json")
        panels = {"network": on_grid, f"refined ({refine_iterations} passes)": ref_obj}
    else:
        panels = {"network": on_grid}
    report.save_comparison(test_raw.objectGuess, panels, region, out / "comparison.png")
    h = results["history"]
    report.save_loss_curve(h, out / "loss_curve.png")
    doc = {
        "metrics": summary,
        "config": {"N": N, "gridsize": gridsize, "n_filters_scale": n_filters_scale, "epochs": epochs,
                   "batch_size": batch_size, "n_images": n_images, "object_size": object_size, "seed": seed,
                   "nphotons": nphotons, "refine_iterations": refine_iterations},
        "timing_s": {"simulate": t_sim, "train": t_train, "reconstruct": t_inf, "refine": t_ref,
                     "total": time.perf_counter() - t_start},
        "final_loss": h["loss"][-1],
        "final_val_loss": h.get("val_loss", [None])[-1],
        "epochs_run": len(h["loss"]),
    }
    arrays = {"object_on_grid": on_grid.astype(np.complex64),
              "ground_truth": np.asarray(test_raw.objectGuess, np.complex64), "region": region}
    if refined is not None:
        doc["refined_metrics"] = pipeline.pass_summary(refined.pass_metrics[-1])
        arrays["refined_object_on_grid"] = refined.obj
    report.write_json(doc, out / "metrics.json")
    report.write_npz(out / "reconstruction.npz", **arrays)
    log(f"trained {len(h['loss'])} epochs in {t_train:.1f} s (loss {h['loss'][0]:.5g} -> {h['loss'][-1]:.5g}); "
        f"reconstructed {len(positions)} test patterns in {t_inf:.1f} s")
    log(f"network: {report.format_metrics(summary)}")
    names = "reconstructed_amplitude.png, reconstructed_phase.png"
    if refined is not None:
        log(f"refined ({refine_iterations} passes, {t_ref:.1f} s): {report.format_metrics(doc['refined_metrics'])}")
        names += ", refined_amplitude.png, refined_phase.png, convergence.png, refine_history.json"
    log(f"wrote {archive.name}, {names}, comparison.png, loss_curve.png, history.json, metrics.json, "
        f"reconstruction.npz to {out}, and the data for ptychodus's GUI to {out / 'ptychodus'} "
        f"({time.perf_counter() - t_start:.0f} s in total)")
    return {**doc, "archive": archive}


def _write_ptychodus_folder(folder: Path, train_raw, test_raw) -> None:
    """``folder``: the demo's data for the ptychodus GUI: ``train_data.npz``/``test_data.npz``
    (Train reads them from the folder it is given) and the test scan in ptychodus's formats
    (:func:`backend_api.ptychodus.files.write_ptychodus_scan`)."""
    from backend_api.ptychodus.files import write_ptychodus_scan
    from pinn_jax import simulate

    folder.mkdir(parents=True, exist_ok=True)
    simulate.save_npz(folder / "train_data.npz", train_raw)
    simulate.save_npz(folder / "test_data.npz", test_raw)
    write_ptychodus_scan(folder, test_raw, name="pinn-jax demo", diffraction_kind="amplitude")
