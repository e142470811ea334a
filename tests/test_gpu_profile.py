"""bench.gpu_profile, the device-time profile for a lent GPU: its kernel categories (the profiler's kernel
names and bench.trace's names fall into the same categories), and its plumbing on the CPU (--device cpu),
and its refusal without CUDA. The device run itself is part of scripts/gpu_session.sh."""
import json

import pytest

from bench.gpu_profile import CATEGORIES, main, profile_category, trace_category


@pytest.mark.parametrize("name,cat", [
    ("_conv_fwd_kernel", "triton conv"), ("_conv_wgrad_kernel", "triton conv"),
    ("_fwd_kernel", "fused block"), ("_fwd_stats_kernel", "fused block"), ("_dbwd_dgout_kernel", "fused block"), ("_bwd_finish_kernel", "fused block"),
    ("_gram_kernel", "fused block"), ("_bwd_kernel", "fused block"), ("_dbwd_finish_kernel", "fused block"),
    ("_pool_bwd_apply_kernel", "bn_pool"), ("_bn_fwd_reduce_kernel", "bn_pool"),
    ("_head_fwd_kernel", "head"), ("_head_dbwd_kernel", "head"),
    ("void bn_dbwd_apply_kernel<float>(float const*, float*)", "batch norm (cuda/triton)"),
    ("_bn_bwd_apply_kernel", "batch norm (cuda/triton)"),
    ("void lslr_fwd_kernel<float>(LslrArgs<float>)", "lslr"), ("_lslr_bwd_kernel", "lslr"),
    ("sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x32", "cudnn / cublas"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float>>>",
     "aten reductions"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 3, 64, 64>",
     "aten copies / fills"),
    ("Memset (Device)", "aten copies / fills"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "aten elementwise / other"),
])
def test_profile_categories(name, cat):
    assert profile_category(name) == cat


def test_trace_names_fall_into_the_profile_categories():
    """Every kernel name of a trace maps to one of the categories the profile uses."""
    from bench.trace import trace_meta_update
    cats = {c for c, _ in CATEGORIES} | {"aten elementwise / other"}
    res = trace_meta_update("quick_omniglot_3w1s", None, "cuda", "triton", True, quick=True)
    got = {trace_category(k.name) for k in res.kernels}
    assert got <= cats, got - cats
    assert {"triton conv", "fused block", "bn_pool", "head", "lslr", "aten reductions"} <= got
    assert trace_category("triton conv_fwd weight re-layout (aten.copy_)") == "aten copies / fills"
    assert trace_category("split partial sum (aten.sum)") == "aten reductions"


def test_cpu_smoke_run_writes_json_and_markdown(tmp_path):
    prefix = str(tmp_path / "prof")
    assert main(["--device", "cpu", "--quick", "--workloads", "quick_omniglot_3w1s", "--out", prefix]) == 0
    rep = json.loads((tmp_path / "prof.json").read_text())
    r = rep["workloads"][0]
    assert r["workload"] == "quick_omniglot_3w1s" and r["trace"]["kernels"] > 0 and r["trace"]["predicted_ms"] > 0
    assert r["profile_kernels"] == 0  # no device kernels on a CPU
    # the per-call pricing needs the table's (Triton 3.6, full-size) configurations: here it says why not
    assert r["trace"]["predicted_ms_per_call"] is None and "has no strict-fp32" in r["trace"]["per_call_why"]
    assert "quick_omniglot_3w1s" in (tmp_path / "prof.md").read_text()
    for key in ("device", "torch", "triton", "git", "date", "command"):
        assert key in rep


def test_refusals(capsys):
    import torch
    if not torch.cuda.is_available():
        assert main(["--workloads", "quick_omniglot_3w1s", "--quick"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["--device", "cpu", "--workloads", "nosuch"]) == 2
    assert "unknown workload" in capsys.readouterr().err


def test_warm_only_runs_the_updates_and_writes_nothing(tmp_path, capsys):
    prefix = str(tmp_path / "prof")
    assert main(["--device", "cpu", "--quick", "--workloads", "quick_omniglot_3w1s", "--warm-only",
                 "--out", prefix]) == 0
    assert "warmed quick_omniglot_3w1s" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_ceilings_refuses_without_cuda(capsys):
    import torch

    from bench.ceilings import main as ceilings_main
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script measures it (scripts/gpu_session.sh runs it)")
    assert ceilings_main([]) == 2
    assert "no" in capsys.readouterr().err


def test_diagnose_fused_refuses_without_a_device_or_the_interpreter(capsys, monkeypatch):
    import torch

    from bench.diagnose_fused import main as diag
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert diag(["--device", "cpu"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert diag([]) == 2
        assert "no" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_the_trace_beside_the_profile_prices_what_the_learner_ran(tmp_path, mode):
    """--fused-ops picks the profiled learner's first_block / bn_pool / head; the trace beside it is traced
    with what the learner decided (on a CPU, auto is unfused; fused runs the PyTorch implementations)."""
    prefix = str(tmp_path / "prof")
    assert main(["--device", "cpu", "--quick", "--workloads", "quick_omniglot_3w1s", "--fused-ops", mode,
                 "--out", prefix]) == 0
    r = json.loads((tmp_path / "prof.json").read_text())["workloads"][0]
    want = "unfused" if mode == "auto" else "fused"
    assert r["fused_ops"] == {"first_block": want, "bn_pool": want, "head": want}
    assert f"first_block {want}" in (tmp_path / "prof.md").read_text()


def test_ceilings_follow_the_device():
    from bench.gpu_profile import ceilings_for
    assert ceilings_for("NVIDIA H200") == "h200" and ceilings_for("NVIDIA H100 80GB HBM3") == "h100"


def test_conv_table_from_a_committed_profile(capsys):
    """--conv-table-from: the Triton convolutions' share of the fp32 peak per layer and pattern, from the
    committed H200 profile's conv_impl=auto timings (no device needed): Omniglot's 14x14 second-order
    pattern is 20.81 GFLOP (9 convolutions of 2 N T Co Ci 9 H W) in 1.086 ms."""
    import os

    from bench.gpu_profile import conv_efficiency_rows
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "results", "gpu_2026-12-04", "call1_profile.json")
    rows = conv_efficiency_rows(json.load(open(path)), 50.74)
    r = next(r for r in rows if r["shape"] == (20, 512, 14, 14) and r["pattern"] == "second_order")
    assert r["gflop"] == pytest.approx(2 * 20 * 8 * 64 * 64 * 9 * 196 * 9 / 1e9)
    assert r["share"] == pytest.approx(r["gflop"] / r["triton_ms"] / 50.74) and 0 < r["share"] < 1
    assert len(rows) == 12 and {r["pattern"] for r in rows} == {"first_order", "second_order"}
    assert main(["--conv-table-from", path]) == 0
    assert "| (20, 512, 14, 14) | second_order | 20.81 | 1.086 | 38% | triton | 1.086 |" in capsys.readouterr().out
