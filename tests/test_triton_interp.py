"""Triton kernels (mamlpp_fast.triton) under the Triton interpreter, on CPU, against the float64
autograd reference (tests/_bn_reference.py).

How TRITON_INTERPRET is handled: it must be set before `import triton` anywhere in the process, and the
rest of the test session must not be affected. So THIS file is re-run in a subprocess (`python -m pytest
tests/test_triton_interp.py`) with TRITON_INTERPRET=1 and MAMLPP_TRITON_INNER=1 (tests/_interp_suite.py:
started at the end of collection when the single outer test here is selected, so that it runs beside
the rest of the suite); the inner tests below run only in that subprocess (skipped otherwise), and the
outer test fails with the inner output when any inner test fails. The outer process never imports
triton. Grids are kept small (interpreter: one program at a time, ~0.4 ms each plus launch overhead).

Tolerances (max |got - ref| / max(1, max |ref|)): float32 (fp32 accumulation) 2e-5 forward/backward,
1e-4 * max(1, max invstd) double backward (an ill-conditioned column, e.g. M=2 with close values, has
a large invstd r that amplifies the rounding of the saved fp32 statistics); float64 1e-10.
"""
import importlib.util
import os
import re

import pytest

INNER = os.environ.get("MAMLPP_TRITON_INNER") == "1"
EPS, SLOPE = 1e-5, 0.01


@pytest.mark.skipif(INNER, reason="outer driver: runs only in the parent pytest process")
def test_triton_interpreter_suite(request):
    """Collects the subprocess that the conftest hook started at the end of collection (it has been
    running beside the other tests since), or runs it now if none was started."""
    import _interp_suite

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    run = _interp_suite.take(request.config) or _interp_suite.Run(_interp_suite.root_dir())
    try:
        rc, out = run.wait()
    finally:
        run.stop()
    tail = out[-9000:]
    print(tail)
    assert rc == 0, f"inner triton-interpreter tests failed (rc={rc}):\n{tail}"
    summary = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    skipped = re.search(r"(\d+) skipped", summary)
    # the only inner skip allowed is this driver itself
    assert passed and int(passed.group(1)) > 0 and (not skipped or int(skipped.group(1)) == 1), tail


inner = pytest.mark.skipif(not INNER, reason="runs in the TRITON_INTERPRET=1 subprocess only")


@pytest.fixture(scope="module")
def tb():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from mamlpp_fast import triton as tb

    assert tb.is_available(), tb.unavailable_reason()
    return tb


def _run_all(tb, d, T, tol, tol2):
    import torch  # noqa: F401
    from _bn_reference import compare, ref_backward, ref_double_backward, ref_forward

    x, g, b = d["x"], d["gamma"], d["beta"]
    y, mean, invstd = tb.bn_forward(x, g, b, T, EPS, SLOPE)
    for name, a, r in zip(("y", "mean", "invstd"), (y, mean, invstd),
                          ref_forward(x, g, b, T, EPS, SLOPE)):
        compare(name, a, r, tol)
    got = tb.bn_backward(d["dy"], x, g, b, mean, invstd, T, SLOPE)
    for name, a, r in zip(("dx", "dgamma", "dbeta"), got,
                          ref_backward(d["dy"], x, g, b, T, EPS, SLOPE)):
        compare(name, a, r, tol)
    got = tb.bn_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], x, g, b, mean, invstd,
                                T, SLOPE)
    ref = ref_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], x, g, b, T, EPS, SLOPE)
    cond = max(1.0, float(invstd.max()))  # rounding of the saved statistics is amplified ~ r
    for name, a, r in zip(("gx", "ggamma", "gdy"), got, ref):
        compare(name, a, r, tol2 * cond)


SHAPES = [(2, 1, 3, 1, 1), (3, 2, 2, 3, 3), (1, 3, 2, 2, 3)]


@inner
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "pertask"])
@pytest.mark.parametrize("shape", SHAPES, ids=["N{}T{}C{}H{}W{}".format(*s) for s in SHAPES])
def test_bn_f32(tb, shape, shared):
    import torch
    from _bn_reference import make_bn_inputs

    d = make_bn_inputs(*shape, shared=shared, dtype=torch.float32, seed=sum(shape))
    _run_all(tb, d, shape[1], 2e-5, 1e-4)


@inner
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "pertask"])
def test_bn_f64(tb, shared):
    import torch
    from _bn_reference import make_bn_inputs

    d = make_bn_inputs(2, 3, 2, 2, 2, shared=shared, dtype=torch.float64, seed=4)
    _run_all(tb, d, 3, 1e-10, 1e-10)


@inner
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "pertask"])
def test_bn_multi_chunk(tb, shared, monkeypatch):
    """Forces BLOCK=16 and 3 chunks per column (the GPU path for large M), incl. a ragged last chunk."""
    import torch
    from _bn_reference import make_bn_inputs
    from mamlpp_fast.triton import per_step_bn

    def forced(M, TC, device):
        chunk = -(-M // 3)
        chunks = -(-M // chunk)
        return dict(BLOCK=16, CHUNK=chunk, CHUNKS=chunks, CBLOCK=4, num_warps=1)

    monkeypatch.setattr(per_step_bn, "bn_block_config", forced)
    d = make_bn_inputs(3, 2, 2, 5, 5, shared=shared, dtype=torch.float32, seed=9, x_shift=3.0)
    _run_all(tb, d, 2, 2e-5, 1e-4)


@inner
@pytest.mark.parametrize("which", ["ggx", "gggamma", "ggbeta", "none"])
def test_bn_double_backward_none(tb, which):
    import torch
    from _bn_reference import compare, make_bn_inputs, ref_double_backward

    d = make_bn_inputs(2, 2, 2, 2, 2, shared=True, dtype=torch.float64, seed=1)
    x, g, b = d["x"], d["gamma"], d["beta"]
    _, mean, invstd = tb.bn_forward(x, g, b, 2, EPS, SLOPE)
    u = {k: (d[k] if k == which else None) for k in ("ggx", "gggamma", "ggbeta")}
    got = tb.bn_double_backward(u["ggx"], u["gggamma"], u["ggbeta"], d["dy"], x, g, b, mean, invstd,
                                2, SLOPE)
    ref = ref_double_backward(u["ggx"], u["gggamma"], u["ggbeta"], d["dy"], x, g, b, 2, EPS, SLOPE)
    for name, a, r in zip(("gx", "ggamma", "gdy"), got, ref):
        compare(name, a, r, 1e-10)


@inner
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_lslr(tb, dtype_name):
    import torch
    from _bn_reference import compare, ref_lslr_backward, ref_lslr_forward

    dtype = getattr(torch, dtype_name)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    gen = torch.Generator().manual_seed(2)
    T, S, step = 3, 4, 2
    shapes = [(4, 3, 3, 3), (4,), (2, 5), (300,)]
    shared = [True, False, True, False]
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    grads = [rnd(T, *s) for s in shapes]
    thetas = [rnd(*s) if sh else rnd(T, *s) for s, sh in zip(shapes, shared)]
    alphas = [rnd(S + 1).abs() for _ in shapes]
    douts = [rnd(T, *s) for s in shapes]
    outs = tb.lslr_forward(thetas, grads, alphas, step)
    for l, (o, r) in enumerate(zip(outs, ref_lslr_forward(thetas, grads, alphas, step))):
        compare(f"out[{l}]", o, r, tol)
    douts[1] = None
    full = [d if d is not None else torch.zeros_like(g) for d, g in zip(douts, grads)]
    dth, dgr, dal = tb.lslr_backward(douts, grads, alphas, step, shared)
    rth, rgr, ral = ref_lslr_backward(full, grads, alphas, step, shared)
    for l in range(len(shapes)):
        compare(f"dtheta[{l}]", dth[l], rth[l], tol)
        compare(f"dgrad[{l}]", dgr[l], rgr[l], tol)
        compare(f"dalpha[{l}]", dal[l], ral[l], tol)
    assert dth[3] is douts[3]


@inner
def test_lslr_layouts(tb):
    """Operands in the Triton weight gradient's layout, in another, and not dense (tests/_bn_reference.py)."""
    import torch
    from _bn_reference import check_lslr_layouts
    seed = int(os.environ.get("MAMLPP_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed} (rerun with MAMLPP_TEST_SEED={seed})")
    check_lslr_layouts(tb, torch.Generator().manual_seed(seed))


@inner
def test_bad_inputs(tb):
    import torch

    x = torch.randn(2, 6, 2, 2)
    g, b = torch.ones(3), torch.zeros(3)
    with pytest.raises(ValueError, match="x must be contiguous"):
        tb.bn_forward(x.transpose(2, 3), g, b, 2, EPS, SLOPE)
    with pytest.raises(ValueError, match="num_tasks=4 does not divide"):
        tb.bn_forward(x, g, b, 4, EPS, SLOPE)
    with pytest.raises(ValueError, match=r"gamma must be \(C,\)"):
        tb.bn_forward(x, torch.ones(2), torch.zeros(2), 2, EPS, SLOPE)
    with pytest.raises(ValueError, match="step 5 out of range for alphas"):
        tb.lslr_forward([torch.ones(3)], [torch.ones(2, 3)], [torch.ones(5)], 5)


@inner
def test_block_config_heuristic():
    import torch
    from mamlpp_fast.triton.per_step_bn import bn_block_config
    from mamlpp_fast.triton.lslr import lslr_block_config

    cfg = bn_block_config(20 * 28 * 28, 512, torch.device("cpu"))
    assert cfg["BLOCK"] == 1024 and cfg["CHUNKS"] == 1 and cfg["num_warps"] == 4
    assert bn_block_config(9, 64, torch.device("cpu"))["BLOCK"] == 16
    assert lslr_block_config(10)["BLOCK"] == 128 and lslr_block_config(10 ** 6)["BLOCK"] == 2048


# ---- implicit-GEMM convolution (mamlpp_fast/triton/conv.py) --------------------------------------------
CONV_SHAPES = [(3, 2, 3, 4, 9, 3, 1, 1), (4, 3, 1, 5, 8, 3, 1, 1), (2, 2, 2, 3, 9, 3, 2, 1),
               (2, 2, 3, 2, 7, 3, 1, 0), (5, 1, 4, 4, 6, 3, 1, 1), (3, 2, 17, 20, 5, 3, 1, 1)]


@inner
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=[str(s) for s in CONV_SHAPES])
def test_triton_conv_to_second_order(shape, dtype):
    """Forward, first and second derivatives of task_conv2d(impl="triton") against per-task
    convolutions in float64 (tests/test_conv.py's derivatives and tolerances; the last shape has more
    channels than one column tile and a reduction longer than one K block)."""
    import torch
    from _batches import fresh_seed
    from test_conv import FP32_RTOL, FP64_RTOL, derivatives, make_inputs, per_task_reference, rel
    from mamlpp_fast.ops.conv import task_conv2d

    seed = fresh_seed() % 2 ** 31
    x, w, bias, b, s, p = make_inputs(shape, torch.float64, seed)
    ref = derivatives(lambda: per_task_reference(x, w, bias, b, s, p), x, w, bias, seed)
    dt = getattr(torch, dtype)
    xd, wd, bd = (t.detach().to(dt).requires_grad_(True) for t in (x, w, bias))
    got = derivatives(lambda: task_conv2d(xd, wd, bd, b, s, p, "triton"), xd, wd, bd, seed)
    tol = FP64_RTOL if dtype == "float64" else FP32_RTOL
    for name, a, r in zip(["out", "dx", "dw", "dbias", "ddx", "ddw", "ddbias"], got, ref):
        assert a.dtype == dt and rel(a, r) < tol, f"{name}: {rel(a, r):.3e} (seed {seed})"


@inner
def test_triton_conv_gradcheck_and_gradgradcheck():
    """float64 gradcheck and gradgradcheck in fast mode (random projections of the Jacobians: the full
    Jacobians took 7.6 minutes of interpreter time here; the full ones run on a GPU in tests/gpu)."""
    import torch
    from test_conv import make_inputs
    from mamlpp_fast.ops.conv_triton_autograd import task_conv2d_triton

    for shape in [(2, 2, 2, 3, 5, 3, 1, 1), (2, 1, 2, 2, 5, 3, 2, 1)]:
        x, w, bias, b, s, p = make_inputs(shape, torch.float64, 5)
        fn = lambda x_, w_, b_: task_conv2d_triton(x_, w_, b_, b, (s, s), (p, p))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, bias), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x, w, bias), fast_mode=True)


@inner
@pytest.mark.parametrize("chans,split,gather_mk,trans", [(16, 1, False, False), (16, 4, True, False),
                                                         (48, 5, True, False), (20, 3, False, False),
                                                         (48, 5, True, True)],
                         ids=["one-chunk", "split-crosses-pairs", "c48-subtiles-split", "uneven-k-split",
                              "c48-pixels-by-channels-split"])
