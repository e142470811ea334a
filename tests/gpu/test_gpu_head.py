"""The fused head (mamlpp_fast.ops.head.head_loss) and the kernels that elect a group's last program with a
ticket (the head's loss and feature-chunk sums, bn_pool's shared-gamma sums) on a CUDA device (skipped
without one): where programs run concurrently and a sum's parts cross multiprocessors, which the
interpreter (one program at a time) cannot show."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _batches import fresh_seed, learnable_batch  # noqa: E402
from test_conv import rel  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (T, n, C, (F,)): Omniglot 20-way 1-shot B=8 (support and target), mini-ImageNet 5-way 1-shot B=2 support
# and target (48 x 5 x 5 features: the forward and backward split over the features)
HEAD_GPU_SHAPES = [(8, 20, 20, (64,)), (2, 5, 5, (1200,)), (2, 75, 5, (1200,))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", HEAD_GPU_SHAPES, ids=["omniglot", "miniimagenet-support", "miniimagenet-target"])
def test_head_kernels_on_cuda(shape, dtype):
    """The head's Triton kernels at the learner's shapes and launch configuration against the float64
    PyTorch implementation on the same device, with tests/test_triton_interp.py's margins."""
    from test_head import make_inputs
    from test_triton_interp import _bn_pool_compare, _head_all
    from mamlpp_fast.ops.head import torch_impl
    from mamlpp_fast.triton import head as th

    seed = fresh_seed() % 2 ** 31
    x, w, b, labels, lw, prev, T = (t.detach().cuda() if isinstance(t, torch.Tensor) else t
                                    for t in make_inputs(shape, seed, dtype))
    ref = _head_all(torch_impl, x.double(), w.double(), b.double(), labels, lw.double(), prev.double(), T, seed)
    got = _head_all(th, x, w, b, labels, lw, prev, T, seed)
    k = max(w.shape[2], x.shape[0], w.shape[1])
    _bn_pool_compare(got, ref, 1e-10 if dtype == torch.float64 else 8 * k * 2.0 ** -24, seed)


@pytest.mark.parametrize("op", ["head", "bn_pool", "first_block"])
def test_ticket_sums_deterministic_on_cuda(op):
    """20 repeated launches give identical bits (a last program that read before another's stores were
    visible would make them differ), and every ticket counter is back at zero, for one fused op per case
    (each op's own evidence, bench.fused_verdict): the head's forward (split over the features: the chunk
    sums and the loss sum taken by the last programs); bn_pool's single-pass backward and double backward
    with a gamma shared by the tasks (the channel sums taken by the last program); the fused first
    block's backward and double backward with a shared gamma (its finishing kernels' sums over the tasks,
    taken by each channel's last program)."""
    from mamlpp_fast.triton import _device

    seed = fresh_seed() % 2 ** 31
    if op == "head":
        from test_head import make_inputs
        from test_triton_interp import _head_all
        from mamlpp_fast.triton import head as th
        x, w, b, labels, lw, prev, T = (t.detach().cuda() if isinstance(t, torch.Tensor) else t
                                        for t in make_inputs(HEAD_GPU_SHAPES[2], seed, torch.float32))
        assert th.head_config(x.shape[0], w.shape[1], w.shape[2], T, th._sms(x.device), dot=True)["S"] > 1

        def run():
            return [t for _, t in _head_all(th, x, w, b, labels, lw, prev, T, seed)]
    elif op == "bn_pool":
        from test_bn_pool import make_inputs as pool_inputs
        from test_triton_interp import _bn_pool_all
        from mamlpp_fast.triton import bn_pool as tbp
        px, gamma, beta, pt = pool_inputs((8, 64, 20, 14, 14, False, False), seed, torch.float32)
        px, gamma, beta = (t.detach().cuda() for t in (px, gamma, beta))
        assert tbp._single(tbp.pool_config(*px.shape, px.device))

        def run():  # gamma and beta (C,): shared by the tasks
            return [t for _, t in _bn_pool_all(tbp, px, gamma, beta, pt, seed)[0]]
    else:
        from test_conv_block import make_block_inputs
        from test_triton_interp import _block_all
        from mamlpp_fast.triton import conv_block as tcb
        # Omniglot's first block: 8 tasks of 64 channels, 20 images of 28 x 28, gamma shared by the tasks
        bx, bw, bb, bg, bbeta, bt, bpad = (t.detach().cuda() if isinstance(t, torch.Tensor) else t
                                           for t in make_block_inputs((8, 64, 1, 20, 28, 3, 1, False, True), seed))
        bx, bw, bb, bg, bbeta = (t.float() for t in (bx, bw, bb, bg, bbeta))

        def run():
            return [t for _, t in _block_all(tcb, bx, bw, bb, bg, bbeta, bt, bpad, seed)[0]]

    first = run()
    for _ in range(19):
        assert all(torch.equal(a, r) for a, r in zip(run(), first)), f"a ticket sum of {op} is not deterministic"
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in _device._counters.values())


@pytest.mark.filterwarnings("ignore:.*have not yet passed their tests")
def test_fused_head_on_cuda_matches_unfused():
    """head="fused" takes the Triton kernels on a CUDA device ("auto" too exactly when
    mamlpp_fast.fast.AUTO_FUSES_ON_CUDA["head"] holds); the learner's results (loss, target logits) equal the
    unfused head's (float64, 1e-9) over three captured meta-updates, the rest of both learners unfused."""
    from mamlpp_fast.config import default_args
    from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
    from mamlpp_fast.triton import head as th

    seed = fresh_seed()
    common = dict(dtype="float64", cnn_num_filters=32, num_classes_per_set=5, number_of_training_steps_per_iter=3,
                  number_of_evaluation_steps_per_iter=3, cuda_graph=True, backend="triton", conv_impl="triton",
                  first_block="unfused", bn_pool="unfused")
    shape = (2, 1, 28, 28)
    from mamlpp_fast import fast as fast_mod
    auto = Fast(shape, "cuda", default_args(head="auto", **common))
    feats = torch.zeros(4 * 5, 32, device="cuda", dtype=torch.float64)
    assert (auto._head_impl(feats, 5) is th) == fast_mod.AUTO_FUSES_ON_CUDA["head"]
    fused = Fast(shape, "cuda", default_args(head="fused", **common))
    plain = Fast(shape, "cuda", default_args(head="unfused", **common))
    plain.load_state_dict(fused.state_dict())
    for it in range(3):
        batch = learnable_batch(4, 5, 1, 2, 1, 28, 28, seed + it)
        lf, pf = fused.run_train_iter(batch, 0)
        lp, pp = plain.run_train_iter(batch, 0)
        assert rel(torch.as_tensor(lf["loss"]), torch.as_tensor(lp["loss"])) < 1e-9, (it, seed)
        for a, b in zip(pf, pp):
            assert rel(torch.as_tensor(a), torch.as_tensor(b)) < 1e-9, (it, seed)
    assert fused._head_cache and all(v is th for v in fused._head_cache.values())
    assert fused._graph_failed is None and len(fused._graphs) == 1
