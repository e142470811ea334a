"""Loader of the compiled extension ``mamlpp_fast._C``: the ``native`` backend of the ops.

Importing ``_C`` registers its kernels with PyTorch's dispatcher as ``torch.ops.mamlpp.native_*``
(csrc/extension.cpp: the five functions of `mamlpp_fast.ops.backend.BackendFunctions`, the contract,
for the CPU dispatch key and, when compiled in, the CUDA key, so the dispatcher routes each call by
the device of its tensors); this module wraps them as the backend's five functions (`NativeFunctions`); their fake implementations are registered by
`mamlpp_fast.ops.library`. Used by the backend registry (`mamlpp_fast.ops.backend`)::

    from mamlpp_fast import _native
    _native.device_types()   # ("cpu",) or ("cpu", "cuda") as compiled; () when _C did not load
    _native.get()            # the five functions (RuntimeError when _C did not load)
    _native.load_error()     # why _C did not load (for the one warning), else None
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

_C = None
_error: Optional[str] = None
try:  # never let a missing or broken build break `import mamlpp_fast`
    from . import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # ImportError, or OSError from a library that does not load
    _C = None
    _error = f"{type(exc).__name__}: {exc}"
    # setup.py records here why it did not build _C (a failed build, or MAMLPP_NO_NATIVE)
    try:
        _note = Path(__file__).with_name("_native_build.txt").read_text().strip()
    except OSError:
        _note = ""
    if _note:
        _error += f"; {_note}"


def is_loaded() -> bool:
    """True when ``mamlpp_fast._C`` imported."""
    return _C is not None


def load_error() -> Optional[str]:
    """Why ``mamlpp_fast._C`` did not import (None when it did), with the install's own record of why
    it was not built when there is one."""
    return _error


def cuda_built() -> bool:
    """True when ``_C`` holds the CUDA kernels (built with nvcc against a CUDA build of torch)."""
    return _C is not None and bool(_C.cuda_built())


def built_with() -> str:
    """What ``_C`` was built with, e.g. 'cpu, cuda sm_90'; 'not built' when it did not load."""
    if _C is None:
        return "not built"
    arch = _C.cuda_arch()
    return "cpu" + (", cuda sm_" + arch.replace(",", "/sm_") if _C.cuda_built() else "")


def device_types() -> Tuple[str, ...]:
    """The device types ``_C`` was compiled for: ("cpu",), ("cpu", "cuda"), or () when it did not load.
    (Whether a GPU is visible is the registry's question, not this one.)"""
    if _C is None:
        return ()
    return ("cpu", "cuda") if _C.cuda_built() else ("cpu",)


class NativeFunctions:
    """The five functions of `BackendFunctions` on the registered kernels ``torch.ops.mamlpp.native_*``
    (signatures: their schemas in csrc/extension.cpp). One thing is adapted: a registered op's results
    may not alias its inputs, so the kernel returns a per-task dthetas[l] (which is douts[l] itself) as
    an empty tensor, and `lslr_backward` puts douts[l] back in its place."""

    @staticmethod
    def bn_forward(x, gamma, beta, num_tasks: int, eps: float, slope: float):
        return _ops().native_bn_forward(x, gamma, beta, num_tasks, eps, slope)

    @staticmethod
    def bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks: int, slope: float):
        return _ops().native_bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks, slope)

    @staticmethod
    def bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks: int,
                           slope: float):
        return _ops().native_bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd,
                                                num_tasks, slope)

    @staticmethod
    def lslr_forward(thetas: Sequence, grads: Sequence, alphas: Sequence, step: int) -> List:
        return _ops().native_lslr_forward(list(thetas), list(grads), list(alphas), step)

    @staticmethod
    def lslr_backward(douts: Sequence, grads: Sequence, alphas: Sequence, step: int, shared: Sequence[bool]):
        dthetas, dgrads, dalphas = _ops().native_lslr_backward(list(douts), list(grads), list(alphas), step,
                                                               list(shared))
        dthetas = [t if (s or d is None or t.numel()) else d for d, s, t in zip(douts, shared, dthetas)]
        return dthetas, dgrads, dalphas


def _ops():
    import torch

    return torch.ops.mamlpp


def get() -> NativeFunctions:
    """The native backend's five functions (`NativeFunctions`); RuntimeError when ``_C`` did not load."""
    if _C is None:
        raise RuntimeError(f"mamlpp_fast._C is not available ({_error}); build it with "
                           f"`pip install --no-build-isolation .` (README.md, section Installing)")
    return NativeFunctions
