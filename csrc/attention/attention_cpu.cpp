// C++ CPU attention (forward and backward) and its registration for CPU tensors.
// q (B, H, Tq, D), k and v (B, H_kv, Tk, D), H % H_kv == 0, at any strides: float32 inputs with
// unit feature stride are read in place; bfloat16 and float16 heads are widened to float32 (the
// kernels' only dtype) per task in a small scratch and their results narrowed straight into the
// outputs (see LowpHead). Outputs come back in q's dtype laid out (B, T, H, D) (see
// heads_inner), lse (B, H, Tq) in float32.
// Parallel over batch x query heads with at::parallel_for; each task runs the tiled kernels of
// attention_tiles.h on one head, so memory stays linear in T (no T x T scores anywhere).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
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

// Kernel entry points on raw pointers and row strides: each instruction set's version has its
// own Rows and Mask types (the same plain structs in different namespaces), so the function
// pointers take plain arguments and the wrappers build that version's structs.
struct Kernels {
  void (*forward)(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                  int64_t ldv, float* out, int64_t ldo, float* lse, int64_t D, float scale,
                  const attention_generic::Mask& mask);
  void (*backward)(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                   int64_t ldv, const float* out, int64_t ldo, const float* dout, int64_t lddo,
                   const float* lse, float* dq, int64_t lddq, float* dk, int64_t lddk, float* dv,
                   int64_t lddv, int64_t D, float scale, const attention_generic::Mask& mask);
  const char* isa;  // which version was chosen (for a debugger; not exposed)
};

#define FASTLM_ATTN_KERNELS(ns, name)                                                         \
  Kernels {                                                                                   \
    [](const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv, \
       float* o, int64_t ldo, float* l, int64_t D, float s, const attention_generic::Mask& m) { \
      ns::forward_head({q, ldq}, {k, ldk}, {v, ldv}, o, ldo, l, D, s,                         \
                       ns::Mask{m.Tq, m.Tk, m.causal, m.window});                             \
    },                                                                                        \
    [](const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv, \
       const float* o, int64_t ldo, const float* g, int64_t ldg, const float* l, float* dq,   \
       int64_t lddq, float* dk, int64_t lddk, float* dv, int64_t lddv, int64_t D, float s,    \
       const attention_generic::Mask& m) {                                                    \
      ns::backward_head({q, ldq}, {k, ldk}, {v, ldv}, {o, ldo}, {g, ldg}, l, dq, lddq, dk,    \
                        lddk, dv, lddv, D, s, ns::Mask{m.Tq, m.Tk, m.causal, m.window});      \
    },                                                                                        \
    name                                                                                      \
  }

const Kernels& kernels() {
  static const Kernels chosen = [] {
#ifdef FASTLM_ATTN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
      return FASTLM_ATTN_KERNELS(attention_avx512, "avx512");
    }
    if (cpu::cpu_has_avx2()) return FASTLM_ATTN_KERNELS(attention_avx2, "avx2");
#endif
    return FASTLM_ATTN_KERNELS(attention_generic, "generic");
  }();
  return chosen;
}
#undef FASTLM_ATTN_KERNELS

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

// The kernels read float32 rows of D contiguous floats at any batch, head and row strides: a
// float32 view with unit feature stride (q, k, v split out of one fused qkv projection, a
// gradient arriving as a transposed view) goes in as it is; anything else is converted once.
at::Tensor readable(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && (t.stride(3) == 1 || t.size(3) == 1)) return t;
  return t.to(at::kFloat).contiguous();
}

// A view whose rows have unit feature stride (what LowpHead reads and writes), copied only when
// they do not.
at::Tensor unit_feature_stride(const at::Tensor& t) {
  return t.stride(3) == 1 || t.size(3) == 1 ? t : t.contiguous();
}

