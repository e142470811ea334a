r"""Per-step batch norm, leaky ReLU and 2x2 max pooling as one op (``bn_pool``), for the layers after the
first: only the pooled output is written, never the full-resolution normalised activation.

Why: unfused, a layer writes its normalised activation y (the size of its convolution output x), the
pooling reads it and writes the pooled output with int64 indices, the pooling's backward writes a
full-resolution dy that is zero but at the windows' maxima, and the batch norm's backward reads dy
twice. This op's passes read x and pooled-size tensors only: per call about 2.4 X fewer bytes in the
forward and 3.4 X in the backward (X = the bytes of x; bench/NOTES.md, "Cut 3c: batch norm, leaky ReLU
and max pooling as one op"). Unlike layer 0's `conv_bn_pool` the convolution is not recomputed (with
K = 576 products per output it costs more than the bytes it would save): x is the convolution's output,
an ordinary differentiable input.

Symbols: the batch norm's, from `mamlpp_fast.ops.per_step_bn` (columns of M = N*H*W elements, mu, r,
xhat, z, a, y = a z). Pooling: 2x2 windows with stride 2 over the first 2*floor(H/2) rows and
2*floor(W/2) columns (as ``max_pool2d(y, 2, 2)``: an odd last row or column belongs to no window but
does enter the statistics)::

    out[v] = max_{j in window v} y_j,   j*(v) = the position of that max (the first in row-major order
                                               on ties, as max_pool2d)

Backward, given ``gout`` (the gradient w.r.t. ``out``)::

    dy_j = gout[v] if j = j*(v) for a window v, else 0
    (dx, dgamma, dbeta) = the batch norm's backward of dy          (per_step_bn's formulas)

so g = a dy is nonzero only at the maxima; dx is nonzero everywhere (dx_j = gamma r (g_j - gbar -
xhat_j m)).

With an output alias (``alias=True``: out and out' = out, the alias read by the next convolution's
backward node) the backward receives gout and gout' and is the above for ``gout + gout'``, the sum
formed where the kernels load gout (``gout2`` of the implementations' backward; the recorded backward
of an inner step receives one: `mamlpp_fast.ops.fanout.two_gradients`).

The double backward's gradient of x is not returned to x: the op keeps an alias of its input, which the
backward node reads in place of x, so that in the meta-update's outer backward that gradient (gx above,
call it dx2) reaches the op's own backward, which returns ``dx + dx2``, the sum formed where the
backward kernel stores dx (``dx2`` of the implementations' backward) instead of by autograd in an
addition of its own (an activation-sized read, read and write).

Double backward. The backward is linear in gout. Given the upstream gradients ``u`` (of dx, the size of
x), ``u_gamma`` and ``u_beta``, the batch norm's double backward of dy gives (gx, ggamma, gdy); dy is
gout scattered to the maxima, whose adjoint is the gather::

    d(gout)[v] = gdy_{j*(v)},   d(x) = gx,   d(gamma) = ggamma,   d(beta) = 0

The leaky-ReLU mask and the positions of the maxima are piecewise constant: their derivatives are 0
almost everywhere.

Implementations are three functions on plain tensors: ``forward(x, gamma, beta, meta) -> (out, mean,
invstd, aux)``, ``backward(gout, x, gamma, beta, mean, invstd, aux, meta, gout2=None, dx2=None) -> (dx,
dgamma, dbeta)``,
``double_backward(u, ugamma, ubeta, gout, x, gamma, beta, mean, invstd, aux, meta) -> (dgout, gx,
ggamma)``; ``aux`` is what the implementation keeps for its backward passes (here: the positions of the
maxima: int64 flat indices in `torch_impl`, the oracle; an int8 position 0..3 per window in the Triton
kernels, mamlpp_fast.triton.bn_pool); ``meta`` is ``(T, eps, slope)``.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from . import torch_backend as tb
from .fanout import saved_alias, two_gradients

__all__ = ["bn_pool", "bn_pool_supported", "torch_impl"]


# ------------------------------------------------------------------------------------------------------
# the implementation in plain PyTorch (the oracle)
# ------------------------------------------------------------------------------------------------------
def _forward(x, gamma, beta, meta):
    t, eps, slope = meta
    y, mean, invstd = tb.bn_forward(x, gamma, beta, t, eps, slope)
    out, idx = F.max_pool2d(y, 2, 2, return_indices=True)
    return out, mean, invstd, idx


def _scatter(gout, x, idx):
    """dy: gout at the maxima, 0 elsewhere (x: only its shape)."""
    return torch.ops.aten.max_pool2d_with_indices_backward(gout, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


def _backward(gout, x, gamma, beta, mean, invstd, idx, meta, gout2=None, dx2=None):
    t, _, slope = meta
    if gout2 is not None:
        gout = gout + gout2
    dx, dgamma, dbeta = tb.bn_backward(_scatter(gout, x, idx), x, gamma, beta, mean, invstd, t, slope)
    return (dx if dx2 is None else dx + dx2), dgamma, dbeta


def _double_backward(u, ugamma, ubeta, gout, x, gamma, beta, mean, invstd, idx, meta):
    t, _, slope = meta
    gx, ggamma, gdy = tb.bn_double_backward(u, ugamma, ubeta, _scatter(gout, x, idx), x, gamma, beta, mean,
                                            invstd, t, slope)
    dgout = gdy.flatten(2).gather(2, idx.flatten(2)).view_as(gout)
    return dgout, gx, ggamma


torch_impl = types.SimpleNamespace(name="torch", forward=_forward, backward=_backward,
                                   double_backward=_double_backward)


# ------------------------------------------------------------------------------------------------------
# autograd: the forward's backward is _PoolBackward, whose backward is the double backward
# ------------------------------------------------------------------------------------------------------
class _PoolForward(torch.autograd.Function):
    """out = bn_pool(x). Also returns an alias of out (the op's ``alias``) and one of x, which the backward
    node reads in place of x: their gradients reach this node's backward as arguments of their own (the
    second gradient of out; the double backward's gradient of x, added to dx where the backward kernel
    stores it) rather than being added to out's and x's by autograd."""

    @staticmethod
    def forward(ctx, x, gamma, beta, meta, impl, gamma_saved=None):
        out, mean, invstd, aux = impl.forward(x, gamma, beta, meta)
        x_alias = x.view_as(x)
        # the backward node reads gamma_saved (an alias of gamma, `bn_pool`) and x_alias, so that the
        # gradients the double backward returns for them are summed by the caller's fan-out node and
        # here, not added by autograd
        ctx.save_for_backward(x_alias, gamma if gamma_saved is None else gamma_saved, beta, mean, invstd, aux)
        ctx.meta, ctx.impl = meta, impl
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        return out, mean, invstd, out.view_as(out), x_alias

    @staticmethod
    def backward(ctx, gout, _gmean, _ginvstd, gout2, gx2):
        gout, gout2 = two_gradients(gout, gout2)
        if gout is None:
            return gx2, None, None, None, None, None
        x, gamma, beta, mean, invstd, aux = ctx.saved_tensors
        recorded = torch.is_grad_enabled()  # then gx2 is added outside the recorded node (`two_gradients`)
        dx, dgamma, dbeta = _PoolBackward.apply(gout, x, gamma, beta, mean, invstd, aux, ctx.meta, ctx.impl, gout2,
                                                None if recorded else gx2)
        if recorded and gx2 is not None:
            dx = dx + gx2
        return dx, dgamma, dbeta, None, None, None


class _PoolBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gout, x, gamma, beta, mean, invstd, aux, meta, impl, gout2=None, dx2=None):
        # gout2 (the output alias's gradient) and dx2 (x's alias's) are only given where this node is not
        # recorded (`two_gradients`): the double backward below is that of gout alone
        ctx.save_for_backward(gout, x, gamma, beta, mean, invstd, aux)
        ctx.meta, ctx.impl = meta, impl
        ctx.set_materialize_grads(False)
        return impl.backward(gout.contiguous(), x, gamma, beta, mean, invstd, aux, meta,
                             gout2=None if gout2 is None else gout2.contiguous(),
                             dx2=None if dx2 is None else dx2.contiguous())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, u, ugamma, ubeta):
        if u is None and ugamma is None and ubeta is None:
            return (None,) * 11
        gout, x, gamma, beta, mean, invstd, aux = ctx.saved_tensors
        dgout, gx, ggamma = ctx.impl.double_backward(
            None if u is None else u.contiguous(), ugamma, ubeta, gout.contiguous(), x, gamma, beta, mean,
            invstd, aux, ctx.meta)
        return dgout, gx, ggamma, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------------------
def bn_pool_supported(x) -> str | None:
    """None when `bn_pool` takes x, else why not (the caller runs the unfused ops instead)."""
    if x.dim() != 4:
        return f"x must be 4-D (N, T*C, H, W), got shape {tuple(x.shape)}"
    if x.shape[2] < 2 or x.shape[3] < 2:
        return f"the activation {x.shape[2]}x{x.shape[3]} is smaller than one 2x2 window"
    if x.dtype not in (torch.float32, torch.float64):
        return f"float32 or float64 only, got {x.dtype}"
    return None


def bn_pool(x, gamma, beta, num_tasks, eps, slope, impl=None, gamma_saved=None, alias=False):
    r"""``max_pool2d(per_step_batch_norm(x, gamma, beta, num_tasks, eps, slope)[0], 2, 2)`` as one op.

    Description:
        The same function as the two ops in a row (module docstring for the formulas), with hand-written
        backward and double backward that never form the full-resolution activation or its gradient dy.

    Arguments:
        x: ``(N, T*C, H, W)``, H, W >= 2. gamma, beta: ``(C,)`` or ``(T, C)`` each. num_tasks: T.
        eps: the batch norm's epsilon; slope: the leaky ReLU's negative slope (>= 0: monotone, so the
        pooling may pick the maximum of y).
        impl: `torch_impl` (default) or mamlpp_fast.triton.bn_pool.
        gamma_saved: an alias of gamma (`mamlpp_fast.ops.fanout`) that the backward reads, so that the
        gradient the double backward returns for gamma goes to it; None: gamma itself.
        alias: also return an alias of out, for the op whose backward reads out again (`task_conv2d`'s
        ``input_saved``): its gradient reaches this op's backward as a second argument, and the
        backward kernels add the two where they load the gradient (`mamlpp_fast.ops.fanout`,
        `two_gradients`).

    Returns:
        ``(out, mean, invstd)``: out ``(N, T*C, H//2, W//2)``; mean and invstd ``(T*C,)`` (not
        differentiable), as per_step_batch_norm returns them; ``(out, mean, invstd, out_alias)`` with
        ``alias=True``.
    """
    why = bn_pool_supported(x)
    if why is not None:
        raise ValueError(f"bn_pool: {why}")
    if slope < 0:
        raise ValueError(f"bn_pool: the leaky ReLU's slope must be >= 0 (monotone: pooling commutes with "
                         f"it), got {slope}")
    t = int(num_tasks)
    if t < 1 or x.shape[1] % t:
        raise ValueError(f"bn_pool: x.shape[1] = {x.shape[1]} (T*C) is not divisible by num_tasks = {t}")
    c = x.shape[1] // t
    for name, p in (("gamma", gamma), ("beta", beta)):
        if tuple(p.shape) not in ((c,), (t, c)):
            raise ValueError(f"bn_pool: {name} has shape {tuple(p.shape)}, expected ({c},) or ({t}, {c})")
        if p.dtype != x.dtype or p.device != x.device:
            raise ValueError(f"bn_pool: {name} ({p.dtype}, {p.device}) must match x ({x.dtype}, {x.device})")
    if gamma_saved is not None:
        gamma_saved = saved_alias("bn_pool", "gamma", gamma, gamma_saved)
        if gamma_saved.shape != beta.shape and gamma_saved.dim() == 1:
            gamma_saved = gamma_saved.expand(t, -1)
    if gamma.shape != beta.shape:
        gamma, beta = (p.expand(t, -1) if p.dim() == 1 else p for p in (gamma, beta))
    meta = (t, float(eps), float(slope))
    out, mean, invstd, out_alias, _ = _PoolForward.apply(x.contiguous(), gamma, beta, meta,
                                                         impl if impl is not None else torch_impl, gamma_saved)
    return (out, mean, invstd, out_alias) if alias else (out, mean, invstd)
