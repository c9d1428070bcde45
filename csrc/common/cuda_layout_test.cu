// Host-only unit test of the row-tile layout of the CUDA norm kernels (cuda_utils.cuh), run by
// ctest wherever nvcc exists (no GPU needed): for every row length, dtype width and register
// budget the kernels use, the plan's threads x chunks cover columns [0, C) exactly once, in
// vector and scalar mode, and vector chunks start on 16-byte boundaries.
#include <cstdio>
#include <vector>

#include "common/cuda_utils.cuh"

namespace {

using fastlm::gpu::chunk_col;
using fastlm::gpu::kLongRowWarps;
using fastlm::gpu::kWarpSize;
using fastlm::gpu::plan_rows;
using fastlm::gpu::RowPlan;

int g_failures = 0;

void fail(const char* what, long long C, int vec_width, bool vec) {
  if (++g_failures <= 20) std::fprintf(stderr, "FAIL %s: C=%lld vec=%d mode=%s\n", what, C,
                                       vec_width, vec ? "vector" : "scalar");
}

template <int kThreads, int kVec>
void check_cover(int C, int slots, bool vec) {
  std::vector<int> seen(C, 0);
  for (int t = 0; t < kThreads; ++t)
    for (int s = 0; s < slots; ++s)
      for (int j = 0; j < kVec; ++j) {
        const int c = chunk_col<kThreads, kVec>(vec, s, j, t);
        if (c < 0) fail("negative column", C, kVec, vec);
        if (c < C) ++seen[c];
        if (vec && j == 0 && c % kVec != 0) fail("vector chunk not 16-byte aligned", C, kVec, vec);
      }
  for (int c = 0; c < C; ++c)
    if (seen[c] != 1) {
      fail("column not covered exactly once", C, kVec, vec);
      return;
    }
}

template <int kVec, int kWarps>
void check_threads(int C, int slots) {
  constexpr int kThreads = kWarps * kWarpSize;
  if (C % kVec == 0) check_cover<kThreads, kVec>(C, slots, true);
  check_cover<kThreads, kVec>(C, slots, false);
}

template <int kVec>
void check_plan(int C, int max_warps, int max_elems) {
  const RowPlan p = plan_rows(C, kVec, max_warps, max_elems);
  int slots = p.slots;
  if (slots == 0) {
    if (p.warps != kLongRowWarps) fail("long rows use kLongRowWarps", C, kVec, false);
    const int per_slot = kLongRowWarps * kWarpSize * kVec;
    if (C <= max_warps * kWarpSize * max_elems) fail("long-row kernel for a short row", C, kVec, 0);
    slots = (C + per_slot - 1) / per_slot;  // as the long-row kernels compute it
  } else if (slots * kVec > max_elems || p.warps > max_warps) {
    fail("plan exceeds the register budget", C, kVec, false);
  }
  switch (p.warps) {
    case 1: check_threads<kVec, 1>(C, slots); break;
    case 2: check_threads<kVec, 2>(C, slots); break;
    case 4: check_threads<kVec, 4>(C, slots); break;
    case 8: check_threads<kVec, 8>(C, slots); break;
    case 16: check_threads<kVec, 16>(C, slots); break;
    default: fail("unexpected warps per row", C, kVec, false);
  }
}

}  // namespace

int main() {
  std::vector<int> lengths;
  for (int C = 1; C <= 300; ++C) lengths.push_back(C);
  for (int base : {512, 1024, 2048, 4096, 8192, 16384, 32768})
    for (int d : {-9, -8, -1, 0, 1, 7, 8})
      if (base + d > 300) lengths.push_back(base + d);
  lengths.push_back(50257);  // a vocabulary-sized row
  for (int C : lengths) {
    // (vector width, max warps, max elements): forward and backward budgets of the kernels.
    check_plan<4>(C, 16, 32);  // float
    check_plan<8>(C, 16, 32);  // bf16 / fp16
    check_plan<4>(C, 16, 16);
    check_plan<8>(C, 16, 16);
  }
  if (g_failures != 0) {
    std::fprintf(stderr, "cuda_layout_test: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("cuda_layout_test: all passed (%zu row lengths)\n", lengths.size());
  return 0;
}