// Rows of a bfloat16 or float16 head <-> a dense float32 block (row stride D). Compiled twice
// (generic and AVX2) like cpu_math.h's row functions: a head's conversion is a few thousand
// elements, next to kernels of ~10-50 us per head.
template <typename T>
FASTLM_CLONE_INLINE void widen_rows(const T* src, int64_t ld, int64_t rows, int64_t D,
                                    float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < D; ++i) dst[r * D + i] = static_cast<float>(src[r * ld + i]);
}

template <typename T>
FASTLM_CLONE_INLINE void narrow_rows(const float* src, int64_t rows, int64_t D, T* dst,
                                     int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < D; ++i) dst[r * ld + i] = static_cast<T>(src[r * D + i]);
}

#ifdef FASTLM_HAVE_AVX2_CLONES
template <typename T>
FASTLM_TARGET_AVX2 void widen_rows_avx2(const T* src, int64_t ld, int64_t rows, int64_t D,
                                        float* dst) {
  widen_rows(src, ld, rows, D, dst);
}

template <typename T>
FASTLM_TARGET_AVX2 void narrow_rows_avx2(const float* src, int64_t rows, int64_t D, T* dst,
                                         int64_t ld) {
  narrow_rows(src, rows, D, dst, ld);
}
#endif

// Head (b, h) of a (B, H, T, D) bfloat16 or float16 tensor with unit feature stride, converted to
// and from float32 blocks of rows x D.
template <typename T>
struct LowpHead {
  const at::Tensor& t;
  T* p;
  explicit LowpHead(const at::Tensor& t) : t(t), p(t.data_ptr<T>()) {}
  T* at(int64_t b, int64_t h) const { return p + b * t.stride(0) + h * t.stride(1); }
  void widen(int64_t b, int64_t h, float* dst) const {
    const int64_t ld = t.stride(2), rows = t.size(2), D = t.size(3);
#ifdef FASTLM_HAVE_AVX2_CLONES
    if (cpu::cpu_has_avx2()) return widen_rows_avx2(at(b, h), ld, rows, D, dst);
#endif
    widen_rows(at(b, h), ld, rows, D, dst);
  }
  void narrow(const float* src, int64_t b, int64_t h) const {
    const int64_t ld = t.stride(2), rows = t.size(2), D = t.size(3);
#ifdef FASTLM_HAVE_AVX2_CLONES
    if (cpu::cpu_has_avx2()) return narrow_rows_avx2(src, rows, D, at(b, h), ld);
#endif
    narrow_rows(src, rows, D, at(b, h), ld);
  }
};

// Head (b, h) of a (B, H, T, D) float32 tensor: its first element and its row (T) stride.
struct Head {
  const at::Tensor& t;
  float* p;
  Head(const at::Tensor& t) : t(t), p(t.data_ptr<float>()) {}
  float* at(int64_t b, int64_t h) const { return p + b * t.stride(0) + h * t.stride(1); }
  int64_t ld() const { return t.stride(2); }
};

// A new (B, H, T, D) tensor laid out (B, T, H, D) (heads inner): the layout the model's
// y.transpose(1, 2).reshape(B, T, C) and the backward of its q/k/v views want, so neither copies.
// The fake kernels (fastlm/ops/autograd.py) give the same strides.
at::Tensor heads_inner(int64_t B, int64_t H, int64_t T, int64_t D, const at::TensorOptions& o) {
  return empty_output({B, T, H, D}, o).transpose(1, 2);
}

// One per-task float32 buffer holding a block of rows[i] x D for each entry of rows, in order.
template <size_t N>
struct Scratch {
  std::vector<float> buf;
  std::array<float*, N> block;
  Scratch(const std::array<int64_t, N>& rows, int64_t D) {
    int64_t total = 0;
    for (int64_t r : rows) total += r;
    buf.resize(static_cast<size_t>(total * D));
    float* p = buf.data();
    for (size_t i = 0; i < N; ++i) {
      block[i] = p;
      p += rows[i] * D;
    }
  }
};

