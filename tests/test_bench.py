"""Quick CPU checks of the benchmark harness (bench/), its FLOP count and its baselines.

- `python -m bench.run --quick --device cpu --out DIR` writes the JSON and markdown reports with the
  expected fields and positive measured numbers; the time budget skips items and lists them.
- The analytic FLOP count (bench/flops.py) equals torch.utils.flop_counter.FlopCounterMode's count of
  one reference meta-update exactly (tolerance 0: both are integer sums of the same shape formulas),
  for second and first order, with and without MSL, max pooling and strided convolutions.
- The torch.func baseline (and the JAX baseline where jax is installed) computes the reference
  learner's meta-loss and meta-gradient in float64, from the same weights on the same learnable batch:
  this is what makes them fair baselines. Bound: 1e-9 relative, with the denominator floored at 1e-3 of
  the largest gradient norm (conv biases before batch norm have a zero gradient in exact arithmetic,
  docs/NUMERICS.md); rounding differences measured here are ~1e-14.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from _batches import fresh_seed, learnable_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.flops import flops_from_args, measure_flops  # noqa: E402
from bench.workloads import QUICK_MAIN, im_shape, make_args  # noqa: E402
from mamlpp_fast.reference import MAMLFewShotClassifier as Reference  # noqa: E402

FP64_RTOL = 1e-9


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one thread is as fast and far steadier on a shared machine; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_quick_run_writes_reports(tmp_path):
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"bench.run failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    for ext in ("json", "md"):
        assert os.path.isfile(tmp_path / f"latest_cpu_quick.{ext}")
        assert len(glob.glob(str(tmp_path / f"bench_cpu_*_quick.{ext}"))) == 1
    report = json.loads((tmp_path / "latest_cpu_quick.json").read_text())
    meta = report["meta"]
    for key in ("device_name", "torch", "cuda", "triton", "date", "git_revision", "command", "device_type"):
        assert key in meta, key
    assert meta["device_type"] == "cpu" and "--quick" in meta["command"]
    assert report["ceilings"]["fp32"]["tflops"] > 0
    rows = report["results"]
    assert not [r for r in rows if r["status"] == "error"], [r.get("traceback") for r in rows if r["status"] == "error"]
    for learner in ("reference", "torchfunc", "fast"):
        ok = [r for r in rows if r["learner"] == learner and r["section"] == "main" and r["status"] == "ok"]
        assert {r["workload"] for r in ok} == {w.name for w in QUICK_MAIN}, \
            f"{learner}: {[(r['workload'], r['learner'], r['backend'], r['status']) for r in rows]}"
        for r in ok:
            assert r["updates_per_s"] > 0 and r["median_s"] > 0 and r["iters"] >= 1
            assert r["flops"] > 0 and r["achieved_tflops"] > 0 and r["roofline_fp32"] > 0
            assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
            assert np.isfinite(r["last_loss"])
    assert any(r["backend"] == "torch" for r in rows if r["learner"] == "fast" and r["status"] == "ok")
    # the CUDA-graph variant cannot run on a CPU: reported, not failed
    graph = [r for r in rows if r["variant"] == "cuda_graph"]
    assert graph and all(r["status"] == "n/a" and r["reason"] for r in graph)
    assert {r["section"] for r in rows} == {"main", "sweep_batch", "sweep_steps"}
    assert all(r["status"] in ("ok", "n/a") for r in rows if r["learner"] == "jax")
    md = (tmp_path / "latest_cpu_quick.md").read_text()
    assert "| workload | learner | meta-updates/s" in md and "reference" in md and "torchfunc" in md
    assert meta["git_revision"] in md and "python -m bench.run --quick" in md
    assert meta["complete"] is True and "INCOMPLETE" not in md
    # convolution table: every implementation timed at every recorded layer shape of each workload
    from mamlpp_fast.ops.conv import available_conv_impls
    impls = available_conv_impls("cpu")
    tables = report["conv_tables"]
    assert [t["workload"] for t in tables] == [w.name for w in QUICK_MAIN] and all(t["status"] == "ok" for t in tables)
    for t, w in zip(tables, QUICK_MAIN):
        # per inner step: a second-order support pass and a target pass through each of the 4 stages
        assert sum(r["calls_per_update"] for r in t["shapes"]) == 2 * 4 * w.steps
        assert {r["pattern"] for r in t["shapes"]} == {"second_order", "first_order"}
        for r in t["shapes"]:
            assert set(r["ms"]) == set(impls) and all(v > 0 for v in r["ms"].values())
            assert r["fastest"] == min(r["ms"], key=r["ms"].get)
        est = t["estimated_ms_per_update"]
        assert est["per-shape fastest"] <= min(est[k] for k in impls) + 1e-9
    assert "## Convolution implementations" in md
    assert all(r.get("conv_impl") == "auto" for r in rows if r["learner"] == "fast")


def test_partial_report_survives_a_stopped_run(tmp_path, monkeypatch):
    """The report is rewritten after every item: a run stopped from outside leaves what it measured."""
    import bench.run as R
    real, calls = R.measure_torch_item, []

    def stop_after_first(*args, **kw):
        if calls:
            raise KeyboardInterrupt  # stands for the outer time limit
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(R, "measure_torch_item", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        R.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--learners", "reference",
                "--no-sweeps", "--no-ceiling"])
    report = json.loads((tmp_path / "latest_cpu_quick.json").read_text())
    assert report["meta"]["complete"] is False
    assert [r["status"] for r in report["results"]] == ["ok"]
    assert "INCOMPLETE" in (tmp_path / "latest_cpu_quick.md").read_text()


def test_time_budget_skips_and_lists(tmp_path):
    from bench.run import main
    rc = main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--learners", "reference,torchfunc",
               "--no-sweeps", "--no-ceiling", "--time-budget", "1e-9"])
    assert rc == 0
    report = json.loads((tmp_path / "latest_cpu_quick.json").read_text())
    assert report["results"] and all(r["status"] == "skipped" for r in report["results"])
    assert len(report["skipped"]) == len(report["results"])
    assert "Skipped (time budget)" in (tmp_path / "latest_cpu_quick.md").read_text()


def test_first_block_items(tmp_path):
    """--first-blocks: one fast item per value (config keys first_block and bn_pool), labelled, each row
    saying whether the first layer and the later layers' batch norm + pooling ran fused."""
    from bench.run import main
    rc = main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--learners", "fast", "--backends", "torch",
               "--workloads", "quick_omniglot_3w1s", "--first-blocks", "fused,unfused", "--no-sweeps",
               "--no-ceiling", "--no-conv-table"])
    assert rc == 0
    report = json.loads((tmp_path / "latest_cpu_quick.json").read_text())
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert [(r["first_block"], r["first_block_fused"], r["bn_pool_fused"]) for r in ok] == [
        ("fused", True, True), ("unfused", False, False)]
    md = (tmp_path / "latest_cpu_quick.md").read_text()
    assert "first_block=fused" in md and "first_block=unfused" in md
    with pytest.raises(SystemExit):
        main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--first-blocks", "sometimes"])


