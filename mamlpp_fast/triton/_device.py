"""Device facts of the Triton kernels' launch heuristics (a leaf module: the kernel modules import it,
and the package's __init__ re-exports it, so that no module of triton/ imports its own package)."""
from __future__ import annotations

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
