"""What a run leaves behind: pictures, metric summaries and output files.

Every file is written atomically with the mode the umask gives (:mod:`backend_api.fileio`).
The amplitude/phase PNGs are :func:`backend_api.outputs.save_amplitude_phase`, the same
writer :func:`backend_api.workflows.save_outputs` uses. Figures use matplotlib's
object-oriented API on an Agg canvas (no pyplot state).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from backend_api.fileio import atomic_write
from backend_api.outputs import save_amplitude_phase, save_figure
from pinn_jax.metrics import align_phase_to

__all__ = [
    "save_amplitude_phase",
    "save_loss_curve",
    "save_comparison",
    "save_convergence",
    "metrics_summary",
    "format_metrics",
    "has_signal",
    "write_json",
    "write_npz",
]


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """``obj`` as JSON (numpy scalars/arrays as numbers/lists, non-finite floats as strings;
    the encoding of the training history, :func:`pinn_jax.train.save_history`)."""
    from pinn_jax.train import save_history

    return save_history(obj, path)


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """A compressed NPZ of ``arrays``, written atomically."""
    path = Path(path)
    with atomic_write(path) as fh:
        np.savez_compressed(fh, **arrays)
    return path


def save_loss_curve(history: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``loss_curve.png``: training (and validation) loss per epoch, 6x4 inches."""
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    epochs = range(1, len(history.get("loss", [])) + 1)
    for key, label in (("loss", "training loss"), ("val_loss", "validation loss")):
        if history.get(key):
            ax.plot(list(epochs)[: len(history[key])], history[key], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (Poisson NLL, no constant)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def save_comparison(truth: Any, recon: Any, region: Any, out_path: str | os.PathLike) -> Path:
    """Ground truth beside one or more reconstructions, amplitude (top row) and phase (bottom).

    ``truth``: ``(H, W)`` complex; ``recon``: an ``(H, W)`` complex array on the same pixel
    grid, or a mapping ``{title: array}`` for several (e.g. the network's first look and the
    refined object), drawn left to right; ``region``: ``(H, W)`` bool, the scanned area
    (outside it is left blank). A reconstruction's amplitude is shown on its own colour scale
    (PtychoPINN's amplitude is known only up to a global factor); its phase, known only up to a
    constant and a linear ramp, is aligned to the ground truth's over the region
    (:func:`pinn_jax.metrics.align_phase_to`) and shares its colour scale.
    """
    truth = np.asarray(truth)
    recons = dict(recon) if isinstance(recon, Mapping) else {"reconstruction": recon}
    recons = {k: align_phase_to(np.asarray(v), truth, region) for k, v in recons.items()}
    cols = 1 + len(recons)
    fig = Figure(figsize=(4.5 * cols, 8.5))
    FigureCanvasAgg(fig)
    rows = (("amplitude", np.abs, "gray"), ("phase", np.angle, "viridis"))
    for i, (label, fn, cmap) in enumerate(rows):
        t = np.where(region, fn(truth), np.nan)
        lim = (np.nanmin(t), np.nanmax(t)) if label == "phase" else (None, None)
        panels = [("ground truth", t)]
        for name, arr in recons.items():
            panels.append((name if label == "amplitude" else f"{name} (aligned)", np.where(region, fn(arr), np.nan)))
        for j, (title, arr) in enumerate(panels):
            ax = fig.add_subplot(2, cols, cols * i + j + 1)
            im = ax.imshow(arr.astype(np.float64), cmap=cmap, vmin=lim[0], vmax=lim[1])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{title}: {label}")
    fig.tight_layout()
    return save_figure(fig, out_path)


def save_convergence(loss: Any, path: str | os.PathLike, *, pass_metrics: Any = None) -> Path:
    """``convergence.png``: the refinement's data misfit per pass (log scale; pass 0 is the
    start) and, when ``pass_metrics`` (a list of :func:`metrics_summary` dicts with
    ``"pass"``) is given, amplitude and phase SSIM per pass beside it."""
    panels = 2 if pass_metrics else 1
    fig = Figure(figsize=(6 * panels, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, panels, 1)
    loss = np.asarray(loss, np.float64)
    ax.plot(np.arange(len(loss)), loss, marker="o", markersize=3)
    if np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("pass over all positions")
    ax.set_ylabel("data misfit")
    ax.grid(True, alpha=0.3)
    if pass_metrics:
        ax2 = fig.add_subplot(1, panels, 2)
        passes = [m["pass"] for m in pass_metrics]
        for part in ("amplitude", "phase"):
            ax2.plot(passes, [m["ssim"][part] for m in pass_metrics], marker="o", markersize=3, label=f"{part} SSIM")
        ax2.set_xlabel("pass over all positions")
        ax2.set_ylabel("SSIM against the ground truth")
        ax2.legend()
        ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def metrics_summary(m: Mapping[str, Any]) -> dict:
    """The JSON-ready summary of :func:`pinn_jax.metrics.eval_reconstruction`'s output:
    ``{metric: {"amplitude": a, "phase": p}, "region_pixels": n}``."""
    out = {}
    for k in ("ssim", "psnr", "frc50", "mae", "ms_ssim", "frc1over7"):
        if k in m:
            a, p = m[k]
            out[k] = {"amplitude": float(a), "phase": float(p)}
    if "region_pixels" in m:
        out["region_pixels"] = int(m["region_pixels"])
    return out


def format_metrics(summary: Mapping[str, Any]) -> str:
    """One line: SSIM, PSNR and FRC50 for amplitude and phase."""
    parts = []
    for k in ("ssim", "psnr", "frc50"):
        if k in summary:
            parts.append(f"{k.upper()} amp {summary[k]['amplitude']:.3f} / phase {summary[k]['phase']:.3f}")
    return "; ".join(parts)


def has_signal(obj: Any) -> bool:
    """Whether a ground truth can be scored: non-empty, finite, and not of constant amplitude."""
    a = np.asarray(obj)
    return a.size > 0 and np.all(np.isfinite(a)) and float(np.ptp(np.abs(a))) > 0