def test_conv_precision_items(tmp_path):
    """--conv-precisions: the first value applies to every fast main item; each further one adds the
    captured update (what the learner runs on a GPU) with the first conv_impl and first-block values,
    labelled, and reaches the learner as config key conv_precision; unknown values are refused."""
    import torch
    from bench import run as R
    from bench import workloads as W

    a = R.parse_args(["--quick", "--device", "cpu", "--learners", "fast", "--backends", "torch",
                      "--workloads", "quick_omniglot_3w1s", "--first-blocks", "unfused,fused",
                      "--conv-precisions", "auto,tf32x3,tf32", "--no-sweeps"])
    items = R.plan(a, torch.device("cpu"))
    assert [(i["variant"], i["first_block"], i["conv_precision"]) for i in items] == [
        ("eager", "unfused", None), ("eager", "fused", None), ("cuda_graph", "unfused", None),
        ("cuda_graph", "fused", None), ("cuda_graph", "unfused", "tf32x3"), ("cuda_graph", "unfused", "tf32")]
    from mamlpp_fast.ops import set_backend
    w = W.workload_by_name("quick_omniglot_3w1s", True)
    previous = set_backend(None)  # _build_fast sets the process-wide backend, as bench.run's items do
    try:
        _step, _extra, model = R._build_fast(w, torch.device("cpu"), a, "torch", "eager", None, None, "tf32x3")
    finally:
        set_backend(previous)
    assert model.args.conv_precision == "tf32x3"
    rc = R.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--learners", "fast", "--backends", "torch",
                 "--workloads", "quick_omniglot_3w1s", "--conv-precisions", "ieee,tf32x3", "--no-sweeps",
                 "--no-ceiling", "--no-conv-table"])
    assert rc == 0
    report = json.loads((tmp_path / "latest_cpu_quick.json").read_text())
    assert [(r["variant"], r["conv_precision"], r["status"]) for r in report["results"]] == [
        ("eager", "ieee", "ok"), ("cuda_graph", "ieee", "n/a"), ("cuda_graph", "tf32x3", "n/a")]
    assert "conv_precision=ieee" in (tmp_path / "latest_cpu_quick.md").read_text()
    with pytest.raises(SystemExit):
        R.parse_args(["--conv-precisions", "fp16"])


