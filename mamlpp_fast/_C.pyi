# Type stub of the compiled extension mamlpp_fast._C (csrc/extension.cpp). Importing it registers the
# native kernels with PyTorch's dispatcher as torch.ops.mamlpp.native_* (CPU key, and CUDA when compiled
# in); their schemas are in csrc/extension.cpp and their Python wrappers, the five functions of
# mamlpp_fast.ops.backend.BackendFunctions, in mamlpp_fast/_native.py (NativeFunctions). The module
# itself holds only what says how it was built.

def cuda_built() -> bool:
    """True when the CUDA kernels were compiled in."""
def cuda_arch() -> str:
    """The CUDA architectures compiled in, e.g. '90' or '80,90'; '' when none."""
