"""Triton backend of the per-step batch norm and LSLR ops: the five functions of
`mamlpp_fast.ops.backend.BackendFunctions` (the contract) at module level.

    from mamlpp_fast import triton as tb
    if tb.is_available():
        y, mean, invstd = tb.bn_forward(x, gamma, beta, num_tasks, eps, slope)

Particular to this backend: ``lslr_backward`` also accepts None in douts (= zeros), and its dalphas[l]
are row views of one (L, S+1) tensor. Kernel layout: per_step_bn.py, lslr.py (same symbols as
kernels/bn_math.h).

The kernel modules (and triton) are imported on first use, so that TRITON_INTERPRET=1 takes effect
whenever it is set before that first call. is_available() is True only when triton imports and a CUDA
device is present, or TRITON_INTERPRET=1 (then the kernels run on CPU tensors, slowly: tests only).
"""
from __future__ import annotations

from ._device import _interpret, num_sms  # noqa: F401 (re-exported; the kernel modules import _device)

__all__ = ["is_available", "unavailable_reason", "num_sms", "bn_forward", "bn_backward", "bn_double_backward",
           "lslr_forward", "lslr_backward"]

_reason = None


def is_available() -> bool:
    """True when triton imports and (a CUDA device is present, or TRITON_INTERPRET=1)."""
    global _reason
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        _reason = f"triton does not import: {type(exc).__name__}: {exc}"
        return False
    if _interpret():
        return True
    import torch

    if torch.cuda.is_available():
        return True
    _reason = "no CUDA device (and TRITON_INTERPRET is not set)"
    return False


def unavailable_reason():
    """Why is_available() returned False (None if it did not)."""
    return _reason


def bn_forward(x, gamma, beta, num_tasks, eps, slope):
    from .per_step_bn import bn_forward as f

    return f(x, gamma, beta, num_tasks, eps, slope)


def bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks, slope):
    from .per_step_bn import bn_backward as f

    return f(dy, x, gamma, beta, mean, invstd, num_tasks, slope)


def bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope):
    from .per_step_bn import bn_double_backward as f

    return f(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope)


def lslr_forward(thetas, grads, alphas, step):
    from .lslr import lslr_forward as f

    return f(thetas, grads, alphas, step)


def lslr_backward(douts, grads, alphas, step, shared):
    from .lslr import lslr_backward as f

    return f(douts, grads, alphas, step, shared)
