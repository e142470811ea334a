r"""Autograd of the Triton per-task convolution (``task_conv2d(impl="triton")``), beside the other ops'
autograd; the kernels and their launchers are in `mamlpp_fast.triton.conv`.

The three launchers compute the forward F(x, w), the data gradient D(g, w) and the weight gradient
Wg(x, g), which are bilinear and adjoint to each other: <F(x, w), g> = <x, D(g, w)> = <w, Wg(x, g)>
(formulas in the docstring of mamlpp_fast.triton.conv). With upstream gradients u (shape of x) and
v (shape of w)::

    y  = F(x, w) + bias:  dx = D(gy, w),        dw = Wg(x, gy),   dbias[t,o] = sum_{i,y,z} gy[i, t*Co+o, y, z]
    dx = D(g, w):         dg = F(u, w),         dw = Wg(u, g)
    dw = Wg(x, g):        dx = D(g, v),         dg = F(x, v)
    (dx, dw, dbias) = the backward of y (`_ConvGrads`, one node; dw and dbias in one launch):
                          dgy = F(u, w) + F(x, v) + vb,   dx = D(gy, v),   dw = Wg(u, gy)
                          (vb: upstream gradient of dbias; dgy is ONE forward launch over both pairs,
                          `_ConvF2`, with vb as its bias)

so the Functions below differentiate each other and the convolution is differentiable to any order
(MAML++ needs two) with the three kernels only: the bias gradient is summed inside the weight-gradient
kernel, and its derivative (vb broadcast over the pixels) is the bias of a forward launch. Imported only when the triton implementation is
used (it imports triton).

With config key conv_streams (`mamlpp_fast.triton._device.side_by_side`), `_ConvGrads` runs its weight
gradient, which reads no weight, on a side stream beside the launches that do (the data gradient; in
its own backward also d gy), so that two launches that each fill part of the device can run at once.
The launches that read a weight stay on one stream: the first may make and cache the weight's re-laid
copy (`relaid_weights`), which a launch on another stream could read before it is written.
"""
from __future__ import annotations

import torch

from ..triton._device import side_by_side
from ..triton.conv import conv_data_grad, conv_forward, conv_weight_grad

__all__ = ["task_conv2d_triton"]


# ------------------------------------------------------------------------------------------------------
# autograd: F, D and Wg differentiate each other (module docstring)
# ------------------------------------------------------------------------------------------------------
class _ConvF(torch.autograd.Function):
    """y = F(x, w) + bias; its backward is one `_ConvGrads` node, which reads w_saved (an alias of w made
    by `mamlpp_fast.ops.fanout`, or None: w itself), so that the gradient it returns for the weight in
    the second-order backward reaches the fan-out node rather than being added to this node's by
    autograd; and x_saved (an alias of x returned by x's producer, or None: x itself), so that the
    gradient it returns for x reaches the producer's backward as its second gradient."""

    @staticmethod
    def forward(ctx, x, w, bias, meta, w_saved=None, x_saved=None):
        ctx.save_for_backward(x if x_saved is None else x_saved, w if w_saved is None else w_saved)
        ctx.meta = meta
        ctx.has_bias = bias is not None
        return conv_forward(x, w, bias, meta)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        grads = iter(_ConvGrads.apply(x, gy, w, ctx.meta, *need) if any(need) else ())
        gx, gw, gb = (next(grads) if n else None for n in need)
        return gx, gw, gb, None, None, None


class _ConvF2(torch.autograd.Function):
    """y = F(x, w) + F(x2, w2) + bias in one launch (the forward kernel's DUAL: one reduction over both
    pairs' taps). Backward for upstream h: the two pairs' `_ConvGrads`, the bias's with the first."""

    @staticmethod
    def forward(ctx, x, w, x2, w2, bias, meta):
        ctx.save_for_backward(x, w, x2, w2)
        ctx.meta = meta
        ctx.has_bias = bias is not None
        return conv_forward(x, w, bias, meta, x2=x2, w2=w2)

    @staticmethod
    def backward(ctx, h):
        x, w, x2, w2 = ctx.saved_tensors
        ni = ctx.needs_input_grad
        out = [None] * 6
        for j, (a, b, need) in enumerate(((x, w, (ni[0], ni[1], ctx.has_bias and ni[4])),
                                          (x2, w2, (ni[2], ni[3], False)))):
            if any(need):
                grads = iter(_ConvGrads.apply(a, h, b, ctx.meta, *need))
                da, db, dbias = (next(grads) if n else None for n in need)
                out[2 * j], out[2 * j + 1] = da, db
                if j == 0:
                    out[4] = dbias
        return tuple(out)


