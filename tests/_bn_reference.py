"""Float64 reference of the per-step BN + leaky ReLU op and of LSLR, built from stock torch autograd.

Independent of every backend: forward is ``F.batch_norm(training=True)`` over the (N, T*C, H, W) layout
(per-task gamma/beta repeated / flattened to T*C channels, so a shared gamma gets its gradient summed
over tasks by autograd) followed by ``F.leaky_relu``; backward is ``torch.autograd.grad``; the double
backward differentiates the backward (``create_graph=True``): its outputs are the gradients of
``<u, dx> + <u_gamma, dgamma> + <u_beta, dbeta>`` w.r.t. x, gamma and dy.

Also: ``compare`` (worst element and mean difference in the message), ``make_bn_inputs``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ref_forward", "ref_backward", "ref_double_backward", "ref_lslr_forward",
           "ref_lslr_backward", "make_bn_inputs", "compare", "max_rel_err"]


def _affine_per_channel(gamma, beta, num_tasks):
    """(C,) -> repeated T times; (T, C) -> flattened: one weight per channel t*C + c."""
    if gamma.dim() == 1:
        return gamma.repeat(num_tasks), beta.repeat(num_tasks)
    return gamma.reshape(-1), beta.reshape(-1)


def _forward_graph(x, gamma, beta, num_tasks, eps, slope):
    w, b = _affine_per_channel(gamma, beta, num_tasks)
    z = F.batch_norm(x, None, None, w, b, training=True, momentum=0.0, eps=eps)
    return F.leaky_relu(z, slope)


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def ref_forward(x, gamma, beta, num_tasks, eps=1e-5, slope=0.01):
    """(y, mean, invstd) in float64; mean/invstd per channel t*C + c (biased variance)."""
    x, gamma, beta = _f64(x), _f64(gamma), _f64(beta)
    y = _forward_graph(x, gamma, beta, num_tasks, eps, slope)
    dims = (0, 2, 3)
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    return y, mean, 1.0 / torch.sqrt(var + eps)


def ref_backward(dy, x, gamma, beta, num_tasks, eps=1e-5, slope=0.01):
    """(dx, dgamma, dbeta) in float64."""
    x = _f64(x).requires_grad_(True)
    gamma = _f64(gamma).requires_grad_(True)
    beta = _f64(beta).requires_grad_(True)
    y = _forward_graph(x, gamma, beta, num_tasks, eps, slope)
    return tuple(g.detach() for g in torch.autograd.grad(y, (x, gamma, beta), _f64(dy)))


def ref_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, num_tasks, eps=1e-5, slope=0.01):
    """(gx, ggamma, gdy) in float64: gradients of <ggx,dx> + <gggamma,dgamma> + <ggbeta,dbeta>
    w.r.t. x, gamma, dy (None inputs = zeros)."""
    x = _f64(x).requires_grad_(True)
    gamma = _f64(gamma).requires_grad_(True)
    beta = _f64(beta).requires_grad_(True)
    dy = _f64(dy).requires_grad_(True)
    y = _forward_graph(x, gamma, beta, num_tasks, eps, slope)
    dx, dgamma, dbeta = torch.autograd.grad(y, (x, gamma, beta), dy, create_graph=True)
    total = dx.new_zeros(())
    for u, d in ((ggx, dx), (gggamma, dgamma), (ggbeta, dbeta)):
        if u is not None:
            total = total + (_f64(u) * d).sum()
    if not total.requires_grad:  # all of ggx / gggamma / ggbeta None
        return torch.zeros_like(x).detach(), torch.zeros_like(gamma).detach(), torch.zeros_like(dy).detach()
    gx, ggamma, gdy = torch.autograd.grad(total, (x, gamma, dy), allow_unused=True)
    gx = torch.zeros_like(x) if gx is None else gx
    ggamma = torch.zeros_like(gamma) if ggamma is None else ggamma
    gdy = torch.zeros_like(dy) if gdy is None else gdy
    return gx.detach(), ggamma.detach(), gdy.detach()


def ref_lslr_forward(thetas, grads, alphas, step):
    """out[l] = theta - alpha[step] * grad (broadcast over tasks for a shared theta), float64."""
    return [_f64(th).expand_as(g) - _f64(a)[step] * _f64(g) if th.dim() < g.dim()
            else _f64(th) - _f64(a)[step] * _f64(g)
            for th, g, a in zip(thetas, grads, alphas)]


def ref_lslr_backward(douts, grads, alphas, step, shared):
    """(dthetas, dgrads, dalphas) from the formulas, float64."""
    dth, dgr, dal = [], [], []
    for d, g, a, sh in zip(douts, grads, alphas, shared):
        d64, g64, a64 = _f64(d), _f64(g), _f64(a)
        dth.append(d64.sum(0) if sh else d64)
        dgr.append(-a64[step] * d64)
        da = torch.zeros_like(a64)
        da[step] = -(d64 * g64).sum()
        dal.append(da)
    return dth, dgr, dal


def make_bn_inputs(N, T, C, H, W, *, shared=True, dtype=torch.float64, device="cpu", seed=0,
                   x_scale=1.0, x_shift=0.0, kink_margin=None):
    """x (N, T*C, H, W), gamma/beta ((C,) or (T, C)), dy, ggx, gggamma, ggbeta: random, reproducible.
    For dtypes other than float64, x keeps |z| >= kink_margin (default 1e-4) away from the leaky ReLU's
    kink (see _avoid_kink)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(
            dtype=dtype, device=device)

    gshape = (C,) if shared else (T, C)
    x = torch.randn(N, T * C, H, W, generator=gen, dtype=torch.float64) * x_scale + x_shift
    gamma = torch.randn(*gshape, generator=gen, dtype=torch.float64) * 0.5 + 1.0
    beta = torch.randn(*gshape, generator=gen, dtype=torch.float64) * 0.5
    if kink_margin is None:
        kink_margin = 1e-4 if dtype != torch.float64 else 0.0
    if kink_margin > 0:
        x = _avoid_kink(x, gamma, beta, T, kink_margin)
    return dict(
        x=x.to(dtype=dtype, device=device),
        gamma=gamma.to(dtype=dtype, device=device),
        beta=beta.to(dtype=dtype, device=device),
        dy=rnd(N, T * C, H, W),
        ggx=rnd(N, T * C, H, W),
        gggamma=rnd(*gshape),
        ggbeta=rnd(*gshape),
    )


