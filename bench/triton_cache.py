"""python -m bench.triton_cache: Triton's on-disk kernel cache filled on this CPU machine for a device
run, so that the device's minutes are not spent compiling.

Compiling the Triton kernels of the two benchmark workloads takes ~75 s per workload on a device machine
(the first H200 run, bench/NOTES.md), out of a lease of 15 minutes. Triton looks a compiled kernel up by
a hash of: its own installation (the files of its compiler and backends and its `libtriton` binary:
the same wheel, so the same Python version), the kernel's source and its specialisation (argument
types, divisibility by 16, constexpr values), the target (sm_90), the backend (its ptxas's version)
and the launch options. None of these depends on the GPU being there, so a cache compiled here with the
device's Triton wheel for the device's Python (Triton 3.6.0, cp312 for the lent H200s' image) and the
same tree answers the device's lookups.

    python -m bench.triton_cache --out DIR [--workloads A,B] [--no-conv-ab]    # fill (needs Triton)
    python -m bench.triton_cache --relocate DIR                                 # on the device (no Triton)

Fill: every Triton launch of one meta-update of each workload (fused and unfused ops, strict fp32 and
TF32 convolutions: bench.static_metrics `collect_calls` / `capture_launches`, on the device's 132 SMs)
and of bench.conv_ab's cases, compiled for GPUTarget("cuda", 90, 32) into DIR; then pruned to what a
lookup reads (each kernel's metadata JSON, its cubin and the group file that lists them), ~1/5 of the
size. Relocate: the group files name their members by absolute path, so a cache moved to another
folder is rewritten to it before use (`relocate`). `scripts/gpu_session.sh` relocates a carried
`.triton_cache` and points TRITON_CACHE_DIR at it; its summary counts the kernels compiled anyway.

The kernel hashes include the kernels' source: fill the cache from the tree that the device will run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

KEEP_SUFFIXES = (".json", ".cubin")  # a lookup reads the metadata JSON and the binary (CompiledKernel)


def prune(cache_dir: str) -> dict:
    """Keep each cached kernel's metadata JSON, cubin and group file (dropping its PTX, LLVM IR, TTIR /
    TTGIR and source dumps); the group files then list only what is kept. Returns {kernels, bytes}."""
    kernels, size = 0, 0
    for entry in sorted(os.listdir(cache_dir)):
        d = os.path.join(cache_dir, entry)
        if not os.path.isdir(d):
            continue
        names = os.listdir(d)
        groups = [n for n in names if n.startswith("__grp__")]
        for n in names:
            if not n.startswith("__grp__") and not n.endswith(KEEP_SUFFIXES):
                os.unlink(os.path.join(d, n))
        for g in groups:
            path = os.path.join(d, g)
            with open(path) as f:
                data = json.load(f)
            kept = {c: p for c, p in data.get("child_paths", {}).items() if c.endswith(KEEP_SUFFIXES)}
            with open(path, "w") as f:
                json.dump({"child_paths": kept}, f)
            kernels += any(c.endswith(".cubin") for c in kept)
        size += sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))
    return dict(kernels=kernels, bytes=size)


def relocate(cache_dir: str) -> int:
    """Rewrite every group file's member paths to `cache_dir`/<hash>/<name> (the folder the cache lies in
    now). Returns the number of group files rewritten. Needs no Triton."""
    cache_dir = os.path.abspath(cache_dir)
    n = 0
    for entry in sorted(os.listdir(cache_dir)):
        d = os.path.join(cache_dir, entry)
        if not os.path.isdir(d):
            continue
        for g in os.listdir(d):
            if not g.startswith("__grp__"):
                continue
            path = os.path.join(d, g)
            with open(path) as f:
                data = json.load(f)
            data["child_paths"] = {c: os.path.join(d, c) for c in data.get("child_paths", {})}
            with open(path, "w") as f:
                json.dump(data, f)
            n += 1
    return n


def launches(workloads, quick: bool = False, conv_ab: bool = True) -> list:
    """(JITFunction, args, kwargs) of every Triton launch to cache: each workload's meta-update (bench.
    static_metrics `collect_calls`, strict fp32 and, for the convolutions, TF32 and tf32x3) and bench.conv_ab's
    cases (strict fp32, each under its variant's configurations)."""
    from .static_metrics import capture_launches, collect_calls
    out = []
    for call in collect_calls(workloads, quick):
        for tf32 in (("fp32", "tf32", "tf32x3") if call[0].startswith("conv_") else ("fp32",)):
            out += capture_launches(call, tf32)
    if conv_ab:
        from . import conv_ab as A
        for name, kernel, v in A.cases(list(A.LAYERS)):
            n, b, c, h, meta = A.layer_meta(name)
            call = {"forward": ("conv_forward", (n, b * c, h, h), meta, True),
                    "data gradient": ("conv_data_grad", (n, b * c, h, h), meta),
                    "weight gradient": ("conv_weight_grad", (n, b * c, h, h), meta, True)}[kernel]
            with A.variant(v), A.strict_products():
                out += capture_launches(call)
    return out


def fill(cache_dir: str, workloads, quick: bool = False, conv_ab: bool = True) -> dict:
    """Compile `launches` for sm_90 into `cache_dir` (Triton's cache: TRITON_CACHE_DIR, set here before
    the first compile), then `prune` it. Returns {launches, compiled, kernels, bytes, seconds}."""
    os.makedirs(cache_dir, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(cache_dir)
    from .static_metrics import compile_launch
    t0 = time.time()
    todo = launches(workloads, quick, conv_ab)
    seen = set()
    for fn, args, kwargs in todo:
        key, _ck = compile_launch(fn, args, kwargs)
        seen.add(key)
    info = prune(cache_dir)
    return dict(launches=len(todo), compiled=len(seen), seconds=round(time.time() - t0, 1), **info)


def main(argv=None) -> int:
    """python -m bench.triton_cache: fill Triton's on-disk cache for a device run, or relocate one."""
    p = argparse.ArgumentParser(prog="python -m bench.triton_cache", description=main.__doc__)
    p.add_argument("--out", default=None, help="DIR: fill this cache folder (created; kept entries reused)")
    p.add_argument("--relocate", default=None, metavar="DIR", help="rewrite a moved cache's paths to DIR")
    p.add_argument("--workloads", default="omniglot_20w1s,miniimagenet_5w1s")
    p.add_argument("--quick", action="store_true", help="the --quick workloads (tiny shapes)")
    p.add_argument("--no-conv-ab", action="store_true", help="leave bench.conv_ab's cases out")
    a = p.parse_args(argv)
    if (a.out is None) == (a.relocate is None):
        print("error: give one of --out DIR (fill) or --relocate DIR", file=sys.stderr)
        return 2
    if a.relocate:
        if not os.path.isdir(a.relocate):
            print(f"error: --relocate {a.relocate}: not a folder", file=sys.stderr)
            return 2
        print(f"relocated {relocate(a.relocate)} cached kernels to {os.path.abspath(a.relocate)}")
        return 0
    import triton
    info = fill(a.out, [w for w in a.workloads.split(",") if w], a.quick, not a.no_conv_ab)
    print(json.dumps(dict(info, triton=triton.__version__, python=sys.version.split()[0], out=a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
