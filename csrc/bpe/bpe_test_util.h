// A minimal check macro for the standalone C++ unit tests (each *_test.cpp is its own program
// whose main() returns non-zero when any check failed; ctest runs them).
#pragma once

#include <cstdio>

namespace fastlm::bpe::testing {
inline int& failures() {
  static int n = 0;
  return n;
}
}  // namespace fastlm::bpe::testing

#define BPE_CHECK(cond)                                                      \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ++fastlm::bpe::testing::failures();                                    \
    }                                                                        \
  } while (0)

#define BPE_TEST_MAIN_END()                                                  \
  do {                                                                       \
    int n = fastlm::bpe::testing::failures();                                \
    std::fprintf(n ? stderr : stdout, "%s: %d failure(s)\n", __FILE__, n);   \
    return n ? 1 : 0;                                                        \
  } while (0)
