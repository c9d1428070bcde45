// Torch-free launchers of the CUDA rms_norm kernels (rms_norm_cuda.cu), called by the torch glue
// (rms_norm_cuda_glue.cpp). T is float, __nv_bfloat16 or __half; x, dy, y, dx are contiguous
// (N, C) rows; weight, rstd and dweight are float32. Every launcher runs on `stream` and returns
// the launch error (cudaSuccess when all kernels were queued).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {
namespace gpu {

// y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps): (N,). N == 0 launches nothing.
template <typename T>
cudaError_t rms_norm_fwd(const T* x, const float* w, T* y, float* rstd, int64_t N, int64_t C,
                         float eps, cudaStream_t stream);

// Rows R of the float32 workspace (R, C) that rms_norm_bwd needs for N rows of C columns on the
// current device (one partial row of dweight per block of the row kernel).
template <typename T>
cudaError_t rms_norm_bwd_workspace_rows(int64_t N, int64_t C, int64_t* rows);

// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd; dw = sum over rows of
// dy * xhat, (C,) float32, deterministic. workspace: (workspace_rows, C) float32 from
// rms_norm_bwd_workspace_rows (a different size returns cudaErrorInvalidValue).
template <typename T>
cudaError_t rms_norm_bwd(const T* dy, const T* x, const float* w, const float* rstd, T* dx,
                         float* dw, float* workspace, int64_t workspace_rows, int64_t N, int64_t C,
                         cudaStream_t stream);

}  // namespace gpu
}  // namespace fastlm
