"""python -m bench.probe_block_tiles: the probe behind bench/NOTES.md's tables of the fused block's tiles
at mini-ImageNet's 48 channels (no GPU needed; compiled for sm_90a with the installed Triton).

    python -m bench.probe_block_tiles tiles   # registers, spills, FFMA share per kernel for BLOCK_C 16 at
                                              # 4 warps, 64 at 8 warps, 64 at 4 warps (configuration patched)
    python -m bench.probe_block_tiles maxnreg # the backward's pass and the double backward's d(gout) pass,
                                              # strict fp32 and TF32, under .maxnreg
                                              # caps none / 200 / 216 / 240 / 255

Both compile the mini-ImageNet target call of the block (75 x 3 x 84 x 84 images per task, 2 tasks, 48
channels) through bench.static_metrics' launch capture.
"""
from __future__ import annotations

import sys

CALL = ("conv_bn_pool", (75, 6, 84, 84), (2, 48, 3, 3, 3), (2, 1, 1, 1e-05, 0.01))


def tiles() -> None:
    from mamlpp_fast.triton import conv_block as cb

    from .static_metrics import kernel_metrics, triton_tools
    orig = cb.block_config
    for bc, warps in ((16, 4), (64, 8), (64, 4)):
        def cfg(*a, bc=bc, warps=warps, **k):
            d = orig(*a, **k)
            d.update(BLOCK_C=bc, CB=-(-a[2] // bc), num_warps=warps, FWD_WARPS=warps, BWD_WARPS=warps)
            return d
        cb.block_config = cfg
        try:
            for r in kernel_metrics([CALL], tf32_variants=False, tools=triton_tools()):
                print(f"BLOCK_C {bc} warps {warps}: {r['kernel']} regs {r.get('registers')} spills "
                      f"{r.get('spill_stores')}/{r.get('spill_loads')} ffma {r.get('ffma_share') or 0:.3f}")
        finally:
            cb.block_config = orig


def maxnreg() -> None:
    from .static_metrics import capture_launches, compile_launch, ptxas_verbose, triton_tools
    tools = triton_tools()
    for tf32 in (False, True):
        for fn, args, kw in capture_launches(CALL, tf32=tf32):
            if fn.__name__ not in ("_bwd_kernel", "_dbwd_dgout_kernel"):
                continue
            kw = {k: v for k, v in kw.items() if k != "maxnreg"}
            for cap in (None, 200, 216, 240, 255):
                k2 = dict(kw, **({"maxnreg": cap} if cap else {}))
                _, ck = compile_launch(fn, args, k2)
                r = ptxas_verbose(tools["ptxas"], ck.asm["ptx"])
                print(f"{fn.__name__} {kw.get('PREC')} maxnreg {cap}: regs {r.get('registers')} spills "
                      f"{r.get('spill_stores')}/{r.get('spill_loads')}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["tiles"], ["maxnreg"]):
        print("usage: python -m bench.probe_block_tiles tiles|maxnreg", file=sys.stderr)
        return 2
    (tiles if argv[0] == "tiles" else maxnreg)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
