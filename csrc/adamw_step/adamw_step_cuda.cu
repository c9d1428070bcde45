// CUDA multi-tensor adamw_step. The host cuts every tensor into chunks of kChunk elements and
// packs up to kMaxTensors tensor addresses and kMaxBlocks (tensor, chunk) pairs into one kernel
// argument (under the 4 KB parameter limit), so a model's hundreds of tensors take a handful of
// launches instead of one each. Each block streams its chunk once: p, g, m, v read, p, m, v
// written, float32 math (the formula of adamw_step_math.h). Variants: float32 master weights (w
// read and written too) and capturable (each block computes its tensor's constants from the
// device step and lr: nothing is read on the host, so the launch can be captured in a graph).
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
  float* w[kMaxTensors];           // float32 master weights (master launches only)
  const float* step[kMaxTensors];  // device step of each tensor (capturable launches only)
  int64_t n[kMaxTensors];
  int32_t chunk[kMaxBlocks];
  uint8_t tensor[kMaxBlocks];
};
static_assert(sizeof(Pack<float, float>) <= 3700, "kernel arguments must stay under 4 KB");

// kMaster: p in the formula is the float32 master copy w, and p receives the result rounded.
// kCapturable: the constants come from the tensor's device step and the device lr (in double,
// by thread 0, shared with the block) instead of the host's `c`.
template <typename P, typename S, bool kMaster, bool kCapturable>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const Pack<P, S> pack, AdamWConsts c, AdamWHyper h, const double* lr) {
  const int t = pack.tensor[blockIdx.x];
  if constexpr (kCapturable) {
    __shared__ AdamWConsts shared;
    if (threadIdx.x == 0) shared = adamw_consts(static_cast<double>(*pack.step[t]), *lr, h);
    __syncthreads();
    c = shared;
  }
  const int64_t begin = static_cast<int64_t>(pack.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(begin + kChunk, pack.n[t]);
  P* __restrict__ p = pack.p[t];
  const P* __restrict__ g = pack.g[t];
  S* __restrict__ m = pack.m[t];
  S* __restrict__ v = pack.v[t];
  float* __restrict__ w = pack.w[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float gi = to_float(g[i]);
    const float m0 = to_float(m[i]);
    const float mi = m0 + c.one_minus_b1 * (gi - m0);
    const float vi = c.beta2 * to_float(v[i]) + c.one_minus_b2 * gi * gi;
    const float denom = sqrtf(vi) * c.inv_sqrt_bc2 + c.eps;
    float p0;
    if constexpr (kMaster) {
      p0 = w[i];
    } else {
      p0 = to_float(p[i]);
    }
    const float pi = p0 * c.decay - c.step_size * mi / denom;
    if constexpr (kMaster) w[i] = pi;
    p[i] = from_float<P>(pi);
    m[i] = from_float<S>(mi);
    v[i] = from_float<S>(vi);
  }
}

template <typename P, typename S>
cudaError_t launch(const Pack<P, S>& pack, int blocks, bool master, bool capturable,
                   const AdamWConsts& c, const AdamWHyper& h, const double* lr,
                   cudaStream_t stream) {
  if (master && capturable) {
    adamw_kernel<P, S, true, true><<<blocks, kThreads, 0, stream>>>(pack, c, h, lr);
  } else if (master) {
    adamw_kernel<P, S, true, false><<<blocks, kThreads, 0, stream>>>(pack, c, h, lr);
  } else if (capturable) {
    adamw_kernel<P, S, false, true><<<blocks, kThreads, 0, stream>>>(pack, c, h, lr);
  } else {
    adamw_kernel<P, S, false, false><<<blocks, kThreads, 0, stream>>>(pack, c, h, lr);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename P, typename S>
cudaError_t adamw_step(P* const* params, const P* const* grads, S* const* exp_avgs,
                       S* const* exp_avg_sqs, float* const* master, const float* const* steps,
                       const double* lr, const int64_t* numels, int64_t n_tensors,
                       const AdamWConsts& c, const AdamWHyper& h, cudaStream_t stream) {
  Pack<P, S> pack;
  int tensors = 0, blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (blocks > 0) {
      const cudaError_t err = launch(pack, blocks, master != nullptr, steps != nullptr, c, h, lr,
                                     stream);
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
    pack.w[tensors] = master ? master[i] : nullptr;
    pack.step[tensors] = steps ? steps[i] : nullptr;
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
          pack.w[0] = pack.w[cur];
          pack.step[0] = pack.step[cur];
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

#define FASTLM_INSTANTIATE(P, S)                                                             \
  template cudaError_t adamw_step<P, S>(P* const*, const P* const*, S* const*, S* const*,   \
                                        float* const*, const float* const*, const double*, \
                                        const int64_t*, int64_t, const AdamWConsts&,         \
                                        const AdamWHyper&, cudaStream_t);
FASTLM_INSTANTIATE(float, float)
FASTLM_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
FASTLM_INSTANTIATE(__nv_bfloat16, float)
FASTLM_INSTANTIATE(__half, __half)
FASTLM_INSTANTIATE(__half, float)
#undef FASTLM_INSTANTIATE

}  // namespace gpu
}  // namespace fastlm
