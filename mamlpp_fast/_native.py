"""Loader of the compiled extension ``mamlpp_fast._C``: the ``native`` backend of the ops.

``_C`` holds the five functions of `mamlpp_fast.ops.backend.BackendFunctions` (the contract; Python
signatures in ``mamlpp_fast/_C.pyi``). They dispatch on the device of their inputs (C++ loops in
csrc/ for CPU tensors, the kernels of kernels/*.cu for CUDA tensors when compiled in) and raise
RuntimeError naming the argument on anything else. Used by the backend registry
(`mamlpp_fast.ops.backend`)::

    from mamlpp_fast import _native
    _native.device_types()   # ("cpu",) or ("cpu", "cuda") as compiled; () when _C did not load
    _native.get()            # the module _C (RuntimeError when it did not load)
    _native.load_error()     # why _C did not load (for the one warning), else None
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

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


def get():
    """The module ``_C`` (the native backend's functions); RuntimeError when it did not load."""
    if _C is None:
        raise RuntimeError(f"mamlpp_fast._C is not available ({_error}); build it with "
                           f"`pip install --no-build-isolation .` (README.md, section Installing)")
    return _C
