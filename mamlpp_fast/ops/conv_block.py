r"""The first block of the network as one op: per-task convolution, per-step batch norm with leaky ReLU
and 2x2 max pooling (``conv_bn_pool``), keeping only the pooled output.

Why: the first layer has 1 (Omniglot) or 3 (mini-ImageNet) input channels, so its convolution is
cheap (K = 9 or 27 products per output), yet its output is the largest activation of the network
(64 channels at full resolution). Written, normalised, activated, pooled, kept for the backward and
re-read by every backward and double-backward term, it moved ~58% of the bytes of an Omniglot
meta-update (bench/NOTES.md, "Trace"). This op recomputes the convolution from the image wherever it
needs it and never writes the full-resolution activation: its passes read the image (small) and
pooled-size tensors only.

Symbols. Layout as everywhere in the fast learner: the image ``x`` is ``(n, T*Ci, H, W)`` (task-major
channels), ``w`` is ``(T, C, Ci, kh, kw)``, ``bias`` ``(T, C)`` or None, ``gamma``/``beta`` ``(C,)``
(shared by the tasks) or ``(T, C)``. For one (task t, channel c) column of ``M = n*Ho*Wo`` convolution
outputs ``j``, let ``P_j`` be the patch of the zero-padded image under output ``j`` (``K = Ci*kh*kw``
values) and ``P'_j = (P_j, 1)``, ``w' = (w[t, c], bias[t, c])``::

    z_j      = sum_k w'_k P'_jk                                        (the convolution)
    y_j      = leaky_relu(gamma * (z_j - mean(z)) * r + beta),  r = 1/sqrt(var(z) + eps)
    out[v]   = max_{j in window v} y_j,   j*(v) = the position of that max

(``mamlpp_fast.ops.per_step_bn`` for the batch norm's symbols; windows are 2x2 with stride 2, Ho and
Wo even so that every output lies in exactly one window; ties go to the first position in row-major
order, as ``max_pool2d``).

Backward, given ``gout`` (the gradient w.r.t. ``out``)::

    dy_j     = gout[v(j)] if j = j*(v(j)) else 0                      (the pooling's backward)
    (dz, dgamma, dbeta) = the batch norm's backward of dy             (per_step_bn's formulas)
    dw'_k    = sum_j dz_j P'_jk           i.e. dw = Wg(x, dz), dbias = sum_j dz_j

With an output alias (``alias=True``: out and out' = out, the alias read by the next convolution's
backward node) the backward receives gout and gout' and is the above for ``gout + gout'``, the sum
formed where the kernels load gout (``gout2`` of the implementations' backward; the recorded backward
of an inner step receives one: `mamlpp_fast.ops.fanout.two_gradients`).

Double backward. The backward is linear in ``gout``. Given the upstream gradients ``U'`` (of dw', i.e.
``(U, U_bias)``), ``u_gamma`` and ``u_beta``, differentiate ``F = <U', dw'> + u_gamma dgamma +
u_beta dbeta``. Because ``<U', dw'> = sum_j dz_j u_j`` with ``u_j = sum_k U'_k P'_jk`` (the convolution
of the image with ``U``, ``U_bias`` as its bias), F is exactly the scalar that the batch norm's double
backward differentiates with ``ggx = u``; with its results ``(gz, ggamma, gdy)``::

    d(gout)[v] = gdy_{j*(v)}              (dy is gout scattered to the maxima: linear, so its adjoint
                                           is the gather)
    d(w')_k    = sum_j gz_j P'_jk         (z depends on w' through the convolution: Wg(x, gz), and
                                           sum_j gz_j for the bias)
    d(gamma)   = ggamma,   d(beta) = 0

The leaky-ReLU mask and the positions of the maxima are piecewise constant: their derivatives are 0
almost everywhere. The image is a constant (the network's input): the op gives no gradient w.r.t. x
and refuses an x that requires one.

This module holds the autograd (`conv_bn_pool`) and the implementation in plain PyTorch (`torch_impl`:
it recomputes the convolution output in full, so it saves memory but not work; it is the oracle of
the Triton kernels, mamlpp_fast.triton.conv_block, which never write it). An implementation is three
functions on plain tensors and one optional: ``forward(x, w, bias, gamma, beta, meta, stats=None) -> (out,
mean, invstd, aux)``,
``backward(gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, gout2=None, stats=None) -> (dw, dbias,
dgamma, dbeta)``,
``double_backward(uw, ubias, ugamma, ubeta, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta,
stats=None) -> (dgout, dw, dbias, dgamma)``, and ``image_stats(x, w_shape, meta) -> stats``; ``aux`` is what the
implementation keeps from its forward for its backward passes: None, a tensor, or a tuple of tensors
and Nones (the Triton kernels: the position of each window's maximum and the convolution output there);
``stats`` the terms of its derivatives that depend on the image alone (None, a tensor or a
tuple; the Triton kernels: the Gram matrix of the image's patches, from which their forward forms the
batch-norm statistics and their backward and double backward the weight gradients and column sums,
without the convolution output), formed once per image set where the caller passes an
``image_cache``, and by each of them when given None; ``meta`` is ``(T, stride, padding, eps,
slope)``.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from . import torch_backend as tb
from .fanout import saved_alias, two_gradients

__all__ = ["conv_bn_pool", "block_supported", "torch_impl"]


# ------------------------------------------------------------------------------------------------------
# the implementation in plain PyTorch (plain tensors in and out, no autograd)
# ------------------------------------------------------------------------------------------------------
def _conv(x, w, bias, meta):
    t, stride, pad = meta[0], meta[1], meta[2]
    c, ci, kh, kw = w.shape[1:]
    return F.conv2d(x, w.reshape(t * c, ci, kh, kw), None if bias is None else bias.reshape(-1),
                    stride, pad, groups=t)


def _recompute(x, w, bias, gamma, beta, mean, invstd, meta):
    """z (the convolution output) and the pooled maxima's positions, from the saved statistics: y in
    the batch norm's own order of operations (torch_backend._xhat_z), so the positions are the
    forward's."""
    t, slope = meta[0], meta[4]
    z = _conv(x, w, bias, meta)
    dims = tb._dims(z, t)
    acc = tb._acc(z.dtype)
    _, zz = tb._xhat_z(tb._act(z, dims, acc), tb._chan(mean, dims, acc), tb._chan(invstd, dims, acc),
                       tb._chan(gamma, dims, acc), tb._chan(beta, dims, acc))
    y = F.leaky_relu(zz, slope).to(z.dtype).reshape(z.shape)
    _, idx = F.max_pool2d(y, 2, 2, return_indices=True)
    return z, y, idx