def _avoid_kink(x, gamma, beta, T, margin, eps=1e-5):
    """Moves the few x whose pre-activation z = gamma xhat + beta lies within `margin` of 0 (where the
    leaky ReLU slope a jumps) to |z| = 2 margin, same sign. Near the kink a low-precision z can take
    the other side than the float64 reference, which changes g = a dy by a factor 1/slope at that
    element: a legitimate difference that elementwise comparisons must not see. float64 data."""
    w, b = _affine_per_channel(gamma, beta, T)
    shape = (1, -1, 1, 1)
    for _ in range(4):
        mu = x.mean((0, 2, 3), keepdim=True)
        r = 1.0 / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + eps)
        z = w.view(shape) * (x - mu) * r + b.view(shape)
        near = z.abs() < margin
        if not bool(near.any()):
            break
        target = torch.where(z >= 0, 2 * margin, -2 * margin)
        x_new = mu + (target - b.view(shape)) / (w.view(shape) * r)
        x = torch.where(near, x_new, x)
    return x


def max_rel_err(got, ref):
    """max |got - ref| / max(1, max |ref|) (float64)."""
    got = got.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if ref.numel() == 0:
        return 0.0
    return float((got - ref).abs().max() / max(1.0, float(ref.abs().max())))


def compare(name, got, ref, tol):
    """Assert max |got - ref| <= tol * max(1, max |ref|); the message gives the worst element and
    the mean difference."""
    got64 = got.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    assert got64.shape == ref64.shape, f"{name}: shape {tuple(got64.shape)} != {tuple(ref64.shape)}"
    if ref64.numel() == 0:
        return
    diff = (got64 - ref64).abs()
    scale = max(1.0, float(ref64.abs().max()))
    worst = int(diff.reshape(-1).argmax())
    err = float(diff.reshape(-1)[worst]) / scale
    assert err <= tol, (
        f"{name}: max rel err {err:.3e} > tol {tol:.1e} at flat index {worst} "
        f"(got {float(got64.reshape(-1)[worst]):.10g}, ref {float(ref64.reshape(-1)[worst]):.10g}); "
        f"mean |diff| {float(diff.mean()):.3e}, scale {scale:.3g}")


