"""python -m bench.probe_split_sum: the probe behind bench/NOTES.md's choices for the in-kernel split sum of the
weight gradient (no GPU needed; compiled for sm_90a with the installed Triton through bench.static_metrics).

    python -m bench.probe_split_sum keep   # every weight-gradient launch of both paper workloads, strict fp32
                                           # and TF32, with the last program's own partial kept in registers
                                           # as shipped (`wgrad_keeps_own`), never, and always
    python -m bench.probe_split_sum bias   # mini-ImageNet's 48-channel, 4-warp weight-gradient launches with
                                           # the conv bias: the separate sum as shipped, the in-kernel sum
                                           # (`wgrad_sums_split` forced), and the in-kernel sum with smaller
                                           # tiles (8 warps; 64 columns at 4 warps)

Each line: the variant, kernel, precision, first call, registers, spill bytes (stores/loads), FFMA share of
the inner loop.
"""
from __future__ import annotations

import sys


def _wgrad_calls(bias_48: bool = False) -> list:
    from mamlpp_fast.triton import conv as C

    from .static_metrics import SMS, collect_calls
    calls, seen = [], set()
    for c in collect_calls(["omniglot_20w1s", "miniimagenet_5w1s"]):
        if c[0] != "conv_weight_grad" or repr(c) in seen:
            continue
        seen.add(repr(c))
        if bias_48:
            b, co, ci, kh, kw, h, wd, ho, wo = c[2][:9]
            cfg = C.wgrad_block_config(co, ci, kh * kw, c[1][0] * ho * wo, b, SMS)
            if not (len(c) > 3 and c[3] and cfg["NSUB"] == 3 and cfg["num_warps"] == 4):
                continue
        calls.append(c)
    return calls


def _run(name: str, calls: list, tf32: bool, patches: dict) -> None:
    from mamlpp_fast.triton import conv as C

    from .static_metrics import kernel_metrics, triton_tools
    saved = {k: getattr(C, k) for k in patches}
    for k, v in patches.items():
        setattr(C, k, v)
    try:
        for r in kernel_metrics(calls, tf32_variants=tf32, tools=triton_tools()):
            cfg = r["config"]
            print(f"{name}: {r['kernel']} {r['precision']} {r['call']} SPLIT {cfg.get('SPLIT')} NSUB {cfg.get('NSUB')} "
                  f"warps {cfg.get('num_warps')} BLOCK_N {cfg.get('BLOCK_N')} KEEP {cfg.get('KEEP')} "
                  f"SUM_IN {cfg.get('SUM_IN')}: regs {r.get('registers')} spills {r.get('spill_stores')}/"
                  f"{r.get('spill_loads')} ffma {r.get('ffma_share') or 0:.3f}")
    finally:
        for k, v in saved.items():
            setattr(C, k, v)


def keep() -> None:
    calls = _wgrad_calls()
    _run("shipped", calls, True, {})
    _run("never keep", calls, True, {"wgrad_keeps_own": lambda cfg: False})
    _run("always keep", calls, True, {"wgrad_keeps_own": lambda cfg: True})


def bias() -> None:
    from mamlpp_fast.triton import conv as C
    calls = _wgrad_calls(bias_48=True)
    orig = C.wgrad_block_config

    def tiles(**over):
        def cfg(*a, **k):
            d = orig(*a, **k)
            if d["NSUB"] == 3 and d["num_warps"] == 4:
                d.update(over)
            return d
        return cfg

    in_kernel = {"wgrad_sums_split": lambda cfg, with_bias: True}
    _run("shipped (separate sum)", calls, True, {})
    _run("in-kernel sum", calls, True, in_kernel)
    _run("in-kernel sum, 8 warps", calls, True, dict(in_kernel, wgrad_block_config=tiles(num_warps=8)))
    _run("in-kernel sum, BLOCK_N 64", calls, True, dict(in_kernel, wgrad_block_config=tiles(BLOCK_N=64)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["keep"], ["bias"]):
        print("usage: python -m bench.probe_split_sum keep|bias", file=sys.stderr)
        return 2
    (keep if argv[0] == "keep" else bias)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
