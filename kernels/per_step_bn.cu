// CUDA kernels of the per-step batch norm + leaky ReLU (forward, backward, double backward).
// The formulas live in bn_math.h (shared with the CPU loops); this file only organises the passes.
//
// Layout: x is (N, T*C, H, W) contiguous; column cp = t*C + c holds M = N*HW elements, N strided runs of
// HW contiguous values: element j of column cp is at ((j / HW) * TC + cp) * HW + j % HW.
//
// Every op is two kernels on a grid (TC, chunks) of 256-thread blocks:
//   1. reduce: block (cp, k) reduces its chunk [k*len, min(M, (k+1)*len)) of column cp to a few sums
//      (forward: Welford (mean, m2); backward: sum g, sum g xhat; double backward: 5 sums) and writes
//      them to workspace[cp][k][:];
//   2. apply:  block (cp, k) combines the chunk sums of its column in a fixed order (each block of the
//      column redundantly, no extra launch), derives the per-channel coefficients, writes the
//      elements of its chunk, and block (cp, 0) writes the per-channel outputs. For a gamma shared by
//      the tasks, block (t=0, c, 0) adds the per-task values in task order.
// All reductions are per-thread sequential, then warp shuffles and one shared-memory step in a fixed
// tree: results are bit-reproducible from run to run (no atomics).
// Threads walk their chunk with stride 256 and an incremental (n, hw) position, so small H*W (1, 9, 49)
// keeps every thread busy; 4 loads are issued before they are used.
#include <cuda_runtime.h>
#include <stdint.h>

#include "bn_math.h"
#include "launchers.h"

namespace mamlpp {
namespace cuda {
namespace {

using bn::Welford;

constexpr int kUnroll = 4;
constexpr unsigned kFullMask = 0xffffffffu;

// Position of one thread in a column, advanced by the block stride.
struct ColPos {
  int64_t j;    // flat index in the column, [0, M)
  int64_t hw;   // j % HW
  int64_t off;  // offset of element j in x
};

struct ColStep {
  int64_t dj, dhw, doff, wrap, HW;
};

__device__ __forceinline__ ColPos col_pos(int64_t j, int64_t cp, int64_t TC, int64_t HW) {
  ColPos p;
  const int64_t n = j / HW;
  p.j = j;
  p.hw = j - n * HW;
  p.off = (n * TC + cp) * HW + p.hw;
  return p;
}

__device__ __forceinline__ ColStep col_step(int64_t stride, int64_t TC, int64_t HW) {
  ColStep s;
  const int64_t q = stride / HW;
  s.dj = stride;
  s.dhw = stride - q * HW;
  s.doff = q * TC * HW + s.dhw;
  s.wrap = TC * HW - HW;
  s.HW = HW;
  return s;
}

__device__ __forceinline__ void advance(ColPos& p, const ColStep& s) {
  p.j += s.dj;
  p.hw += s.dhw;
  p.off += s.doff;
  if (p.hw >= s.HW) {
    p.hw -= s.HW;
    p.off += s.wrap;
  }
}

struct Chunk {
  int64_t begin, end;
};

__device__ __forceinline__ Chunk chunk_of(int64_t k, int64_t M, int chunks) {
  const int64_t len = (M + chunks - 1) / chunks;
  Chunk c;
  c.begin = k * len < M ? k * len : M;
  c.end = c.begin + len < M ? c.begin + len : M;
  return c;
}

// ------------------------------------------------------------------------------------------------
// Deterministic block reductions (blockDim.x == kBnThreads, a multiple of 32).
// ------------------------------------------------------------------------------------------------
template <typename acc_t, int K>
__device__ __forceinline__ void warp_sum(acc_t (&v)[K]) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] += __shfl_down_sync(kFullMask, v[i], o);
  }
}

// Sums v over the block; every thread gets the result. sh: K*32 values of shared memory.
template <typename acc_t, int K>
__device__ __forceinline__ void block_sum(acc_t (&v)[K], acc_t* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  warp_sum<acc_t, K>(v);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) sh[i * 32 + warp] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = lane < nwarps ? sh[i * 32 + lane] : acc_t(0);
    warp_sum<acc_t, K>(v);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < K; ++i) sh[i * 32] = v[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = sh[i * 32];
  __syncthreads();  // sh may be reused right after
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> shfl_welford(const Welford<acc_t>& w, int o) {
  Welford<acc_t> r;
  r.n = __shfl_down_sync(kFullMask, w.n, o);
  r.mean = __shfl_down_sync(kFullMask, w.mean, o);
  r.m2 = __shfl_down_sync(kFullMask, w.m2, o);
  return r;
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_welford(Welford<acc_t> w) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) w = bn::welford_combine(w, shfl_welford(w, o));
  return w;
}

