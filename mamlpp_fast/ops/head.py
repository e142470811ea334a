r"""The classifier head and its loss as one op (``head_loss``): a per-task linear layer, log-softmax and the
negative log-likelihood of each example's label, summed over the examples and tasks and scaled, with a
hand-written backward and double backward.

Why: through autograd's generic formulas the head of a second-order meta-update is a batched matmul with
bias, a log-softmax and an NLL loss forward, their backward with its transposes, expands and sums, and
the backward of that backward: ~26 small kernels per inner step, 265 of the 1,053 launches of an Omniglot
20-way 1-shot B=8 meta-update (bench/NOTES.md, "Cut 3c: the linear head and its cross-entropy as one
op"). Here each pass is one kernel per call (mamlpp_fast.triton.head).

Symbols, per task t (dropped below): the features x (n, F) (row i = example i, flattened as the network's
last activation (C', h, w)), the weights W (C, F), the bias b (C), labels y_i in [0, C)::

    z = x W^T + b                       (n, C): the logits
    lse_i = log sum_c exp z_ic,  p = exp(z - lse)   (row-wise softmax)
    L = prev + w * s * sum_{t,i} (lse_i - z_{i y_i})

with s the float `scale` (1/n for the inner loop's sum of per-task means, 1/(T n) for the target set's
mean), w an optional weight (a 0-d tensor: the MSL importance of the step; a constant, no gradient) and
prev an optional 0-d tensor the loss is added to (the MSL sum over steps; its gradient is the upstream
one). Y is the one-hot matrix of the labels.

Backward, given the upstream gradient g of L (a scalar), with sigma = g w s and G = sigma (p - Y) (n, C)::

    dx = G W,   dW = G^T x,   db = sum_i G_i,   d(prev) = g

Double backward. The backward is a function of (g, x, W, b) (p depends on x, W, b through z). Given the
upstream gradients vx, vW, vb of (dx, dW, db), the scalar they define is
S = <vx, G W> + <vW, G^T x> + <vb, 1^T G> = <G, H> with::

    H = vx W^T + x vW^T + 1 vb^T        (n, C)

and its gradients, through G (softmax Jacobian: dp_i = p_i * (dz_i - <p_i, dz_i>)) and directly::

    Gz = sigma (p * H - p * rowsum(p * H))         (the gradient w.r.t. z)
    gx = Gz W + G vW,   gW = Gz^T x + G^T vx,   gb = sum_i Gz_i,   gg = w s <p - Y, H>

(summed over the tasks for gg). The labels are piecewise constants: no gradient. The double backward has
no derivative of its own (a third derivative raises): MAML++ needs second order through the head only.

Implementations are three functions on plain tensors: ``forward(x, W, b, labels, lw, prev, meta) ->
(loss, logits, lse)``, ``backward(g, x, W, logits, lse, labels, lw, meta) -> (dx, dW, db)`` and
``double_backward(vx, vW, vb, g, x, W, logits, lse, labels, lw, meta, need_g) -> (gg, gx, gW, gb)`` with
x (n, T*F) (task-major columns), W (T, C, F), b (T, C), labels (T*n,) task-major, logits (T, n, C),
lse (T, n); meta = (T, scale); an upstream gradient that is None counts as zero. `torch_impl` is the
oracle; mamlpp_fast.triton.head runs each pass as one kernel.
"""
from __future__ import annotations

import types

import torch

__all__ = ["head_loss", "head_supported", "torch_impl"]


# ------------------------------------------------------------------------------------------------------
# the implementation in plain PyTorch (the oracle)
# ------------------------------------------------------------------------------------------------------
def _feats(x, t):
    """(n, T*F) -> the (T, n, F) view."""
    return x.view(x.shape[0], t, -1).transpose(0, 1)


def _rows(xt, n):
    """(T, n, F) -> (n, T*F) contiguous (the layout of x)."""
    return xt.transpose(0, 1).reshape(n, -1)


def _probs(logits, lse, labels):
    """(p, p - Y) of the module docstring, (T, n, C) each."""
    p = torch.exp(logits - lse.unsqueeze(-1))
    d = p.clone()
    d.scatter_add_(-1, labels.view(p.shape[0], p.shape[1], 1), torch.full_like(p[..., :1], -1.0))
    return p, d


def _sigma(g, lw, scale):
    c = scale if lw is None else lw * scale
    return c, g * c


