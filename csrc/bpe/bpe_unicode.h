// UTF-8 decoding and the Unicode character classes the split patterns use.
//
// Input is raw bytes: text from Python is valid UTF-8, but training files may not be. An invalid
// byte (a lone continuation byte, an overlong form, an encoded surrogate, a truncated sequence)
// decodes as one character of class kOther and length 1. That is exactly what Python gives for
// bytes.decode("utf-8", "surrogateescape") followed by the regex module (each bad byte becomes one
// U+DC80..U+DCFF surrogate, which is neither letter, number nor space), so the pure-Python
// reference and the native splitter agree on any byte string.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastlm::bpe {

enum CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };

constexpr uint32_t kInvalidCodePoint = 0xFFFFFFFFu;

// Class of a code point (kOther for anything outside [0, 0x10FFFF]).
uint8_t char_class(uint32_t cp);

// One decoded character: its code point (kInvalidCodePoint for a bad byte), class and length.
struct Char {
  uint32_t cp;
  uint8_t cls;
  uint8_t len;
};

namespace detail {
extern const uint8_t kAsciiClass[128];
Char decode_multibyte(const uint8_t* s, size_t n);  // s[0] >= 0x80, n >= 1
}  // namespace detail

// Decode the character starting at s (n > 0 bytes available). ASCII is the inlined fast path.
inline Char decode(const uint8_t* s, size_t n) {
  if (s[0] < 0x80) return Char{s[0], detail::kAsciiClass[s[0]], 1};
  return detail::decode_multibyte(s, n);
}

// Length in bytes of the valid UTF-8 prefix of s (== n when all of s is valid).
size_t valid_utf8_prefix(const uint8_t* s, size_t n);

}  // namespace fastlm::bpe
