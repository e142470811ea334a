r"""LSLR inner-loop update for all adapted tensors at once (one autograd node per inner step).

Symbols (for tensor l; ``alpha = alphas[l]`` is its learning-rate vector ``(S+1,)``, ``k = step``)::

    out   = theta - alpha[k] * grad                 (theta broadcast over the tasks when shared)

Backward (given ``dout``; first order only, the outer backward is never differentiated)::

    dtheta   = dout                 per-task theta (T, *shape)
             = sum_t dout[t]        shared theta (*shape), broadcast over the T tasks
    dgrad    = -alpha[k] * dout
    dalpha   = 0 except dalpha[k] = -sum(dout * grad)

The torch backend rounds like the plain formula ``theta - alpha[k] * grad`` (product, then
difference), so it matches the reference learner bit for bit.
"""
from __future__ import annotations

import torch

from . import library
from .backend import backend_key, get_backend
from .torch_backend import lslr_backward, lslr_forward  # noqa: F401 (re-exported)

__all__ = ["lslr_update", "lslr_forward", "lslr_backward"]


def _check_args(thetas, grads, alphas, step):
    """The one validation of the op's input (the backends rely on it: BackendFunctions)."""
    op = "lslr_update"
    for name, seq in (("thetas", thetas), ("grads", grads), ("alphas", alphas)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(seq).__name__}")
        for l, t in enumerate(seq):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{l}] must be a torch.Tensor, got {type(t).__name__}")
    if not (len(thetas) == len(grads) == len(alphas)):
        raise ValueError(f"{op}: thetas, grads and alphas must have the same length, got "
                         f"{len(thetas)}, {len(grads)} and {len(alphas)}")
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{op}: step must be an int, got {step!r}")
    shared = []
    num_tasks = None
    for l, (theta, grad, alpha) in enumerate(zip(thetas, grads, alphas)):
        if alpha.dim() != 1:
            raise ValueError(f"{op}: alphas[{l}] must be a vector (S+1,), got shape {tuple(alpha.shape)}")
        if not 0 <= step < alpha.shape[0]:
            raise ValueError(f"{op}: step = {step} is out of range for alphas[{l}] with "
                             f"{alpha.shape[0]} entries")
        if grad.dim() < 1:
            raise ValueError(f"{op}: grads[{l}] must have a leading task dimension, got a 0-d tensor")
        if num_tasks is None:
            num_tasks = grad.shape[0]
        elif grad.shape[0] != num_tasks:
            raise ValueError(f"{op}: grads[{l}] has {grad.shape[0]} tasks (dim 0) but grads[0] has {num_tasks}")
        if theta.shape == grad.shape:
            shared.append(False)
        elif theta.shape == grad.shape[1:]:
            shared.append(True)
        else:
            raise ValueError(f"{op}: thetas[{l}] must have shape {tuple(grad.shape)} (per task) or "
                             f"{tuple(grad.shape[1:])} (shared), as grads[{l}] is {tuple(grad.shape)}; "
                             f"got {tuple(theta.shape)}")
        if not theta.is_floating_point() or theta.dtype != grad.dtype or theta.dtype != alpha.dtype:
            raise ValueError(f"{op}: dtype mismatch at index {l}: thetas[{l}] {theta.dtype}, grads[{l}] "
                             f"{grad.dtype}, alphas[{l}] {alpha.dtype} (must be one floating dtype)")
        if theta.device != grad.device or theta.device != alpha.device:
            raise ValueError(f"{op}: device mismatch at index {l}: thetas[{l}] on {theta.device}, "
                             f"grads[{l}] on {grad.device}, alphas[{l}] on {alpha.device}")
    return step, tuple(shared)


