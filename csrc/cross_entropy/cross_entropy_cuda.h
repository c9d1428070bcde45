// Torch-free launchers of the CUDA cross_entropy kernels (cross_entropy_cuda.cu), called by the
// torch glue (cross_entropy_cuda_glue.cpp). T is float, __nv_bfloat16 or __half; logits and
// dlogits are contiguous (N, V); target (N,) int64; loss, lse, dloss (N,) float32. Launchers run
// on `stream` and return the launch error. Semantics: csrc/cross_entropy/cross_entropy_rows.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {
namespace gpu {

template <typename T>
cudaError_t cross_entropy_fwd(const T* logits, const int64_t* target, float* loss, float* lse,
                              int64_t N, int64_t V, int64_t ignore_index, float label_smoothing,
                              float z_loss, cudaStream_t stream);

template <typename T>
cudaError_t cross_entropy_bwd(const float* dloss, const T* logits, const int64_t* target,
                              const float* lse, T* dlogits, int64_t N, int64_t V,
                              int64_t ignore_index, float label_smoothing, float z_loss,
                              cudaStream_t stream);

// Fused forward + backward in place: loss (N,) and scale[0] * dloss/dlogits written over logits.
template <typename T>
cudaError_t cross_entropy_fwd_inplace(T* logits, const int64_t* target, const float* scale,
                                      float* loss, int64_t N, int64_t V, int64_t ignore_index,
                                      float label_smoothing, float z_loss, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastlm
