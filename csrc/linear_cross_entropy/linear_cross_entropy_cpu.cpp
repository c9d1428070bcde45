// C++ CPU linear_cross_entropy: loss and gradients of cross_entropy(hidden @ weight^T, target)
// without the (N, V) logits. Rows go through in chunks of `chunk_rows`: per chunk the (n, V)
// float32 logits are formed by one GEMM, turned in place into their gradient by the row kernels of
// cross_entropy, and consumed by two more GEMMs (dhidden rows, and dweight accumulated in float32).
// The gradients are those of the returned loss = scale * sum_r loss_r (scale = 1 for "sum",
// 1 / valid rows for "mean"), computed in the forward: autograd multiplies them by the upstream
// scalar, so no (N, V) tensor is ever kept and no logits are recomputed.
// bfloat16 hidden and weight on a CPU with bf16 arithmetic (AVX512-BF16) run the three GEMMs in
// bfloat16, as torch's materialised path does (logits rounded to bf16, then float32 for the row
// kernels; dweight summed over chunks in float32). Elsewhere the GEMMs run in float32: emulated
// bf16 GEMMs are many times slower, and converting W once is cheap next to them.
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "cross_entropy/cross_entropy_rows.h"

namespace fastlm {
namespace {

constexpr const char* kOp = "linear_cross_entropy";

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                  const at::Tensor& scale, int64_t ignore_index) {
  for (const at::Tensor* t : {&hidden, &weight, &target, &scale}) {
    TORCH_CHECK(t->device().is_cpu(), "fastlm::linear_cross_entropy: every tensor must be on the "
                "CPU, got one on ", t->device());
  }
  FASTLM_CHECK_FLOAT_DTYPE(kOp, hidden);
  FASTLM_CHECK_FLOAT_DTYPE(kOp, weight);
  FASTLM_CHECK_DTYPE(kOp, target, at::kLong);
  FASTLM_CHECK_DIM(kOp, hidden, 2);
  FASTLM_CHECK_DIM(kOp, weight, 2);
  FASTLM_CHECK_DIM(kOp, target, 1);
  TORCH_CHECK(scale.numel() == 1, "fastlm::linear_cross_entropy: scale must hold one number");
  TORCH_CHECK(weight.size(1) == hidden.size(1), "fastlm::linear_cross_entropy: weight must be "
              "(V, ", hidden.size(1), ") to match hidden's last dimension, got ", weight.sizes());
  TORCH_CHECK(target.size(0) == hidden.size(0), "fastlm::linear_cross_entropy: target must have ",
              hidden.size(0), " entries (one per row of hidden), got ", target.size(0));
  TORCH_CHECK(weight.size(0) > 0, "fastlm::linear_cross_entropy: weight has no classes");
  const int64_t V = weight.size(0);
  const at::Tensor t = target.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t r = 0; r < t.numel(); ++r) {
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < V), "fastlm::"
                "linear_cross_entropy: target[", r, "] = ", tp[r], " is neither ignore_index (",
                ignore_index, ") nor a class in [0, ", V, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const at::Tensor& scale, int64_t ignore_index, int64_t chunk_rows, bool with_grad) {
  check_inputs(hidden, weight, target, scale, ignore_index);
  TORCH_CHECK(chunk_rows > 0, "fastlm::linear_cross_entropy: chunk_rows must be > 0, got ",
              chunk_rows);
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  const at::Tensor h = hidden.contiguous();
  const bool bf16_gemm = hidden.scalar_type() == at::kBFloat16 &&
                         weight.scalar_type() == at::kBFloat16 && cpu::use_avx512_bf16();
  // (V, D) in the GEMMs' dtype; no copy when it is already
  const at::Tensor w = (bf16_gemm ? weight : weight.to(at::kFloat)).contiguous();
  const at::Tensor t = target.contiguous();
  const float s = scale.to(at::kFloat).item<float>();
  // (N, D) and (V, D) float32 gradients, or empty (0,) placeholders without with_grad.
  at::Tensor dh, dw;
  if (with_grad) dh = empty_output({N, D}, hidden.options());
  at::Tensor losses = empty_output({N}, hidden.options().dtype(at::kFloat));       // (N,)
  const cpu::CeParams prm{ignore_index, 0.0f, 0.0f};
  const int64_t* tp = t.data_ptr<int64_t>();
  float* lp = losses.data_ptr<float>();

  for (int64_t start = 0; start < N; start += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - start);
    const at::Tensor hc = h.narrow(0, start, n).to(w.scalar_type());  // (n, D)
    at::Tensor logits = at::mm(hc, w.t());                              // (n, V), contiguous
    if (bf16_gemm) logits = logits.to(at::kFloat);  // the row kernels work in float32
    float* xp = logits.data_ptr<float>();
    at::parallel_for(0, n, std::max<int64_t>(1, 65536 / V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float* xr = xp + r * V;
        float lse;
        cpu::ce_row_forward_best(xr, V, tp[start + r], prm, lp + start + r, &lse);
        if (with_grad) cpu::ce_row_backward_best(xr, V, tp[start + r], lse, s, prm, xr);  // in place
      }
    });
    if (!with_grad) continue;
    const at::Tensor dlogits = bf16_gemm ? logits.to(at::kBFloat16) : logits;
    dh.narrow(0, start, n).copy_(at::mm(dlogits, w));  // (n, D)
    // (V, D) += (V, n) @ (n, D); the first chunk writes dw outright: zeroing a (V, D) buffer
    // first cost as much as the product (155 MB of fresh pages for GPT-2's vocabulary)
    if (bf16_gemm) {  // each chunk's bf16 product summed in float32 (one chunk: kept as it is)
      const at::Tensor part = at::mm(dlogits.t(), hc);
      dw = start > 0 ? dw.add_(part) : n == N ? part : part.to(at::kFloat);
    } else if (start == 0) {
      dw = at::mm(logits.t(), hc);
    } else {
      dw.addmm_(logits.t(), hc);
    }
  }
  if (with_grad && !dw.defined()) dw = at::zeros({V, D}, weight.options().dtype(at::kFloat));  // N = 0
  // Fixed-order double sum of the per-row losses: deterministic and exact enough for any N.
  double total = 0.0;
  for (int64_t r = 0; r < N; ++r) total += lp[r];
  at::Tensor loss = at::zeros({}, hidden.options().dtype(at::kFloat));
  loss.fill_(static_cast<float>(total * static_cast<double>(s)));
  if (!with_grad) {
    return {loss, at::zeros({0}, hidden.options()), at::zeros({0}, weight.options())};
  }
  return {loss, dh, dw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
}

}  // namespace fastlm
