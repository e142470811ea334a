"""Triton kernels of the per-step batch norm + leaky ReLU: forward, backward, double backward.

Same math and symbols as kernels/bn_math.h (one (task, channel) column of M = N*H*W elements):
  forward:  mu = mean(x), r = 1/sqrt(var + eps) (biased), xhat = (x - mu) r, z = gamma xhat + beta,
            a = 1 if z > 0 else slope, y = a z.  Saved: mean = mu, invstd = r, shape (T*C,).
  backward: g = a dy, gbar = mean(g), m = mean(g xhat);
            dbeta = sum(g), dgamma = sum(g xhat), dx = gamma r (g - gbar - xhat m).
  double backward (u = ggx, u_gamma = gggamma, u_beta = ggbeta; None = zeros):
            ubar = mean(u), ux = mean(u xhat), ug = mean(u g), Q = ug - ubar gbar - ux m,
            gdy = a [gamma r (u - ubar - xhat ux) + u_gamma xhat + u_beta],   ggamma = r M Q,
            P = gamma r (-u m - ux g) + u_gamma g, meanP = gamma r (-ubar m - ux gbar) + u_gamma gbar,
            meanPx = -2 gamma r ux m + u_gamma m, gx = r (P - meanP - xhat meanPx) - gamma r^2 xhat Q.
  With gamma (C,) shared by the tasks, dgamma / dbeta / ggamma are summed over tasks.

Layout: x is (N, T*C, H, W) contiguous; element j of column cp = t*C + c is at
((j // HW) * TC + cp) * HW + j % HW. Each op is two kernels over the grid (TC, CHUNKS): a reduction of
its chunk of the column to a few sums (fp32 accumulation for fp32 inputs, fp64 for fp64) into a small
workspace, then an apply kernel that adds the chunk sums of its column in a fixed order, writes the
elements of its chunk, and (program (cp, 0)) the per-channel outputs; for a shared gamma, program
(t=0, c, 0) adds the per-task values over a (T, CHUNKS) tile. No atomics: results are reproducible.

Pointer arguments (x: (N, T*C, H, W); gamma, beta, gggamma, ggbeta: (C,) or (T, C); mean, invstd:
(T*C,); ws: (T*C, CHUNKS, K) workspace). Block sizes come from `bn_block_config` (no autotune), so the
kernels also run under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._device import num_sms

__all__ = ["bn_forward", "bn_backward", "bn_double_backward", "bn_block_config"]

_MAX_BLOCK = 1024   # elements per vector step
_MIN_BLOCK = 16
_MAX_CHUNKS = 256   # programs per column (the apply kernel loads all chunk sums as one vector)
_PROGRAMS_PER_SM = 4


def bn_block_config(M: int, TC: int, device: torch.device, sms: int | None = None) -> dict:
    """Heuristic "bn_block_config": launch configuration of the BN kernels for M elements per column
    and TC columns.

    - BLOCK: elements per vector step, next power of two of M clamped to [16, 1024]. Memory cap: a
      program keeps at most 5 accumulator vectors of BLOCK values (the double backward's 5 sums) plus
      ~4 loaded vectors: 9 x 1024 x 4 B = 36 KB of registers over 4 warps (~72 registers per thread).
    - CHUNKS: programs per column, so that the (TC, CHUNKS) grid holds about 4 programs per SM, but
      each program gets at least 4 BLOCK steps; at most 256. One chunk on the interpreter (CPU).
    - CBLOCK: next power of two of CHUNKS (the apply kernel loads the chunk sums as one vector).
    - num_warps: 4 for BLOCK >= 512, 2 for BLOCK >= 128, else 1.
    `sms`: the multiprocessors to fill (default: the CUDA device's; bench.trace passes its simulated count).
    """
    block = max(_MIN_BLOCK, min(_MAX_BLOCK, triton.next_power_of_2(max(int(M), 1))))
    if sms is None and device.type == "cuda":
        sms = num_sms(device)
    if sms is not None:
        want = _PROGRAMS_PER_SM * sms
        by_occupancy = triton.cdiv(want, TC)
        by_work = triton.cdiv(M, 4 * block)
        chunks = max(1, min(by_occupancy, by_work, _MAX_CHUNKS))
    else:
        chunks = 1
    chunk = triton.cdiv(M, chunks)
    chunks = triton.cdiv(M, chunk)
    num_warps = 4 if block >= 512 else (2 if block >= 128 else 1)
    return dict(BLOCK=block, CHUNK=chunk, CHUNKS=chunks, CBLOCK=triton.next_power_of_2(chunks),
                num_warps=num_warps)


def _split(v: float):
    """v = hi + lo with hi, lo float32 (scalar kernel arguments are fp32; fp64 kernels add both)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, float(v - hi)


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _col_offsets(j, cp, TC, HW):
    n = j // HW
    hw = j - n * HW
    return (n.to(tl.int64) * TC + cp) * HW + hw


@triton.jit
def _to_acc(v, ACC: tl.constexpr):
    """An integer argument (a constexpr when it equals 1: Triton specialises it) as an ACC scalar."""
    return (v + tl.zeros([], dtype=tl.int32)).to(ACC)


@triton.jit
def _f2acc(hi, lo, ACC: tl.constexpr):
    """hi + lo (two fp32 scalar arguments, see _split) as an ACC scalar."""
    z = tl.zeros([], dtype=tl.float32)
    return (hi + z).to(ACC) + (lo + z).to(ACC)


@triton.jit
def _chunk_bounds(k, CHUNK, M):
    begin = tl.minimum(k * CHUNK, M)
    end = tl.minimum(begin + CHUNK, M)
    return begin, end


@triton.jit
def _gamma_index(cp, C, GAMMA_PER_TASK: tl.constexpr):
    if GAMMA_PER_TASK:
        gi = cp
    else:
        gi = cp % C
    return gi


@triton.jit
def _xhat_a(x, mu, r, ga, be, slope):
    xhat = (x - mu) * r
    z = ga * xhat + be
    a = tl.where(z > 0, 1.0, slope).to(x.dtype)
    return xhat, a


@triton.jit
def _column(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cp, C, GAMMA_PER_TASK: tl.constexpr, ACC: tl.constexpr):
    """Column cp's (gamma index, gamma, beta, mean, invstd), the scalars every backward pass reads."""
    gi = _gamma_index(cp, C, GAMMA_PER_TASK)
    ga = tl.load(gamma_ptr + gi).to(ACC)
    be = tl.load(beta_ptr + gi).to(ACC)
    mu = tl.load(mean_ptr + cp).to(ACC)
    r = tl.load(invstd_ptr + cp).to(ACC)
    return gi, ga, be, mu, r


@triton.jit
def _g_step(x_ptr, dy_ptr, s, end, cp, TC, HW, mu, r, ga, be, slope, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Elements s .. s+BLOCK of column cp in a backward pass: (mask, offsets, xhat, a, g = a dy), with x and
    dy read as 0 past `end` (so g is 0 there; `_xhat_a`)."""
    j = s + tl.arange(0, BLOCK)
    mask = j < end
    off = _col_offsets(j, cp, TC, HW)
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    d = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
    xhat, a = _xhat_a(v, mu, r, ga, be, slope)
    return mask, off, xhat, a, a * d


@triton.jit
def _chunk_sum(ws_ptr, cp, CHUNKS, i, K: tl.constexpr, CBLOCK: tl.constexpr):
    ks = tl.arange(0, CBLOCK)
    v = tl.load(ws_ptr + (cp * CHUNKS + ks) * K + i, mask=ks < CHUNKS, other=0.0)
    return tl.sum(v, axis=0)


@triton.jit
def _task_chunk_sums(ws_ptr, c, C, T, CHUNKS, i, K: tl.constexpr, TBLOCK: tl.constexpr,
                     CBLOCK: tl.constexpr, CG: tl.constexpr = False):
    """(TBLOCK,) vector: for each task t, the sum over chunks of statistic i of column t*C + c. CG: read
    through L2 only (.cg: sums stored by other multiprocessors in the same launch, `_last_ticket`)."""
    ts = tl.arange(0, TBLOCK)
    ks = tl.arange(0, CBLOCK)
    rows = ts[:, None] * C + c
    mask = (ts[:, None] < T) & (ks[None, :] < CHUNKS)
    if CG:
        v = tl.load(ws_ptr + (rows * CHUNKS + ks[None, :]) * K + i, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        v = tl.load(ws_ptr + (rows * CHUNKS + ks[None, :]) * K + i, mask=mask, other=0.0)
    return tl.sum(v, axis=1)


@triton.jit
def _last_ticket(cnt_ptr, count):
    """Whether this program is the last of `count` programs to reach the counter at cnt_ptr (an int32
    that every group leaves at zero: the last program resets it). A CTA barrier orders all the
    program's threads' stores before one atomic add with acquire-release semantics at GPU scope: the
    release publishes the stores to whichever program later acquires the counter, the acquire makes the
    other programs' released stores visible to this one, which then reads them with .cg loads (as
    triton/conv.py `_last_chunk`, for a count known only at run time)."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == count - 1


@triton.jit
def _dbwd_coef(Sg, Sgx, Su, Sux, Sug, M, ga, r, ugam, ubet):
    """Per-channel coefficients (see kernels/bn_math.h bn_dbwd_coef): with k = gamma r,
    w = u_gamma - k ux: gdy = a (cu u + cx xhat + c0), gx = eu u + eg g + ex xhat + e0, ggamma = r M Q."""
    gbar = Sg / M
    m = Sgx / M
    ubar = Su / M
    ux = Sux / M
    ug = Sug / M
    k = ga * r
    Q = ug - ubar * gbar - ux * m
    w = ugam - k * ux
    meanP = k * (-ubar * m - ux * gbar) + ugam * gbar
    meanPx = -2.0 * k * ux * m + ugam * m
    cu = k
    cx = w
    c0 = ubet - k * ubar
    eu = -r * k * m
    eg = r * w
    ex = -(r * meanPx + ga * r * r * Q)
    e0 = -r * meanP
    ggamma = r * M * Q
    return cu, cx, c0, eu, eg, ex, e0, ggamma


@triton.jit
def _merged_stats(ws_ptr, mean_ptr, invstd_ptr, cp, k, CHUNK, CHUNKS, M, eps, IS_F64: tl.constexpr,
                  CBLOCK: tl.constexpr, ACC: tl.constexpr):
    """(mu, r) of column cp: Chan's merge of the forward reduction's chunk states (mean, m2) in chunk
    order, counts from the chunk bounds (CHUNK elements of M per chunk); program k == 0 stores them.
    Returned as stored (rounded to the statistics' dtype): the values the backward passes see."""
    ks = tl.arange(0, CBLOCK)
    kmask = ks < CHUNKS
    kb = tl.minimum(ks * CHUNK, M)
    kn = tl.where(kmask, tl.minimum(kb + CHUNK, M) - kb, 0).to(ACC)
    pm = tl.load(ws_ptr + (cp * CHUNKS + ks) * 2, mask=kmask, other=0.0)
    pm2 = tl.load(ws_ptr + (cp * CHUNKS + ks) * 2 + 1, mask=kmask, other=0.0)
    Mf = _to_acc(M, ACC)
    mu = tl.sum(kn * pm, axis=0) / Mf
    dmu = pm - mu
    m2 = tl.sum(pm2 + kn * dmu * dmu, axis=0)
    return _store_stats(mu, m2, Mf, eps, mean_ptr, invstd_ptr, cp, k, IS_F64, ACC)


@triton.jit
def _store_stats(mu, m2, Mf, eps, mean_ptr, invstd_ptr, cp, k, IS_F64: tl.constexpr, ACC: tl.constexpr):
    """(mu, r = 1/sqrt(m2/M + eps)) rounded to the statistics' dtype; program k == 0 stores them."""
    if IS_F64:
        r = 1.0 / tl.sqrt(m2 / Mf + eps)
    else:
        r = 1.0 / tl.sqrt_rn(m2 / Mf + eps)
    mu = mu.to(mean_ptr.dtype.element_ty).to(ACC)
    r = r.to(invstd_ptr.dtype.element_ty).to(ACC)
    if k == 0:
        tl.store(mean_ptr + cp, mu)
        tl.store(invstd_ptr + cp, r)
    return mu, r


@triton.jit
def _store_bwd_params(ws_ptr, dgamma_ptr, dbeta_ptr, cp, k, C, T, CHUNKS, Sg, Sgx,
                      GAMMA_PER_TASK: tl.constexpr, CBLOCK: tl.constexpr, TBLOCK: tl.constexpr,
                      CG: tl.constexpr = False):
    """Program (cp, 0): dgamma = sum g xhat, dbeta = sum g of its column; for a shared gamma the
    programs of task 0 add the per-task sums in task order (CG: `_task_chunk_sums`)."""
    if k == 0:
        if GAMMA_PER_TASK:
            tl.store(dgamma_ptr + cp, Sgx.to(dgamma_ptr.dtype.element_ty))
            tl.store(dbeta_ptr + cp, Sg.to(dbeta_ptr.dtype.element_ty))
        else:
            if cp < C:
                dbt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 0, 2, TBLOCK, CBLOCK, CG)
                dgt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 1, 2, TBLOCK, CBLOCK, CG)
                tl.store(dgamma_ptr + cp, tl.sum(dgt, axis=0).to(dgamma_ptr.dtype.element_ty))
                tl.store(dbeta_ptr + cp, tl.sum(dbt, axis=0).to(dbeta_ptr.dtype.element_ty))


