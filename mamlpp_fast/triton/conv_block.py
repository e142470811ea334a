r"""Triton kernels of the fused first block (`mamlpp_fast.ops.conv_block.conv_bn_pool`): per-task
convolution + per-step batch norm + leaky ReLU + 2x2 max pooling, forward, backward and double backward,
never writing the full-resolution convolution output.

Formulas and symbols: the docstring of mamlpp_fast.ops.conv_block (the op) and of
mamlpp_fast.triton.per_step_bn (the batch norm's sums and coefficients, shared with it: `_dbwd_coef`).

Work unit. A program takes one task t, a block of BLOCK_C channels (columns cp = t*C + c) and a chunk
of the Mw = n*Hp*Wp pooling windows v = (i, ph, pw), BLOCK_W windows per step. For each of a window's
four convolution outputs it gathers the patch P' once for all its channels (the K = Ci*kh*kw image
values under the output and a 1 for the bias: a (BLOCK_W, KP) tile, KP = the next power of two >= 16
of K + 1, zero-padded) and forms z = P' W' as one small matrix product with the (KP, BLOCK_C) tile W'
(the weights and the bias of the block's channels), strict fp32 (`input_precision="ieee"`), or as
config key conv_precision / allow_tf32 ask (triton/conv.py `_precision`), float64 in float64. The
weight gradients' patch sums are products of the same kind, Q_D += D^T g (D = P' - rho'), and so are
the image's Gram terms, C_D += D^T D (`_gram_kernel`, strict precision). The tap decomposition
k -> (ci, p, q) is computed once per program on the KP axis.

Every pass runs over the grid (T * channel blocks, CHUNKS); the column statistics the batch norm
needs come from the image's Gram terms, not from a pass over z. A small kernel per derivative (one
program per column, i.e. per (channel, task)) adds the programs' partial sums (a (TC, CHUNKS, KP)
workspace of weight-gradient partials and a (TC, CHUNKS, 2) one of column sums) in chunk order and forms
the weight and gamma/beta gradients, per task, or for a shared gamma added in task order by each
channel's last program, elected with an integer ticket (`_task_sum`). No floating-point atomics, fixed
orders: results are reproducible.

- forward:   no statistics pass over z: with s = S_D.w', mean = rho'.w' + s/N and
             sum (z - mean)^2 = w'^T C_D w' - s^2/N from the image's Gram terms (`_fwd_stats_kernel`,
             one program per column). One pass (`_fwd_kernel`): z at each window's four outputs, `sel`,
             the position 0..3 (int8) of its largest y, `zsel`, z there, and out = y(zsel): y is
             monotone in z (non-decreasing for gamma > 0, non-increasing for gamma < 0, constant for
             gamma = 0), so the largest y is at the first largest sign(gamma) z; the backward passes
             read sel instead of finding the maximum again.
- backward:  no convolution. dz = gamma r (g - gbar - xhat m) at the 4 outputs (g = a gout at the
             window's maximum, 0 at its other outputs; gbar = Sg/N, m = Sgx/N, N = 4 Mw), so with
             D = P' - rho' (rho' a fixed patch of the task's image) and the image's Gram terms
             C_D = sum D^T D, S_D = sum D (`image_stats`: `_gram_kernel`, once per image set):
                 dw' = gamma r [Q_D - gbar S_D - m r (C_D w' + (rho'.w' - mean) S_D)],
                 Q_D = sum D^T g
             (sum P'^T (z - mean) = sum D^T (z - mean) since sum (z - mean) = 0, and z - mean =
             D w' + rho'.w' - mean). One pass (`_bwd_kernel`): g and xhat at the maxima from zsel, the
             partial sums Sg = sum g, Sgx = sum g xhat and Q_D (one product per output: D^T times g
             where sel = d); finish (`_bwd_finish_kernel`): the formula above, dgamma = Sgx,
             dbeta = Sg. The conv bias's gradient comes out as D's bias column, 0 (its exact value).
- double backward: the backward's pass for gout (Sg, Sgx, Q_D); then, per channel, with
             u = P' U' = D U' + a (a = rho'.U'), delta = rho'.w' - mean, s = S_D.U', the sums
             Su = s + N a, Sux = r (U'^T C_D w' + delta s), Sug = Q_D.U' + a Sg, the coefficients of
             per_step_bn (`_dbwd_coef`: gz = eu u + eg g + ex xhat + e0), and, since sum gz = 0,
             d(w') = sum D^T gz = eu (C_D U' + a S_D) + eg Q_D + ex r (C_D w' + delta S_D) + e0 S_D,
             d(gamma) = r M Q (`_dbwd_finish_kernel`); then d(gout) = a (cu u + cx xhat + c0) at each
             window's maximum, u from one product per output (`_dbwd_dgout_kernel`).

Launch configuration from `block_config` (no autotune: the kernels also run under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import _tile_counters, num_sms
from .conv import _precision, _product
from .per_step_bn import _dbwd_coef, _f2acc, _last_ticket, _split, _to_acc

__all__ = ["forward", "backward", "double_backward", "image_stats", "block_config", "name"]

name = "triton"
_MAX_CHUNKS = 256
_PROGRAMS_PER_SM = 4
_KSTEP = 16  # chunk sums are read 16 chunks at a time


def _channel_tile(c: int) -> int:
    """Channels per program: all of them in one block when C <= 64 (the next power of two >= 16, masked:
    at 48 channels 16 idle lanes, but each gathered patch value feeds 48 useful FMAs instead of 16 in
    three 16-wide blocks); beyond, the largest of 64, 32, 16 that divides C, else 64 (masked)."""
    if c <= 64:
        return max(16, triton.next_power_of_2(max(int(c), 1)))
    for bc in (64, 32, 16):
        if c % bc == 0:
            return bc
    return 64


def block_config(mw: int, t: int, c: int, kp: int, device: torch.device, sms: int | None = None) -> dict:
    """Launch configuration for `mw` windows per column, `t` tasks of `c` channels, patch width `kp`;
    `sms`: the multiprocessors to fill (default: the CUDA device's; bench.trace passes its simulated
    count).

    - BLOCK_C: channels per program (`_channel_tile`).
    - The passes with one patch product per output and no weight-gradient accumulator (the forward's,
      `_fwd_kernel`, and the double backward's d(gout), `_dbwd_dgout_kernel`): RBLOCK_W = 16 windows per
      step on FWD_WARPS = 4 warps with patches wider than 16 (mini-ImageNet's 32: the forward's unrolled
      window step 50% FFMA under Triton 3.6, no spill; 47% on 8 warps), 8 with 16-wide ones (Omniglot's:
      36%; chosen when 4 warps spilled under a .maxnreg cap since dropped: without it 4 warps run 40%
      with no spill, not yet taken, bench/NOTES.md). (32-window steps, which raised the old statistics pass's FFMA share,
      spill since the pass tracks each window's maximum: 140 B with Omniglot's patches, 672 B with
      mini-ImageNet's under 3.6.)
    - The backward's pass (`_bwd_kernel`, also the double backward's first): BLOCK_W = 16 windows per
      step on BWD_WARPS = 8 warps: on 4 it spilled under Triton 3.6 (both workloads' patches); on 8,
      none under 3.6 or 3.7.1.
    - num_warps: the warps of a pass a configuration does not name (tests' configurations).
    - The Gram kernel takes `gram_config`. Every pass unrolls a window's four outputs, so that the
      window step is the loop the compiler's report reads (bench/NOTES.md: the backward and the forward
      from the image's Gram matrix). Chosen from the sm_90a compile (bench.static_metrics); as
      configured no kernel spills under the Triton versions we compile with
      (tests/test_static_metrics.py).
    - CHUNKS: window chunks per (task, channel block), so that the grid holds ~4 programs per SM, each
      with at least 2 steps; at most 256. On the interpreter (CPU tensors, no `sms`) up to 3, so that
      tests cover the merge of several chunks.
    - GRAM_CHUNKS (GRAM_CHUNK windows each): the Gram kernel's chunks per task, as CHUNKS but with at
      least 8 steps each: each chunk writes a (KP + 1) x KP partial, which on small image sets would
      outweigh the image itself.
    """
    bc = _channel_tile(c)
    bw = 16
    steps = triton.cdiv(mw, bw)
    cols = t * triton.cdiv(c, bc)
    if sms is None and device.type == "cuda":
        sms = num_sms(device)
    if sms is not None:
        want = _PROGRAMS_PER_SM * sms
        chunks = max(1, min(triton.cdiv(want, cols), triton.cdiv(steps, 2), _MAX_CHUNKS))
    else:
        chunks = max(1, min(3, steps))
    chunk = triton.cdiv(mw, chunks)
    chunks = triton.cdiv(mw, chunk)
    gram_chunk = triton.cdiv(mw, max(1, min(chunks, triton.cdiv(steps, 8)) if sms is not None else chunks))
    return dict(BLOCK_W=bw, BLOCK_C=bc, CB=triton.cdiv(c, bc), CHUNK=chunk, CHUNKS=chunks, num_warps=4,
                RBLOCK_W=16, FWD_WARPS=8 if kp <= 16 else 4, BWD_WARPS=8, GRAM_CHUNK=gram_chunk,
                GRAM_CHUNKS=triton.cdiv(mw, gram_chunk))


def gram_config(cfg: dict) -> dict:
    """Launch constants of the Gram kernel (`_gram_kernel`, grid (T, CHUNKS)): 16 windows per step on 2
    warps (its loop 59% FFMA under Triton 3.6 for mini-ImageNet's 32-wide patches, against 52% on 4
    warps and 56% with 32-window steps on 4; no spill; bench/NOTES.md)."""
    return dict(BLOCK_W=16, num_warps=2)


# ------------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _taps(KK: tl.constexpr, KW: tl.constexpr, KP: tl.constexpr):
    """The KP axis: tap k = (ci, p, q) for k < K, the bias column k = K, padding beyond."""
    ks = tl.arange(0, KP)
    ci = ks // KK
    rem = ks - ci * KK
    p = rem // KW
    q = rem - p * KW
    return ks, ci, p, q


@triton.jit
def _wtile(w_ptr, b_ptr, wrow, brow, cmask, ks, K: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """(KP, BLOCK_C) tile W'[k, c] = w[t, c, k] for k < K, the bias of (t, c) at k = K (0 without one),
    0 beyond; wrow / brow: the offsets of the program's channels' rows of w and bias (a task stride of 0
    reads a weight expanded over the tasks, as the fast weights of step 0 are, without a copy)."""
    m = (ks < K)[:, None] & cmask[None, :]
    wt = tl.load(w_ptr + wrow[None, :] + ks[:, None], mask=m, other=0.0).to(ACC)
    if HAS_B:
        mb = (ks == K)[:, None] & cmask[None, :]
        wt += tl.load(b_ptr + brow[None, :] + ks[:, None] * 0, mask=mb, other=0.0).to(ACC)
    return wt


@triton.jit
def _windows(j, HWp, Wp):
    i = j // HWp
    rem = j - i * HWp
    ph = rem // Wp
    pw = rem - ph * Wp
    return i, rem, ph, pw


@triton.jit
def _backward_step(gout_ptr, gout2_ptr, sel_ptr, s, end, cps, cmask, TC, HWp, Wp, BLOCK_W: tl.constexpr,
                   HAS_G2: tl.constexpr, ACC: tl.constexpr):
    """The windows s .. s+BLOCK_W of a backward pass: row mask, (row, channel) mask, coordinates, their
    pooled offsets, gout there and the position of each window's maximum (kept by the forward). HAS_G2:
    gout is the sum of two gradients, read from gout_ptr and gout2_ptr (`backward`'s gout2)."""
    j = s + tl.arange(0, BLOCK_W)
    mask = j < end
    m2d = mask[:, None] & cmask[None, :]
    i, rem, ph, pw = _windows(j, HWp, Wp)
    pool_off = (i.to(tl.int64)[:, None] * TC + cps[None, :]) * HWp + rem[:, None]
    go = tl.load(gout_ptr + pool_off, mask=m2d, other=0.0).to(ACC)
    if HAS_G2:
        go += tl.load(gout2_ptr + pool_off, mask=m2d, other=0.0).to(ACC)
    sel = tl.load(sel_ptr + pool_off, mask=m2d, other=0).to(tl.int32)
    return mask, m2d, i, ph, pw, pool_off, go, sel


@triton.jit
def _patch(x_ptr, i, oh, ow, rmask, t, ks, ci, p, q, Ci, TCi, H, W, stride, pad,
           K: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_W, KP) tile P': the image under output (oh, ow) of example i, the bias column = 1 (0 on
    masked rows: their z is 0 and they are kept out of every sum).

    Per element one offset add and two bounds tests: the offset is the row's (example, task, top-left
    corner; 64-bit, once per row) plus the tap's (ci, p, q; loop-invariant), and 0 <= ih < H is one
    unsigned comparison (a negative ih wraps above H). The same values are read as with the offset
    formed per element (exact), in 3-8% fewer loop instructions (bench/NOTES.md)."""
    oh0 = oh * stride - pad
    ow0 = ow * stride - pad
    ih = oh0[:, None] + p[None, :]
    iw = ow0[:, None] + q[None, :]
    # H and W promote to unsigned beside the unsigned ih, iw (setp.lt.u32); written without .to() so that
    # a size of 1, which Triton passes as a constexpr int, compiles too
    inside = (ih.to(tl.uint32) < H) & (iw.to(tl.uint32) < W)
    m = (rmask[:, None] & (ks < K)[None, :]) & inside
    row = ((i.to(tl.int64) * TCi + t * Ci) * H + oh0) * W + ow0
    off = row[:, None] + ((ci * H + p) * W + q)[None, :]
    v = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC)
    one = (rmask[:, None] & (ks == K)[None, :]).to(ACC)
    return v + one


@triton.jit
def _act(z, mu, r, ga, be, slope):
    """xhat, the leaky-ReLU factor a and gamma xhat + beta (y = a times it), in the batch norm's order
    (per-channel vectors broadcast over the rows; z: the convolution output at each window's maximum)."""
    xhat = (z - mu[None, :]) * r[None, :]
    zz = ga[None, :] * xhat + be[None, :]
    return xhat, tl.where(zz > 0, 1.0, slope).to(z.dtype), zz


@triton.jit
def _col_sum(ws_ptr, cp, CHUNKS, i, NSUM: tl.constexpr, KSTEP: tl.constexpr):
    """Statistic i of column cp summed over its chunks, KSTEP chunks at a time (a fixed order)."""
    kk = tl.arange(0, KSTEP)
    acc = tl.zeros([KSTEP], dtype=ws_ptr.dtype.element_ty)
    for k0 in range(0, CHUNKS, KSTEP):
        acc += tl.load(ws_ptr + (cp * CHUNKS + k0 + kk) * NSUM + i, mask=(k0 + kk) < CHUNKS, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _program(C, BLOCK_C: tl.constexpr, CB):
    """(t, channels cs, columns cps = t*C + cs, channel mask, chunk k) of this program."""
    pid = tl.program_id(0)
    t = pid // CB
    cs = (pid - t * CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    return t, cs, t * C + cs, cmask, tl.program_id(1)


@triton.jit
def _gamma_beta(gamma_ptr, beta_ptr, cs, cps, cmask, GAMMA_PER_TASK: tl.constexpr, ACC: tl.constexpr):
    """(index of gamma / beta, gamma, beta) of the program's channels: per column or per channel."""
    if GAMMA_PER_TASK:
        gi = cps
    else:
        gi = cs
    ga = tl.load(gamma_ptr + gi, mask=cmask, other=1.0).to(ACC)
    be = tl.load(beta_ptr + gi, mask=cmask, other=0.0).to(ACC)
    return gi, ga, be


@triton.jit
def _params(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cs, cps, cmask, GAMMA_PER_TASK: tl.constexpr,
            ACC: tl.constexpr):
    gi, ga, be = _gamma_beta(gamma_ptr, beta_ptr, cs, cps, cmask, GAMMA_PER_TASK, ACC)
    mu = tl.load(mean_ptr + cps, mask=cmask, other=0.0).to(ACC)
    r = tl.load(invstd_ptr + cps, mask=cmask, other=1.0).to(ACC)
    return gi, ga, be, mu, r


@triton.jit
def _zdot(P, Wt, PREC: tl.constexpr, ACC: tl.constexpr):
    return _product(P, Wt, PREC, ACC)


# ------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _sign(v):
    """-1, 0 or 1 (v's dtype)."""
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(v.dtype)


@triton.jit
def _wcol(w_ptr, b_ptr, t, c, W_TS, B_TS, ks, K: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """w' of column (t, c) as a (KP,) vector: the weights, the bias at k = K (0 without one), 0 beyond."""
    wv = tl.load(w_ptr + t * W_TS + c * K + ks, mask=ks < K, other=0.0).to(ACC)
    if HAS_B:
        wv += tl.load(b_ptr + t * B_TS + c + ks * 0, mask=ks == K, other=0.0).to(ACC)
    return wv


@triton.jit
def _gram_terms(gram_ptr, rho_ptr, t, ks, KP: tl.constexpr):
    """(C_D (KP, KP), S_D (KP,), rho' (KP,)) of task t (`image_stats`)."""
    base = gram_ptr + t * (KP * KP + KP)
    return (tl.load(base + ks[:, None] * KP + ks[None, :]), tl.load(base + KP * KP + ks),
            tl.load(rho_ptr + t * KP + ks))


@triton.jit
def _fwd_stats_kernel(gram_ptr, rho_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, C, T, MW, W_TS, B_TS, eps_hi, eps_lo,
                      K: tl.constexpr, KP: tl.constexpr, HAS_B: tl.constexpr, IS_F64: tl.constexpr):
    """Program (c, t): mean and invstd of column cp = t C + c from the image's Gram terms, no
    convolution. Over the N = 4 Mw rows z = D w' + rho'.w', so with s = S_D.w':
    mean = rho'.w' + s / N and m2 = sum (z - mean)^2 = w'^T C_D w' - s^2 / N (>= 0 in exact arithmetic;
    clamped at 0 against rounding); invstd = 1 / sqrt(m2 / N + eps). One program per column: a program
    that walked the tasks would chain T columns' loads one after another."""
    c = tl.program_id(0)
    t = tl.program_id(1)
    ACC = gram_ptr.dtype.element_ty
    ks = tl.arange(0, KP)
    Mf = _to_acc(4 * MW, ACC)
    eps = _f2acc(eps_hi, eps_lo, ACC)
    cp = t * C + c
    wv = _wcol(w_ptr, b_ptr, t, c, W_TS, B_TS, ks, K, HAS_B, ACC)
    cd, sd, rho = _gram_terms(gram_ptr, rho_ptr, t, ks, KP)
    s = tl.sum(sd * wv, axis=0)
    mean = tl.sum(rho * wv, axis=0) + s / Mf
    m2 = tl.maximum(tl.sum(tl.sum(cd * wv[None, :], axis=1) * wv, axis=0) - s * (s / Mf), 0.0)
    if IS_F64:
        r = 1.0 / tl.sqrt(m2 / Mf + eps)
    else:
        r = 1.0 / tl.sqrt_rn(m2 / Mf + eps)
    tl.store(mean_ptr + cp, mean)
    tl.store(invstd_ptr + cp, r)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, out_ptr, zsel_ptr, sel_ptr, C, CB,
                Ci, TC, TCi, H, W, HWp, Wp, MW, CHUNK, CHUNKS, stride, pad, W_TS, B_TS, slope_hi, slope_lo,
                KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, HAS_B: tl.constexpr,
                GAMMA_PER_TASK: tl.constexpr, PREC: tl.constexpr, BLOCK_W: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """The forward's one pass over the windows of chunk k of its columns (the statistics come from
    `_fwd_stats_kernel`): z at a window's four outputs, sel = the first d of the largest s z_d,
    s = sign(gamma) (y is a non-decreasing function of s z; s = 0: all four y equal, d = 0), zsel = z
    there, and out = y(zsel) (`_act`'s arithmetic)."""
    t, cs, cps, cmask, k = _program(C, BLOCK_C, CB)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _params(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cs, cps, cmask, GAMMA_PER_TASK,
                                 ACC)
    sg = _sign(ga)[None, :]
    ks, ci, p, q = _taps(KK, KW, KP)
    Wt = _wtile(w_ptr, b_ptr, t * W_TS + cs * K, t * B_TS + cs, cmask, ks, K, HAS_B, ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    rows = tl.arange(0, BLOCK_W)
    for s in range(begin, end, BLOCK_W):
        j = s + rows
        mask = j < end
        i, rem, ph, pw = _windows(j, HWp, Wp)
        best = tl.full([BLOCK_W, BLOCK_C], float("-inf"), dtype=ACC)  # the largest s z so far
        zb = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        sel = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.int32)
        for d in tl.static_range(4):  # unrolled: the window step is the hot loop (as `_bwd_kernel`'s)
            z = _zdot(_patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W,
                             stride, pad, K, ACC), Wt, PREC, ACC)
            key = sg * z
            upd = key > best  # strict: the first of equal keys stays (d = 0 always enters)
            best = tl.maximum(best, key)
            zb = tl.where(upd, z, zb)
            sel = tl.where(upd, d, sel)
        off = (i.to(tl.int64)[:, None] * TC + cps[None, :]) * HWp + rem[:, None]
        om = mask[:, None] & cmask[None, :]
        _xh, a, zz = _act(zb, mu, r, ga, be, slope)
        tl.store(out_ptr + off, (a * zz).to(out_ptr.dtype.element_ty), mask=om)
        tl.store(zsel_ptr + off, zb, mask=om)
        tl.store(sel_ptr + off, sel.to(tl.int8), mask=om)


# ------------------------------------------------------------------------------------------------------
# backward and double backward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _uvec(uw_ptr, ub_ptr, cps, cmask, ks, K: tl.constexpr, HAS_UW: tl.constexpr, HAS_UB: tl.constexpr,
          ACC: tl.constexpr):
    """U' as a (KP, BLOCK_C) tile (zeros where absent)."""
    if HAS_UW:
        Ut = _wtile(uw_ptr, ub_ptr, cps * K, cps, cmask, ks, K, HAS_UB, ACC)
    else:
        Ut = tl.zeros([ks.shape[0], cps.shape[0]], dtype=ACC)
        if HAS_UB:
            mb = (ks == K)[:, None] & cmask[None, :]
            Ut += tl.load(ub_ptr + cps[None, :] + ks[:, None] * 0, mask=mb, other=0.0).to(ACC)
    return Ut


# ------------------------------------------------------------------------------------------------------
# the image's Gram matrix (once per image set) and the backward from it
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _gram_kernel(x_ptr, gws_ptr, rho_ptr, Ci, TCi, H, W, HWp, Wp, Ho, Wo, MW, CHUNK, CHUNKS, stride, pad,
                 KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                 BLOCK_W: tl.constexpr):
    """gws[t, k] = (C_D, S_D) of the rows of chunk k of task t (the four outputs of each of its
    windows): C_D = sum D^T D ((KP, KP), row-major) and S_D = sum D (KP), D = P' - rho' (0 on masked
    rows), rho' = P' under the centre output (Ho/2, Wo/2) of the task's first image, which the chunk-0
    program stores in rho[t]. The products in strict precision whatever the convolutions' setting: the
    matrix is formed once per image set and its rounding reaches every weight gradient."""
    t = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    ks, ci, p, q = _taps(KK, KW, KP)
    rows = tl.arange(0, BLOCK_W)
    zero = rows * 0
    # every row the centre patch, rows > 0 masked (0): the column sums are the patch
    rho = tl.sum(_patch(x_ptr, zero, zero + Ho // 2, zero + Wo // 2, rows == 0, t, ks, ci, p, q, Ci, TCi, H, W,
                        stride, pad, K, ACC), axis=0)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    G = tl.zeros([KP, KP], dtype=ACC)
    S = tl.zeros([BLOCK_W, KP], dtype=ACC)
    for s in range(begin, end, BLOCK_W):
        j = s + rows
        mask = j < end
        i, _rem, ph, pw = _windows(j, HWp, Wp)
        for d in tl.static_range(4):  # unrolled, as `_bwd_kernel`'s: the window step is the hot loop
            P = _patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W, stride,
                       pad, K, ACC)
            D = tl.where(mask[:, None], P - rho[None, :], 0.0)
            S += D
            G += tl.dot(tl.trans(D), D, input_precision="ieee", out_dtype=ACC)
    base = gws_ptr + (t * CHUNKS + k) * (KP * KP + KP)
    tl.store(base + ks[:, None] * KP + ks[None, :], G)
    tl.store(base + KP * KP + ks, tl.sum(S, axis=0))
    if k == 0:
        tl.store(rho_ptr + t * KP + ks, rho)


@triton.jit
def _outer_sum(D, G, PREC: tl.constexpr, ACC: tl.constexpr):
    """D^T G, (KP, BLOCK_C), summed over the BLOCK_W rows of D (BLOCK_W, KP) and G (BLOCK_W, BLOCK_C): a
    matrix product; in float64 as broadcast products and a row sum instead, because Triton (3.6 and
    3.7.1) cannot lower this product in float64 for sm_90: its fp64 MMA path asserts "fp64 don't support
    largeK MMA" at compile time (found by the device run of 2026-12-04; tests/test_static_metrics.py
    compiles the fused kernels in float64)."""
    if ACC == tl.float64:
        return tl.sum(D[:, :, None] * G[:, None, :], axis=0)
    else:
        return _product(tl.trans(D), G, PREC, ACC)


@triton.jit
def _bwd_kernel(gout_ptr, gout2_ptr, sel_ptr, zsel_ptr, x_ptr, rho_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr,
                ws_ptr, wws_ptr, C, CB, Ci, TC, TCi, H, W, HWp, Wp, MW, CHUNK, CHUNKS, stride, pad, slope_hi,
                slope_lo, KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                GAMMA_PER_TASK: tl.constexpr, PREC: tl.constexpr, BLOCK_W: tl.constexpr,
                BLOCK_C: tl.constexpr, HAS_G2: tl.constexpr):
    """The backward's one pass over the windows of chunk k of its columns: g = a gout at each window's
    maximum (a, xhat from zsel: `_act`'s arithmetic), ws[cp, k, :2] = (sum g, sum g xhat), and
    wws[cp, k] = Q_D = sum over the four outputs d of D_d^T (g where sel = d), D_d = P'_d - rho' (KP
    values per column; the masked rows have g = 0). No convolution: the rest of the weight gradient
    comes from the image's Gram matrix in `_bwd_finish_kernel`."""
    t, cs, cps, cmask, k = _program(C, BLOCK_C, CB)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _params(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cs, cps, cmask, GAMMA_PER_TASK,
                                 ACC)
    ks, ci, p, q = _taps(KK, KW, KP)
    rho = tl.load(rho_ptr + t * KP + ks).to(ACC)
    acc = tl.zeros([KP, BLOCK_C], dtype=ACC)
    sg = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    sgx = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    for s in range(begin, end, BLOCK_W):
        mask, m2d, i, ph, pw, pool_off, go, sel = _backward_step(gout_ptr, gout2_ptr, sel_ptr, s, end, cps, cmask,
                                                                 TC, HWp, Wp, BLOCK_W, HAS_G2, ACC)
        xh, a, _zz = _act(tl.load(zsel_ptr + pool_off, mask=m2d, other=0.0), mu, r, ga, be, slope)
        g = a * go  # go is 0 where masked
        sg += g
        sgx += g * xh
        # unrolled: the window step is the hot loop (a loop over d is software-pipelined by the compiler,
        # and its window step then runs ~470 instructions outside it; bench/NOTES.md)
        for d in tl.static_range(4):
            P = _patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W,
                       stride, pad, K, ACC)
            acc += _outer_sum(P - rho[None, :], tl.where(sel == d, g, 0.0), PREC, ACC)
    base = ws_ptr + (cps * CHUNKS + k) * 2
    tl.store(base, tl.sum(sg, axis=0), mask=cmask)
    tl.store(base + 1, tl.sum(sgx, axis=0), mask=cmask)
    tl.store(wws_ptr + (cps[None, :] * CHUNKS + k) * KP + ks[:, None], acc, mask=cmask[None, :])


@triton.jit
def _bwd_sums(ws_ptr, wws_ptr, cp, CHUNKS, KP: tl.constexpr, KSTEP: tl.constexpr):
    """(Q_D (KP,), Sg, Sgx) of column cp: `_bwd_kernel`'s chunk partials added in chunk order, KSTEP
    chunks at a time."""
    kk = tl.arange(0, KSTEP)
    ks = tl.arange(0, KP)
    acc = tl.zeros([KSTEP, KP], dtype=wws_ptr.dtype.element_ty)
    for k0 in range(0, CHUNKS, KSTEP):
        acc += tl.load(wws_ptr + (cp * CHUNKS + k0 + kk[:, None]) * KP + ks[None, :],
                       mask=((k0 + kk) < CHUNKS)[:, None], other=0.0)
    return tl.sum(acc, axis=0), _col_sum(ws_ptr, cp, CHUNKS, 0, 2, KSTEP), _col_sum(ws_ptr, cp, CHUNKS, 1, 2, KSTEP)


@triton.jit
def _task_sum(gs_ptr, cnt_ptr, out_ptr, c, t, C, T, v, NV: tl.constexpr):
    """Where gamma is shared by the tasks: channel c's sums over the tasks of the per-column values v (NV
    scalars, NV = 1 or 2) that its T programs (c, t) computed. Each stores its values at gs[(t C + c) NV + j];
    the last of the channel's programs to take a ticket on cnt[c] (`_last_ticket`) adds them in task
    order 0..T-1 (the order of a loop over the tasks: the same bits), writes out[j C + c] and sets the
    counter back to zero."""
    js = tl.arange(0, 2)
    jm = js < NV
    tl.store(gs_ptr + (t * C + c) * NV + js, v, mask=jm)
    if _last_ticket(cnt_ptr + c, T):
        tot = tl.load(gs_ptr + c * NV + js, mask=jm, other=0.0, cache_modifier=".cg")
        for j in tl.range(1, T, num_stages=1):
            tot += tl.load(gs_ptr + (j * C + c) * NV + js, mask=jm, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + js * C + c, tot.to(out_ptr.dtype.element_ty), mask=jm)
        tl.store(cnt_ptr + c, 0)


@triton.jit
def _bwd_finish_kernel(ws_ptr, wws_ptr, gram_ptr, rho_ptr, w_ptr, b_ptr, gamma_ptr, mean_ptr, invstd_ptr, dw_ptr,
                       db_ptr, dgb_ptr, gs_ptr, cnt_ptr, C, T, CHUNKS, MW, W_TS, B_TS, K: tl.constexpr,
                       KP: tl.constexpr, HAS_B: tl.constexpr, GAMMA_PER_TASK: tl.constexpr, KSTEP: tl.constexpr):
    """Program (c, t): Q_D, Sg, Sgx of column cp = t C + c added in chunk order, then
    dw'[:, cp] = gamma r [Q_D - (Sg/N) S_D - (Sgx/N) r (C_D w' + (rho'.w' - mean) S_D)] (N = 4 Mw; C_D,
    S_D, rho' the task's Gram terms) split into dw[t, c] and dbias[t, c]; dgamma = Sgx, dbeta = Sg
    (dgb = [dgamma, dbeta], each of gamma's shape), per task, or for a shared gamma added over the tasks
    in task order by the channel's last program (`_task_sum`)."""
    c = tl.program_id(0)
    t = tl.program_id(1)
    ACC = wws_ptr.dtype.element_ty
    ks = tl.arange(0, KP)
    Mf = _to_acc(4 * MW, ACC)
    cp = t * C + c
    qd, Sg, Sgx = _bwd_sums(ws_ptr, wws_ptr, cp, CHUNKS, KP, KSTEP)
    wv = _wcol(w_ptr, b_ptr, t, c, W_TS, B_TS, ks, K, HAS_B, ACC)
    cd, sd, rho = _gram_terms(gram_ptr, rho_ptr, t, ks, KP)
    if GAMMA_PER_TASK:
        ga = tl.load(gamma_ptr + cp).to(ACC)
    else:
        ga = tl.load(gamma_ptr + c).to(ACC)
    r = tl.load(invstd_ptr + cp).to(ACC)
    mu = tl.load(mean_ptr + cp).to(ACC)
    rd = tl.sum(cd * wv[None, :], axis=1) + (tl.sum(rho * wv, axis=0) - mu) * sd
    tot = ga * r * (qd - (Sg / Mf) * sd - (Sgx / Mf) * r * rd)
    tl.store(dw_ptr + cp * K + ks, tot.to(dw_ptr.dtype.element_ty), mask=ks < K)
    if HAS_B:
        tl.store(db_ptr + cp + ks * 0, tot.to(db_ptr.dtype.element_ty), mask=ks == K)
    if GAMMA_PER_TASK:
        tl.store(dgb_ptr + cp, Sgx.to(dgb_ptr.dtype.element_ty))
        tl.store(dgb_ptr + T * C + cp, Sg.to(dgb_ptr.dtype.element_ty))
    else:
        _task_sum(gs_ptr, cnt_ptr, dgb_ptr, c, t, C, T, tl.where(tl.arange(0, 2) == 0, Sgx, Sg), 2)


@triton.jit
def _dbwd_finish_kernel(ws_ptr, wws_ptr, gram_ptr, rho_ptr, w_ptr, b_ptr, uw_ptr, ub_ptr, ugam_ptr, ubet_ptr,
                        gamma_ptr, mean_ptr, invstd_ptr, coef_ptr, dw_ptr, db_ptr, dgamma_ptr, gs_ptr, cnt_ptr, C, T,
                        CHUNKS, MW, W_TS, B_TS, K: tl.constexpr, KP: tl.constexpr, HAS_B: tl.constexpr,
                        HAS_UW: tl.constexpr, HAS_UB: tl.constexpr, HAS_UG: tl.constexpr,
                        HAS_UBETA: tl.constexpr, GAMMA_PER_TASK: tl.constexpr, KSTEP: tl.constexpr):
    """Program (c, t), column cp = t C + c: the double backward's sums from the backward's
    pass (Sg, Sgx, Q_D of gout: `_bwd_kernel`) and the image's Gram terms, no convolution. With
    u = P' U' = D U' + a (a = rho'.U'), z - mean = D w' + delta (delta = rho'.w' - mean), s = S_D.U':
    Su = s + N a, Sux = r (U'^T C_D w' + delta s), Sug = Q_D.U' + a Sg (sum (z - mean) = 0 removes
    the a terms of Sux); then per_step_bn's coefficients (`_dbwd_coef`), and, since sum gz = 0 (the batch
    norm's output does not change when z moves by a constant), d(w') = sum P'^T gz = sum D^T gz =
    eu (C_D U' + a S_D) + eg Q_D + ex r (C_D w' + delta S_D) + e0 S_D, split into d(w), d(bias) (D's
    bias column: 0, the exact value); d(gamma) = r M Q, per task, or for a shared gamma added in task
    order by the channel's last program (`_task_sum`); coef[cp] = (cu, cx, c0) for
    `_dbwd_dgout_kernel`."""
    c = tl.program_id(0)
    t = tl.program_id(1)
    ACC = wws_ptr.dtype.element_ty
    ks = tl.arange(0, KP)
    Mf = _to_acc(4 * MW, ACC)
    cp = t * C + c
    qd, Sg, Sgx = _bwd_sums(ws_ptr, wws_ptr, cp, CHUNKS, KP, KSTEP)
    wv = _wcol(w_ptr, b_ptr, t, c, W_TS, B_TS, ks, K, HAS_B, ACC)
    uv = tl.zeros([KP], dtype=ACC)
    if HAS_UW:
        uv += tl.load(uw_ptr + cp * K + ks, mask=ks < K, other=0.0).to(ACC)
    if HAS_UB:
        uv += tl.load(ub_ptr + cp + ks * 0, mask=ks == K, other=0.0).to(ACC)
    cd, sd, rho = _gram_terms(gram_ptr, rho_ptr, t, ks, KP)
    if GAMMA_PER_TASK:
        gi = cp
    else:
        gi = c
    ga = tl.load(gamma_ptr + gi).to(ACC)
    ugam = tl.zeros([], dtype=ACC)
    ubet = tl.zeros([], dtype=ACC)
    if HAS_UG:
        ugam += tl.load(ugam_ptr + gi).to(ACC)
    if HAS_UBETA:
        ubet += tl.load(ubet_ptr + gi).to(ACC)
    r = tl.load(invstd_ptr + cp).to(ACC)
    mu = tl.load(mean_ptr + cp).to(ACC)
    a = tl.sum(rho * uv, axis=0)
    delta = tl.sum(rho * wv, axis=0) - mu
    s = tl.sum(sd * uv, axis=0)
    cw = tl.sum(cd * wv[None, :], axis=1)
    cu_v = tl.sum(cd * uv[None, :], axis=1)
    Su = s + Mf * a
    Sux = r * (tl.sum(uv * cw, axis=0) + delta * s)
    Sug = tl.sum(qd * uv, axis=0) + a * Sg
    cu, cx, c0, eu, eg, ex, e0, ggam = _dbwd_coef(Sg, Sgx, Su, Sux, Sug, Mf, ga, r, ugam, ubet)
    tot = eu * (cu_v + a * sd) + eg * qd + ex * r * (cw + delta * sd) + e0 * sd
    tl.store(dw_ptr + cp * K + ks, tot.to(dw_ptr.dtype.element_ty), mask=ks < K)
    if HAS_B:
        tl.store(db_ptr + cp + ks * 0, tot.to(db_ptr.dtype.element_ty), mask=ks == K)
    tl.store(coef_ptr + cp * 3, cu)
    tl.store(coef_ptr + cp * 3 + 1, cx)
    tl.store(coef_ptr + cp * 3 + 2, c0)
    if GAMMA_PER_TASK:
        tl.store(dgamma_ptr + cp, ggam.to(dgamma_ptr.dtype.element_ty))
    else:
        _task_sum(gs_ptr, cnt_ptr, dgamma_ptr, c, t, C, T, ggam + tl.zeros([2], dtype=ACC), 1)


@triton.jit
def _dbwd_dgout_kernel(sel_ptr, zsel_ptr, x_ptr, uw_ptr, ub_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr,
                       coef_ptr, dgout_ptr, C, CB, Ci, TC, TCi, H, W, HWp, Wp, MW, CHUNK, CHUNKS, stride, pad,
                       slope_hi, slope_lo, KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr,
                       KP: tl.constexpr, GAMMA_PER_TASK: tl.constexpr, HAS_UW: tl.constexpr,
                       HAS_UB: tl.constexpr, PREC: tl.constexpr, BLOCK_W: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """d(gout) = a (cu u + cx xhat + c0) at each window's maximum, one pass over the windows of chunk k
    of its columns: u = P' U' at the four outputs (one product each), kept where sel = d; xhat and the
    leaky-ReLU factor a from zsel; (cu, cx, c0) from `_dbwd_finish_kernel`."""
    t, cs, cps, cmask, k = _program(C, BLOCK_C, CB)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _params(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cs, cps, cmask, GAMMA_PER_TASK,
                                 ACC)
    cu = tl.load(coef_ptr + cps * 3, mask=cmask, other=0.0)[None, :]
    cx = tl.load(coef_ptr + cps * 3 + 1, mask=cmask, other=0.0)[None, :]
    c0 = tl.load(coef_ptr + cps * 3 + 2, mask=cmask, other=0.0)[None, :]
    ks, ci, p, q = _taps(KK, KW, KP)
    Ut = _uvec(uw_ptr, ub_ptr, cps, cmask, ks, K, HAS_UW, HAS_UB, ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    rows = tl.arange(0, BLOCK_W)
    for s in range(begin, end, BLOCK_W):
        j = s + rows
        mask = j < end
        i, rem, ph, pw = _windows(j, HWp, Wp)
        off = (i.to(tl.int64)[:, None] * TC + cps[None, :]) * HWp + rem[:, None]
        om = mask[:, None] & cmask[None, :]
        sel = tl.load(sel_ptr + off, mask=om, other=0).to(tl.int32)
        us = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        for d in tl.static_range(4):  # unrolled: the window step is the hot loop (as `_bwd_kernel`'s)
            u = _zdot(_patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W,
                             stride, pad, K, ACC), Ut, PREC, ACC)
            us = tl.where(sel == d, u, us)
        xh, a, _zz = _act(tl.load(zsel_ptr + off, mask=om, other=0.0), mu, r, ga, be, slope)
        tl.store(dgout_ptr + off, (a * (cu * us + cx * xh + c0)).to(dgout_ptr.dtype.element_ty), mask=om)


# ------------------------------------------------------------------------------------------------------
# host functions (the implementation protocol of mamlpp_fast.ops.conv_block: forward, backward,
# double_backward)
# ------------------------------------------------------------------------------------------------------
def _geometry(x, w_shape, meta):
    t, stride, pad = meta[0], meta[1], meta[2]
    n, tci, h, wd = x.shape
    _, c, ci, kh, kw = w_shape
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton conv_bn_pool: float32 or float64 only, got {x.dtype}")
    if ho % 2 or wo % 2:
        raise ValueError(f"triton conv_bn_pool: the convolution output {ho}x{wo} must be of even size")
    k = ci * kh * kw
    kp = max(16, triton.next_power_of_2(k + 1))
    hp, wp = ho // 2, wo // 2
    g = dict(n=n, t=t, c=c, ci=ci, tc=t * c, tci=tci, h=h, w=wd, hp=hp, wp=wp, mw=n * hp * wp, k=k, kp=kp,
             kk=kh * kw, kw=kw, stride=stride, pad=pad)
    g["cfg"] = block_config(g["mw"], t, c, kp, x.device)
    return g


def _task_rows(w, bias):
    """(w, its task stride, bias or w, its task stride) as the kernels read them: each task's (C, K)
    weight rows (and C biases) contiguous, the task stride free, so that a weight expanded over the
    tasks (stride 0: the fast weights of step 0) is read in place instead of copied."""
    t, c, ci, kh, kw = w.shape
    k = ci * kh * kw
    if w.stride()[1:] != (k, kh * kw, kw, 1):  # a task's rows not contiguous: copied
        w = w.contiguous()
    b, b_ts = w, 0
    if bias is not None:
        b = bias if bias.stride(1) == 1 else bias.contiguous()
        b_ts = b.stride(0)
    return w, w.stride(0) if t > 1 else c * k, b, b_ts


def _launch(g, prec, w_ts, b_ts):
    """(grid, geometry arguments, constants of the passes with one patch product per output and no
    weight-gradient accumulator (`_fwd_kernel`, `_dbwd_dgout_kernel`), constants of the backward's pass
    (`_bwd_kernel`)): their step width and warps (`block_config`; `num_warps` where a configuration
    names no pass's own)."""
    cfg = g["cfg"]
    grid = (g["t"] * cfg["CB"], cfg["CHUNKS"])
    geo = (g["c"], cfg["CB"], g["ci"], g["tc"], g["tci"], g["h"], g["w"], g["hp"] * g["wp"], g["wp"], g["mw"],
           cfg["CHUNK"], cfg["CHUNKS"], g["stride"], g["pad"], w_ts, b_ts)
    base = dict(KK=g["kk"], KW=g["kw"], K=g["k"], KP=g["kp"], PREC=prec, BLOCK_C=cfg["BLOCK_C"])
    const_f = dict(base, BLOCK_W=cfg.get("RBLOCK_W", cfg["BLOCK_W"]), num_warps=cfg.get("FWD_WARPS", cfg["num_warps"]))
    const_b = dict(base, BLOCK_W=cfg["BLOCK_W"], num_warps=cfg.get("BWD_WARPS", cfg["num_warps"]))
    return grid, geo, const_f, const_b


def forward(x, w, bias, gamma, beta, meta, stats=None):
    """(out, mean, invstd, aux) of conv_bn_pool; stats: `image_stats` of x (formed here when None).
    The statistics come from the image's Gram terms (`_fwd_stats_kernel`), then one pass over the
    windows (`_fwd_kernel`) computes z at their four outputs to pick each maximum and writes out.
    aux = (sel, zsel) for the backward passes: sel (int8, the shape of out), the position 0..3 of each
    window's maximum, which they read instead of finding it again, and zsel (out's shape and dtype),
    the convolution output there, from which the backward forms g and xhat at the maxima without a
    convolution."""
    g = _geometry(x, w.shape, meta)
    cfg = g["cfg"]
    gram, rho = image_stats(x, w.shape, meta) if stats is None else stats
    w, w_ts, b, b_ts = _task_rows(w, bias)
    gamma, beta = gamma.contiguous(), beta.contiguous()
    out = torch.empty(g["n"], g["tc"], g["hp"], g["wp"], dtype=x.dtype, device=x.device)
    sel = torch.empty(out.shape, dtype=torch.int8, device=x.device)
    zsel = torch.empty_like(out)
    mean = torch.empty(g["tc"], dtype=x.dtype, device=x.device)
    invstd = torch.empty_like(mean)
    eps_hi, eps_lo = _split(meta[3])
    sl_hi, sl_lo = _split(meta[4])
    _fwd_stats_kernel[(g["c"], g["t"])](gram, rho, w, b, mean, invstd, g["c"], g["t"], g["mw"], w_ts, b_ts, eps_hi, eps_lo,
                                 K=g["k"], KP=g["kp"], HAS_B=bias is not None, IS_F64=x.dtype == torch.float64,
                                 num_warps=1)
    grid, geo, const_f, _ = _launch(g, _precision(x.dtype), w_ts, b_ts)
    _fwd_kernel[grid](x, w, b, gamma, beta, mean, invstd, out, zsel, sel, *geo, sl_hi, sl_lo, HAS_B=bias is not None,
                      GAMMA_PER_TASK=gamma.dim() == 2, **const_f)
    return out, mean, invstd, (sel, zsel)


def image_stats(x, w_shape, meta):
    """(gram, rho) of image x for a block of weight shape `w_shape`: per task, gram[t] = (C_D (KP x KP,
    row-major), S_D (KP)) and rho[t] = rho' (`_gram_kernel`). They depend on x alone (and on the
    convolution's geometry): the backward of every call on the same image reads them, so a caller
    forms them once per image set (mamlpp_fast.ops.conv_block's ``image_cache``). Chunk partials added
    in chunk order by one reduction."""
    g = _geometry(x, w_shape, meta)
    cfg, kp = g["cfg"], g["kp"]
    chunk, chunks = cfg.get("GRAM_CHUNK", cfg["CHUNK"]), cfg.get("GRAM_CHUNKS", cfg["CHUNKS"])
    gws = torch.empty(g["t"], chunks, kp * kp + kp, dtype=x.dtype, device=x.device)
    rho = torch.empty(g["t"], kp, dtype=x.dtype, device=x.device)
    _gram_kernel[(g["t"], chunks)](x, gws, rho, g["ci"], g["tci"], g["h"], g["w"], g["hp"] * g["wp"], g["wp"],
                                   2 * g["hp"], 2 * g["wp"], g["mw"], chunk, chunks, g["stride"], g["pad"],
                                   KK=g["kk"], KW=g["kw"], K=g["k"], KP=kp, **gram_config(cfg))
    return gws.sum(1), rho


def _task_sums_workspace(g, x, nv, per_task):
    """(gs, cnt) of a finishing kernel (`_task_sum`): the per-column values gs (T x C x nv, x's dtype) and
    one ticket counter per channel, where gamma is shared by the tasks; placeholders otherwise."""
    if per_task:
        return x, _tile_counters(x.device, 1)
    return (torch.empty(g["t"] * g["c"] * nv, dtype=x.dtype, device=x.device),
            _tile_counters(x.device, g["c"]))


def backward(gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, gout2=None, stats=None):
    """(dw, dbias or None, dgamma, dbeta) of conv_bn_pool; aux: the forward's (sel, zsel); gout2: a second
    gradient of the output (gout's shape, contiguous), added to gout where the kernels load it, or None;
    stats: `image_stats` of x (formed here when None). One pass over the windows (`_bwd_kernel`) and
    the finishing kernel, which adds the image's Gram terms (`_bwd_finish_kernel`)."""
    sel, zsel = aux
    g = _geometry(x, w.shape, meta)
    if gout2 is not None and (gout2.shape != gout.shape or not gout2.is_contiguous() or not gout.is_contiguous()):
        raise ValueError(f"triton conv_bn_pool: gout2 {tuple(gout2.shape)} must be contiguous like gout "
                         f"{tuple(gout.shape)}")
    gram, rho = image_stats(x, w.shape, meta) if stats is None else stats
    cfg = g["cfg"]
    w, w_ts, b, b_ts = _task_rows(w, bias)
    gamma, beta = gamma.contiguous(), beta.contiguous()
    ws = torch.empty(g["tc"] * cfg["CHUNKS"] * 2, dtype=x.dtype, device=x.device)
    wws = torch.empty(g["tc"] * cfg["CHUNKS"] * g["kp"], dtype=x.dtype, device=x.device)
    grid, geo, _, const_b = _launch(g, _precision(x.dtype), w_ts, b_ts)
    sl_hi, sl_lo = _split(meta[4])
    per_task = gamma.dim() == 2
    _bwd_kernel[grid](gout, gout if gout2 is None else gout2, sel, zsel, x, rho, gamma, beta, mean, invstd, ws, wws,
                      *geo[:-2], sl_hi, sl_lo, GAMMA_PER_TASK=per_task, HAS_G2=gout2 is not None, **const_b)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    db = torch.empty(g["t"], g["c"], dtype=x.dtype, device=x.device) if bias is not None else None
    dgb = torch.empty(2, *gamma.shape, dtype=gamma.dtype, device=gamma.device)  # [dgamma, dbeta]
    gs, cnt = _task_sums_workspace(g, x, 2, per_task)
    _bwd_finish_kernel[(g["c"], g["t"])](ws, wws, gram, rho, w, b, gamma, mean, invstd, dw,
                                         db if db is not None else dw, dgb, gs, cnt, g["c"], g["t"], cfg["CHUNKS"],
                                         g["mw"], w_ts, b_ts, K=g["k"], KP=g["kp"], HAS_B=bias is not None,
                                         GAMMA_PER_TASK=per_task, KSTEP=_KSTEP, num_warps=1)
    return dw, db, dgb[0], dgb[1]


def double_backward(uw, ubias, ugamma, ubeta, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, stats=None):
    """(d gout, d w, d bias or None, d gamma) of conv_bn_pool's backward; aux: the forward's (sel, zsel);
    stats: `image_stats` of x (formed here when None). The backward's pass for gout (`_bwd_kernel`: Sg,
    Sgx, Q_D), the sums, coefficients and weight and gamma gradients from the image's Gram terms
    (`_dbwd_finish_kernel`), then d(gout) (`_dbwd_dgout_kernel`)."""
    sel, zsel = aux
    g = _geometry(x, w.shape, meta)
    gram, rho = image_stats(x, w.shape, meta) if stats is None else stats
    cfg = g["cfg"]
    w, w_ts, b, b_ts = _task_rows(w, bias)
    gamma, beta = gamma.contiguous(), beta.contiguous()
    gout = gout.contiguous()
    ws = torch.empty(g["tc"] * cfg["CHUNKS"] * 2, dtype=x.dtype, device=x.device)
    wws = torch.empty(g["tc"] * cfg["CHUNKS"] * g["kp"], dtype=x.dtype, device=x.device)
    prec = _precision(x.dtype)
    grid, geo, const_f, const_b = _launch(g, prec, w_ts, b_ts)
    sl_hi, sl_lo = _split(meta[4])
    per_task = gamma.dim() == 2
    _bwd_kernel[grid](gout, gout, sel, zsel, x, rho, gamma, beta, mean, invstd, ws, wws, *geo[:-2], sl_hi, sl_lo,
                      GAMMA_PER_TASK=per_task, HAS_G2=False, **const_b)
    uw_t = uw.contiguous() if uw is not None else w
    ub_t = ubias.contiguous() if ubias is not None else w
    ug = ugamma.contiguous() if ugamma is not None else gamma
    ubt = ubeta.contiguous() if ubeta is not None else gamma
    coef = torch.empty(g["tc"] * 3, dtype=x.dtype, device=x.device)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    db = torch.empty(g["t"], g["c"], dtype=x.dtype, device=x.device) if bias is not None else None
    dgamma = torch.empty_like(gamma)
    gs, cnt = _task_sums_workspace(g, x, 1, per_task)
    _dbwd_finish_kernel[(g["c"], g["t"])](ws, wws, gram, rho, w, b, uw_t, ub_t, ug, ubt, gamma, mean, invstd, coef,
                                          dw, db if db is not None else dw, dgamma, gs, cnt, g["c"], g["t"],
                                          cfg["CHUNKS"], g["mw"], w_ts, b_ts, K=g["k"], KP=g["kp"],
                                          HAS_B=bias is not None, HAS_UW=uw is not None, HAS_UB=ubias is not None,
                                          HAS_UG=ugamma is not None, HAS_UBETA=ubeta is not None,
                                          GAMMA_PER_TASK=per_task, KSTEP=_KSTEP, num_warps=1)
    dgout = torch.empty_like(gout)
    _dbwd_dgout_kernel[grid](sel, zsel, x, uw_t, ub_t, gamma, beta, mean, invstd, coef, dgout, *geo[:-2], sl_hi, sl_lo,
                             GAMMA_PER_TASK=per_task, HAS_UW=uw is not None, HAS_UB=ubias is not None, **const_f)
    return dgout, dw, db, dgamma
