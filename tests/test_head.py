"""The linear head and its cross-entropy as one op (mamlpp_fast.ops.head.head_loss): the same function as a
batched matmul and F.cross_entropy to second order (with the loss weight and the running sum it folds
in), its hand-written derivatives checked by gradcheck and gradgradcheck, its bad input, and the fast
learner with it against the reference learner.

All in float64 on fresh random inputs; tolerance FP64_RTOL = 1e-10 of the norm of each result (the
float64 rounding of these sums is ~1e-15). The op's Triton kernels are tested under the interpreter in
tests/test_triton_interp.py.
"""
import pytest
import torch
import torch.nn.functional as F

from _batches import fresh_seed
from _numerics import rel
from mamlpp_fast.ops.head import head_loss, head_supported, torch_impl

FP64_RTOL = 1e-10

# (T, n, C, F-shape): F given as the trailing shape of x's per-task block (C', h, w) or (F,)
SHAPES = [(2, 5, 4, (6,)), (3, 4, 3, (2, 2, 2)), (1, 7, 5, (9,)), (2, 20, 20, (64,)), (2, 6, 3, (8, 5, 5))]


def make_inputs(shape, seed, dtype=torch.float64, expanded=False):
    """x (n, T*C', h, w) or (n, T*F), W (T, C, F), b (T, C), labels (T*n,), a loss weight and a prev,
    all drawn from `seed`; expanded: W and b are one task's expanded over the tasks (task stride 0, as
    the fast weights of step 0)."""
    T, n, C, fs = shape
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    f = 1
    for v in fs:
        f *= v
    x = rnd(n, T * fs[0], *fs[1:]).requires_grad_(True)
    if expanded:
        w = rnd(C, f).requires_grad_(True)
        b = rnd(C).requires_grad_(True)
    else:
        w = rnd(T, C, f).requires_grad_(True)
        b = rnd(T, C).requires_grad_(True)
    labels = torch.randint(0, C, (T * n,), generator=g)
    lw = (0.2 + rnd(()).abs()).to(dtype)
    prev = rnd(()).requires_grad_(True)
    return x, w, b, labels, lw, prev, T


def _task_params(w, b, T):
    return (w.expand(T, *w.shape), b.expand(T, *b.shape)) if w.dim() == 2 else (w, b)


def unfused(x, w, b, labels, T, scale, lw, prev):
    w, b = _task_params(w, b, T)
    n = x.shape[0]
    feats = x.reshape(n, T, -1).transpose(0, 1)
    z = torch.baddbmm(b.unsqueeze(1), feats, w.transpose(1, 2))
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), labels, reduction="sum") * scale
    if lw is not None:
        loss = lw * loss
    return (loss if prev is None else prev + loss), z


def fused(x, w, b, labels, T, scale, lw, prev, impl=None):
    w, b = _task_params(w, b, T)
    return head_loss(x, w, b, labels, T, scale, lw, prev, impl=impl)


def derivatives(fn, x, w, b, labels, T, lw, prev, seed):
    """loss, logits; the first derivatives of the loss w.r.t. (x, W, b, prev) with create_graph; the
    gradients of a random scalar of those derivatives and of the loss (second order)."""
    params = [x, w, b] + ([prev] if prev is not None else [])
    loss, logits = fn(x, w, b, labels, T, 0.37, lw, prev)
    first = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(f.shape, generator=g, dtype=f.dtype) for f in first]
    scalar = sum((f * v).sum() for f, v in zip(first, weights)) + loss.tanh()
    second = torch.autograd.grad(scalar, params, allow_unused=True)
    second = [s if s is not None else torch.zeros_like(p) for s, p in zip(second, params)]
    return [loss, logits] + list(first) + second


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weight-prev"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_head_matches_unfused_ops_to_second_order(shape, weighted):
    seed = fresh_seed()
    x, w, b, labels, lw, prev, T = make_inputs(shape, seed)
    if not weighted:
        lw = prev = None
    ref = derivatives(unfused, x, w, b, labels, T, lw, prev, seed)
    got = derivatives(fused, x, w, b, labels, T, lw, prev, seed)
    names = ["loss", "logits", "dx", "dW", "db", "dprev", "ddx", "ddW", "ddb", "ddprev"]
    if prev is None:
        names = [nm for nm in names if "prev" not in nm]
    for name, a, r in zip(names, got, ref):
        a, r = a.detach(), r.detach()
        assert a.shape == r.shape and rel(a, r) < FP64_RTOL, f"{name}: {rel(a, r):.3e} (seed {seed})"


def test_head_reads_expanded_weights():
    """Step 0's fast weights are expanded over the tasks (task stride 0): the same results as per-task
    copies, to second order."""
    seed = fresh_seed()
    x, w, b, labels, lw, prev, T = make_inputs(SHAPES[0], seed, expanded=True)
    got = derivatives(fused, x, w, b, labels, T, lw, prev, seed)
    ref = derivatives(unfused, x, w, b, labels, T, lw, prev, seed)
    for a, r in zip(got, ref):
        assert rel(a.detach(), r.detach()) < FP64_RTOL


def test_head_gradcheck_and_gradgradcheck():
    """float64 gradcheck and gradgradcheck of the op (PyTorch implementation) w.r.t. x, W, b and prev,
    which covers the double backward's gradient of the upstream gradient too."""
    x, w, b, labels, lw, prev, T = make_inputs(SHAPES[1], 11)
    fn = lambda *p: fused(*p[:3], labels, T, 0.37, lw, p[3])[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, prev))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, prev))


def test_head_bad_input_names_the_cause():
    x, w, b, labels, lw, prev, T = make_inputs(SHAPES[0], 3)
    cases = [
        (dict(labels=labels[:-1]), "labels must be"),
        (dict(labels=labels.double()), "labels must be"),
        (dict(labels=torch.full_like(labels, 4)), "outside [0, 4)"),
        (dict(labels=torch.full_like(labels, -1)), "outside [0, 4)"),
        (dict(w=w[:, :, :-1]), "features per row"),
        (dict(w=w[:1]), "num_tasks"),
        (dict(b=b[:, :-1]), "(T, C)"),
        (dict(w=w.float()), "must match x"),
        (dict(x=x.half()), "float32 or float64"),
        (dict(prev=prev.reshape(1)), "prev must be a 0-d"),
        (dict(lw=torch.tensor(0.5, dtype=torch.float64, requires_grad=True)), "constant"),
        (dict(lw=torch.tensor(1)), "loss_weight must be"),
    ]
    for over, msg in cases:
        a = dict(x=x, w=w, b=b, labels=labels, lw=lw, prev=prev)
        a.update(over)
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            head_loss(a["x"], a["w"], a["b"], a["labels"], T, 1.0, a["lw"], a["prev"])
    assert head_supported(75, 5) is None and head_supported(20, 20) is None
    assert "exceed one tile" in head_supported(300, 20)


# ---- the fast learner with the fused head -------------------------------------------------------------------
LEARNER_CASES = [
    ("msl-second-order", dict(cnn_num_filters=4, num_stages=2, image_height=8, image_width=8,
                              number_of_training_steps_per_iter=3, number_of_evaluation_steps_per_iter=3), 2, 0),
    ("last-step-only-avg-pool", dict(cnn_num_filters=5, num_stages=2, image_height=9, image_width=9,
                                     max_pooling=False, number_of_training_steps_per_iter=2,
                                     number_of_evaluation_steps_per_iter=2), 3, 100),
]


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("case", LEARNER_CASES, ids=[c[0] for c in LEARNER_CASES])
def test_learner_with_fused_head_matches_reference_float64(case, backend):
    """head="fused" (the PyTorch implementation on a CPU): losses, logits, meta-gradients and running
    statistics of the reference learner (MSL with a loss after every step, and the last step only), then
    the parameters after one Adam step."""
    from mamlpp_fast.ops import available_backends
    from test_fast_equivalence import FP64_RTOL as LEARNER_RTOL, assert_same_after_adam, batch_for, compare, make_pair

    if backend not in available_backends():
        pytest.skip(f"backend {backend} is not built here")
    _, cfg, b, epoch = case
    seed = fresh_seed()
    ref, fast, args = make_pair("float64", backend, head="fused", **cfg)
    batch = batch_for(args, b, seed)
    compare(ref, fast, batch, epoch, "float64", seed)
    assert fast._head_cache and all(v is torch_impl for v in fast._head_cache.values())
    ref2, fast2, _ = make_pair("float64", backend, head="fused", **cfg)
    ref2.run_train_iter(batch, epoch)
    fast2.run_train_iter(batch, epoch)
    assert_same_after_adam(ref2, fast2, LEARNER_RTOL, seed)


def test_head_choice():
    """auto: fused only where the Triton kernels run on a CUDA device (so unfused on this CPU); fused:
    the PyTorch implementation here; unfused: never."""
    from test_fast_equivalence import batch_for, make_pair

    small = dict(cnn_num_filters=4, num_stages=2, image_height=8, image_width=8,
                 number_of_training_steps_per_iter=1, number_of_evaluation_steps_per_iter=1)
    for mode, expect in (("auto", None), ("fused", torch_impl), ("unfused", None)):
        _, fast, args = make_pair("float64", "torch", head=mode, **small)
        fast.run_train_iter(batch_for(args, 2, 1), 0)
        cache = fast.__dict__.get("_head_cache", {})
        assert set(map(id, cache.values())) <= {id(expect)}, mode
        assert (mode == "unfused") == (not cache)


def test_float32_head_steps_cover_whole_slices():
    """The float32 head kernels form their products as strict-fp32 tl.dot over whole feature slices
    (`head_config(dot=True)`), so that each program's chain of dependent steps is short: Omniglot's
    task (n = 20, C = 20, F = 64) in one step (the broadcast products took 64), mini-ImageNet's support
    set (5, 5, 1,200) in <= 10 per pass of the double backward (75) and its target set (75, 5, 1,200) in
    <= 2 per program of the split forward and backward (64), <= 38 per double-backward pass (1,200). float64 keeps the broadcast products
    (DOT False). Every tile stays within tl.dot's minimum of 16 and an operand slice of 4,096 elements."""
    pytest.importorskip("triton")
    from mamlpp_fast.triton.head import head_config

    def steps(cfg, f):
        return -(-cfg["FCH"] // cfg["BF"]), -(-f // cfg["BF"])  # per split program, per double backward

    for (n, c, f, t, most) in ((20, 20, 64, 8, (1, 1)), (5, 5, 1200, 2, (1, 10)), (75, 5, 1200, 2, (2, 38))):
        cfg = head_config(n, c, f, t, 132, dot=True)
        assert cfg["DOT"], (n, c, f)
        assert min(cfg["BN"], cfg["BC"], cfg["BF"]) >= 16 and max(cfg["BN"], cfg["BC"]) * cfg["BF"] <= 4096
        got = steps(cfg, f)
        assert got[0] <= most[0] and got[1] <= most[1], (n, c, f, cfg)
        wide = head_config(n, c, f, t, 132)
        assert not wide["DOT"] and all(a > b for a, b in zip(steps(wide, f), got)), (n, c, f, wide)
    assert not head_config(1024, 4, 64, 2, 132, dot=True)["DOT"]  # 1024 x 16 accumulators: broadcast products
