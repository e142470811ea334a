r"""Triton kernels of `mamlpp_fast.ops.bn_pool.bn_pool`: per-step batch norm + leaky ReLU + 2x2 max
pooling, forward, backward and double backward, never writing the full-resolution activation y or its
gradient dy.

Formulas and symbols: the docstrings of mamlpp_fast.ops.bn_pool (the op) and of
mamlpp_fast.triton.per_step_bn (the batch norm's sums and coefficients, whose helpers these kernels
share).

Work unit. A program takes one (task, channel) column cp = t*C + c of x (N, T*C, H, W) and a chunk of
its cells: cell (i, ch, cw) holds the (up to) four positions (2ch + dh, 2cw + dw), dh, dw in {0, 1}, of
example i; there are N * ceil(H/2) * ceil(W/2) cells, so that every position of x lies in exactly one
cell. A cell with ch < H//2 and cw < W//2 is a pooling window (pooled offset (i, cp, ch, cw)); the cells
of an odd last row or column are not, but their positions enter the statistics and get a gradient.
CELLS cells per vector step, the four positions a loop (one position's vectors live at a time).

- forward:   statistics: per_step_bn's reduction over the column's M = N*H*W elements (the same
             kernel, `_bn_fwd_reduce_kernel`); apply: Chan's merge of its chunks (`_merged_stats`),
             then per window out = the maximum of y and `sel` = its position 0..3 (int8; ties to the
             first, as max_pool2d).
- backward:  reduce: (sum g, sum g xhat), g = a gout at a window's maximum (x read there only);
             apply: dx = gamma r (g - gbar - xhat m) at every position; dgamma, dbeta from the sums.
- double backward: reduce: (sum g, sum g xhat, sum u, sum u xhat, sum u g) with u the upstream gradient
             of dx; apply: gx = eu u + eg g + ex xhat + e0 at every position, d(gout) = a (cu u + cx
             xhat + c0) at each window's maximum, ggamma = r M Q (per_step_bn `_dbwd_coef`).

Each pass is two kernels over the grid (T*C, CHUNKS), and adds the chunk sums of a column in chunk
order: no floating-point atomics, results are reproducible. Where a column is one chunk (CHUNKS = 1),
each pass is one kernel instead (`_single`): the apply program forms its column's sums itself with the
reduction's loop (the same values). With a gamma shared by the tasks, the backward passes need each
channel's sums over the T tasks' columns, which no program can wait for: each program stores its sums
and takes a ticket on its channel's counter (an integer atomic, `_last_ticket`), and the last of the T
adds them in task order (`_shared_params`: the same loads and reduction as the two-kernel path). Launch
configuration from per_step_bn's `bn_block_config` (no autotune, so the kernels also run under
TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import per_step_bn as _bn
from ._device import _tile_counters
from .per_step_bn import (_bn_fwd_reduce_kernel, _chunk_bounds, _chunk_sum, _column, _dbwd_coef, _f2acc,
                          _gamma_index, _last_ticket, _merged_stats, _split, _store_bwd_params, _store_dbwd_gamma,
                          _store_stats, _to_acc, _welford, _xhat_a)

__all__ = ["forward", "backward", "double_backward", "pool_config", "name"]

name = "triton"
SINGLE_PASS = True  # `_single`


def pool_config(n: int, tc: int, h: int, w: int, device: torch.device, sms: int | None = None) -> dict:
    """Launch configuration: per_step_bn's `bn_block_config` for the M = n*h*w elements of a column
    (the statistics pass and the number of chunks CHUNKS); the cell passes split the column's MC cells
    into the same CHUNKS chunks of CCHUNK cells and take CELLS = BLOCK/4 cells per step (>= 16), so that a
    step touches about BLOCK elements, as the batch norm's kernels. With one chunk per column each pass
    is one kernel (`_single`)."""
    # through the module: bench.static_metrics patches it; `sms` as bn_block_config's (bench.trace)
    cfg = _bn.bn_block_config(n * h * w, tc, device) if sms is None else _bn.bn_block_config(n * h * w, tc, device,
                                                                                            sms=sms)
    mc = n * triton.cdiv(h, 2) * triton.cdiv(w, 2)
    cfg["MC"] = mc
    cfg["CCHUNK"] = triton.cdiv(mc, cfg["CHUNKS"])
    cfg["CELLS"] = max(16, cfg["BLOCK"] // 4)
    return cfg


# ------------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _cells(s, end, CELLS: tl.constexpr, HcWc, Wc, Hp, Wp, cp, TC):
    """The cells s .. s+CELLS of a chunk: (example, cell row, cell column), the row mask, the window mask
    (a complete 2x2 window) and the windows' pooled offsets."""
    j = s + tl.arange(0, CELLS)
    mask = j < end
    i = j // HcWc
    rem = j - i * HcWc
    ch = rem // Wc
    cw = rem - ch * Wc
    win = mask & (ch < Hp) & (cw < Wp)
    pool_off = ((i.to(tl.int64) * TC + cp) * Hp + ch) * Wp + cw
    return i, ch, cw, mask, win, pool_off


