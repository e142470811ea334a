"""Device A/B of the Triton convolutions' launch configurations: the installed Triton's own
(`conv_block_config` / `wgrad_block_config`) against variants of them, per layer shape and kernel, on the
same device, shapes and inputs. Each variant changes the configuration only (the kernels' code and the
ptxas options, `_register_cap`, stay the installed version's):

- "k-major": the configurations of Triton >= 3.7 (k-major gather in 16-channel steps, per-column
  weight-gradient tiles). Under Triton 3.6 (the device machines') they differ for 64-channel layers,
  where the current ones took the strict-fp32 inner loops from 74-76% to 80-81% FFMA (forward, data
  gradient) and from 70-72% to 75-78% (weight gradient) in the compiler's output (bench/NOTES.md).
- "2x warps": num_warps doubled (at most 8), the same tiles over twice the threads: fewer registers per
  thread (the Omniglot weight gradient's 255 -> 168 at 4 warps, no spill under 3.6) and more resident
  warps per SM, for a lower FFMA share. The first H200 run found the convolutions at ~32% of the fp32
  peak with 8 warps per SM in most configurations: this measures the trade the FFMA share cannot judge.
- "programs target": the split target before it was counted in warps (two programs per SM whatever
  their warps, `programs_target`): what the current target (RESIDENT_WARPS warps per SM,
  `mamlpp_fast.triton.conv.split_target`) changed, measured layer by layer.
- "2x split": the reduction split into twice the chunks (at most one chunk per two k-steps): twice the
  programs, each half the work, for more partial sums to add.

A variant whose configurations equal the current ones at a layer is not run there ("=" in the table).
Layers (3x3, stride 1, pad 1; input x, output gradient g, weights w random): Omniglot 20-way 1-shot B=8
support set (20 images, 64 channels) at 14x14, 7x7 and 3x3; mini-ImageNet 5-way 1-shot B=2 (48 channels)
target set (75 images) at 42x42 and 21x21 and support set (5 images) at 42x42: the layers that hold most
of the two meta-updates' convolution time in the first H200 profile (bench/NOTES.md). Per layer,
kernel and variant: the median device time of `--iters` calls (CUDA events, after warm-up), the speed-up
over the current configuration, and the largest relative difference of the results from the current
ones (float32 rounding only: every configuration sums in a fixed order). The products are strict
float32 ("ieee", the learner's default), whatever torch.backends.cudnn.allow_tf32 says (`strict_products`).

Compiling every (layer, kernel, variant) specialisation takes about a second each under Triton 3.6;
`--jobs J` first runs each case once in J worker processes, which compile in parallel into Triton's
on-disk cache, so that the timing process then only loads them.

    python -m bench.conv_ab [--iters 30] [--jobs 8] [--layers NAME,...] [--out PREFIX]   # needs a CUDA device
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone

# name: (images, tasks, channels, input size); 3x3 stride 1 pad 1, output size = input size
LAYERS = {"omniglot-14x14": (20, 8, 64, 14), "omniglot-7x7": (20, 8, 64, 7), "omniglot-3x3": (20, 8, 64, 3),
          "miniimagenet-target-42x42": (75, 2, 48, 42), "miniimagenet-target-21x21": (75, 2, 48, 21),
          "miniimagenet-support-42x42": (5, 2, 48, 42)}
KERNELS = ("forward", "data gradient", "weight gradient")
VARIANTS = ("current", "programs target", "k-major", "2x warps", "2x split")


@contextlib.contextmanager
def _patched_configs(wrap):
    """conv_block_config and wgrad_block_config replaced by wrap(each, "block" / "wgrad") for the block,
    then restored."""
    from mamlpp_fast.triton import conv as C_

    real_f, real_w = C_.conv_block_config, C_.wgrad_block_config
    C_.conv_block_config, C_.wgrad_block_config = wrap(real_f, "block"), wrap(real_w, "wgrad")
    try:
        yield
    finally:
        C_.conv_block_config, C_.wgrad_block_config = real_f, real_w


def kmajor_configs():
    """The launch configurations Triton >= 3.7 gets (GATHER_MK off, 16-channel steps, no TAP_MAJOR), with
    the installed version's ptxas options left as they are."""
    from mamlpp_fast.triton import conv as C_

    def as_37(fn, kind):
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
    def doubled(fn, kind):
        def f(*a, **k):
            cfg = dict(fn(*a, **k))
            cfg["num_warps"] = min(8, 2 * cfg["num_warps"])
            return cfg
        return f
    return _patched_configs(doubled)


