"""python -m bench.probe_tiles: launch-configuration variants of the Triton convolutions, compiled for sm_90a
without a GPU (through bench.static_metrics), so that a tile change is judged on the compiler's output
before it is made: registers, spill bytes and the strict-fp32 inner loop's SASS mix per variant.

    python -m bench.probe_tiles WORKLOAD OP [--shape N,C,H,W] [--variants JSON] [--tf32 | --tf32x3] [--loops]

WORKLOAD: a name of bench.workloads; OP: conv_forward, conv_data_grad, conv_weight_grad or conv_bn_pool
(the fused first block: each pass's kernel; the custom-op
calls of one meta-update of the fast learner, triton backend and convolutions, as bench.trace records
them); --shape keeps the calls whose input has that shape (e.g. 5,96,10,10); --variants: a JSON list of
dicts whose keys replace those of the shipped launch (default [{}]: the shipped configuration only),
e.g. '[{}, {"num_warps": 2}, {"BLOCK_M": 64}]'; --tf32: the launches TF32 makes (tensor-core
products), --tf32x3 those of config key conv_precision "tf32x3", else strict fp32. The launch
configurations are the installed Triton's: run it with the device's version (3.6) to read what the device
would compile.

Each line: the call, the resulting configuration, the variant, registers, spill bytes (stores), FFMA,
LDS and integer instructions of the hot loop and its FFMA share, and the PTX's TF32 conversions,
wgmma, cp.async and global loads and the shared memory (`ptx_counts`; with a variant {"num_stages": N}
they show whether Triton's pipeliner staged the loads). --loops: instead, every SASS loop of
each launch (a backward branch's body, outer loops included, so a nested loop shows inside its outer
one's range) with its instruction and FFMA counts, and the kernel's spill instructions (STL, LDL).
bench/NOTES.md quotes its output.
"""
from __future__ import annotations

import json
import sys

KERNELS = {"conv_forward": ("_conv_fwd_kernel",), "conv_data_grad": ("_conv_dgrad_kernel",),
           "conv_weight_grad": ("_conv_wgrad_kernel",),
           # the fused first block: the kernels of its forward, backward and double backward passes (not the
           # small finishing sum)
           "conv_bn_pool": ("_fwd_kernel", "_gram_kernel", "_bwd_kernel",
                            "_dbwd_dgout_kernel")}
USAGE = ("usage: python -m bench.probe_tiles WORKLOAD OP [--shape N,C,H,W] [--variants JSON] [--tf32 | --tf32x3] "
         "[--loops]")


def select_calls(workload: str, op: str, shape: tuple | None = None) -> list:
    """The distinct calls of `op` in one meta-update of `workload` (input shape `shape` when given)."""
    from .static_metrics import traced_calls
    return [c for c in traced_calls(workload) if c[0] == op and (shape is None or tuple(c[1]) == shape)]


def probe(calls, op: str, variants: list, tf32=False, loops: bool = False) -> list:
    """One row (dict) per launch of `op`'s kernel in `calls` and variant; tf32: the launches as TF32 (True)
    or tf32x3 ("tf32x3") runs them (`capture_launches`), else strict fp32; loops: the row lists every SASS loop (`loop_rows`)
    instead of the hot loop's mix."""
    from . import static_metrics as sm
    tools = sm.triton_tools()
    rows = []
    for call in calls:
        for fn, args, kwargs in sm.capture_launches(call, tf32=tf32):
            if fn.__name__ not in KERNELS[op]:
                continue
            for var in variants:
                kw = dict(kwargs, **var)
                _, ck = sm.compile_launch(fn, args, kw)
                row = dict(call=sm._call_str(call), kernel=fn.__name__, config=sm._cfg_str(kw), variant=var)
                row.update(sm.ptxas_verbose(tools["ptxas"], ck.asm["ptx"]))
                row.update(ptx_counts(ck.asm["ptx"]), shared=ck.metadata.shared)
                if tools.get("cuobjdump") and loops:
                    row["loops"] = loop_rows(*sm.sass_loops(tools["cuobjdump"], ck.asm["cubin"]))
                elif tools.get("cuobjdump"):
                    row.update(sm.sass_hot_loop(tools["cuobjdump"], ck.asm["cubin"]))
                rows.append(row)
    return rows


