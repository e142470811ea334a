"""Triton kernels compiled for sm_90a at the learner's shapes (bench.static_metrics, no GPU needed): no
register spills in any shipped configuration, strict fp32 or TF32. The CUDA kernels' spills are kept
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
                     "_lslr_dalpha_kernel", "_fwd_reduce_kernel", "_fwd_apply_kernel", "_reduce_kernel",
                     "_apply_kernel", "_finish_kernel"}  # the last five: the fused first block
    assert {r["precision"] for r in rows if r["kernel"].startswith("_conv")} == {"fp32", "tf32"}
    for r in rows:
        where = f"{r['kernel']} {r['precision']} {r['config']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"spills in {where}: {r}"
        assert 0 < r["registers"] <= 255, where


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
