// Argument checks shared by every op's torch glue (CPU and CUDA). Each failure names the op and
// the argument so the user knows what to fix; TORCH_CHECK turns it into a Python RuntimeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define FASTLM_CHECK_DEVICE(op, t, dev_type)                                                   \
  TORCH_CHECK((t).device().type() == (dev_type), "fastlm::", op, ": '", #t, "' must be on ", \
              c10::DeviceTypeName(dev_type), ", got ", (t).device())

#define FASTLM_CHECK_FLOAT_DTYPE(op, t)                                                      \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kBFloat16 ||       \
                  (t).scalar_type() == at::kHalf,                                            \
              "fastlm::", op, ": '", #t, "' must be float32, bfloat16 or float16, got ",     \
              (t).scalar_type())

#define FASTLM_CHECK_DTYPE(op, t, dtype)                                                      \
  TORCH_CHECK((t).scalar_type() == (dtype), "fastlm::", op, ": '", #t, "' must be ", (dtype), \
              ", got ", (t).scalar_type())

#define FASTLM_CHECK_DIM(op, t, n)                                                             \
  TORCH_CHECK((t).dim() == (n), "fastlm::", op, ": '", #t, "' must have ", n, " dimension(s), " \
              "got shape ", (t).sizes())

namespace fastlm {

// Outputs are allocated through these so tests can poison them (fill with NaN) before a kernel
// writes them: an element the kernel forgets to write then fails the comparison.
// Toggled by the op fastlm::set_poison_outputs(bool); off by default (it costs a pass).
bool poison_outputs_enabled();
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor empty_output_like(const at::Tensor& t);

// Rows x features view of a (..., C) tensor: the layout every norm kernel works on.
// Callers check C >= 1 first (check_rows_and_weight), so the division is safe.
inline int64_t rows_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.numel() / t.size(-1); }

// The checks every row-wise op (norms) makes, identical for its CPU and CUDA glue:
// x (..., C), C >= 1, float32/bf16/fp16, on `device`; weight (C,) on x's device.
void check_rows_and_weight(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           c10::DeviceType device);
// An optional per-feature tensor (bias): shape (C,) and on x's device.
void check_feature_vector(const char* op, const at::Tensor& x, const at::Tensor& t,
                          const char* name);
// A gradient of x's shape on x's device (dy).
void check_like_x(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name);
// A statistic a forward saved for its backward (mean, rstd): float32, one value per row of x,
// on x's device. A wrong size would make the kernel read out of bounds, so it is an error.
void check_row_stats(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name);

}  // namespace fastlm
