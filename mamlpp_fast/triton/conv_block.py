r"""Triton kernels of the fused first block (`mamlpp_fast.ops.conv_block.conv_bn_pool`): per-task
convolution + per-step batch norm + leaky ReLU + 2x2 max pooling, forward, backward and double backward,
never writing the full-resolution convolution output.

Formulas and symbols: the docstring of mamlpp_fast.ops.conv_block (the op) and of
mamlpp_fast.triton.per_step_bn (the batch norm's sums and coefficients, shared with it: `_dbwd_coef`).

Work unit. An element is a pooling window v = (i, ph, pw) of one column cp = t*C + c (Mw = n*Hp*Wp
windows per column); a program takes BLOCK windows per vector step and, for each of the window's four
convolution outputs, gathers the patch P' (the K = Ci*kh*kw image values under it, and a 1 for the
bias: a (BLOCK, KP) tile, KP = next power of two of K+1) and forms z = P' w' (a row sum). The tap
decomposition k -> (ci, p, q) is computed once per program on the KP axis: no division in the
per-window work but the window's own coordinates.

Each op is two passes over the grid (TC, CHUNKS), like the batch norm's kernels: a reduction of its
chunk of the column to a few sums into a workspace, then an apply pass that adds the chunk sums of its
column in chunk order. The weight gradients are summed per program into a (TC, CHUNKS, KP) workspace
and added in chunk order by a third small kernel (`_wsum_kernel`) that writes dw and dbias. No atomics:
results are reproducible.

- forward:   reduce: per-lane Welford over the 4 outputs of each window, Chan over lanes -> (mean, m2);
             apply: Chan over chunks -> mean, invstd; out = max of the window's y.
- backward:  reduce: (sum g, sum g xhat), g = a dy nonzero at the window's maximum only;
             apply: dz = gamma r (g - gbar - xhat m) at the 4 outputs, dw' += dz P'; dgamma, dbeta.
- double backward: reduce: (sum g, sum g xhat, sum u, sum u xhat, sum u g) with u = P' U';
             apply: d(gout) = a (cu u + cx xhat + c0) at the maximum, gz = eu u + eg g + ex xhat + e0 at
             the 4 outputs, d(w') += gz P'; d(gamma) = r M Q.

Launch configuration from `block_config` (no autotune: the kernels also run under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import num_sms
from .per_step_bn import _chunk_sum, _dbwd_coef, _f2acc, _split, _task_chunk_sums, _to_acc

__all__ = ["forward", "backward", "double_backward", "block_config", "name"]

name = "triton"
_MAX_CHUNKS = 256
_PROGRAMS_PER_SM = 4


def block_config(mw: int, tc: int, kp: int, device: torch.device, sms: int | None = None) -> dict:
    """Launch configuration for `mw` windows per column, `tc` columns, patch width `kp`; `sms`: the
    multiprocessors to fill (default: the CUDA device's; bench.trace passes its simulated count).

    - BLOCK: windows per vector step, 2048 / KP clamped to [16, 128]: a program holds the four
      (BLOCK, KP) patch tiles of a window step and one (BLOCK, KP) weight-gradient accumulator,
      5 x 2048 values over 4 warps (~80 registers per thread).
    - CHUNKS: programs per column, ~4 programs per SM over the (TC, CHUNKS) grid, each with at least
      2 BLOCK steps; at most 256. On the interpreter (CPU tensors, no `sms`) up to 3, so that tests cover
      the merge of several chunks.
    """
    block = max(16, min(128, 2048 // kp))
    steps = triton.cdiv(mw, block)
    if sms is None and device.type == "cuda":
        sms = num_sms(device)
    if sms is not None:
        want = _PROGRAMS_PER_SM * sms
        chunks = max(1, min(triton.cdiv(want, tc), triton.cdiv(steps, 2), _MAX_CHUNKS))
    else:
        chunks = max(1, min(3, steps))
    chunk = triton.cdiv(mw, chunks)
    chunks = triton.cdiv(mw, chunk)
    return dict(BLOCK=block, CHUNK=chunk, CHUNKS=chunks, CBLOCK=triton.next_power_of_2(chunks),
                num_warps=4)


# ------------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _taps(KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """The KP axis: tap k = (ci, p, q) for k < K, the bias column k = K, padding beyond."""
    ks = tl.arange(0, KP)
    ci = ks // KK
    rem = ks - ci * KK
    p = rem // KW
    q = rem - p * KW
    return ks, ci, p, q


@triton.jit
def _weights(w_ptr, b_ptr, cp, K: tl.constexpr, KP: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """w' of column cp as a (KP,) vector: w[cp, :K], the bias at K (0 without one), 0 beyond."""
    ks = tl.arange(0, KP)
    wv = tl.load(w_ptr + cp * K + ks, mask=ks < K, other=0.0).to(ACC)
    if HAS_B:
        bv = tl.load(b_ptr + cp + ks * 0, mask=ks == K, other=0.0).to(ACC)
        wv = wv + bv
    return wv


@triton.jit
def _windows(j, mask, HWp, Wp):
    i = j // HWp
    rem = j - i * HWp
    ph = rem // Wp
    pw = rem - ph * Wp
    return i, rem, ph, pw


@triton.jit
def _patch(x_ptr, i, oh, ow, rmask, t, ks, ci, p, q, Ci, TCi, H, W, stride, pad,
           K: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK, KP) tile P': the image under output (oh, ow) of example i, the bias column = 1."""
    ih = (oh * stride - pad)[:, None] + p[None, :]
    iw = (ow * stride - pad)[:, None] + q[None, :]
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    m = rmask[:, None] & (ks < K)[None, :] & inside
    off = ((i.to(tl.int64)[:, None] * TCi + (t * Ci + ci)[None, :]) * H + ih) * W + iw
    v = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC)
    one = (rmask[:, None] & (ks == K)[None, :]).to(ACC)
    return v + one


