// Dtype dispatch for the torch glue: runs the lambda with scalar_t = float, c10::BFloat16 or
// c10::Half (the dtypes every fastlm kernel supports); anything else is rejected by name.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#define FASTLM_DISPATCH_FLOAT_TYPES(dtype, op, ...)                                          \
  [&] {                                                                                     \
    switch (dtype) {                                                                        \
      case at::kFloat: {                                                                    \
        using scalar_t = float;                                                             \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case at::kBFloat16: {                                                                 \
        using scalar_t = c10::BFloat16;                                                     \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case at::kHalf: {                                                                     \
        using scalar_t = c10::Half;                                                         \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      default:                                                                              \
        TORCH_CHECK(false, "fastlm::", op, ": unsupported dtype ", dtype,                   \
                    " (supported: float32, bfloat16, float16)");                            \
    }                                                                                       \
  }()
