// CUDA cross_entropy kernels: one block per row of logits, the row streamed through in a
// coalesced block-stride loop (V is far beyond what registers hold: 50K+ columns).
// Forward: each thread keeps an online (running max, sum of exponentials) pair and the sum of
// its columns; the pairs are merged across the block in a fixed order (deterministic), giving
// lse and the loss. Backward: one more pass writing the gradient. The in-place variant does both
// in one block per row, writing the gradient over the logits it has just read. Math in float32.
//
// Loads and stores are 16-byte vectors whatever V is. Row r starts at element r * V, so with an
// odd V (GPT-2's 50257) most rows start off a 16-byte boundary: each row is walked as a head up
// to the first 16-byte boundary, a body of whole 16-byte vectors (LDG.128 / STG.128, one per
// thread per step, still coalesced) and a tail, the head and tail element by element.
#include <cfloat>

#include "common/cuda_utils.cuh"
#include "cross_entropy/cross_entropy_cuda.h"

namespace fastlm {
namespace gpu {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;

// Merge (m2, s2) into (m, s): sums of exp(x - m) over two sets, rescaled to the larger max.
__device__ __forceinline__ void merge_lse(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}

// The row split above for a row of V elements at xr: elements before the first 16-byte
// boundary (at most V), and whole 16-byte vectors after them.
template <typename T>
struct RowSplit {
  int64_t head, n_vec;
  __device__ __forceinline__ RowSplit(const T* xr, int64_t V) {
    const int64_t off = static_cast<int64_t>(reinterpret_cast<uintptr_t>(xr) & 15u);
    head = off == 0 ? 0 : (16 - off) / static_cast<int64_t>(sizeof(T));
    if (head > V) head = V;
    n_vec = (V - head) / kVecOf<T>;
  }
  __device__ __forceinline__ int64_t tail_start() const { return head + n_vec * kVecOf<T>; }
};

// f(i, x_i) for every element i of row xr that this thread owns (each element exactly once in
// the block): head and tail elements one by one, the body one 16-byte vector at a time.
template <typename T, typename F>
__device__ __forceinline__ void for_row_elements(const T* xr, int64_t V, F&& f) {
  constexpr int kN = kVecOf<T>;
  const RowSplit<T> split(xr, V);
  for (int64_t i = threadIdx.x; i < split.head; i += kThreads) f(i, to_float(xr[i]));
  for (int64_t k = threadIdx.x; k < split.n_vec; k += kThreads) {
    const int64_t i0 = split.head + k * kN;
    float v[kN];
    load_vec<kN>(xr + i0, v);
#pragma unroll
    for (int j = 0; j < kN; ++j) f(i0 + j, v[j]);
  }
  for (int64_t i = split.tail_start() + threadIdx.x; i < V; i += kThreads) f(i, to_float(xr[i]));
}

// lse of row xr (returned to every thread) and, in thread 0, the row's loss. Thread 0 reads
// x[target] before the barrier that ends this function, so a caller may overwrite the row after.
template <typename T>
__device__ __forceinline__ float row_lse_and_loss(const T* xr, int64_t V, int64_t t,
                                                  int64_t ignore_index, float label_smoothing,
                                                  float z_loss, float* loss) {
  __shared__ float sm[3][kWarps];
  __shared__ float lse_shared;
  float m = -INFINITY, s = 0.f, xs = 0.f;
  for_row_elements(xr, V, [&](int64_t, float v) {
    if (v > m) {
      s = s * __expf(m - v) + 1.f;
      m = v;
    } else if (v != -INFINITY) {  // a -inf logit adds 0; with m = -inf too, exp(v - m) is NaN
      s += __expf(v - m);
    }
    xs += v;
  });
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    merge_lse(m, s, m2, s2);
    xs += __shfl_xor_sync(0xffffffffu, xs, off);
  }
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    sm[0][warp] = m;
    sm[1][warp] = s;
    sm[2][warp] = xs;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = sm[0][0];
    s = sm[1][0];
    xs = sm[2][0];
    for (int w = 1; w < kWarps; ++w) {
      merge_lse(m, s, sm[0][w], sm[1][w]);
      xs += sm[2][w];
    }
    const float l = m + __logf(s);
    lse_shared = l;
    float out = 0.f;
    if (t != ignore_index) {
      out = (1.f - label_smoothing) * (l - to_float(xr[t])) + z_loss * l * l;
      if (label_smoothing != 0.f) out += label_smoothing * (l - xs / static_cast<float>(V));
    }
    *loss = out;
  }
  __syncthreads();
  return lse_shared;
}

