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
  task order, after passing them through its core's `reduce_statistics`. Here the per-task means and
  inverse stds of every forward are all-gathered in rank order there, so every rank applies exactly
  the single-process update to the full meta-batch's statistics and the running statistics stay
  identical on all ranks;
- the Adam step then runs on identical gradients from identical parameters (broadcast from rank 0 at
  start), so every rank holds the same model without any parameter broadcast afterwards;
- validation and test batches are not split: every rank evaluates the full batch (evaluation is a
  small share of the time, and it keeps the per-task logits of the test ensemble on every rank);
- only rank 0 writes files (checkpoints, logs, config snapshot, test summary): the trainer is handed a
  `RankZeroWriter`; the other ranks wait at a barrier before reading checkpoints rank 0 wrote;
- the ranks share one lock of the experiment folder (mamlpp_fast.experiment): rank 0 takes it before
  anything else and holds it for the run; when it cannot (another run holds it) or rank 0's set-up
  fails, rank 0 broadcasts the error and every rank stops with it.

Structure: `DataParallelLearner` wraps a learner (composition). It installs its `_RankReducer` as the
reduction hook of the learner's core (mamlpp_fast.learner_core: the core calls it on the metrics and
the meta-gradients of a training iteration, the fast learner on its running-statistics updates),
passes each rank's shard to the learner's own run_train_iter, and forwards everything else to it.
`DistributedMAMLFewShotClassifier(im_shape, device, args)` is that wrapper around a fast learner.

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
from .trainer import ExperimentBuilder, ExperimentWriter, _early_lock

__all__ = ["DistributedMAMLFewShotClassifier", "DataParallelLearner", "RankZeroWriter", "init_from_env",
           "is_distributed_env", "shard_batch", "run_distributed_experiment"]


def is_distributed_env() -> bool:
    """True when launched by torchrun (or similar) with WORLD_SIZE > 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env(device: Any = None) -> tuple[int, int]:
    """Initialise the default process group from the environment if needed; returns (rank, world).

    Outside torchrun (no RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) it raises ConfigError."""
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            from .errors import ConfigError

            raise ConfigError(f"--distributed needs the environment torchrun sets ({', '.join(missing)} not set): "
                              "launch with `torchrun --nproc_per_node R -m mamlpp_fast train ...`, or drop "
                              "--distributed to train in one process")
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


class _RankReducer:
    """The reduction hook (learner_core.Reducer) over the ranks of a process group: each rank holds an
    equal contiguous shard of the meta-batch's tasks, in rank order."""

    def __init__(self, group, world_size: int):
        self.group, self.world_size = group, world_size

    def _all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t / self.world_size

    def metrics(self, losses: dict, preds: list) -> tuple[dict, list]:
        """Loss and accuracy averaged over ranks (equal shards: the meta-batch's means), logits of every
        task gathered in task order. The loss keeps the gradient of this rank's shard (the gradients
        are averaged in `gradients`)."""
        if self.world_size == 1:
            return losses, preds
        loss = losses["loss"]
        losses["loss"] = loss + (self._mean_over_ranks(loss) - loss.detach())
        acc = torch.tensor(float(losses["accuracy"]), dtype=torch.float64, device=loss.device)
        losses["accuracy"] = float(self._mean_over_ranks(acc))
        local = torch.as_tensor(np.stack(preds)).to(loss.device)
        full = self._all_gather_cat(local).cpu().numpy()
        return losses, [full[t] for t in range(full.shape[0])]

    def gradients(self, grads: list) -> None:
        """The meta-gradients averaged over ranks (one flattened all-reduce)."""
        if self.world_size == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def statistics(self, pending: dict) -> dict:
        """Every forward's per-task (mean, invstd) all-gathered in rank order (= global task order)."""
        if self.world_size == 1:
            return pending
        return {key: [(self._all_gather_cat(mean), self._all_gather_cat(invstd), m) for mean, invstd, m in entries]
                for key, entries in pending.items()}


