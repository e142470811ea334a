"""Data-parallel meta-training with torch.distributed: the B tasks of a meta-batch split over ranks.

    torchrun --nproc_per_node 4 -m mamlpp_fast train --config X.json --distributed

Semantics (equal to the single-process run on the same meta-batch, up to floating-point summation order):

- each rank takes a contiguous shard of B / world_size tasks (rank r: tasks r*b .. r*b+b-1); B must be
  divisible by the world size, else `ValueError` naming batch_size and the world size;
- the single-process meta-loss is the mean over tasks of each task's loss, so with equal shards it is
  the mean over ranks of the shard losses: the meta-gradients are all-reduced and divided by the world
  size (one flattened all-reduce), and the reported loss and accuracy are averaged the same way;
- BN running statistics: the fast learner applies the closed form of the original's sequential
  momentum updates once per (layer, step) with the per-task batch statistics of the meta-batch in
  task order (`_update_running_stats(pending)`). Here the per-task means and inverse stds of every
  forward are all-gathered in rank order first, so every rank applies exactly the single-process
  update to the full meta-batch's statistics and the running statistics stay identical on all ranks;
- the Adam step then runs on identical gradients from identical parameters (broadcast from rank 0 at
  start), so every rank holds the same model without any parameter broadcast afterwards;
- validation and test batches are not split: every rank evaluates the full batch (evaluation is a
  small share of the time, and it keeps the per-task logits of the test ensemble on every rank);
- only rank 0 writes files (checkpoints, logs, config snapshot, test summary); the other ranks wait
  at a barrier before reading checkpoints rank 0 wrote.

The process group is initialised from the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...):
backend "nccl" on CUDA devices, "gloo" on the CPU. On CUDA each rank uses device LOCAL_RANK.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .fast import MAMLFewShotClassifier as FastClassifier

__all__ = ["DistributedMAMLFewShotClassifier", "init_from_env", "is_distributed_env", "shard_batch",
           "run_distributed_experiment"]


def is_distributed_env() -> bool:
    """True when launched by torchrun (or similar) with WORLD_SIZE > 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env(device: Any = None) -> tuple[int, int]:
    """Initialise the default process group from the environment if needed; returns (rank, world)."""
    if not dist.is_initialized():
        dev = torch.device(device) if device is not None and str(device) != "auto" else None
        use_cuda = (dev is not None and dev.type == "cuda") or (dev is None and torch.cuda.is_available())
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def shard_batch(data_batch, rank: int, world: int):
    """The contiguous shard of tasks of `rank`: tasks rank*b .. rank*b+b-1 of each of the 4 arrays."""
    b_total = int(np.shape(data_batch[0])[0])
    if b_total % world != 0:
        raise ValueError(f"batch_size {b_total} (tasks per meta-batch) is not divisible by the world size {world}: "
                         "each rank needs the same number of tasks")
    b = b_total // world
    return tuple(part[rank * b:(rank + 1) * b] for part in data_batch[:4])