def test_device_calls_benchmark_arguments_parse():
    """The benchmark arguments of the prepared device calls (Makefile gpu-second's BENCH_ARGS,
    scripts/gpu_session.sh's DEFAULT_BENCH_ARGS) are ones bench.run accepts: a call that died in argparse
    would spend its share of the rare device minutes on nothing."""
    import re
    import shlex
    from pathlib import Path

    from bench.run import parse_args
    root = Path(__file__).resolve().parent.parent
    found = []
    for path, pattern in ((root / "Makefile", r'BENCH_ARGS="([^"]*)"'),
                          (root / "scripts" / "gpu_session.sh", r'DEFAULT_BENCH_ARGS="([^"]*)"')):
        text = path.read_text().replace("\\\n", " ")
        for m in re.finditer(pattern, text):
            a = parse_args(shlex.split(m.group(1)))
            found.append((path.name, a))
    assert {name for name, _ in found} == {"Makefile", "gpu_session.sh"}, found
    make = [a for name, a in found if name == "Makefile"]
    assert any(a.conv_precisions[1:] for a in make), "gpu-second times no other conv precision"
    assert any("on" in a.conv_streams for a in make), "gpu-second times no update with conv_streams on"


def test_conv_streams_items():
    """--conv-streams: like --conv-precisions, the first value applies to every fast main item and each
    further one adds the captured update; the item's value reaches the learner as config key
    conv_streams (None: the learner's default); unknown values are refused."""
    import torch
    from bench import run as R
    from bench import workloads as W

    a = R.parse_args(["--quick", "--device", "cpu", "--learners", "fast", "--backends", "torch",
                      "--workloads", "quick_omniglot_3w1s", "--conv-precisions", "auto,tf32x3",
                      "--conv-streams", "default,on,off", "--no-sweeps"])
    items = R.plan(a, torch.device("cpu"))
    assert [(i["variant"], i["conv_precision"], i["conv_streams"]) for i in items] == [
        ("eager", None, None), ("cuda_graph", None, None), ("cuda_graph", "tf32x3", None),
        ("cuda_graph", None, True), ("cuda_graph", None, False)]
    from mamlpp_fast.ops import set_backend
    w = W.workload_by_name("quick_omniglot_3w1s", True)
    previous = set_backend(None)
    try:
        for value in (True, False):
            _step, _extra, model = R._build_fast(w, torch.device("cpu"), a, "torch", "eager", None, None, None, value)
            assert model.args.conv_streams is value
    finally:
        set_backend(previous)
    assert R._learner_label({"learner": "fast", "conv_streams": True}) == "fast conv_streams=on"
    with pytest.raises(SystemExit):
        R.parse_args(["--conv-streams", "maybe"])


FLOP_CASES = [  # (steps, stages, max_pooling, second_order, msl)
    (2, 4, True, True, True),
    (3, 2, True, True, True),
    (2, 3, False, True, True),  # strided convolutions, global average pooling
    (2, 2, True, False, True),  # first order
    (3, 2, True, True, False),  # MSL off (epoch past multi_step_loss_num_epochs)
]


@pytest.mark.parametrize("steps,stages,max_pooling,second_order,msl", FLOP_CASES)
def test_analytic_flops_equal_flop_counter_mode(steps, stages, max_pooling, second_order, msl):
    from mamlpp_fast.config import default_args
    args = default_args(num_classes_per_set=3, batch_size=2, cnn_num_filters=4, num_stages=stages,
                        image_height=16, image_width=16, number_of_training_steps_per_iter=steps,
                        number_of_evaluation_steps_per_iter=steps, num_target_samples=2, max_pooling=max_pooling,
                        second_order=second_order, multi_step_loss_num_epochs=1)
    epoch = 0 if msl else 1
    model = Reference((2, 1, 16, 16), "cpu", args)
    batch = learnable_batch(2, 3, 1, 2, 1, 16, 16, fresh_seed())
    measured = measure_flops(lambda: model.run_train_iter(batch, epoch))
    analytic = flops_from_args(args, epoch=epoch)
    assert measured["total"] == analytic["total"], (measured, analytic)
    assert analytic["minimal"] <= analytic["total"]


