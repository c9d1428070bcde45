// Torch glue of the CUDA rms_norm: argument checks, allocation on x's device, the current stream,
// dtype dispatch to the torch-free launchers of rms_norm_cuda.cu, and the registration for CUDA
// tensors. Semantics are those of rms_norm_cpu.cpp (schemas in registration.cpp).
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "common/dispatch.h"
#include "rms_norm/rms_norm_cuda.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "rms_norm";

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                     double eps) {
  check_rows_and_weight(kOp, x, weight, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const int64_t C = x.size(-1), N = rows_of(x);
  at::Tensor y = empty_output_like(xc);
  at::Tensor rstd = empty_output(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    FASTLM_CHECK_CUDA(kOp, gpu::rms_norm_fwd(cuda_data<scalar_t>(xc), w.data_ptr<float>(),
                                             cuda_data<scalar_t>(y), rstd.data_ptr<float>(), N, C,
                                             static_cast<float>(eps), stream));
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& weight,
                                                     const at::Tensor& rstd) {
  check_rows_and_weight(kOp, x, weight, at::kCUDA);
  check_like_x(kOp, x, dy, "dy");
  check_row_stats(kOp, x, rstd, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor dyc = dy.to(x.scalar_type()).contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor rc = rstd.contiguous();
  const int64_t C = x.size(-1), N = rows_of(x);
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = empty_output_like(xc);
  at::Tensor dw = empty_output({C}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    using T = typename CudaType<scalar_t>::type;
    // Per-block float32 partials of dweight (every element is written by the kernel).
    int64_t rows = 0;
    FASTLM_CHECK_CUDA(kOp, gpu::rms_norm_bwd_workspace_rows<T>(N, C, &rows));
    at::Tensor workspace = at::empty({rows, C}, f32);
    FASTLM_CHECK_CUDA(kOp, gpu::rms_norm_bwd(cuda_data<scalar_t>(dyc), cuda_data<scalar_t>(xc),
                                             w.data_ptr<float>(), rc.data_ptr<float>(),
                                             cuda_data<scalar_t>(dx), dw.data_ptr<float>(),
                                             workspace.data_ptr<float>(), rows, N, C, stream));
  });
  return {dx, dw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
}

}  // namespace fastlm
