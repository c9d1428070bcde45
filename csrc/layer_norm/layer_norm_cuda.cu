// CUDA kernels of layer_norm (forward and backward) and their launchers; torch-free (the glue is
// layer_norm_cuda_glue.cpp). Same math as layer_norm_cpu.cpp: x viewed as (N, C) rows, statistics
// and weight math in float32 whatever x's dtype.
//
// Design (memory-bound op: the goal is to touch x, dy, y, dx exactly once, with 16-byte accesses):
//  - A row lives in registers between its passes (mean, variance, output), so x is read once.
//    Small C: a warp per row, shuffle-only reductions; larger C: a block per row, warp sums
//    combined through shared memory (cuda_utils.cuh: plan_rows, row_sum).
//  - Rows longer than the registers of a block (C > 16384 forward, > 8192 backward) take the
//    long-row kernels, which stream the row from memory once per pass (the re-reads mostly hit L2).
//  - Backward: each thread keeps the same columns for every row it visits, so dweight/dbias
//    accumulate in registers across rows; each block writes one float32 partial row, and
//    sum_partial_rows adds the blocks' rows in a fixed order: deterministic, no atomics. The grid
//    is one wave (SMs x resident blocks), so the partials stay small next to x.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "layer_norm/layer_norm_cuda.h"

