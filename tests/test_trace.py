"""bench.trace: the kernel accounting of one meta-update agrees with bench.flops' analytic FLOP count,
its JSON has the documented keys, and bad input gives a one-line error (exit status 2).

Tiny shapes (the --quick workloads): each trace is one CPU meta-update of a few tens of milliseconds.
"""
import json
import subprocess
import sys

import pytest

from bench.trace import CEILINGS, main, summarize, trace_meta_update

QUICK = "quick_omniglot_3w1s"


def _non_learner_flops(s):
    """FLOPs of the closed-form running-statistics update (small matmuls, not in the analytic count)."""
    return s["by_kind"].get("running_stats", {}).get("flops", 0)


@pytest.mark.parametrize("workload", ["quick_omniglot_3w1s", "quick_miniimagenet_3w1s"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_flops_equal_analytic_count(workload, backend):
    # Triton convolutions compute exactly the needed work: the analytic "minimal" count. PyTorch's
    # convolution double backward (grouped cuDNN) also computes the first layer's unused data
    # gradient: the analytic "total" (= FlopCounterMode's count). Integer equality.
    tri = summarize(trace_meta_update(workload, None, backend, "triton", True, quick=True))
    assert tri["flops"] - _non_learner_flops(tri) == tri["analytic_flops_minimal"] == tri["conv_linear_flops"]
    grp = summarize(trace_meta_update(workload, None, backend, "grouped", True, quick=True))
    assert grp["flops"] - _non_learner_flops(grp) == grp["analytic_flops_total"] == grp["conv_linear_flops"]
    assert grp["analytic_flops_total"] > grp["analytic_flops_minimal"]


def test_batch_size_scales_convolution_flops():
    one = summarize(trace_meta_update(QUICK, 1, "cuda", "triton", True, quick=True))
    three = summarize(trace_meta_update(QUICK, 3, "cuda", "triton", True, quick=True))
    assert three["conv_flops"] == 3 * one["conv_flops"]
    assert three["batch_size"] == 3 and three["analytic_flops_minimal"] == 3 * one["analytic_flops_minimal"]


def test_backend_kernel_mapping():
    # the same meta-update: both backends run LSLR in multi-tensor launches (per inner step: cuda
    # forward + backward + dalpha, triton the same plus its workspace fill) and each BN forward /
    # backward / double backward as a reduce + apply pair
    res = {b: trace_meta_update(QUICK, None, b, "triton", True, quick=True) for b in ("cuda", "triton")}
    for b, r in res.items():
        names = [k.name for k in r.kernels for _ in range(k.launches)]
        for op in ("fwd", "bwd", "dbwd"):
            assert names.count(f"{b} bn_{op}_reduce") == names.count(f"{b} bn_{op}_apply") > 0
    # the registered ops (torch.ops.mamlpp.*) are wrappers that launch nothing of their own: only the
    # backend functions' kernels are recorded, never the wrapper as a generic kernel beside them
    for r in res.values():
        assert not any(k.name.startswith("aten.") and ("bn_" in k.name or "lslr" in k.name) for k in r.kernels)
        bn_calls = sum(k.launches for k in r.kernels if k.kind == "bn")
        assert bn_calls == sum(k.launches for k in r.kernels if k.name.endswith(("_reduce", "_apply")))
    # the per-step BN rows are split once per outer forward (fast.py `_bn_rows`): no per-use select,
    # whose backward would fill all S rows with zeros and copy one
    for r in res.values():
        assert sum(k.launches for k in r.kernels if k.name == "aten.select_backward") == 0
    lslr = {b: sum(k.launches for k in r.kernels if k.kind == "lslr") for b, r in res.items()}
    steps = res["cuda"].config["workload_detail"]["steps"]
    assert lslr == {"cuda": 3 * steps, "triton": 4 * steps}


def test_prediction_and_json_keys(capsys):
    assert main(["--quick", "--workload", QUICK, "--batch-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("kernels", "bytes", "flops", "predicted_ms"):
        assert key in out
    assert out["kernels"] > 0 and out["bytes"] > 0 and out["flops"] > 0
    assert out["predicted_ms"] > 0 and "PREDICTION" in out["prediction"]
    # the prediction is at least the launch cost of every kernel inside a graph
    assert out["predicted_ms"] >= out["kernels"] * CEILINGS["h100"]["graph_launch_us"] * 1e-3


def test_h200_has_no_prediction(capsys):
    assert main(["--quick", "--workload", QUICK, "--device-ceilings", "h200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["predicted_ms"] is None and "not yet measured" in out["prediction"]


@pytest.mark.parametrize("args, word", [(["--workload", "no_such_workload"], "unknown workload"),
                                        (["--backend", "cpp"], "--backend"),
                                        (["--conv-impl", "fft"], "--conv-impl"),
                                        (["--batch-size", "0"], "--batch-size")])
def test_bad_input_one_line_error(args, word):
    p = subprocess.run([sys.executable, "-m", "bench.trace", "--quick", *args], capture_output=True, text=True)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and word in err[0]
