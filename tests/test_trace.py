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
    tri = summarize(trace_meta_update(workload, None, backend, "triton", True, quick=True, first_block="unfused"))
    assert tri["flops"] - _non_learner_flops(tri) == tri["analytic_flops_minimal"] == tri["conv_linear_flops"]
    grp = summarize(trace_meta_update(workload, None, backend, "grouped", True, quick=True, first_block="unfused"))
    assert grp["flops"] - _non_learner_flops(grp) == grp["analytic_flops_total"] == grp["conv_linear_flops"]
    assert grp["analytic_flops_total"] > grp["analytic_flops_minimal"]


@pytest.mark.parametrize("workload", ["quick_omniglot_3w1s", "quick_miniimagenet_3w1s"])
def test_fused_first_block_kernels(workload):
    """With the fused first block (the default of the cuda and triton backends) layer 0 launches only the
    block's kernels: per inner step (second order, MSL) the support forward (2), its inner backward (2),
    the outer pass's backward and double backward of it (2 + 3), the target forward (2) and its backward
    (2), and once per image set the Gram kernel and the sum of its partials (the captured update's
    static image buffers are task-major in storage: no copy of the images);
    no batch norm, pooling or full-resolution adds remain there, and it moves fewer bytes than unfused."""
    fused = trace_meta_update(workload, None, "cuda", "triton", True, quick=True)
    unfused = trace_meta_update(workload, None, "cuda", "triton", True, quick=True, first_block="unfused",
                                bn_pool="unfused")
    assert fused.config["first_block"] == "fused" and unfused.config["first_block"] == "unfused"
    steps = fused.config["workload_detail"]["steps"]
    layer0 = [k for k in fused.kernels if k.layer == "conv0"]
    names = [k.name for k in layer0 for _ in range(k.launches)]
    # per step: 2 forward passes (support, target) of 2 kernels, 3 backward calls (the support's inner one,
    # the outer one of each set) of 2, the support's double backward of 3; per image set its Gram kernel
    assert sum(n.startswith("triton block_") for n in names) == 13 * steps + 2
    others = [n for n in names if not n.startswith("triton block_")]
    assert others == ["split partial sum (aten.sum)"] * 2, others  # the Gram kernels' partials
    assert names.count("triton block_fwd") == names.count("triton block_fwd_stats")
    assert names.count("triton block_finish") == names.count("triton block_bwd")  # the double backward's too
    assert names.count("triton block_dbwd_dgout") == steps
    # the image's Gram terms: once per image set (support, target), not per step
    assert names.count("triton block_gram") == 2
    s_f, s_u = summarize(fused), summarize(unfused)
    assert s_f["by_layer"]["conv0"]["bytes"] < s_u["by_layer"]["conv0"]["bytes"] / 4
    assert s_f["bytes"] < s_u["bytes"] and s_f["kernels"] < s_u["kernels"]
    # torch backend: the learner's auto keeps the first layer unfused
    assert trace_meta_update(workload, None, "torch", "triton", True, quick=True).config["first_block"] == "unfused"


@pytest.mark.parametrize("workload", ["quick_omniglot_3w1s", "quick_miniimagenet_3w1s"])
def test_bn_pool_kernels(workload):
    """With bn_pool (the default of the cuda and triton backends) the layers after the first launch no
    pooling kernel, and their batch norm runs as bn_pool's passes, as many as the unfused batch norm's
    (one per forward, backward and double backward), each a reduce + apply pair or, where a column is
    one chunk, one kernel; fewer kernels and bytes overall, the same FLOPs; the torch backend keeps the
    ops unfused."""
    fused = trace_meta_update(workload, None, "cuda", "triton", True, quick=True)
    unfused = trace_meta_update(workload, None, "cuda", "triton", True, quick=True, bn_pool="unfused")
    assert fused.config["bn_pool"] == "fused" and unfused.config["bn_pool"] == "unfused"

    def count(res, pred):
        return sum(k.launches for k in res.kernels if k.layer not in ("conv0", "params", "head+grads")
                   and pred(k.name))
    assert count(fused, lambda n: "max_pool" in n) == 0 < count(unfused, lambda n: "max_pool" in n)
    for op in ("fwd", "bwd", "dbwd"):
        # a pass is a reduce + apply pair, or one kernel where a column is one chunk
        n_two = count(fused, lambda n: n == f"triton bn_pool_{op}_reduce")
        assert n_two == count(fused, lambda n: n == f"triton bn_pool_{op}_apply")
        n_single = count(fused, lambda n: n == f"triton bn_pool_{op}_single")
        assert n_two + n_single == count(unfused, lambda n: n == f"cuda bn_{op}_reduce") > 0
        # shared gamma (the workloads' default): the single-pass backward passes add the tasks' sums in
        # the channel's last program, no kernel of their own
        assert count(fused, lambda n: n.endswith("_params")) == 0
    assert count(fused, lambda n: n.startswith("cuda bn_")) == 0
    s_f, s_u = summarize(fused), summarize(unfused)
    assert s_f["bytes"] < s_u["bytes"] and s_f["kernels"] < s_u["kernels"] and s_f["flops"] == s_u["flops"]
    assert trace_meta_update(workload, None, "torch", "triton", True, quick=True).config["bn_pool"] == "unfused"


def test_head_kernels():
    """With the fused head (the default of the cuda and triton backends) every head pass is one kernel:
    as many forwards and backwards as the unfused head's NLL losses and their backwards, a double
    backward for the second-order support passes, and none of the unfused head's matmuls, log-softmax
    or NLL kernels; fewer kernels overall; the torch backend keeps it unfused."""
    fused = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
    unfused = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True, head="unfused")
    assert fused.config["head"] == "fused" and unfused.config["head"] == "unfused"

    def count(res, pred):
        return sum(k.launches for k in res.kernels if pred(k.name))
    assert count(fused, lambda n: n == "triton head_fwd") == count(unfused, lambda n: n == "aten.nll_loss_forward") > 0
    assert count(fused, lambda n: n == "triton head_bwd") == count(unfused, lambda n: n == "aten.nll_loss_backward")
    assert 0 < count(fused, lambda n: n == "triton head_dbwd") <= count(fused, lambda n: n == "triton head_bwd")
    # (the running-statistics update's batched matmul is no head kernel)
    assert not [k for k in fused.kernels if k.kind != "running_stats"
                and any(w in k.name for w in ("baddbmm", "bmm", "log_softmax", "nll_loss"))]
    assert summarize(fused)["kernels"] < summarize(unfused)["kernels"]
    assert trace_meta_update(QUICK, None, "torch", "triton", True, quick=True).config["head"] == "unfused"