def _wgrad(x, gz, w_shape, meta):
    t = meta[0]
    c, ci, kh, kw = w_shape[1:]
    dw = conv2d_weight(x, (t * c, ci, kh, kw), gz, meta[1], meta[2], groups=t).reshape(w_shape)
    return dw, gz.reshape(gz.shape[0], t, c, -1).sum((0, 3))


def _forward(x, w, bias, gamma, beta, meta, stats=None):
    """(out, mean, invstd, aux): this implementation keeps nothing beside the statistics (aux None);
    stats: unused (`_no_image_stats`)."""
    t, _, _, eps, slope = meta
    y, mean, invstd = tb.bn_forward(_conv(x, w, bias, meta), gamma, beta, t, eps, slope)
    return F.max_pool2d(y, 2, 2), mean, invstd, None


def _backward(gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, gout2=None, stats=None):
    """(dw, dbias or None, dgamma, dbeta); gout2: a second gradient of the output, added to gout; stats:
    unused (this implementation keeps no image terms: `_no_image_stats`)."""
    t, slope = meta[0], meta[4]
    if gout2 is not None:
        gout = gout + gout2
    z, y, idx = _recompute(x, w, bias, gamma, beta, mean, invstd, meta)
    dy = torch.ops.aten.max_pool2d_with_indices_backward(gout, y, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    dz, dgamma, dbeta = tb.bn_backward(dy, z, gamma, beta, mean, invstd, t, slope)
    dw, dbias = _wgrad(x, dz, w.shape, meta)
    return dw, (dbias if bias is not None else None), dgamma, dbeta


def _double_backward(uw, ubias, ugamma, ubeta, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, stats=None):
    """(d gout, d w, d bias or None, d gamma); uw, ubias, ugamma, ubeta may be None (= zeros); stats:
    unused (`_no_image_stats`)."""
    t, slope = meta[0], meta[4]
    z, y, idx = _recompute(x, w, bias, gamma, beta, mean, invstd, meta)
    dy = torch.ops.aten.max_pool2d_with_indices_backward(gout, y, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    u = None
    if uw is not None or ubias is not None:
        u = _conv(x, uw if uw is not None else torch.zeros_like(w), ubias, meta)
    gz, ggamma, gdy = tb.bn_double_backward(u, ugamma, ubeta, dy, z, gamma, beta, mean, invstd, t, slope)
    dgout = gdy.flatten(2).gather(2, idx.flatten(2)).view_as(gout)
    dw, dbias = _wgrad(x, gz, w.shape, meta)
    return dgout, dw, (dbias if bias is not None else None), ggamma


def _no_image_stats(x, w_shape, meta):
    """None: this implementation's backward recomputes the convolution and needs no image terms."""
    return None


torch_impl = types.SimpleNamespace(name="torch", forward=_forward, backward=_backward,
                                   double_backward=_double_backward, image_stats=_no_image_stats)


# ------------------------------------------------------------------------------------------------------
# autograd: the forward's backward is _BlockBackward, whose backward is the double backward
# ------------------------------------------------------------------------------------------------------
def _save(ctx, tensors, *groups):
    """save_for_backward of `tensors` and of each group: the implementation's aux or image terms (None, a
    tensor or a tuple of them)."""
    sizes = [len(a) if isinstance(a, tuple) else None for a in groups]
    ctx.n_saved, ctx.group_sizes = len(tensors), sizes
    ctx.save_for_backward(*tensors, *(x for a, n in zip(groups, sizes) for x in (a if n is not None else (a,))))


def _saved(ctx) -> tuple:
    """`_save`'s tensors, then each group as it was given."""
    t, n = ctx.saved_tensors, ctx.n_saved
    out, i = list(t[:n]), n
    for size in ctx.group_sizes:
        out.append(tuple(t[i:i + size]) if size is not None else t[i])
        i += size if size is not None else 1
    return tuple(out)


class _BlockForward(torch.autograd.Function):
    """out = conv_bn_pool(x); also returns an alias of out (the op's ``alias``) whose gradient reaches this
    node's backward as a second argument rather than being added to out's by autograd."""

    @staticmethod
    def forward(ctx, x, w, bias, gamma, beta, meta, impl, saved=None, stats=None):
        out, mean, invstd, aux = impl.forward(x, w, bias, gamma, beta, meta, stats=stats)
        # the backward node reads the aliases in `saved` (w, bias, gamma; `conv_bn_pool`) when given, so
        # that their gradients from the double backward are summed by the caller's fan-out nodes
        if saved is not None:
            w, bias, gamma = saved
        _save(ctx, (x, w, bias, gamma, beta, mean, invstd), aux, stats)
        ctx.meta, ctx.impl = meta, impl
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (absent) gradients
        return out, mean, invstd, out.view_as(out)

    @staticmethod
    def backward(ctx, gout, _gmean, _ginvstd, gout2):
        gout, gout2 = two_gradients(gout, gout2)
        if gout is None:
            return (None,) * 9
        x, w, bias, gamma, beta, mean, invstd, aux, stats = _saved(ctx)
        dw, dbias, dgamma, dbeta = _BlockBackward.apply(gout, x, w, bias, gamma, beta, mean, invstd, aux,
                                                        ctx.meta, ctx.impl, gout2, stats)
        return None, dw, dbias, dgamma, dbeta, None, None, None, None


class _BlockBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, impl, gout2=None, stats=None):
        # gout2 (the output alias's gradient) is only given where this node is not recorded
        # (`two_gradients`): the double backward below reads gout alone
        _save(ctx, (gout, x, w, bias, gamma, beta, mean, invstd), aux, stats)
        ctx.meta, ctx.impl = meta, impl
        ctx.set_materialize_grads(False)
        return impl.backward(gout.contiguous(), x, w, bias, gamma, beta, mean, invstd, aux, meta,
                             gout2=None if gout2 is None else gout2.contiguous(), stats=stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, uw, ubias, ugamma, ubeta):
        gout, x, w, bias, gamma, beta, mean, invstd, aux, stats = _saved(ctx)
        if uw is None and ubias is None and ugamma is None and ubeta is None:
            return (None,) * 13
        dgout, dw, dbias, dgamma = ctx.impl.double_backward(
            uw, ubias, ugamma, ubeta, gout.contiguous(), x, w, bias, gamma, beta, mean, invstd, aux, ctx.meta,
            stats=stats)
        return dgout, None, dw, dbias, dgamma, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------------------
def block_supported(x, w, stride, padding, max_pooling=True) -> str | None:
    """None when `conv_bn_pool` takes this layer, else the reason it does not (the caller runs the
    unfused ops instead)."""
    if not max_pooling:
        return "the network does not max-pool"
    if x.requires_grad:
        return "the input requires a gradient (the fused block treats it as a constant)"
    kh, kw = w.shape[-2:]
    ho = (x.shape[2] + 2 * padding - kh) // stride + 1
    wo = (x.shape[3] + 2 * padding - kw) // stride + 1
    if ho % 2 or wo % 2 or ho < 2 or wo < 2:
        return f"the convolution output {ho}x{wo} is not of even size (2x2 windows must cover it)"
    return None


def _image_stats(impl, x, xc, w_shape, meta, cache):
    """impl.image_stats of x (None for an implementation without it; xc: x contiguous, what the
    implementation reads), from `cache` when it holds them for this x (the same tensor), weight shape and
    geometry, else formed and, with a cache, kept there."""
    fn = getattr(impl, "image_stats", None)
    if fn is None:
        return None
    key = (impl.name, tuple(w_shape), meta[:3], x.dtype, x.device)
    if cache is not None and cache.get("x") is x and key in cache:
        return cache[key]
    stats = fn(xc, tuple(w_shape), meta)
    if cache is not None:
        if cache.get("x") is not x:
            cache.clear()
            cache["x"] = x
        cache[key] = stats
    return stats


def conv_bn_pool(x, w, bias, gamma, beta, num_tasks, stride, padding, eps, slope, impl=None, w_saved=None,
                 bias_saved=None, gamma_saved=None, alias=False, image_cache=None):
    r"""``max_pool2d(per_step_batch_norm(task_conv2d(x, w, bias), gamma, beta), 2, 2)`` as one op.

    Description:
        The same function as the three ops in a row (module docstring for the formulas), with
        hand-written backward and double backward that recompute the convolution output from the
        image instead of keeping it. ``x`` must not require a gradient (`block_supported`).

    Arguments:
        x: ``(n, T*Ci, H, W)``. w: ``(T, C, Ci, kh, kw)``. bias: ``(T, C)`` or None.
        gamma, beta: ``(C,)`` or ``(T, C)`` each. num_tasks: T. stride, padding: ints.
        eps, slope: the batch norm's epsilon and the leaky ReLU's negative slope (>= 0).
        impl: the implementation (`torch_impl`, or mamlpp_fast.triton.conv_block's); default `torch_impl`.
        w_saved, bias_saved, gamma_saved: aliases of w, bias, gamma (`mamlpp_fast.ops.fanout`) that the
        backward reads, so that the gradients the double backward returns for them go to the aliases;
        None: the tensor itself.
        alias: also return an alias of out, for the op whose backward reads out again (`task_conv2d`'s
        ``input_saved``): its gradient reaches this op's backward as a second argument, and the
        backward kernels add the two where they load the gradient (`mamlpp_fast.ops.fanout`).
        image_cache: a dict the caller keeps for one image set (e.g. the target images of one
        meta-update) and passes to every call on it: the terms the implementation reads that depend on
        the image alone (its ``image_stats``: the Triton kernels' Gram matrix of the patches) are formed
        by the first call and reused by the others on the same x (the same tensor object, weight shape,
        stride and padding); None: formed per call.

    Returns:
        ``(out, mean, invstd)``: out ``(n, T*C, Ho/2, Wo/2)``; mean and invstd ``(T*C,)`` of the
        convolution output (as per_step_batch_norm returns them), not differentiable;
        ``(out, mean, invstd, out_alias)`` with ``alias=True``.
    """
    why = block_supported(x, w, stride, padding)
    if why is not None:
        raise ValueError(f"conv_bn_pool: {why}")
    if slope < 0:
        raise ValueError(f"conv_bn_pool: the leaky ReLU's slope must be >= 0 (monotone: pooling commutes "
                         f"with it), got {slope}")
    t = int(num_tasks)
    if w.dim() != 5 or w.shape[0] != t or x.shape[1] != t * w.shape[2]:
        raise ValueError(f"conv_bn_pool: weight {tuple(w.shape)} does not fit x {tuple(x.shape)} with "
                         f"num_tasks={t}")
    c = w.shape[1]
    if bias is not None and tuple(bias.shape) != (t, c):
        raise ValueError(f"conv_bn_pool: bias has shape {tuple(bias.shape)}, expected (T, C) = ({t}, {c})")
    for name, p in (("gamma", gamma), ("beta", beta)):
        if tuple(p.shape) not in ((c,), (t, c)):
            raise ValueError(f"conv_bn_pool: {name} has shape {tuple(p.shape)}, expected ({c},) or ({t}, {c})")
    for name, p in (("w", w), ("bias", bias), ("gamma", gamma), ("beta", beta)):
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            raise ValueError(f"conv_bn_pool: {name} ({p.dtype}, {p.device}) must match x ({x.dtype}, {x.device})")
    saved = None
    if not (w_saved is None and bias_saved is None and gamma_saved is None):
        saved = [saved_alias("conv_bn_pool", name, p, a)
                 for name, p, a in (("w", w, w_saved), ("bias", bias, bias_saved), ("gamma", gamma, gamma_saved))]
        if saved[2].shape != beta.shape and saved[2].dim() == 1:
            saved[2] = saved[2].expand(t, -1)
        saved = tuple(saved)
    if gamma.shape != beta.shape:
        gamma, beta = (p.expand(t, -1) if p.dim() == 1 else p for p in (gamma, beta))
    meta = (t, int(stride), int(padding), float(eps), float(slope))
    impl = impl if impl is not None else torch_impl
    xc = x.contiguous()  # one copy at most, read by the image terms and the op
    stats = _image_stats(impl, x, xc, w.shape, meta, image_cache)
    out, mean, invstd, out_alias = _BlockForward.apply(xc, w, bias, gamma, beta, meta, impl, saved,
                                                       stats)
    return (out, mean, invstd, out_alias) if alias else (out, mean, invstd)
