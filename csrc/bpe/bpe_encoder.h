// The BPE encoder/decoder: vocabulary, special tokens, encode (single and batched), decode.
//
// Semantics are tiktoken's, so an exported vocabulary encodes identically there:
//  * a token's id is its rank: among adjacent parts of a piece, the pair whose concatenated bytes
//    form the token with the lowest id merges first (leftmost on ties), until no pair forms one;
//  * a piece whose bytes are a whole token becomes that token directly;
//  * special tokens are recognised only where the caller allows them (leftmost, then longest).
// Token bytes are arbitrary; ids 0..N-1 are contiguous except "holes" (unused ids: empty bytes,
// not special), which imports of some published vocabularies need.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "bpe/bpe_hash.h"
#include "bpe/bpe_piece_cache.h"
#include "bpe/bpe_split.h"

namespace fastlm::bpe {

// Finds special tokens in text: the leftmost occurrence, the longest one when several start there.
class SpecialMatcher {
 public:
  SpecialMatcher() = default;
  SpecialMatcher(std::vector<std::string> texts, std::vector<uint32_t> ids);
  bool empty() const { return texts_.empty(); }

  struct Match {
    size_t pos, len;
    uint32_t id;
  };
  // First match at or after `from`; pos == n when there is none.
  Match find(const uint8_t* s, size_t n, size_t from) const;

 private:
  std::vector<std::string> texts_;  // longest first
  std::vector<uint32_t> ids_;
  bool first_byte_[256] = {};
};

// A special token the caller did not allow was found in the text (message names it).
class DisallowedSpecialError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class Encoder {
 public:
  // tokens[id]: the bytes of every id (special ids hold their text). Throws std::invalid_argument
  // with the reason when the vocabulary is unusable (a missing single byte, duplicate bytes, ...).
  Encoder(std::vector<std::string> tokens, const std::vector<uint32_t>& special_ids,
          Pattern pattern);

  size_t vocab_size() const { return tokens_.size(); }
  Pattern pattern() const { return pattern_; }
  const std::string& token_bytes(uint32_t id) const { return tokens_.at(id); }
  bool is_special(uint32_t id) const { return id < is_special_.size() && is_special_[id]; }
  // The id of a regular token with these bytes, or -1.
  int64_t token_id(std::string_view bytes) const;

  // A matcher for the given special ids (all specials when `all`).
  SpecialMatcher matcher(const std::vector<uint32_t>& ids, bool all) const;

  // Appends the ids of s to out. Specials in `allowed` become their ids; if `disallowed` finds
  // one in s, throws DisallowedSpecialError before encoding anything.
  void encode(const uint8_t* s, size_t n, const SpecialMatcher& allowed,
              const SpecialMatcher& disallowed, std::vector<uint32_t>* out) const;
  // Encodes s as plain text: no special token is recognised.
  void encode_ordinary(const uint8_t* s, size_t n, std::vector<uint32_t>* out) const;
  // Encodes each text on up to `threads` threads (<= 0: all cores). Throws the first error any
  // text raised.
  std::vector<std::vector<uint32_t>> encode_batch(const std::vector<std::string_view>& texts,
                                                  const SpecialMatcher& allowed,
                                                  const SpecialMatcher& disallowed,
                                                  int threads) const;
  // The same into out (texts.size() empty vectors), calling done(i) on the worker thread that
  // finished text i (when done is set), so a caller can consume results while others run.
  void encode_batch_into(const std::vector<std::string_view>& texts,
                         const SpecialMatcher& allowed, const SpecialMatcher& disallowed,
                         int threads, std::vector<std::vector<uint32_t>>* out,
                         const std::function<void(size_t)>& done) const;

  // The bytes of ids concatenated; throws std::out_of_range naming a bad id.
  std::string decode(const uint32_t* ids, size_t n) const;

 private:
  // encode / encode_ordinary with the caller's piece cache (one per thread).
  void encode_cached(const uint8_t* s, size_t n, const SpecialMatcher& allowed,
                     const SpecialMatcher& disallowed, std::vector<uint32_t>* out,
                     PieceCache* cache) const;
  void encode_ordinary_cached(const uint8_t* s, size_t n, std::vector<uint32_t>* out,
                              PieceCache* cache) const;
  // `readable`: bytes that may be read at p (>= n; the rest of the text).
  void encode_piece(const uint8_t* p, size_t n, size_t readable, std::vector<uint32_t>* out,
                    PieceCache* cache) const;
  void merge_short(const uint8_t* p, size_t n, std::vector<uint32_t>* out) const;
  void merge_long(const uint8_t* p, size_t n, std::vector<uint32_t>* out) const;
  uint32_t pair_rank(uint32_t a, uint32_t b) const {
    return pairs_.find(PairMap<uint32_t>::key(a, b), kNoRank);
  }

  static constexpr uint32_t kNoRank = 0xFFFFFFFFu;
  std::vector<std::string> tokens_;
  std::vector<uint8_t> is_special_;
  std::vector<uint32_t> special_ids_;
  Pattern pattern_;
  uint32_t byte_id_[256];
  bool no_merges_ = true;       // only single bytes: encoding is a byte lookup
  BytesMap<uint32_t> by_bytes_;  // regular token bytes -> id
  ShortKeyTable short_ids_;      // the same for tokens of up to 8 bytes (the fast path)
  PairIdTable pairs_;            // (left id, right id) -> id of the concatenation (= its rank)
};

// Number of worker threads for `requested` (<= 0: every core this process may use) and
// `work_items`.
int resolve_threads(int requested, size_t work_items);

}  // namespace fastlm::bpe
