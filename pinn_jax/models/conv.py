"""3x3 'same' convolutions for the PtychoPINN CNN on XLA's CPU backend (any backend runs them).

One layer is :class:`Conv3x3`: ``nnx.Conv``'s parameters (HWIO ``kernel``, ``bias``) and values,
computed by :func:`conv3x3_bias`. Its formulations, chosen by static shapes, each tested against
XLA's own convolution and its gradients up to float32 summation order:

* the general layer: XLA's convolution, bias gradient as one matrix-vector product, the kernel
  gradient from the stored input (:func:`_unfused_input`);
* few output channels (the one-channel heads): per-tap products, :func:`_taps_conv`;
* a layer whose input is a 2x nearest-upsampled map (the decoders' first layers after an
  upsampling, the heads): computed on the map before upsampling, :func:`_conv3x3_of_upsampled`;
* on CPU where :func:`pinn_jax.models.onednn.enabled`, the forward and input-gradient
  convolutions of the general and upsampled forms run in oneDNN (:func:`_fast_conv`); where
  :func:`pinn_jax.native.enabled`, their kernel gradients run in pinn-jax's native kernel,
  else in XLA, and the larger 'same' 3x3 layers' forward, input-gradient and kernel-gradient
  convolutions run by Winograd's minimal filtering in pinn-jax's native kernels
  (:func:`_forward`, :func:`_input_grad`, :func:`_kernel_grad`,
  :func:`pinn_jax.native.winograd_suits`);
* a layer followed by a ReLU (the CNN's conv pairs, :meth:`Conv3x3.relu`) takes the bias and
  the ReLU as oneDNN post-ops where oneDNN runs it (:func:`conv3x3_bias_relu`).

Why each is faster is in its docstring; ``benchmarks/README.md`` has the measurements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pinn_jax import native, runtime
from pinn_jax.models import onednn

__all__ = ["FEW_OUT_CHANNELS", "SUBPIXEL_MIN_IN_CHANNELS", "Conv3x3", "conv3x3", "conv3x3_bias", "upsample_2x"]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Output channels up to which a convolution runs as per-tap products (:func:`_taps_conv`).
FEW_OUT_CHANNELS = 1
# Input channels from which a convolution of an upsampled map runs on the map before upsampling
# (below, the upsampled copy is small and XLA's gradients of the 2x2 form are slower).
SUBPIXEL_MIN_IN_CHANNELS = 8

# Which of the 3 taps of a 3x3 kernel, along one axis, land on each of the 2 source pixels of
# a 2x nearest-upsampled map, per output parity p: M[p, r, d] (see _conv3x3_of_upsampled).
_SUBPIXEL_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample_2x(x: jax.Array) -> jax.Array:
    """``(B, H, W, C) -> (B, 2H, 2W, C)``, nearest neighbour (Keras ``UpSampling2D((2, 2))``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's convolution of ``x`` zero-padded by 1 on each side with a ``(kh, kw, Ci, Co)``
    kernel: 'same' for 3x3, ``H + 1`` rows and columns for 2x2."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSION_NUMBERS)


def _valid_conv_of_padded(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """XLA's convolution of ``x`` zero-padded by ``padding ((top, bottom), (left, right))``,
    padded first and then 'valid': with the padding inside a 2x2 convolution, XLA computed its
    kernel gradient through a non-canonical layout, ~30x slower (145 ms for one layer)."""
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    return jax.lax.conv_general_dilated(xp, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSION_NUMBERS)


@functools.cache
def _cpu_has_bfloat16() -> bool:
    return runtime.cpu_has_bfloat16()


def _direct_in_bfloat16() -> bool:
    """Whether oneDNN's direct convolutions compute in bfloat16 here: bfloat16 math chosen
    (:func:`pinn_jax.runtime.configure_conv_math`), oneDNN on, a CPU with bfloat16 instructions.
    There (AMX) they beat the float32 Winograd kernels in the forward and input gradient (N=64,
    batch 16, the Winograd layers' forward + input gradient: 66 ms against 83), which then stay
    oneDNN's; the kernel gradients, float32 either way, keep Winograd."""
    return onednn.enabled() and runtime.conv_math_in_effect() == "bfloat16" and _cpu_has_bfloat16()


def _forward(x: jax.Array, kernel: jax.Array, padding: tuple, bias: jax.Array | None = None) -> jax.Array:
    """:func:`pinn_jax.models.onednn.conv2d` (with ``bias``: plus bias, then ReLU), by Winograd
    in the native kernel where it suits the layer (:func:`pinn_jax.native.winograd_suits`: 1.2-2x
    faster than oneDNN's direct convolution on the CNN's layers at batch 16; the same sums up to
    float32 roundings of the transformed terms), unless oneDNN computes in bfloat16
    (:func:`_direct_in_bfloat16`)."""
    if not _direct_in_bfloat16() and native.winograd_suits(x.shape, kernel.shape, padding):
        return native.conv3x3_winograd(x, kernel, bias, relu=bias is not None)
    return onednn.conv2d(x, kernel, padding, bias)


def _input_grad(g: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """:func:`pinn_jax.models.onednn.conv2d_input_grad`, by Winograd where it suits the layer
    (see :func:`_forward`)."""
    if not _direct_in_bfloat16() and native.winograd_suits(g.shape, kernel.shape, padding, transpose_kernel=True):
        return native.conv3x3_winograd(g, kernel, transpose_kernel=True)
    return onednn.conv2d_input_grad(g, kernel, padding)


def _kernel_grad(x: jax.Array, g: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """The native kernel gradient (:func:`pinn_jax.native.conv_kernel_grad`), by Winograd where
    it suits the layer (:func:`pinn_jax.native.conv3x3_winograd_kernel_grad`, see
    :func:`_forward`). Call where :func:`pinn_jax.native.enabled`."""
    if native.winograd_suits(x.shape, kernel.shape, padding):
        return native.conv3x3_winograd_kernel_grad(x, g)
    return native.conv_kernel_grad(x, g, kernel.shape[:2], padding)


def _custom_gradients() -> bool:
    """Whether the general layers run :func:`_fast_conv` (oneDNN or the native kernel gradient
    available) rather than XLA's convolution and its autodiff."""
    return onednn.enabled() or native.enabled()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fast_conv(x: jax.Array, kernel: jax.Array, padding: tuple, stored_input: bool = False) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, (1, 1), padding)`` with the fastest parts at hand:
    forward and input gradient by oneDNN where :func:`pinn_jax.models.onednn.enabled`
    (:func:`~pinn_jax.models.onednn.conv2d`, :func:`~pinn_jax.models.onednn.conv2d_input_grad`;
    XLA's convolutions otherwise); the kernel gradient by pinn-jax's native kernel where
    :func:`pinn_jax.native.enabled`, else XLA's from the stored input (:func:`_unfused_input`,
    unless ``stored_input`` says ``x`` is already a buffer fusion cannot recompute; a 2x2
    kernel's from the explicitly padded input, :func:`_valid_conv_of_padded`). The larger
    'same' 3x3 layers' forward and gradients by Winograd (:func:`_forward`, :func:`_kernel_grad`)."""
    return _forward(x, kernel, padding)


def _fast_conv_fwd(x, kernel, padding, stored_input):
    return _forward(x, kernel, padding), (x, kernel)


def _fast_conv_bwd(padding, stored_input, residuals, g):
    x, kernel = residuals
    dx = _input_grad(g, kernel, padding)
    if native.enabled():  # reads x and g as they are: no transposed copy to protect
        return dx, _kernel_grad(x, g, kernel, padding).astype(kernel.dtype)
    if not stored_input:
        x = _unfused_input(x, kernel)
    if kernel.shape[0] == 3:
        def conv(k):
            return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_DIMENSION_NUMBERS)
    else:
        def conv(k):
            return _valid_conv_of_padded(x, k, padding)
    dk = jax.vjp(conv, kernel)[1](g)[0]
    return dx, dk


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def _dense_conv(x: jax.Array, kernel: jax.Array, stored_input: bool = False) -> jax.Array:
    """:func:`_xla_conv`, by :func:`_fast_conv` where oneDNN (1.2-6x faster forward and
    input-gradient convolutions on the development host) or the native kernel gradient is
    available."""
    if _custom_gradients():
        return _fast_conv(x, kernel, ((1, 1), (1, 1)), stored_input)
    return _xla_conv(x, kernel)


def _taps_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """:func:`_xla_conv` for few output channels, as per-tap products.

    ``x (B, H, W, Ci) @ kernel (Ci, kh * kw * Co)`` gives every tap's product at every pixel in
    one matrix product that reads ``x`` once; the output is their sum, each tap shifted into
    place (the zero padding is applied to the products, which is the same). XLA's CPU
    convolution runs ``Ci -> 1`` layers at 13-28 GFLOP/s (a 64 x 64 x 64 -> 1 head at batch 16:
    ~3 ms forward, ~14 ms for both gradients); this form and its autodiff (a shifted stack of
    the output gradient times the kernel, ``x^T`` times that stack) run ~2-4x faster.
    """
    b, h, w, ci = x.shape
    kh, kw, _, co = kernel.shape
    taps = jnp.dot(x.reshape(-1, ci), kernel.transpose(2, 0, 1, 3).reshape(ci, kh * kw * co))
    taps = jnp.pad(taps.reshape(b, h, w, kh, kw, co), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
    ho, wo = h + 3 - kh, w + 3 - kw
    # out[i, j] = sum over (dy, dx) of padded x[i + dy, j + dx] @ kernel[dy, dx]
    out = taps[:, 0:ho, 0:wo, 0, 0]
    for dy in range(kh):
        for dx in range(kw):
            if dy or dx:
                out = out + taps[:, dy:dy + ho, dx:dx + wo, dy, dx]
    return out


def _few_out_channels(in_channels: int, out_channels: int) -> bool:
    """Whether a 3x3 layer with these channels runs as per-tap products (:func:`_taps_conv`)."""
    return out_channels <= FEW_OUT_CHANNELS < in_channels


def _few_out(kernel: jax.Array) -> bool:
    return _few_out_channels(*kernel.shape[-2:])


def _subpixel_kernel(kernel: jax.Array) -> jax.Array:
    """The ``(2, 2, Ci, 4 * Co)`` kernel of :func:`_conv3x3_of_upsampled`: per source-pixel tap,
    the summed 3x3 taps of each output parity ``(py, px)``, output channel ``(py, px, o)``."""
    ci, co = kernel.shape[2:]
    m = jnp.asarray(_SUBPIXEL_TAPS, kernel.dtype)
    return jnp.einsum("prd,qse,deio->rsipqo", m, m, kernel).reshape(2, 2, ci, 4 * co)


def _interleave_parities(z: jax.Array) -> jax.Array:
    """``(B, H + 1, W + 1, 4 * Co)`` 2x2 outputs of :func:`_subpixel_kernel` -> the upsampled
    map's ``(B, 2H, 2W, Co)``: output pixel ``(2i + py, 2j + px)`` is channel block ``(py, px)``
    at ``(i + py, j + px)``."""
    b, hp, wp, c4 = z.shape
    hh, ww, co = hp - 1, wp - 1, c4 // 4
    z = z.reshape(b, hp, wp, 2, 2, co)
    rows = [jnp.stack([z[:, py:py + hh, px:px + ww, py, px] for px in (0, 1)], axis=3) for py in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * hh, 2 * ww, co)


def _conv3x3_of_upsampled(h: jax.Array, kernel: jax.Array, stored_input: bool = False) -> jax.Array:
    """``conv3x3(upsample_2x(h), kernel)`` computed on ``h``'s grid.

    Along one axis, output pixel ``2i + p`` of the upsampled map sees source pixels ``i - 1, i``
    (p = 0: weights ``k0``, ``k1 + k2``) or ``i, i + 1`` (p = 1: ``k0 + k1``, ``k2``). So the four
    output parities are one 2x2 convolution of ``h`` padded by 1 with ``4 * Co`` summed kernels,
    interleaved: 16 instead of 36 products per source pixel and channel pair, and no upsampled
    copy of ``h`` (at N=64, batch 64, the head on the 64 x 64 map took 30 ms, mostly writing and
    reading that copy; 4 ms this way). Values: the same sums, the taps of a source pixel added
    first (float32 order).
    """
    k4 = _subpixel_kernel(kernel)
    if _few_out(kernel):
        z = _taps_conv(h, k4)
    elif _custom_gradients():  # pads inside the call; an XLA kernel gradient pads explicitly
        z = _fast_conv(h, k4, ((1, 1), (1, 1)), stored_input)
    else:
        z = _valid_conv_of_padded(h, k4, ((1, 1), (1, 1)))
    return _interleave_parities(z)


def conv3x3(x: jax.Array, kernel: jax.Array, upsampled: bool = False, stored_input: bool = False) -> jax.Array:
    """``x (B, H, W, Ci)``, ``kernel (3, 3, Ci, Co)`` -> ``(B, H, W, Co)``: 'same', stride 1, no
    bias; with ``upsampled``, the convolution of ``upsample_2x(x)``: ``(B, 2H, 2W, Co)``.
    ``stored_input``: ``x`` is a buffer XLA's fusion cannot recompute (a custom call's result),
    so the kernel gradient need not force one (:func:`_unfused_input`); values are the same."""
    if _few_out(kernel):
        conv = _taps_conv
    else:
        conv = functools.partial(_dense_conv, stored_input=stored_input)
    if not upsampled:
        return conv(x, kernel)
    if x.shape[-1] < SUBPIXEL_MIN_IN_CHANNELS:
        return conv(upsample_2x(x), kernel)
    return _conv3x3_of_upsampled(x, kernel, stored_input)


def _unfused_input(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x``, as a buffer that XLA's CPU fusion cannot recompute.

    The kernel gradient is a convolution over the batch that needs ``x`` transposed to
    ``(Ci, H, W, B)``. XLA fuses the ReLU and bias add that produced ``x`` into that transpose
    and emits the fusion as a plain loop at ~1 GB/s (a pure transpose runs ~10x faster with its
    tiled emitter): ~50 ms of the N=64 training step. A conditional is opaque to fusion, so the
    transpose reads the stored activation. Its other branch runs only when the kernel holds a
    NaN, where the forward output, the loss and every gradient are NaN whatever it returns.
    Elsewhere (GPU) a conditional costs a host round trip and buys nothing: ``x`` as it is."""
    def cpu(x, kernel):
        return jax.lax.cond(jnp.isnan(kernel[0, 0, 0, 0]), jnp.negative, lambda v: v, x)

    return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=lambda x, kernel: x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv3x3_bias(x: jax.Array, kernel: jax.Array, bias: jax.Array, upsampled: bool = False) -> jax.Array:
    """:func:`conv3x3` plus ``bias (Co,)``, with the bias gradient taken as a matrix-vector
    product. Autodiff gives ``sum(g, axis=(0, 1, 2))``, which XLA's CPU backend splits into
    reduce-windows over 16 x 32 x 32 blocks that run at ~1 GB/s: ~10 % of the PtychoPINN CNN's
    training step (N=64, batch 16); as a matrix-vector product (BLAS) plus a short sum it is
    the same sum in another float32 order."""
    return conv3x3(x, kernel, upsampled) + bias


def _conv3x3_bias_fwd(x, kernel, bias, upsampled):
    return conv3x3_bias(x, kernel, bias, upsampled), (x, kernel)


def _conv3x3_bias_grads(upsampled, stored_input, x, kernel, g):
    """``(dx, dk, db)`` of :func:`conv3x3_bias` for the output gradient ``g``."""
    if not _few_out(kernel) and not _custom_gradients():  # XLA's kernel gradient reads a transposed x
        x = _unfused_input(x, kernel)  # (_fast_conv does this itself where it needs it)
    dx, dk = jax.vjp(lambda x, k: conv3x3(x, k, upsampled, stored_input), x, kernel)[1](g)
    b, h, w, co = g.shape
    # rows summed by one matrix-vector product over (B * H) rows of W * Co values (a longer
    # vector runs faster than over B * H * W rows of Co), then the W partial sums
    db = jnp.dot(jnp.ones((b * h,), g.dtype), g.reshape(b * h, w * co)).reshape(w, co).sum(axis=0)
    return dx, dk, db


def _conv3x3_bias_bwd(upsampled, residuals, g):
    return _conv3x3_bias_grads(upsampled, False, *residuals, g)


conv3x3_bias.defvjp(_conv3x3_bias_fwd, _conv3x3_bias_bwd)


def _fuses_bias_relu(kernel: jax.Array) -> bool:
    return onednn.enabled() and not _few_out(kernel)


def relu_output_is_buffer(in_channels: int, out_channels: int, upsampled: bool = False) -> bool:
    """Whether :func:`conv3x3_bias_relu` of a layer with these channels returns a oneDNN call's
    own result (not a sub-pixel interleave that XLA could fuse into its consumers), so that the
    next layer can take it as ``stored_input``."""
    if not onednn.enabled() or _few_out_channels(in_channels, out_channels):
        return False
    return not upsampled or in_channels < SUBPIXEL_MIN_IN_CHANNELS


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv3x3_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array, upsampled: bool = False,
                      stored_input: bool = False) -> jax.Array:
    """``jax.nn.relu(conv3x3_bias(x, kernel, bias, upsampled))``: ``x (B, H, W, Ci)`` ->
    ``(B, H, W, Co)`` (``(B, 2H, 2W, Co)`` with ``upsampled``).

    Where oneDNN runs the layer, the bias and the ReLU are its post-ops on the accumulated
    output: no separate elementwise pass reads and writes the activation, and the result is the
    call's own buffer (``stored_input`` for the next layer, :func:`relu_output_is_buffer`). The
    gradient masks ``g`` where the output is 0 (as ``jax.nn.relu``'s: 0 at 0), then is
    :func:`conv3x3_bias`'s. Values: the same sums; oneDNN's bias add rounds as XLA's does.
    """
    if not _fuses_bias_relu(kernel):
        return jax.nn.relu(conv3x3(x, kernel, upsampled) + bias)
    same = ((1, 1), (1, 1))
    if not upsampled:
        return _forward(x, kernel, same, bias)
    if x.shape[-1] < SUBPIXEL_MIN_IN_CHANNELS:
        return onednn.conv2d(upsample_2x(x), kernel, same, bias)
    # the 4 parities' channel blocks (py, px, o) share the bias of o; ReLU commutes with the
    # interleave
    return _interleave_parities(onednn.conv2d(x, _subpixel_kernel(kernel), same, jnp.tile(bias, 4)))


def _conv3x3_bias_relu_fwd(x, kernel, bias, upsampled, stored_input):
    y = conv3x3_bias_relu(x, kernel, bias, upsampled, stored_input)
    return y, (x, kernel, y)


def _conv3x3_bias_relu_bwd(upsampled, stored_input, residuals, g):
    x, kernel, y = residuals
    g = jnp.where(y > 0, g, jnp.zeros_like(g))
    return _conv3x3_bias_grads(upsampled, stored_input, x, kernel, g)


conv3x3_bias_relu.defvjp(_conv3x3_bias_relu_fwd, _conv3x3_bias_relu_bwd)


class Conv3x3(nnx.Conv):
    """``nnx.Conv`` (3x3, 'same', stride 1, bias) applied through :func:`conv3x3_bias`: the same
    parameters (``kernel`` HWIO, ``bias``) and values (up to float32 order), faster on CPU.
    ``layer.of_upsampled(h)`` is ``layer(upsample_2x(h))``, computed on ``h``'s grid;
    ``layer.relu(x)`` is ``jax.nn.relu(layer(x))`` (:func:`conv3x3_bias_relu`)."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if inputs.ndim != 4 or self.kernel_size != (3, 3) or self.bias is None or out_sharding is not None:
            return super().__call__(inputs, out_sharding=out_sharding)
        return conv3x3_bias(inputs, self.kernel[...], self.bias[...])

    def of_upsampled(self, h: jax.Array) -> jax.Array:
        if h.ndim != 4 or self.kernel_size != (3, 3) or self.bias is None:
            return self(upsample_2x(h))
        return conv3x3_bias(h, self.kernel[...], self.bias[...], True)

    def relu(self, inputs: jax.Array, *, upsampled: bool = False, stored_input: bool = False) -> jax.Array:
        """``jax.nn.relu(self(inputs))``, or of ``self.of_upsampled(inputs)`` with ``upsampled``;
        ``stored_input``: see :func:`conv3x3` (from :func:`relu_output_is_buffer`)."""
        if inputs.ndim != 4 or self.kernel_size != (3, 3) or self.bias is None:
            return jax.nn.relu(self.of_upsampled(inputs) if upsampled else self(inputs))
        return conv3x3_bias_relu(inputs, self.kernel[...], self.bias[...], upsampled, stored_input)
