"""Write a PtychoPINN scan in the file formats ptychodus 1.7's own readers open.

``pinn-jax simulate`` (and the demo) write the PtychoPINN NPZ contract (``diff3d`` amplitude,
``probeGuess``, ``objectGuess``, pixel coordinates), which ptychodus's NPZ readers do not take
(its diffraction NPZ wants ``patterns``; the SLAC one wants ``diffraction``). Next to those
files :func:`write_ptychodus_scan` writes, by hand with h5py/numpy (ptychodus is not needed):

- ``diffraction.npz``: ptychodus's "Ptychodus NumPy Zipped Archive" diffraction file (keys
  ``patterns``, ``indexes``, ``bad_pixels``): Diffraction -> Open, file type NPZ;
- ``diffraction.h5``: the assembled-diffraction HDF5 file of ``ptychodus.api.io``
  (``indexes``; ``patterns`` with ``detector_pixel_width_m``/``_height_m``; ``bad_pixels``), the
  ``StandardFileLayout`` name batch mode reads;
- ``product.h5``: ptychodus's HDF5 product (metadata attributes, ``probe``, positions in metres,
  ``object`` with pixel size and centre): Product -> Open, file type HDF5; the object is a flat
  ``1+0j`` starting guess on the simulated object's grid;
- ``ground_truth.h5`` (when the true object is known): the same product with the true object,
  to open next to a reconstruction and compare.

Patterns are **intensities** (``amplitude**2``; integer counts stored as ``uint32`` when the
squares are whole numbers), which is what ptychodus holds; the amplitudes are never square-rooted
twice: ptychodus hands intensities to the reconstructor, which takes the one square root.

Geometry: ptychodus's far-field sampling ``dx = wavelength * distance / (N * detector_pixel)``.
Defaults are ptychodus's own detector pixel (75 um), 10 keV and 1 m, so the object pixel is
``1.2398e-10 / (N * 75e-6)`` m (25.8 nm at N = 64); positions convert from PtychoPINN object
pixels (patch pixel N/2 on the position) to ptychodus metres with the half-pixel shift of
:data:`~backend_api.ptychodus.convert.PTYCHODUS_TO_PINN_SHIFT_PX` and the centred convention
(pixel ``(W-1)/2`` at the object centre).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from backend_api.fileio import atomic_write

from .convert import PTYCHODUS_TO_PINN_SHIFT_PX

__all__ = ["write_ptychodus_scan", "object_pixel_size_m", "patterns_as_intensity",
           "DEFAULT_PHOTON_ENERGY_EV", "DEFAULT_DETECTOR_DISTANCE_M", "DEFAULT_DETECTOR_PIXEL_M"]

DEFAULT_PHOTON_ENERGY_EV = 10_000.0
DEFAULT_DETECTOR_DISTANCE_M = 1.0
DEFAULT_DETECTOR_PIXEL_M = 75e-6  # ptychodus's Detector.PixelWidthInMeters default
_HC_EV_M = 1.239841984e-6  # h c in eV m


def object_pixel_size_m(n: int, *, photon_energy_eV: float = DEFAULT_PHOTON_ENERGY_EV,
                        detector_distance_m: float = DEFAULT_DETECTOR_DISTANCE_M,
                        detector_pixel_m: float = DEFAULT_DETECTOR_PIXEL_M) -> float:
    """The object-plane pixel ptychodus derives for ``n x n`` far-field patterns."""
    return (_HC_EV_M / photon_energy_eV) * detector_distance_m / (n * detector_pixel_m)


def patterns_as_intensity(diff3d: np.ndarray, *, kind: str = "amplitude") -> np.ndarray:
    """``(n, N, N)`` intensities from PtychoPINN diffraction data: ``amplitude**2`` for
    ``kind='amplitude'`` (the contract), unchanged for ``kind='intensity'``; ``uint32`` when the
    values are whole counts, else ``float32``."""
    if kind not in ("amplitude", "intensity"):
        raise ValueError(f"kind: expected 'amplitude' or 'intensity', got {kind!r}")
    d = np.asarray(diff3d, dtype=np.float64)
    if d.ndim != 3 or d.shape[1] != d.shape[2]:
        raise ValueError(f"diff3d: expected (n, N, N) square patterns, got shape {d.shape}")
    if not np.all(np.isfinite(d)) or (d < 0).any():
        raise ValueError("diff3d: expected finite, non-negative values")
    intensity = d * d if kind == "amplitude" else d
    rounded = np.rint(intensity)
    if np.all(np.abs(intensity - rounded) <= 1e-3 * np.maximum(1.0, rounded)) and \
            rounded.max(initial=0) < 2**32:
        return rounded.astype(np.uint32)
    return intensity.astype(np.float32)


@contextlib.contextmanager
def _h5_atomic(path: Path) -> Iterator[Any]:
    """An h5py file built in memory, then written to ``path`` with :func:`atomic_write`
    (h5py needs a readable, seekable file; the atomic temp file is write-only)."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        yield h5
    with atomic_write(path) as handle:
        handle.write(buffer.getbuffer())


