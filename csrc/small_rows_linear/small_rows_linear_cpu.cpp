// y = x W^T + b for a few rows of x on CPU: the matrix-vector products of decoding one token per
// sequence. x (M, K), W (N, K) row-major as nn.Linear keeps it, b (N,) or none; float32 or
// bfloat16 (x, W and b share it), accumulated in float32, y (M, N) in that dtype.
//
// Such a product reads every weight once for a handful of multiply-adds: it runs at the speed
// memory delivers W. Each task takes a slice of W's rows (at::parallel_for, so every core streams
// its own part) and runs over each row once, multiplying it with all M rows of x at the same time
// (x is a few KB and stays in L1). bfloat16 weights are widened to float32 in registers (a 16-bit
// shift), so they stream half the bytes of float32. Any M works; groups of up to kMaxRows rows of
// x share one pass over W.
// On CPUs with AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids) bfloat16 runs vdpbf16ps instead:
// 32 weights per instruction multiplied with x's own bf16 values (exact products, float32 sums;
// denormal inputs read as zero), where widening first left a single core compute-bound at ~20
// GB/s. FASTLM_NO_AVX512BF16=1 in the environment turns it off (the widening path, for tests
// and for comparing numerics).
#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_math.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "small_rows_linear";
constexpr int kMaxRows = 4;  // rows of x per pass over W: 8 accumulators + loads fit 16 registers

typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

FASTLM_CLONE_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bfloat16's bits are the high half of a float32's
FASTLM_CLONE_INLINE v8f load8(const c10::BFloat16* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof h);
  return (v8f)(__builtin_convertvector(h, v8u32) << 16);
}

FASTLM_CLONE_INLINE float to_float(float v) { return v; }
FASTLM_CLONE_INLINE float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

FASTLM_CLONE_INLINE float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Rows [n0, n1) of y for R rows of x (float32, row stride K). Two accumulators per row of x
// over alternate 8-float chunks of K, so two FMA chains are in flight for each.
template <int R, typename T>
FASTLM_CLONE_INLINE void rows_block(const T* w, const float* x, const T* bias, T* y, int64_t K,
                                    int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * K;
    v8f a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = v8f{};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const v8f w0 = load8(wr + k), w1 = load8(wr + k + 8);
      for (int r = 0; r < R; ++r) {
        a0[r] += w0 * load8(x + r * K + k);
        a1[r] += w1 * load8(x + r * K + k + 8);
      }
    }
    for (; k + 8 <= K; k += 8) {
      const v8f w0 = load8(wr + k);
      for (int r = 0; r < R; ++r) a0[r] += w0 * load8(x + r * K + k);
    }
    for (int r = 0; r < R; ++r) {
      float s = hsum(a0[r] + a1[r]);
      for (int64_t j = k; j < K; ++j) s += to_float(wr[j]) * x[r * K + j];
      if (bias != nullptr) s += to_float(bias[n]);
      y[r * N + n] = static_cast<T>(s);
    }
  }
}

template <typename T>
FASTLM_CLONE_INLINE void rows_generic(int64_t rows, const T* w, const float* x, const T* bias,
                                      T* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: rows_block<1>(w, x, bias, y, K, N, n0, n1); break;
    case 2: rows_block<2>(w, x, bias, y, K, N, n0, n1); break;
    case 3: rows_block<3>(w, x, bias, y, K, N, n0, n1); break;
    default: rows_block<4>(w, x, bias, y, K, N, n0, n1); break;
  }
}

#ifdef FASTLM_HAVE_AVX2_CLONES
template <typename T>
FASTLM_TARGET_AVX2 void rows_avx2(int64_t rows, const T* w, const float* x, const T* bias, T* y,
                                  int64_t K, int64_t N, int64_t n0, int64_t n1) {
  rows_generic(rows, w, x, bias, y, K, N, n0, n1);
}
#endif

// The work split of every path: W's N rows over the cores (~64 KB of W per task at least: fewer
// would spend more on scheduling than on streaming), x's M rows in groups of up to kMaxRows that
// share one pass over W; rows_fn(rows, m0, n0, n1) computes one group on one slice.
template <typename F>
void for_row_groups(int64_t M, int64_t N, int64_t w_row_bytes, const F& rows_fn) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / w_row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
      rows_fn(std::min<int64_t>(kMaxRows, M - m0), m0, n0, n1);
  });
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTLM_HAVE_BF16DP 1
#define FASTLM_TARGET_BF16DP __attribute__((target("avx512f,avx512bw,avx512bf16")))

