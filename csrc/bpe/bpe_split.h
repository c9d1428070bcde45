// Pre-tokenization: splitting text into the pieces BPE works on, natively.
//
// Each pattern is a hand-written matcher that gives exactly what the regex engine gives for the
// pattern string below (the pure-Python reference runs that string through the `regex` module and
// the tests compare both on arbitrary text). Every character belongs to some piece, so pieces
// always concatenate back to the input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fastlm::bpe {

enum class Pattern : uint8_t {
  kNone = 0,  // no pre-tokenization: the whole text is one piece
  kGpt2 = 1,  // GPT-2 (tiktoken's r50k/p50k form)
  kGpt4 = 2,  // GPT-4 (tiktoken's cl100k_base)
};

// The regular expressions the matchers implement (used by exports to tiktoken / HF).
constexpr const char* kGpt2Regex =
    R"('(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s)";
constexpr const char* kGpt4Regex =
    R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s)";

// "none", "gpt2" or "gpt4"; throws std::invalid_argument naming the accepted values otherwise.
Pattern parse_pattern(const std::string& name);
const char* pattern_name(Pattern p);

// End (exclusive byte offset) of the piece that starts at byte offset `start` of s[0, n).
// `start < n`. The result is > start.
size_t piece_end(Pattern p, const uint8_t* s, size_t n, size_t start);

// Calls f(offset, length) for each piece of s[0, n) in order.
template <typename F>
inline void split(Pattern p, const uint8_t* s, size_t n, F&& f) {
  size_t i = 0;
  while (i < n) {
    size_t e = piece_end(p, s, n, i);
    f(i, e - i);
    i = e;
  }
}

// Training reads unbounded streams in blocks. A "safe cut" is a byte offset where cutting the text
// in two and splitting each part gives exactly the pieces of the whole. Returns the largest safe
// cut c with lo < c <= hi (hi <= n), or 0 when there is none in that range.
// gpt2/gpt4: just after a '\n' that follows a non-space character and precedes a non-space
// character (no piece of either pattern runs across such a newline and none looks further than
// the next character), or between an ASCII letter and " x" where x is an ASCII letter.
// none: just after any '\n' (training counts lines as units in this mode; see bpe_trainer.h).
size_t last_safe_cut(Pattern p, const uint8_t* s, size_t n, size_t lo, size_t hi);

}  // namespace fastlm::bpe
