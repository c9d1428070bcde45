// Torch glue of the CUDA layer_norm: argument checks, allocation on x's device, the current
// stream, dtype dispatch to the torch-free launchers of layer_norm_cuda.cu, and the registration
// for CUDA tensors. Semantics are those of layer_norm_cpu.cpp (schemas in registration.cpp).
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "common/dispatch.h"
#include "layer_norm/layer_norm_cuda.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "layer_norm";

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  check_rows_and_weight(kOp, x, weight, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    check_feature_vector(kOp, x, *bias, "bias");
    b = bias->to(at::kFloat).contiguous();
  }
  const int64_t C = x.size(-1), N = rows_of(x);
  at::IntArrayRef row_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor y = empty_output_like(xc);
  at::Tensor mean = empty_output(row_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = empty_output(row_shape, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    FASTLM_CHECK_CUDA(kOp, gpu::layer_norm_fwd(cuda_data<scalar_t>(xc), w.data_ptr<float>(),
                                               b.defined() ? b.data_ptr<float>() : nullptr,
                                               cuda_data<scalar_t>(y), mean.data_ptr<float>(),
                                               rstd.data_ptr<float>(), N, C,
                                               static_cast<float>(eps), stream));
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool has_bias) {
  check_rows_and_weight(kOp, x, weight, at::kCUDA);
  check_like_x(kOp, x, dy, "dy");
  check_row_stats(kOp, x, mean, "mean");
  check_row_stats(kOp, x, rstd, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor dyc = dy.to(x.scalar_type()).contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const int64_t C = x.size(-1), N = rows_of(x);
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = empty_output_like(xc);
  at::Tensor dw = empty_output({C}, f32);
  at::Tensor db = has_bias ? empty_output({C}, f32) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    using T = typename CudaType<scalar_t>::type;
    // Per-block float32 partials of dweight and dbias (every element is written by the kernel).
    int64_t rows = 0;
    FASTLM_CHECK_CUDA(kOp, gpu::layer_norm_bwd_workspace_rows<T>(N, C, &rows));
    at::Tensor workspace = at::empty({2, rows, C}, f32);
    FASTLM_CHECK_CUDA(kOp, gpu::layer_norm_bwd(cuda_data<scalar_t>(dyc), cuda_data<scalar_t>(xc),
                                               w.data_ptr<float>(), mc.data_ptr<float>(),
                                               rc.data_ptr<float>(), cuda_data<scalar_t>(dx),
                                               dw.data_ptr<float>(),
                                               has_bias ? db.data_ptr<float>() : nullptr,
                                               workspace.data_ptr<float>(), rows, N, C, stream));
  });
  return {dx, dw.to(weight.scalar_type()),
          has_bias ? db.to(weight.scalar_type()) : at::empty({0}, weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace fastlm