def test_analytic_flops_paper_numbers():
    # The FlopCounterMode counts of the original learner; bench/results/flops_crosscheck_*.json
    # holds FlopCounterMode's count of our reference learner at these full sizes (equal to these).
    from bench.workloads import MAIN
    assert flops_from_args(make_args(MAIN[0]))["total"] == 184_860_672_000  # 184.9 GFLOP
    assert flops_from_args(make_args(MAIN[2]))["total"] == 290_139_408_000  # 290.1 GFLOP


def _reference_grads(w, seed):
    args = make_args(w, dtype="float64")
    ref = Reference(im_shape(w), "cpu", args)
    xs, xt, ys, yt = learnable_batch(w.batch_size, w.n_way, w.k_shot, w.n_target, w.channels, w.height, w.width,
                                     seed)
    batch = (torch.as_tensor(xs, dtype=torch.float64), torch.as_tensor(xt, dtype=torch.float64),
             torch.as_tensor(ys), torch.as_tensor(yt))
    losses, _ = ref.forward(batch, 0, True, True, w.steps, True)
    ref.optimizer.zero_grad()
    losses["loss"].backward()
    return args, ref, batch, float(losses["loss"].detach())


def _compare(ours: dict, theirs: dict, seed: int, what: str):
    gmax = max(float(np.linalg.norm(v)) for v in theirs.values())
    worst = ("", 0.0)
    for name, g in theirs.items():
        err = float(np.linalg.norm(ours[name] - g)) / max(float(np.linalg.norm(g)), 1e-3 * gmax)
        if err > worst[1]:
            worst = (name, err)
    assert worst[1] < FP64_RTOL, f"{what}: worst meta-gradient {worst[0]} rel err {worst[1]:.3e} (seed {seed})"


@pytest.mark.parametrize("w", QUICK_MAIN, ids=[w.name for w in QUICK_MAIN])
def test_torchfunc_baseline_matches_reference_float64(w):
    from bench.baseline_torchfunc import TorchFuncMAMLPP, reference_name_map
    seed = fresh_seed()
    args, ref, batch, ref_loss = _reference_grads(w, seed)
    base = TorchFuncMAMLPP(args, "cpu", torch.float64)
    base.load_reference(ref)
    loss = base.loss(batch, 0)
    base.optimizer.zero_grad()
    loss.backward()
    loss = loss.detach()
    assert abs(float(loss) - ref_loss) <= FP64_RTOL * abs(ref_loss), (float(loss), ref_loss, seed)
    ref_params = dict(ref.named_parameters())
    ours = dict(base.named_parameters())
    mapping = reference_name_map(args.num_stages, base.adapted)
    assert set(mapping.values()) == {n for n, p in ref_params.items() if p.requires_grad}
    _compare({n: ours[o].grad.numpy() for o, n in mapping.items()},
             {n: ref_params[n].grad.numpy() for n in mapping.values()}, seed, "torch.func baseline")


@pytest.mark.parametrize("w", QUICK_MAIN, ids=[w.name for w in QUICK_MAIN])
def test_jax_baseline_matches_reference_float64(w):
    from bench import baseline_jax as BJ  # sets XLA_PYTHON_CLIENT_PREALLOCATE before jax loads
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    seed = fresh_seed()
    args, ref, batch, ref_loss = _reference_grads(w, seed)
    state = {n: p.detach().numpy() for n, p in ref.named_parameters()}
    grads = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.grad is not None}
    b = w.batch_size
    jb = (batch[0].numpy().reshape(b, -1, *batch[0].shape[-3:]), batch[2].numpy().reshape(b, -1),
          batch[1].numpy().reshape(b, -1, *batch[1].shape[-3:]), batch[3].numpy().reshape(b, -1))
    with jax.default_device(jax.devices("cpu")[0]):
        params = BJ.params_from_reference(state, w.num_stages)
        msl = np.asarray(BJ.msl_weights(w.steps, w.msl_epochs, 0))
        loss, g = jax.value_and_grad(BJ.meta_loss)(params, jb, msl, w.steps, w.num_stages, "highest")
    assert abs(float(loss) - ref_loss) <= FP64_RTOL * abs(ref_loss), (float(loss), ref_loss, seed)
    ref_tree = BJ.params_from_reference(grads, w.num_stages)
    _compare({f"{k}.{n}": np.asarray(g[k][n]) for k in g for n in g[k]},
             {f"{k}.{n}": ref_tree[k][n] for k in ref_tree for n in ref_tree[k]}, seed, "JAX baseline")


