"""Choice of the backend that runs the custom ops (`per_step_batch_norm`, `lslr_update`).

Every backend implements the five functions of docs/DESIGN.md, "Backend functions"::

    bn_forward(x, gamma, beta, num_tasks, eps, slope) -> (y, mean, invstd)
    bn_backward(dy, x, gamma, beta, mean, invstd, num_tasks, slope) -> (dx, dgamma, dbeta)
    bn_double_backward(ggx, gggamma, ggbeta, dy, x, gamma, beta, mean, invstd, num_tasks, slope)
        -> (gx, ggamma, gdy)
    lslr_forward(thetas, grads, alphas, step) -> list
    lslr_backward(douts, grads, alphas, step, shared) -> (dthetas, dgrads, dalphas)

Backends and where they come from:

- ``torch``: pure PyTorch, in this package (`per_step_bn`, `lslr`); any device; the reference.
- ``cpp`` (CPU tensors) and ``cuda`` (CUDA tensors): `mamlpp_fast._native`, which exposes
  ``available_backends()`` (a subset of {"cpp", "cuda"}) and ``get(name)``.
- ``triton`` (CUDA tensors): `mamlpp_fast.triton`, which exposes ``is_available()`` and the five
  functions at module level.

Optional extension of the contract: a backend whose implementation object has a true attribute
``accepts_needs`` also receives a keyword ``needs`` in ``bn_backward``, ``bn_double_backward`` and
``lslr_backward`` saying which results are wanted (see those functions in the torch backend); the
autograd wrappers pass it only to such backends, and drop unwanted results of the others.

Which backend runs (`get_backend`):

1. the requested name is the ``name`` argument (the ops' ``backend=``), else the name given to
   `set_backend` (the config key ``backend``), else the environment variable ``MAMLPP_BACKEND``, else
   ``"auto"``. ``"auto"`` means "no preference": it defers to the next source in that list.
2. ``auto`` picks, for the device of the tensors: CUDA tensors: ``cuda`` (when the extension has it)
   > ``triton`` > ``torch``; CPU tensors: ``cpp`` > ``torch``; other devices: ``torch``.
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

import torch

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "Backend",
    "BackendFallbackWarning",
    "available_backends",
    "clear_cache",
    "get_backend",
    "set_backend",
]

BACKEND_NAMES = ("auto", "cuda", "triton", "cpp", "torch")
ENV_VAR = "MAMLPP_BACKEND"
FUNCTIONS = ("bn_forward", "bn_backward", "bn_double_backward", "lslr_forward", "lslr_backward")

# Device types each concrete backend can take (None: any device).
_DEVICE_TYPES = {"cuda": ("cuda",), "triton": ("cuda",), "cpp": ("cpu",), "torch": None}
# Preference of "auto", per device type; "torch" ends every list and always loads.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

_PKG = __name__.rsplit(".", 2)[0]  # "mamlpp_fast"
logger = logging.getLogger("mamlpp_fast")


class BackendFallbackWarning(UserWarning):
    """A requested backend could not be used; another one runs instead."""


class Backend:
    """A loaded backend: its name, the devices it takes, and the five backend functions."""

    __slots__ = ("name", "device_types", "accepts_needs") + FUNCTIONS

    def __init__(self, name, impl, device_types=None, accepts_needs=False):
        self.name = name
        self.device_types = device_types
        self.accepts_needs = bool(accepts_needs)
        missing = [f for f in FUNCTIONS if not callable(getattr(impl, f, None))]
        if missing:
            raise AttributeError(f"backend {name!r} lacks {', '.join(missing)}")
        for f in FUNCTIONS:
            setattr(self, f, getattr(impl, f))

    def supports(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types

    def __repr__(self):
        return f"Backend({self.name!r})"


_lock = threading.Lock()
_configured: str | None = None              # set_backend
_loaded: dict = {}                          # name -> (Backend | None, reason | None)
_resolved: dict = {}                        # (requested, device_type) -> Backend
_native_missing: str | None = None          # why the compiled extension did not load, once known
_native_warned = False                      # the one "no compiled extension" warning was given


def _normalize(name) -> str:
    return str(name).strip().lower()


def _load_torch():
    from . import torch_backend

    return Backend("torch", torch_backend, None, accepts_needs=True)


def _load_native(name):
    global _native_missing
    try:
        native = importlib.import_module(f"{_PKG}._native")
    except Exception as exc:  # ImportError, or a broken install
        _native_missing = f"{_PKG}._native cannot be imported: {type(exc).__name__}: {exc}"
        raise
    if name == "cuda" and not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    built = list(native.available_backends())
    if name not in built:
        error = getattr(native, "load_error", lambda: None)()
        if error:
            _native_missing = error
            return None, f"the compiled extension {_PKG}._C did not load: {error}"
        return None, f"the compiled extension {_PKG}._C has no {name!r} backend (available: {built})"
    impl = native.get(name)
    return Backend(name, impl, _DEVICE_TYPES[name], getattr(impl, "accepts_needs", False)), None


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
    return Backend("triton", mod, devices, getattr(mod, "accepts_needs", False)), None


def _load(name):
    """(Backend or None, reason) for a concrete backend name; cached. Call with _lock held."""
    if name in _loaded:
        return _loaded[name]
    try:
        if name == "torch":
            result = (_load_torch(), None)
        elif name in ("cpp", "cuda"):
            result = _load_native(name)
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
    backend, reason = _load(requested)
    if backend is not None:
        if backend.supports(device_type):
            return backend, None
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
        name: "auto", "cuda", "triton", "cpp", "torch", a `Backend`, or None (then `set_backend`'s
            name, else ``$MAMLPP_BACKEND``, else "auto"). An unknown name given here raises ValueError;
            an unknown name from the environment warns and falls back.
        device: a torch.device, a device string or a tensor whose device counts; None: "cuda" when
            torch sees a GPU, else "cpu".

    Returns a `Backend` with the five backend functions as attributes.
    """
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


def _warn_native_missing(backend, device_type):
    """One warning per process when auto would have used the compiled extension for these tensors but
    it did not load (a failed or skipped native build): it names the cause and the backend used."""
    global _native_warned
    native_first = _AUTO_ORDER.get(device_type, ("torch",))[0] in ("cpp", "cuda")
    if _native_warned or _native_missing is None or not native_first or backend.name in ("cpp", "cuda"):
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
    """Set the process-wide backend name (the config key ``backend``); returns the previous setting.

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
        for name in ("cuda", "triton", "cpp", "torch"):
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
