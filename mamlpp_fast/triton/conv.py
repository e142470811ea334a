r"""Triton implicit-GEMM kernels of the per-task convolution (``task_conv2d(impl="triton")``).

Symbols (one task ``t`` of B; ``Ci``/``Co`` channels in/out per task, kernel ``kh x kw``, stride
``s``, padding ``pad``; ``K = Ci*kh*kw``, ``L = Ho*Wo``; X is ``x`` zero-padded)::

    F(x, w)[i, t*Co+o, y, z]  = sum_{c,p,q} w[t,o,c,p,q] X[i, t*Ci+c, s*y+p-pad, s*z+q-pad]      (forward)
    D(g, w)[i, t*Ci+c, h, v]  = sum_{o,p,q: s*y+p-pad = h, s*z+q-pad = v} w[t,o,c,p,q] g[i, t*Co+o, y, z]
                                                                                              (data gradient)
    Wg(x, g)[t, o, c, p, q]   = sum_{i,y,z} g[i, t*Co+o, y, z] X[i, t*Ci+c, s*y+p-pad, s*z+q-pad]
                                                                                              (weight gradient)

All three are bilinear and adjoint to each other: <F(x, w), g> = <x, D(g, w)> = <w, Wg(x, g)>.
So, with upstream gradients u (shape of x) and v (shape of w)::

    y  = F(x, w) + bias:  dx = D(gy, w),        dw = Wg(x, gy),   dbias[t,o] = sum_{i,y,z} gy[i, t*Co+o, y, z]
    dx = D(g, w):         dg = F(u, w),         dw = Wg(u, g)
    dw = Wg(x, g):        dx = D(g, v),         dg = F(x, v)

which is how the three autograd Functions of mamlpp_fast.ops.conv_triton_autograd differentiate each
other: the chain closes, so the
convolution is differentiable to any order (MAML++ needs two) with these three kernels only.

Each kernel is one GEMM per task, the task on grid axis 2, the operands gathered from the task-major
activations on the fly (implicit GEMM: no im2col buffer):

- forward: rows m = (i, y, z) (M = n*L), columns o (Co), reduction k = (c, p, q) (K);
- data gradient: rows m = (i, h, v) (n*H*W), columns c (Ci), reduction k = (o, p, q) (Co*kh*kw), a
  term kept only where (h + pad - p) and (v + pad - q) are non-negative multiples of s inside the
  output;
- weight gradient: rows o (Co), columns k = (c, p, q) (K), reduction r = (i, y, z) (n*L), split into
  SPLIT chunks (grid axis 2 = task * SPLIT) so that the few (Co x K) output tiles fill the GPU; each
  chunk writes its own partial and the partials are summed in order afterwards (deterministic: no
  atomics).

Precision: fp32 inputs accumulate in fp32 with ``input_precision="ieee"`` (strict float32, the
learner's default) or ``"tf32"`` when ``torch.backends.cudnn.allow_tf32`` is on (config key
allow_tf32); fp64 accumulates in fp64. Offsets are int32: every tensor must have < 2^31 elements.
Block sizes: `conv_block_config` (no autotune), so the kernels also run under the Triton interpreter
(TRITON_INTERPRET=1, CPU tensors; slowly, tests only).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._device import num_sms

__all__ = ["conv_forward", "conv_data_grad", "conv_weight_grad", "conv_block_config"]


def _precision(dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def conv_block_config(rows: int, cols: int, red: int, device: torch.device) -> dict:
    """Heuristic "conv_block_config" for a GEMM of rows x cols with reduction length red (per task).

    BLOCK_N: next power of two of cols in [16, 64] (Co or Ci: 48-64 in the paper's networks, so one
    column tile); BLOCK_M: 128 rows when there are >= 4 row tiles of 128, else 64 (or down to 16 for
    tiny problems); BLOCK_K: 16; 8 warps for 128-row tiles, else 4 (tl.dot needs every dimension
    >= 16). Register cap, from ptxas -v for sm_90a on the kernels Triton 3.8 generates here (no GPU
    needed; fp32, 3x3, stride 1, default 3 pipeline stages): BLOCK_K=32 used 236 registers per
    thread for the forward at 128x64 (8 warps) and spilled 72 bytes at 64x64 (4 warps); BLOCK_K=16
    gives 218 and 224 registers without spills, the data and weight gradients at most 195. The
    accumulator is BLOCK_M x BLOCK_N fp32 = 32 values per thread in both shapes."""
    bn = max(16, min(64, triton.next_power_of_2(max(int(cols), 1))))
    if rows >= 4 * 128:
        bm = 128
    elif rows >= 64:
        bm = 64
    else:
        bm = max(16, min(64, triton.next_power_of_2(max(int(rows), 1))))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=16, num_warps=8 if bm == 128 else 4)


def _split_for(tiles: int, red: int, block_r: int, device: torch.device) -> int:
    """Chunks of the weight gradient's reduction: enough programs for ~2 per SM, each chunk >= 4 blocks."""
    if device.type != "cuda":
        return 1
    want = 2 * num_sms(device)
    by_occupancy = triton.cdiv(want, max(tiles, 1))
    by_work = triton.cdiv(red, 4 * block_r)
    return max(1, min(by_occupancy, by_work, 64))