namespace fastlm {
namespace gpu {
namespace {

// Register budgets (ptxas -v, sm_90, no spills): forward with 32 columns per thread uses <= 127
// registers (512 threads x 32 columns: rows up to C = 16384 in registers); backward keeps four
// arrays per column (xhat, g, dw, db): 32 columns took ~175 registers (2 blocks per SM), 16
// columns keep ~100 and twice the resident warps to hide memory latency.
constexpr int kFwdMaxWarps = 16, kFwdMaxElems = 32;
constexpr int kBwdMaxWarps = 16, kBwdMaxElems = 16;  // rows up to C = 8192 in registers

// ---------------------------------------------------------------------------------------------
// Forward

// Rows in registers: `kWarps` warps per row, kSlots chunks of kVec columns per thread.
template <typename T, int kWarps, int kSlots>
__device__ __forceinline__ void fwd_tiled_rows(const T* __restrict__ x, const float* __restrict__ w,
                                               const float* __restrict__ b, T* __restrict__ y,
                                               float* __restrict__ mean, float* __restrict__ rstd,
                                               int64_t N, int C, float eps, bool vec) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kThreads = kWarps * kWarpSize;  // threads per row
  constexpr int kRows = rows_per_block(kWarps);
  __shared__ float red[kWarps];
  const int t = threadIdx.x % kThreads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRows;
  // The loop bound is uniform over a row's threads (a warp, or the whole block when kWarps > 1),
  // so row_sum's shuffles and __syncthreads see every thread they need.
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / kThreads; r < N;
       r += stride) {
    float v[kSlots][kVec];  // (kSlots, kVec): this thread's columns of x[r]
    float sum[1] = {0.f};
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      load_chunk<kThreads, kVec>(x + r * C, C, vec, s, t, v[s]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum[0] += v[s][j];  // masked columns are 0
    }
    row_sum<kWarps>(sum, red);
    const float mu = sum[0] / C;
    // Two passes over the registers (mean, then squared deviations) as the CPU kernel does:
    // no cancellation from E[x^2] - E[x]^2.
    float sq[1] = {0.f};
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = v[s][j] - mu;
        if (chunk_col<kThreads, kVec>(vec, s, j, t) < C) sq[0] += d * d;
      }
    }
    row_sum<kWarps>(sq, red);
    const float rs = 1.0f / sqrtf(sq[0] / C + eps);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      float wv[kVec], out[kVec];
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = (v[s][j] - mu) * rs * wv[j];
      if (b != nullptr) {
        float bv[kVec];
        load_chunk<kThreads, kVec>(b, C, vec, s, t, bv);
#pragma unroll
        for (int j = 0; j < kVec; ++j) out[j] += bv[j];
      }
      store_chunk<kThreads, kVec>(y + r * C, C, vec, s, t, out);
    }
    if (t == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// Rows too long for registers: a block per row, three streaming passes over x.
template <typename T>
__device__ __forceinline__ void fwd_long_rows(const T* __restrict__ x, const float* __restrict__ w,
                                              const float* __restrict__ b, T* __restrict__ y,
                                              float* __restrict__ mean, float* __restrict__ rstd,
                                              int64_t N, int C, float eps, bool vec) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kThreads = kLongRowWarps * kWarpSize;
  __shared__ float red[kLongRowWarps];
  const int t = threadIdx.x;
  const int slots = (C + kThreads * kVec - 1) / (kThreads * kVec);
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {  // uniform over the block
    const T* xr = x + r * C;
    float sum[1] = {0.f};
    for (int s = 0; s < slots; ++s) {
      float v[kVec];
      load_chunk<kThreads, kVec>(xr, C, vec, s, t, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum[0] += v[j];
    }
    row_sum<kLongRowWarps>(sum, red);
    const float mu = sum[0] / C;
    float sq[1] = {0.f};
    for (int s = 0; s < slots; ++s) {
      float v[kVec];
      load_chunk<kThreads, kVec>(xr, C, vec, s, t, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = v[j] - mu;
        if (chunk_col<kThreads, kVec>(vec, s, j, t) < C) sq[0] += d * d;
      }
    }
    row_sum<kLongRowWarps>(sq, red);
    const float rs = 1.0f / sqrtf(sq[0] / C + eps);
    for (int s = 0; s < slots; ++s) {
      float v[kVec], wv[kVec], out[kVec];
      load_chunk<kThreads, kVec>(xr, C, vec, s, t, v);
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = (v[j] - mu) * rs * wv[j];
      if (b != nullptr) {
        float bv[kVec];
        load_chunk<kThreads, kVec>(b, C, vec, s, t, bv);
#pragma unroll
        for (int j = 0; j < kVec; ++j) out[j] += bv[j];
      }
      store_chunk<kThreads, kVec>(y + r * C, C, vec, s, t, out);
    }
    if (t == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// One kernel name per layout (kSlots == 0: long rows), so the launcher handles every choice as
// one function-pointer type.
template <typename T, int kWarps, int kSlots>
__global__ void __launch_bounds__(block_threads(kWarps))
    layer_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                          const float* __restrict__ b, T* __restrict__ y, float* __restrict__ mean,
                          float* __restrict__ rstd, int64_t N, int C, float eps, bool vec) {
  if constexpr (kSlots == 0) {
    fwd_long_rows<T>(x, w, b, y, mean, rstd, N, C, eps, vec);
  } else {
    fwd_tiled_rows<T, kWarps, kSlots>(x, w, b, y, mean, rstd, N, C, eps, vec);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// part: (2, gridDim.x, C) float32; block b writes row b of the dweight and the dbias partials.
template <typename T, int kWarps, int kSlots>
__device__ __forceinline__ void bwd_tiled_rows(const T* __restrict__ dy, const T* __restrict__ x,
                                               const float* __restrict__ w,
                                               const float* __restrict__ mean,
                                               const float* __restrict__ rstd, T* __restrict__ dx,
                                               float* __restrict__ part, int64_t N, int C,
                                               bool vec) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kThreads = kWarps * kWarpSize;
  constexpr int kRows = rows_per_block(kWarps);
  __shared__ float red[kWarps * 2];
  const int t = threadIdx.x % kThreads;
  float acc_w[kSlots][kVec] = {}, acc_b[kSlots][kVec] = {};  // this thread's columns of dw, db
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRows;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / kThreads; r < N;
       r += stride) {
    const float mu = mean[r], rs = rstd[r];
    float xhat[kSlots][kVec], g[kSlots][kVec];
    float sums[2] = {0.f, 0.f};  // sum g, sum g * xhat
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      float xv[kVec], dyv[kVec], wv[kVec];
      load_chunk<kThreads, kVec>(x + r * C, C, vec, s, t, xv);
      load_chunk<kThreads, kVec>(dy + r * C, C, vec, s, t, dyv);
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        // Masked columns have dy = w = 0, so they add nothing to any sum.
        xhat[s][j] = (xv[j] - mu) * rs;
        g[s][j] = dyv[j] * wv[j];
        acc_w[s][j] += dyv[j] * xhat[s][j];
        acc_b[s][j] += dyv[j];
        sums[0] += g[s][j];
        sums[1] += g[s][j] * xhat[s][j];
      }
    }
    row_sum<kWarps, 2>(sums, red);
    const float c_g = sums[0] / C, c_gx = sums[1] / C;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      float out[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = rs * (g[s][j] - c_g - xhat[s][j] * c_gx);
      store_chunk<kThreads, kVec>(dx + r * C, C, vec, s, t, out);
    }
  }
  if constexpr (kRows > 1) {
    __shared__ float comb[kRows - 1][kSlots * kVec][kThreads];
    combine_groups<kRows>(acc_w, comb);
    combine_groups<kRows>(acc_b, comb);
  }
  if (threadIdx.x < kThreads) {  // group 0 holds the block's sums
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      store_chunk<kThreads, kVec>(part + static_cast<int64_t>(blockIdx.x) * C, C, vec, s, t,
                                  acc_w[s]);
      store_chunk<kThreads, kVec>(part + static_cast<int64_t>(gridDim.x + blockIdx.x) * C, C,
                                  vec, s, t, acc_b[s]);
    }
  }
}

