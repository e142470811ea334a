r"""The ``torch`` backend: the five backend functions in plain PyTorch, on any device.

It is the reference that the other backends (``native``: the compiled extension; ``triton``) are
tested against, and the backend that always loads. The contract of the five functions is
`mamlpp_fast.ops.backend.BackendFunctions`; the formulas are in the docstrings of
`mamlpp_fast.ops.per_step_bn` (batch norm) and `mamlpp_fast.ops.lslr` (LSLR), whose symbols the code
below uses. This backend also takes the optional ``needs`` keyword of the three backward functions
(``accepts_needs``), and skips the results nobody asked for.

This module imports nothing of the package (the backend registry imports it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["accepts_needs", "bn_forward", "bn_backward", "bn_double_backward", "lslr_forward",
           "lslr_backward"]

accepts_needs = True
_HALF = (torch.float16, torch.bfloat16)
_leaky_relu_backward = torch.ops.aten.leaky_relu_backward


# ----------------------------------------------------------------------------------------------
# Per-step batch norm. Per-(task, channel) tensors are kept as (1, T, C, 1) (or (1, 1, C, 1) for a
# shared parameter) so that they broadcast against the (N, T, C, H*W) view of the activations.
# ----------------------------------------------------------------------------------------------
def _acc(dtype):
    return torch.float32 if dtype in _HALF else dtype


def _dims(x, num_tasks):
    n, tc, h, w = x.shape
    return n, num_tasks, tc // num_tasks, h * w


def _act(t, dims, acc):  # (N, T*C, H, W) -> (N, T, C, S) in the accumulation dtype
    return t.reshape(dims).to(acc)


def _chan(p, dims, acc):  # (C,) -> (1, 1, C, 1); (T, C) or (T*C,) stats -> (1, T, C, 1)
    n, t, c, s = dims
    return p.to(acc).reshape(1, t if p.numel() != c else 1, c, 1)


def _to_param(s, p):  # per-(task, channel) sum (1, T, C, 1) -> shape and dtype of parameter p
    if p.dim() == 1:
        s = s.sum(1)
    return s.reshape(p.shape).to(p.dtype)


def _xhat_z(xa, mu, r, gam, bet):
    """xhat = (x - mu) * r and z = gamma * xhat + beta, same order of operations everywhere."""
    xhat = torch.sub(xa, mu).mul_(r)
    return xhat, torch.addcmul(bet, xhat, gam)


def _mean(t):
    return t.mean((0, 3), keepdim=True)


def bn_forward(x, gamma, beta, num_tasks, eps, slope):
    """Forward of the torch backend: returns ``(y, mean, invstd)``; formulas in the docstring of
    `mamlpp_fast.ops.per_step_bn`.

    Shapes: x, y ``(N, T*C, H, W)``; gamma, beta ``(C,)`` or ``(T, C)``; mean, invstd ``(T*C,)``.
    """
    dims = _dims(x, num_tasks)
    acc = _acc(x.dtype)
    xa = _act(x, dims, acc)
    var, mu = torch.var_mean(xa, dim=(0, 3), correction=0, keepdim=True)
    r = var.add_(eps).rsqrt_()
    _, z = _xhat_z(xa, mu, r, _chan(gamma, dims, acc), _chan(beta, dims, acc))
    y = F.leaky_relu(z, slope, inplace=True)
    tc = dims[1] * dims[2]
    return y.to(x.dtype).reshape(x.shape), mu.reshape(tc), r.reshape(tc)


def bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks, slope, *, needs=None):
    """Backward of the torch backend: returns ``(dx, dgamma, dbeta)``; formulas in the docstring of
    `mamlpp_fast.ops.per_step_bn`.

    ``needs`` (optional, this backend only): three booleans (dx, dgamma, dbeta); a result that is not
    needed comes back as None and is not computed.
    """
    need_dx, need_dgamma, need_dbeta = needs if needs is not None else (True, True, True)
    dims = _dims(x, num_tasks)
    acc = _acc(x.dtype)
    mu, r = _chan(mean, dims, acc), _chan(invstd, dims, acc)
    gam = _chan(gamma, dims, acc)
    xhat, z = _xhat_z(_act(x, dims, acc), mu, r, gam, _chan(beta, dims, acc))
    g = _leaky_relu_backward(_act(dy, dims, acc), z, slope, False)
    del z
    dx = dgamma = dbeta = None
    sum_g = g.sum((0, 3), keepdim=True) if (need_dx or need_dbeta) else None
    sum_gx = (g * xhat).sum((0, 3), keepdim=True) if (need_dx or need_dgamma) else None
    if need_dbeta:
        dbeta = _to_param(sum_g, beta)
    if need_dgamma:
        dgamma = _to_param(sum_gx, gamma)
    if need_dx:
        M = dims[0] * dims[3]
        gbar, m = sum_g / M, sum_gx / M
        # dx = gamma * r * (g - gbar - xhat * m), in place in the buffer of g
        dx = g.sub_(gbar).addcmul_(xhat, m, value=-1).mul_(gam * r)
        dx = dx.to(x.dtype).reshape(x.shape)
    return dx, dgamma, dbeta


def bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope, *,
                       needs=None):
    """Double backward of the torch backend: returns ``(gx, ggamma, gdy)``; formulas in the docstring of
    `mamlpp_fast.ops.per_step_bn`.

    ``ggx`` = u, ``gggamma`` = u_gamma, ``ggbeta`` = u_beta are the gradients w.r.t. dx, dgamma and
    dbeta; any of them may be None (= zeros). The gradient w.r.t. beta is identically 0 and is not
    returned. ``needs`` (optional, this backend only): three booleans (gx, ggamma, gdy); a result that
    is not needed comes back as None and is not computed.
    """
    need_gx, need_ggamma, need_gdy = needs if needs is not None else (True, True, True)
    dims = _dims(x, num_tasks)
    acc = _acc(x.dtype)
    M = dims[0] * dims[3]
    mu, r = _chan(mean, dims, acc), _chan(invstd, dims, acc)
    gam = _chan(gamma, dims, acc)
    xhat, z = _xhat_z(_act(x, dims, acc), mu, r, gam, _chan(beta, dims, acc))
    gr = gam * r  # gamma * r
    u = None if ggx is None else _act(ggx, dims, acc)
    u_gamma = None if gggamma is None else _chan(gggamma, dims, acc)
    u_beta = None if ggbeta is None else _chan(ggbeta, dims, acc)
    if u is not None:
        ubar = _mean(u)
        ux = _mean(u * xhat)
    gx = ggamma = gdy = None

    if need_gdy:
        # d(dy) = a * [gamma*r*(u - ubar - xhat*ux) + u_gamma*xhat + u_beta]
        #       = a * [u*(gamma*r) + xhat*coef_xhat + const]
        coef_xhat = const = None
        if u is not None:
            coef_xhat, const = -gr * ux, -gr * ubar
        if u_gamma is not None:
            coef_xhat = u_gamma if coef_xhat is None else coef_xhat + u_gamma
        if u_beta is not None:
            const = u_beta if const is None else const + u_beta
        if u is not None:
            inner = u * gr
            if coef_xhat is not None:
                inner.addcmul_(xhat, coef_xhat)
        elif coef_xhat is not None:
            inner = xhat * coef_xhat
        else:
            inner = torch.zeros_like(xhat)
        if const is not None:
            inner.add_(const)
        gdy = _leaky_relu_backward(inner, z, slope, False)
        del inner
        gdy = gdy.to(dy.dtype).reshape(x.shape)

    if need_gx or need_ggamma:
        g = _leaky_relu_backward(_act(dy, dims, acc), z, slope, False)
        gbar = _mean(g)
        m = _mean(g * xhat)
        # Q / M = ug - ubar*gbar - ux*m   (0 when u is None)
        q = _mean(u * g).sub_(ubar * gbar).sub_(ux * m) if u is not None else None
        if need_ggamma:
            ggamma = _to_param(r * q * M, gamma) if q is not None else torch.zeros_like(gamma)
        if need_gx:
            # P = u*coef_u + g*coef_g, coef_u = -gamma*r*m, coef_g = -gamma*r*ux + u_gamma
            coef_g = None
            if u is not None:
                coef_g = -gr * ux
            if u_gamma is not None:
                coef_g = u_gamma if coef_g is None else coef_g + u_gamma
            if u is None and coef_g is None:  # only u_beta: d(x) is 0
                gx = torch.zeros_like(x)
            else:
                mean_p = torch.zeros_like(gr)       # mean(P)
                mean_px = torch.zeros_like(gr)      # mean(P * xhat)
                if u is not None:
                    coef_u = -gr * m
                    p = u * coef_u
                    mean_p = mean_p + coef_u * ubar
                    mean_px = mean_px + coef_u * ux
                if coef_g is not None:
                    p = g * coef_g if u is None else p.addcmul_(g, coef_g)
                    mean_p = mean_p + coef_g * gbar
                    mean_px = mean_px + coef_g * m
                # d(x) = r * (P - mean(P) - xhat * (mean(P*xhat) + gamma*r*Q/M))
                coef_xhat = mean_px if q is None else mean_px + gr * q
                gx = p.sub_(mean_p).addcmul_(xhat, coef_xhat, value=-1).mul_(r)
                gx = gx.to(x.dtype).reshape(x.shape)
    return gx, ggamma, gdy


# ----------------------------------------------------------------------------------------------
# LSLR
# ----------------------------------------------------------------------------------------------
# Layouts. LSLR is elementwise, so its outputs can take any layout; every backend gives them the layout
# of the gradient (forward) or of the upstream gradient (backward) when that is dense with the task
# dimension outermost: a weight gradient computed in a convolution kernel's weight layout (the Triton
# convolutions: `mamlpp_fast.triton.conv.conv_weight_grad`) then makes fast weights in that layout, and
# the kernels read them without a re-layout copy. The compiled backends index all tensors of one item
# by one flat offset, so they bring the other operands into that layout (a copy only where they differ:
# `mamlpp_fast.triton.lslr.task_major_dense`, csrc/lslr.cpp); here the elementwise ops keep it.
def lslr_forward(thetas, grads, alphas, step):
    """``[theta - alpha[step] * grad for each tensor]``, each ``(T, *shape_l)``, in grad's layout
    where that is not contiguous (a broadcast theta would otherwise give the difference its own; a grad
    that is not dense gives a contiguous result)."""
    lrs = [a[step] for a in alphas]
    prods = torch._foreach_mul(list(grads), lrs)
    outs = [None] * len(prods)
    plain = [l for l, p in enumerate(prods) if p.is_contiguous()]
    for l, o in zip(plain, torch._foreach_sub([thetas[l] for l in plain], [prods[l] for l in plain]) if plain else []):
        outs[l] = o
    for l, p in enumerate(prods):
        if outs[l] is None:
            outs[l] = torch.sub(thetas[l], p, out=torch.empty_like(p))
    return outs


def lslr_backward(douts, grads, alphas, step, shared, *, needs=None):
    """``(dthetas, dgrads, dalphas)`` as in the docstring of `mamlpp_fast.ops.lslr`.

    ``shared[l]``: thetas[l] had no task dimension (dthetas[l] is then summed over tasks).
    ``needs`` (optional, this backend only): three lists of booleans (dtheta, dgrad, dalpha per
    tensor); an entry that is not needed comes back as None and is not computed; ``grads[l]`` may then
    be None where dalpha[l] is not needed. The entries of ``douts`` must not be None.
    """
    n = len(douts)
    need_t, need_g, need_a = needs if needs is not None else ([True] * n,) * 3
    dthetas = [None] * n
    dgrads = [None] * n
    dalphas = [None] * n
    for l in range(n):
        if need_t[l]:
            dthetas[l] = douts[l].sum(0) if shared[l] else douts[l]
    idx = [l for l in range(n) if need_g[l]]
    if idx:
        vals = torch._foreach_mul([douts[l] for l in idx], [alphas[l][step] for l in idx])
        torch._foreach_neg_(vals)
        for l, v in zip(idx, vals):
            dgrads[l] = v
    idx = [l for l in range(n) if need_a[l]]
    if idx:
        # the dalphas are the rows of one zero table with the sums in column `step` (two launches for
        # all tensors besides the products and sums)
        prods = torch._foreach_mul([douts[l] for l in idx], [grads[l] for l in idx])
        sums = torch.stack([p.sum(dtype=torch.float32) if p.dtype in _HALF else p.sum() for p in prods])
        table = alphas[idx[0]].new_zeros((n, max(a.shape[0] for a in alphas)))
        sums = sums.neg_().to(table.dtype)
        if len(idx) == n:
            table[:, step] = sums
        else:  # (no index tensor: a host-to-device copy would break CUDA-graph capture)
            for j, l in enumerate(idx):
                table[l, step] = sums[j]
        for l in idx:
            dalphas[l] = table[l, :alphas[l].shape[0]]
    return dthetas, dgrads, dalphas
