"""Data-parallel meta-training (mamlpp_fast.distributed) on 2 CPU ranks (gloo) equals the
single-process fast learner on the same meta-batches.

Why: splitting the tasks of a meta-batch over processes is only a speed-up if the result is the same
model. After two meta-updates (epochs 0 and 1, so the MSL weights change) in float64 we compare every
parameter after Adam and every BN running statistic (the all-gathered closed-form update) with the
single-process run to ~1e-10 relative, the reported losses, and that both ranks hold bit-identical
models. Conv biases feed batch norm, so their exact gradient (and that of their LSLR rates) is 0 and
what autograd returns is rounding noise that depends on summation order: they are compared with an
absolute tolerance far below one real Adam step (as tests/test_fast_equivalence.py does).

conv_impl is pinned to "grouped": with the CPU default, the first layer (one input channel) runs as
im2col + a batched matmul whose weight gradient is one reduction over (example, task) pairs, so its
order depends on how many tasks the process holds. The conv biases' noise gradients then differ between
a 2-task shard and the 4-task process, Adam turns that noise into ~3e-10 steps of the biases, and those
reach the running means through the batch means (measured: conv biases 2.8e-10 absolute, running means
6e-11 absolute = 1.4e-10 relative, over this test's 1e-10; every other tensor within 1e-13). The
distribution logic is what is tested here; the convolution implementations have their own tests.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mamlpp_fast.config import default_args
from mamlpp_fast.distributed import DistributedMAMLFewShotClassifier, shard_batch
from mamlpp_fast.fast import MAMLFewShotClassifier as Fast

WORLD = 2
B, N, K, T = 4, 3, 2, 2
CFG = dict(cnn_num_filters=4, num_stages=2, image_height=14, image_width=14, batch_size=B, num_classes_per_set=N,
           num_samples_per_class=K, num_target_samples=T, number_of_training_steps_per_iter=2,
           number_of_evaluation_steps_per_iter=2, multi_step_loss_num_epochs=3, dtype="float64", device="cpu",
           meta_learning_rate=0.01, seed=11, conv_impl="grouped")
EPOCHS = (0, 1)


def make_batches():
    """Learnable tasks (class-dependent means), never zeros."""
    rng = np.random.RandomState(5)
    out = []
    for _ in EPOCHS:
        means = rng.rand(B, N, 1, 1, 14, 14) * 2 + 0.5
        xs = (means + 0.3 * rng.randn(B, N, K, 1, 14, 14)).astype(np.float32)
        xt = (means + 0.3 * rng.randn(B, N, T, 1, 14, 14)).astype(np.float32)
        ys = np.tile(np.arange(N)[None, :, None], (B, 1, K)).astype(np.int64)
        yt = np.tile(np.arange(N)[None, :, None], (B, 1, T)).astype(np.int64)
        out.append((xs, xt, ys, yt))
    return out


def _worker(rank, init_file, out_dir, batches):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = DistributedMAMLFewShotClassifier((2, 1, 14, 14), "cpu", default_args(**CFG))
        losses = [model.run_train_iter(batch, epoch)[0] for batch, epoch in zip(batches, EPOCHS)]
        torch.save({"state": model.state_dict(),
                    "loss": [float(l["loss"]) for l in losses], "accuracy": [l["accuracy"] for l in losses]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def is_noise_param(key):
    return key.endswith("conv.bias") or key.endswith("conv-bias")


def rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def test_two_ranks_equal_single_process(tmp_path):
    batches = make_batches()
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), batches), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)

    single = Fast((2, 1, 14, 14), "cpu", default_args(**CFG))
    init = {k: v.clone() for k, v in single.state_dict().items()}
    losses = [single.run_train_iter(batch, epoch)[0] for batch, epoch in zip(batches, EPOCHS)]
    ref = single.state_dict()
    lr = single.optimizer.param_groups[0]["lr"]

    for key in ref:
        assert torch.equal(r0["state"][key], r1["state"][key]), f"{key} differs between ranks"
        got = r0["state"][key]
        if is_noise_param(key):
            assert float((got - ref[key]).abs().max()) < 1e-3 * lr, key
            continue
        assert not torch.equal(ref[key], init[key]) or "running" not in key, f"{key} never moved"
        assert rel(got, ref[key]) < 1e-10, f"{key}: relative difference {rel(got, ref[key]):.3e}"
    # running statistics really were updated (the all-gathered path ran)
    assert any(not torch.equal(ref[k], init[k]) for k in ref if "running_mean" in k)
    for i, l in enumerate(losses):
        assert abs(r0["loss"][i] - float(l["loss"])) < 1e-10 * abs(float(l["loss"]))
        assert r0["loss"][i] == r1["loss"][i]
        assert abs(r0["accuracy"][i] - l["accuracy"]) < 1e-12


def test_shards_are_contiguous_and_batch_must_divide():
    batch = make_batches()[0]
    parts = [shard_batch(batch, r, 2) for r in range(2)]
    for j in range(4):
        assert np.array_equal(np.concatenate([p[j] for p in parts]), batch[j])
    assert parts[1][0].shape[0] == B // 2 and np.array_equal(parts[1][0], batch[0][2:])
    with pytest.raises(ValueError, match=r"batch_size 4 .* not divisible by the world size 3"):
        shard_batch(batch, 0, 3)


SCRIPT = """
import sys
from mamlpp_fast.config import load_args
from mamlpp_fast.distributed import run_distributed_experiment
args = load_args(dict({cfg!r}, experiment_dir=sys.argv[1]))
run_distributed_experiment(args, progress=False)
"""


def test_torchrun_experiment_rank0_writes_and_matches_single_process(tmp_path):
    """End to end under torchrun: the experiment files exist once (rank 0), and the final checkpoint
    matches a single-process run of the same configuration."""
    import subprocess
    import sys

    from mamlpp_fast.config import load_args
    from mamlpp_fast.trainer import run_experiment

    cfg = dict(CFG, dataset_name="synthetic", dataset_path="synthetic", experiment_name="dp",
               synthetic_num_classes=[20, 10, 10], synthetic_images_per_class=6, total_epochs=2,
               total_iter_per_epoch=2, num_evaluation_tasks=4, per_step_bn_statistics=True,
               num_stages=2, conv_padding=True, max_pooling=True)
    base = default_args(**CFG)
    full = {k: getattr(base, k) for k in vars(base)}
    full.update(cfg)
    script = tmp_path / "run_dp.py"
    script.write_text(SCRIPT.format(cfg=full))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                        "--standalone", str(script), str(tmp_path / "dp")], env=env,
                       capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("mamlpp: epoch 2 ->") == 1, "only rank 0 logs"
    run_experiment(load_args(dict(full, experiment_dir=str(tmp_path / "sp"))), progress=False, log=lambda m: None)
    a = torch.load(tmp_path / "dp" / "dp" / "saved_models" / "train_model_2", weights_only=False)["network"]
    b = torch.load(tmp_path / "sp" / "dp" / "saved_models" / "train_model_2", weights_only=False)["network"]
    for key in b:
        if is_noise_param(key):
            assert float((a[key] - b[key]).abs().max()) < 1e-4, key
        else:
            # 1e-7, not 1e-10: over 4 meta-updates the noise-gradient conv biases drift apart by ~1e-12
            # (summation order), and the BN running means (~1e-2 here) include those biases.
            assert rel(a[key], b[key]) < 1e-7, f"{key}: {rel(a[key], b[key]):.3e}"
    assert sorted(os.listdir(tmp_path / "dp" / "dp" / "saved_models")) == \
        ["train_model_1", "train_model_2", "train_model_latest"]


def test_rank_zero_writer_writes_on_rank_zero_only(tmp_path):
    """The trainer's writer of a data-parallel run: rank 0 takes the folder's lock and writes; any other
    rank takes no lock and writes nothing (its builder still computes the same rows and state)."""
    from mamlpp_fast.distributed import RankZeroWriter

    class Model:
        def save_model(self, model_save_dir, state):
            torch.save(state, model_save_dir)

    for rank in (1, 0):
        folder = tmp_path / f"rank{rank}"
        folder.mkdir()
        writer = RankZeroWriter(rank)
        lock = writer.lock(str(folder), "train")
        try:
            assert writer.writes == lock.held == (rank == 0)
            writer.write_text(str(folder / "a.txt"), "text")
            writer.save_model(Model(), str(folder / "ckpt"), {"x": 1})
            if rank == 0:
                writer.copy(str(folder / "ckpt"), str(folder / "ckpt_latest"))
        finally:
            lock.release()
        written = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        assert written == (["a.txt", "ckpt", "ckpt_latest"] if rank == 0 else []), (rank, written)
    assert (tmp_path / "rank0" / "a.txt").read_text() == "text"
    assert torch.load(tmp_path / "rank0" / "ckpt_latest") == {"x": 1}


def test_wrapper_takes_a_learner_with_the_reduction_hook_only(tmp_path):
    """DataParallelLearner wraps a learner (composition): the fast learner, whose running-statistics
    update goes through its core's reduction hook; the reference learner, which updates them inside
    F.batch_norm task by task, is refused by name. In a group of one process the wrapped learner's
    meta-update is the plain learner's, and the wrapper exposes the learner's own attributes."""
    from mamlpp_fast.distributed import DataParallelLearner
    from mamlpp_fast.reference import MAMLFewShotClassifier as Reference

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        args = default_args(**CFG)
        with pytest.raises(TypeError, match="reference.MAMLFewShotClassifier cannot be trained data-parallel"):
            DataParallelLearner(Reference((2, 1, 14, 14), "cpu", args))
        wrapped = DataParallelLearner(Fast((2, 1, 14, 14), "cpu", args))
        plain = Fast((2, 1, 14, 14), "cpu", args)
        batch = make_batches()[0]
        lw, lp = wrapped.run_train_iter(batch, 0)[0], plain.run_train_iter(batch, 0)[0]
        assert float(lw["loss"]) == float(lp["loss"]) and lw["accuracy"] == lp["accuracy"]
        for key, value in plain.state_dict().items():
            assert torch.equal(wrapped.state_dict()[key], value), key
        assert wrapped.optimizer is wrapped.learner.core.optimizer and wrapped.core.reducer is not None
    finally:
        dist.destroy_process_group()
