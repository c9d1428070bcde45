// C++ CPU adamw_step: one in-place AdamW update of many tensors in a single pass over memory
// (each element of p, g, m, v is read once and p, m, v written once). The tensors are cut into
// fixed-size pieces and at::parallel_for spreads the pieces of all tensors over the threads, so
// a model of many small tensors parallelises as well as one big one. The inner loop is plain
// float math (sqrt and division vectorise under -O3 -fno-math-errno).
// Three ops share the loop: adamw_step (host step and lr), adamw_step_master (float32 master
// weights for low-precision parameters: the master copy is updated and the parameter receives it
// rounded) and adamw_step_capturable (step per tensor and lr read from tensors, optional master
// weights). On the CPU the capturable op reads its tensors directly and computes the same
// constants as the host path, so both give bit-identical parameters.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "adamw_step/adamw_step_math.h"
#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/dispatch.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "adamw_step";
constexpr int64_t kPiece = 1 << 15;  // elements per task: 32K x (4 tensors) ~ L2-sized

// float <-> storage conversions written as branch-free bit operations so the loop vectorises
// (c10::BFloat16's conversion has a NaN branch that stops gcc). bf16: round to nearest even,
// NaN kept NaN; the same results as c10's.
inline float load_f(float x) { return x; }
inline float load_f(c10::Half x) { return static_cast<float>(x); }
inline float load_f(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename T>
inline T store_f(float f) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const uint16_t out = f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
    return c10::BFloat16(out, c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(f);
  }
}

template <typename P, typename S, bool kMaster>
inline void adamw_range(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                        S* __restrict__ v, float* __restrict__ w, int64_t n,
                        const AdamWConsts c) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = load_f(g[i]);
    const float mi0 = load_f(m[i]);
    const float mi = mi0 + c.one_minus_b1 * (gi - mi0);
    const float vi = c.beta2 * load_f(v[i]) + c.one_minus_b2 * gi * gi;
    const float denom = std::sqrt(vi) * c.inv_sqrt_bc2 + c.eps;
    const float p0 = kMaster ? w[i] : load_f(p[i]);  // the master copy when there is one
    const float pi = p0 * c.decay - c.step_size * mi / denom;
    if constexpr (kMaster) w[i] = pi;
    p[i] = store_f<P>(pi);
    m[i] = store_f<S>(mi);
    v[i] = store_f<S>(vi);
  }
}

// The loop again for AVX2 + FMA (see cpu_math.h, "Runtime ISA choice"), 8 floats per vector.
#ifdef FASTLM_HAVE_AVX2_CLONES
template <typename P, typename S, bool kMaster>
FASTLM_TARGET_AVX2 void adamw_range_avx2(P* __restrict__ p, const P* __restrict__ g,
                                         S* __restrict__ m, S* __restrict__ v,
                                         float* __restrict__ w, int64_t n, const AdamWConsts c) {
  adamw_range<P, S, kMaster>(p, g, m, v, w, n, c);
}
#endif

template <typename P, typename S, bool kMaster>
void adamw_range_best(P* p, const P* g, S* m, S* v, float* w, int64_t n, const AdamWConsts& c) {
#ifdef FASTLM_HAVE_AVX2_CLONES
  if (cpu::cpu_has_avx2()) return adamw_range_avx2<P, S, kMaster>(p, g, m, v, w, n, c);
#endif
  adamw_range<P, S, kMaster>(p, g, m, v, w, n, c);
}

struct Piece {
  int64_t tensor, begin, end;
};

void check_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "fastlm::adamw_step: params, grads, exp_avgs and exp_avg_sqs must have equal "
              "lengths, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
              exp_avg_sqs.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    for (const at::Tensor* t : {&p, &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->device().is_cpu(), "fastlm::adamw_step: tensor ", i, " of a list is on ",
                  t->device(), "; the CPU kernel takes CPU tensors");
      TORCH_CHECK(t->sizes() == p.sizes(), "fastlm::adamw_step: params[", i, "] has shape ",
                  p.sizes(), " but its grad or state has shape ", t->sizes());
    }
    FASTLM_CHECK_FLOAT_DTYPE(kOp, p);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "fastlm::adamw_step: grads[", i,
                "] must have its parameter's dtype ", p.scalar_type(), ", got ",
                grads[i].scalar_type());
    for (const at::Tensor* s : {&exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(s->scalar_type() == p.scalar_type() || s->scalar_type() == at::kFloat,
                  "fastlm::adamw_step: the states of params[", i, "] must be float32 or ",
                  p.scalar_type(), ", got ", s->scalar_type());
      TORCH_CHECK(s->is_contiguous(), "fastlm::adamw_step: the states of params[", i,
                  "] must be contiguous (they are updated in place)");
    }
    TORCH_CHECK(exp_avgs[i].scalar_type() == exp_avg_sqs[i].scalar_type(),
                "fastlm::adamw_step: exp_avgs[", i, "] and exp_avg_sqs[", i,
                "] must share a dtype");
    TORCH_CHECK(p.is_contiguous(), "fastlm::adamw_step: params[", i, "] must be contiguous "
                "(it is updated in place)");
  }
}

