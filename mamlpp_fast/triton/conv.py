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

- forward: rows m = (i, y, z) (M = n*L), columns o (Co), reduction over k-steps (tap (p, q), block
  of BLOCK_K input channels), tap-major;
- data gradient: rows m = (i, h, v) (n*H*W), columns c (Ci), reduction over k-steps (tap, block of
  output channels), a term kept only where (h + pad - p) and (v + pad - q) are non-negative multiples
  of s inside the output;
- weight gradient: rows o (Co), columns k = (c, p, q) (K), reduction r = (i, y, z) (n*L).

What keeps the inner loops on FMAs (instruction counts per kernel: bench/conv_ptx.py, bench/NOTES.md):

- no division in any loop. Forward and data gradient: each row's offset at tap (0, 0) and one bit per
  tap (inside the image / reading an output pixel) are computed once per tile by a static loop over
  the taps; a k-step adds the scalar tap offset and tests one bit per row, and the (tap, block)
  counters advance by compare-and-select. Weight gradient: a per-shape lane table (`_lane_table`,
  cached) gives each reduction lane its offsets and tap bits, the lanes whose every tap is inside the
  image first (under Triton < 3.7 read without a tap mask in strict fp32); columns are split into
  (c, p, q) once.
- forward and data gradient form the product transposed (acc[channel, pixel] = wt[k, channel]^T @
  gather[k, pixel]) from weights pre-transposed once per call to (B, kh, kw, Cin, Cout) / (B, kh,
  kw, Cout, Cin), and the weight gradient transposes its g tile, so that the FMA loop reads both
  operands from shared memory with 16-byte loads (Triton 3.7; 3.6 vectorises fewer of them).
- the weight gradient is stored in the forward's weight layout (returned as a (B, Cout, Cin, kh, kw)
  view of it), and LSLR keeps its gradient's layout, so the fast weights of every step and the
  gradients the double backward convolves with are already laid out for the forward kernel (and, under
  Triton < 3.7, the data gradient): no re-layout copy but step 0's expanded meta-weights.
- 48 channels (mini-ImageNet) run as three 16-wide sub-tiles of one program (NSUB=3) that share each
  gathered tile: no idle lanes, and every gathered value feeds 48 FMAs.
- split reductions for the small layers: forward and data gradient over k-steps, weight gradient
  over pixels, SPLIT chunks on grid axis 2 (= task * SPLIT), so that every layer of the paper's
  workloads launches >= 2 waves of programs. Each chunk's program stores its partial, then takes a
  ticket from its tile's counter (`_last_chunk`: one integer atomic add, acquire-release at GPU scope,
  after a CTA barrier); the program that takes the last ticket adds the partials in chunk order
  0..SPLIT-1 (`_chunk_sum`, read through L2) and writes the result, then
  sets the counter back to zero for the next launch. The order of the sum does not depend on which
  program arrives last, so results are deterministic (no floating-point atomics), and no separate sum
  kernel runs. Only where that program's chain of dependent loads, (SPLIT - 1) x NSUB, is short
  (`split_chain_in_kernel`); longer ones (the first layers' weight gradients, mini-ImageNet's 48-channel
  weight gradients) are summed by a separate in-order sum, which reads the partials in parallel. The
  counters are one cached int32 buffer per device and stream (`_tile_counters`).
  MAMLPP_CONV_SPLIT_SUM=separate (`split_sum_in_kernel`) keeps the partials and adds them in order
  with a torch sum instead (one more kernel per split launch), for comparison or as a way out.

Precision: fp32 inputs accumulate in fp32 with ``input_precision="ieee"`` (strict float32, the
learner's default), ``"tf32"`` when ``torch.backends.cudnn.allow_tf32`` is on (config key
allow_tf32), or what config key conv_precision forces (``"ieee"``, ``"tf32"``, ``"tf32x3"``: three TF32
products per pair of operands split into high and low parts, close to float32; `_precision`); fp64
accumulates in fp64. Offsets are int32: every tensor must have < 2^31 elements.
Block sizes: `conv_block_config` and `wgrad_block_config` (no autotune; ptxas register cap of the
forward and data gradient under Triton >= 3.7: `_register_cap`), so the kernels also run
under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors; slowly, tests only). At most 32 filter
taps (one bit each).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._derived import derived
from ._device import _counters, _tile_counters, conv_precision, num_sms  # noqa: F401 (_counters: tests)

__all__ = ["conv_forward", "conv_data_grad", "conv_weight_grad", "conv_block_config", "wgrad_block_config",
           "tensor_core_products",
           "split_sum_in_kernel", "split_chain_in_kernel", "wgrad_sums_split", "wgrad_keeps_own"]


