"""Loader of the compiled extension ``mamlpp_fast._C`` (C++ CPU ops and, when built so, CUDA kernels).

Used by the backend registry (``mamlpp_fast.ops.backend``)::

    from mamlpp_fast import _native
    _native.available_backends()   # subset of {"cpp", "cuda"}; empty when _C did not load
    _native.get("cuda")            # object with the 5 backend functions
    _native.load_error()           # why _C did not load (for the one fallback warning), else None

The 5 functions (docs/DESIGN.md, "Backend functions"), plain tensors in and out, no autograd:
    bn_forward(x, gamma, beta, num_tasks, eps, slope) -> (y, mean, invstd)
    bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks, slope) -> (dx, dgamma, dbeta)
    bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope)
        -> (gx, ggamma, gdy)                  # ggx / gggamma / ggbeta may be None (= zeros)
    lslr_forward(thetas, grads, alphas, step) -> list
    lslr_backward(douts, grads, alphas, step, shared) -> (dthetas, dgrads, dalphas)
lslr_backward always returns all three lists in full (the caller ignores what it does not need);
douts[l] may be None (= zeros); for a per-task theta dthetas[l] IS douts[l] (no copy).
Formulas: kernels/bn_math.h and csrc/per_step_bn.cpp, csrc/lslr.cpp.

"cpp" takes CPU tensors, "cuda" CUDA tensors; both call the same functions of ``_C``, which dispatch on
the device of their inputs and raise (RuntimeError naming the argument) on anything else.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

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

_FUNCTIONS = ("bn_forward", "bn_backward", "bn_double_backward", "lslr_forward", "lslr_backward")


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


def available_backends() -> List[str]:
    """Subset of ["cpp", "cuda"]: cpp when _C loaded; cuda when it has the kernels and a GPU is there."""
    if _C is None:
        return []
    names = ["cpp"]
    if _C.cuda_built():
        import torch

        if torch.cuda.is_available():
            names.append("cuda")
    return names


class NativeBackend:
    """The 5 backend functions of ``_C`` for one device type ("cpp" -> cpu, "cuda" -> cuda)."""

    def __init__(self, name: str):
        self.name = name
        self.device_type = "cpu" if name == "cpp" else "cuda"
        for fn in _FUNCTIONS:
            setattr(self, fn, getattr(_C, fn))

    def __repr__(self) -> str:
        return f"NativeBackend({self.name!r}, built with {built_with()})"


_cache = {}


def get(name: str) -> NativeBackend:
    """Backend object for "cpp" or "cuda"; raises RuntimeError when that backend is unavailable."""
    if name not in ("cpp", "cuda"):
        raise ValueError(f"unknown native backend {name!r} (expected 'cpp' or 'cuda')")
    if _C is None:
        raise RuntimeError(f"mamlpp_fast._C is not available ({_error}); build it with "
                           f"`pip install --no-build-isolation .` (README.md, section Installing)")
    if name not in available_backends():
        why = ("_C was built without CUDA" if not _C.cuda_built() else "no CUDA device is visible")
        raise RuntimeError(f"native backend 'cuda' is not available: {why}")
    if name not in _cache:
        _cache[name] = NativeBackend(name)
    return _cache[name]
