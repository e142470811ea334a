r"""2x2 max pooling (stride 2, no padding) differentiable to any order without zero gradients:
``max_pool2x2(y)`` equals ``F.max_pool2d(y, 2, 2)`` in value and in every derivative, and is the
fast learner's pooling where batch norm and pooling are separate ops (config keys first_block /
bn_pool unfused).

Math. With idx[..., i, j] the flat index (in y's H x W plane) of the maximum of window (i, j) (the first
one on ties, as ``max_pool2d``)::

    p  = P(y):        p[..., i, j] = y[..., idx[..., i, j]]
    dy = S(g; idx):   dy[..., k]   = sum over windows (i, j) with idx[..., i, j] = k of g[..., i, j]
                                     (aten.max_pool2d_with_indices_backward; a stride equal to the window
                                     puts each k in at most one window)
    S's derivative for an upstream u (the shape of y):
                      d g = G(u; idx): G(u)[..., i, j] = u[..., idx[..., i, j]]   (a gather)
                      and none for y: S depends on y only through idx, which is piecewise constant.
    G's derivative for an upstream h (the shape of p): d u = S(h; idx)  (S and G are adjoint:
                      <S(g), u> = <g, G(u)>).

Why an op of our own: autograd's formula for the derivative of ``max_pool2d_with_indices_backward``
returns ``zeros_like(self)`` for its input, and the engine adds that zero tensor to the input's other
gradient. In a second-order meta-update that is one fill and one activation-sized addition per pooling
and inner step in the outer backward (bench/NOTES.md, "max pooling's double backward stops adding a zero
gradient"). Here `_Scatter`, the backward, returns no gradient for y. The values are those of the same
aten kernels (``max_pool2d_with_indices``, its backward and the same gather as autograd's
``max_pool_double_backward``).
"""
from __future__ import annotations

import torch

__all__ = ["max_pool2x2"]

_K, _S, _P, _D = [2, 2], [2, 2], [0, 0], [1, 1]


def _gather(u, idx):
    """G(u; idx): u (..., H, W) read at each window's maximum -> the shape of idx."""
    return u.flatten(-2).gather(-1, idx.flatten(-2)).view(idx.shape)


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        p, idx = torch.ops.aten.max_pool2d_with_indices(y, _K, _S, _P, _D, False)
        ctx.save_for_backward(y, idx)
        return p

    @staticmethod
    def backward(ctx, g):
        y, idx = ctx.saved_tensors
        return _Scatter.apply(g, y, idx)


class _Scatter(torch.autograd.Function):
    """dy = S(g; idx); `like`: a tensor of y's shape and layout (aten's kernel reads its sizes, not its
    values). Its backward is G, for g only."""

    @staticmethod
    def forward(ctx, g, like, idx):
        ctx.save_for_backward(idx)
        ctx.like = (like.shape, like.dtype, like.device)
        return torch.ops.aten.max_pool2d_with_indices_backward(g, like, _K, _S, _P, _D, False, idx)

    @staticmethod
    def backward(ctx, u):
        (idx,) = ctx.saved_tensors
        return _Gather.apply(u, idx, ctx.like), None, None


class _Gather(torch.autograd.Function):
    """d g = G(u; idx); its backward is S again (a third order)."""

    @staticmethod
    def forward(ctx, u, idx, like):
        ctx.save_for_backward(idx)
        ctx.like = like
        return _gather(u, idx)

    @staticmethod
    def backward(ctx, h):
        (idx,) = ctx.saved_tensors
        shape, dtype, device = ctx.like
        return _Scatter.apply(h, torch.empty(shape, dtype=dtype, device=device), idx), None, None


def max_pool2x2(y: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(y, 2, 2)`` for y (N, C, H, W) (an odd last row or column belongs to no window), with
    the derivatives of the module docstring."""
    if y.dim() != 4:
        raise ValueError(f"max_pool2x2: y must be (N, C, H, W), got shape {tuple(y.shape)}")
    if y.shape[2] < 2 or y.shape[3] < 2:
        raise ValueError(f"max_pool2x2: y must be at least 2 x 2, got {tuple(y.shape[2:])}")
    return _MaxPool.apply(y)