// master_params: empty (no master weights) or one float32 CPU tensor per parameter, contiguous,
// of its shape, with float32 states (the point of master weights is float32 optimizer math).
void check_master(at::TensorList params, at::TensorList exp_avgs, at::TensorList master) {
  if (master.empty()) return;
  TORCH_CHECK(master.size() == params.size(), "fastlm::adamw_step: master_params must be empty "
              "or have one tensor per parameter, got ", master.size(), " for ", params.size(),
              " parameters");
  for (size_t i = 0; i < master.size(); ++i) {
    const at::Tensor& w = master[i];
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() &&
                    w.sizes() == params[i].sizes(),
                "fastlm::adamw_step: master_params[", i, "] must be a contiguous float32 CPU "
                "tensor of shape ", params[i].sizes(), ", got ", w.scalar_type(), " ", w.sizes(),
                " on ", w.device());
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat, "fastlm::adamw_step: with master "
                "weights the states of params[", i, "] must be float32, got ",
                exp_avgs[i].scalar_type());
  }
}

// One pass over every tensor; consts[i] are the per-step constants of tensor i.
void run(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
         at::TensorList exp_avg_sqs, at::TensorList master,
         const std::vector<AdamWConsts>& consts) {
  std::vector<at::Tensor> g(grads.size());
  std::vector<Piece> pieces;
  for (size_t i = 0; i < params.size(); ++i) {
    g[i] = grads[i].contiguous();
    const int64_t n = params[i].numel();
    for (int64_t b = 0; b < n; b += kPiece) {
      pieces.push_back({static_cast<int64_t>(i), b, std::min(n, b + kPiece)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Piece& pc = pieces[k];
      const int64_t i = pc.tensor;
      const at::Tensor& p = params[i];
      const AdamWConsts& c = consts[i];
      const bool fp32_state = exp_avgs[i].scalar_type() == at::kFloat;
      FASTLM_DISPATCH_FLOAT_TYPES(p.scalar_type(), kOp, [&] {
        scalar_t* pp = p.data_ptr<scalar_t>() + pc.begin;
        const scalar_t* gp = g[i].data_ptr<scalar_t>() + pc.begin;
        const int64_t n = pc.end - pc.begin;
        if (!master.empty()) {  // checked: float32 states
          adamw_range_best<scalar_t, float, true>(
              pp, gp, exp_avgs[i].data_ptr<float>() + pc.begin,
              exp_avg_sqs[i].data_ptr<float>() + pc.begin,
              master[i].data_ptr<float>() + pc.begin, n, c);
        } else if (fp32_state) {
          adamw_range_best<scalar_t, float, false>(
              pp, gp, exp_avgs[i].data_ptr<float>() + pc.begin,
              exp_avg_sqs[i].data_ptr<float>() + pc.begin, nullptr, n, c);
        } else {
          adamw_range_best<scalar_t, scalar_t, false>(
              pp, gp, exp_avgs[i].data_ptr<scalar_t>() + pc.begin,
              exp_avg_sqs[i].data_ptr<scalar_t>() + pc.begin, nullptr, n, c);
        }
      });
    }
  });
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double step, double lr, double beta1,
                    double beta2, double eps, double weight_decay) {
  check_lists(params, grads, exp_avgs, exp_avg_sqs);
  TORCH_CHECK(step >= 1, "fastlm::adamw_step: step counts from 1, got ", step);
  const AdamWConsts c = adamw_consts(step, lr, beta1, beta2, eps, weight_decay);
  run(params, grads, exp_avgs, exp_avg_sqs, {}, std::vector<AdamWConsts>(params.size(), c));
}

void adamw_step_master_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList master_params, double step,
                           double lr, double beta1, double beta2, double eps,
                           double weight_decay) {
  check_lists(params, grads, exp_avgs, exp_avg_sqs);
  check_master(params, exp_avgs, master_params);
  TORCH_CHECK(step >= 1, "fastlm::adamw_step: step counts from 1, got ", step);
  const AdamWConsts c = adamw_consts(step, lr, beta1, beta2, eps, weight_decay);
  run(params, grads, exp_avgs, exp_avg_sqs, master_params,
      std::vector<AdamWConsts>(params.size(), c));
}

void adamw_step_capturable_cpu(at::TensorList params, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                               at::TensorList master_params, at::TensorList steps,
                               const at::Tensor& lr, double beta1, double beta2, double eps,
                               double weight_decay) {
  check_lists(params, grads, exp_avgs, exp_avg_sqs);
  check_master(params, exp_avgs, master_params);
  TORCH_CHECK(steps.size() == params.size(), "fastlm::adamw_step: steps must hold one tensor "
              "per parameter, got ", steps.size(), " for ", params.size(), " parameters");
  TORCH_CHECK(lr.numel() == 1 && lr.device().is_cpu(), "fastlm::adamw_step: 'lr' must be a "
              "one-element tensor on the parameters' device (cpu), got shape ", lr.sizes(),
              " on ", lr.device());
  const double lr_v = lr.item<double>();  // CPU tensors: reading them costs no sync
  std::vector<AdamWConsts> consts;
  consts.reserve(params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].device().is_cpu(), "fastlm::adamw_step: "
                "steps[", i, "] must be a one-element tensor on the parameters' device (cpu)");
    const double step = steps[i].item<double>();
    TORCH_CHECK(step >= 1, "fastlm::adamw_step: step counts from 1, got ", step,
                " (steps[", i, "])");
    consts.push_back(adamw_consts(step, lr_v, beta1, beta2, eps, weight_decay));
  }
  run(params, grads, exp_avgs, exp_avg_sqs, master_params, consts);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("adamw_step", &adamw_step_cpu);
  m.impl("adamw_step_master", &adamw_step_master_cpu);
  m.impl("adamw_step_capturable", &adamw_step_capturable_cpu);
}

}  // namespace fastlm
