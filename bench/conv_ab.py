"""Device A/B of the Triton convolutions' launch configurations: the installed Triton's own
(`conv_block_config` / `wgrad_block_config`) against those of Triton >= 3.7 (k-major gather in 16-channel
steps, per-column weight-gradient tiles), on the same device, shapes and inputs.

Under Triton 3.6 (the device machines') the two differ for 64-channel layers: the current configurations
load the gather pixel-major in 32-channel steps and give each weight-gradient column tile one filter tap,
which took the strict-fp32 inner loops from 74-76% to 80-81% FFMA (forward, data gradient) and from
70-72% to 75-78% (weight gradient) in the compiler's output (bench/NOTES.md). Only the configurations
change: the ptxas options (`_register_cap`) stay the installed version's, so "k-major" is the code the
package ran on the device before that change. Under Triton >= 3.7 both columns run the same code.

A third column, "2x warps": the current configurations with num_warps doubled (at most 8), the same
tiles spread over twice the threads: fewer registers per thread (the weight gradient's 255 -> 168 at 4
warps, no spill under 3.6) and more resident warps per SM (8 -> 12), for a lower FFMA share (81.7% ->
78.8%). The first H200 run found the convolutions at ~32% of the fp32 peak with 8 warps per SM in most
configurations: this column measures the trade the FFMA share cannot judge (bench/NOTES.md).

Per layer of Omniglot 20-way 1-shot B=8 (support set, 64 channels, 14x14 / 7x7 / 3x3) and per kernel:
the median device time of `--iters` calls (CUDA events, after warm-up), the speed-ups, and the largest
relative difference between the results (float32 rounding only: each sums in a fixed order).

    python -m bench.conv_ab [--iters 50] [--out PREFIX]     # needs a CUDA device
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from datetime import datetime, timezone

LAYERS = [(14, 14), (7, 7), (3, 3)]  # (input size, output size) of Omniglot's layers 1-3, stride 1, pad 1
N, B, C = 20, 8, 64


@contextlib.contextmanager
def _patched_configs(wrap):
    """conv_block_config and wgrad_block_config replaced by wrap(each) for the block, then restored."""
    from mamlpp_fast.triton import conv as C_

    real_f, real_w = C_.conv_block_config, C_.wgrad_block_config
    C_.conv_block_config, C_.wgrad_block_config = wrap(real_f), wrap(real_w)
    try:
        yield
    finally:
        C_.conv_block_config, C_.wgrad_block_config = real_f, real_w


def kmajor_configs():
    """The launch configurations Triton >= 3.7 gets (GATHER_MK off, 16-channel steps, no TAP_MAJOR), with
    the installed version's ptxas options left as they are."""
    from mamlpp_fast.triton import conv as C_

    def as_37(fn):
        def f(*a, **k):
            old = C_._TRITON_VERSION
            C_._TRITON_VERSION = (3, 7)
            try:
                return fn(*a, **k)
            finally:
                C_._TRITON_VERSION = old
        return f
    return _patched_configs(as_37)


def more_warps():
    """The installed version's launch configurations with num_warps doubled (at most 8)."""
    def doubled(fn):
        def f(*a, **k):
            cfg = dict(fn(*a, **k))
            cfg["num_warps"] = min(8, 2 * cfg["num_warps"])
            return cfg
        return f
    return _patched_configs(doubled)


def _time(fn, iters):
    import torch
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def run(iters: int) -> list:
    import torch

    from mamlpp_fast.triton import conv as C_

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for h, ho in LAYERS:
        meta = (B, C, C, 3, 3, h, h, ho, ho, 1, 1)
        x = torch.randn(N, B * C, h, h, device="cuda", generator=gen)
        w = torch.randn(B, C, C, 3, 3, device="cuda", generator=gen)
        bias = torch.randn(B, C, device="cuda", generator=gen)
        g = torch.randn(N, B * C, ho, ho, device="cuda", generator=gen)
        calls = {"forward": lambda: C_.conv_forward(x, w, bias, meta),
                 "data gradient": lambda: C_.conv_data_grad(g, w, meta),
                 "weight gradient": lambda: C_.conv_weight_grad(x, g, meta, with_bias=True)[0]}
        for kind, fn in calls.items():
            cur = fn()
            t_cur = _time(fn, iters)
            with kmajor_configs():
                old = fn()
                t_old = _time(fn, iters)
            with more_warps():
                wide = fn()
                t_wide = _time(fn, iters)
            diff = max(float((cur - old).abs().max() / old.abs().max().clamp_min(1e-30)),
                       float((cur - wide).abs().max() / wide.abs().max().clamp_min(1e-30)))
            rows.append(dict(layer=f"{h}x{h}", kernel=kind, ms_current=t_cur, ms_kmajor=t_old,
                             speedup=t_old / t_cur, ms_2x_warps=t_wide, speedup_2x_warps=t_cur / t_wide,
                             max_rel_diff=diff))
    return rows


def to_markdown(rep: dict) -> str:
    out = [f"# Triton convolution launch configurations A/B: {rep['device']}", "",
           f"- date {rep['date']}; torch {rep['torch']}, Triton {rep['triton']}; git {rep['git']}",
           f"- command: `{rep['command']}`; median of {rep['iters']} calls (CUDA events)",
           "- shapes: Omniglot 20-way 1-shot B=8 support set, 64 channels, 3x3 stride 1 pad 1", "",
           "| layer | kernel | current ms | k-major ms | current's speed-up | 2x warps ms | 2x warps' speed-up | "
           "max rel. diff |", "|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        out.append(f"| {r['layer']} | {r['kernel']} | {r['ms_current']:.4f} | {r['ms_kmajor']:.4f} | "
                   f"{r['speedup']:.2f}x | {r.get('ms_2x_warps', float('nan')):.4f} | "
                   f"{r.get('speedup_2x_warps', float('nan')):.2f}x | {r['max_rel_diff']:.1e} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    """python -m bench.conv_ab: the Triton convolutions with the installed Triton's launch configurations
    against the k-major ones of Triton >= 3.7, on a CUDA device."""
    p = argparse.ArgumentParser(prog="python -m bench.conv_ab", description=main.__doc__)
    p.add_argument("--iters", type=int, default=50, help="timed calls per kernel and configuration")
    p.add_argument("--out", default=None, help="PREFIX: write PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    if a.iters < 1:
        print(f"error: --iters must be >= 1, got {a.iters}", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("error: bench.conv_ab needs a CUDA device (the Triton kernels do not run on a CPU)", file=sys.stderr)
        return 2
    import triton

    from .run import revision
    rep = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
               git=revision(),
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"), iters=a.iters,
               command="python -m bench.conv_ab " + " ".join(argv if argv is not None else sys.argv[1:]))
    rep["rows"] = run(a.iters)
    md = to_markdown(rep)
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump(rep, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
