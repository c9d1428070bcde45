// Torch-free row math of cross-entropy on the CPU, shared by the cross_entropy and the
// linear_cross_entropy kernels (the latter runs it on float32 chunks of logits).
//
// Per row x (V,) with target t, lse = log(sum_j exp(x_j)), eps = label_smoothing, z = z_loss:
//   loss     = (1 - eps) * (lse - x_t) + eps * (lse - mean(x)) + z * lse^2
//   dloss/dx_j = p_j * (1 + 2 z lse) - eps / V - (1 - eps) [j == t],   p_j = exp(x_j - lse)
// Rows whose target is ignore_index have loss 0 and gradient 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/cpu_math.h"

namespace fastlm {
namespace cpu {

struct CeParams {
  int64_t ignore_index;
  float label_smoothing;
  float z_loss;
};

// exp(x) for x <= 0 (and moderately positive x), written so gcc vectorises a loop of it
// (std::exp is a libm call that only -ffast-math vectorises). x = n ln2 + r with |r| <= ln2/2;
// e^r by a degree-7 Taylor polynomial (error ~4e-9 relative), then 2^n by building the float's
// exponent bits. Inputs below -87 (where e^x underflows float) return 0.
FASTLM_CLONE_INLINE float vexp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest by the 1.5 * 2^23 trick (default rounding mode; no -ffast-math here).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

FASTLM_CLONE_INLINE float lane_max(const float* x, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] > x[i + l] ? acc[l] : x[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] = acc[l] > x[i] ? acc[l] : x[i];
  float m = acc[0];
  for (int l = 1; l < kLanes; ++l) m = m > acc[l] ? m : acc[l];
  return m;
}

// Forward of one float32 row: its loss and lse. target must be ignore_index or in [0, V).
FASTLM_CLONE_INLINE void ce_row_forward(const float* x, int64_t V, int64_t target,
                                        const CeParams& prm, float* loss, float* lse) {
  const float mx = lane_max(x, V);
  const float sum = lane_sum(V, [&](int64_t i) { return vexp(x[i] - mx); });
  const float l = mx + std::log(sum);
  *lse = l;
  if (target == prm.ignore_index) {
    *loss = 0.0f;
    return;
  }
  float out = (1.0f - prm.label_smoothing) * (l - x[target]);
  if (prm.label_smoothing != 0.0f) {
    const float mean = lane_sum(V, [&](int64_t i) { return x[i]; }) / static_cast<float>(V);
    out += prm.label_smoothing * (l - mean);
  }
  if (prm.z_loss != 0.0f) out += prm.z_loss * l * l;
  *loss = out;
}

// Gradient of dloss * loss for one float32 row, written to g (may alias x: in place).
FASTLM_CLONE_INLINE void ce_row_backward(const float* x, int64_t V, int64_t target, float lse,
                                         float dloss, const CeParams& prm, float* g) {
  if (target == prm.ignore_index) {
    for (int64_t i = 0; i < V; ++i) g[i] = 0.0f;
    return;
  }
  const float a = dloss * (1.0f + 2.0f * prm.z_loss * lse);
  const float b = dloss * prm.label_smoothing / static_cast<float>(V);
  for (int64_t i = 0; i < V; ++i) g[i] = a * vexp(x[i] - lse) - b;
  g[target] -= dloss * (1.0f - prm.label_smoothing);
}

// The same two row functions compiled for AVX2 + FMA (see cpu_math.h, "Runtime ISA choice"): the
// row loops are bandwidth- and exp-bound, so 8-float vectors nearly halve their time.
#ifdef FASTLM_HAVE_AVX2_CLONES
FASTLM_TARGET_AVX2 inline void ce_row_forward_avx2(
    const float* x, int64_t V, int64_t target, const CeParams& prm, float* loss, float* lse) {
  ce_row_forward(x, V, target, prm, loss, lse);
}
FASTLM_TARGET_AVX2 inline void ce_row_backward_avx2(
    const float* x, int64_t V, int64_t target, float lse, float dloss, const CeParams& prm,
    float* g) {
  ce_row_backward(x, V, target, lse, dloss, prm, g);
}
#endif

// Row functions at the best ISA this CPU has.
inline void ce_row_forward_best(const float* x, int64_t V, int64_t target, const CeParams& prm,
                                float* loss, float* lse) {
#ifdef FASTLM_HAVE_AVX2_CLONES
  if (cpu_has_avx2()) return ce_row_forward_avx2(x, V, target, prm, loss, lse);
#endif
  ce_row_forward(x, V, target, prm, loss, lse);
}

inline void ce_row_backward_best(const float* x, int64_t V, int64_t target, float lse,
                                 float dloss, const CeParams& prm, float* g) {
#ifdef FASTLM_HAVE_AVX2_CLONES
  if (cpu_has_avx2()) return ce_row_backward_avx2(x, V, target, lse, dloss, prm, g);
#endif
  ce_row_backward(x, V, target, lse, dloss, prm, g);
}

}  // namespace cpu
}  // namespace fastlm
