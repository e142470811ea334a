"""Batch norm, leaky ReLU and max pooling as one op (mamlpp_fast.ops.bn_pool.bn_pool): the same function as
the unfused ops (per_step_batch_norm, max_pool2d) to second order, including odd sizes (an unpooled last
row or column), its hand-written derivatives checked by gradcheck and gradgradcheck, its bad input, and
the fast learner with it against the reference learner.

All in float64 on fresh random inputs; tolerance FP64_RTOL = 1e-10 of the norm of each result (the
float64 rounding of these sums is ~1e-15). The op's Triton kernels are tested under the interpreter in
tests/test_triton_interp.py.
"""
import pytest
import torch
import torch.nn.functional as F

from _batches import fresh_seed
from _numerics import rel
from mamlpp_fast.ops import per_step_batch_norm
from mamlpp_fast.ops.bn_pool import bn_pool, bn_pool_supported, torch_impl

FP64_RTOL = 1e-10
EPS, SLOPE = 1e-5, 0.01

# (T, C, n, H, W, gamma per task, beta per task)
SHAPES = [(2, 3, 3, 6, 6, False, False), (2, 4, 2, 7, 7, True, True), (3, 2, 2, 5, 4, False, True),
          (1, 3, 4, 3, 3, True, False), (2, 2, 2, 2, 9, False, False)]


def make_inputs(shape, seed, dtype=torch.float64):
    T, C, n, H, W, g_task, b_task = shape
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = (rnd(n, T * C, H, W) * 2 + 0.5).requires_grad_(True)
    gamma = (1 + 0.5 * rnd(*((T, C) if g_task else (C,)))).requires_grad_(True)
    beta = rnd(*((T, C) if b_task else (C,))).requires_grad_(True)
    return x, gamma, beta, T


def unfused(x, gamma, beta, T):
    y, mean, invstd = per_step_batch_norm(x, gamma, beta, T, EPS, SLOPE, backend="torch")
    return F.max_pool2d(y, 2, 2), mean, invstd


def fused(x, gamma, beta, T, impl=None):
    return bn_pool(x, gamma, beta, T, EPS, SLOPE, impl=impl)


def derivatives(fn, x, gamma, beta, T, seed):
    """out, mean, invstd; the first derivatives of a random projection of out w.r.t. (x, gamma, beta)
    with create_graph; the gradients of a scalar of those derivatives and of out (second order)."""
    params = [x, gamma, beta]
    out, mean, invstd = fn(x, gamma, beta, T)
    g = torch.Generator().manual_seed(seed + 1)
    proj = torch.randn(out.shape, generator=g, dtype=out.dtype)
    first = torch.autograd.grad((out * proj).sum(), params, create_graph=True)
    weights = [torch.randn(f.shape, generator=g, dtype=f.dtype) for f in first]
    scalar = sum((f * v).sum() for f, v in zip(first, weights)) + (out.tanh() * proj).sum()
    second = torch.autograd.grad(scalar, params, allow_unused=True)
    second = [s if s is not None else torch.zeros_like(p) for s, p in zip(second, params)]
    return [out, mean, invstd] + list(first) + second


NAMES = ["out", "mean", "invstd", "dx", "dgamma", "dbeta", "ddx", "ddgamma", "ddbeta"]


def assert_close(got, ref, names, seed, floor=0.0):
    for name, a, r in zip(names, got, ref):
        a, r = a.detach(), r.detach()
        assert a.shape == r.shape and rel(a, r, floor) < FP64_RTOL, f"{name}: {rel(a, r, floor):.3e} (seed {seed})"


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_bn_pool_matches_unfused_ops_to_second_order(shape):
    seed = fresh_seed() % 2 ** 31
    x, gamma, beta, T = make_inputs(shape, seed)
    ref = derivatives(unfused, x, gamma, beta, T, seed)
    got = derivatives(fused, x, gamma, beta, T, seed)
    # d(beta) of the second-order scalar is exactly 0 in both (beta enters the backward only through the
    # leaky-ReLU mask), so its norm is compared against a floor of the other results' scale
    floor = 1e-3 * max(float(r.detach().norm()) for r in ref)
    assert_close(got[:8], ref[:8], NAMES[:8], seed)
    assert_close(got[8:], ref[8:], NAMES[8:], seed, floor=floor)


def test_bn_pool_gradcheck_and_gradgradcheck():
    seed = fresh_seed() % 2 ** 31
    for shape in (SHAPES[1], SHAPES[2]):
        x, gamma, beta, T = make_inputs(shape, seed)
        fn = lambda x_, g_, b_: fused(x_, g_, b_, T)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, gamma, beta)), seed
        assert torch.autograd.gradgradcheck(fn, (x, gamma, beta)), seed


