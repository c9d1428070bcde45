// Argument checks shared by the CPU and CUDA glue of the row-wise ops (see checks.h).
#include "common/checks.h"

namespace fastlm {

namespace {
void check_on_device_of(const char* op, const at::Tensor& x, const at::Tensor& t,
                        const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fastlm::", op, ": '", name, "' must be on x's device ",
              x.device(), ", got ", t.device());
}
}  // namespace

void check_rows_and_weight(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           c10::DeviceType device) {
  FASTLM_CHECK_DEVICE(op, x, device);
  check_on_device_of(op, x, weight, "weight");
  FASTLM_CHECK_FLOAT_DTYPE(op, x);
  FASTLM_CHECK_DIM(op, weight, 1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "fastlm::", op, ": x must have a non-empty last "
              "(feature) dimension, got shape ", x.sizes());
  TORCH_CHECK(x.size(-1) == weight.size(0), "fastlm::", op, ": x's last dimension must equal "
              "weight's size ", weight.size(0), ", got x of shape ", x.sizes());
}

void check_feature_vector(const char* op, const at::Tensor& x, const at::Tensor& t,
                          const char* name) {
  check_on_device_of(op, x, t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(-1), "fastlm::", op, ": '", name,
              "' must have shape (", x.size(-1), "), got ", t.sizes());
}

void check_like_x(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name) {
  check_on_device_of(op, x, t, name);
  TORCH_CHECK(t.sizes() == x.sizes(), "fastlm::", op, ": '", name, "' must have x's shape ",
              x.sizes(), ", got ", t.sizes());
}

void check_row_stats(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name) {
  check_on_device_of(op, x, t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == rows_of(x), "fastlm::", op, ": '",
              name, "' must be float32 with one value per row of x (", rows_of(x), "), got ",
              t.scalar_type(), " of shape ", t.sizes());
}

}  // namespace fastlm
