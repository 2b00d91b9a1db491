"""Benchmark: neighbour grouping at scale (a benchmark, not a test; never run by pytest).

Times ``RawData.generate_grouped_data`` on a synthetic scan of ``--n-points`` positions
(default 100k) for gridsize 1 and 2, split into the index step (KD-tree + legacy-order random
draws, ``grouping.group_indices``) and the whole call (gathering the patterns, X_full
normalisation, optional ground-truth patches). Reports seconds and the peak traced memory
(``tracemalloc``, numpy allocations included) and the process peak RSS.

Patterns are small by default (``--pattern-size 16``) so 100k groups fit in memory: the
grouping cost does not depend on the pattern size, the gather/normalise cost is linear in it.

Usage::

    python benchmarks/grouping_speed.py [--n-points 100000] [--pattern-size 16]
        [--with-object] [--out benchmarks/results/grouping_speed.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend_api.fileio import write_json  # noqa: E402
from backend_api.grouping import group_indices  # noqa: E402
from backend_api.raw_data import RawData  # noqa: E402


def _measure(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, dt, peak / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-points", type=int, default=100_000)
    ap.add_argument("--pattern-size", type=int, default=16)
    ap.add_argument("--K", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-object", action="store_true",
                    help="also cut ground-truth Y patches from an objectGuess")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "grouping_speed.json")
    args = ap.parse_args(argv)

    n, H = args.n_points, args.pattern_size
    r = np.random.RandomState(args.seed)
    side = int(np.sqrt(n)) * 2 + 2 * H
    x = r.uniform(H, side - H, n)
    y = r.uniform(H, side - H, n)
    diff = r.rand(n, H, H).astype(np.float32)
    probe = np.ones((H, H), np.complex64)
    obj = (np.ones((side, side)) * np.exp(0.1j)).astype(np.complex64) if args.with_object else None
    raw = RawData.from_coords_without_pc(x, y, diff, probe, None, objectGuess=obj)

    rows = []
    for gs in (1, 2):
        for mode in ("random", "sequential"):
            seq = mode == "sequential"
            nn, t_idx, m_idx = _measure(lambda: group_indices(
                raw.xcoords, raw.ycoords, nsamples=n, K=args.K, gridsize=gs, seed=args.seed,
                sequential_sampling=seq))
            _, t_all, m_all = _measure(lambda: raw.generate_grouped_data(
                H, K=args.K, nsamples=n, gridsize=gs, seed=args.seed, sequential_sampling=seq))
            rows.append(dict(gridsize=gs, sampling=mode, groups=int(nn.shape[0]),
                             index_seconds=round(t_idx, 4), index_peak_MiB=round(m_idx, 1),
                             total_seconds=round(t_all, 4), total_peak_MiB=round(m_all, 1)))
            print(f"gridsize={gs} {mode:10s} groups={nn.shape[0]:7d}  index {t_idx:7.3f} s "
                  f"({m_idx:7.1f} MiB peak)  full dict {t_all:7.3f} s ({m_all:8.1f} MiB peak)",
                  flush=True)
    result = dict(
        benchmark="grouping_speed", n_points=n, pattern_size=H, K=args.K,
        with_object=bool(args.with_object), rows=rows,
        process_peak_rss_MiB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        machine=dict(python=platform.python_version(), numpy=np.__version__,
                     cpu_count=os.cpu_count(), platform=platform.platform()),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
