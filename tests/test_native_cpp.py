"""The "cpp" backend of mamlpp_fast._C (CPU) against the float64 autograd reference (tests/_bn_reference.py).

Needs the extension built (`pip install -e . --no-build-isolation`). When `mamlpp_fast._C` is missing
these tests are skipped, or FAIL with the load error when MAMLPP_REQUIRE_NATIVE=1 (CI sets it).

Tolerances (max |got - ref| / max(1, max |ref|)): float64 1e-10; float32 2e-5 for forward/backward and
1e-4 * max(1, max invstd) for the double backward (float32 inputs, outputs and saved statistics, double
accumulation on the CPU; the reference is computed in float64 from the same float32 inputs; an
ill-conditioned column, e.g. M=2 with close values, has a large invstd that amplifies the rounding of
the saved fp32 mean/invstd).
"""
import os

import pytest
import torch

from _bn_reference import (compare, make_bn_inputs, ref_backward, ref_double_backward, ref_forward,
                           ref_lslr_backward, ref_lslr_forward)

EPS, SLOPE = 1e-5, 0.01
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-4)}  # (fwd/bwd, double bwd)


@pytest.fixture(scope="module")
def cpp():
    from mamlpp_fast import _native

    if not _native.is_loaded():
        msg = f"mamlpp_fast._C not built ({_native.load_error()}); run `pip install -e . --no-build-isolation`"
        if os.environ.get("MAMLPP_REQUIRE_NATIVE", "0") not in ("", "0"):
            pytest.fail("MAMLPP_REQUIRE_NATIVE=1 but " + msg, pytrace=False)
        pytest.skip(msg)
    return _native.get()  # the native backend, handed CPU tensors here


# (N, T, C, H, W): 1x1 spatial, N in {1,2,3}, tasks 1..8, 3x3 / 7x7 spatial (learner's last layers)
SHAPES = [
    (2, 1, 3, 1, 1),
    (3, 2, 4, 1, 1),
    (1, 3, 2, 3, 3),
    (2, 8, 3, 2, 2),
    (3, 4, 5, 3, 3),
    (1, 2, 3, 7, 7),
    (2, 5, 2, 4, 3),
    (3, 6, 2, 5, 1),
]


def _ids(shapes):
    return ["N{}T{}C{}H{}W{}".format(*s) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "pertask"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_bn_all_orders(cpp, shape, shared, dtype):
    N, T, C, H, W = shape
    d = make_bn_inputs(N, T, C, H, W, shared=shared, dtype=dtype, seed=hash(shape) % 1000)
    tol, tol2 = TOL[dtype]
    x, g, b = d["x"], d["gamma"], d["beta"]
    y, mean, invstd = cpp.bn_forward(x, g, b, T, EPS, SLOPE)
    ry, rm, rr = ref_forward(x, g, b, T, EPS, SLOPE)
    assert y.dtype == dtype and mean.shape == (T * C,) and invstd.shape == (T * C,)
    compare("y", y, ry, tol)
    compare("mean", mean, rm, tol)
    compare("invstd", invstd, rr, tol)

    dx, dg, db = cpp.bn_backward(d["dy"], x, g, b, mean, invstd, T, SLOPE)
    rdx, rdg, rdb = ref_backward(d["dy"], x, g, b, T, EPS, SLOPE)
    assert dg.shape == g.shape and db.shape == b.shape
    compare("dx", dx, rdx, tol)
    compare("dgamma", dg, rdg, tol)
    compare("dbeta", db, rdb, tol)

    gx, gg, gdy = cpp.bn_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], x, g, b,
                                         mean, invstd, T, SLOPE)
    rgx, rgg, rgdy = ref_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], x, g, b, T,
                                         EPS, SLOPE)
    assert gg.shape == g.shape
    cond = max(1.0, float(invstd.max()))  # rounding of the saved statistics is amplified ~ r
    compare("gx", gx, rgx, tol2 * cond)
    compare("ggamma", gg, rgg, tol2 * cond)
    compare("gdy", gdy, rgdy, tol2 * cond)


@pytest.mark.parametrize("which", ["ggx", "gggamma", "ggbeta", "none"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "pertask"])
def test_bn_double_backward_none_inputs(cpp, which, shared):
    """Only one of ggx / gggamma / ggbeta given (the others None = zeros), or none at all."""
    N, T, C, H, W = 3, 2, 3, 3, 3
    d = make_bn_inputs(N, T, C, H, W, shared=shared, seed=7)
    x, g, b = d["x"], d["gamma"], d["beta"]
    _, mean, invstd = cpp.bn_forward(x, g, b, T, EPS, SLOPE)
    u = {k: (d[k] if k == which else None) for k in ("ggx", "gggamma", "ggbeta")}
    got = cpp.bn_double_backward(u["ggx"], u["gggamma"], u["ggbeta"], d["dy"], x, g, b, mean,
                                 invstd, T, SLOPE)
    ref = ref_double_backward(u["ggx"], u["gggamma"], u["ggbeta"], d["dy"], x, g, b, T, EPS, SLOPE)
    for name, a, r in zip(("gx", "ggamma", "gdy"), got, ref):
        compare(name, a, r, 1e-10)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "pertask"])
def test_bn_float32_larger_and_shifted(cpp, shared):
    """M = 5*21*21 = 2205 per channel, inputs with |mean| >> std (variance must not cancel)."""
    N, T, C, H, W = 5, 2, 4, 21, 21
    d = make_bn_inputs(N, T, C, H, W, shared=shared, dtype=torch.float32, seed=3, x_scale=0.5,
                       x_shift=100.0)
    x, g, b = d["x"], d["gamma"], d["beta"]
    y, mean, invstd = cpp.bn_forward(x, g, b, T, EPS, SLOPE)
    ry, rm, rr = ref_forward(x, g, b, T, EPS, SLOPE)
    compare("y", y, ry, 1e-4)
    compare("invstd", invstd, rr, 1e-5)
    dx, dg, db = cpp.bn_backward(d["dy"], x, g, b, mean, invstd, T, SLOPE)
    for name, a, r in zip(("dx", "dgamma", "dbeta"), (dx, dg, db),
                          ref_backward(d["dy"], x, g, b, T, EPS, SLOPE)):
        compare(name, a, r, 1e-4)
    got = cpp.bn_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], x, g, b, mean, invstd,
                                 T, SLOPE)
    ref = ref_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], x, g, b, T, EPS, SLOPE)
    for name, a, r in zip(("gx", "ggamma", "gdy"), got, ref):
        compare(name, a, r, 2e-4)


def test_bn_single_element_per_channel(cpp):
    """M = 1 (N=1, 1x1): var = 0, xhat = 0, y = leaky(beta), dx = 0 (F.batch_norm refuses this case)."""
    T, C = 2, 3
    x = torch.randn(1, T * C, 1, 1, dtype=torch.float64)
    g = torch.rand(C, dtype=torch.float64) + 0.5
    b = torch.randn(C, dtype=torch.float64)
    y, mean, invstd = cpp.bn_forward(x, g, b, T, EPS, SLOPE)
    compare("mean", mean, x.reshape(-1), 0)
    compare("invstd", invstd, torch.full((T * C,), EPS ** -0.5, dtype=torch.float64), 1e-14)
    compare("y", y.reshape(-1), torch.nn.functional.leaky_relu(b.repeat(T), SLOPE), 1e-15)
    dx, dg, db = cpp.bn_backward(torch.ones_like(x), x, g, b, mean, invstd, T, SLOPE)
    assert torch.all(dx == 0)


def test_bn_deterministic_across_threads(cpp):
    """Bit-identical results run to run and with 1 or several intra-op threads."""
    d = make_bn_inputs(4, 3, 5, 9, 9, shared=True, dtype=torch.float32, seed=11)
    args = (d["x"], d["gamma"], d["beta"])
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, max(2, old), 1):
            torch.set_num_threads(nt)
            y, m, r = cpp.bn_forward(*args, 3, EPS, SLOPE)
            dx, dg, db = cpp.bn_backward(d["dy"], *args, m, r, 3, SLOPE)
            gx, gg, gdy = cpp.bn_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], *args,
                                                 m, r, 3, SLOPE)
            outs.append(torch.cat([t.reshape(-1) for t in (y, m, r, dx, dg, db, gx, gg, gdy)]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ------------------------------------------------------------------------------------------------
# LSLR
# ------------------------------------------------------------------------------------------------
def _lslr_inputs(dtype, T=4, S=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3, 3, 3), (5,), (2, 7), (4,), (1,)]
    shared = [True, False, True, False, True]
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    grads = [rnd(T, *s) for s in shapes]
    thetas = [rnd(*s) if sh else rnd(T, *s) for s, sh in zip(shapes, shared)]
    alphas = [rnd(S + 1).abs() for _ in shapes]
    douts = [rnd(T, *s) for s in shapes]
    return thetas, grads, alphas, douts, shared


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("step", [0, 2, 3])
def test_lslr_forward_backward(cpp, dtype, step):
    thetas, grads, alphas, douts, shared = _lslr_inputs(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    outs = cpp.lslr_forward(thetas, grads, alphas, step)
    for l, (o, r) in enumerate(zip(outs, ref_lslr_forward(thetas, grads, alphas, step))):
        assert o.dtype == dtype
        compare(f"out[{l}]", o, r, tol)
    dth, dgr, dal = cpp.lslr_backward(douts, grads, alphas, step, shared)
    rth, rgr, ral = ref_lslr_backward(douts, grads, alphas, step, shared)
    for l in range(len(grads)):
        assert dth[l].shape == thetas[l].shape
        compare(f"dtheta[{l}]", dth[l], rth[l], tol)
        compare(f"dgrad[{l}]", dgr[l], rgr[l], tol)
        compare(f"dalpha[{l}]", dal[l], ral[l], tol)
        if not shared[l]:
            assert dth[l] is douts[l] or dth[l].data_ptr() == douts[l].data_ptr()


def test_lslr_backward_none_douts_and_noncontiguous(cpp):
    thetas, grads, alphas, douts, shared = _lslr_inputs(torch.float64, seed=5)
    douts = list(douts)
    douts[1] = None
    grads = [g.transpose(0, -1).contiguous().transpose(0, -1) if g.dim() > 1 else g for g in grads]
    dth, dgr, dal = cpp.lslr_backward(douts, grads, alphas, 1, shared)
    assert torch.all(dth[1] == 0) and torch.all(dgr[1] == 0) and torch.all(dal[1] == 0)
    assert dth[1].shape == grads[1].shape
    full = [d if d is not None else torch.zeros_like(g) for d, g in zip(douts, grads)]
    rth, rgr, ral = ref_lslr_backward(full, grads, alphas, 1, shared)
    for l in (0, 2, 3, 4):
        compare(f"dtheta[{l}]", dth[l], rth[l], 1e-12)
        compare(f"dgrad[{l}]", dgr[l], rgr[l], 1e-12)
        compare(f"dalpha[{l}]", dal[l], ral[l], 1e-12)


def test_lslr_large_deterministic(cpp):
    """Several CPU work blocks (> 4096 positions): sums are bit-identical for 1 or many threads."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(8, 64, 64, 3, 3, generator=gen)]
    douts = [torch.randn(8, 64, 64, 3, 3, generator=gen)]
    alphas = [torch.rand(6, generator=gen)]
    old = torch.get_num_threads()
    res = []
    try:
        for nt in (1, max(2, old)):
            torch.set_num_threads(nt)
            res.append(cpp.lslr_backward(douts, grads, alphas, 4, [True]))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(res[0], res[1]):
        assert torch.equal(a[0], b[0])
    _, _, ral = ref_lslr_backward(douts, grads, alphas, 4, [True])
    compare("dalpha", res[0][2][0], ral[0], 1e-6)


# ------------------------------------------------------------------------------------------------
# Bad inputs: RuntimeError whose message names the argument
# ------------------------------------------------------------------------------------------------
def _bn(N=2, T=2, C=3, H=3, W=3, dtype=torch.float64):
    return make_bn_inputs(N, T, C, H, W, dtype=dtype)


BN_BAD_CASES = ["non-contiguous", "3-D", "gamma-shape", "beta-shape", "gamma-dtype", "half", "tasks-4", "tasks-0",
                "gamma-2d"]


@pytest.mark.parametrize("case", BN_BAD_CASES)
def test_bn_bad_inputs(cpp, case):
    """One test per case, so that a crash (one was seen in a CUDA build on a GPU machine, 2026-12-04, inside
    this test's loop of cases) names the case that crashed."""
    d = _bn()
    x, g, b = d["x"], d["gamma"], d["beta"]
    cases = dict(zip(BN_BAD_CASES, [
        ((x.transpose(2, 3), g, b, 2), "x must be contiguous"),
        ((x[0], g, b, 2), "x must be 4-D"),
        ((x, g[:2], b[:2], 2), "gamma must be (C,)"),
        ((x, g, b[:2], 2), "beta must have the shape of gamma"),
        ((x, g.float(), b, 2), "gamma has dtype Float but x has dtype Double"),
        ((x.half(), g.half(), b.half(), 2), "x must be float32 or float64"),
        ((x, g, b, 4), "num_tasks=4 does not divide"),
        ((x, g, b, 0), "num_tasks must be >= 1"),
        ((x, g.expand(3, 3).contiguous(), b.expand(3, 3).contiguous(), 2), "gamma must be (C,)"),
    ]))
    args, msg = cases[case]
    with pytest.raises(RuntimeError, match=_re(msg)):
        cpp.bn_forward(*args, EPS, SLOPE)


def test_bn_backward_bad_inputs(cpp):
    d = _bn()
    x, g, b = d["x"], d["gamma"], d["beta"]
    _, m, r = cpp.bn_forward(x, g, b, 2, EPS, SLOPE)
    with pytest.raises(RuntimeError, match=_re("dy must have the shape of x")):
        cpp.bn_backward(d["dy"][:1], x, g, b, m, r, 2, SLOPE)
    with pytest.raises(RuntimeError, match=_re("mean must be (T*C,)")):
        cpp.bn_backward(d["dy"], x, g, b, m[:3], r, 2, SLOPE)
    with pytest.raises(RuntimeError, match=_re("invstd has dtype Float")):
        cpp.bn_backward(d["dy"], x, g, b, m, r.float(), 2, SLOPE)
    with pytest.raises(RuntimeError, match=_re("ggx must have the shape of x")):
        cpp.bn_double_backward(d["ggx"][:, :2], None, None, d["dy"], x, g, b, m, r, 2, SLOPE)
    with pytest.raises(RuntimeError, match=_re("gggamma must have the shape of gamma")):
        cpp.bn_double_backward(None, d["gggamma"][:1], None, d["dy"], x, g, b, m, r, 2, SLOPE)
    with pytest.raises(RuntimeError, match=_re("ggbeta has dtype Float")):
        cpp.bn_double_backward(None, None, d["ggbeta"].float(), d["dy"], x, g, b, m, r, 2, SLOPE)


def test_lslr_bad_inputs(cpp):
    thetas, grads, alphas, douts, shared = _lslr_inputs(torch.float64)
    with pytest.raises(RuntimeError, match=_re("must have the same length, got 5, 4, 5")):
        cpp.lslr_forward(thetas, grads[:4], alphas, 0)
    with pytest.raises(RuntimeError, match=_re("step 4 out of range for alphas[0]")):
        cpp.lslr_forward(thetas, grads, alphas, 4)
    with pytest.raises(RuntimeError, match=_re("step -1 out of range")):
        cpp.lslr_forward(thetas, grads, alphas, -1)
    bad = list(thetas)
    bad[2] = thetas[2][:, :3]
    with pytest.raises(RuntimeError, match=_re("thetas[2] must have the shape of grads[2]")):
        cpp.lslr_forward(bad, grads, alphas, 0)
    bad = list(grads)
    bad[1] = grads[1].float()
    with pytest.raises(RuntimeError, match=_re("grads[1] has dtype Float but grads[0] has dtype Double")):
        cpp.lslr_forward(thetas, bad, alphas, 0)
    bad = list(grads)
    bad[3] = grads[3][:2]
    with pytest.raises(RuntimeError, match=_re("grads[3] must be (T, ...) with T=4")):
        cpp.lslr_forward(thetas, bad, alphas, 0)
    bad = list(alphas)
    bad[0] = alphas[0].reshape(2, 2)
    with pytest.raises(RuntimeError, match=_re("alphas[0] must be 1-D")):
        cpp.lslr_forward(thetas, grads, bad, 0)
    with pytest.raises(RuntimeError, match=_re("douts, grads, alphas and shared must have the same length")):
        cpp.lslr_backward(douts, grads, alphas, 0, shared[:2])
    bad = list(douts)
    bad[4] = douts[4][:1]
    with pytest.raises(RuntimeError, match=_re("douts[4] must have the shape of grads[4]")):
        cpp.lslr_backward(bad, grads, alphas, 0, shared)


def _re(text):
    import re

    return re.escape(text)