def test_trainer_item_end_to_end_and_projection(tmp_path):
    """`--learners trainer`: the experiment loop end to end beside the learner alone, with the epoch split
    and the projected full runs, at tiny sizes (quick workloads, 2 updates per epoch, 4 validation tasks)."""
    from bench.run import main
    from bench.trainer_bench import PAPER_CONFIGS
    rc = main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--learners", "trainer", "--no-sweeps",
               "--no-ceiling", "--no-conv-table", "--workloads", "quick_omniglot_3w1s", "--trainer-updates", "2",
               "--trainer-eval-tasks", "4", "--trainer-workers", "0,1", "--omniglot-dir", str(tmp_path / "none")])
    assert rc == 0
    report = json.loads((tmp_path / "latest_cpu_quick.json").read_text())
    rows = [r for r in report["results"] if r["learner"] == "trainer"]
    assert [(r["dataset"], r["num_dataprovider_workers"]) for r in rows] == [("synthetic", 0), ("synthetic", 1)]
    for r in rows:
        assert r["status"] == "ok", r.get("traceback")
        assert r["end_to_end_ms_per_update"] > 0 and r["learner_only_ms"] > 0
        assert r["overhead_ms_per_update"] == pytest.approx(r["end_to_end_ms_per_update"] - r["learner_only_ms"])
        assert r["updates_per_s"] == pytest.approx(1e3 / r["end_to_end_ms_per_update"])
        assert len(r["epochs"]) == 2 and all(e["train_s"] > 0 and e["val_s"] > 0 and e["checkpoint_s"] > 0
                                            for e in r["epochs"])
        assert r["epochs"][-1]["val_tasks"] == 4 and r["val_ms_per_task"] > 0
        assert 0 <= r["overhead_in_loop_ms_per_update"] < r["end_to_end_ms_per_update"]
        assert 0 <= r["overhead_in_loop_cpu_ms_per_update"] < r["end_to_end_ms_per_update"]
        # the steady-state part and the once-per-epoch part add up to the epoch's total
        assert 0 <= r["overhead_in_loop_cpu_ms_between_updates"]
        assert (r["overhead_in_loop_cpu_ms_between_updates"] * 2 + r["loop_cpu_ms_once_per_epoch"]
                == pytest.approx(r["overhead_in_loop_cpu_ms_per_update"] * 2))
        assert len(r["epoch_log"]) == 2 and "checkpoint" in r["epoch_log"][0]
    # the reference learner's rates are measured once per workload, for the projection
    assert rows[0]["reference_learner_only_ms"] > 0 and "reference_learner_only_ms" not in rows[1]
    # the quick workload stands for no paper configuration: no projection; the projection itself is
    # checked on the row of a paper workload, with its configuration's numbers
    assert report["projections"] == []
    from bench.trainer_bench import projections
    fake = dict(rows[1], workload="omniglot_20w1s", reference_learner_only_ms=100.0, reference_val_ms_per_task=10.0)
    (p,) = projections([fake])
    cfg = json.loads(open(os.path.join(REPO, "configs", PAPER_CONFIGS["omniglot_20w1s"])).read())
    assert p["meta_updates"] == cfg["total_epochs"] * cfg["total_iter_per_epoch"] == 50_000
    o = p["ours"]
    assert o["train_s"] == pytest.approx(50_000 * fake["end_to_end_ms_per_update"] / 1e3)
    assert o["test_s"] == pytest.approx(5 * 600 * fake["val_ms_per_task"] / 1e3)
    assert o["total_s"] == pytest.approx(o["train_s"] + o["validation_s"] + o["checkpoint_s"] + o["test_s"])
    assert p["reference"]["validation_s"] == pytest.approx(100 * 600 * 10.0 / 1e3)
    md = (tmp_path / "latest_cpu_quick.md").read_text()
    assert "## End to end" in md and "| quick_omniglot_3w1s | synthetic | 1 |" in md
