// The hand-written matchers for the GPT-2 and GPT-4 split patterns (see bpe_split.h).
//
// Each function tries the pattern's alternatives in order at `start`, as the regex engine does, and
// returns the end of the first one that matches. Possessive quantifiers (++, ?+) never give back,
// which is what lets a single forward scan reproduce them; the only backtracking left is in the
// whitespace alternatives, handled by remembering where the last whitespace character started.
#include "bpe/bpe_split.h"

#include <stdexcept>

#include "bpe/bpe_unicode.h"

namespace fastlm::bpe {

Pattern parse_pattern(const std::string& name) {
  if (name == "gpt2") return Pattern::kGpt2;
  if (name == "gpt4") return Pattern::kGpt4;
  if (name == "none") return Pattern::kNone;
  throw std::invalid_argument("unknown split pattern '" + name +
                              "': expected 'gpt2', 'gpt4' or 'none'");
}

const char* pattern_name(Pattern p) {
  switch (p) {
    case Pattern::kGpt2: return "gpt2";
    case Pattern::kGpt4: return "gpt4";
    default: return "none";
  }
}

namespace {

// End of the run of characters of class `cls` starting at i (i itself may be outside the class).
inline size_t run_end(const uint8_t* s, size_t n, size_t i, uint8_t cls) {
  while (i < n) {
    Char c = decode(s + i, n - i);
    if (c.cls != cls) break;
    i += c.len;
  }
  return i;
}

inline bool is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// The whitespace alternatives shared by both patterns, at a whitespace character:
//   [gpt4 only: \s*[\r\n]]  \s++$  |  \s+(?!\S)  |  \s
// `newline_alt` selects the GPT-4 alternative that ends a piece after the run's last newline.
inline size_t whitespace_end(const uint8_t* s, size_t n, size_t start, bool newline_alt) {
  size_t i = start, last_start = start, after_newline = 0;
  while (i < n) {
    Char c = decode(s + i, n - i);
    if (c.cls != kSpace) break;
    last_start = i;
    i += c.len;
    if (is_newline(c.cp)) after_newline = i;
  }
  if (i == n) return n;                          // \s++$
  if (newline_alt && after_newline) return after_newline;  // \s*[\r\n]
  if (last_start > start) return last_start;     // \s+(?!\S): all but the last space
  return i;                                      // \s: a single character (the run is one char)
}

size_t gpt2_end(const uint8_t* s, size_t n, size_t start) {
  Char c0 = decode(s + start, n - start);
  size_t i1 = start + c0.len;
  if (c0.cp == '\'' && i1 < n) {  // '(?:[sdmt]|ll|ve|re)
    uint8_t a = s[i1], b = i1 + 1 < n ? s[i1 + 1] : 0;
    if (a == 's' || a == 'd' || a == 'm' || a == 't') return i1 + 1;
    if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return i1 + 2;
  }
  if (c0.cp == ' ' && i1 < n) {  //  ?\p{L}++ |  ?\p{N}++ |  ?[^\s\p{L}\p{N}]++ with the space
    Char c1 = decode(s + i1, n - i1);
    if (c1.cls != kSpace) return run_end(s, n, i1 + c1.len, c1.cls);
  }
  if (c0.cls != kSpace) return run_end(s, n, i1, c0.cls);  // the same without the space
  return whitespace_end(s, n, start, false);
}

// Case-insensitive match of an ASCII letter, as (?i) in the regex module does it.
inline bool is_ci(uint32_t cp, char lower) { return cp == uint32_t(lower) || cp == uint32_t(lower - 32); }

size_t gpt4_end(const uint8_t* s, size_t n, size_t start) {
  Char c0 = decode(s + start, n - start);
  size_t i1 = start + c0.len;
  if (c0.cp == '\'' && i1 < n) {  // '(?i:[sdmt]|ll|ve|re)
    Char a = decode(s + i1, n - i1);
    // U+017F LATIN SMALL LETTER LONG S case-folds to 's'.
    if (is_ci(a.cp, 's') || a.cp == 0x17F || is_ci(a.cp, 'd') || is_ci(a.cp, 'm') ||
        is_ci(a.cp, 't'))
      return i1 + a.len;
    size_t i2 = i1 + a.len;
    if (i2 < n && (is_ci(a.cp, 'l') || is_ci(a.cp, 'v') || is_ci(a.cp, 'r'))) {
      Char b = decode(s + i2, n - i2);
      if ((is_ci(a.cp, 'l') && is_ci(b.cp, 'l')) || (!is_ci(a.cp, 'l') && is_ci(b.cp, 'e')))
        return i2 + b.len;
    }
  }
  if (c0.cls == kLetter) return run_end(s, n, i1, kLetter);  // \p{L}++
  // [^\r\n\p{L}\p{N}]?+\p{L}++ with the prefix character
  if (c0.cls != kNumber && !is_newline(c0.cp) && i1 < n) {
    Char c1 = decode(s + i1, n - i1);
    if (c1.cls == kLetter) return run_end(s, n, i1 + c1.len, kLetter);
  }
  if (c0.cls == kNumber) {  // \p{N}{1,3}+
    size_t i = i1;
    for (int k = 1; k < 3 && i < n; ++k) {
      Char c = decode(s + i, n - i);
      if (c.cls != kNumber) break;
      i += c.len;
    }
    return i;
  }
  //  ?[^\s\p{L}\p{N}]++[\r\n]*+
  size_t punct = n;  // where the punctuation run starts, if this alternative applies
  if (c0.cls == kOther) {
    punct = start;
  } else if (c0.cp == ' ' && i1 < n && decode(s + i1, n - i1).cls == kOther) {
    punct = i1;
  }
  if (punct != n) {
    size_t i = run_end(s, n, punct, kOther);
    while (i < n && (s[i] == '\r' || s[i] == '\n')) ++i;
    return i;
  }
  return whitespace_end(s, n, start, true);
}

// Class of the character that ends just before byte offset `end` (> 0).
inline Char char_before(const uint8_t* s, size_t end) {
  size_t b = end - 1;
  for (int k = 0; k < 3 && b > 0 && (s[b] & 0xC0) == 0x80; ++k) --b;
  Char c = decode(s + b, end - b);
  if (b + c.len != end) return Char{kInvalidCodePoint, kOther, 1};  // a stray continuation byte
  return c;
}

inline bool ascii_letter(uint8_t b) { return (b | 0x20) >= 'a' && (b | 0x20) <= 'z'; }

}  // namespace

size_t piece_end(Pattern p, const uint8_t* s, size_t n, size_t start) {
  switch (p) {
    case Pattern::kGpt2: return gpt2_end(s, n, start);
    case Pattern::kGpt4: return gpt4_end(s, n, start);
    default: return n;
  }
}

size_t last_safe_cut(Pattern p, const uint8_t* s, size_t n, size_t lo, size_t hi) {
  if (hi > n) hi = n;
  for (size_t c = hi; c > lo; --c) {
    const uint8_t before = s[c - 1];
    if (p == Pattern::kNone) {
      if (before == '\n') return c;
      continue;
    }
    if (c >= n) continue;  // the character after the cut must be known
    if (before == '\n') {
      if (c < 2 || decode(s + c, n - c).cls == kSpace) continue;
      if (char_before(s, c - 1).cls == kSpace) continue;
      return c;
    }
    // "x| y" with ASCII letters x, y: the letter run ends at the space, " y..." starts a piece.
    if (s[c] == ' ' && c + 1 < n && ascii_letter(before) && ascii_letter(s[c + 1])) return c;
  }
  return 0;
}

}  // namespace fastlm::bpe
