// Device building blocks of the CUDA kernels: float conversion of the three storage dtypes,
// 16-byte vector loads/stores, warp and block sums, the register row-tile layout of the norm
// kernels, the choice of that layout by row length, and the deterministic column sum that turns
// per-block weight-gradient partials into the final gradient.
// Torch-free (CUDA toolkit headers only), so nvcc compiles every kernel without torch (CMake CI).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {
namespace gpu {

constexpr int kWarpSize = 32;

// ---------------------------------------------------------------------------------------------
// dtype conversion. Explicit intrinsics rather than operators: torch builds .cu files with
// __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__. Stores round to nearest even,
// as the CPU kernels' static_cast<c10::BFloat16/Half>(float) does.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// ---------------------------------------------------------------------------------------------
// 16-byte vectors: one LDG.128/STG.128 per thread is what saturates HBM on A100/H100.
template <typename S>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(S));  // 4 float, 8 bf16/fp16

template <typename S>
struct alignas(16) Vec16 {
  S v[kVecOf<S>];
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// kN consecutive elements at p (16-byte aligned) as float32. kN is the storage dtype's vector
// width of the row (T); float weights with a bf16 row take two 16-byte loads per chunk.
template <int kN, typename S>
__device__ __forceinline__ void load_vec(const S* __restrict__ p, float (&out)[kN]) {
  constexpr int kPer = kVecOf<S>;
  static_assert(kN % kPer == 0, "a chunk must be whole 16-byte vectors");
#pragma unroll
  for (int k = 0; k < kN / kPer; ++k) {
    const Vec16<S> pack = *reinterpret_cast<const Vec16<S>*>(p + k * kPer);
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[k * kPer + j] = to_float(pack.v[j]);
  }
}

template <int kN, typename S>
__device__ __forceinline__ void store_vec(S* __restrict__ p, const float (&in)[kN]) {
  constexpr int kPer = kVecOf<S>;
  static_assert(kN % kPer == 0, "a chunk must be whole 16-byte vectors");
#pragma unroll
  for (int k = 0; k < kN / kPer; ++k) {
    Vec16<S> pack;
#pragma unroll
    for (int j = 0; j < kPer; ++j) pack.v[j] = from_float<S>(in[k * kPer + j]);
    *reinterpret_cast<Vec16<S>*>(p + k * kPer) = pack;
  }
}

// ---------------------------------------------------------------------------------------------
// Row tiles. A row of C columns is split over kThreads threads; thread t holds chunks s = 0, 1, ...
// of kVec columns each (kVec = 16 bytes of the row dtype):
//   vector mode (C % kVec == 0 and every pointer 16-byte aligned): chunk s of thread t is the kVec
//     consecutive columns from (s * kThreads + t) * kVec: one 16-byte access, and a warp touches
//     512 contiguous bytes;
//   scalar mode (anything else, e.g. odd C): element j of chunk s is column
//     (s * kVec + j) * kThreads + t, so consecutive threads still read consecutive columns.
// Both cover [0, chunks * kThreads * kVec) exactly once; columns >= C are masked (loaded as 0,
// never stored). A thread always gets the same columns, whatever the row, which is what lets it
// accumulate weight gradients over rows in registers.
template <int kThreads, int kVec>
__host__ __device__ __forceinline__ int chunk_col(bool vec, int s, int j, int t) {
  return vec ? (s * kThreads + t) * kVec + j : (s * kVec + j) * kThreads + t;
}

template <int kThreads, int kVec, typename S>
__device__ __forceinline__ void load_chunk(const S* __restrict__ row, int C, bool vec, int s, int t,
                                           float (&out)[kVec]) {
  if (vec) {
    const int c0 = chunk_col<kThreads, kVec>(true, s, 0, t);
    if (c0 < C) {  // C % kVec == 0 in vector mode: the chunk is all in or all out
      load_vec<kVec>(row + c0, out);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = 0.f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int c = chunk_col<kThreads, kVec>(false, s, j, t);
      out[j] = c < C ? to_float(row[c]) : 0.f;
    }
  }
}

template <int kThreads, int kVec, typename S>
__device__ __forceinline__ void store_chunk(S* __restrict__ row, int C, bool vec, int s, int t,
                                            const float (&in)[kVec]) {
  if (vec) {
    const int c0 = chunk_col<kThreads, kVec>(true, s, 0, t);
    if (c0 < C) store_vec<kVec>(row + c0, in);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int c = chunk_col<kThreads, kVec>(false, s, j, t);
      if (c < C) row[c] = from_float<S>(in[j]);
    }
  }
}

