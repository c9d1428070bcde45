// CUDA kernels of rms_norm (forward and backward) and their launchers; torch-free (the glue is
// rms_norm_cuda_glue.cpp). Same math as rms_norm_cpu.cpp and the same design as
// layer_norm_cuda.cu (rows in registers, warp or block per row by C, long-row streaming kernels,
// deterministic per-block dweight partials), without the mean and the bias.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "rms_norm/rms_norm_cuda.h"

namespace fastlm {
namespace gpu {
namespace {

// Register budgets as in layer_norm_cuda.cu (the backward keeps xhat, g and dw per column).
constexpr int kFwdMaxWarps = 16, kFwdMaxElems = 32;  // rows up to C = 16384 in registers
constexpr int kBwdMaxWarps = 16, kBwdMaxElems = 16;  // rows up to C = 8192 in registers

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T, int kWarps, int kSlots>
__device__ __forceinline__ void fwd_tiled_rows(const T* __restrict__ x, const float* __restrict__ w,
                                               T* __restrict__ y, float* __restrict__ rstd,
                                               int64_t N, int C, float eps, bool vec) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kThreads = kWarps * kWarpSize;  // threads per row
  constexpr int kRows = rows_per_block(kWarps);
  __shared__ float red[kWarps];
  const int t = threadIdx.x % kThreads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRows;
  // Loop bound uniform over a row's threads: row_sum's shuffles/__syncthreads are safe.
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / kThreads; r < N;
       r += stride) {
    float v[kSlots][kVec];  // (kSlots, kVec): this thread's columns of x[r]
    float sq[1] = {0.f};
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      load_chunk<kThreads, kVec>(x + r * C, C, vec, s, t, v[s]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sq[0] += v[s][j] * v[s][j];  // masked columns are 0
    }
    row_sum<kWarps>(sq, red);
    const float rs = 1.0f / sqrtf(sq[0] / C + eps);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      float wv[kVec], out[kVec];
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = v[s][j] * rs * wv[j];
      store_chunk<kThreads, kVec>(y + r * C, C, vec, s, t, out);
    }
    if (t == 0) rstd[r] = rs;
  }
}

// Rows too long for registers: a block per row, two streaming passes over x.
template <typename T>
__device__ __forceinline__ void fwd_long_rows(const T* __restrict__ x, const float* __restrict__ w,
                                              T* __restrict__ y, float* __restrict__ rstd,
                                              int64_t N, int C, float eps, bool vec) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kThreads = kLongRowWarps * kWarpSize;
  __shared__ float red[kLongRowWarps];
  const int t = threadIdx.x;
  const int slots = (C + kThreads * kVec - 1) / (kThreads * kVec);
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {  // uniform over the block
    const T* xr = x + r * C;
    float sq[1] = {0.f};
    for (int s = 0; s < slots; ++s) {
      float v[kVec];
      load_chunk<kThreads, kVec>(xr, C, vec, s, t, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sq[0] += v[j] * v[j];
    }
    row_sum<kLongRowWarps>(sq, red);
    const float rs = 1.0f / sqrtf(sq[0] / C + eps);
    for (int s = 0; s < slots; ++s) {
      float v[kVec], wv[kVec], out[kVec];
      load_chunk<kThreads, kVec>(xr, C, vec, s, t, v);
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = v[j] * rs * wv[j];
      store_chunk<kThreads, kVec>(y + r * C, C, vec, s, t, out);
    }
    if (t == 0) rstd[r] = rs;
  }
}

