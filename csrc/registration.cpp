// Every op schema of fastlm in one place. Kernels register themselves per dispatch key in
// csrc/<op>/<op>_cpu.cpp and csrc/<op>/<op>_cuda_glue.cpp; fake (meta) kernels and autograd are
// registered from Python in fastlm/ops/autograd.py (for the C++ ops by fastlm/ops/native.py). Shapes: x is (..., C) and every per-row statistic is
// x.shape[:-1], saved in float32 whatever the input dtype.
#include <Python.h>

#include <string>

#include <torch/library.h>

namespace fastlm {
void set_poison_outputs(bool enabled);
bool poison_outputs_enabled();
}  // namespace fastlm

namespace {

std::string build_info() {
#ifdef FASTLM_WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

}  // namespace

TORCH_LIBRARY(fastlm, m) {
  // Utilities (no tensors): what was compiled, and the test-only output poisoning switch.
  m.def("build_info() -> str", &build_info);
  m.def("set_poison_outputs(bool enabled) -> ()", &fastlm::set_poison_outputs);
  m.def("poison_outputs_enabled() -> bool", &fastlm::poison_outputs_enabled);

  // layer_norm: y = (x - mean) * rstd * weight + bias. bias may be absent (then dbias is empty).
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, float eps)"
        " -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd,"
        " bool has_bias) -> (Tensor dx, Tensor dweight, Tensor dbias)");

  // rms_norm: y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps).
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd)"
        " -> (Tensor dx, Tensor dweight)");

  // attention: q (B, H, Tq, D), k and v (B, H_kv, Tk, D) -> out (B, H, Tq, D) and the float32
  // log-sum-exp of the scaled scores lse (B, H, Tq), all the backward keeps besides q, k, v, out.
  // Causal queries are aligned bottom-right (query i at key position i + Tk - Tq); window <= 0
  // means no sliding window. dk and dv are summed over the query heads sharing a k/v head.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, int window)"
        " -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " bool causal, float scale, int window) -> (Tensor dq, Tensor dk, Tensor dv)");

  // cross_entropy: logits (N, V), target (N,) int64 -> per-row loss (N,) float32 (0 where target
  // is ignore_index) and lse (N,) float32 saved for the backward; dlogits in logits' dtype.
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing,"
        " float z_loss) -> (Tensor loss, Tensor lse)");
  m.def("cross_entropy_bwd(Tensor dloss, Tensor logits, Tensor target, Tensor lse,"
        " int ignore_index, float label_smoothing, float z_loss) -> Tensor dlogits");
  // cross_entropy_fwd_inplace: per-row loss (N,) float32 as cross_entropy_fwd's, and
  // scale * dloss_r/dlogits_r written over each row of logits (scale: one float32 value, the
  // upstream gradient of every row's loss, e.g. 1/valid rows for "mean"; read on the device).
  m.def("cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor target, Tensor scale,"
        " int ignore_index, float label_smoothing, float z_loss) -> Tensor loss");

  // linear_cross_entropy: loss = scale * sum_r cross_entropy(hidden @ weight^T, target)_r as a
  // 0-dim float32 tensor (scale: 0-dim float32, 1/valid rows for "mean"), with the gradients of
  // that loss (computed chunk by chunk in the forward, never forming the (N, V) logits); with
  // with_grad false (inference) only the loss, and dhidden, dweight are empty (0,) tensors.
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor scale,"
        " int ignore_index, int chunk_rows, bool with_grad)"
        " -> (Tensor loss, Tensor dhidden, Tensor dweight)");

  // adamw_step: one AdamW update in place of every params[i], exp_avgs[i], exp_avg_sqs[i].
  m.def("adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(c!)[] exp_avg_sqs, float step, float lr, float beta1, float beta2, float eps,"
        " float weight_decay) -> ()");
  // adamw_step_master: adamw_step with float32 master weights (one per parameter, float32
  // states): the master copy is updated and each parameter receives it rounded to its dtype.
  m.def("adamw_step_master(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] master_params, float step, float lr,"
        " float beta1, float beta2, float eps, float weight_decay) -> ()");
  // adamw_step_capturable: the step of each parameter (steps[i], already incremented) and lr
  // are one-element tensors on the parameters' device, read by the kernel: no host sync, so the
  // step can be captured in a CUDA graph. master_params is empty or as in adamw_step_master.
  m.def("adamw_step_capturable(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
        " Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] master_params, Tensor[] steps, Tensor lr,"
        " float beta1, float beta2, float eps, float weight_decay) -> ()");

  // small_rows_linear: x (M, K) @ weight (N, K)^T + bias (N,) for a few rows of x (decoding one
  // token per sequence), float32 or bfloat16, CPU only; inference (no autograd formula).
  m.def("small_rows_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

// `import fastlm._C` loads this library (and so runs the registrations above); the module itself
// is empty: every op is reached through torch.ops.fastlm.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastlm native ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