@triton.jit
def _act(z, mu, r, ga, be, slope):
    """xhat, the leaky-ReLU factor a and y = a (gamma xhat + beta), in the batch norm's order."""
    xhat = (z - mu) * r
    zz = ga * xhat + be
    a = tl.where(zz > 0, 1.0, slope).to(z.dtype)
    return xhat, a, a * zz


@triton.jit
def _pick(upd, new, old):
    return tl.where(upd, new, old)


# ------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _welford(cnt, mean, m2, v, mask):
    cnt_new = cnt + mask.to(v.dtype)
    d = v - mean
    mean = tl.where(mask, mean + d / tl.maximum(cnt_new, 1.0), mean)
    m2 = tl.where(mask, m2 + d * (v - mean), m2)
    return cnt_new, mean, m2


@triton.jit
def _fwd_reduce_kernel(x_ptr, w_ptr, b_ptr, ws_ptr, C, Ci, TCi, H, W, HWp, Wp, MW, CHUNK, CHUNKS,
                       stride, pad, KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                       HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    """ws[cp, k, :] = (mean, m2) of the convolution outputs of chunk k of column cp."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    t = cp // C
    ACC = x_ptr.dtype.element_ty
    ks, ci, p, q = _taps(KK, KW, K, KP)
    wv = _weights(w_ptr, b_ptr, cp, K, KP, HAS_B, ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    cnt = tl.zeros([BLOCK], dtype=ACC)
    mean = tl.zeros([BLOCK], dtype=ACC)
    m2 = tl.zeros([BLOCK], dtype=ACC)
    for s in range(begin, end, BLOCK):
        j = s + tl.arange(0, BLOCK)
        mask = j < end
        i, rem, ph, pw = _windows(j, mask, HWp, Wp)
        for d in tl.static_range(4):
            P = _patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W,
                       stride, pad, K, ACC)
            z = tl.sum(P * wv[None, :], axis=1)
            cnt, mean, m2 = _welford(cnt, mean, m2, z, mask)
    n = tl.sum(cnt, axis=0)
    mu = tl.sum(cnt * mean, axis=0) / tl.maximum(n, 1.0)
    dm = mean - mu
    m2t = tl.sum(m2 + cnt * dm * dm, axis=0)
    tl.store(ws_ptr + (cp * CHUNKS + k) * 2, mu)
    tl.store(ws_ptr + (cp * CHUNKS + k) * 2 + 1, m2t)


@triton.jit
def _window_max(x_ptr, i, ph, pw, mask, t, ks, ci, p, q, wv, mu, r, ga, be, slope, Ci, TCi, H, W,
                stride, pad, K: tl.constexpr, ACC: tl.constexpr):
    """The window's maximum y and, at it: xhat, a, and the position d in 0..3 (first on ties)."""
    P = _patch(x_ptr, i, 2 * ph, 2 * pw, mask, t, ks, ci, p, q, Ci, TCi, H, W, stride, pad, K, ACC)
    best_x, best_a, best = _act(tl.sum(P * wv[None, :], axis=1), mu, r, ga, be, slope)
    sel = tl.zeros(best.shape, dtype=tl.int32)
    for d in tl.static_range(1, 4):
        P = _patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W,
                   stride, pad, K, ACC)
        xh, a, y = _act(tl.sum(P * wv[None, :], axis=1), mu, r, ga, be, slope)
        upd = y > best
        best = _pick(upd, y, best)
        best_x = _pick(upd, xh, best_x)
        best_a = _pick(upd, a, best_a)
        sel = _pick(upd, d, sel)
    return best, best_x, best_a, sel


