// Entry points of mamlpp_fast._C (the 5 backend functions of docs/DESIGN.md, "Backend functions").
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

// y, mean, invstd. x: (N, T*C, H, W) contiguous float32/float64; gamma, beta: (C,) or (T, C).
std::tuple<Tensor, Tensor, Tensor> bn_forward(const Tensor& x, const Tensor& gamma,
                                              const Tensor& beta, int64_t num_tasks, double eps,
                                              double slope);

// dx, dgamma, dbeta (dgamma/dbeta shaped like gamma: summed over tasks when gamma is (C,)).
std::tuple<Tensor, Tensor, Tensor> bn_backward(const Tensor& dy, const Tensor& x, const Tensor& gamma,
                                               const Tensor& beta, const Tensor& mean,
                                               const Tensor& invstd, int64_t num_tasks, double slope);

// gx, ggamma, gdy; ggx / gggamma / ggbeta may be None (= zeros).
std::tuple<Tensor, Tensor, Tensor> bn_double_backward(
    const std::optional<Tensor>& ggx, const std::optional<Tensor>& gggamma,
    const std::optional<Tensor>& ggbeta, const Tensor& dy, const Tensor& x, const Tensor& gamma,
    const Tensor& beta, const Tensor& mean, const Tensor& invstd, int64_t num_tasks, double slope);

// out[l] = thetas[l] - alphas[l][step] * grads[l], shape (T, *shape_l).
std::vector<Tensor> lslr_forward(const std::vector<Tensor>& thetas, const std::vector<Tensor>& grads,
                                 const std::vector<Tensor>& alphas, int64_t step);

// (dthetas, dgrads, dalphas); see csrc/lslr.cpp for the conventions (all three always returned).
std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> lslr_backward(
    const std::vector<std::optional<Tensor>>& douts, const std::vector<Tensor>& grads,
    const std::vector<Tensor>& alphas, int64_t step, const std::vector<bool>& shared);

bool cuda_built();
std::string cuda_arch();

}  // namespace mamlpp
