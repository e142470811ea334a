"""Benchmark workloads: the MAML++ paper's configurations, the sweeps, and tiny CPU-smoke versions.

Every workload is second order, 5 inner steps (sweeps aside), multi-step loss (MSL), per-step batch
norm weights and biases (BNWB) and running statistics (BNRS), learnable per-layer per-step inner
learning rates (LSLR), as in the paper's MAML++ experiment files (configs/*maml++*.json). Meta-training
epoch 0 is benchmarked: MSL is on (epoch < multi_step_loss_num_epochs) and second order is on
(epoch > first_order_to_second_order_epoch = -1), so the measured work is the full MAML++ meta-update.

Batches are synthetic (class prototypes plus noise, like tests/_batches.py) and are placed on the
device before timing: the benchmark measures meta-updates, not data loading or host-to-device copies.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = ["Workload", "MAIN", "QUICK_MAIN", "main_workloads", "batch_sweep", "steps_sweep", "make_args",
           "make_batch", "workload_by_name", "BATCH_SWEEP", "STEPS_SWEEP"]


@dataclass(frozen=True)
class Workload:
    """One benchmark shape. Names follow '<dataset>_<N>w<K>s' (+ '_b<B>' / '_s<S>' in sweeps)."""
    name: str
    n_way: int
    k_shot: int
    n_target: int  # target examples per class
    batch_size: int  # tasks per meta-update
    channels: int
    height: int
    width: int
    filters: int
    num_stages: int = 4
    steps: int = 5
    dataset_name: str = "omniglot"  # "imagenet" in the name turns on the original's gradient clamp
    msl_epochs: int = 10
    task_learning_rate: float = 0.1

    @property
    def n_support(self) -> int:
        return self.n_way * self.k_shot

    @property
    def n_query(self) -> int:
        return self.n_way * self.n_target

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **kw) -> "Workload":
        return replace(self, **kw)


# The paper's MAML++ configurations (configs/*maml++*.json): Omniglot 28x28x1, 64 filters, 1 target per
# class, B=8; mini-ImageNet 84x84x3, 48 filters, 15 targets per class, B=2.
MAIN = (
    Workload("omniglot_20w1s", 20, 1, 1, 8, 1, 28, 28, 64),
    Workload("omniglot_5w1s", 5, 1, 1, 8, 1, 28, 28, 64),
    Workload("miniimagenet_5w1s", 5, 1, 15, 2, 3, 84, 84, 48, dataset_name="mini_imagenet", msl_epochs=15),
    Workload("miniimagenet_5w5s", 5, 5, 15, 2, 3, 84, 84, 48, dataset_name="mini_imagenet", msl_epochs=15),
)

# --quick: tiny shapes that keep every code path (4 stages, max pooling, second order, MSL, BN
# per step, LSLR) and take tens of milliseconds per meta-update on a CPU.
QUICK_MAIN = (
    Workload("quick_omniglot_3w1s", 3, 1, 1, 2, 1, 16, 16, 4, steps=2),
    Workload("quick_miniimagenet_3w1s", 3, 1, 2, 2, 3, 16, 16, 4, steps=2, dataset_name="mini_imagenet",
             msl_epochs=15),
)

BATCH_SWEEP = (1, 2, 4, 8, 16, 32, 64)
STEPS_SWEEP = (1, 2, 3, 4, 5)
QUICK_BATCH_SWEEP = (1, 2)
QUICK_STEPS_SWEEP = (1, 2)


def main_workloads(quick: bool = False) -> tuple[Workload, ...]:
    return QUICK_MAIN if quick else MAIN


def batch_sweep(quick: bool = False) -> list[Workload]:
    """Meta-batch size sweep of the fast learner on Omniglot 20-way 1-shot (the first quick workload)."""
    base = QUICK_MAIN[0] if quick else MAIN[0]
    return [base.with_(name=f"{base.name}_b{b}", batch_size=b) for b in (QUICK_BATCH_SWEEP if quick else BATCH_SWEEP)]


def steps_sweep(quick: bool = False) -> list[Workload]:
    """Inner-step sweep of the fast learner on Omniglot 20-way 1-shot, B=8."""
    base = QUICK_MAIN[0] if quick else MAIN[0]
    return [base.with_(name=f"{base.name}_s{s}", steps=s) for s in (QUICK_STEPS_SWEEP if quick else STEPS_SWEEP)]


def workload_by_name(name: str, quick: bool = False) -> Workload:
    for w in tuple(main_workloads(quick)) + tuple(batch_sweep(quick)) + tuple(steps_sweep(quick)):
        if w.name == name:
            return w
    raise KeyError(f"unknown workload {name!r}; known: {[w.name for w in main_workloads(quick)]}")


def make_args(w: Workload, dtype: str = "float32", **overrides):
    """A complete config Namespace (mamlpp_fast.config) for workload `w`."""
    from mamlpp_fast.config import default_args
    cfg = dict(
        batch_size=w.batch_size, num_classes_per_set=w.n_way, num_samples_per_class=w.k_shot,
        num_target_samples=w.n_target, image_channels=w.channels, image_height=w.height, image_width=w.width,
        cnn_num_filters=w.filters, num_stages=w.num_stages, number_of_training_steps_per_iter=w.steps,
        number_of_evaluation_steps_per_iter=w.steps, multi_step_loss_num_epochs=w.msl_epochs,
        task_learning_rate=w.task_learning_rate, dataset_name=w.dataset_name, second_order=True,
        first_order_to_second_order_epoch=-1, use_multi_step_loss_optimization=True,
        per_step_bn_statistics=True, learnable_bn_gamma=True, learnable_bn_beta=True,
        learnable_per_layer_per_step_inner_loop_learning_rate=True, enable_inner_loop_optimizable_bn_params=False,
        max_pooling=True, conv_padding=True, dtype=dtype,
        cuda_graph=False,  # the benchmarks name their variant (eager or captured) themselves
    )
    cfg.update(overrides)
    return default_args(**cfg)


def im_shape(w: Workload) -> tuple[int, int, int, int]:
    return (2, w.channels, w.height, w.width)


def make_batch_numpy(w: Workload, seed: int = 0, noise: float = 0.3):
    """(x_support (B,N,K,C,H,W), x_target (B,N,T,C,H,W), y_support (B,N,K), y_target (B,N,T)) as numpy:
    each class a smooth random prototype, each example the prototype plus noise (a learnable task)."""
    rng = np.random.RandomState(seed)
    b, n, c, h, wd = w.batch_size, w.n_way, w.channels, w.height, w.width
    coarse = rng.randn(b, n, c, max(2, h // 4), max(2, wd // 4))
    proto = np.repeat(np.repeat(coarse, int(np.ceil(h / coarse.shape[-2])), -2),
                      int(np.ceil(wd / coarse.shape[-1])), -1)[..., :h, :wd]
    xs = proto[:, :, None] + noise * rng.randn(b, n, w.k_shot, c, h, wd)
    xt = proto[:, :, None] + noise * rng.randn(b, n, w.n_target, c, h, wd)
    ys = np.broadcast_to(np.arange(n)[None, :, None], (b, n, w.k_shot)).copy()
    yt = np.broadcast_to(np.arange(n)[None, :, None], (b, n, w.n_target)).copy()
    return xs.astype(np.float32), xt.astype(np.float32), ys.astype(np.int64), yt.astype(np.int64)


def make_batch(w: Workload, device, dtype=None, seed: int = 0):
    """make_batch_numpy as torch tensors already on `device` (images in `dtype`, labels int64)."""
    import torch
    dtype = dtype or torch.float32
    xs, xt, ys, yt = make_batch_numpy(w, seed)
    return (torch.as_tensor(xs, device=device, dtype=dtype), torch.as_tensor(xt, device=device, dtype=dtype),
            torch.as_tensor(ys, device=device), torch.as_tensor(yt, device=device))
