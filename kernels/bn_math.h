// Per-step batch norm + leaky ReLU: the per-element and per-channel formulas, shared by the CUDA
// kernels (kernels/per_step_bn.cu) and the C++ CPU loops (csrc/per_step_bn.cpp), so that the CPU tests
// exercise the very arithmetic the GPU runs. Plain C++ when compiled without nvcc.
//
// Notation (one (task, channel) pair, M = N*H*W elements j, statistics over them):
//   mu = mean(x), r = 1/sqrt(var + eps) (biased var), xhat_j = (x_j - mu) r,
//   z_j = gamma xhat_j + beta, a_j = 1 if z_j > 0 else slope, y_j = a_j z_j.
// Backward (dy given):
//   g_j = a_j dy_j, gbar = mean(g), m = mean(g xhat),
//   dbeta = sum(g), dgamma = sum(g xhat), dx_j = gamma r (g_j - gbar - xhat_j m).
// Double backward (u = ggx, u_gamma = gggamma[c], u_beta = ggbeta[c]; the outputs are the gradients of
// <u, dx> + u_gamma dgamma + u_beta dbeta w.r.t. x, gamma, dy; a_j is piecewise constant):
//   ubar = mean(u), ux = mean(u xhat), ug = mean(u g), Q = ug - ubar gbar - ux m,
//   gdy_j  = a_j [gamma r (u_j - ubar - xhat_j ux) + u_gamma xhat_j + u_beta]
//   ggamma = r M Q
//   P_j    = gamma r (-u_j m - ux g_j) + u_gamma g_j
//   meanP  = gamma r (-ubar m - ux gbar) + u_gamma gbar,  meanPx = mean(P xhat) = -2 gamma r ux m + u_gamma m
//   gx_j   = r (P_j - meanP - xhat_j meanPx) - gamma r^2 xhat_j Q
// The functions below regroup these as per-channel coefficients times per-element values.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MAMLPP_HD __host__ __device__ __forceinline__
#else
#define MAMLPP_HD inline
#endif