@triton.jit
def _position(i, ch, cw, d, mask, cp, TC, H, W):
    """Offsets in x of position d (0..3, row-major in the cell) of each cell, and where it exists."""
    h = 2 * ch + d // 2
    w = 2 * cw + d % 2
    ok = mask & (h < H) & (w < W)
    return ((i.to(tl.int64) * TC + cp) * H + h) * W + w, ok


@triton.jit
def _at(x_ptr, i, ch, cw, d, mask, cp, TC, H, W, mu, r, ga, be, slope, sel, go, ACC: tl.constexpr):
    """Position d of each cell: its offsets in x and where it exists, xhat, the leaky-ReLU factor a and
    g = a gout there if it is its window's maximum, else 0."""
    off, ok = _position(i, ch, cw, d, mask, cp, TC, H, W)
    v = tl.load(x_ptr + off, mask=ok, other=0.0).to(ACC)
    xhat, a = _xhat_a(v, mu, r, ga, be, slope)
    return off, ok, xhat, a, tl.where(sel == d, a * go, 0.0)


@triton.jit
def _gout_sel(gout_ptr, gout2_ptr, sel_ptr, pool_off, win, HAS_G2: tl.constexpr, ACC: tl.constexpr):
    """gout at the windows (0 elsewhere) and the position of each window's maximum (-1 elsewhere). HAS_G2:
    gout is the sum of two gradients, read from gout_ptr and gout2_ptr (`backward`'s gout2)."""
    go = tl.load(gout_ptr + pool_off, mask=win, other=0.0).to(ACC)
    if HAS_G2:
        go += tl.load(gout2_ptr + pool_off, mask=win, other=0.0).to(ACC)
    sel = tl.load(sel_ptr + pool_off, mask=win, other=-1).to(tl.int32)
    return go, sel


