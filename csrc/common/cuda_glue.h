// Helpers of the CUDA torch glue (csrc/<op>/<op>_cuda_glue.cpp, compiled by the host compiler
// only when CUDA torch is present): c10 dtypes to the CUDA toolkit's, and launch-error checks.
// The kernels themselves stay torch-free (csrc/<op>/<op>_cuda.cu, csrc/common/cuda_utils.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace fastlm {

// scalar_t of FASTLM_DISPATCH_FLOAT_TYPES -> the element type the launchers take. The c10 and
// CUDA 16-bit types hold the same bits, so tensors' pointers are reinterpreted, not converted.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16) && sizeof(c10::Half) == sizeof(__half),
              "c10 and CUDA 16-bit floats must have the same layout");

// t's data as the launchers' element type (t must have dtype scalar_t).
template <typename scalar_t>
typename CudaType<scalar_t>::type* cuda_data(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

}  // namespace fastlm

// Turns a launcher's cudaError_t into a Python RuntimeError naming the op.
#define FASTLM_CHECK_CUDA(op, expr)                                                         \
  do {                                                                                      \
    const cudaError_t fastlm_err_ = (expr);                                                 \
    TORCH_CHECK(fastlm_err_ == cudaSuccess, "fastlm::", op, ": CUDA error: ",               \
                cudaGetErrorString(fastlm_err_), " (", cudaGetErrorName(fastlm_err_), ")"); \
  } while (0)
