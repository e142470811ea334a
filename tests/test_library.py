"""The ops registered with PyTorch's dispatcher (torch.ops.mamlpp.*, mamlpp_fast/ops/library.py), which
the public ops run: torch.library.opcheck (schema, fake implementation, autograd registration, AOT
dispatch) for every backend that runs on the CPU here (the Triton backend: tests/test_triton_interp.py,
under the interpreter), the compiled extension's own registered kernels (mamlpp::native_*), and the
registered derivative chain (gradcheck, gradgradcheck, equal values across backends)."""
import pytest
import torch

from mamlpp_fast import _native, ops

F64 = torch.float64
CPU_BACKENDS = [b for b in ops.available_backends("cpu") if b in ("torch", "native")]
M = torch.ops.mamlpp
NEEDS = [[True, True, True], [True, False, False], [False, True, True]]


def _bn_inputs(grad=False, shared=True, T=2, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T * C, 3, 3, dtype=F64, generator=g)
    shape = (C,) if shared else (T, C)
    gamma = torch.rand(shape, dtype=F64, generator=g) + 0.5
    beta = torch.randn(shape, dtype=F64, generator=g) * 0.1
    return [t.requires_grad_(grad) for t in (x, gamma, beta)]


def _lslr_inputs(grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(3, 2, dtype=F64, generator=g), torch.randn(2, 3, 2, dtype=F64, generator=g)]  # shared, per-task
    grads = [torch.randn(2, 3, 2, dtype=F64, generator=g), torch.randn(2, 3, 2, dtype=F64, generator=g)]
    alphas = [torch.rand(4, dtype=F64, generator=g), torch.rand(4, dtype=F64, generator=g)]
    return [[t.requires_grad_(grad) for t in seq] for seq in (thetas, grads, alphas)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_task"])
def test_opcheck_bn(backend, shared):
    x, gamma, beta = _bn_inputs(grad=True, shared=shared)
    torch.library.opcheck(M.bn_forward.default, (x, gamma, beta, 2, 1e-5, 0.01, backend))
    with torch.no_grad():
        y, mean, invstd = M.bn_forward(x, gamma, beta, 2, 1e-5, 0.01, backend)
    dy = torch.randn_like(x).requires_grad_(True)
    for needs in NEEDS:
        torch.library.opcheck(M.bn_backward.default, (dy, x, gamma, beta, mean, invstd, 2, 0.01, needs, backend))
    plain = [t.detach() for t in (dy, x, gamma, beta)]
    u, ug, ub = torch.randn_like(x), torch.randn_like(gamma), torch.randn_like(beta)
    for gg in ((u, ug, ub), (u, None, None), (None, ug, ub)):
        for needs in NEEDS:
            torch.library.opcheck(M.bn_double_backward.default,
                                  (*gg, *plain, mean, invstd, 2, 0.01, needs, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_lslr(backend):
    thetas, grads, alphas = _lslr_inputs(grad=True)
    torch.library.opcheck(M.lslr_forward.default, (thetas, grads, alphas, 1, backend))
    douts = [torch.randn(2, 3, 2, dtype=F64) for _ in range(2)]
    plain = [[t.detach() for t in seq] for seq in (grads, alphas)]
    for needs in ([True] * 6, [True, False, False, True, True, False], [False, False, False, False, True, True]):
        g = [t if needs[4 + l] else None for l, t in enumerate(plain[0])]
        torch.library.opcheck(M.lslr_backward.default, (douts, g, plain[1], 1, [True, False], needs, backend))


@pytest.mark.skipif(not _native.is_loaded(), reason="the compiled extension did not load")
def test_opcheck_native_kernels():
    """The extension's kernels registered in C++ (TORCH_LIBRARY_FRAGMENT(mamlpp), CPU key) with their
    Python fakes: what the native backend calls."""
    x, gamma, beta = _bn_inputs(shared=False)
    torch.library.opcheck(M.native_bn_forward.default, (x, gamma, beta, 2, 1e-5, 0.01))
    y, mean, invstd = M.native_bn_forward(x, gamma, beta, 2, 1e-5, 0.01)
    dy, u = torch.randn_like(x), torch.randn_like(x)
    torch.library.opcheck(M.native_bn_backward.default, (dy, x, gamma, beta, mean, invstd, 2, 0.01))
    torch.library.opcheck(M.native_bn_double_backward.default,
                          (u, None, torch.randn_like(beta), dy, x, gamma, beta, mean, invstd, 2, 0.01))
    thetas, grads, alphas = _lslr_inputs()
    torch.library.opcheck(M.native_lslr_forward.default, (thetas, grads, alphas, 1))
    douts = [torch.randn(2, 3, 2, dtype=F64) for _ in range(2)]
    torch.library.opcheck(M.native_lslr_backward.default, (douts, grads, alphas, 1, [True, False]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_public_ops_run_the_registered_ops(backend):
    """per_step_batch_norm and lslr_update are the registered ops behind one validation: their autograd
    nodes are the dispatcher's, and the backward of the backward is mamlpp::bn_double_backward."""
    x, gamma, beta = _bn_inputs(grad=True)
    y, mean, invstd = ops.per_step_batch_norm(x, gamma, beta, 2, backend=backend)
    assert "mamlpp_bn_forward" in type(y.grad_fn).__name__
    assert not mean.requires_grad and not invstd.requires_grad
    dx = torch.autograd.grad(y.square().sum(), x, create_graph=True)[0]
    assert "mamlpp_bn_backward" in type(dx.grad_fn).__name__
    thetas, grads, alphas = _lslr_inputs(grad=True)
    outs = ops.lslr_update(thetas, grads, alphas, 1, backend=backend)
    assert all("mamlpp_lslr_forward" in type(o.grad_fn).__name__ for o in outs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_registered_chain_is_twice_differentiable(backend):
    """forward -> bn_backward -> bn_double_backward through the dispatcher: gradcheck and gradgradcheck
    in float64, per-task and shared parameters."""
    for shared in (False, True):
        x, gamma, beta = _bn_inputs(grad=True, shared=shared, seed=1)

        def registered(x, gamma, beta):
            return M.bn_forward(x, gamma, beta, 2, 1e-5, 0.01, backend)[0]
        assert torch.autograd.gradcheck(registered, (x, gamma, beta))
        assert torch.autograd.gradgradcheck(registered, (x, gamma, beta))


@pytest.mark.skipif(len(CPU_BACKENDS) < 2, reason="needs the native backend beside torch")
def test_backends_agree_through_the_registered_chain():
    """The same first and second derivatives from every CPU backend (float64; the torch backend is
    plain PyTorch arithmetic, the native one the C++ loops), and the LSLR gradients."""
    x, gamma, beta = _bn_inputs(grad=True, shared=False, seed=4)
    w = torch.randn(2, 6, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(5))

    def bn_derivatives(backend):
        y = M.bn_forward(x, gamma, beta, 2, 1e-5, 0.01, backend)[0]
        first = torch.autograd.grad((y * w).sum(), (x, gamma, beta), create_graph=True)
        # beta enters the first derivatives only through the leaky-ReLU mask: its second is 0 (unused)
        second = torch.autograd.grad(sum((f * f).sum() for f in first), (x, gamma, beta), allow_unused=True,
                                     materialize_grads=True)
        return [y, *first, *second]

    thetas, grads, alphas = _lslr_inputs(grad=True, seed=3)
    leaves = [*thetas, *grads, *alphas]

    def lslr_derivatives(backend):
        outs = M.lslr_forward(thetas, grads, alphas, 2, backend)
        loss = sum((o * torch.arange(o.numel(), dtype=F64).reshape(o.shape)).sum() for o in outs)
        return [*outs, *torch.autograd.grad(loss, leaves)]

    for fn in (bn_derivatives, lslr_derivatives):
        for a, e in zip(fn("native"), fn("torch")):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_registered_lslr_gradcheck(backend):
    thetas, grads, alphas = _lslr_inputs(grad=True, seed=3)
    leaves = [*thetas, *grads, *alphas]
    assert torch.autograd.gradcheck(lambda *t: tuple(M.lslr_forward(list(t[:2]), list(t[2:4]), list(t[4:]), 2,
                                                                     backend)), tuple(leaves))


def test_a_backend_name_is_resolved_by_the_op():
    """The ops take any name get_backend takes ("auto" here), resolved for the tensors' device."""
    x, gamma, beta = _bn_inputs()
    got = M.bn_forward(x, gamma, beta, 2, 1e-5, 0.01, "auto")
    want = M.bn_forward(x, gamma, beta, 2, 1e-5, 0.01, ops.get_backend("auto", "cpu").name)
    for a, e in zip(got, want):
        assert torch.equal(a, e)
