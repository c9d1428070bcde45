// Vectorisable building blocks of the C++ CPU kernels: row conversion to float32 and reductions.
// gcc vectorises a float sum only if it may reorder it; with kLanes independent accumulators the
// order is fixed by the code (so -O3 vectorises it without -ffast-math) and the result is the
// same on every run and machine. Torch-free: also used by the native unit tests.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace fastlm {
namespace cpu {

constexpr int kLanes = 16;

// Runtime ISA choice. The build targets baseline x86-64 (SSE2, 4 floats per vector: wheels must
// run everywhere); a hot row function is compiled a second time for AVX2 + FMA by a wrapper marked
// FASTLM_TARGET_AVX2 that only calls (and so inlines: a callee with fewer ISA features may be
// inlined) the generic one, and cpu_has_avx2() picks between them once per call. Same code, same
// math, 8 floats per vector.
// A function such a wrapper calls must be inlined into it to run as AVX2 code; gcc's heuristics
// may instead emit one call to the generic copy (ce_row_forward's clone was a bare jump to it), so
// callees of the clones are marked FASTLM_CLONE_INLINE.
#if defined(__GNUC__)
#define FASTLM_CLONE_INLINE inline __attribute__((always_inline))
#else
#define FASTLM_CLONE_INLINE inline
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#define FASTLM_HAVE_AVX2_CLONES 1
#define FASTLM_TARGET_AVX2 __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
// AVX512-BF16 (bf16 dot products in hardware: Zen 4, Cooper Lake, Sapphire Rapids): where it is
// present, bf16 kernels multiply bf16 directly instead of widening to float32 first.
// FASTLM_NO_AVX512BF16=1 in the environment turns those paths off (read on every call, so tests
// can compare both paths in one process).
inline bool use_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  const char* off = std::getenv("FASTLM_NO_AVX512BF16");
  return has && !(off != nullptr && off[0] != '\0' && off[0] != '0');
}
#else
inline bool cpu_has_avx2() { return false; }
inline bool use_avx512_bf16() { return false; }
#endif

// Pointer to row `src` as float32: the row itself when T is float, else converted into `buf`.
template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// sum_i f(i) over [0, n) with kLanes accumulators; f must be cheap and inlinable.
template <typename F>
inline float lane_sum(int64_t n, F f) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += f(i + l);
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += f(i);
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// Rows [begin, end) of the k-th of `parts` equal slices of n rows (the last ones one shorter).
inline void slice_rows(int64_t n, int64_t parts, int64_t k, int64_t* begin, int64_t* end) {
  *begin = n * k / parts;
  *end = n * (k + 1) / parts;
}

}  // namespace cpu
}  // namespace fastlm
