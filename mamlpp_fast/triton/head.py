r"""Triton kernels of `mamlpp_fast.ops.head.head_loss`: the per-task linear head and its summed
cross-entropy, forward, backward and double backward, one kernel per pass.

Formulas and symbols: the docstring of mamlpp_fast.ops.head (z, lse, p, Y, G, H, Gz, sigma).

Work unit: program (t, s) takes task t and chunk s of its F features (`head_config`: S chunks of FCH
features, so that T * S programs approach two waves of the multiprocessors; S = 1 where F is small, as
Omniglot's 64). A task's (n, C) matrices (z, p, p - Y, G, H, Gz) live in one register tile of BN x BC
(n and C padded to powers of two; the op refuses BN * BC > 4096: ops.head.head_supported). The
products over the features run in a loop over BF-wide slices: in float32 each step is a strict-fp32
`tl.dot` of whole slices (up to 128 features: Omniglot's 64 in one step), in float64 a broadcast
product of a (BN, BC, BF) tile reduced over the contracted axis (`head_config`). A few thousand FLOPs
per task: what these kernels cost is the chain of dependent steps of each program (a global load and,
for broadcast products, cross-thread reductions per step), so the float32 steps are as wide as the
tiles allow.

- forward: each program forms its chunk's part of z = x W^T. With S > 1 it stores it and takes a ticket
  from its task's counter (CTA barrier, one acquire-release atomic add at GPU scope, as the
  convolutions' in-kernel split sum in mamlpp_fast.triton.conv); the task's last program adds the S
  parts in chunk order 0..S-1. That program then adds b, stores z and lse (max-shifted), and stores
  the task's sum of lse_i - z_{i y_i}; a second ticket, on the loss counter, elects the last task's
  program, which adds the T task sums in task order, scales, weights, adds prev, writes the loss and
  resets the counter. Fixed orders: reproducible, no floating-point atomics. A label outside [0, C)
  makes its term NaN.
- backward: every program forms p and G = sigma (p - Y) from the saved logits and lse (n x C: cheap
  to repeat) and writes dx = G W and dW = G^T x for its chunk; chunk 0 writes db = column sums of G.
- double backward: one program per task (H needs every feature before any output can be formed):
  H = vx W^T + x vW^T + vb (one pass over F), Gz and G in registers, gb and the task's part of
  gg = w s <p - Y, H> stored; then per slice gx = Gz W + G vW and gW = Gz^T x + G^T vx. An upstream
  gradient that is None is skipped at compile time (HAS_VX / HAS_VW / HAS_VB). The learner takes it of
  the support set only (n = N K examples per task: small).

W and b are read with a task stride (0 for step 0's fast weights, the meta-parameters expanded over the
tasks). Accumulation in the inputs' dtype (fp32 or fp64); the float scale is passed as two fp32 halves
(per_step_bn `_split`) so that fp64 keeps all its bits. Offsets are int32 (< 2^31 elements per tensor).
No autotune: the kernels also run under the Triton interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import _tile_counters, num_sms
from .per_step_bn import _f2acc, _last_ticket, _split

__all__ = ["forward", "backward", "double_backward", "head_config", "name"]

name = "triton"
# elements of a (BN, BC, BF) product tile: 8 per thread at 4 warps. 2048 made the backward spill 8 B under
# Triton 3.6.0 at (8, 8, 32) and took the Omniglot double backward to 230 registers (bench.static_metrics)
TILE_BUDGET = 1024
MIN_CHUNK = 64  # features per program at least, where the forward and backward split F


def head_config(n: int, c: int, f: int, t: int, sms: int, dot: bool = False) -> dict:
    """Tiles and split of the three kernels for T = t tasks of n examples, C = c classes, F = f features.

    dot (float32 operands): the products run as strict-fp32 `tl.dot` (DOT): BN, BC are n and C padded to
    powers of two >= 16 (tl.dot's smallest), BF the features of one step, min(128, 4096 / max(BN, BC))
    (an operand slice of <= 4,096 elements), so that Omniglot's 64 features are one step and
    mini-ImageNet's 1,200 ten (support set) or 38 (target set). Taken where BN x BC <= 4,096 and BN, BC
    <= 256, else the broadcast products below (bench/NOTES.md, "The head's kernels: whole-slice
    products").

    Otherwise (float64, or tiles too large): BN, BC: n and C padded to powers of two; BF the F slice of
    one step, so that BN * BC * BF <= TILE_BUDGET (at least 1, at most the padded F and 64): a broadcast
    product reduced over the contracted axis.

    4 warps (8 for a (BN, BC) tile of >= 2048 elements, >= 1024 with DOT). The forward and backward split
    F into S chunks of FCH features (a multiple of BF, >= 64 features: program (t, s) takes chunk s of
    task t) so that T * S programs approach 2 waves of `sms` multiprocessors: one program per task would
    leave a large F (mini-ImageNet's 1,200) to T multiprocessors' share of the bandwidth. The double
    backward keeps one program per task (its H needs every slice before any output)."""
    bn, bc = triton.next_power_of_2(max(n, 1)), triton.next_power_of_2(max(c, 1))
    fp = triton.next_power_of_2(max(f, 1))
    use_dot = dot and max(bn, 16) * max(bc, 16) <= 4096 and max(bn, bc) <= 256
    if use_dot:
        bn, bc = max(bn, 16), max(bc, 16)
        bf = max(16, min(fp, 128, 4096 // max(bn, bc)))
    else:
        bf = max(1, min(TILE_BUDGET // (bn * bc), fp, 64))
    want = max(1, min(triton.cdiv(f, max(bf, MIN_CHUNK)), triton.cdiv(2 * sms, max(t, 1))))
    fch = triton.cdiv(triton.cdiv(f, want), bf) * bf
    # 8 warps for a (BN, BC) tile of >= 2048 elements, and of >= 1024 with DOT: Omniglot's double backward
    # (32 x 32 x 64) on 4 warps spilled 276 B under Triton 3.6.0, on 8 it takes 156 registers
    warps = 8 if bn * bc >= (1024 if use_dot else 2048) else 4
    return dict(BN=bn, BC=bc, BF=bf, FCH=fch, S=triton.cdiv(f, fch), DOT=use_dot, num_warps=warps)


@triton.jit
def _scale(sc_hi, sc_lo, lw_ptr, HAS_LW: tl.constexpr, ACC: tl.constexpr):
    """w s (the loss's constant factor) as an ACC scalar."""
    c = _f2acc(sc_hi, sc_lo, ACC)
    if HAS_LW:
        c = c * tl.load(lw_ptr).to(ACC)
    return c


@triton.jit
def _probs(logits_ptr, lse_ptr, y_ptr, t, n, C, rows, cols, ACC: tl.constexpr):
    """(p, p - Y) of task t as (BN, BC) tiles, zero outside the n x C block."""
    m2 = (rows < n)[:, None] & (cols < C)[None, :]
    z = tl.load(logits_ptr + (t * n + rows)[:, None] * C + cols[None, :], mask=m2, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + t * n + rows, mask=rows < n, other=0.0).to(ACC)
    y = tl.load(y_ptr + t * n + rows, mask=rows < n, other=-1)
    p = tl.where(m2, tl.exp(z - lse[:, None]), 0.0)
    return p, p - tl.where(m2 & (cols[None, :] == y[:, None]), 1.0, 0.0)


@triton.jit
def _x_slice(ptr, t, F, TF, f, rows, rmask):
    """The (BN, BF) slice of task t's rows of an (n, T*F) tensor at features f (0 outside)."""
    return tl.load(ptr + rows[:, None] * TF + (t * F + f)[None, :], mask=rmask[:, None] & (f < F)[None, :], other=0.0)


@triton.jit
def _w_slice(ptr, task_off, F, f, cols, cmask):
    """The (BC, BF) slice at features f of a (C, F) matrix starting at ptr + task_off (0 outside)."""
    return tl.load(ptr + task_off + cols[:, None] * F + f[None, :], mask=cmask[:, None] & (f < F)[None, :], other=0.0)


@triton.jit
def _rowdot(a, b, DOT: tl.constexpr = False):
    """(BN, BF) x (BC, BF) -> (BN, BC): sum over the slice of a_if b_cf."""
    if DOT:
        return tl.dot(a, tl.trans(b), input_precision="ieee")
    return tl.sum(a[:, None, :] * b[None, :, :], axis=2)


@triton.jit
def _mix_rows(m, b, DOT: tl.constexpr = False):
    """(BN, BC) x (BC, BF) -> (BN, BF): sum over c of m_ic b_cf."""
    if DOT:
        return tl.dot(m, b, input_precision="ieee")
    return tl.sum(m[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _mix_cols(m, a, DOT: tl.constexpr = False):
    """(BN, BC) x (BN, BF) -> (BC, BF): sum over i of m_ic a_if."""
    if DOT:
        return tl.dot(tl.trans(m), a, input_precision="ieee")
    return tl.sum(m[:, :, None] * a[:, None, :], axis=0)


@triton.jit
def _finish_task(z, b_ptr, y_ptr, lw_ptr, prev_ptr, logits_ptr, lse_ptr, part_ptr, loss_ptr, cnt_ptr, t, n, C, T,
                 b_ts, sc_hi, sc_lo, rows, cols, HAS_LW: tl.constexpr, HAS_PREV: tl.constexpr, ACC: tl.constexpr):
    """Task t's logits z (without bias) complete: add the bias, store logits and lse, store the task's
    partial sum of cross-entropies, then take a ticket on the loss counter (cnt_ptr); the last task adds
    the T partials in task order, scales, weights, adds prev, writes the loss, resets the counter."""
    rmask = rows < n
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    z += tl.load(b_ptr + t * b_ts + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    tl.store(logits_ptr + (t * n + rows)[:, None] * C + cols[None, :], z, mask=m2)
    zm = tl.where(m2, z, float("-inf"))
    mx = tl.where(rmask, tl.max(zm, axis=1), 0.0)
    e = tl.where(m2, tl.exp(zm - mx[:, None]), 0.0)
    lse = mx + tl.log(tl.where(rmask, tl.sum(e, axis=1), 1.0))
    tl.store(lse_ptr + t * n + rows, lse, mask=rmask)
    y = tl.load(y_ptr + t * n + rows, mask=rmask, other=0)
    zy = tl.sum(tl.where(m2 & (cols[None, :] == y[:, None]), z, 0.0), axis=1)
    ce = tl.where((y >= 0) & (y < C), lse - zy, float("nan"))
    tl.store(part_ptr + t, tl.sum(tl.where(rmask, ce, 0.0), axis=0))
    if _last_ticket(cnt_ptr, T):
        total = tl.load(part_ptr, cache_modifier=".cg")
        for j in tl.range(1, T, num_stages=1):
            total += tl.load(part_ptr + j, cache_modifier=".cg")
        loss = total * _scale(sc_hi, sc_lo, lw_ptr, HAS_LW, ACC)
        if HAS_PREV:
            loss = loss + tl.load(prev_ptr).to(ACC)
        tl.store(loss_ptr, loss)
        tl.store(cnt_ptr, 0)


@triton.jit
def _head_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, lw_ptr, prev_ptr, logits_ptr, lse_ptr, ws_ptr, part_ptr, loss_ptr,
                     cnt_ptr, n, C, F, TF, T, S, FCH, w_ts, b_ts, sc_hi, sc_lo, HAS_LW: tl.constexpr,
                     HAS_PREV: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                     BF: tl.constexpr, DOT: tl.constexpr = False):
    t = tl.program_id(0)
    s = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BC)
    fo = tl.arange(0, BF)
    rmask = rows < n
    cmask = cols < C
    z = tl.zeros([BN, BC], dtype=ACC)
    for f0 in range(s * FCH, tl.minimum(F, s * FCH + FCH), BF):
        f = f0 + fo
        z += _rowdot(_x_slice(x_ptr, t, F, TF, f, rows, rmask).to(ACC),
                     _w_slice(w_ptr, t * w_ts, F, f, cols, cmask).to(ACC), DOT)
    if SPLIT:
        # slice s's partial logits; the task's last slice program adds the S partials in slice order
        tile = rows[:, None] * BC + cols[None, :]
        tl.store(ws_ptr + (t * S + s) * (BN * BC) + tile, z)
        if _last_ticket(cnt_ptr + 1 + t, S):
            z = tl.load(ws_ptr + t * S * (BN * BC) + tile, cache_modifier=".cg")
            for j in tl.range(1, S, num_stages=1):
                z += tl.load(ws_ptr + (t * S + j) * (BN * BC) + tile, cache_modifier=".cg")
            tl.store(cnt_ptr + 1 + t, 0)
            _finish_task(z, b_ptr, y_ptr, lw_ptr, prev_ptr, logits_ptr, lse_ptr, part_ptr, loss_ptr, cnt_ptr, t, n,
                         C, T, b_ts, sc_hi, sc_lo, rows, cols, HAS_LW, HAS_PREV, ACC)
    else:
        _finish_task(z, b_ptr, y_ptr, lw_ptr, prev_ptr, logits_ptr, lse_ptr, part_ptr, loss_ptr, cnt_ptr, t, n, C,
                     T, b_ts, sc_hi, sc_lo, rows, cols, HAS_LW, HAS_PREV, ACC)


@triton.jit
def _head_bwd_kernel(g_ptr, lw_ptr, x_ptr, w_ptr, logits_ptr, lse_ptr, y_ptr, dx_ptr, dw_ptr, db_ptr, n, C, F, TF,
                     FCH, w_ts, sc_hi, sc_lo, HAS_LW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                     BF: tl.constexpr, DOT: tl.constexpr = False):
    t = tl.program_id(0)
    s = tl.program_id(1)
    ACC = x_ptr.dtype.element_ty
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BC)
    fo = tl.arange(0, BF)
    rmask = rows < n
    cmask = cols < C
    sigma = tl.load(g_ptr).to(ACC) * _scale(sc_hi, sc_lo, lw_ptr, HAS_LW, ACC)
    p, d = _probs(logits_ptr, lse_ptr, y_ptr, t, n, C, rows, cols, ACC)
    G = d * sigma
    if s == 0:
        tl.store(db_ptr + t * C + cols, tl.sum(G, axis=0), mask=cmask)
    for f0 in range(s * FCH, tl.minimum(F, s * FCH + FCH), BF):
        f = f0 + fo
        fm = f < F
        wv = _w_slice(w_ptr, t * w_ts, F, f, cols, cmask)
        xv = _x_slice(x_ptr, t, F, TF, f, rows, rmask)
        tl.store(dx_ptr + rows[:, None] * TF + (t * F + f)[None, :], _mix_rows(G, wv.to(ACC), DOT),
                 mask=rmask[:, None] & fm[None, :])
        tl.store(dw_ptr + (t * C + cols[:, None]) * F + f[None, :], _mix_cols(G, xv.to(ACC), DOT),
                 mask=cmask[:, None] & fm[None, :])


@triton.jit
def _head_dbwd_kernel(vx_ptr, vw_ptr, vb_ptr, g_ptr, lw_ptr, x_ptr, w_ptr, logits_ptr, lse_ptr, y_ptr, gx_ptr,
                      gw_ptr, gb_ptr, gg_ptr, n, C, F, TF, w_ts, sc_hi, sc_lo, HAS_LW: tl.constexpr,
                      HAS_VX: tl.constexpr, HAS_VW: tl.constexpr, HAS_VB: tl.constexpr, BN: tl.constexpr,
                      BC: tl.constexpr, BF: tl.constexpr, DOT: tl.constexpr = False):
    t = tl.program_id(0)
    ACC = x_ptr.dtype.element_ty
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BC)
    fo = tl.arange(0, BF)
    rmask = rows < n
    cmask = cols < C
    c = _scale(sc_hi, sc_lo, lw_ptr, HAS_LW, ACC)
    sigma = tl.load(g_ptr).to(ACC) * c
    p, d = _probs(logits_ptr, lse_ptr, y_ptr, t, n, C, rows, cols, ACC)
    # H = vx W^T + x vW^T + vb
    H = tl.zeros([BN, BC], dtype=ACC)
    if HAS_VX or HAS_VW:
        for f0 in range(0, F, BF):
            f = f0 + fo
            if HAS_VX:
                H += _rowdot(_x_slice(vx_ptr, t, F, TF, f, rows, rmask).to(ACC),
                             _w_slice(w_ptr, t * w_ts, F, f, cols, cmask).to(ACC), DOT)
            if HAS_VW:
                H += _rowdot(_x_slice(x_ptr, t, F, TF, f, rows, rmask).to(ACC),
                             _w_slice(vw_ptr, t * C * F, F, f, cols, cmask).to(ACC), DOT)
    if HAS_VB:
        H += tl.load(vb_ptr + t * C + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    tl.store(gg_ptr + t, c * tl.sum(tl.sum(d * H, axis=1), axis=0))
    ph = p * H
    gz = sigma * (ph - p * tl.sum(ph, axis=1)[:, None])
    G = sigma * d
    tl.store(gb_ptr + t * C + cols, tl.sum(gz, axis=0), mask=cmask)
    for f0 in range(0, F, BF):
        f = f0 + fo
        xm = rmask[:, None] & (f < F)[None, :]
        wm = cmask[:, None] & (f < F)[None, :]
        wv = _w_slice(w_ptr, t * w_ts, F, f, cols, cmask).to(ACC)
        xv = _x_slice(x_ptr, t, F, TF, f, rows, rmask).to(ACC)
        gx = _mix_rows(gz, wv, DOT)
        gw = _mix_cols(gz, xv, DOT)
        if HAS_VW:
            gx += _mix_rows(G, _w_slice(vw_ptr, t * C * F, F, f, cols, cmask).to(ACC), DOT)
        if HAS_VX:
            gw += _mix_cols(G, _x_slice(vx_ptr, t, F, TF, f, rows, rmask).to(ACC), DOT)
        tl.store(gx_ptr + rows[:, None] * TF + (t * F + f)[None, :], gx, mask=xm)
        tl.store(gw_ptr + (t * C + cols[:, None]) * F + f[None, :], gw, mask=wm)


# ------------------------------------------------------------------------------------------------------
# launchers (the implementation interface of mamlpp_fast.ops.head)
# ------------------------------------------------------------------------------------------------------
def _sms(device) -> int:
    """Multiprocessors the split fills: the device's on CUDA; 4 elsewhere (the interpreter)."""
    return num_sms(device) if device.type == "cuda" else 4


def _geometry(x, w, sms=None):
    t, c, f = w.shape
    n = x.shape[0]
    cfg = head_config(n, c, f, t, _sms(x.device) if sms is None else sms, dot=x.dtype == torch.float32)
    return t, n, c, f, cfg


def _consts(meta, lw, like):
    sc_hi, sc_lo = _split(meta[1])
    return sc_hi, sc_lo, lw if lw is not None else like, lw is not None


def forward(x, w, b, labels, lw, prev, meta):
    """(loss 0-d, logits (T, n, C), lse (T, n)) in one launch of T x S programs."""
    t, n, c, f, cfg = _geometry(x, w)
    logits = torch.empty(t, n, c, dtype=x.dtype, device=x.device)
    lse = torch.empty(t, n, dtype=x.dtype, device=x.device)
    part = torch.empty(t, dtype=x.dtype, device=x.device)
    loss = torch.empty((), dtype=x.dtype, device=x.device)
    split = cfg["S"] > 1
    ws = torch.empty(t * cfg["S"] * cfg["BN"] * cfg["BC"] if split else 1, dtype=x.dtype, device=x.device)
    sc_hi, sc_lo, lw_arg, has_lw = _consts(meta, lw, part)
    # counters: [0] the loss's ticket, [1 + t] task t's slice tickets (every launch leaves them at zero)
    cnt = _tile_counters(x.device, 1 + t)
    _head_fwd_kernel[(t, cfg["S"])](x, w, b, labels, lw_arg, prev if prev is not None else part, logits, lse, ws,
                                    part, loss, cnt, n, c, f, t * f, t, cfg["S"], cfg["FCH"], w.stride(0),
                                    b.stride(0), sc_hi, sc_lo, HAS_LW=has_lw, HAS_PREV=prev is not None, SPLIT=split,
                                    BN=cfg["BN"], BC=cfg["BC"], BF=cfg["BF"], DOT=cfg["DOT"],
                                    num_warps=cfg["num_warps"])
    return loss, logits, lse


def backward(g, x, w, logits, lse, labels, lw, meta):
    """(dx (n, T*F), dW (T, C, F), db (T, C)) in one launch of T x S programs."""
    t, n, c, f, cfg = _geometry(x, w)
    dx = torch.empty_like(x)
    dw = torch.empty(t, c, f, dtype=x.dtype, device=x.device)
    db = torch.empty(t, c, dtype=x.dtype, device=x.device)
    sc_hi, sc_lo, lw_arg, has_lw = _consts(meta, lw, db)
    _head_bwd_kernel[(t, cfg["S"])](g, lw_arg, x, w, logits, lse, labels, dx, dw, db, n, c, f, t * f, cfg["FCH"],
                                    w.stride(0), sc_hi, sc_lo, HAS_LW=has_lw, BN=cfg["BN"], BC=cfg["BC"],
                                    BF=cfg["BF"], DOT=cfg["DOT"], num_warps=cfg["num_warps"])
    return dx, dw, db


def double_backward(vx, vw, vb, g, x, w, logits, lse, labels, lw, meta, need_g=True):
    """(gg 0-d or None, gx (n, T*F), gW (T, C, F), gb (T, C)) in one launch (gg: the sum of the T
    partials, one small torch sum, only when need_g); all None when no upstream gradient is given."""
    if vx is None and vw is None and vb is None:
        return None, None, None, None
    t, n, c, f, cfg = _geometry(x, w)
    gx = torch.empty_like(x)
    gw = torch.empty(t, c, f, dtype=x.dtype, device=x.device)
    gb = torch.empty(t, c, dtype=x.dtype, device=x.device)
    gg = torch.empty(t, dtype=x.dtype, device=x.device)
    sc_hi, sc_lo, lw_arg, has_lw = _consts(meta, lw, gg)
    _head_dbwd_kernel[(t,)](vx if vx is not None else x, vw if vw is not None else gw,
                            vb if vb is not None else gb, g, lw_arg, x, w, logits, lse, labels, gx, gw, gb, gg, n, c,
                            f, t * f, w.stride(0), sc_hi, sc_lo, HAS_LW=has_lw, HAS_VX=vx is not None,
                            HAS_VW=vw is not None, HAS_VB=vb is not None, BN=cfg["BN"], BC=cfg["BC"],
                            BF=cfg["BF"], DOT=cfg["DOT"], num_warps=cfg["num_warps"])
    return (gg.sum() if need_g else None), gx, gw, gb