@triton.jit
def _fwd_apply_kernel(x_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, ws_ptr, out_ptr, mean_ptr, invstd_ptr,
                      C, Ci, TC, TCi, H, W, HWp, Wp, MW, CHUNK, CHUNKS, stride, pad, eps_hi, eps_lo,
                      slope_hi, slope_lo, KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr,
                      KP: tl.constexpr, HAS_B: tl.constexpr, GAMMA_PER_TASK: tl.constexpr,
                      IS_F64: tl.constexpr, BLOCK: tl.constexpr, CBLOCK: tl.constexpr):
    cp = tl.program_id(0)
    k = tl.program_id(1)
    t = cp // C
    ACC = x_ptr.dtype.element_ty
    eps = _f2acc(eps_hi, eps_lo, ACC)
    slope = _f2acc(slope_hi, slope_lo, ACC)
    # Chan merge of the chunk states (4 outputs per window), in chunk order
    kk = tl.arange(0, CBLOCK)
    kmask = kk < CHUNKS
    kb = tl.minimum(kk * CHUNK, MW)
    kn = tl.where(kmask, 4 * (tl.minimum(kb + CHUNK, MW) - kb), 0).to(ACC)
    pm = tl.load(ws_ptr + (cp * CHUNKS + kk) * 2, mask=kmask, other=0.0)
    pm2 = tl.load(ws_ptr + (cp * CHUNKS + kk) * 2 + 1, mask=kmask, other=0.0)
    Mf = _to_acc(4 * MW, ACC)
    mu = tl.sum(kn * pm, axis=0) / Mf
    dmu = pm - mu
    m2 = tl.sum(pm2 + kn * dmu * dmu, axis=0)
    if IS_F64:
        r = 1.0 / tl.sqrt(m2 / Mf + eps)
    else:
        r = 1.0 / tl.sqrt_rn(m2 / Mf + eps)
    if k == 0:
        tl.store(mean_ptr + cp, mu)
        tl.store(invstd_ptr + cp, r)
    if GAMMA_PER_TASK:
        gi = cp
    else:
        gi = cp % C
    ga = tl.load(gamma_ptr + gi).to(ACC)
    be = tl.load(beta_ptr + gi).to(ACC)
    ks, ci, p, q = _taps(KK, KW, K, KP)
    wv = _weights(w_ptr, b_ptr, cp, K, KP, HAS_B, ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    for s in range(begin, end, BLOCK):
        j = s + tl.arange(0, BLOCK)
        mask = j < end
        i, rem, ph, pw = _windows(j, mask, HWp, Wp)
        best, _bx, _ba, _sel = _window_max(x_ptr, i, ph, pw, mask, t, ks, ci, p, q, wv, mu, r, ga, be,
                                           slope, Ci, TCi, H, W, stride, pad, K, ACC)
        tl.store(out_ptr + (i.to(tl.int64) * TC + cp) * HWp + rem, best.to(out_ptr.dtype.element_ty),
                 mask=mask)


# ------------------------------------------------------------------------------------------------------
# backward and double backward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _reduce_kernel(gout_ptr, x_ptr, w_ptr, b_ptr, uw_ptr, ub_ptr, gamma_ptr, beta_ptr, mean_ptr,
                   invstd_ptr, ws_ptr, C, Ci, TC, TCi, H, W, HWp, Wp, MW, CHUNK, CHUNKS, stride, pad,
                   slope_hi, slope_lo, KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr,
                   KP: tl.constexpr, HAS_B: tl.constexpr, GAMMA_PER_TASK: tl.constexpr,
                   NSUM: tl.constexpr, HAS_UW: tl.constexpr, HAS_UB: tl.constexpr, BLOCK: tl.constexpr):
    """ws[cp, k, :NSUM] = (sum g, sum g xhat) (NSUM = 2, backward) and (sum u, sum u xhat, sum u g)
    (NSUM = 5, double backward, u = P' U') over the windows of chunk k of column cp."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    t = cp // C
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    if GAMMA_PER_TASK:
        gi = cp
    else:
        gi = cp % C
    ga = tl.load(gamma_ptr + gi).to(ACC)
    be = tl.load(beta_ptr + gi).to(ACC)
    mu = tl.load(mean_ptr + cp).to(ACC)
    r = tl.load(invstd_ptr + cp).to(ACC)
    ks, ci, p, q = _taps(KK, KW, K, KP)
    wv = _weights(w_ptr, b_ptr, cp, K, KP, HAS_B, ACC)
    if NSUM == 5:
        uv = tl.zeros([KP], dtype=ACC)
        if HAS_UW:
            uv = _weights(uw_ptr, ub_ptr, cp, K, KP, HAS_UB, ACC)
        elif HAS_UB:
            uv = tl.load(ub_ptr + cp + ks * 0, mask=ks == K, other=0.0).to(ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    sg = tl.zeros([BLOCK], dtype=ACC)
    sgx = tl.zeros([BLOCK], dtype=ACC)
    su = tl.zeros([BLOCK], dtype=ACC)
    sux = tl.zeros([BLOCK], dtype=ACC)
    sug = tl.zeros([BLOCK], dtype=ACC)
    for s in range(begin, end, BLOCK):
        j = s + tl.arange(0, BLOCK)
        mask = j < end
        i, rem, ph, pw = _windows(j, mask, HWp, Wp)
        go = tl.load(gout_ptr + (i.to(tl.int64) * TC + cp) * HWp + rem, mask=mask, other=0.0).to(ACC)
        if NSUM == 2:
            _b, bx, ba, _sel = _window_max(x_ptr, i, ph, pw, mask, t, ks, ci, p, q, wv, mu, r, ga, be,
                                           slope, Ci, TCi, H, W, stride, pad, K, ACC)
            g = ba * go
            sg += g
            sgx += g * bx
        else:
            # the four outputs in order, keeping the running maximum (first on ties) and its u
            P = _patch(x_ptr, i, 2 * ph, 2 * pw, mask, t, ks, ci, p, q, Ci, TCi, H, W, stride, pad, K, ACC)
            bx, ba, best = _act(tl.sum(P * wv[None, :], axis=1), mu, r, ga, be, slope)
            u = tl.sum(P * uv[None, :], axis=1)
            bu = u
            su += u
            sux += u * bx
            for d in tl.static_range(1, 4):
                P = _patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W,
                           stride, pad, K, ACC)
                xh, a, y = _act(tl.sum(P * wv[None, :], axis=1), mu, r, ga, be, slope)
                u = tl.sum(P * uv[None, :], axis=1)
                su += u
                sux += u * xh
                upd = y > best
                best = _pick(upd, y, best)
                bx = _pick(upd, xh, bx)
                ba = _pick(upd, a, ba)
                bu = _pick(upd, u, bu)
            g = ba * go
            sg += g
            sgx += g * bx
            sug += bu * g
    base = ws_ptr + (cp * CHUNKS + k) * NSUM
    tl.store(base, tl.sum(sg, axis=0))
    tl.store(base + 1, tl.sum(sgx, axis=0))
    if NSUM == 5:
        tl.store(base + 2, tl.sum(su, axis=0))
        tl.store(base + 3, tl.sum(sux, axis=0))
        tl.store(base + 4, tl.sum(sug, axis=0))


@triton.jit
def _output_terms(x_ptr, i, ph, pw, d: tl.constexpr, mask, t, ks, ci, p, q, wv, uv, mu, r, ga, be, slope,
                  c_u, c_x, c_0, Ci, TCi, H, W, stride, pad, K: tl.constexpr, ACC: tl.constexpr,
                  NSUM: tl.constexpr):
    """Output d (0..3, row-major) of the windows: its patch P', xhat, a, y, u = P' U' (0 for the
    backward) and the part of its z-gradient without g: c_u u + c_x xhat + c_0 (0 on masked rows)."""
    P = _patch(x_ptr, i, 2 * ph + d // 2, 2 * pw + d % 2, mask, t, ks, ci, p, q, Ci, TCi, H, W, stride, pad,
               K, ACC)
    xh, a, y = _act(tl.sum(P * wv[None, :], axis=1), mu, r, ga, be, slope)
    if NSUM == 5:
        u = tl.sum(P * uv[None, :], axis=1)
        gz = c_u * u + c_x * xh + c_0
    else:
        u = tl.zeros(xh.shape, dtype=ACC)
        gz = c_x * xh + c_0
    return P, xh, a, y, u, tl.where(mask, gz, 0.0)


@triton.jit
def _apply_kernel(gout_ptr, x_ptr, w_ptr, b_ptr, uw_ptr, ub_ptr, ugam_ptr, ubet_ptr, gamma_ptr, beta_ptr,
                  mean_ptr, invstd_ptr, ws_ptr, wws_ptr, dgout_ptr, dgamma_ptr, dbeta_ptr,
                  C, T, Ci, TC, TCi, H, W, HWp, Wp, MW, CHUNK, CHUNKS, stride, pad, slope_hi, slope_lo,
                  KK: tl.constexpr, KW: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                  HAS_B: tl.constexpr, GAMMA_PER_TASK: tl.constexpr, NSUM: tl.constexpr,
                  HAS_UW: tl.constexpr, HAS_UB: tl.constexpr, HAS_UG: tl.constexpr, HAS_UBETA: tl.constexpr,
                  BLOCK: tl.constexpr, CBLOCK: tl.constexpr, TBLOCK: tl.constexpr):
    """NSUM = 2 (backward): dz = gamma r (g - gbar - xhat m), wws[cp, k] = sum dz P'; dgamma, dbeta.
    NSUM = 5 (double backward): d(gout) = a (cu u + cx xhat + c0) at the maximum, gz = eu u + eg g +
    ex xhat + e0, wws[cp, k] = sum gz P'; d(gamma) = r M Q (dgamma_ptr)."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    t = cp // C
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    if GAMMA_PER_TASK:
        gi = cp
    else:
        gi = cp % C
    ga = tl.load(gamma_ptr + gi).to(ACC)
    be = tl.load(beta_ptr + gi).to(ACC)
    mu = tl.load(mean_ptr + cp).to(ACC)
    r = tl.load(invstd_ptr + cp).to(ACC)
    Mf = _to_acc(4 * MW, ACC)
    Sg = _chunk_sum(ws_ptr, cp, CHUNKS, 0, NSUM, CBLOCK)
    Sgx = _chunk_sum(ws_ptr, cp, CHUNKS, 1, NSUM, CBLOCK)
    ks, ci, p, q = _taps(KK, KW, K, KP)
    wv = _weights(w_ptr, b_ptr, cp, K, KP, HAS_B, ACC)
    if NSUM == 2:
        gbar = Sg / Mf
        m = Sgx / Mf
        kk = ga * r
        # dz = kk (g - gbar - xhat m) = c_g g + c_x xhat + c_0
        uv = tl.zeros([KP], dtype=ACC)
        c_u = tl.zeros([], dtype=ACC)
        c_x = -kk * m
        c_0 = -kk * gbar
        c_g = kk
        if k == 0:
            if GAMMA_PER_TASK:
                tl.store(dgamma_ptr + cp, Sgx.to(dgamma_ptr.dtype.element_ty))
                tl.store(dbeta_ptr + cp, Sg.to(dbeta_ptr.dtype.element_ty))
            else:
                if cp < C:  # task 0: the per-task sums added in task order
                    dbt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 0, 2, TBLOCK, CBLOCK)
                    dgt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 1, 2, TBLOCK, CBLOCK)
                    tl.store(dgamma_ptr + cp, tl.sum(dgt, axis=0).to(dgamma_ptr.dtype.element_ty))
                    tl.store(dbeta_ptr + cp, tl.sum(dbt, axis=0).to(dbeta_ptr.dtype.element_ty))
    else:
        uv = tl.zeros([KP], dtype=ACC)
        if HAS_UW:
            uv = _weights(uw_ptr, ub_ptr, cp, K, KP, HAS_UB, ACC)
        elif HAS_UB:
            uv = tl.load(ub_ptr + cp + ks * 0, mask=ks == K, other=0.0).to(ACC)
        if HAS_UG:
            ugam = tl.load(ugam_ptr + gi).to(ACC)
        else:
            ugam = tl.zeros([], dtype=ACC)
        if HAS_UBETA:
            ubet = tl.load(ubet_ptr + gi).to(ACC)
        else:
            ubet = tl.zeros([], dtype=ACC)
        Su = _chunk_sum(ws_ptr, cp, CHUNKS, 2, 5, CBLOCK)
        Sux = _chunk_sum(ws_ptr, cp, CHUNKS, 3, 5, CBLOCK)
        Sug = _chunk_sum(ws_ptr, cp, CHUNKS, 4, 5, CBLOCK)
        cu, cx, c0, eu, eg, ex, e0, ggam = _dbwd_coef(Sg, Sgx, Su, Sux, Sug, Mf, ga, r, ugam, ubet)
        # gz = eu u + eg g + ex xhat + e0
        c_u, c_x, c_0, c_g = eu, ex, e0, eg
        if k == 0:
            if GAMMA_PER_TASK:
                tl.store(dgamma_ptr + cp, ggam.to(dgamma_ptr.dtype.element_ty))
            else:
                if cp < C:  # task 0: d(gamma)[c] = sum_t r_t M Q_t, in task order
                    ts = tl.arange(0, TBLOCK)
                    rt = tl.load(invstd_ptr + ts * C + cp, mask=ts < T, other=0.0).to(ACC)
                    Sgt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 0, 5, TBLOCK, CBLOCK)
                    Sgxt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 1, 5, TBLOCK, CBLOCK)
                    Sut = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 2, 5, TBLOCK, CBLOCK)
                    Suxt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 3, 5, TBLOCK, CBLOCK)
                    Sugt = _task_chunk_sums(ws_ptr, cp, C, T, CHUNKS, 4, 5, TBLOCK, CBLOCK)
                    Qt = Sugt / Mf - (Sut / Mf) * (Sgt / Mf) - (Suxt / Mf) * (Sgxt / Mf)
                    tl.store(dgamma_ptr + cp, tl.sum(rt * Mf * Qt, axis=0).to(dgamma_ptr.dtype.element_ty))
    acc = tl.zeros([BLOCK, KP], dtype=ACC)
    begin = tl.minimum(k * CHUNK, MW)
    end = tl.minimum(begin + CHUNK, MW)
    for s in range(begin, end, BLOCK):
        j = s + tl.arange(0, BLOCK)
        mask = j < end
        i, rem, ph, pw = _windows(j, mask, HWp, Wp)
        pool_off = (i.to(tl.int64) * TC + cp) * HWp + rem
        go = tl.load(gout_ptr + pool_off, mask=mask, other=0.0).to(ACC)
        # one pass over the window's four outputs: the terms of gz that do not involve g go into acc at
        # once; g is nonzero only at the maximum, known after the fourth output, so its term is added
        # with the patch kept at the running maximum (Psel)
        P, xh, a, y, u, gz = _output_terms(x_ptr, i, ph, pw, 0, mask, t, ks, ci, p, q, wv, uv, mu, r, ga, be,
                                           slope, c_u, c_x, c_0, Ci, TCi, H, W, stride, pad, K, ACC,
                                           NSUM)
        acc += gz[:, None] * P
        best, bx, ba, bu, Psel = y, xh, a, u, P
        for d in tl.static_range(1, 4):
            P, xh, a, y, u, gz = _output_terms(x_ptr, i, ph, pw, d, mask, t, ks, ci, p, q, wv, uv, mu, r, ga,
                                               be, slope, c_u, c_x, c_0, Ci, TCi, H, W, stride, pad, K, ACC,
                                               NSUM)
            acc += gz[:, None] * P
            upd = y > best
            best = _pick(upd, y, best)
            bx = _pick(upd, xh, bx)
            ba = _pick(upd, a, ba)
            bu = _pick(upd, u, bu)
            Psel = _pick(upd[:, None], P, Psel)
        g_at = ba * go  # g at the window's maximum (0 at its other outputs; 0 on masked rows)
        acc += (c_g * g_at)[:, None] * Psel
        if NSUM == 5:
            dgo = ba * (cu * bu + cx * bx + c0)
            tl.store(dgout_ptr + pool_off, dgo.to(dgout_ptr.dtype.element_ty), mask=mask)
    tl.store(wws_ptr + (cp * CHUNKS + k) * KP + ks, tl.sum(acc, axis=0))


