// Every op schema of fastlm in one place. Kernels register themselves per dispatch key in
// csrc/<op>/<op>_cpu.cpp and csrc/<op>/<op>_cuda_glue.cpp; fake (meta) kernels and autograd are
// registered from Python in fastlm/ops.py. Shapes: x is (..., C) and every per-row statistic is
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
}

// `import fastlm._C` loads this library (and so runs the registrations above); the module itself
// is empty: every op is reached through torch.ops.fastlm.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastlm native ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
