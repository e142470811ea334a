"""Triton kernels of the LSLR inner-loop update.

  forward:  out[l] = thetas[l] - alphas[l][step] * grads[l]      (T, *shape_l); a shared theta
            (no task dim) is broadcast over the tasks
  backward: dgrads[l]  = -alphas[l][step] * douts[l]
            dthetas[l] = sum over tasks of douts[l] when shared[l], else douts[l] itself (no copy)
            dalphas[l] = zeros(S+1) except [step] = -sum(douts[l] * grads[l])

Work is counted in positions p (a shared theta: P = numel(theta) positions with T rows each; a
per-task theta: P = T * numel / T positions with one row), BLOCK positions per program. ONE launch
covers all tensors: the pointers, sizes and first program of every tensor are tuple arguments, and each
program finds its tensor in a statically unrolled loop over the tuple (one BLOCK for the whole launch,
from the largest tensor). The dalpha sums are deterministic: each program writes one partial into row
l of a zero-filled (L, max programs) workspace, then ONE small kernel (one program per tensor) sums each
row in order and writes the (L, S+1) dalpha table, returned as row views. Launches per inner step:
forward 1, backward 3 (workspace fill, backward, dalpha).
lslr_backward returns all three lists in full; douts[l] may be None (= zeros). fp32 accumulation for
fp32 tensors, fp64 for fp64. Block size: `lslr_block_config` (no autotune).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["lslr_forward", "lslr_backward", "lslr_block_config", "task_major_dense"]


def dense_dims(t):
    """t's non-unit dims from innermost to outermost when its elements fill its storage span exactly once
    (dense, non-overlapping, in some order of its dims), else None."""
    dims = sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return dims


def task_major_dense(t) -> bool:
    """Whether t's elements fill its storage span exactly once (dense, non-overlapping, in some order of
    its dims) with dim 0 outermost: a flat offset r * numel(t[0]) + p then walks t[r] like t[0]. The
    kernels below run in such a layout: the outputs take the gradient's (forward) or the upstream
    gradient's (backward) when it is one (mamlpp_fast.ops.torch_backend, Layouts), else a contiguous one."""
    dims = dense_dims(t)
    if dims is None:
        return False
    return t.dim() == 0 or t.shape[0] <= 1 or not dims or dims[-1] == 0


def task_major(t):
    """t itself where `task_major_dense`, else a contiguous copy."""
    return t if task_major_dense(t) else t.contiguous()


