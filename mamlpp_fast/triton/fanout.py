"""Triton kernel of the fan-out nodes' gradient sums (mamlpp_fast.ops.fanout): every tensor's sum over
its uses in ONE launch.

    out[j] = ((g[j][0] + g[j][1]) + g[j][2]) + ...      (the U_j gradients of tensor j, in use order)

The gradients of one tensor share their strides and are dense (non-overlapping, filling their storage
span), so each is walked by the same flat storage offset q < P_j and out[j] takes their layout. The sum
runs in the order and precision of the multi-tensor additions it replaces (one `_foreach_add` per use
after the first, in the tensors' dtype): the results are bitwise those.

Layout (as the LSLR kernels, triton/lslr.py): the gradients are one flat tuple argument, tensor j's at
[j * UMAX, j * UMAX + U_j) (slots past U_j repeat its first gradient and are never read); program i
belongs to the tensor j with starts[j] <= i < starts[j + 1] and sums BLOCK offsets of it. One launch
reads sum_j U_j P_j values and writes sum_j P_j, where the additions read and wrote 3 (U_j - 1) P_j.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sum_uses", "sum_uses_block_config", "summable"]


def sum_uses_block_config(P: int) -> dict:
    """BLOCK = next power of two of the largest tensor's size, clamped to [128, 2048] offsets per program
    (one accumulator of BLOCK values); num_warps 4 from 1024 offsets, else 2."""
    block = max(128, min(2048, triton.next_power_of_2(max(int(P), 1))))
    return dict(BLOCK=block, num_warps=4 if block >= 1024 else 2)


def _dense(t: torch.Tensor) -> bool:
    """t's elements fill its storage span exactly once (in any order of its dims)."""
    dims = sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


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
            acc = tl.load(grads[j * UMAX] + q, mask=mask, other=0.0)
            for u in tl.static_range(1, UMAX):
                if u < counts[j]:
                    acc += tl.load(grads[j * UMAX + u] + q, mask=mask, other=0.0)
            tl.store(outs[j] + q, acc, mask=mask)


def sum_uses(groups: list) -> list:
    """groups[j]: the gradients (at least two, `summable`) of tensor j. Returns their sums, each a new
    tensor in the gradients' layout. One launch."""
    if not groups or any(len(g) < 2 for g in groups):
        raise ValueError("sum_uses: every tensor needs at least two gradients")
    for j, g in enumerate(groups):
        if not summable(g):
            raise ValueError(f"sum_uses: the gradients of tensor {j} must share shape, strides, dtype (fp32 "
                             f"or fp64) and device, and be dense; got "
                             f"{[(tuple(t.shape), t.stride(), t.dtype, str(t.device)) for t in g]}")
    umax = max(len(g) for g in groups)
    outs = [torch.empty_like(g[0]) for g in groups]  # a dense tensor's empty_like keeps its strides
    sizes = [g[0].numel() for g in groups]
    cfg = sum_uses_block_config(max(sizes))
    starts = [0]
    for P in sizes:
        starts.append(starts[-1] + triton.cdiv(P, cfg["BLOCK"]))
    flat = [t for g in groups for t in list(g) + [g[0]] * (umax - len(g))]
    if starts[-1] > 0:
        _sum_uses_kernel[(starts[-1],)](tuple(flat), tuple(outs), tuple(sizes), tuple(len(g) for g in groups),
                                        tuple(starts), N=len(groups), UMAX=umax, BLOCK=cfg["BLOCK"],
                                        num_warps=cfg["num_warps"])
    return outs