def _precision(dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: float64 "ieee"; float32 the forced one (config
    key conv_precision: "ieee", "tf32" or "tf32x3", `_device.forced_conv_precision`), else "tf32" under
    torch.backends.cudnn.allow_tf32 (config key allow_tf32) and "ieee" (strict) otherwise."""
    if dtype != torch.float32:
        return "ieee"
    forced = conv_precision()
    if forced is not None:
        return forced
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def tensor_core_products(dtype) -> bool:
    """Whether the convolution products of `dtype` operands run on tensor cores: float32 in "tf32" or
    "tf32x3" (`_precision`). Their launches take tiles that Hopper's warpgroup products (wgmma) accept
    (`conv_block_config`, `wgrad_block_config`: tensor_cores)."""
    return dtype == torch.float32 and _precision(dtype) != "ieee"


def tensor_core_mode(dtype):
    """The launchers' `tensor_cores` argument for `dtype` operands: False (strict products, FMA), or the
    precision of their tensor-core products, "tf32" or "tf32x3" (`tensor_core_products`, `_precision`)."""
    return _precision(dtype) if tensor_core_products(dtype) else False


def _tile(cols: int) -> int:
    """Column tile: the largest of 64, 32, 16 that divides `cols` (no idle FMA lanes: 48 channels get
    three tiles of 16), else the next power of two in [16, 64] (masked tail)."""
    for bn in (64, 32, 16):
        if cols % bn == 0:
            return bn
    return max(16, min(64, triton.next_power_of_2(max(int(cols), 1))))


def _sms(device) -> int:
    """Multiprocessors the launch heuristic fills: the device's on CUDA; 4 elsewhere (the interpreter
    runs one program at a time: few, small programs keep the tests fast)."""
    return num_sms(device) if device.type == "cuda" else 4


# the warps per SM that a split launch's grid should supply on average: what the 255-register 2-warp and
# 1-warp programs of most launches can hold (bench.static_metrics `occupancy`), so that every scheduler has
# two warps to switch between (bench/NOTES.md, "split targets counted in warps")
RESIDENT_WARPS = 8


def split_target(sms: int, num_warps: int) -> int:
    """The programs a split launch of `num_warps`-warp programs aims at: RESIDENT_WARPS warps per SM of
    `sms` (programs x num_warps >= RESIDENT_WARPS x sms), and never fewer than two per SM (the earlier
    target, which with 4-warp programs is the same and with 1- or 2-warp ones left the SMs a quarter to
    a half full)."""
    return max(2 * sms, triton.cdiv(RESIDENT_WARPS * sms, num_warps))


def conv_block_config(kind: str, rows: int, cols: int, chans: int, kk: int, tasks: int, sms: int,
                      tensor_cores: bool = False) -> dict:
    """Launch configuration of the forward ("fwd") or data gradient ("dgrad") GEMM of one layer (no
    autotune: it also runs under the interpreter).

    rows m (n*Ho*Wo / n*H*W per task) x cols (Co / Ci), reduction over kk taps x `chans` channels (Ci /
    Co) in k-steps of BLOCK_K = 16 channels (32 with GATHER_MK where the channels are a multiple of 32).
    Returns BLOCK_M (pixels), BLOCK_N (channels) and NSUB (channel sub-tiles per program: 3 at 48
    channels, else 1), BLOCK_K, SPLIT and CHUNK (k-steps per chunk; each chunk writes its own partial
    output, summed in chunk order by the tile's last program: deterministic, `_store_result`), SMALL
    (forward only: the whole reduction Ci*kh*kw <= 32 in one block, the first layer), GATHER_MK (the
    gather's load orientation, `_gather_mk`: pixel-major under Triton < 3.7), num_warps and, for the data
    gradient, W_FWD (it reads the forward's weight layout: Triton < 3.7).

    Rules: BLOCK_N = `_tile(cols)`; BLOCK_M the largest of 128, 64 (128 with sub-tiles) whose programs
    reach 2 waves of `sms`, else the smallest (32, or 512 / BLOCK_N) with SPLIT chunks of >= 2 k-steps
    raising the programs to 2 waves (the 7x7 and 3x3 layers; not yet to `split_target`'s resident
    warps as the weight gradient: at Omniglot's 7x7 layer its SPLIT 3 spilled 16-56 B in the TF32
    kernels under Triton 3.6, bench/NOTES.md); warps for ~32 accumulators per thread
    (16 per sub-tile). The register budget comes from ptxas -v on both Triton versions (bench/NOTES.md,
    bench/conv_ptx.py): 64 accumulators per thread took 254-255 registers under Triton 3.6.

    tensor_cores (float32 products on tensor cores, `tensor_core_mode`: True or "tf32" for TF32, "tf32x3"):
    where there are more than 32 columns, BLOCK_N = 64 and one sub-tile on 4 warps, whatever the column
    count (48 channels: 16 masked rows of the product). The kernels form the product transposed,
    (BLOCK_N x BLOCK_K) @ (BLOCK_K x BLOCK_M), and Hopper's warpgroup product (wgmma) takes 64 of its rows
    per group of 4 warps; the strict-fp32 tiles (16-column sub-tiles, 2-warp programs) compile to the
    older warp-level products (HMMA) instead, and under Triton 3.6 the 2-warp tf32x3 tiles of Omniglot's
    7x7 layer spilled 44-76 B (bench/NOTES.md, "tensor-core tiles"). Except in tf32x3 at 48 channels
    (multiples of 48 that 32 does not divide): there the product is formed pixels by channels (TRANS,
    `_mma_o`), 128 pixel rows by three 16-channel sub-tiles, which masks no product row; its loop's
    issue count (Triton 3.6, sm_90a: 321-325 instructions for 288 tensor-pipe cycles, against 233-238 for
    384 cycles of which a quarter are masked rows) gives 0.89-0.90 of the tensor pipe against 0.75
    (bench/NOTES.md, "48-channel tf32x3 tiles"). In TF32 (one product per pair) the same tile is
    issue-bound below the masked one (0.50 against 0.55) and is not used; nor where its split's chain of
    partial loads would move the sum out of the kernel while the masked tile sums in it
    (`split_chain_in_kernel`: the masked tile's configuration then)."""
    trans = tensor_cores == "tf32x3" and cols % 48 == 0 and cols % 32 != 0
    tc = bool(tensor_cores) and cols > 32 and not trans
    bn = 64 if tc else _tile(cols)
    nsub = 3 if bn == 16 and cols % 48 == 0 else 1  # 48 channels: three 16-column sub-tiles per program
    small = kind == "fwd" and chans * kk <= 32
    gather_mk = _TRITON_VERSION < (3, 7)
    if small:
        bk = max(16, triton.next_power_of_2(chans * kk))
        steps = 1
    else:
        # 32-channel k-steps where the channels come in whole blocks of 32 (Omniglot's 64) and the gather
        # is loaded pixel-major (Triton < 3.7, `_gather_mk`): the loop's fixed cost (pipeline stage
        # bookkeeping, barriers, the tap counters, one mask test per row) is then shared by twice the FMAs
        # (~76-78% -> 80-81% FFMA under Triton 3.6); 48 channels keep 16 (32 would pad a third of the
        # reduction with zeros); under Triton 3.7.1 32 spilled at its register cap
        bk = 32 if gather_mk and chans % 32 == 0 else 16
        steps = kk * triton.cdiv(chans, bk)
    want = 2 * sms
    col_tiles = triton.cdiv(cols, bn * nsub) * tasks
    if trans:
        bm = 128  # 64 pixel rows per tile: 144 tensor-pipe cycles for ~243 instructions (0.59)
    elif nsub == 3:
        # 128 x 16 x 3 at 4 warps (16 accumulators per sub-tile and thread) is the sub-tile shape that
        # neither spills under Triton 3.6 nor drops below 80% FMAs under 3.7 (64 x 16 x 3 at 2 warps
        # spilled, 32 x 16 x 3 needs 2 warps to not spill and then reaches ~62%): 128 rows with a split
        # where that reaches 2 waves, else 32
        bm = 128 if triton.cdiv(rows, 128) * col_tiles * max(1, steps // 2) >= want else 32
    else:
        bm = max(32, 512 // bn)  # >= 16 accumulators per thread
        for cand in (128, 64):
            if cand > bm and triton.cdiv(rows, cand) * col_tiles >= want:
                bm = cand
                break
    tiles = triton.cdiv(rows, bm) * col_tiles
    split = 1
    if not small and tiles < want:
        split = max(1, min(triton.cdiv(want, tiles), steps // 2))
    chunk = max(2, steps // split) if split > 1 else steps  # rounded down: >= split chunks
    split = triton.cdiv(steps, chunk)
    # accumulators per thread: 32 (16 per 16-column sub-tile); 64 took 254-255 registers under Triton
    # 3.6 (the device's) and spilled with 16-column sub-tiles (bench/NOTES.md)
    if small:  # ptxas: 128 x 64 at 4 warps 168 registers (3.6); 128 x 16 x 3 at 4 warps spilled
        warps = max(1, min(4, bm * bn // 2048)) if nsub == 1 else 8 if bm == 128 else 4
    else:
        warps = max(1, bm * bn // (1024 if bn >= 32 else 512))
        if nsub == 3:
            warps = max(2, warps)  # 32 x 16 x 3 at one warp spilled 12 bytes in the data gradient (3.6)
    if tc or trans:
        warps = 4  # one warpgroup: 64 product rows (BLOCK_N, or with TRANS BLOCK_M) per wgmma
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, NSUB=nsub, BLOCK_K=bk, SPLIT=split, CHUNK=chunk, SMALL=small,
               GATHER_MK=gather_mk, num_warps=warps)
    if trans:
        # not where the turn would move the split's sum out of the kernel that the masked tile keeps it in
        # (mini-ImageNet's 10x10 support layer: 500 rows, 14-27 chunks of the turned 128-row tiles, chains
        # of 39-78 loads; the masked 32-row tiles' 9 chunks sum in the kernel): the masked tile's
        # configuration there (bench/NOTES.md)
        if split > 1 and not split_chain_in_kernel(split, cfg, kind):
            plain = conv_block_config(kind, rows, cols, chans, kk, tasks, sms, tensor_cores="tf32")
            if plain["SPLIT"] == 1 or split_chain_in_kernel(plain["SPLIT"], plain, kind):
                return plain
        cfg["TRANS"] = True
    if kind == "dgrad":
        # the data gradient reads the forward's weight layout (one re-layout copy per weight tensor instead
        # of two) under Triton < 3.7, where its loop kept its 16-byte shared loads and FFMA share with it;
        # under 3.7.1 it lost up to 3 points and spilled in one configuration (bench/NOTES.md)
        cfg["W_FWD"] = gather_mk
    return cfg


def wgrad_block_config(co: int, ci: int, kk: int, red: int, tasks: int, sms: int, strict_fp32: bool = False,
                       tensor_cores: bool = False) -> dict:
    """Launch configuration of the weight gradient: per task a (Co x Ci*kh*kw) output in BLOCK_M x BLOCK_N
    tiles (BLOCK_M 64 rows of Co, or three 16-row sub-tiles per program (NSUB=3) at 48 channels;
    BLOCK_N the widest of 128, 64, 32 columns that still reaches 2 waves; TAP_MAJOR (Triton < 3.7,
    Ci a multiple of 64): 64 channels of one tap per column tile),
    reduction over red = n*Ho*Wo in lanes of BLOCK_K = 16 (32 with TAP_MAJOR where 2 waves remain),
    split into SPLIT chunks (multiples of BLOCK_K, >= 2 steps each) so that the programs reach
    `split_target` (RESIDENT_WARPS warps per SM of `sms`); INSIDE (48-channel sub-tiles, strict fp32,
    Triton < 3.7): the lanes whose every tap is inside the image in a loop of their own without the
    per-element tap mask (`_conv_wgrad_kernel`); each chunk
    writes its own partial, summed in chunk order by the tile's last program (`_store_result`;
    deterministic). STORE_KO: the orientation of the stored tile (`_conv_wgrad_kernel`).
    strict_fp32 (float32 operands, strict precision): the tap-major 64 x 64 tiles with 32 lanes per step
    run on 2 warps instead of 4 under Triton < 3.7 (64 accumulators per thread: the loop's FFMA share
    78-79% -> 82% with 255 registers and no spill under 3.6's ptxas; 4 such programs per SM hold the same
    8 warps as 2 of the 4-warp ones did). Not with tl.dot (TF32 needs a 4-warp group for wgmma) or float64
    (twice the registers).
    tensor_cores (float32 products in TF32 or tf32x3: `tensor_core_mode`, False, "tf32" or "tf32x3"; True
    reads as "tf32"): where Co > 32, BLOCK_M = 64 rows and one sub-tile on 4 warps (48 channels: 16 masked
    rows), so that the product's 64 rows are one warpgroup's wgmma (the 16-row sub-tiles compile to
    warp-level HMMA). TRANS (tf32x3 at 48 output channels with Ci*kh*kw >= 128, Triton < 3.7): the tile
    formed columns by channels instead (`_wgrad_cols_step`), 128 columns on the product's rows by three
    16-channel sub-tiles, BLOCK_K 16 and INSIDE, so that no product row is masked; its loop is issue-bound
    on the per-element gather work, and reaches more of the pipe than the masked tile only without the tap
    mask (INSIDE) and under Triton 3.6 (bench/NOTES.md, "The 48-channel tf32x3 weight gradient"). Not
    where its three sub-tiles' chain of partial loads would move the split's sum out of the kernel while
    the masked tile sums in it (`split_chain_in_kernel`): the masked tile's configuration then."""
    k = ci * kk
    tc = bool(tensor_cores) and co > 32
    trans = (tc and tensor_cores == "tf32x3" and co % 48 == 0 and co % 64 != 0 and k >= 128
             and _TRITON_VERSION < (3, 7))
    # 48 rows: three 16-row sub-tiles per program (TRANS: three 16-channel column sub-tiles of the product)
    nsub = 3 if co % 48 == 0 and co % 64 != 0 and (trans or not tc) else 1
    bm = 16 if nsub == 3 else 64 if co > 32 else max(16, triton.next_power_of_2(co))
    want = 2 * sms
    # one tap's 64 channels per column tile (`_conv_wgrad_kernel` TAP_MAJOR; Triton < 3.7, where it took
    # Omniglot's loops from 70-72% to 75% FFMA, 78% with 32 lanes per step; under 3.7.1 it did not help)
    tap_major = nsub == 1 and ci % 64 == 0 and _TRITON_VERSION < (3, 7)
    if tap_major:
        bn = 64
        tiles = triton.cdiv(co, bm) * kk * (ci // bn) * tasks
        # 32 reduction lanes per step where that still leaves 2 waves of >= 2-step chunks, or, in strict fp32
        # (2 warps, below), where its programs fill at least one wave and balance over the SMs no worse than
        # 16 lanes' twice as many would (Omniglot's 3x3 layer: 216 programs and 432 both use 82% of the
        # SMs' turns; the loop's FFMA share 76% -> 82%)
        def balance(programs):  # mean over max programs per SM
            return programs / (triton.cdiv(programs, sms) * sms)

        p32 = tiles * min(triton.cdiv(want, tiles), triton.cdiv(red, 64))
        p16 = tiles * min(triton.cdiv(want, tiles), triton.cdiv(red, 32))
        bk = 32 if tiles * triton.cdiv(red, 64) >= want or (
            strict_fp32 and p32 >= sms and balance(p32) >= balance(p16)) else 16
        max_split = max(1, triton.cdiv(red, 2 * bk))
    else:
        bk = 16
        max_split = max(1, triton.cdiv(red, 2 * bk))
        for bn in (128, 64, 32):  # the widest that reaches 2 waves (the narrower ones do too)
            if bn > 32 and bn > max(16, triton.next_power_of_2(k)):
                continue
            tiles = triton.cdiv(co, bm * nsub) * triton.cdiv(k, bn) * tasks
            if tiles * max_split >= want:
                break
        if nsub == 3 and strict_fp32 and not trans and _TRITON_VERSION < (3, 7):
            # 48 channels, strict fp32 (Triton < 3.7): of those widths, the one whose last column tile pads
            # least, the wider on a tie (K = 432: 4 x 128 columns multiply 16% padding, 7 x 64 3.6%); on
            # 2 warps its loop keeps the 128-wide tile's FFMA share (69 vs 70%, bench/NOTES.md)
            bn = min((b_ for b_ in (128, 64, 32) if b_ <= bn), key=lambda b_: (triton.cdiv(k, b_) * b_, -b_))
        if trans:
            bn = 128  # the product's rows: two warpgroup row blocks (64 columns reached 0.49-0.61, above)
        bn = min(bn, max(16, triton.next_power_of_2(k)))
        tiles = triton.cdiv(co, bm * nsub) * triton.cdiv(k, bn) * tasks
    num_warps = max(1, bm * bn // 1024) if nsub == 1 else max(1, bn // 32)  # ptxas: no spills
    if tap_major and bk == 32 and strict_fp32 and bm * bn == 64 * 64:
        num_warps = 2
    if tc:
        num_warps = 4  # one warpgroup: the tile's 64 rows in one wgmma (8 warps would split its columns)
    split = max(1, min(triton.cdiv(split_target(sms, num_warps), tiles), max_split))
    chunk = max(2 * bk, red // split // bk * bk) if split > 1 else triton.cdiv(red, bk) * bk
    split = triton.cdiv(red, chunk)
    # STORE_KO: the result tile stored as [k, o] under Triton < 3.7 (3.6 then keeps the 48-channel loops'
    # integer instructions as they were before the forward-layout store; 3.7.1 is better with [o, k])
    # INSIDE (48 output channels' sub-tiles, strict fp32, Triton < 3.7): the lanes whose every tap is inside
    # the image (listed first by `_lane_table`) run in a loop without the per-element tap mask
    # (bench/NOTES.md); not under 3.7.1, where the second loop spilled 8 B in the 4-warp 128-column tiles,
    # nor with the masked tensor-core tiles (the turned ones take it: TRANS above), nor in the one-sub-tile
    # tiles (a first layer's 64 x 16 on one warp spilled 12 B with the bias's programs under 3.6)
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, NSUB=nsub, BLOCK_K=bk, SPLIT=split, CHUNK=chunk, TAP_MAJOR=tap_major,
               STORE_KO=_TRITON_VERSION < (3, 7),
               INSIDE=nsub == 3 and (strict_fp32 or trans) and _TRITON_VERSION < (3, 7), num_warps=num_warps)
    if trans:
        # not where the turn would move the split's sum out of the kernel that the masked tile keeps it in
        # (mini-ImageNet's 10x10 support layer: 500 lanes, 16 chunks of 2 steps, a chain of 3 x 15 loads;
        # the masked tile's 32 columns, 11 chunks, one sub-tile): a separate sum launch costs more there than
        # the turn saves (bench/NOTES.md)
        if split > 1 and not split_chain_in_kernel(split, cfg):
            plain = wgrad_block_config(co, ci, kk, red, tasks, sms, strict_fp32=strict_fp32, tensor_cores="tf32")
            if plain["SPLIT"] == 1 or split_chain_in_kernel(plain["SPLIT"], plain):
                return plain
        cfg["TRANS"] = True
    return cfg


def wgrad_sums_split(cfg: dict, with_bias: bool) -> bool:
    """Whether a weight-gradient launch of configuration `cfg` with SPLIT > 1 sums its partials itself
    (under `split_sum_in_kernel`); with_bias: the bias's programs are in the launch.
    Not where they share it with the two- and four-warp, three-sub-tile tiles (48 output channels): there
    the kernel is at 254 registers under Triton 3.6 and spilled 20 B (4 warps, 128 columns) and 40 B
    (2 warps, 64 columns) into its inner loop with both (`python -m bench.probe_split_sum bias`,
    bench.static_metrics); a separate sum of its small partials (48 x 48 x 9 weights per task) costs one
    launch, where a separate bias sum would re-read the layer's whole output gradient."""
    return not (with_bias and cfg["NSUB"] == 3 and cfg["num_warps"] in (2, 4))


_TRITON_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2] if v.isdigit())


def _register_cap(cfg: dict, tensor_cores=False) -> dict:
    """ptxas options of a forward / data-gradient launch: ``maxnreg=128`` (the PTX ``.maxnreg``) under
    Triton >= 3.7 for the strict-fp32 loop kernels with >= 32 accumulators per thread (64 x 64 at 4 warps,
    128 x 16 x 3 at 4 warps, 32 x 64 at 2 warps), else none. Not for tensor-core products (tensor_cores):
    Triton 3.7.1's tf32x3 128 x 64 tiles spilled 464-472 B at the cap and took 216-217 registers without
    it, with no spill.

    Why: for these kernels Triton 3.7.1's PTX leads ptxas (12.8, the one Triton ships, and 13.0) to settle
    on 96 registers and spill 4-12 bytes; capped at 128 it takes 107-110 with no spill and the same inner
    loop (82% FMA at 128 x 16 x 3), whereas the way out through the tile (8 warps or 64-row sub-tiles, 16
    accumulators per thread) costs 16 points of FMA share (66%). Triton 3.6 is left uncapped: its ptxas
    takes 203-210 registers for 128 x 16 x 3 without spills, and any cap from 128 to 255 made it spill
    (bench/NOTES.md, cut 3a). tests/test_static_metrics.py checks the installed version for spills."""
    if _TRITON_VERSION < (3, 7) or cfg.get("SMALL") or tensor_cores:
        return {}
    accs = cfg["BLOCK_M"] * cfg["BLOCK_N"] * cfg["NSUB"] // (32 * cfg["num_warps"])
    return {"maxnreg": 128} if accs >= 32 else {}


# ------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_of(pid_z, SPLIT: tl.constexpr, ROT: tl.constexpr):
    """(task, chunk) of grid axis 2 (= task * SPLIT + program's chunk slot). ROT (0 when launched by the
    package) rotates which chunk a slot computes: tests set it so that a chunk other than the last takes
    the last ticket under the interpreter, which runs the programs in order."""
    t = pid_z // SPLIT
    s = pid_z % SPLIT
    if ROT != 0:
        s = (s + ROT) % SPLIT
    return t, s


@triton.jit
def _last_chunk(cnt_ptr, tile, SPLIT: tl.constexpr):
    """Whether this program is the last of its tile's SPLIT chunk programs to finish storing its partial.

    Called after the program's partial stores: a CTA barrier orders all its threads' stores before one
    atomic add on the tile's counter with acquire-release semantics at GPU scope (the release makes the
    stores visible to whichever program later acquires the counter; the acquire makes the other
    programs' released stores visible to this one). The ticket SPLIT - 1 is taken by exactly one
    program, after every other chunk's partial is visible."""
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    return ticket == SPLIT - 1


@triton.jit
def _chunk_sum(acc, ws_ptr, offs, part, s, mask, SPLIT: tl.constexpr, KEEP: tl.constexpr):
    """sum_{j=0..SPLIT-1} partial_j (partial j at ws + j * part + offs), added in the order j = 0, 1, ...
    whichever program runs it, read through L2 only (.cg: written by other multiprocessors in this
    launch). KEEP: partial s, this program's own, is `acc` (registers) instead of a read. Without KEEP it
    is read back too: kept, it lifted the 2-warp forward / data-gradient tiles over their 128-register
    cap (spills) and, under a raised cap, cost their inner loop 1-3 points of FMA share
    (bench/NOTES.md); re-read, it is an L2 hit. A loop, not unrolled, and not pipelined (num_stages=1):
    unrolled, Triton 3.6's code kept every chunk's tile live at once and spilled."""
    if KEEP:
        total = tl.where(s == 0, acc, tl.load(ws_ptr + offs, mask=mask & (s != 0), other=0.0, cache_modifier=".cg"))
        for j in tl.range(1, SPLIT, num_stages=1):
            pj = tl.load((ws_ptr + j * part) + offs, mask=mask & (s != j), other=0.0, cache_modifier=".cg")
            total += tl.where(s == j, acc, pj)
    else:
        total = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        for j in tl.range(1, SPLIT, num_stages=1):
            total += tl.load((ws_ptr + j * part) + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _store_result(acc, acc1, acc2, out_ptr, ws_ptr, cnt_ptr, offs, sub, mask, mask1, mask2, s, part, tile,
                  SPLIT: tl.constexpr, SUM_IN: tl.constexpr, NSUB: tl.constexpr, KEEP: tl.constexpr = False):
    """The epilogue of every convolution kernel: a program's accumulators `acc` (and, NSUB = 3, the
    sub-tiles acc1, acc2 at offsets + sub, + 2 sub) at element offsets `offs` of the result.

    SPLIT = 1: stored into out. SPLIT > 1: stored as partial s (ws + s * part + offs); with SUM_IN the
    program that takes the tile's last ticket (`_last_chunk`) then writes out = the in-order sum of the
    tile's partials (`_chunk_sum`) and resets the tile's counter to 0; without, the launcher sums ws."""
    if SPLIT == 1:
        dst = out_ptr + offs
    else:
        dst = ws_ptr + s * part + offs
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if NSUB == 3:
        tl.store(dst + sub, acc1.to(out_ptr.dtype.element_ty), mask=mask1)
        tl.store(dst + 2 * sub, acc2.to(out_ptr.dtype.element_ty), mask=mask2)
    if SPLIT > 1 and SUM_IN:
        last = _last_chunk(cnt_ptr, tile, SPLIT)
        if last:
            tl.store(out_ptr + offs, _chunk_sum(acc, ws_ptr, offs, part, s, mask, SPLIT, KEEP).to(out_ptr.dtype.element_ty),
                     mask=mask)
            if NSUB == 3:
                tl.store(out_ptr + offs + sub, _chunk_sum(acc1, ws_ptr, offs + sub, part, s, mask1, SPLIT, KEEP).to(
                    out_ptr.dtype.element_ty), mask=mask1)
                tl.store(out_ptr + offs + 2 * sub, _chunk_sum(acc2, ws_ptr, offs + 2 * sub, part, s, mask2, SPLIT, KEEP).to(
                    out_ptr.dtype.element_ty), mask=mask2)
            tl.store(cnt_ptr + tile, 0)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in input precision PREC. "tf32x3" is formed here rather than by Triton: each operand x
    splits into hi, x rounded to TF32 (to nearest, ties away from zero: 4096 added to its bits, then the
    13 low mantissa bits cleared), and lo = x - hi (exact, |lo| <= 2^-11 |x|), and three TF32 products
    are accumulated, lo_a hi_b + hi_a lo_b + hi_a hi_b; what is left out is lo_a lo_b (<= 2^-22 of the
    product) and lo's own truncation to TF32 inside the products (<= 2^-21). Triton's lowering has the
    same three products but truncates hi (|lo| up to 2^-10 |x|, twice the error) and guards infinities
    and NaNs: ~6 instructions per operand element where these take 3, and the tensor-core loops are
    issue-bound on them (bench/NOTES.md, "tf32x3: the operands split by the kernels themselves"). Here an
    infinite input gives NaN, non-finite all the same. Other precisions: tl.dot as given."""
    if PREC == "tf32x3":
        return _tf32x3(a, b, acc, acc.dtype)
    return acc + tl.dot(a, b, input_precision=PREC, out_dtype=acc.dtype)


@triton.jit
def _mma_o(w, x, acc, PREC: tl.constexpr, TRANS: tl.constexpr):
    """The channels-by-pixels product of the forward and data gradient, acc[c, m] += w[c, k] x[k, m]
    (`_mma`), or with TRANS the same product as pixels by channels, acc[m, c] += x^T[m, k] w^T[k, c]:
    the tensor-core tiles at 48 channels (`conv_block_config`), where the pixels fill the 64 rows of
    Hopper's warpgroup product and three 16-channel sub-tiles its columns, so that no product row is
    masked. The caller transposes the accumulators back before storing (`_untrans`)."""
    if TRANS:
        return _mma(tl.trans(x), tl.trans(w), acc, PREC)
    else:
        return _mma(w, x, acc, PREC)


@triton.jit
def _acc_zeros(BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr, TRANS: tl.constexpr):
    """A zero accumulator of `_mma_o`'s orientation: (BLOCK_N, BLOCK_M), or (BLOCK_M, BLOCK_N) with TRANS."""
    if TRANS:
        return tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    else:
        return tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)


@triton.jit
def _untrans(acc, TRANS: tl.constexpr):
    """An accumulator of `_mma_o` as (BLOCK_N, BLOCK_M), the orientation the stores take."""
    if TRANS:
        return tl.trans(acc)
    else:
        return acc


@triton.jit
def _tf32_split(x):
    """(hi, lo) of float32 x for tf32x3 (`_mma`): hi = x rounded to the nearest TF32 value, ties away from
    zero (4096 added to the bits, the 13 low mantissa bits cleared), lo = x - hi (exact)."""
    hi = ((x.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _tf32x3(a, b, acc, ACC: tl.constexpr):
    """acc (None: zero) + a @ b as three TF32 products of the operands' `_tf32_split` parts, smallest first
    (`_mma`)."""
    a_hi, a_lo = _tf32_split(a)
    b_hi, b_lo = _tf32_split(b)
    acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32", out_dtype=ACC)
    acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32", out_dtype=ACC)
    return tl.dot(a_hi, b_hi, acc, input_precision="tf32", out_dtype=ACC)


@triton.jit
def _product(a, b, PREC: tl.constexpr, ACC: tl.constexpr):
    """a @ b in input precision PREC, accumulated in ACC: tf32x3 as `_mma` forms it, the others tl.dot's
    (the fused first block's products, triton/conv_block.py)."""
    if PREC == "tf32x3":
        return _tf32x3(a, b, None, ACC)
    return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _gather_mk(base_ptr, row, koff, row_ok, k_ok, EVEN_K: tl.constexpr):
    """The k-step's gathered operand [BLOCK_K, BLOCK_M], element (k, m) = base[row[m] + koff[k]], zero where
    row m's tap is outside (`row_ok`) or, without EVEN_K, k is past the channels (`k_ok`), loaded as a
    [BLOCK_M, BLOCK_K] tile and transposed (GATHER_MK, `conv_block_config`: Triton < 3.7).

    Why: loaded as [BLOCK_K, BLOCK_M], Triton 3.6 (the device's) lays the load out k-fastest, one k and 8
    pixels per thread: 8 row-mask tests and 8 row bases per step. Loaded this way each thread holds 4
    consecutive pixels x 2 channels (one mask test and one base per row, shared by its channels), the
    offsets are added in int32 before the pointer, and the FMA loop's shared loads are all 16-byte: the
    forward and data-gradient loops went from ~76% to 77-78% FFMA, 80-81% with 32-channel steps
    (bench/NOTES.md). Under Triton 3.7.1 the same source, at its 128-register cap, lost 4-5 points and
    spilled at 32-channel steps, so the kernels keep their k-major load there (written out in each kernel:
    routed through a helper, that load cost 3.7.1's TF32 data gradient 8 B of spills)."""
    ptrs = base_ptr + (row[:, None] + koff[None, :])
    if EVEN_K:
        v = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        v = tl.load(ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    return tl.trans(v)


@triton.jit
def _tile_id(pid_m, pid_n, t):
    """The program's output tile over all tasks: its counter's index (grid axes 0 and 1 per task)."""
    return (t * tl.num_programs(1) + pid_n) * tl.num_programs(0) + pid_m


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, NT, CI, CO, H, W, HO, WO, M, CHUNK,
                     KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr, SMALL: tl.constexpr, SPLIT: tl.constexpr,
                     EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, NSUB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SUM_IN: tl.constexpr = True, ROT: tl.constexpr = 0, GATHER_MK: tl.constexpr = False,
                     x2_ptr=None, w2_ptr=None, DUAL: tl.constexpr = False, TRANS: tl.constexpr = False):
    """out[i, t*CO+o, y, z] = sum over the chunks s of (sum over the k-steps of chunk s of x-gather[m, k] *
    w[t, o, k]) (+ bias[t, o], added to chunk 0's partial); m = i*L + (y*WO + z). Partials and their sum:
    `_store_result`.

    DUAL (not with SMALL): F(x, w) + F(x2, w2) (+ bias) for x2 and w2 of x's and w's shapes: the k-steps
    run over the taps of (x, w) and then over those of (x2, w2), 2*KH*KW*cdiv(CI, BLOCK_K) in all (split
    into chunks like any reduction); when the tap counter passes the last tap, the input and weight
    bases switch to the second pair (the rows' offsets and tap bits are the same for both).

    k-steps: (tap, channel block) pairs, tap-major; step kk covers the taps' channels
    [cb*BLOCK_K, cb*BLOCK_K + BLOCK_K) of tap (p, q). Per step the gather is x_row[m] + (c0*HW + p*W + q)
    + c*HW: one add per element, the padding mask depends on the row only (4 compares per row), and the
    (tap, block) counters advance by compare-and-select (no division in the loop). SMALL: the whole
    reduction K = CI*KH*KW fits one block (the first layer, 1 or 3 input channels): one step, k split
    into (c, p, q) once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    t, s = _chunk_of(pid_z, SPLIT, ROT)
    L = HO * WO
    HW = H * W
    KK: tl.constexpr = KH * KW
    ACC = out_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * (NSUB * BLOCK_N) + tl.arange(0, BLOCK_N)  # sub-tile j: offs_n + j*BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < CO
    n_ok1 = offs_n + BLOCK_N < CO
    n_ok2 = offs_n + 2 * BLOCK_N < CO
    i = offs_m // L
    l_ = offs_m - i * L
    yy = l_ // WO
    iy0 = yy * STRIDE - PAD
    iz0 = (l_ - yy * WO) * STRIDE - PAD
    x_row = (i * NT + t) * CI * HW + iy0 * W + iz0
    w_task = t * KK * CI * CO  # wt[t, p, q, c, o] (weights pre-transposed: o contiguous)
    # the product is formed transposed, acc[o, m] = sum_k wt[k, o] * x-gather[k, m]: both operands then sit
    # in shared memory with the accumulator's contiguous axis fastest (o for the weights, m for the
    # gather), so the FMA loop reads both with 16-byte shared loads
    # NSUB = 3 (48 channels): three BLOCK_N = 16 accumulators share each gathered tile, so that every
    # gathered activation feeds 48 FMAs without idle lanes (a 64-column tile would leave 16 idle)
    acc = _acc_zeros(BLOCK_N, BLOCK_M, ACC, TRANS)
    acc1 = _acc_zeros(BLOCK_N, BLOCK_M, ACC, TRANS)
    acc2 = _acc_zeros(BLOCK_N, BLOCK_M, ACC, TRANS)
    if SMALL:
        k_ok = offs_k < CI * KK
        c = offs_k // KK
        r = offs_k - c * KK
        kp = r // KW
        kq = r - kp * KW
        hy = iy0[None, :] + kp[:, None]
        hz = iz0[None, :] + kq[:, None]
        x_ok = m_ok[None, :] & k_ok[:, None] & (hy >= 0) & (hy < H) & (hz >= 0) & (hz < W)
        xg = tl.load(x_ptr + x_row[None, :] + (c * HW + kp * W + kq)[:, None], mask=x_ok, other=0.0)
        w_ptrs = w_ptr + w_task + (r * CI + c)[None, :] * CO + offs_n[:, None]
        wk = tl.load(w_ptrs, mask=k_ok[None, :] & n_ok[:, None], other=0.0)
        acc = _mma_o(wk, xg, acc, PREC, TRANS)
        if NSUB == 3:
            wk = tl.load(w_ptrs + BLOCK_N, mask=k_ok[None, :] & n_ok1[:, None], other=0.0)
            acc1 = _mma_o(wk, xg, acc1, PREC, TRANS)
            wk = tl.load(w_ptrs + 2 * BLOCK_N, mask=k_ok[None, :] & n_ok2[:, None], other=0.0)
            acc2 = _mma_o(wk, xg, acc2, PREC, TRANS)
    else:
        CB = tl.cdiv(CI, BLOCK_K)
        k0 = s * CHUNK
        k1 = tl.minimum(k0 + CHUNK, (2 if DUAL else 1) * KK * CB)
        tap = k0 // CB
        cb = k0 - tap * CB
        xb = x_ptr
        wb = w_ptr
        if DUAL:  # the chunk may start in the second pair's taps
            second = tap >= KK
            tap = tl.where(second, tap - KK, tap)
            xb = tl.where(second, x2_ptr, x_ptr)
            wb = tl.where(second, w2_ptr, w_ptr)
        p = tap // KW
        q = tap - p * KW
        # per row, one bit per tap: the tap's input pixel is inside the image (static loop over the taps,
        # once per tile); the loop then tests one bit per row
        vbits = tl.zeros([BLOCK_M], dtype=tl.int32)
        for pp in tl.static_range(KH):
            for qq in tl.static_range(KW):
                ok = m_ok & (iy0 + pp >= 0) & (iy0 + pp < H) & (iz0 + qq >= 0) & (iz0 + qq < W)
                vbits = vbits | (ok.to(tl.int32) << (pp * KW + qq))
        for kk in range(k0, k1):
            c0 = cb * BLOCK_K
            row_ok = ((vbits >> tap) & 1) != 0
            w_ptrs = wb + (w_task + (tap * CI + c0) * CO + offs_n)[:, None] + (offs_k * CO)[None, :]
            if EVEN_K:
                c_ok = offs_k < BLOCK_K
            else:
                c_ok = offs_k < CI - c0
            if GATHER_MK:
                xg = _gather_mk(xb, x_row + (c0 * HW + p * W + q), offs_k * HW, row_ok, c_ok, EVEN_K)
            else:  # k-major (see `_gather_mk`)
                x_ptrs = xb + (x_row + (c0 * HW + p * W + q))[None, :] + (offs_k * HW)[:, None]
                if EVEN_K:
                    xg = tl.load(x_ptrs, mask=row_ok[None, :], other=0.0)
                else:
                    xg = tl.load(x_ptrs, mask=row_ok[None, :] & c_ok[:, None], other=0.0)
            if EVEN_K and EVEN_N:
                wk = tl.load(w_ptrs)
            else:
                wk = tl.load(w_ptrs, mask=c_ok[None, :] & n_ok[:, None], other=0.0)
            acc = _mma_o(wk, xg, acc, PREC, TRANS)
            if NSUB == 3:
                if EVEN_K and EVEN_N:
                    wk = tl.load(w_ptrs + BLOCK_N)
                else:
                    wk = tl.load(w_ptrs + BLOCK_N, mask=c_ok[None, :] & n_ok1[:, None], other=0.0)
                acc1 = _mma_o(wk, xg, acc1, PREC, TRANS)
                if EVEN_K and EVEN_N:
                    wk = tl.load(w_ptrs + 2 * BLOCK_N)
                else:
                    wk = tl.load(w_ptrs + 2 * BLOCK_N, mask=c_ok[None, :] & n_ok2[:, None], other=0.0)
                acc2 = _mma_o(wk, xg, acc2, PREC, TRANS)
            cb += 1
            wrap = cb == CB
            cb = tl.where(wrap, 0, cb)
            tap += wrap.to(tl.int32)
            q += wrap.to(tl.int32)
            wq = q == KW
            q = tl.where(wq, 0, q)
            p += wq.to(tl.int32)
            if DUAL:  # past the first pair's last tap: the second pair's first
                wp = p == KH
                p = tl.where(wp, 0, p)
                tap = tl.where(wp, 0, tap)
                xb = tl.where(wp, x2_ptr, xb)
                wb = tl.where(wp, w2_ptr, wb)
    acc = _untrans(acc, TRANS)
    acc1 = _untrans(acc1, TRANS)
    acc2 = _untrans(acc2, TRANS)
    if HAS_BIAS:
        acc += tl.load(b_ptr + t * CO + offs_n, mask=n_ok & (s == 0), other=0.0)[:, None]
        if NSUB == 3:
            acc1 += tl.load(b_ptr + t * CO + BLOCK_N + offs_n, mask=n_ok1 & (s == 0), other=0.0)[:, None]
            acc2 += tl.load(b_ptr + t * CO + 2 * BLOCK_N + offs_n, mask=n_ok2 & (s == 0), other=0.0)[:, None]
    offs = ((i * NT + t) * CO * L + l_)[None, :] + (offs_n * L)[:, None]
    _store_result(acc, acc1, acc2, out_ptr, ws_ptr, cnt_ptr, offs, BLOCK_N * L, m_ok[None, :] & n_ok[:, None],
                  m_ok[None, :] & n_ok1[:, None], m_ok[None, :] & n_ok2[:, None], s, NT * CO * M,
                  _tile_id(pid_m, pid_n, t), SPLIT, SUM_IN, NSUB)


@triton.jit
def _conv_dgrad_kernel(g_ptr, w_ptr, dx_ptr, ws_ptr, cnt_ptr, NT, CI, CO, H, W, HO, WO, M, CHUNK,
                       KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                       PREC: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                       NSUB: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SUM_IN: tl.constexpr = True, ROT: tl.constexpr = 0, GATHER_MK: tl.constexpr = False,
                       W_FWD: tl.constexpr = False, TRANS: tl.constexpr = False):
    """dx[i, t*CI+c, h, v] = sum over the chunks s of (sum over the k-steps of chunk s of g-gather[m, k] *
    w[t, o, c, p, q]); m = i*H*W + h*W + v, k-steps (tap, output-channel block) as in the forward;
    partials and their sum: `_store_result`.

    The term of tap (p, q) reads g at y = (h + PAD - p) / S, z = (v + PAD - q) / S, kept when both are
    integers inside the output: a per-row base and mask per step (with S > 1 the divisibility test and
    the division are by the compile-time stride, per row)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    t, s = _chunk_of(pid_z, SPLIT, ROT)
    HW = H * W
    L = HO * WO
    KK: tl.constexpr = KH * KW
    ACC = dx_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * (NSUB * BLOCK_N) + tl.arange(0, BLOCK_N)  # input channel c (sub-tile j: + j*BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)  # output channel o within the block
    m_ok = offs_m < M
    n_ok = offs_n < CI
    n_ok1 = offs_n + BLOCK_N < CI
    n_ok2 = offs_n + 2 * BLOCK_N < CI
    i = offs_m // HW
    hw = offs_m - i * HW
    hh = hw // W
    ny0 = hh + PAD
    nz0 = hw - hh * W + PAD
    g_row = (i * NT + t) * CO * L
    w_task = t * KK * CO * CI  # wt[t, p, q, o, c] (weights pre-transposed: c contiguous)
    acc = _acc_zeros(BLOCK_N, BLOCK_M, ACC, TRANS)  # transposed, acc[c, m], as in the forward (TRANS: acc[m, c])
    acc1 = _acc_zeros(BLOCK_N, BLOCK_M, ACC, TRANS)  # NSUB = 3: sub-tiles as in the forward
    acc2 = _acc_zeros(BLOCK_N, BLOCK_M, ACC, TRANS)
    CB = tl.cdiv(CO, BLOCK_K)
    k0 = s * CHUNK
    k1 = tl.minimum(k0 + CHUNK, KK * CB)
    tap = k0 // CB
    cb = k0 - tap * CB
    p = tap // KW
    q = tap - p * KW
    # per row, one bit per tap: the tap reads an output pixel (static loop over the taps, once per tile)
    vbits = tl.zeros([BLOCK_M], dtype=tl.int32)
    for pp in tl.static_range(KH):
        for qq in tl.static_range(KW):
            ny = ny0 - pp
            nz = nz0 - qq
            ny_c = tl.maximum(ny, 0)  # non-negative before // (no reliance on rounding of negatives)
            nz_c = tl.maximum(nz, 0)
            ok = (m_ok & (ny >= 0) & (nz >= 0) & (ny_c - (ny_c // STRIDE) * STRIDE == 0)
                  & (nz_c - (nz_c // STRIDE) * STRIDE == 0) & (ny_c // STRIDE < HO) & (nz_c // STRIDE < WO))
            vbits = vbits | (ok.to(tl.int32) << (pp * KW + qq))
    g_base = g_row + ny0 * WO + nz0
    for kk in range(k0, k1):
        o0 = cb * BLOCK_K
        row_ok = ((vbits >> tap) & 1) != 0
        if STRIDE == 1:
            a_row = g_base - (p * WO + q)
        else:  # the compile-time stride divides the row's (h + PAD - p), (v + PAD - q) where the bit is set
            a_row = g_row + (tl.maximum(ny0 - p, 0) // STRIDE) * WO + tl.maximum(nz0 - q, 0) // STRIDE
        if W_FWD:  # the forward's layout wt[t, p, q, c, o]: the tile runs along o (see `conv_block_config`)
            w_ptrs = w_ptr + (w_task + tap * CI * CO + o0 + offs_n * CO)[:, None] + offs_k[None, :]
        else:
            w_ptrs = w_ptr + (w_task + (tap * CO + o0) * CI + offs_n)[:, None] + (offs_k * CI)[None, :]
        w_sub = BLOCK_N * CO if W_FWD else BLOCK_N  # the next channel sub-tile (NSUB = 3)
        if EVEN_K:
            o_ok = offs_k < BLOCK_K
        else:
            o_ok = offs_k < CO - o0
        if GATHER_MK:
            gg = _gather_mk(g_ptr, a_row + o0 * L, offs_k * L, row_ok, o_ok, EVEN_K)
        else:  # k-major (see `_gather_mk`)
            g_ptrs = g_ptr + (a_row + o0 * L)[None, :] + (offs_k * L)[:, None]
            if EVEN_K:
                gg = tl.load(g_ptrs, mask=row_ok[None, :], other=0.0)
            else:
                gg = tl.load(g_ptrs, mask=row_ok[None, :] & o_ok[:, None], other=0.0)
        if EVEN_K and EVEN_N:
            wk = tl.load(w_ptrs)
        else:
            wk = tl.load(w_ptrs, mask=o_ok[None, :] & n_ok[:, None], other=0.0)
        acc = _mma_o(wk, gg, acc, PREC, TRANS)
        if NSUB == 3:
            if EVEN_K and EVEN_N:
                wk = tl.load(w_ptrs + w_sub)
            else:
                wk = tl.load(w_ptrs + w_sub, mask=o_ok[None, :] & n_ok1[:, None], other=0.0)
            acc1 = _mma_o(wk, gg, acc1, PREC, TRANS)
            if EVEN_K and EVEN_N:
                wk = tl.load(w_ptrs + 2 * w_sub)
            else:
                wk = tl.load(w_ptrs + 2 * w_sub, mask=o_ok[None, :] & n_ok2[:, None], other=0.0)
            acc2 = _mma_o(wk, gg, acc2, PREC, TRANS)
        cb += 1
        wrap = cb == CB
        cb = tl.where(wrap, 0, cb)
        tap += wrap.to(tl.int32)
        q += wrap.to(tl.int32)
        wq = q == KW
        q = tl.where(wq, 0, q)
        p += wq.to(tl.int32)
    acc = _untrans(acc, TRANS)
    acc1 = _untrans(acc1, TRANS)
    acc2 = _untrans(acc2, TRANS)
    offs = ((i * NT + t) * CI * HW + hw)[None, :] + (offs_n * HW)[:, None]
    _store_result(acc, acc1, acc2, dx_ptr, ws_ptr, cnt_ptr, offs, BLOCK_N * HW, m_ok[None, :] & n_ok[:, None],
                  m_ok[None, :] & n_ok1[:, None], m_ok[None, :] & n_ok2[:, None], s, NT * CI * M,
                  _tile_id(pid_m, pid_n, t), SPLIT, SUM_IN, NSUB)


@triton.jit
def _wgrad_cols_step(acc, acc1, acc2, x_ptr, g_ptr, lane_ptr, rs, rem, R, L, lanes, g_o, o_ok, o_ok1, o_ok2, x_k,
                     kbit, kr, k_ok, PREC: tl.constexpr, NSUB: tl.constexpr, BLOCK_M: tl.constexpr,
                     TAP_MASK: tl.constexpr, TRANS: tl.constexpr = False):
    """One reduction step of `_conv_wgrad_kernel`'s per-column tiles over the lanes r = rs + j,
    j < min(BLOCK_K, rem) (the table's entries past them, their g and x are masked to 0): acc[o, k] += sum over r of
    g[r, o] * x[r, k] (NSUB = 3: also the row sub-tiles acc1, acc2 at o + BLOCK_M, o + 2 BLOCK_M). TAP_MASK:
    x[r, k] is masked where column k's tap (bit `kbit`, 0 past K) lies outside the image for lane r;
    without, every tap of these lanes is inside (and x_k is a valid offset for every column).

    TRANS (tf32x3 at 48 output channels, `wgrad_block_config`): the same sums formed the other way round,
    acc[k, o] += sum over r of x^T[k, r] g[r, o], so that the BLOCK_N columns k fill the 64-row side of
    Hopper's warpgroup product and each 16-channel sub-tile its N = 16, with no masked product row (the
    untransposed tile puts the 48 channels on the 64 rows)."""
    r_ok = lanes < rem
    g_r = tl.load(lane_ptr + rs + lanes, mask=r_ok, other=0)
    x_r = tl.load(lane_ptr + R + rs + lanes, mask=r_ok, other=0)
    # g loaded as [r, o] and transposed: the operand then sits in shared memory with o fastest, and the FMA
    # loop reads it with 16-byte shared loads (TRANS: [r, o] is the product's right operand as it is)
    g_ptrs = g_ptr + g_r[:, None] + g_o[None, :]
    if not TRANS:
        a = tl.trans(tl.load(g_ptrs, mask=o_ok[None, :] & r_ok[:, None], other=0.0))
    if TAP_MASK:
        v_r = tl.load(lane_ptr + 2 * R + rs + lanes, mask=r_ok, other=0)  # 0 past the end: all masked
        if PREC == "ieee":
            b_ok = (v_r[:, None] & kbit[None, :]) != 0
        else:  # tensor-core products: the shift form (with the bit mask, Triton 3.6 spilled 4 B in the TF32
            # 64 x 16 one-warp tiles of a first layer)
            b_ok = (((v_r[:, None] >> kr[None, :]) & 1) != 0) & k_ok[None, :]
        b = tl.load(x_ptr + x_r[:, None] + x_k[None, :], mask=b_ok, other=0.0)
    else:
        b = tl.load(x_ptr + x_r[:, None] + x_k[None, :], mask=r_ok[:, None], other=0.0)
    if TRANS:
        bt = tl.trans(b)  # [k, r]
        acc = _mma(bt, tl.load(g_ptrs, mask=o_ok[None, :] & r_ok[:, None], other=0.0), acc, PREC)
        if NSUB == 3:
            acc1 = _mma(bt, tl.load(g_ptrs + BLOCK_M * L, mask=o_ok1[None, :] & r_ok[:, None], other=0.0), acc1, PREC)
            acc2 = _mma(bt, tl.load(g_ptrs + 2 * BLOCK_M * L, mask=o_ok2[None, :] & r_ok[:, None], other=0.0), acc2,
                        PREC)
    else:
        acc = _mma(a, b, acc, PREC)
        if NSUB == 3:
            a = tl.trans(tl.load(g_ptrs + BLOCK_M * L, mask=o_ok1[None, :] & r_ok[:, None], other=0.0))
            acc1 = _mma(a, b, acc1, PREC)
            a = tl.trans(tl.load(g_ptrs + 2 * BLOCK_M * L, mask=o_ok2[None, :] & r_ok[:, None], other=0.0))
            acc2 = _mma(a, b, acc2, PREC)
    return acc, acc1, acc2


@triton.jit
def _conv_wgrad_kernel(x_ptr, g_ptr, lane_ptr, out_ptr, ws_ptr, cnt_ptr, NT, CI, CO, H, W, HO, WO, R, RI, CHUNK,
                       TOT, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                       PREC: tl.constexpr, SPLIT: tl.constexpr, NSUB: tl.constexpr, HAS_DB: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SUM_IN: tl.constexpr = True, ROT: tl.constexpr = 0, KEEP: tl.constexpr = False,
                       TAP_MAJOR: tl.constexpr = False, STORE_KO: tl.constexpr = False, INSIDE: tl.constexpr = False,
                       TRANS: tl.constexpr = False):
    """out[t, p, q, c, o] = sum over the chunks s of (sum over r in chunk s of g[i, t*CO+o, y, z] *
    X[i, t*CI+c, y*S+p-PAD, z*S+q-PAD]), r = i*L + y*WO + z: the weight gradient in the forward kernel's
    weight layout (B, kh, kw, Ci, Co) (`conv_weight_grad` returns it as a (B, Co, Ci, kh, kw) view), so
    that the fast weights and gradients computed from it need no re-layout copy before a convolution.
    out holds TOT values; partial s (SPLIT > 1) starts at ws + s*TOT (`_store_result`; KEEP: the weight
    programs' last chunk adds its own partial from registers, `wgrad_keeps_own`).

    HAS_DB (the conv bias's gradient in the same launch): one more column of programs on grid axis 1
    (pid_n = the number of k tiles) sums g over the chunks' lanes, db[t, o] = sum over r of
    g[i, t*CO+o, y, z], stored after the NT*CO*K weight values (out + NT*CO*K + t*CO + o; in the partials
    likewise). Its own branch: the weight programs' loop is the same code as without the bias (their
    registers and instruction mix are what bench.static_metrics measured for it).

    Store: the result tile goes out as [k, o] (TAP_MAJOR, and STORE_KO: Triton < 3.7) or [o, k]. Which
    one changes the loop's code, as the compiler carries the store's preferred register layout back into
    the accumulator's: for the 48-channel per-column tiles Triton 3.6 gives [o, k] ~30 more integer
    instructions per iteration (65 vs 68% FFMA), Triton 3.7.1 gives [k, o] ~50 more (bench/NOTES.md).

    Columns: k is split into (c, p, q) once per program (column offset c*HW + p*W + q and the tap's bit
    p*KW + q). TAP_MAJOR (`wgrad_block_config`): a column tile is BLOCK_N channels of one tap (pid_n =
    tap * (CI / BLOCK_N) + channel block), so the padding mask of the gathered x tile is one bit test per
    reduction lane instead of one per element, and no column is masked (CI a multiple of BLOCK_N). Reduction lanes: a per-shape table (`_lane_table`, built once and cached) holds for every
    r its g offset, its x offset at tap (0, 0) and one bit per tap that is inside the image, so the loop
    has no division and per element one add (address) and one bit test (padding mask). NSUB = 3 (48
    output channels): three BLOCK_M = 16 row sub-tiles share each gathered x tile. INSIDE (per-column tiles):
    the table lists the RI lanes whose every tap is inside the image first, and a chunk's whole BLOCK_K
    steps of them run in a loop whose x load has no tap mask (one load per element and no per-element
    test); the chunk's other lanes in the masked loop after it. INSIDE does not change the result: the same
    lanes in the same order, and the mask it skips is true for every one of them. TRANS (per-column
    tiles; tf32x3 at 48 output channels): the accumulators hold [k, o] (`_wgrad_cols_step`), stored
    as they are where the untransposed tile is transposed for the store, and the other way round."""
    pid_m = tl.program_id(0)  # o tile
    pid_n = tl.program_id(1)  # k tile (HAS_DB: the last column is the bias's)
    pid_z = tl.program_id(2)
    t, s = _chunk_of(pid_z, SPLIT, ROT)
    tile = _tile_id(pid_m, pid_n, t)
    L = HO * WO
    HW = H * W
    KK: tl.constexpr = KH * KW
    K = CI * KK
    ACC = out_ptr.dtype.element_ty
    offs_o = pid_m * (NSUB * BLOCK_M) + tl.arange(0, BLOCK_M)  # sub-tile j: offs_o + j*BLOCK_M
    o_ok = offs_o < CO
    o_ok1 = offs_o + BLOCK_M < CO
    o_ok2 = offs_o + 2 * BLOCK_M < CO
    g_o = t * CO * L + offs_o * L
    r0 = s * CHUNK
    r1 = tl.minimum(r0 + CHUNK, R)
    lanes = tl.arange(0, BLOCK_K)
    if HAS_DB and pid_n == tl.num_programs(1) - 1:
        # the bias programs: g summed over the chunk's lanes, rows as the weight programs'
        bacc = tl.zeros([BLOCK_M], dtype=ACC)
        bacc1 = tl.zeros([BLOCK_M], dtype=ACC)
        bacc2 = tl.zeros([BLOCK_M], dtype=ACC)
        for rs in range(r0, r1, BLOCK_K):
            r_ok = lanes < r1 - rs
            g_r = tl.load(lane_ptr + rs + lanes, mask=r_ok, other=0)
            g_ptrs = g_ptr + g_r[:, None] + g_o[None, :]
            bacc += tl.sum(tl.load(g_ptrs, mask=o_ok[None, :] & r_ok[:, None], other=0.0).to(ACC), axis=0)
            if NSUB == 3:
                bacc1 += tl.sum(tl.load(g_ptrs + BLOCK_M * L, mask=o_ok1[None, :] & r_ok[:, None],
                                        other=0.0).to(ACC), axis=0)
                bacc2 += tl.sum(tl.load(g_ptrs + 2 * BLOCK_M * L, mask=o_ok2[None, :] & r_ok[:, None],
                                        other=0.0).to(ACC), axis=0)
        _store_result(bacc, bacc1, bacc2, out_ptr, ws_ptr, cnt_ptr, NT * CO * K + t * CO + offs_o, BLOCK_M,
                      o_ok, o_ok1, o_ok2, s, TOT, tile, SPLIT, SUM_IN, NSUB)
    elif TAP_MAJOR:
        # one tap (p, q) and BLOCK_N channels per column tile (CI a multiple of BLOCK_N): the padding mask is
        # one bit test per reduction lane, shared by the row of the gathered tile, and no column is masked
        tl.static_assert(NSUB == 1 and not TRANS)
        CB = CI // BLOCK_N
        tap = pid_n // CB  # once per program
        tap_bit = 1 << tap
        offs_c = (pid_n - tap * CB) * BLOCK_N + tl.arange(0, BLOCK_N)
        kp = tap // KW
        x_c = t * CI * HW + offs_c * HW + kp * W + (tap - kp * KW)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for rs in range(r0, r1, BLOCK_K):
            r_ok = lanes < r1 - rs
            g_r = tl.load(lane_ptr + rs + lanes, mask=r_ok, other=0)
            x_r = tl.load(lane_ptr + R + rs + lanes, mask=r_ok, other=0)
            v_r = tl.load(lane_ptr + 2 * R + rs + lanes, mask=r_ok, other=0)  # 0 past the end: all masked
            a = tl.trans(tl.load(g_ptr + g_r[:, None] + g_o[None, :], mask=o_ok[None, :] & r_ok[:, None], other=0.0))
            b = tl.load(x_ptr + (x_r[:, None] + x_c[None, :]), mask=((v_r & tap_bit) != 0)[:, None], other=0.0)
            acc = _mma(a, b, acc, PREC)
        col = tap * CI * CO + offs_c * CO
        _store_result(tl.trans(acc), tl.trans(acc1), tl.trans(acc2), out_ptr, ws_ptr, cnt_ptr,
                      t * CO * K + col[:, None] + offs_o[None, :], BLOCK_M, o_ok[None, :], o_ok1[None, :],
                      o_ok2[None, :], s, TOT, tile, SPLIT, SUM_IN, NSUB, KEEP)
    else:
        offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = offs_k < K
        kc = offs_k // KK  # once per program
        kr = offs_k - kc * KK
        kp = kr // KW
        x_k = t * CI * HW + kc * HW + kp * W + (kr - kp * KW)
        # the column's tap bit, 0 past K: one AND and one test per element select what is loaded (a column
        # past K is never read)
        kbit = tl.where(k_ok, 1 << kr, 0)
        acc = _acc_zeros(BLOCK_M, BLOCK_N, ACC, TRANS)  # [o, k], or with TRANS [k, o]
        acc1 = _acc_zeros(BLOCK_M, BLOCK_N, ACC, TRANS)
        acc2 = _acc_zeros(BLOCK_M, BLOCK_N, ACC, TRANS)
        # lanes [r0, ri): every tap of every lane inside the image (the table lists those RI lanes first), so
        # x needs no tap mask there; a column past K then reads the task's first value instead (never stored)
        x_k_in = tl.where(k_ok, x_k, t * CI * HW)
        if INSIDE:
            ri = tl.minimum(tl.maximum(RI // BLOCK_K * BLOCK_K, r0), r1)
        else:
            ri = r0
        for rs in range(r0, ri, BLOCK_K):
            acc, acc1, acc2 = _wgrad_cols_step(acc, acc1, acc2, x_ptr, g_ptr, lane_ptr, rs, ri - rs, R, L, lanes,
                                               g_o, o_ok, o_ok1, o_ok2, x_k_in, kbit, kr, k_ok, PREC, NSUB,
                                               BLOCK_M, False, TRANS)
        for rs in range(ri, r1, BLOCK_K):
            acc, acc1, acc2 = _wgrad_cols_step(acc, acc1, acc2, x_ptr, g_ptr, lane_ptr, rs, r1 - rs, R, L, lanes,
                                               g_o, o_ok, o_ok1, o_ok2, x_k, kbit, kr, k_ok, PREC, NSUB,
                                               BLOCK_M, True, TRANS)
        col = kr * CI * CO + kc * CO  # the forward's layout (t, p, q, c, o)
        # the accumulators as [o, k] (with TRANS they are [k, o], `_untrans` turns them)
        acc = _untrans(acc, TRANS)
        acc1 = _untrans(acc1, TRANS)
        acc2 = _untrans(acc2, TRANS)
        if STORE_KO:  # the tile stored as [k, o] (`wgrad_block_config`)
            _store_result(tl.trans(acc), tl.trans(acc1), tl.trans(acc2), out_ptr, ws_ptr, cnt_ptr,
                          t * CO * K + col[:, None] + offs_o[None, :],
                          BLOCK_M, k_ok[:, None] & o_ok[None, :], k_ok[:, None] & o_ok1[None, :],
                          k_ok[:, None] & o_ok2[None, :], s, TOT, tile, SPLIT, SUM_IN, NSUB, KEEP)
        else:
            _store_result(acc, acc1, acc2, out_ptr, ws_ptr, cnt_ptr, t * CO * K + offs_o[:, None] + col[None, :],
                          BLOCK_M, o_ok[:, None] & k_ok[None, :], o_ok1[:, None] & k_ok[None, :],
                          o_ok2[:, None] & k_ok[None, :], s, TOT, tile, SPLIT, SUM_IN, NSUB, KEEP)


# ------------------------------------------------------------------------------------------------------
# launchers (plain tensors, no autograd)
# ------------------------------------------------------------------------------------------------------
def _check(name, *tensors, split=1):
    for t in tensors:
        if t.numel() * split >= 2 ** 31:
            raise ValueError(f"triton {name}: tensors of >= 2^31 elements are not supported (int32 offsets), "
                             f"got shape {tuple(t.shape)}" + (f" x {split} partial sums" if split > 1 else ""))
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"triton {name}: float32 or float64 tensors only, got {t.dtype}")


SPLIT_SUM_ENV = "MAMLPP_CONV_SPLIT_SUM"


def split_sum_in_kernel() -> bool:
    """Whether split reductions add their partials inside the convolution kernels (the default, "kernel":
    the last chunk's program of each tile, `_store_result`) or with a separate in-order torch sum after
    the kernel ("separate", environment variable MAMLPP_CONV_SPLIT_SUM: one more launch and one more
    output-sized write per split launch; kept for comparison on a device and as a way out). Both add the
    partials in chunk order; their results agree to rounding (torch's sum may associate differently)."""
    mode = os.environ.get(SPLIT_SUM_ENV, "kernel")
    if mode not in ("kernel", "separate"):
        raise ValueError(f"{SPLIT_SUM_ENV} must be 'kernel' or 'separate', got {mode!r}")
    return mode == "kernel"


_CHUNK_ROT = [0]  # the kernels' ROT (`_chunk_of`); 0 except in the tests of the in-kernel sum


def wgrad_keeps_own(cfg: dict) -> bool:
    """Whether the weight programs of a weight-gradient launch of configuration `cfg` that sums its split
    partials itself add their own partial from registers (`_chunk_sum` KEEP) rather than reading it back:
    the one-sub-tile tiles at >= 4 warps (Omniglot's 64-channel layers), where bench.static_metrics
    showed no spill and the same inner loop under Triton 3.6.0 and 3.7.1 with it. Not the three-sub-tile
    tiles (250-254 registers under 3.6.0 already) nor the one-warp tiles (176 -> 255 registers under 3.7.1;
    `python -m bench.probe_split_sum keep`)."""
    return cfg["NSUB"] == 1 and cfg["num_warps"] >= 4


# the longest chain of dependent partial loads that a tile's last program takes on (`split_chain_in_kernel`)
IN_KERNEL_SUM_CHAIN = 24


def split_chain_in_kernel(split: int, cfg: dict, kind: str = "wgrad") -> bool:
    """Whether a launch of configuration `cfg` (`conv_block_config` / `wgrad_block_config`: its NSUB
    channel sub-tiles) with `split` chunks may sum its partials inside the kernel: the last program of a
    tile adds the split - 1 other partials of each sub-tile one after another (`_chunk_sum`: a loop whose
    every step waits for its load through L2, the sub-tiles' loops in turn), (split - 1) * NSUB dependent
    round trips after all the tile's other programs have finished; beyond IN_KERNEL_SUM_CHAIN (24) a
    separate sum kernel, which reads the same partials in parallel, costs less than the chain
    (mini-ImageNet's first-layer weight gradient: 3 x 137 round trips; bench/NOTES.md, "The convolutions'
    in-kernel split sums: only for short chains"). Kept in the kernel whatever the chain: the weight
    gradient's 48-channel (three-sub-tile) tiles under Triton >= 3.7, which without the in-kernel sum
    spilled 8 B (4 warps, strict fp32) and 4 B (1 warp, TF32) there (bench.static_metrics;
    tests/test_static_metrics.py); under Triton 3.6, the device machines', they do not."""
    if kind == "wgrad" and _TRITON_VERSION >= (3, 7) and cfg["NSUB"] == 3:
        return True
    return (split - 1) * cfg["NSUB"] <= IN_KERNEL_SUM_CHAIN


def _split_buffers(shape, split: int, like, tiles: int, in_kernel: bool = True) -> tuple:
    """(out, ws, counters, sum_in) of a launch with `split` chunks and `tiles` output tiles: the result
    (None when the launcher sums the partials itself), the partials' workspace (split, *shape) (the
    result itself when split is 1), the tile counters, and whether the kernel sums the partials (where
    `split_sum_in_kernel` and the launch's own `in_kernel` allow)."""
    if split == 1:
        out = torch.empty(shape, device=like.device, dtype=like.dtype)
        return out, out, out, True
    ws = torch.empty((split, *shape), device=like.device, dtype=like.dtype)
    if not (in_kernel and split_sum_in_kernel()):
        return None, ws, ws, False
    out = torch.empty(shape, device=like.device, dtype=like.dtype)
    return out, ws, _tile_counters(like.device, tiles), True


def _result(out, ws, sum_in):
    """The launch's result: `out`, or (the separate sum) ws's partials added in order."""
    return out if sum_in else ws.sum(0)


# The weights' layouts the kernels read: forward (B, kh, kw, Ci, Co), vector loads along Co; data gradient
# (B, kh, kw, Co, Ci), vector loads along Ci, or, with W_FWD (`conv_block_config`), the forward's.
_RELAYOUT = {"fwd": (0, 3, 4, 2, 1), "dgrad": (0, 3, 4, 1, 2)}
_FROM_FWD = (0, 4, 3, 1, 2)  # (B, kh, kw, Ci, Co) -> the (B, Co, Ci, kh, kw) view


def forward_layout(w):
    """w (B, Co, Ci, kh, kw) as a view of the same values stored in the forward kernel's layout
    (B, kh, kw, Ci, Co), as `conv_weight_grad` returns its result (a copy unless w is already so)."""
    return w.permute(*_RELAYOUT["fwd"]).contiguous().permute(*_FROM_FWD)


def relaid_weights(w, kind):
    """(w permuted to the `kind` kernel's layout, contiguous; whether a copy was made for it).

    A meta-update convolves with each weight tensor several times (the fast weights of step i+1 serve
    the target forward of step i and the support forward of step i+1; the backward's data gradients and
    double-backward forwards reuse them again), so the permuted copy is kept with the tensor's derived
    data (`_derived`: shared with its aliases from mamlpp_fast.ops.fanout), keyed by the layout and the
    tensor's version counter (an in-place change of w makes a new copy), and lives as long as w does.
    Only tensors computed in an autograd graph (`grad_fn` set: the fast weights of every step, the
    gradients a double backward convolves with) keep it: a leaf, such as a parameter or a tensor
    gradcheck perturbs, can be changed through `.data`, which the version counter does not see, so its
    copy is made at every call (as are inference tensors, which have no version counter)."""
    kept = derived(w)
    if kept is not None:
        hit = kept.get(("relaid", kind))
        if hit is not None and hit[0] == w._version:
            return hit[1], False
    t = w.permute(*_RELAYOUT[kind])
    copied = not t.is_contiguous()
    t = t.contiguous()
    if kept is not None:
        kept[("relaid", kind)] = (w._version, t)
    return t, copied


def conv_forward(x, w, bias, meta, x2=None, w2=None):
    """F(x, w) + bias. x (n, B*Ci, H, W), w (B, Co, Ci, kh, kw), bias (B, Co) or None. With x2 and w2
    (the shapes of x and w): F(x, w) + F(x2, w2) + bias in one launch whose reduction runs over the taps
    of both pairs (the kernel's DUAL), except where the layer's configuration is SMALL (two launches and
    an addition)."""
    b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
    dual = x2 is not None
    n = x.shape[0]
    m = n * ho * wo
    tc = tensor_core_mode(x.dtype)
    cfg = conv_block_config("fwd", m, co, ci, (2 if dual else 1) * kh * kw, b, _sms(x.device), tensor_cores=tc)
    if dual and cfg["SMALL"]:
        return conv_forward(x, w, bias, meta) + conv_forward(x2, w2, None, meta)
    extra = {}
    if dual:
        if x2.shape != x.shape or w2.shape != w.shape:
            raise ValueError(f"conv forward: the second pair must have the first's shapes, got x2 "
                             f"{tuple(x2.shape)} for {tuple(x.shape)} and w2 {tuple(w2.shape)} for {tuple(w.shape)}")
    x, w = x.contiguous(), relaid_weights(w, "fwd")[0]
    if dual:
        x2, w2 = x2.contiguous(), relaid_weights(w2, "fwd")[0]
        _check("conv forward", x2, w2)
        extra = dict(x2_ptr=x2, w2_ptr=w2, DUAL=True)
    _check("conv forward", x, w)
    cfg.pop("W_FWD", None)  # a data-gradient key (tests force configurations onto both)
    split, chunk = cfg.pop("SPLIT"), cfg.pop("CHUNK")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(co, cfg["BLOCK_N"] * cfg["NSUB"]), b * split)
    out, ws, cnt, sum_in = _split_buffers((n, b * co, ho, wo), split, x, grid[0] * grid[1] * b,
                                          split_chain_in_kernel(split, cfg, "fwd"))
    _check("conv forward", ws, split=1)
    bias_arg = bias.contiguous() if bias is not None else x
    _conv_fwd_kernel[grid](x, w, bias_arg, ws if out is None else out, ws, cnt, b, ci, co, h, wd, ho, wo, m, chunk,
                           KH=kh, KW=kw, STRIDE=s, PAD=p, HAS_BIAS=bias is not None, PREC=_precision(x.dtype),
                           SPLIT=split, EVEN_K=ci % cfg["BLOCK_K"] == 0,
                           EVEN_N=co % (cfg["BLOCK_N"] * cfg["NSUB"]) == 0, SUM_IN=sum_in, ROT=_CHUNK_ROT[0],
                           **cfg, **_register_cap(cfg, tc), **extra)
    return _result(out, ws, sum_in)


def conv_data_grad(g, w, meta):
    """D(g, w): g (n, B*Co, Ho, Wo) -> (n, B*Ci, H, W)."""
    b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
    g = g.contiguous()
    n = g.shape[0]
    m = n * h * wd
    tc = tensor_core_mode(g.dtype)
    cfg = conv_block_config("dgrad", m, ci, co, kh * kw, b, _sms(g.device), tensor_cores=tc)
    w = relaid_weights(w, "fwd" if cfg["W_FWD"] else "dgrad")[0]
    _check("conv data gradient", g, w)
    split, chunk = cfg.pop("SPLIT"), cfg.pop("CHUNK")
    cap = _register_cap(cfg, tc)
    cfg.pop("SMALL")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(ci, cfg["BLOCK_N"] * cfg["NSUB"]), b * split)
    dx, ws, cnt, sum_in = _split_buffers((n, b * ci, h, wd), split, g, grid[0] * grid[1] * b,
                                         split_chain_in_kernel(split, cfg, "dgrad"))
    _check("conv data gradient", ws, split=1)
    _conv_dgrad_kernel[grid](g, w, ws if dx is None else dx, ws, cnt, b, ci, co, h, wd, ho, wo, m, chunk, KH=kh,
                             KW=kw, STRIDE=s, PAD=p, PREC=_precision(g.dtype), SPLIT=split,
                             EVEN_K=co % cfg["BLOCK_K"] == 0, EVEN_N=ci % (cfg["BLOCK_N"] * cfg["NSUB"]) == 0,
                             SUM_IN=sum_in, ROT=_CHUNK_ROT[0], **cfg, **cap)
    return _result(dx, ws, sum_in)


_lane_tables: dict = {}


def inside_lanes(n, meta) -> int:
    """The weight gradient's reduction lanes (i, y, z) whose every tap is inside the image, from the
    geometry: output rows y with 0 <= y*s - pad and y*s - pad + kh - 1 < h, times such columns, times n."""
    b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
    rows = sum(1 for y in range(ho) if y * s - p >= 0 and y * s - p + kh - 1 < h)
    cols = sum(1 for z in range(wo) if z * s - p >= 0 and z * s - p + kw - 1 < wd)
    return n * rows * cols


def _lane_table(n, meta, device):
    """(table, RI): table (3, n*Ho*Wo) int32, per reduction lane r = (i, y, z) of the weight gradient the g
    offset i*B*Co*L + y*Wo + z, the x offset i*B*Ci*H*W + (y*s - pad)*W + (z*s - pad) of tap (0, 0), and
    bit p*kw + q set when tap (p, q) reads inside the image; its first RI lanes are those whose every tap
    is inside (the others follow, each group in (i, y, z) order). Depends on the shape only: built once per
    shape and device and cached (not while a CUDA graph is being captured, so that no cached tensor lives in a
    graph's private pool)."""
    b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
    key = (n, meta, str(device))
    hit = _lane_tables.get(key)
    if hit is not None:
        return hit
    r = torch.arange(n * ho * wo, device=device, dtype=torch.int64)
    i, l_ = r // (ho * wo), r % (ho * wo)
    ly, lz = (l_ // wo) * s - p, (l_ % wo) * s - p
    bits = torch.zeros_like(r)
    for pp in range(kh):
        for qq in range(kw):
            ok = (ly + pp >= 0) & (ly + pp < h) & (lz + qq >= 0) & (lz + qq < wd)
            bits |= ok.to(torch.int64) << (pp * kw + qq)
    # the lanes whose every tap is inside the image first (in their order), then the others: the weight
    # gradient's loop reads the first ones without a per-element tap mask. Sorted without a host sync (the
    # table may be built during a CUDA graph capture); their count from the geometry (`inside_lanes`)
    order = torch.argsort((bits != (1 << (kh * kw)) - 1).to(torch.int8), stable=True)
    table = torch.stack([i * b * co * ho * wo + l_, i * b * ci * h * wd + ly * wd + lz, bits])[:, order]
    table = (table.to(torch.int32), inside_lanes(n, meta))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing:
        _lane_tables[key] = table
    return table


def conv_weight_grad(x, g, meta, with_bias=False):
    """Wg(x, g): -> (B, Co, Ci, kh, kw), a view with the strides of the forward's weight layout
    (B, kh, kw, Ci, Co) in which the kernel stores it (`forward_layout`); with_bias: also the conv bias's gradient, -> (dw, db) with
    db (B, Co) = g summed over (n, Ho, Wo) per channel, in the same launch (its own column of programs;
    the same in-order sum of the split partials: each partial holds the weights' then the bias's
    values). Every configuration takes the bias's programs without a spill under Triton 3.6 and 3.7
    (bench.static_metrics; the one-warp, three-sub-tile tiles spilled 48 B with them in an earlier version
    of the kernel and summed the bias apart until 2026-12-05, bench/NOTES.md)."""
    b, co, ci, kh, kw, h, wd, ho, wo, s, p = meta
    x, g = x.contiguous(), g.contiguous()
    _check("conv weight gradient", x, g)
    n = x.shape[0]
    red = n * ho * wo
    prec = _precision(x.dtype)
    cfg = wgrad_block_config(co, ci, kh * kw, red, b, _sms(x.device),
                             strict_fp32=x.dtype == torch.float32 and prec == "ieee",
                             tensor_cores=tensor_core_mode(x.dtype))
    split, chunk = cfg.pop("SPLIT"), cfg.pop("CHUNK")
    if cfg["TAP_MAJOR"] and (ci % cfg["BLOCK_N"] or cfg["NSUB"] != 1):
        raise ValueError(f"triton conv weight gradient: TAP_MAJOR needs one sub-tile and Ci a multiple of "
                         f"BLOCK_N, got Ci={ci}, BLOCK_N={cfg['BLOCK_N']}, NSUB={cfg['NSUB']}")
    nw = b * co * ci * kh * kw
    tot = nw + (b * co if with_bias else 0)
    k_tiles = (kh * kw * (ci // cfg["BLOCK_N"]) if cfg["TAP_MAJOR"] else triton.cdiv(ci * kh * kw, cfg["BLOCK_N"])) \
        + (1 if with_bias else 0)  # + the bias's programs
    grid = (triton.cdiv(co, cfg["BLOCK_M"] * cfg["NSUB"]), k_tiles, b * split)
    out, ws, cnt, sum_in = _split_buffers((tot,), split, x, grid[0] * grid[1] * b,
                                          wgrad_sums_split(cfg, with_bias) and split_chain_in_kernel(split, cfg))
    _check("conv weight gradient", ws)
    lanes, interior = _lane_table(n, meta, x.device)
    _conv_wgrad_kernel[grid](x, g, lanes, ws if out is None else out, ws, cnt, b, ci, co, h, wd, ho, wo, red,
                             interior, chunk, tot, KH=kh, KW=kw, STRIDE=s, PAD=p, PREC=prec, SPLIT=split,
                             HAS_DB=with_bias, SUM_IN=sum_in, ROT=_CHUNK_ROT[0], KEEP=wgrad_keeps_own(cfg), **cfg)
    red_ws = _result(out, ws, sum_in)
    dw = red_ws[:nw].view(b, kh, kw, ci, co).permute(*_FROM_FWD)
    return (dw, red_ws[nw:].view(b, co)) if with_bias else dw
