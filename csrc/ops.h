// Entry points of mamlpp_fast._C: the five functions of mamlpp_fast.ops.backend.BackendFunctions,
// the one written contract (shapes, None conventions); only what is particular to C++ is said here.
// Each dispatches on the device of its main input (CPU: ATen loops in this directory; CUDA: the
// launchers of kernels/*.cu) and checks its inputs with TORCH_CHECK messages that name the function,
// the argument and the offending sizes / dtypes / devices.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace mamlpp {

using at::Tensor;

// x contiguous float32/float64.
std::tuple<Tensor, Tensor, Tensor> bn_forward(const Tensor& x, const Tensor& gamma,
                                              const Tensor& beta, int64_t num_tasks, double eps,
                                              double slope);

std::tuple<Tensor, Tensor, Tensor> bn_backward(const Tensor& dy, const Tensor& x, const Tensor& gamma,
                                               const Tensor& beta, const Tensor& mean,
                                               const Tensor& invstd, int64_t num_tasks, double slope);

std::tuple<Tensor, Tensor, Tensor> bn_double_backward(
    const std::optional<Tensor>& ggx, const std::optional<Tensor>& gggamma,
    const std::optional<Tensor>& ggbeta, const Tensor& dy, const Tensor& x, const Tensor& gamma,
    const Tensor& beta, const Tensor& mean, const Tensor& invstd, int64_t num_tasks, double slope);

std::vector<Tensor> lslr_forward(const std::vector<Tensor>& thetas, const std::vector<Tensor>& grads,
                                 const std::vector<Tensor>& alphas, int64_t step);

// douts[l] may also be None (= zeros); conventions of the results: csrc/lslr.cpp.
std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> lslr_backward(
    const std::vector<std::optional<Tensor>>& douts, const std::vector<Tensor>& grads,
    const std::vector<Tensor>& alphas, int64_t step, const std::vector<bool>& shared);

bool cuda_built();
std::string cuda_arch();

}  // namespace mamlpp
