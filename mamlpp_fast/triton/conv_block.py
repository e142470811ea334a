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
config key conv_precision / allow_tf32 ask (triton/conv.py `_precision`), float64 in float64. The weight gradients are products of the same kind:
dW' += P'^T gz. The tap decomposition k -> (ci, p, q) is computed once per program on the KP axis.

Each op is two passes over the grid (T * channel blocks, CHUNKS), like the batch norm's kernels: a
reduction of its chunk of each column to a few sums into a workspace, then an apply pass that adds the
chunk sums of its columns in chunk order. A small last kernel (`_finish_kernel`, one program per
channel) adds the programs' partial weight gradients (a (TC, CHUNKS, KP) workspace) in chunk order and
forms the gamma/beta gradients from the column sums, per task or added in task order for a shared gamma.
No atomics: results are reproducible.

- forward:   reduce: per chunk and column, sums of z - ref and (z - ref)^2 (ref = the column's first
             output in the chunk), turned into (mean, m2), and per window `sel`, the position 0..3
             (int8) of its largest y, and `zsel`, z there: y is monotone in z (non-decreasing for
             gamma > 0, non-increasing for gamma < 0, constant for gamma = 0), so the largest y is at
             the first largest sign(gamma) z, found without the statistics; the backward passes read
             sel instead of finding the maximum again. apply (elementwise over pooled tensors, no
             convolution): Chan's merge of the chunks -> mean, invstd; out = y(zsel).
- backward:  reduce: (sum g, sum g xhat), g = a gout at the window's maximum, 0 at its other outputs:
             a pass over the pooled tensors gout and zsel, no convolution (`_bwd_sums_kernel`);
             apply: dz = gamma r (g - gbar - xhat m) at the 4 outputs, dw' += P'^T dz;
             finish: dw, dbias; dgamma = sum g xhat, dbeta = sum g.