// bfloat16 / float16 forward: each task widens its head's q, k and v into one float32 scratch,
// runs the kernel there and narrows the result into `out`. No whole-tensor float32 copies of
// q, k, v and out (under bf16 autocast those conversions cost about as much as the kernel).
template <typename T>
void attention_fwd_lowp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, float* lse, const Shape& s, float scale,
                        const attention_generic::Mask& mask) {
  const Kernels& kern = kernels();
  const int64_t n_rep = s.H / s.Hkv, D = s.D;
  const LowpHead<T> qh(q), kh(k), vh(v), oh(out);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    Scratch<4> scratch({s.Tq, s.Tk, s.Tk, s.Tq}, D);
    const auto [qf, kf, vf, of] = scratch.block;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H, hkv = h / n_rep;
      qh.widen(b, h, qf);
      kh.widen(b, hkv, kf);
      vh.widen(b, hkv, vf);
      kern.forward(qf, D, kf, D, vf, D, of, D, lse + bh * s.Tq, D, scale, mask);
      oh.narrow(of, b, h);
    }
  });
}

// bfloat16 / float16 backward, per task as the forward: q, k, v, out and dout widened per head;
// dq narrowed into its output; dk and dv too when each key/value head has one query head, else
// written in float32 per query head (dk32, dv32) for the caller to sum over the group.
template <typename T>
void attention_bwd_lowp(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const float* lse,
                        const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                        bool float_dkv, const Shape& s, float scale,
                        const attention_generic::Mask& mask) {
  const Kernels& kern = kernels();
  const int64_t n_rep = s.H / s.Hkv, D = s.D;
  const LowpHead<T> qh(q), kh(k), vh(v), oh(out), gh(dout), dqh(dq);
  std::optional<Head> dk32, dv32;  // float_dkv: float32 per query head
  std::optional<LowpHead<T>> dkh, dvh;  // else: in T per key/value head
  if (float_dkv) {
    dk32.emplace(dk), dv32.emplace(dv);
  } else {
    dkh.emplace(dk), dvh.emplace(dv);
  }
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    Scratch<8> scratch({s.Tq, s.Tq, s.Tq, s.Tq, s.Tk, s.Tk, s.Tk, s.Tk}, D);
    const auto [qf, of, gf, dqf, kf, vf, dkf, dvf] = scratch.block;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H, hkv = h / n_rep;
      qh.widen(b, h, qf);
      oh.widen(b, h, of);
      gh.widen(b, h, gf);
      kh.widen(b, hkv, kf);
      vh.widen(b, hkv, vf);
      if (float_dkv) {  // per query head, float32, summed by the caller
        kern.backward(qf, D, kf, D, vf, D, of, D, gf, D, lse + bh * s.Tq, dqf, D,
                      dk32->at(b, h), dk32->ld(), dv32->at(b, h), dv32->ld(), D, scale, mask);
      } else {
        kern.backward(qf, D, kf, D, vf, D, of, D, gf, D, lse + bh * s.Tq, dqf, D, dkf, D, dvf,
                      D, D, scale, mask);
        dkh->narrow(dkf, b, hkv);
        dvh->narrow(dvf, b, hkv);
      }
      dqh.narrow(dqf, b, h);
    }
  });
}