def _forward(x, w, b, labels, lw, prev, meta):
    t, scale = meta
    z = torch.baddbmm(b.unsqueeze(1), _feats(x, t), w.transpose(1, 2))
    lse = torch.logsumexp(z, -1)
    ce = lse - z.gather(-1, labels.view(t, -1, 1)).squeeze(-1)
    loss = ce.sum() * scale
    if lw is not None:
        loss = loss * lw
    if prev is not None:
        loss = loss + prev
    return loss, z, lse


def _backward(g, x, w, logits, lse, labels, lw, meta):
    t, scale = meta
    _, sigma = _sigma(g, lw, scale)
    G = _probs(logits, lse, labels)[1] * sigma
    return _rows(torch.bmm(G, w), x.shape[0]), torch.bmm(G.transpose(1, 2), _feats(x, t)), G.sum(1)


def _double_backward(vx, vw, vb, g, x, w, logits, lse, labels, lw, meta, need_g=True):
    t, scale = meta
    n = x.shape[0]
    if vx is None and vw is None and vb is None:
        return None, None, None, None
    c, sigma = _sigma(g, lw, scale)
    p, d = _probs(logits, lse, labels)
    feats = _feats(x, t)
    H = torch.zeros_like(p)
    if vx is not None:
        vxf = _feats(vx, t)
        H = H + torch.bmm(vxf, w.transpose(1, 2))
    if vw is not None:
        H = H + torch.bmm(feats, vw.transpose(1, 2))
    if vb is not None:
        H = H + vb.unsqueeze(1)
    ph = p * H
    gz = sigma * (ph - p * ph.sum(-1, keepdim=True))
    G = sigma * d
    gx = torch.bmm(gz, w)
    gw = torch.bmm(gz.transpose(1, 2), feats)
    if vw is not None:
        gx = gx + torch.bmm(G, vw)
    if vx is not None:
        gw = gw + torch.bmm(G.transpose(1, 2), vxf)
    gg = (d * H).sum() * c if need_g else None
    return gg, _rows(gx, n), gw, gz.sum(1)


torch_impl = types.SimpleNamespace(name="torch", forward=_forward, backward=_backward,
                                   double_backward=_double_backward)


# ------------------------------------------------------------------------------------------------------
# autograd: the forward's backward is _HeadBackward, whose backward is the double backward
# ------------------------------------------------------------------------------------------------------
class _HeadForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, labels, lw, prev, meta, impl):
        loss, logits, lse = impl.forward(x, w, b, labels, lw, prev, meta)
        ctx.save_for_backward(x, w, b, logits, lse, labels, lw)
        ctx.meta, ctx.impl, ctx.has_prev = meta, impl, prev is not None
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)
        return loss, logits

    @staticmethod
    def backward(ctx, g, _glogits):
        if g is None:
            return (None,) * 8
        x, w, b, logits, lse, labels, lw = ctx.saved_tensors
        dx, dw, db = _HeadBackward.apply(g, x, w, b, logits, lse, labels, lw, ctx.meta, ctx.impl)
        return dx, dw, db, None, None, (g if ctx.has_prev else None), None, None


class _HeadBackward(torch.autograd.Function):
    """(dx, dW, db) as a function of (g, x, W, b); b enters through the saved logits, which the
    double backward differentiates as the function of x, W and b they are."""

    @staticmethod
    def forward(ctx, g, x, w, b, logits, lse, labels, lw, meta, impl):
        ctx.save_for_backward(g, x, w, logits, lse, labels, lw)
        ctx.meta, ctx.impl = meta, impl
        ctx.set_materialize_grads(False)
        return impl.backward(g, x, w, logits, lse, labels, lw, meta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, vx, vw, vb):
        g, x, w, logits, lse, labels, lw = ctx.saved_tensors
        gg, gx, gw, gb = ctx.impl.double_backward(
            None if vx is None else vx.contiguous(), None if vw is None else vw.contiguous(),
            None if vb is None else vb.contiguous(), g, x, w, logits, lse, labels, lw, ctx.meta,
            need_g=ctx.needs_input_grad[0])
        return gg, gx, gw, gb, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------------------
MAX_TILE = 4096  # n_pow2 * C_pow2 (the Triton kernels hold a task's (n, C) matrices in one tile)


def _pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def head_supported(n: int, classes: int) -> str | None:
    """None when the Triton kernels of `head_loss` take a call with n examples per task and `classes`
    classes, else why not (the learner then runs the unfused ops)."""
    if _pow2(n) * _pow2(classes) > MAX_TILE:
        return (f"{n} examples x {classes} classes per task exceed one tile of the kernels "
                f"(next powers of two: product <= {MAX_TILE})")
    return None


