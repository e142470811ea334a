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
    assert r["launch_groups"] == []  # the exported trace was read: it holds no kernel launch on a CPU
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


def _kineto_kernel(name, dur, grid, block, regs, occ, ts):
    """A kernel event as torch.profiler's exported trace (Kineto) writes it: a complete event of category
    "kernel" whose args hold the launch's geometry and the profiler's occupancy estimate."""
    return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": 7, "ts": ts, "dur": dur,
            "args": {"queued": 0, "device": 0, "context": 1, "stream": 7, "correlation": ts,
                     "registers per thread": regs, "shared memory": 24576, "blocks per SM": grid[0] / 132,
                     "warps per SM": grid[0] * block[0] / 32 / 132, "grid": grid, "block": block,
                     "est. achieved occupancy %": occ}}


def test_launch_groups_from_an_exported_trace():
    """kernel_launches reads the kernel events (and only those) of an exported profiler trace with their
    launch arguments; launch_groups groups them by (kernel, grid, block) with counts and times."""
    from bench.gpu_profile import kernel_launches, launch_groups

    trace = {"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 1, "dur": 50.0, "args": {}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cuLaunchKernel", "ts": 2, "dur": 4.0, "args": {}},
        _kineto_kernel("_conv_wgrad_kernel", 90.0, [1, 9, 48], [64, 1, 1], 255, 12, 10),
        _kineto_kernel("_conv_fwd_kernel", 20.0, [6, 1, 48], [64, 1, 1], 246, 12, 20),
        _kineto_kernel("_conv_wgrad_kernel", 110.0, [1, 9, 48], [64, 1, 1], 255, 12, 30),
        _kineto_kernel("_conv_wgrad_kernel", 30.0, [1, 5, 64], [64, 1, 1], 255, 12, 40),
        {"ph": "X", "cat": "Kernel", "name": "old_style", "ts": 50, "dur": 5.0, "args": {"grid": [2, 1, 1]}},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 60, "args": {}},
    ]}
    launches = kernel_launches(trace)
    assert [r["name"] for r in launches] == ["_conv_wgrad_kernel", "_conv_fwd_kernel", "_conv_wgrad_kernel",
                                             "_conv_wgrad_kernel", "old_style"]
    assert launches[0]["grid"] == [1, 9, 48] and launches[0]["registers"] == 255
    assert launches[0]["est_occupancy_pct"] == 12 and launches[0]["us"] == 90.0
    assert "registers" not in launches[4] and launches[4]["grid"] == [2, 1, 1]
    groups = launch_groups(launches)
    first = groups[0]
    assert (first["name"], first["grid"], first["launches"], first["programs"]) == (
        "_conv_wgrad_kernel", [1, 9, 48], 2, 432)
    assert first["total_us"] == 200.0 and first["mean_us"] == 100.0
    assert (first["min_us"], first["max_us"]) == (90.0, 110.0)
    assert [g["total_us"] for g in groups] == sorted((g["total_us"] for g in groups), reverse=True)
    assert sum(g["launches"] for g in groups) == 5 and len(groups) == 4


def test_a_failed_trace_export_does_not_stop_the_profile(tmp_path, monkeypatch):
    """The per-launch table comes from the profiler's exported trace; if exporting or reading it fails,
    the profile still writes everything else and names the failure."""
    import torch.profiler

    def broken(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", broken)
    prefix = str(tmp_path / "prof")
    assert main(["--device", "cpu", "--quick", "--workloads", "quick_omniglot_3w1s", "--out", prefix]) == 0
    r = json.loads((tmp_path / "prof.json").read_text())["workloads"][0]
    assert r["launch_groups"] == [] and r["launch_groups_error"] == "OSError: disk full"
    assert r["trace"]["kernels"] > 0


def test_profile_sets_its_convolution_launches_beside_the_trace(tmp_path, monkeypatch):
    """With a per-launch table, the profile adds `launch_comparison` (bench.trace
    `conv_launch_comparison`): each convolution launch shape it measured beside the trace's prediction
    for the same kernel and grid, in the JSON and the markdown; priced at the ceiling, with the reason,
    where the committed static-metrics table lacks the calls (here: the quick workload)."""
    import bench.gpu_profile as gp
    from bench.trace import conv_launch_predictions, trace_meta_update
    res = trace_meta_update("quick_omniglot_3w1s", None, "cuda", "triton", True, quick=True,
                            first_block="unfused", bn_pool="unfused", head="unfused")
    key, d = sorted(conv_launch_predictions(res, gp.ceilings_for("")).items())[0]  # the profile's CPU ceilings
    mean = 2e3 * d["predicted_ms"] / d["launches"]
    groups = [dict(name=key[0], grid=list(key[1]), block=[128, 1, 1], programs=1, launches=d["launches"],
                   total_us=mean * d["launches"], mean_us=mean, min_us=mean, max_us=mean, registers=200,
                   shared_bytes=0, warps_per_sm=8, est_occupancy_pct=12.5)]
    monkeypatch.setattr(gp, "_exported_launches", lambda prof: groups)
    prefix = str(tmp_path / "prof")
    assert main(["--device", "cpu", "--quick", "--workloads", "quick_omniglot_3w1s", "--fused-ops", "unfused",
                 "--out", prefix]) == 0
    r = json.loads((tmp_path / "prof.json").read_text())["workloads"][0]
    cmp = r["launch_comparison"]
    assert "ceiling" in cmp["priced"] and len(cmp["rows"]) == 1 and cmp["ceilings"] == r["trace"]["ceilings"]
    assert cmp["rows"][0]["kernel"] == key[0] and cmp["rows"][0]["measured_over_predicted"] == pytest.approx(2.0, rel=1e-6)
    assert "measured / predicted" in (tmp_path / "prof.md").read_text()