// Long rows: two streaming passes per row (sums, then dx), and the block's partial rows of dw/db
// accumulated in global memory (each column is owned by one thread, so no races).
template <typename T>
__device__ __forceinline__ void bwd_long_rows(const T* __restrict__ dy, const T* __restrict__ x,
                                              const float* __restrict__ w,
                                              const float* __restrict__ mean,
                                              const float* __restrict__ rstd, T* __restrict__ dx,
                                              float* part, int64_t N, int C, bool vec) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kThreads = kLongRowWarps * kWarpSize;
  __shared__ float red[kLongRowWarps * 2];
  const int t = threadIdx.x;
  const int slots = (C + kThreads * kVec - 1) / (kThreads * kVec);
  float* part_w = part + static_cast<int64_t>(blockIdx.x) * C;
  float* part_b = part + static_cast<int64_t>(gridDim.x + blockIdx.x) * C;
  for (int s = 0; s < slots; ++s) {
    fill_chunk<kThreads, kVec>(part_w, C, vec, s, t, 0.f);
    fill_chunk<kThreads, kVec>(part_b, C, vec, s, t, 0.f);
  }
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {  // uniform over the block
    const float mu = mean[r], rs = rstd[r];
    float sums[2] = {0.f, 0.f};
    for (int s = 0; s < slots; ++s) {
      float xv[kVec], dyv[kVec], wv[kVec];
      load_chunk<kThreads, kVec>(x + r * C, C, vec, s, t, xv);
      load_chunk<kThreads, kVec>(dy + r * C, C, vec, s, t, dyv);
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float g = dyv[j] * wv[j];
        sums[0] += g;
        sums[1] += g * ((xv[j] - mu) * rs);
      }
    }
    row_sum<kLongRowWarps, 2>(sums, red);
    const float c_g = sums[0] / C, c_gx = sums[1] / C;
    for (int s = 0; s < slots; ++s) {
      float xv[kVec], dyv[kVec], wv[kVec], out[kVec], dw[kVec];
      load_chunk<kThreads, kVec>(x + r * C, C, vec, s, t, xv);
      load_chunk<kThreads, kVec>(dy + r * C, C, vec, s, t, dyv);
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float xhat = (xv[j] - mu) * rs;
        out[j] = rs * (dyv[j] * wv[j] - c_g - xhat * c_gx);
        dw[j] = dyv[j] * xhat;
      }
      store_chunk<kThreads, kVec>(dx + r * C, C, vec, s, t, out);
      accumulate_chunk<kThreads, kVec>(part_w, C, vec, s, t, dw);
      accumulate_chunk<kThreads, kVec>(part_b, C, vec, s, t, dyv);
    }
  }
}

template <typename T, int kWarps, int kSlots>
__global__ void __launch_bounds__(block_threads(kWarps))
    layer_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                          const float* __restrict__ w, const float* __restrict__ mean,
                          const float* __restrict__ rstd, T* __restrict__ dx, float* part,
                          int64_t N, int C, bool vec) {
  if constexpr (kSlots == 0) {
    bwd_long_rows<T>(dy, x, w, mean, rstd, dx, part, N, C, vec);
  } else {
    bwd_tiled_rows<T, kWarps, kSlots>(dy, x, w, mean, rstd, dx, part, N, C, vec);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch plans

template <typename T>
using FwdKernel = void (*)(const T*, const float*, const float*, T*, float*, float*, int64_t,
                           int, float, bool);
template <typename T>
using BwdKernel = void (*)(const T*, const T*, const float*, const float*, const float*, T*,
                           float*, int64_t, int, bool);

template <typename T>
KernelChoice<FwdKernel<T>> pick_fwd(int64_t C) {
  return with_tile<kVecOf<T>, kFwdMaxWarps, kFwdMaxElems>(
      plan_rows(C, kVecOf<T>, kFwdMaxWarps, kFwdMaxElems), [](auto tile) {
        using Tl = decltype(tile);
        return KernelChoice<FwdKernel<T>>{&layer_norm_fwd_kernel<T, Tl::kW, Tl::kS>,
                                          block_threads(Tl::kW), rows_per_block(Tl::kW)};
      });
}

template <typename T>
KernelChoice<BwdKernel<T>> pick_bwd(int64_t C) {
  return with_tile<kVecOf<T>, kBwdMaxWarps, kBwdMaxElems>(
      plan_rows(C, kVecOf<T>, kBwdMaxWarps, kBwdMaxElems), [](auto tile) {
        using Tl = decltype(tile);
        return KernelChoice<BwdKernel<T>>{&layer_norm_bwd_kernel<T, Tl::kW, Tl::kS>,
                                          block_threads(Tl::kW), rows_per_block(Tl::kW)};
      });
}

// Backward grid: one wave of resident blocks (SMs x occupancy), fewer when N is small. Each
// block then writes one partial row, so the workspace is independent of N.
template <typename T>
cudaError_t bwd_grid(int64_t N, int64_t C, int64_t* grid) {
  *grid = 0;
  if (C < 1 || C > kMaxCols || N < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const KernelChoice<BwdKernel<T>> choice = pick_bwd<T>(C);
  if (choice.kernel == nullptr) return cudaErrorInvalidConfiguration;
  int sms = 0, per_sm = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, choice.kernel, choice.threads, 0);
  if (err != cudaSuccess) return err;
  const int64_t wave = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  *grid = row_grid(N, choice.rows_per_block, wave);
  return cudaSuccess;
}

}  // namespace
}  // namespace gpu

