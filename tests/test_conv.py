"""task_conv2d: every implementation against per-task convolutions, to second order.

The reference is an explicit loop over tasks of `F.conv2d` on contiguous channel slices (what the
reference learner does one task at a time). float64: forward, first and second derivatives to 1e-12
relative, plus gradcheck and gradgradcheck. float32: each implementation against the float64
reference; a dot product of K = Cin*kh*kw terms rounded in float32 has a relative error of order
K * 2^-24 of the sum of |terms| (~3e-5 at K = 576 in the worst case, ~1e-6 typical for random signs),
so FP32_RTOL = 1e-4 relative to max|ref| (measured at the Omniglot-like shape below, 3 seeds per
implementation: at most 1.4e-6).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from _batches import fresh_seed
from mamlpp_fast.ops import conv as C
from mamlpp_fast.ops.conv import CONV_IMPLS, task_conv2d

# ``triton`` runs under the Triton interpreter in tests/test_triton_interp.py (and on a GPU in tests/gpu)
CPU_IMPLS = [i for i in CONV_IMPLS if i != "triton"]

FP64_RTOL = 1e-12
FP32_RTOL = 1e-4

# (n, B, Cin, Cout, H, kernel, stride, padding): the learner's 3x3/pad-1 layers, the first layer (one
# input channel), the strided no-max-pool variant, no padding, B=1, a non-square image.
SHAPES = [
    (3, 2, 3, 4, 9, 3, 1, 1),
    (4, 3, 1, 5, 8, 3, 1, 1),
    (2, 2, 2, 3, 9, 3, 2, 1),
    (2, 2, 3, 2, 7, 3, 1, 0),
    (5, 1, 4, 4, 6, 3, 1, 1),
]


def per_task_reference(x, w, bias, b, stride, padding):
    cin = w.shape[2]
    outs = [F.conv2d(x[:, t * cin:(t + 1) * cin].contiguous(), w[t], bias[t], stride=stride, padding=padding)
            for t in range(b)]
    return torch.cat(outs, dim=1)


def make_inputs(shape, dtype, seed, width=None, device="cpu"):
    n, b, cin, cout, h, k, s, p = shape
    g = torch.Generator().manual_seed(seed)
    wd = width or h

    def leaf(*size):
        return torch.randn(*size, generator=g, dtype=dtype).to(device).requires_grad_(True)

    return leaf(n, b * cin, h, wd), leaf(b, cout, cin, k, k), leaf(b, cout), b, s, p


def derivatives(fn, x, w, bias, seed):
    """Output, first derivatives of a random functional of it (create_graph), and second derivatives of
    a random functional of output and first derivatives: what a second-order meta-update needs."""
    out = fn()
    g = torch.Generator().manual_seed(seed + 1)

    def probe(t):  # drawn in float64 on the CPU, then cast: float32/float64 and CPU/GPU runs see the same values
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)

    r1 = probe(out)
    grads = torch.autograd.grad((out * r1).sum() + (out ** 2).sum() * 0.1, (x, w, bias), create_graph=True)
    probes = [probe(t) for t in grads]
    outer = sum((t * p).sum() for t, p in zip(grads, probes)) + (out * out.detach()).sum()
    second = torch.autograd.grad(outer, (x, w, bias))
    return [out.detach(), *(t.detach() for t in grads), *second]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_per_task_convolutions_float64(impl, shape):
    seed = fresh_seed() % 2 ** 31
    x, w, bias, b, s, p = make_inputs(shape, torch.float64, seed)
    got = derivatives(lambda: task_conv2d(x, w, bias, b, s, p, impl), x, w, bias, seed)
    ref = derivatives(lambda: per_task_reference(x, w, bias, b, s, p), x, w, bias, seed)
    assert got[0].is_contiguous() and got[0].shape == ref[0].shape
    names = ["out", "dx", "dw", "dbias", "ddx", "ddw", "ddbias"]
    for name, a, r in zip(names, got, ref):
        assert rel(a, r) < FP64_RTOL, f"{impl} {name}: {rel(a, r):.3e} (seed {seed})"


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradcheck_and_gradgradcheck(impl):
    x, w, bias, b, s, p = make_inputs((2, 2, 2, 3, 5, 3, 1, 1), torch.float64, 7)
    fn = lambda x_, w_, b_: task_conv2d(x_, w_, b_, b, s, p, impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, bias))
    assert torch.autograd.gradgradcheck(fn, (x, w, bias))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_float32_within_rounding_of_float64(impl):
    seed = fresh_seed() % 2 ** 31
    shape = (20, 4, 64, 64, 7, 3, 1, 1)  # K = 576 at the Omniglot layer-3 shape, B=4
    x, w, bias, b, s, p = make_inputs(shape, torch.float64, seed)
    ref = derivatives(lambda: per_task_reference(x, w, bias, b, s, p), x, w, bias, seed)
    x32, w32, b32 = (t.detach().float().requires_grad_(True) for t in (x, w, bias))
    got = derivatives(lambda: task_conv2d(x32, w32, b32, b, s, p, impl), x32, w32, b32, seed)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert rel(a, r) < FP32_RTOL, f"{impl} term {i}: {rel(a, r):.3e} (seed {seed})"


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_expanded_weights_and_no_bias(impl):
    """At inner step 0 the fast weights are the meta-weights broadcast over tasks (an expanded view)."""
    x, w, bias, b, s, p = make_inputs((3, 3, 2, 4, 6, 3, 1, 1), torch.float64, 3)
    shared = w[0].detach().clone().requires_grad_(True)
    expanded = shared.unsqueeze(0).expand(b, *shared.shape)
    out = task_conv2d(x, expanded, None, b, s, p, impl)
    ref = per_task_reference(x, expanded.contiguous(), torch.zeros(b, w.shape[1], dtype=x.dtype), b, s, p)
    assert rel(out, ref) < FP64_RTOL
    g = torch.autograd.grad(out.square().sum(), shared)[0]
    g_ref = torch.autograd.grad(ref.square().sum(), shared)[0]
    assert rel(g, g_ref) < FP64_RTOL


def test_bad_inputs_name_the_cause():
    x, w, bias, b, s, p = make_inputs((2, 2, 3, 4, 6, 3, 1, 1), torch.float32, 0)
    with pytest.raises(ValueError, match="x must be 4-D"):
        task_conv2d(x[0], w, bias, b)
    with pytest.raises(ValueError, match="weight must be 5-D"):
        task_conv2d(x, w[0], bias, b)
    with pytest.raises(ValueError, match="task rows but num_tasks=3"):
        task_conv2d(x, w, bias, 3)
    with pytest.raises(ValueError, match="expected num_tasks\\*Cin"):
        task_conv2d(x[:, :5], w, bias, b)
    with pytest.raises(ValueError, match="bias must be"):
        task_conv2d(x, w, bias[:, :2], b)
    with pytest.raises(ValueError, match="unknown impl 'winograd'"):
        task_conv2d(x, w, bias, b, impl="winograd")
    with pytest.raises(ValueError, match="unknown pattern"):
        task_conv2d(x, w, bias, b, pattern="third_order")
    with pytest.raises(ValueError, match=r"weight \(torch.float64, cpu\) must match x \(torch.float32, cpu\)"):
        task_conv2d(x, w.double(), bias, b)
    with pytest.raises(ValueError, match="bias .* must match x"):
        task_conv2d(x, w, bias.double(), b)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        task_conv2d(x.long(), w, bias, b)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(RuntimeError, match="impl 'triton'"):
            task_conv2d(x, w, bias, b, impl="triton")


@pytest.mark.parametrize("cin,expected", [(3, "grouped"), (1, "unfold")])
def test_auto_off_cuda_is_a_fixed_rule(cin, expected):
    x, w, bias, b, s, p = make_inputs((3, 2, cin, 4, 9, 3, 1, 1), torch.float32, 11)
    assert C.choose_conv_impl(tuple(x.shape), tuple(w.shape), s, p, x.dtype, x.device) == expected
    assert torch.equal(task_conv2d(x, w, bias, b, s, p, "auto"), task_conv2d(x, w, bias, b, s, p, expected))
    assert C.conv_choices() == {}  # nothing timed, nothing cached


def test_time_conv_impls_reports_every_impl_and_failures(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setitem(C._IMPLS, "per_task", broken)
    times = C.time_conv_impls((4, 4, 6, 6), (2, 3, 2, 3, 3), 1, 1, torch.float32, "cpu", reps=1, warmup=0,
                              input_grad=False)
    assert set(times) == set(CPU_IMPLS)  # triton needs a GPU (or the interpreter): not a candidate here
    assert times["per_task"] is None
    assert all(isinstance(times[k], float) and times[k] > 0 for k in CPU_IMPLS if k != "per_task")
    assert C.fastest(times) == min((k for k in times if times[k] is not None), key=times.get)
    assert C.fastest({"unfold": None, "grouped": None}) == "grouped"
    assert C.fastest({"unfold": 1.0, "grouped": 2.0, "per_task": None}) == "unfold"
