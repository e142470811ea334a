"""Triton kernel of a meta-update's accuracy: the fraction of target rows whose largest logit is at
their label, in ONE launch (the fast learner's `_forward_tensors`; PyTorch's argmax, eq, cast and mean
took four).

    accuracy = (number of rows r with argmax_c logits[r, c] == labels[r]) / rows

argmax as torch.argmax defines it: the first index of the largest value, where a NaN counts as larger
than any number (the first NaN's index). The count is exact and scaled as torch's mean reduction on a
CUDA device scales the exact sum of the 0/1 values: times the float32 factor 1/rows (IEEE division on
the host): the same float32 result.

Layout: one program; BLOCK_R rows x BLOCK_C classes per step of a loop over the rows (the learner's
targets are at most a few hundred rows of tens of classes).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["accuracy"]


@triton.jit
def _accuracy_kernel(logits_ptr, labels_ptr, out_ptr, R, C, inv_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    hits = tl.zeros([BLOCK_R], dtype=tl.int32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < R
        mask = rmask[:, None] & (c[None, :] < C)
        x = tl.load(logits_ptr + r[:, None].to(tl.int64) * C + c[None, :], mask=mask, other=float("-inf"))
        nan = (x != x) & mask
        big = BLOCK_C + 1
        first_nan = tl.min(tl.where(nan, c[None, :], big), axis=1)
        top = tl.max(tl.where(nan, float("-inf"), x), axis=1)
        first_top = tl.min(tl.where((x == top[:, None]) & mask, c[None, :], big), axis=1)
        # a row of -inf only (or of padding): torch's argmax gives index 0
        first_top = tl.where(first_top == big, 0, first_top)
        pred = tl.where(first_nan < big, first_nan, first_top)
        label = tl.load(labels_ptr + r, mask=rmask, other=-1)
        hits += ((pred == label) & rmask).to(tl.int32)
    total = tl.sum(hits, axis=0)
    tl.store(out_ptr, total.to(tl.float32) * inv_r)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-d float32: the fraction of rows of logits (..., C) whose argmax equals labels (the rows in
    order, integer). One launch."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"accuracy: logits must be (..., C) with C >= 1, got {tuple(logits.shape)}")
    C = logits.shape[-1]
    x = logits.reshape(-1, C)
    R = x.shape[0]
    if labels.numel() != R or labels.dtype not in (torch.int64, torch.int32) or labels.device != logits.device:
        raise ValueError(f"accuracy: labels must be {R} integers on {logits.device}, got "
                         f"{tuple(labels.shape)} {labels.dtype} on {labels.device}")
    if R == 0:
        raise ValueError("accuracy: no rows")
    x = x.contiguous()
    lab = labels.reshape(-1).contiguous()
    out = torch.empty((), dtype=torch.float32, device=logits.device)
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(triton.next_power_of_2(R), 4096 // block_c))
    inv_r = float(np.float32(1.0) / np.float32(R))  # exact in the float32 argument
    _accuracy_kernel[(1,)](x, lab, out, R, C, inv_r, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out
