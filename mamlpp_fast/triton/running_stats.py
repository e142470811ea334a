"""Triton kernel of the fast learner's running-statistics update: every (layer, step) row of a
meta-update in ONE launch (mamlpp_fast.fast `_update_running_stats`).

The reference updates a row r once per task and forward, in its order (task t, forward p):
r <- (1 - m) r + m v. Over the K = B * P values of a row that is the closed form

    r_new = (1 - m)^K r + sum_j m (1 - m)^(K-1-j) v_j          (j = t * P + p)

with v_j the forward's batch mean (running mean) or its unbiased variance (running variance):
(invstd^-2 - eps) * M / (M - 1), M the values per (task, channel) of that forward. The weights
m (1 - m)^(K-1-j) (times M / (M - 1) for the variances) and the decays (1 - m)^K depend only on the
structure of the meta-update; the caller builds them once per structure (`running_stats_weights`).

Layout: program (g, c-block) writes row g's channels [c0, c0 + BLOCK_C) of its running mean and
variance. Each forward e (its mean and inverse std: (B*C,) task-major, as the batch-norm ops return
them) belongs to one row `rows[e]`; the kernel visits every forward in a statically unrolled loop and
adds those of its own row, over the tasks in a runtime loop. The forwards' tensors and the rows'
destinations (views of the layers' (S, C) buffers) are tuple arguments, so nothing is stacked or
copied: one launch reads the 2 E B C statistics and the 2 G C old values once and writes 2 G C.
Accumulation in the statistics' dtype (fp32 or fp64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["running_stats_update", "running_stats_weights", "running_stats_block_config"]


def running_stats_block_config(C: int) -> dict:
    """BLOCK_C = next power of two of C, at most 128 channels per program (the Omniglot and
    mini-ImageNet nets have 48 or 64); one warp per 32 channels, at most 4."""
    block = min(128, triton.next_power_of_2(max(int(C), 1)))
    return dict(BLOCK_C=block, num_warps=max(1, min(4, block // 32)))


@triton.jit
def _running_stats_kernel(means, invstds, rmeans, rvars, rows, w_ptr, decay_ptr, B, C,
                          E: tl.constexpr, G: tl.constexpr, BLOCK_C: tl.constexpr):
    """rmeans[g][c] <- decay[g] rmeans[g][c] + sum over e with rows[e] == g, t < B of
    w[0, e, t] means[e][t*C + c]; rvars likewise with w[1, e, t] (invstds[e][t*C + c]^-2 - eps), eps
    = decay[G] (a tensor element: exact in fp64, where a scalar argument would pass through fp32)."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < C
    ACC = means[0].dtype.element_ty
    acc_m = tl.zeros([BLOCK_C], dtype=ACC)
    acc_v = tl.zeros([BLOCK_C], dtype=ACC)
    eps = tl.load(decay_ptr + G).to(ACC)
    for e in tl.static_range(E):
        if rows[e] == g:
            for t in range(0, B):
                wm = tl.load(w_ptr + e * B + t)
                wv = tl.load(w_ptr + (E + e) * B + t)
                mu = tl.load(means[e] + t * C + c, mask=mask, other=0.0).to(ACC)
                inv = tl.load(invstds[e] + t * C + c, mask=mask, other=1.0).to(ACC)
                acc_m += wm * mu
                acc_v += wv * (1.0 / (inv * inv) - eps)
    for r in tl.static_range(G):
        if r == g:
            d = tl.load(decay_ptr + r)
            old_m = tl.load(rmeans[r] + c, mask=mask, other=0.0).to(ACC)
            old_v = tl.load(rvars[r] + c, mask=mask, other=0.0).to(ACC)
            tl.store(rmeans[r] + c, (d * old_m + acc_m).to(rmeans[r].dtype.element_ty), mask=mask)
            tl.store(rvars[r] + c, (d * old_v + acc_v).to(rvars[r].dtype.element_ty), mask=mask)


def running_stats_weights(counts, b: int, momentum: float, eps: float, dtype, device):
    """(weights (2, E, b), decays (G + 1,): the G rows' decays then the batch norm's eps, rows (E,) as a
    tuple of ints) for rows g with forwards counts[g] = [M of each forward, in the reference's order]
    over b tasks (module docstring)."""
    w_mean, w_var, decays, rows = [], [], [], []
    for g, ms in enumerate(counts):
        p_count = len(ms)
        k = b * p_count
        for p, count in enumerate(ms):
            coef = [momentum * (1.0 - momentum) ** (k - 1 - (t * p_count + p)) for t in range(b)]
            w_mean.append(coef)
            w_var.append([w * (count / (count - 1)) for w in coef])
            rows.append(g)
        decays.append((1.0 - momentum) ** k)
    decays.append(eps)
    weights = torch.tensor([w_mean, w_var], dtype=torch.float64).to(device, dtype)
    return weights, torch.tensor(decays, dtype=torch.float64).to(device, dtype), tuple(rows)


def running_stats_update(means, invstds, rmeans, rvars, weights, decays, rows) -> None:
    """Update the rows rmeans[g], rvars[g] ((C,) each, written in place) from the forwards' statistics
    means[e], invstds[e] ((B*C,) each, task-major) of row rows[e], with `running_stats_weights`'
    weights (2, E, B) and decays (G + 1,). One launch."""
    E, G = len(means), len(rmeans)
    if not (E == len(invstds) == len(rows) and G == len(rvars) == len(decays) - 1) or E == 0:
        raise ValueError(f"running_stats_update: {E} means, {len(invstds)} inverse stds, {len(rows)} row "
                         f"indices; {G} mean rows, {len(rvars)} variance rows, {len(decays)} decays (G + 1: the last is eps)")
    C = rmeans[0].numel()
    B = means[0].numel() // C
    if tuple(weights.shape) != (2, E, B):
        raise ValueError(f"running_stats_update: weights must be (2, {E}, {B}), got {tuple(weights.shape)}")
    for t in (*means, *invstds):
        if t.numel() != B * C or not t.is_contiguous() or t.dtype != means[0].dtype:
            raise ValueError(f"running_stats_update: every statistic must be a contiguous ({B * C},) "
                             f"{means[0].dtype} tensor, got {tuple(t.shape)} {t.dtype}")
    for t in (*rmeans, *rvars):
        if t.numel() != C or not t.is_contiguous():
            raise ValueError(f"running_stats_update: every row must be a contiguous ({C},) tensor, "
                             f"got {tuple(t.shape)}")
    if weights.dtype != means[0].dtype or decays.dtype != means[0].dtype:
        raise ValueError(f"running_stats_update: the weights' dtype {weights.dtype} and the decays' "
                         f"{decays.dtype} must be the statistics' {means[0].dtype}")
    if any(not 0 <= r < G for r in rows):
        raise ValueError(f"running_stats_update: row indices must lie in [0, {G}), got {rows}")
    cfg = running_stats_block_config(C)
    _running_stats_kernel[(G, triton.cdiv(C, cfg["BLOCK_C"]))](
        tuple(means), tuple(invstds), tuple(rmeans), tuple(rvars), tuple(rows), weights.contiguous(),
        decays.contiguous(), B, C, E=E, G=G, BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