@triton.jit
def _wsum_kernel(wws_ptr, dw_ptr, db_ptr, CHUNKS, K: tl.constexpr, KP: tl.constexpr, HAS_B: tl.constexpr,
                 CBLOCK: tl.constexpr):
    """dw[cp, :K] and dbias[cp] = the chunk partials of wws[cp] added in chunk order."""
    cp = tl.program_id(0)
    kk = tl.arange(0, CBLOCK)
    ks = tl.arange(0, KP)
    v = tl.load(wws_ptr + (cp * CHUNKS + kk[:, None]) * KP + ks[None, :], mask=(kk < CHUNKS)[:, None],
                other=0.0)
    tot = tl.sum(v, axis=0)
    tl.store(dw_ptr + cp * K + ks, tot.to(dw_ptr.dtype.element_ty), mask=ks < K)
    if HAS_B:
        tl.store(db_ptr + cp + ks * 0, tot.to(db_ptr.dtype.element_ty), mask=ks == K)


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
    kp = triton.next_power_of_2(k + 1)
    hp, wp = ho // 2, wo // 2
    g = dict(n=n, t=t, c=c, ci=ci, tc=t * c, tci=tci, h=h, w=wd, hp=hp, wp=wp, mw=n * hp * wp, k=k, kp=kp,
             kk=kh * kw, kw=kw, stride=stride, pad=pad)
    g["cfg"] = block_config(g["mw"], g["tc"], kp, x.device)
    return g


