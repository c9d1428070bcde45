// Unit tests of the torch-free CPU building blocks in cpu_math.h (run by ctest; no framework):
// lane_sum against a double-precision sum on lengths around the lane count, as_float/store_row
// for float rows, and slice_rows covering [0, n) exactly once. Exits non-zero on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/cpu_math.h"

namespace {

int g_failures = 0;

void expect(bool ok, const char* what, long long a, long long b) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL %s (%lld, %lld)\n", what, a, b);
  }
}

// lane_sum of random values in [-1, 1) must match the exact (double) sum to float accuracy:
// the bound is a few ulps of the sum of magnitudes, the classic bound for float summation.
void test_lane_sum() {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  for (int64_t n : {0, 1, 2, 15, 16, 17, 31, 33, 1025, 4097}) {
    std::vector<float> v(n);
    for (float& e : v) e = dist(rng);
    double exact = 0.0, magnitude = 0.0;
    for (float e : v) {
      exact += e;
      magnitude += std::fabs(e);
    }
    const float got = fastlm::cpu::lane_sum(n, [&](int64_t i) { return v[i]; });
    const double bound = 4.0 * 1.1920929e-7 * (magnitude + 1.0) * std::log2(n + 2.0);
    expect(std::fabs(got - exact) <= bound, "lane_sum matches the double sum (n, err*1e9)", n,
           static_cast<long long>(std::fabs(got - exact) * 1e9));
    // f sees every index in [0, n) exactly once.
    std::vector<int> seen(n, 0);
    fastlm::cpu::lane_sum(n, [&](int64_t i) {
      ++seen[i];
      return 0.f;
    });
    for (int64_t i = 0; i < n; ++i) expect(seen[i] == 1, "lane_sum visits each index once", n, i);
  }
  // Deterministic: the same input gives the same bits.
  std::vector<float> v(1025);
  for (float& e : v) e = dist(rng);
  const float a = fastlm::cpu::lane_sum(1025, [&](int64_t i) { return v[i]; });
  const float b = fastlm::cpu::lane_sum(1025, [&](int64_t i) { return v[i]; });
  expect(a == b, "lane_sum is deterministic", 1025, 0);
}

void test_as_float_store_row() {
  const int64_t n = 17;
  std::vector<float> src(n), buf(n, -7.f), dst(n, -9.f);
  for (int64_t i = 0; i < n; ++i) src[i] = 0.5f * static_cast<float>(i) - 3.f;
  // float rows are used in place: no copy into buf.
  const float* row = fastlm::cpu::as_float(src.data(), buf.data(), n);
  expect(row == src.data(), "as_float<float> returns the row itself", 0, 0);
  expect(buf[0] == -7.f, "as_float<float> leaves buf untouched", 0, 0);
  fastlm::cpu::store_row(row, dst.data(), n);
  for (int64_t i = 0; i < n; ++i) expect(dst[i] == src[i], "store_row<float> copies exactly", i, 0);
  // Converting rows (double -> float) go through buf.
  std::vector<double> dsrc(n);
  for (int64_t i = 0; i < n; ++i) dsrc[i] = 0.25 * static_cast<double>(i);
  const float* conv = fastlm::cpu::as_float(dsrc.data(), buf.data(), n);
  expect(conv == buf.data(), "as_float<double> converts into buf", 0, 0);
  for (int64_t i = 0; i < n; ++i) expect(conv[i] == 0.25f * i, "as_float<double> values", i, 0);
}

void test_slice_rows() {
  for (int64_t n : {0, 1, 2, 7, 16, 17, 1000, 1025}) {
    for (int64_t parts : {1, 2, 3, 4, 7, 16, 33}) {
      int64_t expected_begin = 0;
      for (int64_t k = 0; k < parts; ++k) {
        int64_t begin = -1, end = -1;
        fastlm::cpu::slice_rows(n, parts, k, &begin, &end);
        // Consecutive slices: each starts where the previous ended (no gap, no overlap).
        expect(begin == expected_begin, "slice_rows: slice starts where the last ended", n, k);
        expect(begin <= end, "slice_rows: begin <= end", begin, end);
        expect(end - begin <= n / parts + 1, "slice_rows: balanced", n, parts);
        expected_begin = end;
      }
      expect(expected_begin == n, "slice_rows: the slices end at n", n, parts);
    }
  }
}

}  // namespace

int main() {
  test_lane_sum();
  test_as_float_store_row();
  test_slice_rows();
  if (g_failures != 0) {
    std::fprintf(stderr, "cpu_math_test: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("cpu_math_test: all passed\n");
  return 0;
}
