"""The reference PtychoPINN CNN generator (encoder + separate amplitude and phase decoders).

Architecture (reference brief ``model_physics.md`` §2; no skip connections):

* shared encoder: ``len(ENCODER_FILTERS[N])`` blocks of two 3x3 ReLU convolutions followed by a
  2x2 max-pool, ``N -> 8`` pixels, ``128 * n_filters_scale`` channels at the bottleneck;
* two decoders with identical topology and separate weights (amplitude, phase): blocks of two
  3x3 ReLU convolutions followed by 2x nearest upsampling, ``8 -> N/2`` pixels,
  ``32 * n_filters_scale`` channels, then one of three heads (``_Decoder.__call__``):

  - ``pad_object and not probe_big``: ``act(conv1(x[..., :-4]))`` zero-padded by N/4 (support
    restricted to the central N/2 x N/2 square);
  - ``pad_object and probe_big``: the above plus
    ``swish(conv2(up_block(x[..., -4:]))) * (1 - centre_mask)`` (a border branch that is swish
    for BOTH decoders, whatever ``amp_activation`` is);
  - ``not pad_object``: ``act(conv2(up_block(x)))`` on the full N x N field.

  ``act`` is ``amp_activation`` (sigmoid | swish | softplus | relu) for the amplitude and
  ``pi * tanh`` for the phase.

Every convolution matches a Keras ``Conv2D`` default: stride 1, 'same' padding, bias, HWIO
kernel with glorot-uniform initialisation and zero bias, so reference weights load 1:1
(:mod:`pinn_jax.interop`). The layers are :class:`pinn_jax.models.conv.Conv3x3`: the same
parameters and values (up to float32 order), formulated for XLA's CPU backend; a layer fed by an
upsampling takes the map before it (``Conv3x3.of_upsampled``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pinn_jax.models.conv import Conv3x3, relu_output_is_buffer

__all__ = [
    "AMP_ACTIVATIONS",
    "ENCODER_FILTERS",
    "DECODER_FILTERS",
    "SUPPORTED_N",
    "OUTER_CHANNELS",
    "CNNGenerator",
    "border_mask",
]

SUPPORTED_N = (64, 128, 256)

# Filter counts per block, before multiplying by n_filters_scale (reference brief §2.2/2.3).
ENCODER_FILTERS = {64: (32, 64, 128), 128: (16, 32, 64, 128), 256: (8, 16, 32, 64, 128)}
DECODER_FILTERS = {64: (64, 32), 128: (128, 64, 32), 256: (256, 128, 64, 32)}

# Number of trailing decoder feature channels that feed the probe_big border branch; the
# central head sees the others (the reference slices [..., :-4] and [..., -4:]).
OUTER_CHANNELS = 4


def _swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


AMP_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "swish": _swish,
    "softplus": jax.nn.softplus,
    "relu": jax.nn.relu,
}


def _phase_activation(x: jax.Array) -> jax.Array:
    return math.pi * jnp.tanh(x)


def border_mask(N: int) -> np.ndarray:
    """``(N, N, 1)`` float32: 0 on the central N/2 x N/2 square (rows/cols N/4 .. 3N/4-1), 1 outside."""
    m = np.ones((N, N, 1), np.float32)
    q = N // 4
    m[q : N - q, q : N - q] = 0.0
    return m


def _glorot_bound(shape) -> float:
    # Keras glorot_uniform for an HWIO kernel: fans include the receptive field.
    receptive = int(np.prod(shape[:-2]))
    return math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))


def _host_rng(rngs: nnx.Rngs) -> np.random.Generator | None:
    """A numpy Generator seeded from the next ``params`` key, or None when the key is traced.

    Drawing the kernels on the host avoids compiling one XLA random kernel per distinct conv
    shape, which makes eager construction ~10x faster on CPU (about 2 s instead of 20 s for the
    N=64 model). Same distribution (glorot uniform), deterministic for a given ``rngs`` seed.
    Under ``nnx.eval_shape`` / ``jit`` the key is abstract and the jax initialiser is used.
    """
    key = rngs.params()
    try:
        data = np.asarray(jax.random.key_data(key))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    return np.random.default_rng([int(v) for v in data.ravel()])


def _conv(in_ch: int, out_ch: int, rngs: nnx.Rngs, host_rng: np.random.Generator | None = None) -> nnx.Conv:
    # Keras Conv2D defaults: glorot_uniform kernel (fans include the 3x3 receptive field),
    # zero bias. Flax's default lecun_normal would not reproduce the reference's init.
    if host_rng is None:
        kernel_init = nnx.initializers.glorot_uniform()
    else:
        def kernel_init(key, shape, dtype=jnp.float32):
            b = _glorot_bound(shape)
            return jnp.asarray(host_rng.uniform(-b, b, shape), dtype)
    return Conv3x3(
        in_ch,
        out_ch,
        kernel_size=(3, 3),
        strides=1,
        padding="SAME",
        use_bias=True,
        kernel_init=kernel_init,
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
    """``(B, H, W, C) -> (B, H/2, W/2, C)``, the maximum of each 2x2 block (Keras MaxPool2D).

    As the maximum of four strided slices, one elementwise loop: XLA's CPU backend runs the
    equivalent ``reshape(...).max(axis=(2, 4))`` reduction ~4x slower (9 ms against 2 for the
    first block's 64 x 64 x 64 maps at batch 64). Autodiff of the slices would scatter into
    four padded copies, so the gradient is written out: autodiff's gradient of that reduction,
    the same values bitwise (a tie shares the gradient equally, as ``jnp.max`` does)."""
    return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                       jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def _max_pool_2x2_fwd(x):
    pooled = _max_pool_2x2(x)
    return pooled, (x, pooled)


def _max_pool_2x2_bwd(residuals, g):
    x, pooled = residuals
    b, h, w, c = x.shape
    hit = x.reshape(b, h // 2, 2, w // 2, 2, c) == pooled[:, :, None, :, None, :]
    share = g[:, :, None, :, None, :] / jnp.sum(hit, axis=(2, 4), keepdims=True).astype(g.dtype)
    return (jnp.where(hit, share, jnp.zeros_like(share)).reshape(b, h, w, c),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


class ConvPair(nnx.Module):
    """Two 3x3 'same' convolutions with ReLU (the conv part of Conv_Pool / Conv_Up blocks)."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs, host_rng=None):
        self.conv_a = _conv(in_ch, out_ch, rngs, host_rng)
        self.conv_b = _conv(out_ch, out_ch, rngs, host_rng)

    def __call__(self, x: jax.Array, *, upsampled: bool = False) -> jax.Array:
        """``upsampled``: the pair applied to ``upsample_2x(x)`` (its first layer computes
        that on ``x``'s grid, :meth:`Conv3x3.of_upsampled`)."""
        h = self.conv_a.relu(x, upsampled=upsampled)
        kernel = self.conv_a.kernel
        stored = relu_output_is_buffer(kernel.shape[2], kernel.shape[3], upsampled)
        return self.conv_b.relu(h, stored_input=stored)


class _Decoder(nnx.Module):
    """One decoder (amplitude or phase): base up-blocks + head. Output ``(B, N, N, C_out)``."""

    def __init__(
        self,
        N: int,
        in_ch: int,
        C_out: int,
        nfs: int,
        act: Callable[[jax.Array], jax.Array],
        pad_object: bool,
        probe_big: bool,
        *,
        rngs: nnx.Rngs,
        host_rng=None,
    ):
        self.N = N
        self.act = act
        self.pad_object = pad_object
        self.probe_big = probe_big
        blocks = []
        ch = in_ch
        for f in DECODER_FILTERS[N]:
            blocks.append(ConvPair(ch, nfs * f, rngs=rngs, host_rng=host_rng))
            ch = nfs * f
        self.base = nnx.List(blocks)
        outer_filters = nfs * (2048 // N)
        if pad_object:
            if ch <= OUTER_CHANNELS:
                raise ValueError(
                    f"n_filters_scale={nfs}: the decoder has {ch} feature channels, but the "
                    f"pad_object head needs more than {OUTER_CHANNELS}"
                )
            # conv1 of the reference: centre head on all but the last 4 feature channels.
            self.head_center = _conv(ch - OUTER_CHANNELS, C_out, rngs, host_rng)
            if probe_big:
                self.outer = ConvPair(OUTER_CHANNELS, outer_filters, rngs=rngs, host_rng=host_rng)
                self.head_outer = _conv(outer_filters, C_out, rngs, host_rng)
            else:
                self.outer = None
                self.head_outer = None
        else:
            # conv2 of the reference on a full-field up-block; conv1 is unused there.
            self.head_center = None
            self.outer = ConvPair(ch, outer_filters, rngs=rngs, host_rng=host_rng)
            self.head_outer = _conv(outer_filters, C_out, rngs, host_rng)

    def __call__(self, h: jax.Array) -> jax.Array:
        # Each block's output is upsampled 2x before its consumer (the next block, the heads);
        # the consumers' first layers take the map before upsampling (Conv3x3.of_upsampled).
        for i, block in enumerate(self.base):
            h = block(h, upsampled=i > 0)
        if not self.pad_object:
            return self.act(self.head_outer.of_upsampled(self.outer(h, upsampled=True)))
        q = self.N // 4
        centre = self.act(self.head_center.of_upsampled(h[..., :-OUTER_CHANNELS]))
        out = jnp.pad(centre, ((0, 0), (q, q), (q, q), (0, 0)))
        if self.probe_big:
            border = _swish(self.head_outer.of_upsampled(self.outer(h[..., -OUTER_CHANNELS:], upsampled=True)))
            out = out + border * jnp.asarray(border_mask(self.N))
        return out


class CNNGenerator(nnx.Module):
    """Reference CNN generator.

    Args:
      N: patch side, one of 64, 128, 256.
      C_in: input channels (``gridsize**2``).
      C_out: output channels (``gridsize**2`` when object_big, else 1).
      n_filters_scale: positive int multiplying every filter count.
      amp_activation: 'sigmoid' | 'swish' | 'softplus' | 'relu' (central amplitude head).
      pad_object, probe_big: head variant (module docstring).
      rngs: ``nnx.Rngs`` for the glorot-uniform kernels.

    ``__call__(x (B, N, N, C_in) float32) -> (amp, phase)``, each ``(B, N, N, C_out)`` float32;
    ``x`` is the normalised diffraction amplitude (``X``, not ``X * intensity_scale``).
    """

    def __init__(
        self,
        N: int,
        C_in: int,
        C_out: int,
        n_filters_scale: int = 2,
        amp_activation: str = "sigmoid",
        pad_object: bool = True,
        probe_big: bool = True,
        *,
        rngs: nnx.Rngs,
    ):
        if N not in ENCODER_FILTERS:
            raise ValueError(f"N={N!r} is not supported by the cnn generator; expected one of {SUPPORTED_N}")
        if amp_activation not in AMP_ACTIVATIONS:
            raise ValueError(
                f"amp_activation={amp_activation!r} is not supported; expected one of {sorted(AMP_ACTIVATIONS)}"
            )
        for name, v in (("C_in", C_in), ("C_out", C_out), ("n_filters_scale", n_filters_scale)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive integer")
        self.N = int(N)
        self.C_in = int(C_in)
        self.C_out = int(C_out)
        self.n_filters_scale = int(n_filters_scale)
        self.amp_activation = amp_activation
        self.pad_object = bool(pad_object)
        self.probe_big = bool(probe_big)
        nfs = self.n_filters_scale
        host_rng = _host_rng(rngs)

        blocks = []
        ch = self.C_in
        for f in ENCODER_FILTERS[N]:
            blocks.append(ConvPair(ch, nfs * f, rngs=rngs, host_rng=host_rng))
            ch = nfs * f
        self.encoder = nnx.List(blocks)
        # Creation order (amplitude decoder, then phase) matters only for the Keras name table.
        self.amp = _Decoder(N, ch, self.C_out, nfs, AMP_ACTIVATIONS[amp_activation],
                            self.pad_object, self.probe_big, rngs=rngs, host_rng=host_rng)
        self.phase = _Decoder(N, ch, self.C_out, nfs, _phase_activation,
                              self.pad_object, self.probe_big, rngs=rngs, host_rng=host_rng)

    def encode(self, x: jax.Array) -> jax.Array:
        for block in self.encoder:
            x = _max_pool_2x2(block(x))
        return x

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if x.ndim != 4 or x.shape[1:] != (self.N, self.N, self.C_in):
            raise ValueError(
                f"generator input: got shape {tuple(x.shape)}, expected (B, {self.N}, {self.N}, {self.C_in})"
            )
        h = self.encode(x.astype(jnp.float32))
        return self.amp(h), self.phase(h)
