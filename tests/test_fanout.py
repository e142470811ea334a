"""The fan-out nodes (mamlpp_fast.ops.fanout) and the ops' aliases for what their backward reads again.

Every check is float64 on fresh random inputs against the same computation without fan-out. Summing k
terms in another order changes each element by at most 2 (k - 1) u sum_i |term_i| (u = 2^-53, the unit
roundoff: each order's k - 1 additions round by at most (k - 1) u of the sum of the terms' magnitudes),
which is the margin `_close` applies; the terms' magnitudes are measured in each test (each alias there
has one consumer, so its gradient is one term).
"""
from __future__ import annotations

import pytest
import torch

from _batches import fresh_seed
from mamlpp_fast.ops.bn_pool import bn_pool
from mamlpp_fast.ops.conv_block import conv_bn_pool
from mamlpp_fast.ops.fanout import expand_tasks, fanout, fanout_rows
from mamlpp_fast.triton._derived import derived

U = 2.0 ** -53


def _close(got, want, scale, k):
    """|got - want| <= 2 (k - 1) u scale element-wise (module docstring), scale = sum of |terms|."""
    bound = 2 * (k - 1) * U * scale
    excess = (got - want).abs() - bound
    assert torch.all(excess <= 0), f"exceeds the margin by {float(excess.max()):.3e}"


def _rnd(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_fanout_sums_every_uses_gradient_including_second_order():
    """Three uses of (x, y): the gradient of use 0 taken w.r.t. its aliases with create_graph and used in
    the outer loss (as the learner's inner loop does), uses 1 and 2 plain."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    a0, b0 = _rnd(g, 3, 4), _rnd(g, 2, 5)
    ca, cb, v = _rnd(g, 3, 4), _rnd(g, 2, 5), _rnd(g, 3, 4)

    def run(fan):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        x, y = a * 2, b + 1  # non-leaf sources, as the learner's fast weights are
        if fan:
            (x0, y0), (x1, y1), (x2, y2) = fanout(3, [x, y])
        else:
            x0 = x1 = x2 = x
            y0 = y1 = y2 = y
        terms = {}
        if fan:
            for name, al in (("y0", y0), ("x1", x1), ("y1", y1), ("x2", x2)):
                al.register_hook(lambda gr, name=name: terms.__setitem__(name, gr.abs()) if gr is not None else None)
        # d/dx0 of sum(x0 * ca) * sum(sin(y0[0])) = ca * sum(sin(y0[0])): the outer loss reaches y0 through it
        inner = torch.autograd.grad((x0 * ca).sum() * y0[0].sin().sum() + (y0 * cb).sum(), [x0],
                                    create_graph=True)[0]
        loss = (inner * v).sum() + (x1.exp() * ca).sum() * y1.cos().sum() + (x2 ** 3).sum()
        loss.backward()
        return a.grad, b.grad, terms

    ga, gb, terms = run(True)
    ra, rb, _ = run(False)
    assert set(terms) == {"y0", "x1", "y1", "x2"}, f"seed {seed}"
    _close(ga, ra, 2 * (terms["x1"] + terms["x2"]), 2)  # x = 2 a: the factor 2 is exact
    _close(gb, rb, terms["y0"] + terms["y1"], 2)
    assert float(ga.abs().max()) > 0 and float(gb.abs().max()) > 0


def test_fanout_aliases_share_elements_and_unused_uses_give_no_gradient():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    a = _rnd(g, 3, 4).requires_grad_()
    src = a * 1.5
    (x0,), (x1,) = fanout(2, [src])
    assert x0.data_ptr() == src.data_ptr() == x1.data_ptr() and x0.stride() == src.stride()
    (x0.tanh() * 2).sum().backward()  # use 1 unused: its gradient is None, left out of the sum
    y = src.detach().tanh()
    want = 2 * (1 - y * y) * 1.5
    # 1 - y y is rounded once or twice (with or without a fused multiply-add): at most 2 u (1 + y^2) apart,
    # times the exact 2 and the 1.5, whose product rounds once more (u |want| each way)
    bound = 3 * 2 * 2 * U * (1 + y * y) + 2 * U * want.abs()
    assert torch.all((a.grad - want).abs() <= bound), f"seed {seed}"
    with pytest.raises(ValueError, match="uses must be >= 1"):
        fanout(0, [a])
    assert fanout(2, []) == [[], []]


def test_fanout_many_uses_of_few_tensors_summed_by_one_stack(monkeypatch):
    """A tensor read by 6 uses (as the learning-rate table, once per step): its gradients stacked and
    summed (2 n < uses - 1) against autograd's additions, float64, a reordered 6-term sum's margin from
    the measured terms; with a use that gets no gradient, the per-use additions (same margin)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    t0 = _rnd(g, 4, 6)
    coefs = [_rnd(g, 4, 6) for _ in range(6)]

    def run(fan, skip=None):
        a = t0.clone().requires_grad_()
        uses = [use[0] for use in fanout(6, [a])] if fan else [a] * 6
        terms = []
        loss = 0
        for u, (al, c) in enumerate(zip(uses, coefs)):
            if u == skip:
                continue
            if fan:
                al.register_hook(lambda gr: terms.append(gr.abs()))
            loss = loss + (al.sin() * c).sum()
        loss.backward()
        return a.grad, (sum(terms) if terms else None)

    stacks = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda ts, *a, **k: stacks.append(len(ts)) or real_stack(ts, *a, **k))
    for skip, stacked in ((None, [6]), (3, [])):
        stacks.clear()
        got, scale = run(True, skip)
        assert stacks == stacked
        want, _ = run(False, skip)
        _close(got, want, scale, 6)
        assert float(got.abs().max()) > 0


def test_fanout_aliases_share_kept_derived_data():
    """Aliases of a tensor computed in a graph share one dict of derived data (the Triton convolutions'
    re-laid copies): a weight read through three aliases is re-laid once. A leaf keeps nothing."""
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    src = a * 2
    aliases = [al for use in fanout(3, [src]) for al in use]
    assert all(derived(al) is derived(src) for al in aliases)
    derived(aliases[0])["k"] = 1
    assert derived(aliases[2])["k"] == 1
    assert derived(a) is None  # a leaf: its values can change through .data
    assert derived(src.t()) is not derived(src)  # same storage, other strides: its own dict


def test_fanout_rows_sums_rows_of_every_use_by_table():
    """Tables of two shapes; use 0 reads every row, use 1 only the last step's (stacked per step), use 2
    a subset of the tables and of those single rows (added per row)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (3, 4), (2, 5), (3, 4)]
    t0 = [_rnd(g, *s) for s in shapes]
    coef = [[_rnd(g, s[1]) for _ in range(s[0])] for s in shapes]
    coef2 = [_rnd(g, s[1]) for s in shapes]
    uses = [[0, 1, 2, 3], [0, 1, 2, 3], [1, 3]]

    def run(fan):
        tabs = [t.clone().requires_grad_() for t in t0]
        srcs = [t * 1.0 for t in tabs]
        if fan:
            rows = fanout_rows(srcs, uses)
        else:
            rows = [[srcs[i].unbind(0) for i in use] for use in uses]
        terms = [sum((r.sin() * coef[t][s]).sum() for t, tab in zip(uses[0], rows[0]) for s, r in enumerate(tab)),
                 sum((tab[-1] ** 2 * coef2[t]).sum() for t, tab in zip(uses[1], rows[1])),
                 (rows[2][0][1].exp() * coef2[1]).sum() + (rows[2][1][0] * 3).sum()]
        if fan:
            sum(terms).backward()
            return [t.grad for t in tabs]
        # the reference, and each use's table gradient alone (one term per row) for the margin
        per_term = [torch.autograd.grad(term, tabs, retain_graph=True, allow_unused=True) for term in terms]
        scale = [sum(p[k].abs() for p in per_term if p[k] is not None) for k in range(len(tabs))]
        return scale, torch.autograd.grad(sum(terms), tabs)

    got = run(True)
    scale, want = run(False)
    for k in range(len(shapes)):
        _close(got[k], want[k], scale[k], 3)


def test_fanout_rows_bad_inputs():
    t = torch.randn(3, 4)
    with pytest.raises(ValueError, match="names table 2"):
        fanout_rows([t, t], [[0, 2]])
    with pytest.raises(ValueError, match="names a table twice"):
        fanout_rows([t], [[0, 0]])
    with pytest.raises(ValueError, match=r"tables\[0\] must be a tensor"):
        fanout_rows([torch.tensor(1.0)], [[0]])


def test_expand_tasks_sums_each_gradient_over_the_tasks():
    """expand_tasks against autograd's expand: contiguous gradients (summed as one concatenation), a
    gradient in a permuted layout and one expanded over the tasks (each summed alone), a float32 tensor
    (another group), a tensor no use reads (None), float64 on fresh inputs, every result contiguous.
    The margin is a reordered b-term sum's, with the terms' magnitudes measured (sum of |per-task
    gradient|)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    b = 5
    shapes = [(3, 4), (6,), (2, 3, 2), (4, 2), (3,), (7,)]
    srcs = [_rnd(g, *s) for s in shapes]
    srcs[4] = srcs[4].float()
    coef = [_rnd(g, b, *s) for s in shapes]

    def run(fast):
        ps = [s.clone().requires_grad_() for s in srcs]
        ex = expand_tasks(b, ps) if fast else [p.unsqueeze(0).expand(b, *p.shape) for p in ps]
        terms = [None] * len(ps)

        def keep(j):
            return lambda gr: terms.__setitem__(j, gr.abs())
        for j, e in enumerate(ex):
            if j != 5:
                e.register_hook(keep(j))
        loss = sum((e * c.to(e.dtype)).sum().double() for j, (e, c) in enumerate(zip(ex, coef)) if j not in (2, 3, 5))
        # a gradient in a permuted layout (as a convolution's weight gradient) and one expanded over the tasks
        loss = loss + (ex[2].permute(0, 3, 1, 2).contiguous() * coef[2].permute(0, 3, 1, 2)).sum()
        loss = loss + (ex[3] * coef[3][:1]).sum()
        loss.backward()
        return [p.grad for p in ps], terms

    got, terms = run(True)
    want, _ = run(False)
    assert got[5] is None and want[5] is None
    for j in range(5):
        assert got[j].shape == srcs[j].shape and got[j].dtype == srcs[j].dtype and got[j].is_contiguous()
        u = 2.0 ** -24 if srcs[j].dtype == torch.float32 else U
        bound = 2 * (b - 1) * u * terms[j].double().sum(0)
        assert torch.all((got[j].double() - want[j].double()).abs() <= bound), f"tensor {j} (seed {seed})"
        assert float(got[j].abs().max()) > 0


def test_expand_tasks_views_bad_inputs_and_once_differentiable():
    p = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    (e,) = expand_tasks(4, [p])
    assert e.shape == (4, 3, 2) and e.stride() == (0, 2, 1) and e.data_ptr() == p.data_ptr()
    assert expand_tasks(2, []) == []
    with pytest.raises(ValueError, match="b must be >= 1"):
        expand_tasks(0, [p])
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a torch.Tensor"):
        expand_tasks(2, [p, 3.0])
    (gp,) = torch.autograd.grad((e ** 2).sum(), [p], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gp.sum(), [p])


@pytest.mark.parametrize("per_task", [False, True])
def test_bn_pool_gamma_saved_routes_the_double_backwards_gamma_term(per_task):
    """With gamma_saved (here a separate leaf of the same values), the forward's gradient goes to gamma and
    the backward node's (the second-order term) to gamma_saved: their sum is the gradient without it."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    t, c = 2, 3
    x = (_rnd(g, 3, t * c, 6, 6) * 2 + 0.5).requires_grad_()
    gamma = (1 + 0.5 * _rnd(g, *((t, c) if per_task else (c,)))).requires_grad_()
    beta = _rnd(g, c).requires_grad_()
    proj = _rnd(g, 3, t * c, 3, 3)
    wts = [_rnd(g, *p.shape) for p in (x, gamma, beta)]

    def run(saved):
        out = bn_pool(x, gamma, beta, t, 1e-5, 0.01, gamma_saved=saved)[0]
        first = torch.autograd.grad((out * proj).sum(), [x, gamma, beta], create_graph=True)
        scalar = sum((f * w).sum() for f, w in zip(first, wts))
        return torch.autograd.grad(scalar, [x, gamma, beta] + ([saved] if saved is not None else []),
                                   allow_unused=True)

    ref = run(None)
    got = run(gamma.detach().clone().requires_grad_())
    assert got[3] is not None and float(got[3].abs().max()) > 0, f"no term reached gamma_saved (seed {seed})"
    fwd = torch.zeros_like(got[3]) if got[1] is None else got[1]
    _close(fwd + got[3], ref[1], fwd.abs() + got[3].abs(), 2)  # the same two terms, added here
    assert torch.equal(got[0], ref[0]) and (got[2] is None) == (ref[2] is None)
    assert got[2] is None or torch.equal(got[2], ref[2])
    with pytest.raises(ValueError, match="gamma_saved"):
        bn_pool(x, gamma, beta, t, 1e-5, 0.01, gamma_saved=torch.zeros(c + 1, dtype=torch.float64))


def test_conv_bn_pool_saved_aliases_route_the_double_backwards_terms():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    t, c, ci = 2, 3, 2
    x = _rnd(g, 2, t * ci, 6, 6)
    w = _rnd(g, t, c, ci, 3, 3).requires_grad_()
    bias = _rnd(g, t, c).requires_grad_()
    gamma = (1 + 0.5 * _rnd(g, c)).requires_grad_()
    beta = _rnd(g, c).requires_grad_()
    params = [w, bias, gamma, beta]
    proj = _rnd(g, 2, t * c, 3, 3)
    wts = [_rnd(g, *p.shape) for p in params]

    def run(saved):
        kw = {} if saved is None else dict(w_saved=saved[0], bias_saved=saved[1], gamma_saved=saved[2])
        out = conv_bn_pool(x, w, bias, gamma, beta, t, 1, 1, 1e-5, 0.01, **kw)[0]
        first = torch.autograd.grad((out * proj).sum(), params, create_graph=True)
        scalar = sum((f * v).sum() for f, v in zip(first, wts))
        return torch.autograd.grad(scalar, params + (list(saved) if saved else []), allow_unused=True)

    ref = run(None)
    got = run([p.detach().clone().requires_grad_() for p in (w, bias, gamma)])
    z = lambda v, like: torch.zeros_like(like) if v is None else v  # noqa: E731
    for k, name in enumerate(("w", "bias", "gamma")):
        assert got[4 + k] is not None, f"no second-order term reached {name}_saved (seed {seed})"
        fwd, bwd = z(got[k], params[k]), got[4 + k]
        _close(fwd + bwd, z(ref[k], params[k]), fwd.abs() + bwd.abs(), 2)
    assert torch.equal(z(got[3], beta), z(ref[3], beta))
    with pytest.raises(ValueError, match="w_saved"):
        conv_bn_pool(x, w, bias, gamma, beta, t, 1, 1, 1e-5, 0.01, w_saved=w.detach()[:, :1])


def _recording(impl, seen):
    """impl with its backward recording whether it was given a second output gradient (gout2) and, for
    bn_pool, a gradient of x to add (dx2): (gout2 given, dx2 given) per call."""
    import types

    def backward(*a, gout2=None, **kw):  # kw: bn_pool's dx2, the fused block's image terms (stats)
        seen.append((gout2 is not None, kw.get("dx2") is not None))
        return impl.backward(*a, gout2=gout2, **kw)

    extra = {"image_stats": impl.image_stats} if hasattr(impl, "image_stats") else {}
    return types.SimpleNamespace(name=impl.name, forward=impl.forward, backward=backward,
                                 double_backward=impl.double_backward, **extra)


class _Cube(torch.autograd.Function):
    """y = x^3, whose backward node (`_CubeGrad`) reads x_saved in place of x: a consumer of an op's output
    alias, as the Triton convolution (``input_saved``) is in the learner."""

    @staticmethod
    def forward(ctx, x, x_saved):
        ctx.save_for_backward(x_saved)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(g, x), None


class _CubeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, x):
        ctx.save_for_backward(g, x)
        return 3 * x * x * g

    @staticmethod
    def backward(ctx, u):
        g, x = ctx.saved_tensors
        return 3 * x * x * u, 6 * x * g * u


@pytest.mark.parametrize("producer", ["conv_bn_pool", "bn_pool"])
def test_activation_alias_gives_the_producer_both_gradients(producer):
    """An op's output alias (``alias=True``) read by the next op's backward node, as in the learner's
    support pass: the inner gradient taken with create_graph, the outer one without. The producer's
    backward then receives the two gradients of its output separately in the outer pass (and their sum
    in the recorded inner pass: `two_gradients`) and adds them where it reads them (here torch_impl: one
    addition of the same two terms as autograd's, commutative), so every outer gradient is bitwise the
    one without the alias. bn_pool's own input alias (the double backward's gradient of x added to dx
    by its backward, ``dx2``) reaches the outer pass's backward too."""
    from mamlpp_fast.ops import bn_pool as bp
    from mamlpp_fast.ops import conv_block as cb

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    t, c, ci = 2, 3, 2
    img = _rnd(g, 2, t * ci, 12, 12)
    w, bias = _rnd(g, t, c, ci, 3, 3).requires_grad_(), _rnd(g, t, c).requires_grad_()
    x0 = (_rnd(g, 2, t * c, 12, 12) * 2 + 0.5).requires_grad_()
    gam0, bet0 = (1 + 0.5 * _rnd(g, t, c)).requires_grad_(), _rnd(g, t, c).requires_grad_()
    params = ([w, bias] if producer == "conv_bn_pool" else [x0]) + [gam0, bet0]
    proj, proj2 = _rnd(g, 2, t * c, 6, 6), _rnd(g, 2, t * c, 6, 6)
    wts = [_rnd(g, *p.shape) for p in params]

    def run(alias, seen):
        if producer == "conv_bn_pool":
            res = conv_bn_pool(img, w, bias, gam0, bet0, t, 1, 1, 1e-5, 0.01, impl=_recording(cb.torch_impl, seen),
                               alias=alias)
        else:
            res = bn_pool(x0, gam0, bet0, t, 1e-5, 0.01, impl=_recording(bp.torch_impl, seen), alias=alias)
        out = _Cube.apply(res[0], res[3] if alias else res[0])
        first = torch.autograd.grad((out * proj).sum(), params, create_graph=True)
        scalar = sum((f * v).sum() for f, v in zip(first, wts)) + (out.tanh() * proj2).sum()
        return torch.autograd.grad(scalar, params, allow_unused=True)

    ref_seen, got_seen = [], []
    ref, got = run(False, ref_seen), run(True, got_seen)
    dx2 = producer == "bn_pool"  # x0's double-backward gradient, added by bn_pool's backward
    assert ref_seen == [(False, False), (False, dx2)] and got_seen == [(False, False), (True, dx2)], \
        (ref_seen, got_seen)
    for k, (a, r) in enumerate(zip(got, ref)):
        assert a is not None and torch.equal(a, r), f"gradient {k} differs (seed {seed})"


def test_two_gradients():
    """The gradients an op with an output alias reads: both where its backward is not recorded, their
    sum where it is (create_graph), the defined one where one is None."""
    from mamlpp_fast.ops.fanout import two_gradients

    a, b = torch.ones(3), torch.full((3,), 2.0)
    assert two_gradients(None, None) == (None, None)
    assert two_gradients(None, b)[0] is b and two_gradients(a, None)[0] is a
    with torch.no_grad():
        ga, gb = two_gradients(a, b)
        assert ga is a and gb is b
    with torch.enable_grad():
        s, none = two_gradients(a, b)
        assert none is None and torch.equal(s, a + b)