// Chan-merges the per-thread states over the block; every thread gets the result.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> block_welford(Welford<acc_t> w, int64_t* shn, acc_t* shm,
                                                        acc_t* shm2) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  w = warp_welford(w);
  if (lane == 0) {
    shn[warp] = w.n;
    shm[warp] = w.mean;
    shm2[warp] = w.m2;
  }
  __syncthreads();
  if (warp == 0) {
    w = bn::welford_empty<acc_t>();
    if (lane < nwarps) {
      w.n = shn[lane];
      w.mean = shm[lane];
      w.m2 = shm2[lane];
    }
    w = warp_welford(w);
    if (lane == 0) {
      shn[0] = w.n;
      shm[0] = w.mean;
      shm2[0] = w.m2;
    }
  }
  __syncthreads();
  w.n = shn[0];
  w.mean = shm[0];
  w.m2 = shm2[0];
  __syncthreads();
  return w;
}

// Sum of the K chunk partials of column cp: thread-strided over chunks, then block_sum.
template <typename acc_t, int K>
__device__ __forceinline__ void column_sums(const acc_t* __restrict__ ws, int64_t cp, int chunks,
                                            acc_t (&S)[K], acc_t* sh) {
#pragma unroll
  for (int i = 0; i < K; ++i) S[i] = acc_t(0);
  for (int k = threadIdx.x; k < chunks; k += blockDim.x) {
    const acc_t* p = ws + (cp * chunks + k) * K;
#pragma unroll
    for (int i = 0; i < K; ++i) S[i] += p[i];
  }
  block_sum<acc_t, K>(S, sh);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kBnThreads)
    bn_fwd_reduce_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ ws, BnShape s,
                         int chunks) {
  using acc_t = scalar_t;
  __shared__ int64_t shn[32];
  __shared__ acc_t shm[32], shm2[32];
  const int64_t TC = s.T * s.C, M = s.N * s.HW, cp = blockIdx.x;
  const Chunk ch = chunk_of(blockIdx.y, M, chunks);
  const ColStep st = col_step(blockDim.x, TC, s.HW);
  ColPos p = col_pos(ch.begin + threadIdx.x, cp, TC, s.HW);
  Welford<acc_t> w = bn::welford_empty<acc_t>();
  while (p.j < ch.end) {
    int64_t off[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = p.j < ch.end;
      off[u] = p.off;
      advance(p, st);
    }
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = ok[u] ? acc_t(x[off[u]]) : acc_t(0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (ok[u]) bn::welford_update(w, v[u]);
  }
  w = block_welford(w, shn, shm, shm2);
  if (threadIdx.x == 0) {
    acc_t* out = ws + (cp * chunks + blockIdx.y) * kBnFwdStats;
    out[0] = w.mean;
    out[1] = w.m2;
  }
}

// Combines the chunk states of column cp (counts from the chunk bounds) -> (mean, m2) of the column.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> column_welford(const acc_t* __restrict__ ws, int64_t cp,
                                                         int64_t M, int chunks, int64_t* shn,
                                                         acc_t* shm, acc_t* shm2) {
  Welford<acc_t> w = bn::welford_empty<acc_t>();
  for (int k = threadIdx.x; k < chunks; k += blockDim.x) {
    const Chunk ch = chunk_of(k, M, chunks);
    Welford<acc_t> o;
    o.n = ch.end - ch.begin;
    o.mean = ws[(cp * chunks + k) * kBnFwdStats + 0];
    o.m2 = ws[(cp * chunks + k) * kBnFwdStats + 1];
    w = bn::welford_combine(w, o);
  }
  return block_welford(w, shn, shm, shm2);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBnThreads)
    bn_fwd_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gamma,
                        const scalar_t* __restrict__ beta, bool gamma_per_task,
                        scalar_t* __restrict__ y, scalar_t* __restrict__ mean_out,
                        scalar_t* __restrict__ invstd_out, const scalar_t* __restrict__ ws, BnShape s,
                        int chunks, scalar_t eps, scalar_t slope) {
  using acc_t = scalar_t;
  __shared__ int64_t shn[32];
  __shared__ acc_t shm[32], shm2[32];
  const int64_t TC = s.T * s.C, M = s.N * s.HW, cp = blockIdx.x;
  const Welford<acc_t> w = column_welford(ws, cp, M, chunks, shn, shm, shm2);
  // The saved statistics (rounded to scalar_t) are the ones the backward passes will see.
  const scalar_t mu_s = scalar_t(w.mean);
  const scalar_t r_s = scalar_t(bn::bn_invstd(w.m2, M, acc_t(eps)));
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    mean_out[cp] = mu_s;
    invstd_out[cp] = r_s;
  }
  const int64_t gi = gamma_per_task ? cp : cp % s.C;
  const acc_t mu = mu_s, r = r_s, ga = gamma[gi], be = beta[gi], sl = slope;
  const Chunk ch = chunk_of(blockIdx.y, M, chunks);
  const ColStep st = col_step(blockDim.x, TC, s.HW);
  ColPos p = col_pos(ch.begin + threadIdx.x, cp, TC, s.HW);
  while (p.j < ch.end) {
    int64_t off[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = p.j < ch.end;
      off[u] = p.off;
      advance(p, st);
    }
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = ok[u] ? acc_t(x[off[u]]) : acc_t(0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (ok[u]) y[off[u]] = scalar_t(bn::bn_fwd_elem(v[u], mu, r, ga, be, sl));
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: g = a dy; reduce sum g, sum g xhat; dx = k (g - gbar - xhat m).
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kBnThreads)
    bn_bwd_reduce_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
                         bool gamma_per_task, const scalar_t* __restrict__ mean,
                         const scalar_t* __restrict__ invstd, scalar_t* __restrict__ ws, BnShape s,
                         int chunks, scalar_t slope) {
  using acc_t = scalar_t;
  __shared__ acc_t sh[kBnBwdStats * 32];
  const int64_t TC = s.T * s.C, M = s.N * s.HW, cp = blockIdx.x;
  const int64_t gi = gamma_per_task ? cp : cp % s.C;
  const acc_t mu = mean[cp], r = invstd[cp], ga = gamma[gi], be = beta[gi], sl = slope;
  const Chunk ch = chunk_of(blockIdx.y, M, chunks);
  const ColStep st = col_step(blockDim.x, TC, s.HW);
  ColPos p = col_pos(ch.begin + threadIdx.x, cp, TC, s.HW);
  acc_t S[kBnBwdStats] = {acc_t(0), acc_t(0)};
  while (p.j < ch.end) {
    int64_t off[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = p.j < ch.end;
      off[u] = p.off;
      advance(p, st);
    }
    acc_t xv[kUnroll], dv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      xv[u] = ok[u] ? acc_t(x[off[u]]) : acc_t(0);
      dv[u] = ok[u] ? acc_t(dy[off[u]]) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc_t xhat, a;
      bn::bn_xhat_a(xv[u], mu, r, ga, be, sl, xhat, a);
      const acc_t g = a * dv[u];  // 0 for masked lanes (dv = 0)
      S[0] += g;
      S[1] += g * xhat;
    }
  }
  block_sum<acc_t, kBnBwdStats>(S, sh);
  if (threadIdx.x == 0) {
    acc_t* out = ws + (cp * chunks + blockIdx.y) * kBnBwdStats;
    out[0] = S[0];
    out[1] = S[1];
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBnThreads)
    bn_bwd_apply_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                        const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
                        bool gamma_per_task, const scalar_t* __restrict__ mean,
                        const scalar_t* __restrict__ invstd, scalar_t* __restrict__ dx,
                        scalar_t* __restrict__ dgamma, scalar_t* __restrict__ dbeta,
                        const scalar_t* __restrict__ ws, BnShape s, int chunks, scalar_t slope) {
  using acc_t = scalar_t;
  __shared__ acc_t sh[kBnBwdStats * 32];
  const int64_t TC = s.T * s.C, M = s.N * s.HW, cp = blockIdx.x;
  const int64_t t = cp / s.C, c = cp - t * s.C;
  const int64_t gi = gamma_per_task ? cp : c;
  acc_t S[kBnBwdStats];
  column_sums<acc_t, kBnBwdStats>(ws, cp, chunks, S, sh);
  const acc_t mu = mean[cp], r = invstd[cp], ga = gamma[gi], be = beta[gi], sl = slope;
  const bn::BwdCoef<acc_t> co = bn::bn_bwd_coef(S[0], S[1], M, ga, r);

  if (blockIdx.y == 0) {
    if (gamma_per_task) {
      if (threadIdx.x == 0) {
        dgamma[cp] = scalar_t(S[1]);
        dbeta[cp] = scalar_t(S[0]);
      }
    } else if (t == 0) {  // block-uniform branch: column_sums synchronises the block
      acc_t dg = acc_t(0), db = acc_t(0);
      for (int64_t tt = 0; tt < s.T; ++tt) {
        acc_t St[kBnBwdStats];
        column_sums<acc_t, kBnBwdStats>(ws, tt * s.C + c, chunks, St, sh);
        db += St[0];
        dg += St[1];
      }
      if (threadIdx.x == 0) {
        dgamma[c] = scalar_t(dg);
        dbeta[c] = scalar_t(db);
      }
    }
  }

  const Chunk ch = chunk_of(blockIdx.y, M, chunks);
  const ColStep st = col_step(blockDim.x, TC, s.HW);
  ColPos p = col_pos(ch.begin + threadIdx.x, cp, TC, s.HW);
  while (p.j < ch.end) {
    int64_t off[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = p.j < ch.end;
      off[u] = p.off;
      advance(p, st);
    }
    acc_t xv[kUnroll], dv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      xv[u] = ok[u] ? acc_t(x[off[u]]) : acc_t(0);
      dv[u] = ok[u] ? acc_t(dy[off[u]]) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      acc_t xhat, a;
      bn::bn_xhat_a(xv[u], mu, r, ga, be, sl, xhat, a);
      dx[off[u]] = scalar_t(bn::bn_bwd_dx(a * dv[u], xhat, co));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Double backward: reduce the 5 sums (g, g xhat, u, u xhat, u g), then gx and gdy in one pass.
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, bool HAS_U>
__global__ void __launch_bounds__(kBnThreads)
    bn_dbwd_reduce_kernel(const scalar_t* __restrict__ ggx, const scalar_t* __restrict__ dy,
                          const scalar_t* __restrict__ x, const scalar_t* __restrict__ gamma,
                          const scalar_t* __restrict__ beta, bool gamma_per_task,
                          const scalar_t* __restrict__ mean, const scalar_t* __restrict__ invstd,
                          scalar_t* __restrict__ ws, BnShape s, int chunks, scalar_t slope) {
  using acc_t = scalar_t;
  __shared__ acc_t sh[kBnDbwdStats * 32];
  const int64_t TC = s.T * s.C, M = s.N * s.HW, cp = blockIdx.x;
  const int64_t gi = gamma_per_task ? cp : cp % s.C;
  const acc_t mu = mean[cp], r = invstd[cp], ga = gamma[gi], be = beta[gi], sl = slope;
  const Chunk ch = chunk_of(blockIdx.y, M, chunks);
  const ColStep st = col_step(blockDim.x, TC, s.HW);
  ColPos p = col_pos(ch.begin + threadIdx.x, cp, TC, s.HW);
  acc_t S[kBnDbwdStats] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  while (p.j < ch.end) {
    int64_t off[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = p.j < ch.end;
      off[u] = p.off;
      advance(p, st);
    }
    acc_t xv[kUnroll], dv[kUnroll], uv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      xv[u] = ok[u] ? acc_t(x[off[u]]) : acc_t(0);
      dv[u] = ok[u] ? acc_t(dy[off[u]]) : acc_t(0);
      uv[u] = (HAS_U && ok[u]) ? acc_t(ggx[off[u]]) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc_t xhat, a;
      bn::bn_xhat_a(xv[u], mu, r, ga, be, sl, xhat, a);
      const acc_t g = a * dv[u];
      S[bn::kSg] += g;
      S[bn::kSgx] += g * xhat;
      if (HAS_U) {
        S[bn::kSu] += uv[u];
        S[bn::kSux] += uv[u] * xhat;
        S[bn::kSug] += uv[u] * g;
      }
    }
  }
  block_sum<acc_t, kBnDbwdStats>(S, sh);
  if (threadIdx.x == 0) {
    acc_t* out = ws + (cp * chunks + blockIdx.y) * kBnDbwdStats;
#pragma unroll
    for (int i = 0; i < kBnDbwdStats; ++i) out[i] = S[i];
  }
}

template <typename scalar_t, bool HAS_U>
__global__ void __launch_bounds__(kBnThreads)
    bn_dbwd_apply_kernel(const scalar_t* __restrict__ ggx, const scalar_t* __restrict__ gggamma,
                         const scalar_t* __restrict__ ggbeta, const scalar_t* __restrict__ dy,
                         const scalar_t* __restrict__ x, const scalar_t* __restrict__ gamma,
                         const scalar_t* __restrict__ beta, bool gamma_per_task,
                         const scalar_t* __restrict__ mean, const scalar_t* __restrict__ invstd,
                         scalar_t* __restrict__ gx, scalar_t* __restrict__ ggamma,
                         scalar_t* __restrict__ gdy, const scalar_t* __restrict__ ws, BnShape s,
                         int chunks, scalar_t slope) {
  using acc_t = scalar_t;
  __shared__ acc_t sh[kBnDbwdStats * 32];
  const int64_t TC = s.T * s.C, M = s.N * s.HW, cp = blockIdx.x;
  const int64_t t = cp / s.C, c = cp - t * s.C;
  const int64_t gi = gamma_per_task ? cp : c;
  acc_t S[kBnDbwdStats];
  column_sums<acc_t, kBnDbwdStats>(ws, cp, chunks, S, sh);
  const acc_t mu = mean[cp], r = invstd[cp], ga = gamma[gi], be = beta[gi], sl = slope;
  const acc_t ugam = gggamma ? acc_t(gggamma[gi]) : acc_t(0);
  const acc_t ubet = ggbeta ? acc_t(ggbeta[gi]) : acc_t(0);
  const bn::DbwdCoef<acc_t> co = bn::bn_dbwd_coef(S, M, ga, r, ugam, ubet);

  if (blockIdx.y == 0) {
    if (gamma_per_task) {
      if (threadIdx.x == 0) ggamma[cp] = scalar_t(co.ggamma);
    } else if (t == 0) {  // block-uniform branch
      acc_t gg = acc_t(0);
      for (int64_t tt = 0; tt < s.T; ++tt) {
        const int64_t cpt = tt * s.C + c;
        acc_t St[kBnDbwdStats];
        column_sums<acc_t, kBnDbwdStats>(ws, cpt, chunks, St, sh);
        gg += bn::bn_dbwd_coef(St, M, ga, acc_t(invstd[cpt]), ugam, ubet).ggamma;
      }
      if (threadIdx.x == 0) ggamma[c] = scalar_t(gg);
    }
  }

  const Chunk ch = chunk_of(blockIdx.y, M, chunks);
  const ColStep st = col_step(blockDim.x, TC, s.HW);
  ColPos p = col_pos(ch.begin + threadIdx.x, cp, TC, s.HW);
  while (p.j < ch.end) {
    int64_t off[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = p.j < ch.end;
      off[u] = p.off;
      advance(p, st);
    }
    acc_t xv[kUnroll], dv[kUnroll], uv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      xv[u] = ok[u] ? acc_t(x[off[u]]) : acc_t(0);
      dv[u] = ok[u] ? acc_t(dy[off[u]]) : acc_t(0);
      uv[u] = (HAS_U && ok[u]) ? acc_t(ggx[off[u]]) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      acc_t xhat, a;
      bn::bn_xhat_a(xv[u], mu, r, ga, be, sl, xhat, a);
      const acc_t g = a * dv[u];
      gx[off[u]] = scalar_t(bn::bn_dbwd_gx(uv[u], g, xhat, co));
      gdy[off[u]] = scalar_t(bn::bn_dbwd_gdy(uv[u], xhat, a, co));
    }
  }
}

