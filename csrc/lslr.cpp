// LSLR (learned per-step, per-tensor learning rates) inner-loop update: entry points and CPU code.
//
//   forward:  out[l] = thetas[l] - alphas[l][step] * grads[l]             shape (T, *shape_l)
//             thetas[l] is (T, *shape_l) (per task) or shape_l (shared: broadcast over tasks).
//   backward: dgrads[l]  = -alphas[l][step] * douts[l]
//             dthetas[l] = sum over tasks of douts[l]   when shared[l]  (shape shape_l)
//                        = douts[l] itself (no copy)     otherwise
//             dalphas[l] = zeros(S+1) except [step] = -sum(douts[l] * grads[l])
// Conventions of lslr_backward: all three lists are always returned in full (the caller ignores what
// it does not need); douts[l] may be None (= zeros): then dthetas[l], dgrads[l], dalphas[l] are zeros.
// Layouts: the kernels index all tensors of one item by one flat offset r * P + p. The outputs take the
// layout of grads[l] (forward) or douts[l] (backward) when it is dense with the task dim outermost (the
// weight gradients of the Triton convolutions are, in the forward kernel's weight layout: fast weights
// made from them need no re-layout before a convolution); otherwise that tensor is made contiguous. The
// other operands are copied into the same layout where theirs differs. All tensors must share one
// dtype (float32 or float64) and one device.
// CPU: parallel over fixed blocks of positions; the dalpha partial sums are per fixed block (in the
// accumulation type, double) and added in block order, so the result does not depend on the thread
// count. CUDA: one launch for all tensors (kernels/lslr.cu), plus one tiny launch for dalpha.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "bn_math.h"
#include "checks.h"
#include "ops.h"

#ifdef MAMLPP_WITH_CUDA
// c10's CUDA headers only (ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers);
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"
#endif

namespace mamlpp {
namespace {

using detail::check_float;

constexpr int64_t kCpuBlock = 4096;  // positions per CPU work item (fixed: keeps sums deterministic)

// Dense, non-overlapping, with dim 0 outermost: a flat offset r * numel(t[0]) + p walks t[r] like t[0].
bool task_major_dense(const Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  return t.dim() == 0 || t.size(0) <= 1 || t.stride(0) == t.numel() / t.size(0);
}

Tensor task_major(const Tensor& t) { return task_major_dense(t) ? t : t.contiguous(); }

// t (the shape of ref, which is dense) with ref's strides: t itself if it has them, else a copy.
Tensor in_layout_of(const Tensor& t, const Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  return at::empty_like(ref).copy_(t);
}

std::string idx_name(const char* name, size_t l) {
  return std::string(name) + "[" + std::to_string(l) + "]";
}

// Checks one tensor against the reference (first grad): float dtype, same dtype and device.
void check_member(const char* fn, const std::string& name, const Tensor& t, const Tensor& ref) {
  check_float(fn, name.c_str(), t);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " has dtype ", t.scalar_type(),
              " but grads[0] has dtype ", ref.scalar_type(), " (all must match)");
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " is on ", t.device(),
              " but grads[0] is on ", ref.device(), " (all must be on one device)");
}

// Common checks of grads / alphas / step; returns T.
int64_t check_grads_alphas(const char* fn, const std::vector<Tensor>& grads,
                           const std::vector<Tensor>& alphas, int64_t step) {
  TORCH_CHECK(!grads.empty(), fn, ": grads is empty");
  const Tensor& ref = grads[0];
  check_float(fn, "grads[0]", ref);
  TORCH_CHECK(ref.dim() >= 1, fn, ": grads[0] must have a leading task dim (T, ...), got sizes ",
              detail::dims(ref.sizes()));
  const int64_t T = ref.size(0);
  for (size_t l = 0; l < grads.size(); ++l) {
    const std::string gn = idx_name("grads", l), an = idx_name("alphas", l);
    check_member(fn, gn, grads[l], ref);
    TORCH_CHECK(grads[l].dim() >= 1 && grads[l].size(0) == T, fn, ": ", gn,
                " must be (T, ...) with T=", T, " (from grads[0]), got sizes ",
                detail::dims(grads[l].sizes()));
    check_member(fn, an, alphas[l], ref);
    TORCH_CHECK(alphas[l].dim() == 1, fn, ": ", an, " must be 1-D (num_steps+1,), got sizes ",
                detail::dims(alphas[l].sizes()));
    TORCH_CHECK(step >= 0 && step < alphas[l].size(0), fn, ": step ", step, " out of range for ", an,
                " of sizes ", detail::dims(alphas[l].sizes()), " (valid 0..", alphas[l].size(0) - 1,
                ")");
  }
  return T;
}

