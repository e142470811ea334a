"""Triton kernels compiled for sm_90a at the learner's shapes (bench.static_metrics, no GPU needed): no
register spills in any shipped configuration, strict fp32, TF32 or 3xTF32 (tf32x3). The CUDA kernels' spills are kept
at 0 by tests/test_nvcc_compile.py (-Xptxas -warn-spills -Werror).

Uses whatever triton is installed and the ptxas it ships (what it uses on a device); skipped only when
triton or a ptxas is not available. One specialisation per distinct block configuration is compiled
(the integer arguments' divisibility changes neither registers nor spills of these kernels in the
committed table, bench/results/static_metrics_sm90a_triton3.6.0.md).
"""

import pytest

pytestmark = pytest.mark.slow


def _tools():
    try:
        from bench.static_metrics import triton_tools
        return triton_tools()
    except ImportError:
        return {}


TOOLS = _tools()
needs_ptxas = pytest.mark.skipif(not TOOLS.get("ptxas"), reason="triton or its ptxas is not available")


@needs_ptxas
def test_no_spills_in_shipped_configurations():
    from bench.static_metrics import collect_calls, kernel_metrics
    calls = collect_calls(["omniglot_20w1s", "miniimagenet_5w1s"])
    rows = kernel_metrics(calls, tf32_variants=True, tools=TOOLS, sass=False, distinct_configs=True)
    names = {r["kernel"] for r in rows}
    assert names >= {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel", "_bn_fwd_reduce_kernel",
                     "_bn_fwd_apply_kernel", "_bn_bwd_reduce_kernel", "_bn_bwd_apply_kernel",
                     "_bn_dbwd_reduce_kernel", "_bn_dbwd_apply_kernel", "_lslr_fwd_kernel", "_lslr_bwd_kernel",
                     "_lslr_dalpha_kernel", "_fwd_kernel", "_fwd_stats_kernel", "_gram_kernel",
                     "_bwd_kernel", "_bwd_finish_kernel", "_dbwd_finish_kernel",
                     "_dbwd_dgout_kernel",  # these eight: the fused first block
                     "_pool_fwd_apply_kernel", "_pool_bwd_reduce_kernel", "_pool_bwd_apply_kernel",
                     "_pool_dbwd_reduce_kernel", "_pool_dbwd_apply_kernel",  # bn_pool
                     "_head_fwd_kernel", "_head_bwd_kernel", "_head_dbwd_kernel",  # head_loss
                     "_running_stats_kernel", "_sum_uses_kernel", "_accuracy_kernel",
                     "_sum_tasks_kernel"}
    assert {r["precision"] for r in rows if r["kernel"].startswith("_conv")} == {"fp32", "tf32", "tf32x3"}
    assert {r["precision"] for r in rows if r["kernel"] == "_bwd_kernel"} == {"fp32", "tf32", "tf32x3"}  # the block
    for r in rows:
        where = f"{r['kernel']} {r['precision']} {r['config']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"spills in {where}: {r}"
        assert 0 < r["registers"] <= 255, where


@needs_ptxas
def test_fused_kernels_compile_in_float64():
    """The fused ops' kernels (first block, bn_pool, head) compile for sm_90a in float64 with the installed
    Triton. The interpreter never compiles: the block's float64 backward passed every interpreter test
    while Triton (3.6 on the device, 3.7.1 here) could not lower its product ("fp64 don't support
    largeK MMA"), and the first device run failed every float64 test that reached it (2026-12-04).
    float32 is compiled by test_no_spills_in_shipped_configurations."""
    import torch

    from bench.static_metrics import collect_calls, compile_check
    calls = [c for c in collect_calls(["quick_omniglot_3w1s"], quick=True) if c[0] in ("conv_bn_pool", "bn_pool", "head")]
    rows = compile_check(calls, torch.float64)
    assert {r["kernel"] for r in rows} >= {"_gram_kernel", "_fwd_stats_kernel", "_fwd_kernel", "_bwd_kernel",
                                           "_bwd_finish_kernel", "_dbwd_finish_kernel", "_dbwd_dgout_kernel",
                                           "_head_fwd_kernel", "_head_bwd_kernel", "_head_dbwd_kernel"}
    bad = [(r["kernel"], r["call"], r["error"]) for r in rows if not r["ok"]]
    assert not bad, bad


@needs_ptxas
def test_sass_loop_mix_of_a_strict_fp32_convolution():
    # the analysis itself: a strict-fp32 convolution's hot loop is FFMA (no tensor-core instruction),
    # its TF32 variant has no FFMA in the loop and uses HGMMA / HMMA
    from bench.static_metrics import kernel_metrics
    if not TOOLS.get("cuobjdump"):
        pytest.skip("no cuobjdump")
    meta = (8, 64, 64, 3, 3, 14, 14, 14, 14, 1, 1)
    rows = kernel_metrics([("conv_forward", (20, 512, 14, 14), meta, True)], tf32_variants=True, tools=TOOLS)
    fp32 = next(r for r in rows if r["precision"] == "fp32")
    tf32 = next(r for r in rows if r["precision"] == "tf32")
    assert fp32["loop"] and fp32["ffma"] > 0 and fp32["hgmma"] == 0 and fp32["hmma"] == 0
    assert 0 < fp32["ffma_share"] < 1 and fp32["ptx_loop_fma"] > 0
    assert tf32["loop"] and tf32["ffma"] == 0 and tf32["hgmma"] + tf32["hmma"] > 0


@needs_ptxas
def test_weight_gradient_inside_lanes_loop_is_reported(monkeypatch):
    # a weight gradient with INSIDE runs its reduction in two loops of the same FMAs: the lanes inside the
    # image without the tap mask (the better share, reported as the hot loop's) and the others with it
    from bench.static_metrics import kernel_metrics
    from mamlpp_fast.triton import conv as C
    if not TOOLS.get("cuobjdump"):
        pytest.skip("no cuobjdump")
    real = C.wgrad_block_config
    monkeypatch.setattr(C, "wgrad_block_config", lambda *a, **k: dict(real(*a, **k), INSIDE=True))
    meta = (2, 48, 48, 3, 3, 21, 21, 21, 21, 1, 1)
    rows = kernel_metrics([("conv_weight_grad", (5, 96, 21, 21), meta, False)], tf32_variants=False, tools=TOOLS)
    r = next(r for r in rows if r["kernel"] == "_conv_wgrad_kernel")
    assert r["config"]["INSIDE"] and len(r["ffma_loop_shares"]) == 2
    assert r["ffma_loop_shares"][0] == r["ffma_share"] > r["ffma_loop_shares"][1] > 0
    # the two loops' instruction counts, fewest first: the unmasked loop is the hot one reported
    counts = r["loop_instructions"]
    assert len(counts) == 2 and counts[0] == r["instructions"] < counts[1], counts


def test_conv_precision_reaches_the_kernels():
    """Config key conv_precision (LearnerCore.precision): the Triton convolution and fused-block launches
    get the forced input precision for float32 ("ieee", "tf32", "tf32x3"); "auto" follows allow_tf32; the
    setting is restored afterwards. The launches are recorded, not compiled (bench.static_metrics)."""
    pytest.importorskip("triton")
    from bench.static_metrics import capture_launches
    from mamlpp_fast.config import default_args
    from mamlpp_fast.learner_core import LearnerCore
    from mamlpp_fast.triton._device import conv_precision

    calls = [("conv_forward", (20, 512, 14, 14), (8, 64, 64, 3, 3, 14, 14, 14, 14, 1, 1), True),
             ("conv_bn_pool", (20, 8, 28, 28), (8, 64, 1, 3, 3), (8, 1, 1, 1e-05, 0.01))]

    def precs(call, tf32):
        return {kw["PREC"] for _, _, kw in capture_launches(call, tf32) if "PREC" in kw}

    for allow, mode, want in ((False, "auto", "ieee"), (True, "auto", "tf32"), (False, "tf32", "tf32"),
                              (True, "ieee", "ieee"), (False, "tf32x3", "tf32x3")):
        core = LearnerCore.__new__(LearnerCore)  # only what precision() reads
        core.args, core.cudnn_benchmark = default_args(allow_tf32=allow, conv_precision=mode), None
        with core.precision():
            assert conv_precision() == (None if mode == "auto" else mode)
            for call in calls:
                # capture_launches sets torch's allow_tf32 itself, to its tf32 argument
                got = precs(call, allow)
                assert got == {want}, (call[0], allow, mode, got)
        assert conv_precision() is None