def test_triton_conv_dual_forward(monkeypatch, chans, split, gather_mk, trans):
    """conv_forward(x, w, bias, x2=, w2=) = F(x, w) + F(x2, w2) + bias in one launch, float64, against two
    plain launches: chunks that start in the second pair's taps or cross into them (SPLIT 4 of 18 steps:
    chunks of 5), 48-channel sub-tiles, a channel count that is not a multiple of BLOCK_K, the 48-channel
    product formed pixels by channels (TRANS, tf32x3's tiles; forced here in float64, whose layout logic is
    the same); and a SMALL layer (two launches and an add); mismatched shapes are refused."""
    import torch
    from mamlpp_fast.triton import conv as C

    force = dict(SPLIT=split, GATHER_MK=gather_mk)
    if trans:
        force.update(TRANS=True, BLOCK_M=128, BLOCK_N=16, NSUB=3, num_warps=4)
    monkeypatch.setattr(C, "conv_block_config", _forced(C.conv_block_config, force))
    seed = int(os.environ.get("MAMLPP_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed} (rerun with MAMLPP_TEST_SEED={seed})")
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *sh: torch.randn(*sh, generator=gen, dtype=torch.float64)  # noqa: E731
    b, n, h = 2, 3, 5
    meta = (b, chans, chans, 3, 3, h, h, h, h, 1, 1)
    x, x2 = rnd(n, b * chans, h, h), rnd(n, b * chans, h, h)
    w, w2, bias = rnd(b, chans, chans, 3, 3), rnd(b, chans, chans, 3, 3), rnd(b, chans)
    launches = []
    real = C._conv_fwd_kernel
    monkeypatch.setattr(C, "_conv_fwd_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        lambda *a, **k: (launches.append(k.get("DUAL", False)), real[grid](*a, **k)))})())
    got = C.conv_forward(x, w, bias, meta, x2=x2, w2=w2)
    assert launches == [True]
    want = C.conv_forward(x, w, bias, meta) + C.conv_forward(x2, w2, None, meta)
    # two float64 sums of 2 * 9 * chans products in different orders: each within 2*9*chans ulps of sum |terms|
    bound = 2 * 18 * chans * 2 ** -52 * (torch.nn.functional.conv2d(x.abs(), w.abs().reshape(-1, chans, 3, 3),
                                                                    padding=1, groups=b)
                                         + torch.nn.functional.conv2d(x2.abs(), w2.abs().reshape(-1, chans, 3, 3),
                                                                      padding=1, groups=b) + bias.abs().reshape(1, -1, 1, 1))
    assert ((got - want).abs() <= bound).all(), f"off by {(got - want).abs().max():.3e}"
    # SMALL (1 input channel: the whole reduction in one block): two launches and an add
    launches.clear()
    m1 = (b, 4, 1, 3, 3, h, h, h, h, 1, 1)
    xs, xs2, ws, ws2 = rnd(n, b, h, h), rnd(n, b, h, h), rnd(b, 4, 1, 3, 3), rnd(b, 4, 1, 3, 3)
    got = C.conv_forward(xs, ws, None, m1, x2=xs2, w2=ws2)
    assert launches == [False, False]
    assert torch.equal(got, C.conv_forward(xs, ws, None, m1) + C.conv_forward(xs2, ws2, None, m1))
    with pytest.raises(ValueError, match="the second pair must have the first's shapes"):
        C.conv_forward(x, w, None, meta, x2=x[:1], w2=w2)


@inner
def test_triton_conv_dual_gradcheck_and_gradgradcheck():
    """float64 gradcheck and gradgradcheck (fast mode) of the dual forward F(x, w) + F(x2, w2) + bias
    (`_ConvF2`), whose backward is two `_ConvGrads` nodes, and of the backward node itself. A fixed seed,
    as the other gradchecks here: the interpreter makes each run a minute."""
    import torch
    from mamlpp_fast.ops.conv_triton_autograd import _ConvF2, _ConvGrads

    gen = torch.Generator().manual_seed(7)
    rnd = lambda *sh: torch.randn(*sh, generator=gen, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    b, ci, co, n, h = 2, 2, 3, 1, 3
    meta = (b, co, ci, 3, 3, h, h, h, h, 1, 1)
    args = (rnd(n, b * ci, h, h), rnd(b, co, ci, 3, 3), rnd(n, b * ci, h, h), rnd(b, co, ci, 3, 3), rnd(b, co))
    fn = lambda x, w, x2, w2, bias: _ConvF2.apply(x, w, x2, w2, bias, meta)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)
    x, w, gy = args[0], args[1], rnd(n, b * co, h, h)
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        g = lambda x_, gy_, w_: _ConvGrads.apply(x_, gy_, w_, meta, *need)  # noqa: E731
        assert torch.autograd.gradcheck(g, (x, gy, w), fast_mode=True), need
    assert torch.autograd.gradgradcheck(g, (x, gy, w), fast_mode=True)  # the bias-only one: its expand


@inner
def test_triton_conv_weight_saved_routes_the_second_order_weight_term():
    """task_conv2d(impl="triton", weight_saved=w2): the backward node reads w2 (an alias of w in the
    learner, mamlpp_fast.ops.fanout; here a separate leaf of the same values), so the second-order term
    of the weight goes to w2 and the forward's to w; their sum is the gradient without w2 (one addition
    either way: at most 2 u (|a| + |b|) apart), and x's and the bias's are the same computation."""
    import torch
    from _batches import fresh_seed
    from mamlpp_fast.ops.conv import task_conv2d

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *sh: torch.randn(*sh, generator=gen, dtype=torch.float64)  # noqa: E731
    b, ci, co, n, h = 2, 2, 3, 2, 5
    x, w, bias = rnd(n, b * ci, h, h).requires_grad_(), rnd(b, co, ci, 3, 3).requires_grad_(), rnd(b, co).requires_grad_()
    proj, wts = rnd(n, b * co, h, h), [rnd(*p.shape) for p in (x, w, bias)]

    def run(saved):
        y = task_conv2d(x, w, bias, b, 1, 1, "triton", weight_saved=saved)
        first = torch.autograd.grad((y * proj).sum(), [x, w, bias], create_graph=True)
        scalar = sum((f * v).sum() for f, v in zip(first, wts)) + (y.tanh() * proj).sum()
        return torch.autograd.grad(scalar, [x, w, bias] + ([saved] if saved is not None else []))

    ref = run(None)
    got = run(w.detach().clone().requires_grad_())
    bound = 2 * 2.0 ** -53 * (got[1].abs() + got[3].abs())
    assert float(got[3].abs().max()) > 0 and torch.all((got[1] + got[3] - ref[1]).abs() <= bound), f"seed {seed}"
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2]), f"seed {seed}"
    with pytest.raises(ValueError, match="weight_saved"):
        task_conv2d(x, w, bias, b, 1, 1, "triton", weight_saved=w.detach()[:1])


@inner
def test_triton_conv_bad_inputs_and_block_config(monkeypatch):
    import torch
    from mamlpp_fast.ops.conv_triton_autograd import task_conv2d_triton
    from mamlpp_fast.triton import conv as C
    from mamlpp_fast.triton.conv import conv_block_config

    x, w = torch.randn(2, 4, 5, 5), torch.randn(2, 3, 2, 3, 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        task_conv2d_triton(x.half(), w.half(), None, 2, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="square stride and padding"):
        task_conv2d_triton(x, w, None, 2, (1, 2), (1, 1))
    with pytest.raises(ValueError, match="at most 32 filter taps"):
        task_conv2d_triton(torch.randn(2, 4, 9, 9), torch.randn(2, 3, 2, 7, 7), None, 2, (1, 1), (3, 3))
    # Omniglot layer 2 (x (20, 512, 14, 14)): 64-row tiles reach 2 waves on 132 SMs without a split; the
    # gather k-major in 16-channel steps under Triton >= 3.7, pixel-major in 32-channel steps before
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 7))
    assert conv_block_config("fwd", 20 * 196, 64, 64, 9, 8, 132) == dict(
        BLOCK_M=64, BLOCK_N=64, NSUB=1, BLOCK_K=16, SPLIT=1, CHUNK=36, SMALL=False, GATHER_MK=False, num_warps=4)
    assert not conv_block_config("dgrad", 20 * 196, 64, 64, 9, 8, 132)["W_FWD"]
    # its 3x3 layer: 32-row tiles and the 36 (tap, channel-block) steps split in 6 chunks
    cfg = conv_block_config("fwd", 20 * 9, 64, 64, 9, 8, 132)
    assert (cfg["BLOCK_M"], cfg["SPLIT"], cfg["CHUNK"]) == (32, 6, 6)
    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    assert conv_block_config("fwd", 20 * 196, 64, 64, 9, 8, 132) == dict(
        BLOCK_M=64, BLOCK_N=64, NSUB=1, BLOCK_K=32, SPLIT=1, CHUNK=18, SMALL=False, GATHER_MK=True, num_warps=4)
    cfg = conv_block_config("dgrad", 20 * 9, 64, 64, 9, 8, 132)  # 18 steps of 32 channels in 6 chunks
    assert (cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["SPLIT"], cfg["CHUNK"]) == (32, 32, 6, 3)
    assert cfg["W_FWD"] and "W_FWD" not in conv_block_config("fwd", 20 * 9, 64, 64, 9, 8, 132)
    # 48 channels stay in 16-channel steps (32 would pad a third of the reduction with zeros)
    assert conv_block_config("dgrad", 75 * 42 * 42, 48, 48, 9, 2, 132)["BLOCK_K"] == 16
    # the weight gradient under Triton < 3.7: one tap's 64 channels per column tile, 32 lanes per step where
    # 2 waves of >= 2-step chunks remain (14 x 14), 16 where not (3 x 3: 180 lanes); 48 channels not tap-major
    wcfg = C.wgrad_block_config(64, 64, 9, 20 * 196, 8, 132)
    assert (wcfg["TAP_MAJOR"], wcfg["BLOCK_N"], wcfg["BLOCK_K"]) == (True, 64, 32)
    assert C.wgrad_block_config(64, 64, 9, 20 * 9, 8, 132)["BLOCK_K"] == 16
    # ... but 32 in strict fp32 (2 warps), whose 216 programs balance over 132 SMs as well as 16 lanes' 432
    w3 = C.wgrad_block_config(64, 64, 9, 20 * 9, 8, 132, strict_fp32=True)
    assert (w3["BLOCK_K"], w3["SPLIT"], w3["CHUNK"], w3["num_warps"]) == (32, 3, 64, 2)
    # where 32 lanes' programs would balance worse, 16 stay (72 tiles x 2 chunks of 64 = 144 programs on 132
    # SMs: 55% of the SMs' turns, against 72 x 4 = 288: 73%)
    assert C.wgrad_block_config(64, 64, 9, 128, 8, 132, strict_fp32=True)["BLOCK_K"] == 16
    assert not C.wgrad_block_config(48, 48, 9, 5 * 441, 2, 132)["TAP_MAJOR"]
    monkeypatch.setattr(C, "wgrad_block_config", lambda *a, **k: dict(wcfg, BLOCK_N=64))
    with pytest.raises(ValueError, match="TAP_MAJOR needs one sub-tile and Ci a multiple of BLOCK_N"):
        C.conv_weight_grad(torch.randn(2, 2 * 48, 5, 5), torch.randn(2, 2 * 64, 5, 5),
                           (2, 64, 48, 3, 3, 5, 5, 5, 5, 1, 1))
    # the first layer (1 input channel): the whole reduction in one block, no split
    cfg = conv_block_config("fwd", 20 * 784, 64, 1, 9, 8, 132)
    assert cfg["SMALL"] and cfg["BLOCK_K"] == 16 and cfg["SPLIT"] == 1
    # 48 channels: three 16-column sub-tiles per program (no idle lanes)
    cfg = conv_block_config("dgrad", 75 * 42 * 42, 48, 48, 9, 2, 132)
    assert (cfg["BLOCK_N"], cfg["NSUB"]) == (16, 3)


@inner
def test_learner_with_triton_convolutions_matches_reference_float64():
    """The fast learner with conv_impl="triton" (and the triton BN/LSLR backend: every op of the
    inner loop on our kernels) against the reference learner, float64, from the same state."""
    from _batches import fresh_seed
    from test_fast_equivalence import batch_for, compare, make_pair

    seed = fresh_seed()
    cfg = dict(cnn_num_filters=4, num_stages=2, image_height=8, image_width=8, num_classes_per_set=3,
               number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2, conv_impl="triton")
    ref, fast, args = make_pair("float64", "torch", **cfg)
    compare(ref, fast, batch_for(args, 2, seed), 0, "float64", seed)


@inner
def test_learner_with_device_launch_configurations_matches_reference_float64(monkeypatch):
    """As above with the launch configurations of the device machines' Triton (< 3.7: pixel-major gathers,
    tap-major and [k, o]-stored weight gradients, the data gradient reading the forward's weight layout)
    and 48 filters, whose weight gradients run as three 16-row sub-tiles with the lanes inside the image
    in their own loop (INSIDE, forced: the launcher sets it for strict float32 only)."""
    from _batches import fresh_seed
    from test_fast_equivalence import batch_for, compare, make_pair
    from mamlpp_fast.triton import conv as C

    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    real_cfg, real_table, inside_steps = C.wgrad_block_config, C._lane_table, []

    def cfg_inside(*a, **k):
        cfg = real_cfg(*a, **k)
        return dict(cfg, INSIDE=cfg["NSUB"] == 3)

    def table(n, meta, device):  # records the whole BLOCK_K = 16 steps of inside lanes of 48-channel launches
        t, ri = real_table(n, meta, device)
        if meta[1] == 48 and meta[2] == 48:
            inside_steps.append(ri // 16)
        return t, ri
    monkeypatch.setattr(C, "wgrad_block_config", cfg_inside)
    monkeypatch.setattr(C, "_lane_table", table)
    seed = fresh_seed()
    cfg = dict(cnn_num_filters=48, num_stages=2, image_height=12, image_width=12, num_classes_per_set=3,
               number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2, conv_impl="triton")
    ref, fast, args = make_pair("float64", "torch", **cfg)
    compare(ref, fast, batch_for(args, 2, seed), 0, "float64", seed)
    assert inside_steps and max(inside_steps) >= 2, inside_steps  # the unmasked loop ran


@inner
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_registered_ops_opcheck_triton(dtype):
    """torch.library.opcheck of the registered ops (torch.ops.mamlpp.*, mamlpp_fast/ops/library.py)
    with backend="triton", on CPU tensors under the interpreter: schema, fake implementation, autograd
    registration and AOT dispatch, for the needs variants the learner uses."""
    import torch
    import mamlpp_fast.ops  # noqa: F401  (registers torch.ops.mamlpp.*)

    M, dt = torch.ops.mamlpp, getattr(torch, dtype)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 3, 3, dtype=dt, generator=g).requires_grad_()
    gamma = (torch.rand(2, 3, dtype=dt, generator=g) + 0.5).requires_grad_()
    beta = (torch.randn(2, 3, dtype=dt, generator=g) * 0.1).requires_grad_()
    torch.library.opcheck(M.bn_forward.default, (x, gamma, beta, 2, EPS, SLOPE, "triton"))
    with torch.no_grad():
        _, mean, invstd = M.bn_forward(x, gamma, beta, 2, EPS, SLOPE, "triton")
    dy = torch.randn_like(x).requires_grad_()
    for needs in ([True, True, True], [True, False, False]):
        torch.library.opcheck(M.bn_backward.default, (dy, x, gamma, beta, mean, invstd, 2, SLOPE, needs, "triton"))
    plain = [t.detach() for t in (dy, x, gamma, beta)]
    u, ug, ub = torch.randn_like(x), torch.randn_like(gamma), torch.randn_like(beta)
    for gg in ((u, ug, ub), (u, None, None)):
        torch.library.opcheck(M.bn_double_backward.default,
                              (*gg, *plain, mean, invstd, 2, SLOPE, [True, True, True], "triton"))
    thetas = [torch.randn(3, 2, dtype=dt, generator=g).requires_grad_(),
              torch.randn(2, 3, 2, dtype=dt, generator=g).requires_grad_()]
    grads = [torch.randn(2, 3, 2, dtype=dt, generator=g).requires_grad_() for _ in range(2)]
    alphas = [torch.rand(4, dtype=dt, generator=g).requires_grad_() for _ in range(2)]
    torch.library.opcheck(M.lslr_forward.default, (thetas, grads, alphas, 1, "triton"))
    douts = [torch.randn(2, 3, 2, dtype=dt, generator=g) for _ in range(2)]
    plain_g, plain_a = [t.detach() for t in grads], [t.detach() for t in alphas]
    for needs in ([True, False, True, True, True, True], [True, False, False, False, True, True]):
        torch.library.opcheck(M.lslr_backward.default,
                              (douts, plain_g, plain_a, 1, [True, False], needs, "triton"))


# ---- every launch path of the convolution kernels (forced block configurations) ------------------------
def _forced(real, over):
    """A launch heuristic that returns `real`'s configuration with the keys of `over` replaced and the
    chunking (CHUNK, SPLIT) recomputed for the forced SPLIT and block sizes."""
    import triton

    def fwd_dgrad(kind, rows, cols, chans, kk, tasks, sms, **kw):
        cfg = real(kind, rows, cols, chans, kk, tasks, sms, **kw)
        cfg.update(over)
        steps = 1 if cfg["SMALL"] else kk * triton.cdiv(chans, cfg["BLOCK_K"])
        cfg["CHUNK"] = triton.cdiv(steps, cfg["SPLIT"])
        cfg["SPLIT"] = triton.cdiv(steps, cfg["CHUNK"])
        return cfg

    def wgrad(co, ci, kk, red, tasks, sms, **kw):
        cfg = real(co, ci, kk, red, tasks, sms, **kw)
        cfg.update(over)
        bk = cfg["BLOCK_K"]
        cfg["CHUNK"] = triton.cdiv(triton.cdiv(red, cfg["SPLIT"]), bk) * bk
        cfg["SPLIT"] = triton.cdiv(red, cfg["CHUNK"])
        return cfg

    return fwd_dgrad if real.__name__ == "conv_block_config" else wgrad


