"""python -m bench.fanout_host: host time of one `fanout(4, 10 tensors)` call on the CPU (the learner's
per-step fan-out of its fast weights: 10 non-leaf (8, 64, 64, 3, 3) tensors, 4 uses), mean of 500 calls
after 50 warm-up calls. Run it on one thread (OMP_NUM_THREADS=1) on an otherwise idle machine; bench/NOTES.md
quotes it."""
from __future__ import annotations

import time

import torch

from mamlpp_fast.ops.fanout import fanout


def main() -> int:
    ps = [torch.randn(8, 64, 64, 3, 3, requires_grad=True) * 1 for _ in range(10)]
    for _ in range(50):
        fanout(4, ps)
    t = time.perf_counter()
    for _ in range(500):
        fanout(4, ps)
    print(f"fanout(4, 10 tensors): {(time.perf_counter() - t) / 500 * 1e6:.0f} us per call (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
