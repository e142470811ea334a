"""The ops registered with PyTorch's dispatcher (torch.ops.mamlpp.*, mamlpp_fast/ops/library.py):
torch.library.opcheck (schema, fake implementation, autograd registration, AOT dispatch) for every
backend that runs on the CPU here, and the registered derivative chain against the public ops."""
import pytest
import torch

import mamlpp_fast.ops.library  # noqa: F401  (registers torch.ops.mamlpp.*)
from mamlpp_fast import ops

F64 = torch.float64
CPU_BACKENDS = [b for b in ops.available_backends("cpu") if b in ("torch", "native")]
M = torch.ops.mamlpp


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
    torch.library.opcheck(M.bn_backward.default, (dy, x, gamma, beta, mean, invstd, 2, 0.01, backend))
    plain = [t.detach() for t in (dy, x, gamma, beta)]
    u, ug, ub = torch.randn_like(x), torch.randn_like(gamma), torch.randn_like(beta)
    for gg in ((u, ug, ub), (u, None, None), (None, ug, ub)):
        torch.library.opcheck(M.bn_double_backward.default, (*gg, *plain, mean, invstd, 2, 0.01, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_lslr(backend):
    thetas, grads, alphas = _lslr_inputs(grad=True)
    torch.library.opcheck(M.lslr_forward.default, (thetas, grads, alphas, 1, backend))
    douts = [torch.randn(2, 3, 2, dtype=F64) for _ in range(2)]
    plain = [[t.detach() for t in seq] for seq in (grads, alphas)]
    torch.library.opcheck(M.lslr_backward.default, (douts, *plain, 1, [True, False], backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_registered_chain_is_twice_differentiable_and_equals_the_public_op(backend):
    """forward -> bn_backward -> bn_double_backward through the dispatcher: gradcheck and gradgradcheck
    in float64, and the same values as per_step_batch_norm (which uses its own autograd Functions)."""
    x, gamma, beta = _bn_inputs(grad=True, shared=False, seed=1)

    def registered(x, gamma, beta):
        return M.bn_forward(x, gamma, beta, 2, 1e-5, 0.01, backend)[0]
    assert torch.autograd.gradcheck(registered, (x, gamma, beta))
    assert torch.autograd.gradgradcheck(registered, (x, gamma, beta))

    def first_and_second(fn):
        y = fn(x, gamma, beta)
        w = torch.randn_like(y, generator=torch.Generator().manual_seed(2))
        first = torch.autograd.grad((y * w).sum(), (x, gamma, beta), create_graph=True)
        # beta enters the first derivatives only through the leaky-ReLU mask: its second is 0 (unused)
        second = torch.autograd.grad(sum((f * f).sum() for f in first), (x, gamma, beta), allow_unused=True,
                                     materialize_grads=True)
        return [y, *first, *second]
    public = lambda x, g, b: ops.per_step_batch_norm(x, g, b, 2, backend=backend)[0]  # noqa: E731
    for a, e in zip(first_and_second(registered), first_and_second(public)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_registered_lslr_gradients_equal_the_public_op(backend):
    thetas, grads, alphas = _lslr_inputs(grad=True, seed=3)
    leaves = [*thetas, *grads, *alphas]
    assert torch.autograd.gradcheck(lambda *t: tuple(M.lslr_forward(list(t[:2]), list(t[2:4]), list(t[4:]), 2,
                                                                     backend)), tuple(leaves))
    res = {}
    for name, fn in (("registered", lambda: M.lslr_forward(thetas, grads, alphas, 2, backend)),
                     ("public", lambda: ops.lslr_update(thetas, grads, alphas, 2, backend=backend))):
        outs = fn()
        loss = sum((o * torch.arange(o.numel(), dtype=F64).reshape(o.shape)).sum() for o in outs)
        res[name] = [*outs, *torch.autograd.grad(loss, leaves)]
    for a, e in zip(res["registered"], res["public"]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