template <typename T, int kWarps, int kSlots>
__global__ void __launch_bounds__(block_threads(kWarps))
    rms_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,
                        float* __restrict__ rstd, int64_t N, int C, float eps, bool vec) {
  if constexpr (kSlots == 0) {
    fwd_long_rows<T>(x, w, y, rstd, N, C, eps, vec);
  } else {
    fwd_tiled_rows<T, kWarps, kSlots>(x, w, y, rstd, N, C, eps, vec);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// part: (gridDim.x, C) float32; block b writes row b (its dweight partial).
template <typename T, int kWarps, int kSlots>
__device__ __forceinline__ void bwd_tiled_rows(const T* __restrict__ dy, const T* __restrict__ x,
                                               const float* __restrict__ w,
                                               const float* __restrict__ rstd, T* __restrict__ dx,
                                               float* __restrict__ part, int64_t N, int C,
                                               bool vec) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kThreads = kWarps * kWarpSize;
  constexpr int kRows = rows_per_block(kWarps);
  __shared__ float red[kWarps];
  const int t = threadIdx.x % kThreads;
  float acc_w[kSlots][kVec] = {};  // this thread's columns of dw
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRows;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / kThreads; r < N;
       r += stride) {
    const float rs = rstd[r];
    float xhat[kSlots][kVec], g[kSlots][kVec];
    float sum_gx[1] = {0.f};
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      float xv[kVec], dyv[kVec], wv[kVec];
      load_chunk<kThreads, kVec>(x + r * C, C, vec, s, t, xv);
      load_chunk<kThreads, kVec>(dy + r * C, C, vec, s, t, dyv);
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {  // masked columns: x = dy = w = 0, they add nothing
        xhat[s][j] = xv[j] * rs;
        g[s][j] = dyv[j] * wv[j];
        acc_w[s][j] += dyv[j] * xhat[s][j];
        sum_gx[0] += g[s][j] * xhat[s][j];
      }
    }
    row_sum<kWarps>(sum_gx, red);
    const float c_gx = sum_gx[0] / C;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      float out[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = rs * (g[s][j] - xhat[s][j] * c_gx);
      store_chunk<kThreads, kVec>(dx + r * C, C, vec, s, t, out);
    }
  }
  if constexpr (kRows > 1) {
    __shared__ float comb[kRows - 1][kSlots * kVec][kThreads];
    combine_groups<kRows>(acc_w, comb);
  }
  if (threadIdx.x < kThreads) {  // group 0 holds the block's sums
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      store_chunk<kThreads, kVec>(part + static_cast<int64_t>(blockIdx.x) * C, C, vec, s, t,
                                  acc_w[s]);
  }
}

// Long rows: two streaming passes per row, the block's dweight partial row accumulated in global
// memory (each column owned by one thread: no races).
template <typename T>
__device__ __forceinline__ void bwd_long_rows(const T* __restrict__ dy, const T* __restrict__ x,
                                              const float* __restrict__ w,
                                              const float* __restrict__ rstd, T* __restrict__ dx,
                                              float* part, int64_t N, int C, bool vec) {
  constexpr int kVec = kVecOf<T>;
  constexpr int kThreads = kLongRowWarps * kWarpSize;
  __shared__ float red[kLongRowWarps];
  const int t = threadIdx.x;
  const int slots = (C + kThreads * kVec - 1) / (kThreads * kVec);
  float* part_w = part + static_cast<int64_t>(blockIdx.x) * C;
  for (int s = 0; s < slots; ++s) fill_chunk<kThreads, kVec>(part_w, C, vec, s, t, 0.f);
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {  // uniform over the block
    const float rs = rstd[r];
    float sum_gx[1] = {0.f};
    for (int s = 0; s < slots; ++s) {
      float xv[kVec], dyv[kVec], wv[kVec];
      load_chunk<kThreads, kVec>(x + r * C, C, vec, s, t, xv);
      load_chunk<kThreads, kVec>(dy + r * C, C, vec, s, t, dyv);
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum_gx[0] += dyv[j] * wv[j] * (xv[j] * rs);
    }
    row_sum<kLongRowWarps>(sum_gx, red);
    const float c_gx = sum_gx[0] / C;
    for (int s = 0; s < slots; ++s) {
      float xv[kVec], dyv[kVec], wv[kVec], out[kVec], dw[kVec];
      load_chunk<kThreads, kVec>(x + r * C, C, vec, s, t, xv);
      load_chunk<kThreads, kVec>(dy + r * C, C, vec, s, t, dyv);
      load_chunk<kThreads, kVec>(w, C, vec, s, t, wv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float xhat = xv[j] * rs;
        out[j] = rs * (dyv[j] * wv[j] - xhat * c_gx);
        dw[j] = dyv[j] * xhat;
      }
      store_chunk<kThreads, kVec>(dx + r * C, C, vec, s, t, out);
      accumulate_chunk<kThreads, kVec>(part_w, C, vec, s, t, dw);
    }
  }
}

