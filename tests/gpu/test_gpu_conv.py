"""task_conv2d on a CUDA device (skipped without one): every implementation against per-task cuDNN
convolutions in float64 (to second order) and float32 (tests/test_conv.py's tolerances), the timing
choice of conv_impl=auto, and the fast learner with conv_impl=auto against the reference, eagerly and
captured in a CUDA graph."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _batches import fresh_seed, learnable_batch  # noqa: E402
from test_conv import FP32_RTOL, FP64_RTOL, SHAPES, derivatives, make_inputs, per_task_reference, rel  # noqa: E402

from mamlpp_fast.ops import conv as C  # noqa: E402
from mamlpp_fast.ops.conv import CONV_IMPLS, task_conv2d  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def strict_fp32():
    from mamlpp_fast.common import float32_precision
    with float32_precision(False, True):
        yield


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("shape", SHAPES + [(20, 8, 64, 64, 14, 3, 1, 1), (20, 8, 1, 64, 28, 3, 1, 1),
                                    (5, 2, 48, 48, 21, 3, 1, 1), (5, 2, 3, 48, 42, 3, 1, 1)],
                         ids=[str(s) for s in SHAPES] + ["omniglot-layer2", "omniglot-layer1",
                                                         "miniimagenet-layer3", "miniimagenet-layer1-half"])
def test_matches_per_task_convolutions_on_cuda(impl, shape, dtype):
    seed = fresh_seed()
    x, w, bias, b, s, p = make_inputs(shape, torch.float64, seed, device="cuda")
    ref = derivatives(lambda: per_task_reference(x, w, bias, b, s, p), x, w, bias, seed)
    xd, wd, bd = (t.detach().to(dtype).requires_grad_(True) for t in (x, w, bias))
    got = derivatives(lambda: task_conv2d(xd, wd, bd, b, s, p, impl), xd, wd, bd, seed)
    tol = FP64_RTOL if dtype == torch.float64 else FP32_RTOL
    for i, (a, r) in enumerate(zip(got, ref)):
        assert a.is_cuda and rel(a, r) < tol, f"{impl} term {i}: {rel(a, r):.3e} (seed {seed})"


# the relative error (`rel`: largest difference over the largest value) of each term of `derivatives`
# against float64, per input precision of the Triton products. tf32x3 keeps ~2^-21 of each product (it
# drops lo*lo, and the product truncates lo to TF32) and sums in float32 like strict: the strict
# tolerance. TF32 products read the top 19 bits of each operand (truncation: up to 2^-10 off, ~3.5e-4 on
# average, so every product shrinks by ~7e-4): ~8e-4 at first order and up to ~1.9e-3 for the terms
# that chain two or three products, as bench.precision's emulation of these six shapes measures (3
# seeds each, oneDNN's float32 sums: `python tests/tf32_margins.py derivatives`); 1e-2 leaves a factor
# of ~5 for the device's summation order and other seeds, and a wrong term is off by O(1).
TC_RTOL = {"tf32x3": FP32_RTOL, "tf32": 1e-2}


@pytest.mark.parametrize("mode", ["tf32x3", "tf32"])
@pytest.mark.parametrize("shape", [(20, 8, 64, 64, 14, 3, 1, 1), (20, 8, 64, 64, 7, 3, 1, 1), (20, 8, 64, 64, 3, 3, 1, 1),
                                   (5, 2, 48, 48, 21, 3, 1, 1), (5, 2, 48, 48, 10, 3, 1, 1), (20, 8, 1, 64, 28, 3, 1, 1)],
                         ids=["omniglot-14x14", "omniglot-7x7", "omniglot-3x3", "miniimagenet-21x21",
                              "miniimagenet-10x10", "omniglot-layer1"])
def test_triton_conv_tensor_core_tiles_on_cuda(shape, mode):
    """The Triton convolution in float32 with its products on tensor cores (config key conv_precision
    tf32x3 / tf32, the tensor-core tiles of `conv_block_config` / `wgrad_block_config`) against per-task
    convolutions in float64, to second order, within `TC_RTOL`: what the CPU's interpreter cannot show
    (it does not round to TF32)."""
    from mamlpp_fast.triton._device import forced_conv_precision
    seed = fresh_seed()
    x, w, bias, b, s, p = make_inputs(shape, torch.float64, seed, device="cuda")
    ref = derivatives(lambda: per_task_reference(x, w, bias, b, s, p), x, w, bias, seed)
    xd, wd, bd = (t.detach().float().requires_grad_(True) for t in (x, w, bias))
    with forced_conv_precision(mode):
        got = derivatives(lambda: task_conv2d(xd, wd, bd, b, s, p, "triton"), xd, wd, bd, seed)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert a.is_cuda and rel(a, r) < TC_RTOL[mode], f"{mode} term {i}: {rel(a, r):.3e} (seed {seed})"


def test_auto_times_every_impl_once_and_not_during_capture():
    C.clear_conv_cache()
    xs, ws = (20, 8 * 64, 7, 7), (8, 64, 64, 3, 3)
    impl = C.choose_conv_impl(xs, ws, 1, 1, torch.float32, "cuda")
    assert impl in CONV_IMPLS
    (key, (chosen, times)), = C.conv_choices().items()
    assert chosen == impl and set(times) == set(CONV_IMPLS)
    assert all(v is None or v > 0 for v in times.values()) and times[impl] == min(
        v for v in times.values() if v is not None)
    assert C.choose_conv_impl(xs, ws, 1, 1, torch.float32, "cuda") == impl  # cached: no second timing
    assert len(C.conv_choices()) == 1
    # inside a capture nothing can be timed: a new shape gets the grouped convolution, uncached
    g = torch.cuda.CUDAGraph()
    buf = torch.zeros(4, device="cuda")
    with torch.cuda.graph(g):
        buf.add_(1.0)  # a graph with one kernel in it
        inside = C.choose_conv_impl((20, 8 * 64, 3, 3), ws, 1, 1, torch.float32, "cuda")
    assert inside == "grouped"
    assert len(C.conv_choices()) == 1


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_fast_learner_conv_auto_matches_reference_on_cuda(graph):
    from mamlpp_fast.config import default_args
    from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
    from mamlpp_fast.reference import MAMLFewShotClassifier as Reference

    seed = fresh_seed()
    C.clear_conv_cache()
    args = default_args(dtype="float64", cnn_num_filters=32, num_classes_per_set=5,
                        number_of_training_steps_per_iter=3, number_of_evaluation_steps_per_iter=3,
                        conv_impl="auto", cuda_graph=graph)
    shape = (2, 1, 28, 28)
    ref, fast = Reference(shape, "cuda", args), Fast(shape, "cuda", args)
    fast.load_state_dict(ref.state_dict())
    for it in range(3 if graph else 1):  # with a graph: warm-up (auto times here), capture, replay
        batch = learnable_batch(4, 5, 1, 2, 1, 28, 28, seed + it)
        lr_, pr = ref.run_train_iter(batch, 0)
        lf, pf = fast.run_train_iter(batch, 0)
        assert rel(torch.as_tensor(lf["loss"]), torch.as_tensor(lr_["loss"])) < 1e-9, (it, seed)
        for a, b in zip(pf, pr):
            assert rel(torch.as_tensor(a), torch.as_tensor(b)) < 1e-9, (it, seed)
    assert len(C.conv_choices()) > 0
    if graph:
        assert fast._graph_failed is None and len(fast._graphs) == 1


def test_triton_conv_full_gradcheck_and_gradgradcheck_on_cuda():
    """The full Jacobians (the interpreter test uses fast mode), float64, a strided case too."""
    if "triton" not in C.available_conv_impls("cuda"):
        pytest.fail("triton is not available on this GPU machine")
    from mamlpp_fast.ops.conv_triton_autograd import task_conv2d_triton
    for shape in [(2, 2, 2, 3, 5, 3, 1, 1), (2, 1, 2, 2, 5, 3, 2, 1)]:
        x, w, bias, b, s, p = make_inputs(shape, torch.float64, 5, device="cuda")
        fn = lambda x_, w_, b_: task_conv2d_triton(x_, w_, b_, b, (s, s), (p, p))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, bias))
        assert torch.autograd.gradgradcheck(fn, (x, w, bias))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(20, 8, 64, 14), (20, 8, 64, 3), (5, 2, 48, 21), (5, 2, 48, 10)],
                         ids=["omniglot-14", "omniglot-3", "miniimagenet-21", "miniimagenet-10"])
def test_dual_forward_on_cuda(shape, dtype):
    """The dual forward launch F(x, w) + F(x2, w2) + bias (the double backward's d gy, `_ConvGrads`) at
    the learner's shapes against two plain launches: float64 to 1e-12, float32 to FP32_RTOL."""
    from mamlpp_fast.triton import conv as T
    n, b, c, h = shape
    gen = torch.Generator(device="cuda").manual_seed(fresh_seed())
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen, dtype=dtype)  # noqa: E731
    meta = (b, c, c, 3, 3, h, h, h, h, 1, 1)
    x, x2, w, w2, bias = rnd(n, b * c, h, h), rnd(n, b * c, h, h), rnd(b, c, c, 3, 3), rnd(b, c, c, 3, 3), rnd(b, c)
    got = T.conv_forward(x, w, bias, meta, x2=x2, w2=w2)
    want = T.conv_forward(x, w, bias, meta) + T.conv_forward(x2, w2, None, meta)
    assert rel(got, want) < (1e-12 if dtype == torch.float64 else FP32_RTOL), f"{rel(got, want):.3e}"