template <typename scalar_t>
void lslr_forward_cpu(const scalar_t* theta, const scalar_t* grad, scalar_t alpha_s, scalar_t* out,
                      int64_t P, int64_t reps) {
  using acc_t = at::acc_type<scalar_t, false>;
  const acc_t alpha = alpha_s;
  at::parallel_for(0, P, kCpuBlock, [&](int64_t b, int64_t e) {
    for (int64_t r = 0; r < reps; ++r)
      for (int64_t p = b; p < e; ++p)
        out[r * P + p] = scalar_t(bn::lslr_out(acc_t(theta[p]), acc_t(grad[r * P + p]), alpha));
  });
}

// Returns sum(dout * grad) (deterministic); writes dgrad and, when dtheta != null, dtheta.
template <typename scalar_t>
double lslr_backward_cpu(const scalar_t* dout, const scalar_t* grad, scalar_t alpha_s,
                         scalar_t* dgrad, scalar_t* dtheta, int64_t P, int64_t reps) {
  using acc_t = at::acc_type<scalar_t, false>;
  const acc_t alpha = alpha_s;
  const int64_t nblocks = (P + kCpuBlock - 1) / kCpuBlock;
  std::vector<acc_t> part(nblocks, acc_t(0));
  at::parallel_for(0, nblocks, 1, [&](int64_t bb, int64_t be) {
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t p0 = blk * kCpuBlock, p1 = std::min(P, p0 + kCpuBlock);
      acc_t s = 0;
      for (int64_t p = p0; p < p1; ++p) {
        acc_t dth = 0;
        for (int64_t r = 0; r < reps; ++r) {
          const int64_t e = r * P + p;
          const acc_t d = dout[e];
          dgrad[e] = scalar_t(bn::lslr_dgrad(d, alpha));
          s += d * acc_t(grad[e]);
          dth += d;
        }
        if (dtheta) dtheta[p] = scalar_t(dth);
      }
      part[blk] = s;
    }
  });
  acc_t total = 0;
  for (acc_t v : part) total += v;
  return double(total);
}

}  // namespace

std::vector<Tensor> lslr_forward(const std::vector<Tensor>& thetas, const std::vector<Tensor>& grads,
                                 const std::vector<Tensor>& alphas, int64_t step) {
  const char* fn = "lslr_forward";
  TORCH_CHECK(thetas.size() == grads.size() && grads.size() == alphas.size(), fn,
              ": thetas, grads and alphas must have the same length, got ", thetas.size(), ", ",
              grads.size(), ", ", alphas.size());
  const int64_t T = check_grads_alphas(fn, grads, alphas, step);
  const size_t L = grads.size();
  std::vector<Tensor> th(L), gr(L), al(L), outs(L);
  std::vector<int64_t> P(L), reps(L);
  for (size_t l = 0; l < L; ++l) {
    const std::string tn = idx_name("thetas", l);
    check_member(fn, tn, thetas[l], grads[0]);
    const bool shared = thetas[l].sizes() == grads[l].sizes().slice(1);
    TORCH_CHECK(shared || thetas[l].sizes() == grads[l].sizes(), fn, ": ", tn,
                " must have the shape of grads[", l, "] ", detail::dims(grads[l].sizes()),
                " (per task) or that shape without the task dim (shared), got ",
                detail::dims(thetas[l].sizes()));
    gr[l] = task_major(grads[l]);
    th[l] = T > 0 ? in_layout_of(thetas[l], shared ? gr[l].select(0, 0) : gr[l]) : thetas[l].contiguous();
    al[l] = alphas[l].contiguous();
    outs[l] = at::empty_like(gr[l]);
    reps[l] = shared ? T : 1;
    P[l] = shared ? th[l].numel() : gr[l].numel();
  }
  const Tensor& ref = grads[0];
  if (ref.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "lslr_forward_cpu", [&] {
      for (size_t l = 0; l < L; ++l)
        lslr_forward_cpu<scalar_t>(th[l].data_ptr<scalar_t>(), gr[l].data_ptr<scalar_t>(),
                                   al[l].data_ptr<scalar_t>()[step], outs[l].data_ptr<scalar_t>(),
                                   P[l], reps[l]);
    });
    return outs;
  }
