// Per-step batch norm + leaky ReLU: entry points (checks, device dispatch) and the CPU implementation.
//
// Formulas (one (task, channel) column of M = N*H*W elements; see kernels/bn_math.h, which holds them
// as code for both the CPU loops below and the CUDA kernels):
//   forward:   mu = mean(x), r = 1/sqrt(var + eps) (biased), xhat = (x - mu) r, z = gamma xhat + beta,
//              a = 1 if z > 0 else slope, y = a z.  Saved: mean = mu, invstd = r, shape (T*C,).
//   backward:  g = a dy, gbar = mean(g), m = mean(g xhat);
//              dbeta = sum(g), dgamma = sum(g xhat), dx = gamma r (g - gbar - xhat m).
//   double backward (u = ggx, u_gamma = gggamma, u_beta = ggbeta):
//              ubar = mean(u), ux = mean(u xhat), ug = mean(u g), Q = ug - ubar gbar - ux m,
//              gdy = a [gamma r (u - ubar - xhat ux) + u_gamma xhat + u_beta],
//              ggamma = r M Q,
//              P = gamma r (-u m - ux g) + u_gamma g, meanP = gamma r (-ubar m - ux gbar) + u_gamma gbar,
//              meanPx = -2 gamma r ux m + u_gamma m,
//              gx = r (P - meanP - xhat meanPx) - gamma r^2 xhat Q.
//   With gamma of shape (C,) (shared by the tasks) dgamma, dbeta and ggamma are summed over tasks.
//
// CPU: at::parallel_for over the T*C columns, each column in the accumulation type
// at::acc_type<scalar_t, /*is_cuda=*/false> (double for float32 and float64), its sums kept in
// kLanes independent partial sums (fixed order, see kLanes); per row of HW values the statistics are
// two-pass exact, rows are merged with bn_math.h's welford_combine. The results do not depend on the
// thread count (bit-reproducible). Sums over tasks are done afterwards in task order.
#include "ops.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "bn_math.h"
#include "checks.h"

#ifdef MAMLPP_WITH_CUDA
// c10's CUDA headers only (ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers);
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>

#include "launchers.h"
#endif

namespace mamlpp {
namespace {

using detail::check_float;
using detail::check_like;
using detail::check_same_shape;

struct Shape {
  int64_t N, T, C, HW;
  int64_t TC() const { return T * C; }
  int64_t M() const { return N * HW; }
};

// Checks x, gamma, beta, num_tasks; returns the shape. gamma_per_task: gamma is (T, C).
Shape check_bn_inputs(const char* fn, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                      int64_t num_tasks, bool& gamma_per_task) {
  check_float(fn, "x", x);
  TORCH_CHECK(x.dim() == 4, fn, ": x must be 4-D (N, T*C, H, W), got sizes ",
              detail::dims(x.sizes()));
  TORCH_CHECK(x.is_contiguous(), fn, ": x must be contiguous (N, T*C, H, W), got sizes ",
              detail::dims(x.sizes()), " strides ", detail::dims(x.strides()));
  TORCH_CHECK(num_tasks >= 1, fn, ": num_tasks must be >= 1, got ", num_tasks);
  TORCH_CHECK(x.size(1) % num_tasks == 0, fn, ": num_tasks=", num_tasks,
              " does not divide the channel dim of x (x.size(1)=", x.size(1), ", sizes ",
              detail::dims(x.sizes()), ")");
  Shape s{x.size(0), num_tasks, x.size(1) / num_tasks, x.size(2) * x.size(3)};
  TORCH_CHECK(s.M() > 0, fn, ": x must have N*H*W > 0 elements per channel, got sizes ",
              detail::dims(x.sizes()));
  check_like(fn, "gamma", gamma, "x", x);
  check_like(fn, "beta", beta, "x", x);
  TORCH_CHECK((gamma.dim() == 1 && gamma.size(0) == s.C) ||
                  (gamma.dim() == 2 && gamma.size(0) == s.T && gamma.size(1) == s.C),
              fn, ": gamma must be (C,) = (", s.C, ",) or (T, C) = (", s.T, ", ", s.C,
              ") for x of sizes ", detail::dims(x.sizes()), " and num_tasks=", num_tasks, ", got ",
              detail::dims(gamma.sizes()));
  check_same_shape(fn, "beta", beta, "gamma", gamma);
  gamma_per_task = gamma.dim() == 2;
  return s;
}

void check_stats(const char* fn, const Tensor& mean, const Tensor& invstd, const Tensor& x,
                 const Shape& s) {
  check_like(fn, "mean", mean, "x", x);
  check_like(fn, "invstd", invstd, "x", x);
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == s.TC(), fn, ": mean must be (T*C,) = (", s.TC(),
              ",), got ", detail::dims(mean.sizes()));
  TORCH_CHECK(invstd.dim() == 1 && invstd.size(0) == s.TC(), fn, ": invstd must be (T*C,) = (",
              s.TC(), ",), got ", detail::dims(invstd.sizes()));
}

[[noreturn]] void no_device(const char* fn, const Tensor& x) {
#ifdef MAMLPP_WITH_CUDA
  TORCH_CHECK(false, fn, ": unsupported device ", x.device(), " (cpu or cuda)");
#else
  TORCH_CHECK(false, fn, ": x is on ", x.device(),
              " but mamlpp_fast._C was built without CUDA (cpu only); use another backend");
#endif
}

int64_t grain_for(int64_t M) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(M, 1)); }

