"""RawData: the validated in-memory form of the PtychoPINN NPZ data contract.

NPZ contract (reference brief data_config_persistence.md §2.1), one row per scan position:

=================  ===============  ==========================================================
key                shape            meaning
=================  ===============  ==========================================================
xcoords, ycoords   (M,)             scan positions, object pixels (x = column, y = row)
xcoords_start,     (M,)             optional "start" positions; default to xcoords/ycoords
ycoords_start
diff3d             (M, H, H)        diffraction **amplitude** (sqrt of counts), DC at [H/2,H/2];
                                    ``diffraction`` is accepted as an alias (intensities: see
                                    ``diffraction_kind`` below)
probeGuess         (H, H)           complex probe
objectGuess        (Ho, Wo)         optional complex object
scan_index         (M,)             optional integer scan index (defaults to zeros)
Y                  (M, N, N)        optional complex ground-truth patches
bad_pixels         (H, H) bool      optional detector mask, True = bad (see below)
_metadata          ()               optional JSON string, parsed into ``RawData.metadata``
=================  ===============  ==========================================================

Amplitude or intensity (``diffraction_kind``, default ``'auto'``): with ``'auto'``,
:func:`backend_api.diffraction.classify_diffraction` decides (integer dtype, the photon count in
``_metadata['nphotons']``, values that are integer multiples of one quantum, the dynamic range;
see that module). Data it finds to be **intensity** are converted to amplitude with a square
root (float32) and a ``UserWarning`` names the rule that fired and the override.
``'amplitude'`` takes ``diff3d`` as amplitude unchanged (integer dtypes are cast to float32);
``'intensity'`` always takes the square root (negative values are refused). (The reference
passes integer counts on unchanged; the model expects amplitude.)

A file that is not a readable NPZ (a directory, an empty file, a text, HDF5 or ``.npy`` file
under an ``.npz`` name, a truncated or corrupt archive) raises :class:`DataFileError` naming
the file and what it is not, before anything else is read.

ptychodus export quirks handled here (each with a warning):

* Integer-typed ``diff3d`` is detector **intensity** (counts), converted as above.
* A ``(modes, H, W)`` probe keeps mode 0.
* ``bad_pixels``: flagged pixels are set to **zero amplitude** in every pattern. Zero is what a
  masked detector reports and keeps the dataset in the plain contract the backends consume
  (no backend loss supports a pixel mask); the mask is kept on ``RawData.bad_pixels`` and
  written back by :meth:`RawData.to_file`, where re-applying it is a no-op.

Every malformed input raises ``ValueError`` naming the key, the shape/dtype/value seen and
what was expected, before any work is done; :meth:`RawData.from_file` also names the file
(:class:`DataFileError`, a ``ValueError``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from . import grouping as _grouping
from .fileio import atomic_write
from .diffraction import check_diffraction_kind, classify_diffraction, override_hint
# reading NPZ files safely (what a path is, pickled members): their own module, re-exported
from .npz_files import DataFileError, _load_member, check_npz_file, map_npz_member, open_npz, read_npz_member

__all__ = ["RawData", "DataFileError", "check_npz_file", "open_npz", "read_npz_member"]

_CHUNK = 2048  # patterns per chunk for whole-array checks (bounds temporary memory)


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------

def _is_real_numeric(a: np.ndarray) -> bool:
    return a.dtype.kind in "fiu"


def _check_finite(key: str, a: np.ndarray) -> None:
    if a.dtype.kind in "iu" or a.size == 0:
        return
    flat = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, -1)
    for s in range(0, flat.shape[0], _CHUNK):
        part = flat[s:s + _CHUNK]
        if not np.isfinite(part).all():
            bad = int(np.count_nonzero(~np.isfinite(part)))
            raise ValueError(f"{key}: expected only finite values, found non-finite entries "
                             f"(at least {bad}; shape {a.shape}, dtype {a.dtype})")


def _coords(key: str, value: Any) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != 1:
        raise ValueError(f"{key}: expected a 1-D (M,) array of positions, got shape {a.shape}")
    if not _is_real_numeric(a):
        raise ValueError(f"{key}: expected a real float array (float64 per contract), got dtype "
                         f"{a.dtype}")
    if a.dtype.kind in "iu":
        a = a.astype(np.float64)
    _check_finite(key, a)
    return a


def _complex_2d(key: str, value: Any) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != 2:
        raise ValueError(f"{key}: expected a 2-D (H, W) array, got shape {a.shape}")
    if a.dtype.kind not in "fiuc":
        raise ValueError(f"{key}: expected a complex (complex64) array, got dtype {a.dtype}")
    _check_finite(key, a)
    return a.astype(np.complex64, copy=False)


def _fmt_shape(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _to_amplitude(d: np.ndarray, kind: str, metadata: Optional[Mapping]) -> np.ndarray:
    """``diff3d`` as amplitude: ``(M, H, H)`` validated, finite, non-negative real data.

    ``kind='auto'`` classifies (warning when the data are taken as intensity), ``'intensity'``
    always takes the square root, ``'amplitude'`` never does (integers become float32).
    Conversions return a new float32 array, computed in chunks.
    """
    if kind == "auto":
        kind, reason = classify_diffraction(d, metadata=metadata, assume="amplitude")
        if kind == "intensity":
            if d.dtype.kind in "iu":
                lead = (f"diff3d has integer dtype {d.dtype}: treating it as detector intensity "
                        f"(counts)")
            else:
                lead = f"diff3d looks like intensity, not amplitude: {reason}; treating it as intensity"
            warnings.warn(f"{lead} and taking the square root to get amplitude (float32); "
                          f"{override_hint('amplitude')}", UserWarning, stacklevel=3)
    if kind == "intensity":
        amp = np.empty(d.shape, dtype=np.float32)
        for s in range(0, d.shape[0], _CHUNK):
            amp[s:s + _CHUNK] = np.sqrt(d[s:s + _CHUNK].astype(np.float64))
        return amp
    if d.dtype.kind in "iu":
        return d.astype(np.float32)
    return d


def _check_coords(xcoords, ycoords, xcoords_start, ycoords_start):
    """The four ``(M,)`` float coordinate arrays (the starts default to the coordinates)."""
    x = _coords("xcoords", xcoords)
    y = _coords("ycoords", ycoords)
    if x.shape[0] == 0:
        raise ValueError("xcoords: no scan positions (got an empty (0,) array); expected at "
                         "least one position, one per diffraction pattern")
    if y.shape != x.shape:
        raise ValueError(f"ycoords: expected shape {_fmt_shape(x.shape)} to match xcoords, "
                         f"got {_fmt_shape(y.shape)}")
    xs = x if xcoords_start is None else _coords("xcoords_start", xcoords_start)
    ys = y if ycoords_start is None else _coords("ycoords_start", ycoords_start)
    for key, a in (("xcoords_start", xs), ("ycoords_start", ys)):
        if a.shape != x.shape:
            raise ValueError(f"{key}: expected shape {_fmt_shape(x.shape)} to match xcoords, "
                             f"got {_fmt_shape(a.shape)}")
    return x, y, xs, ys


def _check_diff3d(diff3d, M: int, kind: str) -> np.ndarray:
    """``(M, H, H)`` real, finite, non-negative patterns (a trailing singleton axis dropped);
    not yet converted to amplitude."""
    d = np.asarray(diff3d)
    if d.ndim == 4 and d.shape[-1] == 1:
        d = d[..., 0]
    if d.ndim != 3:
        raise ValueError(f"diff3d: expected a 3-D (M, H, H) array of diffraction amplitudes, "
                         f"got shape {d.shape}")
    if d.shape[0] != M:
        raise ValueError(f"diff3d: expected {M} patterns (one per entry of xcoords), got "
                         f"{d.shape[0]} (shape {_fmt_shape(d.shape)})")
    if d.shape[1] != d.shape[2]:
        raise ValueError(f"diff3d: expected square patterns (M, H, H), got shape "
                         f"{_fmt_shape(d.shape)}")
    if not _is_real_numeric(d):
        raise ValueError(f"diff3d: expected a real float array (float32 amplitude) or "
                         f"integer detector counts, got dtype {d.dtype}")
    _check_finite("diff3d", d)
    if d.dtype.kind == "i" or d.dtype.kind == "f":
        what = "intensities" if kind == "intensity" else "amplitudes"
        for s in range(0, M, _CHUNK):
            if (d[s:s + _CHUNK] < 0).any():
                raise ValueError(f"diff3d: expected non-negative {what}, found negative "
                                 f"values (min {d.min()!r}; diffraction_kind={kind!r})")
    return d


def _check_probe(probeGuess, H: int) -> np.ndarray:
    """``(H, H)`` complex64, non-zero; of a ``(modes, H, H)`` probe only mode 0 (warns)."""
    p = np.asarray(probeGuess)
    if p.ndim == 3:
        if p.shape[0] < 1:
            raise ValueError(f"probeGuess: expected (H, H) or (modes, H, H), got shape {p.shape}")
        if p.shape[0] > 1:
            # stacklevel 3: the caller of RawData(...), as when this lived in __init__
            warnings.warn(f"probeGuess has {p.shape[0]} modes {_fmt_shape(p.shape)}; using "
                          f"mode 0 only (PtychoPINN models a single coherent probe)",
                          UserWarning, stacklevel=3)
        p = p[0]
    probe = _complex_2d("probeGuess", p)
    if not probe.any():
        raise ValueError(f"probeGuess is all zero (shape {_fmt_shape(probe.shape)}): expected "
                         f"a complex probe with non-zero values; nothing would be illuminated")
    if probe.shape != (H, H):
        raise ValueError(f"probeGuess: expected shape {_fmt_shape((H, H))} to match the "
                         f"diffraction patterns, got {_fmt_shape(probe.shape)}")
    return probe


def _check_scan_index(scan_index, M: int) -> np.ndarray:
    """``(M,)`` int64 (zeros when None; integral floats accepted)."""
    if scan_index is None:
        return np.zeros(M, dtype=np.int64)
    si = np.asarray(scan_index)
    if si.ndim != 1 or si.shape[0] != M:
        raise ValueError(f"scan_index: expected a 1-D ({M},) integer array, got shape "
                         f"{si.shape}")
    if si.dtype.kind not in "iu":
        if si.dtype.kind == "f" and np.all(np.isfinite(si)) and np.all(si == np.round(si)):
            si = si.astype(np.int64)
        else:
            raise ValueError(f"scan_index: expected integer dtype, got {si.dtype}")
    return si.astype(np.int64, copy=False)


def _check_Y(Y, M: int) -> Optional[np.ndarray]:
    """``(M, N, N)`` complex64 ground-truth patches (trailing singleton axes dropped) or None."""
    if Y is None:
        return None
    Yv = np.asarray(Y)
    while Yv.ndim > 3 and Yv.shape[-1] == 1:
        Yv = Yv[..., 0]
    if Yv.ndim != 3 or Yv.shape[0] != M or Yv.shape[1] != Yv.shape[2]:
        raise ValueError(f"Y: expected a ({M}, N, N) complex array of ground-truth "
                         f"patches, got shape {Yv.shape}")
    if Yv.dtype.kind not in "fiuc":
        raise ValueError(f"Y: expected complex64, got dtype {Yv.dtype}")
    _check_finite("Y", Yv)
    return Yv.astype(np.complex64, copy=False)


def _check_norm_Y_I(norm_Y_I) -> None:
    """A finite real scalar or None (kept as given)."""
    if norm_Y_I is not None:
        n = np.asarray(norm_Y_I)
        if n.size != 1 or n.dtype.kind not in "fiu" or not np.isfinite(n).all():
            raise ValueError(f"norm_Y_I: expected a finite real scalar, got {norm_Y_I!r}")


def _check_metadata(metadata) -> None:
    """A mapping (JSON object) or None."""
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(f"metadata: expected a dict (JSON object) or None, got "
                         f"{type(metadata).__name__}")


def _check_bad_pixels(bad_pixels, H: int) -> Optional[np.ndarray]:
    """``(H, H)`` bool mask (0/1 integers accepted) or None."""
    if bad_pixels is None:
        return None
    mask = np.asarray(bad_pixels)
    if mask.shape != (H, H):
        raise ValueError(f"bad_pixels: expected a {_fmt_shape((H, H))} boolean mask "
                         f"matching the patterns, got shape {_fmt_shape(mask.shape)}")
    if mask.dtype != np.bool_:
        if mask.dtype.kind in "iu" and np.isin(mask, (0, 1)).all():
            mask = mask.astype(bool)
        else:
            raise ValueError(f"bad_pixels: expected dtype bool (True = bad pixel), got "
                             f"{mask.dtype}")
    return mask


class RawData:
    """One scan: positions, diffraction amplitudes, probe and (optionally) the object.

    Attributes (after validation):
        xcoords, ycoords, xcoords_start, ycoords_start: ``(M,)`` float (float64 or float32 as
            given; integers become float64), object pixels.
        diff3d: ``(M, H, H)`` real amplitude (float dtype as given; float32 after a sqrt).
        probeGuess: ``(H, H)`` complex64.
        scan_index: ``(M,)`` int64.
        objectGuess: ``(Ho, Wo)`` complex64 or None.
        Y: ``(M, h, h)`` complex64 or None.
        norm_Y_I: scalar or None.
        metadata: dict or None.
        bad_pixels: ``(H, H)`` bool or None (already applied to ``diff3d``).
        sample_indices, subsample_seed: None unless a subsampling loader sets them.
    """

    def __init__(self, xcoords, ycoords, xcoords_start, ycoords_start, diff3d, probeGuess,
                 scan_index, objectGuess=None, Y=None, norm_Y_I=None, metadata=None, *,
                 bad_pixels=None, diffraction_kind: str = "auto"):
        kind = check_diffraction_kind(diffraction_kind)
        x, y, xs, ys = _check_coords(xcoords, ycoords, xcoords_start, ycoords_start)
        M = x.shape[0]
        d = _check_diff3d(diff3d, M, kind)
        H = d.shape[1]
        probe = _check_probe(probeGuess, H)
        si = _check_scan_index(scan_index, M)
        obj = None if objectGuess is None else _complex_2d("objectGuess", objectGuess)
        Yv = _check_Y(Y, M)
        _check_norm_Y_I(norm_Y_I)
        _check_metadata(metadata)
        mask = _check_bad_pixels(bad_pixels, H)

        # --- all checks passed; now convert ---
        d = _to_amplitude(d, kind, metadata)
        if mask is not None and mask.any():
            d = np.array(d, copy=True)
            d[:, mask] = 0
            warnings.warn(f"bad_pixels: set {int(mask.sum())} flagged detector pixels to zero "
                          f"amplitude in every pattern", UserWarning, stacklevel=2)

        self.xcoords = x
        self.ycoords = y
        self.xcoords_start = xs
        self.ycoords_start = ys
        self.diff3d = d
        self.probeGuess = probe
        self.scan_index = si
        self.objectGuess = obj
        self.Y = Yv
        self.norm_Y_I = norm_Y_I
        self.metadata = dict(metadata) if metadata is not None else None
        self.bad_pixels = mask
        self.sample_indices = None
        self.subsample_seed = None

    # -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.xcoords.shape[0])

    def subsample(self, n: int, seed: Optional[int] = None) -> "RawData":
        """A RawData holding ``n`` positions drawn without replacement (seeded), in file order.

        The positions are ``np.sort(np.random.default_rng(seed).choice(len(self), size=n,
        replace=False))`` -- exactly the draw ``pinn_jax.cli._subsample`` has always made, so
        the same seed gives the same subset. Every per-position field (coordinates, ``diff3d``,
        ``scan_index``, ``Y``) is indexed; probe, object, ``norm_Y_I``, ``metadata`` (a copy) and
        ``bad_pixels`` are kept as they are. Nothing is re-validated or re-converted: ``diff3d``
        is already an amplitude with the bad pixels zeroed, so no warning repeats.
        ``sample_indices`` becomes the chosen indices into the original file (composed with
        this RawData's own ``sample_indices`` if it was itself a subset) and ``subsample_seed``
        becomes ``seed``.

        ``n >= len(self)`` returns ``self`` itself (not a copy), as the CLI always did.
        Raises ValueError for ``n < 1`` or a non-integer ``n``.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"subsample: n must be an integer, got {type(n).__name__}")
        n = int(n)
        if n < 1:
            raise ValueError(f"subsample: n must be at least 1, got {n}")
        total = len(self)
        if n >= total:
            return self
        idx = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
        out = object.__new__(RawData)
        out.__dict__.update(self.__dict__)
        for key in ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d",
                    "scan_index"):
            setattr(out, key, getattr(self, key)[idx])
        out.Y = None if self.Y is None else self.Y[idx]
        out.metadata = None if self.metadata is None else dict(self.metadata)
        out.sample_indices = idx if self.sample_indices is None else np.asarray(
            self.sample_indices)[idx]
        out.subsample_seed = seed
        return out

    def __repr__(self) -> str:
        obj = None if self.objectGuess is None else self.objectGuess.shape
        return (f"RawData(M={len(self)}, diff3d={self.diff3d.shape} {self.diff3d.dtype}, "
                f"probe={self.probeGuess.shape}, objectGuess={obj}, Y={self.Y is not None})")

    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_coords_without_pc(cls, xcoords, ycoords, diff3d, probeGuess, scan_index,
                               objectGuess=None, *, bad_pixels=None, metadata=None,
                               diffraction_kind: str = "auto") -> "RawData":
        """Build from positions only; the start coordinates equal the coordinates."""
        return cls(xcoords, ycoords, xcoords, ycoords, diff3d, probeGuess, scan_index,
                   objectGuess=objectGuess, metadata=metadata, bad_pixels=bad_pixels,
                   diffraction_kind=diffraction_kind)

    @classmethod
    def from_file(cls, path, *, bad_pixels=None, allow_pickle: bool = False,
                  diffraction_kind: str = "auto", mmap: bool = False) -> "RawData":
        """Load and validate an NPZ in the contract above.

        ``diffraction`` is accepted for ``diff3d``; a rank-4 ``(M, H, H, 1)`` array is squeezed
        and a legacy ``(H, H, M)`` layout is transposed (with a warning). ``_metadata`` is
        parsed from JSON; a pickled ``_metadata`` (as older upstream files have) is read with a
        restricted unpickler that only rebuilds plain strings/containers, never arbitrary
        objects. ``allow_pickle=True`` permits other object arrays (trusted files only).
        ``bad_pixels`` given here overrides a ``bad_pixels`` key in the file.
        ``diffraction_kind``: ``'auto'`` (classify; ``_metadata['nphotons']`` is used as
        evidence), ``'amplitude'`` or ``'intensity'`` (see the module docstring).
        ``mmap``: memory-map ``diff3d`` when the archive stores it uncompressed (``np.savez``,
        as :meth:`to_file` writes) and it needs no conversion (amplitude, float): the patterns
        are then read from disk only where they are used (validation reads them once, in
        chunks); a compressed member, or intensities that are converted, are loaded.

        Raises ``FileNotFoundError`` for a missing path and :class:`DataFileError` (a
        ``ValueError`` whose message starts with the path) for anything else wrong with the file
        or its contents.
        """
        kind = check_diffraction_kind(diffraction_kind)
        path = check_npz_file(path)
        try:
            with open_npz(path, allow_pickle=allow_pickle) as npz:
                parts = _read_contract(path, npz, allow_pickle, bad_pixels, mmap=mmap)
            return cls(*parts["args"], **parts["kwargs"], diffraction_kind=kind)
        except DataFileError:
            raise
        except ValueError as exc:
            raise DataFileError(f"{path}: {exc}") from None

    @classmethod
    def from_files(cls, train_path, test_path):
        """``(RawData.from_file(train_path), RawData.from_file(test_path))``."""
        return cls.from_file(train_path), cls.from_file(test_path)

    def to_file(self, path) -> Path:
        """Write the NPZ contract atomically (temp file in the same directory + os.replace).

        Writes ``xcoords, ycoords, xcoords_start, ycoords_start, diff3d, probeGuess,
        scan_index`` and, when present, ``objectGuess``, ``Y``, ``bad_pixels`` and ``_metadata``
        (JSON string). No pickled entries are written, so ``np.load`` works without
        ``allow_pickle``. Returns the path written.
        """
        path = Path(path)
        arrays = {
            "xcoords": self.xcoords, "ycoords": self.ycoords,
            "xcoords_start": self.xcoords_start, "ycoords_start": self.ycoords_start,
            "diff3d": self.diff3d, "probeGuess": self.probeGuess, "scan_index": self.scan_index,
        }
        if self.objectGuess is not None:
            arrays["objectGuess"] = self.objectGuess
        if self.Y is not None:
            arrays["Y"] = self.Y
        if self.bad_pixels is not None:
            arrays["bad_pixels"] = self.bad_pixels
        if self.metadata is not None:
            try:
                arrays["_metadata"] = np.array(json.dumps(self.metadata, default=_json_default))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata: expected JSON-serialisable values ({exc})") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            np.savez(fh, **arrays)
        return path

    # -----------------------------------------------------------------------------------------
    def generate_grouped_data(self, N, K=4, nsamples=1, dataset_path=None, seed=None,
                              sequential_sampling=False, gridsize=None, enable_oversampling=False,
                              neighbor_pool_size=None, rng=None) -> dict:
        """Group scan positions into the reference's grouped-data dict.

        See :func:`backend_api.grouping.generate_grouped_data` for arguments, keys, shapes,
        dtypes and the randomness rules. Does not touch numpy's global RNG.
        """
        return _grouping.generate_grouped_data(
            self, N, K=K, nsamples=nsamples, dataset_path=dataset_path, seed=seed,
            sequential_sampling=sequential_sampling, gridsize=gridsize,
            enable_oversampling=enable_oversampling, neighbor_pool_size=neighbor_pool_size,
            rng=rng)


