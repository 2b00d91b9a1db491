"""Physics refinement (pinn_jax.refine) against pty-chi's LSQML and rPIE: quality against wall time.

Every method solves the same scan in the same process, one after another, and is scored after
each pass/epoch with the same function, :func:`pinn_jax.metrics.eval_reconstruction` (the
corrected protocol: the object on the ground truth's grid, inside the scanned region, global
complex gain and phase ramp removed). Metric time is excluded from the wall time; compilation
is included (and reported separately for pinn-jax as ``setup_s``: the time to the end of pass 1
minus one steady pass).

Scenarios (``--scenario``, several allowed):

* ``reference``: the scan as given (``--test``, e.g. the TF reference run's ``test.npz``;
  1e9 photons, simulated with the same bilinear forward model that pinn-jax's solver uses).
* ``no-inverse-crime``: the same object, probe and positions re-simulated with another forward
  model: object and probe Fourier-interpolated to a 2x finer grid, sub-pixel positions applied
  as Fourier shifts of the fine object, far field of the fine 2N x 2N exit wave cropped to its
  central N x N (the same detector pixels: a 2N grid at half the pixel size has the same
  frequency step and twice the range), Poisson noise at the same photon count. The relative
  residual of the solver's own model (true object, fitted gain) against these data is reported
  beside the Poisson floor.
* ``lowdose``: the solver's forward model at ``--nphotons`` (default 1e4 1e5) photons per
  pattern with Poisson noise (``pinn_jax.simulate.simulate_patterns``); pinn-jax gaussian and
  poisson paths and LSQML (gaussian and poisson noise models); ``--sweep`` adds a small
  RefineOptions grid for the poisson path at the lowest dose.
* ``memory``: a ``--memory-positions`` (4096) scan at N=64 on a synthetic object, two passes:
  peak RSS and seconds per pass (no pty-chi, no metrics per pass).

pty-chi runs on the CPU with the conventions of ``shared/reference/ptychi_baseline.md``: counts
``I = A**2`` with ``A`` in photon units, probe ``probeGuess * s / N`` (s: the data's scale
relative to the solver's model amplitudes), DC-centred data with ``fft_shift=True``, object
buffer padded by 16 px with the position origin at 15.5 px, flat start, probe and positions
fixed; LSQML batch 96, rPIE batch 32 alpha 0.1. Each epoch is a ``task.run(1)`` continuing the
same task (the task's state persists), and only those calls are timed.

Usage::

    python benchmarks/refine.py --test .../tf_reference_run/test.npz --model_path /tmp/bench_model \\
        --scenario reference no-inverse-crime lowdose memory --out benchmarks/results/refine.json \\
        --plot benchmarks/results/refine.png
    python benchmarks/refine.py --quick --out /tmp/refine_quick.json       # synthetic smoke run

Without ``--model_path`` the network-seeded rows say "no model given"; without ``import ptychi``
the pty-chi rows say "not installed". Set ``OMP_NUM_THREADS`` for a fair CPU comparison (the
script sets torch's thread count to it, default 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THRESHOLDS = (0.95, 0.98)
EQUAL_TIMES = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
PAD = 16  # pty-chi's object buffer margin (px)


# ---------------------------------------------------------------------------------------------
# data


class Scan:
    """One scan in photon units: ``amp`` = sqrt(counts) ``(n, N, N)``, ``positions`` ``(n, 2)``
    [x, y], ``probe`` ``(N, N)``, ground truth ``gt`` ``(H, W)`` and ``s``: the factor with
    ``amp ~ s * A_model(gt)`` (A_model: pinn-jax's ``|F(P * O)| / N``), used for pty-chi's probe."""

    def __init__(self, name, amp, positions, probe, gt, s, **info):
        self.name, self.amp, self.positions, self.probe, self.gt, self.s = name, amp, positions, probe, gt, s
        self.info = info

    @property
    def N(self) -> int:
        return int(self.amp.shape[-1])


def load_reference(path: Path, n_positions: int | None = None) -> Scan:
    """A scan NPZ with ``objectGuess``. Amplitudes in photon units (``sqrt(counts)``, as
    ``pinn-jax simulate`` writes them: metadata ``diff_units`` "counts") are taken as they are,
    with ``s`` fitted (the least-squares gain of the solver's model on the ground truth);
    amplitudes in model units (the TF reference run's files) are scaled to 1e9 counts per
    pattern as ``ptychi_baseline.md`` §1 does."""
    d = np.load(path, allow_pickle=False)
    diff = np.asarray(d["diff3d"], np.float64)
    pos = np.column_stack([d["xcoords"], d["ycoords"]]).astype(np.float64)
    probe = np.asarray(d["probeGuess"], np.complex64)
    gt = np.asarray(d["objectGuess"], np.complex64)
    meta = {}
    if "_metadata" in d.files:
        try:
            meta = json.loads(str(d["_metadata"]))
        except (TypeError, ValueError):
            meta = {}
    if meta.get("diff_units") == "counts":
        from pinn_jax.refine_steps import photon_gain

        amp = diff.astype(np.float32)
        s = photon_gain(gt, probe, pos, amp)
        # the simulation's nominal photons per pattern, else what the patterns hold
        nphotons = float(meta.get("nphotons") or np.mean(np.sum(diff ** 2, axis=(1, 2))))
        name = f"{Path(path).stem} ({nphotons:.0e} photons)"
    else:
        s = math.sqrt(1e9 / np.mean(np.sum(diff ** 2, axis=(1, 2))))
        amp = (diff * s).astype(np.float32)
        nphotons, name = 1e9, "reference"
    if n_positions:
        keep = np.sort(np.random.default_rng(0).choice(len(pos), n_positions, replace=False))
        amp, pos = amp[keep], pos[keep]
    return Scan(name, amp, pos, probe, gt, s, nphotons=nphotons, source=str(path))


def synthetic_scan(N: int, size: int, n: int, seed: int = 0, nphotons: float = 1e9) -> Scan:
    """A small simulated scan (pinn_jax.simulate) for --quick runs without data files."""
    from pinn_jax import probe as probe_mod
    from pinn_jax import simulate

    obj = simulate.make_object("lines", size=size, seed=seed)
    pr = np.asarray(probe_mod.default_probe(N), np.complex64)
    pos = simulate.random_positions(n, obj.shape, N, seed=seed)
    amp, s, _ = simulate.simulate_patterns(obj, pr, pos, nphotons=nphotons, key=seed)
    return Scan("synthetic", amp, np.asarray(pos, np.float64), pr, np.asarray(obj, np.complex64), s,
                nphotons=nphotons, source=f"synthetic lines {size}x{size}, {n} positions")


def lowdose_scan(base: Scan, nphotons: float, seed: int) -> Scan:
    from pinn_jax import simulate

    amp, s, _ = simulate.simulate_patterns(base.gt, base.probe, base.positions, nphotons=nphotons, key=seed)
    return Scan(f"lowdose {nphotons:.0e}", amp, base.positions, base.probe, base.gt, s, nphotons=nphotons)


def _fourier_upsample2(a: np.ndarray) -> np.ndarray:
    """2x band-limited interpolation of a periodic 2-D array: fine pixel (2i, 2j) = a[i, j]."""
    h, w = a.shape
    F = np.fft.fftshift(np.fft.fft2(a))
    G = np.zeros((2 * h, 2 * w), np.complex128)
    G[h - h // 2:h - h // 2 + h, w - w // 2:w - w // 2 + w] = F
    # the Nyquist row/column (even sizes) is split between +/- Nyquist to keep a real signal real
    if h % 2 == 0:
        r = h - h // 2
        G[r, :] *= 0.5
        G[r + h, :] = G[r, :]
    if w % 2 == 0:
        c = w - w // 2
        G[:, c] *= 0.5
        G[:, c + w] = G[:, c]
    return np.fft.ifft2(np.fft.ifftshift(G)) * 4.0


def no_inverse_crime_scan(base: Scan, seed: int) -> Scan:
    """Re-simulate ``base`` on a 2x finer grid with Fourier sub-pixel shifts (see the docstring).

    Coarse object coordinate u is fine coordinate 2u. The solver's patch pixel c of position x
    sits at u = x - N/2 + c, so fine patch pixel c' (0..2N-1) sits at fine coordinate
    2x - N + c'. The fine object is shifted by the fractional part in Fourier space (exact for
    the band-limited periodic interpolant) and the integer window is sliced. The far field of the
    2N x 2N exit wave (pixel d/2) has the coarse grid's frequency step 1/(N d) over twice the
    range; its central N x N (DC at N/2 after the crop, as in pinn-jax) are the detector pixels.
    """
    N = base.N
    O2 = _fourier_upsample2(base.gt.astype(np.complex128))
    P2 = _fourier_upsample2(base.probe.astype(np.complex128))
    H2, W2 = O2.shape
    FO = np.fft.fft2(O2)
    ky = np.fft.fftfreq(H2)[:, None]
    kx = np.fft.fftfreq(W2)[None, :]
    inten = np.empty((len(base.positions), N, N))
    for i, (x, y) in enumerate(base.positions):
        fx, fy = 2 * x - N, 2 * y - N          # fine coordinate of fine patch pixel 0
        ix, iy = math.floor(fx), math.floor(fy)
        dx, dy = fx - ix, fy - iy
        # shifted[r, c] = O2(r + dy, c + dx): a Fourier shift of the whole periodic fine object
        shifted = np.fft.ifft2(FO * np.exp(2j * np.pi * (ky * dy + kx * dx)))
        rows = np.arange(iy, iy + 2 * N) % H2
        cols = np.arange(ix, ix + 2 * N) % W2
        exit_wave = P2 * shifted[np.ix_(rows, cols)]
        far = np.fft.fftshift(np.fft.fft2(exit_wave))
        inten[i] = np.abs(far[N - N // 2:N + N // 2, N - N // 2:N + N // 2]) ** 2
    nphotons = float(base.info.get("nphotons", 1e9))
    scale2 = nphotons / np.mean(inten.sum(axis=(1, 2)))
    clean = np.sqrt(inten * scale2)
    rng = np.random.default_rng(seed)
    amp = np.sqrt(rng.poisson(clean ** 2)).astype(np.float32)
    # the solver's own model on the true object, with its best gain, against these data
    from pinn_jax.refine import model_amplitudes

    model = np.asarray(model_amplitudes(base.gt, base.probe, base.positions), np.float64)
    g = float(np.sum(model * clean) / np.sum(model * model))
    resid_model_clean = float(np.linalg.norm(g * model - clean) / np.linalg.norm(clean))
    resid_model_noisy = float(np.linalg.norm(g * model - amp) / np.linalg.norm(amp))
    floor = float(np.linalg.norm(amp - clean) / np.linalg.norm(clean))
    # the same check on the given data, for scale (the reference data were made by the solver's model)
    gb = float(np.sum(model * base.amp) / np.sum(model * model))
    resid_base = float(np.linalg.norm(gb * model - base.amp) / np.linalg.norm(base.amp))
    return Scan("no-inverse-crime", amp, base.positions, base.probe, base.gt, g, nphotons=nphotons,
                residual_model_vs_clean=resid_model_clean, residual_model_vs_data=resid_model_noisy,
                poisson_floor=floor, residual_model_vs_reference_data=resid_base)


# ---------------------------------------------------------------------------------------------
# scoring


def score(obj: np.ndarray, scan: Scan) -> dict:
    from pinn_jax import metrics

    m = metrics.eval_reconstruction(obj, scan.gt, positions=scan.positions)
    return {"ssim": [float(m["ssim"][0]), float(m["ssim"][1])],
            "psnr": [float(m["psnr"][0]), float(m["psnr"][1])],
            "frc50": [float(m["frc50"][0]), float(m["frc50"][1])]}


class Recorder:
    """Per-pass scores with the wall time spent outside the scoring."""

    def __init__(self, scan: Scan):
        self.scan, self.curve, self.t0, self.scoring = scan, [], None, 0.0

    def start(self) -> None:
        self.t0, self.scoring = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0 - self.scoring

    def record(self, passes: int, obj: np.ndarray, wall: float | None = None, **extra) -> None:
        wall = self.now() if wall is None else wall
        t = time.perf_counter()
        row = {"pass": int(passes), "wall_s": float(wall), **score(obj, self.scan), **extra}
        self.scoring += time.perf_counter() - t
        self.curve.append(row)


def summarize(curve: list[dict], first_pass_has_setup: bool = True) -> dict:
    """Passes and seconds to the SSIM thresholds. ``paced_s``: the same pass at the run's median
    pace, which discounts one-off stalls of a shared machine: wall at pass 1 + (pass - 1) x
    median seconds per pass when pass 1 holds a real setup cost (pinn-jax's compilation), else
    pass x median (pty-chi, whose task building is not in the wall time)."""
    out: dict[str, Any] = {}
    steady = _steady(curve)
    first = next((r["wall_s"] for r in curve if r["pass"] == 1), None)
    if not first_pass_has_setup and steady is not None:
        first = steady

    def hit_of(r):
        if r is None:
            return None
        paced = None if steady is None or first is None else first + (r["pass"] - 1) * steady
        return {"pass": r["pass"], "wall_s": r["wall_s"], "paced_s": paced}

    for th in THRESHOLDS:
        out[f"amp{th:g}"] = hit_of(next((r for r in curve if r["pass"] > 0 and r["ssim"][0] >= th), None))
        out[f"both{th:g}"] = hit_of(next((r for r in curve if r["pass"] > 0 and r["ssim"][0] >= th
                                          and r["ssim"][1] >= th), None))
    if curve:
        best = max(curve, key=lambda r: r["ssim"][0])
        out["best_amp"] = {"pass": best["pass"], "ssim": best["ssim"]}
        out["final"] = curve[-1]
    return out


# ---------------------------------------------------------------------------------------------
# methods


def run_pinnjax(scan: Scan, passes: int, *, noise="gaussian", batch_size=None, learning_rate=None,
                seed=0, model=None, label=None, extra: dict | None = None, first_look: bool = False) -> dict:
    """One pinn-jax row; ``batch_size``/``learning_rate`` None keep RefineOptions' defaults
    (whatever the installed pinn_jax defines); the row records the values used. The row is
    *warm*: the same refinement (2 passes, full-batch ones included when asked) runs once
    before the measured one, so the compilation is not in its wall time; its wall time
    (``warmup_s``) is recorded. The cold start is the ``cold`` scenario's.

    With a ``model``, the clock starts before the network's prediction (the seed's cost is in
    the row); with ``first_look`` as well, the network's object is made first, untimed (its cost
    recorded as ``first_look_s``), and the clock starts when the refinement from it is called:
    what ``pinn-jax infer --refine_iterations K`` adds to the network's first look."""
    from pinn_jax import pipeline
    from pinn_jax.refine import RefineOptions, refine_object

    kw = {k: v for k, v in (("batch_size", batch_size), ("learning_rate", learning_rate)) if v is not None}
    opts = RefineOptions(iterations=passes, noise=noise, seed=seed, **kw, **(extra or {}))
    warm_kw = dict(vars(opts))
    fb = warm_kw.get("full_batch_from")
    warm_kw.update(iterations=2, full_batch_from=None if fb is None else min(fb, 1))
    start_obj, extra_info = None, {}  # None: the network-seeded row makes its start inside the clock
    if model is None:
        start_obj = np.ones(scan.gt.shape, np.complex64)
    elif first_look:
        t = time.perf_counter()
        start_obj = pipeline.refine_start(_raw(scan), scan.gt.shape, model=model)
        extra_info["first_look_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if start_obj is not None:
        refine_object(scan.amp, scan.positions, scan.probe, start_obj, RefineOptions(**warm_kw))
    else:
        pipeline.refine(_raw(scan), model=model, options=RefineOptions(**warm_kw), track_metrics=False)
    warmup_s = time.perf_counter() - t
    rec = Recorder(scan)
    start_kind = "first look" if first_look else "network" if model is not None else "flat"
    start_label = "network, first look given" if first_look else start_kind
    row = {"method": label or f"pinn-jax {noise} ({start_label})", "solver": "pinn-jax", "start": start_kind,
           "options": {"noise": noise, "batch_size": opts.batch_size, "learning_rate": opts.learning_rate,
                       "seed": seed, "all": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                                             for k, v in vars(opts).items()}}, **extra_info}

    def cb(i, loss, obj):
        rec.record(i + 1, obj, loss=float(loss))

    if start_obj is not None:
        rec.record(0, start_obj, wall=0.0)
        rec.start()
        res = refine_object(scan.amp, scan.positions, scan.probe, start_obj, opts, on_pass_end=cb)
    else:
        raw = _raw(scan)
        rec.start()
        _, res = pipeline.refine(raw, model=model, options=opts, on_pass_end=cb, track_metrics=False)
        # the seed itself (a second, warm call with no pass): its quality and its warm cost
        t = time.perf_counter()
        seed_obj, _ = pipeline.refine(raw, model=model, options=RefineOptions(iterations=0), track_metrics=False)
        row["seed_warm_s"] = time.perf_counter() - t
        rec.curve.insert(0, {"pass": 0, "wall_s": 0.0, **score(seed_obj, scan)})
    steady = _steady(rec.curve)
    row.update(curve=rec.curve, history=[float(h) for h in res.history], gain=float(res.scale),
               steady_pass_s=steady, setup_s=(rec.curve[1]["wall_s"] - steady) if len(rec.curve) > 1 else None,
               warmup_s=warmup_s)
    return row


def _steady(curve: list[dict]) -> float | None:
    w = [r["wall_s"] for r in curve if r["pass"] > 0]
    if len(w) < 3:
        return None
    return float(np.median(np.diff(w[1:])))


def _raw(scan: Scan):
    from backend_api.raw_data import RawData

    return RawData.from_coords_without_pc(scan.positions[:, 0], scan.positions[:, 1], scan.amp, scan.probe,
                                          np.arange(len(scan.positions)), objectGuess=scan.gt,
                                          diffraction_kind="amplitude")


def ptychi_available() -> str | None:
    try:
        import ptychi  # noqa: F401
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed" here
        return f"{type(exc).__name__}: {exc}"
    return None


def run_ptychi(scan: Scan, algo: str, epochs: int, *, noise="gaussian", seed=0) -> dict:
    import torch
    from ptychi import api
    from ptychi.api.task import PtychographyTask

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    N = scan.N
    H, W = scan.gt.shape
    data = torch.tensor(np.square(scan.amp.astype(np.float64)), dtype=torch.float32)
    probe = (scan.probe.astype(np.complex64) * np.float32(scan.s / N))[None, None]
    obj0 = np.ones((1, H + 2 * PAD, W + 2 * PAD), np.complex64)
    if algo == "lsqml":
        o = api.LSQMLOptions()
        o.reconstructor_options.batch_size = 96
        o.reconstructor_options.noise_model = api.enums.NoiseModels.POISSON if noise == "poisson" \
            else api.enums.NoiseModels.GAUSSIAN
        o.reconstructor_options.rescale_probe_intensity_in_first_epoch = False
        o.object_options.optimal_step_size_scaler = 0.9
    elif algo == "rpie":
        o = api.RPIEOptions()
        o.reconstructor_options.batch_size = 32
        o.object_options.alpha = 0.1
    else:
        raise ValueError(algo)
    o.data_options.fft_shift = True
    o.reconstructor_options.num_epochs = epochs
    o.reconstructor_options.default_device = api.enums.Devices.CPU
    o.reconstructor_options.random_seed = seed
    o.object_options.optimizable = True
    o.object_options.determine_position_origin_coords_by = api.enums.ObjectPosOriginCoordsMethods.SPECIFIED
    o.object_options.position_origin_coords = np.array([PAD - 0.5, PAD - 0.5])
    o.object_options.remove_object_probe_ambiguity.enabled = False
    o.probe_options.optimizable = False
    o.probe_position_options.optimizable = False
    label = {"lsqml": "pty-chi LSQML", "rpie": "pty-chi rPIE"}[algo] + (f" ({noise})" if algo == "lsqml" else "")
    rec = Recorder(scan)
    t = time.perf_counter()
    task = PtychographyTask(o, diffraction_data=data, object_data=torch.tensor(obj0),
                            probe_data=torch.tensor(probe),
                            probe_position_x_px=torch.tensor(scan.positions[:, 0]),
                            probe_position_y_px=torch.tensor(scan.positions[:, 1]))
    build_s = time.perf_counter() - t
    rec.record(0, np.ones_like(scan.gt), wall=0.0)
    loop = 0.0
    for ep in range(1, epochs + 1):
        t = time.perf_counter()
        task.run(1)
        loop += time.perf_counter() - t
        obj = task.get_data_to_cpu("object", as_numpy=True)[0][PAD:PAD + H, PAD:PAD + W]
        rec.record(ep, obj, wall=loop)
    return {"method": label, "solver": "pty-chi", "start": "flat", "options": {"algorithm": algo, "noise": noise},
            "build_s": build_s, "curve": rec.curve, "steady_pass_s": _steady(rec.curve)}


# ---------------------------------------------------------------------------------------------
# scenarios


# the low-dose recipe (RefineOptions docstring): minibatch passes, then full-batch passes to the
# maximum-a-posteriori object under a smoothed TV prior
LOW_DOSE_RECIPE = {"full_batch_from": 3, "tv_weight": 0.05}


def methods_for(scan: Scan, args, model, *, noises=("gaussian",), lsqml_noises=("gaussian",), rpie=True,
                low_dose: bool = False) -> list:
    rows = []
    if low_dose:
        tag = ", ".join(f"{k} {v:g}" for k, v in LOW_DOSE_RECIPE.items())
        for m in ([None, model] if model is not None else [None]):
            start = "network" if m is not None else "flat"
            rows.append(run_pinnjax(scan, args.passes, noise="poisson", seed=args.seed, model=m,
                                    extra=LOW_DOSE_RECIPE, label=f"pinn-jax poisson, {tag} ({start})"))
    for noise in noises:
        rows.append(run_pinnjax(scan, args.passes, noise=noise, seed=args.seed))
        if model is not None:
            rows.append(run_pinnjax(scan, args.passes, noise=noise, seed=args.seed, model=model))
            rows.append(run_pinnjax(scan, args.passes, noise=noise, seed=args.seed, model=model, first_look=True))
        else:
            rows.append({"method": f"pinn-jax {noise} (network)", "solver": "pinn-jax", "start": "network",
                         "status": "no model given"})
    if args.tuned:
        lr, bs = float(args.tuned[0]), int(args.tuned[1])
        for noise in noises:
            for m in ([None, model] if model is not None else [None]):
                start = "network" if m is not None else "flat"
                rows.append(run_pinnjax(scan, args.passes, noise=noise, seed=args.seed, model=m, learning_rate=lr,
                                        batch_size=bs, label=f"pinn-jax {noise} lr {lr:g} batch {bs} ({start})"))
    if args.custom:
        extra = dict(args.custom)
        tag = ", ".join(f"{k}={v}" for k, v in extra.items())
        for noise in noises:
            for m in ([None, model] if model is not None else [None]):
                start = "network" if m is not None else "flat"
                rows.append(run_pinnjax(scan, args.passes, noise=noise, seed=args.seed, model=m, extra=extra,
                                        label=f"pinn-jax {noise} {tag} ({start})"))
    why = ptychi_available() if not args.no_ptychi else "disabled (--no-ptychi)"
    if not why and not getattr(args, "_ptychi_warm", False):
        run_ptychi(scan, "lsqml", 1)  # torch's one-time start-up out of the measured rows
        args._ptychi_warm = True
    algos = [("lsqml", n) for n in lsqml_noises] + ([("rpie", "gaussian")] if rpie else [])
    for algo, noise in algos:
        label = {"lsqml": "pty-chi LSQML", "rpie": "pty-chi rPIE"}[algo] + (f" ({noise})" if algo == "lsqml" else "")
        if why:
            rows.append({"method": label, "solver": "pty-chi", "status": f"not installed ({why})"
                         if not args.no_ptychi else why})
        else:
            rows.append(run_ptychi(scan, algo, args.passes, noise=noise, seed=args.seed))
    for r in rows:
        if "curve" in r:
            r["summary"] = summarize(r["curve"], r.get("solver") != "pty-chi")
    return rows


def cold_start_child(args) -> dict:
    """One cold refinement in this fresh process: flat start, default options (pinn-jax) or
    LSQML with the baseline's settings; wall time per pass from just before the solver is
    called (compilation / task building and torch's start-up included; imports and data loading
    not), then the SSIM of every pass."""
    scan = load_reference(args.test, args.n_positions)
    flat = np.ones(scan.gt.shape, np.complex64)
    objs: list = []
    if args.cold_child == "pinn-jax":
        from pinn_jax.refine import RefineOptions, refine_object

        res = refine_object(scan.amp, scan.positions, scan.probe, flat, RefineOptions(iterations=args.cold_passes),
                            on_pass_end=lambda i, loss, o: objs.append(o))
        # seconds[k] is the wall at the end of pass k since refine_object started (callbacks excluded)
        walls = [float(w) for w in res.seconds[1:]]
    else:
        row = run_ptychi(scan, "lsqml", args.cold_passes)
        walls = [c["wall_s"] + row["build_s"] for c in row["curve"] if c["pass"] > 0]
        return {"solver": "pty-chi LSQML", "build_s": row["build_s"],
                "curve": [{"pass": c["pass"], "wall_s": w, "ssim": c["ssim"]}
                          for c, w in zip([c for c in row["curve"] if c["pass"] > 0], walls)]}
    return {"solver": "pinn-jax", "curve": [{"pass": k + 1, "wall_s": w, "ssim": score(o, scan)["ssim"]}
                                           for k, (w, o) in enumerate(zip(walls, objs))]}


def cold_scenario(args) -> dict:
    """Fresh processes, so compilation and start-up count: pinn-jax without a compilation cache,
    pinn-jax again with the cache the first one wrote (what a second ``pinn-jax reconstruct``
    sees), and LSQML (task building and torch's start-up included)."""
    import subprocess
    import tempfile

    out: dict[str, Any] = {"passes": args.cold_passes, "runs": []}
    with tempfile.TemporaryDirectory(prefix="refine_cold_") as tmp:
        cache = Path(tmp) / "xla"
        runs = [("pinn-jax", "pinn-jax, no compilation cache", {"PINN_JAX_COMPILE_CACHE": "0"}),
                ("pinn-jax", "pinn-jax, fresh process, compilation cache written", {"JAX_COMPILATION_CACHE_DIR": str(cache)}),
                ("pinn-jax", "pinn-jax, fresh process, compilation cache read", {"JAX_COMPILATION_CACHE_DIR": str(cache)})]
        if not args.no_ptychi and ptychi_available() is None:
            runs.append(("lsqml", "pty-chi LSQML, fresh process (task building included)", {}))
        for solver, label, extra_env in runs:
            env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
            env.update(extra_env)
            env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
            res_path = Path(tmp) / "cold.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--cold-child", solver, "--cold-passes",
                   str(args.cold_passes), "--out", str(res_path)] + (["--test", str(args.test)] if args.test else []) \
                + (["--n-positions", str(args.n_positions)] if args.n_positions else [])
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
            run = json.loads(res_path.read_text())
            run["label"] = label
            run["summary"] = summarize(run["curve"])
            out["runs"].append(run)
            print(f"  {label}: {_fmt_summary(run)}", flush=True)
    return out


def sweep(scan: Scan, args, noise: str) -> list:
    """A RefineOptions grid (learning rate x batch size, flat start) for one noise model."""
    rows = []
    for lr in (0.01, 0.02, 0.05, 0.1, 0.2):
        for bs in (8, 32, 128):
            r = run_pinnjax(scan, args.sweep_passes, noise=noise, batch_size=bs, learning_rate=lr,
                            seed=args.seed, label=f"pinn-jax {noise} lr {lr:g} batch {bs}")
            r["summary"] = summarize(r["curve"])
            rows.append(r)
            print(f"  sweep lr {lr:g} batch {bs}: {_fmt_summary(r)}", flush=True)
    return rows


def memory_scenario(args) -> dict:
    from pinn_jax import probe as probe_mod
    from pinn_jax import simulate
    from pinn_jax.refine import RefineOptions, refine_object

    N, n = 64, args.memory_positions
    size = args.memory_object
    obj = simulate.make_object("lines", size=size, seed=3)
    pos = simulate.random_positions(n, obj.shape, N, seed=3)
    base = load_reference(args.test) if args.test else None
    pr = base.probe if base is not None else np.asarray(probe_mod.default_probe(N), np.complex64)
    amp, _, _ = simulate.simulate_patterns(obj, pr, pos, nphotons=1e9, key=3)
    import gc

    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    current_before = _proc_status_mib("VmRSS")
    # reset the kernel's peak-RSS mark (VmHWM), so the peak below is the refinement's own
    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    times = []
    t0 = time.perf_counter()

    def cb(i, loss, o):
        times.append(time.perf_counter() - t0)

    refine_object(amp, pos, pr, np.ones(obj.shape, np.complex64), RefineOptions(iterations=args.memory_passes),
                  on_pass_end=cb)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"positions": n, "N": N, "object": [size, size], "passes": args.memory_passes,
            "data_MiB": amp.nbytes / 2 ** 20, "peak_rss_before_refine_MiB": rss_before,
            "ru_maxrss_after_MiB (reset with VmHWM)": rss_after, "rss_before_refine_MiB": current_before,
            "peak_rss_during_refine_MiB": _proc_status_mib("VmHWM") if hwm_reset else None,
            "pass_end_s": times,
            "per_pass_s": float(np.diff(times).mean()) if len(times) > 1 else None,
            "first_pass_s": times[0] if times else None}


