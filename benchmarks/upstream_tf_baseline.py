"""Same-machine timing of the real upstream TensorFlow PtychoPINN (``ptycho`` package) for ``train_speed.py``.

``keras_baseline.py`` rebuilds the reference network in Keras; this script instead times
upstream's own code (hoidn/PtychoPINN, pinned at 712c23f in ``benchmarks/README.md``), imported
from whatever ``ptycho`` package the running Python finds. Nothing of upstream is copied here:
the script fills upstream's configuration, calls its builders and times the models they return.
``train_speed.py --upstream-python PY`` runs it in the same interleaved rounds as pinn-jax and
prints it as the ``upstream-tf`` row, with pinn-jax (tuned) / upstream ratios.

How the model is set up (the way upstream's ``train_cdi_model`` does it, without its data
pipeline and ``fit`` loop):

1. ``ptycho.config.config.TrainingConfig(model=ModelConfig(N, gridsize=1, n_filters_scale),
   batch_size, nll_weight=1, mae_weight=0, realspace_weight=0)`` -- upstream's defaults for
   everything else (``object_big``/``probe_big`` True, ``probe_mask`` False, ``pad_object``
   True, ``probe_scale`` 4, ``nphotons`` 1e9, ``intensity_scale_trainable`` True) -- written into
   the legacy ``ptycho.params.cfg`` with ``update_legacy_dict`` before any model module is
   imported (upstream's models read N, gridsize, ... from there);
2. a synthetic ``ptycho.loader.PtychoDataContainer`` (random amplitudes in [0, 0.5), zero
   offsets as gridsize 1 has, upstream's default probe ``ptycho.probe.get_default_probe(N)``);
3. ``ptycho.probe.set_probe_guess(None, container.probe)`` (upstream normalises it by
   ``probe_scale``) and ``params.set('intensity_scale',
   ptycho.train_pinn.calculate_intensity_scale(container))`` (sqrt(nphotons) / (N/2));
4. ``ptycho.generators.registry.resolve_generator(config).build_models()`` -- for the default
   ``'cnn'`` architecture this is ``ptycho.model.create_compiled_model()``: the autoencoder
   compiled with upstream's Adam(1e-3), its three losses ``[realspace_loss,
   'mean_absolute_error', negloglik]`` with weights ``[0, 0, 1]`` (Poisson NLL only, as its
   training uses) and its ``jit_compile`` setting (False unless ``USE_XLA_COMPILE`` is set); plus
   ``diffraction_to_obj``, the inference model that upstream's ``wts.h5.zip`` stores. The JSON
   records the trainable parameter count: upstream's log intensity scale is a bare
   ``tf.Variable`` that Keras 3 does not list among the model's trainable weights, so despite
   ``intensity_scale.trainable`` it is not updated (only the CNN's weights are);
5. inputs and targets from upstream's own ``ptycho.model.prepare_inputs`` /
   ``prepare_outputs`` (``[X * s, coords]`` and ``[Y_I centred, X * s, (X * s)**2]``).

What is timed:

* training: ``autoencoder.train_on_batch(inputs, targets)`` on ``--batch-size`` groups, after
  two warm-up steps (the first one, tracing included, is ``first_step_s``). Each of
  ``--blocked-steps`` steps is timed on its own (``train_on_batch`` returns host values, so it
  is synchronous); their median is ``train_step_s_blocked_median``, the figure ``train_speed.py``
  compares. ``--steps`` steps back to back, best of two passes, give ``train_step_s`` like the
  Keras worker.
* inference: ``diffraction_to_obj.predict_on_batch([X * s, coords])`` over ``--predict-patterns``
  patterns (rounded up to whole batches) in chunks of each ``--predict-batch`` (``train_speed.py``
  passes 32), after one warm-up chunk; median of ``--predict-repeats`` passes, in patterns/s.
  Why 32 and not the 64/256 the other rows use: upstream's ``ReassemblePatchesLayer`` calls
  ``tf_helper._reassemble_position_batched`` with a fixed batch of 64, and that function sums
  every patch of a call with 64 or more patterns into a single (1, padded, padded, 1) canvas,
  so ``predict_on_batch`` of 64 patterns returns one collapsed object instead of 64. Below 64
  it takes its per-pattern path. This script checks the output shape of every timed batch size
  and stops with an error if upstream returned fewer objects than patterns.

The result is the JSON ``train_speed.py`` reads (the keys of ``keras_baseline.py``, plus an
``upstream`` record of the configuration used). It needs a Python in which TensorFlow and
upstream's ``ptycho`` package import (recipe: ``benchmarks/README.md``, *Reference
environments*); ``XLA_FLAGS`` must hold no jaxlib-only flag (TensorFlow aborts on flags it
does not know; ``train_speed.py`` removes pinn-jax's own and sets ``PINN_JAX_XLA_DEFAULTS=0``).
Stand-alone: ``/work/refvenv/bin/python benchmarks/upstream_tf_baseline.py --N 64 --out up.json``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# upstream's ReassemblePatchesLayer batch: calls with at least this many patterns collapse.
UPSTREAM_MERGE_BATCH = 64


def _check_xla_flags() -> None:
    """Exit with a message instead of letting TensorFlow abort on an XLA flag it does not know."""
    try:  # this project's helper, when backend_api is installed in this Python
        from backend_api.reference_adapters import xla_flags_unknown_to_tensorflow
    except ImportError:
        return
    unknown = xla_flags_unknown_to_tensorflow(os.environ.get("XLA_FLAGS", ""))
    if unknown:
        raise SystemExit(f"XLA_FLAGS holds {unknown}, unknown to TensorFlow's XLA (it would abort): "
                         "remove them (train_speed.py does) and run again")


def build(N: int, gridsize: int, n_filters_scale: int, batch_size: int, n: int, seed: int):
    """Configure upstream and build its models. Returns ``(autoencoder, diffraction_to_obj,
    inputs, targets, info)`` with ``inputs``/``targets`` as numpy arrays of ``n`` groups."""
    from ptycho import params
    from ptycho.config.config import ModelConfig, TrainingConfig, update_legacy_dict

    config = TrainingConfig(model=ModelConfig(N=N, gridsize=gridsize, n_filters_scale=n_filters_scale),
                            batch_size=batch_size, nll_weight=1.0, mae_weight=0.0, realspace_weight=0.0)
    update_legacy_dict(params.cfg, config)

    import tensorflow as tf
    from ptycho import probe as probe_mod
    from ptycho import train_pinn
    from ptycho.generators.registry import resolve_generator
    from ptycho.loader import PtychoDataContainer

    tf.keras.utils.set_random_seed(seed)
    C = gridsize * gridsize
    rng = np.random.default_rng(seed)
    X = (rng.random((n, N, N, C), dtype=np.float32) * 0.5).astype(np.float32)
    Y_I = np.ones((n, N, N, C), np.float32)
    Y_phi = np.zeros((n, N, N, C), np.float32)
    coords = np.zeros((n, 1, 2, C), np.float32)
    probe_guess = np.asarray(probe_mod.get_default_probe(N, fmt="np"), np.complex64)
    container = PtychoDataContainer(X, Y_I, Y_phi, None, None, coords, coords, None, None, None, probe_guess)

    probe_mod.set_probe_guess(None, container.probe)
    params.set("intensity_scale", train_pinn.calculate_intensity_scale(container))
    generator = resolve_generator(config)
    autoencoder, diffraction_to_obj = generator.build_models()

    from ptycho import model as upstream_model

    inputs = [np.asarray(t) for t in upstream_model.prepare_inputs(container)]
    targets = [np.asarray(t) for t in upstream_model.prepare_outputs(container)]
    import ptycho

    cfg = params.cfg
    info = {
        "ptycho_path": str(Path(ptycho.__file__).parent),
        "generator": getattr(generator, "name", type(generator).__name__),
        "builder": "resolve_generator(config).build_models()",
        "intensity_scale": float(params.get("intensity_scale")),
        "probe_abs_mean": float(np.mean(np.abs(np.asarray(params.get("probe"))))),
        **{k: cfg.get(k) for k in ("N", "gridsize", "n_filters_scale", "batch_size", "object.big", "probe.big",
                                   "probe.mask", "pad_object", "probe_scale", "nphotons", "nll_weight",
                                   "mae_weight", "realspace_weight", "intensity_scale.trainable",
                                   "probe.trainable", "amp_activation", "gaussian_smoothing_sigma",
                                   "use_xla_translate")},
        "loss": [getattr(f, "__name__", str(f)) for f in _as_list(getattr(autoencoder, "loss", None))],
        "trainable_weights": len(autoencoder.trainable_weights),
        "trainable_params": int(sum(int(np.prod(w.shape)) for w in autoencoder.trainable_weights)),
        "env": {k: os.environ[k] for k in ("USE_XLA_COMPILE", "USE_XLA_TRANSLATE", "TF_ENABLE_ONEDNN_OPTS",
                                           "XLA_FLAGS") if k in os.environ},
    }
    return autoencoder, diffraction_to_obj, inputs, targets, info


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _first_value(loss) -> float:
    return float(np.asarray(loss[0] if isinstance(loss, (list, tuple)) else loss).ravel()[0])


def worker(args) -> dict:
    _check_xla_flags()
    N, B, nfs, gs = args.N, args.batch_size, args.n_filters_scale, 1
    n = max(4 * B, 64)
    auto, to_obj, inputs, targets, info = build(N, gs, nfs, B, n, args.seed)

    import keras
    import tensorflow as tf

    rng = np.random.default_rng(args.seed + 1)
    batches = [rng.choice(n, B, replace=False) for _ in range(max(args.steps, args.blocked_steps) + 2)]
    # numpy slices prepared ahead, so that only train_on_batch is inside the timed region
    feed = [([x[b] for x in inputs], [y[b] for y in targets]) for b in batches]

    out: dict = {"framework": "tensorflow (upstream ptycho)", "tensorflow": tf.__version__,
                 "keras": keras.__version__, "N": N, "gridsize": gs, "batch_size": B, "n_filters_scale": nfs,
                 "params": int(to_obj.count_params()), "autoencoder_params": int(auto.count_params()),
                 "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"), "upstream": info,
                 # oneDNN's default math mode (pinn_jax.runtime.configure_conv_math sets it for a bf16 row)
                 "onednn_fpmath_mode": os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE", "") or "STRICT (default)",
                 "tf_onednn_fpmath_mode": os.environ.get("TF_SET_ONEDNN_FPMATH_MODE", "")}
    t0 = time.perf_counter()
    loss = auto.train_on_batch(*feed[0])
    out["first_step_s"] = time.perf_counter() - t0
    out["jit_compile"] = bool(getattr(auto, "jit_compile", False))
    loss = auto.train_on_batch(*feed[1])

    wall, cpu = [], []
    for i in range(args.blocked_steps):
        xb, yb = feed[2 + i % (len(feed) - 2)]
        c0, w0 = time.process_time(), time.perf_counter()
        loss = auto.train_on_batch(xb, yb)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    out["train_step_s_blocked_median"] = statistics.median(wall)
    out["train_step_cpu_s_median"] = statistics.median(cpu)
    out["train_step_s_blocked"] = wall
    passes = []
    for _ in range(2):
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(args.steps):
            loss = auto.train_on_batch(*feed[i % len(feed)])
        passes.append((time.perf_counter() - t0, time.process_time() - c0))
    best = min(passes)
    out["train_step_s"] = best[0] / args.steps
    out["train_step_cpu_s"] = best[1] / args.steps
    out["train_groups_per_s"] = B / out["train_step_s"]
    out["train_patterns_per_s"] = B * gs * gs / out["train_step_s"]
    out["final_loss"] = _first_value(loss)
    out["final_loss_finite"] = bool(np.isfinite(out["final_loss"]))

    inf = {}
    for pb in args.predict_batch:
        chunks = -(-max(pb, args.predict_patterns) // pb)
        total = chunks * pb
        xi = np.resize(inputs[0], (total, *inputs[0].shape[1:]))
        oi = np.resize(inputs[1], (total, *inputs[1].shape[1:]))
        t0 = time.perf_counter()
        first_out = np.asarray(to_obj.predict_on_batch([xi[:pb], oi[:pb]]))
        first = time.perf_counter() - t0
        if first_out.shape[0] != pb:
            raise SystemExit(
                f"upstream diffraction_to_obj.predict_on_batch of {pb} patterns returned shape {first_out.shape}: "
                f"its ReassemblePatchesLayer merges calls of >= {UPSTREAM_MERGE_BATCH} patterns into one canvas; "
                f"use --predict-batch below {UPSTREAM_MERGE_BATCH} (train_speed.py uses 32)")

        def one_pass():
            for c in range(chunks):
                to_obj.predict_on_batch([xi[c * pb:(c + 1) * pb], oi[c * pb:(c + 1) * pb]])

        w, cw = [], []
        for _ in range(args.predict_repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            one_pass()
            w.append(time.perf_counter() - t0)
            cw.append(time.process_time() - c0)
        inf[str(pb)] = {"patterns": total * gs * gs, "call": "predict_on_batch", "first_call_s": first,
                        "output_shape": list(first_out.shape), "output_dtype": str(first_out.dtype),
                        "s_median": statistics.median(w), "cpu_s_median": statistics.median(cw),
                        "patterns_per_s": total * gs * gs / statistics.median(w)}
    out["inference"] = inf
    out["inference_patterns_per_s_best"] = max(v["patterns_per_s"] for v in inf.values())
    return out


def main(argv=None) -> int:
    from timing_worker_cli import timing_parser, write_result

    args = timing_parser(__doc__.split("\n\n")[0], predict_batch=(32,),
                         predict_batch_help=f"predict_on_batch sizes; must stay below {UPSTREAM_MERGE_BATCH} "
                                            "(see the module docstring)").parse_args(argv)
    result = worker(args)
    write_result(args.out, result)
    print(f"upstream N={args.N}: {result['train_step_s_blocked_median']:.3f} s/step (blocked median), "
          f"{result['params']} params, inference {result['inference_patterns_per_s_best']:.0f} patterns/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
