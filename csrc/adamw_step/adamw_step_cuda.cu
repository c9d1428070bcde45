// CUDA multi-tensor adamw_step. The host cuts every tensor into chunks of kChunk elements and
// packs up to kMaxTensors tensor addresses and kMaxBlocks (tensor, chunk) pairs into one kernel
// argument (under the 4 KB parameter limit), so a model's hundreds of tensors take a handful of
// launches instead of one each. Each block streams its chunk once: p, g, m, v read, p, m, v
// written, float32 math (the formula of adamw_step_math.h).
#include "adamw_step/adamw_step_cuda.h"
#include "common/cuda_utils.cuh"

namespace fastlm {
namespace gpu {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per block: 128 per thread, amortises the setup
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;

template <typename P, typename S>
struct Pack {
  P* p[kMaxTensors];
  const P* g[kMaxTensors];
  S* m[kMaxTensors];
  S* v[kMaxTensors];
  int64_t n[kMaxTensors];
  int32_t chunk[kMaxBlocks];
  uint8_t tensor[kMaxBlocks];
};
static_assert(sizeof(Pack<float, float>) <= 4000, "kernel arguments must stay under 4 KB");

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const Pack<P, S> pack, AdamWConsts c) {
  const int t = pack.tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(pack.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(begin + kChunk, pack.n[t]);
  P* __restrict__ p = pack.p[t];
  const P* __restrict__ g = pack.g[t];
  S* __restrict__ m = pack.m[t];
  S* __restrict__ v = pack.v[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float gi = to_float(g[i]);
    const float m0 = to_float(m[i]);
    const float mi = m0 + c.one_minus_b1 * (gi - m0);
    const float vi = c.beta2 * to_float(v[i]) + c.one_minus_b2 * gi * gi;
    const float denom = sqrtf(vi) * c.inv_sqrt_bc2 + c.eps;
    p[i] = from_float<P>(to_float(p[i]) * c.decay - c.step_size * mi / denom);
    m[i] = from_float<S>(mi);
    v[i] = from_float<S>(vi);
  }
}

}  // namespace

template <typename P, typename S>
cudaError_t adamw_step(P* const* params, const P* const* grads, S* const* exp_avgs,
                       S* const* exp_avg_sqs, const int64_t* numels, int64_t n_tensors,
                       const AdamWConsts& c, cudaStream_t stream) {
  Pack<P, S> pack;
  int tensors = 0, blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (blocks > 0) {
      adamw_kernel<P, S><<<blocks, kThreads, 0, stream>>>(pack, c);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    tensors = blocks = 0;
    return cudaSuccess;
  };
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t n = numels[i];
    if (n == 0) continue;
    if (tensors == kMaxTensors) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    pack.p[tensors] = params[i];
    pack.g[tensors] = grads[i];
    pack.m[tensors] = exp_avgs[i];
    pack.v[tensors] = exp_avg_sqs[i];
    pack.n[tensors] = n;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    if (chunks > 0x7fffffff) return cudaErrorInvalidValue;
    for (int64_t k = 0; k < chunks; ++k) {
      pack.tensor[blocks] = static_cast<uint8_t>(tensors);
      pack.chunk[blocks] = static_cast<int32_t>(k);
      if (++blocks == kMaxBlocks) {
        // The tensor may continue in the next launch: keep it as that launch's first tensor.
        const int cur = tensors;
        const cudaError_t err = flush();
        if (err != cudaSuccess) return err;
        if (k + 1 < chunks) {
          pack.p[0] = pack.p[cur];
          pack.g[0] = pack.g[cur];
          pack.m[0] = pack.m[cur];
          pack.v[0] = pack.v[cur];
          pack.n[0] = pack.n[cur];
          tensors = 0;
        } else {
          tensors = -1;  // finished exactly at the launch boundary
        }
      }
    }
    ++tensors;
  }
  return flush();
}

#define FASTLM_INSTANTIATE(P, S)                                                           \
  template cudaError_t adamw_step<P, S>(P* const*, const P* const*, S* const*, S* const*, \
                                        const int64_t*, int64_t, const AdamWConsts&,       \
                                        cudaStream_t);
FASTLM_INSTANTIATE(float, float)
FASTLM_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
FASTLM_INSTANTIATE(__nv_bfloat16, float)
FASTLM_INSTANTIATE(__half, __half)
FASTLM_INSTANTIATE(__half, float)
#undef FASTLM_INSTANTIATE

}  // namespace gpu
}  // namespace fastlm
