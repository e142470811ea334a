"""Benchmarks (pytest-benchmark) of the fused per-step BN: forward + backward + double backward, one
call each of bn_forward / bn_backward / bn_double_backward, against stock PyTorch doing the same work
(F.batch_norm(training=True) + F.leaky_relu, torch.autograd.grad(create_graph=True) for dx, dgamma,
dbeta, then torch.autograd.grad of <u,dx> + <u_gamma,dgamma> + <u_beta,dbeta> w.r.t. x, gamma, dy).

Shapes: the learner's activations after each conv (x = (N, T*C, H, W)):
  Omniglot       N=20 (20-way 1-shot support), T=8 tasks, C=64, H=W in 28, 14, 7, 3
  mini-ImageNet  N=5 (support) and N=75 (target), T=2 tasks, C=48, H=W in 84, 42, 21, 10
On CUDA: backends stock / cuda (mamlpp_fast._C) / triton, float32. Without CUDA: small CPU shapes,
backends stock / cpp. Also LSLR over the Omniglot learner's parameter list (stock: one torch expression
per tensor). Run:
  python -m pytest bench/bench_ops.py --benchmark-only --benchmark-enable --benchmark-json=out.json
(pyproject's addopts disable benchmarks by default; --benchmark-enable turns them back on.)
"""
import os

import pytest
import torch
import torch.nn.functional as F

EPS, SLOPE = 1e-5, 0.01
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

if CUDA:
    SHAPES = ([("omniglot", 20, 8, 64, h) for h in (28, 14, 7, 3)]
              + [("mini_imagenet", n, 2, 48, h) for n in (5, 75) for h in (84, 42, 21, 10)])
    BACKENDS = ["stock", "native", "triton"]
else:  # CPU: small sizes (the learner's shapes take seconds per call on a CPU)
    SHAPES = [("omniglot_small", 4, 4, 16, h) for h in (14, 3)] + [("mini_imagenet_small", 5, 2, 16, 21)]
    BACKENDS = ["stock", "native"]
ROUNDS = int(os.environ.get("MAMLPP_BENCH_ROUNDS", "30" if CUDA else "5"))


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _backend(name):
    if name == "native":
        from mamlpp_fast import _native

        if DEV not in _native.device_types():
            pytest.skip(f"native backend unavailable for {DEV} ({_native.load_error() or _native.built_with()})")
        return _native.get()
    if name == "triton":
        from mamlpp_fast import triton as tb

        if not tb.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            pytest.skip("triton unavailable")
        return tb
    return None


def _inputs(N, T, C, H, shared=True, dtype=torch.float32):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(N, T * C, H, H, device=DEV, dtype=dtype, generator=g)
    gshape = (C,) if shared else (T, C)
    return dict(
        x=x, dy=torch.randn_like(x), ggx=torch.randn_like(x),
        gamma=torch.rand(gshape, device=DEV, dtype=dtype, generator=g) + 0.5,
        beta=torch.randn(gshape, device=DEV, dtype=dtype, generator=g) * 0.1,
        gggamma=torch.randn(gshape, device=DEV, dtype=dtype, generator=g),
        ggbeta=torch.randn(gshape, device=DEV, dtype=dtype, generator=g),
    )


def _stock(d, T):
    x = d["x"].detach().requires_grad_(True)
    gamma = d["gamma"].detach().requires_grad_(True)
    beta = d["beta"].detach().requires_grad_(True)
    dy = d["dy"].detach().requires_grad_(True)
    w, b = gamma.repeat(T), beta.repeat(T)
    y = F.leaky_relu(F.batch_norm(x, None, None, w, b, training=True, momentum=0.0, eps=EPS), SLOPE)
    dx, dg, db = torch.autograd.grad(y, (x, gamma, beta), dy, create_graph=True)
    total = (d["ggx"] * dx).sum() + (d["gggamma"] * dg).sum() + (d["ggbeta"] * db).sum()
    return torch.autograd.grad(total, (x, gamma, dy))


def _fused(be, d, T):
    y, mean, invstd = be.bn_forward(d["x"], d["gamma"], d["beta"], T, EPS, SLOPE)
    dx, dg, db = be.bn_backward(d["dy"], d["x"], d["gamma"], d["beta"], mean, invstd, T, SLOPE)
    return be.bn_double_backward(d["ggx"], d["gggamma"], d["ggbeta"], d["dy"], d["x"], d["gamma"],
                                 d["beta"], mean, invstd, T, SLOPE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["{}-N{}-T{}-C{}-{}x{}".format(*s, s[-1]) for s in SHAPES])
def test_bn_fwd_bwd_dbwd(benchmark, shape, backend):
    name, N, T, C, H = shape
    be = _backend(backend)
    d = _inputs(N, T, C, H)
    benchmark.group = f"bn {name} N={N} T={T} C={C} {H}x{H}"
    benchmark.extra_info.update(dict(N=N, T=T, C=C, H=H, device=DEV, backend=backend,
                                     bytes_x=d["x"].numel() * d["x"].element_size()))
    if be is None:
        fn = lambda: _stock(d, T)  # noqa: E731
    else:
        fn = lambda: _fused(be, d, T)  # noqa: E731

    def run():
        out = fn()
        _sync()
        return out

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=3)


def _omniglot_params(T, S=5):
    """(shapes, shared) of the learner's per-step updated tensors (4 conv + BN layers, linear)."""
    shapes = []
    cin = 1
    for _ in range(4):
        shapes += [(64, cin, 3, 3), (64,), (64,), (64,)]  # conv w, conv b, bn gamma, bn beta
        cin = 64
    shapes += [(20, 64), (20,)]
    return shapes


@pytest.mark.parametrize("backend", ["stock"] + [b for b in BACKENDS if b != "stock"])
def test_lslr_fwd_bwd(benchmark, backend):
    be = _backend(backend)
    T, S, step = 8, 5, 2
    shapes = _omniglot_params(T)
    shared = [True] * len(shapes)
    g = torch.Generator(device=DEV).manual_seed(0)
    grads = [torch.randn(T, *s, device=DEV, generator=g) for s in shapes]
    thetas = [torch.randn(*s, device=DEV, generator=g) for s in shapes]
    alphas = [torch.rand(S + 1, device=DEV, generator=g) for _ in shapes]
    douts = [torch.randn(T, *s, device=DEV, generator=g) for s in shapes]
    benchmark.group = f"lslr omniglot T={T} ({len(shapes)} tensors)"

    def stock():
        outs = [th - a[step] * gr for th, gr, a in zip(thetas, grads, alphas)]
        dth = [d.sum(0) for d in douts]
        dgr = [-a[step] * d for d, a in zip(douts, alphas)]
        dal = []
        for d, gr, a in zip(douts, grads, alphas):
            da = torch.zeros_like(a)
            da[step] = -(d * gr).sum()
            dal.append(da)
        return outs, dth, dgr, dal

    def fused():
        outs = be.lslr_forward(thetas, grads, alphas, step)
        return outs, be.lslr_backward(douts, grads, alphas, step, shared)

    fn = stock if be is None else fused

    def run():
        out = fn()
        _sync()
        return out

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=3)
