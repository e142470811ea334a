"""Tests of mamlpp_fast.ops.per_step_batch_norm and of the backend registry (CPU).

Inputs are fresh random numbers on every run; each test prints its seed (shown by pytest on failure)
and failure messages repeat it. Rerun a failure with MAMLPP_TEST_SEED=<seed>.
"""
import doctest
import logging
import math
import os
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from mamlpp_fast import ops
from mamlpp_fast.ops import backend as registry
from mamlpp_fast.ops import per_step_bn
from mamlpp_fast.ops import per_step_batch_norm

F64, F32 = torch.float64, torch.float32
U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of float32, 5.96e-8


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
class Rng:
    def __init__(self, seed):
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=F64):
        return torch.randn(*shape, generator=self.gen, dtype=F64).to(dtype)

    def rand(self, *shape, dtype=F64):
        return torch.rand(*shape, generator=self.gen, dtype=F64).to(dtype)

    def randint(self, lo, hi):
        return int(torch.randint(lo, hi, (), generator=self.gen))


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("MAMLPP_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"{request.node.name}: seed={seed} (rerun with MAMLPP_TEST_SEED={seed})")
    torch.manual_seed(seed)  # for torch's own random draws (e.g. inside gradcheck)
    return Rng(seed)


def check_close(actual, expected, tol, what, seed, floor=0.0):
    """Normwise relative check: max|a - e| <= tol * max(max|e|, max|a|, floor); None counts as zeros.

    `floor` is the natural magnitude of the terms the result is computed from: rounding errors scale
    with it, not with the result, when the result is a cancellation (e.g. dx for M = 2)."""
    if actual is None and expected is None:
        return
    ref = actual if actual is not None else expected
    a = torch.zeros_like(ref, dtype=F64) if actual is None else actual.detach().to(F64)
    e = torch.zeros_like(ref, dtype=F64) if expected is None else expected.detach().to(F64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)} (seed={seed})"
    assert torch.isfinite(a).all(), f"{what}: non-finite values (seed={seed})"
    scale = max(e.abs().max().item(), a.abs().max().item(), float(floor)) if a.numel() else 0.0
    if scale == 0.0:
        return
    err = (a - e).abs()
    rel = err.max().item() / scale
    if not rel <= tol:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: normwise relative error {rel:.3e} > tol {tol:.3e}; worst at {idx}: got "
            f"{a[idx].item():.10g}, want {e[idx].item():.10g}; mean |diff| {err.mean().item():.3e}, "
            f"scale {scale:.3e}; seed={seed}")


def make_inputs(rng, T, C, N, H, W, per_task, slope, dtype=F64, margin=1e-3, eps=1e-5):
    """x with a random offset and scale per channel, gamma of both signs, and no z within `margin`
    of the leaky-ReLU kink (so finite differences never cross it)."""
    gshape = (T, C) if per_task else (C,)
    for _ in range(100):
        offset = rng.randn(1, T * C, 1, 1) * 2.0
        spread = rng.rand(1, T * C, 1, 1) * 1.5 + 0.5
        x = rng.randn(N, T * C, H, W) * spread + offset
        gamma = (rng.rand(*gshape) + 0.5) * torch.where(rng.rand(*gshape) < 0.2, -1.0, 1.0)
        beta = rng.randn(*gshape) * 0.5
        xv = x.reshape(N, T, C, H * W)
        var, mu = torch.var_mean(xv, dim=(0, 3), correction=0, keepdim=True)
        xhat = (xv - mu) / torch.sqrt(var + eps)
        gv = gamma.reshape(1, -1 if per_task else 1, C, 1)
        z = gv * xhat + beta.reshape(gv.shape)
        if N * H * W == 1 or z.abs().min() > margin:
            break
    else:
        raise AssertionError(f"could not draw inputs away from the kink (seed={rng.seed})")
    return x.to(dtype), gamma.to(dtype), beta.to(dtype)


def reference_bn(x, gamma, beta, num_tasks, eps=1e-5, slope=0.01):
    """Stock PyTorch: F.batch_norm over the T*C channels (training statistics) + F.leaky_relu."""
    gf = gamma.repeat(num_tasks) if gamma.dim() == 1 else gamma.reshape(-1)
    bf = beta.repeat(num_tasks) if beta.dim() == 1 else beta.reshape(-1)
    return F.leaky_relu(F.batch_norm(x, None, None, gf, bf, training=True, eps=eps), slope)


def manual_bn(x, gamma, beta, num_tasks, eps=1e-5, slope=0.01):
    """The formulas written out with autograd (also valid for M = 1, which F.batch_norm rejects)."""
    n, tc, h, w = x.shape
    xv = x.reshape(n, num_tasks, tc // num_tasks, h * w)
    mu = xv.mean((0, 3), keepdim=True)
    var = (xv - mu).square().mean((0, 3), keepdim=True)
    shape = (1, gamma.shape[0] if gamma.dim() == 2 else 1, tc // num_tasks, 1)
    z = gamma.reshape(shape) * (xv - mu) / torch.sqrt(var + eps) + beta.reshape(shape)
    return F.leaky_relu(z, slope).reshape(x.shape)


def first_and_second(fn, x, gamma, beta, dy, u, u_gamma, u_beta, use):
    """First-order grads (dx, dgamma, dbeta) of <fn(x, gamma, beta), dy>, then the grads w.r.t.
    (x, gamma, beta, dy) of S = <u, dx>*use[0] + <u_gamma, dgamma>*use[1] + <u_beta, dbeta>*use[2]."""
    x, gamma, beta, dy = (t.detach().requires_grad_() for t in (x, gamma, beta, dy))
    y = fn(x, gamma, beta)
    first = torch.autograd.grad(y, (x, gamma, beta), dy, create_graph=True)
    terms = [(v * f).sum() for v, f, k in zip((u, u_gamma, u_beta), first, use) if k]
    second = torch.autograd.grad(sum(terms), (x, gamma, beta, dy), allow_unused=True)
    return y.detach(), [f.detach() for f in first], second


def natural_scales(x, gamma, beta, dy, u, u_gamma, u_beta, num_tasks, eps=1e-5):
    """Upper bounds (up to O(1) factors) of the magnitudes of the terms that make up each result, in
    the symbols of mamlpp_fast.ops.per_step_bn (X = max|xhat|, G = max|gamma|, D = max|dy|, ...)."""
    n, tc, h, w = x.shape
    M = n * h * w
    xv = x.detach().double().reshape(n, num_tasks, tc // num_tasks, h * w)
    var, mu = torch.var_mean(xv, dim=(0, 3), correction=0, keepdim=True)
    r = (var + eps).rsqrt()
    X = ((xv - mu) * r).abs().max().item()
    r = r.max().item()
    G, B = gamma.abs().max().item(), beta.abs().max().item()
    D, U = dy.abs().max().item(), u.abs().max().item()
    UG, UB = u_gamma.abs().max().item(), u_beta.abs().max().item()
    k = 2 + X * X
    return {
        "y": G * X + B,
        "dx": G * r * D * k,
        "dgamma": M * D * X,
        "dbeta": M * D,
        "d2 x": r * D * ((2 * G * r * U * X + UG) * k + 3 * G * r * U * X * X),
        "d2 gamma": r * M * U * D * k,
        "d2 beta": 0.0,
        "d2 dy": G * r * U * k + UG * X + UB,
    }


# Shapes (T, C, N, H, W, gamma per task): tasks 1..8, channels 1..5, spatial 1x1 / 2x3 / 5x5,
# N in {1, 2, 3}; every case has M = N*H*W >= 2.
CASES = [
    (1, 1, 2, 1, 1, False),
    (1, 3, 3, 2, 3, True),
    (2, 2, 1, 2, 3, False),
    (3, 5, 2, 1, 1, True),
    (4, 2, 1, 5, 5, False),
    (8, 1, 3, 1, 1, True),
    (5, 4, 1, 2, 3, False),
    (2, 3, 2, 5, 5, True),
    (6, 2, 2, 2, 3, True),
    (7, 5, 3, 1, 1, False),
]
SLOPES = [0.01, 0.2]


def case_id(c):
    T, C, N, H, W, pt = c
    return f"T{T}C{C}N{N}-{H}x{W}-{'pertask' if pt else 'shared'}"


# ----------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck_and_gradgradcheck(rng, case, slope):
    T, C, N, H, W, per_task = case
    x, gamma, beta = make_inputs(rng, T, C, N, H, W, per_task, slope)
    inputs = tuple(t.requires_grad_() for t in (x, gamma, beta))
    dy = rng.randn(*x.shape).requires_grad_()

    def fn(x, gamma, beta):
        return per_step_batch_norm(x, gamma, beta, T, slope=slope, backend="torch")[0]

    fast = x.numel() > 150  # the projections of fast mode keep the big cases quick
    assert gradcheck(fn, inputs, fast_mode=fast), f"gradcheck failed (seed={rng.seed})"
    # w.r.t. x, gamma, beta and the upstream grad dy
    assert gradgradcheck(fn, inputs, (dy,), fast_mode=fast), f"gradgradcheck failed (seed={rng.seed})"


def test_single_element_channels_are_finite(rng):
    """M = 1 (N = 1, 1x1): var = 0, xhat = 0, y = leaky_relu(beta); all derivatives finite."""
    T, C = 3, 2
    x, gamma, beta = make_inputs(rng, T, C, 1, 1, 1, True, 0.01)
    dy, u = rng.randn(*x.shape), rng.randn(*x.shape)
    ug, ub = rng.randn(T, C), rng.randn(T, C)
    fn = lambda x, g, b: per_step_batch_norm(x, g, b, T, backend="torch")[0]  # noqa: E731
    y, first, second = first_and_second(fn, x, gamma, beta, dy, u, ug, ub, (1, 1, 1))
    for name, t in zip(("y", "dx", "dgamma", "dbeta", "gx", "ggamma", "gbeta", "gdy"),
                       (y, *first, *second)):
        assert t is None or torch.isfinite(t).all(), f"{name} not finite (seed={rng.seed})"
    check_close(y, F.leaky_relu(beta.reshape(1, T * C, 1, 1), 0.01), 1e-15, "y", rng.seed)
    ry, rfirst, rsecond = first_and_second(lambda x, g, b: manual_bn(x, g, b, T), x, gamma, beta,
                                           dy, u, ug, ub, (1, 1, 1))
    for name, a, e in zip(("dx", "dgamma", "dbeta", "gx", "ggamma", "gbeta", "gdy"),
                          (*first, *second), (*rfirst, *rsecond)):
        check_close(a, e, 1e-10, name, rng.seed)


# ----------------------------------------------------------------------------------------------
# Agreement with stock PyTorch (F.batch_norm + F.leaky_relu with autograd)
# ----------------------------------------------------------------------------------------------
USES = [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]


def offset_ratio(x, num_tasks, eps=1e-5):
    """kappa = max over channels of |mu| * r: how much the rounding of x - mu is amplified by the
    normalisation (the condition of batch norm with respect to the rounding of the mean)."""
    n, tc, h, w = x.shape
    var, mu = torch.var_mean(x.double().reshape(n, tc, h * w).transpose(0, 1).reshape(tc, -1), dim=1,
                             correction=0)
    return (mu.abs() * (var + eps).rsqrt()).max().item()


def _compare_with_torch(rng, case, slope, use, dtype, tol, truth_dtype):
    T, C, N, H, W, per_task = case
    x, gamma, beta = make_inputs(rng, T, C, N, H, W, per_task, slope)
    if callable(tol):
        tol = tol(N * H * W, offset_ratio(x.to(dtype), T))
    gshape = gamma.shape
    dy, u = rng.randn(*x.shape), rng.randn(*x.shape)
    ug, ub = rng.randn(*gshape), rng.randn(*gshape)
    args = [t.to(dtype) for t in (x, gamma, beta, dy, u, ug, ub)]
    ours = lambda x, g, b: per_step_batch_norm(x, g, b, T, slope=slope, backend="torch")[0]  # noqa: E731
    ref = lambda x, g, b: reference_bn(x, g, b, T, slope=slope)  # noqa: E731
    y, first, second = first_and_second(ours, *args, use)
    truth = first_and_second(ref, *[a.to(truth_dtype) for a in args], use)
    names = ("y", "dx", "dgamma", "dbeta", "d2 x", "d2 gamma", "d2 beta", "d2 dy")
    got = (y, *first, *second)
    want = (truth[0], *truth[1], *truth[2])
    floors = natural_scales(*args[:3], args[3], *(a if k else 0 * a for a, k in zip(args[4:], use)), T)
    for name, a, e in zip(names, got, want):
        if a is not None:
            assert a.dtype == dtype, f"{name}: dtype {a.dtype}, want {dtype}"
        check_close(a, e, tol, f"{name} {case_id(case)} slope={slope} use={use}", rng.seed, floors[name])
    # statistics
    _, mean, invstd = per_step_batch_norm(args[0], args[1], args[2], T, slope=slope, backend="torch")
    xt = args[0].to(truth_dtype).transpose(0, 1).reshape(T * C, -1)
    check_close(mean, xt.mean(1), tol, "mean", rng.seed)
    check_close(invstd, (xt.var(1, correction=0) + 1e-5).rsqrt(), tol, "invstd", rng.seed)
    return got


@pytest.mark.parametrize("use", USES, ids=lambda u: "use" + "".join(map(str, u)))
@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_matches_torch_float64(rng, case, use):
    slope = SLOPES[rng.randint(0, 2)]
    _compare_with_torch(rng, case, slope, use, F64, 1e-10, F64)


# float32 tolerance. Each result is a chain of at most ~4 per-channel reductions over M elements
# (mean/var; sum(g), sum(g*xhat); ubar, ux, ug) and O(1) elementwise operations. A float32 sum of M
# terms as torch computes it (blocked/pairwise) has an error of at most about log2(M) * u times the sum
# of the magnitudes (u = 2^-24). The rounding of the mean, u * |mu|, becomes u * |mu| * r after
# normalisation, so the errors also scale with kappa = max |mu| * r over the channels (offset_ratio).
# Measured against the magnitudes of the terms (natural_scales), that gives
#     tol32(M, kappa) = 4 * (2 + log2 M) * (1 + kappa) * u,
# e.g. 4.8e-6 for M = 25, kappa = 2 (1.9e-6 for M = 2, kappa = 1), as a normwise relative error against
# a float64 evaluation of the same float32 inputs by stock PyTorch. (Observed over 600 random draws of
# the cases below: at most 1/10 of it.)
def tol32(M, kappa):
    return 4 * (2 + math.log2(M)) * (1 + kappa) * U32


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_torch_float32(rng, case):
    T, C, N, H, W, per_task = case
    slope = SLOPES[rng.randint(0, 2)]
    _compare_with_torch(rng, case, slope, (1, 1, 1), F32, tol32, F64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(rng, dtype):
    T, C, N, H, W = 3, 2, 2, 2, 3
    x, gamma, beta = make_inputs(rng, T, C, N, H, W, True, 0.01, margin=0.05)
    xh = x.to(dtype).requires_grad_()
    g32, b32 = gamma.float().requires_grad_(), beta.float().requires_grad_()
    y, mean, invstd = per_step_batch_norm(xh, g32, b32, T, backend="torch")
    assert y.dtype == dtype and mean.dtype == F32 and invstd.dtype == F32
    dy = rng.randn(*x.shape).to(dtype)
    dx, dg, db = torch.autograd.grad(y, (xh, g32, b32), dy)
    assert dx.dtype == dtype and dg.dtype == F32 and db.dtype == F32
    # the same math on the rounded inputs in float64; tolerance = a few half ulps of the output
    x0 = xh.detach().double().requires_grad_()
    g0, b0 = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    ey = reference_bn(x0, g0, b0, T)
    edx, edg, edb = torch.autograd.grad(ey, (x0, g0, b0), dy.double())
    tol = 4 * torch.finfo(dtype).eps
    check_close(y, ey, tol, f"y {dtype}", rng.seed)
    check_close(dx, edx, 2 * tol, f"dx {dtype}", rng.seed)
    check_close(dg, edg, 2 * tol, f"dgamma {dtype}", rng.seed)
    check_close(db, edb, 2 * tol, f"dbeta {dtype}", rng.seed)


def test_input_grads_only_where_required(rng):
    """Only gamma requires grad: the backward returns just dgamma, and it is right."""
    T, C = 2, 3
    x, gamma, beta = make_inputs(rng, T, C, 2, 2, 3, False, 0.01)
    g = gamma.clone().requires_grad_()
    y = per_step_batch_norm(x, g, beta, T, backend="torch")[0]
    (dg,) = torch.autograd.grad(y.square().sum(), (g,))
    g2 = gamma.clone().requires_grad_()
    (eg,) = torch.autograd.grad(reference_bn(x, g2, beta, T).square().sum(), (g2,))
    check_close(dg, eg, 1e-10, "dgamma", rng.seed)
    # mean and invstd are not differentiable
    _, mean, invstd = per_step_batch_norm(x.requires_grad_(), g, beta, T, backend="torch")
    assert not mean.requires_grad and not invstd.requires_grad


# ----------------------------------------------------------------------------------------------
# Second-order MAML: inner step with create_graph, outer gradient vs stock F.batch_norm
# ----------------------------------------------------------------------------------------------
def _maml_outer_grads(bn, update, meta, alphas, data, T, adapt_bn, second_order, steps=2):
    xs, ys, xt, yt = data
    names = ["w", "b", "head"] + (["gamma", "beta"] if adapt_bn else [])

    def loss_fn(p, x, y):
        C, Cin = p["b"].shape[-1], x.shape[1] // T
        w = p["w"] if p["w"].dim() == 5 else p["w"].expand(T, *p["w"].shape)
        b = p["b"] if p["b"].dim() == 2 else p["b"].expand(T, -1)
        h = F.conv2d(x, w.reshape(T * C, Cin, 3, 3), b.reshape(T * C), padding=1, groups=T)
        h = bn(h, p["gamma"], p["beta"], T)
        f = h.mean((2, 3)).view(x.shape[0], T, C)
        head = p["head"] if p["head"].dim() == 3 else p["head"].expand(T, -1, -1)
        logits = torch.einsum("ntc,tck->ntk", f, head)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum") / x.shape[0]

    fast = dict(meta)
    for step in range(steps):
        # per-task views of the adapted tensors, so that the gradients are per task
        views = {k: (fast[k] if fast[k].dim() > meta[k].dim() else fast[k].expand(T, *meta[k].shape))
                 for k in names}
        p = dict(fast, **views)
        grads = torch.autograd.grad(loss_fn(p, xs, ys), [views[k] for k in names],
                                    create_graph=second_order)
        new = update([fast[k] for k in names], list(grads), [alphas[k] for k in names], step)
        fast.update(zip(names, new))
    outer = loss_fn(fast, xt, yt)
    params = list(meta.values()) + list(alphas.values())
    return torch.autograd.grad(outer, params)


@pytest.mark.parametrize("second_order", [True, False], ids=["second", "first"])
@pytest.mark.parametrize("adapt_bn", [True, False], ids=["bn-adapted", "bn-shared"])
def test_maml_outer_gradient_matches_stock_batch_norm(rng, adapt_bn, second_order):
    T, Cin, C, K, H, W, ns, nt, S = 3, 2, 4, 3, 5, 5, 2, 3, 2
    meta = {
        "w": (rng.randn(C, Cin, 3, 3) * 0.4).requires_grad_(),
        "b": (rng.randn(C) * 0.1).requires_grad_(),
        "head": (rng.randn(C, K) * 0.5).requires_grad_(),
        "gamma": (rng.rand(C) + 0.5).requires_grad_(),
        "beta": (rng.randn(C) * 0.1).requires_grad_(),
    }
    names = ["w", "b", "head"] + (["gamma", "beta"] if adapt_bn else [])
    alphas = {k: (rng.rand(S + 1) * 0.1 + 0.05).requires_grad_() for k in names}
    data = (rng.randn(ns, T * Cin, H, W), torch.randint(0, K, (ns, T), generator=rng.gen),
            rng.randn(nt, T * Cin, H, W), torch.randint(0, K, (nt, T), generator=rng.gen))
    ours = _maml_outer_grads(
        lambda h, g, b, T: per_step_batch_norm(h, g, b, T, backend="torch")[0],
        lambda th, gr, al, k: ops.lslr_update(th, gr, al, k, backend="torch"),
        meta, alphas, data, T, adapt_bn, second_order)
    ref = _maml_outer_grads(
        lambda h, g, b, T: reference_bn(h, g, b, T),
        lambda th, gr, al, k: [t - a[k] * g for t, g, a in zip(th, gr, al)],
        meta, alphas, data, T, adapt_bn, second_order)
    labels = list(meta) + [f"alpha[{k}]" for k in alphas]
    # the conv bias feeds a batch norm: its exact gradient is 0, so both sides are rounding noise;
    # the floor measures every error against the largest gradient.
    floor = max(e.abs().max().item() for e in ref)
    for name, a, e in zip(labels, ours, ref):
        check_close(a, e, 1e-9, f"outer grad {name}", rng.seed, floor)
    assert ours[1].abs().max() <= 1e-12 * floor, f"conv-bias gradient not ~0 (seed={rng.seed})"


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------
def test_bad_arguments_raise_with_clear_messages():
    x = torch.randn(2, 6, 3, 3)
    g, b = torch.ones(3), torch.zeros(3)
    bad = [
        (lambda: per_step_batch_norm(torch.randn(2, 6, 9), g, b, 2), ValueError, "x must be 4-D"),
        (lambda: per_step_batch_norm(x, g, b, 4), ValueError, "not divisible by num_tasks"),
        (lambda: per_step_batch_norm(x, g, b, 0), ValueError, "num_tasks"),
        (lambda: per_step_batch_norm(x, torch.ones(4), b, 2), ValueError, "gamma must have shape"),
        (lambda: per_step_batch_norm(x, g, torch.zeros(3, 3), 2), ValueError, "beta must have shape"),
        (lambda: per_step_batch_norm(x, g.double(), b.double(), 2), ValueError, "dtype mismatch"),
        (lambda: per_step_batch_norm(x, g, b.double(), 2), ValueError, "same dtype"),
        (lambda: per_step_batch_norm(x.long(), g, b, 2), ValueError, "floating-point"),
        (lambda: per_step_batch_norm(torch.randn(0, 6, 3, 3), g, b, 2), ValueError, "at least one"),
        (lambda: per_step_batch_norm(x, g, b, 2, eps=-1.0), ValueError, "eps"),
        (lambda: per_step_batch_norm(x, g, b, 2, backend="nope"), ValueError, "backend must be one of"),
    ]
    for fn, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            fn()


def _cpu_backends():
    return [name for name in ("torch", "native") if name in registry.available_backends("cpu")]


@pytest.mark.parametrize("backend", _cpu_backends())
def test_what_the_op_accepts_every_backend_runs(rng, backend):
    """Validation happens once, at the op: an x that is not contiguous and a shared gamma beside a
    per-task beta are valid input, so every backend computes them (the op hands them over in the
    backends' layout) with the torch backend's result on the plain layout; a dtype the backend's kernels
    do not take is refused by the op, naming the backend, not inside the backend."""
    T, C = 3, 2
    x = rng.randn(4, 5, T * C, 3).transpose(1, 2)  # (4, T*C, 5, 3), not contiguous
    gamma, beta = rng.randn(C) + 1.5, rng.randn(T, C)
    gamma.requires_grad_(True)
    x.requires_grad_(True)
    y, mean, invstd = per_step_batch_norm(x, gamma, beta, T, backend=backend)
    dx, dgamma = torch.autograd.grad(y.square().sum(), (x, gamma))
    x2 = x.detach().contiguous().requires_grad_(True)
    g2 = gamma.detach().clone().requires_grad_(True)
    y2, mean2, invstd2 = per_step_batch_norm(x2, g2.expand(T, C), beta, T, backend="torch")
    dx2, dgamma2 = torch.autograd.grad(y2.square().sum(), (x2, g2))
    for what, a, e in (("y", y, y2), ("mean", mean, mean2), ("invstd", invstd, invstd2), ("dx", dx, dx2),
                       ("dgamma", dgamma, dgamma2)):
        check_close(a, e, 1e-12, f"{backend}: {what}", rng.seed)
    if registry.get_backend(backend, "cpu").dtypes is not None:
        with pytest.raises(ValueError, match=rf"per_step_batch_norm: the '{backend}' backend takes float32 or "
                                             r"float64 tensors, got x of dtype float16"):
            per_step_batch_norm(x.detach().half(), gamma.detach().float(), beta.float(), T, backend=backend)


def test_docstring_examples():
    for mod in (per_step_bn, ops.lslr):
        result = doctest.testmod(mod, verbose=False)
        assert result.failed == 0 and result.attempted > 0, f"doctest of {mod.__name__}: {result}"


# ----------------------------------------------------------------------------------------------
# Other backends agree with the torch backend
# ----------------------------------------------------------------------------------------------
# (backend, device) pairs: the native backend on every device it takes; triton on CUDA only
OTHER_BACKENDS = [(n, d) for d in (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
                  for n in registry.available_backends(d) if n != "torch" and (n, d) != ("triton", "cpu")]


@pytest.mark.parametrize("name,device", OTHER_BACKENDS or [("none", "cpu")])
def test_other_backends_match_torch(rng, name, device):
    if name == "none":
        pytest.skip("no backend other than torch is available here")
    T, C, N, H, W, per_task = 3, 4, 2, 5, 5, True
    for dtype in (F32, F64):
        x, gamma, beta = make_inputs(rng, T, C, N, H, W, per_task, 0.01)
        dy, u = rng.randn(*x.shape), rng.randn(*x.shape)
        ug, ub = rng.randn(T, C), rng.randn(T, C)
        args = [t.to(dtype=dtype, device=device) for t in (x, gamma, beta, dy, u, ug, ub)]
        # both sides round: twice the float32 tolerance of the comparison with float64
        tol = 2 * tol32(N * H * W, offset_ratio(args[0], T)) if dtype == F32 else 1e-10
        floors = natural_scales(*args, T)
        res = {}
        for b in (name, "torch"):
            fn = lambda x, g, bb, b=b: per_step_batch_norm(x, g, bb, T, backend=b)[0]  # noqa: E731
            y, first, second = first_and_second(fn, *args, (1, 1, 1))
            res[b] = (y, *first, *second)
        for what, a, e in zip(floors, res[name], res["torch"]):
            check_close(a, e, tol, f"{name} vs torch: {what}, {dtype}", rng.seed, floors[what])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", [None, "torch"], ids=["auto", "torch"])
def test_cuda_tensors_match_cpu(rng, name):
    """On CUDA tensors the chosen backend takes CUDA tensors and agrees with the CPU torch backend."""
    assert ops.get_backend(name, device="cuda").supports("cuda")
    T, C, N, H, W = 4, 3, 2, 5, 5
    x, gamma, beta = make_inputs(rng, T, C, N, H, W, False, 0.01)
    dy, u = rng.randn(*x.shape), rng.randn(*x.shape)
    ug, ub = rng.randn(C), rng.randn(C)
    args = (x, gamma, beta, dy, u, ug, ub)
    floors = natural_scales(*args, T)
    res = {}
    for dev, b in (("cuda", name), ("cpu", "torch")):
        fn = lambda x, g, bb, b=b: per_step_batch_norm(x, g, bb, T, backend=b)[0]  # noqa: E731
        y, first, second = first_and_second(fn, *(t.to(dev) for t in args), (1, 1, 1))
        res[dev] = (y, *first, *second)
    for what, a, e in zip(floors, res["cuda"], res["cpu"]):
        assert a is None or a.is_cuda
        check_close(None if a is None else a.cpu(), e, 1e-10, f"cuda vs cpu: {what}", rng.seed, floors[what])


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------
def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, ops.BackendFallbackWarning)]


def _run_small_bn(backend=None):
    x = torch.randn(2, 4, 3, 3)
    y, _, _ = per_step_batch_norm(x, torch.ones(2), torch.zeros(2), 2, backend=backend)
    assert torch.isfinite(y).all()


def test_env_torch_selects_torch(fresh_registry):
    fresh_registry.setenv("MAMLPP_BACKEND", "torch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert ops.get_backend(device="cpu").name == "torch"
        _run_small_bn()
    assert not _fallback_warnings(record)


@pytest.mark.parametrize("env", ["bogus", "cuda", "triton"])
def test_unknown_or_unloadable_env_warns_once_and_falls_back(fresh_registry, env):
    fresh_registry.setenv("MAMLPP_BACKEND", env)
    if env != "bogus" and torch.cuda.is_available():
        pytest.skip("GPU present: the cuda/triton backends may be usable")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            backend = ops.get_backend(device="cpu")
            _run_small_bn()
    fallbacks = _fallback_warnings(record)
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    msg = str(fallbacks[0].message)
    assert repr(env) in msg and repr(backend.name) in msg, msg
    assert backend.name in ("native", "torch") and backend.supports("cpu")


def test_missing_native_extension_falls_back_to_torch(fresh_registry):
    fresh_registry.setitem(sys.modules, "mamlpp_fast._native", None)  # import now raises ImportError
    fresh_registry.setenv("MAMLPP_BACKEND", "cpp")
    with pytest.warns(ops.BackendFallbackWarning, match=r"'cpp'.*cannot be imported.*'torch'"):
        assert ops.get_backend(device="cpu").name == "torch"
    assert "native" not in ops.available_backends()


def test_explicit_unknown_name_raises(fresh_registry):
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.get_backend("gpu-fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("gpu-fast")


def test_precedence_argument_config_env(fresh_registry):
    fresh_registry.setitem(sys.modules, "mamlpp_fast._native", _fake_native([]))
    fresh_registry.setenv("MAMLPP_BACKEND", "bogus")
    ops.set_backend("torch")  # config beats the environment: no warning about 'bogus'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.get_backend(device="cpu").name == "torch"
        assert ops.get_backend("auto", device="cpu").name == "torch"  # "auto" defers
        ops.set_backend("auto")
        assert ops.get_backend("torch", device="cpu").name == "torch"
    with pytest.warns(ops.BackendFallbackWarning, match="'bogus'"):
        ops.get_backend(device="cpu")


def _fake_native(built, calls=None):
    """A stand-in for mamlpp_fast._native, compiled for the device types `built`, whose functions run
    the torch ones and record the device of every BN forward they are handed."""
    def bn_forward(x, *args):
        calls.append(("native", x.device.type))
        return per_step_bn.bn_forward(x, *args)
    impl = types.SimpleNamespace(
        bn_forward=bn_forward, bn_backward=per_step_bn.bn_backward,
        bn_double_backward=per_step_bn.bn_double_backward,
        lslr_forward=ops.lslr.lslr_forward, lslr_backward=ops.lslr.lslr_backward)
    mod = types.ModuleType("mamlpp_fast._native")
    mod.device_types = lambda: tuple(built)
    mod.load_error = lambda: None if built else "ImportError: not built"
    mod.get = lambda: impl
    return mod


def test_dispatch_follows_the_device_and_logs_once(fresh_registry, caplog):
    calls = []
    fresh_registry.setitem(sys.modules, "mamlpp_fast._native", _fake_native(["cpu", "cuda"], calls))
    assert ops.get_backend("auto", device="cpu").name == "native"
    # "cuda" (native for CUDA tensors only) is never handed CPU tensors: it falls back (one warning)
    # to auto's choice for them, the native backend on the CPU
    with pytest.warns(ops.BackendFallbackWarning, match=r"'cuda'.*'native'"):
        _run_small_bn(backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run_small_bn(backend="cuda")
    assert calls == [("native", "cpu"), ("native", "cpu")]
    if not torch.cuda.is_available():
        with pytest.warns(ops.BackendFallbackWarning, match="no CUDA device"):
            assert ops.get_backend("cuda", device="cuda").name == "torch"
    registry.clear_cache()
    with caplog.at_level(logging.INFO, logger="mamlpp_fast"):
        for _ in range(3):
            _run_small_bn(backend="cpp")
    chosen = [r for r in caplog.records if "backend" in r.getMessage()]
    assert len(chosen) == 1 and "'native'" in chosen[0].getMessage()
    assert ops.available_backends(device="cpu") == ["native", "torch"]