// Rows [n0, n1) of y for R rows of bfloat16 x (row stride K): per row of W, two accumulators per
// row of x over alternate 32-element chunks (two dot-product chains in flight), a masked load for
// the last partial chunk (its zeros add nothing).
template <int R>
FASTLM_TARGET_BF16DP void rows_bf16dp(const uint16_t* w, const uint16_t* x,
                                      const c10::BFloat16* bias, c10::BFloat16* y, int64_t K,
                                      int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm512_dpbf16_ps(a0[r], w0, (__m512bh)_mm512_loadu_si512(x + r * K + k));
        a1[r] = _mm512_dpbf16_ps(a1[r], w1, (__m512bh)_mm512_loadu_si512(x + r * K + k + 32));
      }
    }
    for (; k < K; k += 32) {
      const int64_t left = std::min<int64_t>(32, K - k);
      const __mmask32 m = left == 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
      const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, wr + k);
      for (int r = 0; r < R; ++r)
        a0[r] = _mm512_dpbf16_ps(a0[r], w0, (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * K + k));
    }
    for (int r = 0; r < R; ++r) {
      alignas(64) float lanes[16];  // (gcc 12's _mm512_reduce_add_ps warns of undefined lanes)
      _mm512_store_ps(lanes, _mm512_add_ps(a0[r], a1[r]));
      float s = 0.0f;
      for (float v : lanes) s += v;
      if (bias != nullptr) s += static_cast<float>(bias[n]);
      y[r * N + n] = static_cast<c10::BFloat16>(s);
    }
  }
}

FASTLM_TARGET_BF16DP void rows_bf16dp_any(int64_t rows, const uint16_t* w, const uint16_t* x,
                                          const c10::BFloat16* bias, c10::BFloat16* y, int64_t K,
                                          int64_t N, int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: rows_bf16dp<1>(w, x, bias, y, K, N, n0, n1); break;
    case 2: rows_bf16dp<2>(w, x, bias, y, K, N, n0, n1); break;
    case 3: rows_bf16dp<3>(w, x, bias, y, K, N, n0, n1); break;
    default: rows_bf16dp<4>(w, x, bias, y, K, N, n0, n1); break;
  }
}

// The bfloat16 product on AVX512-BF16: x stays bfloat16 (contiguous, (M, K)).
void run_bf16dp(const at::Tensor& w, const at::Tensor& xb, const c10::optional<at::Tensor>& bias,
                at::Tensor& y) {
  const int64_t M = xb.size(0), K = xb.size(1), N = w.size(0);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<c10::BFloat16>());
  const c10::BFloat16* bp = bias.has_value() ? bias->data_ptr<c10::BFloat16>() : nullptr;
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  for_row_groups(M, N, K * 2, [&](int64_t rows, int64_t m0, int64_t n0, int64_t n1) {
    rows_bf16dp_any(rows, wp, xp + m0 * K, bp, yp + m0 * N, K, N, n0, n1);
  });
}
#endif

template <typename T>
void run(const at::Tensor& w, const at::Tensor& xf, const c10::optional<at::Tensor>& bias,
         at::Tensor& y) {
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  const T* wp = w.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  const float* xp = xf.data_ptr<float>();
  T* yp = y.data_ptr<T>();
  const bool avx2 = cpu::cpu_has_avx2();
  const int64_t w_row_bytes = K * static_cast<int64_t>(sizeof(T));
  for_row_groups(M, N, w_row_bytes, [&](int64_t rows, int64_t m0, int64_t n0, int64_t n1) {
#ifdef FASTLM_HAVE_AVX2_CLONES
    if (avx2) return rows_avx2(rows, wp, xp + m0 * K, bp, yp + m0 * N, K, N, n0, n1);
#endif
    rows_generic(rows, wp, xp + m0 * K, bp, yp + m0 * N, K, N, n0, n1);
  });
}

at::Tensor small_rows_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias) {
  FASTLM_CHECK_DEVICE(kOp, x, at::kCPU);
  FASTLM_CHECK_DEVICE(kOp, weight, at::kCPU);
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "fastlm::small_rows_linear: weight must be float32 or bfloat16, got ",
              weight.scalar_type());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "fastlm::small_rows_linear: x (",
              x.scalar_type(), ") and weight (", weight.scalar_type(), ") must share a dtype");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "fastlm::small_rows_linear: x must be (M, K) and weight (N, K), got x ", x.sizes(),
              " and weight ", weight.sizes());
  if (bias.has_value()) {
    FASTLM_CHECK_DEVICE(kOp, (*bias), at::kCPU);
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0),
                "fastlm::small_rows_linear: bias must be (N,) = (", weight.size(0), ",) in ",
                weight.scalar_type(), ", got ", bias->scalar_type(), " ", bias->sizes());
  }
  const at::Tensor w = weight.contiguous();
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous();
  at::Tensor y = empty_output({x.size(0), w.size(0)}, x.options());
  if (y.numel() == 0) return y;
  if (w.size(1) == 0) {  // an empty sum: the bias, or zeros
    return b.has_value() ? b->unsqueeze(0).expand_as(y).contiguous() : y.zero_();
  }
#ifdef FASTLM_HAVE_BF16DP
  if (w.scalar_type() == at::kBFloat16 && cpu::use_avx512_bf16()) {
    run_bf16dp(w, x.contiguous(), b, y);
    return y;
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // (M, K): a few KB
  if (w.scalar_type() == at::kFloat) {
    run<float>(w, xf, b, y);
  } else {
    run<c10::BFloat16>(w, xf, b, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("small_rows_linear", &small_rows_linear_cpu); }

}  // namespace fastlm