template <typename F>
void dispatch_lowp(at::ScalarType t, F&& f) {
  if (t == at::kBFloat16) return f(c10::BFloat16{});
  return f(c10::Half{});
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal,
                                                     double scale, int64_t window) {
  const Shape s = check_inputs(q, k, v);
  at::Tensor out = heads_inner(s.B, s.H, s.Tq, s.D, q.options());
  at::Tensor lse = empty_output({s.B, s.H, s.Tq}, q.options().dtype(at::kFloat));
  const attention_generic::Mask mask{s.Tq, s.Tk, causal, window};
  if (q.scalar_type() != at::kFloat) {
    dispatch_lowp(q.scalar_type(), [&](auto tag) {
      attention_fwd_lowp<decltype(tag)>(unit_feature_stride(q), unit_feature_stride(k),
                                        unit_feature_stride(v), out, lse.data_ptr<float>(), s,
                                        static_cast<float>(scale), mask);
    });
    return {out, lse};
  }
  const at::Tensor qf = readable(q), kf = readable(k), vf = readable(v);
  const Kernels& kern = kernels();
  const int64_t n_rep = s.H / s.Hkv;
  const Head qh(qf), kh(kf), vh(vf), oh(out);
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H, hkv = h / n_rep;  // its key/value head
      kern.forward(qh.at(b, h), qh.ld(), kh.at(b, hkv), kh.ld(), vh.at(b, hkv), vh.ld(),
                   oh.at(b, h), oh.ld(), lp + bh * s.Tq, s.D, static_cast<float>(scale), mask);
    }
  });
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
  const at::Tensor lf = lse.contiguous();
  at::Tensor dq = heads_inner(s.B, s.H, s.Tq, s.D, q.options());
  const int64_t n_rep = s.H / s.Hkv;
  // dk and dv: written straight into the result (one query head per k/v head), else per query
  // head in float32 and summed below over the heads sharing a key/value head.
  const bool direct = n_rep == 1;
  at::Tensor dk = direct ? heads_inner(s.B, s.Hkv, s.Tk, s.D, k.options())
                         : heads_inner(s.B, s.H, s.Tk, s.D, k.options().dtype(at::kFloat));
  at::Tensor dv = direct ? heads_inner(s.B, s.Hkv, s.Tk, s.D, v.options())
                         : heads_inner(s.B, s.H, s.Tk, s.D, v.options().dtype(at::kFloat));
  const attention_generic::Mask mask{s.Tq, s.Tk, causal, window};
  auto per_kv_head = [&](const at::Tensor& g, const at::Tensor& like) {
    // (B, H, Tk, D) viewed as its (B, Tk, H, D) storage; heads h = hkv * n_rep + r.
    const at::Tensor bthd = g.transpose(1, 2);
    const at::Tensor summed = bthd.view({s.B, s.Tk, s.Hkv, n_rep, s.D}).sum(3);
    return summed.to(like.scalar_type()).contiguous().transpose(1, 2);
  };
  if (q.scalar_type() != at::kFloat) {
    const at::ScalarType t = q.scalar_type();
    dispatch_lowp(t, [&](auto tag) {
      attention_bwd_lowp<decltype(tag)>(
          unit_feature_stride(dout.to(t)), unit_feature_stride(q), unit_feature_stride(k),
          unit_feature_stride(v), unit_feature_stride(out.to(t)), lf.data_ptr<float>(), dq, dk,
          dv, !direct, s, static_cast<float>(scale), mask);
    });
    if (direct) return {dq, dk, dv};
    return {dq, per_kv_head(dk, k), per_kv_head(dv, v)};
  }
  const at::Tensor qf = readable(q), kf = readable(k), vf = readable(v), of = readable(out),
                   dof = readable(dout);
  const Kernels& kern = kernels();
  const Head qh(qf), kh(kf), vh(vf), oh(of), gh(dof), dqh(dq), dkh(dk), dvh(dv);
  const float* lp = lf.data_ptr<float>();
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H, hkv = h / n_rep;
      kern.backward(qh.at(b, h), qh.ld(), kh.at(b, hkv), kh.ld(), vh.at(b, hkv), vh.ld(),
                    oh.at(b, h), oh.ld(), gh.at(b, h), gh.ld(), lp + bh * s.Tq, dqh.at(b, h),
                    dqh.ld(), dkh.at(b, h), dkh.ld(), dvh.at(b, h), dvh.ld(), s.D,
                    static_cast<float>(scale), mask);
    }
  });
  if (direct) return {dq, dk, dv};
  return {dq, per_kv_head(dk, k), per_kv_head(dv, v)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastlm
