"""Pictures of a reconstruction: the one writer of ``reconstructed_amplitude.png`` and
``reconstructed_phase.png`` (used by :func:`backend_api.workflows.save_outputs` and the
``pinn-jax`` commands through :mod:`pinn_jax.report`).

matplotlib's object-oriented API with an explicit Agg canvas: no pyplot, no global backend
change, safe in a GUI process. Files are written atomically (:mod:`backend_api.fileio`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from backend_api.fileio import atomic_write

__all__ = ["save_figure", "save_amplitude_phase"]


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib ``Figure`` as PNG to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png")
    return path


def save_amplitude_phase(amplitude: Any, phase: Any, out_dir: str | os.PathLike, *,
                         phase_vmin: float | None = None, phase_vmax: float | None = None,
                         title: str = "Reconstructed {label}", stem: str = "reconstructed") -> tuple[Path, Path]:
    """``out_dir/reconstructed_amplitude.png`` (gray) and ``reconstructed_phase.png``
    (viridis), 8x8 inch figures with a colour bar each.

    ``amplitude``, ``phase``: ``(H, W)`` real arrays (NaN pixels are left blank);
    ``phase_vmin``/``phase_vmax``: the phase colour range (default: the data's);
    ``title``: a format string with ``{label}`` ("amplitude"/"phase", or "Amplitude"/"Phase"
    via ``{Label}``); ``stem``: the file names' prefix (``{stem}_amplitude.png``). ``out_dir``
    must exist. Returns the two paths.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    paths = []
    for label, arr, cmap, lo, hi in (("amplitude", amplitude, "gray", None, None),
                                     ("phase", phase, "viridis", phase_vmin, phase_vmax)):
        fig = Figure(figsize=(8, 8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(np.asarray(arr, np.float64), cmap=cmap, vmin=lo, vmax=hi)
        fig.colorbar(im, ax=ax)
        ax.set_title(title.format(label=label, Label=label.capitalize()))
        paths.append(save_figure(fig, out / f"{stem}_{label}.png"))
    return paths[0], paths[1]
