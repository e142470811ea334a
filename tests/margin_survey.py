"""Survey of the float32 Triton-kernel tests' margins over many seeds (not part of the default run).

Usage, from the repository root (runs the kernels under the Triton interpreter):

    python tests/margin_survey.py head SEEDS     # test_head_kernels_float32: largest bound / magnitude
    python tests/margin_survey.py bn FIRST LAST  # test_bn_pool/conv_block_kernels_float32: error / margin

`head`: for seeds 0..SEEDS-1 and each shape of the test, the largest ratio of an output's bound to its
largest magnitude (`_head_f32_bounds`; the test requires < 1e-2), with the float64 oracle's own logits
standing in for the kernels' (the bounds depend on them only through p). `bn`: for seeds FIRST..LAST-1,
the worst ratio of each output's error to the test's constant margin (the test requires < 1), with the
test's own redraw of near-tied pooling windows. Prints the largest ratios.
"""
from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import test_triton_interp as t  # noqa: E402


def head(seeds: int) -> dict:
    from mamlpp_fast.ops.head import torch_impl
    worst = {}
    for idx in (0, 3, 4):
        for seed in range(seeds):
            x, w, b, labels, lw, prev, T = t._head_case(idx, seed, torch.float32)
            ref = t._head_all(torch_impl, x.double(), w.double(), b.double(), labels, lw.double(), prev.double(),
                              T, seed)
            saved = tuple(dict(ref)[k] for k in ("logits", "lse"))
            for k, (bound, mag) in t._head_f32_bounds(x, w, b, labels, lw, prev, T, seed, saved).items():
                worst[(idx, k)] = max(worst.get((idx, k), 0.0), float(bound.max() / mag.max()))
    return worst


def bn(first: int, last: int) -> dict:
    from test_bn_pool import EPS, SLOPE
    from test_conv_block import SHAPES as BLOCK_SHAPES
    from mamlpp_fast.ops import per_step_batch_norm
    from mamlpp_fast.ops.bn_pool import torch_impl as pool_ref
    from mamlpp_fast.ops.conv_block import torch_impl as block_ref
    from mamlpp_fast.triton import bn_pool as tbp
    from mamlpp_fast.triton import conv_block as tcb
    worst = {}

    def note(got, ref, tol, key, block):
        scale = max(float(r.abs().max()) for _, r in ref)
        for (name, a), (_, r) in zip(got, ref):
            den = scale if (block and "bias" in name) else max(1.0, float(r.abs().max()))
            e = float((a.double() - r.double()).abs().max()) / den / tol
            worst[(key, name)] = max(worst.get((key, name), 0.0), e)

    for seed in range(first, last):
        for idx in (0, 1, 2):
            s = seed
            while True:
                x, gamma, beta, T = t._bn_pool_case(idx, s, torch.float32)
                y = per_step_batch_norm(x.double(), gamma.double(), beta.double(), T, EPS, SLOPE, backend="torch")[0]
                if t._pool_gap(y) > 1e-4:
                    break
                s += 1
            ref, invstd = t._bn_pool_all(pool_ref, x.double(), gamma.double(), beta.double(), T, s)
            got, _ = t._bn_pool_all(tbp, x, gamma, beta, T, s)
            note(got[:6], ref[:6], 2e-5, f"bn_pool{idx}", False)
            note(got[6:], ref[6:], 1e-4 * max(1.0, float(invstd.max())), f"bn_pool{idx}", False)
        for idx in (0, 1, 4):
            s = seed
            while True:
                case = t._block_case(BLOCK_SHAPES[idx], s, torch.float32)
                if t._window_gap(*case) > 1e-4:
                    break
                s += 1
            ref, invstd = t._block_all(block_ref, *[q.double() if isinstance(q, torch.Tensor) else q for q in case], s)
            got, _ = t._block_all(tcb, *case, s)
            note(got[:7], ref[:7], 2e-5, f"conv_block{idx}", True)
            note(got[7:], ref[7:], 1e-4 * max(1.0, float(invstd.max())), f"conv_block{idx}", True)
    return worst


def main(argv) -> int:
    if len(argv) == 2 and argv[0] == "head":
        worst = head(int(argv[1]))
    elif len(argv) == 3 and argv[0] == "bn":
        worst = bn(int(argv[1]), int(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for k in sorted(worst, key=lambda k: -worst[k])[:12]:
        print(k, f"{worst[k]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