# ------------------------------------------------------------------------------------------------------
# forward (the statistics pass is per_step_bn's _bn_fwd_reduce_kernel)
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _pool_fwd_apply_kernel(x_ptr, gamma_ptr, beta_ptr, ws_ptr, out_ptr, sel_ptr, mean_ptr, invstd_ptr, C, TC, H, W,
                      Hp, Wp, HcWc, Wc, M, CHUNK, CHUNKS, MC, CCHUNK, eps_hi, eps_lo, slope_hi, slope_lo,
                      GAMMA_PER_TASK: tl.constexpr, IS_F64: tl.constexpr, CELLS: tl.constexpr,
                      CBLOCK: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    """mean, invstd (program (cp, 0)); out = max of y over each window, sel = its position. SINGLE (one
    chunk per column): the statistics are formed here (per_step_bn `_welford`, the reduction kernel's
    loop; the merge of one chunk state in `_merged_stats`' order of operations: the same values)."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    eps = _f2acc(eps_hi, eps_lo, ACC)
    slope = _f2acc(slope_hi, slope_lo, ACC)
    if SINGLE:  # the column is one chunk: its statistics here, as the reduction kernel would form them
        pm, pm2 = _welford(x_ptr, cp, TC, H * W, 0, M, BLOCK)
        Mf = _to_acc(M, ACC)
        kn = Mf
        mu = (kn * pm) / Mf
        dmu = pm - mu
        mu, r = _store_stats(mu, pm2 + kn * dmu * dmu, Mf, eps, mean_ptr, invstd_ptr, cp, k, IS_F64, ACC)
    else:
        mu, r = _merged_stats(ws_ptr, mean_ptr, invstd_ptr, cp, k, CHUNK, CHUNKS, M, eps, IS_F64, CBLOCK, ACC)
    gi = _gamma_index(cp, C, GAMMA_PER_TASK)
    ga = tl.load(gamma_ptr + gi).to(ACC)
    be = tl.load(beta_ptr + gi).to(ACC)
    begin, end = _chunk_bounds(k, CCHUNK, MC)
    for s in range(begin, end, CELLS):
        i, ch, cw, mask, win, pool_off = _cells(s, end, CELLS, HcWc, Wc, Hp, Wp, cp, TC)
        best = tl.zeros([CELLS], dtype=ACC)
        sel = tl.zeros([CELLS], dtype=tl.int32)
        for d in range(4):  # a loop, not unrolled
            off, _ok = _position(i, ch, cw, d, win, cp, TC, H, W)
            v = tl.load(x_ptr + off, mask=win, other=0.0).to(ACC)
            xhat, a = _xhat_a(v, mu, r, ga, be, slope)
            y = a * (ga * xhat + be)
            upd = (y > best) | (d == 0)
            best = tl.where(upd, y, best)
            sel = tl.where(upd, d, sel)
        tl.store(out_ptr + pool_off, best.to(out_ptr.dtype.element_ty), mask=win)
        tl.store(sel_ptr + pool_off, sel.to(tl.int8), mask=win)


# ------------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_sums(gout_ptr, gout2_ptr, sel_ptr, x_ptr, cp, TC, H, W, Hp, Wp, HcWc, Wc, begin, end, ga, be, mu, r,
              slope, HAS_G2: tl.constexpr, CELLS: tl.constexpr, ACC: tl.constexpr):
    """(sum g, sum g xhat) over cells begin..end of column cp: g = a gout at the windows' maxima (the only
    nonzero g), so x is read there only."""
    sg = tl.zeros([CELLS], dtype=ACC)
    sgx = tl.zeros([CELLS], dtype=ACC)
    for s in range(begin, end, CELLS):
        i, ch, cw, mask, win, pool_off = _cells(s, end, CELLS, HcWc, Wc, Hp, Wp, cp, TC)
        go, sel = _gout_sel(gout_ptr, gout2_ptr, sel_ptr, pool_off, win, HAS_G2, ACC)
        off, _ok = _position(i, ch, cw, tl.maximum(sel, 0), win, cp, TC, H, W)
        v = tl.load(x_ptr + off, mask=win, other=0.0).to(ACC)
        xhat, a = _xhat_a(v, mu, r, ga, be, slope)
        g = a * go  # 0 outside the windows (go = 0 there)
        sg += g
        sgx += g * xhat
    return tl.sum(sg, axis=0), tl.sum(sgx, axis=0)


@triton.jit
def _pool_bwd_reduce_kernel(gout_ptr, gout2_ptr, sel_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, ws_ptr,
                            C, TC, H, W, Hp, Wp, HcWc, Wc, MC, CCHUNK, CHUNKS, slope_hi, slope_lo,
                            GAMMA_PER_TASK: tl.constexpr, HAS_G2: tl.constexpr, CELLS: tl.constexpr):
    """ws[cp, k, :] = (sum g, sum g xhat) over chunk k of column cp (`_bwd_sums`)."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _column(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cp, C, GAMMA_PER_TASK, ACC)
    begin, end = _chunk_bounds(k, CCHUNK, MC)
    Sg, Sgx = _bwd_sums(gout_ptr, gout2_ptr, sel_ptr, x_ptr, cp, TC, H, W, Hp, Wp, HcWc, Wc, begin, end, ga, be, mu,
                        r, slope, HAS_G2, CELLS, ACC)
    tl.store(ws_ptr + (cp * CHUNKS + k) * 2, Sg)
    tl.store(ws_ptr + (cp * CHUNKS + k) * 2 + 1, Sgx)


@triton.jit
def _pool_bwd_apply_kernel(gout_ptr, gout2_ptr, sel_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, ws_ptr,
                      dx_ptr, dx2_ptr, dgamma_ptr, dbeta_ptr, cnt_ptr, C, T, TC, H, W, Hp, Wp, HcWc, Wc, M, MC, CCHUNK,
                      CHUNKS, slope_hi, slope_lo, GAMMA_PER_TASK: tl.constexpr, HAS_G2: tl.constexpr,
                      HAS_DX2: tl.constexpr, CELLS: tl.constexpr, CBLOCK: tl.constexpr, TBLOCK: tl.constexpr,
                      SINGLE: tl.constexpr):
    """dx = gamma r (g - gbar - xhat m) at every position, plus dx2 there with HAS_DX2 (`backward`'s dx2: a
    gradient of x from elsewhere, added before the store); dgamma = sum g xhat, dbeta = sum g. SINGLE (one
    chunk per column): the sums are formed here (`_bwd_sums`, as the reduction kernel forms them) and,
    for a gamma shared by the tasks, stored to ws; the last of the T programs of channel c to store them
    (`_last_ticket` on counter c) adds them in task order (`_shared_params`)."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _column(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cp, C, GAMMA_PER_TASK, ACC)
    if SINGLE:
        Sg, Sgx = _bwd_sums(gout_ptr, gout2_ptr, sel_ptr, x_ptr, cp, TC, H, W, Hp, Wp, HcWc, Wc, 0, MC, ga, be, mu, r,
                            slope, HAS_G2, CELLS, ACC)
        if not GAMMA_PER_TASK:
            tl.store(ws_ptr + cp * 2, Sg)
            tl.store(ws_ptr + cp * 2 + 1, Sgx)
            _shared_params(ws_ptr, invstd_ptr, dgamma_ptr, dbeta_ptr, cnt_ptr, cp % C, C, T, M, 2, TBLOCK, ACC)
    else:
        Sg = _chunk_sum(ws_ptr, cp, CHUNKS, 0, 2, CBLOCK)
        Sgx = _chunk_sum(ws_ptr, cp, CHUNKS, 1, 2, CBLOCK)
    Mf = _to_acc(M, ACC)
    gbar = Sg / Mf
    m = Sgx / Mf
    kk = ga * r
    if GAMMA_PER_TASK or not SINGLE:
        _store_bwd_params(ws_ptr, dgamma_ptr, dbeta_ptr, cp, k, C, T, CHUNKS, Sg, Sgx, GAMMA_PER_TASK, CBLOCK,
                          TBLOCK)
    begin, end = _chunk_bounds(k, CCHUNK, MC)
    for s in range(begin, end, CELLS):
        i, ch, cw, mask, win, pool_off = _cells(s, end, CELLS, HcWc, Wc, Hp, Wp, cp, TC)
        go, sel = _gout_sel(gout_ptr, gout2_ptr, sel_ptr, pool_off, win, HAS_G2, ACC)
        for d in range(4):  # a loop, not unrolled
            off, ok, xhat, a, g = _at(x_ptr, i, ch, cw, d, mask, cp, TC, H, W, mu, r, ga, be, slope, sel, go, ACC)
            dx = kk * (g - gbar - xhat * m)
            if HAS_DX2:
                dx += tl.load(dx2_ptr + off, mask=ok, other=0.0).to(ACC)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------------------
# double backward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _dbwd_sums(u_ptr, gout_ptr, sel_ptr, x_ptr, cp, TC, H, W, Hp, Wp, HcWc, Wc, begin, end, ga, be, mu, r, slope,
               HAS_U: tl.constexpr, CELLS: tl.constexpr, ACC: tl.constexpr):
    """(sum g, sum g xhat, sum u, sum u xhat, sum u g) over cells begin..end of column cp."""
    sg = tl.zeros([CELLS], dtype=ACC)
    sgx = tl.zeros([CELLS], dtype=ACC)
    su = tl.zeros([CELLS], dtype=ACC)
    sux = tl.zeros([CELLS], dtype=ACC)
    sug = tl.zeros([CELLS], dtype=ACC)
    for s in range(begin, end, CELLS):
        i, ch, cw, mask, win, pool_off = _cells(s, end, CELLS, HcWc, Wc, Hp, Wp, cp, TC)
        go, sel = _gout_sel(gout_ptr, gout_ptr, sel_ptr, pool_off, win, False, ACC)
        for d in range(4):  # a loop, not unrolled
            off, ok, xhat, a, g = _at(x_ptr, i, ch, cw, d, mask, cp, TC, H, W, mu, r, ga, be, slope, sel, go, ACC)
            sg += g
            sgx += g * xhat
            if HAS_U:
                u = tl.load(u_ptr + off, mask=ok, other=0.0).to(ACC)
                su += u
                sux += u * xhat  # u = 0 where no position is
                sug += u * g
    return (tl.sum(sg, axis=0), tl.sum(sgx, axis=0), tl.sum(su, axis=0), tl.sum(sux, axis=0),
            tl.sum(sug, axis=0))


@triton.jit
def _store_sums5(base, S0, S1, S2, S3, S4):
    tl.store(base, S0)
    tl.store(base + 1, S1)
    tl.store(base + 2, S2)
    tl.store(base + 3, S3)
    tl.store(base + 4, S4)


@triton.jit
def _pool_dbwd_reduce_kernel(u_ptr, gout_ptr, sel_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, ws_ptr,
                             C, TC, H, W, Hp, Wp, HcWc, Wc, MC, CCHUNK, CHUNKS, slope_hi, slope_lo,
                             GAMMA_PER_TASK: tl.constexpr, HAS_U: tl.constexpr, CELLS: tl.constexpr):
    """ws[cp, k, :] = (sum g, sum g xhat, sum u, sum u xhat, sum u g) over chunk k of column cp."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    _gi, ga, be, mu, r = _column(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cp, C, GAMMA_PER_TASK, ACC)
    begin, end = _chunk_bounds(k, CCHUNK, MC)
    S0, S1, S2, S3, S4 = _dbwd_sums(u_ptr, gout_ptr, sel_ptr, x_ptr, cp, TC, H, W, Hp, Wp, HcWc, Wc, begin, end, ga,
                                    be, mu, r, slope, HAS_U, CELLS, ACC)
    _store_sums5(ws_ptr + (cp * CHUNKS + k) * 5, S0, S1, S2, S3, S4)