class _ConvGrads(torch.autograd.Function):
    """The backward of y = F(x, w) + bias for upstream gy as ONE node: the needed ones of gx = D(gy, w),
    gw = Wg(x, gy) and gb[t, o] = sum_{i,y,z} gy[i, t*Co+o, y, z] (gw and gb in one launch), returned in
    that order. Its backward, for upstream gradients (u, v, vb) of (gx, gw, gb)::

        d gy = F(u, w) + F(x, v) + vb      (one forward launch over both pairs, vb as its bias)
        d x  = D(gy, v)
        d w  = Wg(u, gy)

    As one node, the second-order backward forms d gy in one launch: as two (the data and the weight
    gradient), each returned its term and autograd added them (one more forward launch and one addition
    of a gy-sized tensor per convolution and inner step)."""

    @staticmethod
    def forward(ctx, x, gy, w, meta, need_x, need_w, need_b):
        ctx.save_for_backward(x, gy, w)
        ctx.meta = meta
        ctx.need = (need_x, need_w, need_b)
        ctx.set_materialize_grads(False)

        def weight_side():
            if need_w and need_b:
                return list(conv_weight_grad(x, gy, meta, with_bias=True))
            if need_w:
                return [conv_weight_grad(x, gy, meta)]
            if need_b:
                b, co = meta[0], meta[1]
                return [gy.reshape(gy.shape[0], b, co, -1).sum((0, 3))]
            return []

        if not need_x:
            return tuple(weight_side())
        if not (need_w or need_b):
            return (conv_data_grad(gy, w, meta),)
        # independent launches (the weight gradient reads no weight): side by side with conv_streams
        gx, rest = side_by_side(gy.device, lambda: conv_data_grad(gy, w, meta), weight_side)
        return (gx, *rest)

    @staticmethod
    def backward(ctx, *grads):
        x, gy, w = ctx.saved_tensors
        meta = ctx.meta
        it = iter(grads)
        u, v, vb = (next(it) if n else None for n in ctx.need)
        need_x, need_gy, need_w = ctx.needs_input_grad[:3]

        want_dx, want_dw = need_x and v is not None, need_w and u is not None
        want_dgy = need_gy and (u is not None or v is not None or vb is not None)

        def data_side():
            dx = _ConvD.apply(gy, v, meta) if want_dx else None
            return dx, (_ConvGrads._dgy(x, gy, w, u, v, vb, meta) if want_dgy else None)

        def weight_side():
            return _ConvW.apply(u, gy, meta) if want_dw else None

        if want_dw and (want_dx or want_dgy) and not torch.is_grad_enabled():
            # the weight gradient reads no weight: beside the data gradient and d gy (conv_streams); not
            # while a graph is being built (a third order), whose nodes would record the side stream
            (dx, dgy), dw = side_by_side(gy.device, data_side, weight_side)
        else:
            (dx, dgy), dw = data_side(), weight_side()
        return dx, dgy, dw, None, None, None, None

    @staticmethod
    def _dgy(x, gy, w, u, v, vb, meta):
        """d gy = F(u, w) + F(x, v) + vb from the upstream gradients present (u, v, vb; not all None)."""
        if u is not None and v is not None:
            return _ConvF2.apply(u, w, x, v, vb, meta)
        if u is not None or v is not None:  # vb rides on the one forward launch as its bias
            return _ConvF.apply(u, w, vb, meta) if u is not None else _ConvF.apply(x, v, vb, meta)
        b, co = meta[0], meta[1]
        return vb.reshape(1, b * co, 1, 1).expand(gy.shape)


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


def task_conv2d_triton(x, w, bias, b, stride, padding, w_saved=None, x_saved=None):
    """task_conv2d's contract (mamlpp_fast.ops.conv) on the Triton kernels; square stride/padding.
    w_saved, x_saved: the aliases of w and x that the backward reads (`_ConvF`), None for w and x."""
    if stride[0] != stride[1] or padding[0] != padding[1]:
        raise ValueError(f"triton task_conv2d: square stride and padding only, got {stride}, {padding}")
    n, _, h, wd = x.shape
    _, co, ci, kh, kw = w.shape
    if kh * kw > 32:
        raise ValueError(f"triton task_conv2d: at most 32 filter taps (one bit each per row), got {kh}x{kw}")
    s, p = stride[0], padding[0]
    ho, wo = (h + 2 * p - kh) // s + 1, (wd + 2 * p - kw) // s + 1
    meta = (b, co, ci, kh, kw, h, wd, ho, wo, s, p)
    return _ConvF.apply(x, w, bias, meta, w_saved, x_saved)
