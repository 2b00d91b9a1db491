"""Synthetic ptychography datasets: objects, scan positions, Poisson-noise diffraction, NPZ files.

Physics (reference brief model_physics.md §1.6): for scan position ``(x, y)`` the ground-truth
patch ``O_i`` covers object pixels ``[x - N/2, x + N/2)`` x ``[y - N/2, y + N/2)`` (patch centre
pixel ``N/2`` sits on ``(x, y)``; sub-pixel positions use the bilinear
:func:`pinn_jax.geometry.translate`). The exit wave is ``P * O_i``
(:func:`pinn_jax.physics.illuminate`), its far-field amplitude ``A_i``
(:func:`pinn_jax.physics.diffraction_amplitude`, DC at ``[N/2, N/2]``). One photon scale for the
dataset, ``s = sqrt(nphotons / mean_i sum_k A_i^2)``, makes the *expected* counts per pattern
``nphotons`` on average; counts are ``Poisson(s^2 A_i^2)`` and the stored diffraction is
``diff3d = sqrt(counts)`` (amplitude; ``diff_units='counts'``, what a detector gives) or
``sqrt(counts) / s`` (``diff_units='scaled'``, the reference simulator's stored units). Training
renormalises the diffraction either way (``normalize_data``), so both are valid inputs.

Train/test split: by default the test set is a **different object** of the same kind and size,
drawn from an independent random stream (as in the reference's quality runs, where train and test
objects differ), so a test score measures generalisation, never a copy of training data. With
``split='halves'`` one object is simulated and cut by rows: training positions keep their whole
``N x N`` patch in the top part, test positions in the bottom part, so no object pixel is seen by
both sets. The photon scale ``s`` is computed on the training set and reused for the test set (as
the reference does), so both sets share units.

Why this module does not call :func:`pinn_jax.physics.illuminate_and_diffract`: that is the
reference ``diffsim`` forward model on device (float32 photon scale, ``jax.random.poisson`` with a
normal approximation above 1e7 counts), kept for the parity tests and for callers of the
reference name. Datasets here draw exact int64 Poisson counts on the host from a numpy stream
and compute ``s`` in float64, so switching would change every simulated file; both share
:func:`pinn_jax.physics.illuminate` and :func:`pinn_jax.physics.diffraction_amplitude`.

Randomness is explicit: an ``int`` seed (expanded with ``numpy.random.SeedSequence``), a
``numpy.random.Generator``, or a JAX key; the same seed always gives the same dataset.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from backend_api.fileio import atomic_write
from backend_api.raw_data import RawData

__all__ = [
    "OBJECT_KINDS",
    "make_object",
    "position_bounds",
    "random_positions",
    "raster_positions",
    "extract_patches",
    "diffraction_patterns",
    "photon_scale",
    "poisson_amplitudes",
    "simulate_patterns",
    "simulate_dataset",
    "simulate_to_npz",
    "save_npz",
    "SimulatedSet",
]

# Objects and scan positions: their own module (pinn_jax.synthetic), re-exported here.
from pinn_jax.geometry import extract_patch as _extract_one  # noqa: E402
from pinn_jax.synthetic import (  # noqa: E402
    OBJECT_KINDS,
    _as_generator,
    make_object,
    position_bounds,
    random_positions,
    raster_positions,
)


# --------------------------------------------------------------------------------------------
# patches and diffraction (jitted, vmapped over patterns)


@partial(jax.jit, static_argnames=("N",))
def _extract_chunk(obj_pad, positions, *, N: int):
    return jax.vmap(lambda p: _extract_one(obj_pad, p, N))(positions)


def _chunked(fn, arrays: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
    """Apply a jitted per-chunk ``fn`` over the leading axis in fixed-size chunks.

    The last chunk is padded (with copies of the first rows) to the same size so that one
    compilation serves every dataset size; padded rows are dropped.
    """
    n = len(arrays[0])
    # Chunk sizes are bucketed to powers of two (>= 8) so that datasets of nearby sizes share
    # one compilation.
    b = max(1, min(int(batch), max(8, 1 << (n - 1).bit_length())))
    outs: list[list[np.ndarray]] = []
    for i in range(0, n, b):
        part = [a[i:i + b] for a in arrays]
        k = len(part[0])
        if k < b:
            part = [np.concatenate([p, np.repeat(a[:1], b - k, axis=0)])
                    for p, a in zip(part, arrays)]
        res = fn(*part)
        res = res if isinstance(res, tuple) else (res,)
        outs.append([np.asarray(r)[:k] for r in res])
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def _check_positions(positions: Any, object_shape: tuple[int, int], N: int) -> np.ndarray:
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] == 0:
        raise ValueError(f"positions: expected shape (n, 2) [x, y] with n >= 1, got {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise ValueError("positions: contain non-finite values")
    h, w = object_shape
    xlo, xhi = N / 2, w - N / 2
    ylo, yhi = N / 2, h - N / 2
    bad = (pos[:, 0] < xlo) | (pos[:, 0] > xhi) | (pos[:, 1] < ylo) | (pos[:, 1] > yhi)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(
            f"positions: {int(bad.sum())} patch centre(s) put the N={N} patch outside the "
            f"{h}x{w} object, first #{i} = {pos[i].tolist()}; expected x in [{xlo}, {xhi}], "
            f"y in [{ylo}, {yhi}]")
    return pos


def extract_patches(obj: Any, positions: Any, N: int, *, batch: int = 256) -> np.ndarray:
    """Ground-truth patches ``(n, N, N)`` complex64 for scan positions ``(n, 2)`` ``[x, y]``.

    Patch ``i`` pixel ``(r, c)`` is the object at ``(x_i - N/2 + c, y_i - N/2 + r)`` (bilinear),
    so its centre pixel ``(N/2, N/2)`` is the scan position. Positions must keep the patch inside
    the object (``N/2 <= x <= W - N/2``, same for y) -> ValueError otherwise.
    """
    o = np.asarray(obj)
    if o.ndim != 2:
        raise ValueError(f"obj: expected a 2-D object (H, W), got shape {o.shape}")
    if int(N) != N or N < 2 or N % 2:
        raise ValueError(f"N: expected an even int >= 2, got {N!r}")
    pos = _check_positions(positions, o.shape, int(N))
    o_pad = jnp.asarray(np.pad(o.astype(np.complex64), ((0, 1), (0, 1))))
    (out,) = _chunked(lambda p: _extract_chunk(o_pad, p, N=int(N)), [pos.astype(np.float32)],
                      batch)
    return out


@jax.jit
def _amplitude_chunk(patches, probe):
    from .physics import diffraction_amplitude, illuminate

    return jax.vmap(lambda p: diffraction_amplitude(illuminate(probe, p)))(patches)


def diffraction_patterns(patches: Any, probe: Any, *, batch: int = 256) -> np.ndarray:
    """Noiseless far-field amplitudes ``|F(P * O_i)| / N``, ``(n, N, N)`` float32, DC at N/2."""
    p = np.asarray(patches)
    pr = np.asarray(probe)
    if pr.ndim == 3 and pr.shape[-1] == 1:
        pr = pr[..., 0]
    if p.ndim != 3 or pr.shape != p.shape[1:]:
        raise ValueError(
            f"patches/probe: expected patches (n, N, N) and probe (N, N); got {p.shape} and "
            f"{pr.shape}")
    probe_j = jnp.asarray(pr, jnp.complex64)
    (out,) = _chunked(lambda q: _amplitude_chunk(q, probe_j), [p.astype(np.complex64)], batch)
    return out


def photon_scale(amplitudes: Any, nphotons: float) -> float:
    """``s = sqrt(nphotons / mean_i sum_k A_i^2)``: expected counts per pattern = ``nphotons``."""
    a = np.asarray(amplitudes, np.float64)
    if not (nphotons > 0 and math.isfinite(nphotons)):
        raise ValueError(f"nphotons: expected a positive finite number, got {nphotons!r}")
    energy = float(np.mean(np.sum(a * a, axis=(-2, -1))))
    if energy <= 0:
        raise ValueError("amplitudes: all patterns are zero; cannot set the photon scale")
    return math.sqrt(nphotons / energy)


def poisson_amplitudes(rate_amplitude: Any, seed: Any = 0) -> np.ndarray:
    """``sqrt(Poisson(rate_amplitude**2))`` as float32, drawn exactly on the host.

    numpy's Poisson sampler (int64 counts, exact at any rate) is used rather than
    ``jax.random.poisson``: on CPU the latter's rejection loops under vmap are ~20x slower
    for detector-sized arrays, and int32 counts overflow for bright pixels.

    Args:
      rate_amplitude: array of amplitudes in count units (``s * A``).
      seed: int, numpy Generator or JAX key.
    """
    lam = np.square(np.asarray(rate_amplitude, np.float64))
    rng = _as_generator(seed)
    return np.sqrt(rng.poisson(lam)).astype(np.float32)


def simulate_patterns(obj: Any, probe: Any, positions: Any, *, nphotons: float = 1e9,
                      key: Any = 0, scale: float | None = None, poisson: bool = True,
                      batch: int = 256) -> tuple[np.ndarray, float, np.ndarray]:
    """Diffraction for one object: ``(sqrt(counts) (n,N,N) f32, scale s, patches (n,N,N) c64)``.

    Args:
      obj: ``(H, W)`` complex object.
      probe: ``(N, N)`` complex probe (any normalisation; the photon scale absorbs it).
      positions: ``(n, 2)`` ``[x, y]`` patch centres (object pixels).
      nphotons: expected counts per pattern, averaged over the patterns.
      key: int seed, numpy Generator or JAX key for the Poisson draws.
      scale: reuse a photon scale (e.g. the training set's) instead of computing it.
      poisson: False returns the noiseless ``s * A`` (for tests).
    """
    pr = np.asarray(probe)
    if pr.ndim == 3 and pr.shape[-1] == 1:
        pr = pr[..., 0]
    if pr.ndim != 2 or pr.shape[0] != pr.shape[1]:
        raise ValueError(f"probe: expected (N, N) complex, got shape {pr.shape}")
    N = pr.shape[0]
    patches = extract_patches(obj, positions, N, batch=batch)
    amps = diffraction_patterns(patches, pr, batch=batch)
    s = photon_scale(amps, nphotons) if scale is None else float(scale)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
    if not poisson:
        return (amps * np.float32(s)).astype(np.float32), s, patches
    return poisson_amplitudes(amps.astype(np.float64) * s, key), s, patches


# --------------------------------------------------------------------------------------------
# datasets


@dataclass
class SimulatedSet:
    """Arrays of one simulated set in the NPZ contract (``as_dict()`` gives the NPZ keys)."""

    xcoords: np.ndarray        # (n,) float64, object pixels
    ycoords: np.ndarray        # (n,) float64
    diff3d: np.ndarray         # (n, N, N) float32 amplitude
    probeGuess: np.ndarray     # (N, N) complex64
    objectGuess: np.ndarray    # (H, W) complex64
    scan_index: np.ndarray     # (n,) int64
    metadata: dict
    Y: np.ndarray | None = None  # (n, N, N) complex64 ground-truth patches, when requested

    def as_dict(self) -> dict:
        return {
            "xcoords": self.xcoords, "ycoords": self.ycoords,
            "xcoords_start": self.xcoords.copy(), "ycoords_start": self.ycoords.copy(),
            "diff3d": self.diff3d, "probeGuess": self.probeGuess,
            "objectGuess": self.objectGuess, "scan_index": self.scan_index,
        }

    @property
    def positions(self) -> np.ndarray:
        """``(n, 2)`` float64 ``[x, y]``."""
        return np.stack([self.xcoords, self.ycoords], axis=1)


def _to_raw(s: SimulatedSet) -> RawData:
    """The :class:`backend_api.raw_data.RawData` of one simulated set (``Y`` when attached)."""
    d = s.as_dict()
    kwargs = dict(metadata=dict(s.metadata))
    if s.Y is not None:
        kwargs["Y"] = s.Y
    return RawData(d["xcoords"], d["ycoords"], d["xcoords_start"], d["ycoords_start"],
                   d["diff3d"], d["probeGuess"], d["scan_index"], objectGuess=d["objectGuess"],
                   **kwargs)


def _check_dataset_args(*, N, object_size, n_images, train_fraction, kind, scan, split,
                        nphotons, diff_units) -> tuple[int, int, int, int]:
    """:func:`simulate_dataset`'s argument checks (ValueError naming the argument); returns
    ``(N, object_size, n_train, n_test)`` as ints."""
    if int(N) != N or N < 4 or N % 2:
        raise ValueError(f"N: expected an even int >= 4, got {N!r}")
    N = int(N)
    if not (0.0 < train_fraction < 1.0):
        raise ValueError(f"train_fraction: expected a value in (0, 1), got {train_fraction!r}")
    if int(n_images) != n_images or n_images < 2:
        raise ValueError(f"n_images: expected an int >= 2, got {n_images!r}")
    if scan not in ("random", "raster"):
        raise ValueError(f"scan: expected 'random' or 'raster', got {scan!r}")
    if split not in ("objects", "halves"):
        raise ValueError(f"split: expected 'objects' or 'halves', got {split!r}")
    if diff_units not in ("counts", "scaled"):
        raise ValueError(f"diff_units: expected 'counts' or 'scaled', got {diff_units!r}")
    if not (nphotons > 0 and math.isfinite(nphotons)):
        raise ValueError(f"nphotons: expected a positive finite number, got {nphotons!r}")
    if kind not in OBJECT_KINDS:
        raise ValueError(f"kind: expected one of {OBJECT_KINDS}, got {kind!r}")
    if int(object_size) != object_size or object_size < N:
        raise ValueError(f"object_size: expected an int >= N={N}, got {object_size!r}")
    object_size = int(object_size)
    n_train = int(round(n_images * train_fraction))
    n_test = int(n_images) - n_train
    if n_train < 1 or n_test < 1:
        raise ValueError(
            f"train_fraction: {train_fraction} of n_images={n_images} leaves an empty set "
            f"({n_train} train, {n_test} test)")
    return N, object_size, n_train, n_test


def _dataset_probe(probe, probe_scale, N: int) -> np.ndarray:
    """The ``(N, N)`` complex64 probe of :func:`simulate_dataset` (default probe if None,
    ``normalize_probe(probe, probe_scale)`` when a scale is given)."""
    from .probe import default_probe, normalize_probe

    if probe is None:
        pr = np.asarray(default_probe(N))
    else:
        pr = np.asarray(probe)
        if pr.ndim == 3 and pr.shape[-1] == 1:
            pr = pr[..., 0]
        if pr.shape != (N, N):
            raise ValueError(f"probe: expected shape ({N}, {N}), got {pr.shape}")
    if probe_scale is not None:
        pr = np.asarray(normalize_probe(jnp.asarray(pr), float(probe_scale)))
    return pr.astype(np.complex64)


def simulate_dataset(*, N: int = 64, object_size: int = 224, n_images: int = 512,
                     train_fraction: float = 0.5, kind: str = "lines", scan: str = "random",
                     split: str = "objects", nphotons: float = 1e9, probe: Any = None,
                     probe_scale: float | None = None, seed: int = 0, margin: float = 0.0,
                     jitter: float = 0.0, diff_units: str = "counts", poisson: bool = True,
                     object_kwargs: Mapping[str, Any] | None = None,
                     include_patches: bool = False, as_raw: bool = True, batch: int = 256):
    """Simulate a train and a test set.

    (Long on purpose: most of its length is this docstring and the two ``split`` branches,
    which read top to bottom; the argument checks and the probe are separate functions.)

    Args:
      N: patch / detector side (even).
      object_size: side of each square object in pixels.
      n_images: total scan positions; ``round(n_images * train_fraction)`` go to training.
      train_fraction: in (0, 1).
      kind: object kind, see :func:`make_object`.
      scan: ``'random'`` (uniform) or ``'raster'`` (see :func:`raster_positions`).
      split: ``'objects'`` (default; a different object for the test set) or ``'halves'`` (one
        object, train patches in the top rows, test patches in the bottom rows, disjoint; the cut
        is at ``train_fraction`` of the height, so each part must hold an N-patch).
      nphotons: expected counts per pattern (mean over training patterns).
      probe: ``(N, N)`` complex probe; default ``pinn_jax.probe.default_probe(N)``.
      probe_scale: if given, the probe is ``normalize_probe(probe, probe_scale)`` before use.
      seed: int seed for everything (objects, positions, noise).
      margin: pixels kept between patches and the object (or half) border.
      jitter: raster jitter in px.
      diff_units: ``'counts'`` (``diff3d = sqrt(counts)``) or ``'scaled'``
        (``sqrt(counts) / s``, the reference simulator's stored units).
      poisson: False stores noiseless amplitudes (same units).
      object_kwargs: extra :func:`make_object` arguments (amp_range, phase_range, ...).
      include_patches: also attach the ground-truth patches (``Y``, (n, N, N) complex64).
      as_raw: return ``backend_api.raw_data.RawData`` (False: :class:`SimulatedSet`).

    Returns:
      ``(train, test)``: RawData (or :class:`SimulatedSet` for ``as_raw=False``) with ``xcoords/ycoords`` float64
      (``*_start`` equal), ``diff3d (n, N, N)`` float32, ``probeGuess`` complex64,
      ``objectGuess`` complex64 (the object each set was simulated from; for ``'halves'`` the
      whole shared object), ``scan_index`` int64 zeros, and ``metadata`` with ``nphotons``,
      ``intensity_scale`` (the photon scale s), ``diff_units`` and the simulation settings.
    """
    N, object_size, n_train, n_test = _check_dataset_args(
        N=N, object_size=object_size, n_images=n_images, train_fraction=train_fraction,
        kind=kind, scan=scan, split=split, nphotons=nphotons, diff_units=diff_units)
    pr = _dataset_probe(probe, probe_scale, N)

    ss_obj_tr, ss_obj_te, ss_pos_tr, ss_pos_te, ss_noise = np.random.SeedSequence(
        int(seed)).spawn(5)
    okw = dict(object_kwargs or {})
    obj_train = make_object(kind, object_size, np.random.default_rng(ss_obj_tr), **okw)
    shape = (object_size, object_size)
    if split == "objects":
        obj_test = make_object(kind, object_size, np.random.default_rng(ss_obj_te), **okw)
        rows_tr = rows_te = None
    else:
        obj_test = obj_train
        cut = int(round(object_size * train_fraction))
        rows_tr, rows_te = (0, cut), (cut, object_size)
        for name, (r0, r1) in (("train", rows_tr), ("test", rows_te)):
            if r1 - r0 < N + 2 * margin:
                raise ValueError(
                    f"split='halves': the {name} band has {r1 - r0} rows, fewer than "
                    f"N + 2*margin = {N + 2 * margin}; increase object_size or change "
                    f"train_fraction")

    def _pos(n, ss, rows):
        rng = np.random.default_rng(ss)
        if scan == "random":
            return random_positions(n, shape, N, seed=rng, margin=margin, rows=rows)
        return raster_positions(n, shape, N, margin=margin, jitter=jitter, seed=rng, rows=rows)

    pos_tr = _pos(n_train, ss_pos_tr, rows_tr)
    pos_te = _pos(n_test, ss_pos_te, rows_te)
    k_tr, k_te = (np.random.default_rng(c) for c in ss_noise.spawn(2))
    d_tr, s, y_tr = simulate_patterns(obj_train, pr, pos_tr, nphotons=nphotons, key=k_tr,
                                      poisson=poisson, batch=batch)
    d_te, _, y_te = simulate_patterns(obj_test, pr, pos_te, nphotons=nphotons, key=k_te,
                                      scale=s, poisson=poisson, batch=batch)
    if diff_units == "scaled":
        d_tr = (d_tr / np.float32(s)).astype(np.float32)
        d_te = (d_te / np.float32(s)).astype(np.float32)

    base_meta = {
        "nphotons": float(nphotons),
        "physics_parameters": {"nphotons": float(nphotons), "N": N},
        "intensity_scale": float(s),
        "diff_units": diff_units,
        "simulation": {
            "generator": "pinn_jax.simulate", "kind": kind, "object_size": object_size,
            "scan": scan, "split": split, "seed": int(seed), "train_fraction": train_fraction,
            "n_train": n_train, "n_test": n_test, "margin": margin, "jitter": jitter,
            "poisson": bool(poisson), "probe_scale": probe_scale,
            "object_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in okw.items()},
        },
    }

    def _set(pos, d, obj, y, role, rows):
        meta = json.loads(json.dumps(base_meta))
        meta["simulation"]["role"] = role
        if rows is not None:
            meta["simulation"]["rows"] = list(rows)
        return SimulatedSet(
            xcoords=pos[:, 0].astype(np.float64), ycoords=pos[:, 1].astype(np.float64),
            diff3d=d.astype(np.float32), probeGuess=pr.copy(), objectGuess=obj.copy(),
            scan_index=np.zeros(len(pos), np.int64), metadata=meta,
            Y=y.astype(np.complex64) if include_patches else None)

    train = _set(pos_tr, d_tr, obj_train, y_tr, "train", rows_tr)
    test = _set(pos_te, d_te, obj_test, y_te, "test", rows_te)
    if as_raw:
        return _to_raw(train), _to_raw(test)
    return train, test


# --------------------------------------------------------------------------------------------
# files


def _arrays_of(data: Any) -> tuple[dict, dict]:
    """(NPZ arrays, metadata) from a SimulatedSet, RawData-like object or mapping."""
    if isinstance(data, SimulatedSet):
        return data.as_dict(), dict(data.metadata)
    if isinstance(data, Mapping):
        d = {k: v for k, v in data.items() if k != "_metadata"}
        meta = data.get("_metadata", {})
        if isinstance(meta, (str, np.ndarray)):
            meta = json.loads(str(meta))
        return d, dict(meta)
    keys = ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d", "probeGuess",
            "objectGuess", "scan_index")
    d = {}
    for k in keys:
        v = getattr(data, k, None)
        if v is not None:
            d[k] = v
    return d, dict(getattr(data, "metadata", None) or {})


_NPZ_DTYPES = {"xcoords": np.float64, "ycoords": np.float64, "xcoords_start": np.float64,
               "ycoords_start": np.float64, "diff3d": np.float32, "probeGuess": np.complex64,
               "objectGuess": np.complex64, "scan_index": np.int64}


def save_npz(path: str | os.PathLike, data: Any) -> Path:
    """Write one set as an NPZ in the data contract, atomically (:func:`backend_api.fileio.atomic_write`).

    Keys: ``xcoords, ycoords, xcoords_start, ycoords_start`` float64 ``(n,)``, ``diff3d``
    float32 ``(n, N, N)``, ``probeGuess`` complex64, ``objectGuess`` complex64, ``scan_index``
    int64, and ``_metadata`` (a 0-d unicode array holding JSON; no pickling needed to read it).
    """
    arrays, meta = _arrays_of(data)
    for k in ("xcoords", "ycoords", "diff3d", "probeGuess"):
        if k not in arrays:
            raise ValueError(f"data: required key {k!r} missing")
    arrays.setdefault("xcoords_start", arrays["xcoords"])
    arrays.setdefault("ycoords_start", arrays["ycoords"])
    arrays.setdefault("scan_index", np.zeros(len(np.asarray(arrays["xcoords"])), np.int64))
    out = {k: np.asarray(v).astype(_NPZ_DTYPES.get(k, None) or np.asarray(v).dtype)
           for k, v in arrays.items() if k in _NPZ_DTYPES and v is not None}
    out["_metadata"] = np.array(json.dumps(meta))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        np.savez(fh, **out)
    return path


def simulate_to_npz(out: str | os.PathLike | tuple[str | os.PathLike, str | os.PathLike],
                    **kwargs) -> tuple[Path, Path]:
    """Simulate (see :func:`simulate_dataset` for ``kwargs``) and write two NPZ files.

    Args:
      out: a directory (files ``train_data.npz`` and ``test_data.npz`` inside it, the names
        ptychodus' ``train()`` looks for) or a ``(train_path, test_path)`` pair.

    Returns:
      ``(train_path, test_path)``.
    """
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"out: expected a directory or (train_path, test_path), got {out!r}")
        p_train, p_test = Path(out[0]), Path(out[1])
    else:
        p_train, p_test = Path(out) / "train_data.npz", Path(out) / "test_data.npz"
    if p_train == p_test:
        raise ValueError(f"out: train and test paths are the same ({p_train})")
    kwargs = dict(kwargs)
    kwargs["as_raw"] = False
    train, test = simulate_dataset(**kwargs)
    return save_npz(p_train, train), save_npz(p_test, test)