// Sums over a column: kLanes partial sums per statistic. A single running sum makes every addition wait
// for the previous one (a chain of dependent adds, ~4 cycles each: the CPU kernels were latency-bound on
// it); with kLanes independent partial sums the additions overlap and the compiler can vectorise them.
// Element i of a row of n goes to lane i % kLanes (whole blocks) or, in the row's tail, to lane
// i - (n - n % kLanes); the lanes are combined by a fixed pairwise tree. The order of every addition is
// fixed by the shape alone, so the results stay independent of the thread count.
constexpr int kLanes = 8;

// The kLanes partial sums combined by a fixed pairwise tree.
template <typename acc_t>
inline acc_t lane_total(const acc_t (&a)[kLanes]) {
  static_assert(kLanes == 8, "lane_total is written for 8 lanes");
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// Sum of f(i) for i in [0, n), in kLanes partial sums (element i of the whole blocks in lane i % kLanes,
// the tail's element i in lane i - (n - n % kLanes)), combined by lane_total.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, F&& f) {
  acc_t p[kLanes] = {};
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes)
    for (int l = 0; l < kLanes; ++l) p[l] += f(i + l);
  for (int64_t i = whole; i < n; ++i) p[i - whole] += f(i);
  return lane_total(p);
}

// The backward passes' column statistics over one row of HW values, added to the kLanes partial sums P
// of each statistic: P[kSg] += g and P[kSgx] += g xhat with g = a dy, and with U (the double backward's
// ggx, row ur) also P[kSu] += u, P[kSux] += u xhat, P[kSug] += u g. The row's whole blocks of kLanes go
// lane by lane (`omp simd`: each lane is its own sum, so vector code adds in the same order), the tail
// to lanes 0.. .
template <bool U, typename scalar_t, typename acc_t>
inline void add_row_stats(const scalar_t* xr, const scalar_t* dyr, const scalar_t* ur, int64_t HW, acc_t mu,
                          acc_t r, acc_t ga, acc_t be, acc_t sl, acc_t (*P)[kLanes]) {
  const int64_t whole = HW - HW % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const acc_t xhat = (acc_t(xr[i + l]) - mu) * r;
      const acc_t z = ga * xhat + be;
      const acc_t g = (z > acc_t(0) ? acc_t(1) : sl) * acc_t(dyr[i + l]);
      P[bn::kSg][l] += g;
      P[bn::kSgx][l] += g * xhat;
      if constexpr (U) {
        const acc_t u = acc_t(ur[i + l]);
        P[bn::kSu][l] += u;
        P[bn::kSux][l] += u * xhat;
        P[bn::kSug][l] += u * g;
      }
    }
  }
  for (int64_t i = whole; i < HW; ++i) {
    acc_t xhat, a;
    bn::bn_xhat_a(acc_t(xr[i]), mu, r, ga, be, sl, xhat, a);
    const acc_t g = a * acc_t(dyr[i]);
    const int l = int(i - whole);
    P[bn::kSg][l] += g;
    P[bn::kSgx][l] += g * xhat;
    if constexpr (U) {
      const acc_t u = acc_t(ur[i]);
      P[bn::kSu][l] += u;
      P[bn::kSux][l] += u * xhat;
      P[bn::kSug][l] += u * g;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void bn_forward_cpu(const scalar_t* x, const scalar_t* gamma, const scalar_t* beta, bool per_task,
                    scalar_t* y, scalar_t* mean, scalar_t* invstd, Shape s, double eps,
                    double slope) {
  using acc_t = at::acc_type<scalar_t, false>;
  const int64_t TC = s.TC(), HW = s.HW, N = s.N, M = s.M();
  at::parallel_for(0, TC, grain_for(M), [&](int64_t b, int64_t e) {
    for (int64_t cp = b; cp < e; ++cp) {
      bn::Welford<acc_t> w = bn::welford_empty<acc_t>();
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* row = x + (n * TC + cp) * HW;
        bn::Welford<acc_t> rw;
        rw.n = HW;
        rw.mean = lane_sum<acc_t>(HW, [&](int64_t i) { return acc_t(row[i]); }) / acc_t(HW);
        const acc_t rmean = rw.mean;
        rw.m2 = lane_sum<acc_t>(HW, [&](int64_t i) {
          const acc_t d = acc_t(row[i]) - rmean;
          return d * d;
        });
        w = bn::welford_combine(w, rw);
      }
      // The saved statistics (rounded to scalar_t) are used for y, as the backward passes will.
      const scalar_t mu_s = scalar_t(w.mean);
      const scalar_t r_s = scalar_t(bn::bn_invstd(w.m2, M, acc_t(eps)));
      mean[cp] = mu_s;
      invstd[cp] = r_s;
      const int64_t gi = per_task ? cp : cp % s.C;
      const acc_t mu = mu_s, r = r_s, ga = gamma[gi], be = beta[gi], sl = slope;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * TC + cp) * HW;
        for (int64_t i = 0; i < HW; ++i)
          y[base + i] = scalar_t(bn::bn_fwd_elem(acc_t(x[base + i]), mu, r, ga, be, sl));
      }
    }
  });
}