class _StackedRates(torch.autograd.Function):
    """`lslr_update` with the learning rates as the rows of one ``(L, S+1)`` tensor. The forward is the
    registered op on the table's rows; the backward returns the registered backward's dalpha table as
    the gradient of the whole table. Why: autograd adds the gradients of each input tensor over its
    uses, so with L separate rate vectors an inner loop of S steps costs L (S - 1) additions of
    (S+1)-element vectors (40 launches for Omniglot's 10 tensors over 5 steps); one table costs S - 1.
    First order, as the registered op's derivative (the outer backward is never differentiated)."""

    @staticmethod
    def forward(ctx, table, step, key, n, *tensors):
        thetas, grads = list(tensors[:n]), list(tensors[n:])
        ctx.save_for_backward(table, *grads)
        ctx.step, ctx.key, ctx.n = step, key, n
        ctx.shared = [t.dim() != g.dim() for t, g in zip(thetas, grads)]
        ctx.set_materialize_grads(False)
        return tuple(library.lslr_forward(thetas, grads, list(table.unbind(0)), step, key))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *douts):
        n = ctx.n
        table, *grads = ctx.saved_tensors
        need_a = bool(ctx.needs_input_grad[0])
        need_t = [bool(v) for v in ctx.needs_input_grad[4:4 + n]]
        need_g = [bool(v) for v in ctx.needs_input_grad[4 + n:]]
        dthetas, dgrads, dtable, rows = library.lslr_gradients(
            list(douts), grads, list(table.unbind(0)), ctx.step, ctx.shared, need_t, need_g, [need_a] * n, ctx.key)
        if dtable is not None and [l for _, l in rows] == list(range(n)) and [j for j, _ in rows] == list(range(n)):
            dtable = dtable[:, :table.shape[1]]  # every row, in order: the op's table itself
        elif dtable is not None:  # some tensor got no gradient: its row is zero
            full = table.new_zeros(table.shape)
            for j, l in rows:
                full[l] = dtable[j, :table.shape[1]]
            dtable = full
        return (dtable, None, None, None, *dthetas, *dgrads)


def lslr_update(thetas, grads, alphas, step, backend=None):
    r"""One LSLR inner step for a list of tensors: ``out[l] = thetas[l] - alphas[l][step] * grads[l]``.

    Description:
        Updates all adapted tensors of all tasks in one autograd node (the registered op
        ``torch.ops.mamlpp.lslr_forward``). The backward, ``torch.ops.mamlpp.lslr_backward``, is first
        order (it has no derivative of its own); gradients are computed only for the inputs that require them (e.g.
        first-order MAML passes detached ``grads``).

    Arguments:
        thetas: list of ``(T, *shape_l)`` per-task fast weights, or ``shape_l`` (a shared
            meta-parameter, broadcast over the tasks).
        grads: list of ``(T, *shape_l)``.
        alphas: list of ``(S+1,)`` learning-rate vectors, or one ``(L, S+1)`` tensor whose rows they are
            (its gradient is then one table per step instead of L vectors: fewer additions when the
            steps' gradients are accumulated; `_StackedRates`).
        step: int in ``[0, S]``.
        backend: as for `per_step_batch_norm`.

    Returns:
        list of ``(T, *shape_l)`` tensors.

    Example:
        >>> w = torch.ones(2, 3)
        >>> out = lslr_update([w], [torch.ones(4, 2, 3)], [torch.full((6,), 0.1)], step=0)
        >>> out[0].shape
        torch.Size([4, 2, 3])
    """
    stacked = isinstance(alphas, torch.Tensor)
    if stacked and alphas.dim() != 2:
        raise ValueError(f"lslr_update: alphas as one tensor must be (L, S+1), got shape {tuple(alphas.shape)}")
    step, _shared = _check_args(thetas, grads, list(alphas.unbind(0)) if stacked else alphas, step)
    if not thetas:
        return []
    impl = get_backend(backend, thetas[0].device)
    impl.check_dtype("lslr_update", "thetas[0]", thetas[0].dtype)
    if stacked:
        return list(_StackedRates.apply(alphas, step, backend_key(impl), len(thetas), *thetas, *grads))
    # the registered op mamlpp::lslr_forward, whose registered derivative is mamlpp::lslr_backward
    # (mamlpp_fast.ops.library)
    return list(library.lslr_forward(list(thetas), list(grads), list(alphas), step, backend_key(impl)))
