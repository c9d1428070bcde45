// Torch glue of the CUDA adamw_step: checks, grouping of the tensors by (parameter dtype, state
// dtype) so each group is one multi-tensor launcher call, the current stream, and the
// registration for CUDA tensors. Semantics are those of adamw_step_cpu.cpp.
#include <map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adamw_step/adamw_step_cuda.h"
#include "common/checks.h"
#include "common/cuda_glue.h"
#include "common/dispatch.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "adamw_step";

template <typename P, typename S>
void launch(const std::vector<size_t>& idx, at::TensorList params,
            const std::vector<at::Tensor>& grads, at::TensorList exp_avgs,
            at::TensorList exp_avg_sqs, const AdamWConsts& c, cudaStream_t stream) {
  std::vector<P*> p;
  std::vector<const P*> g;
  std::vector<S*> m, v;
  std::vector<int64_t> n;
  for (size_t i : idx) {
    p.push_back(reinterpret_cast<P*>(params[i].data_ptr()));
    g.push_back(reinterpret_cast<const P*>(grads[i].data_ptr()));
    m.push_back(reinterpret_cast<S*>(exp_avgs[i].data_ptr()));
    v.push_back(reinterpret_cast<S*>(exp_avg_sqs[i].data_ptr()));
    n.push_back(params[i].numel());
  }
  const cudaError_t err = gpu::adamw_step(p.data(), g.data(), m.data(), v.data(), n.data(),
                                          static_cast<int64_t>(idx.size()), c, stream);
  FASTLM_CHECK_CUDA(kOp, err);
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, double step, double lr, double beta1,
                     double beta2, double eps, double weight_decay) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count,
              "fastlm::adamw_step: params, grads, exp_avgs and exp_avg_sqs must have equal "
              "lengths");
  TORCH_CHECK(step >= 1, "fastlm::adamw_step: step counts from 1, got ", step);
  if (count == 0) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> g(count);
  // (param dtype, state dtype) -> indices of the tensors of that group
  std::map<std::pair<int, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    for (const at::Tensor* t : {&p, &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->device() == device, "fastlm::adamw_step: every tensor must be on ", device,
                  ", got one on ", t->device(), " (index ", i, ")");
      TORCH_CHECK(t->sizes() == p.sizes(), "fastlm::adamw_step: params[", i, "] has shape ",
                  p.sizes(), " but its grad or state has shape ", t->sizes());
    }
    FASTLM_CHECK_FLOAT_DTYPE(kOp, p);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "fastlm::adamw_step: grads[", i,
                "] must have its parameter's dtype ", p.scalar_type());
    const at::ScalarType sdt = exp_avgs[i].scalar_type();
    TORCH_CHECK(exp_avg_sqs[i].scalar_type() == sdt && (sdt == at::kFloat || sdt == p.scalar_type()),
                "fastlm::adamw_step: the states of params[", i, "] must both be float32 or ",
                p.scalar_type());
    TORCH_CHECK(p.is_contiguous() && exp_avgs[i].is_contiguous() && exp_avg_sqs[i].is_contiguous(),
                "fastlm::adamw_step: params[", i, "] and its states must be contiguous (they are "
                "updated in place)");
    g[i] = grads[i].contiguous();
    groups[{static_cast<int>(p.scalar_type()), static_cast<int>(sdt)}].push_back(i);
  }
  const AdamWConsts c = adamw_consts(step, lr, beta1, beta2, eps, weight_decay);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const auto& [key, idx] : groups) {
    const auto pdt = static_cast<at::ScalarType>(key.first);
    const bool fp32_state = static_cast<at::ScalarType>(key.second) == at::kFloat;
    FASTLM_DISPATCH_FLOAT_TYPES(pdt, kOp, [&] {
      using P = typename CudaType<scalar_t>::type;
      if (fp32_state) {
        launch<P, float>(idx, params, g, exp_avgs, exp_avg_sqs, c, stream);
      } else {
        launch<P, P>(idx, params, g, exp_avgs, exp_avg_sqs, c, stream);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) { m.impl("adamw_step", &adamw_step_cuda); }

}  // namespace fastlm
