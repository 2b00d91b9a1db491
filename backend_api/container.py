"""Framework-neutral data container: the grouped dict + probe, as numpy arrays.

Mirrors the reference ``ptycho.loader.PtychoDataContainer`` (brief data_config_persistence.md
§2.6) attribute for attribute, but holds plain numpy arrays; a backend converts them to its
own tensors once. Built from a grouped dict exactly as the reference ``loader.load(cb, probe,
which=None, create_split=False)`` does:

* ``X = X_full`` (float32);
* ``coords_nominal = coords_true = coords_start_relative`` (float32; the reference's
  TF-LOADER-COORDS-001 behaviour), ``coords`` is an alias of ``coords_nominal``;
* ``global_offsets = coords_offsets`` and ``local_offsets = coords_relative`` (float64);
* ``Y_I = |Y|``, ``Y_phi = angle(Y)`` (float32); without ground truth ``Y_I = 1``,
  ``Y_phi = 0`` (read-only broadcast views, no memory) and ``has_ground_truth = False``;
* ``norm_Y_I = sqrt(nphotons / mean_{b,c} sum_{h,w} X**2)``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .fileio import atomic_write
from .grouping import mean_pattern_energy

__all__ = ["PtychoDataContainer"]


def _norm_Y_I(X: np.ndarray, nphotons: float) -> float:
    mean_energy = mean_pattern_energy(X, key="X")
    if not np.isfinite(mean_energy) or mean_energy <= 0:
        raise ValueError(f"X: mean per-pattern energy is {mean_energy!r}; expected a positive "
                         f"finite value (all diffraction patterns are zero or non-finite, so "
                         f"norm_Y_I is undefined)")
    return float(np.sqrt(nphotons / mean_energy))


class PtychoDataContainer:
    """Grouped training/inference data for one dataset (numpy, channels last).

    Attributes:
        X: ``(B, N, N, C)`` float32 normalised diffraction amplitude (``X_full``).
        Y_I, Y_phi: ``(B, N, N, C)`` float32 ground-truth amplitude/phase (placeholders
            1 / 0 when ``has_ground_truth`` is False).
        Y: property, ``(B, N, N, C)`` complex64 ``Y_I * exp(1j * Y_phi)``.
        coords_nominal, coords_true: ``(B, 1, 2, C)`` float32 ``[x, y]`` relative offsets
            (``coords_start_relative``); ``coords`` is an alias of ``coords_nominal``.
        local_offsets: ``(B, 1, 2, C)`` float64 (``coords_relative``).
        global_offsets: ``(B, 1, 2, 1)`` float64 group centres (``coords_offsets``).
        nn_indices: ``(B, C)`` integer rows of the source RawData.
        probe: ``(N, N)`` complex64 probe as given (not normalised).
        norm_Y_I: float, ``sqrt(nphotons / mean_{b,c} sum_{h,w} X**2)``.
        has_ground_truth: whether Y_I/Y_phi came from real ground truth.
        sample_indices: indices into the original file when the RawData was subsampled, else None.
        YY_full: always None (reference attribute kept for compatibility).
    """

    def __init__(self, X, Y_I, Y_phi, norm_Y_I, YY_full, coords_nominal, coords_true,
                 nn_indices, global_offsets, local_offsets, probe, *,
                 has_ground_truth: bool = True, sample_indices=None):
        X = np.asarray(X)
        if X.ndim != 4:
            raise ValueError(f"X: expected a 4-D (B, N, N, C) array, got shape {X.shape}")
        B, H, W, C = X.shape
        if H != W:
            raise ValueError(f"X: expected square patterns (B, N, N, C), got shape {X.shape}")
        self.X = X.astype(np.float32, copy=False)
        Y_I = np.asarray(Y_I)
        Y_phi = np.asarray(Y_phi)
        for key, a in (("Y_I", Y_I), ("Y_phi", Y_phi)):
            if a.ndim != 4 or a.shape[0] != B:
                raise ValueError(f"{key}: expected a ({B}, N, N, {C}) array, got shape {a.shape}")
            if a.shape[-1] != C:
                raise ValueError(f"Channel mismatch between X and {key}: X has {C} channels "
                                 f"{X.shape}, {key} has {a.shape[-1]} {a.shape}")
        if Y_phi.shape != Y_I.shape:
            raise ValueError(f"Y_phi: expected shape {Y_I.shape} to match Y_I, got {Y_phi.shape}")
        self.Y_I = Y_I.astype(np.float32, copy=False)
        self.Y_phi = Y_phi.astype(np.float32, copy=False)
        for key, a, last in (("coords_nominal", coords_nominal, C), ("coords_true", coords_true, C),
                             ("local_offsets", local_offsets, C),
                             ("global_offsets", global_offsets, 1)):
            a = np.asarray(a)
            if a.shape != (B, 1, 2, last):
                raise ValueError(f"{key}: expected shape ({B}, 1, 2, {last}), got {a.shape}")
        self.coords_nominal = np.asarray(coords_nominal, dtype=np.float32)
        self.coords_true = np.asarray(coords_true, dtype=np.float32)
        self.local_offsets = np.asarray(local_offsets, dtype=np.float64)
        self.global_offsets = np.asarray(global_offsets, dtype=np.float64)
        nn = np.asarray(nn_indices)
        if nn.shape != (B, C):
            raise ValueError(f"nn_indices: expected shape ({B}, {C}), got {nn.shape}")
        self.nn_indices = nn
        p = np.asarray(probe)
        if p.ndim == 4 and p.shape[0] == 1 and p.shape[-1] == 1:
            p = p[0, ..., 0]
        if p.shape != (H, W):
            raise ValueError(f"probe: expected shape ({H}, {W}) matching X, got {p.shape}")
        self.probe = p.astype(np.complex64, copy=False)
        self.norm_Y_I = norm_Y_I
        self.YY_full = YY_full
        self.has_ground_truth = bool(has_ground_truth)
        self.sample_indices = sample_indices

    # -----------------------------------------------------------------------------------------
    @property
    def Y(self) -> np.ndarray:
        """``(B, N, N, C)`` complex64 ``Y_I * exp(1j * Y_phi)``."""
        return (self.Y_I * np.exp(1j * self.Y_phi.astype(np.float32))).astype(np.complex64)

    @property
    def coords(self) -> np.ndarray:
        """Alias of ``coords_nominal``."""
        return self.coords_nominal

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __repr__(self) -> str:
        return (f"PtychoDataContainer(B={len(self)}, X={self.X.shape}, probe={self.probe.shape}, "
                f"has_ground_truth={self.has_ground_truth}, norm_Y_I={self.norm_Y_I!r})")

    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_grouped(cls, dset: dict, probe, nphotons: float = 1e9, *,
                     norm_Y_I: float | None = None) -> "PtychoDataContainer":
        """Build from a :func:`~backend_api.grouping.generate_grouped_data` dict and a probe.
        ``norm_Y_I``: the dataset's value when ``dset`` holds only some of its groups (default:
        computed from ``dset``'s ``X_full``)."""
        for key in ("X_full", "coords_offsets", "coords_relative", "coords_start_relative",
                    "nn_indices"):
            if key not in dset:
                raise ValueError(f"dset: missing key '{key}' (expected a generate_grouped_data "
                                 f"dict; present: {sorted(dset)})")
        if not (np.isfinite(nphotons) and nphotons > 0):
            raise ValueError(f"nphotons: expected a positive finite number, got {nphotons!r}")
        X = np.asarray(dset["X_full"], dtype=np.float32)
        if X.ndim != 4:
            raise ValueError(f"X_full: expected (B, N, N, C), got shape {X.shape}")
        Y = dset.get("Y")
        if Y is None:
            Y_I = np.broadcast_to(np.float32(1.0), X.shape)
            Y_phi = np.broadcast_to(np.float32(0.0), X.shape)
            has_gt = False
        else:
            Y = np.asarray(Y)
            Y_I = np.abs(Y).astype(np.float32)
            Y_phi = np.angle(Y).astype(np.float32)
            has_gt = True
            if Y_I.ndim == 4 and Y_I.shape[-1] != X.shape[-1]:
                raise ValueError(f"Channel mismatch between X and Y: X has {X.shape[-1]} channels "
                                 f"{X.shape}, Y has {Y_I.shape[-1]} {Y_I.shape}")
        coords = dset["coords_start_relative"]
        norm = _norm_Y_I(X, nphotons) if norm_Y_I is None else float(norm_Y_I)
        return cls(X, Y_I, Y_phi, norm, None, coords, coords,
                   dset["nn_indices"], dset["coords_offsets"], dset["coords_relative"], probe,
                   has_ground_truth=has_gt, sample_indices=dset.get("sample_indices"))

    @classmethod
    def from_raw_data(cls, raw, config, *, seed: Optional[int] = None,
                      rng=None) -> "PtychoDataContainer":
        """Group ``raw`` the way the reference workflow does and wrap the result.

        Calls ``raw.generate_grouped_data(config.model.N, K=config.neighbor_count,
        nsamples=config.n_groups (None -> every position), gridsize=config.model.gridsize,
        sequential_sampling=config.sequential_sampling (False for InferenceConfig),
        enable_oversampling=config.enable_oversampling,
        neighbor_pool_size=config.neighbor_pool_size, seed=seed, rng=rng)`` and uses
        ``raw.probeGuess`` and ``config.nphotons`` (1e9 when the config has none).
        """
        model = getattr(config, "model", None)
        if model is None:
            raise ValueError(f"config: expected a TrainingConfig/InferenceConfig with a .model, "
                             f"got {type(config).__name__}")
        n_groups = getattr(config, "n_groups", None)
        nsamples = len(raw.xcoords) if n_groups is None else int(n_groups)
        dset = raw.generate_grouped_data(
            int(model.N), K=int(getattr(config, "neighbor_count", 4)), nsamples=nsamples,
            seed=seed, sequential_sampling=bool(getattr(config, "sequential_sampling", False)),
            gridsize=int(model.gridsize),
            enable_oversampling=bool(getattr(config, "enable_oversampling", False)),
            neighbor_pool_size=getattr(config, "neighbor_pool_size", None), rng=rng)
        return cls.from_grouped(dset, raw.probeGuess,
                                nphotons=float(getattr(config, "nphotons", 1e9)))

    # -----------------------------------------------------------------------------------------
    def subset(self, indices: Sequence[int] | np.ndarray | slice) -> "PtychoDataContainer":
        """A new container with the groups ``indices`` (any numpy index: array, bool mask, slice).

        ``norm_Y_I`` is kept from this container (it is a dataset-level constant), as the
        reference split does.
        """
        idx = indices if isinstance(indices, slice) else np.asarray(indices)
        if not isinstance(idx, slice):
            if idx.dtype == bool:
                if idx.shape != (len(self),):
                    raise ValueError(f"indices: boolean mask must have shape ({len(self)},), got "
                                     f"{idx.shape}")
            elif idx.dtype.kind in "iu":
                if idx.ndim != 1:
                    raise ValueError(f"indices: expected a 1-D index array, got shape {idx.shape}")
                if idx.size and (idx.max() >= len(self) or idx.min() < -len(self)):
                    raise ValueError(f"indices: out of range for {len(self)} groups "
                                     f"(min {idx.min()}, max {idx.max()})")
            else:
                raise ValueError(f"indices: expected integers, a boolean mask or a slice, got "
                                 f"dtype {idx.dtype}")
        X = self.X[idx]
        if self.has_ground_truth:
            Y_I, Y_phi = self.Y_I[idx], self.Y_phi[idx]
        else:
            Y_I = np.broadcast_to(np.float32(1.0), X.shape)
            Y_phi = np.broadcast_to(np.float32(0.0), X.shape)
        return type(self)(X, Y_I, Y_phi, self.norm_Y_I, self.YY_full, self.coords_nominal[idx],
                          self.coords_true[idx], self.nn_indices[idx], self.global_offsets[idx],
                          self.local_offsets[idx], self.probe,
                          has_ground_truth=self.has_ground_truth,
                          sample_indices=self.sample_indices)

    def split(self, train_fraction: float):
        """``(head, tail)`` with ``n_train = int(len * train_fraction)`` (the reference's split)."""
        if not (0.0 <= float(train_fraction) <= 1.0):
            raise ValueError(f"train_fraction: expected a value in [0, 1], got {train_fraction!r}")
        n_train = int(len(self) * float(train_fraction))
        return self.subset(slice(0, n_train)), self.subset(slice(n_train, len(self)))

    def to_npz(self, path) -> None:
        """Write every array attribute to an NPZ (atomically: temp file + os.replace)."""
        arrays = {k: np.asarray(getattr(self, k)) for k in
                  ("X", "Y_I", "Y_phi", "coords_nominal", "coords_true", "nn_indices",
                   "global_offsets", "local_offsets", "probe")}
        arrays["norm_Y_I"] = np.asarray(self.norm_Y_I, dtype=np.float64)
        arrays["has_ground_truth"] = np.asarray(self.has_ground_truth)
        with atomic_write(path) as fh:
            np.savez(fh, **arrays)
