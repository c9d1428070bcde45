// Torch-free launchers of the CUDA layer_norm kernels (layer_norm_cuda.cu), called by the torch
// glue (layer_norm_cuda_glue.cpp). T is float, __nv_bfloat16 or __half; x, dy, y, dx are
// contiguous (N, C) rows; weight, bias, mean, rstd and the gradients are float32. Every launcher
// runs on `stream` and returns the launch error (cudaSuccess when all kernels were queued).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {
namespace gpu {

// y = (x - mean) * rstd * w + b (b may be nullptr); mean, rstd: (N,). N == 0 launches nothing.
template <typename T>
cudaError_t layer_norm_fwd(const T* x, const float* w, const float* b, T* y, float* mean,
                           float* rstd, int64_t N, int64_t C, float eps, cudaStream_t stream);

// Rows R of the float32 workspace (2, R, C) that layer_norm_bwd needs for N rows of C columns on
// the current device (one partial row of dweight and of dbias per block of the row kernel).
template <typename T>
cudaError_t layer_norm_bwd_workspace_rows(int64_t N, int64_t C, int64_t* rows);

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, xhat = (x - mean) * rstd;
// dw = sum over rows of dy * xhat, db = sum of dy (db may be nullptr: not computed), both (C,)
// float32 and deterministic. workspace: (2, workspace_rows, C) float32 from
// layer_norm_bwd_workspace_rows (a different size returns cudaErrorInvalidValue).
template <typename T>
cudaError_t layer_norm_bwd(const T* dy, const T* x, const float* w, const float* mean,
                           const float* rstd, T* dx, float* dw, float* db, float* workspace,
                           int64_t workspace_rows, int64_t N, int64_t C, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastlm
