// C++ CPU attention (forward and backward) and its registration for CPU tensors.
// q (B, H, Tq, D), k and v (B, H_kv, Tk, D), H % H_kv == 0. Inputs are upcast to float32 (the
// kernels' only dtype); outputs come back in q's dtype, lse (B, H, Tq) in float32.
// Parallel over batch x query heads with at::parallel_for; each task runs the tiled kernels of
// attention_tiles.h on one head, so memory stays linear in T (no T x T scores anywhere).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_math.h"

// One copy of the kernels per instruction set (see attention_tiles.h): SSE2 (any x86-64 or other
// CPU), AVX2+FMA and AVX-512, chosen at run time. Builds stay portable (no -march=native) and
// still use the machine's widest FMA. fp-contract=fast lets a * b + c become one FMA.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#define FASTLM_ATTN_VW 4
namespace fastlm::attention_generic {
#include "attention/attention_tiles.h"
}  // namespace fastlm::attention_generic
#undef FASTLM_ATTN_VW
#pragma GCC pop_options

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTLM_ATTN_X86 1
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#pragma GCC target("avx2,fma")
#define FASTLM_ATTN_VW 8
namespace fastlm::attention_avx2 {
#include "attention/attention_tiles.h"
}  // namespace fastlm::attention_avx2
#undef FASTLM_ATTN_VW
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")
#define FASTLM_ATTN_VW 16
namespace fastlm::attention_avx512 {
#include "attention/attention_tiles.h"
}  // namespace fastlm::attention_avx512
#undef FASTLM_ATTN_VW
#pragma GCC pop_options
#endif

namespace fastlm {
namespace {

constexpr const char* kOp = "attention";

struct Kernels {
  void (*forward)(const float*, const float*, const float*, float*, float*, int64_t, float,
                  const attention_generic::Mask&);
  void (*backward)(const float*, const float*, const float*, const float*, const float*,
                   const float*, float*, float*, float*, int64_t, float,
                   const attention_generic::Mask&);
  const char* isa;  // which version was chosen (for a debugger; not exposed)
};

// The Mask structs of the three versions are the same plain struct in different namespaces;
// the wrappers convert so one function-pointer type serves all.
template <typename M>
M convert(const attention_generic::Mask& m) {
  return M{m.Tq, m.Tk, m.causal, m.window};
}

const Kernels& kernels() {
  static const Kernels chosen = [] {
#ifdef FASTLM_ATTN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
      return Kernels{
          [](const float* q, const float* k, const float* v, float* o, float* l, int64_t D,
             float s, const attention_generic::Mask& m) {
            attention_avx512::forward_head(q, k, v, o, l, D, s,
                                           convert<attention_avx512::Mask>(m));
          },
          [](const float* q, const float* k, const float* v, const float* o, const float* dout,
             const float* lse, float* dq, float* dk, float* dv, int64_t D, float s,
             const attention_generic::Mask& m) {
            attention_avx512::backward_head(q, k, v, o, dout, lse, dq, dk, dv, D, s,
                                            convert<attention_avx512::Mask>(m));
          },
          "avx512"};
    }
    if (cpu::cpu_has_avx2()) {
      return Kernels{
          [](const float* q, const float* k, const float* v, float* o, float* l, int64_t D,
             float s, const attention_generic::Mask& m) {
            attention_avx2::forward_head(q, k, v, o, l, D, s, convert<attention_avx2::Mask>(m));
          },
          [](const float* q, const float* k, const float* v, const float* o, const float* dout,
             const float* lse, float* dq, float* dk, float* dv, int64_t D, float s,
             const attention_generic::Mask& m) {
            attention_avx2::backward_head(q, k, v, o, dout, lse, dq, dk, dv, D, s,
                                          convert<attention_avx2::Mask>(m));
          },
          "avx2"};
    }
#endif
    return Kernels{&attention_generic::forward_head, &attention_generic::backward_head,
                   "generic"};
  }();
  return chosen;
}

struct Shape {
  int64_t B, H, Hkv, Tq, Tk, D;
};

Shape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  FASTLM_CHECK_DEVICE(kOp, q, at::kCPU);
  FASTLM_CHECK_DEVICE(kOp, k, at::kCPU);
  FASTLM_CHECK_DEVICE(kOp, v, at::kCPU);
  FASTLM_CHECK_FLOAT_DTYPE(kOp, q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastlm::attention: q, k and v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  FASTLM_CHECK_DIM(kOp, q, 4);
  FASTLM_CHECK_DIM(kOp, k, 4);
  FASTLM_CHECK_DIM(kOp, v, 4);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "fastlm::attention: k and v must have equal shapes (B, H_kv, Tk, D) sharing B and D "
              "with q (B, H, Tq, D), got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "fastlm::attention: query heads (",
              q.size(1), ") must be a multiple of key/value heads (", k.size(1), ")");
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
}

at::Tensor as_float_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// A float32 buffer the kernel fills: the output itself when it is float32, else a scratch tensor
// (poisoned like outputs, so an unwritten element still shows) copied into it afterwards.
at::Tensor float_target(const at::Tensor& out) {
  if (out.scalar_type() == at::kFloat) return out;
  return empty_output(out.sizes(), out.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal,
                                                     double scale, int64_t window) {
  const Shape s = check_inputs(q, k, v);
  const at::Tensor qf = as_float_contiguous(q), kf = as_float_contiguous(k),
                   vf = as_float_contiguous(v);
  at::Tensor out = empty_output({s.B, s.H, s.Tq, s.D}, q.options());
  at::Tensor lse = empty_output({s.B, s.H, s.Tq}, q.options().dtype(at::kFloat));
  at::Tensor of = float_target(out);
  const attention_generic::Mask mask{s.Tq, s.Tk, causal, window};
  const Kernels& kern = kernels();
  const int64_t n_rep = s.H / s.Hkv;
  const float* qp = qf.data_ptr<float>();
  const float* kp = kf.data_ptr<float>();
  const float* vp = vf.data_ptr<float>();
  float* op = of.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bkv = bh / s.H * s.Hkv + bh % s.H / n_rep;  // its key/value head
      kern.forward(qp + bh * s.Tq * s.D, kp + bkv * s.Tk * s.D, vp + bkv * s.Tk * s.D,
                   op + bh * s.Tq * s.D, lp + bh * s.Tq, s.D, static_cast<float>(scale), mask);
    }
  });
  if (!of.is_same(out)) out.copy_(of);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, int64_t window) {
  const Shape s = check_inputs(q, k, v);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "fastlm::attention_bwd: dout and out must have q's shape ", q.sizes(), ", got ",
              dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == s.B &&
                  lse.size(1) == s.H && lse.size(2) == s.Tq,
              "fastlm::attention_bwd: lse must be the float32 (B, H, Tq) tensor the forward "
              "returned, got ", lse.scalar_type(), " ", lse.sizes());
  const at::Tensor qf = as_float_contiguous(q), kf = as_float_contiguous(k),
                   vf = as_float_contiguous(v), of = as_float_contiguous(out),
                   dof = as_float_contiguous(dout), lf = lse.contiguous();
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dqf = float_target(dq);
  // dk and dv of every query head, summed below over the heads sharing a key/value head.
  at::Tensor dkh = empty_output({s.B, s.H, s.Tk, s.D}, q.options().dtype(at::kFloat));
  at::Tensor dvh = empty_output({s.B, s.H, s.Tk, s.D}, q.options().dtype(at::kFloat));
  const attention_generic::Mask mask{s.Tq, s.Tk, causal, window};
  const Kernels& kern = kernels();
  const int64_t n_rep = s.H / s.Hkv;
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bkv = bh / s.H * s.Hkv + bh % s.H / n_rep;
      const int64_t qo = bh * s.Tq * s.D, ko = bkv * s.Tk * s.D, kho = bh * s.Tk * s.D;
      kern.backward(qf.data_ptr<float>() + qo, kf.data_ptr<float>() + ko,
                    vf.data_ptr<float>() + ko, of.data_ptr<float>() + qo,
                    dof.data_ptr<float>() + qo, lf.data_ptr<float>() + bh * s.Tq,
                    dqf.data_ptr<float>() + qo, dkh.data_ptr<float>() + kho,
                    dvh.data_ptr<float>() + kho, s.D, static_cast<float>(scale), mask);
    }
  });
  if (!dqf.is_same(dq)) dq.copy_(dqf);
  auto per_kv_head = [&](const at::Tensor& g) {
    at::Tensor summed = n_rep == 1 ? g : g.view({s.B, s.Hkv, n_rep, s.Tk, s.D}).sum(2);
    return summed.to(k.scalar_type());
  };
  return {dq, per_kv_head(dkh), per_kv_head(dvh)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastlm
