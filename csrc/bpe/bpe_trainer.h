// BPE training: counting pre-tokens of streamed text in parallel, then learning merges.
//
// Counting. Text arrives as documents, each fed in arbitrary slices. Documents are split at special
// tokens (which are never learned from), then into pieces by the split pattern; each distinct
// piece's count is what training sees. Work is cut into blocks at "safe cuts" (bpe_split.h) that
// provably do not change the pieces, so any slicing and any number of threads give the same
// counts. Memory is the carried-over tail of the current document plus the distinct pieces: a
// corpus of many GB streams through. With the pattern "none" a training unit is a line (text up to
// and including '\n'), since whole documents would be unbounded.
//
// Learning. Words are the distinct pieces as token ids (byte b is token b). Each step merges the
// adjacent pair with the highest count, where a pair's count is the sum over words of the word's
// count times the number of positions where the pair occurs (overlaps included); ties go to the
// pair with the smallest (left id, right id). Occurrences in a word merge left to right. The new
// token's id is the next free one, unless its bytes already are a token (two different pairs can
// spell the same bytes): then the merge reuses that id and adds no token. Pair counts are updated
// incrementally from the words that contain the merged pair, and a max-heap with lazy
// invalidation picks the next pair, so a step costs time proportional to that pair's occurrences,
// not to the corpus.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bpe/bpe_encoder.h"
#include "bpe/bpe_hash.h"
#include "bpe/bpe_split.h"

namespace fastlm::bpe {

class PretokenCounter {
 public:
  // threads <= 0: all hardware threads. block_bytes: the text each thread takes per round.
  PretokenCounter(Pattern pattern, std::vector<std::string> special_tokens, int threads,
                  size_t block_bytes = size_t(1) << 20);

  // The next bytes of the current document. Any slicing of a document gives the same counts.
  void feed(const uint8_t* s, size_t n);
  // Ends the current document: counts what is left of it.
  void end_document();
  // Whole documents, counted in parallel.
  void feed_documents(const std::vector<std::string_view>& docs);

  uint64_t bytes_counted() const { return bytes_counted_; }
  int threads() const { return threads_; }
  // All counts merged into one map (ends the current document first).
  BytesMap<int64_t> merged_counts();

 private:
  void count_region(const uint8_t* s, size_t n);           // split at safe cuts, run in parallel
  void count_chunk(int slot, const uint8_t* s, size_t n);  // one thread's share
  void count_text(int slot, const uint8_t* s, size_t n);   // text without special tokens
  bool cut_splits_special(const uint8_t* s, size_t n, size_t cut) const;
  size_t find_cut(const uint8_t* s, size_t n, size_t lo, size_t hi) const;

  Pattern pattern_;
  std::vector<std::string> specials_;
  SpecialMatcher special_matcher_;
  int threads_;
  size_t block_bytes_;
  std::string carry_;  // the current document's bytes not counted yet
  size_t scanned_ = 0;  // carry_ has no safe cut before this (so a search need not look again)
  std::vector<BytesMap<int64_t>> maps_;  // one per thread slot
  uint64_t bytes_counted_ = 0;
};

struct TrainResult {
  std::vector<std::string> tokens;                     // id -> bytes; ids 0..255 are the bytes
  std::vector<std::pair<uint32_t, uint32_t>> merges;   // in the order they were learned
};

// Learns merges until 256 + n_new_tokens tokens exist or no pair is left. `progress(tokens)` is
// called now and then (may be empty).
TrainResult learn_merges(BytesMap<int64_t> counts, size_t n_new_tokens,
                         const std::function<void(size_t)>& progress = {});

}  // namespace fastlm::bpe
