// C++ CPU kernels of cross_entropy (forward, backward, and the fused forward that writes the
// gradient over the logits) and their registration for CPU tensors. logits (N, V) in
// float32/bf16/fp16, target (N,) int64. Row math in float32 (cross_entropy_rows.h) whatever the
// logits' dtype; parallel over rows with at::parallel_for.
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cross_entropy/cross_entropy_rows.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "cross_entropy";

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 65536 / V); }

// Gradient row r: written straight into dx for float32, through a float32 buffer otherwise.
template <typename T>
void backward_row(const float* xr, int64_t V, int64_t t, float lse, float dl,
                  const cpu::CeParams& prm, T* out, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    cpu::ce_row_backward_best(xr, V, t, lse, dl, prm, out);
  } else {
    cpu::ce_row_backward_best(xr, V, t, lse, dl, prm, buf);
    cpu::store_row(buf, out, V);
  }
}

void check_inputs(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index) {
  FASTLM_CHECK_DEVICE(kOp, logits, at::kCPU);
  FASTLM_CHECK_DEVICE(kOp, target, at::kCPU);
  FASTLM_CHECK_FLOAT_DTYPE(kOp, logits);
  FASTLM_CHECK_DTYPE(kOp, target, at::kLong);
  FASTLM_CHECK_DIM(kOp, logits, 2);
  FASTLM_CHECK_DIM(kOp, target, 1);
  TORCH_CHECK(target.size(0) == logits.size(0), "fastlm::cross_entropy: target must have ",
              logits.size(0), " entries (one per row of logits), got ", target.size(0));
  TORCH_CHECK(logits.size(1) > 0, "fastlm::cross_entropy: logits must have at least one class");
  const int64_t V = logits.size(1);
  const at::Tensor t = target.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t r = 0; r < t.numel(); ++r) {
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < V), "fastlm::cross_entropy: "
                "target[", r, "] = ", tp[r], " is neither ignore_index (", ignore_index,
                ") nor a class in [0, ", V, ")");
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits,
                                                         const at::Tensor& target,
                                                         int64_t ignore_index,
                                                         double label_smoothing, double z_loss) {
  check_inputs(logits, target, ignore_index);
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const int64_t N = x.size(0), V = x.size(1);
  at::Tensor loss = empty_output({N}, x.options().dtype(at::kFloat));  // (N,)
  at::Tensor lse = empty_output({N}, x.options().dtype(at::kFloat));   // (N,)
  const cpu::CeParams prm{ignore_index, static_cast<float>(label_smoothing),
                          static_cast<float>(z_loss)};
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* tp = t.data_ptr<int64_t>();
    float* lp = loss.data_ptr<float>();
    float* sp = lse.data_ptr<float>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(V);
      for (int64_t r = begin; r < end; ++r) {
        const float* xr = cpu::as_float(xp + r * V, buf.data(), V);
        cpu::ce_row_forward_best(xr, V, tp[r], prm, lp + r, sp + r);
      }
    });
  });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& dloss, const at::Tensor& logits,
                                 const at::Tensor& target, const at::Tensor& lse,
                                 int64_t ignore_index, double label_smoothing, double z_loss) {
  check_inputs(logits, target, ignore_index);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(dloss.dim() == 1 && dloss.size(0) == N && lse.dim() == 1 && lse.size(0) == N,
              "fastlm::cross_entropy_bwd: dloss and lse must have shape (", N, ",), got ",
              dloss.sizes(), " and ", lse.sizes());
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor dl = dloss.to(at::kFloat).contiguous();
  const at::Tensor ls = lse.to(at::kFloat).contiguous();
  at::Tensor dx = empty_output_like(x);  // (N, V) logits' dtype
  const cpu::CeParams prm{ignore_index, static_cast<float>(label_smoothing),
                          static_cast<float>(z_loss)};
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gp = dx.data_ptr<scalar_t>();
    const int64_t* tp = t.data_ptr<int64_t>();
    const float* dlp = dl.data_ptr<float>();
    const float* sp = ls.data_ptr<float>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(V), gbuf(V);
      for (int64_t r = begin; r < end; ++r) {
        const float* xr = cpu::as_float(xp + r * V, buf.data(), V);
        backward_row(xr, V, tp[r], sp[r], dlp[r], prm, gp + r * V, gbuf.data());
      }
    });
  });
  return dx;
}

// Fused forward + backward in place: each row's loss, and scale * dloss/dlogits written over the
// row (read into float32 first, so a bf16/fp16 row is converted once and stored once). Saves the
// (N, V) gradient buffer: the memory the caller's logits already hold is reused.
at::Tensor cross_entropy_fwd_inplace_cpu(const at::Tensor& logits, const at::Tensor& target,
                                         const at::Tensor& scale, int64_t ignore_index,
                                         double label_smoothing, double z_loss) {
  check_inputs(logits, target, ignore_index);
  TORCH_CHECK(logits.is_contiguous(), "fastlm::cross_entropy_fwd_inplace: 'logits' must be "
              "contiguous (their gradient is written into their own storage)");
  TORCH_CHECK(scale.numel() == 1 && scale.device().is_cpu(), "fastlm::cross_entropy_fwd_inplace: "
              "'scale' must be a one-element CPU tensor, got shape ", scale.sizes(), " on ",
              scale.device());
  const float s = scale.item<float>();  // a CPU read: no device sync to avoid here
  const at::Tensor t = target.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor loss = empty_output({N}, logits.options().dtype(at::kFloat));  // (N,)
  const cpu::CeParams prm{ignore_index, static_cast<float>(label_smoothing),
                          static_cast<float>(z_loss)};
  FASTLM_DISPATCH_FLOAT_TYPES(logits.scalar_type(), kOp, [&] {
    scalar_t* xp = logits.data_ptr<scalar_t>();
    const int64_t* tp = t.data_ptr<int64_t>();
    float* lp = loss.data_ptr<float>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : V);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = xp + r * V;
        float* xr;  // (V,) float32 view of the row: the row itself, or its converted copy
        if constexpr (std::is_same_v<scalar_t, float>) {
          xr = reinterpret_cast<float*>(row);  // scalar_t is float here
        } else {
          xr = buf.data();
          for (int64_t i = 0; i < V; ++i) xr[i] = static_cast<float>(row[i]);
        }
        float lse;
        cpu::ce_row_forward_best(xr, V, tp[r], prm, lp + r, &lse);
        cpu::ce_row_backward_best(xr, V, tp[r], lse, s, prm, xr);  // in place
        if constexpr (!std::is_same_v<scalar_t, float>) cpu::store_row(xr, row, V);
      }
    });
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace_cpu);
}

}  // namespace fastlm