def _conv_case_f64(shape, seed):
    """Float64 inputs of one per-task convolution (n, B, Cin, Cout, H, k, stride, pad) drawn from `seed`:
    (x, w, bias, gy, (the per-task reference's output, its x and w gradients for gy), meta)."""
    import torch
    from test_conv import per_task_reference

    n, b, ci, co, h, k, s, p = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, b * ci, h, h, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(b, co, ci, k, k, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(b, co, generator=gen, dtype=torch.float64)
    ref = per_task_reference(x, w, bias, b, s, p)
    gy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    gx, gw = torch.autograd.grad(ref, (x, w), gy)
    ho = ref.shape[2]
    return x, w, bias, gy, (ref.detach(), gx, gw), (b, co, ci, k, k, h, h, ho, ho, s, p)


# (n, B, Cin, Cout, H, k, stride, pad), forward/data-gradient overrides, weight-gradient overrides
CONV_PATHS = [
    ((2, 2, 48, 48, 4, 3, 1, 1), dict(BLOCK_M=16, BLOCK_N=16, NSUB=3, SPLIT=1),
     dict(BLOCK_M=64, BLOCK_N=128, NSUB=1, SPLIT=1)),
    ((2, 2, 48, 48, 4, 3, 1, 1), dict(BLOCK_M=16, BLOCK_N=16, NSUB=1, SPLIT=4),
     dict(BLOCK_M=16, BLOCK_N=64, SPLIT=3)),
    ((3, 2, 3, 5, 7, 3, 2, 1), dict(SPLIT=1), dict(SPLIT=1)),
    ((2, 1, 3, 48, 5, 3, 1, 1), dict(BLOCK_M=16), {}),
    ((3, 2, 3, 5, 7, 3, 2, 1), dict(SMALL=False, BLOCK_K=16, BLOCK_M=16, NSUB=1, SPLIT=2),
     dict(BLOCK_N=16, SPLIT=2)),
    ((2, 2, 20, 17, 5, 3, 2, 1), dict(BLOCK_M=16, BLOCK_N=16, NSUB=3, SPLIT=5),
     dict(BLOCK_M=16, BLOCK_N=32, NSUB=3, SPLIT=2)),
    ((2, 1, 16, 32, 6, 3, 1, 0), dict(BLOCK_M=32, BLOCK_N=32, NSUB=1, SPLIT=1),
     dict(BLOCK_M=32, BLOCK_N=64, SPLIT=1)),
    ((2, 2, 48, 48, 4, 3, 1, 1), dict(BLOCK_M=16, BLOCK_N=16, NSUB=3, SPLIT=2),
     dict(BLOCK_M=16, BLOCK_N=16, NSUB=3, SPLIT=2)),
    ((2, 2, 64, 64, 5, 3, 1, 1), dict(BLOCK_M=16, BLOCK_N=64, NSUB=1, BLOCK_K=32, GATHER_MK=True, W_FWD=True, SPLIT=3),
     {}),
    ((2, 2, 20, 17, 5, 3, 2, 1), dict(BLOCK_M=16, BLOCK_N=16, NSUB=3, BLOCK_K=32, GATHER_MK=True, W_FWD=True, SPLIT=1),
     {}),
    ((2, 2, 48, 48, 4, 3, 1, 0), dict(BLOCK_M=32, BLOCK_N=16, NSUB=3, GATHER_MK=True, W_FWD=True, SPLIT=2), {}),
    ((2, 2, 48, 48, 4, 3, 1, 1), dict(BLOCK_M=16, BLOCK_N=16, NSUB=3, W_FWD=True, SPLIT=2), {}),
    ((2, 2, 32, 16, 5, 3, 1, 1), {}, dict(BLOCK_M=16, BLOCK_N=16, NSUB=1, TAP_MAJOR=True, SPLIT=2)),
    ((3, 2, 16, 5, 7, 3, 2, 1), {}, dict(BLOCK_M=16, BLOCK_N=16, NSUB=1, BLOCK_K=32, TAP_MAJOR=True, SPLIT=1)),
    ((2, 2, 20, 17, 5, 3, 2, 1), {}, dict(BLOCK_M=16, BLOCK_N=32, NSUB=3, SPLIT=2, STORE_KO=True)),
    ((2, 2, 48, 48, 4, 3, 1, 1), {}, dict(BLOCK_M=64, BLOCK_N=128, NSUB=1, SPLIT=3, STORE_KO=True)),
    # 3 x 8 x 8 lanes, 108 with every tap inside: chunks of 64 lanes all inside, across the boundary (96)
    # and all outside it
    ((3, 2, 48, 48, 8, 3, 1, 1), {}, dict(BLOCK_M=16, BLOCK_N=64, NSUB=3, SPLIT=3, STORE_KO=True, INSIDE=True)),
    # padding 0: every lane inside, the chunk's partial last step through the masked loop
    ((2, 2, 20, 17, 9, 3, 1, 0), {}, dict(BLOCK_M=16, BLOCK_N=32, NSUB=3, SPLIT=2, INSIDE=True)),
    # tf32x3's 48-channel tiles: the forward and data gradient formed pixels by channels (TRANS), 128 pixel
    # rows, split, pixel-major gather with the data gradient on the forward's weight layout; and with the
    # stride-2 tails of 20 / 17 channels (two column tiles of 48, masked)
    ((2, 2, 48, 48, 6, 3, 1, 1), dict(TRANS=True, BLOCK_M=128, BLOCK_N=16, NSUB=3, GATHER_MK=True, W_FWD=True,
                                      SPLIT=3, num_warps=4), {}),
    ((2, 2, 20, 17, 5, 3, 2, 1), dict(TRANS=True, BLOCK_M=128, BLOCK_N=16, NSUB=3, SPLIT=2, num_warps=4), {}),
    # and the first layer's one-step forward (3 input channels, SMALL) at 48 output channels
    ((2, 1, 3, 48, 5, 3, 1, 1), dict(TRANS=True, BLOCK_M=128, BLOCK_N=16, NSUB=3, num_warps=4), {}),
    # tf32x3's 48-channel weight gradient formed columns by channels (TRANS): 128 columns of K = 432 (the
    # last tile masked) by three 16-channel sub-tiles, stored [k, o], the lanes inside the image in their own
    # loop across a chunk boundary, split; the stride-2 tails stored [o, k] through the masked loop only;
    # padding 0 (every lane inside)
    ((3, 2, 48, 48, 8, 3, 1, 1), {}, dict(TRANS=True, BLOCK_M=16, BLOCK_N=128, NSUB=3, SPLIT=3, STORE_KO=True,
                                          INSIDE=True, num_warps=4)),
    ((2, 2, 20, 17, 5, 3, 2, 1), {}, dict(TRANS=True, BLOCK_M=16, BLOCK_N=64, NSUB=3, SPLIT=2, STORE_KO=False,
                                          num_warps=4)),
    ((2, 2, 20, 17, 9, 3, 1, 0), {}, dict(TRANS=True, BLOCK_M=16, BLOCK_N=64, NSUB=3, SPLIT=2, INSIDE=True,
                                          num_warps=4)),
]
CONV_PATH_IDS = ["c48-subtiles-nosplit", "c48-tiles16-split", "cin3-small-s2", "cin3-small-c48-subtiles",
                 "cin3-taps-s2-split", "tails-subtiles-s2-split5", "pad0-even", "k-multiple-of-tile",
                 "pixel-major-k32-split", "pixel-major-k32-tails-s2", "pixel-major-c48-pad0-split",
                 "dgrad-forward-layout-c48-subtiles",
                 "wgrad-tap-major-split", "wgrad-tap-major-lanes32-s2-row-tails",
                 "wgrad-store-ko-subtiles-tails-s2", "wgrad-store-ko-split", "wgrad-inside-lanes-split3",
                 "wgrad-pad0-all-inside", "pixels-by-channels-c48-split", "pixels-by-channels-tails-s2",
                 "pixels-by-channels-cin3-small-c48", "wgrad-cols-by-channels-c48-inside-split3",
                 "wgrad-cols-by-channels-tails-s2-store-ok", "wgrad-cols-by-channels-pad0-all-inside"]


@pytest.mark.parametrize("n,h,w,k,stride,pad", [(3, 8, 8, 3, 1, 1), (2, 7, 9, 3, 2, 1), (2, 5, 5, 3, 1, 0),
                                               (1, 3, 3, 3, 1, 1), (2, 6, 6, 5, 1, 2)])
def test_wgrad_lane_table_lists_the_lanes_inside_first(n, h, w, k, stride, pad):
    """The weight gradient's lane table: every lane (i, y, z) once, its entries as defined (g offset, x offset
    of tap (0, 0), one bit per tap inside the image), the RI lanes whose every tap is inside first and
    the others after, each group in (i, y, z) order; RI counted from the geometry equals the count of
    full bit sets (the kernel reads those lanes without a tap mask)."""
    import torch
    from mamlpp_fast.triton import conv as C

    b, co, ci = 2, 3, 4
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    meta = (b, co, ci, k, k, h, w, ho, wo, stride, pad)
    table, ri = C._lane_table(n, meta, torch.device("cpu"))
    assert table.dtype == torch.int32 and table.shape == (3, n * ho * wo)
    want = {}
    for i in range(n):
        for y in range(ho):
            for z in range(wo):
                bits = sum(1 << (p * k + q) for p in range(k) for q in range(k)
                           if 0 <= y * stride - pad + p < h and 0 <= z * stride - pad + q < w)
                want[(i * b * co * ho * wo + y * wo + z, i * b * ci * h * w + (y * stride - pad) * w + z * stride - pad,
                      bits)] = (i, y, z)
    rows = [tuple(int(v) for v in table[:, j]) for j in range(table.shape[1])]
    assert sorted(rows) == sorted(want)  # every lane once, as defined
    full = (1 << (k * k)) - 1
    assert ri == sum(r[2] == full for r in rows)
    assert all(r[2] == full for r in rows[:ri]) and all(r[2] != full for r in rows[ri:])
    for part in (rows[:ri], rows[ri:]):
        assert [want[r] for r in part] == sorted(want[r] for r in part)


@inner
@pytest.mark.parametrize("case", CONV_PATHS, ids=CONV_PATH_IDS)
def test_triton_conv_launch_paths(case, monkeypatch):
    """Forward, data gradient and weight gradient of the Triton kernels against autograd of per-task
    convolutions, float64, with block configurations forced onto each code path: 48 channels as three
    16-column sub-tiles of one program (NSUB=3) and as three programs (NSUB=1), the weight gradient's
    48 rows as three 16-row sub-tiles and as one 64-row tile with an idle tail, split reductions
    (forward/data gradient over (tap, channel-block) steps, weight gradient over pixels) on and off,
    sub-tiles idle at channel tails, the bias gradient summed in the weight-gradient launch (through a
    ones column of the last k tile, and by row sums where K = Ci*9 is a multiple of the tile: the last case),
    3 input channels in one reduction block (SMALL) and through the tap loop, channel tails (20 = 16 + 4
    input, 17 output channels), stride 2, padding 0; the weight gradient's tile stored as [o, k] and as
    [k, o] (STORE_KO, and TAP_MAJOR)."""
    from test_conv import rel
    from mamlpp_fast.triton import conv as C

    shape, over_f, over_w = case
    monkeypatch.setattr(C, "conv_block_config", _forced(C.conv_block_config, over_f))
    monkeypatch.setattr(C, "wgrad_block_config", _forced(C.wgrad_block_config, over_w))
    n, b, ci, co, h, k, s, p = shape
    x, w, bias, gy, (ref, gx, gw), meta = _conv_case_f64(shape, sum(shape))
    got = (C.conv_forward(x.detach(), w.detach(), bias, meta), C.conv_data_grad(gy, w.detach(), meta),
           C.conv_weight_grad(x.detach(), gy, meta))
    for name, a, r in zip(("forward", "data gradient", "weight gradient"), got, (ref, gx, gw)):
        assert a.shape == r.shape and rel(a, r) < 1e-12, f"{name}: {rel(a, r):.3e}"
    # the weight gradient with the bias's summed in the same launch (programs of the first k tile)
    dw, db = C.conv_weight_grad(x.detach(), gy, meta, with_bias=True)
    want_db = gy.reshape(n, b, co, -1).sum((0, 3))
    assert rel(dw, gw) < 1e-12 and db.shape == want_db.shape and rel(db, want_db) < 1e-12, \
        f"with bias: dw {rel(dw, gw):.3e}, db {rel(db, want_db):.3e}"


SPLIT_SUM_CASES = [CONV_PATHS[1], CONV_PATHS[5],
                   ((2, 1, 16, 32, 6, 3, 1, 0), dict(BLOCK_M=32, BLOCK_N=32, NSUB=1, SPLIT=3),
                    dict(BLOCK_M=32, BLOCK_N=64, NSUB=1, SPLIT=3, num_warps=4)),
                   ((2, 1, 32, 32, 10, 3, 1, 1), dict(BLOCK_M=32, BLOCK_N=32, NSUB=1, BLOCK_K=32, GATHER_MK=True, W_FWD=True, SPLIT=3),
                    dict(BLOCK_M=32, BLOCK_N=32, NSUB=1, BLOCK_K=32, TAP_MAJOR=True, SPLIT=3, num_warps=4)),
                   # tf32x3's turned 48-channel tiles (TRANS: pixels by channels, columns by channels)
                   ((3, 2, 48, 48, 8, 3, 1, 1), dict(TRANS=True, BLOCK_M=128, BLOCK_N=16, NSUB=3, SPLIT=3, num_warps=4),
                    dict(TRANS=True, BLOCK_M=16, BLOCK_N=128, NSUB=3, SPLIT=3, STORE_KO=True, INSIDE=True,
                         num_warps=4))]


@inner
@pytest.mark.parametrize("case", SPLIT_SUM_CASES, ids=["c48-tiles16-split", "tails-subtiles-split5", "wgrad-keeps-own",
                                                       "pixel-major-tap-major-keeps-own", "turned-tiles-split3"])
def test_triton_conv_split_sum_in_kernel(case, monkeypatch):
    """The split reductions' partials summed inside the kernels (the last chunk's program of each tile):
    in float32, bit-identical to adding the kernel's own partials in chunk order 0, 1, ... (the partials
    taken from a MAMLPP_CONV_SPLIT_SUM=separate launch), whichever chunk's program takes the last ticket
    (ROT rotates the chunks, so that the interpreter, which runs programs in order, ends each tile on
    another chunk), also where the weight gradient's last program adds its own partial from registers
    (`wgrad_keeps_own`, the third case) and with tf32x3's turned tiles (TRANS, the last case, whose
    accumulators are turned back before the partials are stored); the separate in-order torch sum agrees
    to float32 rounding; the
    tile counters are back to zero after every launch; an unknown MAMLPP_CONV_SPLIT_SUM value is refused
    by name."""
    import functools

    import torch
    from mamlpp_fast.triton import conv as C

    shape, over_f, over_w = case
    monkeypatch.setattr(C, "conv_block_config", _forced(C.conv_block_config, over_f))
    monkeypatch.setattr(C, "wgrad_block_config", _forced(C.wgrad_block_config, over_w))
    n, b, ci, co, h, k, s, p = shape
    gen = torch.Generator().manual_seed(7 + sum(shape))
    x = torch.randn(n, b * ci, h, h, generator=gen)
    w = torch.randn(b, co, ci, k, k, generator=gen)
    bias = torch.randn(b, co, generator=gen)
    ho = (h + 2 * p - k) // s + 1
    gy = torch.randn(n, b * co, ho, ho, generator=gen)
    meta = (b, co, ci, k, k, h, h, ho, ho, s, p)
    wcfg = C.wgrad_block_config(co, ci, k * k, n * ho * ho, b, C._sms(x.device))
    assert C.wgrad_keeps_own(wcfg) == (over_w.get("num_warps") == 4 and over_w.get("NSUB", 1) == 1)

    def wgrad():  # in the order of the kernel's result buffer: the forward's weight layout, then the bias's
        dw, db = C.conv_weight_grad(x, gy, meta, with_bias=True)  # (the bias's own programs)
        dw = dw.permute(0, 3, 4, 2, 1)
        assert dw.is_contiguous()
        return torch.cat([dw.reshape(-1), db.reshape(-1)])

    launches = {"forward": lambda: C.conv_forward(x, w, bias, meta),
                "data gradient": lambda: C.conv_data_grad(gy, w, meta), "weight gradient": wgrad}
    monkeypatch.setenv("MAMLPP_CONV_SPLIT_SUM", "separate")
    result = C._result
    parts, separate = {}, {}
    for name, f in launches.items():
        seen = []
        monkeypatch.setattr(C, "_result", lambda out, ws, sum_in: (seen.append((out, ws)), result(out, ws, sum_in))[1])
        separate[name] = f().reshape(-1)
        # one launch, split (no result buffer: the separate sum makes it) into more than one partial
        assert len(seen) == 1 and seen[0][0] is None and seen[0][1].shape[0] > 1, f"{name}: not one split launch"
        parts[name] = seen[0][1]
    monkeypatch.setattr(C, "_result", result)
    monkeypatch.setenv("MAMLPP_CONV_SPLIT_SUM", "kernel")
    for name, ws in parts.items():
        in_order = functools.reduce(torch.add, list(ws)).reshape(-1)
        err = (separate[name] - in_order).abs().max()
        assert err <= 4 * ws.shape[0] * 2 ** -24 * ws.abs().sum(0).max(), f"{name}: separate sum off by {err:.3e}"
        for rot in sorted({0, 1, ws.shape[0] - 1}):
            monkeypatch.setattr(C, "_CHUNK_ROT", [rot])
            got = launches[name]().reshape(-1)
            assert torch.equal(got, in_order), f"{name}, ROT {rot}: {(got - in_order).abs().max():.3e}"
            assert all(int(c.abs().sum()) == 0 for c in C._counters.values()), f"{name}, ROT {rot}: counters"
    monkeypatch.setenv("MAMLPP_CONV_SPLIT_SUM", "atomics")
    with pytest.raises(ValueError, match="MAMLPP_CONV_SPLIT_SUM"):
        C.conv_forward(x, w, bias, meta)


@inner
def test_long_split_chains_are_summed_apart(monkeypatch):
    """`split_chain_in_kernel`: a launch whose last program would chain more than IN_KERNEL_SUM_CHAIN
    dependent partial loads ((SPLIT - 1) x NSUB) leaves its partials to the launcher's separate sum (no
    result buffer, no ticket), a shorter one sums them in the kernel; both agree with the forward, data
    and weight gradients of the per-task reference (float64), and the counters stay at zero."""
    from test_conv import rel
    from mamlpp_fast.triton import conv as C

    one, three = dict(NSUB=1, num_warps=2), dict(NSUB=3, num_warps=2)
    assert C.split_chain_in_kernel(25, one) and not C.split_chain_in_kernel(26, one)
    assert C.split_chain_in_kernel(9, three, "fwd") and not C.split_chain_in_kernel(10, three, "fwd")
    assert C.split_chain_in_kernel(10, three, "wgrad") == (C._TRITON_VERSION >= (3, 7))
    x, w, bias, gy, (ref, gx, gw), meta = _conv_case_f64((30, 2, 48, 48, 4, 3, 1, 1), 11)
    result, real_f, real_w = C._result, C.conv_block_config, C.wgrad_block_config
    # forward / data gradient (three 16-channel sub-tiles): 27 k-steps (9 taps x 3 blocks of 16) in 9 or 14
    # chunks, chains of 24 (in the kernel) and 39 (apart); weight gradient (one 64-row tile: the 48-channel
    # sub-tiles keep their in-kernel sum under Triton >= 3.7): 480 lanes in 8 or 30 chunks, chains of 7 and 29
    for split, split_w, apart in ((9, 8, False), (14, 30, True)):
        over = dict(BLOCK_M=32, BLOCK_N=16, NSUB=3, BLOCK_K=16, SPLIT=split)
        monkeypatch.setattr(C, "conv_block_config", _forced(real_f, over))
        monkeypatch.setattr(C, "wgrad_block_config", _forced(real_w, dict(
            BLOCK_M=64, BLOCK_N=32, NSUB=1, BLOCK_K=16, SPLIT=split_w, TAP_MAJOR=False, INSIDE=False, num_warps=1)))
        seen = []
        monkeypatch.setattr(C, "_result", lambda out, ws, sum_in: (seen.append(sum_in), result(out, ws, sum_in))[1])
        got = (C.conv_forward(x.detach(), w.detach(), bias, meta), C.conv_data_grad(gy, w.detach(), meta),
               C.conv_weight_grad(x.detach(), gy, meta))
        assert seen == [not apart] * 3, (split, seen)
        for name, a, r in zip(("forward", "data gradient", "weight gradient"), got, (ref, gx, gw)):
            assert rel(a, r) < 1e-12, f"SPLIT {split}, {name}: {rel(a, r):.3e}"
        assert all(int(c.abs().sum()) == 0 for c in C._counters.values())


@inner
def test_conv_ab_variants_compute_the_convolution(monkeypatch):
    """bench.conv_ab's variants ("2x warps", "2x split") are launch configurations the kernels run
    exactly: with Triton 3.6's configuration rules for 8 SMs (so that a small 64-channel 7x7 layer has
    room to split further), each variant's forward, data and weight gradients (and the bias's) agree with
    the per-task reference in float64, and the split variant splits each launch into more chunks."""
    from test_conv import rel
    from bench import conv_ab as A
    from mamlpp_fast.triton import conv as C

    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    monkeypatch.setattr(C, "_sms", lambda device: 8)
    x, w, bias, gy, (ref, gx, gw), meta = _conv_case_f64((3, 2, 64, 64, 7, 3, 1, 1), 5)
    x, w = x.detach(), w.detach()
    gb = gy.reshape(3, 2, 64, -1).sum((0, 3))
    for v in ("2x warps", "2x split"):
        splits = []
        real = C._split_buffers
        monkeypatch.setattr(C, "_split_buffers", lambda shape, split, *a, **k: (splits.append(split), real(shape, split, *a, **k))[1])
        with A.variant(v):
            got = (C.conv_forward(x, w, bias, meta), C.conv_data_grad(gy, w, meta), *C.conv_weight_grad(x, gy, meta, with_bias=True))
        monkeypatch.setattr(C, "_split_buffers", real)
        for name, a, r in zip(("forward", "data gradient", "weight gradient", "bias gradient"), got, (ref, gx, gw, gb)):
            assert rel(a, r) < 1e-12, f"{v}, {name}: {rel(a, r):.3e}"
        if v == "2x split":
            with A.variant("current"):
                cur = [C.conv_block_config(kind, 3 * 49, 64, 64, 9, 2, 8)["SPLIT"] for kind in ("fwd", "dgrad")]
                cur.append(C.wgrad_block_config(64, 64, 9, 3 * 49, 2, 8)["SPLIT"])
            assert all(a > b for a, b in zip(splits, cur)), (splits, cur)


@inner
@pytest.mark.parametrize("version", [(3, 6), (3, 7)])
def test_tensor_core_tiles(version, monkeypatch):
    """TF32 / tf32x3 products (`tensor_core_products`) take tiles whose product has 64 rows on one
    warpgroup (4 warps), what Hopper's wgmma needs: at 48 channels one 64-wide tile with 16 masked rows
    instead of three 16-wide sub-tiles, and 4 warps where strict fp32 runs 2; strict fp32 and float64 keep
    their tiles; Triton >= 3.7's register cap is not put on them (`_register_cap`). In tf32x3 at 48
    channels the forward and data gradient form the product pixels by channels, and (Triton < 3.7, Ci x 9
    >= 128) the weight gradient columns by channels (TRANS). Under the configuration rules of Triton 3.6
    (the device's) and 3.7."""
    import torch
    from mamlpp_fast.triton import conv as C
    from mamlpp_fast.triton._device import forced_conv_precision

    monkeypatch.setattr(C, "_TRITON_VERSION", version)

    assert not C.tensor_core_products(torch.float64)
    with forced_conv_precision("tf32x3"):
        assert C.tensor_core_products(torch.float32) and not C.tensor_core_products(torch.float64)
    with forced_conv_precision("tf32"):
        assert C.tensor_core_products(torch.float32)
    with forced_conv_precision("ieee"):
        assert not C.tensor_core_products(torch.float32)
    for args in (("fwd", 75 * 42 * 42, 48, 48, 9, 2, 132), ("dgrad", 5 * 21 * 21, 48, 48, 9, 2, 132),
                 ("fwd", 20 * 49, 64, 64, 9, 8, 132), ("dgrad", 20 * 9, 64, 64, 9, 8, 132)):
        strict, tc = C.conv_block_config(*args), C.conv_block_config(*args, tensor_cores=True)
        assert (tc["BLOCK_N"], tc["NSUB"], tc["num_warps"]) == (64, 1, 4), (args, tc)
        assert tc == C.conv_block_config(*args, tensor_cores="tf32") and "TRANS" not in tc
        assert strict == C.conv_block_config(*args, tensor_cores=False) and "TRANS" not in strict
        assert strict["NSUB"] == 3 or strict["num_warps"] == 2, strict  # what the tensor-core tiles replace
        assert C._register_cap(tc, tensor_cores=True) == {}
        # tf32x3 at 48 channels: pixels by channels, 128 pixel rows by three 16-channel sub-tiles, 4 warps
        x3 = C.conv_block_config(*args, tensor_cores="tf32x3")
        if args[2] == 48:
            assert x3["TRANS"] and (x3["BLOCK_M"], x3["BLOCK_N"], x3["NSUB"], x3["num_warps"]) == (128, 16, 3, 4), x3
        else:
            assert x3 == tc, x3
    # mini-ImageNet's 10x10 support layer (500 rows): the masked tile, whose 9 chunks sum in the kernel (turned,
    # 128-row tiles would split into 14-27 chunks, a chain too long for it)
    for kind, kk in (("fwd", 9), ("fwd", 18), ("dgrad", 9)):
        x3 = C.conv_block_config(kind, 500, 48, 48, kk, 2, 132, tensor_cores="tf32x3")
        assert x3 == C.conv_block_config(kind, 500, 48, 48, kk, 2, 132, tensor_cores="tf32"), (kind, kk, x3)
        assert x3["SPLIT"] > 1 and C.split_chain_in_kernel(x3["SPLIT"], x3, kind), x3
    # 32 or fewer columns: the strict tiles (no 64-row product to fill)
    assert C.conv_block_config("fwd", 500, 32, 32, 9, 2, 132, tensor_cores=True) == C.conv_block_config(
        "fwd", 500, 32, 32, 9, 2, 132)
    for args in ((48, 48, 9, 75 * 42 * 42, 2, 132), (48, 48, 9, 5 * 10 * 10, 2, 132), (64, 64, 9, 20 * 9, 8, 132),
                 (48, 3, 9, 75 * 84 * 84, 2, 132)):
        tc = C.wgrad_block_config(*args, tensor_cores=True)
        assert (tc["BLOCK_M"], tc["NSUB"], tc["num_warps"], tc["INSIDE"]) == (64, 1, 4, False), (args, tc)
        assert tc == C.wgrad_block_config(*args, tensor_cores="tf32") and "TRANS" not in tc
        # tf32x3 at 48 output channels and >= 128 columns (not the first layer's 27), Triton < 3.7: columns by
        # channels, 128 columns by three 16-channel sub-tiles, the lanes inside the image without a tap mask
        x3 = C.wgrad_block_config(*args, tensor_cores="tf32x3")
        # (not mini-ImageNet's 10x10 support layer, 500 lanes: its masked tile sums its 11 chunks in the
        # kernel, where the turned tile's 16 chunks x 3 sub-tiles would make a chain too long for it)
        if args[0] == 48 and args[1] * args[2] >= 128 and C._TRITON_VERSION < (3, 7) and args[3] != 500:
            assert x3["TRANS"] and (x3["BLOCK_M"], x3["BLOCK_N"], x3["NSUB"], x3["BLOCK_K"], x3["num_warps"],
                                    x3["INSIDE"]) == (16, 128, 3, 16, 4, True), (args, x3)
            if tc["BLOCK_N"] == 128:  # the same programs as the masked tile's: its column tiles and split
                assert x3["SPLIT"] == tc["SPLIT"], (args, x3, tc)
            assert not C.split_chain_in_kernel(x3["SPLIT"], x3) and not C.split_chain_in_kernel(tc["SPLIT"], tc)
        elif args[3] == 500:
            assert x3 == tc and C.split_chain_in_kernel(tc["SPLIT"], tc), (args, x3, tc)
        else:
            assert x3 == tc, (args, x3)
    strict = C.wgrad_block_config(48, 48, 9, 75 * 42 * 42, 2, 132, strict_fp32=True)
    assert strict["NSUB"] == 3 and strict == C.wgrad_block_config(48, 48, 9, 75 * 42 * 42, 2, 132,
                                                                   strict_fp32=True, tensor_cores=False)


@inner
@pytest.mark.parametrize("mode", ["tf32x3", "tf32"])
def test_triton_conv_tensor_core_tiles_compute_the_convolution(mode, monkeypatch):
    """The launchers under a tensor-core precision take the tensor-core tiles (`test_tensor_core_tiles`)
    and compute the convolution with them: 48 channels in one 64-row product tile (16 rows masked; in
    tf32x3 the forward and data gradient form it pixels by channels instead, the weight gradient columns
    by channels, TRANS) and 64 channels on 4
    warps, forward, data gradient and weight gradient (with the bias's), as the launchers
    configure them here (the interpreter's 4 SMs, Triton 3.6's rules). The interpreter's products are float32
    (it does not round to TF32), so the check is the layout and masking against the float64 per-task
    reference: float32 operands of unit scale summed over K <= 576 products per output, a relative error
    well under 1e-5 (float32's 6e-8 per rounding, times the sqrt(K) growth of a random-sign sum)."""
    import torch
    from test_conv import rel
    from mamlpp_fast.triton import conv as C
    from mamlpp_fast.triton._device import forced_conv_precision

    monkeypatch.setattr(C, "_TRITON_VERSION", (3, 6))
    seen, made = [], []
    real_f, real_w = C.conv_block_config, C.wgrad_block_config
    monkeypatch.setattr(C, "conv_block_config", lambda *a, **k: (seen.append(k), made.append(real_f(*a, **k)),
                                                                 made[-1])[2])
    monkeypatch.setattr(C, "wgrad_block_config", lambda *a, **k: (seen.append(k), made.append(real_w(*a, **k)),
                                                                  made[-1])[2])
    for shape in ((2, 2, 48, 48, 6, 3, 1, 1), (2, 2, 64, 64, 5, 3, 1, 1)):
        n, b, ci, co = shape[:4]
        x, w, bias, gy, (ref, gx, gw), meta = _conv_case_f64(shape, sum(shape) + len(mode))
        f32 = [t.detach().float() for t in (x, w, bias, gy)]
        gb = gy.reshape(n, b, co, -1).sum((0, 3))
        with forced_conv_precision(mode):
            got = (C.conv_forward(f32[0], f32[1], f32[2], meta), C.conv_data_grad(f32[3], f32[1], meta),
                   *C.conv_weight_grad(f32[0], f32[3], meta, with_bias=True))
        for name, a, r in zip(("forward", "data gradient", "weight gradient", "bias gradient"), got, (ref, gx, gw, gb)):
            assert a.dtype == torch.float32 and a.shape == r.shape and rel(a.double(), r) < 1e-5, \
                f"{mode} {shape} {name}: {rel(a.double(), r):.3e}"
    assert seen and all(k.get("tensor_cores") for k in seen), seen
    # the forward, data gradient and weight gradient at 48 channels, in tf32x3 only
    assert sum(bool(c.get("TRANS")) for c in made) == (3 if mode == "tf32x3" else 0), made


def _mma_probe_kernel():
    """A Triton kernel that runs the convolutions' product helper (`_mma`) on 16 x 16 tiles, program p on
    the p-th of a batch of them (built at module scope: the interpreter resolves a kernel's names in its
    module's globals)."""
    global _mma
    import triton
    import triton.language as tl
    from mamlpp_fast.triton.conv import _mma

    @triton.jit
    def probe(a_ptr, b_ptr, c_ptr, PREC: tl.constexpr):
        pid = tl.program_id(0)
        i = tl.arange(0, 16)
        a = tl.load(a_ptr + pid * 256 + i[:, None] * 16 + i[None, :])
        b = tl.load(b_ptr + pid * 256 + i[:, None] * 16 + i[None, :])
        acc = _mma(a, b, tl.zeros([16, 16], dtype=tl.float32), PREC)
        tl.store(c_ptr + pid * 256 + i[:, None] * 16 + i[None, :], acc)

    return probe


@inner
def test_tf32x3_split_rounds_to_nearest():
    """The kernels' tf32x3 product (`_mma`): each output of a one-product-per-row matrix product (a
    diagonal, so no sum of many terms hides the split) is within 2^-22 + 2^-23 of the exact float64 product,
    relative: the dropped lo_a lo_b with hi rounded to nearest TF32 (|lo| <= 2^-11 |x|, so <= 2^-22) plus
    float32's rounding of the three partial products' sum. A truncated hi (|lo| up to 2^-10 |x|, Triton's
    own lowering) leaves up to 2^-20 and fails this over 16 x 16 x 8 random products. The interpreter's
    TF32 products are exact float32 ones, which is what isolates the split."""
    import torch
    from _batches import fresh_seed

    probe = _mma_probe_kernel()
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    diag = torch.randn(8, 16, generator=gen) * torch.exp2(torch.randint(-8, 8, (8, 16), generator=gen).float())
    a = torch.diag_embed(diag).contiguous()
    b = torch.randn(8, 16, 16, generator=gen)
    c = torch.empty_like(b)
    probe[(8,)](a, b, c, PREC="tf32x3")
    exact = a.double() @ b.double()
    err = float(((c.double() - exact).abs() / exact.abs()).max())
    assert err <= 2.0 ** -22 + 2.0 ** -23, f"{err:.3e} (seed {seed})"


@inner
def test_triton_conv_launches_fill_two_waves():
    """Every convolution launch of one meta-update of both paper workloads (support and target sets,
    forward, data and weight gradients) has >= 2 waves of programs on a 132-SM H100/H200, and the
    48-channel layers use column tiles that divide 48."""
    import triton
    from mamlpp_fast.triton.conv import conv_block_config, wgrad_block_config

    sms = 132
    for (n_sets, b, c0, filt, hw) in [((20, 20), 8, 1, 64, 28), ((5, 75), 2, 3, 48, 84)]:
        for n in n_sets:
            ci, h = c0, hw
            for _ in range(4):
                m = n * h * h
                for kind, cols, chans in (("fwd", filt, ci), ("dgrad", ci, filt)):
                    if kind == "dgrad" and ci == c0:
                        continue  # the first layer's input is data: no data gradient
                    cfg = conv_block_config(kind, m, cols, chans, 9, b, sms)
                    progs = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_N"] * cfg["NSUB"])
                             * b * cfg["SPLIT"])
                    assert progs >= 2 * sms, (kind, n, ci, h, cfg, progs)
                    assert cols % (cfg["BLOCK_N"] * cfg["NSUB"]) == 0 or cols < 16, (kind, cols, cfg)
                cfg = wgrad_block_config(filt, ci, 9, m, b, sms)
                progs = (triton.cdiv(filt, cfg["BLOCK_M"] * cfg["NSUB"]) * triton.cdiv(ci * 9, cfg["BLOCK_N"])
                         * b * cfg["SPLIT"])
                assert filt % (cfg["BLOCK_M"] * cfg["NSUB"]) == 0, ("wgrad", filt, cfg)
                assert progs >= 2 * sms, ("wgrad", n, ci, h, cfg, progs)
                ci, h = filt, h // 2