# ---------------------------------------------------------------------------------------------
# Reading the contract's members from an open NPZ
# ---------------------------------------------------------------------------------------------
def _read_contract(path: Path, npz, allow_pickle: bool, bad_pixels, mmap: bool = False) -> dict:
    """The RawData constructor arguments from an open NPZ (``{'args': ..., 'kwargs': ...}``)."""
    keys = set(npz.files)

    def get(key):
        try:
            return read_npz_member(path, npz, key)
        except DataFileError:
            raise
        except ValueError as exc:  # object array while allow_pickle=False
            raise ValueError(f"{key}: stored as a pickled object array, which is not "
                             f"loaded without allow_pickle=True ({exc})") from None

    for key in ("xcoords", "ycoords", "probeGuess"):
        if key not in keys:
            raise ValueError(f"missing required key '{key}' (expected {key}, diff3d and "
                             f"probeGuess; present: {sorted(keys)})")
    if "diff3d" in keys:
        dkey = "diff3d"
    elif "diffraction" in keys:
        dkey = "diffraction"
    else:
        raise ValueError(f"missing required key 'diff3d' (or 'diffraction'); expected the "
                         f"(M, H, H) diffraction amplitudes (present: {sorted(keys)})")
    x = get("xcoords")
    y = get("ycoords")
    d = map_npz_member(path, dkey) if mmap else None
    d = get(dkey) if d is None else d
    M = np.asarray(x).reshape(-1).shape[0] if np.ndim(x) == 1 else None
    if d.ndim == 4 and d.shape[-1] == 1:
        d = d[..., 0]
    if (M and d.ndim == 3 and d.shape[0] != M and d.shape[2] == M
            and d.shape[0] == d.shape[1]):
        warnings.warn(f"{dkey}: legacy (H, W, M) layout {d.shape}; transposing to "
                      f"(M, H, W)", UserWarning, stacklevel=4)
        d = np.ascontiguousarray(np.transpose(d, (2, 0, 1)))
    xs = get("xcoords_start") if "xcoords_start" in keys else None
    ys = get("ycoords_start") if "ycoords_start" in keys else None
    probe = get("probeGuess")
    si = get("scan_index") if "scan_index" in keys else None
    obj = None
    if "objectGuess" in keys:
        o = _load_member(path, npz, "objectGuess", allow_pickle)
        obj = None if (o is None or (isinstance(o, np.ndarray) and o.dtype == object
                                    and o.ndim == 0 and o.item() is None)) else o
    Yv = None
    if "Y" in keys:
        Yv = get("Y")
        if M is not None and np.ndim(Yv) >= 1 and Yv.shape[0] != M:
            warnings.warn(f"Y: {Yv.shape[0]} ground-truth patches for {M} positions; "
                          f"ignoring Y", UserWarning, stacklevel=4)
            Yv = None
    mask = bad_pixels
    if mask is None and "bad_pixels" in keys:
        mask = get("bad_pixels")
    metadata = None
    if "_metadata" in keys:
        metadata = _parse_metadata(_load_member(path, npz, "_metadata", allow_pickle))
    return {"args": (x, y, xs, ys, d, probe, si),
            "kwargs": dict(objectGuess=obj, Y=Yv, metadata=metadata, bad_pixels=mask)}


def _json_default(v):
    """numpy scalars/arrays and paths in metadata become plain JSON values."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _parse_metadata(value) -> dict:
    v = value
    if isinstance(v, np.ndarray):
        if v.ndim != 0:
            raise ValueError(f"_metadata: expected a scalar JSON string, got shape {v.shape}")
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if isinstance(v, Mapping):
        return dict(v)
    if not isinstance(v, str):
        raise ValueError(f"_metadata: expected a JSON string, got {type(v).__name__}")
    try:
        out = json.loads(v)
    except json.JSONDecodeError as exc:
        raise ValueError(f"_metadata: not valid JSON ({exc})") from None
    if not isinstance(out, dict):
        raise ValueError(f"_metadata: expected a JSON object, got {type(out).__name__}")
    return out