// row[cols of chunk s] = value (plain scalar stores: used once per block to clear a partial row).
template <int kThreads, int kVec>
__device__ __forceinline__ void fill_chunk(float* row, int C, bool vec, int s, int t, float value) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int c = chunk_col<kThreads, kVec>(vec, s, j, t);
    if (c < C) row[c] = value;
  }
}

// row[cols of chunk s] += add, through a plain pointer: the long-row backward kernels keep their
// weight-gradient partial row in global memory and read back what the same thread wrote (a
// const __restrict__ load could be served by the non-coherent read-only cache).
template <int kThreads, int kVec>
__device__ __forceinline__ void accumulate_chunk(float* row, int C, bool vec, int s, int t,
                                                 const float (&add)[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int c = chunk_col<kThreads, kVec>(vec, s, j, t);
    if (c < C) row[c] += add[j];
  }
}

// ---------------------------------------------------------------------------------------------
// Sums. The xor butterfly leaves the same bits in every lane (each step adds a pair in both
// orders, and float addition is commutative), so all threads of a row agree on its statistics.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums kN values over the kWarps warps that share a row. kWarps == 1 (a warp per row) is
// shuffle-only; otherwise the block is one row: warp totals go through `smem` (kWarps * kN
// floats) and every thread adds them in warp order, so the result is identical everywhere and
// deterministic. Must be reached by every thread of the block (it has __syncthreads).
template <int kWarps, int kN>
__device__ __forceinline__ void row_sum(float (&v)[kN], float* smem) {
#pragma unroll
  for (int i = 0; i < kN; ++i) v[i] = warp_sum(v[i]);
  if constexpr (kWarps > 1) {
    const int warp = threadIdx.x / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
      for (int i = 0; i < kN; ++i) smem[warp * kN + i] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += smem[w * kN + i];
      v[i] = total;
    }
    __syncthreads();  // smem is reused by the next call
  }
}

// Adds the weight-gradient accumulators of the block's row groups 1..kRows-1 into group 0's, in
// group order (warp-per-row layout: the 4 warps of a block hold the same columns). `comb` is
// (kRows - 1, kSlots * kVec, kThreads) floats of shared memory; every thread must call this.
template <int kRows, int kThreads, int kSlots, int kVec>
__device__ __forceinline__ void combine_groups(float (&acc)[kSlots][kVec],
                                               float (*comb)[kSlots * kVec][kThreads]) {
  const int group = threadIdx.x / kThreads, t = threadIdx.x % kThreads;
  if (group > 0) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
#pragma unroll
      for (int j = 0; j < kVec; ++j) comb[group - 1][s * kVec + j][t] = acc[s][j];
  }
  __syncthreads();
  if (group == 0) {
    for (int g = 0; g < kRows - 1; ++g)
#pragma unroll
      for (int s = 0; s < kSlots; ++s)
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[s][j] += comb[g][s * kVec + j][t];
  }
  __syncthreads();  // comb is reused by the next call
}

// ---------------------------------------------------------------------------------------------
// Launch layout of a row kernel, chosen on the host from C. Each thread keeps at most
// `max_elems` columns of a row in registers (so x is read once); each kernel picks its own
// bound from its register use (the backward holds four arrays per column, the forward one).
//   warps == 1: a warp per row, 4 rows per 128-thread block, `slots` chunks per lane
//               (small C: a block per row would leave most threads idle);
//   warps > 1:  a block of `warps` warps per row, max_elems / kVec chunks per thread;
//   slots == 0: the row is longer than max_warps warps can hold: the "long row" kernels
//               stream it from memory instead (several passes, mostly L2 hits).
constexpr int kRowsPerWarpBlock = 4;
constexpr int kLongRowWarps = 16;  // 512 threads per row in the long-row kernels

struct RowPlan {
  int warps;  // warps per row
  int slots;  // chunks per thread; 0 = long-row kernel
};

inline RowPlan plan_rows(int64_t C, int vec, int max_warps, int max_elems) {
  const int max_slots = max_elems / vec;
  const int64_t chunks = (C + vec - 1) / vec;
  if (chunks <= int64_t{kWarpSize} * max_slots) {
    int slots = 1;
    while (int64_t{kWarpSize} * slots < chunks) slots *= 2;
    return {1, slots};
  }
  for (int warps = 2; warps <= max_warps; warps *= 2) {
    if (chunks <= int64_t{warps} * kWarpSize * max_slots) return {warps, max_slots};
  }
  return {kLongRowWarps, 0};
}

