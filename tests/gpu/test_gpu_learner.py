"""Learner-level checks on a CUDA device (skipped without one).

- The fast learner on each GPU op backend (torch, cuda, triton) against the reference learner on the
  same device, from the same state and batch (float64: 1e-9 relative; float32: as exact as the float32
  reference learner against float64 truth on the same device, the criterion of tests/_numerics.py, whose
  constants were derived on a CPU: see docs/NUMERICS.md).
- CUDA-graph capture of the whole meta-update gives the same numbers as the same learner uncaptured.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _batches import fresh_seed, learnable_batch  # noqa: E402
from _numerics import assert_as_exact_as_reference  # noqa: E402
from test_fast_equivalence import FP64_RTOL  # noqa: E402

from mamlpp_fast.common import float32_precision  # noqa: E402
from mamlpp_fast.config import default_args  # noqa: E402
from mamlpp_fast.fast import MAMLFewShotClassifier as Fast  # noqa: E402
from mamlpp_fast.ops import available_backends  # noqa: E402
from mamlpp_fast.reference import MAMLFewShotClassifier as Reference  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = ["torch", "native", "triton"]


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64).cpu(), torch.as_tensor(b, dtype=torch.float64).cpu()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def pair(dtype, backend, device="cuda", **cfg):
    args = default_args(dtype=dtype, backend=backend, **cfg)
    shape = (2, args.image_channels, args.image_height, args.image_width)
    ref = Reference(shape, device, args)
    fast = Fast(shape, device, args)
    fast.load_state_dict(ref.state_dict())
    return ref, fast, args


def grads_of(model, batch, epoch):
    model.current_epoch = epoch
    with float32_precision(model.args.allow_tf32):  # strict float32, as run_train_iter does
        losses, preds = model.train_forward_prop(model._batch(batch), epoch)
        model.zero_grad(set_to_none=True)
        losses["loss"].backward()
    return losses, preds, {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fast_matches_reference_on_cuda(backend):
    """float64: every result to 1e-9 relative, on the paper's Omniglot network (64 filters, 5 steps)."""
    if backend not in available_backends(torch.device("cuda")):
        pytest.fail(f"backend {backend} is not available on this GPU machine: {available_backends('cuda')}")
    seed = fresh_seed()
    cfg = dict(cnn_num_filters=64, num_classes_per_set=5, number_of_training_steps_per_iter=5)
    ref, fast, args = pair("float64", backend, **cfg)
    batch = learnable_batch(4, 5, 1, 2, 1, 28, 28, seed)
    lr_, pr, gr = grads_of(ref, batch, 0)
    lf, pf, gf = grads_of(fast, batch, 0)
    assert rel(lf["loss"].detach(), lr_["loss"].detach()) < FP64_RTOL, seed
    for a, b in zip(pf, pr):
        assert rel(a, b) < FP64_RTOL, seed
    floor = 1e-3 * max(float(g.norm()) for g in gr.values())
    errors = sorted(float((gf[n] - gr[n]).norm()) / max(float(gr[n].norm()), floor) for n in gr)
    assert errors[-1] < FP64_RTOL, (errors, backend, seed)
    for k, v in ref.state_dict().items():
        if "running" in k:
            assert rel(fast.state_dict()[k], v) < FP64_RTOL, (k, seed)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fast_as_exact_as_reference_float32_on_cuda(backend):
    """float32 (strict, no TF32): as exact as the reference learner on the same GPU, against float64 truth."""
    if backend not in available_backends(torch.device("cuda")):
        pytest.fail(f"backend {backend} is not available on this GPU machine: {available_backends('cuda')}")
    cfg = dict(cnn_num_filters=64, num_classes_per_set=5, number_of_training_steps_per_iter=5,
               number_of_evaluation_steps_per_iter=5)
    assert_as_exact_as_reference(backend, cfg, 4, 0, label=f"cuda, backend {backend}", device="cuda")


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_graph_capture_matches_uncaptured(backend):
    """Same learner, same batches: captured replays give the numbers of uncaptured updates."""
    seed = fresh_seed()
    cfg = dict(cnn_num_filters=32, num_classes_per_set=5, number_of_training_steps_per_iter=3,
               number_of_evaluation_steps_per_iter=3, cuda_graph=True, dtype="float64", backend=backend)
    args = default_args(**cfg)
    shape = (2, 1, 28, 28)
    graphed = Fast(shape, "cuda", args)
    plain = Fast(shape, "cuda", args)
    plain.load_state_dict(graphed.state_dict())
    plain._graph_failed = "disabled for the comparison"  # same capturable optimizer, no capture
    for it in range(4):  # warm-up (uncaptured), capture, then replays
        batch = learnable_batch(4, 5, 1, 2, 1, 28, 28, seed + it)
        lg, pg = graphed.run_train_iter(batch, 0)
        lp, pp = plain.run_train_iter(batch, 0)
        assert rel(lg["loss"], lp["loss"]) < 1e-12, (it, seed)
        for a, b in zip(pg, pp):
            assert rel(a, b) < 1e-12, (it, seed)
    assert graphed._graph_failed is None and len(graphed._graphs) == 1
    sg, sp = graphed.state_dict(), plain.state_dict()
    for k in sg:
        if k.endswith("conv.bias") or k.endswith("conv-bias"):
            # zero-in-exact-arithmetic gradients: cuDNN's weight-gradient algorithms are not
            # deterministic, so their rounding noise (and Adam's step of it) differs run to run
            continue
        assert rel(sg[k], sp[k]) < 1e-10, (k, seed)


def test_graphs_follow_the_phase_and_one_is_kept():
    """Config key cuda_graph, on by default: across the MSL switch (epoch 0 -> multi_step_loss_num_epochs)
    the new phase warms up and captures, the earlier phase's graph is dropped (one graph kept, so that
    the two phases' pools are not held at once), and every update equals an uncaptured learner's (the
    same capturable optimizer; float64, 1e-12)."""
    seed = fresh_seed()
    args = default_args(cnn_num_filters=16, num_classes_per_set=5, number_of_training_steps_per_iter=2,
                        number_of_evaluation_steps_per_iter=2, dtype="float64", multi_step_loss_num_epochs=1)
    assert args.cuda_graph is True
    shape = (2, 1, 28, 28)
    graphed = Fast(shape, "cuda", args)
    plain = Fast(shape, "cuda", args)
    plain.load_state_dict(graphed.state_dict())
    plain._graph_failed = "disabled for the comparison"
    keys = []
    for it, epoch in enumerate([0, 0, 0, 1, 1, 1]):  # per phase: warm-up, capture, replay
        batch = learnable_batch(4, 5, 1, 2, 1, 28, 28, seed + it)
        lg, pg = graphed.run_train_iter(batch, epoch)
        lp, pp = plain.run_train_iter(batch, epoch)
        assert rel(lg["loss"], lp["loss"]) < 1e-12, (it, seed)
        for a, b in zip(pg, pp):
            assert rel(a, b) < 1e-12, (it, seed)
        assert graphed._graph_failed is None and len(graphed._graphs) <= 1, (it, list(graphed._graphs))
        keys.append(next(iter(graphed._graphs), None))
    assert keys[2] is not None and keys[5] is not None and keys[2] != keys[5], keys
    assert keys[2][2] is True and keys[5][2] is False  # MSL on, then off
