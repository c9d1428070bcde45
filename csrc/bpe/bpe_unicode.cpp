// Character classes: a two-stage lookup table (256-code-point blocks, identical blocks shared)
// built once from the generated runs in unicode_tables.h.
#include "bpe/bpe_unicode.h"

#include <array>
#include <map>
#include <vector>

#include "bpe/unicode_tables.h"

namespace fastlm::bpe {

namespace {

struct ClassTable {
  std::vector<uint16_t> block_of;  // code point >> 8 -> block index
  std::vector<uint8_t> blocks;     // block index * 256 + (code point & 255) -> class

  ClassTable() {
    std::vector<uint8_t> flat(0x110000, kOther);
    for (const auto& run : tables::kRuns)
      for (uint32_t cp = run.first; cp <= run.last; ++cp) flat[cp] = run.cls;
    std::map<std::array<uint8_t, 256>, uint16_t> seen;
    block_of.resize(0x1100);
    for (uint32_t b = 0; b < 0x1100; ++b) {
      std::array<uint8_t, 256> block;
      for (int i = 0; i < 256; ++i) block[i] = flat[(b << 8) | i];
      auto it = seen.find(block);
      if (it == seen.end()) {
        it = seen.emplace(block, static_cast<uint16_t>(seen.size())).first;
        blocks.insert(blocks.end(), block.begin(), block.end());
      }
      block_of[b] = it->second;
    }
  }
};

const ClassTable& table() {
  static const ClassTable t;
  return t;
}

}  // namespace

uint8_t char_class(uint32_t cp) {
  if (cp >= 0x110000) return kOther;
  const ClassTable& t = table();
  return t.blocks[(static_cast<size_t>(t.block_of[cp >> 8]) << 8) | (cp & 0xFF)];
}

namespace detail {

const uint8_t kAsciiClass[128] = {
    // 0x00-0x1F: \t \n \v \f \r are whitespace
    0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    // 0x20-0x3F: space, punctuation, digits
    3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0,
    // 0x40-0x5F: @ A-Z [ \ ] ^ _
    0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
    // 0x60-0x7F: ` a-z { | } ~ DEL
    0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
};

Char decode_multibyte(const uint8_t* s, size_t n) {
  const Char bad{kInvalidCodePoint, kOther, 1};
  const uint8_t b0 = s[0];
  int len;
  uint32_t cp;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte (excludes overlongs/surrogates)
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2, cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3, cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4, cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return bad;
  }
  if (n < static_cast<size_t>(len)) return bad;
  if (s[1] < lo || s[1] > hi) return bad;
  cp = (cp << 6) | (s[1] & 0x3F);
  for (int k = 2; k < len; ++k) {
    if ((s[k] & 0xC0) != 0x80) return bad;
    cp = (cp << 6) | (s[k] & 0x3F);
  }
  return Char{cp, char_class(cp), static_cast<uint8_t>(len)};
}

}  // namespace detail

size_t valid_utf8_prefix(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    Char c = decode(s + i, n - i);
    if (c.cp == kInvalidCodePoint) return i;
    i += c.len;
  }
  return n;
}

}  // namespace fastlm::bpe