@triton.jit
def _pool_dbwd_apply_kernel(u_ptr, ugam_ptr, ubet_ptr, gout_ptr, sel_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr,
                       invstd_ptr, ws_ptr, gx_ptr, ggamma_ptr, dgout_ptr, cnt_ptr, C, T, TC, H, W, Hp, Wp, HcWc, Wc, M,
                       MC, CCHUNK, CHUNKS, slope_hi, slope_lo, GAMMA_PER_TASK: tl.constexpr,
                       HAS_U: tl.constexpr, HAS_UG: tl.constexpr, HAS_UB: tl.constexpr, CELLS: tl.constexpr,
                       CBLOCK: tl.constexpr, TBLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """gx = eu u + eg g + ex xhat + e0 at every position; d(gout) = a (cu u + cx xhat + c0) at each
    window's maximum; ggamma = r M Q. SINGLE (one chunk per column): the sums are formed here
    (`_dbwd_sums`) and, for a gamma shared by the tasks, stored to ws and added over the tasks by the
    channel's last program (`_shared_params`), as in the backward."""
    cp = tl.program_id(0)
    k = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    slope = _f2acc(slope_hi, slope_lo, ACC)
    gi, ga, be, mu, r = _column(gamma_ptr, beta_ptr, mean_ptr, invstd_ptr, cp, C, GAMMA_PER_TASK, ACC)
    if SINGLE:
        Sg, Sgx, Su, Sux, Sug = _dbwd_sums(u_ptr, gout_ptr, sel_ptr, x_ptr, cp, TC, H, W, Hp, Wp, HcWc, Wc, 0, MC,
                                           ga, be, mu, r, slope, HAS_U, CELLS, ACC)
        if not GAMMA_PER_TASK:
            _store_sums5(ws_ptr + cp * 5, Sg, Sgx, Su, Sux, Sug)
            _shared_params(ws_ptr, invstd_ptr, ggamma_ptr, ggamma_ptr, cnt_ptr, cp % C, C, T, M, 5, TBLOCK, ACC)
    else:
        Sg = _chunk_sum(ws_ptr, cp, CHUNKS, 0, 5, CBLOCK)
        Sgx = _chunk_sum(ws_ptr, cp, CHUNKS, 1, 5, CBLOCK)
        Su = _chunk_sum(ws_ptr, cp, CHUNKS, 2, 5, CBLOCK)
        Sux = _chunk_sum(ws_ptr, cp, CHUNKS, 3, 5, CBLOCK)
        Sug = _chunk_sum(ws_ptr, cp, CHUNKS, 4, 5, CBLOCK)
    if HAS_UG:
        ugam = tl.load(ugam_ptr + gi).to(ACC)
    else:
        ugam = tl.zeros([], dtype=ACC)
    if HAS_UB:
        ubet = tl.load(ubet_ptr + gi).to(ACC)
    else:
        ubet = tl.zeros([], dtype=ACC)
    Mf = _to_acc(M, ACC)
    cu, cx, c0, eu, eg, ex, e0, ggam = _dbwd_coef(Sg, Sgx, Su, Sux, Sug, Mf, ga, r, ugam, ubet)
    if GAMMA_PER_TASK or not SINGLE:
        _store_dbwd_gamma(ws_ptr, invstd_ptr, ggamma_ptr, cp, k, C, T, CHUNKS, ggam, Mf, GAMMA_PER_TASK, CBLOCK,
                          TBLOCK, ACC)
    begin, end = _chunk_bounds(k, CCHUNK, MC)
    for s in range(begin, end, CELLS):
        i, ch, cw, mask, win, pool_off = _cells(s, end, CELLS, HcWc, Wc, Hp, Wp, cp, TC)
        go, sel = _gout_sel(gout_ptr, gout_ptr, sel_ptr, pool_off, win, False, ACC)
        dgo = tl.zeros([CELLS], dtype=ACC)
        for d in range(4):  # a loop, not unrolled
            off, ok, xhat, a, g = _at(x_ptr, i, ch, cw, d, mask, cp, TC, H, W, mu, r, ga, be, slope, sel, go, ACC)
            if HAS_U:
                u = tl.load(u_ptr + off, mask=ok, other=0.0).to(ACC)
            else:
                u = tl.zeros([CELLS], dtype=ACC)
            gx = eu * u + eg * g + ex * xhat + e0
            tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=ok)
            dgo += tl.where(sel == d, a * (cu * u + cx * xhat + c0), 0.0)
        tl.store(dgout_ptr + pool_off, dgo.to(dgout_ptr.dtype.element_ty), mask=win)


