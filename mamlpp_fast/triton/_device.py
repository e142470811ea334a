"""Device facts of the Triton kernels' launch heuristics (a leaf module: the kernel modules import it,
and the package's __init__ re-exports it, so that no module of triton/ imports its own package)."""
from __future__ import annotations

import contextlib
import functools
import os


def _interpret() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1: the kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device) -> int:
    """Multiprocessors of a CUDA device (cached; used by the kernels' launch heuristics)."""
    return _sm_count(device.index if device.index is not None else 0)


_PRECISION = [None]  # the forced input precision of the Triton products, None: follow allow_tf32
PRECISIONS = ("ieee", "tf32", "tf32x3")


def conv_precision() -> str | None:
    """The input precision forced on the Triton convolution and fused-block products (float32 inputs),
    or None: "tf32" when torch.backends.cudnn.allow_tf32 is on, else "ieee" (strict float32)."""
    return _PRECISION[0]


@contextlib.contextmanager
def forced_conv_precision(mode: str | None):
    """Force `mode` ("ieee", "tf32", "tf32x3" or None) for the launches made inside the block (config key
    conv_precision; the learner sets it around each iteration, with the rest of its numerics)."""
    if mode is not None and mode not in PRECISIONS:
        raise ValueError(f"conv precision must be one of {PRECISIONS} or None, got {mode!r}")
    old = _PRECISION[0]
    _PRECISION[0] = mode
    try:
        yield
    finally:
        _PRECISION[0] = old
