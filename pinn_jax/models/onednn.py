"""Stride-1 NHWC convolutions run by oneDNN inside XLA:CPU programs.

x86-64 jaxlib links oneDNN and its XLA:CPU runtime executes ``__onednn$convolution`` custom
calls (a oneDNN forward convolution, described by an ``OneDnnConvolutionConfig`` in the call's
backend config). XLA only emits them from a rewrite pass this jaxlib does not run, so
:func:`conv2d` emits the call itself. On the 2-core Sapphire Rapids host, oneDNN's forward
convolutions of the PtychoPINN CNN's layers run 1.2-6x faster than XLA's own (Eigen) ones; so
do the input gradients, which are forward convolutions too (the output gradient with the kernel
flipped and its channels swapped). The kernel gradient is not one oneDNN's forward primitive
runs well, so it is pinn-jax's own (:mod:`pinn_jax.native`) or XLA's (:mod:`pinn_jax.models.conv`
composes them).

A backend config XLA:CPU does not understand aborts the process instead of raising, and its
encoding is an internal of XLA that has changed between versions. So the path is used only
where it was checked (:func:`automatic`): on x86-64 Linux, for a jaxlib in
:data:`VERIFIED_JAXLIB` or another jaxlib once :func:`self_test` has passed in a child process,
with jax computing on one CPU device. ``PINN_JAX_ONEDNN=0`` turns it off, ``=1`` on without
these checks. Elsewhere (GPU lowering, float64, ``vmap`` over the kernel) :func:`conv2d` is
XLA's convolution with the same arguments. XLA:CPU cannot serialise a program with these calls
into jax's persistent compilation cache (see :data:`pinn_jax.runtime.UNCACHEABLE_ONEDNN_WARNING`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo as hlo
from jax.interpreters import batching, mlir

from pinn_jax.runtime import ONEDNN_FPMATH_ENV, self_test_in_child, switched_off, switched_on

__all__ = ["ENV", "VERIFIED_JAXLIB", "automatic", "calls_compiled", "conv2d", "conv2d_input_grad", "enabled",
           "self_test"]

ENV = "PINN_JAX_ONEDNN"
# jaxlib versions whose XLA:CPU was checked to run these calls with the config below.
VERIFIED_JAXLIB = frozenset({"0.10.2"})
_TARGET = "__onednn$convolution"
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, kernel, *bias, padding, swap_io, bias_relu=False):
    if swap_io:
        kernel = jnp.swapaxes(kernel, 2, 3)
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_DIMENSION_NUMBERS)
    return jax.nn.relu(y + bias[0]) if bias_relu else y


def _out_shape(x_shape, k_shape, padding, swap_io):
    b, h, w, _ = x_shape
    kh, kw = k_shape[:2]
    co = k_shape[2] if swap_io else k_shape[3]
    return (b, h + sum(padding[0]) - kh + 1, w + sum(padding[1]) - kw + 1, co)


def _backend_config(kernel_hw, padding, swap_io, bias_relu=False) -> str:
    # XLA's OneDnnConvolutionConfig: dimension indices of each operand (spatial ones
    # zero-based), stride and dilation 1 (written as they are: this jaxlib subtracts 1 from the
    # dilation, so 1 is none), pads as they are.
    data = {"batch_dim": 0, "feature_dim": 3, "spatial_dims": [1, 2]}
    i_dim, o_dim = (3, 2) if swap_io else (2, 3)
    cfg = {"dims": 4,
           "input": {"dims": 4, "data": data},
           "kernel": {"dims": 4, "filter": {"input_feature_dim": i_dim, "output_feature_dim": o_dim,
                                            "spatial_dims": [0, 1]}},
           "output": {"dims": 4, "data": data},
           "window": {"size": list(kernel_hw), "pad_left": [padding[0][0], padding[1][0]],
                      "pad_right": [padding[0][1], padding[1][1]], "strides": [1, 1],
                      "window_dilations": [1, 1]},
           # post-ops on the accumulated output: + bias (a third operand, (Co,)), then max(., 0)
           "fusions": {"ops": ["BIAS", "RELU"] if bias_relu else []},
           "feature_groups": 1}
    return json.dumps({"onednn_conv_config": cfg})


_conv_p = Primitive("pinn_jax_onednn_conv2d")


@_conv_p.def_abstract_eval
def _abstract(x, kernel, *bias, padding, swap_io, bias_relu=False):
    return jax.core.ShapedArray(_out_shape(x.shape, kernel.shape, padding, swap_io), x.dtype)


@_conv_p.def_impl
def _impl(*args, **params):
    return jax.jit(functools.partial(_conv_p.bind, **params))(*args)


def _layouts(ranks) -> ir.ArrayAttr:
    def row_major(rank):
        return ir.DenseIntElementsAttr.get(np.arange(rank - 1, -1, -1, dtype=np.int64), type=ir.IndexType.get())

    return ir.ArrayAttr.get([row_major(r) for r in ranks])


# whether this process has lowered a oneDNN call (oneDNN reads its math mode when the first runs)
_compiled = False


def calls_compiled() -> bool:
    """Whether this process has compiled a program with oneDNN convolutions (and so may have
    run one: oneDNN's process-wide settings, such as the math mode that
    :func:`pinn_jax.runtime.configure_conv_math` chooses, are fixed from then on)."""
    return _compiled


def _cpu_lowering(ctx, *operands, padding, swap_io, bias_relu=False):
    global _compiled
    _compiled = True
    out = ctx.avals_out[0]
    result = ir.RankedTensorType.get(out.shape, mlir.dtype_to_ir_type(out.dtype))
    config = _backend_config(ctx.avals_in[1].shape[:2], padding, swap_io, bias_relu)
    op = hlo.CustomCallOp(
        [result], list(operands), call_target_name=_TARGET,
        backend_config=ir.StringAttr.get(config),
        api_version=ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 1),
        operand_layouts=_layouts([a.ndim for a in ctx.avals_in]), result_layouts=_layouts([out.ndim]))
    return op.results


mlir.register_lowering(_conv_p, mlir.lower_fun(_xla_conv, multiple_results=False))
mlir.register_lowering(_conv_p, _cpu_lowering, platform="cpu")


def _batch_rule(args, dims, **params):
    x, *weights = args
    xd, *weight_dims = dims
    if all(d is None for d in weight_dims):  # kernel and bias not mapped: fold into the batch
        x = jnp.moveaxis(x, xd, 0)
        v, b = x.shape[:2]
        y = _conv_p.bind(x.reshape(v * b, *x.shape[2:]), *weights, **params)
        return y.reshape(v, b, *y.shape[1:]), 0
    conv = functools.partial(_xla_conv, **params)
    return jax.vmap(conv, in_axes=(xd, *weight_dims))(x, *weights), 0


batching.primitive_batchers[_conv_p] = _batch_rule


def _supported_host() -> bool:
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


@functools.cache
def _child_self_test() -> bool:
    # float32 math whatever the user chose: the check compares with XLA's float32 convolution
    return self_test_in_child(__name__, {ENV: "1", ONEDNN_FPMATH_ENV: "STRICT"}, timeout=300)


def enabled() -> bool:
    """Whether :func:`conv2d` emits oneDNN calls on CPU (see the module docstring). Read when a
    function is traced. By default only where jax computes on the CPU, with one device: XLA's
    sharding propagation does not see into a custom call, so under a data-parallel mesh it would
    gather the batch and convolve all of it on every device."""
    setting = os.environ.get(ENV)
    if switched_off(setting):
        return False
    if switched_on(setting):
        return True
    return automatic()


def automatic() -> bool:
    """What :func:`enabled` decides without ``PINN_JAX_ONEDNN``: x86-64 Linux, jax computing on
    the CPU with one device, and a jaxlib checked here or passing :func:`self_test` in a child."""
    if not _supported_host() or jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    import jaxlib

    return jaxlib.__version__ in VERIFIED_JAXLIB or _child_self_test()


def _eligible(*arrays) -> bool:
    return all(a.dtype == jnp.float32 for a in arrays) and enabled()


def conv2d(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]],
           bias: jax.Array | None = None) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, (1, 1), padding)``, NHWC / HWIO: ``x (B, H, W, Ci)``,
    ``kernel (kh, kw, Ci, Co)``, ``padding ((top, bottom), (left, right))`` zeros ->
    ``(B, H + top + bottom - kh + 1, W + left + right - kw + 1, Co)``; oneDNN's on CPU where
    :func:`enabled`. With ``bias (Co,)``: ``relu(conv + bias)``, the bias and ReLU applied by
    oneDNN to the accumulated output (post-ops: no separate pass over it). Not differentiable by
    itself (:mod:`pinn_jax.models.conv` gives the gradients)."""
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    weights = (kernel,) if bias is None else (kernel, bias)
    if bias is not None and bias.shape != kernel.shape[3:]:
        raise ValueError(f"conv2d: bias of shape {bias.shape}, expected ({kernel.shape[3]},) for kernel {kernel.shape}")
    params = dict(padding=padding, swap_io=False, bias_relu=bias is not None)
    if not _eligible(x, *weights):
        return _xla_conv(x, *weights, **params)
    return _conv_p.bind(x, *weights, **params)


def conv2d_input_grad(g: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The gradient of :func:`conv2d`'s input (any ``x`` of the matching shape) for its output
    gradient ``g (B, Ho, Wo, Co)``: ``g`` convolved with ``kernel`` flipped in space, channels
    swapped, zero-padded by ``kh - 1 - top`` ... -> ``(B, H, W, Ci)``. Every pad must be at most
    ``k - 1`` (true of 'same' and 'valid')."""
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = padding
    pads = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"conv2d_input_grad: padding {padding} exceeds the kernel's {kh}x{kw} - 1")
    flipped = jnp.flip(kernel, (0, 1))
    if not _eligible(g, kernel):
        return _xla_conv(g, flipped, padding=pads, swap_io=True)
    return _conv_p.bind(g, flipped, padding=pads, swap_io=True)


def self_test() -> bool:
    """Whether this process's XLA:CPU runs the oneDNN calls as XLA's convolution computes them
    (each form :mod:`pinn_jax.models.conv` uses, to float32 summation order). A jaxlib that
    misreads the config may abort the process: run it in a child (as :func:`enabled` does)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
    for kh, padding in ((3, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))), (2, ((0, 0), (0, 0))), (3, ((0, 1), (1, 0)))):
        k = jnp.asarray(rng.standard_normal((kh, kh, 3, 4)), jnp.float32)
        pads = tuple(tuple(p) for p in padding)
        b = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
        y = jax.jit(functools.partial(_conv_p.bind, padding=pads, swap_io=False))(x, k)
        ref = _xla_conv(x, k, padding=pads, swap_io=False)
        yb = jax.jit(functools.partial(_conv_p.bind, padding=pads, swap_io=False, bias_relu=True))(x, k, b)
        g = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
        dx = jax.jit(lambda g, k, pads=pads: conv2d_input_grad(g, k, pads))(g, k)
        dx_ref = jax.vjp(lambda v, k=k, pads=pads: _xla_conv(v, k, padding=pads, swap_io=False), x)[1](g)[0]
        for got, want in ((y, ref), (yb, jax.nn.relu(ref + b)), (dx, dx_ref)):
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want)))):
                return False
    return True
