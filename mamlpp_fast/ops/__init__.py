"""Custom autograd ops of the fast learner and the choice of the backend that runs them.

- `per_step_batch_norm(x, gamma, beta, num_tasks, eps=1e-5, slope=0.01, backend=None)
  -> (y, mean, invstd)`: batch norm per (task, channel) fused with leaky ReLU, twice differentiable.
- `lslr_update(thetas, grads, alphas, step, backend=None) -> list`: the LSLR inner-loop step for all
  adapted tensors at once.
- `task_conv2d(x, weight, bias, num_tasks, stride, padding, impl)`: the convolution of every task with
  its own weights, by one of several implementations (`mamlpp_fast.ops.conv`).
- `BackendFunctions` (the backend contract), `get_backend`, `set_backend`, `available_backends`,
  `clear_cache`: see `mamlpp_fast.ops.backend`.
- The public ops run the backend functions registered with PyTorch's dispatcher as
  ``torch.ops.mamlpp.*`` (`mamlpp_fast.ops.library`), with fake implementations and registered
  derivatives; the compiled extension adds its kernels as ``torch.ops.mamlpp.native_*``.
"""
from .backend import (BACKEND_NAMES, Backend, BackendFallbackWarning, BackendFunctions, available_backends,
                      clear_cache, get_backend, set_backend)
from .conv import CONV_IMPLS, task_conv2d
from .lslr import lslr_update
from .per_step_bn import per_step_batch_norm

__all__ = [
    "BACKEND_NAMES",
    "CONV_IMPLS",
    "Backend",
    "BackendFallbackWarning",
    "BackendFunctions",
    "available_backends",
    "clear_cache",
    "get_backend",
    "lslr_update",
    "per_step_batch_norm",
    "set_backend",
    "task_conv2d",
]