def ptx_counts(ptx: str) -> dict:
    """Counts in a kernel's PTX that say how its products are fed: TF32 conversions (`cvt.rna.tf32.f32`;
    none means the tensor cores read the float32 bits as they are), warpgroup products (`wgmma.mma_async`),
    asynchronous copies into shared memory (`cp.async`: the loads Triton's pipeliner staged) and plain
    global loads."""
    import re
    return {"ptx_cvt_tf32": len(re.findall(r"cvt\.rna\.tf32\.f32", ptx)),
            "ptx_wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "ptx_cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "ptx_ld_global": len(re.findall(r"ld\.global", ptx))}


def loop_rows(instrs, loops) -> dict:
    """{"spill_instructions": STL + LDL in the kernel, "loops": [(first, last address, instructions,
    FFMA)]} from `static_metrics.sass_loops`."""
    spills = sum(op.startswith(("STL", "LDL")) for _, op, _ in instrs)
    rows = []
    for lo, hi in loops:
        body = [op for a, op, _ in instrs if lo <= a <= hi]
        rows.append((lo, hi, len(body), sum(op.startswith("FFMA") for op in body)))
    return {"spill_instructions": spills, "loops": rows}


def _parse(argv):
    if len(argv) < 2 or argv[1] not in KERNELS:
        raise ValueError(f"OP must be one of {', '.join(KERNELS)}")
    workload, op, shape, variants, tf32 = argv[0], argv[1], None, [{}], False
    rest = argv[2:]
    while rest:
        if rest[0] in ("--tf32", "--tf32x3"):
            tf32, rest = (True if rest[0] == "--tf32" else "tf32x3"), rest[1:]
            continue
        if rest[0] == "--shape" and len(rest) > 1:
            shape = tuple(int(v) for v in rest[1].split(","))
        elif rest[0] == "--variants" and len(rest) > 1:
            variants = json.loads(rest[1])
            if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
                raise ValueError("--variants must be a JSON list of objects")
        else:
            raise ValueError(f"unknown argument {rest[0]!r}")
        rest = rest[2:]
    return workload, op, shape, variants, tf32


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        loops = "--loops" in argv  # a mode of the output, not of the launches probed
        workload, op, shape, variants, tf32 = _parse([a for a in argv if a != "--loops"])
        from .workloads import workload_by_name
        workload_by_name(workload)
    except (ValueError, KeyError) as e:
        print(f"{USAGE}\nbench.probe_tiles: {e}", file=sys.stderr)
        return 2
    import triton
    print(f"Triton {triton.__version__}, sm_90a, {workload} {op}" + (f" input {shape}" if shape else "")
          + {True: ", TF32", "tf32x3": ", tf32x3"}.get(tf32, ", strict fp32"))
    for r in probe(select_calls(workload, op, shape), op, variants, tf32, loops):
        if loops:
            lp = r.get("loops", {})
            print(f"{r['call']} | {r['kernel']} | {r['config']} | variant {r['variant']} | spill instructions "
                  f"{lp.get('spill_instructions')} | loops " + "; ".join(
                      f"{lo:#x}-{hi:#x}: {n} instr, {f} FFMA" for lo, hi, n, f in lp.get("loops", [])), flush=True)
            continue
        print(f"{r['call']} | {r['kernel']} | {r['config']} | variant {r['variant']} | regs {r.get('registers')} | "
              f"spill {r.get('spill_stores')} B | loop {r.get('instructions')} instr: FFMA {r.get('ffma')} "
              f"HGMMA {r.get('hgmma')} HMMA {r.get('hmma')} LDS {r.get('lds')} int {r.get('int')} | "
              f"FFMA share {r.get('ffma_share', 0):.1%} | PTX cvt.rna.tf32 {r.get('ptx_cvt_tf32')}, wgmma "
              f"{r.get('ptx_wgmma')}, cp.async {r.get('ptx_cp_async')}, ld.global {r.get('ptx_ld_global')}, "
              f"shared {r.get('shared')} B", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