def test_probe_block_tiles_usage(capsys):
    from bench.probe_block_tiles import main
    assert main(["nosuch"]) == 2
    assert "usage" in capsys.readouterr().err


def test_probe_split_sum_selects_the_launches_it_is_about(capsys):
    """bench.probe_split_sum's `bias` mode examines mini-ImageNet's 48-channel, 4-warp weight-gradient
    launches with the conv bias, which are exactly those the launcher keeps on the separate split sum
    (`wgrad_sums_split` False); a bad mode is refused with the usage line."""
    from bench.probe_split_sum import _wgrad_calls, main
    from bench.static_metrics import SMS
    from mamlpp_fast.triton import conv as C

    calls = _wgrad_calls(bias_48=True)
    assert calls
    for c in _wgrad_calls():
        b, co, ci, kh, kw, h, wd, ho, wo = c[2][:9]
        cfg = C.wgrad_block_config(co, ci, kh * kw, c[1][0] * ho * wo, b, SMS)
        with_bias = bool(c[3]) if len(c) > 3 else False
        assert (c in calls) == (cfg["SPLIT"] > 1 and with_bias and not C.wgrad_sums_split(cfg, with_bias)), c
    assert main(["nosuch"]) == 2
    assert "usage" in capsys.readouterr().err


def test_probe_tiles_selects_calls_and_refuses_bad_arguments(capsys):
    """bench.probe_tiles picks the op's calls of one meta-update (only those of the given input shape with
    --shape) and refuses a bad op, workload or variant list with its usage line."""
    from bench.probe_tiles import main, select_calls
    calls = select_calls("omniglot_20w1s", "conv_weight_grad")
    shapes = {tuple(c[1]) for c in calls}
    assert (20, 512, 14, 14) in shapes and len(shapes) > 1 and all(c[0] == "conv_weight_grad" for c in calls)
    assert {tuple(c[1]) for c in select_calls("omniglot_20w1s", "conv_weight_grad", (20, 512, 14, 14))} == \
        {(20, 512, 14, 14)}
    from bench.probe_tiles import _parse
    assert _parse(["omniglot_20w1s", "conv_bn_pool", "--tf32", "--shape", "20,8,28,28"]) == (
        "omniglot_20w1s", "conv_bn_pool", (20, 8, 28, 28), [{}], True)
    assert _parse(["omniglot_20w1s", "conv_forward"])[4] is False
    assert _parse(["omniglot_20w1s", "conv_forward", "--tf32x3"])[4] == "tf32x3"
    from bench.probe_tiles import loop_rows
    instrs = [(0, "FFMA", ""), (16, "LDS", ""), (32, "FFMA", ""), (48, "BRA", " 0x0"), (64, "STL", "")]
    assert loop_rows(instrs, [(0, 48)]) == {"spill_instructions": 1, "loops": [(0, 48, 4, 2)]}
    from bench.probe_tiles import ptx_counts
    ptx = ("cvt.rna.tf32.f32 %r1, %r2;\n wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {...};\n"
           "cp.async.cg.shared.global [%r3], [%rd1], 16;\n cp.async.ca.shared.global [%r4], [%rd2], 4;\n"
           "ld.global.v4.b32 {...}, [%rd3];\n cp.async.commit_group;")
    assert ptx_counts(ptx) == {"ptx_cvt_tf32": 1, "ptx_wgmma": 1, "ptx_cp_async": 2, "ptx_ld_global": 1}
    for argv in (["omniglot_20w1s", "conv_nosuch"], ["nosuch", "conv_forward"],
                 ["omniglot_20w1s", "conv_forward", "--variants", '{"num_warps": 2}']):
        assert main(argv) == 2
        assert "usage" in capsys.readouterr().err


