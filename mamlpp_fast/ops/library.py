"""The backend functions registered with PyTorch's dispatcher: ``torch.ops.mamlpp.*``.

Each of the five functions of `mamlpp_fast.ops.backend.BackendFunctions` is a `torch.library.custom_op`
in the namespace ``mamlpp``, with one more argument, ``backend`` (a backend name: "torch", "native",
"triton", "auto", ...; resolved by `get_backend` for the device of the tensors), a fake (meta)
implementation that gives the shapes and dtypes of the results without computing them (for
torch.compile, torch.export and FakeTensor tracing), and registered derivatives that form the chain
of the batch-norm op explicitly::

    mamlpp::bn_forward --(backward)--> mamlpp::bn_backward --(backward)--> mamlpp::bn_double_backward
    mamlpp::lslr_forward --(backward)--> mamlpp::lslr_backward

``bn_double_backward`` and ``lslr_backward`` have no derivative (the MAML++ meta-gradient needs second
order through batch norm and first order through the LSLR step only). Results never alias inputs
(the dispatcher's rule): a backend result that is an input (``lslr_backward``'s per-task dthetas[l] is
douts[l] on some backends) is copied.

The public ops `per_step_batch_norm` and `lslr_update` (with input validation, and the `needs`
extension that skips unneeded results) remain the learner's entry points; these registered ops are
the same computation for dispatcher-level use, checked by ``torch.library.opcheck`` in
tests/test_library.py.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .backend import get_backend

__all__ = ["bn_forward", "bn_backward", "bn_double_backward", "lslr_forward", "lslr_backward"]

_HALF = (torch.float16, torch.bfloat16)


def _fresh(out: Tensor, inputs) -> Tensor:
    """`out`, or a copy of it when it shares memory with one of `inputs`."""
    ptr = out.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs):
        return out.clone()
    return out


def _zeros_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


# ---- per-step batch norm -----------------------------------------------------------------------------
@torch.library.custom_op("mamlpp::bn_forward", mutates_args=())
def bn_forward(x: Tensor, gamma: Tensor, beta: Tensor, num_tasks: int, eps: float, slope: float,
               backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    impl = get_backend(backend, x.device)
    y, mean, invstd = impl.bn_forward(x, gamma, beta, num_tasks, eps, slope)
    return tuple(_fresh(o, (x, gamma, beta)) for o in (y, mean, invstd))


@bn_forward.register_fake
def _(x, gamma, beta, num_tasks, eps, slope, backend):
    stat = torch.float32 if x.dtype in _HALF else x.dtype
    return torch.empty_like(x), x.new_empty((x.shape[1],), dtype=stat), x.new_empty((x.shape[1],), dtype=stat)


@torch.library.custom_op("mamlpp::bn_backward", mutates_args=())
def bn_backward(dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                num_tasks: int, slope: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    impl = get_backend(backend, x.device)
    outs = impl.bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks, slope)
    return tuple(_fresh(o, (dy, x, gamma, beta, mean, invstd)) for o in outs)


@bn_backward.register_fake
def _(dy, x, gamma, beta, mean, invstd, num_tasks, slope, backend):
    return torch.empty_like(x), torch.empty_like(gamma), torch.empty_like(beta)


@torch.library.custom_op("mamlpp::bn_double_backward", mutates_args=())
def bn_double_backward(ggx: Optional[Tensor], gggamma: Optional[Tensor], ggbeta: Optional[Tensor],
                       dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                       num_tasks: int, slope: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    impl = get_backend(backend, x.device)
    outs = impl.bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope)
    inputs = (ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd)
    return tuple(_fresh(o, inputs) for o in outs)


@bn_double_backward.register_fake
def _(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope, backend):
    return torch.empty_like(x), torch.empty_like(gamma), torch.empty_like(dy)


def _bn_forward_setup(ctx, inputs, output):
    x, gamma, beta, num_tasks, eps, slope, backend = inputs
    _, mean, invstd = output
    ctx.save_for_backward(x, gamma, beta, mean, invstd)
    ctx.num_tasks, ctx.slope, ctx.backend = num_tasks, slope, backend


def _bn_forward_grad(ctx, dy, _dmean, _dinvstd):
    # mean and invstd are statistics, not differentiable results: their incoming gradients are ignored
    x, gamma, beta, mean, invstd = ctx.saved_tensors
    dx, dgamma, dbeta = torch.ops.mamlpp.bn_backward(_zeros_if_none(dy, x), x, gamma, beta, mean, invstd,
                                                      ctx.num_tasks, ctx.slope, ctx.backend)
    return dx, dgamma, dbeta, None, None, None, None


def _bn_backward_setup(ctx, inputs, output):
    dy, x, gamma, beta, mean, invstd, num_tasks, slope, backend = inputs
    ctx.save_for_backward(dy, x, gamma, beta, mean, invstd)
    ctx.num_tasks, ctx.slope, ctx.backend = num_tasks, slope, backend


def _bn_backward_grad(ctx, ggx, gggamma, ggbeta):
    # the derivative of (dx, dgamma, dbeta) w.r.t. (dy, x, gamma): the hand-written double backward
    # (w.r.t. beta it is identically 0; mean and invstd enter as the statistics of x, accounted for in
    # the formula of d(x))
    dy, x, gamma, beta, mean, invstd = ctx.saved_tensors
    gx, ggamma, gdy = torch.ops.mamlpp.bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean,
                                                          invstd, ctx.num_tasks, ctx.slope, ctx.backend)
    return gdy, gx, ggamma, None, None, None, None, None, None


bn_forward.register_autograd(_bn_forward_grad, setup_context=_bn_forward_setup)
bn_backward.register_autograd(_bn_backward_grad, setup_context=_bn_backward_setup)


# ---- LSLR ----------------------------------------------------------------------------------------------
@torch.library.custom_op("mamlpp::lslr_forward", mutates_args=())
def lslr_forward(thetas: List[Tensor], grads: List[Tensor], alphas: List[Tensor], step: int,
                 backend: str) -> List[Tensor]:
    if not thetas:
        return []
    impl = get_backend(backend, thetas[0].device)
    inputs = (*thetas, *grads, *alphas)
    return [_fresh(o, inputs) for o in impl.lslr_forward(thetas, grads, alphas, step)]


@lslr_forward.register_fake
def _(thetas, grads, alphas, step, backend):
    return [torch.empty_like(g, dtype=t.dtype) for t, g in zip(thetas, grads)]


@torch.library.custom_op("mamlpp::lslr_backward", mutates_args=())
def lslr_backward(douts: List[Tensor], grads: List[Tensor], alphas: List[Tensor], step: int, shared: List[bool],
                  backend: str) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    if not douts:
        return [], [], []
    impl = get_backend(backend, douts[0].device)
    dthetas, dgrads, dalphas = impl.lslr_backward(douts, grads, alphas, step, shared)
    inputs = (*douts, *grads, *alphas)
    return ([_fresh(o, inputs) for o in dthetas], [_fresh(o, inputs) for o in dgrads],
            [_fresh(o, inputs) for o in dalphas])


@lslr_backward.register_fake
def _(douts, grads, alphas, step, shared, backend):
    dthetas = [d.new_empty(d.shape[1:]) if s else torch.empty_like(d) for d, s in zip(douts, shared)]
    return dthetas, [torch.empty_like(d) for d in douts], [torch.empty_like(a) for a in alphas]


def _lslr_setup(ctx, inputs, output):
    thetas, grads, alphas, step, backend = inputs
    ctx.save_for_backward(*grads, *alphas)
    ctx.n, ctx.step, ctx.backend = len(thetas), step, backend
    ctx.shared = [t.dim() != g.dim() for t, g in zip(thetas, grads)]


def _lslr_grad(ctx, douts):
    saved = ctx.saved_tensors
    grads, alphas = list(saved[:ctx.n]), list(saved[ctx.n:])
    douts = [_zeros_if_none(d, g) for d, g in zip(douts, grads)]
    dthetas, dgrads, dalphas = torch.ops.mamlpp.lslr_backward(douts, grads, alphas, ctx.step, ctx.shared,
                                                              ctx.backend)
    return dthetas, dgrads, dalphas, None, None


lslr_forward.register_autograd(_lslr_grad, setup_context=_lslr_setup)