def head_loss(x, weight, bias, labels, num_tasks, scale, loss_weight=None, prev=None, impl=None):
    r"""``prev + loss_weight * scale * sum of the cross-entropies`` of a per-task linear head, as one op.

    Description:
        For every task t: logits z_t = x_t W_t^T + b_t of its n examples, and the sum of their
        cross-entropies with the labels (log-sum-exp minus the label's logit). Hand-written backward and
        double backward (module docstring); with the default scale 1 and no weight this is
        ``F.cross_entropy(z, labels, reduction="sum")`` over all tasks' examples.

    Arguments:
        x: ``(n, T*F)`` or ``(n, T*C', h, w)`` with F = C' h w: row i holds example i of every task, task
            t in columns t*F..(t+1)*F (the fast learner's task-major layout).
        weight: ``(T, C, F)``; bias: ``(T, C)``; same dtype (float32 or float64) and device as x.
        labels: ``(T*n,)`` or ``(T, n)`` integer, task-major (labels[t*n + i] is example i of task t), in
            [0, C) (checked here for CPU tensors; on a device an out-of-range label makes the loss NaN).
        num_tasks: T. scale: a float (e.g. 1/n: the sum of per-task means).
        loss_weight: optional 0-d floating-point tensor multiplying the loss, read in x's dtype (no
            gradient: it must not require one).
        prev: optional 0-d tensor added to the loss (its gradient is the loss's).
        impl: `torch_impl` (default) or mamlpp_fast.triton.head.

    Returns:
        ``(loss, logits)``: loss 0-d; logits ``(T, n, C)`` (not differentiable).
    """
    t = int(num_tasks)
    if x.dim() < 2:
        raise ValueError(f"head_loss: x must be (n, T*F) or (n, T*C, h, w), got shape {tuple(x.shape)}")
    if weight.dim() != 3 or bias.dim() != 2 or weight.shape[0] != t or tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(f"head_loss: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be "
                         f"(T, C, F) and (T, C) with T = num_tasks = {t}")
    n, (_, c, f) = x.shape[0], weight.shape
    if x[0].numel() != t * f:
        raise ValueError(f"head_loss: x has {x[0].numel()} features per row, expected T*F = {t}*{f}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"head_loss: float32 or float64 only, got {x.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p.dtype != x.dtype or p.device != x.device:
            raise ValueError(f"head_loss: {name} ({p.dtype}, {p.device}) must match x ({x.dtype}, {x.device})")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.numel() != t * n:
        raise ValueError(f"head_loss: labels must be {t * n} integers (T*n), got {labels.numel()} {labels.dtype}")
    if labels.device != x.device:
        raise ValueError(f"head_loss: labels are on {labels.device}, x on {x.device}")
    labels = labels.reshape(-1).to(torch.int64)
    if labels.device.type == "cpu" and labels.numel():
        lab = labels.numpy()  # host memory: checked there (no tensor op: nothing a device would launch)
        if lab.min() < 0 or lab.max() >= c:
            raise ValueError(f"head_loss: labels outside [0, {c}): min {lab.min()}, max {lab.max()}")
    if prev is not None and (prev.dim() != 0 or prev.dtype != x.dtype or prev.device != x.device):
        raise ValueError(f"head_loss: prev must be a 0-d {x.dtype} tensor on {x.device}")
    if loss_weight is not None and (loss_weight.dim() != 0 or not loss_weight.dtype.is_floating_point
                                    or loss_weight.device != x.device):
        raise ValueError(f"head_loss: loss_weight must be a 0-d floating-point tensor on {x.device}")
    if loss_weight is not None and loss_weight.requires_grad:
        raise ValueError("head_loss: loss_weight is a constant of the loss (no gradient); detach it")
    if loss_weight is not None:
        loss_weight = loss_weight.to(x.dtype)  # no copy when it is x's dtype already
    meta = (t, float(scale))
    # a task's (C, F) rows and (C,) bias contiguous: the kernels take any task stride (step 0's fast
    # weights are the meta-parameters expanded over the tasks, stride 0: read in place, not copied)
    if weight.stride(2) != 1 or weight.stride(1) != f:
        weight = weight.contiguous()
    if bias.stride(1) != 1:
        bias = bias.contiguous()
    return _HeadForward.apply(x.reshape(n, t * f).contiguous(), weight, bias, labels, loss_weight, prev, meta,
                              impl if impl is not None else torch_impl)