// minBlocksPerSM 1: without it ptxas (CUDA 13, sm_80) held the 16-bit long-row kernel to 32
// registers and spilled 12 bytes; with it, 47 registers and no spill (bench/results/aot).
template <typename T, int kWarps, int kSlots>
__global__ void __launch_bounds__(block_threads(kWarps), 1)
    rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                        const float* __restrict__ w, const float* __restrict__ rstd,
                        T* __restrict__ dx, float* part, int64_t N, int C, bool vec) {
  if constexpr (kSlots == 0) {
    bwd_long_rows<T>(dy, x, w, rstd, dx, part, N, C, vec);
  } else {
    bwd_tiled_rows<T, kWarps, kSlots>(dy, x, w, rstd, dx, part, N, C, vec);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch plans

template <typename T>
using FwdKernel = void (*)(const T*, const float*, T*, float*, int64_t, int, float, bool);
template <typename T>
using BwdKernel = void (*)(const T*, const T*, const float*, const float*, T*, float*, int64_t,
                           int, bool);

template <typename T>
KernelChoice<FwdKernel<T>> pick_fwd(int64_t C) {
  return with_tile<kVecOf<T>, kFwdMaxWarps, kFwdMaxElems>(
      plan_rows(C, kVecOf<T>, kFwdMaxWarps, kFwdMaxElems), [](auto tile) {
        using Tl = decltype(tile);
        return KernelChoice<FwdKernel<T>>{&rms_norm_fwd_kernel<T, Tl::kW, Tl::kS>,
                                          block_threads(Tl::kW), rows_per_block(Tl::kW)};
      });
}

template <typename T>
KernelChoice<BwdKernel<T>> pick_bwd(int64_t C) {
  return with_tile<kVecOf<T>, kBwdMaxWarps, kBwdMaxElems>(
      plan_rows(C, kVecOf<T>, kBwdMaxWarps, kBwdMaxElems), [](auto tile) {
        using Tl = decltype(tile);
        return KernelChoice<BwdKernel<T>>{&rms_norm_bwd_kernel<T, Tl::kW, Tl::kS>,
                                          block_threads(Tl::kW), rows_per_block(Tl::kW)};
      });
}

// Backward grid: one wave of resident blocks (SMs x occupancy), fewer when N is small.
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
// rms_norm_cuda.h is a compile error rather than a missing symbol when fastlm._C loads.

template <typename T>
cudaError_t gpu::rms_norm_fwd(const T* x, const float* w, T* y, float* rstd, int64_t N, int64_t C,
                              float eps, cudaStream_t stream) {
  if (C < 1 || C > kMaxCols || N < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const bool vec = C % kVecOf<T> == 0 && aligned16(x) && aligned16(y) && aligned16(w);
  const KernelChoice<FwdKernel<T>> choice = pick_fwd<T>(C);
  if (choice.kernel == nullptr) return cudaErrorInvalidConfiguration;
  const int64_t grid = row_grid(N, choice.rows_per_block);
  choice.kernel<<<static_cast<int>(grid), choice.threads, 0, stream>>>(
      x, w, y, rstd, N, static_cast<int>(C), eps, vec);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gpu::rms_norm_bwd_workspace_rows(int64_t N, int64_t C, int64_t* rows) {
  return bwd_grid<T>(N, C, rows);
}

template <typename T>
cudaError_t gpu::rms_norm_bwd(const T* dy, const T* x, const float* w, const float* rstd, T* dx,
                              float* dw, float* workspace, int64_t workspace_rows, int64_t N,
                              int64_t C, cudaStream_t stream) {
  int64_t grid = 0;
  cudaError_t err = bwd_grid<T>(N, C, &grid);
  if (err != cudaSuccess) return err;
  if (grid != workspace_rows) return cudaErrorInvalidValue;
  if (N > 0) {
    const bool vec = C % kVecOf<T> == 0 && aligned16(dy) && aligned16(x) && aligned16(w) &&
                     aligned16(dx) && aligned16(workspace);
    const KernelChoice<BwdKernel<T>> choice = pick_bwd<T>(C);
    choice.kernel<<<static_cast<int>(grid), choice.threads, 0, stream>>>(
        dy, x, w, rstd, dx, workspace, N, static_cast<int>(C), vec);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // With N == 0 there are no partial rows and dw is zeros, as on CPU.
  return sum_partial_rows(workspace, grid, C, dw, nullptr, 1, stream);
}

#define FASTLM_INSTANTIATE_RMS_NORM(T)                                                         \
  template cudaError_t gpu::rms_norm_fwd<T>(const T*, const float*, T*, float*, int64_t,       \
                                            int64_t, float, cudaStream_t);                    \
  template cudaError_t gpu::rms_norm_bwd_workspace_rows<T>(int64_t, int64_t, int64_t*);        \
  template cudaError_t gpu::rms_norm_bwd<T>(const T*, const T*, const float*, const float*, T*, \
                                            float*, float*, int64_t, int64_t, int64_t,         \
                                            cudaStream_t);

FASTLM_INSTANTIATE_RMS_NORM(float)
FASTLM_INSTANTIATE_RMS_NORM(__nv_bfloat16)
FASTLM_INSTANTIATE_RMS_NORM(__half)

}  // namespace fastlm