@triton.jit
def _store_dbwd_gamma(ws_ptr, invstd_ptr, ggamma_ptr, cp, k, C, T, CHUNKS, ggam, Mf,
                      GAMMA_PER_TASK: tl.constexpr, CBLOCK: tl.constexpr, TBLOCK: tl.constexpr,
                      ACC: tl.constexpr, CG: tl.constexpr = False):
    """Program (cp, 0): ggamma = r M Q of its column; for a shared gamma the programs of task 0 add
    sum_t r_t M Q_t in task order (CG: `_task_chunk_sums`)."""
    if k == 0:
        if GAMMA_PER_TASK:
            tl.store(ggamma_ptr + cp, ggam.to(ggamma_ptr.dtype.element_ty))
        else:
            if cp < C:
                ts = tl.arange(0, TBLOCK)
                rt = tl.load(invstd_ptr + ts * C + cp, mask=ts < T, other=0.0).to(ACC)
                Sgt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 0, 5, TBLOCK, CBLOCK, CG)
                Sgxt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 1, 5, TBLOCK, CBLOCK, CG)
                Sut = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 2, 5, TBLOCK, CBLOCK, CG)
                Suxt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 3, 5, TBLOCK, CBLOCK, CG)
                Sugt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 4, 5, TBLOCK, CBLOCK, CG)
                Qt = Sugt / Mf - (Sut / Mf) * (Sgt / Mf) - (Suxt / Mf) * (Sgxt / Mf)
                tl.store(ggamma_ptr + cp, tl.sum(rt * Mf * Qt, axis=0).to(ggamma_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _welford(x_ptr, cp, TC, HW, begin, end, BLOCK: tl.constexpr):
    """(mean, m2) of elements begin..end of column cp: per-lane Welford, then Chan over the lanes."""
    ACC = x_ptr.dtype.element_ty
    cnt = tl.zeros([BLOCK], dtype=ACC)
    mean = tl.zeros([BLOCK], dtype=ACC)
    m2 = tl.zeros([BLOCK], dtype=ACC)
    for s in range(begin, end, BLOCK):
        j = s + tl.arange(0, BLOCK)
        mask = j < end
        v = tl.load(x_ptr + _col_offsets(j, cp, TC, HW), mask=mask, other=0.0).to(ACC)
        cnt_new = cnt + mask.to(ACC)
        d = v - mean
        mean = tl.where(mask, mean + d / tl.maximum(cnt_new, 1.0), mean)
        m2 = tl.where(mask, m2 + d * (v - mean), m2)
        cnt = cnt_new
    n = tl.sum(cnt, axis=0)
    mu = tl.sum(cnt * mean, axis=0) / tl.maximum(n, 1.0)
    dm = mean - mu
    return mu, tl.sum(m2 + cnt * dm * dm, axis=0)


@triton.jit
def _bn_fwd_reduce_kernel(x_ptr, ws_ptr, TC, HW, M, CHUNK, CHUNKS, BLOCK: tl.constexpr):
    """ws[cp, k, :] = (mean, m2) of chunk k of column cp (per-lane Welford, then Chan over lanes)."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    begin, end = _chunk_bounds(k, CHUNK, M)
    mu, m2t = _welford(x_ptr, cp, TC, HW, begin, end, BLOCK)
    tl.store(ws_ptr + (cp * CHUNKS + k) * 2, mu)
    tl.store(ws_ptr + (cp * CHUNKS + k) * 2 + 1, m2t)


@triton.jit
def _bn_fwd_apply_kernel(x_ptr, y_ptr, gamma_ptr, beta_ptr, ws_ptr, mean_ptr, invstd_ptr, C, TC, HW,
                         M, CHUNK, CHUNKS, eps_hi, eps_lo, slope_hi, slope_lo,
                         GAMMA_PER_TASK: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr,
                         CBLOCK: tl.constexpr):
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    eps = _f2acc(eps_hi, eps_lo, ACC)
    slope = _f2acc(slope_hi, slope_lo, ACC)
    mu, r = _merged_stats(ws_ptr, mean_ptr, invstd_ptr, cp, k, CHUNK, CHUNKS, M, eps, IS_F64, CBLOCK, ACC)
    gi = _gamma_index(cp, C, GAMMA_PER_TASK)
    ga = tl.load(gamma_ptr + gi).to(ACC)
    be = tl.load(beta_ptr + gi).to(ACC)
    begin, end = _chunk_bounds(k, CHUNK, M)
    for s in range(begin, end, BLOCK):
        j = s + tl.arange(0, BLOCK)
        mask = j < end
        off = _col_offsets(j, cp, TC, HW)
        v = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        xhat, a = _xhat_a(v, mu, r, ga, be, slope)
        z = ga * xhat + be
        tl.store(y_ptr + off, (a * z).to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _bn_bwd_reduce_kernel(dy_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, ws_ptr, C, TC,
                          HW, M, CHUNK, CHUNKS, slope_hi, slope_lo, GAMMA_PER_TASK: tl.constexpr,
                          BLOCK: tl.constexpr):
    """ws[cp, k, :] = (sum g, sum g xhat) over chunk k of column cp."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _column(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cp, C, GAMMA_PER_TASK, ACC)
    begin, end = _chunk_bounds(k, CHUNK, M)
    sg = tl.zeros([BLOCK], dtype=ACC)
    sgx = tl.zeros([BLOCK], dtype=ACC)
    for s in range(begin, end, BLOCK):
        _mask, _off, xhat, _a, g = _g_step(x_ptr, dy_ptr, s, end, cp, TC, HW, mu, r, ga, be, slope, BLOCK, ACC)
        sg += g
        sgx += g * xhat
    tl.store(ws_ptr + (cp * CHUNKS + k) * 2, tl.sum(sg, axis=0))
    tl.store(ws_ptr + (cp * CHUNKS + k) * 2 + 1, tl.sum(sgx, axis=0))


@triton.jit
def _bn_bwd_apply_kernel(dy_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, ws_ptr, dx_ptr,
                         dgamma_ptr, dbeta_ptr, C, T, TC, HW, M, CHUNK, CHUNKS, slope_hi, slope_lo,
                         GAMMA_PER_TASK: tl.constexpr, BLOCK: tl.constexpr, CBLOCK: tl.constexpr,
                         TBLOCK: tl.constexpr):
    """dx = k (g - gbar - xhat m), k = gamma r; dgamma = sum(g xhat), dbeta = sum(g)."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    Sg = _chunk_sum(ws_ptr, cp, CHUNKS, 0, 2, CBLOCK)
    Sgx = _chunk_sum(ws_ptr, cp, CHUNKS, 1, 2, CBLOCK)
    _gi, ga, be, mu, r = _column(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cp, C, GAMMA_PER_TASK, ACC)
    Mf = _to_acc(M, ACC)
    gbar = Sg / Mf
    m = Sgx / Mf
    kk = ga * r
    _store_bwd_params(ws_ptr, dgamma_ptr, dbeta_ptr, cp, k, C, T, CHUNKS, Sg, Sgx, GAMMA_PER_TASK, CBLOCK,
                      TBLOCK)
    begin, end = _chunk_bounds(k, CHUNK, M)
    for s in range(begin, end, BLOCK):
        mask, off, xhat, _a, g = _g_step(x_ptr, dy_ptr, s, end, cp, TC, HW, mu, r, ga, be, slope, BLOCK, ACC)
        dx = kk * (g - gbar - xhat * m)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# double backward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _bn_dbwd_reduce_kernel(ggx_ptr, dy_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, ws_ptr,
                           C, TC, HW, M, CHUNK, CHUNKS, slope_hi, slope_lo,
                           GAMMA_PER_TASK: tl.constexpr, HAS_U: tl.constexpr, BLOCK: tl.constexpr):
    """ws[cp, k, :] = (sum g, sum g xhat, sum u, sum u xhat, sum u g) over chunk k of column cp."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _column(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cp, C, GAMMA_PER_TASK, ACC)
    begin, end = _chunk_bounds(k, CHUNK, M)
    sg = tl.zeros([BLOCK], dtype=ACC)
    sgx = tl.zeros([BLOCK], dtype=ACC)
    su = tl.zeros([BLOCK], dtype=ACC)
    sux = tl.zeros([BLOCK], dtype=ACC)
    sug = tl.zeros([BLOCK], dtype=ACC)
    for s in range(begin, end, BLOCK):
        mask, off, xhat, _a, g = _g_step(x_ptr, dy_ptr, s, end, cp, TC, HW, mu, r, ga, be, slope, BLOCK, ACC)
        sg += g
        sgx += g * xhat
        if HAS_U:
            u = tl.load(ggx_ptr + off, mask=mask, other=0.0).to(ACC)
            su += u
            sux += u * xhat
            sug += u * g
    base = ws_ptr + (cp * CHUNKS + k) * 5
    tl.store(base, tl.sum(sg, axis=0))
    tl.store(base + 1, tl.sum(sgx, axis=0))
    tl.store(base + 2, tl.sum(su, axis=0))
    tl.store(base + 3, tl.sum(sux, axis=0))
    tl.store(base + 4, tl.sum(sug, axis=0))


@triton.jit
def _bn_dbwd_apply_kernel(ggx_ptr, gggamma_ptr, ggbeta_ptr, dy_ptr, x_ptr, gamma_ptr, beta_ptr,
                          mean_ptr, invstd_ptr, ws_ptr, gx_ptr, ggamma_ptr, gdy_ptr, C, T, TC, HW, M,
                          CHUNK, CHUNKS, slope_hi, slope_lo, GAMMA_PER_TASK: tl.constexpr,
                          HAS_U: tl.constexpr, HAS_UG: tl.constexpr, HAS_UB: tl.constexpr,
                          BLOCK: tl.constexpr, CBLOCK: tl.constexpr, TBLOCK: tl.constexpr):
    """gdy = a (cu u + cx xhat + c0), gx = eu u + eg g + ex xhat + e0, ggamma = r M Q."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    Sg = _chunk_sum(ws_ptr, cp, CHUNKS, 0, 5, CBLOCK)
    Sgx = _chunk_sum(ws_ptr, cp, CHUNKS, 1, 5, CBLOCK)
    Su = _chunk_sum(ws_ptr, cp, CHUNKS, 2, 5, CBLOCK)
    Sux = _chunk_sum(ws_ptr, cp, CHUNKS, 3, 5, CBLOCK)
    Sug = _chunk_sum(ws_ptr, cp, CHUNKS, 4, 5, CBLOCK)
    gi, ga, be, mu, r = _column(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cp, C, GAMMA_PER_TASK, ACC)
    if HAS_UG:
        ugam = tl.load(gggamma_ptr + gi).to(ACC)
    else:
        ugam = tl.zeros([], dtype=ACC)
    if HAS_UB:
        ubet = tl.load(ggbeta_ptr + gi).to(ACC)
    else:
        ubet = tl.zeros([], dtype=ACC)
    Mf = _to_acc(M, ACC)
    cu, cx, c0, eu, eg, ex, e0, ggam = _dbwd_coef(Sg, Sgx, Su, Sux, Sug, Mf, ga, r, ugam, ubet)
    _store_dbwd_gamma(ws_ptr, invstd_ptr, ggamma_ptr, cp, k, C, T, CHUNKS, ggam, Mf, GAMMA_PER_TASK, CBLOCK,
                      TBLOCK, ACC)
    begin, end = _chunk_bounds(k, CHUNK, M)
    for s in range(begin, end, BLOCK):
        # written out, not `_g_step`: u's load between dy's and the arithmetic keeps this loop as compiled
        # before (through `_g_step` Triton 3.6 gave it 1-5 more instructions and 4 more registers)
        j = s + tl.arange(0, BLOCK)
        mask = j < end
        off = _col_offsets(j, cp, TC, HW)
        v = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        d = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
        if HAS_U:
            u = tl.load(ggx_ptr + off, mask=mask, other=0.0).to(ACC)
        else:
            u = tl.zeros([BLOCK], dtype=ACC)
        xhat, a = _xhat_a(v, mu, r, ga, be, slope)
        g = a * d
        gx = eu * u + eg * g + ex * xhat + e0
        gdy = a * (cu * u + cx * xhat + c0)
        tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gdy_ptr + off, gdy.to(gdy_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# host wrappers (the backend functions)
# ------------------------------------------------------------------------------------------------
def _check(fn, x, gamma, beta, num_tasks):
    """Internal guard of the kernels' memory access, for direct calls of the backend functions: user
    input is validated once, by the op (mamlpp_fast.ops.per_step_bn), before it reaches a backend."""
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: x must be float32 or float64, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be 4-D (N, T*C, H, W), got sizes {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{fn}: x must be contiguous (N, T*C, H, W), got strides {x.stride()}")
    if num_tasks < 1 or x.shape[1] % num_tasks:
        raise ValueError(f"{fn}: num_tasks={num_tasks} does not divide the channel dim of x "
                         f"(sizes {tuple(x.shape)})")
    N, TC, H, W = x.shape
    C = TC // num_tasks
    if N * H * W == 0:
        raise ValueError(f"{fn}: x must have N*H*W > 0 elements per channel, got {tuple(x.shape)}")
    if tuple(gamma.shape) not in ((C,), (num_tasks, C)):
        raise ValueError(f"{fn}: gamma must be (C,) = ({C},) or (T, C) = ({num_tasks}, {C}), "
                         f"got {tuple(gamma.shape)}")
    if beta.shape != gamma.shape:
        raise ValueError(f"{fn}: beta must have the shape of gamma {tuple(gamma.shape)}, "
                         f"got {tuple(beta.shape)}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{fn}: {name} ({t.dtype}, {t.device}) must match x "
                             f"({x.dtype}, {x.device})")
    return N, TC, C, H * W


def bn_forward(x, gamma, beta, num_tasks, eps, slope):
    """(y, mean, invstd); see the module docstring for the formulas."""
    N, TC, C, HW = _check("bn_forward", x, gamma, beta, num_tasks)
    M = N * HW
    gamma, beta = gamma.contiguous(), beta.contiguous()
    cfg = bn_block_config(M, TC, x.device)
    y = torch.empty_like(x)
    mean = torch.empty(TC, dtype=x.dtype, device=x.device)
    invstd = torch.empty(TC, dtype=x.dtype, device=x.device)
    ws = torch.empty(TC * cfg["CHUNKS"] * 2, dtype=x.dtype, device=x.device)
    grid = (TC, cfg["CHUNKS"])
    _bn_fwd_reduce_kernel[grid](x, ws, TC, HW, M, cfg["CHUNK"], cfg["CHUNKS"], BLOCK=cfg["BLOCK"],
                                num_warps=cfg["num_warps"])
    eps_hi, eps_lo = _split(eps)
    sl_hi, sl_lo = _split(slope)
    _bn_fwd_apply_kernel[grid](x, y, gamma, beta, ws, mean, invstd, C, TC, HW, M, cfg["CHUNK"],
                               cfg["CHUNKS"], eps_hi, eps_lo, sl_hi, sl_lo,
                               GAMMA_PER_TASK=gamma.dim() == 2, IS_F64=x.dtype == torch.float64,
                               BLOCK=cfg["BLOCK"], CBLOCK=cfg["CBLOCK"], num_warps=cfg["num_warps"])
    return y, mean, invstd


def _check_like(fn, name, t, ref, ref_name):
    if t.shape != ref.shape:
        raise ValueError(f"{fn}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{fn}: {name} ({t.dtype}, {t.device}) must match {ref_name} "
                         f"({ref.dtype}, {ref.device})")


def _check_stats(fn, mean, invstd, x, TC):
    for name, t in (("mean", mean), ("invstd", invstd)):
        if tuple(t.shape) != (TC,):
            raise ValueError(f"{fn}: {name} must be (T*C,) = ({TC},), got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{fn}: {name} ({t.dtype}, {t.device}) must match x "
                             f"({x.dtype}, {x.device})")


def bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks, slope):
    """(dx, dgamma, dbeta); dgamma/dbeta shaped like gamma (summed over tasks when shared)."""
    fn = "bn_backward"
    N, TC, C, HW = _check(fn, x, gamma, beta, num_tasks)
    _check_like(fn, "dy", dy, x, "x")
    _check_stats(fn, mean, invstd, x, TC)
    M = N * HW
    dy, gamma, beta = dy.contiguous(), gamma.contiguous(), beta.contiguous()
    mean, invstd = mean.contiguous(), invstd.contiguous()
    cfg = bn_block_config(M, TC, x.device)
    dx = torch.empty_like(x)
    dgamma = torch.empty_like(gamma)
    dbeta = torch.empty_like(gamma)
    ws = torch.empty(TC * cfg["CHUNKS"] * 2, dtype=x.dtype, device=x.device)
    grid = (TC, cfg["CHUNKS"])
    per_task = gamma.dim() == 2
    sl_hi, sl_lo = _split(slope)
    _bn_bwd_reduce_kernel[grid](dy, x, gamma, beta, mean, invstd, ws, C, TC, HW, M, cfg["CHUNK"],
                                cfg["CHUNKS"], sl_hi, sl_lo, GAMMA_PER_TASK=per_task,
                                BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    _bn_bwd_apply_kernel[grid](dy, x, gamma, beta, mean, invstd, ws, dx, dgamma, dbeta, C, num_tasks,
                               TC, HW, M, cfg["CHUNK"], cfg["CHUNKS"], sl_hi, sl_lo,
                               GAMMA_PER_TASK=per_task, BLOCK=cfg["BLOCK"], CBLOCK=cfg["CBLOCK"],
                               TBLOCK=triton.next_power_of_2(num_tasks),
                               num_warps=cfg["num_warps"])
    return dx, dgamma, dbeta


def bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope):
    """(gx, ggamma, gdy); ggx / gggamma / ggbeta may be None (= zeros)."""
    fn = "bn_double_backward"
    N, TC, C, HW = _check(fn, x, gamma, beta, num_tasks)
    _check_like(fn, "dy", dy, x, "x")
    _check_stats(fn, mean, invstd, x, TC)
    if ggx is not None:
        _check_like(fn, "ggx", ggx, x, "x")
        ggx = ggx.contiguous()
    if gggamma is not None:
        _check_like(fn, "gggamma", gggamma, gamma, "gamma")
        gggamma = gggamma.contiguous()
    if ggbeta is not None:
        _check_like(fn, "ggbeta", ggbeta, gamma, "gamma")
        ggbeta = ggbeta.contiguous()
    M = N * HW
    dy, gamma, beta = dy.contiguous(), gamma.contiguous(), beta.contiguous()
    mean, invstd = mean.contiguous(), invstd.contiguous()
    cfg = bn_block_config(M, TC, x.device)
    gx = torch.empty_like(x)
    ggamma = torch.empty_like(gamma)
    gdy = torch.empty_like(x)
    ws = torch.empty(TC * cfg["CHUNKS"] * 5, dtype=x.dtype, device=x.device)
    grid = (TC, cfg["CHUNKS"])
    per_task = gamma.dim() == 2
    sl_hi, sl_lo = _split(slope)
    has_u = ggx is not None
    _bn_dbwd_reduce_kernel[grid](ggx if has_u else x, dy, x, gamma, beta, mean, invstd, ws, C, TC, HW,
                                 M, cfg["CHUNK"], cfg["CHUNKS"], sl_hi, sl_lo,
                                 GAMMA_PER_TASK=per_task, HAS_U=has_u, BLOCK=cfg["BLOCK"],
                                 num_warps=cfg["num_warps"])
    _bn_dbwd_apply_kernel[grid](ggx if has_u else x, gggamma if gggamma is not None else gamma,
                                ggbeta if ggbeta is not None else gamma, dy, x, gamma, beta, mean,
                                invstd, ws, gx, ggamma, gdy, C, num_tasks, TC, HW, M, cfg["CHUNK"],
                                cfg["CHUNKS"], sl_hi, sl_lo, GAMMA_PER_TASK=per_task, HAS_U=has_u,
                                HAS_UG=gggamma is not None, HAS_UB=ggbeta is not None,
                                BLOCK=cfg["BLOCK"], CBLOCK=cfg["CBLOCK"],
                                TBLOCK=triton.next_power_of_2(num_tasks),
                                num_warps=cfg["num_warps"])
    return gx, ggamma, gdy