@inner
def test_relaid_weights_kept_per_tensor_and_version():
    """The launchers' weight re-layout is made once per weight tensor and layout: a second call returns
    the same tensor without a copy (for tensors computed in a graph; leaves are copied every time);
    an in-place change of the weights (version counter) makes a new,
    correct copy; the two layouts are kept apart; inference tensors are copied every time. And a forward
    launch after an in-place change uses the new weights."""
    import torch
    from mamlpp_fast.triton import conv as C

    leaf = torch.randn(2, 5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert C.relaid_weights(leaf, "fwd")[1] and C.relaid_weights(leaf, "fwd")[1]  # a leaf: never kept
    w = leaf * 1.0  # computed in a graph, as the fast weights are
    f1, copied1 = C.relaid_weights(w, "fwd")
    f2, copied2 = C.relaid_weights(w, "fwd")
    assert copied1 and not copied2 and f2 is f1
    assert torch.equal(f1, w.permute(0, 3, 4, 2, 1))
    d1, copied_d = C.relaid_weights(w, "dgrad")
    assert copied_d and torch.equal(d1, w.permute(0, 3, 4, 1, 2))
    with torch.no_grad():
        w.mul_(2.0)
    f3, copied3 = C.relaid_weights(w, "fwd")
    assert copied3 and f3 is not f1 and torch.equal(f3, w.permute(0, 3, 4, 2, 1))
    with torch.inference_mode():
        wi = torch.randn(2, 5, 3, 3, 3, dtype=torch.float64)
        assert C.relaid_weights(wi, "fwd")[1] and C.relaid_weights(wi, "fwd")[1]
    # a launch after an in-place change of the weights computes with the new values
    b, co, ci, n, h = 2, 5, 3, 2, 6
    x = torch.randn(n, b * ci, h, h, dtype=torch.float64)
    meta = (b, co, ci, 3, 3, h, h, h, h, 1, 1)
    C.conv_forward(x, w, None, meta)
    with torch.no_grad():
        w.add_(1.0)
        ref = torch.nn.functional.conv2d(x, w.reshape(b * co, ci, 3, 3), padding=1, groups=b)
    assert (C.conv_forward(x, w, None, meta) - ref).abs().max().item() < 1e-12


# ---- the fused first block (mamlpp_fast/triton/conv_block.py) --------------------------------------------
def _block_case(shape, seed, dtype):
    import torch
    from test_conv_block import make_block_inputs

    x, w, bias, gamma, beta, T, pad = make_block_inputs(shape, seed)
    x, w, gamma, beta = (t.detach().to(dtype) for t in (x, w, gamma, beta))
    bias = bias.detach().to(dtype) if bias is not None else None
    return x, w, bias, gamma, beta, T, pad


def _block_y(x, w, bias, gamma, beta, T, pad):
    """The block's activation y before pooling (float64 unfused ops on the block's inputs)."""
    from test_conv_block import EPS, SLOPE
    from mamlpp_fast.ops import per_step_batch_norm
    from mamlpp_fast.ops.conv import task_conv2d

    z = task_conv2d(x.double(), w.double(), None if bias is None else bias.double(), T, 1, pad, "grouped")
    return per_step_batch_norm(z, gamma.double(), beta.double(), T, EPS, SLOPE, backend="torch")[0]


def _window_gap(x, w, bias, gamma, beta, T, pad):
    """The smallest gap between the largest and the second largest y of a pooling window, relative to
    max |y| (float64 unfused ops): below float32's resolution the window's maximum is a coin toss."""
    return _pool_gap(_block_y(x, w, bias, gamma, beta, T, pad))


def _window_keep(y, gap=1e-4):
    """(n, c, h//2, w//2): 1 for the 2x2 pooling windows of y whose two largest values differ by more than
    `gap` of max |y|, else 0: where float32 rounding may pick either maximum (a discontinuity of the
    gradients, not a fault), the tests at full size zero gout (and compare no d(gout)) instead of
    redrawing inputs until no window is near a tie, which at ~10^7 windows never ends."""
    n, c, h, wd = y.shape
    y2 = y[:, :, :h // 2 * 2, :wd // 2 * 2]
    win = y2.reshape(n, c, h // 2, 2, wd // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, wd // 2, 4)
    top = win.topk(2, dim=-1).values
    return ((top[..., 0] - top[..., 1]) > gap * y.abs().max()).to(y.dtype)


def _block_keep(x, w, bias, gamma, beta, T, pad, gap=1e-4):
    """`_window_keep` of the block's y."""
    return _window_keep(_block_y(x, w, bias, gamma, beta, T, pad), gap)


def _pool_gap(y):
    """The smallest gap between the two largest values of a 2x2 pooling window of y (an odd last row or
    column is in no window), relative to max |y|."""
    n, c, h, wd = y.shape
    y2 = y[:, :, :h // 2 * 2, :wd // 2 * 2]
    win = y2.reshape(n, c, h // 2, 2, wd // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(-1, 4)
    top = win.topk(2, dim=1).values
    return float((top[:, 0] - top[:, 1]).min() / y.abs().max())


def _block_all(impl, x, w, bias, gamma, beta, T, pad, seed, us=(True, True, True, True), keep=None):
    """forward, backward and double backward of impl: the results in order. keep (out's shape, 0 or 1,
    `_window_keep`): gout is 0 where keep is 0 and so is d(gout) in the results, so that windows whose
    maximum float32 rounding may pick differently drop out of every comparison."""
    import torch
    from test_conv_block import EPS, SLOPE

    meta = (T, 1, pad, EPS, SLOPE)
    out, mean, invstd, aux = impl.forward(x, w, bias, gamma, beta, meta)
    g = torch.Generator().manual_seed(seed + 7)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)  # noqa: E731
    gout = rnd(out)
    if keep is not None:
        gout = gout * keep.to(gout.dtype)
    bwd = impl.backward(gout, x, w, bias, gamma, beta, mean, invstd, aux, meta)
    u = [rnd(w), rnd(bias) if bias is not None else None, rnd(gamma), rnd(beta)]
    u = [t if on else None for t, on in zip(u, us)]
    dbwd = list(impl.double_backward(*u, gout, x, w, bias, gamma, beta, mean, invstd, aux, meta))
    if keep is not None:
        dbwd[0] = dbwd[0] * keep.to(dbwd[0].dtype)
    names = ["out", "mean", "invstd", "dw", "dbias", "dgamma", "dbeta", "ddgout", "ddw", "ddbias", "ddgamma"]
    res = [out, mean, invstd, *bwd, *dbwd]
    return [(n, r) for n, r in zip(names, res) if r is not None], invstd


def _block_compare(got, ref, tol, seed):
    from _numerics import rel

    scale = max(float(r.abs().max()) for _, r in ref)
    for (name, a), (_, r) in zip(got, ref):
        # conv-bias results are rounding noise (0 in exact arithmetic): absolute, against the largest result
        err = float((a.double() - r.double()).abs().max()) / (scale if "bias" in name else max(1.0, float(r.abs().max())))
        assert err < tol, f"{name}: {err:.3e} (seed {seed}; rel {rel(a, r):.3e})"


@inner
@pytest.mark.parametrize("idx,multi,rw", [(i, m, 16) for m in (0, 3) for i in range(6)] + [(4, 20, 16), (5, 20, 16)]
                         + [(i, 3, 32) for i in range(6)] + [(1, 1, 32), (4, 1, 32)],
                         ids=[f"{i}-{m}" for m in ("auto-chunks", "3-chunks-block16") for i in range(6)]
                         + ["4-20-chunks-block16", "5-20-chunks-block16"]
                         + [f"{i}-3-chunks-block16-reduce32" for i in range(6)]
                         + ["1-1-chunk-block16-reduce32", "4-1-chunk-block16-reduce32"])
def test_conv_block_kernels_float64(idx, multi, rw, monkeypatch):
    """The Triton kernels against the PyTorch implementation of the block (itself tested against the
    unfused ops in tests/test_conv_block.py), float64, 1e-10; with the interpreter's own configuration and
    with 16-window steps in 3 chunks (the merge of chunk sums and a ragged last chunk) or, for the two
    largest shapes, in up to 20 (17 and 18: more than the 16 chunk sums read at a time); the last shape has 20 channels: two channel blocks of
    16, the second masked. reduce32: the forward's pass in 32-window steps (RBLOCK_W) beside the other
    passes' 16, in 3 ragged chunks, or in one chunk of 32 windows (one full step) and of 50 (a full step
    and a ragged one)."""
    from _batches import fresh_seed
    from test_conv_block import SHAPES
    from mamlpp_fast.ops.conv_block import torch_impl
    from mamlpp_fast.triton import conv_block as tcb
    import torch

    if multi:
        def forced(mw, t, c, kp, device, sms=None):
            chunk = -(-mw // multi)
            return dict(BLOCK_W=16, BLOCK_C=16, CB=-(-c // 16), CHUNK=chunk, CHUNKS=-(-mw // chunk), num_warps=4,
                        RBLOCK_W=rw)
        monkeypatch.setattr(tcb, "block_config", forced)
    seed = fresh_seed() % 2 ** 31
    case = _block_case(SHAPES[idx], seed, torch.float64)
    us = [(True, True, True, True), (True, False, True, False), (False, False, True, True),
          (True, True, False, False), (False, True, False, False), (True, True, True, True)][idx]
    ref, _ = _block_all(torch_impl, *case, seed, us)
    got, _ = _block_all(tcb, *case, seed, us)
    _block_compare(got, ref, 1e-10, seed)


@inner
@pytest.mark.parametrize("idx,mode", [(0, None), (1, None), (4, None), (0, "tf32x3"), (4, "tf32x3")])
def test_conv_block_kernels_float32(idx, mode):
    """float32 kernels against the float64 PyTorch implementation on the same inputs: 2e-5 forward and
    backward, 1e-4 * max(1, max invstd) double backward (the batch-norm kernels' margins, test_bn_f32;
    the patch sums add <= 28 products, ~2e-6 relative). Inputs whose pooling windows hold two values
    closer than 1e-4 of max |y| are redrawn (the next seed): there float32 rounding may pick the other
    maximum, a discontinuity of the function, not a fault. mode "tf32x3" (config key conv_precision): the
    block's products through the convolutions' own split (`_product`), whose dropped terms (<= 2^-22 of
    each product; the interpreter's TF32 products are exact float32 ones) fit the same margins."""
    import contextlib

    import torch
    from _batches import fresh_seed
    from test_conv_block import SHAPES
    from mamlpp_fast.ops.conv_block import torch_impl
    from mamlpp_fast.triton import conv_block as tcb
    from mamlpp_fast.triton._device import forced_conv_precision

    seed = fresh_seed() % 2 ** 31
    while True:
        case = _block_case(SHAPES[idx], seed, torch.float32)
        if _window_gap(*case) > 1e-4:
            break
        seed += 1
    ref, invstd = _block_all(torch_impl, *[t.double() if isinstance(t, torch.Tensor) else t for t in case], seed)
    with forced_conv_precision(mode) if mode else contextlib.nullcontext():
        got, _ = _block_all(tcb, *case, seed)
    _block_compare(got[:7], ref[:7], 2e-5, seed)
    _block_compare(got[7:], ref[7:], 1e-4 * max(1.0, float(invstd.max())), seed)


@inner
def test_conv_block_triton_gradcheck_and_gradgradcheck():
    """float64 gradcheck and gradgradcheck of conv_bn_pool on the Triton kernels (fast mode: random
    projections of the Jacobians, as for the Triton convolution)."""
    import torch
    from test_conv_block import SHAPES, fused
    from mamlpp_fast.triton import conv_block as tcb

    x, w, bias, gamma, beta, T, pad = _block_case(SHAPES[0], 11, torch.float64)
    params = [t.requires_grad_(True) for t in (w, bias, gamma, beta)]
    fn = lambda *p: fused(x, *p, T, pad, impl=tcb)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, params, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, params, fast_mode=True)


@inner
@pytest.mark.parametrize("idx", [0, 1, 5])
def test_conv_block_finds_each_windows_maximum_on_z(idx):
    """The forward's reduction finds each window's largest y on z, as the first largest sign(gamma) z
    (the apply pass is elementwise on z there): with gamma of both signs and exact zeros, sel is
    max_pool2d's index of y (the float64 unfused ops: first of equal y, so position 0 where gamma = 0
    makes all four equal), zsel is z there (1e-10 against F.conv2d), and out is y there."""
    import torch
    import torch.nn.functional as F
    from test_conv_block import EPS, SHAPES, SLOPE
    from mamlpp_fast.ops import conv_block as cb
    from mamlpp_fast.ops import torch_backend as tb
    from mamlpp_fast.triton import conv_block as tcb

    seed = 31 + idx
    x, w, bias, gamma, beta, T, pad = _block_case(SHAPES[idx], seed, torch.float64)
    flat = gamma.view(-1)  # channels 0, 3, 6, ... at 0; 1, 4, ... negative; the rest positive
    flat[0::3] = 0.0
    flat[1::3] = -flat[1::3].abs()
    flat[2::3] = flat[2::3].abs()
    meta = (T, 1, pad, EPS, SLOPE)
    out, mean, invstd, (sel, zsel) = tcb.forward(x, w, bias, gamma, beta, meta)
    z = cb._conv(x, w, bias, meta)
    y = tb.bn_forward(z, gamma, beta, T, EPS, SLOPE)[0]
    want_out, idx_ref = F.max_pool2d(y, 2, 2, return_indices=True)
    wo = y.shape[3]
    pos = ((idx_ref // wo) % 2) * 2 + idx_ref % 2  # the index's position 0..3 in its window
    assert sel.dtype == torch.int8 and torch.equal(sel.long(), pos), f"seed {seed}"
    n, tc, hp, wp = out.shape
    win = z.reshape(n, tc, hp, 2, wp, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, tc, hp, wp, 4)
    want = win.gather(4, pos.unsqueeze(4)).squeeze(4)
    assert zsel.shape == out.shape and zsel.dtype == out.dtype
    assert float((zsel - want).abs().max()) < 1e-10 * max(1.0, float(want.abs().max())), f"seed {seed}"
    assert float((out - want_out).abs().max()) < 1e-10 * max(1.0, float(want_out.abs().max())), f"seed {seed}"


@inner
def test_learner_with_fused_first_block_triton_matches_reference_float64():
    """The fast learner with first_block="fused" on the Triton kernels (and Triton convolutions, BN and
    LSLR for the other layers) against the reference learner, float64, from the same state."""
    from _batches import fresh_seed
    from test_fast_equivalence import batch_for, compare, make_pair
    from mamlpp_fast.triton import conv_block as tcb

    seed = fresh_seed()
    cfg = dict(cnn_num_filters=4, num_stages=2, image_height=8, image_width=8, num_classes_per_set=3,
               number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2, conv_impl="triton",
               first_block="fused")
    ref, fast, args = make_pair("float64", "triton", **cfg)
    compare(ref, fast, batch_for(args, 2, seed), 0, "float64", seed)
    assert any(v is tcb for v in fast._first_block_cache.values())


# ---- bn_pool (mamlpp_fast.ops.bn_pool; kernels in mamlpp_fast/triton/bn_pool.py) ----------------------------
def _bn_pool_all(impl, x, gamma, beta, T, seed, us=(True, True, True), keep=None):
    """forward, backward and double backward of bn_pool's implementation `impl` on plain tensors, with
    random upstream gradients (drawn from seed; those whose flag in `us` is False are None); keep: as
    `_block_all`'s."""
    import torch
    from test_bn_pool import EPS, SLOPE

    meta = (T, EPS, SLOPE)
    out, mean, invstd, aux = impl.forward(x, gamma, beta, meta)
    g = torch.Generator().manual_seed(seed + 7)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)  # noqa: E731
    gout = rnd(out)
    if keep is not None:
        gout = gout * keep.to(gout.dtype)
    bwd = impl.backward(gout, x, gamma, beta, mean, invstd, aux, meta)
    u = [t if on else None for t, on in zip((rnd(x), rnd(gamma), rnd(beta)), us)]
    dbwd = list(impl.double_backward(*u, gout, x, gamma, beta, mean, invstd, aux, meta))
    if keep is not None:
        dbwd[0] = dbwd[0] * keep.to(dbwd[0].dtype)
    names = ["out", "mean", "invstd", "dx", "dgamma", "dbeta", "ddgout", "ddx", "ddgamma"]
    return list(zip(names, [out, mean, invstd, *bwd, *dbwd])), invstd


def _bn_pool_case(idx, seed, dtype):
    from test_bn_pool import SHAPES, make_inputs

    x, gamma, beta, T = make_inputs(SHAPES[idx], seed, dtype)
    gamma, beta = _one_shape(gamma.detach(), beta.detach(), T)
    return x.detach(), gamma, beta, T


def _one_shape(gamma, beta, T):
    """gamma and beta of one shape, as bn_pool's implementations take them: a shared one expanded to the
    tasks where the other is per task (the op does the same)."""
    if gamma.shape != beta.shape:
        gamma, beta = (p.expand(T, -1).contiguous() if p.dim() == 1 else p for p in (gamma, beta))
    return gamma, beta


def _bn_pool_compare(got, ref, tol, seed):
    for (name, a), (_, r) in zip(got, ref):
        err = float((a.double() - r.double()).abs().max()) / max(1.0, float(r.abs().max()))
        assert err < tol, f"{name}: {err:.3e} (seed {seed})"


@inner
@pytest.mark.parametrize("idx,multi", [(i, m) for m in (0, 3) for i in range(5)],
                         ids=[f"{i}-{m}" for m in ("auto-chunks", "3-chunks-16-cells") for i in range(5)])
def test_bn_pool_kernels_float64(idx, multi, monkeypatch):
    """The Triton kernels against the PyTorch implementation of bn_pool (itself tested against the unfused
    ops in tests/test_bn_pool.py), float64, 1e-10, on shapes with even and odd sizes (an unpooled last row
    or column), shared and per-task gamma/beta; with the interpreter's configuration (one chunk) and with
    3 chunks of 16 cells (the merge of chunk sums, ragged last chunks); each upstream gradient of the
    double backward alone in turn."""
    from _batches import fresh_seed
    from mamlpp_fast.ops.bn_pool import torch_impl
    from mamlpp_fast.triton import bn_pool as tbp
    import torch

    if multi:
        def forced(n, tc, h, w, device):
            m, mc = n * h * w, n * -(-h // 2) * -(-w // 2)
            chunk = -(-m // multi)
            chunks = -(-m // chunk)
            return dict(BLOCK=16, CHUNK=chunk, CHUNKS=chunks, CBLOCK=4, num_warps=1, MC=mc,
                        CCHUNK=-(-mc // chunks), CELLS=16)
        monkeypatch.setattr(tbp, "pool_config", forced)
    seed = fresh_seed() % 2 ** 31
    case = _bn_pool_case(idx, seed, torch.float64)
    us = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
          (True, True, True)][idx]
    ref, _ = _bn_pool_all(torch_impl, *case, seed, us)
    got, _ = _bn_pool_all(tbp, *case, seed, us)
    _bn_pool_compare(got, ref, 1e-10, seed)


@inner
@pytest.mark.parametrize("idx", [0, 1, 2])
def test_bn_pool_kernels_float32(idx):
    """float32 kernels against the float64 PyTorch implementation on the same inputs, with the batch-norm
    kernels' margins: 2e-5 forward and backward, 1e-4 * max(1, max invstd) double backward (test_bn_f32).
    Inputs with a pooling window whose two largest y are closer than 1e-4 of max |y| are redrawn (the next
    seed): there float32 rounding may pick the other maximum, a discontinuity of the function."""
    import torch
    from _batches import fresh_seed
    from test_bn_pool import EPS, SLOPE
    from mamlpp_fast.ops import per_step_batch_norm
    from mamlpp_fast.ops.bn_pool import torch_impl
    from mamlpp_fast.triton import bn_pool as tbp

    seed = fresh_seed() % 2 ** 31
    while True:
        x, gamma, beta, T = _bn_pool_case(idx, seed, torch.float32)
        y = per_step_batch_norm(x.double(), gamma.double(), beta.double(), T, EPS, SLOPE, backend="torch")[0]
        if _pool_gap(y) > 1e-4:
            break
        seed += 1
    ref, invstd = _bn_pool_all(torch_impl, x.double(), gamma.double(), beta.double(), T, seed)
    got, _ = _bn_pool_all(tbp, x, gamma, beta, T, seed)
    _bn_pool_compare(got[:6], ref[:6], 2e-5, seed)
    _bn_pool_compare(got[6:], ref[6:], 1e-4 * max(1.0, float(invstd.max())), seed)


@inner
def test_bn_pool_triton_gradcheck_and_gradgradcheck():
    """float64 gradcheck and gradgradcheck of bn_pool on the Triton kernels (fast mode), odd sizes."""
    import torch
    from test_bn_pool import SHAPES, fused, make_inputs
    from mamlpp_fast.triton import bn_pool as tbp

    x, gamma, beta, T = make_inputs(SHAPES[1], 12)
    fn = lambda *p: fused(*p, T, impl=tbp)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, gamma, beta), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, gamma, beta), fast_mode=True)


@inner
def test_learner_with_bn_pool_triton_matches_reference_float64():
    """The fast learner with bn_pool="fused" and head="fused" on the Triton kernels (with the Triton first
    block, convolutions, BN and LSLR: every op on its Triton kernels) against the reference learner,
    float64, from the same state; odd sizes."""
    from _batches import fresh_seed
    from test_fast_equivalence import batch_for, compare, make_pair
    from mamlpp_fast.triton import bn_pool as tbp
    from mamlpp_fast.triton import head as th

    seed = fresh_seed()
    cfg = dict(cnn_num_filters=4, num_stages=3, image_height=10, image_width=10, num_classes_per_set=3,
               number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2, conv_impl="triton",
               first_block="fused", bn_pool="fused", head="fused")
    ref, fast, args = make_pair("float64", "triton", **cfg)
    compare(ref, fast, batch_for(args, 2, seed), 0, "float64", seed)
    assert fast._bn_pool_cache and all(v is tbp for v in fast._bn_pool_cache.values())
    assert fast._head_cache and all(v is th for v in fast._head_cache.values())


@inner
def test_learner_all_fused_inner_loop_bn_after_msl_matches_reference_float64():
    """Every op on its Triton kernels with the BN gamma/beta adapted in the inner loop (per-task fast
    tensors: the saved aliases of the fused ops come from the fast weights' fan-out, not the per-step
    rows), after the MSL epochs (the target pass follows the last step only), against the reference
    learner, float64."""
    from _batches import fresh_seed
    from test_fast_equivalence import batch_for, compare, make_pair

    seed = fresh_seed()
    cfg = dict(cnn_num_filters=4, num_stages=3, image_height=8, image_width=8, num_classes_per_set=3,
               number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2, conv_impl="triton",
               first_block="fused", bn_pool="fused", head="fused", enable_inner_loop_optimizable_bn_params=True,
               multi_step_loss_num_epochs=2)
    ref, fast, args = make_pair("float64", "triton", **cfg)
    compare(ref, fast, batch_for(args, 2, seed), 3, "float64", seed)
    assert fast._bn_pool_cache and fast._first_block_cache


# ---- head_loss (mamlpp_fast.ops.head; kernels in mamlpp_fast/triton/head.py) ------------------------------
HEAD_SCALE = 0.37  # the loss scale s of the head kernels' tests


def _head_all(impl, x, w, b, labels, lw, prev, T, seed, us=(True, True, True), saved=None):
    """forward, backward and double backward of head_loss's implementation `impl` on plain tensors (x as
    (n, T*F)), with random upstream gradients drawn from seed (those whose flag in `us` is False: None);
    the two backward passes read `saved` (logits, lse) when given, else the forward's own."""
    import torch

    meta = (T, HEAD_SCALE)
    x = x.reshape(x.shape[0], -1)
    loss, logits, lse = impl.forward(x, w, b, labels, lw, prev, meta)
    fwd = (loss, logits, lse)
    if saved is not None:
        logits, lse = saved
    g = torch.Generator().manual_seed(seed + 7)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)  # noqa: E731
    gl = rnd(loss)
    bwd = impl.backward(gl, x, w, logits, lse, labels, lw, meta)
    u = [t if on else None for t, on in zip((rnd(x), rnd(w), rnd(b)), us)]
    dbwd = impl.double_backward(*u, gl, x, w, logits, lse, labels, lw, meta)
    names = ["loss", "logits", "lse", "dx", "dW", "db", "gg", "gx", "gW", "gb"]
    return list(zip(names, [*fwd, *bwd, *dbwd]))


def _head_case(idx, seed, dtype, expanded=False):
    from test_head import SHAPES, make_inputs

    x, w, b, labels, lw, prev, T = make_inputs(SHAPES[idx], seed, dtype, expanded)
    x, w, b, prev = (t.detach() for t in (x, w, b, prev))
    if expanded:
        w, b = w.expand(T, *w.shape), b.expand(T, *b.shape)
    return x, w, b, labels, lw, prev, T


@inner
@pytest.mark.parametrize("idx", [0, 1, 2, 3, 4])
def test_head_kernels_float64(idx):
    """The Triton kernels against the PyTorch implementation of head_loss (itself tested against the
    unfused ops in tests/test_head.py), float64, 1e-10; with the loss weight and prev or without them,
    expanded (task stride 0) or per-task weights, each upstream gradient of the double backward alone in
    turn, and (shape 4, F = 200) the forward and backward split over F (4 chunks under the interpreter's
    4 multiprocessors: the slice partials summed by the task's last program)."""
    from _batches import fresh_seed
    from mamlpp_fast.ops.head import torch_impl
    from mamlpp_fast.triton import head as th
    import torch

    seed = fresh_seed() % 2 ** 31
    x, w, b, labels, lw, prev, T = _head_case(idx, seed, torch.float64, expanded=idx == 1)
    if idx == 2:
        lw = prev = None
    us = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
          (True, True, True)][idx]
    if idx == 4:
        assert th.head_config(x.shape[0], w.shape[1], w.shape[2], T, 4)["S"] == 4
    ref = _head_all(torch_impl, x, w, b, labels, lw, prev, T, seed, us)
    got = _head_all(th, x, w, b, labels, lw, prev, T, seed, us)
    _bn_pool_compare(got, ref, 1e-10, seed)


def _head_f32_bounds(x, w, b, labels, lw, prev, T, seed, saved):
    """Elementwise first-order bounds on the error of float32 head kernels against the float64 oracle on
    the same float32 inputs, derived from the terms' magnitudes (module docstring of ops/head.py for the
    formulas; u = 2^-24; a K-term float32 sum of terms t_i has error <= K u sum |t_i|, any order):

    - z = x W^T + b: ez = (F + 2) u zm with zm = |x| |W|^T + |b| (F products, F + 1 additions);
    - lse = m + log(sum_c exp(z_c - m)): else = max_c ez + (C + 4) u + u |lse| (the sum is in [1, C];
      exp and log are a few ulp);
    - p = exp(z - lse), formed by both implementations' backward passes from the same saved float32 z and
      lse (the kernels' forward outputs): relative error dp = u (2 max |z - lse| + 4) (the rounded
      difference, then exp within 2 ulp), so the error of p - Y is <= (p + Y)(dp + u);
    - G = sigma (p - Y), sigma = g lw s: relative error dp + 6u (g, lw s and the float32 s rounded);
      dx = G W, dW = G^T x, db = sum_i G: magnitudes Gm |W|, Gm^T |x|, sum_i Gm, Gm = |sigma| (p + Y),
      with C + 6, n + 6 and n + 6 roundings;
    - H = vx W^T + x vW^T + vb: magnitude Hm with 2F + 4 roundings (2F products and additions, and the
      upstream gradients rounded to float32 in the kernels' run, not in the oracle's);
    - gg = c <p - Y, H>: magnitude |c| sum (p + Y) Hm, T n C + 2F + 9 roundings and dp;
    - Gz = sigma (p H - p rowsum(p H)): magnitude Gzm = |sigma| (p Hm + p rowsum(p Hm)), 2F + C + 10
      roundings and 2 dp (p enters twice); gx = Gz W + G vW, gW = Gz^T x + G^T vx, gb = sum_i Gz add
      C + 2, n + 2, n + 1 roundings on the magnitudes Gzm |W| + Gm |vW|, Gzm^T |x| + Gm^T |vx|, sum Gzm;
    - the loss, s lw sum_rows (lse - z_y) + prev: s |lw| sum_rows (else + ez_y) + (T n + 4) u of its
      terms' magnitude s |lw| sum (|lse| + |z_y|) + |prev|.

    Each bound is doubled for the neglected second-order terms. Returns {name: (bound tensor, magnitude
    tensor)} in the layout of the outputs; `saved` holds the kernels' (z, lse) that both runs' backward
    passes read."""
    import torch

    u = 2.0 ** -24
    d = torch.float64
    n = x.shape[0]
    x = x.reshape(n, -1).to(d)
    w, b, lw, prev = w.to(d), b.to(d), lw.to(d), prev.to(d)
    F, C = w.shape[2], w.shape[1]
    g = torch.Generator().manual_seed(seed + 7)
    gl = torch.randn((), generator=g, dtype=d)
    vx, vw, vb = (torch.randn(t.shape, generator=g, dtype=d) for t in (x, w, b))
    feats = lambda t: t.view(n, T, -1).transpose(0, 1)  # noqa: E731
    rows = lambda t: t.transpose(0, 1).reshape(n, -1)  # noqa: E731
    ax, aw = feats(x).abs(), w.abs()
    z, lse = (t.to(d) for t in saved)
    zm = torch.bmm(ax, aw.transpose(1, 2)) + b.abs().unsqueeze(1)
    ez = (F + 2) * u * zm
    else_ = ez.amax(-1) + (C + 4) * u + u * lse.abs()
    dp = float(u * (2 * (z - lse.unsqueeze(-1)).abs().max() + 4))
    p = torch.exp(z - lse.unsqueeze(-1))
    Y = torch.zeros_like(p).scatter_(-1, labels.view(T, n, 1), 1.0)
    c = abs(float(lw)) * HEAD_SCALE
    sig = c * abs(float(gl))
    Gm = sig * (p + Y)
    Hm = (torch.bmm(feats(vx).abs(), aw.transpose(1, 2)) + torch.bmm(ax, vw.abs().transpose(1, 2))
          + vb.abs().unsqueeze(1))
    ph = p * Hm
    Gzm = sig * (ph + p * ph.sum(-1, keepdim=True))
    zy = z.gather(-1, labels.view(T, n, 1)).squeeze(-1)
    eyz = ez.gather(-1, labels.view(T, n, 1)).squeeze(-1)
    loss_mag = c * (lse.abs() + zy.abs()).sum() + prev.abs()
    kh, kz = 2 * F + 4, 2 * F + C + 10
    out = {
        "loss": (c * (else_ + eyz).sum() + (T * n + 4) * u * loss_mag, loss_mag),
        "logits": (ez, zm),
        "lse": (else_, zm.amax(-1)),
        "dx": (rows(torch.bmm(Gm, aw)),) * 2,
        "dW": (torch.bmm(Gm.transpose(1, 2), ax),) * 2,
        "db": (Gm.sum(1),) * 2,
        "gg": ((c * ((p + Y) * Hm).sum()).reshape(()),) * 2,
        "gx": (rows(torch.bmm(Gzm, aw) + torch.bmm(Gm, vw.abs())),) * 2,
        "gW": (torch.bmm(Gzm.transpose(1, 2), ax) + torch.bmm(Gm.transpose(1, 2), feats(vx).abs()),) * 2,
        "gb": (Gzm.sum(1),) * 2,
    }
    rel = {"dx": (C + 6) * u + dp, "dW": (n + 6) * u + dp, "db": (n + 6) * u + dp,
           "gg": (T * n * C + kh + 5) * u + dp, "gx": (kz + C + 2) * u + 2 * dp,
           "gW": (kz + n + 2) * u + 2 * dp, "gb": (kz + n + 1) * u + 2 * dp}
    return {k: (2 * (m * rel[k] if k in rel else bnd), m) for k, (bnd, m) in out.items()}


@inner
@pytest.mark.parametrize("idx", [0, 3, 4])
def test_head_kernels_float32(idx):
    """float32 kernels against the float64 PyTorch implementation on the same (float32) inputs, every
    element within the first-order rounding bound derived from its terms' magnitudes (_head_f32_bounds:
    a correct float32 evaluation cannot exceed it, in any summation order). So that the bound still
    catches a fault, each output's largest bound is checked to be under 1% of its largest magnitude (an
    omitted or doubled term moves an element by the order of its magnitude; over 300 seeds per shape the
    largest ratio was 3.9e-4, the loss's at F = 200: `python tests/margin_survey.py head 300`)."""
    import torch
    from _batches import fresh_seed
    from mamlpp_fast.ops.head import torch_impl
    from mamlpp_fast.triton import head as th

    seed = fresh_seed() % 2 ** 31
    x, w, b, labels, lw, prev, T = _head_case(idx, seed, torch.float32)
    got = _head_all(th, x, w, b, labels, lw, prev, T, seed)
    saved = tuple(dict(got)[k].double() for k in ("logits", "lse"))
    ref = _head_all(torch_impl, x.double(), w.double(), b.double(), labels, lw.double(), prev.double(), T, seed,
                    saved=saved)
    bounds = _head_f32_bounds(x, w, b, labels, lw, prev, T, seed, saved)
    for (name, a), (_, r) in zip(got, ref):
        bound, mag = bounds[name]
        assert float(bound.max()) < 1e-2 * float(mag.max()), f"{name}: bound too loose (seed {seed})"
        err = (a.double() - r).abs()
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (
            f"{name}: error {float(err.flatten()[worst]):.3e} over its bound "
            f"{float(bound.flatten()[worst]):.3e} (seed {seed})")


@inner
def test_head_triton_gradcheck_and_gradgradcheck():
    """float64 gradcheck and gradgradcheck of head_loss on the Triton kernels (fast mode) w.r.t. x, W, b
    and prev, and the loss NaN for a label outside [0, C) (a device's labels are not checked on the host)."""
    import torch
    from test_head import SHAPES, fused, make_inputs
    from mamlpp_fast.triton import head as th

    x, w, b, labels, lw, prev, T = make_inputs(SHAPES[1], 12)
    fn = lambda *p: fused(*p[:3], labels, T, 0.37, lw, p[3], impl=th)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, prev), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b, prev), fast_mode=True)
    bad = labels.clone()
    bad[3] = w.shape[1]
    loss = th.forward(x.detach().reshape(x.shape[0], -1), w.detach(), b.detach(), bad, None, None, (T, 1.0))[0]
    assert torch.isnan(loss)


@inner
def test_conv_block_reads_expanded_weights_in_place():
    """The fast weights of step 0 are the meta-parameters expanded over the tasks (task stride 0): the
    block's kernels read them in place (`_task_rows` makes no copy) with results identical to a
    contiguous copy's, in all three passes; a weight whose rows are not contiguous is copied."""
    import torch
    from _batches import fresh_seed
    from test_conv_block import SHAPES
    from mamlpp_fast.triton import conv_block as tcb

    seed = fresh_seed() % 2 ** 31
    x, w, bias, gamma, beta, T, pad = _block_case(SHAPES[1], seed, torch.float64)
    w_exp = w[:1].expand_as(w)
    b_exp = bias[:1].expand_as(bias)
    rows = tcb._task_rows(w_exp, b_exp)
    assert rows[0] is w_exp and rows[1] == 0 and rows[2] is b_exp and rows[3] == 0
    got, _ = _block_all(tcb, x, w_exp, b_exp, gamma, beta, T, pad, seed)
    ref, _ = _block_all(tcb, x, w_exp.contiguous(), b_exp.contiguous(), gamma, beta, T, pad, seed)
    for (name, a), (_, r) in zip(got, ref):
        assert torch.equal(a, r), name
    w_t = w.transpose(3, 4)  # rows not contiguous: copied
    assert tcb._task_rows(w_t, None)[0] is not w_t


@inner
@pytest.mark.parametrize("idx", [0, 1], ids=["shared-gamma", "per-task-gamma"])
def test_bn_pool_single_pass_equals_two_kernels(idx, monkeypatch):
    """Where a column is one chunk, each bn_pool pass runs as one kernel that forms the column's sums
    itself (for a gamma shared by the tasks, the last program of each channel adds them over the tasks:
    `_shared_params`): the same values as the reduction + apply kernels, bit for bit, in all three
    passes, one launch per pass, and the tickets' counters left at zero."""
    import torch
    from _batches import fresh_seed
    from triton.runtime.interpreter import InterpretedFunction
    from mamlpp_fast.triton import _device
    from mamlpp_fast.triton import bn_pool as tbp

    seed = fresh_seed() % 2 ** 31
    launched = []
    orig_run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: (launched.append(self.fn.__name__),
                                                                           orig_run(self, *a, **k))[1])
    for dtype in (torch.float64, torch.float32):
        case = _bn_pool_case(idx, seed, dtype)
        assert tbp.pool_config(case[0].shape[0], case[0].shape[1], case[0].shape[2], case[0].shape[3],
                               case[0].device)["CHUNKS"] == 1
        launched.clear()
        one, _ = _bn_pool_all(tbp, *case, seed)
        assert launched == ["_pool_fwd_apply_kernel", "_pool_bwd_apply_kernel", "_pool_dbwd_apply_kernel"]
        assert all(int(c.abs().sum()) == 0 for c in _device._counters.values())
        monkeypatch.setattr(tbp, "SINGLE_PASS", False)
        two, _ = _bn_pool_all(tbp, *case, seed)
        monkeypatch.setattr(tbp, "SINGLE_PASS", True)
        for (name, a), (_, b) in zip(one, two):
            assert torch.equal(a, b), (name, dtype, seed)


@inner
@pytest.mark.parametrize("single", [True, False], ids=["one-kernel", "two-kernels"])
def test_activation_aliases_on_the_triton_kernels(single, monkeypatch):
    """The learner's chain on the Triton kernels: the fused block and bn_pool return an alias of their
    output (``alias=True``) that the next Triton convolution's backward node reads (``input_saved``); the
    inner gradient is taken with create_graph, the outer one without. In the outer pass the producers'
    backward kernels read the two gradients of their output (HAS_G2) and add them where they load it: one
    addition of the same two terms as autograd's, so every outer gradient is bitwise the one without
    aliases; and bn_pool's backward adds the double backward's gradient of its input (its own input
    alias, HAS_DX2) before it stores dx: bitwise dx + dx2 of the same launch without it. bn_pool's
    one-kernel and two-kernel backward passes both."""
    import torch
    from _batches import fresh_seed
    from test_fanout import _recording
    from mamlpp_fast.ops.bn_pool import bn_pool
    from mamlpp_fast.ops.conv import task_conv2d
    from mamlpp_fast.ops.conv_block import conv_bn_pool
    from mamlpp_fast.triton import bn_pool as tbp
    from mamlpp_fast.triton import conv_block as tcb

    monkeypatch.setattr(tbp, "SINGLE_PASS", single)
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *sh: torch.randn(*sh, generator=gen, dtype=torch.float64)  # noqa: E731
    t, c, ci, n = 2, 3, 1, 2
    img = rnd(n, t * ci, 12, 12)
    w0, b0 = rnd(t, c, ci, 3, 3).requires_grad_(), rnd(t, c).requires_grad_()
    w1, b1 = rnd(t, c, c, 3, 3).requires_grad_(), rnd(t, c).requires_grad_()
    w2 = rnd(t, c, c, 3, 3).requires_grad_()
    gam, bet = (1 + 0.5 * rnd(t, c)).requires_grad_(), rnd(t, c).requires_grad_()
    gam1, bet1 = (1 + 0.5 * rnd(c)).requires_grad_(), rnd(c).requires_grad_()
    params = [w0, b0, w1, b1, w2, gam, bet, gam1, bet1]
    proj, proj2 = rnd(n, t * c, 3, 3), rnd(n, t * c, 3, 3)
    wts = [rnd(*p.shape) for p in params]

    def run(alias, seen):
        res = conv_bn_pool(img, w0, b0, gam, bet, t, 1, 1, 1e-5, 0.01, impl=_recording(tcb, seen), alias=alias)
        z = task_conv2d(res[0], w1, b1, t, 1, 1, "triton", input_saved=res[3] if alias else None)
        res = bn_pool(z, gam1, bet1, t, 1e-5, 0.01, impl=_recording(tbp, seen), alias=alias)
        out = task_conv2d(res[0], w2, None, t, 1, 1, "triton", input_saved=res[3] if alias else None)
        first = torch.autograd.grad((out * proj).sum(), params, create_graph=True)
        scalar = sum((f * v).sum() for f, v in zip(first, wts)) + (out.tanh() * proj2).sum()
        return torch.autograd.grad(scalar, params, allow_unused=True)

    ref_seen, got_seen = [], []
    ref, got = run(False, ref_seen), run(True, got_seen)
    # inner pass: bn_pool, then the block; outer pass: bn_pool (its input alias's gradient), then the block
    assert ref_seen == [(False, False)] * 2 + [(False, True), (False, False)], ref_seen
    assert got_seen == [(False, False)] * 2 + [(True, True), (True, False)], got_seen
    for k, (a, r) in enumerate(zip(got, ref)):
        assert a is not None and torch.equal(a, r), f"gradient {k} differs (seed {seed})"
    # bn_pool's backward with both extra gradients against the same launch on their sums
    x = rnd(n, t * c, 6, 6)
    gm, be = gam1.detach().expand(t, -1).contiguous(), bet1.detach().expand(t, -1).contiguous()
    out, mean, invstd, sel = tbp.forward(x, gm, be, (t, 1e-5, 0.01))
    g1, g2, d2 = rnd(*out.shape), rnd(*out.shape), rnd(*x.shape)
    a = tbp.backward(g1, x, gm, be, mean, invstd, sel, (t, 1e-5, 0.01), gout2=g2, dx2=d2)
    r = tbp.backward(g1 + g2, x, gm, be, mean, invstd, sel, (t, 1e-5, 0.01))
    assert torch.equal(a[0], r[0] + d2) and torch.equal(a[1], r[1]) and torch.equal(a[2], r[2])


@inner
@pytest.mark.parametrize("structure_idx", [0, 1, 2], ids=["msl", "no_msl", "one_row"])
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_running_stats_kernel_equals_sequential(structure_idx, dtype_name):
    """The one-launch running-statistics update (triton/running_stats.py), taken by the fast learner
    under the Triton op backend, against the reference's sequential momentum updates computed in
    float64 from the same (rounded) inputs. float64: 1e-12 of the largest value. float32: each row is
    a convex combination of K + 1 values (K = tasks x forwards; the weights sum to 1), summed in fp32
    with fp32-rounded weights, and a variance costs 1/(r*r) - eps (3 roundings): at most (K + 5) u of
    the largest |value| to first order, u = 2^-24; the margin is (K + 6) u."""
    import copy

    import torch
    from _batches import fresh_seed
    from test_running_stats_batched import STRUCTURES, _model, _pending, _sequential

    dtype = getattr(torch, dtype_name)
    structure = STRUCTURES[structure_idx]
    seed = fresh_seed()
    model, gen = _model(seed)
    pending = _pending(gen, structure)
    # the inputs in the tested dtype; the float64 truth from exactly those values
    pending = {k: [(m.to(dtype).to(torch.float64), r.to(dtype).to(torch.float64), c) for m, r, c in v]
               for k, v in pending.items()}
    truth = copy.deepcopy(model)
    _sequential(truth, pending)
    model = model.to(dtype)
    before = copy.deepcopy(model.state_dict())
    model._op_backend = "triton"
    model._update_running_stats({k: [(m.to(dtype), r.to(dtype), c) for m, r, c in v] for k, v in pending.items()})
    assert [k[0] for k in model._running_stats_consts] == ["triton"], "the kernel path was not taken"
    k_max = max(3 * len(ms) for _, ms in structure)  # B = 3 tasks in _pending
    tol = 1e-12 if dtype == torch.float64 else (k_max + 6) * 2.0 ** -24
    changed = 0
    for key, ref in truth.state_dict().items():
        if "running" not in key:
            continue
        got = model.state_dict()[key].to(torch.float64)
        scale = float(ref.abs().max())
        assert float((got - ref).abs().max()) <= tol * scale, f"{key} (seed {seed})"
        changed += int(not torch.equal(model.state_dict()[key], before[key]))
    assert changed > 0


@inner
def test_running_stats_kernel_bad_inputs():
    import torch
    from mamlpp_fast.triton.running_stats import running_stats_update, running_stats_weights

    w, d, rows = running_stats_weights([[5, 4]], 2, 0.1, 1e-5, torch.float32, "cpu")
    m = [torch.randn(6), torch.randn(6)]
    r = [torch.rand(6) + 0.5, torch.rand(6) + 0.5]
    rm, rv = torch.zeros(3), torch.ones(3)
    running_stats_update(m, r, [rm], [rv], w, d, rows)
    assert rm.abs().sum() > 0
    with pytest.raises(ValueError, match="weights must be"):
        running_stats_update(m[:1], r[:1], [rm], [rv], w, d, rows[:1])
    with pytest.raises(ValueError, match="contiguous \\(6,\\)"):
        running_stats_update([torch.randn(12)[::2], m[1]], r, [rm], [rv], w, d, rows)
    with pytest.raises(ValueError, match="row indices"):
        running_stats_update(m, r, [rm], [rv], w, d, (0, 1))
    with pytest.raises(ValueError, match="weights' dtype"):
        running_stats_update(m, r, [rm], [rv], w.double(), d, rows)


@inner
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_fanout_sum_kernel_bitwise_equals_the_additions(dtype_name):
    """The fan-out node's one-launch sum (triton/fanout.py, which ops.fanout takes under the
    interpreter) against the multi-tensor additions it replaces (the same order and precision):
    bitwise, for contiguous, permuted (a convolution kernel's weight layout) and per-task tensors,
    uses without a gradient, a tensor with one gradient and one with none, and the learning-rate
    table's many uses; the node's backward through autograd as the learner runs it."""
    import torch
    from _batches import fresh_seed
    from mamlpp_fast.ops import fanout as F
    from mamlpp_fast.triton import fanout as tfan
    from mamlpp_fast.triton.fanout import sum_uses

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(fresh_seed())

    def r(*shape, perm=None):
        t = torch.randn(*shape, generator=gen, dtype=dtype)
        return t.permute(*perm) if perm else t

    shapes = [((3, 4, 5, 3, 3), None), ((3, 3, 3, 5, 4), (0, 4, 3, 1, 2)), ((3, 7), None), ((300,), None)]
    uses = 4
    per_use = [[r(*s, perm=p) for s, p in shapes] for _ in range(uses)]
    per_use[1][2] = None          # one use without a gradient of tensor 2
    per_use[2][3] = per_use[3][3] = per_use[1][3] = None  # tensor 3: one gradient only
    assert F.fanout_kernels(per_use[0][0]) is tfan
    got = F._sum_uses(per_use, len(shapes))
    for j in range(len(shapes)):
        defined = [g[j] for g in per_use if g[j] is not None]
        want = defined[0]
        for g in defined[1:]:
            want = torch._foreach_add([want], [g])[0]
        assert got[j].stride() == defined[0].stride() and torch.equal(got[j], want), j
    assert got[3] is per_use[0][3]
    # through the autograd node: 6 uses of a (2, 6) table, as the learner's learning rates
    table = r(2, 6).requires_grad_()
    aliases = F.fanout(6, [table])
    gs = [r(2, 6) for _ in range(6)]
    torch.autograd.backward([a[0] for a in aliases], gs)
    want = gs[0]
    for g in gs[1:]:
        want = want + g
    assert torch.equal(table.grad, want)
    with pytest.raises(ValueError, match="at least two"):
        sum_uses([[gs[0]]])
    with pytest.raises(ValueError, match="share shape, strides"):
        sum_uses([[gs[0], gs[1].t().contiguous().t()]])


@inner
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_fanout_rows_by_the_sum_kernel(dtype_name, monkeypatch):
    """`fanout_rows`' backward written row by row by one launch of the Triton sum equals its stacked form
    (bitwise: the same additions in use order), with tables of two shapes, a use reading some tables
    only, a use whose rows are only partly differentiated (zeros where no use has a gradient) and a
    table without any gradient (None)."""
    import torch
    from _batches import fresh_seed
    from mamlpp_fast.ops import fanout as F

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(fresh_seed())
    shapes = [(4, 6), (4, 6), (3, 5), (4, 6)]
    uses = [[0, 1, 2], [0, 1, 2], [0, 2]]  # table 3 is read by no use

    def run():
        tables = [torch.randn(*s, generator=g0, dtype=dtype).requires_grad_() for s in shapes]
        rows = F.fanout_rows(tables, uses)
        outs, gs = [], []
        for u, per in enumerate(rows):
            for t, tab_rows in zip(uses[u], per):
                for s, r in enumerate(tab_rows):
                    if u == 1 and s != 3 and t != 2:  # use 1 differentiates row 3 only (and all of table 2)
                        continue
                    if u == 2 and t == 0 and s == 0:
                        continue  # row 0 of table 0: uses 0 only
                    outs.append(r)
                    gs.append(torch.randn(r.shape, generator=g1, dtype=dtype))
        torch.autograd.backward(outs, gs)
        return [t.grad for t in tables]

    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    g0, g1 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    launches = []
    from mamlpp_fast.triton import fanout as tfan
    orig = tfan.sum_uses
    monkeypatch.setattr(tfan, "sum_uses", lambda *a, **k: (launches.append(1), orig(*a, **k))[1])
    by_kernel = run()
    assert launches == [1]
    monkeypatch.setattr(F, "fanout_kernels", lambda t: None)
    g0, g1 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    stacked = run()
    assert by_kernel[3] is None and stacked[3] is None
    for t in range(3):
        assert torch.equal(by_kernel[t], stacked[t]), (t, seed)


@inner
def test_accuracy_kernel_matches_torch_argmax():
    """The one-launch accuracy (triton/metrics.py) against torch.argmax / eq / mean: the count exact (ties
    go to the first index, a NaN counts as the largest value, a row of -inf picks index 0) and the value
    that count times the float32 factor 1/rows (what torch's mean on a CUDA device computes)."""
    import numpy as np
    import torch
    from _batches import fresh_seed
    from mamlpp_fast.triton.metrics import accuracy

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for shape, classes in (((8, 20), 20), ((2, 5), 5), ((3, 7), 3), ((700,), 37)):
        x = torch.randn(*shape, classes, generator=gen)
        x = torch.where(torch.rand(x.shape, generator=gen) < 0.3, x.round(), x)  # ties
        flat = x.view(-1, classes)
        flat[0] = float("-inf")
        flat[1, 2] = float("nan")
        flat[min(3, flat.shape[0] - 1), :] = flat[min(3, flat.shape[0] - 1), 0]  # a row of equal values
        rows = flat.shape[0]
        labels = torch.randint(0, classes, (rows,), generator=gen)
        labels[: rows // 2] = flat[: rows // 2].argmax(-1)  # half the rows right, whatever the chance
        hits = int(flat.argmax(-1).eq(labels).sum())
        got = accuracy(x, labels.view(shape))
        want = np.float32(hits) * (np.float32(1.0) / np.float32(rows))
        assert got.dtype == torch.float32 and got.dim() == 0
        assert float(got) == float(want), (shape, float(got), float(want), seed)
        assert abs(float(got) - float(flat.argmax(-1).eq(labels).float().mean())) <= 2 ** -23
    with pytest.raises(ValueError, match="labels must be"):
        accuracy(torch.randn(4, 3), torch.zeros(5, dtype=torch.int64))


@inner
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_expand_tasks_sum_kernel(dtype_name):
    """Step 0's expansion summed over the tasks by one launch (triton/fanout.py `sum_tasks`, which
    `expand_tasks`' backward takes under the interpreter): each result contiguous and equal to the sum
    over the tasks computed in float64 from the same values, for contiguous gradients, a convolution
    kernel's weight layout ((B, kh, kw, Ci, Co) storage seen as (B, Co, Ci, kh, kw)), a vector, one
    value per task, and a tensor without a gradient. float64: 1e-12 relative; float32: a sum of B terms
    in order is within (B - 1) u sum |g| of the truth (u = 2^-24). An expanded (stride-0) gradient is
    not taken by the kernel, and the node falls back to its PyTorch sums."""
    import torch
    from _batches import fresh_seed
    from mamlpp_fast.ops import fanout as F
    from mamlpp_fast.triton import fanout as tfan

    dtype = getattr(torch, dtype_name)
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    b = 5
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in
              [(4, 3, 3, 3), (6, 4, 3, 3), (7,), (), (2, 2)]]
    grads = [torch.randn(b, 4, 3, 3, 3, generator=gen, dtype=dtype),
             torch.randn(b, 3, 3, 4, 6, generator=gen, dtype=dtype).permute(0, 4, 3, 1, 2),
             torch.randn(b, 7, generator=gen, dtype=dtype),
             torch.randn(b, generator=gen, dtype=dtype),
             None]
    assert all(tfan.summable_over_tasks(g) for g in grads[:4])
    expanded = F.expand_tasks(b, params)
    torch.autograd.backward([e for e, g in zip(expanded, grads) if g is not None], [g for g in grads if g is not None])
    u = 2.0 ** -24 if dtype == torch.float32 else 1e-12
    for p, g in zip(params, grads):
        if g is None:
            assert p.grad is None
            continue
        truth = g.double().sum(0)
        assert p.grad.is_contiguous() and p.grad.shape == p.shape
        bound = (b - 1) * u * g.double().abs().sum(0) + 1e-300
        assert bool(((p.grad.double() - truth).abs() <= bound).all()), (tuple(p.shape), seed)
    # not task-major dense: the PyTorch sums
    e = torch.randn(3, generator=gen, dtype=dtype).expand(b, 3)
    assert not tfan.summable_over_tasks(e)
    q = torch.randn(3, generator=gen, dtype=dtype).requires_grad_()
    torch.autograd.backward(F.expand_tasks(b, [q]), [e])
    assert torch.allclose(q.grad, e.double().sum(0).to(dtype))
    with pytest.raises(ValueError, match="task-major dense"):
        tfan.sum_tasks([e])


@inner
def test_diagnose_fused_reports_every_result_under_the_interpreter(tmp_path):
    """bench.diagnose_fused (the device run's first look at the fused kernels) on tiny shapes: a row per op
    and launch variant, every result of the op compared (float64 errors at rounding level here),
    determinism checked, the Gram terms against PyTorch's."""
    import json

    from bench.diagnose_fused import main as diag

    out = tmp_path / "d.json"
    assert diag(["--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    block = [r for r in rows if r["op"] == "conv_bn_pool"]
    pool = [r for r in rows if r["op"] == "bn_pool"]
    assert [r["variant"] for r in block] == ["device", "one-chunk", "interpreter-config", "4-warps"]
    assert [r["variant"] for r in pool] == ["device", "interpreter-config"]
    assert all("error" not in r and r["deterministic"] for r in rows), rows
    assert set(block[0]["errors"]) == {"out", "mean", "invstd", "dw", "dbias", "dgamma", "dbeta", "ddgout", "ddw",
                                       "ddbias", "ddgamma"}
    assert max(max(r["errors"].values()) for r in rows) < 1e-12
    assert max(r["gram_err"] for r in block) < 1e-12
    assert block[1]["config"]["CHUNKS"] == 1
