"""The backend contract of the custom ops (`BackendFunctions`) and the choice of the backend that runs them.

`BackendFunctions` below is the one written contract of the five functions that every backend
implements (the ops' autograd wrappers in `per_step_bn` and `lslr` call them; nothing else restates
it: the compiled extension's Python signatures are in ``mamlpp_fast/_C.pyi``).

Backends and where they come from (a new backend: a module with the five functions, one loader
below, one entry in `_DEVICE_TYPES` and `_AUTO_ORDER`):

- ``torch``: `mamlpp_fast.ops.torch_backend`, pure PyTorch; any device; the reference.
- ``native``: the compiled extension ``mamlpp_fast._C`` (loaded by `mamlpp_fast._native`); its
  functions dispatch on the device of their inputs: C++ loops for CPU tensors, the CUDA kernels for
  CUDA tensors (when built with them and a GPU is visible). The former names ``cpp`` and ``cuda`` are
  accepted as aliases that keep their meaning: ``native`` restricted to CPU, resp. CUDA, tensors.
- ``triton``: `mamlpp_fast.triton` (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1 when asked
  for by name).

Which backend runs (`get_backend`):

1. the requested name is the ``name`` argument (the ops' ``backend=``, which the fast learner sets
   from its config key ``backend``), else the name given to `set_backend` (a process-wide default),
   else the environment variable ``MAMLPP_BACKEND``, else ``"auto"``. ``"auto"`` means "no
   preference": it defers to the next source in that list.
2. ``auto`` picks, for the device of the tensors: CUDA tensors: ``native`` (when the extension has
   the CUDA kernels) > ``triton`` > ``torch``; CPU tensors: ``native`` > ``torch``; other devices:
   ``torch``.
3. A requested backend that cannot load, or cannot take tensors of that device (a CUDA backend is
   never handed CPU tensors), falls back to the ``auto`` choice with exactly one warning
   (`BackendFallbackWarning`) naming the requested backend, the reason and the backend used. The choice
   is logged once (logger ``"mamlpp_fast"``, level INFO) and cached per (requested name, device type).
4. When ``auto`` would have used the compiled extension but it did not load (the native build failed
   or was skipped at install), one warning per process (`BackendFallbackWarning`) names the cause and
   the backend used instead, so that a missing ``_C`` is never silent.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings
from typing import List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "ALIASES",
    "BACKEND_NAMES",
    "ENV_VAR",
    "Backend",
    "BackendFallbackWarning",
    "BackendFunctions",
    "available_backends",
    "backend_key",
    "clear_cache",
    "get_backend",
    "set_backend",
]


@runtime_checkable
class BackendFunctions(Protocol):
    """The five functions of a backend: the contract between the ops and their implementations.

    Plain tensors in and out, no autograd inside (the ops' autograd Functions call them). Layout and
    symbols: the docstrings of `mamlpp_fast.ops.per_step_bn` (batch norm: ``x`` is ``(N, T*C, H, W)``,
    task-major channels, ``T = num_tasks``) and `mamlpp_fast.ops.lslr` (LSLR), which also hold the
    formulas.

    Validation happens once, in the public ops (`per_step_batch_norm`, `lslr_update`): every input they
    accept meets the preconditions below and a dtype the chosen backend takes (`Backend.dtypes`);
    batch norm's ``x`` is contiguous and its gamma and beta have one shape. A backend therefore does not validate user input; the checks the
    compiled and Triton backends keep are internal guards of their raw-memory kernels against direct
    calls (tests, ``torch.ops.mamlpp``), not a second statement of the contract.

    Optional extension: an implementation with a true attribute ``accepts_needs`` also takes a keyword
    ``needs`` in the three backward functions (``bn_backward``/``bn_double_backward``: three booleans,
    one per result; ``lslr_backward``: three lists of booleans, one per tensor) and may return None for
    a result that is not needed; ``lslr_backward`` then also accepts ``grads[l] = None`` where dalpha[l]
    is not needed. The ops pass ``needs`` only to such backends and drop the unwanted results of others.

    Implementations: `mamlpp_fast.ops.torch_backend`, ``mamlpp_fast._C`` (``_C.pyi``),
    `mamlpp_fast.triton` (modules whose functions satisfy this protocol).
    """

    def bn_forward(self, x: Tensor, gamma: Tensor, beta: Tensor, num_tasks: int, eps: float,
                   slope: float) -> Tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, invstd)``: y like x; mean and invstd ``(T*C,)``, float32 for float16/bfloat16 x.
        gamma, beta: both ``(C,)`` (shared by the tasks) or both ``(T, C)`` (the op expands a shared one
        when the other is per task)."""

    def bn_backward(self, dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
                    invstd: Tensor, num_tasks: int, slope: float) -> Tuple[Tensor, Tensor, Tensor]:
        """``(dx, dgamma, dbeta)``: dx like x; dgamma, dbeta shaped like gamma, beta (summed over the
        tasks for a shared ``(C,)`` parameter)."""

    def bn_double_backward(self, ggx: Optional[Tensor], gggamma: Optional[Tensor],
                           ggbeta: Optional[Tensor], dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor,
                           mean: Tensor, invstd: Tensor, num_tasks: int,
                           slope: float) -> Tuple[Tensor, Tensor, Tensor]:
        """``(gx, ggamma, gdy)``, the gradients w.r.t. x, gamma and dy of ``<ggx, dx> + <gggamma,
        dgamma> + <ggbeta, dbeta>``; any of ggx, gggamma, ggbeta may be None (= zeros). The gradient
        w.r.t. beta is identically 0 and is not returned."""

    def lslr_forward(self, thetas: Sequence[Tensor], grads: Sequence[Tensor], alphas: Sequence[Tensor],
                     step: int) -> List[Tensor]:
        """``[thetas[l] - alphas[l][step] * grads[l]]``, each ``(T, *shape_l)``. thetas[l] is
        ``(T, *shape_l)``, or ``shape_l`` (shared, broadcast over the tasks); grads[l] ``(T, *shape_l)``;
        alphas[l] ``(S+1,)``."""

    def lslr_backward(self, douts: Sequence[Tensor], grads: Sequence[Tensor], alphas: Sequence[Tensor],
                      step: int, shared: Sequence[bool]) -> Tuple[list, list, list]:
        """``(dthetas, dgrads, dalphas)``, three lists in full: dthetas[l] = douts[l], summed over the
        tasks when ``shared[l]`` (thetas[l] had no task dimension; a per-task dthetas[l] may be
        douts[l] itself); dgrads[l] = -alphas[l][step] * douts[l]; dalphas[l] zero but for entry
        ``step``, ``-sum(douts[l] * grads[l])``. The ops pass no None in douts."""


FUNCTIONS = tuple(n for n, v in vars(BackendFunctions).items() if callable(v) and not n.startswith("_"))
BACKENDS = ("native", "triton", "torch")            # the concrete backends, in auto's order
ALIASES = {"cpp": ("native", "cpu"), "cuda": ("native", "cuda")}  # former names: native on one device
BACKEND_NAMES = ("auto",) + BACKENDS + tuple(ALIASES)  # every name accepted (config key, env, backend=)
ENV_VAR = "MAMLPP_BACKEND"

# The floating dtypes the compiled and Triton kernels take (the torch backend takes every floating dtype).
_KERNEL_DTYPES = (torch.float32, torch.float64)
# Device types each concrete backend can take (None: any device; "native": from the extension).
_DEVICE_TYPES = {"triton": ("cuda",), "torch": None}
# Preference of "auto", per device type; "torch" ends every list and always loads.
_AUTO_ORDER = {"cuda": ("native", "triton", "torch"), "cpu": ("native", "torch")}

_PKG = __name__.rsplit(".", 2)[0]  # "mamlpp_fast"
logger = logging.getLogger("mamlpp_fast")


class BackendFallbackWarning(UserWarning):
    """A requested backend could not be used; another one runs instead."""


class Backend:
    """A loaded backend: its name, the devices and floating dtypes it takes (None: all), and the five
    functions of `BackendFunctions`."""

    __slots__ = ("name", "device_types", "accepts_needs", "dtypes") + FUNCTIONS

    def __init__(self, name, impl: BackendFunctions, device_types=None, accepts_needs=False, dtypes=None):
        self.name = name
        self.device_types = device_types
        self.accepts_needs = bool(accepts_needs)
        self.dtypes = None if dtypes is None else tuple(dtypes)
        missing = [f for f in FUNCTIONS if not callable(getattr(impl, f, None))]
        if missing:
            raise AttributeError(f"backend {name!r} lacks {', '.join(missing)}")
        for f in FUNCTIONS:
            setattr(self, f, getattr(impl, f))

    def supports(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types

    def check_dtype(self, op: str, what: str, dtype: torch.dtype) -> None:
        """ValueError naming `op` when this backend's kernels do not take `dtype` (the ops call it, so
        that such input is refused at the op, in one line, rather than inside the backend)."""
        if self.dtypes is not None and dtype not in self.dtypes:
            names = " or ".join(str(d).replace("torch.", "") for d in self.dtypes)
            raise ValueError(f"{op}: the {self.name!r} backend takes {names} tensors, got {what} of dtype "
                             f"{str(dtype).replace('torch.', '')} (backend='torch' takes every floating dtype)")

    def __repr__(self):
        return f"Backend({self.name!r})"


_lock = threading.Lock()
_configured: str | None = None              # set_backend
_loaded: dict = {}                          # name -> (Backend | None, reason | None)
_resolved: dict = {}                        # (requested, device_type) -> Backend
_native_missing: str | None = None          # why the compiled extension did not load, once known
_native_warned = False                      # the one "no compiled extension" warning was given
_adhoc: dict = {}                           # backend_key -> a Backend object made outside the registry


def _normalize(name) -> str:
    return str(name).strip().lower()


def _load_torch():
    from . import torch_backend

    return Backend("torch", torch_backend, None, accepts_needs=True)


def _load_native():
    global _native_missing
    try:
        native = importlib.import_module(f"{_PKG}._native")
    except Exception as exc:  # ImportError, or a broken install
        _native_missing = f"{_PKG}._native cannot be imported: {type(exc).__name__}: {exc}"
        raise
    built = tuple(native.device_types())  # the device types _C was compiled for
    devices = tuple(d for d in built if d != "cuda" or torch.cuda.is_available())
    if not devices:
        error = native.load_error()
        _native_missing = error
        return None, f"the compiled extension {_PKG}._C did not load: {error}"
    return Backend("native", native.get(), devices, getattr(native.get(), "accepts_needs", False),
                   dtypes=_KERNEL_DTYPES), None


def _native_device_reason(device_type):
    """Why the loaded native backend does not take `device_type` tensors."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return f"the compiled extension {_PKG}._C was built without the CUDA kernels"
    return f"it takes only {'/'.join(_loaded['native'][0].device_types)} tensors"


def _load_triton():
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreted:
        return None, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1) and torch sees none"
    mod = importlib.import_module(f"{_PKG}.triton")
    if not mod.is_available():
        return None, f"{_PKG}.triton.is_available() is False"
    # Under the Triton interpreter (TRITON_INTERPRET=1, used by the CPU tests) the kernels run on CPU
    # tensors too; it is then usable when asked for by name (auto never picks it for CPU tensors).
    devices = _DEVICE_TYPES["triton"] + (("cpu",) if interpreted else ())
    return Backend("triton", mod, devices, getattr(mod, "accepts_needs", False), dtypes=_KERNEL_DTYPES), None


def _load(name):
    """(Backend or None, reason) for a concrete backend name; cached. Call with _lock held."""
    if name in _loaded:
        return _loaded[name]
    try:
        if name == "torch":
            result = (_load_torch(), None)
        elif name == "native":
            result = _load_native()
        elif name == "triton":
            result = _load_triton()
        else:
            result = (None, f"unknown backend name; choose from {', '.join(BACKEND_NAMES)}")
    except ImportError as exc:
        if name == "torch":
            raise
        result = (None, f"it cannot be imported: {type(exc).__name__}: {exc}")
    except Exception as exc:  # an optional backend that fails to load in any way falls back
        if name == "torch":
            raise
        result = (None, f"loading it failed: {type(exc).__name__}: {exc}")
    _loaded[name] = result
    return result


def _resolve(requested, device_type):
    """(Backend, reason it is not the requested one, or None). Call with _lock held."""
    if requested == "auto":
        for cand in _AUTO_ORDER.get(device_type, ("torch",)):
            backend, _ = _load(cand)
            if backend is not None and backend.supports(device_type):
                return backend, None
        raise RuntimeError("unreachable: the torch backend takes every device")  # pragma: no cover
    name, only = ALIASES.get(requested, (requested, None))
    backend, reason = _load(name)
    if backend is not None:
        if only is not None and device_type != only:
            reason = f"{requested!r} names the {name} backend for {only} tensors only"
        elif backend.supports(device_type):
            return backend, None
        elif name == "native":
            reason = _native_device_reason(device_type)
        else:
            reason = f"it takes only {'/'.join(backend.device_types)} tensors"
    fallback, _ = _resolve("auto", device_type)
    return fallback, reason


def _requested(name) -> str:
    if name is not None:
        n = _normalize(name)
        if n not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
        if n != "auto":
            return n
    if _configured is not None and _configured != "auto":
        return _configured
    env = _normalize(os.environ.get(ENV_VAR, ""))
    return env or "auto"  # an unknown name from the environment warns and falls back in _resolve


def _device_type(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.Tensor):
        return device.device.type
    if isinstance(device, torch.device):
        return device.type
    return torch.device(device).type


def get_backend(name=None, device=None) -> Backend:
    """The backend to run the ops on tensors of `device`.

    Arguments:
        name: "auto", "native", "triton", "torch" (or the aliases "cpp", "cuda"), a `Backend`, or
            None (then `set_backend`'s
            name, else ``$MAMLPP_BACKEND``, else "auto"). An unknown name given here raises ValueError;
            an unknown name from the environment warns and falls back.
        device: a torch.device, a device string or a tensor whose device counts; None: "cuda" when
            torch sees a GPU, else "cpu".

    Returns a `Backend` with the five backend functions as attributes.
    """
    adhoc = _adhoc.get(name) if isinstance(name, str) else None
    if adhoc is not None:
        name = adhoc
    device_type = _device_type(device)
    if isinstance(name, Backend):
        if name.supports(device_type):
            return name
        if name.name not in BACKEND_NAMES:
            raise ValueError(f"backend {name!r} cannot take {device_type} tensors")
        name = name.name  # a registry backend on the wrong device: choose again by name
    requested = _requested(name)
    key = (requested, device_type)
    backend = _resolved.get(key)
    if backend is not None:
        return backend
    with _lock:
        backend = _resolved.get(key)
        if backend is None:
            backend, reason = _resolve(requested, device_type)
            if reason is not None:
                warnings.warn(
                    f"mamlpp_fast: backend {requested!r} cannot be used for {device_type} tensors "
                    f"({reason}); using backend {backend.name!r} instead",
                    BackendFallbackWarning,
                    stacklevel=3,
                )
            elif requested == "auto":
                _warn_native_missing(backend, device_type)
            logger.info("mamlpp_fast ops: backend %r runs %s tensors (requested %r)",
                        backend.name, device_type, requested)
            _resolved[key] = backend
    return backend


def backend_key(backend: Backend) -> str:
    """The name under which `get_backend` finds `backend` again: the ``backend`` argument of the
    registered ops (`mamlpp_fast.ops.library`), which take a name, not an object. A backend of the
    registry is its name; a `Backend` made elsewhere (a test's spy, bench.trace's recorder) is
    remembered under ``name@id`` for the life of the process."""
    if _loaded.get(backend.name, (None,))[0] is backend:
        return backend.name
    key = f"{backend.name}@{id(backend):x}"
    _adhoc[key] = backend
    return key


def loaded_backend(key: str) -> Optional[Backend]:
    """The backend a `backend_key` names (an ad-hoc one, or a loaded one of the registry), else None;
    no resolution, fallback or logging (the registered ops' fast path)."""
    impl = _adhoc.get(key)
    if impl is None:
        impl = _loaded.get(key, (None,))[0]
    return impl


def _warn_native_missing(backend, device_type):
    """One warning per process when auto would have used the compiled extension for these tensors but
    it did not load (a failed or skipped native build): it names the cause and the backend used."""
    global _native_warned
    native_first = _AUTO_ORDER.get(device_type, ("torch",))[0] == "native"
    if _native_warned or _native_missing is None or not native_first or backend.name == "native":
        return
    _native_warned = True
    warnings.warn(
        f"mamlpp_fast: the compiled extension {_PKG}._C is not available ({_native_missing}); the ops "
        f"run on backend {backend.name!r} for {device_type} tensors. Build it with "
        f"`pip install --no-build-isolation .` (README.md, \"Installing\")",
        BackendFallbackWarning,
        stacklevel=4,
    )


def set_backend(name):
    """Set the process-wide default backend name; returns the previous setting. (The fast learner
    does not call it: it passes its config key ``backend`` to the ops; benchmarks and tests do.)

    None or "auto" leave the choice to ``$MAMLPP_BACKEND`` / auto. Raises ValueError for an unknown name.
    """
    global _configured
    if name is not None:
        n = _normalize(name)
        if n not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
        name = n
    with _lock:
        previous, _configured = _configured, name
    return previous


def available_backends(device=None) -> list:
    """Names of the backends that load here, in auto's order of preference ("torch" always last).

    With `device`, only those that take tensors of that device.
    """
    device_type = None if device is None else _device_type(device)
    names = []
    with _lock:
        for name in BACKENDS:
            backend, _ = _load(name)
            if backend is not None and (device_type is None or backend.supports(device_type)):
                names.append(name)
    return names


def clear_cache():
    """Forget loaded and chosen backends (e.g. after building the extension); the next call reloads,
    and warns and logs again."""
    global _native_missing, _native_warned
    with _lock:
        _loaded.clear()
        _resolved.clear()
        _native_missing, _native_warned = None, False