inline dim3 bn_grid(const BnShape& s, int chunks) {
  return dim3((unsigned)(s.T * s.C), (unsigned)chunks, 1);
}

}  // namespace

template <typename scalar_t>
cudaError_t bn_forward_launch(const scalar_t* x, const scalar_t* gamma, const scalar_t* beta,
                              bool gamma_per_task, scalar_t* y, scalar_t* mean, scalar_t* invstd,
                              scalar_t* workspace, BnShape s, int chunks, double eps, double slope,
                              cudaStream_t stream) {
  const dim3 grid = bn_grid(s, chunks);
  bn_fwd_reduce_kernel<scalar_t><<<grid, kBnThreads, 0, stream>>>(x, workspace, s, chunks);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  bn_fwd_apply_kernel<scalar_t><<<grid, kBnThreads, 0, stream>>>(
      x, gamma, beta, gamma_per_task, y, mean, invstd, workspace, s, chunks, scalar_t(eps),
      scalar_t(slope));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t bn_backward_launch(const scalar_t* dy, const scalar_t* x, const scalar_t* gamma,
                               const scalar_t* beta, bool gamma_per_task, const scalar_t* mean,
                               const scalar_t* invstd, scalar_t* dx, scalar_t* dgamma, scalar_t* dbeta,
                               scalar_t* workspace, BnShape s, int chunks, double slope,
                               cudaStream_t stream) {
  const dim3 grid = bn_grid(s, chunks);
  bn_bwd_reduce_kernel<scalar_t><<<grid, kBnThreads, 0, stream>>>(
      dy, x, gamma, beta, gamma_per_task, mean, invstd, workspace, s, chunks, scalar_t(slope));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  bn_bwd_apply_kernel<scalar_t><<<grid, kBnThreads, 0, stream>>>(
      dy, x, gamma, beta, gamma_per_task, mean, invstd, dx, dgamma, dbeta, workspace, s, chunks,
      scalar_t(slope));
  return cudaGetLastError();
}

template <typename scalar_t, bool HAS_U>
static cudaError_t bn_dbwd_launch_impl(const scalar_t* ggx, const scalar_t* gggamma,
                                       const scalar_t* ggbeta, const scalar_t* dy, const scalar_t* x,
                                       const scalar_t* gamma, const scalar_t* beta,
                                       bool gamma_per_task, const scalar_t* mean,
                                       const scalar_t* invstd, scalar_t* gx, scalar_t* ggamma,
                                       scalar_t* gdy, scalar_t* workspace, BnShape s, int chunks,
                                       double slope, cudaStream_t stream) {
  const dim3 grid = bn_grid(s, chunks);
  bn_dbwd_reduce_kernel<scalar_t, HAS_U><<<grid, kBnThreads, 0, stream>>>(
      ggx, dy, x, gamma, beta, gamma_per_task, mean, invstd, workspace, s, chunks, scalar_t(slope));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  bn_dbwd_apply_kernel<scalar_t, HAS_U><<<grid, kBnThreads, 0, stream>>>(
      ggx, gggamma, ggbeta, dy, x, gamma, beta, gamma_per_task, mean, invstd, gx, ggamma, gdy,
      workspace, s, chunks, scalar_t(slope));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t bn_double_backward_launch(const scalar_t* ggx, const scalar_t* gggamma,
                                      const scalar_t* ggbeta, const scalar_t* dy, const scalar_t* x,
                                      const scalar_t* gamma, const scalar_t* beta, bool gamma_per_task,
                                      const scalar_t* mean, const scalar_t* invstd, scalar_t* gx,
                                      scalar_t* ggamma, scalar_t* gdy, scalar_t* workspace, BnShape s,
                                      int chunks, double slope, cudaStream_t stream) {
  if (ggx != nullptr)
    return bn_dbwd_launch_impl<scalar_t, true>(ggx, gggamma, ggbeta, dy, x, gamma, beta,
                                               gamma_per_task, mean, invstd, gx, ggamma, gdy,
                                               workspace, s, chunks, slope, stream);
  return bn_dbwd_launch_impl<scalar_t, false>(ggx, gggamma, ggbeta, dy, x, gamma, beta,
                                              gamma_per_task, mean, invstd, gx, ggamma, gdy,
                                              workspace, s, chunks, slope, stream);
}

#define MAMLPP_INSTANTIATE_BN(T)                                                                   \
  template cudaError_t bn_forward_launch<T>(const T*, const T*, const T*, bool, T*, T*, T*, T*,    \
                                            BnShape, int, double, double, cudaStream_t);           \
  template cudaError_t bn_backward_launch<T>(const T*, const T*, const T*, const T*, bool,         \
                                             const T*, const T*, T*, T*, T*, T*, BnShape, int,     \
                                             double, cudaStream_t);                                \
  template cudaError_t bn_double_backward_launch<T>(const T*, const T*, const T*, const T*,        \
                                                    const T*, const T*, const T*, bool, const T*,  \
                                                    const T*, T*, T*, T*, T*, BnShape, int,        \
                                                    double, cudaStream_t);

MAMLPP_INSTANTIATE_BN(float)
MAMLPP_INSTANTIATE_BN(double)
#undef MAMLPP_INSTANTIATE_BN

}  // namespace cuda
}  // namespace mamlpp
