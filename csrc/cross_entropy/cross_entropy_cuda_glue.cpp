// Torch glue of the CUDA cross_entropy: argument checks, allocation on the logits' device, the
// current stream, dtype dispatch to the torch-free launchers of cross_entropy_cuda.cu, and the
// registration for CUDA tensors. Semantics are those of cross_entropy_cpu.cpp, except that target
// values are not range-checked on the device (that would cost a sync per call).
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "common/dispatch.h"
#include "cross_entropy/cross_entropy_cuda.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "cross_entropy";

void check_inputs(const at::Tensor& logits, const at::Tensor& target) {
  FASTLM_CHECK_DEVICE(kOp, logits, at::kCUDA);
  TORCH_CHECK(target.device() == logits.device(), "fastlm::cross_entropy: target must be on the "
              "logits' device ", logits.device(), ", got ", target.device());
  FASTLM_CHECK_FLOAT_DTYPE(kOp, logits);
  FASTLM_CHECK_DTYPE(kOp, target, at::kLong);
  FASTLM_CHECK_DIM(kOp, logits, 2);
  FASTLM_CHECK_DIM(kOp, target, 1);
  TORCH_CHECK(target.size(0) == logits.size(0), "fastlm::cross_entropy: target must have ",
              logits.size(0), " entries (one per row of logits), got ", target.size(0));
  TORCH_CHECK(logits.size(1) > 0, "fastlm::cross_entropy: logits must have at least one class");
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits,
                                                          const at::Tensor& target,
                                                          int64_t ignore_index,
                                                          double label_smoothing, double z_loss) {
  check_inputs(logits, target);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const int64_t N = x.size(0), V = x.size(1);
  at::Tensor loss = empty_output({N}, x.options().dtype(at::kFloat));
  at::Tensor lse = empty_output({N}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    FASTLM_CHECK_CUDA(kOp, gpu::cross_entropy_fwd(cuda_data<scalar_t>(x), t.data_ptr<int64_t>(),
                                                  loss.data_ptr<float>(), lse.data_ptr<float>(),
                                                  N, V, ignore_index,
                                                  static_cast<float>(label_smoothing),
                                                  static_cast<float>(z_loss), stream));
  });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& dloss, const at::Tensor& logits,
                                  const at::Tensor& target, const at::Tensor& lse,
                                  int64_t ignore_index, double label_smoothing, double z_loss) {
  check_inputs(logits, target);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(dloss.numel() == N && lse.numel() == N, "fastlm::cross_entropy_bwd: dloss and lse "
              "must have shape (", N, ",), got ", dloss.sizes(), " and ", lse.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor dl = dloss.to(at::kFloat).contiguous();  // "mean"/"sum" hand an expanded one
  const at::Tensor ls = lse.to(at::kFloat).contiguous();
  at::Tensor g = empty_output_like(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    FASTLM_CHECK_CUDA(kOp, gpu::cross_entropy_bwd(dl.data_ptr<float>(), cuda_data<scalar_t>(x),
                                                  t.data_ptr<int64_t>(), ls.data_ptr<float>(),
                                                  cuda_data<scalar_t>(g), N, V, ignore_index,
                                                  static_cast<float>(label_smoothing),
                                                  static_cast<float>(z_loss), stream));
  });
  return g;
}

at::Tensor cross_entropy_fwd_inplace_cuda(const at::Tensor& logits, const at::Tensor& target,
                                          const at::Tensor& scale, int64_t ignore_index,
                                          double label_smoothing, double z_loss) {
  check_inputs(logits, target);
  TORCH_CHECK(logits.is_contiguous(), "fastlm::cross_entropy_fwd_inplace: 'logits' must be "
              "contiguous (their gradient is written into their own storage)");
  TORCH_CHECK(scale.numel() == 1 && scale.device() == logits.device(),
              "fastlm::cross_entropy_fwd_inplace: 'scale' must be a one-element tensor on the "
              "logits' device ", logits.device(), ", got shape ", scale.sizes(), " on ",
              scale.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor t = target.contiguous();
  const at::Tensor sc = scale.to(at::kFloat).contiguous();  // read by the kernel: no sync
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor loss = empty_output({N}, logits.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  FASTLM_DISPATCH_FLOAT_TYPES(logits.scalar_type(), kOp, [&] {
    FASTLM_CHECK_CUDA(kOp, gpu::cross_entropy_fwd_inplace(
                               cuda_data<scalar_t>(logits), t.data_ptr<int64_t>(),
                               sc.data_ptr<float>(), loss.data_ptr<float>(), N, V, ignore_index,
                               static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                               stream));
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace_cuda);
}

}  // namespace fastlm
