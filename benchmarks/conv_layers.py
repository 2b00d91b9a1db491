"""Per-layer timing of the PtychoPINN CNN's 3x3 convolutions: XLA's own convolution against the
formulation pinn-jax uses (:mod:`pinn_jax.models.conv`), forward, input gradient and kernel
gradient, for every distinct layer shape of the network at the given N, batch sizes and
n_filters_scale.

    python benchmarks/conv_layers.py --N 64 128 --batch 16 64 --out conv_layers.json

The layer list follows the generator (encoder blocks, the decoders' base blocks, heads and the
border branch, ``pad_object`` and ``probe_big`` on, gridsize 1); a layer fed by a 2x upsampling
is timed as the convolution of the upsampled map (XLA: upsample, then convolve; pinn-jax: on the
map before upsampling). GFLOP/s count the direct convolution's ``2 * B * H * W * 9 * Ci * Co``
for every column, so the columns compare time. Both forms of each layer are timed alternately in
the same process; the machine's noise applies to both. Prints a Markdown table and writes JSON
(temporary name, then rename).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def layer_shapes(N: int, nfs: int) -> list[dict]:
    """Distinct 3x3 layers of the generator at ``N`` (gridsize 1, pad_object, probe_big):
    ``H`` (output side), ``ci``, ``co``, ``upsampled`` (input is 2x upsampled), ``count``."""
    from pinn_jax.models.cnn import DECODER_FILTERS, ENCODER_FILTERS, OUTER_CHANNELS

    layers: dict[tuple, dict] = {}

    def add(name, H, ci, co, upsampled=False, count=1):
        key = (H, ci, co, upsampled)
        entry = layers.setdefault(key, {"name": name, "H": H, "ci": ci, "co": co, "upsampled": upsampled, "count": 0})
        entry["count"] += count

    H, ch = N, 1
    for i, f in enumerate(ENCODER_FILTERS[N]):
        add(f"encoder {i} a", H, ch, nfs * f)
        add(f"encoder {i} b", H, nfs * f, nfs * f)
        ch, H = nfs * f, H // 2
    for i, f in enumerate(DECODER_FILTERS[N]):  # two decoders (amplitude, phase)
        add(f"decoder {i} a", H, ch, nfs * f, upsampled=i > 0, count=2)
        add(f"decoder {i} b", H, nfs * f, nfs * f, count=2)
        ch, H = nfs * f, H * 2
    outer = nfs * (2048 // N)
    add("head (centre)", H, ch - OUTER_CHANNELS, 1, upsampled=True, count=2)
    add("border a", H, OUTER_CHANNELS, outer, upsampled=True, count=2)
    add("border b", H, outer, outer, count=2)
    add("head (border)", 2 * H, outer, 1, upsampled=True, count=2)
    return list(layers.values())


def _median_ms(fn, reps: int) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_layer(layer: dict, batch: int, reps: int, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pinn_jax.models import conv

    H, ci, co, up = layer["H"], layer["ci"], layer["co"], layer["upsampled"]
    h_in = H // 2 if up else H
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, h_in, h_in, ci)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, ci, co)) / np.sqrt(9 * ci), jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch, H, H, co)), jnp.float32)

    def xla(x, k):
        return conv._xla_conv(conv.upsample_2x(x) if up else x, k)

    def ours(x, k):
        return conv.conv3x3(x, k, up)

    forms = {"xla": xla, "pinn_jax": ours}
    fns = {}
    for name, f in forms.items():
        fns[name] = {
            "forward": jax.jit(f),
            "input_gradient": jax.jit(lambda x, k, g, f=f: jax.vjp(lambda x: f(x, k), x)[1](g)[0]),
            "kernel_gradient": jax.jit(lambda x, k, g, f=f: jax.vjp(lambda k: f(x, k), k)[1](g)[0]),
        }
    args = {"forward": (x, k), "input_gradient": (x, k, g), "kernel_gradient": (x, k, g)}
    gflop = 2.0 * batch * H * H * 9 * ci * co / 1e9
    out = {**layer, "batch": batch, "gflop": gflop}
    for part in ("forward", "input_gradient", "kernel_gradient"):
        samples = {name: [] for name in forms}
        for _ in range(3):  # alternate the two forms: both see the same machine state
            for name in forms:
                call = functools.partial(fns[name][part], *args[part])
                samples[name].append(_median_ms(call, max(1, reps // 3)))
        for name in forms:
            ms = statistics.median(samples[name])
            out[f"{name}_{part}_ms"] = ms
            out[f"{name}_{part}_gflops"] = gflop / (ms / 1e3)
    return out


def _markdown(rows: list[dict]) -> str:
    head = ("| N | batch | layer (x count) | H | Ci -> Co | forward ms xla / ours | input grad ms xla / ours "
            "| kernel grad ms xla / ours | GFLOP/s ours (fwd, dx, dk) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        up = " (of 2x up)" if r["upsampled"] else ""
        lines.append(
            f"| {r['N']} | {r['batch']} | {r['name']} (x{r['count']}) | {r['H']} | {r['ci']} -> {r['co']}{up} "
            f"| {r['xla_forward_ms']:.2f} / {r['pinn_jax_forward_ms']:.2f} "
            f"| {r['xla_input_gradient_ms']:.2f} / {r['pinn_jax_input_gradient_ms']:.2f} "
            f"| {r['xla_kernel_gradient_ms']:.2f} / {r['pinn_jax_kernel_gradient_ms']:.2f} "
            f"| {r['pinn_jax_forward_gflops']:.0f}, {r['pinn_jax_input_gradient_gflops']:.0f}, "
            f"{r['pinn_jax_kernel_gradient_gflops']:.0f} |")
    return "\n".join(lines)


def _totals(rows: list[dict]) -> list[str]:
    out = []
    for (N, batch) in sorted({(r["N"], r["batch"]) for r in rows}):
        sel = [r for r in rows if r["N"] == N and r["batch"] == batch]
        parts = []
        for part in ("forward", "input_gradient", "kernel_gradient"):
            a = sum(r[f"xla_{part}_ms"] * r["count"] for r in sel)
            b = sum(r[f"pinn_jax_{part}_ms"] * r["count"] for r in sel)
            parts.append(f"{part.replace('_', ' ')} {a:.1f} -> {b:.1f} ms")
        out.append(f"N={N} batch {batch}, all layers weighted by count (xla -> pinn-jax): " + ", ".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, nargs="+", default=[64], choices=(64, 128, 256))
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--n-filters-scale", type=int, default=2)
    p.add_argument("--reps", type=int, default=9, help="timed calls per form and part (median)")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = p.parse_args(argv)
    for b in args.batch:
        if b < 1:
            p.error(f"--batch {b}: expected >= 1")
    if args.n_filters_scale < 1:
        p.error(f"--n-filters-scale {args.n_filters_scale}: expected >= 1")

    import pinn_jax

    pinn_jax.configure_cpu_runtime()
    import jax

    from pinn_jax import native
    from pinn_jax.models import onednn

    rows = []
    for N in args.N:
        for batch in args.batch:
            for layer in layer_shapes(N, args.n_filters_scale):
                r = {"N": N, **time_layer(layer, batch, args.reps)}
                rows.append(r)
                print(f"N={N} batch {batch} {r['name']}: forward {r['xla_forward_ms']:.2f} -> "
                      f"{r['pinn_jax_forward_ms']:.2f} ms, input grad {r['xla_input_gradient_ms']:.2f} -> "
                      f"{r['pinn_jax_input_gradient_ms']:.2f}, kernel grad {r['xla_kernel_gradient_ms']:.2f} -> "
                      f"{r['pinn_jax_kernel_gradient_ms']:.2f}", flush=True)
    dev = jax.devices()[0]
    info = {"device": f"{dev.platform} ({getattr(dev, 'device_kind', '')})", "cpus": os.cpu_count(),
            "jax": jax.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "n_filters_scale": args.n_filters_scale,
            "onednn_convolutions": onednn.enabled(), "native_kernel_gradient": native.enabled(),
            "winograd": native.winograd_enabled()}
    print()
    print(_markdown(rows))
    for line in _totals(rows):
        print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps({"info": info, "layers": rows, "totals": _totals(rows)}, indent=1))
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