def in_layout_of(t, ref):
    """t (the shape of ref, which is dense) with ref's strides: t itself if it has them, else a copy."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def lslr_block_config(P: int) -> dict:
    """Heuristic "lslr_block_config": BLOCK = next power of two of P clamped to [128, 2048] positions
    per program (a program holds 3 vectors of BLOCK values: theta, grad/dout and the dalpha partial,
    2048 x 3 x 4 B = 24 KB of registers over 4 warps); num_warps = 4 for BLOCK >= 1024, else 2."""
    block = max(128, min(2048, triton.next_power_of_2(max(int(P), 1))))
    return dict(BLOCK=block, num_warps=4 if block >= 1024 else 2)


@triton.jit
def _lslr_fwd_kernel(thetas, grads, alphas, outs, Ps, REPSs, starts, step, N: tl.constexpr, BLOCK: tl.constexpr):
    """For the tensor i whose programs [starts[i], starts[i+1]) hold this one:
    out_i[r*P_i + p] = theta_i[p] - alpha_i[step] * grad_i[r*P_i + p] for r < REPS_i."""
    pid = tl.program_id(0)
    for i in tl.static_range(N):
        if (pid >= starts[i]) & (pid < starts[i + 1]):
            ACC = grads[i].dtype.element_ty
            P = Ps[i]
            p = (pid - starts[i]) * BLOCK + tl.arange(0, BLOCK)
            mask = p < P
            a = tl.load(alphas[i] + step).to(ACC)
            th = tl.load(thetas[i] + p, mask=mask, other=0.0).to(ACC)
            for r in range(0, REPSs[i]):
                e = r * P + p.to(tl.int64)
                g = tl.load(grads[i] + e, mask=mask, other=0.0).to(ACC)
                tl.store(outs[i] + e, (th - a * g).to(outs[i].dtype.element_ty), mask=mask)


@triton.jit
def _lslr_bwd_kernel(douts, grads, alphas, dgrads, dthetas, ws_ptr, Ps, REPSs, SHAREDs, ROWS, starts, step,
                     NPROG, N: tl.constexpr, BLOCK: tl.constexpr):
    """For the tensor i of this program: dgrad = -alpha[step] dout; dtheta[p] = sum_r dout[r*P + p]
    (shared theta only); ws[ROWS[i], local program] = sum(dout * grad)."""
    pid = tl.program_id(0)
    for i in tl.static_range(N):
        if (pid >= starts[i]) & (pid < starts[i + 1]):
            ACC = grads[i].dtype.element_ty
            P = Ps[i]
            local = pid - starts[i]
            p = local * BLOCK + tl.arange(0, BLOCK)
            mask = p < P
            a = tl.load(alphas[i] + step).to(ACC)
            acc = tl.zeros([BLOCK], dtype=ACC)
            dth = tl.zeros([BLOCK], dtype=ACC)
            for r in range(0, REPSs[i]):
                e = r * P + p.to(tl.int64)
                d = tl.load(douts[i] + e, mask=mask, other=0.0).to(ACC)
                g = tl.load(grads[i] + e, mask=mask, other=0.0).to(ACC)
                tl.store(dgrads[i] + e, (-a * d).to(dgrads[i].dtype.element_ty), mask=mask)
                acc += d * g
                dth += d
            if SHAREDs[i] != 0:
                tl.store(dthetas[i] + p, dth.to(dthetas[i].dtype.element_ty), mask=mask)
            tl.store(ws_ptr + ROWS[i] * NPROG + local, tl.sum(acc, axis=0))


@triton.jit
def _lslr_dalpha_kernel(ws_ptr, dalpha_ptr, step, NPROG, NALPHA, PBLOCK: tl.constexpr,
                        ABLOCK: tl.constexpr):
    """dalpha[l, :] = 0 except [step] = -sum(ws[l, :]) (row l: that tensor's program partials)."""
    l = tl.program_id(0)
    acc = tl.zeros([PBLOCK], dtype=ws_ptr.dtype.element_ty)
    for s in range(0, NPROG, PBLOCK):
        i = s + tl.arange(0, PBLOCK)
        acc += tl.load(ws_ptr + l * NPROG + i, mask=i < NPROG, other=0.0)
    total = tl.sum(acc, axis=0)
    i = tl.arange(0, ABLOCK)
    val = tl.where(i == step, -total, 0.0)
    tl.store(dalpha_ptr + l * NALPHA + i, val.to(dalpha_ptr.dtype.element_ty), mask=i < NALPHA)


def _check(fn, grads, alphas, step):
    """Internal guard of the kernels' memory access, for direct calls of the backend functions: user
    input is validated once, by the op (mamlpp_fast.ops.lslr), before it reaches a backend."""
    if not grads:
        raise ValueError(f"{fn}: grads is empty")
    T = grads[0].shape[0]
    for l, (g, a) in enumerate(zip(grads, alphas)):
        if g.dim() < 1 or g.shape[0] != T:
            raise ValueError(f"{fn}: grads[{l}] must be (T, ...) with T={T}, got {tuple(g.shape)}")
        if a.dim() != 1:
            raise ValueError(f"{fn}: alphas[{l}] must be 1-D, got {tuple(a.shape)}")
        if not 0 <= step < a.shape[0]:
            raise ValueError(f"{fn}: step {step} out of range for alphas[{l}] of shape "
                             f"{tuple(a.shape)}")
        for name, t in ((f"grads[{l}]", g), (f"alphas[{l}]", a)):
            if t.dtype != grads[0].dtype or t.device != grads[0].device:
                raise ValueError(f"{fn}: {name} ({t.dtype}, {t.device}) must match grads[0] "
                                 f"({grads[0].dtype}, {grads[0].device})")
    return T


def _starts(sizes, block):
    """First program of every tensor (and the total) for `block` positions per program."""
    starts = [0]
    for P in sizes:
        starts.append(starts[-1] + triton.cdiv(P, block))
    return starts


def lslr_forward(thetas, grads, alphas, step):
    """out[l] = thetas[l] - alphas[l][step] * grads[l] (one launch for all tensors)."""
    if not len(thetas) == len(grads) == len(alphas):
        raise ValueError(f"lslr_forward: thetas, grads and alphas must have the same length, got "
                         f"{len(thetas)}, {len(grads)}, {len(alphas)}")
    T = _check("lslr_forward", grads, alphas, step)
    ths, gs, als, outs, sizes, reps = [], [], [], [], [], []
    for l, (th, g, a) in enumerate(zip(thetas, grads, alphas)):
        shared = tuple(th.shape) == tuple(g.shape[1:])
        if not shared and th.shape != g.shape:
            raise ValueError(f"lslr_forward: thetas[{l}] must have the shape of grads[{l}] "
                             f"{tuple(g.shape)} or that without the task dim, got {tuple(th.shape)}")
        g = task_major(g)  # the outputs take grad's layout (`task_major_dense`)
        ths.append(in_layout_of(th, g[0] if shared else g) if g.shape[0] > 0 else th.contiguous())
        gs.append(g)
        als.append(a.contiguous())
        outs.append(torch.empty_like(g))
        sizes.append(th.numel() if shared else g.numel())
        reps.append(T if shared else 1)
    cfg = lslr_block_config(max(sizes))
    starts = _starts(sizes, cfg["BLOCK"])
    if starts[-1] > 0:
        _lslr_fwd_kernel[(starts[-1],)](tuple(ths), tuple(gs), tuple(als), tuple(outs), tuple(sizes), tuple(reps),
                                        tuple(starts), step, N=len(ths), BLOCK=cfg["BLOCK"],
                                        num_warps=cfg["num_warps"])
    return outs


def lslr_backward(douts, grads, alphas, step, shared):
    """(dthetas, dgrads, dalphas); all returned, douts[l] may be None (= zeros). One backward launch for
    all tensors with a dout, one dalpha launch."""
    if not len(douts) == len(grads) == len(alphas) == len(shared):
        raise ValueError(f"lslr_backward: douts, grads, alphas and shared must have the same length, "
                         f"got {len(douts)}, {len(grads)}, {len(alphas)}, {len(shared)}")
    T = _check("lslr_backward", grads, alphas, step)
    L = len(grads)
    ref = grads[0]
    for l, (d, g) in enumerate(zip(douts, grads)):
        if d is not None and d.shape != g.shape:
            raise ValueError(f"lslr_backward: douts[{l}] must have the shape of grads[{l}] "
                             f"{tuple(g.shape)}, got {tuple(d.shape)}")
    live = [l for l in range(L) if douts[l] is not None]
    sizes = [grads[l][0].numel() if shared[l] else grads[l].numel() for l in live]
    cfg = lslr_block_config(max(sizes + [1]))
    starts = _starts(sizes, cfg["BLOCK"])
    nprog = max([starts[j + 1] - starts[j] for j in range(len(live))] + [1])
    nalpha = max(int(a.shape[0]) for a in alphas)
    ws = torch.zeros(L, nprog, dtype=ref.dtype, device=ref.device)
    dalpha_all = torch.empty(L, nalpha, dtype=ref.dtype, device=ref.device)
    dthetas, dgrads = [None] * L, [None] * L
    args = ([], [], [], [], [])  # douts, grads, alphas, dgrads, dthetas of the live tensors
    for l in range(L):
        g = grads[l]
        if douts[l] is None:
            dgrads[l] = torch.zeros_like(g)
            dthetas[l] = torch.zeros_like(g[0]) if shared[l] else torch.zeros_like(g)
            continue
        d = task_major(douts[l])  # the results take dout's layout (as the forward's take grad's)
        g = in_layout_of(g, d)
        dgrads[l] = torch.empty_like(d)
        if shared[l]:
            dthetas[l] = torch.empty_like(d[0]) if T > 0 else g.new_empty(g.shape[1:])
        else:
            dthetas[l] = d
        for lst, t in zip(args, (d, g, alphas[l].contiguous(), dgrads[l], dthetas[l])):
            lst.append(t)
    if live and starts[-1] > 0:
        _lslr_bwd_kernel[(starts[-1],)](tuple(args[0]), tuple(args[1]), tuple(args[2]), tuple(args[3]),
                                        tuple(args[4]), ws, tuple(sizes), tuple(T if shared[l] else 1 for l in live),
                                        tuple(int(bool(shared[l])) for l in live), tuple(live), tuple(starts), step,
                                        nprog, N=len(live), BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    _lslr_dalpha_kernel[(L,)](ws, dalpha_all, step, nprog, nalpha,
                              PBLOCK=min(1024, triton.next_power_of_2(nprog)),
                              ABLOCK=triton.next_power_of_2(nalpha))
    dalphas = [dalpha_all[l, : a.shape[0]] for l, a in enumerate(alphas)]
    return dthetas, dgrads, dalphas
