r"""Per-(task, channel) batch norm fused with leaky ReLU, differentiable to second order.

Layout: ``x`` is ``(N, T*C, H, W)``, task-major in the channel dimension (channel ``t*C + c`` is
channel ``c`` of task ``t``), as produced by a grouped convolution with ``groups=T``. ``gamma`` and
``beta`` are ``(C,)`` (shared by all tasks) or ``(T, C)`` (one row per task), each independently.

Symbols (all per (task, channel), i.e. per channel of the T*C channels; ``j`` runs over the
``M = N*H*W`` elements of that channel; ``mean`` is the average over those M elements)::

    mu      = mean(x)
    var     = mean((x - mu)^2)                    biased variance
    r       = 1 / sqrt(var + eps)                 (the returned `invstd`)
    xhat_j  = (x_j - mu) * r
    z_j     = gamma * xhat_j + beta
    a_j     = 1 if z_j > 0 else slope             leaky-ReLU mask
    y_j     = a_j * z_j

Backward (op ``mamlpp::bn_backward``, given the upstream gradient ``dy``)::

    g_j     = a_j * dy_j
    gbar    = mean(g)
    m       = mean(g * xhat)
    dbeta   = sum(g)            = M * gbar
    dgamma  = sum(g * xhat)     = M * m
    dx_j    = gamma * r * (g_j - gbar - xhat_j * m)

(the usual batch-norm backward with ``dxhat = gamma * g``; dgamma and dbeta are also summed over the
tasks when gamma, resp. beta, is shared ``(C,)``).

Double backward (the backward of the backward). Given ``u = ggx`` (gradient w.r.t. ``dx``),
``u_gamma = gggamma`` and ``u_beta = ggbeta``, differentiate the scalar

    F = sum_j u_j dx_j + u_gamma * dgamma + u_beta * dbeta
      = gamma * r * M * (ug - ubar * gbar - ux * m) + u_gamma * M * m + u_beta * M * gbar,

    ubar = mean(u),  ux = mean(u * xhat),  ug = mean(u * g),

with respect to ``dy``, ``x``, ``gamma`` and ``beta``. The mask ``a`` is piecewise constant, so its
derivative is 0 almost everywhere. ``u_gamma``/``u_beta`` of a shared parameter are one value per
channel, broadcast over the tasks. Write ``Q = M * (ug - ubar * gbar - ux * m)``.

* w.r.t. ``dy`` (F is linear in g and g_j = a_j dy_j)::

      d(dy)_j = a_j * [ gamma * r * (u_j - ubar - xhat_j * ux) + u_gamma * xhat_j + u_beta ]

* w.r.t. ``gamma`` (only dx depends on gamma, linearly)::

      d(gamma) = r * Q = r * M * (ug - ubar * gbar - ux * m)      (summed over tasks if shared)

* w.r.t. ``beta``: 0 (beta enters only through the mask).

* w.r.t. ``x``: F depends on x through ``xhat`` (also through m and ux) and directly through ``r``.
  Holding r fixed, dF/dxhat_j = P_j with::

      P_j = gamma * r * (-u_j * m - ux * g_j) + u_gamma * g_j

  (from d(M * ux * m)/dxhat_j = u_j * m + ux * g_j and d(M * m)/dxhat_j = g_j), and
  dF/dr|_xhat = gamma * Q. With dxhat_k/dx_j = r * (delta_kj - 1/M - xhat_k * xhat_j / M) and
  dr/dx_j = -r^2 * xhat_j / M (eps included in r)::

      d(x)_j = r * (P_j - mean(P) - xhat_j * mean(P * xhat)) - gamma * r^2 * xhat_j * Q / M
      mean(P)        = gamma * r * (-ubar * m - ux * gbar) + u_gamma * gbar
      mean(P * xhat) = -2 * gamma * r * ux * m + u_gamma * m

  (this is the hand derivation of the design brief, re-derived and confirmed by gradgradcheck).

Precision: fp16/bf16 inputs are computed in fp32 (``mean``/``invstd`` come back in fp32, the other
results in the dtype of the matching input); fp32 and fp64 are computed in their own dtype. ``xhat``
and ``z`` are recomputed from ``x``, ``mean`` and ``invstd`` (no other activation is saved), in the same
order of operations as the forward, so the recomputed mask equals the forward's bit for bit.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import library
from .backend import backend_key, get_backend
from .torch_backend import bn_backward, bn_double_backward, bn_forward  # noqa: F401 (re-exported)

__all__ = ["per_step_batch_norm", "bn_forward", "bn_backward", "bn_double_backward"]

_HALF = (torch.float16, torch.bfloat16)


def _check_args(x, gamma, beta, num_tasks, eps, slope):
    """The one validation of the op's input (the backends rely on it: BackendFunctions)."""
    op = "per_step_batch_norm"
    for name, t in (("x", x), ("gamma", gamma), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, T*C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral) or num_tasks < 1:
        raise ValueError(f"{op}: num_tasks must be a positive int, got {num_tasks!r}")
    n, tc, h, w = x.shape
    if tc % num_tasks != 0:
        raise ValueError(f"{op}: x.shape[1] = {tc} (T*C) is not divisible by num_tasks = {num_tasks}")
    if n * h * w == 0 or tc == 0:
        raise ValueError(f"{op}: x must have at least one element per channel, got shape {tuple(x.shape)}")
    c = tc // num_tasks
    for name, p in (("gamma", gamma), ("beta", beta)):
        if tuple(p.shape) not in ((c,), (num_tasks, c)):
            raise ValueError(f"{op}: {name} must have shape ({c},) or ({num_tasks}, {c}) for x with {tc} "
                             f"channels and num_tasks = {num_tasks}, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")
    if gamma.dtype != beta.dtype:
        raise ValueError(f"{op}: gamma and beta must have the same dtype, got {gamma.dtype} and {beta.dtype}")
    if gamma.dtype != x.dtype and not (x.dtype in _HALF and gamma.dtype == torch.float32):
        raise ValueError(f"{op}: dtype mismatch: gamma/beta are {gamma.dtype} but x is {x.dtype} "
                         "(allowed: the same dtype, or float32 parameters with float16/bfloat16 x)")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(slope, numbers.Real) and math.isfinite(slope)):
        raise ValueError(f"{op}: slope must be a finite number, got {slope!r}")


