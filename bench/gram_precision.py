"""python -m bench.gram_precision: the float32 rounding of the fused block's batch-norm statistics formed
from the image's Gram matrix (mamlpp_fast/triton/conv_block.py, `_fwd_stats_kernel`) at the learner's
full mini-ImageNet target-set shape (75 images of 3 x 84 x 84 per task, 48 filters, 3x3, padding 1),
which the interpreter tests are too slow to run. CPU only, no Triton: the same algebra in PyTorch.

    python -m bench.gram_precision [--chunk ROWS]

For images drawn three ways (standard normal; uniform on [0, 1]; 0.9 + 0.1 uniform, a large common
offset), a random w' (bias included), it forms in float32 D = P' - rho' (rho' the centre patch of the
first image), C_D and S_D summed chunk by chunk (ROWS rows per chunk, default 2000, about the kernels'
chunk at this shape), then mean = rho'.w' + S_D.w'/N and var = (w'^T C_D w' - (S_D.w')^2/N) / N, and
prints the largest relative error of invstd = 1/sqrt(var + 1e-5) and the largest error of the mean in
units of the standard deviation, against the float64 statistics of z = P' w'. bench/NOTES.md quotes it
beside the block tests' float32 margin (2e-5).
"""
from __future__ import annotations

import math
import sys

import torch

__all__ = ["errors", "main"]


def errors(kind: str, chunk: int = 2000, n: int = 75, ci: int = 3, size: int = 84, channels: int = 48,
           seed: int = 0) -> tuple:
    """(invstd relative error, mean error / std) of the Gram-based float32 statistics, largest over the
    channels, for images of `kind` ("normal", "uniform", "offset")."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, ci, size, size)
    if kind == "normal":
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "uniform":
        x = torch.rand(shape, generator=g, dtype=torch.float64)
    elif kind == "offset":
        x = 0.9 + 0.1 * torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    k = ci * 9
    w = torch.cat([torch.randn(channels, k, generator=g, dtype=torch.float64) / math.sqrt(k),
                   0.1 * torch.randn(channels, 1, generator=g, dtype=torch.float64)], 1)  # (C, K + 1)
    p = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, k)
    p = torch.cat([p, torch.ones(p.shape[0], 1, dtype=p.dtype)], 1)  # P' (N, K + 1)
    z = p @ w.T
    mean64, r64 = z.mean(0), 1 / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    p32, w32 = p.float(), w.float()
    d = p32 - p32[(size // 2) * size + size // 2]  # rho': the centre patch of the first image
    rows = d.shape[0]
    cd = torch.zeros(k + 1, k + 1)
    sd = torch.zeros(k + 1)
    for i in range(0, rows, chunk):
        dc = d[i:i + chunk]
        cd += dc.T @ dc
        sd += dc.sum(0)
    s = sd @ w32.T
    mean = p32[(size // 2) * size + size // 2] @ w32.T + s / rows
    m2 = ((cd @ w32.T) * w32.T).sum(0) - s * (s / rows)
    r = 1 / torch.sqrt(m2.double() / rows + 1e-5)
    return float(((r - r64).abs() / r64).max()), float(((mean.double() - mean64).abs() * r64).max())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chunk = 2000
    if argv[:1] == ["--chunk"] and len(argv) == 2 and argv[1].isdigit() and int(argv[1]) > 0:
        chunk = int(argv[1])
    elif argv:
        print("usage: python -m bench.gram_precision [--chunk ROWS]", file=sys.stderr)
        return 2
    for kind in ("normal", "uniform", "offset"):
        ri, me = errors(kind, chunk)
        print(f"{kind:8s} invstd relative error {ri:.2e}, mean error {me:.2e} std")
    return 0


if __name__ == "__main__":
    sys.exit(main())