constexpr int block_threads(int warps) {
  return warps == 1 ? kRowsPerWarpBlock * kWarpSize : warps * kWarpSize;
}
constexpr int rows_per_block(int warps) { return warps == 1 ? kRowsPerWarpBlock : 1; }

template <int kWarps, int kSlots>
struct Tile {
  static constexpr int kW = kWarps;
  static constexpr int kS = kSlots;
};

// A kernel instantiation and its launch shape.
template <typename Kernel>
struct KernelChoice {
  Kernel kernel = nullptr;  // nullptr only for a plan plan_rows never makes
  int threads = 0;
  int rows_per_block = 0;
};

// pick(Tile<warps, slots>{}) for a plan of plan_rows(C, kVec, kMaxWarps, kMaxElems): the switch
// turns the runtime plan into template arguments, instantiating only the layouts such plans use.
template <int kVec, int kMaxWarps, int kMaxElems, typename Pick>
auto with_tile(RowPlan plan, Pick&& pick) -> decltype(pick(Tile<1, 1>{})) {
  constexpr int kMaxSlots = kMaxElems / kVec;
  static_assert(kMaxSlots >= 1 && kMaxSlots <= 8, "chunks per thread must be 1..8");
  if (plan.slots == 0) return pick(Tile<kLongRowWarps, 0>{});
  switch (plan.warps) {
    case 1:
      if (plan.slots == 1) return pick(Tile<1, 1>{});
      if constexpr (kMaxSlots >= 2) {
        if (plan.slots == 2) return pick(Tile<1, 2>{});
      }
      if constexpr (kMaxSlots >= 4) {
        if (plan.slots == 4) return pick(Tile<1, 4>{});
      }
      if constexpr (kMaxSlots >= 8) {
        if (plan.slots == 8) return pick(Tile<1, 8>{});
      }
      break;
    case 2: return pick(Tile<2, kMaxSlots>{});
    case 4: return pick(Tile<4, kMaxSlots>{});
    case 8: return pick(Tile<8, kMaxSlots>{});
    case 16:
      if constexpr (kMaxWarps >= 16) return pick(Tile<16, kMaxSlots>{});
      break;
  }
  return {};
}

// Blocks of a row kernel: one per `rows_per_block` rows, capped (grid-stride loops take the rest).
inline int64_t row_grid(int64_t N, int rows_per_block, int64_t cap = 0x7fffffff) {
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  return blocks < cap ? blocks : cap;
}

inline cudaError_t sm_count(int* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, device);
}

// ---------------------------------------------------------------------------------------------
// Weight gradients. A backward row kernel writes one float32 partial row per block
// (part: (n_arrays, rows, C)); this kernel adds the rows of each array in a fixed order
// (deterministic: no atomics). Block (32, 16): threadIdx.x picks a column (coalesced 128-byte
// rows), threadIdx.y strides over the rows, then the 16 partial sums are added in y order.
constexpr int kSumCols = 32;
constexpr int kSumRowLanes = 16;

// A template so that every .cu including this header may instantiate it without a duplicate
// symbol when they are linked into one library.
template <int kRowLanes>
__global__ void __launch_bounds__(kSumCols* kRowLanes)
    sum_partial_rows_kernel(const float* __restrict__ part, int64_t rows, int C,
                            float* __restrict__ out0, float* __restrict__ out1) {
  __shared__ float lane_sums[kRowLanes][kSumCols + 1];  // +1: no bank conflicts
  const int c = blockIdx.x * kSumCols + threadIdx.x;
  const float* p = part + static_cast<int64_t>(blockIdx.y) * rows * C;
  float s = 0.f;
  if (c < C) {
    for (int64_t r = threadIdx.y; r < rows; r += kRowLanes) s += p[r * C + c];
  }
  lane_sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kRowLanes; ++k) total += lane_sums[k][threadIdx.x];
    (blockIdx.y == 0 ? out0 : out1)[c] = total;
  }
}

// out_k[c] = sum_r part[k][r][c] for k < n_arrays (1 or 2); rows == 0 gives zeros.
inline cudaError_t sum_partial_rows(const float* part, int64_t rows, int64_t C, float* out0,
                                    float* out1, int n_arrays, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((C + kSumCols - 1) / kSumCols), n_arrays);
  sum_partial_rows_kernel<kSumRowLanes><<<grid, dim3(kSumCols, kSumRowLanes), 0, stream>>>(
      part, rows, static_cast<int>(C), out0, out1);
  return cudaGetLastError();
}

// Columns are int inside the kernels (chunk_col); rows are int64.
constexpr int64_t kMaxCols = int64_t{1} << 30;

}  // namespace gpu
}  // namespace fastlm