class DistributedMAMLFewShotClassifier(FastClassifier):
    """The fast learner, data-parallel over the tasks of each training meta-batch. Same API.

    `group`: the process group (default: the default group, which must be initialised)."""

    def __init__(self, im_shape, device, args, group=None):
        super().__init__(im_shape, device, args)
        if not dist.is_initialized():
            raise RuntimeError("DistributedMAMLFewShotClassifier needs an initialised torch.distributed process "
                               "group (launch with torchrun, or call mamlpp_fast.distributed.init_from_env())")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._sharded = False
        with torch.no_grad():  # identical start on every rank, whatever the local seeds did
            for t in list(self.parameters()) + list(self.buffers()):
                dist.broadcast(t.data, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)

    # -- collectives --------------------------------------------------------------------------------
    def _all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t / self.world_size

    # -- the three places where the single-process semantics need the other ranks --------------------
    @torch.no_grad()
    def _update_running_stats(self, pending: dict) -> None:
        """All-gather every forward's per-task (mean, invstd) in rank order (= global task order), then
        apply the single-process closed-form update to the whole meta-batch."""
        if self._sharded and self.world_size > 1:
            pending = {key: [(self._all_gather_cat(mean), self._all_gather_cat(invstd), m)
                             for mean, invstd, m in entries] for key, entries in pending.items()}
        super()._update_running_stats(pending)

    def forward(self, data_batch, epoch, use_second_order, use_multi_step_loss_optimization, num_steps,
                training_phase):
        losses, preds = super().forward(data_batch, epoch, use_second_order, use_multi_step_loss_optimization,
                                        num_steps, training_phase)
        if not (self._sharded and self.world_size > 1):
            return losses, preds
        loss = losses["loss"]
        # value: the meta-batch's mean loss; gradient: this shard's (averaged over ranks in meta_update)
        losses["loss"] = loss + (self._mean_over_ranks(loss) - loss.detach())
        acc = torch.tensor(float(losses["accuracy"]), dtype=torch.float64, device=loss.device)
        losses["accuracy"] = float(self._mean_over_ranks(acc))
        local = torch.as_tensor(np.stack(preds)).to(loss.device)
        full = self._all_gather_cat(local).cpu().numpy()
        return losses, [full[t] for t in range(full.shape[0])]

    def meta_update(self, loss, data_batch=None, epoch=None) -> bool:
        if not (self._sharded and self.world_size > 1):
            return super().meta_update(loss, data_batch, epoch)
        self.optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat /= self.world_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self._clamp_imagenet_grads()
        if not bool(self._finite_flag(loss)):  # same decision on every rank: grads and loss value are global
            self._handle_nonfinite(loss, data_batch, epoch)
            return False
        self.optimizer.step()
        return True

    def _graph_mode(self) -> bool:
        return False  # CUDA-graph capture cannot contain the collectives of this learner

    def _eager_train_iter(self, data_batch, epoch):
        # The reference's steps (forward, then meta_update), where this learner's collectives live, instead
        # of the fast learner's single-transfer update.
        return super(FastClassifier, self)._train_iter(data_batch, epoch)

    def run_train_iter(self, data_batch, epoch):
        """One meta-update on this rank's shard of the meta-batch (every rank passes the full batch)."""
        shard = shard_batch(data_batch, self.rank, self.world_size)
        self._sharded = True
        try:
            return super().run_train_iter(shard, epoch)
        finally:
            self._sharded = False


def _rank0_only_builder(builder_cls):
    """An ExperimentBuilder subclass whose non-zero ranks write nothing and read checkpoints only after
    rank 0 has finished writing them."""

    class DistributedExperimentBuilder(builder_cls):
        def __init__(self, *a, **kw):
            self._rank = dist.get_rank()
            if self._rank != 0:
                kw["progress"] = False
                kw["log"] = lambda msg: None
            super().__init__(*a, **kw)

        def _write_config_snapshot(self):
            if self._rank == 0:
                super()._write_config_snapshot()

        def save_models(self, epoch, state):
            if self._rank == 0:
                super().save_models(epoch, state)

        def _append_summary(self, summary):
            if self._rank == 0:
                super()._append_summary(summary)
            else:
                self.summary_rows.append(list(summary.values()))

        def _write_test_summary(self, result):
            if self._rank == 0:
                super()._write_test_summary(result)

        def evaluate_test_set_using_the_best_models(self, top_n_models=None):
            dist.barrier()  # rank 0's last checkpoint is on disk
            return super().evaluate_test_set_using_the_best_models(top_n_models)

    return DistributedExperimentBuilder


def run_distributed_experiment(args: Any, *, config_path=None, overwrite: bool = False, progress: bool = True,
                               log=None) -> dict:
    """`run_experiment` for a torchrun launch: the distributed learner, rank 0 writing the files."""
    from .common import resolve_device
    from .data import MetaLearningSystemDataLoader
    from .trainer import ExperimentBuilder

    rank, world = init_from_env(getattr(args, "device", "auto"))
    if int(args.batch_size) % world != 0:
        from .config import ConfigError

        raise ConfigError(f"config key 'batch_size' ({args.batch_size}) must be divisible by the world size "
                          f"({world}) for data-parallel meta-training")
    dev = resolve_device(getattr(args, "device", "auto"))
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model = DistributedMAMLFewShotClassifier(
        im_shape=(2, args.image_channels, args.image_height, args.image_width), device=dev, args=args)
    builder_cls = _rank0_only_builder(ExperimentBuilder)
    if rank == 0:
        builder = builder_cls(args, MetaLearningSystemDataLoader, model, dev, overwrite=overwrite,
                              config_path=config_path, progress=progress, log=log)
        dist.barrier()
    else:
        dist.barrier()  # rank 0 has decided between resume and fresh start (and deleted, with overwrite)
        builder = builder_cls(args, MetaLearningSystemDataLoader, model, dev, overwrite=False,
                              config_path=config_path, progress=False, log=None)
    return builder.run_experiment()
