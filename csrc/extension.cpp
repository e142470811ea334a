// The compiled extension mamlpp_fast._C. Its kernels are registered with PyTorch's dispatcher as
// torch.ops.mamlpp.native_* (the five functions of mamlpp_fast.ops.backend.BackendFunctions, the
// contract), for the CPU dispatch key and, when compiled with the CUDA kernels, the CUDA key: the
// dispatcher routes a call by the device of its tensors. Plain tensors in and out, no autograd inside
// (the registered ops of mamlpp_fast/ops/library.py hold the derivatives; their fake implementations
// of these kernels are registered there too). Input errors raise RuntimeError naming the argument.
// The Python module itself only says what was compiled in (cuda_built, cuda_arch: mamlpp_fast/_C.pyi);
// mamlpp_fast/_native.py wraps the ops as the "native" backend. Formulas: kernels/bn_math.h and
// csrc/per_step_bn.cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

namespace {
using at::Tensor;
using OptT = std::optional<Tensor>;

std::vector<Tensor> to_vector(at::TensorList ts) { return std::vector<Tensor>(ts.begin(), ts.end()); }

std::vector<Tensor> lslr_forward_op(at::TensorList thetas, at::TensorList grads, at::TensorList alphas,
                                    int64_t step) {
  return mamlpp::lslr_forward(to_vector(thetas), to_vector(grads), to_vector(alphas), step);
}

// A registered op's results may not alias its inputs: the per-task dthetas[l] that the core function
// returns as douts[l] itself come back as 0-element tensors (the Python wrapper of the native backend
// puts douts[l] back in their place, as the contract says).
std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> lslr_backward_op(
    const c10::List<OptT>& douts, at::TensorList grads, at::TensorList alphas, int64_t step,
    const c10::List<bool>& shared) {
  std::vector<OptT> d(douts.begin(), douts.end());
  auto out = mamlpp::lslr_backward(d, to_vector(grads), to_vector(alphas), step,
                                   std::vector<bool>(shared.begin(), shared.end()));
  auto& dthetas = std::get<0>(out);
  for (size_t l = 0; l < dthetas.size(); ++l) {
    if (d[l].has_value() && d[l]->defined() && dthetas[l].is_alias_of(*d[l])) {
      dthetas[l] = at::empty({0}, d[l]->options());
    }
  }
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(mamlpp, m) {
  m.def("native_bn_forward(Tensor x, Tensor gamma, Tensor beta, int num_tasks, float eps, float slope)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("native_bn_backward(Tensor dy, Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor invstd,"
        " int num_tasks, float slope) -> (Tensor, Tensor, Tensor)");
  m.def("native_bn_double_backward(Tensor? ggx, Tensor? gggamma, Tensor? ggbeta, Tensor dy, Tensor x,"
        " Tensor gamma, Tensor beta, Tensor mean, Tensor invstd, int num_tasks, float slope)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("native_lslr_forward(Tensor[] thetas, Tensor[] grads, Tensor[] alphas, int step) -> Tensor[]");
  m.def("native_lslr_backward(Tensor?[] douts, Tensor[] grads, Tensor[] alphas, int step, bool[] shared)"
        " -> (Tensor[], Tensor[], Tensor[])");
}

// The same entry points for both keys: each checks its inputs and launches the loops or kernels of
// its tensors' device (csrc/*.cpp); the dispatcher chooses by device, and a device compiled out has no
// kernel (the dispatcher's own error names the op and the device).
#define MAMLPP_REGISTER_KERNELS(m)                                   \
  m.impl("native_bn_forward", &mamlpp::bn_forward);                  \
  m.impl("native_bn_backward", &mamlpp::bn_backward);                \
  m.impl("native_bn_double_backward", &mamlpp::bn_double_backward);  \
  m.impl("native_lslr_forward", &lslr_forward_op);                   \
  m.impl("native_lslr_backward", &lslr_backward_op)

TORCH_LIBRARY_IMPL(mamlpp, CPU, m) { MAMLPP_REGISTER_KERNELS(m); }

#ifdef MAMLPP_WITH_CUDA
TORCH_LIBRARY_IMPL(mamlpp, CUDA, m) { MAMLPP_REGISTER_KERNELS(m); }
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mamlpp_fast native kernels, registered as torch.ops.mamlpp.native_* (CPU"
#ifdef MAMLPP_WITH_CUDA
            ", CUDA"
#endif
            ")";
  m.def("cuda_built", &mamlpp::cuda_built, "True when the CUDA kernels were compiled in");
  m.def("cuda_arch", &mamlpp::cuda_arch, "CUDA architectures compiled in (e.g. '90'), '' if none");
}