def test_committed_device_table_has_no_spills():
    """The committed table of the device's Triton (3.6.0, which tests/test_trace.py keeps current: every
    convolution configuration the launch heuristics choose under 3.6 is in it) records no spill in any
    row. The test above compiles with the installed Triton, whose heuristics may pick other configurations
    (those only Triton < 3.7 gets, e.g. INSIDE and TAP_MAJOR, are checked here)."""
    import json
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "results", "static_metrics_sm90a_triton3.6.0.json")
    with open(path) as f:
        rows = json.load(f)["triton_kernels"]
    assert rows and any(r["config"].get("INSIDE") for r in rows)
    spilled = [(r["kernel"], r["precision"], r["call"], r["config"]) for r in rows
               if r.get("spill_stores") or r.get("spill_loads")]
    assert not spilled, spilled


def test_occupancy_counts_resident_warps_per_sm():
    """sm_90: 65,536 registers per SM allocated per warp in units of 256, 228 KB of shared memory with 1 KB
    reserved per CTA, at most 64 warps and 32 CTAs per SM."""
    from bench.static_metrics import occupancy
    assert occupancy(255, 16768, 2) == 8      # 32 x 256 registers per warp: 8 warps, 4 CTAs of 2
    assert occupancy(127, 32768, 4) == 16     # 16 x 256 per warp: 16 warps; shared memory allows 6 CTAs
    assert occupancy(32, 0, 4) == 64          # the warp limit
    assert occupancy(16, 0, 1) == 32          # the CTA limit
    assert occupancy(64, 100000, 4) == 8      # shared memory: 2 CTAs
    assert occupancy(0, 0, 4) == 0            # no register count known


def test_occupancy_summary_of_a_report():
    from bench.static_metrics import occupancy_summary
    rows = [dict(kernel="_conv_fwd_kernel", precision="fp32", registers=255, shared_bytes=16768, num_warps=2, calls=3),
            dict(kernel="_conv_wgrad_kernel", precision="fp32", registers=127, shared_bytes=32768, num_warps=4, calls=1),
            dict(kernel="_conv_fwd_kernel", precision="tf32", registers=255, shared_bytes=16768, num_warps=2, calls=1),
            dict(kernel="_bwd_kernel", precision="fp32", registers=255, shared_bytes=0, num_warps=8, calls=2),
            dict(kernel="_lslr_fwd_kernel", precision="fp32", registers=32, shared_bytes=0, num_warps=4, calls=1)]
    assert occupancy_summary({"triton_kernels": rows}) == {"block": {8: [1, 2]}, "conv": {8: [1, 3], 16: [1, 1]},
                                                           "other": {64: [1, 1]}}


def test_compare_tables_joins_rows_by_kernel_configuration_and_call(capsys, tmp_path):
    """`--compare OLD NEW`: rows joined on (kernel, precision, configuration, call); a row whose registers or
    loop mix differ is listed with both values, a row only one side has is listed as such."""
    import json

    from bench.static_metrics import compare_tables, main

    def row(kernel, call, regs, instr, **cfg):
        return dict(kernel=kernel, precision="fp32", config=dict(cfg), call=call, registers=regs,
                    spill_stores=0, instructions=instr, ffma=instr // 2)
    old = dict(triton_kernels=[row("_a", "x (1,)", 40, 100, B=1), row("_b", "x (1,)", 50, 200, B=2),
                               row("_c", "x (1,)", 60, 300, B=4)])
    new = dict(triton_kernels=[row("_a", "x (1,)", 40, 100, B=1), row("_b", "x (1,)", 52, 200, B=2),
                               row("_c", "x (1,)", 60, 300, B=8)])
    cmp = compare_tables(old, new)
    assert cmp["same"] == 1 and len(cmp["only_old"]) == 1 and len(cmp["only_new"]) == 1
    (key, diff), = cmp["changed"]
    assert key[0] == "_b" and diff == {"registers": (50, 52)}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps(new))
    assert main(["--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 rows the same, 1 changed, 1 only in the first, 1 only in the second")
    assert "registers 50 -> 52" in out and '"B": 8' in out
