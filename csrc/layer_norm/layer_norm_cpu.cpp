// C++ CPU kernels of layer_norm (forward and backward) and their registration for CPU tensors.
// x is viewed as (N, C) rows; statistics and weight math are float32 whatever x's dtype.
// Parallel over rows with at::parallel_for (torch's OpenMP pool, honours torch.set_num_threads).
#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/dispatch.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "layer_norm";

// Rows per task: enough work (~32K elements) to amortise the scheduling of a task.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 32768 / C); }

// One row: y = (x - mean) * rstd * w + b. buf holds C floats (x as float32, then y).
template <typename T>
inline void forward_row(const T* x, const float* __restrict__ w, const float* __restrict__ b, T* y,
                        float* mean, float* rstd, int64_t C, float eps, float* xbuf,
                        float* __restrict__ ybuf) {
  const float* __restrict__ xr = cpu::as_float(x, xbuf, C);
  const float mu = cpu::lane_sum(C, [&](int64_t i) { return xr[i]; }) / C;
  const float var = cpu::lane_sum(C, [&](int64_t i) {
                      const float d = xr[i] - mu;
                      return d * d;
                    }) / C;
  const float rs = 1.0f / std::sqrt(var + eps);
  if (b != nullptr) {
    for (int64_t i = 0; i < C; ++i) ybuf[i] = (xr[i] - mu) * rs * w[i] + b[i];
  } else {
    for (int64_t i = 0; i < C; ++i) ybuf[i] = (xr[i] - mu) * rs * w[i];
  }
  cpu::store_row(ybuf, y, C);
  *mean = mu;
  *rstd = rs;
}

// One row of the backward: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, and
// the row's dy * xhat and dy added into the slice's partial dw (pw) and db (pb).
template <typename T>
inline void backward_row(const T* dy, const T* x, const float* __restrict__ w, float mu, float rs,
                         T* dx, float* __restrict__ pw, float* __restrict__ pb, int64_t C,
                         float* xbuf, float* dybuf, float* __restrict__ dxbuf) {
  // __restrict__: the gradient rows never alias the inputs, which lets gcc vectorise the loop
  // below without run-time overlap checks.
  const float* __restrict__ xr = cpu::as_float(x, xbuf, C);
  const float* __restrict__ dyr = cpu::as_float(dy, dybuf, C);
  const float c_g = cpu::lane_sum(C, [&](int64_t i) { return dyr[i] * w[i]; }) / C;
  const float c_gx = cpu::lane_sum(C, [&](int64_t i) {
                       return dyr[i] * w[i] * ((xr[i] - mu) * rs);
                     }) / C;
  for (int64_t i = 0; i < C; ++i) {
    const float xhat = (xr[i] - mu) * rs;
    dxbuf[i] = rs * (dyr[i] * w[i] - c_g - xhat * c_gx);
    pw[i] += dyr[i] * xhat;
    pb[i] += dyr[i];
  }
  cpu::store_row(dxbuf, dx, C);
}

#ifdef FASTLM_HAVE_AVX2_CLONES
template <typename T>
FASTLM_TARGET_AVX2 void forward_row_avx2(const T* x, const float* w, const float* b, T* y,
                                         float* mean, float* rstd, int64_t C, float eps,
                                         float* xbuf, float* ybuf) {
  forward_row(x, w, b, y, mean, rstd, C, eps, xbuf, ybuf);
}
template <typename T>
FASTLM_TARGET_AVX2 void backward_row_avx2(const T* dy, const T* x, const float* w, float mu,
                                          float rs, T* dx, float* pw, float* pb, int64_t C,
                                          float* xbuf, float* dybuf, float* dxbuf) {
  backward_row(dy, x, w, mu, rs, dx, pw, pb, C, xbuf, dybuf, dxbuf);
}
#endif