#ifdef MAMLPP_WITH_CUDA
  if (ref.is_cuda()) {
    const c10::cuda::CUDAGuard guard(ref.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "lslr_forward_cuda", [&] {
      std::vector<cuda::LslrItem<scalar_t>> items(L);
      for (size_t l = 0; l < L; ++l) {
        cuda::LslrItem<scalar_t>& it = items[l];
        it = cuda::LslrItem<scalar_t>{};
        it.theta = th[l].data_ptr<scalar_t>();
        it.grad = gr[l].data_ptr<scalar_t>();
        it.alpha = al[l].data_ptr<scalar_t>();
        it.out = outs[l].data_ptr<scalar_t>();
        it.P = P[l];
        it.reps = reps[l];
        it.nalpha = al[l].numel();
      }
      C10_CUDA_CHECK(
          cuda::lslr_forward_launch<scalar_t>(items.data(), (int)L, step, stream));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return outs;
  }
#endif
  TORCH_CHECK(false, fn, ": grads[0] is on ", ref.device(),
              cuda_built() ? " (unsupported device)" : " but mamlpp_fast._C was built without CUDA");
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> lslr_backward(
    const std::vector<std::optional<Tensor>>& douts, const std::vector<Tensor>& grads,
    const std::vector<Tensor>& alphas, int64_t step, const std::vector<bool>& shared) {
  const char* fn = "lslr_backward";
  TORCH_CHECK(douts.size() == grads.size() && grads.size() == alphas.size() &&
                  alphas.size() == shared.size(),
              fn, ": douts, grads, alphas and shared must have the same length, got ", douts.size(),
              ", ", grads.size(), ", ", alphas.size(), ", ", shared.size());
  const int64_t T = check_grads_alphas(fn, grads, alphas, step);
  const size_t L = grads.size();
  std::vector<Tensor> dthetas(L), dgrads(L), dalphas(L), dout(L), gr(L), al(L);
  std::vector<int64_t> P(L), reps(L);
  for (size_t l = 0; l < L; ++l) {
    al[l] = alphas[l].contiguous();
    dalphas[l] = at::empty_like(al[l]);
    const bool has = douts[l].has_value() && douts[l]->defined();
    if (!has) {  // zero gradient
      dgrads[l] = at::zeros_like(grads[l]);
      dthetas[l] = shared[l] ? at::zeros(grads[l].sizes().slice(1), grads[l].options())
                             : at::zeros_like(grads[l]);
      dalphas[l].zero_();
      continue;
    }
    const std::string dn = idx_name("douts", l);
    check_member(fn, dn, *douts[l], grads[0]);
    detail::check_same_shape(fn, dn.c_str(), *douts[l], idx_name("grads", l).c_str(), grads[l]);
    dout[l] = task_major(*douts[l]);
    gr[l] = in_layout_of(grads[l], dout[l]);
    dgrads[l] = at::empty_like(dout[l]);
    if (shared[l]) {
      dthetas[l] = T > 0 ? at::empty_like(dout[l].select(0, 0))
                         : at::empty(gr[l].sizes().slice(1), gr[l].options());
      reps[l] = T;
      P[l] = dthetas[l].numel();
    } else {
      dthetas[l] = dout[l];
      reps[l] = 1;
      P[l] = gr[l].numel();
    }
  }
  const Tensor& ref = grads[0];
  if (ref.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "lslr_backward_cpu", [&] {
      for (size_t l = 0; l < L; ++l) {
        if (!dout[l].defined()) continue;
        const double s = lslr_backward_cpu<scalar_t>(
            dout[l].data_ptr<scalar_t>(), gr[l].data_ptr<scalar_t>(),
            al[l].data_ptr<scalar_t>()[step], dgrads[l].data_ptr<scalar_t>(),
            shared[l] ? dthetas[l].data_ptr<scalar_t>() : nullptr, P[l], reps[l]);
        dalphas[l].zero_();
        dalphas[l].data_ptr<scalar_t>()[step] = scalar_t(-s);
      }
    });
    return {dthetas, dgrads, dalphas};
  }
#ifdef MAMLPP_WITH_CUDA
  if (ref.is_cuda()) {
    const c10::cuda::CUDAGuard guard(ref.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "lslr_backward_cuda", [&] {
      std::vector<cuda::LslrItem<scalar_t>> items;
      items.reserve(L);
      for (size_t l = 0; l < L; ++l) {
        if (!dout[l].defined()) continue;
        cuda::LslrItem<scalar_t> it{};
        it.grad = gr[l].data_ptr<scalar_t>();
        it.alpha = al[l].data_ptr<scalar_t>();
        it.dout = dout[l].data_ptr<scalar_t>();
        it.dgrad = dgrads[l].data_ptr<scalar_t>();
        it.dtheta = shared[l] ? dthetas[l].data_ptr<scalar_t>() : nullptr;
        it.dalpha = dalphas[l].data_ptr<scalar_t>();
        it.P = P[l];
        it.reps = reps[l];
        it.nalpha = al[l].numel();
        items.push_back(it);
      }
      if (items.empty()) return;
      const int64_t nws = cuda::lslr_backward_workspace_elems(items.data(), (int)items.size());
      Tensor ws = at::empty({std::max<int64_t>(nws, 1)}, ref.options());
      C10_CUDA_CHECK(cuda::lslr_backward_launch<scalar_t>(items.data(), (int)items.size(), step,
                                                          ws.data_ptr<scalar_t>(), stream));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {dthetas, dgrads, dalphas};
  }
#endif
  TORCH_CHECK(false, fn, ": grads[0] is on ", ref.device(),
              cuda_built() ? " (unsupported device)" : " but mamlpp_fast._C was built without CUDA");
}

}  // namespace mamlpp
