"""python -m bench.gpu_profile: where the fast learner's meta-update spends its device time, beside what
bench.trace predicts for it (the check of the trace's model that a lent GPU can make in ~30 s).

For each workload (default: Omniglot 20w1s B=8 and mini-ImageNet 5w1s B=2, the learner's default
configuration: op backend auto, conv_impl auto, the fused first block and bn_pool where they run):

1. the captured meta-update (CUDA graph): mean milliseconds per update over --iters replays after a
   warm-up (CUDA events), and its peak memory;
2. one eager meta-update under torch.profiler: every kernel's device time, grouped into categories
   (`CATEGORIES`: our Triton convolutions, the fused block, bn_pool, the CUDA batch norm, LSLR, cuDNN /
   cuBLAS, aten reductions, copies, other aten kernels), with their launch counts; the kernels are the
   captured update's (a graph replays the same kernels without the CPU launch cost); and, from the
   profiler's exported trace, every launch shape (kernel, grid, block) with its count, mean and minimum
   device time, registers, warps per SM and the profiler's occupancy estimate (`launch_groups`): the
   per-call measurements that a per-call correction of the trace needs;
3. bench.trace's prediction for the same workload, grouped the same way (`trace_category`).

Writes PREFIX.json and PREFIX.md (--out PREFIX) with the device, versions, date and command. On a machine
without CUDA it refuses (exit status 2) unless --device cpu is given, which profiles the CPU ops instead
(a smoke test of the plumbing: no graph, no device kernels, no comparison).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime, timezone

__all__ = ["CATEGORIES", "profile_category", "trace_category", "profile_workload", "kernel_launches", "launch_groups",
           "main"]

# (category, regular expression on the profiler's kernel name), first match wins
CATEGORIES = [
    ("triton conv", r"^_conv_(fwd|dgrad|wgrad)_kernel"),
    ("fused block", r"^_(fwd|fwd_stats|gram|bwd|bwd_finish|dbwd_finish|dbwd_dgout)_kernel$"),
    ("bn_pool", r"^_pool_|^_bn_fwd_reduce_kernel$"),
    ("head", r"^_head_(fwd|bwd|dbwd)_kernel$"),
    ("batch norm (cuda/triton)", r"bn_(fwd|bwd|dbwd)|^_bn_"),
    ("lslr", r"lslr"),
    ("cudnn / cublas", r"cudnn|cutlass|xmma|gemm|gemv|implicit_convolve|winograd|fft|conv2d|sm\d+_"),
    ("aten reductions", r"reduce_kernel|Reduce|reduction"),
    ("aten copies / fills", r"copy|Copy|fill|Fill|cat|Cat|index|scatter|gather|memset|Memset|Memcpy|memcpy"),
]


def profile_category(name: str) -> str:
    """The category of a kernel as the profiler names it."""
    for cat, rx in CATEGORIES:
        if re.search(rx, name):
            return cat
    return "aten elementwise / other"


def trace_category(name: str) -> str:
    """The category of a kernel as bench.trace names it (the same categories as `profile_category`)."""
    if name.startswith("triton conv_") and "re-layout" not in name:
        return "triton conv"
    if name.startswith("triton block_"):
        return "fused block"
    if name.startswith("triton bn_pool_"):
        return "bn_pool"
    if name.startswith("triton head_"):
        return "head"
    if re.match(r"^(cuda|triton) bn_", name):
        return "batch norm (cuda/triton)"
    if "lslr" in name:
        return "lslr"
    if name.startswith("cudnn") or name in ("aten.bmm", "aten.baddbmm", "aten.mm", "aten.addmm"):
        return "cudnn / cublas"
    if "split partial sum" in name or name in ("aten.sum", "bias grad reduction", "aten.mean", "aten.amax"):
        return "aten reductions"
    if "re-layout" in name or name in ("aten.copy_", "aten.clone", "aten.cat", "aten.stack", "aten.zeros",
                                       "aten.fill_", "aten.zero_", "aten.gather", "aten._to_copy",
                                       "aten.select_backward", "aten.slice_backward"):
        return "aten copies / fills"
    return "aten elementwise / other"


def _kernel_events(prof):
    """(name, device microseconds, count) per distinct kernel of a torch.profiler run."""
    out = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0.0)
        if not dev_us:
            continue
        dtype = str(getattr(e, "device_type", ""))
        if "CUDA" not in dtype and "cuda" not in dtype:
            continue
        out.append((e.key, float(dev_us), int(e.count)))
    return out


# the kernel arguments that the profiler's exported trace (Kineto's chrome-trace JSON) records per launch
LAUNCH_ARGS = (("grid", "grid"), ("block", "block"), ("registers per thread", "registers"),
               ("shared memory", "shared_bytes"), ("blocks per SM", "blocks_per_sm"),
               ("warps per SM", "warps_per_sm"), ("est. achieved occupancy %", "est_occupancy_pct"))


def kernel_launches(trace: dict) -> list:
    """Every device kernel launch of an exported profiler trace (`prof.export_chrome_trace`), in launch
    order: {"name", "us" (device duration), and the launch arguments of `LAUNCH_ARGS` that the trace
    holds: grid and block as lists, registers per thread, shared memory bytes, blocks and warps per SM
    (averaged over the device's SMs: the grid over the SM count), the profiler's occupancy estimate}.
    Kernel events are the complete ("ph" X) events of category "kernel" (any case)."""
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or str(ev.get("cat", "")).lower() != "kernel":
            continue
        args = ev.get("args") or {}
        rec = {"name": str(ev.get("name", "")), "us": float(ev.get("dur", 0.0) or 0.0)}
        for key, field in LAUNCH_ARGS:
            if key in args:
                rec[field] = list(args[key]) if isinstance(args[key], (list, tuple)) else args[key]
        out.append(rec)
    return out


def launch_groups(launches: list) -> list:
    """The launches grouped by (kernel, grid, block), longest total first: {"name", "grid", "block",
    "programs" (CTAs), "launches", "total_us", "mean_us", "min_us", "max_us", "registers",
    "shared_bytes", "warps_per_sm", "est_occupancy_pct"} (the last four from the group's first launch:
    one compiled kernel per group, up to its specialisations). Per launch shape, this is what a per-call
    correction of bench.trace needs: the convolutions of one layer shape share their grid."""
    groups: dict = {}
    for r in launches:
        key = (r["name"], tuple(r.get("grid") or ()), tuple(r.get("block") or ()))
        g = groups.get(key)
        if g is None:
            grid = r.get("grid") or []
            programs = 1
            for v in grid:
                programs *= int(v)
            g = groups[key] = {"name": r["name"], "grid": list(grid), "block": list(r.get("block") or []),
                               "programs": programs if grid else None, "launches": 0, "total_us": 0.0,
                               "min_us": float("inf"), "max_us": 0.0,
                               **{f: r.get(f) for f in ("registers", "shared_bytes", "warps_per_sm",
                                                        "est_occupancy_pct")}}
        g["launches"] += 1
        g["total_us"] += r["us"]
        g["min_us"] = min(g["min_us"], r["us"])
        g["max_us"] = max(g["max_us"], r["us"])
    out = sorted(groups.values(), key=lambda g: -g["total_us"])
    for g in out:
        g["mean_us"] = g["total_us"] / g["launches"]
    return out


def _exported_launches(prof) -> list:
    """`launch_groups` of a finished torch.profiler run, through its exported trace (a temporary file)."""
    import os
    import tempfile
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return launch_groups(kernel_launches(json.load(f)))
    finally:
        os.unlink(path)


def group(rows, categorize) -> dict:
    """{category: {"ms", "kernels"}} from (name, microseconds, count) rows."""
    cats: dict = {}
    for name, us, n in rows:
        d = cats.setdefault(categorize(name), {"ms": 0.0, "kernels": 0})
        d["ms"] += us / 1e3
        d["kernels"] += n
    return dict(sorted(cats.items(), key=lambda kv: -kv[1]["ms"]))


def _fused_kw(fused: str, conv_impl: str = "auto") -> dict:
    """The learner's config keys for --fused-ops (first_block, bn_pool, head; auto: the learner's own
    choice) and --conv-impl."""
    kw = {} if fused == "auto" else {k: fused for k in ("first_block", "bn_pool", "head")}
    return dict(kw, conv_impl=conv_impl)


def profile_workload(name: str, batch_size: int | None, device: str, iters: int, quick: bool = False,
                     fused: str = "auto", conv_impl: str = "auto") -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mamlpp_fast.fast import MAMLFewShotClassifier

    from . import workloads as W
    w = W.workload_by_name(name, quick=quick)
    if batch_size is not None:
        w = w.with_(batch_size=batch_size)
    dev = torch.device(device)
    batch = W.make_batch(w, dev)
    res: dict = {"workload": w.name, "batch_size": w.batch_size}
    if dev.type == "cuda":
        graph = MAMLFewShotClassifier(W.im_shape(w), dev, W.make_args(w, cuda_graph=True, **_fused_kw(fused, conv_impl)))
        for _ in range(3):
            graph.run_train_iter(batch, 0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.run_train_iter(batch, 0)
        end.record()
        torch.cuda.synchronize()
        res.update(captured_ms=start.elapsed_time(end) / iters,
                   captured_peak_mib=torch.cuda.max_memory_allocated() / 2 ** 20,
                   graph_failed=getattr(graph, "_graph_failed", None),
                   first_block_fused=any(v is not None for v in graph.__dict__.get("_first_block_cache", {}).values()),
                   bn_pool_fused=any(v is not None for v in graph.__dict__.get("_bn_pool_cache", {}).values()))
        del graph
    eager = MAMLFewShotClassifier(W.im_shape(w), dev, W.make_args(w, **_fused_kw(fused, conv_impl)))
    for _ in range(2):  # compiles, conv_impl=auto's timing
        eager.run_train_iter(batch, 0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        eager.run_train_iter(batch, 0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    rows = _kernel_events(prof)
    res["profile_kernels"] = sum(n for _, _, n in rows)
    res["profile_kernel_ms"] = sum(us for _, us, _ in rows) / 1e3
    res["profile_by_category"] = group(rows, profile_category)
    res["profile_top"] = [dict(name=n[:120], ms=us / 1e3, kernels=c)
                          for n, us, c in sorted(rows, key=lambda r: -r[1])[:30]]
    try:  # a failure here must not cost the rest of the profile (device minutes are rare)
        res["launch_groups"] = _exported_launches(prof)
    except Exception as e:  # noqa: BLE001 - reported in the JSON, the profile goes on
        res["launch_groups"], res["launch_groups_error"] = [], f"{type(e).__name__}: {e}"
    res["conv_choices"] = _conv_choices()
    if dev.type == "cpu":
        res["cpu_ops_ms"] = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    from .trace import predict, summarize, trace_meta_update, CEILINGS
    # the trace of what the eager learner ran: each fused op as it decided (the trace's own "auto" is the
    # fused design, which the learner's "auto" on CUDA takes only while AUTO_FUSES_ON_CUDA[op] holds)
    ran = {key: ("fused" if any(v is not None for v in eager.__dict__.get(f"_{key}_cache", {}).values())
                 else "unfused") for key in ("first_block", "bn_pool", "head")}
    res["fused_ops"] = ran
    res["conv_impl"] = conv_impl
    # the trace prices every convolution as conv_impl "triton" unless the learner ran another for all
    t = trace_meta_update(w.name, w.batch_size, "cuda", "triton" if conv_impl == "auto" else conv_impl, True,
                          quick=quick, **ran)
    ceil = ceilings_for(torch.cuda.get_device_name(0) if dev.type == "cuda" else "")
    s = summarize(t, ceil)
    cats: dict = {}
    for k in t.kernels:
        d = cats.setdefault(trace_category(k.name), {"ms": 0.0, "kernels": 0})
        d["ms"] += predict(k, CEILINGS[ceil], False, True)
        d["kernels"] += k.launches
    res["trace"] = dict(kernels=s["kernels"], bytes=s["bytes"], predicted_ms=s["predicted_ms"], ceilings=ceil,
                        prediction=s["prediction"], by_category=cats, **_per_call_prediction(t, ceil))
    if res.get("launch_groups"):
        try:  # each convolution launch shape measured beside its prediction (bench.trace --launches-from)
            from .trace import conv_launch_comparison
            try:  # priced at each loop's FFMA share where the committed table holds the calls, else the ceiling
                effs, priced = _efficiencies(t), "each convolution at its loop's FFMA share x tile use"
            except Exception as e:  # noqa: BLE001 - the table lacks a call: the ceiling, and why
                effs, priced = None, f"at the FMA ceiling ({type(e).__name__}: {str(e)[:120]})"
            res["launch_comparison"] = dict(conv_launch_comparison(t, res["launch_groups"], ceil, effs), priced=priced)
        except Exception as e:  # noqa: BLE001 - reported in the JSON, the profile goes on
            res["launch_comparison_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def warm_workload(name: str, batch_size: int | None, device: str, quick: bool = False, fused: str = "auto",
                  conv_impl: str = "auto") -> float:
    """One eager meta-update and one captured one (CUDA only) of the workload, as profile_workload builds
    them: compiles every Triton kernel they launch (and conv_impl=auto's candidates) into Triton's on-disk
    cache. Returns the seconds it took."""
    import torch

    from mamlpp_fast.fast import MAMLFewShotClassifier

    from . import workloads as W
    t0 = time.perf_counter()
    w = W.workload_by_name(name, quick=quick)
    if batch_size is not None:
        w = w.with_(batch_size=batch_size)
    dev = torch.device(device)
    batch = W.make_batch(w, dev)
    MAMLFewShotClassifier(W.im_shape(w), dev, W.make_args(w, **_fused_kw(fused, conv_impl))).run_train_iter(batch, 0)
    if dev.type == "cuda":
        g = MAMLFewShotClassifier(W.im_shape(w), dev, W.make_args(w, cuda_graph=True, **_fused_kw(fused, conv_impl)))
        for _ in range(2):
            g.run_train_iter(batch, 0)
        torch.cuda.synchronize()
    return time.perf_counter() - t0


_CONV_PASSES = {"first_order": 3, "second_order": 9}  # convolutions' worth of FLOPs per MAML pattern


def conv_efficiency_rows(profile: dict, peak_tflops: float) -> list:
    """Per layer shape and MAML pattern of a profile (its `conv_choices`: conv_impl=auto's own CUDA-graph
    timings of every implementation on the device), the Triton convolutions' share of the fp32 peak.
    FLOPs approximate: 2 N T Co Ci kh kw H W per convolution (stride 1, 'same' padding), times 3
    (first order: forward, data and weight gradient) or 9 (second order, with the double backward); the
    pattern's probe products are in the times too."""
    import re
    rows, seen = [], set()
    for w in profile.get("workloads", []):
        for c in w.get("conv_choices", []):
            if c["key"] in seen:
                continue
            seen.add(c["key"])
            m = re.match(r"\(\((\d+), (\d+), (\d+), (\d+)\), \((\d+), (\d+), (\d+), (\d+), (\d+)\)", c["key"])
            pat = next((p for p in _CONV_PASSES if p in c["key"]), None)
            if m is None or pat is None or not c["ms"].get("triton"):
                continue
            n, tc, h, wd, t, co, ci, kh, kw = map(int, m.groups())
            gflop = 2 * n * t * co * ci * kh * kw * h * wd * _CONV_PASSES[pat] / 1e9
            ms = c["ms"]["triton"]
            best = min(v for v in c["ms"].values() if v)
            rows.append(dict(shape=(n, tc, h, wd), pattern=pat, gflop=gflop, triton_ms=ms,
                             share=gflop / ms / peak_tflops, auto=c["impl"], auto_ms=best))
    return rows


def conv_efficiency_markdown(rows: list) -> str:
    lines = ["| input (N, T*C, H, W) | pattern | GFLOP (approx.) | Triton ms | Triton % of fp32 peak | "
             "auto's choice | its ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['pattern']} | {r['gflop']:.2f} | {r['triton_ms']:.3f} | "
                     f"{r['share']:.0%} | {r['auto']} | {r['auto_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def ceilings_for(device_name: str) -> str:
    """The bench.trace CEILINGS entry measured on the device named `device_name` (an H200's, else the
    H100's: the other measured one)."""
    return "h200" if "H200" in device_name.upper() else "h100"


def _efficiencies(t) -> dict:
    """bench.trace `ffma_efficiencies` of trace `t` from the committed Triton 3.6.0 static-metrics table
    (the device's Triton); raises where the table lacks a call (another Triton's configurations)."""
    import os

    from .trace import ffma_efficiencies
    table = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                         "static_metrics_sm90a_triton3.6.0.json")
    return ffma_efficiencies(t, table)


def _per_call_prediction(t, ceil: str = "h100") -> dict:
    """The trace's prediction with each convolution at its strict-fp32 loop's FFMA share times its tile
    use (`_efficiencies`), or why there is none (another Triton's configurations, shapes the table
    lacks)."""
    from .trace import summarize
    try:
        return dict(predicted_ms_per_call=summarize(t, ceil, efficiencies=_efficiencies(t))["predicted_ms"])
    except Exception as e:  # noqa: BLE001 - MamlppError (a call the table lacks) or no triton: reported
        return dict(predicted_ms_per_call=None, per_call_why=str(e)[:300])


def _conv_choices():
    """What conv_impl=auto chose: [{"key": ..., "impl": ..., "ms": {impl: ms}}] (bench.run reports the same)."""
    try:
        from mamlpp_fast.ops.conv import conv_choices
        return [dict(key=str(k), impl=v[0], ms=v[1]) for k, v in conv_choices().items()]
    except Exception:  # noqa: BLE001 - a tree without the record: nothing to report
        return []


def to_markdown(rep: dict) -> str:
    lines = [f"# Device profile of the fast learner's meta-update ({rep['device']})", "",
             f"Command: `{rep['command']}`; git {rep['git']}; torch {rep['torch']}, triton {rep['triton']}; "
             f"{rep['date']}.", "",
             "Measured: the captured update (CUDA graph, mean of the replays) and one eager update under "
             "torch.profiler (device time per kernel). Predicted: bench.trace, this device's measured ceilings "
             "(an H200's, else an H100's: `trace.ceilings` in the JSON), every "
             "convolution as our Triton kernels (conv_impl=auto may have chosen others: conv_choices in the "
             "JSON).", ""]
    for r in rep["workloads"]:
        lines += [f"## {r['workload']} B={r['batch_size']}", ""]
        if r.get("fused_ops"):
            lines += ["Fused ops the learner ran (and the trace prices): " + ", ".join(
                f"{k} {v}" for k, v in r["fused_ops"].items()) + ".", ""]
        if "captured_ms" in r:
            lines.append(f"Captured update: **{r['captured_ms']:.2f} ms** measured (peak {r['captured_peak_mib']:.0f} MiB; "
                         f"fused block {r['first_block_fused']}, bn_pool {r['bn_pool_fused']}, graph_failed "
                         f"{r['graph_failed']}); trace prediction {r['trace']['predicted_ms']:.2f} ms"
                         + (f" ({r['trace']['predicted_ms_per_call']:.2f} ms with each convolution at its loop's "
                            "FFMA share x tile use)" if r["trace"].get("predicted_ms_per_call") else "")
                         + f", {r['trace']['kernels']:,} kernels.")
        lines += ["", f"Eager update under the profiler: {r['profile_kernels']:,} kernels, "
                      f"{r['profile_kernel_ms']:.2f} ms of device time.", "",
                  "| category | measured ms | kernels | predicted ms | kernels |", "|---|---|---|---|---|"]
        cats = list(dict.fromkeys(list(r["profile_by_category"]) + list(r["trace"]["by_category"])))
        for c in cats:
            m = r["profile_by_category"].get(c, {"ms": 0.0, "kernels": 0})
            p = r["trace"]["by_category"].get(c, {"ms": 0.0, "kernels": 0})
            lines.append(f"| {c} | {m['ms']:.3f} | {m['kernels']:,} | {p['ms']:.3f} | {p['kernels']:,} |")
        lines += ["", "| top kernels | ms | launches |", "|---|---|---|"]
        for t in r["profile_top"][:15]:
            lines.append(f"| `{t['name']}` | {t['ms']:.3f} | {t['kernels']} |")
        if r.get("launch_groups"):
            lines += ["", "Per launch shape (kernel, grid, block; from the profiler's exported trace; occupancy: "
                      "the profiler's estimate from registers, shared memory and the grid):", "",
                      "| kernel | grid | CTAs | threads | launches | mean us | min us | regs | warps/SM | est. occ. % |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for g in r["launch_groups"][:25]:
                threads = 1
                for v in g["block"] or [0]:
                    threads *= int(v)
                lines.append(f"| `{g['name'][:40]}` | {'x'.join(map(str, g['grid']))} | {g['programs']} | {threads} | "
                             f"{g['launches']} | {g['mean_us']:.1f} | {g['min_us']:.1f} | {g['registers']} | "
                             f"{g['warps_per_sm']} | {g['est_occupancy_pct']} |")
        if r.get("launch_comparison"):
            from .trace import launch_comparison_markdown
            lines += ["", launch_comparison_markdown(r["launch_comparison"]).rstrip("\n")]
        elif r.get("launch_comparison_error"):
            lines += ["", f"No per-launch comparison: {r['launch_comparison_error']}"]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """python -m bench.gpu_profile: device time of the fast learner's meta-update by kernel category,
    beside bench.trace's prediction."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=main.__doc__)
    p.add_argument("--workloads", default="omniglot_20w1s,miniimagenet_5w1s")
    p.add_argument("--batch-size", type=int, default=None, help="tasks per meta-update (default: the workload's)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of the plumbing)")
    p.add_argument("--iters", type=int, default=20, help="replays of the captured update timed")
    p.add_argument("--quick", action="store_true", help="the --quick workloads (tiny shapes)")
    p.add_argument("--out", default=None, help="PREFIX: write PREFIX.json and PREFIX.md (after each workload)")
    p.add_argument("--fused-ops", default="auto", choices=("auto", "fused", "unfused"),
                   help="config keys first_block, bn_pool and head of the profiled learner (default auto: the "
                        "learner's choice); the trace beside it prices what the learner ran")
    p.add_argument("--conv-impl", default="auto",
                   help="config key conv_impl of the profiled learner (default auto, the learner's default: "
                        "timed per shape; triton: every convolution on our kernels, as the trace prices them)")
    p.add_argument("--conv-table-from", default=None, metavar="PROFILE_JSON",
                   help="only print the Triton convolutions' share of the fp32 peak per layer and MAML pattern "
                        "from an earlier profile's conv_impl=auto timings (no device needed)")
    p.add_argument("--warm-only", action="store_true",
                   help="only run one eager and one captured meta-update of each workload: fills Triton's "
                        "on-disk kernel cache, so that a later process that times them compiles nothing "
                        "(scripts/gpu_session.sh runs one per workload beside the tests)")
    a = p.parse_args(argv)
    if a.conv_table_from:
        from .trace import CEILINGS
        with open(a.conv_table_from) as f:
            prof = json.load(f)
        ceil = CEILINGS[ceilings_for(prof.get("device", ""))]
        print(f"{a.conv_table_from} ({prof.get('device')}, {prof.get('date')}), fp32 peak "
              f"{ceil['fp32_tflops']} TFLOP/s ({ceil['device']}):\n")
        print(conv_efficiency_markdown(conv_efficiency_rows(prof, ceil["fp32_tflops"])))
        return 0
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    if a.device not in ("cuda", "cpu"):
        print(f"error: --device must be cuda or cpu, got {a.device!r}", file=sys.stderr)
        return 2
    import triton

    import os

    from .run import revision
    rep = dict(device=torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", torch=torch.__version__,
               triton=triton.__version__,
               git=revision(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               command="python -m bench.gpu_profile " + " ".join(argv if argv is not None else sys.argv[1:]),
               workloads=[])
    t0 = time.perf_counter()
    names = [x.strip() for x in a.workloads.split(",") if x.strip()]
    if a.warm_only:
        for name in names:
            try:
                secs = warm_workload(name, a.batch_size, a.device, a.quick, a.fused_ops, a.conv_impl)
            except KeyError as e:
                print(f"error: {e.args[0]}", file=sys.stderr)
                return 2
            print(f"warmed {name}: {secs:.1f} s", flush=True)
        return 0
    md = ""
    for name in names:
        try:
            rep["workloads"].append(profile_workload(name, a.batch_size, a.device, a.iters, a.quick, a.fused_ops,
                                                      a.conv_impl))
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 2
        rep["seconds"] = time.perf_counter() - t0
        md = to_markdown(rep)
        if a.out:  # after each workload: a run stopped by a time limit keeps what it finished
            with open(a.out + ".json", "w") as f:
                json.dump(rep, f, indent=1, default=str)
            with open(a.out + ".md", "w") as f:
                f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
