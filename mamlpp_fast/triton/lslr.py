"""Triton kernels of the LSLR inner-loop update.

  forward:  out[l] = thetas[l] - alphas[l][step] * grads[l]      (T, *shape_l); a shared theta
            (no task dim) is broadcast over the tasks
  backward: dgrads[l]  = -alphas[l][step] * douts[l]
            dthetas[l] = sum over tasks of douts[l] when shared[l], else douts[l] itself (no copy)
            dalphas[l] = zeros(S+1) except [step] = -sum(douts[l] * grads[l])

Work is counted in positions p (a shared theta: P = numel(theta) positions with T rows each; a
per-task theta: P = T * numel / T positions with one row), BLOCK positions per program, one launch per
tensor (Triton has no pointer tables here). The dalpha sums are deterministic: each program writes one
partial into row l of a zero-filled (L, max programs) workspace, then ONE small kernel (one program per
tensor) sums each row in order and writes the (L, S+1) dalpha table, returned as row views.
lslr_backward returns all three lists in full; douts[l] may be None (= zeros). fp32 accumulation for
fp32 tensors, fp64 for fp64. Block size: `lslr_block_config` (no autotune).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["lslr_forward", "lslr_backward", "lslr_block_config"]


def lslr_block_config(P: int) -> dict:
    """Heuristic "lslr_block_config": BLOCK = next power of two of P clamped to [128, 2048] positions
    per program (a program holds 3 vectors of BLOCK values: theta, grad/dout and the dalpha partial,
    2048 x 3 x 4 B = 24 KB of registers over 4 warps); num_warps = 4 for BLOCK >= 1024, else 2."""
    block = max(128, min(2048, triton.next_power_of_2(max(int(P), 1))))
    return dict(BLOCK=block, num_warps=4 if block >= 1024 else 2)


@triton.jit
def _lslr_fwd_kernel(theta_ptr, grad_ptr, alpha_ptr, out_ptr, step, P, REPS, BLOCK: tl.constexpr):
    """out[r*P + p] = theta[p] - alpha[step] * grad[r*P + p] for r < REPS."""
    pid = tl.program_id(0)
    ACC = grad_ptr.dtype.element_ty
    p = pid * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    a = tl.load(alpha_ptr + step).to(ACC)
    th = tl.load(theta_ptr + p, mask=mask, other=0.0).to(ACC)
    for r in range(0, REPS):
        e = r * P + p.to(tl.int64)
        g = tl.load(grad_ptr + e, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + e, (th - a * g).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lslr_bwd_kernel(dout_ptr, grad_ptr, alpha_ptr, dgrad_ptr, dtheta_ptr, ws_ptr, step, P, REPS,
                     HAS_DTHETA: tl.constexpr, BLOCK: tl.constexpr):
    """dgrad = -alpha[step] dout; dtheta[p] = sum_r dout[r*P + p]; ws[pid] = sum(dout * grad)."""
    pid = tl.program_id(0)
    ACC = grad_ptr.dtype.element_ty
    p = pid * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    a = tl.load(alpha_ptr + step).to(ACC)
    s = tl.zeros([BLOCK], dtype=ACC)
    dth = tl.zeros([BLOCK], dtype=ACC)
    for r in range(0, REPS):
        e = r * P + p.to(tl.int64)
        d = tl.load(dout_ptr + e, mask=mask, other=0.0).to(ACC)
        g = tl.load(grad_ptr + e, mask=mask, other=0.0).to(ACC)
        tl.store(dgrad_ptr + e, (-a * d).to(dgrad_ptr.dtype.element_ty), mask=mask)
        s += d * g
        dth += d
    if HAS_DTHETA:
        tl.store(dtheta_ptr + p, dth.to(dtheta_ptr.dtype.element_ty), mask=mask)
    tl.store(ws_ptr + pid, tl.sum(s, axis=0))


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


def lslr_forward(thetas, grads, alphas, step):
    """out[l] = thetas[l] - alphas[l][step] * grads[l] (one launch per tensor)."""
    if not len(thetas) == len(grads) == len(alphas):
        raise ValueError(f"lslr_forward: thetas, grads and alphas must have the same length, got "
                         f"{len(thetas)}, {len(grads)}, {len(alphas)}")
    T = _check("lslr_forward", grads, alphas, step)
    outs = []
    for l, (th, g, a) in enumerate(zip(thetas, grads, alphas)):
        shared = tuple(th.shape) == tuple(g.shape[1:])
        if not shared and th.shape != g.shape:
            raise ValueError(f"lslr_forward: thetas[{l}] must have the shape of grads[{l}] "
                             f"{tuple(g.shape)} or that without the task dim, got {tuple(th.shape)}")
        th, g, a = th.contiguous(), g.contiguous(), a.contiguous()
        out = torch.empty_like(g)
        P = th.numel() if shared else g.numel()
        reps = T if shared else 1
        cfg = lslr_block_config(P)
        if P > 0:
            _lslr_fwd_kernel[(triton.cdiv(P, cfg["BLOCK"]),)](th, g, a, out, step, P, reps,
                                                              BLOCK=cfg["BLOCK"],
                                                              num_warps=cfg["num_warps"])
        outs.append(out)
    return outs


def lslr_backward(douts, grads, alphas, step, shared):
    """(dthetas, dgrads, dalphas); all returned, douts[l] may be None (= zeros)."""
    if not len(douts) == len(grads) == len(alphas) == len(shared):
        raise ValueError(f"lslr_backward: douts, grads, alphas and shared must have the same length, "
                         f"got {len(douts)}, {len(grads)}, {len(alphas)}, {len(shared)}")
    T = _check("lslr_backward", grads, alphas, step)
    L = len(grads)
    ref = grads[0]
    plans = []
    for l, (d, g) in enumerate(zip(douts, grads)):
        if d is None:
            plans.append(None)
            continue
        if d.shape != g.shape:
            raise ValueError(f"lslr_backward: douts[{l}] must have the shape of grads[{l}] "
                             f"{tuple(g.shape)}, got {tuple(d.shape)}")
        P = g[0].numel() if shared[l] else g.numel()
        cfg = lslr_block_config(P)
        plans.append((P, T if shared[l] else 1, cfg, triton.cdiv(P, cfg["BLOCK"])))
    nprog = max([p[3] for p in plans if p is not None] + [1])
    nalpha = max(int(a.shape[0]) for a in alphas)
    ws = torch.zeros(L, nprog, dtype=ref.dtype, device=ref.device)
    dalpha_all = torch.empty(L, nalpha, dtype=ref.dtype, device=ref.device)
    dthetas, dgrads = [], []
    for l, (d, g, a) in enumerate(zip(douts, grads, alphas)):
        if plans[l] is None:
            dgrads.append(torch.zeros_like(g))
            dthetas.append(torch.zeros_like(g[0]) if shared[l] else torch.zeros_like(g))
            continue
        P, reps, cfg, nblocks = plans[l]
        d, g, a = d.contiguous(), g.contiguous(), a.contiguous()
        dgrad = torch.empty_like(g)
        dtheta = torch.empty_like(g[0]) if shared[l] else d
        if P > 0:
            _lslr_bwd_kernel[(nblocks,)](d, g, a, dgrad, dtheta, ws[l], step, P, reps,
                                         HAS_DTHETA=bool(shared[l]), BLOCK=cfg["BLOCK"],
                                         num_warps=cfg["num_warps"])
        dgrads.append(dgrad)
        dthetas.append(dtheta)
    _lslr_dalpha_kernel[(L,)](ws, dalpha_all, step, nprog, nalpha,
                              PBLOCK=min(1024, triton.next_power_of_2(nprog)),
                              ABLOCK=triton.next_power_of_2(nalpha))
    dalphas = [dalpha_all[l, : a.shape[0]] for l, a in enumerate(alphas)]
    return dthetas, dgrads, dalphas
