// Torch glue of the CUDA adamw_step ops (adamw_step, adamw_step_master, adamw_step_capturable):
// checks, grouping of the tensors by (parameter dtype, state dtype) so each group is one
// multi-tensor launcher call, the current stream, and the registration for CUDA tensors.
// Semantics are those of adamw_step_cpu.cpp, except that the capturable op never reads its step
// and lr on the host (that is its point), so it cannot check step >= 1.
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

// The tensors of one launcher call, and where the per-step constants come from.
struct Lists {
  at::TensorList params, exp_avgs, exp_avg_sqs, master, steps;
  const std::vector<at::Tensor>& grads;
};

template <typename P, typename S>
void launch(const std::vector<size_t>& idx, const Lists& l, const double* lr,
            const AdamWConsts& c, const AdamWHyper& h, cudaStream_t stream) {
  std::vector<P*> p;
  std::vector<const P*> g;
  std::vector<S*> m, v;
  std::vector<float*> w;
  std::vector<const float*> st;
  std::vector<int64_t> n;
  for (size_t i : idx) {
    p.push_back(reinterpret_cast<P*>(l.params[i].data_ptr()));
    g.push_back(reinterpret_cast<const P*>(l.grads[i].data_ptr()));
    m.push_back(reinterpret_cast<S*>(l.exp_avgs[i].data_ptr()));
    v.push_back(reinterpret_cast<S*>(l.exp_avg_sqs[i].data_ptr()));
    if (!l.master.empty()) w.push_back(l.master[i].data_ptr<float>());
    if (!l.steps.empty()) st.push_back(l.steps[i].data_ptr<float>());
    n.push_back(l.params[i].numel());
  }
  const cudaError_t err = gpu::adamw_step(
      p.data(), g.data(), m.data(), v.data(), w.empty() ? nullptr : w.data(),
      st.empty() ? nullptr : st.data(), lr, n.data(), static_cast<int64_t>(idx.size()), c, h,
      stream);
  FASTLM_CHECK_CUDA(kOp, err);
}

// Checks every list and runs the launcher per dtype group. master and steps may be empty;
// lr (a device double) is used only with steps.
void run(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
         at::TensorList exp_avg_sqs, at::TensorList master, at::TensorList steps,
         const double* lr, const AdamWConsts& c, const AdamWHyper& h) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count,
              "fastlm::adamw_step: params, grads, exp_avgs and exp_avg_sqs must have equal "
              "lengths");
  TORCH_CHECK(master.empty() || master.size() == count, "fastlm::adamw_step: master_params "
              "must be empty or have one tensor per parameter, got ", master.size(), " for ",
              count, " parameters");
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
    if (!master.empty()) {
      const at::Tensor& w = master[i];
      TORCH_CHECK(w.device() == device && w.scalar_type() == at::kFloat && w.is_contiguous() &&
                      w.sizes() == p.sizes() && sdt == at::kFloat,
                  "fastlm::adamw_step: master_params[", i, "] must be a contiguous float32 "
                  "tensor of its parameter's shape on ", device, ", with float32 states");
    }
    if (!steps.empty()) {
      TORCH_CHECK(steps[i].device() == device && steps[i].scalar_type() == at::kFloat &&
                      steps[i].numel() == 1,
                  "fastlm::adamw_step: steps[", i, "] must be a one-element float32 tensor on ",
                  device, " (as torch.optim.AdamW keeps 'step' when capturable)");
    }
    g[i] = grads[i].contiguous();
    groups[{static_cast<int>(p.scalar_type()), static_cast<int>(sdt)}].push_back(i);
  }
  const Lists lists{params, exp_avgs, exp_avg_sqs, master, steps, g};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const auto& [key, idx] : groups) {
    const auto pdt = static_cast<at::ScalarType>(key.first);
    const bool fp32_state = static_cast<at::ScalarType>(key.second) == at::kFloat;
    FASTLM_DISPATCH_FLOAT_TYPES(pdt, kOp, [&] {
      using P = typename CudaType<scalar_t>::type;
      if (fp32_state) {
        launch<P, float>(idx, lists, lr, c, h, stream);
      } else {
        launch<P, P>(idx, lists, lr, c, h, stream);
      }
    });
  }
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, double step, double lr, double beta1,
                     double beta2, double eps, double weight_decay) {
  TORCH_CHECK(step >= 1, "fastlm::adamw_step: step counts from 1, got ", step);
  const AdamWHyper h{beta1, beta2, eps, weight_decay};
  run(params, grads, exp_avgs, exp_avg_sqs, {}, {}, nullptr, adamw_consts(step, lr, h), h);
}

void adamw_step_master_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList master_params,
                            double step, double lr, double beta1, double beta2, double eps,
                            double weight_decay) {
  TORCH_CHECK(step >= 1, "fastlm::adamw_step: step counts from 1, got ", step);
  TORCH_CHECK(master_params.size() == params.size(), "fastlm::adamw_step_master: one master "
              "tensor per parameter, got ", master_params.size(), " for ", params.size());
  const AdamWHyper h{beta1, beta2, eps, weight_decay};
  run(params, grads, exp_avgs, exp_avg_sqs, master_params, {}, nullptr,
      adamw_consts(step, lr, h), h);
}

void adamw_step_capturable_cuda(at::TensorList params, at::TensorList grads,
                                at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                at::TensorList master_params, at::TensorList steps,
                                const at::Tensor& lr, double beta1, double beta2, double eps,
                                double weight_decay) {
  TORCH_CHECK(steps.size() == params.size(), "fastlm::adamw_step: steps must hold one tensor "
              "per parameter, got ", steps.size(), " for ", params.size(), " parameters");
  if (params.empty()) return;
  TORCH_CHECK(lr.numel() == 1 && lr.device() == params[0].device(), "fastlm::adamw_step: 'lr' "
              "must be a one-element tensor on the parameters' device ", params[0].device(),
              ", got shape ", lr.sizes(), " on ", lr.device());
  const c10::cuda::CUDAGuard guard(lr.device());
  const at::Tensor lr64 = lr.to(at::kDouble).contiguous();  // a device cast: no sync
  const AdamWHyper h{beta1, beta2, eps, weight_decay};
  run(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr64.data_ptr<double>(),
      AdamWConsts{}, h);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("adamw_step", &adamw_step_cuda);
  m.impl("adamw_step_master", &adamw_step_master_cuda);
  m.impl("adamw_step_capturable", &adamw_step_capturable_cuda);
}

}  // namespace fastlm
