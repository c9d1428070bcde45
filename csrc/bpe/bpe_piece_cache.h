// A per-thread memo of the pieces an encode had to merge: piece bytes -> token ids.
//
// Natural text repeats its words (Zipf), so most pieces that are not a whole token recur; their
// merge loop runs once per cache instead of once per occurrence. A cache belongs to one thread
// (encode_batch gives each worker its own), so it needs no lock; it costs nothing until the first
// insert and is emptied when it reaches its bounds, so memory stays small on any input.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastlm::bpe {

class PieceCache {
 public:
  static constexpr size_t kMaxPieceBytes = 64;     // longer pieces are rare: not worth keeping
  static constexpr size_t kMaxEntries = 1u << 15;  // then start over (bounds memory: ~3 MB at most)

  // The ids cached for piece p[0, n) with hash h, or nullptr; *count receives their number.
  const uint32_t* find(const uint8_t* p, size_t n, uint64_t h, size_t* count) const {
    if (slots_.empty()) return nullptr;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.len == 0) return nullptr;
      if (s.hash == h && s.len == n && std::memcmp(bytes_.data() + s.bytes_at, p, n) == 0) {
        *count = s.count;
        return ids_.data() + s.ids_at;
      }
    }
  }

  // Remembers that piece p[0, n) (0 < n <= kMaxPieceBytes, not present yet) encodes as ids.
  void insert(const uint8_t* p, size_t n, uint64_t h, const uint32_t* ids, size_t count) {
    if (n == 0 || n > kMaxPieceBytes) return;
    if (2 * (size_ + 1) > slots_.size()) {  // load <= 1/2
      if (size_ >= kMaxEntries) clear();
      else grow();
    }
    size_t i = h & mask_;
    while (slots_[i].len != 0) i = (i + 1) & mask_;
    slots_[i] = Slot{h, static_cast<uint32_t>(bytes_.size()), static_cast<uint32_t>(ids_.size()),
                     static_cast<uint16_t>(n), static_cast<uint16_t>(count)};
    bytes_.insert(bytes_.end(), p, p + n);
    ids_.insert(ids_.end(), ids, ids + count);
    ++size_;
  }

 private:
  struct Slot {
    uint64_t hash;
    uint32_t bytes_at, ids_at;  // offsets into bytes_ and ids_
    uint16_t len, count;        // len 0: empty slot
  };
  void clear() {
    std::fill(slots_.begin(), slots_.end(), Slot{});
    bytes_.clear();
    ids_.clear();
    size_ = 0;
  }
  // Starts small (a short text needs few entries) and doubles.
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? 256 : 2 * old.size(), Slot{});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.len == 0) continue;
      size_t i = s.hash & mask_;
      while (slots_[i].len != 0) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  std::vector<uint8_t> bytes_;
  std::vector<uint32_t> ids_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

}  // namespace fastlm::bpe