# ------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, NT, CI, CO, H, W, HO, WO, M,
                     KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[i, t*CO+o, y, z] = bias[t, o] + sum_k x-gather[m, k] * w[t, o, k]; m = i*L + (y*WO + z).

    The gather offset splits into a row part and a reduction part, x_off = row_base[m] + k_off[k] with
    row_base = ((i*NT + t)*CI)*H*W + (y*S - PAD)*W + (z*S - PAD) and k_off = c*H*W + p*W + q, so the 2-D
    work per element is one add for the address and the four padding bounds."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = tl.program_id(2)
    L = HO * WO
    HW = H * W
    K = CI * KH * KW
    ACC = out_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < CO
    i = offs_m // L
    l_ = offs_m % L
    ry = (l_ // WO) * STRIDE - PAD
    rz = (l_ % WO) * STRIDE - PAD
    row_base = (i * NT + t) * CI * HW + ry * W + rz
    w_base = w_ptr + (t * CO + offs_n[None, :]) * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        c = offs_k // (KH * KW)
        r = offs_k % (KH * KW)
        kp = r // KW
        kq = r % KW
        hy = ry[:, None] + kp[None, :]
        hz = rz[:, None] + kq[None, :]
        a_ok = m_ok[:, None] & k_ok[None, :] & (hy >= 0) & (hy < H) & (hz >= 0) & (hz < W)
        a = tl.load(x_ptr + row_base[:, None] + (c * HW + kp * W + kq)[None, :], mask=a_ok, other=0.0)
        b = tl.load(w_base + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + t * CO + offs_n, mask=n_ok, other=0.0)[None, :]
    o_off = ((i * NT + t) * CO * L + l_)[:, None] + (offs_n * L)[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_dgrad_kernel(g_ptr, w_ptr, dx_ptr, NT, CI, CO, H, W, HO, WO, M,
                       KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[i, t*CI+c, h, v] = sum_k g-gather[m, k] * w[t, o, c, p, q]; m = i*H*W + h*W + v, k = (o, p, q).

    The term (o, p, q) reads g at y = (h + PAD - p) / S, z = (v + PAD - q) / S, kept when both are
    integers inside the output. With S = 1 the offset splits like the forward's:
    g_off = ((i*NT + t)*CO)*L + (h + PAD)*WO + (v + PAD) + [o*L - p*WO - q]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = tl.program_id(2)
    HW = H * W
    L = HO * WO
    KK = KH * KW
    K = CO * KK
    ACC = dx_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel c
    m_ok = offs_m < M
    n_ok = offs_n < CI
    i = offs_m // HW
    hw = offs_m % HW
    ry = hw // W + PAD
    rz = hw % W + PAD
    g_row = (i * NT + t) * CO * L
    w_base = w_ptr + t * CO * CI * KK + offs_n[None, :] * KK
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        o = offs_k // KK
        r = offs_k % KK
        kp = r // KW
        kq = r % KW
        ny = ry[:, None] - kp[None, :]
        nz = rz[:, None] - kq[None, :]
        if STRIDE == 1:
            a_ok = m_ok[:, None] & k_ok[None, :] & (ny >= 0) & (ny < HO) & (nz >= 0) & (nz < WO)
            a_off = (g_row + ry * WO + rz)[:, None] + (o * L - kp * WO - kq)[None, :]
        else:
            ny_c = tl.maximum(ny, 0)  # non-negative before // and % (no reliance on rounding of negatives)
            nz_c = tl.maximum(nz, 0)
            y = ny_c // STRIDE
            z = nz_c // STRIDE
            a_ok = (m_ok[:, None] & k_ok[None, :] & (ny >= 0) & (nz >= 0) & (ny_c % STRIDE == 0)
                    & (nz_c % STRIDE == 0) & (y < HO) & (z < WO))
            a_off = g_row[:, None] + (o * L)[None, :] + y * WO + z
        a = tl.load(g_ptr + a_off, mask=a_ok, other=0.0)
        b = tl.load(w_base + (o * CI * KK + r)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
    o_off = ((i * NT + t) * CI * HW + hw)[:, None] + (offs_n * HW)[None, :]
    tl.store(dx_ptr + o_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_wgrad_kernel(x_ptr, g_ptr, ws_ptr, NT, CI, CO, H, W, HO, WO, R, CHUNK, SPLIT,
                       KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ws[s, t, o, k] = sum over r in chunk s of g[i, t*CO+o, y, z] * x-gather[r, k]; r = i*L + y*WO + z.
    Offsets split into row and column parts as in the forward."""
    pid_m = tl.program_id(0)  # o tile
    pid_n = tl.program_id(1)  # k tile
    pid_z = tl.program_id(2)
    t = pid_z // SPLIT
    s = pid_z % SPLIT
    L = HO * WO
    HW = H * W
    K = CI * KH * KW
    ACC = ws_ptr.dtype.element_ty
    offs_o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = offs_o < CO
    k_ok = offs_k < K
    c = offs_k // (KH * KW)
    rr = offs_k % (KH * KW)
    kp = rr // KW
    kq = rr % KW
    x_col = c * HW + kp * W + kq
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    start = s * CHUNK
    for r0 in range(start, start + CHUNK, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        r_ok = (offs_r < R) & (offs_r < start + CHUNK)
        i = offs_r // L
        l_ = offs_r % L
        ry = (l_ // WO) * STRIDE - PAD
        rz = (l_ % WO) * STRIDE - PAD
        a_off = ((i * NT + t) * CO * L + l_)[None, :] + (offs_o * L)[:, None]
        a = tl.load(g_ptr + a_off, mask=o_ok[:, None] & r_ok[None, :], other=0.0)
        hy = ry[:, None] + kp[None, :]
        hz = rz[:, None] + kq[None, :]
        b_ok = r_ok[:, None] & k_ok[None, :] & (hy >= 0) & (hy < H) & (hz >= 0) & (hz < W)
        b_off = ((i * NT + t) * CI * HW + ry * W + rz)[:, None] + x_col[None, :]
        b = tl.load(x_ptr + b_off, mask=b_ok, other=0.0)
        acc += tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
    w_off = ((s * NT + t) * CO + offs_o[:, None]) * K + offs_k[None, :]
    tl.store(ws_ptr + w_off, acc.to(ws_ptr.dtype.element_ty), mask=o_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------------------
# launchers (plain tensors, no autograd)
# ------------------------------------------------------------------------------------------------------
def _check(name, *tensors):
    for t in tensors:
        if t.numel() >= 2 ** 31:
            raise ValueError(f"triton {name}: tensors of >= 2^31 elements are not supported (int32 offsets), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"triton {name}: float32 or float64 tensors only, got {t.dtype}")


def conv_forward(x, w, bias, meta):
    """F(x, w) + bias. x (n, B*Ci, H, W), w (B, Co, Ci, kh, kw), bias (B, Co) or None."""
    b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
    x, w = x.contiguous(), w.contiguous()
    _check("conv forward", x, w)
    n = x.shape[0]
    out = torch.empty(n, b * co, ho, wo, device=x.device, dtype=x.dtype)
    m = n * ho * wo
    cfg = conv_block_config(m, co, ci * kh * kw, x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(co, cfg["BLOCK_N"]), b)
    bias_arg = bias.contiguous() if bias is not None else x
    _conv_fwd_kernel[grid](x, w, bias_arg, out, b, ci, co, h, wd, ho, wo, m, KH=kh, KW=kw, STRIDE=s, PAD=p,
                           HAS_BIAS=bias is not None, PREC=_precision(x.dtype), **cfg)
    return out


def conv_data_grad(g, w, meta):
    """D(g, w): g (n, B*Co, Ho, Wo) -> (n, B*Ci, H, W)."""
    b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
    g, w = g.contiguous(), w.contiguous()
    _check("conv data gradient", g, w)
    n = g.shape[0]
    dx = torch.empty(n, b * ci, h, wd, device=g.device, dtype=g.dtype)
    m = n * h * wd
    cfg = conv_block_config(m, ci, co * kh * kw, g.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(ci, cfg["BLOCK_N"]), b)
    _conv_dgrad_kernel[grid](g, w, dx, b, ci, co, h, wd, ho, wo, m, KH=kh, KW=kw, STRIDE=s, PAD=p,
                             PREC=_precision(g.dtype), **cfg)
    return dx


def conv_weight_grad(x, g, meta):
    """Wg(x, g): -> (B, Co, Ci, kh, kw)."""
    b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
    x, g = x.contiguous(), g.contiguous()
    _check("conv weight gradient", x, g)
    n = x.shape[0]
    k = ci * kh * kw
    red = n * ho * wo
    cfg = conv_block_config(co, k, red, x.device)
    tiles = triton.cdiv(co, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"]) * b
    split = _split_for(tiles, red, cfg["BLOCK_K"], x.device)
    chunk = triton.cdiv(triton.cdiv(red, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(red, chunk)
    ws = torch.empty(split, b, co, k, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(co, cfg["BLOCK_M"]), triton.cdiv(k, cfg["BLOCK_N"]), b * split)
    _conv_wgrad_kernel[grid](x, g, ws, b, ci, co, h, wd, ho, wo, red, chunk, split, KH=kh, KW=kw, STRIDE=s,
                             PAD=p, PREC=_precision(x.dtype), **cfg)
    dw = ws[0] if split == 1 else ws.sum(0)
    return dw.view(b, co, ci, kh, kw)
