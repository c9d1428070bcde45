// Output allocation with optional NaN poisoning (see checks.h).
#include <atomic>
#include <limits>

#include <ATen/ops/empty.h>

#include "common/checks.h"

namespace fastlm {

namespace {
std::atomic<bool> g_poison{false};
}

void set_poison_outputs(bool enabled) { g_poison.store(enabled); }

bool poison_outputs_enabled() { return g_poison.load(); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (g_poison.load() && t.numel() > 0) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

at::Tensor empty_output_like(const at::Tensor& t) {
  return empty_output(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace fastlm