def test_dual_forward_full_gradcheck_and_gradgradcheck_on_cuda():
    """Full Jacobians of `_ConvF2` (the dual forward; its backward is two `_ConvGrads`), float64."""
    from mamlpp_fast.ops.conv_triton_autograd import _ConvF2
    gen = torch.Generator(device="cuda").manual_seed(fresh_seed())
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    b, ci, co, n, h = 2, 2, 3, 2, 4
    meta = (b, co, ci, 3, 3, h, h, h, h, 1, 1)
    args = (rnd(n, b * ci, h, h), rnd(b, co, ci, 3, 3), rnd(n, b * ci, h, h), rnd(b, co, ci, 3, 3), rnd(b, co))
    fn = lambda x, w, x2, w2, bias: _ConvF2.apply(x, w, x2, w2, bias, meta)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


# ---- the fused first block (mamlpp_fast/triton/conv_block.py) on the device ------------------------------
BLOCK_GPU_SHAPES = [(8, 64, 1, 20, 28, 3, 1, False, True), (2, 48, 3, 75, 84, 3, 1, False, True),
                    (2, 48, 3, 5, 84, 3, 1, True, True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", BLOCK_GPU_SHAPES, ids=["omniglot-20w", "miniimagenet-target", "miniimagenet-support"])
def test_fused_block_kernels_on_cuda(shape, dtype):
    """The Triton block at the learner's full shapes and launch configuration (many chunks per column)
    against the float64 PyTorch implementation on the same device: float64 1e-10; float32 2e-5 forward
    and backward, 1e-4 * max(1, max invstd) double backward (tests/test_triton_interp.py). In float32
    the windows whose two largest y lie within 1e-4 of max |y| get gout = 0 and no d(gout) comparison
    (`_window_keep`: there rounding may pick either maximum; at these sizes some window always does)."""
    from test_triton_interp import _block_all, _block_case, _block_compare, _block_keep
    from mamlpp_fast.ops.conv_block import torch_impl
    from mamlpp_fast.triton import conv_block as tcb

    seed = fresh_seed() % 2 ** 31
    case = [t.cuda() if isinstance(t, torch.Tensor) else t for t in _block_case(shape, seed, dtype)]
    keep = None if dtype == torch.float64 else _block_keep(*case)
    ref, invstd = _block_all(torch_impl, *[t.double() if isinstance(t, torch.Tensor) else t for t in case], seed,
                             keep=keep)
    got, _ = _block_all(tcb, *case, seed, keep=keep)
    if dtype == torch.float64:
        _block_compare(got, ref, 1e-10, seed)
    else:
        _block_compare(got[:7], ref[:7], 2e-5, seed)
        _block_compare(got[7:], ref[7:], 1e-4 * max(1.0, float(invstd.max())), seed)


# ---- bn_pool (mamlpp_fast/triton/bn_pool.py) on the device ----------------------------------------------
POOL_GPU_SHAPES = [(8, 64, 20, 14, 14, False, False), (2, 48, 75, 42, 42, True, True), (2, 48, 5, 21, 21, False, True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", POOL_GPU_SHAPES, ids=["omniglot-layer1", "miniimagenet-layer1-target",
                                                        "miniimagenet-layer2-support"])
def test_bn_pool_kernels_on_cuda(shape, dtype):
    """bn_pool's Triton kernels at the learner's shapes and launch configuration (many chunks per column)
    against the float64 PyTorch implementation on the same device, with tests/test_triton_interp.py's
    margins; a shared gamma or beta expanded to the tasks where the other is per task, as the op does;
    in float32 near-tied windows out of the gradient comparisons (`_window_keep`)."""
    from test_bn_pool import EPS, SLOPE, make_inputs
    from test_triton_interp import _bn_pool_all, _bn_pool_compare, _one_shape, _window_keep
    from mamlpp_fast.ops import per_step_batch_norm
    from mamlpp_fast.ops.bn_pool import torch_impl
    from mamlpp_fast.triton import bn_pool as tbp

    seed = fresh_seed() % 2 ** 31
    x, gamma, beta, T = make_inputs(shape, seed, dtype)
    x, gamma, beta = (t.detach().cuda() for t in (x, gamma, beta))
    gamma, beta = _one_shape(gamma, beta, T)
    keep = None
    if dtype == torch.float32:
        y = per_step_batch_norm(x.double(), gamma.double(), beta.double(), T, EPS, SLOPE, backend="torch")[0]
        keep = _window_keep(y)
    ref, invstd = _bn_pool_all(torch_impl, x.double(), gamma.double(), beta.double(), T, seed, keep=keep)
    got, _ = _bn_pool_all(tbp, x, gamma, beta, T, seed, keep=keep)
    if dtype == torch.float64:
        _bn_pool_compare(got, ref, 1e-10, seed)
    else:
        _bn_pool_compare(got[:6], ref[:6], 2e-5, seed)
        _bn_pool_compare(got[6:], ref[6:], 1e-4 * max(1.0, float(invstd.max())), seed)


@pytest.mark.filterwarnings("ignore:.*have not yet passed their tests")
@pytest.mark.parametrize("op", ["first_block", "bn_pool"])
def test_fused_op_on_cuda_matches_unfused(op):
    """first_block="fused" (or bn_pool="fused"), the other op and the head unfused, takes that op's Triton
    kernels on a CUDA device; the learner's results equal the all-unfused learner's (float64, 1e-9),
    captured in a CUDA graph. "auto" fuses the op exactly when mamlpp_fast.fast.AUTO_FUSES_ON_CUDA[op]
    holds (off until the op's device tests pass: bench.fused_verdict). One op per case, so that each op's
    verdict stands on its own."""
    from mamlpp_fast import fast as fast_mod
    from mamlpp_fast.config import default_args
    from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
    from mamlpp_fast.triton import bn_pool as tbp
    from mamlpp_fast.triton import conv_block as tcb

    seed = fresh_seed()
    common = dict(dtype="float64", cnn_num_filters=32, num_classes_per_set=5, number_of_training_steps_per_iter=3,
                  number_of_evaluation_steps_per_iter=3, cuda_graph=True, backend="triton", conv_impl="triton",
                  head="unfused")
    other = "bn_pool" if op == "first_block" else "first_block"
    shape = (2, 1, 28, 28)
    auto = Fast(shape, "cuda", default_args(**{op: "auto", other: "unfused"}, **common))
    if op == "first_block":
        x = torch.zeros(10, 2, 28, 28, device="cuda", dtype=torch.float64)
        w = torch.zeros(2, 32, 1, 3, 3, device="cuda", dtype=torch.float64)
        got = auto._first_block_impl(x, w, auto.classifier.layer_dict["conv0"].conv) is tcb
    else:
        got = auto._bn_pool_impl(torch.zeros(10, 2 * 32, 14, 14, device="cuda", dtype=torch.float64)) is tbp
    assert got == fast_mod.AUTO_FUSES_ON_CUDA[op]
    fused = Fast(shape, "cuda", default_args(**{op: "fused", other: "unfused"}, **common))
    plain = Fast(shape, "cuda", default_args(first_block="unfused", bn_pool="unfused", **common))
    plain.load_state_dict(fused.state_dict())
    for it in range(3):
        batch = learnable_batch(4, 5, 1, 2, 1, 28, 28, seed + it)
        lf, pf = fused.run_train_iter(batch, 0)
        lp, pp = plain.run_train_iter(batch, 0)
        assert rel(torch.as_tensor(lf["loss"]), torch.as_tensor(lp["loss"])) < 1e-9, (it, seed)
        for a, b in zip(pf, pp):
            assert rel(torch.as_tensor(a), torch.as_tensor(b)) < 1e-9, (it, seed)
    if op == "first_block":
        assert any(v is tcb for v in fused._first_block_cache.values())
        assert not any(fused.__dict__.get("_bn_pool_cache", {}).values())
    else:
        assert fused._bn_pool_cache and all(v is tbp for v in fused._bn_pool_cache.values())
        assert not any(fused.__dict__.get("_first_block_cache", {}).values())
    assert fused._graph_failed is None and len(fused._graphs) == 1


# paper layers whose three launches all split their reductions on a 132-SM device (Omniglot layer 3,
# 7x7 input, of the 20-image sets; mini-ImageNet layer 3, 10x10, of the 5-image support set)
SPLIT_GPU_SHAPES = [(20, 8, 64, 64, 7, 3, 1, 1), (5, 2, 48, 48, 10, 3, 1, 1)]


@pytest.mark.parametrize("shape", SPLIT_GPU_SHAPES, ids=["omniglot-layer3", "miniimagenet-layer3"])
def test_split_sum_in_kernel_on_cuda(shape, monkeypatch):
    """The in-kernel split sum on the device, where programs run concurrently and the partials cross
    multiprocessors (the interpreter runs them in order): float32 results of 20 repeated launches are
    bit-identical (a program that summed before another's partial was visible would make them differ),
    agree with the separate in-order torch sum (MAMLPP_CONV_SPLIT_SUM=separate) to float32 rounding, and
    the tile counters are zero afterwards; and the launches did split (SPLIT > 1)."""
    from mamlpp_fast.triton import conv as T

    n, b, ci, co, h, k, s, p = shape
    ho = (h + 2 * p - k) // s + 1
    sms = T._sms(torch.device("cuda"))
    assert T.conv_block_config("fwd", n * ho * ho, co, ci, k * k, b, sms)["SPLIT"] > 1
    assert T.conv_block_config("dgrad", n * h * h, ci, co, k * k, b, sms)["SPLIT"] > 1
    assert T.wgrad_block_config(co, ci, k * k, n * ho * ho, b, sms)["SPLIT"] > 1
    gen = torch.Generator(device="cuda").manual_seed(fresh_seed())
    x = torch.randn(n, b * ci, h, h, device="cuda", generator=gen)
    w = torch.randn(b, co, ci, k, k, device="cuda", generator=gen)
    bias = torch.randn(b, co, device="cuda", generator=gen)
    gy = torch.randn(n, b * co, ho, ho, device="cuda", generator=gen)
    meta = (b, co, ci, k, k, h, h, ho, ho, s, p)

    def run():
        dw, db = T.conv_weight_grad(x, gy, meta, with_bias=True)
        return [T.conv_forward(x, w, bias, meta), T.conv_data_grad(gy, w, meta), dw, db]

    monkeypatch.setenv("MAMLPP_CONV_SPLIT_SUM", "kernel")
    first = run()
    for _ in range(19):
        assert all(torch.equal(a, r) for a, r in zip(run(), first)), "in-kernel split sum not deterministic"
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in T._counters.values())
    monkeypatch.setenv("MAMLPP_CONV_SPLIT_SUM", "separate")
    for name, a, r in zip(("forward", "data gradient", "weight gradient", "bias gradient"), first, run()):
        assert rel(a, r) < FP32_RTOL, f"{name}: {rel(a, r):.3e}"


@pytest.mark.parametrize("shape", SPLIT_GPU_SHAPES, ids=["omniglot-layer3", "miniimagenet-layer3"])
def test_conv_streams_same_bits_on_cuda(shape):
    """Config key conv_streams (`side_by_side`): a layer's second-order pattern (forward, inner gradients
    with create_graph, outer backward) gives the same bits with the weight gradients on a side stream as
    in order, eagerly (5 runs) and captured in a CUDA graph (two branches), whose replay after new inputs
    are copied in matches the in-order eager result on them; the side stream was used; the in-kernel
    split sums' tickets (one buffer per stream) are zero afterwards, and the capture, made on the stream
    the warm-up ran on, allocated none. At layers whose three launches all split, so that both streams'
    launches elect last programs at the same time."""
    from mamlpp_fast.ops.conv_triton_autograd import task_conv2d_triton
    from mamlpp_fast.triton import _device as D
    from mamlpp_fast.triton import conv as T

    n, b, ci, co, h, k, s, p = shape
    ho = (h + 2 * p - k) // s + 1
    gen = torch.Generator(device="cuda").manual_seed(fresh_seed())

    def rnd(*size):
        return torch.randn(*size, device="cuda", generator=gen)

    x, w, bias = rnd(n, b * ci, h, h), rnd(b, co, ci, k, k), rnd(b, co)
    for t in (x, w, bias):
        t.requires_grad_(True)
    probes = [rnd(n, b * co, ho, ho), rnd(n, b * co, ho, ho), rnd(*x.shape), rnd(*w.shape), rnd(*bias.shape)]

    def pattern():
        y = task_conv2d_triton(x, w, bias, b, (s, s), (p, p))
        gx, gw, gb = torch.autograd.grad((y * probes[0]).sum(), (x, w, bias), create_graph=True)
        outer = (y * probes[1]).sum() + (gx * probes[2]).sum() + (gw * probes[3]).sum() + (gb * probes[4]).sum()
        return [t.detach() for t in (y, gx, gw, gb, *torch.autograd.grad(outer, (x, w, bias)))]

    def same(got, want):
        return all(torch.equal(a, r) for a, r in zip(got, want))

    D._side_streams.clear()
    with D.forced_conv_streams(False):
        ref = [t.clone() for t in pattern()]
    assert not D._side_streams
    with D.forced_conv_streams(True):
        for _ in range(5):
            assert same(pattern(), ref), "side stream changed the bits (eager)"
        assert D._side_streams, "no side stream was used"
        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            pattern()
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        allocs = D.capture_allocations()
        with torch.cuda.graph(graph, stream=warm):
            outs = pattern()
        assert D.capture_allocations() == allocs, "ticket buffers zeroed inside the capture"
        graph.replay()
        torch.cuda.synchronize()
        assert same(outs, ref), "side stream changed the bits (captured)"
        with torch.no_grad():
            for t in (x, w, bias, *probes):
                t.copy_(rnd(*t.shape))
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in outs]
    with D.forced_conv_streams(False):
        assert same(replayed, pattern()), "captured branches disagree with the in-order result on new inputs"
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in T._counters.values())


