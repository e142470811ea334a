// pybind11 module mamlpp_fast._C: the five functions of mamlpp_fast.ops.backend.BackendFunctions
// (the contract; their Python signatures: mamlpp_fast/_C.pyi), plain tensors in and out (no autograd
// inside); input errors raise RuntimeError. mamlpp_fast/_native.py loads it as the "native" backend;
// the formulas are in kernels/bn_math.h and csrc/per_step_bn.cpp.
#include <torch/extension.h>

#include <stdexcept>

#include "ops.h"

namespace {
// Input errors (TORCH_CHECK -> c10::Error) leave as RuntimeError carrying the message without the C++
// backtrace; converting here keeps the Python side independent of how torch renders c10::Error.
template <typename F>
auto rethrow_plain(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mamlpp_fast native ops: per-step batch norm + leaky ReLU (fwd, bwd, double bwd), LSLR";
  namespace py = pybind11;
  using at::Tensor;
  using OptT = std::optional<Tensor>;
  m.def(
      "bn_forward",
      [](const Tensor& x, const Tensor& g, const Tensor& b, int64_t T, double eps, double slope) {
        return rethrow_plain([&] { return mamlpp::bn_forward(x, g, b, T, eps, slope); });
      },
      "y, mean, invstd = per-step BN + leaky ReLU forward", py::arg("x"), py::arg("gamma"),
      py::arg("beta"), py::arg("num_tasks"), py::arg("eps"), py::arg("slope"));
  m.def(
      "bn_backward",
      [](const Tensor& dy, const Tensor& x, const Tensor& g, const Tensor& b, const Tensor& mean,
         const Tensor& invstd, int64_t T, double slope) {
        return rethrow_plain(
            [&] { return mamlpp::bn_backward(dy, x, g, b, mean, invstd, T, slope); });
      },
      "dx, dgamma, dbeta", py::arg("dy"), py::arg("x"), py::arg("gamma"), py::arg("beta"),
      py::arg("mean"), py::arg("invstd"), py::arg("num_tasks"), py::arg("slope"));
  m.def(
      "bn_double_backward",
      [](const OptT& ggx, const OptT& gggamma, const OptT& ggbeta, const Tensor& dy, const Tensor& x,
         const Tensor& g, const Tensor& b, const Tensor& mean, const Tensor& invstd, int64_t T,
         double slope) {
        return rethrow_plain([&] {
          return mamlpp::bn_double_backward(ggx, gggamma, ggbeta, dy, x, g, b, mean, invstd, T,
                                            slope);
        });
      },
      "gx, ggamma, gdy (ggx / gggamma / ggbeta may be None)", py::arg("ggx"), py::arg("gggamma"),
      py::arg("ggbeta"), py::arg("dy"), py::arg("x"), py::arg("gamma"), py::arg("beta"),
      py::arg("mean"), py::arg("invstd"), py::arg("num_tasks"), py::arg("slope"));
  m.def(
      "lslr_forward",
      [](const std::vector<Tensor>& th, const std::vector<Tensor>& gr, const std::vector<Tensor>& al,
         int64_t step) {
        return rethrow_plain([&] { return mamlpp::lslr_forward(th, gr, al, step); });
      },
      "out[l] = thetas[l] - alphas[l][step] * grads[l]", py::arg("thetas"), py::arg("grads"),
      py::arg("alphas"), py::arg("step"));
  m.def(
      "lslr_backward",
      [](const std::vector<OptT>& douts, const std::vector<Tensor>& gr, const std::vector<Tensor>& al,
         int64_t step, const std::vector<bool>& shared) {
        return rethrow_plain([&] { return mamlpp::lslr_backward(douts, gr, al, step, shared); });
      },
      "(dthetas, dgrads, dalphas); douts[l] may be None (= zeros)", py::arg("douts"),
      py::arg("grads"), py::arg("alphas"), py::arg("step"), py::arg("shared"));
  m.def("cuda_built", &mamlpp::cuda_built, "True when the CUDA kernels were compiled in");
  m.def("cuda_arch", &mamlpp::cuda_arch, "CUDA architectures compiled in (e.g. '90'), '' if none");
}