def test_few_program_launches_priced_at_their_share():
    """A launch of P < SMs programs gets P/SMs of the device's rate and bandwidth in the prediction."""
    from bench.trace import CEILINGS, Kernel, predict
    ceil = CEILINGS["h100"]
    full = Kernel(name="k", kind="head", layer="x", bytes=10 ** 8)
    few = Kernel(name="k", kind="head", layer="x", bytes=10 ** 8, programs=ceil["sms"] // 4)
    launch = ceil["graph_launch_us"] * 1e-3
    assert abs((predict(few, ceil, False, True) - launch) - 4 * (predict(full, ceil, False, True) - launch)) < 1e-9


def test_batch_size_scales_convolution_flops():
    one = summarize(trace_meta_update(QUICK, 1, "cuda", "triton", True, quick=True))
    three = summarize(trace_meta_update(QUICK, 3, "cuda", "triton", True, quick=True))
    assert three["conv_flops"] == 3 * one["conv_flops"]
    assert three["batch_size"] == 3 and three["analytic_flops_minimal"] == 3 * one["analytic_flops_minimal"]


def test_backend_kernel_mapping():
    # the same meta-update: both backends run LSLR in multi-tensor launches (per inner step: cuda
    # forward + backward + dalpha, triton the same plus its workspace fill) and each BN forward /
    # backward / double backward as a reduce + apply pair
    res = {b: trace_meta_update(QUICK, None, b, "triton", True, quick=True, bn_pool="unfused")
           for b in ("cuda", "triton")}
    for b, r in res.items():
        names = [k.name for k in r.kernels for _ in range(k.launches)]
        for op in ("fwd", "bwd", "dbwd"):
            assert names.count(f"{b} bn_{op}_reduce") == names.count(f"{b} bn_{op}_apply") > 0
    # the registered ops (torch.ops.mamlpp.*) are wrappers that launch nothing of their own: only the
    # backend functions' kernels are recorded, never the wrapper as a generic kernel beside them
    for r in res.values():
        assert not any(k.name.startswith("aten.") and ("bn_" in k.name or "lslr" in k.name) for k in r.kernels)
        bn_calls = sum(k.launches for k in r.kernels if k.kind == "bn")
        assert bn_calls == sum(k.launches for k in r.kernels if k.name.endswith(("_reduce", "_apply"))
                               and "block_" not in k.name)
    # the per-step BN rows are split once per outer forward (fast.py `_bn_rows`): no per-use select,
    # whose backward would fill all S rows with zeros and copy one
    for r in res.values():
        assert sum(k.launches for k in r.kernels if k.name == "aten.select_backward") == 0
    lslr = {b: sum(k.launches for k in r.kernels if k.kind == "lslr" and "re-layout" not in k.name)
            for b, r in res.items()}
    steps = res["cuda"].config["workload_detail"]["steps"]
    assert lslr == {"cuda": 3 * steps, "triton": 4 * steps}
    # besides: step 0's copy of each shared meta-weight of a Triton convolution into its gradient's layout
    # (the weight gradient's: the forward kernel's weight layout), the compiled backends' only operand copy
    copies = {b: [k.layer for k in r.kernels if k.name == f"{b} lslr theta re-layout (aten.copy_)"]
              for b, r in res.items()}
    assert copies["cuda"] == copies["triton"] and len(copies["cuda"]) == 3  # conv1-3 (conv0: the block's)


def test_fast_weights_need_no_relayout(monkeypatch):
    """The weight gradients are stored in the forward kernel's weight layout and LSLR keeps it, so the
    only weight re-layout copies of a meta-update are step 0's (the expanded meta-weights): one per
    convolution layer on its Triton kernels, forward and data gradient alike under the device's Triton
    3.6 configurations (the data gradient reads the forward's layout there); under >= 3.7's the data
    gradient's own layout is one copy per tensor it reads."""
    from mamlpp_fast.triton import conv
    monkeypatch.setattr(conv, "_TRITON_VERSION", (3, 6))
    r = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
    relaid = [k for k in r.kernels if "weight re-layout" in k.name]
    assert sorted(k.layer for k in relaid for _ in range(k.launches)) == ["conv1", "conv2", "conv3"]
    assert all(k.node == "forward" for k in relaid)
    monkeypatch.setattr(conv, "_TRITON_VERSION", (3, 7))
    r = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
    fwd = [k.layer for k in r.kernels if k.name == "triton conv_fwd weight re-layout (aten.copy_)"]
    assert sorted(fwd) == ["conv1", "conv2", "conv3"]
    assert sum(k.launches for k in r.kernels if k.name == "triton conv_dgrad weight re-layout (aten.copy_)") > 3


def test_prediction_and_json_keys(capsys):
    assert main(["--quick", "--workload", QUICK, "--batch-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("kernels", "bytes", "flops", "predicted_ms"):
        assert key in out
    assert out["kernels"] > 0 and out["bytes"] > 0 and out["flops"] > 0
    assert out["predicted_ms"] > 0 and "PREDICTION" in out["prediction"]
    # the prediction is at least the launch cost of every kernel inside a graph, at the default (H200)
    # ceilings, which the JSON names
    assert out["ceilings"] == "h200"
    assert out["predicted_ms"] >= out["kernels"] * CEILINGS["h200"]["graph_launch_us"] * 1e-3


def test_triton_configs_recorded_and_restored(capsys):
    """--triton-configs X.Y traces with that version's convolution launch configurations, says so in the
    JSON, and leaves the package's own version in place afterwards."""
    from mamlpp_fast.triton import conv
    installed = conv._TRITON_VERSION
    assert main(["--quick", "--workload", QUICK, "--triton-configs", "3.6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["triton_configs"] == "3.6"
    assert conv._TRITON_VERSION == installed
    assert main(["--quick", "--workload", QUICK, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["triton_configs"] == \
        ".".join(map(str, installed))


def test_h200_ceilings_are_measured_and_priced(capsys):
    """The H200 entry holds the numbers bench.ceilings measured (committed JSON): its prediction is
    labelled with that device and differs from the H100's."""
    import os
    measured = json.load(open(os.path.join(os.path.dirname(__file__), "..", "bench", "results", "gpu_2026-12-04",
                                           "call1_ceilings.json")))
    for key in ("fp32_tflops", "tf32_tflops", "bandwidth_tbs", "graph_launch_us", "eager_launch_us"):
        assert abs(CEILINGS["h200"][key] - measured[key]) <= 0.01 * measured[key], key
    outs = []
    for dev in ("h200", "h100"):
        assert main(["--quick", "--workload", QUICK, "--device-ceilings", dev, "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert "H200" in outs[0]["prediction"] and outs[0]["predicted_ms"] > 0
    assert outs[0]["predicted_ms"] != outs[1]["predicted_ms"]


@pytest.mark.parametrize("args, word", [(["--workload", "no_such_workload"], "unknown workload"),
                                        (["--backend", "cpp"], "--backend"),
                                        (["--conv-impl", "fft"], "--conv-impl"),
                                        (["--batch-size", "0"], "--batch-size"),
                                        (["--triton-configs", "3.x"], "--triton-configs")])
def test_bad_input_one_line_error(args, word):
    p = subprocess.run([sys.executable, "-m", "bench.trace", "--quick", *args], capture_output=True, text=True)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and word in err[0]


def test_tf32x3_rate():
    """--tf32x3 (config key conv_precision="tf32x3"): our convolution kernels at a third of the TF32 rate,
    matmuls as --tf32 says; the prediction lies between TF32 and strict fp32."""
    from bench.trace import Kernel, _rate
    ceil = CEILINGS["h100"]
    conv = Kernel(name="triton conv_fwd", kind="conv", layer="conv1", flops=10 ** 9, tf32_ok=True)
    mm = Kernel(name="aten.bmm", kind="matmul", layer="head+grads", flops=10 ** 9, tf32_ok=True)
    assert _rate(conv, ceil, False, 1.0, True) == ceil["tf32_tflops"] / 3 * 1e12
    assert _rate(mm, ceil, False, 1.0, True) == ceil["fp32_tflops"] * 1e12
    assert _rate(mm, ceil, True, 1.0, True) == ceil["tf32_tflops"] * 1e12
    res = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
    fp32, tf32, x3 = (summarize(res, "h100", t, 1.0, x)["predicted_ms"] for t, x in
                      ((False, False), (True, False), (False, True)))
    assert tf32 <= x3 <= fp32
    assert main(["--quick", "--workload", QUICK, "--tf32x3", "--json"]) == 0


def test_conv_precision_selects_the_launch_configurations(monkeypatch):
    """The trace records the convolutions under the learner's conv_precision, as run_train_iter sets it
    around the captured region: strict fp32 (auto) asks the launch heuristics for the strict tiles,
    tf32 and tf32x3 (--tf32, --tf32x3) for the tensor-core tiles (`tensor_cores`: the mode itself,
    `tensor_core_mode`, whose tiles differ between the two at 48 channels), in every call."""
    from mamlpp_fast.triton import conv as C
    seen_f, seen_w = [], []
    real_f, real_w = C.conv_block_config, C.wgrad_block_config
    monkeypatch.setattr(C, "conv_block_config",
                        lambda *a, **k: (seen_f.append(k.get("tensor_cores")), real_f(*a, **k))[1])
    monkeypatch.setattr(C, "wgrad_block_config",
                        lambda *a, **k: (seen_w.append(k.get("tensor_cores")), real_w(*a, **k))[1])
    for mode, want_f, want_w in (("auto", False, False), ("tf32x3", "tf32x3", "tf32x3"), ("tf32", "tf32", "tf32")):
        seen_f.clear()
        seen_w.clear()
        res = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True, conv_precision=mode)
        assert seen_f and set(seen_f) == {want_f}, (mode, set(seen_f))
        assert seen_w and set(seen_w) == {want_w}, (mode, set(seen_w))
        assert res.config["conv_precision"] == mode


def test_launches_by_autograd_node():
    """Every kernel is attributed to the autograd node that launched it ("forward" outside backward): the
    per-node counts add up to the total; the backward of the convolution is there; the gradient-accumulation
    adds are counted (none on the default path, some with the unfused batch norm); the report prints the
    table."""
    res = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
    s = summarize(res)
    assert sum(v["kernels"] for v in s["by_node"].values()) == s["kernels"]
    assert s["by_node"]["forward"]["kernels"] > 0 and s["by_node"]["_ConvF"]["kernels"] > 0
    # every gradient read twice is summed by a fan-out node or inside its producer's kernels (ops.fanout):
    # no accumulation add is left on the default path; the unfused batch norm's still has them
    assert s["accumulation_adds"] == 0 and "aten.add" not in s["top_names"]
    un = summarize(trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True, bn_pool="unfused"))
    assert 0 < un["accumulation_adds"] <= un["top_names"]["aten.add"]["kernels"]
    assert all(k.node == "forward" for k in res.kernels if k.kind == "adam")
    from bench.trace import to_markdown
    assert "launched by (autograd node" in to_markdown(s)


def test_epoch_after_msl():
    """--epoch: from the workload's msl_epochs on, MSL is off (the target set after the last step only):
    the FLOPs still equal the analytic count for that epoch, and fewer kernels, bytes and FLOPs remain
    than at epoch 0; the report says which."""
    from bench.trace import to_markdown
    e0 = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True, first_block="unfused")
    msl = e0.config["workload_detail"]["msl_epochs"]
    late = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True, first_block="unfused", epoch=msl)
    s0, s1 = summarize(e0), summarize(late)
    assert s1["flops"] - _non_learner_flops(s1) == s1["analytic_flops_minimal"] < s0["analytic_flops_minimal"]
    assert s1["kernels"] < s0["kernels"] and s1["bytes"] < s0["bytes"]
    assert f"epoch {msl} (MSL off)" in to_markdown(s1) and "MSL" not in to_markdown(s0).splitlines()[0]
    assert main(["--quick", "--workload", QUICK, "--epoch", "-1"]) == 2


def test_split_sums_in_the_kernels(monkeypatch):
    """The convolutions' split partials summed inside the kernels (the default) against
    MAMLPP_CONV_SPLIT_SUM=separate: the separate sum kernels are gone except where the launcher keeps
    them (`wgrad_sums_split`), the same bytes move (the main kernels now read the partials back and
    write the result) less the weight-gradient partials the last programs keep in registers
    (`wgrad_keeps_own`), the same FLOPs run, and the prediction drops."""
    from mamlpp_fast.triton import conv
    def trace():
        res = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
        sums = sum(k.launches for k in res.kernels if k.name.startswith("split partial sum"))
        return summarize(res), sums

    monkeypatch.setenv("MAMLPP_CONV_SPLIT_SUM", "separate")
    sep, sep_sums = trace()
    monkeypatch.setenv("MAMLPP_CONV_SPLIT_SUM", "kernel")
    ink, ink_sums = trace()
    assert sep_sums > 0 and ink_sums < sep_sums
    assert ink["kernels"] == sep["kernels"] - (sep_sums - ink_sums)
    assert ink["bytes"] <= sep["bytes"] and ink["flops"] == sep["flops"]
    assert ink["predicted_ms"] < sep["predicted_ms"]
    monkeypatch.setattr(conv, "wgrad_keeps_own", lambda cfg: False)
    assert trace()[0]["bytes"] == sep["bytes"]


def test_second_order_data_gradient_terms_in_one_launch():
    """In the outer backward each inner-loop convolution backward (`_ConvGrads`) forms the gradient of
    its gy, F(u, w) + F(x, v) + vb, in one dual forward launch: one per conv layer on the Triton kernels
    (conv1-3; conv0 is the fused block) and inner step, and no activation-sized addition of two terms."""
    r = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
    steps = r.config["workload_detail"]["steps"]
    dual = [k.layer for k in r.kernels if k.name == "triton conv_fwd (dual)" for _ in range(k.launches)]
    assert sorted(dual) == sorted(["conv1", "conv2", "conv3"] * steps)
    assert all(k.node == "_ConvGrads" for k in r.kernels if k.name == "triton conv_fwd (dual)")
    assert not [k for k in r.kernels if k.name == "aten.add" and k.node == "_ConvGrads" and k.layer.startswith("conv")]


def test_parameter_gradients_summed_by_fanout_nodes():
    """The fast weights, BN rows, step-0 meta-parameters and the learning-rate table are read through
    aliases of `fanout` nodes (mamlpp_fast.ops.fanout), so the outer backward adds no parameter-sized
    gradients one by one; on a CUDA device each node's sums are one Triton launch, elsewhere PyTorch's
    multi-tensor additions and stacks."""
    r = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
    steps = r.config["workload_detail"]["steps"]
    adds = [k for k in r.kernels if k.name == "aten.add" and k.node != "forward"]
    param_sized = [(k.node, k.layer, k.bytes) for k in adds
                   if not k.layer.startswith("conv") and k.node != "_StackedRates"]
    assert not param_sized
    assert not [k for k in adds if k.node == "_StackedRates"]
    # on a CUDA device every fan-out node sums with one Triton launch (mamlpp_fast/triton/fanout.py):
    # the fast weights' nodes (one per step but the last, and step 0's two) and the learning-rate table's
    fan = [k for k in r.kernels if k.node == "_Fanout"]
    assert {k.name for k in fan} == {"triton fanout_sum"} and sum(k.launches for k in fan) <= steps + 2
    # the multi-tensor operations left (Adam's step counts, the finiteness norms) take PyTorch's
    # multi-tensor route
    assert not [k.name for k in r.kernels if k.name.endswith("(per tensor)")]
    # step 0's expansion: one launch for every tensor, the weight gradients in the kernels' layout too
    assert not [k for k in r.kernels if k.node == "Expand"]
    assert [(k.name, k.launches) for k in r.kernels if k.node == "_ExpandTasks"] == [("triton expand_sum", 1)]
    assert [(k.name, k.launches) for k in r.kernels if k.node == "_FanoutRows"] == [("triton fanout_sum", 1)]
    # the torch backend (no Triton kernels): PyTorch's additions and stacks
    t = trace_meta_update(QUICK, None, "torch", "grouped", True, quick=True)
    assert not [k for k in t.kernels if k.name.startswith("triton")]
    assert sum(k.launches for k in t.kernels if k.node in ("_Fanout", "_FanoutRows")) > 0


def test_foreach_fast_route_conditions():
    """bench.trace counts a `_foreach_*` operation as PyTorch's multi-tensor launches only where PyTorch
    takes that route: one dtype, dense tensors, equal strides across the lists (size-1 dimensions
    aside); else one launch per tensor."""
    import torch
    from bench.trace import _foreach_fast_route

    a, b = torch.zeros(4, 3), torch.zeros(4, 3)
    t = torch.zeros(3, 4).t()
    assert _foreach_fast_route([[a, a], [b, b]])
    assert _foreach_fast_route([[t], [torch.zeros(3, 4).t()]])  # permuted but dense, equal strides
    assert not _foreach_fast_route([[a], [t]])                  # dense, different strides
    assert not _foreach_fast_route([[a], [torch.zeros(4, 6)[:, :3]]])  # not dense
    assert not _foreach_fast_route([[a, b.double()]])
    assert not _foreach_fast_route([[torch.zeros(3).expand(4, 3)]])
    assert _foreach_fast_route([[torch.zeros(1, 3)], [torch.zeros(3, 3)[:1]]])  # size-1 dim's stride ignored


def test_cpu_stand_ins_share_the_triton_implementations_signature():
    """bench.trace and bench.precision run `triton_unchecked` in place of the triton implementation (no
    device check); it must take every argument `task_conv2d` passes the implementation (a stand-in with
    its own copy of the signature broke when the saved weight alias was added)."""
    import inspect
    from mamlpp_fast.ops import conv

    assert inspect.signature(conv.triton_unchecked) == inspect.signature(conv._triton)


def test_convolutions_priced_at_their_loops_ffma_share(monkeypatch, tmp_path):
    """--conv-efficiency-from: every convolution call of an Omniglot meta-update (Triton 3.6's launch
    configurations, the device's) finds its strict-fp32 kernel in the committed static-metrics table
    (which this also keeps current: a configuration change without a regenerated table fails here),
    gets its loop's FFMA share as its efficiency, and the prediction rises accordingly; a share of 1
    everywhere gives the ceiling's prediction back; a table without a call's configuration is an error
    naming the call. The fused first block's passes with products are priced the same way, each at the
    share of the kernel it launches (the forward's reduction, the backward's apply kernel, the double
    backward's reduce and apply kernels: four kernels, each below a share of 1); the forward's apply
    pass and the backward's reduction compute no product and are priced by their bytes."""
    import os

    from mamlpp_fast.errors import MamlppError
    from mamlpp_fast.triton import conv as tconv
    from bench.trace import CONV_CALLS, efficiency_key, ffma_efficiencies

    table = os.path.join(os.path.dirname(__file__), "..", "bench", "results",
                         "static_metrics_sm90a_triton3.6.0.json")
    monkeypatch.setattr(tconv, "_TRITON_VERSION", (3, 6))
    res = trace_meta_update("omniglot_20w1s", 8, "cuda", "triton", True)
    effs = ffma_efficiencies(res, table)
    calls = {k.call for k in res.kernels if k.call is not None and k.call[0] in CONV_CALLS}
    block = {efficiency_key(k) for k in res.kernels if k.name.startswith("triton block_") and k.flops}
    assert None not in block and len(block) == 5  # 4 passes; the backward with and without gout2
    assert not any(k.flops for k in res.kernels if k.name in ("triton block_fwd_stats", "triton block_finish"))
    assert set(effs) == calls | block and len(calls) >= 9
    assert all(0.3 < e < 1 for e in effs.values()), effs
    rows = {(r["kernel"], r.get("ffma_share")) for r in json.load(open(table))["triton_kernels"]
            if "conv_bn_pool" in r["call"] and r["precision"] == "fp32"}
    assert all(any(e == share for _, share in rows) for key, e in effs.items() if key in block)
    assert len({effs[key] for key in block}) >= 4  # the passes' kernels differ
    base, priced = summarize(res), summarize(res, efficiencies=effs)
    assert priced["conv_efficiency_per_call"] and priced["predicted_ms"] > base["predicted_ms"]
    # the per-call table accounts for the whole difference
    diff = sum(c["per_call_ms"] - c["ceiling_ms"] for c in priced["by_call"])
    assert diff == pytest.approx(priced["predicted_ms"] - base["predicted_ms"])
    assert "by_call" not in base
    assert summarize(res, efficiencies={c: 1.0 for c in effs})["predicted_ms"] == pytest.approx(base["predicted_ms"])
    assert summarize(res, tf32=True, efficiencies=effs)["predicted_ms"] == summarize(res, tf32=True)["predicted_ms"]
    with open(table) as f:
        data = json.load(f)
    kept = data["triton_kernels"]
    data["triton_kernels"] = [r for r in kept if r["kernel"] != "_conv_dgrad_kernel"]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(data))
    with pytest.raises(MamlppError, match="has no strict-fp32 _conv_dgrad_kernel with the configuration of conv_data_grad"):
        ffma_efficiencies(res, str(short))
    data["triton_kernels"] = [r for r in kept if r["kernel"] != "_bwd_kernel"]
    short.write_text(json.dumps(data))
    with pytest.raises(MamlppError, match="has no strict-fp32 _bwd_kernel with the configuration of the fused block"):
        ffma_efficiencies(res, str(short))


def test_default_configuration_and_tensor_core_modes_priced_per_call(monkeypatch):
    """--conv-efficiency-from prices the learner's default configuration on CUDA (every op unfused): the
    first layer's one-step forward, which has no loop, at its whole body's FFMA share. Under conv_precision
    tf32x3 / TF32 the same table's rows of that precision price each convolution call, launched with the
    tensor-core tiles, at `tensor_loop_efficiency` (tensor cycles of the loop's tile over its issue count)
    times its tile use, checked here by hand for one call; the result is for that mode only: a strict
    summary ignores it, as a tf32x3 summary ignores the strict one."""
    import os

    from mamlpp_fast.triton import conv as tconv
    from bench.static_metrics import capture_launches, launch_consts
    from bench.trace import (CONV_CALLS, TF32_FMA_PER_SM_CYCLE, ffma_efficiencies, tensor_loop_efficiency,
                             tile_utilization)

    table = os.path.join(os.path.dirname(__file__), "..", "bench", "results",
                         "static_metrics_sm90a_triton3.6.0.json")
    rows = json.load(open(table))["triton_kernels"]
    monkeypatch.setattr(tconv, "_TRITON_VERSION", (3, 6))
    unfused = dict(first_block="unfused", bn_pool="unfused", head="unfused")
    res = trace_meta_update("omniglot_20w1s", 8, "cuda", "triton", True, **unfused)
    effs = ffma_efficiencies(res, table)
    (first,) = [k for k in effs if k[0] == "conv_forward" and tuple(k[1]) == (20, 8, 28, 28)]
    kw = next(ln for ln in capture_launches(first) if ln[0].__name__ == "_conv_fwd_kernel")[2]
    row = next(r for r in rows if r["precision"] == "fp32" and r["kernel"] == "_conv_fwd_kernel"
               and r["config"] == launch_consts(kw))
    assert effs.mode == "fp32" and kw["SMALL"] and row["loop"] is False
    assert effs[first] == pytest.approx(row["all_ffma"] / row["instructions"] * tile_utilization(first, kw))
    assert summarize(res, efficiencies=effs)["predicted_ms"] > summarize(res)["predicted_ms"]

    for mode in ("tf32x3", "tf32"):
        res_m = trace_meta_update("omniglot_20w1s", 8, "cuda", "triton", True, conv_precision=mode, **unfused)
        em = ffma_efficiencies(res_m, table)
        calls = {k.call for k in res_m.kernels if k.call is not None and k.call[0] in CONV_CALLS}
        assert em.mode == mode and set(em) == calls and all(0 < v <= 1 for v in em.values()), em
        call = next(c for c in calls if c[0] == "conv_forward" and tuple(c[1]) == (20, 512, 14, 14))
        kw = next(ln for ln in capture_launches(call, tf32=mode) if ln[0].__name__ == "_conv_fwd_kernel")[2]
        r = next(r for r in rows if r["precision"] == mode and r["kernel"] == "_conv_fwd_kernel"
                 and r["config"] == launch_consts(kw))
        assert r["hgmma"] > 0  # a tensor-core tile
        macs = kw["BLOCK_M"] * kw["BLOCK_N"] * kw.get("NSUB", 1) * kw["BLOCK_K"] * (3 if mode == "tf32x3" else 1)
        assert tensor_loop_efficiency(kw, r, mode) == min(1.0, macs / TF32_FMA_PER_SM_CYCLE / r["instructions"])
        assert em[call] == pytest.approx(tensor_loop_efficiency(kw, r, mode) * tile_utilization(call, kw))
        flags = dict(tf32=mode == "tf32", tf32x3=mode == "tf32x3")
        priced, ceiling = summarize(res_m, efficiencies=em, **flags), summarize(res_m, **flags)
        assert priced["predicted_ms"] > ceiling["predicted_ms"]
        assert summarize(res_m, efficiencies=effs, **flags)["predicted_ms"] == ceiling["predicted_ms"]
        assert summarize(res, efficiencies=em)["predicted_ms"] == summarize(res)["predicted_ms"]


def test_tf32x3_weight_gradient_priced_by_its_two_loops(monkeypatch):
    """mini-ImageNet's 48-channel tf32x3 weight gradient (the tile formed columns by channels, TRANS, with
    the lanes inside the image in a loop without the tap mask, INSIDE) is priced at its two loops' issue
    counts weighted by the share of lanes each runs: tensor cycles / (f x the unmasked loop's count +
    (1 - f) x the masked one's), times its tile use (no masked channel row: only the columns' padding and
    the chunks' last steps), from the committed Triton 3.6.0 table's `loop_instructions`."""
    import os

    from mamlpp_fast.triton import conv as tconv
    from bench.static_metrics import capture_launches, launch_consts
    from bench.trace import (TF32_FMA_PER_SM_CYCLE, ffma_efficiencies, inside_fraction, tensor_loop_efficiency,
                             tile_utilization, to_markdown)

    table = os.path.join(os.path.dirname(__file__), "..", "bench", "results",
                         "static_metrics_sm90a_triton3.6.0.json")
    rows = json.load(open(table))["triton_kernels"]
    monkeypatch.setattr(tconv, "_TRITON_VERSION", (3, 6))
    res = trace_meta_update("miniimagenet_5w1s", 2, "cuda", "triton", True, conv_precision="tf32x3")
    em = ffma_efficiencies(res, table)
    call = next(c for c in em if c[0] == "conv_weight_grad" and tuple(c[1]) == (75, 96, 42, 42))
    kw = next(ln for ln in capture_launches(call, tf32="tf32x3") if ln[0].__name__ == "_conv_wgrad_kernel")[2]
    assert kw["TRANS"] and kw["INSIDE"] and (kw["BLOCK_M"], kw["NSUB"], kw["BLOCK_N"]) == (16, 3, 128), kw
    r = next(r for r in rows if r["precision"] == "tf32x3" and r["kernel"] == "_conv_wgrad_kernel"
             and r["config"] == launch_consts(kw))
    fewest, most = r["loop_instructions"][0], r["loop_instructions"][-1]
    assert len(r["loop_instructions"]) == 2 and fewest < most and r["instructions"] == fewest, r
    f = inside_fraction(call, kw)
    assert 0.85 < f <= 1600 / 1764 + 1e-12  # 40 x 40 of the 42 x 42 lanes inside, less any partial step
    cycles = kw["BLOCK_M"] * kw["BLOCK_N"] * kw["NSUB"] * kw["BLOCK_K"] * 3 / TF32_FMA_PER_SM_CYCLE
    loop = tensor_loop_efficiency(kw, r, "tf32x3", f)
    assert loop == pytest.approx(min(1.0, cycles / (f * fewest + (1 - f) * most)))
    assert min(1.0, cycles / most) < loop <= min(1.0, cycles / fewest)
    assert tile_utilization(call, kw) == pytest.approx(432 / 512, rel=0.01)  # 48 of 48 channels used
    assert em[call] == pytest.approx(loop * tile_utilization(call, kw))
    # the per-call table of a tf32x3 summary lists the same efficiency (a strict summary lists none of them)
    s = summarize(res, "h200", tf32x3=True, efficiencies=em)
    row = next(c for c in s["by_call"] if c["op"] == "conv_weight_grad" and tuple(c["shape"]) == (75, 96, 42, 42))
    assert s["conv_efficiency_per_call"] and row["efficiency"][0] == pytest.approx(em[call])
    assert row["per_call_ms"] > row["ceiling_ms"] and "tensor pipe" in to_markdown(s)
    assert "by_call" not in summarize(res, "h200", efficiencies=em)


def test_captured_update_copies_no_input_and_fills_no_seed():
    """The captured update reads the images from static buffers already in their task-major storage
    order (fast.py `_static_inputs`), so the forward's `.contiguous()` is a view, and its backward seeds
    are kept per shape (learner_core `ones`): no clone, no ones_like in the captured region."""
    res = trace_meta_update("quick_omniglot_3w1s", None, "cuda", "triton", True, quick=True)
    names = [k.name for k in res.kernels if k.node == "forward"]
    assert "aten.clone" not in names and "aten.ones_like" not in names, names


def test_static_inputs_are_task_major_in_storage():
    import torch

    from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
    from mamlpp_fast.fast import _task_major
    gen = torch.Generator().manual_seed(7)
    for c in (1, 3):
        xs = torch.randn(3, 4, 2, c, 5, 5, generator=gen)
        ys = torch.randint(0, 4, (3, 4, 2), generator=gen)
        buf, lab = Fast._static_inputs([xs, ys])
        assert torch.equal(buf, xs) and torch.equal(lab, ys) and lab.data_ptr() != ys.data_ptr()
        tm = _task_major(buf)
        assert tm.is_contiguous() and tm.data_ptr() == buf.data_ptr()
        assert torch.equal(tm, _task_major(xs).contiguous())
        buf.copy_(xs + 1)  # the host's copy of the next batch keeps the layout
        assert _task_major(buf).is_contiguous() and torch.equal(buf, xs + 1)


def test_weight_gradient_lanes_inside_priced_by_their_loop():
    """A weight-gradient launch that reads the lanes whose every tap is inside the image in a loop without
    the tap mask (INSIDE) is priced at the time-weighted share of its two loops, by the share of lanes
    each runs (whole BLOCK_K steps of inside lanes); any other launch at its hot loop's share."""
    from bench.trace import inside_fraction, loop_efficiency

    call = ("conv_weight_grad", (5, 96, 21, 21), (2, 48, 48, 3, 3, 21, 21, 21, 21, 1, 1))
    kw = dict(BLOCK_K=16, INSIDE=True)
    f = inside_fraction(call, kw)
    assert f == (5 * 19 * 19) // 16 * 16 / (5 * 21 * 21)
    row = {"ffma_share": 0.8, "ffma_loop_shares": [0.8, 0.7]}
    eff = loop_efficiency(call, kw, row)
    assert 0.7 < eff < 0.8 and abs(eff - 1 / (f / 0.8 + (1 - f) / 0.7)) < 1e-12
    assert loop_efficiency(call, dict(BLOCK_K=16), row) == 0.8  # one loop runs every lane
    assert loop_efficiency(call, kw, {"ffma_share": 0.8, "ffma_loop_shares": [0.8]}) == 0.8
    # padding 0: every lane inside; stride 2 with padding 1 at 7x7 -> 4x4 outputs, 2x2 of them inside
    assert inside_fraction(("conv_weight_grad", (2, 6, 9, 9), (2, 3, 3, 3, 3, 9, 9, 7, 7, 1, 0)), kw) == 96 / 98
    assert inside_fraction(("conv_weight_grad", (8, 6, 7, 7), (2, 3, 3, 3, 3, 7, 7, 4, 4, 2, 1)), kw) == 32 / 128
    assert inside_fraction(("conv_forward", (8, 6, 7, 7), (2, 3, 3, 3, 3, 7, 7, 4, 4, 2, 1)), kw) == 0.0


def test_block_passes_add_up_to_the_first_layer(monkeypatch, capsys):
    """bench.block_passes (NOTES' per-pass prices of the fused block): its rows for Omniglot 20w1s B=8
    add up to the first layer's predicted time in the trace's per-call pricing (same configurations, same
    table). Every pass of the block appears, each once per image set. A bad command line is refused with
    the usage line."""
    from bench import block_passes as bp
    from bench.trace import ffma_efficiencies
    from mamlpp_fast.triton import conv as tconv

    rows = bp.block_passes("omniglot_20w1s", 8)
    names = {r[0] for r in rows}
    assert {"triton block_fwd", "triton block_fwd_stats", "triton block_gram", "triton block_bwd",
            "triton block_dbwd_dgout", "triton block_finish"} <= names
    assert len(rows) == len({(r[0], r[1]) for r in rows}) and all(r[3] > 0 for r in rows)
    monkeypatch.setattr(tconv, "_TRITON_VERSION", (3, 6))
    res = trace_meta_update("omniglot_20w1s", 8)
    s = summarize(res, efficiencies=ffma_efficiencies(res, bp.TABLE))
    assert sum(r[3] for r in rows) == pytest.approx(s["by_layer"]["conv0"]["predicted_ms"])
    assert bp.main(["omniglot_20w1s"]) == 2 and "usage" in capsys.readouterr().err


def test_calibration_scales_each_category_by_its_measured_over_predicted(tmp_path, capsys):
    """--calibrate-from: each kernel category's prediction times the profile's measured / predicted for it;
    a category the profile did not run keeps factor 1; a workload the profile lacks gets no number."""
    from bench.gpu_profile import trace_category
    from bench.trace import calibrated_prediction, predict
    res = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
    cats = {}
    for k in res.kernels:
        d = cats.setdefault(trace_category(k.name), {"ms": 0.0, "kernels": 0})
        d["ms"] += predict(k, CEILINGS["h200"], False, True)
        d["kernels"] += k.launches
    first, *rest = sorted(cats)
    factor = {c: (3.0 if c == first else 2.0) for c in rest}  # `first` not profiled: factor 1
    prof = {"device": "test", "date": "today", "workloads": [{
        "workload": QUICK, "batch_size": res.config["batch_size"], "profile_kernel_ms": 1.0, "captured_ms": 1.0,
        "profile_by_category": {c: {"ms": factor[c] * cats[c]["ms"], "kernels": 1} for c in rest},
        "trace": {"ceilings": "h200", "by_category": cats}}]}
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(prof))
    got = calibrated_prediction(res, str(path))
    want = cats[first]["ms"] + sum(factor[c] * cats[c]["ms"] for c in rest)
    assert got["calibrated_ms"] == pytest.approx(want, rel=1e-9) and got["ceilings"] == "h200"
    assert main(["--quick", "--workload", QUICK, "--calibrate-from", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["calibrated_ms"] == pytest.approx(want, rel=1e-9)
    prof["workloads"][0]["batch_size"] += 1
    path.write_text(json.dumps(prof))
    none = calibrated_prediction(res, str(path))
    assert none["calibrated_ms"] is None and "no profile" in none["why"]


def test_longest_chains_follow_the_split_sum_rule(monkeypatch):
    """`longest_chains` lists the launches whose programs wait on dependent steps of little work: a
    convolution's in-kernel split sum counts (SPLIT - 1) x NSUB (never more than the launcher allows,
    `split_chain_in_kernel`), and with the limit lowered to 0 every split launch sums apart, so that no
    convolution chain is left; the head's kernels count their feature steps (Omniglot's 64 features: one
    step per program) and the JSON reports the longest."""
    from bench.trace import summarize, trace_meta_update
    from mamlpp_fast.triton import conv as C

    res = trace_meta_update(QUICK, 2, "cuda", "triton", True, quick=True)
    s = summarize(res)
    chains = s["longest_chains"]
    assert chains and s["max_chain"] == chains[0]["chain"]
    assert [c["chain"] for c in chains] == sorted((c["chain"] for c in chains), reverse=True)
    assert all(c["chain"] <= C.IN_KERNEL_SUM_CHAIN for c in chains if c["name"].startswith("triton conv"))
    assert any(c["name"].startswith("triton conv") for c in chains)
    monkeypatch.setattr(C, "IN_KERNEL_SUM_CHAIN", 0)
    apart = summarize(trace_meta_update(QUICK, 2, "cuda", "triton", True, quick=True))
    assert not any(c["name"].startswith("triton conv") for c in apart["longest_chains"])
    assert apart["kernels"] > s["kernels"]  # the separate sums' launches
    full = trace_meta_update("omniglot_20w1s", 8, "cuda", "triton", True, first_block="unfused",
                             bn_pool="unfused", head="fused")
    heads = {k.name: k.chain for k in full.kernels if k.name.startswith("triton head_")}
    assert heads["triton head_bwd"] == 1 and heads["triton head_dbwd"] == 2  # 64 features in one slice


def test_launch_comparison_sets_each_convolution_launch_shape_beside_its_prediction(tmp_path, capsys, monkeypatch):
    """--launches-from: each convolution launch shape of the trace (the Triton kernel and the grid its
    launcher gives it) is matched with the profile's per-launch group of the same kernel and grid; the
    row's measured / predicted is the measured mean over the predicted mean per launch; shapes only
    one side has are listed, not matched; a profile without per-launch groups is a one-line error."""
    from bench.trace import conv_launch_comparison, conv_launch_predictions
    from mamlpp_fast.triton import conv as C
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    res = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True)
    pred = conv_launch_predictions(res, "h200")
    assert len(pred) >= 3 and all(k[0].startswith("_conv_") and len(k[1]) == 3 for k in pred)
    conv_calls = [k for k in res.kernels if k.call is not None and k.call[0] in
                  ("conv_forward", "conv_data_grad", "conv_weight_grad")]
    assert sum(d["launches"] for d in pred.values()) == sum(k.launches for k in conv_calls)
    keys = sorted(pred)
    # the device ran every shape but the first at 3x (grid given as the profiler does: a list; one shape
    # in two groups with different blocks), and one shape the trace does not have
    groups = []
    for i, key in enumerate(keys[1:]):
        d = pred[key]
        mean = 3e3 * d["predicted_ms"] / d["launches"]
        halves = [d["launches"] // 2, d["launches"] - d["launches"] // 2] if i == 0 and d["launches"] > 1 else [d["launches"]]
        for j, n in enumerate(halves):
            groups.append(dict(name=key[0], grid=list(key[1]), block=[64 * (j + 1), 1, 1], launches=n,
                               total_us=mean * n, mean_us=mean, min_us=mean / 2, max_us=mean, registers=255,
                               warps_per_sm=8))
    groups.append(dict(name="_conv_fwd_kernel", grid=[999, 1, 1], block=[128, 1, 1], launches=2, total_us=10.0,
                       mean_us=5.0, min_us=5.0, max_us=5.0, registers=1, warps_per_sm=1))
    groups.append(dict(name="_bwd_kernel", grid=[1, 1, 1], block=[256, 1, 1], launches=1, total_us=1.0, mean_us=1.0,
                       min_us=1.0, max_us=1.0, registers=1, warps_per_sm=1))
    cmp = conv_launch_comparison(res, groups, "h200")
    assert len(cmp["rows"]) == len(keys) - 1
    for r in cmp["rows"]:
        assert r["measured_over_predicted"] == pytest.approx(3.0, rel=1e-9) and r["registers"] == 255
        assert r["launches_measured"] == r["launches_traced"]
    assert [(u["kernel"], tuple(u["grid"])) for u in cmp["unmatched_traced"]] == [keys[0]]
    assert cmp["unmatched_measured"] == [dict(kernel="_conv_fwd_kernel", grid=[999, 1, 1], launches=2)]
    totals = [r["measured_total_us"] for r in cmp["rows"]]
    assert totals == sorted(totals, reverse=True)
    prof = {"device": "test", "date": "today", "workloads": [{
        "workload": QUICK, "batch_size": res.config["batch_size"], "launch_groups": groups}]}
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(prof))
    assert main(["--quick", "--workload", QUICK, "--triton-configs", "3.6", "--launches-from", str(path)]) == 0
    out = capsys.readouterr().out
    assert "measured / predicted" in out and "3.00x" in out and "measured, not traced" in out
    prof["workloads"][0]["launch_groups"], prof["workloads"][0]["launch_groups_error"] = [], "OSError: no trace"
    path.write_text(json.dumps(prof))
    assert main(["--quick", "--workload", QUICK, "--launches-from", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "launch_groups" in err[0] and "OSError: no trace" in err[0]


def test_resident_warps_per_convolution_launch(monkeypatch, capsys):
    """--occupancy-from: per convolution launch shape of Omniglot 20w1s B=8 (Triton 3.6 configurations,
    the committed 3.6.0 table), the warps its registers allow per SM and the warps its grid supplies
    (programs x num_warps / 132, at most the former), fewest first; the 14x14 weight gradient's two-warp
    grid supplies the 8 warps per SM its registers allow (`split_target`); a table lacking a call is a
    one-line error."""
    import os

    from bench.trace import resident_warps
    from mamlpp_fast.errors import MamlppError
    from mamlpp_fast.triton import conv as tconv
    table = os.path.join(os.path.dirname(__file__), "..", "bench", "results", "static_metrics_sm90a_triton3.6.0.json")
    monkeypatch.setattr(tconv, "_TRITON_VERSION", (3, 6))
    res = trace_meta_update("omniglot_20w1s", 8, "cuda", "triton", True, first_block="unfused", bn_pool="unfused",
                            head="unfused")
    rows = resident_warps(res, table)
    assert len(rows) >= 9 and [r["resident"] for r in rows] == sorted(r["resident"] for r in rows)
    for r in rows:
        assert r["programs"] == r["grid"][0] * r["grid"][1] * r["grid"][2]
        assert r["resident"] == pytest.approx(min(r["by_registers"], r["programs"] * r["num_warps"] / 132))
        assert 0 < r["by_registers"] <= 64 and r["by_registers"] % r["num_warps"] == 0
    conv_calls = [k for k in res.kernels if k.call is not None and k.call[0] in
                  ("conv_forward", "conv_data_grad", "conv_weight_grad")]
    assert sum(r["launches"] for r in rows) == sum(k.launches for k in conv_calls)
    w14 = [r for r in rows if r["kernel"] == "_conv_wgrad_kernel" and r["call"].endswith("(20, 512, 14, 14)")
           and r["grid"][:2] == [1, 9]]
    # 255 registers: 8,160 per warp, allocated as 8,192, so 8 warps of the SM's 65,536 registers
    assert w14 and w14[0]["num_warps"] == 2 and w14[0]["registers"] == 255 and w14[0]["by_registers"] == 8
    assert w14[0]["programs"] * 2 >= tconv.RESIDENT_WARPS * 132 and w14[0]["resident"] == 8
    with open(table) as f:
        data = json.load(f)
    data["triton_kernels"] = [r for r in data["triton_kernels"] if r["kernel"] != "_conv_wgrad_kernel"]
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        cut = os.path.join(d, "cut.json")
        with open(cut, "w") as f:
            json.dump(data, f)
        with pytest.raises(MamlppError, match="has no strict-fp32 _conv_wgrad_kernel"):
            resident_warps(res, cut)


@pytest.mark.parametrize("workload", ["quick_omniglot_3w1s", "quick_miniimagenet_3w1s"])
def test_conv_streams_pairs_a_weight_gradient_with_launches_that_read_weights(workload):
    """Config key conv_streams: the same kernels, bytes and FLOPs; the side stream of every pair runs a
    weight gradient (and its partial sum) only, never a launch that reads or re-lays a weight (which
    `side_by_side` forbids: the data side may make and cache that copy); each pair has a data side;
    `serial_kernels` counts the launches outside pairs plus each pair's longer branch."""
    off = trace_meta_update(workload, None, "cuda", "triton", True, quick=True)
    on = trace_meta_update(workload, None, "cuda", "triton", True, quick=True, conv_streams=True)
    assert [(k.name, k.layer, k.launches, k.bytes, k.flops) for k in on.kernels] == \
        [(k.name, k.layer, k.launches, k.bytes, k.flops) for k in off.kernels]
    assert not any(k.group for k in off.kernels) and summarize(off, "h200").get("side_by_side") is None
    branches = {}
    for k in on.kernels:
        if k.group:
            branches.setdefault(k.group, ([], []))[k.branch].append(k)
    assert branches
    for data, weight in branches.values():
        assert data and weight
        assert weight[0].name == "triton conv_wgrad"
        assert all(k.name in ("triton conv_wgrad", "split partial sum (aten.sum)", "bias grad reduction")
                   for k in weight), [k.name for k in weight]
        assert any(k.name in ("triton conv_dgrad", "triton conv_fwd (dual)", "triton conv_fwd") for k in data)
        assert len({k.layer for k in data + weight}) == 1
    s = summarize(on, "h200")
    sbs = s["side_by_side"]
    total = sum(k.launches for k in on.kernels)
    assert sbs["pairs"] == len(branches)
    assert sbs["beside"] == sum(k.launches for _, w in branches.values() for k in w)
    assert sbs["serial_kernels"] == total - sum(min(sum(k.launches for k in d), sum(k.launches for k in w))
                                                for d, w in branches.values())
    assert sum(v["pairs"] for v in sbs["by_layer"].values()) == sbs["pairs"]
    # the learner's conv layers after the first (the first layer computes no data gradient)
    assert set(sbs["by_layer"]) == {"conv1", "conv2", "conv3"}
    assert s["kernels"] == summarize(off, "h200")["kernels"]


def test_unfused_pooling_adds_no_zero_gradient():
    """The default configuration on CUDA (bn_pool unfused): the pooling's double backward (ops.pool) fills
    no zero tensor and autograd adds none to the pooling input's gradient; what gradient accumulation is
    left in the unfused layers is the batch norm's (its input read by its forward and by the node its
    backward builds) and the convolution input's."""
    r = trace_meta_update(QUICK, None, "cuda", "triton", True, quick=True, first_block="unfused",
                          bn_pool="unfused", head="unfused")
    pool = [k for k in r.kernels if k.kind == "pool"]
    assert {k.name for k in pool} == {"aten.max_pool2d_with_indices", "aten.max_pool2d_with_indices_backward"}
    assert not [k for k in r.kernels if k.name in ("aten.zeros", "aten.zeros_like", "aten.fill_")
                and ("Pool" in k.node or k.node in ("_Scatter", "_Gather", "_MaxPool"))]
    adds = {k.node for k in r.kernels if k.name == "aten.add" and k.node != "forward" and k.layer.startswith("conv")}
    assert adds and not {n for n in adds if "Pool" in n or n in ("_Scatter", "_Gather", "_MaxPool")}, adds