def test_double_backward_with_some_upstream_gradients_absent():
    """The double backward with each upstream gradient alone (the others None = zeros) equals the
    autograd of the unfused ops."""
    seed = fresh_seed() % 2 ** 31
    x, gamma, beta, T = make_inputs(SHAPES[1], seed)
    out, mean, invstd, idx = torch_impl.forward(x.detach(), gamma.detach(), beta.detach(), (T, EPS, SLOPE))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
    gout = rnd(out)
    ups = [rnd(x), rnd(gamma), rnd(beta)]
    gout_v = gout.clone().requires_grad_(True)
    floor = None
    for which in range(3):
        u = [t if i == which else None for i, t in enumerate(ups)]
        got = torch_impl.double_backward(*u, gout, x.detach(), gamma.detach(), beta.detach(), mean, invstd, idx,
                                         (T, EPS, SLOPE))
        y = unfused(x, gamma, beta, T)[0]
        first = torch.autograd.grad(y, (x, gamma, beta), gout_v, create_graph=True)
        scalar = sum((f * v).sum() for f, v in zip(first, u) if v is not None)
        ref = torch.autograd.grad(scalar, (gout_v, x, gamma), allow_unused=True)
        ref = [r if r is not None else torch.zeros_like(t) for r, t in zip(ref, (gout, x, gamma))]
        if floor is None:
            floor = 1e-3 * max(float(r.detach().norm()) for r in ref)
        assert_close(got, ref, ["dgout", "gx", "ggamma"], seed, floor=floor)


def test_bad_input_names_the_cause():
    x, gamma, beta, T = make_inputs(SHAPES[0], 3)
    with pytest.raises(ValueError, match="smaller than one 2x2 window"):
        fused(x[:, :, :1], gamma, beta, T)
    with pytest.raises(ValueError, match="slope must be >= 0"):
        bn_pool(x, gamma, beta, T, EPS, -0.1)
    with pytest.raises(ValueError, match="not divisible by num_tasks"):
        fused(x, gamma, beta, 4)
    with pytest.raises(ValueError, match="gamma has shape"):
        fused(x, gamma[:2], beta, T)
    with pytest.raises(ValueError, match=r"beta \(torch.float32, cpu\) must match x"):
        fused(x, gamma, beta.detach().float(), T)
    assert "float32 or float64" in bn_pool_supported(x.detach().half())
    assert "4-D" in bn_pool_supported(x.detach()[0])


# ---- the fast learner with bn_pool ------------------------------------------------------------------------
LEARNER_CASES = [
    ("odd-sizes", dict(cnn_num_filters=6, num_stages=3, image_height=14, image_width=14,
                       number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2), 2, 0),
    ("second-order-late-inner-bn", dict(cnn_num_filters=4, num_stages=2, image_channels=3, image_height=8,
                                        image_width=8, enable_inner_loop_optimizable_bn_params=True,
                                        number_of_training_steps_per_iter=3,
                                        number_of_evaluation_steps_per_iter=3), 2, 100),
]


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("case", LEARNER_CASES, ids=[c[0] for c in LEARNER_CASES])
def test_learner_with_bn_pool_matches_reference_float64(case, backend):
    """bn_pool="fused" (the PyTorch implementation on a CPU), with the fused first block too: losses,
    logits, meta-gradients and running statistics of the reference learner, then the parameters after
    one Adam step."""
    from mamlpp_fast.ops import available_backends
    from test_fast_equivalence import FP64_RTOL as LEARNER_RTOL, assert_same_after_adam, batch_for, compare, make_pair

    if backend not in available_backends():
        pytest.skip(f"backend {backend} is not built here")
    _, cfg, b, epoch = case
    seed = fresh_seed()
    ref, fast, args = make_pair("float64", backend, bn_pool="fused", first_block="fused", **cfg)
    batch = batch_for(args, b, seed)
    compare(ref, fast, batch, epoch, "float64", seed)
    assert fast._bn_pool_cache and all(v is torch_impl for v in fast._bn_pool_cache.values())
    ref2, fast2, _ = make_pair("float64", backend, bn_pool="fused", **cfg)
    ref2.run_train_iter(batch, epoch)
    fast2.run_train_iter(batch, epoch)
    assert_same_after_adam(ref2, fast2, LEARNER_RTOL, seed)


def test_bn_pool_choice():
    """auto: fused only where the Triton kernels run on a CUDA device (so unfused on this CPU); fused:
    the PyTorch implementation here; unfused: never. (Every layer of a network that max-pools has at
    least one 2x2 window, so the learner never meets a layer bn_pool refuses: test_bad_input_names_the_cause
    covers the refusals.)"""
    from test_fast_equivalence import batch_for, make_pair

    small = dict(cnn_num_filters=4, num_stages=2, image_height=8, image_width=8,
                 number_of_training_steps_per_iter=1, number_of_evaluation_steps_per_iter=1)
    for mode, expect in (("auto", None), ("fused", torch_impl), ("unfused", None)):
        _, fast, args = make_pair("float64", "torch", bn_pool=mode, **small)
        fast.run_train_iter(batch_for(args, 2, 1), 0)
        cache = fast.__dict__.get("_bn_pool_cache", {})
        assert set(map(id, cache.values())) <= {id(expect)}, mode
        assert (mode == "unfused") == (not cache)
