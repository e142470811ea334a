"""pytest-benchmark entries: one MAML++ meta-update (run_train_iter) at CPU-sized shapes.

    .venv/bin/python -m pytest bench/bench_learner.py --benchmark-enable            # time them
    .venv/bin/python -m pytest bench/bench_learner.py                               # CI: run once each

The project's pytest config has `--benchmark-disable` in addopts (each benchmark body runs once, as a
smoke test) and testpaths = tests/, so this file runs only when named. Shapes: Omniglot-like 5-way
1-shot, 28x28x1, 4 stages of 8 filters, B=2 tasks, 5 inner steps, second order, MSL, per-step BN,
LSLR: small enough for a CPU, every MAML++ part on. CUDA entries run when torch sees a GPU.
CPU threads: $MAMLPP_BENCH_THREADS (default 1: steady on a shared machine; torch's multi-threaded CPU
kernels collapse when the cores are oversubscribed), restored afterwards.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.workloads import Workload, im_shape, make_args, make_batch

SMALL = Workload("bench_small_5w1s", 5, 1, 1, 2, 1, 28, 28, 8, steps=5)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MAMLPP_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(n)


def _backends(device):
    from mamlpp_fast.ops import available_backends
    return [(device, b) for b in available_backends(device)]


FAST_CASES = [c for d in DEVICES for c in _backends(d)]


@pytest.mark.parametrize("device,backend", FAST_CASES, ids=[f"{d}-{b}" for d, b in FAST_CASES])
def test_fast_meta_update(benchmark, device, backend):
    from mamlpp_fast.fast import MAMLFewShotClassifier
    benchmark.group = f"meta-update {SMALL.name} {device}"
    model = MAMLFewShotClassifier(im_shape(SMALL), device, make_args(SMALL, backend=backend))
    batch = make_batch(SMALL, device)
    model.run_train_iter(batch, 0)  # warm-up: lazy initialisations, kernel compilation
    losses, preds = benchmark(model.run_train_iter, batch, 0)
    assert torch.isfinite(losses["loss"]) and len(preds) == SMALL.batch_size


@pytest.mark.parametrize("device", DEVICES)
def test_reference_meta_update(benchmark, device):
    from mamlpp_fast.reference import MAMLFewShotClassifier
    benchmark.group = f"meta-update {SMALL.name} {device}"
    model = MAMLFewShotClassifier(im_shape(SMALL), device, make_args(SMALL))
    batch = make_batch(SMALL, device)
    model.run_train_iter(batch, 0)
    losses, _ = benchmark(model.run_train_iter, batch, 0)
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("device", DEVICES)
def test_torchfunc_meta_update(benchmark, device):
    from bench.baseline_torchfunc import TorchFuncMAMLPP

    def step():
        loss = base.meta_update(batch, 0)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    benchmark.group = f"meta-update {SMALL.name} {device}"
    base = TorchFuncMAMLPP(make_args(SMALL), device)
    batch = make_batch(SMALL, device)
    step()
    assert torch.isfinite(benchmark(step))
