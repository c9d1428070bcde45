// Torch-free element math of one AdamW step, shared by the CPU and CUDA kernels (and mirrored by
// the Triton kernel). torch.optim.AdamW's formula with amsgrad and maximize off:
//   p <- p * (1 - lr * wd);  m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2
//   p <- p - step_size * m / (sqrt(v) / sqrt_bc2 + eps),  step_size = lr / (1 - b1^step)
// Per-step constants are computed once in double and used as float: on the host for a host step
// and lr, or (capturable) by the kernel itself from a step and lr read from device memory. Both
// go through adamw_consts, so on the CPU the two paths give bit-identical results.
// With fp32 master weights, p in the formula is the float32 master copy; the parameter itself
// receives the update rounded to its own dtype.
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define FASTLM_HOST_DEVICE __host__ __device__
#else
#define FASTLM_HOST_DEVICE
#endif

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

// The step-independent hyperparameters (what a capturable kernel needs besides step and lr).
struct AdamWHyper {
  double beta1, beta2, eps, weight_decay;
};

FASTLM_HOST_DEVICE inline AdamWConsts adamw_consts(double step, double lr, double beta1,
                                                   double beta2, double eps,
                                                   double weight_decay) {
  // ::pow / ::sqrt: the double functions of <math.h> on the host, CUDA's in device code.
  const double bc1 = 1.0 - ::pow(beta1, step);
  const double bc2 = 1.0 - ::pow(beta2, step);
  return {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
          static_cast<float>(lr / bc1), static_cast<float>(1.0 / ::sqrt(bc2)),
          static_cast<float>(eps)};
}

FASTLM_HOST_DEVICE inline AdamWConsts adamw_consts(double step, double lr, const AdamWHyper& h) {
  return adamw_consts(step, lr, h.beta1, h.beta2, h.eps, h.weight_decay);
}

}  // namespace fastlm