def doubled_split(cfg: dict, kind: str, args: tuple) -> dict:
    """`cfg` with its reduction in twice the chunks, recomputed as the config functions do: chunks of at
    least two k-steps (forward / data gradient: `chunk` counts k-steps of BLOCK_K channels of one tap;
    weight gradient: reduction lanes, a multiple of BLOCK_K), SPLIT the chunks that cover the reduction.
    args: the config function's positional arguments. The first layer's one-block forward (SMALL) keeps
    its one step."""
    import triton

    cfg = dict(cfg)
    if kind == "block":
        _, rows, cols, chans, kk, tasks, sms = args[:7]
        if cfg.get("SMALL"):
            return cfg
        steps = kk * triton.cdiv(chans, cfg["BLOCK_K"])
        split = max(1, min(2 * cfg["SPLIT"], steps // 2))
        chunk = max(2, steps // split) if split > 1 else steps
        cfg["SPLIT"], cfg["CHUNK"] = triton.cdiv(steps, chunk), chunk
    else:
        co, ci, kk, red = args[:4]
        bk = cfg["BLOCK_K"]
        split = max(1, min(2 * cfg["SPLIT"], triton.cdiv(red, 2 * bk)))
        chunk = max(2 * bk, red // split // bk * bk) if split > 1 else triton.cdiv(red, bk) * bk
        cfg["SPLIT"], cfg["CHUNK"] = triton.cdiv(red, chunk), chunk
    return cfg


def more_splits():
    """The installed version's launch configurations with twice the reduction chunks (`doubled_split`)."""
    def doubled(fn, kind):
        def f(*a, **k):
            return doubled_split(fn(*a, **k), kind, a)
        return f
    return _patched_configs(doubled)


@contextlib.contextmanager
def programs_target():
    """The split target before it was counted in warps: two programs per SM whatever their warps
    (`mamlpp_fast.triton.conv.split_target` returning 2 x sms), the configurations measured by the first
    H200 profile."""
    from mamlpp_fast.triton import conv as C_
    real = C_.split_target
    C_.split_target = lambda sms, num_warps: 2 * sms
    try:
        yield
    finally:
        C_.split_target = real


def variant(name: str):
    """The context manager that applies variant `name` (one of VARIANTS)."""
    return {"current": contextlib.nullcontext, "programs target": programs_target, "k-major": kmajor_configs,
            "2x warps": more_warps, "2x split": more_splits}[name]()


def layer_meta(name: str) -> tuple:
    """(images, tasks, channels, size, meta) of layer `name` (LAYERS); meta as the launchers take it."""
    n, b, c, h = LAYERS[name]
    return n, b, c, h, (b, c, c, 3, 3, h, h, h, h, 1, 1)


def layer_configs(name: str, kernel: str, sms: int = 132, strict_fp32: bool = True) -> dict:
    """The launch configuration of `kernel` at layer `name` under the active variant (what the launcher
    would get on a device of `sms` multiprocessors), for telling variants apart without a device."""
    from mamlpp_fast.triton import conv as C_
    n, b, c, h, _ = layer_meta(name)
    m = n * h * h
    if kernel == "forward":
        return C_.conv_block_config("fwd", m, c, c, 9, b, sms)
    if kernel == "data gradient":
        return C_.conv_block_config("dgrad", m, c, c, 9, b, sms)
    return C_.wgrad_block_config(c, c, 9, m, b, sms, strict_fp32=strict_fp32)


def cases(layers) -> list:
    """(layer, kernel, variant) of every run: the current configuration, and each other variant where its
    configuration differs from the current one (on the 132 SMs of an H100 / H200)."""
    out = []
    for name in layers:
        for kernel in KERNELS:
            with variant("current"):
                cur = layer_configs(name, kernel)
            for v in VARIANTS:
                with variant(v):
                    cfg = layer_configs(name, kernel)
                if v == "current" or cfg != cur:
                    out.append((name, kernel, v))
    return out


def _inputs(name: str):
    import torch
    n, b, c, h, meta = layer_meta(name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, b * c, h, h, device="cuda", generator=gen)
    w = torch.randn(b, c, c, 3, 3, device="cuda", generator=gen)
    bias = torch.randn(b, c, device="cuda", generator=gen)
    g = torch.randn(n, b * c, h, h, device="cuda", generator=gen)
    return x, w, bias, g, meta


def _call(kernel: str, x, w, bias, g, meta):
    from mamlpp_fast.triton import conv as C_
    if kernel == "forward":
        return lambda: C_.conv_forward(x, w, bias, meta)
    if kernel == "data gradient":
        return lambda: C_.conv_data_grad(g, w, meta)
    return lambda: C_.conv_weight_grad(x, g, meta, with_bias=True)[0]


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


def strict_products():
    """The block's Triton products in strict float32 ("ieee"), the learner's default (config key
    allow_tf32 False): without it the launchers follow torch.backends.cudnn.allow_tf32, which torch
    turns on by default, and the A/B would time the TF32 kernels."""
    from mamlpp_fast.triton._device import forced_conv_precision
    return forced_conv_precision("ieee")


def compile_part(layers, part: int, parts: int) -> None:
    """Run every parts-th case (from `part`) once: compiles its kernels into Triton's on-disk cache."""
    import torch
    todo = cases(layers)[part::parts]
    inputs = {}
    with strict_products():
        for name, kernel, v in todo:
            if name not in inputs:
                inputs[name] = _inputs(name)
            with variant(v):
                _call(kernel, *inputs[name])()
    torch.cuda.synchronize()


def precompile(layers, jobs: int) -> None:
    """`compile_part` in `jobs` worker processes at once; a worker that fails leaves its cases to the
    timing run (which compiles what is not cached), with its error printed."""
    procs = [subprocess.Popen([sys.executable, "-m", "bench.conv_ab", "--layers", ",".join(layers),
                               "--compile-part", f"{i}/{jobs}"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(jobs)]
    for i, p in enumerate(procs):
        out, _ = p.communicate()
        if p.returncode != 0:
            print(f"conv_ab: compile worker {i}/{jobs} exited {p.returncode}: {out.strip()[-400:]}", file=sys.stderr)


def run(layers, iters: int) -> list:
    """One row per (layer, kernel): each variant's median ms (None where it equals the current
    configuration), its speed-up over the current one, and the largest relative difference of its
    result from the current one's."""
    with strict_products():
        return _run(layers, iters)


def _run(layers, iters: int) -> list:
    todo = set(cases(layers))
    rows = []
    for name in layers:
        inputs = _inputs(name)
        for kernel in KERNELS:
            fn = _call(kernel, *inputs)
            cur = fn()
            row = dict(layer=name, kernel=kernel, ms={}, speedup={}, max_rel_diff=0.0)
            for v in VARIANTS:
                if (name, kernel, v) not in todo:
                    row["ms"][v] = None
                    continue
                with variant(v):
                    res = fn()
                    row["ms"][v] = _time(fn, iters)
                diff = float((res - cur).abs().max() / cur.abs().max().clamp_min(1e-30))
                row["max_rel_diff"] = max(row["max_rel_diff"], diff)
            t0 = row["ms"]["current"]
            row["speedup"] = {v: (t0 / t if t else None) for v, t in row["ms"].items() if v != "current"}
            rows.append(row)
    return rows


def to_markdown(rep: dict) -> str:
    others = [v for v in VARIANTS if v != "current"]
    out = [f"# Triton convolution launch configurations A/B: {rep['device']}", "",
           f"- date {rep['date']}; torch {rep['torch']}, Triton {rep['triton']}; git {rep['git']}",
           f"- command: `{rep['command']}`; median of {rep['iters']} calls (CUDA events); strict float32 "
           "products (conv precision \"ieee\", the learner's default)",
           "- layers: 3x3 stride 1 pad 1; omniglot: 20-way 1-shot B=8 support set (20 images, 64 channels); "
           "miniimagenet: 5-way 1-shot B=2 (48 channels), target set 75 images, support set 5",
           "- speed-up: current ms / variant ms (> 1: the variant is faster); \"=\": the variant's "
           "configuration is the current one there", "",
           "| layer | kernel | current ms | " + " | ".join(f"{v} ms | {v} speed-up" for v in others)
           + " | max rel. diff |", "|---|---|---|" + "---|---|" * len(others) + "---|"]
    for r in rep["rows"]:
        cells = []
        for v in others:
            t = r["ms"].get(v)
            cells += ["=", "="] if t is None else [f"{t:.4f}", f"{r['speedup'][v]:.2f}x"]
        out.append(f"| {r['layer']} | {r['kernel']} | {r['ms']['current']:.4f} | " + " | ".join(cells)
                   + f" | {r['max_rel_diff']:.1e} |")
    return "\n".join(out) + "\n"


def _layers_arg(text: str) -> list:
    names = [s for s in text.split(",") if s]
    bad = [s for s in names if s not in LAYERS]
    if bad or not names:
        raise ValueError(f"--layers: unknown layer(s) {bad or text!r}; known: {', '.join(LAYERS)}")
    return names


def main(argv=None) -> int:
    """python -m bench.conv_ab: the Triton convolutions with the installed Triton's launch configurations
    against variants of them (k-major, twice the warps, twice the split), per layer, on a CUDA device."""
    p = argparse.ArgumentParser(prog="python -m bench.conv_ab", description=main.__doc__)
    p.add_argument("--iters", type=int, default=30, help="timed calls per kernel and configuration")
    p.add_argument("--jobs", type=int, default=0, help="compile the cases first in this many worker processes")
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated names of " + ", ".join(LAYERS))
    p.add_argument("--compile-part", default=None, help=argparse.SUPPRESS)  # I/J: a precompile worker
    p.add_argument("--out", default=None, help="PREFIX: write PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    try:
        layers = _layers_arg(a.layers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.iters < 1 or a.jobs < 0:
        print(f"error: --iters must be >= 1 and --jobs >= 0, got {a.iters} and {a.jobs}", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("error: bench.conv_ab needs a CUDA device (the Triton kernels do not run on a CPU)", file=sys.stderr)
        return 2
    if a.compile_part:
        i, j = (int(v) for v in a.compile_part.split("/"))
        compile_part(layers, i, j)
        return 0
    import time

    import triton

    from .run import revision
    rep = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
               git=revision(), layers=layers,
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"), iters=a.iters,
               command="python -m bench.conv_ab " + " ".join(argv if argv is not None else sys.argv[1:]))
    t0 = time.time()
    if a.jobs:
        precompile(layers, a.jobs)
    rep["compile_s"] = round(time.time() - t0, 1)
    rep["rows"] = run(layers, a.iters)
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
