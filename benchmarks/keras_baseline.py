"""Same-machine TensorFlow/Keras baseline for ``train_speed.py``: the reference network, timed here.

The reference's published CPU figure (0.356 s per training step) was taken on another host, so
a ratio against it mixes two machines. This script rebuilds the same network in Keras 3 on
TensorFlow (the reference's stack, whose convolutions run on oneDNN) and times it exactly the
way ``train_speed.py`` times pinn-jax, so that both can be measured in one run, interleaved.

What is built (reference brief ``model_physics.md`` §2, gridsize 1, ``pad_object`` and
``probe_big`` as in the reference defaults):

* encoder: blocks of two 3x3 ReLU convolutions + 2x2 max-pool, filters ``(32, 64, 128)`` (N=64)
  or ``(16, 32, 64, 128)`` (N=128) times ``n_filters_scale``;
* two decoders (amplitude: sigmoid, phase: ``pi * tanh``): blocks of two 3x3 ReLU convolutions
  + 2x nearest upsampling, then the centre head on all but the last 4 channels, zero-padded
  by N/4, plus the swish border branch on the last 4 channels, masked to the border;
* physics: ``obj = amp * exp(i phi)``, times the probe, 2-D FFT, amplitude ``|F| / N``, scaled
  by the intensity scale, Poisson negative log-likelihood against the scaled input amplitude
  squared (the reference's loss with ``nll_weight`` 1, the others 0);
* optimiser: Keras Adam, learning rate 1e-3; ``train_on_batch`` as the reference's ``fit`` does.

The parameter count is printed so it can be checked against pinn-jax's model (2.33 M at N=64,
n_filters_scale 2). This file imports only numpy and tensorflow; it is NOT a pinn-jax
dependency. Run it with the Python of an environment that has TensorFlow, e.g.::

    python3 -m venv tfvenv && tfvenv/bin/pip install tensorflow-cpu==2.19.1
    python benchmarks/train_speed.py --keras-python tfvenv/bin/python

or stand-alone: ``tfvenv/bin/python benchmarks/keras_baseline.py --N 64 --out keras.json``.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import numpy as np

ENCODER_FILTERS = {64: (32, 64, 128), 128: (16, 32, 64, 128), 256: (8, 16, 32, 64, 128)}
DECODER_FILTERS = {64: (64, 32), 128: (128, 64, 32), 256: (256, 128, 64, 32)}
OUTER_CHANNELS = 4


def build(N: int, nfs: int, probe: np.ndarray, intensity_scale: float):
    """Returns ``(autoencoder, diffraction_to_obj)`` Keras models sharing weights.

    Input: ``(B, N, N, 1)`` float32 scaled diffraction amplitude. ``autoencoder`` outputs the
    predicted intensity ``(B, N, N, 1)`` in the input's scaled units; ``diffraction_to_obj``
    outputs ``(amplitude, phase)``, each ``(B, N, N, 1)``.
    """
    import tensorflow as tf
    from tensorflow import keras
    from tensorflow.keras import layers

    def conv(f, act="relu"):
        return layers.Conv2D(f, 3, padding="same", activation=act)

    x_in = keras.Input((N, N, 1), dtype="float32")
    h = x_in
    for f in ENCODER_FILTERS[N]:
        h = conv(nfs * f)(h)
        h = conv(nfs * f)(h)
        h = layers.MaxPooling2D(2)(h)

    q = N // 4
    border = np.ones((1, N, N, 1), np.float32)
    border[:, q:N - q, q:N - q] = 0.0
    border_t = tf.constant(border)

    def decoder(h, act):
        for f in DECODER_FILTERS[N]:
            h = conv(nfs * f)(h)
            h = conv(nfs * f)(h)
            h = layers.UpSampling2D(2)(h)
        centre = layers.Lambda(lambda t: t[..., :-OUTER_CHANNELS])(h)
        centre = conv(1, act)(centre)
        centre = layers.ZeroPadding2D(q)(centre)
        outer = layers.Lambda(lambda t: t[..., -OUTER_CHANNELS:])(h)
        outer = conv(nfs * (2048 // N))(outer)
        outer = conv(nfs * (2048 // N))(outer)
        outer = layers.UpSampling2D(2)(outer)
        outer = conv(1, "swish")(outer)
        outer = layers.Lambda(lambda t: t * border_t)(outer)
        return layers.Add()([centre, outer])

    amp = decoder(h, "sigmoid")
    phi = decoder(h, lambda t: math.pi * tf.tanh(t))
    to_obj = keras.Model(x_in, [amp, phi], name="diffraction_to_obj")

    probe_t = tf.constant(probe.astype(np.complex64)[None, :, :])
    scale = float(intensity_scale)

    def forward(tensors):
        a, p = tensors
        obj = tf.complex(a[..., 0] * tf.cos(p[..., 0]), a[..., 0] * tf.sin(p[..., 0]))
        far = tf.signal.fft2d(obj * probe_t)
        amplitude = tf.abs(far) / float(N) * scale
        return (amplitude * amplitude)[..., None]

    pred_intensity = layers.Lambda(forward)([amp, phi])
    autoencoder = keras.Model(x_in, pred_intensity, name="autoencoder")
    return autoencoder, to_obj


def poisson_nll(y_true, y_pred):
    import tensorflow as tf

    # y_true carries the scaled amplitude; the target counts are its square.
    return tf.reduce_mean(y_pred - tf.square(y_true) * tf.math.log(y_pred + 1e-12))


def _probe(N: int) -> np.ndarray:
    # A smooth disc-like illumination; timings do not depend on its values.
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2.0
    r = np.hypot(yy, xx) / (N / 4)
    return (np.exp(-(r**4)) * np.exp(0.3j * r)).astype(np.complex64)


def worker(args) -> dict:
    import tensorflow as tf
    from tensorflow import keras

    N, B, nfs = args.N, args.batch_size, args.n_filters_scale
    tf.keras.utils.set_random_seed(args.seed)
    scale = math.sqrt(1e9) / (N / 2)
    auto, to_obj = build(N, nfs, _probe(N), scale)
    auto.compile(optimizer=keras.optimizers.Adam(1e-3), loss=poisson_nll)

    rng = np.random.default_rng(args.seed)
    n = max(4 * B, 64)
    X = (rng.random((n, N, N, 1), dtype=np.float32) * 0.5 * scale).astype(np.float32)
    batches = [rng.choice(n, B, replace=False) for _ in range(max(args.steps, args.blocked_steps) + 2)]

    out: dict = {"framework": "tensorflow", "tensorflow": tf.__version__, "keras": keras.__version__,
                 "N": N, "gridsize": 1, "batch_size": B, "n_filters_scale": nfs,
                 "params": int(to_obj.count_params()),
                 "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")}
    t0 = time.perf_counter()
    auto.train_on_batch(X[batches[0]], X[batches[0]])
    out["first_step_s"] = time.perf_counter() - t0
    # Keras resolves jit_compile='auto' (the reference's setting) at the first step: True means
    # XLA compiles the step, False means TF's own kernels (oneDNN convolutions on x86).
    out["jit_compile"] = bool(getattr(auto, "jit_compile", False))
    auto.train_on_batch(X[batches[1]], X[batches[1]])

    wall, cpu = [], []
    for i in range(args.blocked_steps):
        xb = X[batches[2 + i]]
        c0, w0 = time.process_time(), time.perf_counter()
        loss = auto.train_on_batch(xb, xb)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    out["train_step_s_blocked_median"] = statistics.median(wall)
    out["train_step_cpu_s_median"] = statistics.median(cpu)
    # train_on_batch returns a host float each step, so back-to-back steps are the same as
    # blocked ones here; report the best of two passes like the jax worker does.
    passes = []
    for _ in range(2):
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(args.steps):
            xb = X[batches[i % len(batches)]]
            loss = auto.train_on_batch(xb, xb)
        passes.append((time.perf_counter() - t0, time.process_time() - c0))
    best = min(passes)
    out["train_step_s"] = best[0] / args.steps
    out["train_step_cpu_s"] = best[1] / args.steps
    out["train_groups_per_s"] = B / out["train_step_s"]
    out["train_patterns_per_s"] = out["train_groups_per_s"]
    out["final_loss_finite"] = bool(np.isfinite(float(np.asarray(loss).ravel()[0])))

    inf = {}
    for pb in args.predict_batch:
        total = max(pb, args.predict_patterns)
        xi = np.resize(X, (total, N, N, 1))
        t0 = time.perf_counter()
        to_obj.predict(xi[:pb], batch_size=pb, verbose=0)
        first = time.perf_counter() - t0
        w = []
        for _ in range(args.predict_repeats):
            t0 = time.perf_counter()
            to_obj.predict(xi, batch_size=pb, verbose=0)
            w.append(time.perf_counter() - t0)
        inf[str(pb)] = {"patterns": total, "first_call_s": first, "s_median": statistics.median(w),
                        "patterns_per_s": total / statistics.median(w)}
    out["inference"] = inf
    out["inference_patterns_per_s_best"] = max(v["patterns_per_s"] for v in inf.values())
    return out


def main(argv=None) -> int:
    from timing_worker_cli import timing_parser, write_result

    args = timing_parser(__doc__.split("\n\n")[0], N_choices=ENCODER_FILTERS).parse_args(argv)
    result = worker(args)
    write_result(args.out, result)
    print(f"keras N={args.N}: {result['train_step_s']:.3f} s/step, {result['params']} params, "
          f"inference {result['inference_patterns_per_s_best']:.0f} patterns/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