def forward(x, w, bias, gamma, beta, meta):
    """(out, mean, invstd) of conv_bn_pool."""
    g = _geometry(x, w, meta)
    cfg = g["cfg"]
    w = w.contiguous()
    gamma, beta = gamma.contiguous(), beta.contiguous()
    b = bias.contiguous() if bias is not None else w
    out = torch.empty(g["n"], g["tc"], g["hp"], g["wp"], dtype=x.dtype, device=x.device)
    mean = torch.empty(g["tc"], dtype=x.dtype, device=x.device)
    invstd = torch.empty_like(mean)
    ws = torch.empty(g["tc"] * cfg["CHUNKS"] * 2, dtype=x.dtype, device=x.device)
    grid = (g["tc"], cfg["CHUNKS"])
    geo = (g["hp"] * g["wp"], g["wp"], g["mw"], cfg["CHUNK"], cfg["CHUNKS"], g["stride"], g["pad"])
    const = dict(KK=g["kk"], KW=g["kw"], K=g["k"], KP=g["kp"], HAS_B=bias is not None, BLOCK=cfg["BLOCK"],
                 num_warps=cfg["num_warps"])
    _fwd_reduce_kernel[grid](x, w, b, ws, g["c"], g["ci"], g["tci"], g["h"], g["w"], *geo, **const)
    eps_hi, eps_lo = _split(meta[3])
    sl_hi, sl_lo = _split(meta[4])
    _fwd_apply_kernel[grid](x, w, b, gamma, beta, ws, out, mean, invstd, g["c"], g["ci"], g["tc"], g["tci"],
                            g["h"], g["w"], *geo, eps_hi, eps_lo, sl_hi, sl_lo, **const,
                            GAMMA_PER_TASK=gamma.dim() == 2, IS_F64=x.dtype == torch.float64,
                            CBLOCK=cfg["CBLOCK"])
    return out, mean, invstd


