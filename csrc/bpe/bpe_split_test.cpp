// Unit tests of the pre-tokenizers and safe cuts (the Python tests compare them with the regex
// module on arbitrary text; these pin known cases and the cut property without Python).
#include <random>
#include <string>
#include <vector>

#include "bpe/bpe_split.h"
#include "bpe/bpe_test_util.h"
#include "bpe/bpe_unicode.h"

using namespace fastlm::bpe;

static std::vector<std::string> pieces(Pattern p, const std::string& s) {
  std::vector<std::string> out;
  split(p, reinterpret_cast<const uint8_t*>(s.data()), s.size(),
        [&](size_t off, size_t len) { out.push_back(s.substr(off, len)); });
  return out;
}

using V = std::vector<std::string>;

int main() {
  // Classes, including multi-byte characters and invalid bytes.
  BPE_CHECK(char_class('a') == kLetter && char_class('7') == kNumber && char_class(' ') == kSpace);
  BPE_CHECK(char_class(0x4E2D) == kLetter);   // 中
  BPE_CHECK(char_class(0x0663) == kNumber);   // Arabic-Indic three
  BPE_CHECK(char_class(0x3000) == kSpace);    // ideographic space
  BPE_CHECK(char_class(0x1F600) == kOther);   // emoji
  BPE_CHECK(char_class(0x110000) == kOther);
  const uint8_t bad[] = {0xED, 0xA0, 0x80};   // an encoded surrogate: three bad bytes
  BPE_CHECK(decode(bad, 3).cp == kInvalidCodePoint && decode(bad, 3).len == 1);
  const uint8_t euro[] = {0xE2, 0x82, 0xAC};
  BPE_CHECK(decode(euro, 3).cp == 0x20AC && decode(euro, 3).len == 3);
  BPE_CHECK(decode(euro, 2).cp == kInvalidCodePoint);  // truncated
  BPE_CHECK(valid_utf8_prefix(euro, 3) == 3 && valid_utf8_prefix(bad, 3) == 0);

  // GPT-2
  BPE_CHECK(pieces(Pattern::kGpt2, "Hello world's  123 \n\n  ok!!\n") ==
            (V{"Hello", " world", "'s", " ", " 123", " \n\n ", " ok", "!!", "\n"}));
  BPE_CHECK(pieces(Pattern::kGpt2, "I'LL x  ") == (V{"I", "'", "LL", " x", "  "}));
  // GPT-4
  BPE_CHECK(pieces(Pattern::kGpt4, "Hello world's  123456 \n\n  ok!!\n") ==
            (V{"Hello", " world", "'s", " ", " ", "123", "456", " \n\n", " ", " ok", "!!\n"}));
  BPE_CHECK(pieces(Pattern::kGpt4, "I'LL $x \xC5\xBF'\xC5\xBF") ==
            (V{"I", "'LL", " $", "x", " \xC5\xBF", "'\xC5\xBF"}));  // 'ſ folds to 's
  BPE_CHECK(pieces(Pattern::kNone, "a b\nc") == (V{"a b\nc"}));
  BPE_CHECK(pieces(Pattern::kGpt4, "").empty());

  // Safe cuts: splitting at any cut gives the pieces of the whole, on random text.
  const std::vector<std::string> alphabet = {"a", "B", "z", " ", "  ", "\n", "\r", "\t", "1",
                                             "'", "s", "!", ".", "\xC3\xA9", "\xE4\xB8\xAD",
                                             "\xF0\x9F\x98\x80", "\xFF", "\xE3\x80\x80", "'ll"};
  std::mt19937 rng(0);
  int cuts_checked = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string s;
    int n = rng() % 30;
    for (int k = 0; k < n; ++k) s += alphabet[rng() % alphabet.size()];
    const auto* d = reinterpret_cast<const uint8_t*>(s.data());
    for (Pattern p : {Pattern::kGpt2, Pattern::kGpt4}) {
      V whole = pieces(p, s);
      for (size_t hi = s.size(); hi > 0;) {
        size_t c = last_safe_cut(p, d, s.size(), 0, hi);
        if (c == 0) break;
        V left = pieces(p, s.substr(0, c)), right = pieces(p, s.substr(c));
        left.insert(left.end(), right.begin(), right.end());
        BPE_CHECK(left == whole);
        ++cuts_checked;
        hi = c - 1;
      }
    }
  }
  BPE_CHECK(cuts_checked > 1000);
  BPE_TEST_MAIN_END();
}