def check_lslr_layouts(fns, gen, device="cpu"):
    """One backend's LSLR (`fns`: lslr_forward / lslr_backward) on operands in other layouts than
    contiguous, float64, against the formulas: the forward within the roundings of the two ways to
    evaluate it (reference: product, then difference, <= u(|a g| + |theta| + |a g|); a backend that
    fuses them into an FMA: <= u(|theta| + |a g|); u = 2^-53, so |err| <= 2^-52 (|theta| + 2 |a g|)), and
    in the layout of the gradient (forward: grad; backward: dout) when that is dense
    with the task dim outermost, as a weight gradient of the Triton convolutions is ((B, kh, kw, Ci, Co)
    storage of a (B, Co, Ci, kh, kw) tensor). `gen` is a CPU generator; the tensors go to `device`."""
    import torch
    T, S, step = 3, 4, 3
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    fwd_layout = lambda t: t.permute(0, 3, 4, 2, 1).contiguous().permute(0, 4, 3, 1, 2)  # noqa: E731
    shape = (5, 4, 3, 3)
    g_fwd = fwd_layout(rnd(T, *shape))
    g_strided = rnd(T, 5, 8, 3, 3)[:, :, ::2]         # not dense: made contiguous by the backends
    g_task_inner = rnd(*shape, T).permute(4, 0, 1, 2, 3)  # dense, task dim innermost: contiguous too
    grads = [g_fwd, g_fwd, fwd_layout(rnd(T, *shape)), g_strided, g_task_inner]
    thetas = [rnd(*shape), rnd(T, *shape), fwd_layout(rnd(T, *shape)), rnd(*shape), rnd(T, *shape)]
    shared = [th.dim() < g.dim() for th, g in zip(thetas, grads)]
    alphas = [rnd(S + 1) for _ in grads]
    douts = [fwd_layout(rnd(T, *shape)), rnd(T, *shape), fwd_layout(rnd(T, *shape)), g_strided.flip(0),
             rnd(T, *shape)]

    def close(name, got, want, scale):
        err = (got - want).abs()
        assert (err <= 2 ** -52 * scale).all(), f"{name}: off by {err.max():.3e}"

    outs = fns.lslr_forward(thetas, grads, alphas, step)
    for l, (o, r) in enumerate(zip(outs, ref_lslr_forward(thetas, grads, alphas, step))):
        close(f"out[{l}]", o, r, thetas[l].abs() + 2 * (alphas[l][step] * grads[l]).abs())
    for l in (0, 1, 2):  # grads in the forward layout: so are the fast weights, whatever theta's layout
        assert outs[l].stride() == grads[l].stride(), f"out[{l}] strides {outs[l].stride()}"
    dth, dgr, dal = fns.lslr_backward(douts, grads, alphas, step, shared)
    rth, rgr, ral = ref_lslr_backward(douts, grads, alphas, step, shared)
    for l in range(len(grads)):  # margins: two sums of n terms (any orders) differ by <= 2 n u sum |terms|
        d, g = douts[l], grads[l]
        close(f"dtheta[{l}]", dth[l], rth[l], T * d.abs().sum(0) if shared[l] else d.abs())
        close(f"dgrad[{l}]", dgr[l], rgr[l], (alphas[l][step] * d).abs())
        close(f"dalpha[{l}]", dal[l], ral[l], d.numel() * (d * g).abs().sum())
    for l in (0, 2):  # douts in the forward layout: so are the gradients of grad a double backward reads
        assert dgr[l].stride() == douts[l].stride(), f"dgrad[{l}] strides {dgr[l].stride()}"
