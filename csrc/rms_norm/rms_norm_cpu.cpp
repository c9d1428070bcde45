// C++ CPU kernels of rms_norm (forward and backward) and their registration for CPU tensors.
// Same structure as layer_norm_cpu.cpp, without the mean and the bias.
#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/dispatch.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "rms_norm";

int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 32768 / C); }

// One row: y = x * rstd * w. (__restrict__ as in layer_norm_cpu.cpp: lets gcc vectorise.)
template <typename T>
inline void forward_row(const T* x, const float* __restrict__ w, T* y, float* rstd, int64_t C,
                        float eps, float* xbuf, float* __restrict__ ybuf) {
  const float* __restrict__ xr = cpu::as_float(x, xbuf, C);
  const float ms = cpu::lane_sum(C, [&](int64_t i) { return xr[i] * xr[i]; }) / C;
  const float rs = 1.0f / std::sqrt(ms + eps);
  for (int64_t i = 0; i < C; ++i) ybuf[i] = xr[i] * rs * w[i];
  cpu::store_row(ybuf, y, C);
  *rstd = rs;
}

// One row of the backward: dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd,
// and the row's dy * xhat added into the slice's partial dw (pw).
template <typename T>
inline void backward_row(const T* dy, const T* x, const float* __restrict__ w, float rs, T* dx,
                         float* __restrict__ pw, int64_t C, float* xbuf, float* dybuf,
                         float* __restrict__ dxbuf) {
  const float* __restrict__ xr = cpu::as_float(x, xbuf, C);
  const float* __restrict__ dyr = cpu::as_float(dy, dybuf, C);
  const float c_gx = cpu::lane_sum(C, [&](int64_t i) { return dyr[i] * w[i] * (xr[i] * rs); }) / C;
  for (int64_t i = 0; i < C; ++i) {
    const float xhat = xr[i] * rs;
    dxbuf[i] = rs * (dyr[i] * w[i] - xhat * c_gx);
    pw[i] += dyr[i] * xhat;
  }
  cpu::store_row(dxbuf, dx, C);
}

#ifdef FASTLM_HAVE_AVX2_CLONES
template <typename T>
FASTLM_TARGET_AVX2 void forward_row_avx2(const T* x, const float* w, T* y, float* rstd,
                                         int64_t C, float eps, float* xbuf, float* ybuf) {
  forward_row(x, w, y, rstd, C, eps, xbuf, ybuf);
}
template <typename T>
FASTLM_TARGET_AVX2 void backward_row_avx2(const T* dy, const T* x, const float* w, float rs,
                                          T* dx, float* pw, int64_t C, float* xbuf,
                                          float* dybuf, float* dxbuf) {
  backward_row(dy, x, w, rs, dx, pw, C, xbuf, dybuf, dxbuf);
}
#endif

template <typename T>
void forward_rows(const T* x, const float* w, T* y, float* rstd, int64_t N, int64_t C,
                  float eps) {
  const bool avx2 = cpu::cpu_has_avx2();
  at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(C), ybuf(C);
    for (int64_t r = begin; r < end; ++r) {
#ifdef FASTLM_HAVE_AVX2_CLONES
      if (avx2) {
        forward_row_avx2(x + r * C, w, y + r * C, rstd + r, C, eps, xbuf.data(), ybuf.data());
        continue;
      }
#endif
      forward_row(x + r * C, w, y + r * C, rstd + r, C, eps, xbuf.data(), ybuf.data());
    }
  });
  (void)avx2;
}

// Weight gradient summed per row slice in float32, then across slices in order (deterministic).
template <typename T>
void backward_rows(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw,
                   int64_t N, int64_t C) {
  const bool avx2 = cpu::cpu_has_avx2();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  std::vector<float> partial(parts * C, 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t kbegin, int64_t kend) {
    std::vector<float> xbuf(C), dybuf(C), dxbuf(C);
    for (int64_t k = kbegin; k < kend; ++k) {
      float* pw = partial.data() + k * C;
      int64_t begin, end;
      cpu::slice_rows(N, parts, k, &begin, &end);
      for (int64_t r = begin; r < end; ++r) {
#ifdef FASTLM_HAVE_AVX2_CLONES
        if (avx2) {
          backward_row_avx2(dy + r * C, x + r * C, w, rstd[r], dx + r * C, pw, C, xbuf.data(),
                            dybuf.data(), dxbuf.data());
          continue;
        }
#endif
        backward_row(dy + r * C, x + r * C, w, rstd[r], dx + r * C, pw, C, xbuf.data(),
                     dybuf.data(), dxbuf.data());
      }
    }
  });
  (void)avx2;
  for (int64_t i = 0; i < C; ++i) {
    float s = 0.f;
    for (int64_t k = 0; k < parts; ++k) s += partial[k * C + i];
    dw[i] = s;
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    double eps) {
  check_rows_and_weight(kOp, x, weight, at::kCPU);
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const int64_t C = x.size(-1), N = rows_of(x);
  at::Tensor y = empty_output_like(xc);
  at::Tensor rstd = empty_output(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    forward_rows<scalar_t>(xc.data_ptr<scalar_t>(), w.data_ptr<float>(), y.data_ptr<scalar_t>(),
                           rstd.data_ptr<float>(), N, C, static_cast<float>(eps));
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                    const at::Tensor& weight,
                                                    const at::Tensor& rstd) {
  check_rows_and_weight(kOp, x, weight, at::kCPU);
  check_like_x(kOp, x, dy, "dy");
  check_row_stats(kOp, x, rstd, "rstd");
  const at::Tensor xc = x.contiguous();
  const at::Tensor dyc = dy.to(x.scalar_type()).contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor rc = rstd.contiguous();
  const int64_t C = x.size(-1), N = rows_of(x);
  at::Tensor dx = empty_output_like(xc);
  at::Tensor dw = empty_output({C}, x.options().dtype(at::kFloat));
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    backward_rows<scalar_t>(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                            w.data_ptr<float>(), rc.data_ptr<float>(), dx.data_ptr<scalar_t>(),
                            dw.data_ptr<float>(), N, C);
  });
  return {dx, dw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace fastlm