template <typename scalar_t>
void bn_backward_cpu(const scalar_t* dy, const scalar_t* x, const scalar_t* gamma,
                     const scalar_t* beta, bool per_task, const scalar_t* mean,
                     const scalar_t* invstd, scalar_t* dx, scalar_t* dgamma, scalar_t* dbeta, Shape s,
                     double slope) {
  using acc_t = at::acc_type<scalar_t, false>;
  const int64_t TC = s.TC(), HW = s.HW, N = s.N, M = s.M();
  std::vector<acc_t> sums(TC * 2);
  at::parallel_for(0, TC, grain_for(M), [&](int64_t b, int64_t e) {
    for (int64_t cp = b; cp < e; ++cp) {
      const int64_t gi = per_task ? cp : cp % s.C;
      const acc_t mu = mean[cp], r = invstd[cp], ga = gamma[gi], be = beta[gi], sl = slope;
      acc_t P[2][kLanes] = {};  // Sg, Sgx (bn::kSg, bn::kSgx) in kLanes partial sums
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * TC + cp) * HW;
        add_row_stats<false>(x + base, dy + base, static_cast<const scalar_t*>(nullptr), HW, mu, r, ga, be,
                             sl, P);
      }
      const acc_t Sg = lane_total(P[bn::kSg]), Sgx = lane_total(P[bn::kSgx]);
      sums[cp * 2 + 0] = Sg;
      sums[cp * 2 + 1] = Sgx;
      const bn::BwdCoef<acc_t> co = bn::bn_bwd_coef(Sg, Sgx, M, ga, r);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * TC + cp) * HW;
        for (int64_t i = 0; i < HW; ++i) {
          acc_t xhat, a;
          bn::bn_xhat_a(acc_t(x[base + i]), mu, r, ga, be, sl, xhat, a);
          dx[base + i] = scalar_t(bn::bn_bwd_dx(a * acc_t(dy[base + i]), xhat, co));
        }
      }
    }
  });
  if (per_task) {
    for (int64_t cp = 0; cp < TC; ++cp) {
      dbeta[cp] = scalar_t(sums[cp * 2 + 0]);
      dgamma[cp] = scalar_t(sums[cp * 2 + 1]);
    }
  } else {
    for (int64_t c = 0; c < s.C; ++c) {
      acc_t db = 0, dg = 0;
      for (int64_t t = 0; t < s.T; ++t) {
        db += sums[(t * s.C + c) * 2 + 0];
        dg += sums[(t * s.C + c) * 2 + 1];
      }
      dbeta[c] = scalar_t(db);
      dgamma[c] = scalar_t(dg);
    }
  }
}

