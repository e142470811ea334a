"""Triton kernel of the fan-out nodes' gradient sums (mamlpp_fast.ops.fanout): every tensor's sum over
its uses in ONE launch.

    out[j] = ((g[j][0] + g[j][1]) + g[j][2]) + ...      (the U_j gradients of tensor j, in use order;
                                                          zeros when U_j = 0)

The gradients of one tensor share their strides and are dense (non-overlapping, filling their storage
span), so each is walked by the same flat storage offset q < P_j and out[j] takes their layout. The sum
runs in the order and precision of the multi-tensor additions it replaces (one `_foreach_add` per use
after the first, in the tensors' dtype): the results are bitwise those.

Layout (as the LSLR kernels, triton/lslr.py): the gradients are one flat tuple argument, tensor j's at
[j * UMAX, j * UMAX + U_j) (slots past U_j repeat its first gradient, or out[j] when it has none, and
are never read); out[j] is a new tensor, or a given destination (the rows of a table: `_FanoutRows`
writes each (S, C) table's gradient row by row in the same launch); program i
belongs to the tensor j with starts[j] <= i < starts[j + 1] and sums BLOCK offsets of it. One launch
reads sum_j U_j P_j values and writes sum_j P_j, where the additions read and wrote 3 (U_j - 1) P_j.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lslr import dense_dims

__all__ = ["sum_tasks", "sum_uses", "sum_uses_block_config", "summable", "summable_over_tasks"]


def sum_uses_block_config(P: int) -> dict:
    """BLOCK = next power of two of the largest tensor's size, clamped to [128, 2048] offsets per program
    (one accumulator of BLOCK values); num_warps 4 from 1024 offsets, else 2."""
    block = max(128, min(2048, triton.next_power_of_2(max(int(P), 1))))
    return dict(BLOCK=block, num_warps=4 if block >= 1024 else 2)


def _dense(t: torch.Tensor) -> bool:
    """t's elements fill its storage span exactly once (in any order of its dims)."""
    return dense_dims(t) is not None


def summable(grads: list) -> bool:
    """Whether the gradients of one tensor (all defined) can be summed by the kernel: the same shape,
    strides, dtype (fp32 or fp64) and device, and dense."""
    g0 = grads[0]
    return g0.dtype in (torch.float32, torch.float64) and _dense(g0) and all(
        g.shape == g0.shape and g.stride() == g0.stride() and g.dtype == g0.dtype and g.device == g0.device
        for g in grads[1:])


@triton.jit
def _sum_uses_kernel(grads, outs, Ps, counts, starts, N: tl.constexpr, UMAX: tl.constexpr, BLOCK: tl.constexpr):
    """outs[j][q] = sum over u < counts[j] of grads[j * UMAX + u][q], in u order, for the tensor j of
    this program and its BLOCK offsets q."""
    pid = tl.program_id(0)
    for j in tl.static_range(N):
        if (pid >= starts[j]) & (pid < starts[j + 1]):
            q = (pid - starts[j]) * BLOCK + tl.arange(0, BLOCK)
            mask = q < Ps[j]
            acc = tl.load(grads[j * UMAX] + q, mask=mask & (counts[j] > 0), other=0.0)
            for u in tl.static_range(1, UMAX):
                if u < counts[j]:
                    acc += tl.load(grads[j * UMAX + u] + q, mask=mask, other=0.0)
            tl.store(outs[j] + q, acc, mask=mask)


def sum_uses(groups: list, outs: list | None = None) -> list:
    """groups[j]: the gradients (`summable`) of tensor j: at least two, unless outs is given. Returns
    their sums: outs[j] (written in place; dense, with the gradients' shape and strides), or new tensors
    in the gradients' layout. One launch."""
    if not groups or (outs is None and any(len(g) < 2 for g in groups)):
        raise ValueError("sum_uses: every tensor needs at least two gradients (or a destination)")
    if outs is not None:
        if len(outs) != len(groups):
            raise ValueError(f"sum_uses: {len(groups)} tensors but {len(outs)} destinations")
        for j, (g, o) in enumerate(zip(groups, outs)):
            if not summable([o, *g]):
                raise ValueError(f"sum_uses: destination {j} must be dense with its gradients' shape, strides, "
                                 f"dtype and device: {(tuple(o.shape), o.stride(), o.dtype)}")
    for j, g in enumerate(groups):
        if g and not summable(g):
            raise ValueError(f"sum_uses: the gradients of tensor {j} must share shape, strides, dtype (fp32 "
                             f"or fp64) and device, and be dense; got "
                             f"{[(tuple(t.shape), t.stride(), t.dtype, str(t.device)) for t in g]}")
    umax = max(1, max(len(g) for g in groups))
    if outs is None:
        outs = [torch.empty_like(g[0]) for g in groups]  # a dense tensor's empty_like keeps its strides
    sizes = [o.numel() for o in outs]
    cfg = sum_uses_block_config(max(sizes))
    starts = [0]
    for P in sizes:
        starts.append(starts[-1] + triton.cdiv(P, cfg["BLOCK"]))
    flat = [t for g, o in zip(groups, outs) for t in list(g) + [g[0] if g else o] * (umax - len(g))]
    if starts[-1] > 0:
        _sum_uses_kernel[(starts[-1],)](tuple(flat), tuple(outs), tuple(sizes), tuple(len(g) for g in groups),
                                        tuple(starts), N=len(groups), UMAX=umax, BLOCK=cfg["BLOCK"],
                                        num_warps=cfg["num_warps"])
    return outs


def _task_slices(g: torch.Tensor):
    """(sizes, output strides) of g[0]'s dims in its storage order (outermost first), padded to 4 dims,
    for a (R, ...) gradient whose flat offset r * P + q walks g[r] like g[0] (task-major and dense); the
    output strides are those of the contiguous tensor g.shape[1:]. None when g is not such a tensor or
    has more than 4 non-unit dims per task."""
    if g.dim() < 1 or not _dense(g):
        return None
    shape = g.shape[1:]
    P = 1
    for n in shape:
        P *= n
    if g.shape[0] > 1 and g.stride(0) != P:
        return None
    contiguous = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        contiguous[d] = contiguous[d + 1] * shape[d + 1]
    dims = sorted((d for d in range(len(shape)) if shape[d] != 1), key=lambda d: -g.stride(d + 1))
    if len(dims) > 4:
        return None
    sizes = [1] * (4 - len(dims)) + [shape[d] for d in dims]
    ostrides = [0] * (4 - len(dims)) + [contiguous[d] for d in dims]
    return sizes, ostrides


def summable_over_tasks(g: torch.Tensor) -> bool:
    """Whether `sum_tasks` takes g: fp32 or fp64, task-major dense, at most 4 non-unit dims per task."""
    return g.dtype in (torch.float32, torch.float64) and _task_slices(g) is not None


@triton.jit
def _sum_tasks_kernel(grads, outs, Ps, Rs, S1, S2, S3, O0, O1, O2, O3, starts, N: tl.constexpr,
                      BLOCK: tl.constexpr):
    """outs[j][o(q)] = sum over r < Rs[j], in r order, of grads[j][r * Ps[j] + q], for the tensor j of this
    program and its BLOCK storage offsets q; o(q) maps q, decomposed over g[0]'s dims in storage order
    (sizes (., S1, S2, S3)), to the contiguous output (strides O0..O3)."""
    pid = tl.program_id(0)
    for j in tl.static_range(N):
        if (pid >= starts[j]) & (pid < starts[j + 1]):
            q = (pid - starts[j]) * BLOCK + tl.arange(0, BLOCK)
            mask = q < Ps[j]
            acc = tl.load(grads[j] + q, mask=mask, other=0.0)
            for r in range(1, Rs[j]):
                acc += tl.load(grads[j] + r * Ps[j].to(tl.int64) + q, mask=mask, other=0.0)
            i3 = q % S3[j]
            t = q // S3[j]
            i2 = t % S2[j]
            t = t // S2[j]
            i1 = t % S1[j]
            i0 = t // S1[j]
            o = i0 * O0[j] + i1 * O1[j] + i2 * O2[j] + i3 * O3[j]
            tl.store(outs[j] + o, acc, mask=mask)


def sum_tasks(grads: list) -> list:
    """grads[j] (R_j, ...) (`summable_over_tasks`): each summed over its first dim, in order, into a new
    contiguous tensor of shape grads[j].shape[1:] (whatever g[j]'s own layout). One launch."""
    if not grads:
        raise ValueError("sum_tasks: no gradients")
    cols = []
    for j, g in enumerate(grads):
        sl = _task_slices(g) if g.dtype in (torch.float32, torch.float64) else None
        if sl is None or g.shape[0] < 1:
            raise ValueError(f"sum_tasks: gradient {j} must be a task-major dense fp32/fp64 (R >= 1, ...) tensor "
                             f"with at most 4 non-unit dims per task, got {tuple(g.shape)} {g.stride()} {g.dtype}")
        cols.append(sl)
    outs = [torch.empty(g.shape[1:], dtype=g.dtype, device=g.device) for g in grads]
    sizes = [o.numel() for o in outs]
    # at most 1024 offsets per program: the index decomposition's registers spill at 2048 (sm_90a)
    cfg = sum_uses_block_config(min(max(sizes), 1024))
    starts = [0]
    for P in sizes:
        starts.append(starts[-1] + triton.cdiv(P, cfg["BLOCK"]))
    if starts[-1] > 0:
        _sum_tasks_kernel[(starts[-1],)](
            tuple(grads), tuple(outs), tuple(sizes), tuple(int(g.shape[0]) for g in grads),
            tuple(c[0][1] for c in cols), tuple(c[0][2] for c in cols), tuple(c[0][3] for c in cols),
            tuple(c[1][0] for c in cols), tuple(c[1][1] for c in cols), tuple(c[1][2] for c in cols),
            tuple(c[1][3] for c in cols), tuple(starts), N=len(grads), BLOCK=cfg["BLOCK"],
            num_warps=cfg["num_warps"])
    return outs