namespace mamlpp {
namespace bn {

MAMLPP_HD float bn_sqrt(float v) { return sqrtf(v); }
MAMLPP_HD double bn_sqrt(double v) { return sqrt(v); }

// ---------------------------------------------------------------------------------------------
// Statistics: Welford / Chan. A partial state (n, mean, m2) describes n values; m2 = sum((v-mean)^2).
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Welford {
  int64_t n;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t>
MAMLPP_HD Welford<acc_t> welford_empty() {
  Welford<acc_t> w;
  w.n = 0;
  w.mean = acc_t(0);
  w.m2 = acc_t(0);
  return w;
}

// Add one value v.
template <typename acc_t>
MAMLPP_HD void welford_update(Welford<acc_t>& w, acc_t v) {
  w.n += 1;
  const acc_t d = v - w.mean;
  w.mean += d / acc_t(w.n);
  w.m2 += d * (v - w.mean);
}

// Merge two partial states (Chan et al.): n = na + nb, delta = mean_b - mean_a,
// mean = mean_a + delta nb / n, m2 = m2_a + m2_b + delta^2 na nb / n. Empty states are neutral.
template <typename acc_t>
MAMLPP_HD Welford<acc_t> welford_combine(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  Welford<acc_t> w;
  w.n = a.n + b.n;
  const acc_t nb_over_n = acc_t(b.n) / acc_t(w.n);
  const acc_t delta = b.mean - a.mean;
  w.mean = a.mean + delta * nb_over_n;
  w.m2 = a.m2 + b.m2 + delta * delta * acc_t(a.n) * nb_over_n;
  return w;
}

// r = 1 / sqrt(var + eps) with the biased variance var = m2 / M.
template <typename acc_t>
MAMLPP_HD acc_t bn_invstd(acc_t m2, int64_t M, acc_t eps) {
  return acc_t(1) / bn_sqrt(m2 / acc_t(M) + eps);
}

// ---------------------------------------------------------------------------------------------
// Per element.
// ---------------------------------------------------------------------------------------------
// a = 1 if z > 0 else slope (leaky ReLU derivative; at z == 0 it is slope, as torch's leaky_relu).
template <typename acc_t>
MAMLPP_HD acc_t leaky_slope(acc_t z, acc_t slope) {
  return z > acc_t(0) ? acc_t(1) : slope;
}

// Forward: y = a z with z = gamma xhat + beta, xhat = (x - mu) r.
template <typename acc_t>
MAMLPP_HD acc_t bn_fwd_elem(acc_t x, acc_t mu, acc_t r, acc_t gamma, acc_t beta, acc_t slope) {
  const acc_t xhat = (x - mu) * r;
  const acc_t z = gamma * xhat + beta;
  return z * leaky_slope(z, slope);
}

// Recompute xhat_j and a_j from the saved statistics (used by both backward passes).
template <typename acc_t>
MAMLPP_HD void bn_xhat_a(acc_t x, acc_t mu, acc_t r, acc_t gamma, acc_t beta, acc_t slope,
                         acc_t& xhat, acc_t& a) {
  xhat = (x - mu) * r;
  a = leaky_slope(gamma * xhat + beta, slope);
}

// ---------------------------------------------------------------------------------------------
// Backward: per-channel coefficients from the sums Sg = sum(g), Sgx = sum(g xhat).
//   dx_j = k (g_j - gbar - xhat_j m), k = gamma r.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct BwdCoef {
  acc_t k;     // gamma r
  acc_t gbar;  // mean(g)
  acc_t m;     // mean(g xhat)
};

template <typename acc_t>
MAMLPP_HD BwdCoef<acc_t> bn_bwd_coef(acc_t Sg, acc_t Sgx, int64_t M, acc_t gamma, acc_t r) {
  BwdCoef<acc_t> c;
  c.k = gamma * r;
  c.gbar = Sg / acc_t(M);
  c.m = Sgx / acc_t(M);
  return c;
}

template <typename acc_t>
MAMLPP_HD acc_t bn_bwd_dx(acc_t g, acc_t xhat, const BwdCoef<acc_t>& c) {
  return c.k * (g - c.gbar - xhat * c.m);
}

// ---------------------------------------------------------------------------------------------
// Double backward: per-channel coefficients from the five sums
//   Sg = sum(g), Sgx = sum(g xhat), Su = sum(u), Sux = sum(u xhat), Sug = sum(u g)
// so that, with k = gamma r and w = u_gamma - k ux,
//   gdy_j = a_j (cu u_j + cx xhat_j + c0),           cu = k, cx = w, c0 = u_beta - k ubar
//   gx_j  = eu u_j + eg g_j + ex xhat_j + e0,         eu = -r k m, eg = r w,
//           ex = -(r meanPx + gamma r^2 Q),           e0 = -r meanP
//   ggamma (this task and channel) = r M Q.
// ---------------------------------------------------------------------------------------------
enum { kSg = 0, kSgx = 1, kSu = 2, kSux = 3, kSug = 4, kNumDbwdSums = 5 };

template <typename acc_t>
struct DbwdCoef {
  acc_t cu, cx, c0;      // gdy
  acc_t eu, eg, ex, e0;  // gx
  acc_t ggamma;          // r M Q
};

template <typename acc_t>
MAMLPP_HD DbwdCoef<acc_t> bn_dbwd_coef(const acc_t* S, int64_t M, acc_t gamma, acc_t r,
                                       acc_t u_gamma, acc_t u_beta) {
  const acc_t Mf = acc_t(M);
  const acc_t gbar = S[kSg] / Mf;
  const acc_t m = S[kSgx] / Mf;
  const acc_t ubar = S[kSu] / Mf;
  const acc_t ux = S[kSux] / Mf;
  const acc_t ug = S[kSug] / Mf;
  const acc_t k = gamma * r;
  const acc_t Q = ug - ubar * gbar - ux * m;
  const acc_t w = u_gamma - k * ux;
  const acc_t meanP = k * (-ubar * m - ux * gbar) + u_gamma * gbar;
  const acc_t meanPx = acc_t(-2) * k * ux * m + u_gamma * m;
  DbwdCoef<acc_t> c;
  c.cu = k;
  c.cx = w;
  c.c0 = u_beta - k * ubar;
  c.eu = -r * k * m;
  c.eg = r * w;
  c.ex = -(r * meanPx + gamma * r * r * Q);
  c.e0 = -r * meanP;
  c.ggamma = r * Mf * Q;
  return c;
}

template <typename acc_t>
MAMLPP_HD acc_t bn_dbwd_gdy(acc_t u, acc_t xhat, acc_t a, const DbwdCoef<acc_t>& c) {
  return a * (c.cu * u + c.cx * xhat + c.c0);
}

template <typename acc_t>
MAMLPP_HD acc_t bn_dbwd_gx(acc_t u, acc_t g, acc_t xhat, const DbwdCoef<acc_t>& c) {
  return c.eu * u + c.eg * g + c.ex * xhat + c.e0;
}

// ---------------------------------------------------------------------------------------------
// LSLR: out = theta - alpha[step] grad; dgrad = -alpha[step] dout; dalpha[step] = -sum(dout grad).
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
MAMLPP_HD acc_t lslr_out(acc_t theta, acc_t grad, acc_t alpha) {
  return theta - alpha * grad;
}

template <typename acc_t>
MAMLPP_HD acc_t lslr_dgrad(acc_t dout, acc_t alpha) {
  return -alpha * dout;
}

}  // namespace bn
}  // namespace mamlpp
