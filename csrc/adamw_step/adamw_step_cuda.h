// Torch-free launcher of the CUDA multi-tensor adamw_step (adamw_step_cuda.cu), called by the
// torch glue (adamw_step_cuda_glue.cpp). P is the parameter/gradient element type (float,
// __nv_bfloat16, __half) and S the state type (float or P). All tensors are contiguous on the
// current device. Many tensors are updated per launch; returns the first launch error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "adamw_step/adamw_step_math.h"

namespace fastlm {
namespace gpu {

// master: nullptr, or a float32 master copy per tensor (then S is float). steps and lr: nullptr
// (constants `c` from the host), or one device float32 step per tensor and a device double lr
// (capturable: the kernel computes the constants from them and the step-free hyperparameters h).
template <typename P, typename S>
cudaError_t adamw_step(P* const* params, const P* const* grads, S* const* exp_avgs,
                       S* const* exp_avg_sqs, float* const* master, const float* const* steps,
                       const double* lr, const int64_t* numels, int64_t n_tensors,
                       const AdamWConsts& c, const AdamWHyper& h, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastlm
