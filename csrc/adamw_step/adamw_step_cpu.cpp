// C++ CPU adamw_step: one in-place AdamW update of many tensors in a single pass over memory
// (each element of p, g, m, v is read once and p, m, v written once). The tensors are cut into
// fixed-size pieces and at::parallel_for spreads the pieces of all tensors over the threads, so
// a model of many small tensors parallelises as well as one big one. The inner loop is plain
// float math (sqrt and division vectorise under -O3 -fno-math-errno).
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

template <typename P, typename S>
inline void adamw_range(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                        S* __restrict__ v, int64_t n, const AdamWConsts c) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = load_f(g[i]);
    const float mi0 = load_f(m[i]);
    const float mi = mi0 + c.one_minus_b1 * (gi - mi0);
    const float vi = c.beta2 * load_f(v[i]) + c.one_minus_b2 * gi * gi;
    const float denom = std::sqrt(vi) * c.inv_sqrt_bc2 + c.eps;
    p[i] = store_f<P>(load_f(p[i]) * c.decay - c.step_size * mi / denom);
    m[i] = store_f<S>(mi);
    v[i] = store_f<S>(vi);
  }
}

// The loop again for AVX2 + FMA (see cpu_math.h, "Runtime ISA choice"), 8 floats per vector.
#ifdef FASTLM_HAVE_AVX2_CLONES
template <typename P, typename S>
FASTLM_TARGET_AVX2 void adamw_range_avx2(P* __restrict__ p, const P* __restrict__ g,
                                         S* __restrict__ m, S* __restrict__ v, int64_t n,
                                         const AdamWConsts c) {
  adamw_range(p, g, m, v, n, c);
}
#endif

template <typename P, typename S>
void adamw_range_best(P* p, const P* g, S* m, S* v, int64_t n, const AdamWConsts& c) {
#ifdef FASTLM_HAVE_AVX2_CLONES
  if (cpu::cpu_has_avx2()) return adamw_range_avx2(p, g, m, v, n, c);
#endif
  adamw_range(p, g, m, v, n, c);
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

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double step, double lr, double beta1,
                    double beta2, double eps, double weight_decay) {
  check_lists(params, grads, exp_avgs, exp_avg_sqs);
  TORCH_CHECK(step >= 1, "fastlm::adamw_step: step counts from 1, got ", step);
  const AdamWConsts c = adamw_consts(step, lr, beta1, beta2, eps, weight_decay);
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
      const at::Tensor& p = params[pc.tensor];
      const bool fp32_state = exp_avgs[pc.tensor].scalar_type() == at::kFloat;
      FASTLM_DISPATCH_FLOAT_TYPES(p.scalar_type(), kOp, [&] {
        scalar_t* pp = p.data_ptr<scalar_t>() + pc.begin;
        const scalar_t* gp = g[pc.tensor].data_ptr<scalar_t>() + pc.begin;
        const int64_t n = pc.end - pc.begin;
        if (fp32_state) {
          adamw_range_best(pp, gp, exp_avgs[pc.tensor].data_ptr<float>() + pc.begin,
                      exp_avg_sqs[pc.tensor].data_ptr<float>() + pc.begin, n, c);
        } else {
          adamw_range_best(pp, gp, exp_avgs[pc.tensor].data_ptr<scalar_t>() + pc.begin,
                      exp_avg_sqs[pc.tensor].data_ptr<scalar_t>() + pc.begin, n, c);
        }
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("adamw_step", &adamw_step_cpu); }

}  // namespace fastlm
