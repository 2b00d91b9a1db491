"""Benchmark: cost against scan size — grouping, and streaming inference + stitching.

Each measurement runs in its own subprocess (so its peak RSS is its own):

* ``group``: the index step of the neighbour grouping (``backend_api.grouping.group_indices``,
  KD-tree + draws) for gridsize 1 and 2 on ``--group-sizes`` random positions;
* ``infer``: :func:`pinn_jax.streaming.reconstruct_on_grid_streaming` of ``--infer-sizes``
  patterns of ``N x N`` (a memory-mapped ``.npy`` of synthetic amplitudes written first, outside
  the timing: the input is excluded from the memory figure, as it is mapped, not loaded) with an
  untrained gridsize-1 network (cost does not depend on the weights), raster positions on a grid
  just large enough; time, patterns/s, peak RSS, and the private memory the run itself adds
  (peak ``RssAnon`` during the run minus before it: the mapped input's pages are not in it).

* ``devices`` (``--train-devices``): ``pinn-jax train`` (gridsize 1, the data sharded over the
  devices) on a simulated scan with 1, 2, 4 ... devices of one process (fake CPU devices
  via ``--xla_force_host_platform_device_count`` here: the shape of the curve, not a speed-up,
  as they share the same cores; real devices where present), and with 2 processes of
  ``D/2`` devices each (``jax.distributed`` on 127.0.0.1): the last epoch's groups/s and the
  scaling efficiency ``rate / (rate of 1 device x devices)``; 2 processes against 1 process
  with as many devices gives the cost of the cross-process collectives.

A log-log fit of time against size gives the slope (1.0 = linear). Prints a Markdown table,
writes JSON (``--out``) and a PNG of the curves (``--plot``).

Usage::

    python benchmarks/scale.py [--group-sizes 10000 100000 1000000] [--infer-sizes 1000 4000 16000]
        [--N 64] [--chunk 4096] [--train-devices 1 2 4] [--out scale.json] [--plot scale.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
    return _status_mib("VmRSS")


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


class _AnonPeak:
    """The peak of ``RssAnon`` (private memory: what the run allocates, not the pages of the
    memory-mapped input, which count under ``RssFile``), sampled every 20 ms in a thread."""

    def __enter__(self):
        import threading

        self.peak = _status_mib("RssAnon")
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, _status_mib("RssAnon"))

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_mib("RssAnon"))


def child_group(n: int, gridsize: int, seed: int) -> dict:
    from backend_api.grouping import group_indices

    rng = np.random.default_rng(seed)
    side = np.sqrt(n) * 4.0
    x, y = rng.uniform(0, side, n), rng.uniform(0, side, n)
    base = _current_rss_mib()
    t0 = time.perf_counter()
    idx = group_indices(x, y, K=7, nsamples=n, gridsize=gridsize, seed=seed)
    dt = time.perf_counter() - t0
    return {"kind": "group", "n": n, "gridsize": gridsize, "seconds": dt, "groups": int(len(idx)),
            "peak_rss_mib": _rss_mib(), "rss_before_mib": base}


def child_infer(n: int, N: int, chunk: int, path: str) -> dict:
    from backend_api.config import ModelConfig
    from pinn_jax.inference import InferenceModel
    from pinn_jax.model import build_model
    from pinn_jax.probe import default_probe
    from pinn_jax.runtime import configure_cpu_runtime
    from pinn_jax.streaming import reconstruct_on_grid_streaming

    configure_cpu_runtime()
    amp = np.load(path, mmap_mode="r")
    side = int(np.ceil(np.sqrt(n)))
    step = 4.0
    g = np.arange(n)
    pos = np.column_stack([N / 2 + 2 + step * (g % side), N / 2 + 2 + step * (g // side)])
    shape = (int(pos[:, 1].max() + N / 2 + 4), int(pos[:, 0].max() + N / 2 + 4))
    net = build_model(ModelConfig(N=N, gridsize=1, n_filters_scale=1), np.asarray(default_probe(N)), 988.2, seed=0)
    im = InferenceModel(net)
    # compile outside the timing, on one chunk's worth
    reconstruct_on_grid_streaming(im, amp[: min(chunk, n)], pos[: min(chunk, n)], shape, chunk=chunk)
    base = _status_mib("RssAnon")
    with _AnonPeak() as anon:
        t0 = time.perf_counter()
        obj, w = reconstruct_on_grid_streaming(im, amp, pos, shape, chunk=chunk)
        dt = time.perf_counter() - t0
    return {"kind": "infer", "n": n, "N": N, "chunk": chunk, "seconds": dt, "patterns_per_s": n / dt,
            "grid": list(shape), "peak_rss_mib": _rss_mib(), "anon_before_mib": base,
            "peak_anon_mib": anon.peak, "run_anon_mib": anon.peak - base,
            "finite": bool(np.isfinite(obj).all() and np.isfinite(w).all())}


def _train_rate(data: Path, out: Path, devices: int, processes: int, epochs: int, n_groups: int) -> dict:
    """``pinn-jax train`` on ``data`` with ``devices`` devices in all (``processes`` processes of
    ``devices // processes`` fake CPU devices each, or the real ones); the last epoch's rate."""
    import socket

    per = devices // processes
    env = dict(os.environ, PYTHONPATH=str(ROOT), PINN_JAX_COMPILE_CACHE="0")
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={per}").strip()
    args = [sys.executable, "-m", "pinn_jax.cli", "train", "--train_data_file", str(data), "--n_groups", str(n_groups),
            "--gridsize", "1", "--n_filters_scale", "1", "--batch_size", "16", "--nepochs", str(epochs),
            "--no_progress", "--shard_data", "true", "--output_dir", str(out), "--quiet"]
    t0 = time.perf_counter()
    if processes == 1:
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"train on {devices} devices failed:\n{proc.stderr[-3000:]}")
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = [subprocess.Popen(args + ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes",
                                          str(processes), "--process_id", str(i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for i in range(processes)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"train in {processes} processes failed:\n{err[-3000:]}")
    wall = time.perf_counter() - t0
    hist = json.loads((out / "history.json").read_text())
    from pinn_jax.schedules import validation_split_index

    n_train = validation_split_index(n_groups, 0.05)
    epoch_s = float(hist["epoch_time_s"][-1])
    return {"kind": "devices", "devices": devices, "processes": processes, "epoch_s": epoch_s,
            "groups_per_s": n_train / epoch_s, "wall_s": wall, "n_groups": n_groups}


def _spawn(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _slope(rows: list[dict]) -> float | None:
    if len(rows) < 2:
        return None
    n = np.log([r["n"] for r in rows])
    t = np.log([r["seconds"] for r in rows])
    return float(np.polyfit(n, t, 1)[0])


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return ""


def _write_amplitudes(path: Path, n: int, N: int, seed: int) -> None:
    """A ``.npy`` of ``n`` random ``N x N`` float32 patterns, written chunk by chunk through a file
    handle: a memory-mapped write would map every page into this (parent) process, and Linux
    carries a parent's peak RSS over into the children it starts (``ru_maxrss``)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                  "fortran_order": False, "shape": (n, N, N)})
        for lo in range(0, n, 4096):
            hi = min(lo + 4096, n)
            fh.write(rng.random((hi - lo, N, N), dtype=np.float32).tobytes())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--group-sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--infer-sizes", type=int, nargs="*", default=[1000, 4000, 16000])
    ap.add_argument("--N", type=int, nargs="+", default=[64], help="patch sizes of the inference curves")
    ap.add_argument("--max-input-gb", type=float, default=20.0,
                    help="skip an inference size whose synthetic input (n N^2 float32, memory-mapped) exceeds this")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--train-devices", type=int, nargs="*", default=[],
                    help="device counts for the training curve (e.g. 1 2 4); 2-process runs for the even ones")
    ap.add_argument("--train-groups", type=int, default=256)
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "group":
            res = child_group(int(rest[0]), int(rest[1]), args.seed)
        else:
            res = child_infer(int(rest[0]), int(rest[1]), int(rest[2]), rest[3])
        print(json.dumps(res))
        return 0

    rows = []
    for gs in (1, 2):
        for n in args.group_sizes:
            rows.append(_spawn(["group", str(n), str(gs)]))
            print(f"group gs{gs} n={n}: {rows[-1]['seconds']:.2f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="pinn_jax_scale_") as tmp:
        for N in args.N:
            for n in args.infer_sizes:
                if n * N * N * 4 > args.max_input_gb * 1e9:
                    print(f"infer N={N} n={n}: skipped (input {n * N * N * 4 / 1e9:.0f} GB > --max-input-gb "
                          f"{args.max_input_gb:g})", flush=True)
                    continue
                path = Path(tmp) / f"amp_{N}_{n}.npy"
                _write_amplitudes(path, n, N, args.seed)
                rows.append(_spawn(["infer", str(n), str(N), str(args.chunk), str(path)]))
                path.unlink()
                r = rows[-1]
                print(f"infer N={N} n={n}: {r['seconds']:.1f} s ({r['patterns_per_s']:.0f}/s), "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB, private memory of the run "
                      f"{r['run_anon_mib']:.0f} MiB", flush=True)

    if args.train_devices:
        from pinn_jax import simulate

        with tempfile.TemporaryDirectory(prefix="pinn_jax_scale_train_") as tmp:
            train, _ = simulate.simulate_dataset(N=args.N[0], object_size=2 * args.N[0] + 64,
                                                 n_images=2 * args.train_groups,
                                                 seed=args.seed)
            data = Path(tmp) / "train.npz"
            train.to_file(data)
            for D in args.train_devices:
                layouts = [1] + ([2] if D % 2 == 0 else [])
                for P in layouts:
                    rows.append(_train_rate(data, Path(tmp) / f"run_{D}_{P}", D, P, args.train_epochs,
                                            args.train_groups))
                    r = rows[-1]
                    print(f"train {D} devices in {P} process(es): {r['groups_per_s']:.1f} groups/s "
                          f"(epoch {r['epoch_s']:.2f} s)", flush=True)
        base = next((r["groups_per_s"] for r in rows if r["kind"] == "devices" and r["devices"] == 1), None)
        for r in rows:
            if r["kind"] == "devices" and base:
                r["efficiency"] = r["groups_per_s"] / (base * r["devices"])

    slopes = {}
    for gs in (1, 2):
        slopes[f"group_gs{gs}"] = _slope([r for r in rows if r["kind"] == "group" and r["gridsize"] == gs])
    for N in args.N:
        slopes[f"infer_N{N}"] = _slope([r for r in rows if r["kind"] == "infer" and r["N"] == N])
    print("\n| step | n | seconds | rate | peak RSS (MiB) | peak private memory (MiB) | of which the run (MiB) |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "devices":
            continue
        label = f"group gs{r['gridsize']}" if r["kind"] == "group" else f"infer+stitch N={r['N']}"
        rate = f"{r['n'] / r['seconds']:.0f}/s"
        run = f"{r['run_anon_mib']:.0f}" if "run_anon_mib" in r else "-"
        anon = f"{r['peak_anon_mib']:.0f}" if "peak_anon_mib" in r else "-"
        print(f"| {label} | {r['n']:,} | {r['seconds']:.2f} | {rate} | {r['peak_rss_mib']:.0f} | {anon} | {run} |")
    dev_rows = [r for r in rows if r["kind"] == "devices"]
    if dev_rows:
        print("\n| devices | processes | epoch (s) | groups/s | efficiency vs 1 device |\n|---|---|---|---|---|")
        for r in dev_rows:
            print(f"| {r['devices']} | {r['processes']} | {r['epoch_s']:.2f} | {r['groups_per_s']:.1f} | "
                  f"{r.get('efficiency', float('nan')):.2f} |")
    print("\nfitted log-log slopes (1.0 = linear): "
          + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in slopes.items()))
    doc = {"rows": rows, "slopes": slopes, "N": args.N, "chunk": args.chunk, "cpu_count": os.cpu_count(),
           "cpu": _cpu_model(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if args.out is not None:
        from backend_api.fileio import write_json

        write_json(args.out, doc, indent=1)
    if args.plot is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from backend_api.outputs import save_figure

        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        curves = [("group gs1", "group_gs1", lambda r: r["kind"] == "group" and r["gridsize"] == 1),
                  ("group gs2", "group_gs2", lambda r: r["kind"] == "group" and r["gridsize"] == 2)]
        curves += [(f"infer+stitch N={N}", f"infer_N{N}", lambda r, N=N: r["kind"] == "infer" and r["N"] == N)
                   for N in args.N]
        for label, key, sel in curves:
            pts = [r for r in rows if sel(r)]
            if pts:
                slope = slopes.get(key)
                tag = f"{label} (slope {slope:.2f})" if slope is not None else label
                ax.loglog([r["n"] for r in pts], [r["seconds"] for r in pts], marker="o", label=tag)
        ax.set_xlabel("positions")
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
