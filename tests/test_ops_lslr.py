"""Tests of mamlpp_fast.ops.lslr_update (CPU).

Inputs are fresh random numbers on every run; each test prints its seed (shown by pytest on failure)
and failure messages repeat it. Rerun a failure with MAMLPP_TEST_SEED=<seed>.
"""
import os
import types

import pytest
import torch
from torch.autograd import gradcheck

from mamlpp_fast import ops
from mamlpp_fast.ops import lslr, lslr_update
from mamlpp_fast.ops.backend import Backend, available_backends

F64, F32 = torch.float64, torch.float32
SHAPES = [(3, 4), (5,), (2, 3, 3), ()]


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("MAMLPP_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"{request.node.name}: seed={seed} (rerun with MAMLPP_TEST_SEED={seed})")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return types.SimpleNamespace(seed=seed, gen=gen)


def draw(rng, T, S, shared, dtype=F64, shapes=SHAPES):
    """thetas (shared: shape_l, else (T, *shape_l)), grads (T, *shape_l), alphas (S+1,), never zero."""
    def rnd(*shape):
        t = torch.randn(shape, generator=rng.gen, dtype=F64)
        return (t + torch.where(t >= 0, 0.1, -0.1)).to(dtype)
    thetas = [rnd(*s) if sh else rnd(T, *s) for s, sh in zip(shapes, shared)]
    grads = [rnd(T, *s) for s in shapes]
    alphas = [(torch.rand(S + 1, generator=rng.gen, dtype=F64) + 0.05).to(dtype) for _ in shapes]
    return thetas, grads, alphas


def plain(thetas, grads, alphas, step):
    return [t - a[step] * g for t, g, a in zip(thetas, grads, alphas)]


@pytest.mark.parametrize("grads_require_grad", [True, False], ids=["second-order", "first-order"])
@pytest.mark.parametrize("T", [1, 3])
def test_gradcheck(rng, T, grads_require_grad):
    S = 4
    shared = [bool(b) for b in torch.randint(0, 2, (len(SHAPES),), generator=rng.gen)]
    shared[0], shared[1] = True, False  # always both kinds
    step = int(torch.randint(0, S + 1, (), generator=rng.gen))
    thetas, grads, alphas = draw(rng, T, S, shared)
    for t in thetas + alphas:
        t.requires_grad_()
    for g in grads:
        g.requires_grad_(grads_require_grad)
    n = len(SHAPES)

    def fn(*flat):
        return tuple(lslr_update(list(flat[:n]), list(flat[n:2 * n]), list(flat[2 * n:]), step,
                                 backend="torch"))

    assert gradcheck(fn, (*thetas, *grads, *alphas)), \
        f"gradcheck failed (shared={shared}, step={step}, seed={rng.seed})"


@pytest.mark.parametrize("dtype", [F32, F64])
def test_matches_plain_formula_bit_for_bit(rng, dtype):
    """Forward and backward equal autograd of `theta - alpha[step] * grad` exactly."""
    T, S = 4, 5
    shared = [True, False, True, False]
    for step in (0, S, int(torch.randint(0, S + 1, (), generator=rng.gen))):
        thetas, grads, alphas = draw(rng, T, S, shared, dtype)
        douts = [torch.randn((T, *s), generator=rng.gen, dtype=F64).to(dtype) for s in SHAPES]
        results = []
        for update in (lambda *a: lslr_update(*a, backend="torch"), plain):
            leaves = [t.clone().requires_grad_() for t in thetas + grads + alphas]
            n = len(SHAPES)
            outs = update(leaves[:n], leaves[n:2 * n], leaves[2 * n:], step)
            results.append((outs, torch.autograd.grad(outs, leaves, douts)))
        (outs, grads_ours), (refs, grads_ref) = results
        for l, (a, e) in enumerate(zip(outs, refs)):
            assert a.shape == (T, *SHAPES[l]), f"out[{l}] shape {tuple(a.shape)}"
            assert torch.equal(a, e), f"out[{l}] differs by {(a - e).abs().max():.3e} (seed={rng.seed})"
        for i, (a, e) in enumerate(zip(grads_ours, grads_ref)):
            # summation order of the shared dtheta / dalpha may differ from autograd's: 2 ulps
            torch.testing.assert_close(a, e, rtol=4 * torch.finfo(dtype).eps, atol=0,
                                       msg=lambda m: f"grad of input {i}, step {step}: {m} (seed={rng.seed})")


def _spy_backend(log):
    """The torch backend, recording the `needs` it is given."""
    def lslr_backward(*args, needs=None):
        log.append(needs)
        return lslr.lslr_backward(*args, needs=needs)
    impl = types.SimpleNamespace(**{f: getattr(ops.get_backend("torch"), f) for f in (
        "bn_forward", "bn_backward", "bn_double_backward", "lslr_forward")}, lslr_backward=lslr_backward)
    return Backend("spy", impl, None, accepts_needs=True)


def test_first_order_computes_only_what_is_needed(rng):
    """Detached grads (first-order MAML): no dgrad is computed; dtheta and dalpha are right; outputs
    that do not reach the loss get no work and give zero gradients."""
    T, S, step = 3, 3, 2
    shared = [True, False, True, False]
    thetas, grads, alphas = draw(rng, T, S, shared)
    thetas[2].requires_grad_(False)  # a tensor whose theta is frozen
    for t in thetas[:2] + thetas[3:] + alphas:
        t.requires_grad_()
    log = []
    outs = lslr_update(thetas, grads, alphas, step, backend=_spy_backend(log))
    loss = (outs[0] * 2).sum() + outs[2].square().sum()  # outs[1], outs[3] unused
    g_theta0, g_alpha0, g_alpha2, g_alpha1 = torch.autograd.grad(
        loss, [thetas[0], alphas[0], alphas[2], alphas[1]], allow_unused=True)
    assert len(log) == 1
    need_t, need_g, need_a = log[0]
    assert need_g == [False, False] and need_t == [True, False] and need_a == [True, True], log
    torch.testing.assert_close(g_theta0, torch.full(SHAPES[0], 2.0 * T, dtype=F64))
    exp_a0 = torch.zeros(S + 1, dtype=F64)
    exp_a0[step] = -(2 * grads[0]).sum()
    torch.testing.assert_close(g_alpha0, exp_a0)
    exp_a2 = torch.zeros(S + 1, dtype=F64)
    exp_a2[step] = -(2 * outs[2].detach() * grads[2]).sum()
    torch.testing.assert_close(g_alpha2, exp_a2)
    assert g_alpha1 is None


def test_backend_without_needs_gets_full_lists(rng):
    """A backend that does not take `needs` (the plain contract) is called with every argument for the
    tensors it has work for, and its unneeded results are dropped. Only thetas require grad here: a
    per-task dtheta is dout itself (no backend work), so only the two shared tensors reach it."""
    calls = []

    def lslr_backward(douts, grads, alphas, step, shared):
        calls.append((len(douts), all(g is not None for g in grads)))
        return lslr.lslr_backward(douts, grads, alphas, step, shared)
    impl = types.SimpleNamespace(lslr_forward=lslr.lslr_forward, lslr_backward=lslr_backward,
                                 bn_forward=None, bn_backward=None, bn_double_backward=None)
    impl.bn_forward = impl.bn_backward = impl.bn_double_backward = lambda *a: None
    backend = Backend("plain", impl, None)
    thetas, grads, alphas = draw(rng, 2, 2, [False, True, False, True])
    leaves = [t.requires_grad_() for t in thetas]
    outs = lslr_update(leaves, grads, alphas, 1, backend=backend)
    got = torch.autograd.grad(sum(o.sum() for o in outs), leaves)
    assert calls == [(2, True)]
    for l, (g, t) in enumerate(zip(got, thetas)):
        want = torch.full(t.shape, 1.0 if t.dim() == len(SHAPES[l]) + 1 else 2.0, dtype=F64)
        torch.testing.assert_close(g, want)


def test_empty_lists():
    assert lslr_update([], [], [], 0) == []


@pytest.mark.skipif("native" not in available_backends("cpu"), reason="the compiled extension did not load")
def test_a_dtype_the_backend_does_not_take_is_refused_by_the_op():
    """Validation happens once, at the op: float16 is valid LSLR input (the torch backend runs it), and
    a backend whose kernels take only float32/float64 is refused there in one line naming it."""
    th, g, a = [torch.zeros(2, 3).half()], [torch.ones(4, 2, 3).half()], [torch.ones(5).half()]
    assert lslr_update(th, g, a, 0, backend="torch")[0].dtype == torch.float16
    with pytest.raises(ValueError, match=r"lslr_update: the 'native' backend takes float32 or float64 tensors, "
                                         r"got thetas\[0\] of dtype float16"):
        lslr_update(th, g, a, 0, backend="native")


def test_bad_arguments_raise_with_clear_messages():
    th, g, a = [torch.zeros(2, 3)], [torch.ones(4, 2, 3)], [torch.ones(5)]
    bad = [
        (lambda: lslr_update(th, g + g, a, 0), ValueError, "same length"),
        (lambda: lslr_update(th, g, a, 5), ValueError, r"step = 5 is out of range for alphas\[0\]"),
        (lambda: lslr_update(th, g, a, -1), ValueError, "out of range"),
        (lambda: lslr_update(th, g, a, 1.0), ValueError, "step must be an int"),
        (lambda: lslr_update([torch.zeros(3, 2)], g, a, 0), ValueError, r"thetas\[0\] must have shape"),
        (lambda: lslr_update(th, g, [torch.ones(5, 1)], 0), ValueError, r"alphas\[0\] must be a vector"),
        (lambda: lslr_update(th, [g[0].double()], a, 0), ValueError, "dtype mismatch"),
        (lambda: lslr_update(th * 2, [g[0], torch.ones(3, 2, 3)], a * 2, 0), ValueError, r"grads\[1\] has 3 tasks"),
        (lambda: lslr_update(th, [torch.tensor(1.0)], a, 0), ValueError, "leading task dimension"),
        (lambda: lslr_update(th[0], g, a, 0), TypeError, "thetas must be a list"),
        (lambda: lslr_update(th, g, a, 0, backend="nope"), ValueError, "backend must be one of"),
    ]
    for fn, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.parametrize("backend", [b for b in ("torch", "native") if b in available_backends()])
def test_stacked_rates_match_the_list_form(rng, backend):
    """alphas as the rows of one (L, S+1) tensor: the same outputs and gradients, bit for bit, as the list
    of vectors over a 3-step inner loop (thetas shared at step 0, then per task; one tensor left out of
    the loss at every step, whose rate row gets a zero gradient), and the table's gradient is the
    per-row gradients stacked; without a rate gradient wanted none is formed."""
    T, S = 3, 3
    shared = [True, False, True, False]
    thetas, grads, alphas = draw(rng, T, S, shared)
    thetas = [t.requires_grad_() for t in thetas]
    grads = [g.requires_grad_() for g in grads]

    def run(rates):
        w = thetas
        for step in range(S):
            w = lslr_update(w, [g * (1 + step) for g in grads], rates, step, backend=backend)
        return sum((x ** 2).sum() for x in w[:-1])  # the last tensor does not enter the loss

    rows = [a.clone().requires_grad_() for a in alphas]
    table = torch.stack(alphas).requires_grad_()
    ref = run(rows)
    got = run(table)
    kw = dict(allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad(ref, thetas + grads + rows, **kw)
    g_got = torch.autograd.grad(got, thetas + grads + [table], **kw)
    assert torch.equal(ref, got), rng.seed
    for a, b in zip(g_ref[:-len(rows)], g_got[:-1]):
        assert torch.equal(a, b), rng.seed
    assert torch.equal(torch.stack(g_ref[-len(rows):]), g_got[-1]), rng.seed
    assert not g_got[-1][-1].any()
    # rates without gradient: thetas and grads only
    g2 = torch.autograd.grad(run(table.detach()), thetas + grads, **kw)
    for a, b in zip(g_ref[:-len(rows)], g2):
        assert torch.equal(a, b), rng.seed
    with pytest.raises(ValueError, match=r"\(L, S\+1\)"):
        lslr_update(thetas, grads, table[0], 0, backend=backend)


@pytest.mark.parametrize("backend", [b for b in ("torch", "native") if b in available_backends("cpu")])
def test_results_in_the_gradients_layout(rng, backend):
    """Operands in the Triton weight gradient's layout, in another, and not dense: the formulas' values,
    and the outputs in the gradient's layout where it is dense and task-major (tests/_bn_reference.py)."""
    from _bn_reference import check_lslr_layouts
    from mamlpp_fast.ops.backend import get_backend
    check_lslr_layouts(get_backend(backend, "cpu"), rng.gen)
