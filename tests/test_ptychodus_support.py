"""Helpers for tests/test_ptychodus*.py (no tests here; numpy + backend_api only).

Kept apart from the test modules because the spawned child processes of the ptychodus
integration import :class:`StandInBackend` from here by name, and must not pay for importing
pytest or ptychodus.

- :class:`StandInBackend`: a deterministic numpy backend speaking the ``backend_api`` Backend
  protocol (train / save / load / predict), registered in the child under the name ``'jax'``.
  It lets the ptychodus-facing code (conversion, Product building, files, registration) be
  tested quickly and independently of the real JAX backend.
- :func:`make_scan`: a small synthetic ptychography scan in ptychodus's geometry conventions.
"""

from __future__ import annotations

import io
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STANDIN_TARGET = "test_ptychodus_support:StandInBackend"


# ------------------------------------------------------------------------------ stand-in


@dataclass
class StandInModel:
    """``predict([X * s, offsets])`` -> deterministic complex patches ``(B, N, N, 1)``."""

    N: int
    gridsize: int
    intensity_scale: float
    gain: float

    def predict(self, inputs: list[Any]) -> np.ndarray:
        x = np.asarray(inputs[0], dtype=np.float64)
        offsets = np.asarray(inputs[1])
        if x.ndim != 4 or x.shape[1:3] != (self.N, self.N):
            raise ValueError(f"StandInModel: X has shape {x.shape}, expected (B,{self.N},{self.N},C)")
        if offsets.shape[0] != x.shape[0]:
            raise ValueError("StandInModel: offsets and X disagree on the batch size")
        u = x[..., :1] / (self.intensity_scale * max(self.gain, 1e-12))
        patch = (1.0 + 0.1 * np.tanh(u)) * np.exp(1j * 0.2 * np.tanh(u))
        return patch.astype(np.complex64)


class StandInBackend:
    """A tiny deterministic stand-in for the JAX backend (Backend protocol subset)."""

    name = "jax"
    version = "standin-1"

    def train_cdi_model(self, train_data: Any, test_data: Any, config: Any, *,
                        on_epoch_end: Any = None, seed: int | None = None) -> dict:
        self.last_seed = seed  # the protocol's optional seed reaches the backend
        n = int(config.model.N)
        amp = np.asarray(train_data.diff3d, dtype=np.float64)
        gain = float(amp.mean())
        history: dict[str, list[float]] = {"loss": [], "val_loss": []}
        for epoch in range(int(config.nepochs)):
            loss, val = 1.0 / (epoch + 1), 2.0 / (epoch + 1)
            history["loss"].append(loss)
            history["val_loss"].append(val)
            if on_epoch_end is not None:
                on_epoch_end(epoch, {"loss": loss, "val_loss": val})
        model = StandInModel(n, int(config.model.gridsize),
                             math.sqrt(float(config.nphotons)) / (n / 2), gain)
        # With a callback the history is withheld, so the tests see only streamed epochs
        # (and would see none if the child stopped forwarding the callback).
        return {"model_instance": model,
                "history": None if on_epoch_end is not None else history}

    def save_model(self, model: StandInModel, output_dir: Any, config: Any) -> Path:
        from backend_api.archive import ARCHIVE_NAME, ModelEntry, write_archive

        params = {"N": model.N, "gridsize": model.gridsize,
                  "intensity_scale": model.intensity_scale, "gain": model.gain}
        buf = io.BytesIO()
        np.save(buf, np.array([model.gain]))
        entry = ModelEntry(params=params, files={"gain.npy": buf.getvalue()})
        return write_archive(Path(output_dir) / ARCHIVE_NAME, {"diffraction_to_obj": entry},
                             backend=self.name, version=self.version)

    def load_inference_bundle(self, model_dir: Any) -> tuple[StandInModel, dict]:
        from backend_api.archive import read_archive

        with tempfile.TemporaryDirectory() as tmp:
            contents = read_archive(model_dir, tmp, expected_backend=self.name)
            params = dict(contents.models["diffraction_to_obj"].params)
        model = StandInModel(int(params["N"]), int(params["gridsize"]),
                             float(params["intensity_scale"]), float(params["gain"]))
        return model, params