def per_step_batch_norm(x, gamma, beta, num_tasks, eps=1e-5, slope=0.01, backend=None):
    r"""Batch norm with statistics per (task, channel), fused with leaky ReLU.

    Description:
        ``y = leaky_relu(gamma * (x - mean) * invstd + beta, slope)`` where mean and the biased
        variance are taken per channel of the ``T*C`` channels over (N, H, W); ``invstd =
        1/sqrt(var + eps)``. Differentiable twice: the backward is the op
        ``torch.ops.mamlpp.bn_backward`` whose own backward, ``torch.ops.mamlpp.bn_double_backward``,
        is hand-written (formulas in the module docstring of ``mamlpp_fast.ops.per_step_bn``; the
        registration in ``mamlpp_fast.ops.library``).

    Arguments:
        x: ``(N, T*C, H, W)``, channel ``t*C + c`` = channel c of task t.
        gamma, beta: ``(C,)`` shared by the tasks, or ``(T, C)`` one row per task (each independently);
            the dtype of x, or float32 when x is float16/bfloat16.
        num_tasks: T.
        eps: added to the variance. slope: negative slope of the leaky ReLU.
        backend: None, "auto", "native", "triton", "torch" (or "cpp", "cuda") or a `Backend` (see
            ``mamlpp_fast.ops.backend``); the choice also follows the device of x.

    Returns:
        ``(y, mean, invstd)``: y like x; mean and invstd ``(T*C,)`` (float32 for half inputs), not
        differentiable.

    Example:
        >>> x = torch.randn(4, 2 * 3, 5, 5)
        >>> y, mean, invstd = per_step_batch_norm(x, torch.ones(3), torch.zeros(3), num_tasks=2)
        >>> y.shape, mean.shape
        (torch.Size([4, 6, 5, 5]), torch.Size([6]))
    """
    _check_args(x, gamma, beta, num_tasks, eps, slope)
    num_tasks = int(num_tasks)
    impl = get_backend(backend, x.device)
    impl.check_dtype("per_step_batch_norm", "x", x.dtype)
    # The backends take x contiguous and gamma, beta of one shape (BackendFunctions): a contiguous x is
    # passed as it is, another is copied; a shared (C,) parameter beside a per-task (T, C) one is
    # expanded (autograd sums its gradient over the tasks).
    if gamma.shape != beta.shape:
        gamma, beta = (p.expand(num_tasks, -1) if p.dim() == 1 else p for p in (gamma, beta))
    # the registered op mamlpp::bn_forward, whose registered derivative is mamlpp::bn_backward, whose
    # own is mamlpp::bn_double_backward (mamlpp_fast.ops.library)
    y, mean, invstd = library.bn_forward(x.contiguous(), gamma, beta, num_tasks, float(eps), float(slope),
                                         backend_key(impl))
    return y, mean.detach(), invstd.detach()