// ---------------------------------------------------------------------------------------------
// Launchers. Defined with qualified names so that any drift from the declarations in
// layer_norm_cuda.h is a compile error rather than a missing symbol when fastlm._C loads.

template <typename T>
cudaError_t gpu::layer_norm_fwd(const T* x, const float* w, const float* b, T* y, float* mean,
                           float* rstd, int64_t N, int64_t C, float eps, cudaStream_t stream) {
  if (C < 1 || C > kMaxCols || N < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const bool vec = C % kVecOf<T> == 0 && aligned16(x) && aligned16(y) && aligned16(w) &&
                   (b == nullptr || aligned16(b));
  const KernelChoice<FwdKernel<T>> choice = pick_fwd<T>(C);
  if (choice.kernel == nullptr) return cudaErrorInvalidConfiguration;
  const int64_t grid = row_grid(N, choice.rows_per_block);
  choice.kernel<<<static_cast<int>(grid), choice.threads, 0, stream>>>(x, w, b, y, mean, rstd, N,
                                                     static_cast<int>(C), eps, vec);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gpu::layer_norm_bwd_workspace_rows(int64_t N, int64_t C, int64_t* rows) {
  return bwd_grid<T>(N, C, rows);
}

template <typename T>
cudaError_t gpu::layer_norm_bwd(const T* dy, const T* x, const float* w, const float* mean,
                           const float* rstd, T* dx, float* dw, float* db, float* workspace,
                           int64_t workspace_rows, int64_t N, int64_t C, cudaStream_t stream) {
  int64_t grid = 0;
  cudaError_t err = bwd_grid<T>(N, C, &grid);
  if (err != cudaSuccess) return err;
  if (grid != workspace_rows) return cudaErrorInvalidValue;
  if (N > 0) {
    const bool vec = C % kVecOf<T> == 0 && aligned16(dy) && aligned16(x) && aligned16(w) &&
                     aligned16(dx) && aligned16(workspace);
    const KernelChoice<BwdKernel<T>> choice = pick_bwd<T>(C);
    choice.kernel<<<static_cast<int>(grid), choice.threads, 0, stream>>>(
        dy, x, w, mean, rstd, dx, workspace, N, static_cast<int>(C), vec);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // With N == 0 there are no partial rows and the sums are zeros, as on CPU.
  return sum_partial_rows(workspace, grid, C, dw, db, db != nullptr ? 2 : 1, stream);
}

#define FASTLM_INSTANTIATE_LAYER_NORM(T)                                                      \
  template cudaError_t gpu::layer_norm_fwd<T>(const T*, const float*, const float*, T*, float*,    \
                                         float*, int64_t, int64_t, float, cudaStream_t);      \
  template cudaError_t gpu::layer_norm_bwd_workspace_rows<T>(int64_t, int64_t, int64_t*);          \
  template cudaError_t gpu::layer_norm_bwd<T>(const T*, const T*, const float*, const float*,      \
                                         const float*, T*, float*, float*, float*, int64_t,   \
                                         int64_t, int64_t, cudaStream_t);

FASTLM_INSTANTIATE_LAYER_NORM(float)
FASTLM_INSTANTIATE_LAYER_NORM(__nv_bfloat16)
FASTLM_INSTANTIATE_LAYER_NORM(__half)

}  // namespace fastlm