template <typename scalar_t>
void bn_double_backward_cpu(const scalar_t* ggx, const scalar_t* gggamma, const scalar_t* ggbeta,
                            const scalar_t* dy, const scalar_t* x, const scalar_t* gamma,
                            const scalar_t* beta, bool per_task, const scalar_t* mean,
                            const scalar_t* invstd, scalar_t* gx, scalar_t* ggamma, scalar_t* gdy,
                            Shape s, double slope) {
  using acc_t = at::acc_type<scalar_t, false>;
  const int64_t TC = s.TC(), HW = s.HW, N = s.N, M = s.M();
  std::vector<acc_t> gg(TC);
  at::parallel_for(0, TC, grain_for(M), [&](int64_t b, int64_t e) {
    for (int64_t cp = b; cp < e; ++cp) {
      const int64_t gi = per_task ? cp : cp % s.C;
      const acc_t mu = mean[cp], r = invstd[cp], ga = gamma[gi], be = beta[gi], sl = slope;
      // The five sums (three of them zero without ggx), each in kLanes partial sums (see kLanes).
      acc_t P[bn::kNumDbwdSums][kLanes] = {};
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * TC + cp) * HW;
        if (ggx)
          add_row_stats<true>(x + base, dy + base, ggx + base, HW, mu, r, ga, be, sl, P);
        else
          add_row_stats<false>(x + base, dy + base, static_cast<const scalar_t*>(nullptr), HW, mu, r, ga,
                               be, sl, P);
      }
      acc_t S[bn::kNumDbwdSums];
      for (int k = 0; k < bn::kNumDbwdSums; ++k) S[k] = lane_total(P[k]);
      const acc_t ugam = gggamma ? acc_t(gggamma[gi]) : acc_t(0);
      const acc_t ubet = ggbeta ? acc_t(ggbeta[gi]) : acc_t(0);
      const bn::DbwdCoef<acc_t> co = bn::bn_dbwd_coef(S, M, ga, r, ugam, ubet);
      gg[cp] = co.ggamma;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * TC + cp) * HW;
        for (int64_t i = 0; i < HW; ++i) {
          acc_t xhat, a;
          bn::bn_xhat_a(acc_t(x[base + i]), mu, r, ga, be, sl, xhat, a);
          const acc_t g = a * acc_t(dy[base + i]);
          const acc_t u = ggx ? acc_t(ggx[base + i]) : acc_t(0);
          gx[base + i] = scalar_t(bn::bn_dbwd_gx(u, g, xhat, co));
          gdy[base + i] = scalar_t(bn::bn_dbwd_gdy(u, xhat, a, co));
        }
      }
    }
  });
  if (per_task) {
    for (int64_t cp = 0; cp < TC; ++cp) ggamma[cp] = scalar_t(gg[cp]);
  } else {
    for (int64_t c = 0; c < s.C; ++c) {
      acc_t v = 0;
      for (int64_t t = 0; t < s.T; ++t) v += gg[t * s.C + c];
      ggamma[c] = scalar_t(v);
    }
  }
}

#ifdef MAMLPP_WITH_CUDA
cuda::BnShape to_cuda_shape(const Shape& s) { return cuda::BnShape{s.N, s.T, s.C, s.HW}; }

// Multiprocessor count of the current device (cached per device).
int sm_count() {
  static std::atomic<int> cache[128] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 128) dev = 127;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

int bn_chunks(const Shape& s) { return cuda::bn_num_chunks(s.M(), s.TC(), sm_count()); }
#endif

template <typename scalar_t>
const scalar_t* opt_ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

}  // namespace

// -----------------------------------------------------------------------------------------------
// Entry points
// -----------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> bn_forward(const Tensor& x, const Tensor& gamma_in,
                                              const Tensor& beta_in, int64_t num_tasks, double eps,
                                              double slope) {
  const char* fn = "bn_forward";
  bool per_task = false;
  const Shape s = check_bn_inputs(fn, x, gamma_in, beta_in, num_tasks, per_task);
  TORCH_CHECK(eps >= 0, fn, ": eps must be >= 0, got ", eps);
  const Tensor gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({s.TC()}, x.options());
  Tensor invstd = at::empty({s.TC()}, x.options());
  if (x.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_forward_cpu", [&] {
      bn_forward_cpu<scalar_t>(x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
                               beta.data_ptr<scalar_t>(), per_task, y.data_ptr<scalar_t>(),
                               mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), s, eps,
                               slope);
    });
    return {y, mean, invstd};
  }
#ifdef MAMLPP_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int chunks = bn_chunks(s);
    Tensor ws = at::empty({cuda::bn_workspace_elems(s.TC(), chunks, cuda::kBnFwdStats)}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_forward_cuda", [&] {
      C10_CUDA_CHECK(cuda::bn_forward_launch<scalar_t>(
          x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), per_task,
          y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(),
          ws.data_ptr<scalar_t>(), to_cuda_shape(s), chunks, eps, slope, stream));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {y, mean, invstd};
  }
#endif
  no_device(fn, x);
}

std::tuple<Tensor, Tensor, Tensor> bn_backward(const Tensor& dy_in, const Tensor& x,
                                               const Tensor& gamma_in, const Tensor& beta_in,
                                               const Tensor& mean_in, const Tensor& invstd_in,
                                               int64_t num_tasks, double slope) {
  const char* fn = "bn_backward";
  bool per_task = false;
  const Shape s = check_bn_inputs(fn, x, gamma_in, beta_in, num_tasks, per_task);
  check_like(fn, "dy", dy_in, "x", x);
  check_same_shape(fn, "dy", dy_in, "x", x);
  check_stats(fn, mean_in, invstd_in, x, s);
  const Tensor dy = dy_in.contiguous(), gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  const Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  Tensor dx = at::empty_like(x);
  Tensor dgamma = at::empty_like(gamma);
  Tensor dbeta = at::empty_like(gamma);
  if (x.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_backward_cpu", [&] {
      bn_backward_cpu<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), per_task,
                                mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(),
                                dx.data_ptr<scalar_t>(), dgamma.data_ptr<scalar_t>(),
                                dbeta.data_ptr<scalar_t>(), s, slope);
    });
    return {dx, dgamma, dbeta};
  }
#ifdef MAMLPP_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int chunks = bn_chunks(s);
    Tensor ws = at::empty({cuda::bn_workspace_elems(s.TC(), chunks, cuda::kBnBwdStats)}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_backward_cuda", [&] {
      C10_CUDA_CHECK(cuda::bn_backward_launch<scalar_t>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
          beta.data_ptr<scalar_t>(), per_task, mean.data_ptr<scalar_t>(),
          invstd.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dgamma.data_ptr<scalar_t>(),
          dbeta.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), to_cuda_shape(s), chunks, slope,
          stream));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {dx, dgamma, dbeta};
  }
