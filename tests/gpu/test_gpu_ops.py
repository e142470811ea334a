"""GPU checks of the "cuda" (mamlpp_fast._C) and "triton" backends against the float64 autograd
reference (tests/_bn_reference.py, evaluated on the GPU in float64). Skipped without CUDA.

- small shapes (1x1 / 3x3 / odd spatial, N in {1,2,3}, tasks 1..8), shared and per-task gamma, float64
  (tol 1e-10) and float32 (2e-5 forward/backward, 1e-4 * max(1, max invstd) double backward);
- the double backward with None inputs; bit-reproducibility (two runs give identical bits);
- LSLR forward/backward (> 24 tensors: several packed launches; > 1024 positions: several blocks);
- `slow`: float32 at the learner's shapes (Omniglot 20 x 8*64 x 28x28, mini-ImageNet 75 x 2*48 x
  84x84), where the columns are split over several blocks; tolerances 1e-4 / 1e-3.
When the extension lacks CUDA the "cuda" cases fail if MAMLPP_REQUIRE_NATIVE=1, else they skip.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for _bn_reference
from _bn_reference import (compare, make_bn_inputs, ref_backward, ref_double_backward,  # noqa: E402
                           ref_forward, ref_lslr_backward, ref_lslr_forward)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EPS, SLOPE = 1e-5, 0.01
DEV = "cuda"


def _backend(name):
    if name == "cuda":
        from mamlpp_fast import _native

        if "cuda" not in _native.device_types():
            why = _native.load_error() or f"_C built with: {_native.built_with()}"
            if os.environ.get("MAMLPP_REQUIRE_NATIVE", "0") not in ("", "0"):
                pytest.fail(f"MAMLPP_REQUIRE_NATIVE=1 but the cuda backend is missing ({why})",
                            pytrace=False)
            pytest.skip(f"cuda backend not built ({why})")
        return _native.get()  # the native backend; its functions dispatch on the device
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set")
    from mamlpp_fast import triton as tb

    if not tb.is_available():
        pytest.skip(f"triton unavailable: {tb.unavailable_reason()}")
    return tb


@pytest.fixture(params=["cuda", "triton"])
def be(request):
    return _backend(request.param)


def _check_all(be, d, T, tol, tol2):
    x, g, b = d["x"], d["gamma"], d["beta"]
    y, mean, invstd = be.bn_forward(x, g, b, T, EPS, SLOPE)
    assert y.is_cuda and mean.shape == (x.shape[1],)
    for name, a, r in zip(("y", "mean", "invstd"), (y, mean, invstd),
                          ref_forward(x, g, b, T, EPS, SLOPE)):
        compare(name, a, r, tol)
    got = be.bn_backward(d["dy"], x, g, b, mean, invstd, T, SLOPE)
    for name, a, r in zip(("dx", "dgamma", "dbeta"), got,
                          ref_backward(d["dy"], x, g, b, T, EPS, SLOPE)):
        compare(name, a, r, tol)
    got = be.bn_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], x, g, b, mean, invstd,
                                T, SLOPE)
    ref = ref_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], x, g, b, T, EPS, SLOPE)
    cond = max(1.0, float(invstd.max()))
    for name, a, r in zip(("gx", "ggamma", "gdy"), got, ref):
        compare(name, a, r, tol2 * cond)


SHAPES = [(2, 1, 3, 1, 1), (3, 2, 4, 1, 1), (1, 3, 2, 3, 3), (2, 8, 3, 2, 2), (3, 4, 5, 7, 7),
          (2, 5, 2, 5, 3)]
TOLS = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "pertask"])
@pytest.mark.parametrize("shape", SHAPES, ids=["N{}T{}C{}H{}W{}".format(*s) for s in SHAPES])
def test_bn_small(be, shape, shared, dtype):
    d = make_bn_inputs(*shape, shared=shared, dtype=dtype, device=DEV, seed=sum(shape))
    _check_all(be, d, shape[1], *TOLS[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "pertask"])
def test_bn_multi_block_columns(be, shared, dtype):
    """M = 40*17*17 = 11560 per column and few columns: several blocks per column (chunked path)."""
    d = make_bn_inputs(40, 2, 3, 17, 17, shared=shared, dtype=dtype, device=DEV, seed=5,
                       x_shift=2.0)
    _check_all(be, d, 2, *((1e-10, 1e-10) if dtype == torch.float64 else (5e-5, 2e-4)))


@pytest.mark.parametrize("which", ["ggx", "gggamma", "ggbeta", "none"])
def test_bn_double_backward_none(be, which):
    d = make_bn_inputs(3, 2, 3, 4, 4, shared=True, dtype=torch.float64, device=DEV, seed=2)
    x, g, b = d["x"], d["gamma"], d["beta"]
    _, mean, invstd = be.bn_forward(x, g, b, 2, EPS, SLOPE)
    u = {k: (d[k] if k == which else None) for k in ("ggx", "gggamma", "ggbeta")}
    got = be.bn_double_backward(u["ggx"], u["gggamma"], u["ggbeta"], d["dy"], x, g, b, mean, invstd,
                                2, SLOPE)
    ref = ref_double_backward(u["ggx"], u["gggamma"], u["ggbeta"], d["dy"], x, g, b, 2, EPS, SLOPE)
    for name, a, r in zip(("gx", "ggamma", "gdy"), got, ref):
        compare(name, a, r, 1e-10)


def test_bn_bit_reproducible(be):
    d = make_bn_inputs(20, 4, 16, 14, 14, shared=True, dtype=torch.float32, device=DEV, seed=8)
    x, g, b = d["x"], d["gamma"], d["beta"]

    def run():
        y, m, r = be.bn_forward(x, g, b, 4, EPS, SLOPE)
        dx, dg, db = be.bn_backward(d["dy"], x, g, b, m, r, 4, SLOPE)
        gx, gg, gdy = be.bn_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], x, g, b, m,
                                            r, 4, SLOPE)
        return torch.cat([t.reshape(-1) for t in (y, m, r, dx, dg, db, gx, gg, gdy)])

    assert torch.equal(run(), run())


def test_cuda_matches_cpp_f64():
    """The CUDA kernels and the C++ CPU loops share kernels/bn_math.h: same results to ~1e-12."""
    cuda = _backend("cuda")
    from mamlpp_fast import _native

    cpp = _native.get()  # the same functions: the dispatcher runs the C++ loops for CPU tensors
    d = make_bn_inputs(3, 4, 5, 6, 6, shared=False, dtype=torch.float64, seed=12)
    dc = {k: v.to(DEV) for k, v in d.items()}
    a = cpp.bn_forward(d["x"], d["gamma"], d["beta"], 4, EPS, SLOPE)
    c = cuda.bn_forward(dc["x"], dc["gamma"], dc["beta"], 4, EPS, SLOPE)
    for n, p, q in zip(("y", "mean", "invstd"), a, c):
        compare(n, q, p, 1e-12)
    a2 = cpp.bn_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], d["x"], d["gamma"],
                                d["beta"], a[1], a[2], 4, SLOPE)
    c2 = cuda.bn_double_backward(dc["ggx"], dc["gggamma"], dc["ggbeta"], dc["dy"], dc["x"],
                                 dc["gamma"], dc["beta"], c[1], c[2], 4, SLOPE)
    for n, p, q in zip(("gx", "ggamma", "gdy"), a2, c2):
        compare(n, q, p, 1e-12)


def test_cuda_rejects_mixed_devices():
    cuda = _backend("cuda")
    d = make_bn_inputs(2, 2, 3, 3, 3, dtype=torch.float32, device=DEV)
    with pytest.raises(RuntimeError, match="gamma is on cpu but x is on cuda"):
        cuda.bn_forward(d["x"], d["gamma"].cpu(), d["beta"], 2, EPS, SLOPE)


def test_cuda_current_stream():
    """Kernels run on the current stream (not the default one)."""
    cuda = _backend("cuda")
    d = make_bn_inputs(4, 2, 8, 7, 7, dtype=torch.float32, device=DEV, seed=3)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # inputs were made on the default stream
    with torch.cuda.stream(s):
        y, m, r = cuda.bn_forward(d["x"], d["gamma"], d["beta"], 2, EPS, SLOPE)
    s.synchronize()
    ry, _, _ = ref_forward(d["x"], d["gamma"], d["beta"], 2, EPS, SLOPE)
    compare("y", y, ry, 2e-5)


# ------------------------------------------------------------------------------------------------
# LSLR
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_lslr(be, dtype):
    gen = torch.Generator().manual_seed(4)
    T, S, step = 8, 5, 3
    shapes = [(64, 3, 3, 3), (64,), (64, 64, 3, 3), (5, 64), (1,), (7,)] * 5  # 30 tensors
    shared = [i % 2 == 0 for i in range(len(shapes))]

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEV)

    grads = [rnd(T, *s) for s in shapes]
    thetas = [rnd(*s) if sh else rnd(T, *s) for s, sh in zip(shapes, shared)]
    alphas = [rnd(S + 1).abs() for _ in shapes]
    douts = [rnd(T, *s) for s in shapes]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    outs = be.lslr_forward(thetas, grads, alphas, step)
    for l, (o, r) in enumerate(zip(outs, ref_lslr_forward(thetas, grads, alphas, step))):
        compare(f"out[{l}]", o, r, tol)
    douts[3] = None
    full = [dd if dd is not None else torch.zeros_like(g) for dd, g in zip(douts, grads)]
    dth, dgr, dal = be.lslr_backward(douts, grads, alphas, step, shared)
    rth, rgr, ral = ref_lslr_backward(full, grads, alphas, step, shared)
    for l in range(len(shapes)):
        compare(f"dtheta[{l}]", dth[l], rth[l], tol)
        compare(f"dgrad[{l}]", dgr[l], rgr[l], tol)
        compare(f"dalpha[{l}]", dal[l], ral[l], tol * 10)
    again = be.lslr_backward(douts, grads, alphas, step, shared)
    assert all(torch.equal(a, b) for a, b in zip(dal, again[2]))


def test_lslr_layouts(be):
    """Operands in the Triton weight gradient's layout (B, kh, kw, Ci, Co), in others, and not dense, on
    the device: the formulas' values, and the outputs in the gradient's layout (tests/_bn_reference.py)."""
    from _bn_reference import check_lslr_layouts
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    check_lslr_layouts(be, torch.Generator().manual_seed(seed), device=DEV)


# ------------------------------------------------------------------------------------------------
# learner shapes (float32), slow
# ------------------------------------------------------------------------------------------------
LEARNER = [(20, 8, 64, 28, 28), (20, 8, 64, 3, 3), (75, 2, 48, 84, 84), (5, 2, 48, 21, 21)]


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "pertask"])
@pytest.mark.parametrize("shape", LEARNER, ids=["N{}T{}C{}H{}W{}".format(*s) for s in LEARNER])
def test_bn_learner_shapes_f32(be, shape, shared):
    d = make_bn_inputs(*shape, shared=shared, dtype=torch.float32, device=DEV, seed=6, x_shift=0.5)
    _check_all(be, d, shape[1], 1e-4, 1e-3)
    del d
    torch.cuda.empty_cache()
