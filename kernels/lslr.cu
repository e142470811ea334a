// CUDA kernels of the LSLR inner-loop update (multi-tensor apply: every tensor of every task in one
// launch, up to kLslrMaxTensors tensors per launch; the packed table is a kernel argument).
//
//   forward:  out[l][t] = theta[l][t or shared] - alpha[l][step] * grad[l][t]
//   backward: dgrad[l] = -alpha[l][step] * dout[l]
//             dtheta[l] = sum_t dout[l][t] when theta[l] was shared (else dtheta = dout, not written)
//             dalpha[l] = 0 except dalpha[l][step] = -sum(dout[l] * grad[l])
// The dalpha sums are deterministic: one partial per block (fixed tree inside the block) written to the
// workspace, then a second tiny kernel (one block per tensor) adds that tensor's partials in order.
#include <cuda_runtime.h>
#include <stdint.h>

#include "bn_math.h"
#include "launchers.h"

namespace mamlpp {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename scalar_t>
struct LslrPack {
  LslrItem<scalar_t> items[kLslrMaxTensors];
  int64_t block_begin[kLslrMaxTensors + 1];  // first block of each tensor; [n] = total blocks
  int n;
  int64_t step;
  int64_t ws_offset;  // where this launch's partials start in the workspace
};

template <typename scalar_t>
__device__ __forceinline__ int find_item(const LslrPack<scalar_t>& pk, int64_t b) {
  int l = 0;
  while (l + 1 < pk.n && pk.block_begin[l + 1] <= b) ++l;
  return l;
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum1(acc_t v, acc_t* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? sh[lane] : acc_t(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kLslrThreads) lslr_fwd_kernel(const LslrPack<scalar_t> pk) {
  using acc_t = scalar_t;
  const int64_t b = blockIdx.x;
  const int l = find_item(pk, b);
  const LslrItem<scalar_t>& it = pk.items[l];
  const int64_t p0 = (b - pk.block_begin[l]) * kLslrPosPerBlock;
  const int64_t p1 = p0 + kLslrPosPerBlock < it.P ? p0 + kLslrPosPerBlock : it.P;
  const acc_t alpha = it.alpha[pk.step];
  for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
    const acc_t th = it.theta[p];
    for (int64_t r = 0; r < it.reps; ++r) {
      const int64_t e = r * it.P + p;
      it.out[e] = scalar_t(bn::lslr_out(th, acc_t(it.grad[e]), alpha));
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kLslrThreads)
    lslr_bwd_kernel(const LslrPack<scalar_t> pk, scalar_t* __restrict__ ws) {
  using acc_t = scalar_t;
  __shared__ acc_t sh[32];
  const int64_t b = blockIdx.x;
  const int l = find_item(pk, b);
  const LslrItem<scalar_t>& it = pk.items[l];
  const int64_t p0 = (b - pk.block_begin[l]) * kLslrPosPerBlock;
  const int64_t p1 = p0 + kLslrPosPerBlock < it.P ? p0 + kLslrPosPerBlock : it.P;
  const acc_t alpha = it.alpha[pk.step];
  acc_t s = acc_t(0);
  for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
    acc_t dth = acc_t(0);
    for (int64_t r = 0; r < it.reps; ++r) {
      const int64_t e = r * it.P + p;
      const acc_t d = it.dout[e];
      it.dgrad[e] = scalar_t(bn::lslr_dgrad(d, alpha));
      s += d * acc_t(it.grad[e]);
      dth += d;
    }
    if (it.dtheta != nullptr) it.dtheta[p] = scalar_t(dth);
  }
  s = block_sum1(s, sh);
  if (threadIdx.x == 0) ws[pk.ws_offset + b] = s;
}

// One block per tensor: dalpha[l] = 0 except [step] = -(sum of the tensor's block partials).
template <typename scalar_t>
__global__ void __launch_bounds__(kLslrThreads)
    lslr_dalpha_kernel(const LslrPack<scalar_t> pk, const scalar_t* __restrict__ ws) {
  using acc_t = scalar_t;
  __shared__ acc_t sh[32];
  const int l = blockIdx.x;
  const LslrItem<scalar_t>& it = pk.items[l];
  acc_t s = acc_t(0);
  for (int64_t b = pk.block_begin[l] + threadIdx.x; b < pk.block_begin[l + 1]; b += blockDim.x)
    s += ws[pk.ws_offset + b];
  s = block_sum1(s, sh);
  for (int64_t i = threadIdx.x; i < it.nalpha; i += blockDim.x)
    it.dalpha[i] = i == pk.step ? scalar_t(-s) : scalar_t(0);
}

template <typename scalar_t>
int64_t pack_items(LslrPack<scalar_t>& pk, const LslrItem<scalar_t>* items, int n, int64_t step) {
  pk.n = n;
  pk.step = step;
  int64_t b = 0;
  for (int i = 0; i < n; ++i) {
    pk.items[i] = items[i];
    pk.block_begin[i] = b;
    b += lslr_blocks_of(items[i].P);
  }
  pk.block_begin[n] = b;
  return b;
}

}  // namespace

template <typename scalar_t>
cudaError_t lslr_forward_launch(const LslrItem<scalar_t>* items, int n, int64_t step,
                                cudaStream_t stream) {
  for (int first = 0; first < n; first += kLslrMaxTensors) {
    const int cnt = n - first < kLslrMaxTensors ? n - first : kLslrMaxTensors;
    LslrPack<scalar_t> pk;
    const int64_t blocks = pack_items(pk, items + first, cnt, step);
    pk.ws_offset = 0;
    if (blocks == 0) continue;
    lslr_fwd_kernel<scalar_t><<<(unsigned)blocks, kLslrThreads, 0, stream>>>(pk);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename scalar_t>
cudaError_t lslr_backward_launch(const LslrItem<scalar_t>* items, int n, int64_t step,
                                 scalar_t* workspace, cudaStream_t stream) {
  int64_t ws_offset = 0;
  for (int first = 0; first < n; first += kLslrMaxTensors) {
    const int cnt = n - first < kLslrMaxTensors ? n - first : kLslrMaxTensors;
    LslrPack<scalar_t> pk;
    const int64_t blocks = pack_items(pk, items + first, cnt, step);
    pk.ws_offset = ws_offset;
    cudaError_t err;
    if (blocks > 0) {
      lslr_bwd_kernel<scalar_t><<<(unsigned)blocks, kLslrThreads, 0, stream>>>(pk, workspace);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    lslr_dalpha_kernel<scalar_t><<<(unsigned)cnt, kLslrThreads, 0, stream>>>(pk, workspace);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    ws_offset += blocks;
  }
  return cudaSuccess;
}

#define MAMLPP_INSTANTIATE_LSLR(T)                                                                 \
  template cudaError_t lslr_forward_launch<T>(const LslrItem<T>*, int, int64_t, cudaStream_t);     \
  template cudaError_t lslr_backward_launch<T>(const LslrItem<T>*, int, int64_t, T*, cudaStream_t);

MAMLPP_INSTANTIATE_LSLR(float)
MAMLPP_INSTANTIATE_LSLR(double)
#undef MAMLPP_INSTANTIATE_LSLR

}  // namespace cuda
}  // namespace mamlpp