- double backward: reduce: (sum g, sum g xhat, sum u, sum u xhat, sum u g) with u = P' U';
             apply: d(gout) = a (cu u + cx xhat + c0) at the maximum, gz = eu u + eg g + ex xhat + e0 at
             the 4 outputs, d(w') += P'^T gz; finish: d(w), d(bias), d(gamma) = r M Q.

Launch configuration from `block_config` (no autotune: the kernels also run under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import num_sms
from . import conv as _conv
from .conv import _precision
from .per_step_bn import _dbwd_coef, _f2acc, _split, _to_acc

__all__ = ["forward", "backward", "double_backward", "block_config", "name"]

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

    - BLOCK_C: channels per program (`_channel_tile`); BLOCK_W = 16 windows per step in the apply
      passes of the backward and double backward (they hold the weight-gradient accumulator), on 8 warps
      for 64 channels, else 4; REDUCE_WARPS = 4, the warps of the reductions with products (the
      forward's and the double backward's); RBLOCK_W = 16 windows per step in the forward's reduction
      (32 raised its loop's FFMA share by 6-16 points under Triton 3.6 while it only formed the sums;
      since it also tracks each window's maximum, 32-window steps spill under 3.6: 140 B with Omniglot's
      16-wide patches, 672 B with mini-ImageNet's 32-wide; bench/NOTES.md). The passes without products
      (the forward's apply, the backward's reduction) take `pooled_config`. The four outputs of a window
      step are a loop, not unrolled, so one output's tiles are live at a time. Chosen from the sm_90a compile (bench.static_metrics,
      bench/NOTES.md: cut 3b and the block's passes); as configured no kernel spills under the Triton
      versions we compile with (tests/test_static_metrics.py). `kp` (the patch width) enters no rule now;
      the signature keeps it for the callers that pass it.
    - BWD_APPLY_WARPS: the backward's apply pass on 4 warps under Triton < 3.7 (16 weight-gradient
      accumulators per thread instead of 8: its loop 58 -> 65% FFMA on mini-ImageNet's block, 50 -> 57% on
      Omniglot's, no spill under 3.6; under 3.7.1 mini-ImageNet's spilled 64 B), else `num_warps`; the
      double backward's apply pass spilled on 4 warps and keeps `num_warps`.
    - CHUNKS: window chunks per (task, channel block), so that the grid holds ~4 programs per SM, each
      with at least 2 steps; at most 256. On the interpreter (CPU tensors, no `sms`) up to 3, so that
      tests cover the merge of several chunks.
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
    warps = 8 if bc == 64 else 4
    return dict(BLOCK_W=bw, BLOCK_C=bc, CB=triton.cdiv(c, bc), CHUNK=chunk, CHUNKS=chunks, num_warps=warps,
                # the version read at call time: bench.trace --triton-configs sets it on the conv module
                REDUCE_WARPS=4, RBLOCK_W=16,
                BWD_APPLY_WARPS=4 if _conv._TRITON_VERSION < (3, 7) else warps)


def pooled_config(cfg: dict) -> dict:
    """Launch constants of the passes elementwise over pooled tensors (the forward's apply pass
    `_fwd_apply_kernel`, the backward's reduction `_bwd_sums_kernel`; on the grid of the other passes):
    BLOCK_C x 32 tiles on 4 warps, i.e. 16 elements of each tensor per thread with 64 channels, 32
    windows (128 bytes of a column) per warp row."""
    return dict(BLOCK_W=32, num_warps=4)


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
def _chunk_outputs(kc, CHUNK, CHUNKS, MW, ACC: tl.constexpr):
    """Convolution outputs (4 per window) of chunks kc (0 beyond the last chunk)."""
    kb = tl.minimum(kc * CHUNK, MW)
    return tl.where(kc < CHUNKS, 4 * (tl.minimum(kb + CHUNK, MW) - kb), 0).to(ACC)


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
    """xhat, the leaky-ReLU factor a and y = a (gamma xhat + beta), in the batch norm's order
    (per-channel vectors broadcast over the rows)."""
    xhat = (z - mu[None, :]) * r[None, :]
    zz = ga[None, :] * xhat + be[None, :]
    a = tl.where(zz > 0, 1.0, slope).to(z.dtype)
    return xhat, a, a * zz


@triton.jit
def _col_sums(ws_ptr, cps, cmask, CHUNKS, i, NSUM: tl.constexpr, KSTEP: tl.constexpr):
    """(BLOCK_C,) vector: statistic i of each column, summed over its chunks, KSTEP chunks at a time
    (a fixed order; a tile of all chunks at once spilled under Triton 3.6 with ~100 chunks)."""
    kk = tl.arange(0, KSTEP)
    acc = tl.zeros([KSTEP, cps.shape[0]], dtype=ws_ptr.dtype.element_ty)
    for k0 in range(0, CHUNKS, KSTEP):
        m = ((k0 + kk) < CHUNKS)[:, None] & cmask[None, :]
        acc += tl.load(ws_ptr + (cps[None, :] * CHUNKS + k0 + kk[:, None]) * NSUM + i, mask=m, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _col_sum(ws_ptr, cp, CHUNKS, i, NSUM: tl.constexpr, KSTEP: tl.constexpr):
    """Statistic i of column cp summed over its chunks (a scalar; `_col_sums`' order)."""
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
    return tl.dot(P, Wt, input_precision=PREC, out_dtype=ACC)


# ------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _sign(v):
    """-1, 0 or 1 (v's dtype)."""
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(v.dtype)


@triton.jit
def _fwd_reduce_kernel(x_ptr, w_ptr, b_ptr, gamma_ptr, ws_ptr, zsel_ptr, sel_ptr, C, CB, Ci, TC, TCi, H, W, HWp,
                       Wp, MW, CHUNK, CHUNKS, stride, pad, W_TS, B_TS, KK: tl.constexpr, KW: tl.constexpr,
                       K: tl.constexpr, KP: tl.constexpr, HAS_B: tl.constexpr, GAMMA_PER_TASK: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """ws[cp, k, :] = (mean, m2) of the convolution outputs of chunk k of column cp: sums of z - ref and
    (z - ref)^2 with ref = the column's first output of the chunk (a shift that keeps the sums of
    squares small), turned into (mean, m2) at the end. Per window also the position of its largest y,
    found on z: sel = the first d of the largest s z_d, s = sign(gamma) (y is a non-decreasing function
    of s z; s = 0: all four y equal, d = 0), and zsel = z there."""
    t, cs, cps, cmask, k = _program(C, BLOCK_C, CB)
    ACC = x_ptr.dtype.element_ty
    if GAMMA_PER_TASK:
        gi = cps
    else:
        gi = cs
    sg = _sign(tl.load(gamma_ptr + gi, mask=cmask, other=0.0).to(ACC))[None, :]
    ks, ci, p, q = _taps(KK, KW, KP)
    Wt = _wtile(w_ptr, b_ptr, t * W_TS + cs * K, t * B_TS + cs, cmask, ks, K, HAS_B, ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    rows = tl.arange(0, BLOCK_W)
    j0 = begin + rows
    i0, _r0, ph0, pw0 = _windows(j0, HWp, Wp)
    z0 = _zdot(_patch(x_ptr, i0, 2 * ph0, 2 * pw0, j0 < end, t, ks, ci, p, q, Ci, TCi, H, W, stride, pad,
                      K, ACC), Wt, PREC, ACC)
    ref = tl.sum(tl.where((rows == 0)[:, None], z0, 0.0), axis=0)
    s1 = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    s2 = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    for s in range(begin, end, BLOCK_W):
        j = s + rows
        mask = j < end
        i, rem, ph, pw = _windows(j, HWp, Wp)
        best = tl.full([BLOCK_W, BLOCK_C], float("-inf"), dtype=ACC)  # the largest s z so far
        zb = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        sel = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.int32)
        for d in range(4):  # a loop, not unrolled: one output's tiles live at a time
            P = _patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W,
                       stride, pad, K, ACC)
            z = _zdot(P, Wt, PREC, ACC)
            dz = tl.where(mask[:, None], z - ref[None, :], 0.0)
            s1 += dz
            s2 += dz * dz
            key = sg * z
            upd = key > best  # strict: the first of equal keys stays (d = 0 always enters)
            best = tl.maximum(best, key)
            zb = tl.where(upd, z, zb)
            sel = tl.where(upd, d, sel)
        off = (i.to(tl.int64)[:, None] * TC + cps[None, :]) * HWp + rem[:, None]
        om = mask[:, None] & cmask[None, :]
        tl.store(zsel_ptr + off, zb, mask=om)
        tl.store(sel_ptr + off, sel.to(tl.int8), mask=om)
    n = (4 * (end - begin)).to(ACC)
    t1 = tl.sum(s1, axis=0)
    t2 = tl.sum(s2, axis=0)
    mean = ref + t1 / n
    m2 = t2 - t1 * (t1 / n)
    tl.store(ws_ptr + (cps * CHUNKS + k) * 2, mean, mask=cmask)
    tl.store(ws_ptr + (cps * CHUNKS + k) * 2 + 1, m2, mask=cmask)


@triton.jit
def _pooled_offsets(s, end, cps, cmask, TC, HWp, BLOCK_W: tl.constexpr):
    """Offsets and mask of a (channels, windows) tile of a pooled tensor (n, TC, Hp, Wp): windows
    s .. s+BLOCK_W (< end) of columns cps, windows along the threads, where a column's elements are
    adjacent in memory."""
    j = s + tl.arange(0, BLOCK_W)
    i = j // HWp
    off = (i.to(tl.int64)[None, :] * TC + cps[:, None]) * HWp + (j - i * HWp)[None, :]
    return off, cmask[:, None] & (j < end)[None, :]


@triton.jit
def _fwd_apply_kernel(zsel_ptr, gamma_ptr, beta_ptr, ws_ptr, out_ptr, mean_ptr, invstd_ptr, C, CB, TC, HWp, MW,
                      CHUNK, CHUNKS, eps_hi, eps_lo, slope_hi, slope_lo, GAMMA_PER_TASK: tl.constexpr,
                      IS_F64: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, KSTEP: tl.constexpr):
    """mean and invstd from the chunk states of `_fwd_reduce_kernel` (Chan's merge in chunk order; the
    chunk-0 programs store them), then out = y(zsel) over the program's chunk of windows: elementwise,
    no convolution (`_act`'s arithmetic on (channels, windows) tiles)."""
    t, cs, cps, cmask, k = _program(C, BLOCK_C, CB)
    ACC = zsel_ptr.dtype.element_ty
    eps = _f2acc(eps_hi, eps_lo, ACC)
    slope = _f2acc(slope_hi, slope_lo, ACC)
    # Chan merge of the chunk states (4 outputs per window), KSTEP chunks at a time
    Mf = _to_acc(4 * MW, ACC)
    kk = tl.arange(0, KSTEP)
    acc = tl.zeros([KSTEP, BLOCK_C], dtype=ACC)
    for k0 in range(0, CHUNKS, KSTEP):
        kc = k0 + kk
        kn = _chunk_outputs(kc, CHUNK, CHUNKS, MW, ACC)
        km = (kc < CHUNKS)[:, None] & cmask[None, :]
        pm = tl.load(ws_ptr + (cps[None, :] * CHUNKS + kc[:, None]) * 2, mask=km, other=0.0)
        acc += kn[:, None] * pm
    mu = tl.sum(acc, axis=0) / Mf
    acc = tl.zeros([KSTEP, BLOCK_C], dtype=ACC)
    for k0 in range(0, CHUNKS, KSTEP):
        kc = k0 + kk
        kn = _chunk_outputs(kc, CHUNK, CHUNKS, MW, ACC)
        km = (kc < CHUNKS)[:, None] & cmask[None, :]
        base = (cps[None, :] * CHUNKS + kc[:, None]) * 2
        pm = tl.load(ws_ptr + base, mask=km, other=0.0)
        pm2 = tl.load(ws_ptr + base + 1, mask=km, other=0.0)
        dmu = pm - mu[None, :]
        acc += pm2 + kn[:, None] * dmu * dmu
    m2 = tl.sum(acc, axis=0)
    if IS_F64:
        r = 1.0 / tl.sqrt(m2 / Mf + eps)
    else:
        r = 1.0 / tl.sqrt_rn(m2 / Mf + eps)
    if k == 0:
        tl.store(mean_ptr + cps, mu, mask=cmask)
        tl.store(invstd_ptr + cps, r, mask=cmask)
    _gi, ga, be = _gamma_beta(gamma_ptr, beta_ptr, cs, cps, cmask, GAMMA_PER_TASK, ACC)
    ga = ga[:, None]
    be = be[:, None]
    mu2 = mu[:, None]
    r2 = r[:, None]
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    for s in range(begin, end, BLOCK_W):
        off, m = _pooled_offsets(s, end, cps, cmask, TC, HWp, BLOCK_W)
        zz = ga * ((tl.load(zsel_ptr + off, mask=m, other=0.0) - mu2) * r2) + be
        y = tl.where(zz > 0, 1.0, slope).to(ACC) * zz
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


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


@triton.jit
def _bwd_sums_kernel(gout_ptr, gout2_ptr, zsel_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, ws_ptr, C, CB, TC,
                     HWp, MW, CHUNK, CHUNKS, slope_hi, slope_lo, GAMMA_PER_TASK: tl.constexpr,
                     HAS_G2: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The backward's reduction: ws[cp, k, :2] = (sum g, sum g xhat) over the windows of chunk k of
    column cp. g is a gout at each window's maximum and 0 at its other three outputs, so both sums run
    over the windows alone, from z at the maximum (zsel, kept by the forward's reduction): xhat =
    (zsel - mean) r, a = 1 if gamma xhat + beta > 0 else slope (`_act`'s arithmetic). No convolution."""
    t, cs, cps, cmask, k = _program(C, BLOCK_C, CB)
    ACC = zsel_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _params(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cs, cps, cmask, GAMMA_PER_TASK,
                                 ACC)
    ga, be, mu, r = ga[:, None], be[:, None], mu[:, None], r[:, None]
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    sg = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC)
    sgx = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC)
    for s in range(begin, end, BLOCK_W):
        off, m = _pooled_offsets(s, end, cps, cmask, TC, HWp, BLOCK_W)
        go = tl.load(gout_ptr + off, mask=m, other=0.0).to(ACC)
        if HAS_G2:
            go += tl.load(gout2_ptr + off, mask=m, other=0.0).to(ACC)
        xh = (tl.load(zsel_ptr + off, mask=m, other=0.0) - mu) * r
        g = tl.where(ga * xh + be > 0, 1.0, slope).to(ACC) * go  # go is 0 where masked
        sg += g
        sgx += g * xh
    base = ws_ptr + (cps * CHUNKS + k) * 2
    tl.store(base, tl.sum(sg, axis=1), mask=cmask)
    tl.store(base + 1, tl.sum(sgx, axis=1), mask=cmask)


@triton.jit
def _reduce_kernel(gout_ptr, gout2_ptr, sel_ptr, x_ptr, w_ptr, b_ptr, uw_ptr, ub_ptr, gamma_ptr, beta_ptr, mean_ptr,
                   invstd_ptr, ws_ptr, C, CB, Ci, TC, TCi, H, W, HWp, Wp, MW, CHUNK, CHUNKS, stride, pad,
                   W_TS, B_TS, slope_hi, slope_lo, KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr,
                   KP: tl.constexpr, HAS_B: tl.constexpr, GAMMA_PER_TASK: tl.constexpr,
                   NSUM: tl.constexpr, HAS_UW: tl.constexpr, HAS_UB: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, HAS_G2: tl.constexpr):
    """The double backward's reduction: ws[cp, k, :5] = (sum g, sum g xhat, sum u, sum u xhat, sum u g)
    over the windows of chunk k of column cp, u = P' U'; g = a gout at the window's maximum (`sel`, kept
    by the forward), 0 at its other outputs. (The backward's two sums: `_bwd_sums_kernel`; the NSUM = 2
    branches below are not launched.)"""
    t, cs, cps, cmask, k = _program(C, BLOCK_C, CB)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _params(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cs, cps, cmask, GAMMA_PER_TASK,
                                 ACC)
    ks, ci, p, q = _taps(KK, KW, KP)
    Wt = _wtile(w_ptr, b_ptr, t * W_TS + cs * K, t * B_TS + cs, cmask, ks, K, HAS_B, ACC)
    if NSUM == 5:
        Ut = _uvec(uw_ptr, ub_ptr, cps, cmask, ks, K, HAS_UW, HAS_UB, ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    sg = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    sgx = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    if NSUM == 5:
        su = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        sux = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        sug = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
    for s in range(begin, end, BLOCK_W):
        mask, m2d, i, ph, pw, pool_off, go, sel = _backward_step(gout_ptr, gout2_ptr, sel_ptr, s, end, cps, cmask,
                                                                 TC, HWp, Wp, BLOCK_W, HAS_G2, ACC)
        for d in range(4):  # a loop, not unrolled: one output's tiles live at a time
            P = _patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W,
                       stride, pad, K, ACC)
            xh, a, _y = _act(_zdot(P, Wt, PREC, ACC), mu, r, ga, be, slope)
            g = tl.where(sel == d, a * go, 0.0)  # go is 0 on masked rows
            sg += g
            sgx += g * xh
            if NSUM == 5:
                u = _zdot(P, Ut, PREC, ACC)  # 0 on masked rows (their patch is 0)
                su += u
                sux += tl.where(m2d, u * xh, 0.0)
                sug += u * g
    base = ws_ptr + (cps * CHUNKS + k) * NSUM
    tl.store(base, tl.sum(sg, axis=0), mask=cmask)
    tl.store(base + 1, tl.sum(sgx, axis=0), mask=cmask)
    if NSUM == 5:
        tl.store(base + 2, tl.sum(su, axis=0), mask=cmask)
        tl.store(base + 3, tl.sum(sux, axis=0), mask=cmask)
        tl.store(base + 4, tl.sum(sug, axis=0), mask=cmask)


@triton.jit
def _apply_kernel(gout_ptr, gout2_ptr, sel_ptr, x_ptr, w_ptr, b_ptr, uw_ptr, ub_ptr, ugam_ptr, ubet_ptr, gamma_ptr,
                  beta_ptr, mean_ptr, invstd_ptr, ws_ptr, wws_ptr, dgout_ptr,
                  C, CB, Ci, TC, TCi, H, W, HWp, Wp, MW, CHUNK, CHUNKS, stride, pad, W_TS, B_TS, slope_hi,
                  slope_lo, KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                  HAS_B: tl.constexpr, GAMMA_PER_TASK: tl.constexpr, NSUM: tl.constexpr,
                  HAS_UW: tl.constexpr, HAS_UB: tl.constexpr, HAS_UG: tl.constexpr, HAS_UBETA: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, KSTEP: tl.constexpr,
                  HAS_G2: tl.constexpr):
    """z-gradient gz = c_u u + c_x xhat + c_0 + c_g g at each of the windows' outputs, wws[cp, k] =
    sum gz P' (KP values per column), one pass over the four outputs (the maximum's position `sel`
    comes from the forward):
    NSUM = 2 (backward): gz = dz = gamma r (g - gbar - xhat m): c_u = 0, c_x = -gamma r m,
    c_0 = -gamma r gbar, c_g = gamma r;
    NSUM = 5 (double backward): gz = eu u + eg g + ex xhat + e0, and d(gout) = a (cu u + cx xhat + c0)
    at the maximum (per_step_bn `_dbwd_coef`)."""
    t, cs, cps, cmask, k = _program(C, BLOCK_C, CB)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    gi, ga, be, mu, r = _params(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cs, cps, cmask, GAMMA_PER_TASK,
                                ACC)
    Mf = _to_acc(4 * MW, ACC)
    Sg = _col_sums(ws_ptr, cps, cmask, CHUNKS, 0, NSUM, KSTEP)
    Sgx = _col_sums(ws_ptr, cps, cmask, CHUNKS, 1, NSUM, KSTEP)
    ks, ci, p, q = _taps(KK, KW, KP)
    Wt = _wtile(w_ptr, b_ptr, t * W_TS + cs * K, t * B_TS + cs, cmask, ks, K, HAS_B, ACC)
    if NSUM == 2:
        kk = ga * r
        c_x = -kk * (Sgx / Mf)
        c_0 = -kk * (Sg / Mf)
        c_g = kk
    else:
        Ut = _uvec(uw_ptr, ub_ptr, cps, cmask, ks, K, HAS_UW, HAS_UB, ACC)
        if HAS_UG:
            ugam = tl.load(ugam_ptr + gi, mask=cmask, other=0.0).to(ACC)
        else:
            ugam = tl.zeros_like(ga)
        if HAS_UBETA:
            ubet = tl.load(ubet_ptr + gi, mask=cmask, other=0.0).to(ACC)
        else:
            ubet = tl.zeros_like(ga)
        Su = _col_sums(ws_ptr, cps, cmask, CHUNKS, 2, 5, KSTEP)
        Sux = _col_sums(ws_ptr, cps, cmask, CHUNKS, 3, 5, KSTEP)
        Sug = _col_sums(ws_ptr, cps, cmask, CHUNKS, 4, 5, KSTEP)
        cu, cx, c0, eu, eg, ex, e0, _ggam = _dbwd_coef(Sg, Sgx, Su, Sux, Sug, Mf, ga, r, ugam, ubet)
        c_u, c_x, c_0, c_g = eu, ex, e0, eg
    acc = tl.zeros([KP, BLOCK_C], dtype=ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    for s in range(begin, end, BLOCK_W):
        mask, m2d, i, ph, pw, pool_off, go, sel = _backward_step(gout_ptr, gout2_ptr, sel_ptr, s, end, cps, cmask,
                                                                 TC, HWp, Wp, BLOCK_W, HAS_G2, ACC)
        if NSUM == 5:
            dgo = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        for d in range(4):  # a loop, not unrolled: one output's tiles live at a time
            P = _patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W,
                       stride, pad, K, ACC)
            xh, a, _y = _act(_zdot(P, Wt, PREC, ACC), mu, r, ga, be, slope)
            at_max = sel == d
            g = tl.where(at_max, a * go, 0.0)
            gz = c_x[None, :] * xh + c_0[None, :] + c_g[None, :] * g
            if NSUM == 5:
                u = _zdot(P, Ut, PREC, ACC)
                gz += c_u[None, :] * u
                dgo += tl.where(at_max, a * (cu[None, :] * u + cx[None, :] * xh + c0[None, :]), 0.0)
            gz = tl.where(m2d, gz, 0.0)
            acc += tl.dot(tl.trans(P), gz, input_precision=PREC, out_dtype=ACC)
        if NSUM == 5:
            tl.store(dgout_ptr + pool_off, dgo.to(dgout_ptr.dtype.element_ty), mask=m2d)
    off = (cps[None, :] * CHUNKS + k) * KP + ks[:, None]
    tl.store(wws_ptr + off, acc, mask=cmask[None, :])


@triton.jit
def _finish_kernel(ws_ptr, wws_ptr, invstd_ptr, dw_ptr, db_ptr, dgamma_ptr, dbeta_ptr, C, T, CHUNKS, MW,
                   K: tl.constexpr, KP: tl.constexpr, HAS_B: tl.constexpr, NSUM: tl.constexpr,
                   GAMMA_PER_TASK: tl.constexpr, KSTEP: tl.constexpr):
    """Program c: dw[t, c] and dbias[t, c] = the chunk partials of wws added in chunk order, for every
    task t; the gamma (and beta) gradients of channel c from the column sums: backward dgamma = sum g
    xhat, dbeta = sum g; double backward d(gamma) = r M Q (per_step_bn's formulas), per task or added
    in task order for a shared gamma."""
    c = tl.program_id(0)
    ACC = wws_ptr.dtype.element_ty
    kk = tl.arange(0, KSTEP)
    ks = tl.arange(0, KP)
    Mf = _to_acc(4 * MW, ACC)
    tot_g = tl.zeros([], dtype=ACC)
    tot_b = tl.zeros([], dtype=ACC)
    for t in range(0, T):
        cp = t * C + c
        acc = tl.zeros([KSTEP, KP], dtype=ACC)
        for k0 in range(0, CHUNKS, KSTEP):
            acc += tl.load(wws_ptr + (cp * CHUNKS + k0 + kk[:, None]) * KP + ks[None, :],
                           mask=((k0 + kk) < CHUNKS)[:, None], other=0.0)
        tot = tl.sum(acc, axis=0)
        tl.store(dw_ptr + cp * K + ks, tot.to(dw_ptr.dtype.element_ty), mask=ks < K)
        if HAS_B:
            tl.store(db_ptr + cp + ks * 0, tot.to(db_ptr.dtype.element_ty), mask=ks == K)
        Sg = _col_sum(ws_ptr, cp, CHUNKS, 0, NSUM, KSTEP)
        Sgx = _col_sum(ws_ptr, cp, CHUNKS, 1, NSUM, KSTEP)
        if NSUM == 2:
            dg = Sgx
            dbt = Sg
        else:
            r = tl.load(invstd_ptr + cp).to(ACC)
            Su = _col_sum(ws_ptr, cp, CHUNKS, 2, 5, KSTEP)
            Sux = _col_sum(ws_ptr, cp, CHUNKS, 3, 5, KSTEP)
            Sug = _col_sum(ws_ptr, cp, CHUNKS, 4, 5, KSTEP)
            Q = Sug / Mf - (Su / Mf) * (Sg / Mf) - (Sux / Mf) * (Sgx / Mf)
            dg = r * Mf * Q
            dbt = dg
        if GAMMA_PER_TASK:
            tl.store(dgamma_ptr + cp, dg.to(dgamma_ptr.dtype.element_ty))
            if NSUM == 2:
                tl.store(dbeta_ptr + cp, dbt.to(dbeta_ptr.dtype.element_ty))
        else:
            tot_g += dg
            tot_b += dbt
    if not GAMMA_PER_TASK:
        tl.store(dgamma_ptr + c, tot_g.to(dgamma_ptr.dtype.element_ty))
        if NSUM == 2:
            tl.store(dbeta_ptr + c, tot_b.to(dbeta_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------------
# host functions (the implementation protocol of mamlpp_fast.ops.conv_block: forward, backward,
# double_backward)
# ------------------------------------------------------------------------------------------------------
def _geometry(x, w, meta):
    t, stride, pad = meta[0], meta[1], meta[2]
    n, tci, h, wd = x.shape
    _, c, ci, kh, kw = w.shape
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


def _launch(g, prec, w_ts, b_ts, nsum=None):
    """(grid, geometry arguments, reduce constants, apply constants) of the forward (nsum None), the
    backward (nsum 2) or the double backward (nsum 5): the step width, warps and register cap of each
    pass that computes convolution products (`block_config`); None for a pass without products (the
    forward's apply and the backward's reduction: `pooled_config`)."""
    cfg = g["cfg"]
    grid = (g["t"] * cfg["CB"], cfg["CHUNKS"])
    geo = (g["c"], cfg["CB"], g["ci"], g["tc"], g["tci"], g["h"], g["w"], g["hp"] * g["wp"], g["wp"], g["mw"],
           cfg["CHUNK"], cfg["CHUNKS"], g["stride"], g["pad"], w_ts, b_ts)
    base = dict(KK=g["kk"], KW=g["kw"], K=g["k"], KP=g["kp"], PREC=prec, BLOCK_C=cfg["BLOCK_C"])
    # the reductions with products (no weight-gradient accumulator): the forward's in RBLOCK_W-window
    # steps, the double backward's in BLOCK_W; both on REDUCE_WARPS
    const_r = const_a = None
    if nsum != 2:
        reduce_w = cfg["BLOCK_W"] if nsum == 5 else cfg.get("RBLOCK_W", cfg["BLOCK_W"])
        const_r = dict(base, BLOCK_W=reduce_w, num_warps=cfg.get("REDUCE_WARPS", cfg["num_warps"]))
    if nsum is not None:
        warps = cfg.get("BWD_APPLY_WARPS", cfg["num_warps"]) if nsum == 2 else cfg["num_warps"]
        const_a = dict(base, BLOCK_W=cfg["BLOCK_W"], num_warps=warps)
    if cfg["BLOCK_C"] == 64:
        if nsum is not None:
            # the apply passes: left alone, ptxas (Triton 3.6.0's and 3.7.1's) settles on 128 registers for
            # the TF32 backward apply and spills 4-8 bytes (mini-ImageNet's 27-tap patches; since the patch
            # offsets are row + tap offsets, also the double backward's with Omniglot's 9 taps under 3.7.1:
            # 16 bytes); with .maxnreg 255 it takes 174-190 and none, and the other three variants 143-255,
            # none (caps of 200-232 made the fp32 passes spill). bench/NOTES.md, the block's tiles at 48
            # channels and the block's gather
            const_a["maxnreg"] = 255
        if nsum is None and prec == "ieee" and g["kp"] <= 16:
            # the forward's reduction with 16-wide patches (Omniglot): left alone, 3.7.1's ptxas settles on
            # 128 registers and spills 8 B; capped at 255 it takes 213 (3.6.0: 236), none. Not with
            # mini-ImageNet's 32-wide patches, where that cap made 3.7.1 spill 16 B (197 registers, none,
            # without it). bench/NOTES.md, the forward's reduction picks each window's maximum
            const_r["maxnreg"] = 255
        if prec != "ieee" and const_r is not None:
            # likewise the tensor-core reductions on 4 warps: ptxas (3.7.1) settled on 128 registers and
            # spilled 4 B in the (then convolving) backward's reduction with gout2; capped at 255 they took
            # 154-243, no spill. Not in strict fp32, where that cap made 3.7.1 spill 52 B in the forward's
            # reduction
            const_r["maxnreg"] = 255
    return grid, geo, const_r, const_a


def forward(x, w, bias, gamma, beta, meta):
    """(out, mean, invstd, aux) of conv_bn_pool; aux = (sel, zsel) for the backward passes: sel (int8, the
    shape of out), the position 0..3 of each window's maximum, which they read instead of finding it
    again, and zsel (out's shape and dtype), the convolution output there, from which the backward's
    reduction forms its sums without a convolution. Both come from the forward's reduction, which
    computes z anyway; the apply pass is elementwise on zsel."""
    g = _geometry(x, w, meta)
    cfg = g["cfg"]
    w, w_ts, b, b_ts = _task_rows(w, bias)
    gamma, beta = gamma.contiguous(), beta.contiguous()
    out = torch.empty(g["n"], g["tc"], g["hp"], g["wp"], dtype=x.dtype, device=x.device)
    sel = torch.empty(out.shape, dtype=torch.int8, device=x.device)
    zsel = torch.empty_like(out)
    mean = torch.empty(g["tc"], dtype=x.dtype, device=x.device)
    invstd = torch.empty_like(mean)
    ws = torch.empty(g["tc"] * cfg["CHUNKS"] * 2, dtype=x.dtype, device=x.device)
    grid, geo, const_r, _ = _launch(g, _precision(x.dtype), w_ts, b_ts)
    per_task = gamma.dim() == 2
    _fwd_reduce_kernel[grid](x, w, b, gamma, ws, zsel, sel, *geo, HAS_B=bias is not None, GAMMA_PER_TASK=per_task,
                             **const_r)
    eps_hi, eps_lo = _split(meta[3])
    sl_hi, sl_lo = _split(meta[4])
    _fwd_apply_kernel[grid](zsel, gamma, beta, ws, out, mean, invstd, g["c"], cfg["CB"], g["tc"], g["hp"] * g["wp"],
                            g["mw"], cfg["CHUNK"], cfg["CHUNKS"], eps_hi, eps_lo, sl_hi, sl_lo,
                            GAMMA_PER_TASK=per_task, IS_F64=x.dtype == torch.float64, BLOCK_C=cfg["BLOCK_C"],
                            KSTEP=_KSTEP, **pooled_config(cfg))
    return out, mean, invstd, (sel, zsel)


def _backward_pass(nsum, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, uw=None, ubias=None,
                   ugamma=None, ubeta=None, gout2=None):
    sel, zsel = aux
    g = _geometry(x, w, meta)
    if gout2 is not None and (gout2.shape != gout.shape or not gout2.is_contiguous() or not gout.is_contiguous()):
        raise ValueError(f"triton conv_bn_pool: gout2 {tuple(gout2.shape)} must be contiguous like gout "
                         f"{tuple(gout.shape)}")
    cfg = g["cfg"]
    w, w_ts, b, b_ts = _task_rows(w, bias)
    gamma, beta = gamma.contiguous(), beta.contiguous()
    uw_t = uw.contiguous() if uw is not None else w
    ub_t = ubias.contiguous() if ubias is not None else w
    ws = torch.empty(g["tc"] * cfg["CHUNKS"] * nsum, dtype=x.dtype, device=x.device)
    wws = torch.empty(g["tc"] * cfg["CHUNKS"] * g["kp"], dtype=x.dtype, device=x.device)
    grid, geo, const_r, const_a = _launch(g, _precision(x.dtype), w_ts, b_ts, nsum)
    sl_hi, sl_lo = _split(meta[4])
    flags = dict(HAS_B=bias is not None, GAMMA_PER_TASK=gamma.dim() == 2, NSUM=nsum, HAS_UW=uw is not None,
                 HAS_UB=ubias is not None, HAS_G2=gout2 is not None)
    gout2 = gout if gout2 is None else gout2
    if nsum == 2:
        _bwd_sums_kernel[grid](gout, gout2, zsel, gamma, beta, mean, invstd, ws, g["c"], cfg["CB"], g["tc"],
                               g["hp"] * g["wp"], g["mw"], cfg["CHUNK"], cfg["CHUNKS"], sl_hi, sl_lo,
                               GAMMA_PER_TASK=gamma.dim() == 2, HAS_G2=flags["HAS_G2"], BLOCK_C=cfg["BLOCK_C"],
                               **pooled_config(cfg))
    else:
        _reduce_kernel[grid](gout, gout2, sel, x, w, b, uw_t, ub_t, gamma, beta, mean, invstd, ws, *geo, sl_hi,
                             sl_lo, **flags, **const_r)
    dgout = torch.empty_like(gout) if nsum == 5 else gout
    ug = ugamma.contiguous() if ugamma is not None else gamma
    ubt = ubeta.contiguous() if ubeta is not None else gamma
    _apply_kernel[grid](gout, gout2, sel, x, w, b, uw_t, ub_t, ug, ubt, gamma, beta, mean, invstd, ws, wws, dgout, *geo,
                        sl_hi, sl_lo, **flags, HAS_UG=ugamma is not None, HAS_UBETA=ubeta is not None,
                        KSTEP=_KSTEP, **const_a)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    db = torch.empty(g["t"], g["c"], dtype=x.dtype, device=x.device) if bias is not None else None
    dgamma = torch.empty_like(gamma)
    dbeta = torch.empty_like(gamma) if nsum == 2 else None
    _finish_kernel[(g["c"],)](ws, wws, invstd, dw, db if db is not None else dw, dgamma,
                              dbeta if dbeta is not None else dgamma, g["c"], g["t"], cfg["CHUNKS"], g["mw"],
                              K=g["k"], KP=g["kp"], HAS_B=bias is not None, NSUM=nsum,
                              GAMMA_PER_TASK=gamma.dim() == 2, KSTEP=_KSTEP, num_warps=1)
    return dgout, dw, db, dgamma, dbeta


def backward(gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, gout2=None):
    """(dw, dbias or None, dgamma, dbeta) of conv_bn_pool; aux: the forward's (sel, zsel); gout2: a second
    gradient of the output (gout's shape, contiguous), added to gout where the kernels load it, or None."""
    _, dw, db, dgamma, dbeta = _backward_pass(2, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta,
                                              gout2=gout2)
    return dw, db, dgamma, dbeta


def double_backward(uw, ubias, ugamma, ubeta, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta):
    """(d gout, d w, d bias or None, d gamma) of conv_bn_pool's backward; aux: the forward's (sel, zsel)."""
    dgout, dw, db, dgamma, _ = _backward_pass(5, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta, uw,
                                              ubias, ugamma, ubeta)
    return dgout, dw, db, dgamma