template <typename T>
void forward_rows(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                  int64_t N, int64_t C, float eps) {
  const bool avx2 = cpu::cpu_has_avx2();
  at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(C), ybuf(C);
    for (int64_t r = begin; r < end; ++r) {
#ifdef FASTLM_HAVE_AVX2_CLONES
      if (avx2) {
        forward_row_avx2(x + r * C, w, b, y + r * C, mean + r, rstd + r, C, eps, xbuf.data(),
                         ybuf.data());
        continue;
      }
#endif
      forward_row(x + r * C, w, b, y + r * C, mean + r, rstd + r, C, eps, xbuf.data(),
                  ybuf.data());
    }
  });
  (void)avx2;
}

// Weight gradients: each of `parts` row slices sums into its own float32 row of `partial`
// (parts x 2C), then the slices are added in order, so the result does not depend on timing.
template <typename T>
void backward_rows(const T* dy, const T* x, const float* w, const float* mean, const float* rstd,
                   T* dx, float* dw, float* db, int64_t N, int64_t C) {
  const bool avx2 = cpu::cpu_has_avx2();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  std::vector<float> partial(parts * 2 * C, 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t kbegin, int64_t kend) {
    std::vector<float> xbuf(C), dybuf(C), dxbuf(C);
    for (int64_t k = kbegin; k < kend; ++k) {
      float* pw = partial.data() + k * 2 * C;
      float* pb = pw + C;
      int64_t begin, end;
      cpu::slice_rows(N, parts, k, &begin, &end);
      for (int64_t r = begin; r < end; ++r) {
#ifdef FASTLM_HAVE_AVX2_CLONES
        if (avx2) {
          backward_row_avx2(dy + r * C, x + r * C, w, mean[r], rstd[r], dx + r * C, pw, pb, C,
                            xbuf.data(), dybuf.data(), dxbuf.data());
          continue;
        }
#endif
        backward_row(dy + r * C, x + r * C, w, mean[r], rstd[r], dx + r * C, pw, pb, C,
                     xbuf.data(), dybuf.data(), dxbuf.data());
      }
    }
  });
  (void)avx2;
  for (int64_t i = 0; i < C; ++i) {
    float sw = 0.f, sb = 0.f;
    for (int64_t k = 0; k < parts; ++k) {
      sw += partial[k * 2 * C + i];
      sb += partial[k * 2 * C + C + i];
    }
    dw[i] = sw;
    db[i] = sb;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  check_rows_and_weight(kOp, x, weight, at::kCPU);
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    check_feature_vector(kOp, x, *bias, "bias");
    b = bias->to(at::kFloat).contiguous();
  }
  const int64_t C = x.size(-1), N = rows_of(x);
  at::IntArrayRef row_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor y = empty_output_like(xc);
  at::Tensor mean = empty_output(row_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = empty_output(row_shape, x.options().dtype(at::kFloat));
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    forward_rows<scalar_t>(xc.data_ptr<scalar_t>(), w.data_ptr<float>(),
                           b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<scalar_t>(),
                           mean.data_ptr<float>(), rstd.data_ptr<float>(), N, C,
                           static_cast<float>(eps));
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool has_bias) {
  check_rows_and_weight(kOp, x, weight, at::kCPU);
  check_like_x(kOp, x, dy, "dy");
  check_row_stats(kOp, x, mean, "mean");
  check_row_stats(kOp, x, rstd, "rstd");
  const at::Tensor xc = x.contiguous();
  const at::Tensor dyc = dy.to(x.scalar_type()).contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const int64_t C = x.size(-1), N = rows_of(x);
  at::Tensor dx = empty_output_like(xc);
  at::Tensor dw = empty_output({C}, x.options().dtype(at::kFloat));
  at::Tensor db = empty_output({C}, x.options().dtype(at::kFloat));
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    backward_rows<scalar_t>(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                            w.data_ptr<float>(), mc.data_ptr<float>(), rc.data_ptr<float>(),
                            dx.data_ptr<scalar_t>(), dw.data_ptr<float>(), db.data_ptr<float>(),
                            N, C);
  });
  return {dx, dw.to(weight.scalar_type()),
          has_bias ? db.to(weight.scalar_type()) : at::empty({0}, weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fastlm
