// Torch-free element math of one AdamW step, shared by the CPU kernel (and mirrored by the CUDA
// and Triton kernels). torch.optim.AdamW's formula with amsgrad and maximize off:
//   p <- p * (1 - lr * wd);  m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2
//   p <- p - step_size * m / (sqrt(v) / sqrt_bc2 + eps),  step_size = lr / (1 - b1^step)
// Per-step constants are computed once on the host in double and passed as float.
#pragma once

#include <cmath>

namespace fastlm {

struct AdamWConsts {
  float decay;         // 1 - lr * weight_decay
  float one_minus_b1;  // 1 - beta1
  float beta2;
  float one_minus_b2;  // 1 - beta2
  float step_size;     // lr / (1 - beta1^step)
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^step)
  float eps;
};

inline AdamWConsts adamw_consts(double step, double lr, double beta1, double beta2, double eps,
                                double weight_decay) {
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  return {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
          static_cast<float>(lr / bc1), static_cast<float>(1.0 / std::sqrt(bc2)),
          static_cast<float>(eps)};
}

}  // namespace fastlm