@triton.jit
def _shared_params(ws_ptr, invstd_ptr, dg_ptr, db_ptr, cnt_ptr, c, C, T, M, NSUM: tl.constexpr,
                   TBLOCK: tl.constexpr, ACC: tl.constexpr):
    """Single-pass backward (NSUM = 2) or double backward (NSUM = 5) with a gamma shared by the tasks,
    called by every program of channel c after it stored its column's sums (one chunk each): the last of
    the channel's T programs adds the T sums in task order, exactly as the two-kernel path's task-0
    programs do (dgamma, dbeta, resp. ggamma = sum_t r_t M Q_t; the same loads and reduction: the same
    bits), and resets the counter."""
    if _last_ticket(cnt_ptr + c, T):
        zero = tl.zeros([], dtype=ACC)
        if NSUM == 2:
            _store_bwd_params(ws_ptr, dg_ptr, db_ptr, c, 0, C, T, 1, zero, zero, False, 1, TBLOCK, CG=True)
        else:
            _store_dbwd_gamma(ws_ptr, invstd_ptr, dg_ptr, c, 0, C, T, 1, zero, _to_acc(M, ACC), False, 1, TBLOCK, ACC,
                              CG=True)
        tl.store(cnt_ptr + c, 0)


# ------------------------------------------------------------------------------------------------------
# host functions (the implementation protocol of mamlpp_fast.ops.bn_pool)
# ------------------------------------------------------------------------------------------------------
def _geometry(x, meta, gamma, beta):
    """Internal guard of the kernels' memory access (the op, mamlpp_fast.ops.bn_pool, validates user
    input): float32/float64, a contiguous 4-D x, gamma and beta of one shape; and the launch geometry."""
    if gamma.shape != beta.shape:
        raise ValueError(f"triton bn_pool: gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} must have "
                         "one shape (bn_pool expands a shared one)")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton bn_pool: float32 or float64 only, got {x.dtype}")
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError(f"triton bn_pool: x must be a contiguous (N, T*C, H, W) tensor, got {tuple(x.shape)}")
    n, tc, h, w = x.shape
    t = meta[0]
    cfg = pool_config(n, tc, h, w, x.device)
    geo = (tc, h, w, h // 2, w // 2, triton.cdiv(h, 2) * triton.cdiv(w, 2), triton.cdiv(w, 2))
    return n, t, tc // t, tc, cfg, geo


def _single(cfg) -> bool:
    """One kernel per pass (the column's sums formed by the apply program itself) where the
    configuration gives each column one chunk; `SINGLE_PASS = False` forces the two-kernel path (tests)."""
    return SINGLE_PASS and cfg["CHUNKS"] == 1


def forward(x, gamma, beta, meta):
    """(out, mean, invstd, sel) of bn_pool; sel (int8, the shape of out): the position 0..3 of each
    window's maximum, which the backward passes read instead of finding it again."""
    n, t, c, tc, cfg, geo = _geometry(x, meta, gamma, beta)
    h, w = x.shape[2], x.shape[3]
    gamma, beta = gamma.contiguous(), beta.contiguous()
    out = torch.empty(n, tc, h // 2, w // 2, dtype=x.dtype, device=x.device)
    sel = torch.empty(out.shape, dtype=torch.int8, device=x.device)
    mean = torch.empty(tc, dtype=x.dtype, device=x.device)
    invstd = torch.empty_like(mean)
    grid = (tc, cfg["CHUNKS"])
    m = n * h * w
    single = _single(cfg)
    # the chunks' sums; the single pass forms them in the apply program and reads no workspace
    ws = mean if single else torch.empty(tc * cfg["CHUNKS"] * 2, dtype=x.dtype, device=x.device)
    if not single:
        _bn_fwd_reduce_kernel[grid](x, ws, tc, h * w, m, cfg["CHUNK"], cfg["CHUNKS"], BLOCK=cfg["BLOCK"],
                                    num_warps=cfg["num_warps"])
    eps_hi, eps_lo = _split(meta[1])
    sl_hi, sl_lo = _split(meta[2])
    _pool_fwd_apply_kernel[grid](x, gamma, beta, ws, out, sel, mean, invstd, c, *geo, m, cfg["CHUNK"],
                                 cfg["CHUNKS"], cfg["MC"], cfg["CCHUNK"], eps_hi, eps_lo, sl_hi, sl_lo,
                                 GAMMA_PER_TASK=gamma.dim() == 2, IS_F64=x.dtype == torch.float64,
                                 CELLS=cfg["CELLS"], CBLOCK=cfg["CBLOCK"], SINGLE=single, BLOCK=cfg["BLOCK"],
                                 num_warps=cfg["num_warps"])
    return out, mean, invstd, sel


def backward(gout, x, gamma, beta, mean, invstd, sel, meta, gout2=None, dx2=None):
    """(dx, dgamma, dbeta) of bn_pool; dgamma, dbeta shaped like gamma (summed over tasks when shared).
    gout2: a second gradient of the output (the shape of gout, contiguous), added to gout where the kernels
    load it, or None; dx2: a gradient of x from elsewhere (the shape of x, contiguous), added to dx before
    the apply kernel stores it, or None."""
    n, t, c, tc, cfg, geo = _geometry(x, meta, gamma, beta)
    for name, extra, like in (("gout2", gout2, gout), ("dx2", dx2, x)):
        if extra is not None and (extra.shape != like.shape or not extra.is_contiguous() or not like.is_contiguous()):
            raise ValueError(f"triton bn_pool: {name} {tuple(extra.shape)} must be contiguous and of shape "
                             f"{tuple(like.shape)}")
    g2 = dict(HAS_G2=gout2 is not None)
    gout2 = gout if gout2 is None else gout2
    gamma, beta = gamma.contiguous(), beta.contiguous()
    dx = torch.empty_like(x)
    dgamma = torch.empty_like(gamma)
    dbeta = torch.empty_like(gamma)
    ws = torch.empty(tc * cfg["CHUNKS"] * 2, dtype=x.dtype, device=x.device)
    grid = (tc, cfg["CHUNKS"])
    sl_hi, sl_lo = _split(meta[2])
    per_task = gamma.dim() == 2
    cells = (cfg["MC"], cfg["CCHUNK"], cfg["CHUNKS"], sl_hi, sl_lo)
    single = _single(cfg)
    if not single:
        _pool_bwd_reduce_kernel[grid](gout, gout2, sel, x, gamma, beta, mean, invstd, ws, c, *geo, *cells,
                                      GAMMA_PER_TASK=per_task, CELLS=cfg["CELLS"], num_warps=cfg["num_warps"], **g2)
    cnt = _tile_counters(x.device, c)  # the shared gamma's tickets, one per channel (`_shared_params`)
    _pool_bwd_apply_kernel[grid](gout, gout2, sel, x, gamma, beta, mean, invstd, ws, dx, x if dx2 is None else dx2,
                                 dgamma, dbeta, cnt, c, t, *geo, x.numel() // tc, *cells, GAMMA_PER_TASK=per_task,
                                 HAS_DX2=dx2 is not None, CELLS=cfg["CELLS"], CBLOCK=cfg["CBLOCK"],
                                 TBLOCK=triton.next_power_of_2(t), SINGLE=single, num_warps=cfg["num_warps"], **g2)
    return dx, dgamma, dbeta


def double_backward(u, ugamma, ubeta, gout, x, gamma, beta, mean, invstd, sel, meta):
    """(d gout, gx, ggamma) of bn_pool's backward; u, ugamma, ubeta may be None (= zeros)."""
    n, t, c, tc, cfg, geo = _geometry(x, meta, gamma, beta)
    gamma, beta = gamma.contiguous(), beta.contiguous()
    if u is not None and (u.shape != x.shape or not u.is_contiguous()):
        raise ValueError(f"triton bn_pool: the upstream gradient {tuple(u.shape)} must be contiguous like x "
                         f"{tuple(x.shape)}")
    gx = torch.empty_like(x)
    ggamma = torch.empty_like(gamma)
    dgout = torch.empty_like(gout)
    ws = torch.empty(tc * cfg["CHUNKS"] * 5, dtype=x.dtype, device=x.device)
    grid = (tc, cfg["CHUNKS"])
    sl_hi, sl_lo = _split(meta[2])
    per_task = gamma.dim() == 2
    cells = (cfg["MC"], cfg["CCHUNK"], cfg["CHUNKS"], sl_hi, sl_lo)
    has_u = u is not None
    single = _single(cfg)
    if not single:
        _pool_dbwd_reduce_kernel[grid](u if has_u else x, gout, sel, x, gamma, beta, mean, invstd, ws, c, *geo,
                                       *cells, GAMMA_PER_TASK=per_task, HAS_U=has_u, CELLS=cfg["CELLS"],
                                       num_warps=cfg["num_warps"])
    ug = ugamma.contiguous() if ugamma is not None else gamma
    ub = ubeta.contiguous() if ubeta is not None else gamma
    _pool_dbwd_apply_kernel[grid](u if has_u else x, ug, ub, gout, sel, x, gamma, beta, mean, invstd, ws, gx,
                                  ggamma, dgout, _tile_counters(x.device, c), c, t, *geo, x.numel() // tc, *cells, GAMMA_PER_TASK=per_task,
                                  HAS_U=has_u, HAS_UG=ugamma is not None, HAS_UB=ubeta is not None,
                                  CELLS=cfg["CELLS"], CBLOCK=cfg["CBLOCK"], TBLOCK=triton.next_power_of_2(t),
                                  SINGLE=single, num_warps=cfg["num_warps"])
    return dgout, gx, ggamma
