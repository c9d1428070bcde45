// Unit tests of the encoder: the rank rule, the short and long merge loops agreeing, special
// tokens, decode, batch, and the errors for unusable vocabularies.
#include <string>
#include <vector>

#include "bpe/bpe_encoder.h"
#include "bpe/bpe_test_util.h"

using namespace fastlm::bpe;

static std::vector<std::string> byte_tokens() {
  std::vector<std::string> t;
  for (int b = 0; b < 256; ++b) t.emplace_back(1, static_cast<char>(b));
  return t;
}

static std::vector<uint32_t> enc(const Encoder& e, const std::string& s) {
  std::vector<uint32_t> out;
  e.encode_ordinary(reinterpret_cast<const uint8_t*>(s.data()), s.size(), &out);
  return out;
}

int main() {
  auto tokens = byte_tokens();
  for (const char* t : {"ab", "bc", "abc", "aa", "aaaa", "<|eot|>"}) tokens.push_back(t);
  // ids: ab=256 bc=257 abc=258 aa=259 aaaa=260 <|eot|>=261 (special)
  Encoder e(tokens, {261}, Pattern::kNone);
  BPE_CHECK(enc(e, "abc") == (std::vector<uint32_t>{258}));        // whole piece is a token
  BPE_CHECK(enc(e, "abcx") == (std::vector<uint32_t>{258, 'x'}));  // ab first, then ab+c
  BPE_CHECK(enc(e, "aaa") == (std::vector<uint32_t>{259, 'a'}));   // leftmost on ties
  BPE_CHECK(enc(e, "aaaaa") == (std::vector<uint32_t>{260, 'a'}));
  // The long-piece loop (> 256 bytes) must agree with the short one piece by piece.
  std::string chunk = "aaaaabcxabcaab";  // 14 bytes, made of whole merges
  std::string long_text;
  std::vector<uint32_t> expected;
  for (int i = 0; i < 40; ++i) {
    long_text += chunk + "\x01";
    auto part = enc(e, chunk + "\x01");
    expected.insert(expected.end(), part.begin(), part.end());
  }
  BPE_CHECK(enc(e, long_text) == expected);  // "\x01" has no merges, so pieces are independent

  // Special tokens: allowed -> id; disallowed -> error; otherwise plain text.
  SpecialMatcher all = e.matcher({}, true), none;
  std::string s = "ab<|eot|>c";
  std::vector<uint32_t> out;
  e.encode(reinterpret_cast<const uint8_t*>(s.data()), s.size(), all, none, &out);
  BPE_CHECK(out == (std::vector<uint32_t>{256, 261, 'c'}));
  bool threw = false;
  try {
    e.encode(reinterpret_cast<const uint8_t*>(s.data()), s.size(), none, all, &out);
  } catch (const DisallowedSpecialError&) {
    threw = true;
  }
  BPE_CHECK(threw);
  BPE_CHECK(e.decode(out.data(), out.size()).size() > 0);
  std::vector<uint32_t> ids = {256, 261, 'c'};
  BPE_CHECK(e.decode(ids.data(), ids.size()) == "ab<|eot|>c");

  // Batch on several threads equals one by one.
  std::vector<std::string> texts;
  for (int i = 0; i < 100; ++i) texts.push_back(std::string(i % 17, 'a') + "bc" + std::to_string(i));
  std::vector<std::string_view> views(texts.begin(), texts.end());
  auto batch = e.encode_batch(views, none, none, 3);
  for (size_t i = 0; i < texts.size(); ++i) BPE_CHECK(batch[i] == enc(e, texts[i]));

  // The piece cache: hits return what was stored, over-long pieces are not kept, and past its
  // entry bound it starts over (earlier pieces gone, new ones kept).
  {
    PieceCache cache;
    auto key = [](uint32_t i) { return "w" + std::to_string(i); };
    auto find = [&](const std::string& k, size_t* count) {
      const auto* p = reinterpret_cast<const uint8_t*>(k.data());
      return cache.find(p, k.size(), hash_bytes(p, k.size()), count);
    };
    auto insert = [&](const std::string& k, std::vector<uint32_t> ids) {
      const auto* p = reinterpret_cast<const uint8_t*>(k.data());
      cache.insert(p, k.size(), hash_bytes(p, k.size()), ids.data(), ids.size());
    };
    size_t count = 0;
    BPE_CHECK(find("w0", &count) == nullptr);
    for (uint32_t i = 0; i < PieceCache::kMaxEntries; ++i) insert(key(i), {i, i + 1});
    const uint32_t* got = find(key(1234), &count);
    BPE_CHECK(got && count == 2 && got[0] == 1234 && got[1] == 1235);
    insert(std::string(PieceCache::kMaxPieceBytes + 1, 'x'), {1});
    BPE_CHECK(find(std::string(PieceCache::kMaxPieceBytes + 1, 'x'), &count) == nullptr);
    insert("new", {7});
    BPE_CHECK(find(key(1234), &count) == nullptr);
    got = find("new", &count);
    BPE_CHECK(got && count == 1 && got[0] == 7);
  }
  // The short-key table packs the same bytes alike whether or not 8 bytes can be read.
  {
    const std::string s8 = "abcdefgh!!";
    const auto* p = reinterpret_cast<const uint8_t*>(s8.data());
    for (size_t n = 1; n <= ShortKeyTable::kMaxLen; ++n)
      BPE_CHECK(ShortKeyTable::pack(p, n, n) == ShortKeyTable::pack(p, n, s8.size()));
    ShortKeyTable t(4);
    for (size_t n = 1; n <= ShortKeyTable::kMaxLen; ++n)
      t.insert_if_absent(ShortKeyTable::pack(p, n, n), n, static_cast<uint32_t>(n));
    for (size_t n = 1; n <= ShortKeyTable::kMaxLen; ++n) {
      const uint32_t* v = t.find(ShortKeyTable::pack(p, n, s8.size()), n);
      BPE_CHECK(v && *v == n);
    }
    BPE_CHECK(t.find(ShortKeyTable::pack(p + 1, 3, 3), 3) == nullptr);
  }

  // Errors.
  threw = false;
  try {
    std::vector<uint32_t> badid = {9999};
    e.decode(badid.data(), 1);
  } catch (const std::out_of_range&) {
    threw = true;
  }
  BPE_CHECK(threw);
  threw = false;
  try {
    auto t = byte_tokens();
    t.push_back("ab");
    t.push_back("ab");
    Encoder dup(t, {}, Pattern::kGpt4);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  BPE_CHECK(threw);
  threw = false;
  try {
    auto t = byte_tokens();
    t[65] = "zz";
    Encoder missing(t, {}, Pattern::kGpt4);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  BPE_CHECK(threw);
  BPE_TEST_MAIN_END();
}