// dloss * dloss/dx of row xr into gr (gr may be xr: each element, or 16-byte vector, is read by
// the thread that then overwrites it, so no __restrict__ here).
template <typename T>
__device__ __forceinline__ void row_grad(const T* xr, T* gr, int64_t V, int64_t t,
                                         int64_t ignore_index, float l, float dloss,
                                         float label_smoothing, float z_loss) {
  constexpr int kN = kVecOf<T>;
  const float d = t == ignore_index ? 0.f : dloss;
  const float a = d * (1.f + 2.f * z_loss * l);
  const float b = d * label_smoothing / static_cast<float>(V);
  const float c = d * (1.f - label_smoothing);
  auto grad = [&](int64_t i, float x) { return a * __expf(x - l) - b - (i == t ? c : 0.f); };
  // Vectors need x and g at the same offset from a 16-byte boundary (always so in place, and for
  // torch's allocations); otherwise every element on its own.
  const bool same_phase = ((reinterpret_cast<uintptr_t>(xr) ^ reinterpret_cast<uintptr_t>(gr)) &
                           15u) == 0;
  const RowSplit<T> split(xr, V);
  const int64_t n_vec = same_phase ? split.n_vec : 0;
  const int64_t head = same_phase ? split.head : V;  // no vectors: the "head" is the whole row
  for (int64_t i = threadIdx.x; i < head; i += kThreads) {
    gr[i] = from_float<T>(grad(i, to_float(xr[i])));
  }
  for (int64_t k = threadIdx.x; k < n_vec; k += kThreads) {
    const int64_t i0 = head + k * kN;
    float v[kN];
    load_vec<kN>(xr + i0, v);
#pragma unroll
    for (int j = 0; j < kN; ++j) v[j] = grad(i0 + j, v[j]);
    store_vec<kN>(gr + i0, v);
  }
  for (int64_t i = head + n_vec * kN + threadIdx.x; i < V; i += kThreads) {
    gr[i] = from_float<T>(grad(i, to_float(xr[i])));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ target,
                  float* __restrict__ loss, float* __restrict__ lse, int64_t V,
                  int64_t ignore_index, float label_smoothing, float z_loss) {
  const int64_t row = blockIdx.x;
  const float l = row_lse_and_loss(x + row * V, V, target[row], ignore_index, label_smoothing,
                                   z_loss, loss + row);
  if (threadIdx.x == 0) lse[row] = l;
}

// Forward and backward of one row in one block: the loss, then scale * dloss/dx over the row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_fwd_inplace_kernel(T* x, const int64_t* __restrict__ target, const float* __restrict__ scale,
                          float* __restrict__ loss, int64_t V, int64_t ignore_index,
                          float label_smoothing, float z_loss) {
  const int64_t row = blockIdx.x;
  T* xr = x + row * V;
  const int64_t t = target[row];
  const float l = row_lse_and_loss(xr, V, t, ignore_index, label_smoothing, z_loss, loss + row);
  row_grad(xr, xr, V, t, ignore_index, l, *scale, label_smoothing, z_loss);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_bwd_kernel(const float* __restrict__ dloss, const T* __restrict__ x,
                  const int64_t* __restrict__ target, const float* __restrict__ lse,
                  T* __restrict__ g, int64_t V, int64_t ignore_index, float label_smoothing,
                  float z_loss) {
  const int64_t row = blockIdx.x;
  row_grad(x + row * V, g + row * V, V, target[row], ignore_index, lse[row], dloss[row],
           label_smoothing, z_loss);
}

}  // namespace

template <typename T>
cudaError_t cross_entropy_fwd(const T* logits, const int64_t* target, float* loss, float* lse,
                              int64_t N, int64_t V, int64_t ignore_index, float label_smoothing,
                              float z_loss, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffff) return cudaErrorInvalidValue;  // one block per row
  ce_fwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      logits, target, loss, lse, V, ignore_index, label_smoothing, z_loss);
  return cudaGetLastError();
}

template <typename T>
cudaError_t cross_entropy_bwd(const float* dloss, const T* logits, const int64_t* target,
                              const float* lse, T* dlogits, int64_t N, int64_t V,
                              int64_t ignore_index, float label_smoothing, float z_loss,
                              cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffff) return cudaErrorInvalidValue;
  ce_bwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      dloss, logits, target, lse, dlogits, V, ignore_index, label_smoothing, z_loss);
  return cudaGetLastError();
}

template <typename T>
cudaError_t cross_entropy_fwd_inplace(T* logits, const int64_t* target, const float* scale,
                                      float* loss, int64_t N, int64_t V, int64_t ignore_index,
                                      float label_smoothing, float z_loss, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffff) return cudaErrorInvalidValue;
  ce_fwd_inplace_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      logits, target, scale, loss, V, ignore_index, label_smoothing, z_loss);
  return cudaGetLastError();
}

#define FASTLM_INSTANTIATE(T)                                                                  \
  template cudaError_t cross_entropy_fwd<T>(const T*, const int64_t*, float*, float*, int64_t, \
                                            int64_t, int64_t, float, float, cudaStream_t);     \
  template cudaError_t cross_entropy_bwd<T>(const float*, const T*, const int64_t*,            \
                                            const float*, T*, int64_t, int64_t, int64_t,       \
                                            float, float, cudaStream_t);       \
  template cudaError_t cross_entropy_fwd_inplace<T>(T*, const int64_t*, const float*, float*,  \
                                                    int64_t, int64_t, int64_t, float, float,   \
                                                    cudaStream_t);
FASTLM_INSTANTIATE(float)
FASTLM_INSTANTIATE(__nv_bfloat16)
FASTLM_INSTANTIATE(__half)
#undef FASTLM_INSTANTIATE

}  // namespace gpu
}  // namespace fastlm
