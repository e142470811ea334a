r"""Autograd of the Triton per-task convolution (``task_conv2d(impl="triton")``), beside the other ops'
autograd; the kernels and their launchers are in `mamlpp_fast.triton.conv`.

The three launchers compute the forward F(x, w), the data gradient D(g, w) and the weight gradient
Wg(x, g), which are bilinear and adjoint to each other: <F(x, w), g> = <x, D(g, w)> = <w, Wg(x, g)>
(formulas in the docstring of mamlpp_fast.triton.conv). With upstream gradients u (shape of x) and
v (shape of w)::

    y  = F(x, w) + bias:  dx = D(gy, w),        dw = Wg(x, gy),   dbias[t,o] = sum_{i,y,z} gy[i, t*Co+o, y, z]
    dx = D(g, w):         dg = F(u, w),         dw = Wg(u, g)
    dw = Wg(x, g):        dx = D(g, v),         dg = F(x, v)
    (dw, dbias) = WgB(x, g) (the weight gradient with the bias's, one launch):
                          dx = D(g, v),         dg = F(x, v) + vb   (vb: upstream gradient of dbias,
                                                                     the forward kernel's bias)

so the Functions below differentiate each other and the convolution is differentiable to any order
(MAML++ needs two) with the three kernels only: the bias gradient is summed inside the weight-gradient
kernel, and its derivative (vb broadcast over the pixels) is the bias of a forward launch. Imported only when the triton implementation is
used (it imports triton).
"""
from __future__ import annotations

import torch

from ..triton.conv import conv_data_grad, conv_forward, conv_weight_grad

__all__ = ["task_conv2d_triton"]


# ------------------------------------------------------------------------------------------------------
# autograd: F, D and Wg differentiate each other (module docstring)
# ------------------------------------------------------------------------------------------------------
class _ConvF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, meta):
        ctx.save_for_backward(x, w)
        ctx.meta = meta
        ctx.has_bias = bias is not None
        return conv_forward(x, w, bias, meta)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        meta = ctx.meta
        gx = _ConvD.apply(gy, w, meta) if ctx.needs_input_grad[0] else None
        need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        gw = gb = None
        if need_w and need_b:
            gw, gb = _ConvWB.apply(x, gy, meta)
        elif need_w:
            gw = _ConvW.apply(x, gy, meta)
        elif need_b:
            b, co = meta[0], meta[1]
            gb = gy.reshape(gy.shape[0], b, co, -1).sum((0, 3))
        return gx, gw, gb, None


class _ConvD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, w, meta):
        ctx.save_for_backward(g, w)
        ctx.meta = meta
        return conv_data_grad(g, w, meta)

    @staticmethod
    def backward(ctx, u):
        g, w = ctx.saved_tensors
        meta = ctx.meta
        dg = _ConvF.apply(u, w, None, meta) if ctx.needs_input_grad[0] else None
        dw = _ConvW.apply(u, g, meta) if ctx.needs_input_grad[1] else None
        return dg, dw, None


class _ConvW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, meta):
        ctx.save_for_backward(x, g)
        ctx.meta = meta
        return conv_weight_grad(x, g, meta)

    @staticmethod
    def backward(ctx, v):
        x, g = ctx.saved_tensors
        meta = ctx.meta
        dx = _ConvD.apply(g, v, meta) if ctx.needs_input_grad[0] else None
        dg = _ConvF.apply(x, v, None, meta) if ctx.needs_input_grad[1] else None
        return dx, dg, None


class _ConvWB(torch.autograd.Function):
    """(dw, dbias) = WgB(x, g): the weight gradient and the bias gradient in one launch."""

    @staticmethod
    def forward(ctx, x, g, meta):
        ctx.save_for_backward(x, g)
        ctx.meta = meta
        ctx.set_materialize_grads(False)
        return conv_weight_grad(x, g, meta, with_bias=True)

    @staticmethod
    def backward(ctx, v, vb):
        x, g = ctx.saved_tensors
        meta = ctx.meta
        dx = _ConvD.apply(g, v, meta) if ctx.needs_input_grad[0] and v is not None else None
        dg = None
        if ctx.needs_input_grad[1] and (v is not None or vb is not None):
            if v is not None:  # F(x, v) with vb as its bias: the broadcast of vb rides on the forward kernel
                dg = _ConvF.apply(x, v, vb, meta)
            else:
                b, co = meta[0], meta[1]
                dg = vb.reshape(1, b * co, 1, 1).expand(g.shape)
        return dx, dg, None


def task_conv2d_triton(x, w, bias, b, stride, padding):
    """task_conv2d's contract (mamlpp_fast.ops.conv) on the Triton kernels; square stride/padding."""
    if stride[0] != stride[1] or padding[0] != padding[1]:
        raise ValueError(f"triton task_conv2d: square stride and padding only, got {stride}, {padding}")
    n, _, h, wd = x.shape
    _, co, ci, kh, kw = w.shape
    if kh * kw > 32:
        raise ValueError(f"triton task_conv2d: at most 32 filter taps (one bit each per row), got {kh}x{kw}")
    s, p = stride[0], padding[0]
    ho, wo = (h + 2 * p - kh) // s + 1, (wd + 2 * p - kw) // s + 1
    meta = (b, co, ci, kh, kw, h, wd, ho, wo, s, p)
    return _ConvF.apply(x, w, bias, meta)