def _positions_m(coords: np.ndarray, size: int, dx: float) -> np.ndarray:
    return (np.asarray(coords, np.float64) - PTYCHODUS_TO_PINN_SHIFT_PX - (size - 1) / 2.0) * dx


def _write_product(path: Path, *, name: str, comments: str, probe: np.ndarray,
                   x_m: np.ndarray, y_m: np.ndarray, obj: np.ndarray, dx: float,
                   photon_energy_eV: float, detector_distance_m: float,
                   probe_photon_count: float) -> None:
    with _h5_atomic(path) as h5:
        h5.attrs["name"] = name
        h5.attrs["comments"] = comments
        h5.attrs["detector_object_distance_m"] = float(detector_distance_m)
        h5.attrs["photon_energy_eV"] = float(photon_energy_eV)
        h5.attrs["probe_photon_count"] = float(probe_photon_count)
        h5.attrs["exposure_time_s"] = 0.0
        h5.attrs["mass_attenuation_m2_per_kg"] = 0.0
        h5.attrs["tomography_angle_deg"] = 0.0
        h5.attrs["far_field"] = True
        h5_probe = h5.create_dataset("probe", data=np.asarray(probe, np.complex64)[np.newaxis])
        h5_probe.attrs["pixel_width_m"] = dx
        h5_probe.attrs["pixel_height_m"] = dx
        h5.create_dataset("probe_position_indexes", data=np.arange(len(x_m), dtype=np.int64))
        h5.create_dataset("probe_position_x_m", data=np.asarray(x_m, np.float64))
        h5.create_dataset("probe_position_y_m", data=np.asarray(y_m, np.float64))
        h5_object = h5.create_dataset("object", data=np.asarray(obj, np.complex64)[np.newaxis])
        h5_object.attrs["center_x_m"] = 0.0
        h5_object.attrs["center_y_m"] = 0.0
        h5_object.attrs["pixel_width_m"] = dx
        h5_object.attrs["pixel_height_m"] = dx
        h5.create_dataset("object_layer_spacing_m", data=np.zeros(0, np.float64))
        h5.create_dataset("loss_epochs", data=np.zeros(0, np.int64))
        h5.create_dataset("loss_values", data=np.zeros(0, np.float64))