def _proc_status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_subprocess(args) -> dict:
    """The memory scenario in a fresh process, so its peak RSS is its own (not pty-chi's or the
    other scenarios')."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="refine_memory_") as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--scenario", "memory", "--out", str(out),
               "--memory-positions", str(args.memory_positions), "--memory-object", str(args.memory_object),
               "--memory-passes", str(args.memory_passes)] + (["--test", str(args.test)] if args.test else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["memory"]


# ---------------------------------------------------------------------------------------------
# output


def _fmt_hit(h, paced: bool = False):
    if h is None:
        return "-"
    txt = f"{h['pass']} / {h['wall_s']:.2f} s"
    if paced and h.get("paced_s") is not None and abs(h["paced_s"] - h["wall_s"]) > 0.1 * h["wall_s"] + 0.05:
        txt += f" (paced {h['paced_s']:.2f} s)"
    return txt


def _round(x, digits: int = 5):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


def compact(result: dict) -> dict:
    """Rounded to 5 significant digits; sweep curves keep pass, wall time and SSIM only."""
    for sc in result.get("scenarios", []):
        for r in sc.get("sweep", []):
            r.pop("history", None)
            r["curve"] = [{"pass": c["pass"], "wall_s": c["wall_s"], "ssim": c["ssim"]} for c in r["curve"]]
    return _round(result)


def _fmt_summary(r: dict) -> str:
    s = r.get("summary", {})
    f = s.get("final", {})
    return (f"amp0.95 {_fmt_hit(s.get('amp0.95'))}, amp0.98 {_fmt_hit(s.get('amp0.98'))}, final SSIM "
            f"{f.get('ssim', [float('nan')] * 2)[0]:.3f}/{f.get('ssim', [float('nan')] * 2)[1]:.3f}")


def tables(result: dict, record: list[int]) -> str:
    lines = []
    for sc in result["scenarios"]:
        lines.append(f"\n### {sc['name']}\n")
        if sc.get("checks"):
            lines.append("Checks: " + ", ".join(f"{k} {v:.3g}" for k, v in sc["checks"].items()) + "\n")
        lines.append("| method | pass | wall s | SSIM amp / phase | PSNR amp / phase | FRC50 amp / phase |")
        lines.append("|---|---|---|---|---|---|")
        for r in sc["rows"]:
            if "curve" not in r:
                lines.append(f"| {r['method']} | {r.get('status', '')} | | | | |")
                continue
            by = {c["pass"]: c for c in r["curve"]}
            for p in [0] + [p for p in record if p in by]:
                if p not in by:
                    continue
                c = by[p]
                lines.append(f"| {r['method']} | {p} | {c['wall_s']:.2f} | {c['ssim'][0]:.3f} / {c['ssim'][1]:.3f} | "
                             f"{c['psnr'][0]:.2f} / {c['psnr'][1]:.2f} | {c['frc50'][0]:.1f} / {c['frc50'][1]:.1f} |")
        lines.append("\n| method | setup s | s/pass | amp SSIM 0.95 (pass / s) | 0.98 | amp+phase 0.98 | best amp SSIM |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in sc["rows"]:
            if "summary" not in r:
                continue
            s = r["summary"]
            setup = r.get("setup_s", r.get("build_s"))
            setup_txt = "-" if setup is None else f"{setup:.2f}"
            steady_txt = "-" if r.get("steady_pass_s") is None else f"{r['steady_pass_s']:.3f}"
            lines.append(f"| {r['method']} | {setup_txt} | {steady_txt} | "
                         f"{_fmt_hit(s['amp0.95'], True)} | {_fmt_hit(s['amp0.98'], True)} | "
                         f"{_fmt_hit(s['both0.98'], True)} | "
                         f"{s['best_amp']['ssim'][0]:.3f} (pass {s['best_amp']['pass']}) |")
        lines.append("\nBest amplitude / phase SSIM reached by a wall time (each row's own clock: pinn-jax warm, "
                     "pty-chi without its task building):\n")
        lines.append("| method | " + " | ".join(f"{t:g} s" for t in EQUAL_TIMES) + " |")
        lines.append("|---|" + "---|" * len(EQUAL_TIMES))
        for r in sc["rows"]:
            if "curve" not in r:
                continue
            cells = []
            for t in EQUAL_TIMES:
                got = [c for c in r["curve"] if 0 < c["pass"] and c["wall_s"] <= t]
                cells.append("-" if not got else "{:.3f} / {:.3f}".format(*max(got, key=lambda c: c["ssim"][0])["ssim"]))
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        if sc.get("sweep"):
            lines.append(f"\nSweep ({sc['sweep_noise']} path, flat start, {args_passes(sc)} passes):\n")
            lines.append("| lr | batch | amp 0.95 | amp 0.98 | amp >= 0.95 & phase >= 0.93 | best amp SSIM (pass) | final SSIM amp / phase |")
            lines.append("|---|---|---|---|---|---|---|")
            for r in sc["sweep"]:
                o, s = r["options"], r["summary"]
                hit = next((c for c in r["curve"] if c["pass"] > 0 and c["ssim"][0] >= 0.95 and c["ssim"][1] >= 0.93), None)
                f = s["final"]
                lines.append(f"| {o['learning_rate']:g} | {o['batch_size']} | {_fmt_hit(s['amp0.95'])} | "
                             f"{_fmt_hit(s['amp0.98'])} | {_fmt_hit(hit)} | {s['best_amp']['ssim'][0]:.3f} "
                             f"({s['best_amp']['pass']}) | {f['ssim'][0]:.3f} / {f['ssim'][1]:.3f} |")
    if result.get("cold"):
        c = result["cold"]
        lines.append(f"\n### cold start (fresh processes, flat start, default options, {c['passes']} passes)\n")
        lines.append("| run | wall s at pass 1 · 2 · 5 | amp SSIM 0.95 (pass / s) | 0.98 | final SSIM amp / phase |")
        lines.append("|---|---|---|---|---|")
        for run in c["runs"]:
            by = {x["pass"]: x for x in run["curve"]}
            walls = " · ".join(f"{by[k]['wall_s']:.2f}" if k in by else "-" for k in (1, 2, 5))
            f = run["curve"][-1]["ssim"]
            lines.append(f"| {run['label']} | {walls} | {_fmt_hit(run['summary']['amp0.95'])} | "
                         f"{_fmt_hit(run['summary']['amp0.98'])} | {f[0]:.3f} / {f[1]:.3f} |")
    if result.get("memory"):
        m = result["memory"]
        lines.append("\n### memory\n")
        lines.append("| positions | N | object | passes | data MiB | RSS before refine MiB | peak RSS during refine MiB "
                     "| peak RSS while simulating MiB | first pass s (compile incl.) | s/pass after |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        hwm = m.get("peak_rss_during_refine_MiB")
        lines.append(f"| {m['positions']} | {m['N']} | {m['object'][0]}x{m['object'][1]} | {m['passes']} | "
                     f"{m['data_MiB']:.0f} | {m['rss_before_refine_MiB']:.0f} | {'-' if hwm is None else f'{hwm:.0f}'} | "
                     f"{m['peak_rss_before_refine_MiB']:.0f} | "
                     f"{m['first_pass_s']:.2f} | {m['per_pass_s'] if m['per_pass_s'] is None else round(m['per_pass_s'], 2)} |")
    return "\n".join(lines)


def args_passes(sc: dict) -> int:
    return max((c["pass"] for c in sc["sweep"][0]["curve"]), default=0) if sc.get("sweep") else 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scs = [s for s in result["scenarios"] if any("curve" in r for r in s["rows"])]
    if not scs:
        return
    ncols = min(2, len(scs))
    nrows = (len(scs) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.flat[len(scs):]:
        ax.set_visible(False)
    for ax, sc in zip(axes.flat, scs):
        for r in sc["rows"]:
            if "curve" not in r:
                continue
            c = [x for x in r["curve"] if x["pass"] > 0]
            ax.plot([x["wall_s"] for x in c], [x["ssim"][0] for x in c], marker=".", ms=3, label=r["method"])
        for th in THRESHOLDS:
            ax.axhline(th, color="0.7", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("wall time (s; pinn-jax warm, pty-chi epochs only)")
        ax.set_ylabel("amplitude SSIM (corrected protocol)")
        ax.set_title(sc["name"])
        lo = min((x["ssim"][0] for r in sc["rows"] if "curve" in r for x in r["curve"] if x["pass"] > 0), default=0)
        ax.set_ylim(max(0.0, lo - 0.02), 1.0)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment() -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    for pkg in ("jax", "jaxlib", "optax", "flax", "torch", "ptychi", "numpy"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    try:
        env["cpu_model"] = next(line.split(":", 1)[1].strip()
                                for line in Path("/proc/cpuinfo").read_text().splitlines()
                                if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return env


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test", type=Path, default=None, help="scan NPZ with objectGuess (reference: test.npz)")
    p.add_argument("--model_path", type=Path, default=None, help="trained model folder (wts.h5.zip) for seeded rows")
    p.add_argument("--scenario", nargs="+", default=["reference"],
                   choices=["reference", "no-inverse-crime", "lowdose", "memory", "cold"])
    p.add_argument("--cold-passes", type=int, default=5, help="passes of each cold-start run")
    p.add_argument("--cold-child", choices=["pinn-jax", "lsqml"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--nphotons", type=float, nargs="+", default=[1e4, 1e5])
    p.add_argument("--passes", type=int, default=50, help="passes/epochs per method")
    p.add_argument("--record", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50], help="passes shown in the table")
    p.add_argument("--sweep", action="store_true",
                   help="RefineOptions sweep (lr x batch): gaussian path on the reference scan, poisson path at the lowest dose")
    p.add_argument("--sweep-passes", type=int, default=100)
    p.add_argument("--tuned", nargs=2, metavar=("LR", "BATCH"), default=None,
                   help="also run pinn-jax rows (flat and, with a model, seeded) with this learning rate and batch size")
    p.add_argument("--memory-positions", type=int, default=4096)
    p.add_argument("--memory-object", type=int, default=640)
    p.add_argument("--memory-passes", type=int, default=2)
    p.add_argument("--n-positions", type=int, default=None, help="subsample the scan (smoke runs)")
    p.add_argument("--no-ptychi", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a small synthetic scan (unless --test), 5 passes, reference scenario only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("refine.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG: amplitude SSIM against wall time")
    p.add_argument("--custom", nargs="+", type=_key_value, default=None, metavar="KEY=VALUE",
                   help="also run pinn-jax rows (flat and seeded) with these extra RefineOptions fields "
                        "(only those the installed pinn_jax has), e.g. final_learning_rate=0.1 tv_weight=0.03")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render the tables (and --plot) from a JSON this script wrote; runs nothing")
    args = p.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        for sc in result["scenarios"]:
            for r in sc["rows"] + sc.get("sweep", []):
                if "curve" in r:
                    r["steady_pass_s"] = _steady(r["curve"])
                    r["summary"] = summarize(r["curve"], r.get("solver") != "pty-chi")
        record = result.get("args", {}).get("record", args.record)
        print(tables(result, record))
        if args.out != Path("refine.json"):
            args.out.write_text(json.dumps(compact(result), indent=0))
        if args.plot is not None:
            plot(result, args.plot)
        return 0
    if args.quick:
        args.passes = min(args.passes, 5)
        args.record = [r for r in args.record if r <= args.passes] or [args.passes]
        args.scenario = [s for s in args.scenario if s != "memory"] or ["reference"]
        args.memory_positions = min(args.memory_positions, 256)

    from pinn_jax.runtime import configure_cpu_runtime

    configure_cpu_runtime()
    if args.cold_child:
        args.out.write_text(json.dumps(cold_start_child(args)))
        return 0
    model = None
    if args.model_path is not None:
        from pinn_jax.inference import load_inference_bundle

        mdir = args.model_path.parent if args.model_path.is_file() else args.model_path
        model, _ = load_inference_bundle(mdir)

    if args.test is not None:
        base = load_reference(args.test, args.n_positions)
    else:
        base = synthetic_scan(64 if not args.quick else 32, 128 if args.quick else 224,
                              args.n_positions or (64 if args.quick else 512), seed=args.seed)
    result: dict[str, Any] = {"environment": environment(), "args": {k: str(v) if isinstance(v, Path) else v
                                                                    for k, v in vars(args).items()},
                              "data": {"source": base.info.get("source"), "positions": len(base.positions),
                                       "N": base.N, "object": list(base.gt.shape)}, "scenarios": []}
    t_all = time.perf_counter()
    for name in args.scenario:
        if name == "memory":
            print("memory scenario ...", flush=True)
            result["memory"] = memory_scenario(args) if args.scenario == ["memory"] else memory_subprocess(args)
            continue
        if name == "cold":
            print("cold start ...", flush=True)
            result["cold"] = cold_scenario(args)
            continue
        if name == "reference":
            scans = [base]
        elif name == "no-inverse-crime":
            scans = [no_inverse_crime_scan(base, args.seed)]
        else:
            scans = [lowdose_scan(base, n, args.seed) for n in sorted(args.nphotons)]
        for scan in scans:
            print(f"{scan.name}: {len(scan.positions)} positions ...", flush=True)
            # low dose: the scenario's re-simulations, or a given scan of few photons per pattern
            low = name == "lowdose" or float(scan.info.get("nphotons", 1e9)) <= 1e6
            rows = methods_for(scan, args, model, noises=("gaussian", "poisson") if low else ("gaussian",),
                               lsqml_noises=("gaussian", "poisson") if low else ("gaussian",), rpie=not low,
                               low_dose=low)
            for r in rows:
                print(f"  {r['method']}: {_fmt_summary(r) if 'summary' in r else r.get('status')}", flush=True)
            sc = {"name": scan.name, "nphotons": scan.info.get("nphotons"), "rows": rows,
                  "checks": {k: v for k, v in scan.info.items() if k.startswith(("residual", "poisson"))}}
            if args.sweep and (name == "reference" or (low and scan is scans[0])):
                sc["sweep_noise"] = "poisson" if low else "gaussian"
                sc["sweep"] = sweep(scan, args, sc["sweep_noise"])
            result["scenarios"].append(sc)
    result["total_s"] = time.perf_counter() - t_all
    md = tables(result, args.record)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(compact(result), indent=0))
    if args.plot is not None:
        plot(result, args.plot)
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