def _backward_pass(nsum, gout, x, w, bias, gamma, beta, mean, invstd, meta, uw=None, ubias=None,
                   ugamma=None, ubeta=None):
    g = _geometry(x, w, meta)
    cfg = g["cfg"]
    w = w.contiguous()
    gamma, beta = gamma.contiguous(), beta.contiguous()
    b = bias.contiguous() if bias is not None else w
    uw_t = uw.contiguous() if uw is not None else w
    ub_t = ubias.contiguous() if ubias is not None else w
    ws = torch.empty(g["tc"] * cfg["CHUNKS"] * nsum, dtype=x.dtype, device=x.device)
    wws = torch.empty(g["tc"] * cfg["CHUNKS"] * g["kp"], dtype=x.dtype, device=x.device)
    grid = (g["tc"], cfg["CHUNKS"])
    geo = (g["hp"] * g["wp"], g["wp"], g["mw"], cfg["CHUNK"], cfg["CHUNKS"], g["stride"], g["pad"])
    sl_hi, sl_lo = _split(meta[4])
    const = dict(KK=g["kk"], KW=g["kw"], K=g["k"], KP=g["kp"], HAS_B=bias is not None,
                 GAMMA_PER_TASK=gamma.dim() == 2, NSUM=nsum, HAS_UW=uw is not None, HAS_UB=ubias is not None,
                 BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    _reduce_kernel[grid](gout, x, w, b, uw_t, ub_t, gamma, beta, mean, invstd, ws, g["c"], g["ci"], g["tc"],
                         g["tci"], g["h"], g["w"], *geo, sl_hi, sl_lo, **const)
    dgout = torch.empty_like(gout) if nsum == 5 else gout
    dgamma = torch.empty_like(gamma)
    dbeta = torch.empty_like(gamma) if nsum == 2 else dgamma
    ug = ugamma.contiguous() if ugamma is not None else gamma
    ubt = ubeta.contiguous() if ubeta is not None else gamma
    _apply_kernel[grid](gout, x, w, b, uw_t, ub_t, ug, ubt, gamma, beta, mean, invstd, ws, wws, dgout, dgamma,
                        dbeta, g["c"], g["t"], g["ci"], g["tc"], g["tci"], g["h"], g["w"], *geo, sl_hi, sl_lo,
                        **const, HAS_UG=ugamma is not None, HAS_UBETA=ubeta is not None,
                        CBLOCK=cfg["CBLOCK"], TBLOCK=triton.next_power_of_2(g["t"]))
    dw = torch.empty_like(w)
    db = torch.empty(g["t"], g["c"], dtype=x.dtype, device=x.device) if bias is not None else None
    _wsum_kernel[(g["tc"],)](wws, dw, db if db is not None else dw, cfg["CHUNKS"], K=g["k"], KP=g["kp"],
                             HAS_B=bias is not None, CBLOCK=cfg["CBLOCK"], num_warps=1)
    return dgout, dw, db, dgamma, dbeta


def backward(gout, x, w, bias, gamma, beta, mean, invstd, meta):
    """(dw, dbias or None, dgamma, dbeta) of conv_bn_pool."""
    _, dw, db, dgamma, dbeta = _backward_pass(2, gout, x, w, bias, gamma, beta, mean, invstd, meta)
    return dw, db, dgamma, dbeta


def double_backward(uw, ubias, ugamma, ubeta, gout, x, w, bias, gamma, beta, mean, invstd, meta):
    """(d gout, d w, d bias or None, d gamma) of conv_bn_pool's backward."""
    dgout, dw, db, dgamma, _ = _backward_pass(5, gout, x, w, bias, gamma, beta, mean, invstd, meta, uw, ubias,
                                              ugamma, ubeta)
    return dgout, dw, db, dgamma
