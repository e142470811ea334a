"""`mamlpp_fast.ops.pool.max_pool2x2` against ``F.max_pool2d(y, 2, 2)``: the same values and the same
first, second and third derivatives (exact: the same aten kernels and gather compute them, and an
addition of autograd's zero gradient changes no value), float64 gradcheck / gradgradcheck, no zero fill
or activation-sized addition in the outer backward of a second-order pattern (where autograd's own
formula makes one of each), and clear errors for shapes it does not take. Fresh random inputs each run
(ties between a window's values have probability zero)."""
import pytest
import torch
import torch.nn.functional as F
from _batches import fresh_seed

from mamlpp_fast.ops.pool import max_pool2x2

SHAPES = [(3, 4, 8, 8), (2, 3, 7, 5), (4, 2, 3, 3), (1, 1, 2, 2)]


def _inputs(shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True)
    ps = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    probes = [torch.randn(*s, generator=gen, dtype=dtype) for s in (ps, ps, shape, ps)]
    return y, probes


def _pattern(pool, y, probes):
    """Forward, the inner gradient with create_graph, the outer gradient (a second-order meta-update's
    use) and a third derivative."""
    p = pool(y)
    (gy,) = torch.autograd.grad((p * probes[0]).sum(), y, create_graph=True)
    outer = (p * probes[1]).sum() + (gy * probes[2] * y).sum()
    (dy,) = torch.autograd.grad(outer, y, create_graph=True)
    (ddy,) = torch.autograd.grad((dy * y).sum(), y)
    return p, gy, dy, ddy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_same_values_and_derivatives_as_max_pool2d(shape, dtype):
    seed = fresh_seed()
    y, probes = _inputs(shape, seed, dtype)
    ref = _pattern(lambda t: F.max_pool2d(t, 2, 2), y, probes)
    got = _pattern(max_pool2x2, y, probes)
    for name, a, r in zip(("out", "grad", "second", "third"), got, ref):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert bool((a == r).all()), f"{name}: max |diff| {(a - r).abs().max():.3e} (seed {seed})"


def test_gradcheck_and_gradgradcheck():
    seed = fresh_seed()
    y, probes = _inputs((2, 3, 6, 5), seed)
    assert torch.autograd.gradcheck(max_pool2x2, (y,))
    assert torch.autograd.gradgradcheck(max_pool2x2, (y,))


def test_outer_backward_adds_no_zero_gradient():
    """The outer gradient of a second-order pattern: ``F.max_pool2d`` fills a zero tensor of the input's
    size and adds it to the input's gradient (autograd's formula for the pooling backward's input);
    max_pool2x2 does neither."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == y.numel():
                self.calls.append(func.__name__.split(".")[0])
            return out

    seed = fresh_seed()
    y, probes = _inputs((2, 3, 8, 8), seed)
    counts = {}
    for name, pool in (("aten", lambda t: F.max_pool2d(t, 2, 2)), ("ours", max_pool2x2)):
        p = pool(y)
        (gy,) = torch.autograd.grad((p * probes[0]).sum(), y, create_graph=True)
        outer = (p * probes[1]).sum() + (gy * probes[2]).sum()
        with Count() as c:
            torch.autograd.grad(outer, y)
        counts[name] = c.calls
    assert "zeros_like" in counts["aten"] or "zeros" in counts["aten"] or "new_zeros" in counts["aten"], counts
    assert "add" in counts["aten"], counts
    assert not {"zeros_like", "zeros", "new_zeros", "add", "fill"} & set(counts["ours"]), counts


@pytest.mark.parametrize("shape,word", [((2, 3, 8), "N, C, H, W"), ((2, 3, 1, 8), "at least 2 x 2")])
def test_bad_shapes_named(shape, word):
    with pytest.raises(ValueError, match=word):
        max_pool2x2(torch.randn(*shape))
