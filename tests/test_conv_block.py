"""The fused first block (mamlpp_fast.ops.conv_block.conv_bn_pool): the same function as the unfused ops
(task_conv2d, per_step_batch_norm, max_pool2d) to second order, its hand-written derivatives checked by
gradcheck and gradgradcheck, its bad input, and the fast learner with it against the reference learner.

All in float64 on fresh random inputs. Tolerance: FP64_RTOL = 1e-10 of the norm of each result; the conv
bias's derivatives are rounding noise (batch norm removes any per-channel constant, so they are 0 in exact
arithmetic) and are compared with a floor of 1e-3 of the largest derivative's norm, as in
tests/test_fast_equivalence.py. The Triton kernels of the block are tested under the interpreter in
tests/test_triton_interp.py.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from _batches import fresh_seed
from _numerics import rel
from mamlpp_fast.ops import per_step_batch_norm
from mamlpp_fast.ops.conv import task_conv2d
from mamlpp_fast.ops.conv_block import block_supported, conv_bn_pool, torch_impl

FP64_RTOL = 1e-10
EPS, SLOPE = 1e-5, 0.01

# (T, C, Ci, n, H, k, pad, gamma per task, bias)
SHAPES = [(2, 3, 1, 3, 6, 3, 1, False, True), (2, 4, 3, 2, 8, 3, 1, True, True),
          (3, 2, 1, 2, 4, 3, 1, False, False), (2, 2, 2, 2, 9, 4, 1, False, True),
          (2, 2, 1, 2, 10, 5, 2, True, True), (2, 20, 1, 2, 6, 3, 1, False, True)]


def make_block_inputs(shape, seed, dtype=torch.float64):
    T, C, Ci, n, H, k, pad, per_task, has_bias = shape
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = rnd(n, T * Ci, H, H)
    w = rnd(T, C, Ci, k, k).requires_grad_(True)
    bias = rnd(T, C).requires_grad_(True) if has_bias else None
    ps = (T, C) if per_task else (C,)
    gamma = (1 + 0.5 * rnd(*ps)).requires_grad_(True)
    beta = rnd(*ps).requires_grad_(True)
    return x, w, bias, gamma, beta, T, pad


def unfused(x, w, bias, gamma, beta, T, pad):
    z = task_conv2d(x, w, bias, T, 1, pad, "grouped")
    y, mean, invstd = per_step_batch_norm(z, gamma, beta, T, EPS, SLOPE, backend="torch")
    return F.max_pool2d(y, 2, 2), mean, invstd


def fused(x, w, bias, gamma, beta, T, pad, impl=None):
    return conv_bn_pool(x, w, bias, gamma, beta, T, 1, pad, EPS, SLOPE, impl=impl)


def derivatives(fn, x, w, bias, gamma, beta, T, pad, seed):
    """out, mean, invstd; the first derivatives of a random projection of out w.r.t. the parameters (with
    create_graph); the gradients of a scalar of those first derivatives and of out (second order)."""
    params = [p for p in (w, bias, gamma, beta) if p is not None]
    out, mean, invstd = fn(x, w, bias, gamma, beta, T, pad)
    g = torch.Generator().manual_seed(seed + 1)
    proj = torch.randn(out.shape, generator=g, dtype=out.dtype)
    first = torch.autograd.grad((out * proj).sum(), params, create_graph=True)
    weights = [torch.randn(f.shape, generator=g, dtype=f.dtype) for f in first]
    scalar = sum((f * v).sum() for f, v in zip(first, weights)) + (out.tanh() * proj).sum()
    second = torch.autograd.grad(scalar, params, allow_unused=True)
    second = [s if s is not None else torch.zeros_like(p) for s, p in zip(second, params)]
    return [out, mean, invstd] + list(first) + second, params


def assert_close(got, ref, names, seed, tol=FP64_RTOL, floor=None):
    """rel < tol for each result; the conv bias's results (noise) against a floor of 1e-3 of the largest
    reference norm, or against `floor` for every result when given."""
    got, ref = [t.detach() for t in got], [t.detach() for t in ref]
    bias_floor = 1e-3 * max(float(r.norm()) for r in ref)
    for name, a, r in zip(names, got, ref):
        f = floor if floor is not None else (bias_floor if "bias" in name else 0.0)
        assert a.shape == r.shape and rel(a, r, f) < tol, f"{name}: {rel(a, r, f):.3e} (seed {seed})"


def _names(bias):
    p = ["w"] + (["bias"] if bias is not None else []) + ["gamma", "beta"]
    return ["out", "mean", "invstd"] + [f"d{n}" for n in p] + [f"dd{n}" for n in p]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_fused_block_matches_unfused_ops_to_second_order(shape):
    seed = fresh_seed() % 2 ** 31
    x, w, bias, gamma, beta, T, pad = make_block_inputs(shape, seed)
    ref, _ = derivatives(unfused, x, w, bias, gamma, beta, T, pad, seed)
    got, _ = derivatives(fused, x, w, bias, gamma, beta, T, pad, seed)
    assert_close(got, ref, _names(bias), seed)


def test_image_cache_forms_the_image_terms_once_per_image_set():
    """conv_bn_pool's image_cache: an implementation's image terms (its image_stats) are formed by the
    first call on an image and reused by the later calls on the same tensor (forward and backward both
    receive them), formed again for another image tensor (with equal values too: the cache keys on the
    tensor, not on its values) or another weight shape; without a cache, per call. The results with and
    without the cache are the same."""
    import types
    seed = fresh_seed() % 2 ** 31
    x, w, bias, gamma, beta, T, pad = make_block_inputs(SHAPES[1], seed)
    formed, given = [], []

    def image_stats(x_, w_shape, meta):
        formed.append((x_.data_ptr(), tuple(w_shape)))
        return (x_.sum().reshape(1),)  # a stand-in the counting backward can tell apart

    def forward(*a, stats=None):
        given.append(("fwd", stats))
        return torch_impl.forward(*a)

    def backward(*a, gout2=None, stats=None):
        given.append(("bwd", stats))
        return torch_impl.backward(*a, gout2=gout2)

    impl = types.SimpleNamespace(name="counting", forward=forward, backward=backward,
                                 double_backward=torch_impl.double_backward, image_stats=image_stats)
    cache = {}
    run = lambda xx, ww, c: conv_bn_pool(xx, ww, bias, gamma, beta, T, 1, pad, EPS, SLOPE, impl=impl,  # noqa: E731
                                         image_cache=c)
    outs = [run(x, w, cache)[0] for _ in range(3)]
    assert len(formed) == 1
    grads = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(outs)), (w, gamma))
    assert len(formed) == 1 and [k for k, _ in given] == ["fwd"] * 3 + ["bwd"] * 3
    first = given[0][1][0]  # the one tensor formed, read by every pass
    assert all(len(st) == 1 and st[0].data_ptr() == first.data_ptr() for _, st in given)
    ref_out = fused(x, w, bias, gamma, beta, T, pad)[0]
    assert torch.equal(outs[0], ref_out)
    ref = torch.autograd.grad(sum((fused(x, w, bias, gamma, beta, T, pad)[0] * (k + 1)).sum() for k in range(3)),
                              (w, gamma))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(grads, ref))
    run(x.clone(), w, cache)  # another image tensor: formed again, and it replaces the cached one
    assert len(formed) == 2
    run(x, w, cache)
    assert len(formed) == 3
    w2 = torch.randn(T, 4, 3, 5, 5, dtype=w.dtype)  # another weight shape (5x5 kernels): other terms
    conv_bn_pool(x, w2, None, gamma, beta, T, 1, 2, EPS, SLOPE, impl=impl, image_cache=cache)
    assert len(formed) == 4 and formed[-1][1] == tuple(w2.shape)
    run(x, w, None), run(x, w, None)  # no cache: per call
    assert len(formed) == 6


def test_fused_block_gradcheck_and_gradgradcheck():
    seed = fresh_seed() % 2 ** 31
    for shape in (SHAPES[0], SHAPES[1]):
        x, w, bias, gamma, beta, T, pad = make_block_inputs(shape, seed)
        fn = lambda w_, b_, g_, be_: fused(x, w_, b_, g_, be_, T, pad)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (w, bias, gamma, beta)), seed
        assert torch.autograd.gradgradcheck(fn, (w, bias, gamma, beta)), seed


def test_double_backward_with_some_upstream_gradients_absent():
    """The double backward with each of its upstream gradients alone (the others None = zeros) equals the
    autograd of the unfused ops. An upstream gradient of the conv bias alone has an exact result of 0 (batch
    norm removes the per-channel constant it adds): every result is compared with a floor of 1e-3 of the
    largest result norm of the first case."""
    seed = fresh_seed() % 2 ** 31
    x, w, bias, gamma, beta, T, pad = make_block_inputs(SHAPES[0], seed)
    y, mean, invstd = fused(x, w, bias, gamma, beta, T, pad)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(y.shape, generator=g, dtype=y.dtype)
    meta = (T, 1, pad, EPS, SLOPE)
    uw, ub = torch.randn(w.shape, generator=g, dtype=w.dtype), torch.randn(bias.shape, generator=g, dtype=w.dtype)
    ug, ubt = torch.randn(gamma.shape, generator=g, dtype=w.dtype), torch.randn(beta.shape, generator=g, dtype=w.dtype)
    gout_v = gout.clone().requires_grad_(True)
    floor = None
    for which in range(4):
        u = [uw, ub, ug, ubt]
        u = [t if i == which else None for i, t in enumerate(u)]
        got = torch_impl.double_backward(*u, gout, x, w.detach(), bias.detach(), gamma.detach(), beta.detach(),
                                         mean, invstd, None, meta)
        out = unfused(x, w, bias, gamma, beta, T, pad)[0]
        first = torch.autograd.grad(out, (w, bias, gamma, beta), gout_v, create_graph=True)
        scalar = sum((f * v).sum() for f, v in zip(first, u) if v is not None)
        ref = torch.autograd.grad(scalar, (gout_v, w, bias, gamma), allow_unused=True)
        ref = [r if r is not None else torch.zeros_like(t) for r, t in zip(ref, (gout, w, bias, gamma))]
        got = [t if t is not None else torch.zeros_like(r) for t, r in zip(got, ref)]
        if floor is None:
            floor = 1e-3 * max(float(r.detach().norm()) for r in ref)
        assert_close(got, ref, ["dgout", "dw", "dbias", "dgamma"], seed, floor=floor)


def test_bad_input_names_the_cause():
    x, w, bias, gamma, beta, T, pad = make_block_inputs(SHAPES[0], 3)
    with pytest.raises(ValueError, match="requires a gradient"):
        fused(x.clone().requires_grad_(True), w, bias, gamma, beta, T, pad)
    with pytest.raises(ValueError, match="not of even size"):
        fused(x[:, :, :5, :5], w, bias, gamma, beta, T, pad)
    with pytest.raises(ValueError, match="slope must be >= 0"):
        conv_bn_pool(x, w, bias, gamma, beta, T, 1, pad, EPS, -0.1)
    with pytest.raises(ValueError, match="bias has shape"):
        fused(x, w, bias[:, :2], gamma, beta, T, pad)
    with pytest.raises(ValueError, match="gamma has shape"):
        fused(x, w, bias, gamma[:2], beta, T, pad)
    with pytest.raises(ValueError, match=r"gamma \(torch.float32, cpu\) must match x"):
        fused(x, w, bias, gamma.detach().float(), beta, T, pad)
    with pytest.raises(ValueError, match="does not fit"):
        conv_bn_pool(x, w, bias, gamma, beta, T + 1, 1, pad, EPS, SLOPE)
    assert block_supported(x, w, 1, pad, max_pooling=False) == "the network does not max-pool"


# ---- the fast learner with the fused first block ---------------------------------------------------------
LEARNER_CASES = [
    ("omniglot-like", dict(cnn_num_filters=8, num_stages=3, image_height=12, image_width=12,
                           number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2), 2, 0),
    ("rgb-second-order-late", dict(cnn_num_filters=6, num_stages=2, image_channels=3, image_height=8,
                                   image_width=8, number_of_training_steps_per_iter=3,
                                   number_of_evaluation_steps_per_iter=3), 2, 100),
    ("inner-loop-bn", dict(cnn_num_filters=4, num_stages=2, image_height=8, image_width=8,
                           enable_inner_loop_optimizable_bn_params=True, number_of_training_steps_per_iter=2,
                           number_of_evaluation_steps_per_iter=2), 3, 0),
]


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("case", LEARNER_CASES, ids=[c[0] for c in LEARNER_CASES])
def test_learner_with_fused_first_block_matches_reference_float64(case, backend):
    """first_block="fused" (the PyTorch implementation of the block on a CPU): losses, logits,
    meta-gradients and running statistics of the reference learner, then the same parameters after one
    Adam step."""
    from mamlpp_fast.ops import available_backends
    from test_fast_equivalence import FP64_RTOL as LEARNER_RTOL, assert_same_after_adam, batch_for, compare, make_pair

    if backend not in available_backends():
        pytest.skip(f"backend {backend} is not built here")
    _, cfg, b, epoch = case
    seed = fresh_seed()
    ref, fast, args = make_pair("float64", backend, first_block="fused", **cfg)
    batch = batch_for(args, b, seed)
    compare(ref, fast, batch, epoch, "float64", seed)
    assert any(v is torch_impl for v in fast._first_block_cache.values())
    ref2, fast2, _ = make_pair("float64", backend, first_block="fused", **cfg)
    ref2.run_train_iter(batch, epoch)
    fast2.run_train_iter(batch, epoch)
    assert_same_after_adam(ref2, fast2, LEARNER_RTOL, seed)


def test_first_block_choice():
    """auto: fused only where the Triton kernels run on a CUDA device (so unfused on this CPU); fused:
    the PyTorch implementation here; unfused: never; a layer the block cannot take runs unfused, with one
    warning when fused was asked for."""
    from test_fast_equivalence import batch_for, make_pair

    small = dict(cnn_num_filters=4, num_stages=2, image_height=8, image_width=8,
                 number_of_training_steps_per_iter=1, number_of_evaluation_steps_per_iter=1)
    for mode, expect in (("auto", None), ("fused", torch_impl), ("unfused", None)):
        _, fast, args = make_pair("float64", "torch", first_block=mode, **small)
        fast.run_train_iter(batch_for(args, 2, 1), 0)
        cache = fast.__dict__.get("_first_block_cache", {})
        assert set(map(id, cache.values())) <= {id(expect)}, mode
        assert (mode == "unfused") == (not cache)
    odd = dict(small, image_height=7, image_width=7)
    _, fast, args = make_pair("float64", "torch", first_block="fused", **odd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast.run_train_iter(batch_for(args, 2, 1), 0)
    msgs = [str(c.message) for c in caught if "first_block" in str(c.message)]
    assert len(msgs) == 1 and "not of even size" in msgs[0], msgs
    assert all(v is None for v in fast._first_block_cache.values())