def test_fast_learner_conv_streams_matches_reference_on_cuda():
    """The fast learner with Triton convolutions and conv_streams on, captured in a CUDA graph, against
    the reference learner in float64 (1e-9), and with the same bits as conv_streams off; neither capture
    allocates a ticket buffer (`capture_allocations`: the learner warms up on its capture stream)."""
    from mamlpp_fast.config import default_args
    from mamlpp_fast.fast import MAMLFewShotClassifier as Fast
    from mamlpp_fast.reference import MAMLFewShotClassifier as Reference
    from mamlpp_fast.triton import _device as D

    seed = fresh_seed()
    shape = (2, 1, 28, 28)
    learners = {}
    for streams in (False, True):
        args = default_args(dtype="float64", cnn_num_filters=32, num_classes_per_set=5,
                            number_of_training_steps_per_iter=3, number_of_evaluation_steps_per_iter=3,
                            conv_impl="triton", cuda_graph=True, conv_streams=streams)
        learners[streams] = Fast(shape, "cuda", args)
    ref = Reference(shape, "cuda", learners[True].args)
    for f in learners.values():
        f.load_state_dict(ref.state_dict())
    D._side_streams.clear()
    allocs = D.capture_allocations()
    for it in range(3):  # warm-up, capture, replay
        batch = learnable_batch(4, 5, 1, 2, 1, 28, 28, seed + it)
        lr_, pr = ref.run_train_iter(batch, 0)
        (l0, p0), (l1, p1) = (learners[s].run_train_iter(batch, 0) for s in (False, True))
        assert rel(torch.as_tensor(l1["loss"]), torch.as_tensor(lr_["loss"])) < 1e-9, (it, seed)
        for a, b in zip(p1, pr):
            assert rel(torch.as_tensor(a), torch.as_tensor(b)) < 1e-9, (it, seed)
        assert l0["loss"] == l1["loss"], (it, seed)
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(p0, p1)), (it, seed)
    assert D._side_streams, "no side stream was used"
    assert D.capture_allocations() == allocs, "the learner's captures zeroed ticket buffers inside the graph"
    for f in learners.values():
        assert f._graph_failed is None and len(f._graphs) == 1
    assert all(torch.equal(a, b) for a, b in zip(learners[False].state_dict().values(),
                                                  learners[True].state_dict().values()))