#endif
  no_device(fn, x);
}

std::tuple<Tensor, Tensor, Tensor> bn_double_backward(
    const std::optional<Tensor>& ggx_opt, const std::optional<Tensor>& gggamma_opt,
    const std::optional<Tensor>& ggbeta_opt, const Tensor& dy_in, const Tensor& x,
    const Tensor& gamma_in, const Tensor& beta_in, const Tensor& mean_in, const Tensor& invstd_in,
    int64_t num_tasks, double slope) {
  const char* fn = "bn_double_backward";
  bool per_task = false;
  const Shape s = check_bn_inputs(fn, x, gamma_in, beta_in, num_tasks, per_task);
  check_like(fn, "dy", dy_in, "x", x);
  check_same_shape(fn, "dy", dy_in, "x", x);
  check_stats(fn, mean_in, invstd_in, x, s);
  Tensor ggx, gggamma, ggbeta;  // undefined = zeros
  if (ggx_opt.has_value() && ggx_opt->defined()) {
    check_like(fn, "ggx", *ggx_opt, "x", x);
    check_same_shape(fn, "ggx", *ggx_opt, "x", x);
    ggx = ggx_opt->contiguous();
  }
  if (gggamma_opt.has_value() && gggamma_opt->defined()) {
    check_like(fn, "gggamma", *gggamma_opt, "x", x);
    check_same_shape(fn, "gggamma", *gggamma_opt, "gamma", gamma_in);
    gggamma = gggamma_opt->contiguous();
  }
  if (ggbeta_opt.has_value() && ggbeta_opt->defined()) {
    check_like(fn, "ggbeta", *ggbeta_opt, "x", x);
    check_same_shape(fn, "ggbeta", *ggbeta_opt, "gamma", gamma_in);
    ggbeta = ggbeta_opt->contiguous();
  }
  const Tensor dy = dy_in.contiguous(), gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  const Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  Tensor gx = at::empty_like(x);
  Tensor ggamma = at::empty_like(gamma);
  Tensor gdy = at::empty_like(x);
  if (x.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_double_backward_cpu", [&] {
      bn_double_backward_cpu<scalar_t>(
          opt_ptr<scalar_t>(ggx), opt_ptr<scalar_t>(gggamma), opt_ptr<scalar_t>(ggbeta),
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
          beta.data_ptr<scalar_t>(), per_task, mean.data_ptr<scalar_t>(),
          invstd.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), ggamma.data_ptr<scalar_t>(),
          gdy.data_ptr<scalar_t>(), s, slope);
    });
    return {gx, ggamma, gdy};
  }
#ifdef MAMLPP_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int chunks = bn_chunks(s);
    Tensor ws =
        at::empty({cuda::bn_workspace_elems(s.TC(), chunks, cuda::kBnDbwdStats)}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_double_backward_cuda", [&] {
      C10_CUDA_CHECK(cuda::bn_double_backward_launch<scalar_t>(
          opt_ptr<scalar_t>(ggx), opt_ptr<scalar_t>(gggamma), opt_ptr<scalar_t>(ggbeta),
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
          beta.data_ptr<scalar_t>(), per_task, mean.data_ptr<scalar_t>(),
          invstd.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), ggamma.data_ptr<scalar_t>(),
          gdy.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), to_cuda_shape(s), chunks, slope,
          stream));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {gx, ggamma, gdy};
  }
#endif
  no_device(fn, x);
}

bool cuda_built() {
#ifdef MAMLPP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_arch() {
#if defined(MAMLPP_WITH_CUDA) && defined(MAMLPP_CUDA_ARCH_STR)
  return MAMLPP_CUDA_ARCH_STR;
#else
  return "";
#endif
}

}  // namespace mamlpp