def write_ptychodus_scan(directory: str | Path, data: Mapping[str, Any] | Any, *,
                         name: str = "pinn-jax", diffraction_kind: str = "amplitude",
                         photon_energy_eV: float = DEFAULT_PHOTON_ENERGY_EV,
                         detector_distance_m: float = DEFAULT_DETECTOR_DISTANCE_M,
                         detector_pixel_m: float = DEFAULT_DETECTOR_PIXEL_M,
                         ground_truth: bool = True) -> dict[str, Path]:
    """Write one scan (the NPZ contract's arrays) as ptychodus files in ``directory``.

    Args:
        data: a mapping or object with ``xcoords``, ``ycoords`` (object pixels), ``diff3d``
            ``(n, N, N)``, ``probeGuess`` ``(N, N)`` and ``objectGuess`` ``(H, W)`` (its shape
            sets the object grid; its values go to ``ground_truth.h5``).
        diffraction_kind: what ``diff3d`` holds (``'amplitude'``, the contract, or
            ``'intensity'``).
        ground_truth: also write ``ground_truth.h5`` with ``objectGuess``.

    Returns:
        ``{'diffraction_npz', 'diffraction_h5', 'product', ['ground_truth']}`` -> paths. Each
        file is written atomically.
    """
    def get(key: str) -> Any:
        value = data.get(key) if isinstance(data, Mapping) else getattr(data, key, None)
        if value is None:
            raise ValueError(f"data: required key {key!r} missing (a PtychoPINN scan has "
                             "xcoords, ycoords, diff3d, probeGuess, objectGuess)")
        return np.asarray(value)

    x, y = get("xcoords").astype(np.float64), get("ycoords").astype(np.float64)
    patterns = patterns_as_intensity(get("diff3d"), kind=diffraction_kind)
    probe = get("probeGuess")
    while probe.ndim > 2:
        probe = probe[0]
    obj = get("objectGuess")
    while obj.ndim > 2:
        obj = obj[0]
    n_pat, n = patterns.shape[0], patterns.shape[-1]
    if not (len(x) == len(y) == n_pat):
        raise ValueError(f"data: {len(x)} xcoords, {len(y)} ycoords and {n_pat} patterns; "
                         "expected one position per pattern")
    if probe.shape != (n, n):
        raise ValueError(f"data: probeGuess is {probe.shape}; expected the pattern shape {(n, n)}")
    for label, value in (("photon_energy_eV", photon_energy_eV),
                         ("detector_distance_m", detector_distance_m),
                         ("detector_pixel_m", detector_pixel_m)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{label}: expected a positive number, got {value!r}")
    H, W = obj.shape
    dx = object_pixel_size_m(n, photon_energy_eV=photon_energy_eV,
                             detector_distance_m=detector_distance_m,
                             detector_pixel_m=detector_pixel_m)
    x_m, y_m = _positions_m(x, W, dx), _positions_m(y, H, dx)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    indexes = np.arange(n_pat, dtype=np.int64)
    bad = np.zeros((n, n), dtype=bool)
    out = {"diffraction_npz": directory / "diffraction.npz",
           "diffraction_h5": directory / "diffraction.h5",
           "product": directory / "product.h5"}
    with atomic_write(out["diffraction_npz"]) as handle:
        np.savez(handle, patterns=patterns, indexes=indexes, bad_pixels=bad)

    with _h5_atomic(out["diffraction_h5"]) as h5:
        h5.create_dataset("indexes", data=indexes)
        h5_patterns = h5.create_dataset("patterns", data=patterns, compression="gzip")
        h5_patterns.attrs["detector_pixel_width_m"] = float(detector_pixel_m)
        h5_patterns.attrs["detector_pixel_height_m"] = float(detector_pixel_m)
        h5.create_dataset("bad_pixels", data=bad)
    photons = float(np.asarray(patterns, np.float64).sum(axis=(1, 2)).mean())
    common = dict(probe=probe, x_m=x_m, y_m=y_m, dx=dx, photon_energy_eV=photon_energy_eV,
                  detector_distance_m=detector_distance_m, probe_photon_count=photons)
    _write_product(out["product"], name=name, obj=np.ones((H, W), np.complex64),
                   comments="pinn-jax scan; flat starting object", **common)
    if ground_truth:
        out["ground_truth"] = directory / "ground_truth.h5"
        _write_product(out["ground_truth"], name=f"{name} ground truth", obj=obj,
                       comments="pinn-jax scan; the true object", **common)
    return out
