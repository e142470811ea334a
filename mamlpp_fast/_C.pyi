# Type stub of the compiled extension mamlpp_fast._C (csrc/extension.cpp): the native backend.
# The five functions are those of mamlpp_fast.ops.backend.BackendFunctions (the one written contract:
# shapes, None conventions, formulas); here only their Python signatures. They dispatch on the device
# of their inputs (CPU: csrc/*.cpp; CUDA: kernels/*.cu when compiled in), take float32/float64
# tensors and raise RuntimeError naming the argument for anything else. No autograd inside.
from typing import List, Optional, Sequence, Tuple

from torch import Tensor

def bn_forward(x: Tensor, gamma: Tensor, beta: Tensor, num_tasks: int, eps: float,
               slope: float) -> Tuple[Tensor, Tensor, Tensor]: ...
def bn_backward(dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                num_tasks: int, slope: float) -> Tuple[Tensor, Tensor, Tensor]: ...
def bn_double_backward(ggx: Optional[Tensor], gggamma: Optional[Tensor], ggbeta: Optional[Tensor],
                       dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                       num_tasks: int, slope: float) -> Tuple[Tensor, Tensor, Tensor]: ...
def lslr_forward(thetas: Sequence[Tensor], grads: Sequence[Tensor], alphas: Sequence[Tensor],
                 step: int) -> List[Tensor]: ...
# douts[l] may also be None (= zeros) here, beyond the contract.
def lslr_backward(douts: Sequence[Optional[Tensor]], grads: Sequence[Tensor], alphas: Sequence[Tensor],
                  step: int, shared: Sequence[bool]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]: ...
def cuda_built() -> bool:
    """True when the CUDA kernels were compiled in."""
def cuda_arch() -> str:
    """The CUDA architectures compiled in, e.g. '90' or '80,90'; '' when none."""
