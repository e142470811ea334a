"""The ops registered with PyTorch's dispatcher, ``torch.ops.mamlpp.*``: what the public ops run.

Each of the five functions of `mamlpp_fast.ops.backend.BackendFunctions` is a `torch.library.custom_op`
in the namespace ``mamlpp`` with one more argument, ``backend`` (the name of a loaded backend: "torch",
"native", "triton", or the key of an ad-hoc `Backend` object, `backend_key`; any name `get_backend` takes is resolved
as it would be for the tensors' device), and the three backward
functions one more, ``needs`` (which results are wanted; an unwanted one comes back as an empty
0-element tensor and is not computed by backends that honour ``needs``). Each has a fake (meta)
implementation that gives the shapes and dtypes of its results without computing them (torch.compile,
torch.export, FakeTensor tracing), and the derivatives are registered so that the chain of the
batch-norm op is explicit, each link itself a registered op::

    mamlpp::bn_forward --(backward)--> mamlpp::bn_backward --(backward)--> mamlpp::bn_double_backward
    mamlpp::lslr_forward --(backward)--> mamlpp::lslr_backward

(``lslr_backward`` returns the dalphas as the rows of one tensor: a list of results may not alias
one another, and the Triton and torch backends compute them as one table.)

``bn_double_backward`` and ``lslr_backward`` have no derivative: the MAML++ meta-gradient needs second
order through batch norm and first order through the LSLR step only (a third derivative raises).
Results never alias inputs (the dispatcher's rule): a backend result that is an input is copied; the
one such case on the learner's path, a per-task dthetas[l] = douts[l] of ``lslr_backward``, is never
asked for (the registered derivative of ``lslr_forward`` passes douts[l] on itself, as autograd allows).

The public ops `per_step_batch_norm` and `lslr_update` validate their input once and call these ops;
the compiled extension registers its own kernels as ``torch.ops.mamlpp.native_*`` (csrc/extension.cpp,
CPU and CUDA dispatch keys), whose fake implementations are registered here too.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _native
from .backend import Backend, get_backend, loaded_backend

__all__ = ["bn_forward", "bn_backward", "bn_double_backward", "lslr_forward", "lslr_backward"]

_HALF = (torch.float16, torch.bfloat16)
ALL = (True, True, True)


def _fresh(out: Optional[Tensor], inputs, like: Tensor) -> Tensor:
    """`out` as a result of a registered op: an empty tensor for None (not wanted), a copy when it
    shares memory with one of `inputs`."""
    if out is None:
        return like.new_empty(0)
    ptr = out.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs):
        return out.clone()
    return out


def _call(impl: Backend, fn, needs, *args):
    """A backward function of `impl`, passing `needs` to backends that honour it; the results that
    are not needed come back as None."""
    if impl.accepts_needs:
        return fn(*args, needs=needs)
    return tuple(o if n else None for o, n in zip(fn(*args), needs))


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF else x.dtype


# ---- fake (meta) implementations, shared by the registered ops and the native kernels ---------------
def _bn_forward_fake(x, gamma, beta, num_tasks, eps, slope, *rest):
    stat = _stat_dtype(x)
    return torch.empty_like(x), x.new_empty((x.shape[1],), dtype=stat), x.new_empty((x.shape[1],), dtype=stat)


def _maybe(like: Tensor, wanted: bool) -> Tensor:
    return torch.empty_like(like) if wanted else like.new_empty(0)


def _bn_backward_fake(dy, x, gamma, beta, mean, invstd, num_tasks, slope, needs=ALL, *rest):
    return _maybe(x, needs[0]), _maybe(gamma, needs[1]), _maybe(beta, needs[2])


def _bn_double_backward_fake(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope,
                             needs=ALL, *rest):
    return _maybe(x, needs[0]), _maybe(gamma, needs[1]), _maybe(dy, needs[2])


def _lslr_forward_fake(thetas, grads, alphas, step, *rest):
    return [torch.empty_like(g, dtype=t.dtype) for t, g in zip(thetas, grads)]


def _native_lslr_backward_fake(douts, grads, alphas, step, shared):
    # a per-task dtheta with a dout is that dout itself: the kernel returns it empty (csrc/extension.cpp)
    dthetas = [g.new_empty(g.shape[1:]) if s else (g.new_empty(0) if d is not None else torch.empty_like(g))
               for d, g, s in zip(douts, grads, shared)]
    return dthetas, [torch.empty_like(g) for g in grads], [torch.empty_like(a) for a in alphas]


def _lslr_backward_fake(douts, grads, alphas, step, shared, needs, backend):
    n = len(douts)
    dthetas = [(d.new_empty(d.shape[1:]) if s else torch.empty_like(d)) if needs[l] else d.new_empty(0)
               for l, (d, s) in enumerate(zip(douts, shared))]
    dgrads = [_maybe(d, needs[n + l]) for l, d in enumerate(douts)]
    return dthetas, dgrads, _dalpha_table_fake(alphas, needs[2 * n:])


def _dalpha_table_fake(alphas, want):
    if not any(want):
        return alphas[0].new_empty(0) if alphas else torch.empty(0)
    return alphas[0].new_empty((len(alphas), max(a.shape[0] for a in alphas)))


def _dalpha_table(dalphas, alphas, want) -> Tensor:
    """The wanted dalphas[l] as the rows of one ``(L, max S+1)`` tensor (the registered op's result: a
    list of results may not alias one another, and backends return the rows of one table, which is
    then passed on without a copy); rows not wanted are left unspecified. Empty when none is wanted."""
    rows = [d if w else None for d, w in zip(dalphas, want)]
    got = [d for d in rows if d is not None]
    if not got:
        return alphas[0].new_empty(0)
    base = got[0]._base
    if (base is not None and base.dim() == 2 and base.shape[0] == len(rows)
            and base.shape[1] >= max(a.shape[0] for a in alphas)
            and all(d is None or (d._base is base and d.dim() == 1 and d.stride(0) == base.stride(1)
                                  and d.storage_offset() == base.storage_offset() + l * base.stride(0))
                    for l, d in enumerate(rows))):
        return base
    if len(got) == len(rows) and len({d.shape for d in got}) == 1:
        return torch.stack(got)  # one launch (the native backend returns one tensor per row)
    table = alphas[0].new_zeros((len(rows), max(a.shape[0] for a in alphas)))
    for l, d in enumerate(rows):
        if d is not None:
            table[l, :d.shape[0]] = d
    return table


# ---- per-step batch norm -----------------------------------------------------------------------------
def _impl(backend: str, device) -> Backend:
    """The backend named by the ops' ``backend`` argument: a `backend_key` of the public ops (looked up
    as it is), or any name `get_backend` takes (resolved for the device, with its fallback)."""
    impl = loaded_backend(backend)
    if impl is not None and impl.supports(device.type):
        return impl
    return get_backend(backend, device)


@torch.library.custom_op("mamlpp::bn_forward", mutates_args=())
def bn_forward(x: Tensor, gamma: Tensor, beta: Tensor, num_tasks: int, eps: float, slope: float,
               backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    y, mean, invstd = _impl(backend, x.device).bn_forward(x, gamma, beta, num_tasks, eps, slope)
    return tuple(_fresh(o, (x, gamma, beta), x) for o in (y, mean, invstd))


@torch.library.custom_op("mamlpp::bn_backward", mutates_args=())
def bn_backward(dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                num_tasks: int, slope: float, needs: List[bool], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    impl = _impl(backend, x.device)
    outs = _call(impl, impl.bn_backward, tuple(needs), dy, x, gamma, beta, mean, invstd, num_tasks, slope)
    return tuple(_fresh(o, (dy, x, gamma, beta, mean, invstd), x) for o in outs)


@torch.library.custom_op("mamlpp::bn_double_backward", mutates_args=())
def bn_double_backward(ggx: Optional[Tensor], gggamma: Optional[Tensor], ggbeta: Optional[Tensor],
                       dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                       num_tasks: int, slope: float, needs: List[bool], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    impl = _impl(backend, x.device)
    outs = _call(impl, impl.bn_double_backward, tuple(needs), ggx, gggamma, ggbeta, dy, x, gamma, beta, mean,
                 invstd, num_tasks, slope)
    inputs = (ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd)
    return tuple(_fresh(o, inputs, x) for o in outs)


bn_forward.register_fake(_bn_forward_fake)
bn_backward.register_fake(_bn_backward_fake)
bn_double_backward.register_fake(_bn_double_backward_fake)


def _bn_forward_setup(ctx, inputs, output):
    x, gamma, beta, num_tasks, eps, slope, backend = inputs
    _, mean, invstd = output
    ctx.save_for_backward(x, gamma, beta, mean, invstd)
    ctx.num_tasks, ctx.slope, ctx.backend = num_tasks, slope, backend
    ctx.set_materialize_grads(False)


def _bn_forward_grad(ctx, dy, _dmean, _dinvstd):
    # mean and invstd are statistics, not differentiable results: their incoming gradients are ignored
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if dy is None or not any(needs):
        return (None,) * 7
    x, gamma, beta, mean, invstd = ctx.saved_tensors
    outs = torch.ops.mamlpp.bn_backward(dy, x, gamma, beta, mean, invstd, ctx.num_tasks, ctx.slope, needs,
                                        ctx.backend)
    return (*(o if n else None for o, n in zip(outs, needs)), None, None, None, None)


def _bn_backward_setup(ctx, inputs, output):
    dy, x, gamma, beta, mean, invstd, num_tasks, slope, needs, backend = inputs
    ctx.save_for_backward(dy, x, gamma, beta, mean, invstd)
    ctx.num_tasks, ctx.slope, ctx.backend, ctx.made = num_tasks, slope, backend, list(needs)
    ctx.set_materialize_grads(False)


def _bn_backward_grad(ctx, ggx, gggamma, ggbeta):
    # a result that was not made (an empty placeholder) has no gradient, whatever comes back for it
    ggx, gggamma, ggbeta = (g if made else None for g, made in zip((ggx, gggamma, ggbeta), ctx.made))
    # the derivative of (dx, dgamma, dbeta) w.r.t. (dy, x, gamma): the hand-written double backward
    # (w.r.t. beta it is identically 0; mean and invstd enter as the statistics of x, accounted for in
    # the formula of d(x), so they get no gradient of their own)
    need_dy, need_x, need_gamma = (bool(n) for n in ctx.needs_input_grad[:3])
    if (ggx is None and gggamma is None and ggbeta is None) or not (need_dy or need_x or need_gamma):
        return (None,) * 10
    dy, x, gamma, beta, mean, invstd = ctx.saved_tensors
    needs = [need_x, need_gamma, need_dy]
    gx, ggamma, gdy = torch.ops.mamlpp.bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean,
                                                          invstd, ctx.num_tasks, ctx.slope, needs, ctx.backend)
    return (gdy if need_dy else None, gx if need_x else None, ggamma if need_gamma else None,
            None, None, None, None, None, None, None)


bn_forward.register_autograd(_bn_forward_grad, setup_context=_bn_forward_setup)
bn_backward.register_autograd(_bn_backward_grad, setup_context=_bn_backward_setup)


# ---- LSLR ----------------------------------------------------------------------------------------------
@torch.library.custom_op("mamlpp::lslr_forward", mutates_args=())
def lslr_forward(thetas: List[Tensor], grads: List[Tensor], alphas: List[Tensor], step: int,
                 backend: str) -> List[Tensor]:
    if not thetas:
        return []
    inputs = (*thetas, *grads, *alphas)
    outs = _impl(backend, thetas[0].device).lslr_forward(thetas, grads, alphas, step)
    return [_fresh(o, inputs, g) for o, g in zip(outs, grads)]


@torch.library.custom_op("mamlpp::lslr_backward", mutates_args=())
def lslr_backward(douts: List[Tensor], grads: List[Optional[Tensor]], alphas: List[Tensor], step: int,
                  shared: List[bool], needs: List[bool], backend: str) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    """``needs``: 3 * len(douts) booleans, (dthetas, dgrads, dalphas) per tensor; grads[l] may be None
    where dalphas[l] is not needed. The dalphas come back as the rows of one ``(L, max S+1)`` tensor
    (`_dalpha_table`)."""
    n = len(douts)
    if not n:
        return [], [], torch.empty(0)
    impl = _impl(backend, douts[0].device)
    want = (list(needs[:n]), list(needs[n:2 * n]), list(needs[2 * n:]))
    if impl.accepts_needs:
        dthetas, dgrads, dalphas = impl.lslr_backward(douts, grads, alphas, step, shared, needs=want)
    else:  # a backend without `needs` takes every grads[l]: zeros stand in for the ones not given
        full = [torch.zeros_like(d) if g is None else g for d, g in zip(douts, grads)]
        dthetas, dgrads, dalphas = impl.lslr_backward(douts, full, alphas, step, shared)
    inputs = (*douts, *(g for g in grads if g is not None), *alphas)
    return ([_fresh(o if w else None, inputs, d) for o, w, d in zip(dthetas, want[0], douts)],
            [_fresh(o if w else None, inputs, d) for o, w, d in zip(dgrads, want[1], douts)],
            _fresh(_dalpha_table(dalphas, alphas, want[2]), inputs, alphas[0]))


lslr_forward.register_fake(_lslr_forward_fake)
lslr_backward.register_fake(_lslr_backward_fake)


def _lslr_setup(ctx, inputs, output):
    thetas, grads, alphas, step, backend = inputs
    ctx.save_for_backward(*grads, *alphas)
    ctx.n, ctx.step, ctx.backend = len(thetas), step, backend
    ctx.shared = [t.dim() != g.dim() for t, g in zip(thetas, grads)]
    ctx.set_materialize_grads(False)


def lslr_gradients(douts, grads, alphas, step, shared, need_t, need_g, need_a, backend):
    """(dthetas, dgrads, table, rows) of an LSLR step (the registered op's derivative, shared by
    `_lslr_grad` and ops.lslr's stacked learning rates): a per-task dtheta is dout itself; the registered
    backward op computes the rest for the tensors that got a gradient. table: the op's (m, max S+1)
    dalpha table, or None when no dalpha is wanted; rows: the (row of table, index l into the lists)
    pairs of the wanted dalphas (the other rows of table are unspecified)."""
    n = len(douts)
    dthetas, dgrads = [None] * n, [None] * n
    idx = [l for l in range(n) if douts[l] is not None and (need_t[l] or need_g[l] or need_a[l])]
    for l in idx:
        if need_t[l] and not shared[l]:
            dthetas[l] = douts[l]
    sub = [l for l in idx if (need_t[l] and shared[l]) or need_g[l] or need_a[l]]
    table, rows = None, []
    if sub:
        needs = ([need_t[l] and shared[l] for l in sub] + [need_g[l] for l in sub] + [need_a[l] for l in sub])
        parts = torch.ops.mamlpp.lslr_backward(
            [douts[l] for l in sub], [grads[l] if need_a[l] else None for l in sub], [alphas[l] for l in sub],
            step, [shared[l] for l in sub], needs, backend)
        m = len(sub)
        for j, l in enumerate(sub):
            if needs[j]:
                dthetas[l] = parts[0][j]
            if needs[m + j]:
                dgrads[l] = parts[1][j]
        rows = [(j, l) for j, l in enumerate(sub) if needs[2 * m + j]]
        table = parts[2] if rows else None
    return dthetas, dgrads, table, rows


def _lslr_grad(ctx, douts):
    n = ctx.n
    need_t, need_g, need_a = (list(map(bool, v)) for v in ctx.needs_input_grad[:3])
    saved = ctx.saved_tensors
    grads, alphas = saved[:n], saved[n:]
    dthetas, dgrads, table, rows = lslr_gradients(douts, grads, alphas, ctx.step, ctx.shared, need_t, need_g, need_a,
                                                  ctx.backend)
    dalphas = [None] * n
    for j, l in rows:
        dalphas[l] = table[j, :alphas[l].shape[0]]
    return dthetas, dgrads, dalphas, None, None


lslr_forward.register_autograd(_lslr_grad, setup_context=_lslr_setup)


# ---- the compiled extension's kernels (torch.ops.mamlpp.native_*) --------------------------------------
_NATIVE_FAKES = {"native_bn_forward": _bn_forward_fake, "native_bn_backward": _bn_backward_fake,
                 "native_bn_double_backward": _bn_double_backward_fake, "native_lslr_forward": _lslr_forward_fake,
                 "native_lslr_backward": _native_lslr_backward_fake}

if _native.is_loaded():  # importing _C defined the ops (csrc/extension.cpp)
    for _name, _fake in _NATIVE_FAKES.items():
        torch.library.register_fake(f"mamlpp::{_name}", _fake)