class DataParallelLearner:
    """A learner made data-parallel over the tasks of each training meta-batch. Same API as the learner it
    wraps (attributes and methods other than run_train_iter are the learner's own).

    `learner`: a learner whose running-statistics update goes through its core's `reduce_statistics`
    (`supports_data_parallel`: the fast learner; the reference learner updates them inside F.batch_norm,
    task by task, so a shard's update could not be made the meta-batch's). Its parameters and buffers
    are broadcast from rank 0 of `group` (default: the default group, which must be initialised)."""

    def __init__(self, learner, group=None):
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs an initialised torch.distributed process "
                               "group (launch with torchrun, or call mamlpp_fast.distributed.init_from_env())")
        if not getattr(learner, "supports_data_parallel", False):
            raise TypeError(f"{type(learner).__module__}.{type(learner).__name__} cannot be trained data-parallel: "
                            "its running statistics are not updated through its core's reduction hook")
        self.learner = learner
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        with torch.no_grad():  # identical start on every rank, whatever the local seeds did
            for t in list(learner.parameters()) + list(learner.buffers()):
                dist.broadcast(t.data, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        learner.core.set_reducer(_RankReducer(group, self.world_size))

    def run_train_iter(self, data_batch, epoch):
        """One meta-update on this rank's shard of the meta-batch (every rank passes the full batch)."""
        return self.learner.run_train_iter(shard_batch(data_batch, self.rank, self.world_size), epoch)

    def __getattr__(self, name):
        if name == "learner":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.learner, name)


class DistributedMAMLFewShotClassifier(DataParallelLearner):
    """The fast learner, data-parallel over the tasks of each training meta-batch. Same API.

    `group`: the process group (default: the default group, which must be initialised)."""

    def __init__(self, im_shape, device, args, group=None):
        if not dist.is_initialized():  # before building the learner
            raise RuntimeError("DistributedMAMLFewShotClassifier needs an initialised torch.distributed process "
                               "group (launch with torchrun, or call mamlpp_fast.distributed.init_from_env())")
        super().__init__(FastClassifier(im_shape, device, args), group)


class RankZeroWriter(ExperimentWriter):
    """The trainer's writer in a data-parallel run: rank 0 takes the experiment folder's lock for all
    ranks and writes every file; the other ranks write nothing and, before reading checkpoints, wait at a
    barrier until rank 0 has written them."""

    def __init__(self, rank: int):
        self.rank = int(rank)

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def lock(self, root, command, log=None):
        if self.rank == 0:
            return super().lock(root, command, log)
        from .experiment import LockHandle

        return LockHandle(None)  # rank 0 holds the lock for all ranks

    def write_text(self, path, text) -> None:
        if self.rank == 0:
            super().write_text(path, text)

    def copy(self, src, dst) -> None:
        if self.rank == 0:
            super().copy(src, dst)

    def save_model(self, model, path, state) -> None:
        if self.rank == 0:
            super().save_model(model, path, state)

    def wait(self) -> None:
        dist.barrier()


def _rank0_outcome(rank: int, fn):
    """Run `fn` on rank 0 only and share whether it raised a MamlppError: every rank raises it (as an
    ExperimentError on ranks other than 0) instead of waiting forever for rank 0. Returns fn()'s value."""
    from .errors import ExperimentError, MamlppError

    value, error = None, None
    if rank == 0:
        try:
            value = fn()
        except MamlppError as e:
            error = e
    box = [None if error is None else str(error)]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise ExperimentError(f"rank 0 stopped: {box[0]}")
    return value


def run_distributed_experiment(args: Any, *, config_path=None, overwrite: bool = False, progress: bool = True,
                               log=None, allow_config_change: bool = False) -> dict:
    """`run_experiment` for a torchrun launch: the distributed learner, rank 0 writing the files."""
    from .common import resolve_device
    from .data import MetaLearningSystemDataLoader

    rank, world = init_from_env(getattr(args, "device", "auto"))
    if int(args.batch_size) % world != 0:
        from .config import ConfigError

        raise ConfigError(f"config key 'batch_size' ({args.batch_size}) must be divisible by the world size "
                          f"({world}) for data-parallel meta-training")
    lock = _rank0_outcome(rank, lambda: _early_lock(args, log, ranks=world))
    try:
        dev = resolve_device(getattr(args, "device", "auto"))
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        model = DistributedMAMLFewShotClassifier(
            im_shape=(2, args.image_channels, args.image_height, args.image_width), device=dev, args=args)
        writer = RankZeroWriter(rank)
        # Rank 0 decides between resume and fresh start (and deletes, with overwrite) before the others.
        builder = _rank0_outcome(rank, lambda: ExperimentBuilder(
            args, MetaLearningSystemDataLoader, model, dev, overwrite=overwrite, config_path=config_path,
            progress=progress, log=log, allow_config_change=allow_config_change, writer=writer))
        if rank != 0:
            builder = ExperimentBuilder(args, MetaLearningSystemDataLoader, model, dev, overwrite=False,
                                        config_path=config_path, progress=False, log=lambda msg: None,
                                        allow_config_change=allow_config_change, writer=writer)
        return builder.run_experiment()
    finally:
        if lock is not None:
            lock.release()