# ------------------------------------------------------------------------------ synthetic scan


@dataclass
class Scan:
    """A synthetic scan in ptychodus conventions.

    obj: (H, W) complex128 truth; probe: (N, N) complex128; x_px, y_px: (n,) object-pixel
    positions where the probe array centre (N-1)/2 lands (ptychodus's convention); patterns:
    (n, N, N) uint32 counts with hot pixels; bad_pixels: (N, N) bool; pixel_size_m: object
    (= probe) pixel size; illuminated: (H, W) bool, pixels under the probes' bright core.
    """

    obj: np.ndarray
    probe: np.ndarray
    x_px: np.ndarray
    y_px: np.ndarray
    patterns: np.ndarray
    bad_pixels: np.ndarray
    pixel_size_m: float
    illuminated: np.ndarray


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma)
    f -= f.min()
    return f / max(f.max(), 1e-12)


def make_scan(*, N: int = 64, n_side: int = 6, step: int = 6, margin: int = 6, seed: int = 0,
              photons: float = 1e5, n_hot: int = 3, probe_sigma: float | None = None) -> Scan:
    """Raster scan of ``n_side**2`` positions, ``step`` px apart, Gaussian probe, Poisson counts.

    Patch for a position: ``obj[y0:y0+N, x0:x0+N]`` with ``x0 = x_px - (N-1)/2`` integer, as
    ``ProbeGeometry.resolve_patch_bounds`` does; far field ``|fftshift(fft2(probe*patch))|^2``.
    """
    rng = np.random.default_rng(seed)
    size = N + step * (n_side - 1) + 2 * margin
    amp = 0.6 + 0.4 * _smooth_noise(rng, (size, size), 3.0)
    phase = 1.2 * (_smooth_noise(rng, (size, size), 3.0) - 0.5)
    obj = amp * np.exp(1j * phase)

    sigma = N / 10 if probe_sigma is None else probe_sigma
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2
    r2 = xx**2 + yy**2
    probe = np.exp(-r2 / (2 * sigma**2)) * np.exp(1j * 0.002 * r2)

    corners = margin + step * np.arange(n_side)
    x0, y0 = np.meshgrid(corners, corners)
    x0, y0 = x0.ravel(), y0.ravel()
    x_px = x0 + (N - 1) / 2
    y_px = y0 + (N - 1) / 2
    exits = np.stack([probe * obj[b:b + N, a:a + N] for a, b in zip(x0, y0)])
    intensity = np.abs(np.fft.fftshift(np.fft.fft2(exits), axes=(-2, -1))) ** 2 / N**2
    intensity *= photons / intensity.sum(axis=(-2, -1)).mean()
    counts = rng.poisson(intensity).astype(np.uint32)

    bad = np.zeros((N, N), dtype=bool)
    hot = rng.choice(N * N, size=n_hot, replace=False)
    bad.flat[hot] = True
    counts[:, bad] = 60000

    lit = np.zeros((size, size), dtype=bool)
    core = r2 <= (1.0 * sigma) ** 2
    for a, b in zip(x0, y0):
        lit[b:b + N, a:a + N] |= core
    return Scan(obj, probe, x_px.astype(float), y_px.astype(float), counts, bad, 1e-8, lit)


def structure_correlation(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """|<r - mean r, t - mean t>| / (||r - mean r|| ||t - mean t||) over ``mask``.

    Invariant to a global complex factor (PtychoPINN's scale/phase ambiguity) and blind to
    the mean, so a flat reconstruction scores 0 and a perfect one 1.
    """
    r = recon[mask].astype(np.complex128)
    t = truth[mask].astype(np.complex128)
    r = r - r.mean()
    t = t - t.mean()
    denom = np.linalg.norm(r) * np.linalg.norm(t)
    return float(abs(np.vdot(t, r)) / denom) if denom > 0 else 0.0
