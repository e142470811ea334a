// Host-side launchers of the CUDA kernels in kernels/*.cu: plain C++ signatures (raw device pointers,
// sizes, cudaStream_t), no torch headers, so that each .cu compiles alone with nvcc and the caller
// (csrc/*.cpp) owns allocation, checks, device guard and stream choice.
// Every launcher returns the first launch error (cudaGetLastError after each launch) or cudaSuccess.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace mamlpp {
namespace cuda {

constexpr int kBnThreads = 256;        // threads per block of every BN kernel
constexpr int kBnMinElemsPerBlock = 2048;  // >= 8 elements per thread before a channel is split
constexpr int kBnMaxChunks = 1024;

// Statistics per (channel, chunk) kept in the workspace between the reduction and the apply kernel.
constexpr int kBnFwdStats = 2;   // mean, m2 of the chunk (its count is known from the chunk bounds)
constexpr int kBnBwdStats = 2;   // sum g, sum g xhat
constexpr int kBnDbwdStats = 5;  // sum g, sum g xhat, sum u, sum u xhat, sum u g

// Shape of a per-step BN call: x is (N, T*C, H, W) contiguous, HW = H*W, M = N*HW per channel.
struct BnShape {
  int64_t N, T, C, HW;
};

// Heuristic "bn_num_chunks": how many blocks share one (task, channel) column of M elements.
// Each column is split into `chunks` contiguous ranges of the flat index j in [0, M) so that the grid
// (T*C, chunks) holds about 4 blocks of 256 threads per SM, but never gives a block fewer than
// kBnMinElemsPerBlock elements (below that the fixed cost of the finalize dominates). The statistics of
// the chunks are combined in a fixed order by the second kernel (deterministic, no atomics).
inline int bn_num_chunks(int64_t M, int64_t TC, int num_sms) {
  const int64_t want_blocks = 4 * (int64_t)(num_sms > 0 ? num_sms : 1);
  int64_t by_occupancy = (want_blocks + TC - 1) / TC;
  int64_t by_work = (M + kBnMinElemsPerBlock - 1) / kBnMinElemsPerBlock;
  int64_t c = by_occupancy < by_work ? by_occupancy : by_work;
  if (c < 1) c = 1;
  if (c > kBnMaxChunks) c = kBnMaxChunks;
  return (int)c;
}

// Workspace elements (of the accumulation type, = scalar type: float or double) for each launcher.
inline int64_t bn_workspace_elems(int64_t TC, int chunks, int stats) { return TC * chunks * stats; }

// y, mean, invstd = per-step BN + leaky ReLU forward. gamma/beta: (C,) or (T, C) (gamma_per_task).
template <typename scalar_t>
cudaError_t bn_forward_launch(const scalar_t* x, const scalar_t* gamma, const scalar_t* beta,
                              bool gamma_per_task, scalar_t* y, scalar_t* mean, scalar_t* invstd,
                              scalar_t* workspace, BnShape s, int chunks, double eps, double slope,
                              cudaStream_t stream);

// dx, dgamma, dbeta (dgamma/dbeta shaped like gamma: reduced over tasks when shared).
template <typename scalar_t>
cudaError_t bn_backward_launch(const scalar_t* dy, const scalar_t* x, const scalar_t* gamma,
                               const scalar_t* beta, bool gamma_per_task, const scalar_t* mean,
                               const scalar_t* invstd, scalar_t* dx, scalar_t* dgamma, scalar_t* dbeta,
                               scalar_t* workspace, BnShape s, int chunks, double slope,
                               cudaStream_t stream);

// gx, ggamma, gdy. ggx / gggamma / ggbeta may be null (= zeros).
template <typename scalar_t>
cudaError_t bn_double_backward_launch(const scalar_t* ggx, const scalar_t* gggamma,
                                      const scalar_t* ggbeta, const scalar_t* dy, const scalar_t* x,
                                      const scalar_t* gamma, const scalar_t* beta, bool gamma_per_task,
                                      const scalar_t* mean, const scalar_t* invstd, scalar_t* gx,
                                      scalar_t* ggamma, scalar_t* gdy, scalar_t* workspace, BnShape s,
                                      int chunks, double slope, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// LSLR multi-tensor apply. One item per tensor l. Work is counted in "positions" p in [0, P):
// a shared theta (no task dim) has P = S positions with reps = T rows each (element r*S + p);
// a per-task theta has P = T*S positions with reps = 1. Blocks of kLslrThreads threads each handle
// kLslrPosPerBlock consecutive positions of one tensor; up to kLslrMaxTensors tensors per launch.
// ---------------------------------------------------------------------------------------------
constexpr int kLslrThreads = 256;
constexpr int kLslrPosPerBlock = 1024;
constexpr int kLslrMaxTensors = 24;

template <typename scalar_t>
struct LslrItem {
  const scalar_t* theta;  // (P,)  (shared) or (T*S,)
  const scalar_t* grad;   // (reps*P,)
  const scalar_t* alpha;  // (nalpha,)
  const scalar_t* dout;   // backward: (reps*P,)
  scalar_t* out;          // forward: (reps*P,)
  scalar_t* dgrad;        // backward: (reps*P,)
  scalar_t* dtheta;       // backward: (P,) summed over reps, or null (dtheta = dout, not written)
  scalar_t* dalpha;       // backward: (nalpha,)
  int64_t P;              // positions
  int64_t reps;           // rows per position (T when shared, else 1)
  int64_t nalpha;         // S + 1
};

inline int64_t lslr_blocks_of(int64_t P) { return (P + kLslrPosPerBlock - 1) / kLslrPosPerBlock; }

// Workspace (accumulation type) of lslr_backward_launch: one partial sum of dout*grad per block.
template <typename scalar_t>
inline int64_t lslr_backward_workspace_elems(const LslrItem<scalar_t>* items, int n) {
  int64_t b = 0;
  for (int i = 0; i < n; ++i) b += lslr_blocks_of(items[i].P);
  return b;
}

template <typename scalar_t>
cudaError_t lslr_forward_launch(const LslrItem<scalar_t>* items, int n, int64_t step,
                                cudaStream_t stream);

template <typename scalar_t>
cudaError_t lslr_backward_launch(const LslrItem<scalar_t>* items, int n, int64_t step,
                                 scalar_t* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace mamlpp
