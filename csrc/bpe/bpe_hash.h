// Open-addressing hash maps for the tokenizer's hot paths.
//
// std::unordered_map allocates a node per entry and hashes std::string keys byte by byte; these
// maps keep entries in one flat array (linear probing, power-of-two capacity, load <= 1/2) and, for
// byte-string keys, the key bytes in one arena. They only grow: BPE never deletes a key (a pair
// count that drops to zero stays as a zero entry).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace fastlm::bpe {

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 32;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 32;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 32;
  return x;
}

// Hash of a byte string, 8 bytes at a time.
inline uint64_t hash_bytes(const uint8_t* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xFF51AFD7ED558CCDull);
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
  }
  return mix64(h);
}

// Byte string -> V. Keys are copied into an arena the map owns.
template <typename V>
class BytesMap {
 public:
  struct Entry {
    uint64_t hash;
    uint64_t offset;  // into the arena
    uint32_t len;
    uint32_t used;
    V value;
  };

  explicit BytesMap(size_t expected = 16) { rehash(capacity_for(expected)); }

  size_t size() const { return size_; }

  // Pointer to the value of key, or nullptr.
  const V* find(const uint8_t* p, size_t n) const { return find_hashed(p, n, hash_bytes(p, n)); }
  const V* find_hashed(const uint8_t* p, size_t n, uint64_t h) const {
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Entry& e = slots_[i];
      if (!e.used) return nullptr;
      if (e.hash == h && e.len == n && std::memcmp(arena_.data() + e.offset, p, n) == 0)
        return &e.value;
    }
  }

  // Reference to the value of key, inserted as `init` when absent.
  V& get_or_insert(const uint8_t* p, size_t n, V init) {
    uint64_t h = hash_bytes(p, n);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      Entry& e = slots_[i];
      if (!e.used) {
        if (2 * (size_ + 1) > slots_.size()) {
          rehash(slots_.size() * 2);
          return get_or_insert(p, n, init);
        }
        e.hash = h, e.offset = arena_.size(), e.len = static_cast<uint32_t>(n), e.used = 1;
        e.value = init;
        arena_.append(reinterpret_cast<const char*>(p), n);
        ++size_;
        return e.value;
      }
      if (e.hash == h && e.len == n && std::memcmp(arena_.data() + e.offset, p, n) == 0)
        return e.value;
    }
  }

  // Calls f(key_ptr, key_len, value) for every entry (in no particular order).
  template <typename F>
  void for_each(F&& f) const {
    for (const Entry& e : slots_)
      if (e.used) f(reinterpret_cast<const uint8_t*>(arena_.data() + e.offset), e.len, e.value);
  }

 private:
  static size_t capacity_for(size_t n) {
    size_t c = 16;
    while (c < 2 * n) c *= 2;
    return c;
  }
  void rehash(size_t cap) {
    std::vector<Entry> old = std::move(slots_);
    slots_.assign(cap, Entry{});
    mask_ = cap - 1;
    for (const Entry& e : old) {
      if (!e.used) continue;
      size_t i = e.hash & mask_;
      while (slots_[i].used) i = (i + 1) & mask_;
      slots_[i] = e;
    }
  }

  std::vector<Entry> slots_;
  std::string arena_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

// Pair of token ids (packed into a uint64) -> V.
template <typename V>
class PairMap {
 public:
  static uint64_t key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }

  explicit PairMap(size_t expected = 16) { rehash(capacity_for(expected)); }
  size_t size() const { return size_; }

  const V* find(uint64_t k) const {
    for (size_t i = mix64(k) & mask_;; i = (i + 1) & mask_) {
      if (!used_[i]) return nullptr;
      if (keys_[i] == k) return &values_[i];
    }
  }

  V& get_or_insert(uint64_t k, V init) {
    for (size_t i = mix64(k) & mask_;; i = (i + 1) & mask_) {
      if (!used_[i]) {
        if (2 * (size_ + 1) > keys_.size()) {
          rehash(keys_.size() * 2);
          return get_or_insert(k, init);
        }
        used_[i] = 1, keys_[i] = k, values_[i] = init;
        ++size_;
        return values_[i];
      }
      if (keys_[i] == k) return values_[i];
    }
  }

  // Calls f(key, value) for every entry (in no particular order).
  template <typename F>
  void for_each(F&& f) const {
    for (size_t i = 0; i < keys_.size(); ++i)
      if (used_[i]) f(keys_[i], values_[i]);
  }

 private:
  static size_t capacity_for(size_t n) {
    size_t c = 16;
    while (c < 2 * n) c *= 2;
    return c;
  }
  void rehash(size_t cap) {
    std::vector<uint64_t> old_keys = std::move(keys_);
    std::vector<V> old_values = std::move(values_);
    std::vector<uint8_t> old_used = std::move(used_);
    keys_.assign(cap, 0), values_.assign(cap, V{}), used_.assign(cap, 0);
    mask_ = cap - 1;
    for (size_t j = 0; j < old_keys.size(); ++j) {
      if (!old_used[j]) continue;
      size_t i = mix64(old_keys[j]) & mask_;
      while (used_[i]) i = (i + 1) & mask_;
      used_[i] = 1, keys_[i] = old_keys[j], values_[i] = std::move(old_values[j]);
    }
  }

  std::vector<uint64_t> keys_;
  std::vector<V> values_;
  std::vector<uint8_t> used_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

// Pair of token ids -> uint32, filled once and then only read: the encoder's merge table. Key and
// value share a slot, so a probe touches one cache line (PairMap keeps keys, values and flags in
// three arrays, which suits the trainer's large values but costs the encoder three misses).
class PairIdTable {
 public:
  explicit PairIdTable(size_t expected = 16) {
    bits_ = 4;
    while ((size_t(1) << bits_) < 2 * expected) ++bits_;
    slots_.assign(size_t(1) << bits_, Slot{kEmpty, 0});
  }
  size_t size() const { return size_; }

  // Keeps the first value given for a key.
  void insert_if_absent(uint64_t k, uint32_t v) {
    if (2 * (size_ + 1) > slots_.size()) grow();
    for (size_t i = index(k);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].key == k) return;
      if (slots_[i].key == kEmpty) {
        slots_[i] = Slot{k, v};
        ++size_;
        return;
      }
    }
  }

  // The value of key k, or `missing`.
  uint32_t find(uint64_t k, uint32_t missing) const {
    for (size_t i = index(k);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].key == k) return slots_[i].value;
      if (slots_[i].key == kEmpty) return missing;
    }
  }

 private:
  // No pair of real ids packs to all ones: ids are below the vocabulary size, itself < 2^32 - 1.
  static constexpr uint64_t kEmpty = ~0ull;
  struct Slot {
    uint64_t key;
    uint32_t value;
  };
  // Fibonacci hashing: the top bits of key * 2^64/phi spread packed pairs well enough.
  size_t index(uint64_t k) const { return (k * 0x9E3779B97F4A7C15ull) >> (64 - bits_); }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    ++bits_;
    slots_.assign(size_t(1) << bits_, Slot{kEmpty, 0});
    size_ = 0;
    for (const Slot& s : old)
      if (s.key != kEmpty) insert_if_absent(s.key, s.value);
  }

  std::vector<Slot> slots_;
  int bits_ = 4;
  size_t size_ = 0;
};

// Byte strings of 1..8 bytes -> uint32, filled once and then only read: the encoder's lookup of a
// whole piece in the vocabulary. Most pieces of text are that short; here the key is the bytes
// themselves packed in a word, so a probe is one compare in one cache line (BytesMap also reads
// the key from its arena, a second miss).
class ShortKeyTable {
 public:
  static constexpr size_t kMaxLen = 8;

  explicit ShortKeyTable(size_t expected = 16) {
    bits_ = 4;
    while ((size_t(1) << bits_) < 2 * expected) ++bits_;
    slots_.assign(size_t(1) << bits_, Slot{0, 0, 0});
  }

  // The little-endian word of p[0, n), zero-padded; n <= 8. `readable` >= n bytes may be read at p.
  static uint64_t pack(const uint8_t* p, size_t n, size_t readable) {
    uint64_t w = 0;
    if (readable >= 8) {
      std::memcpy(&w, p, 8);
      return n == 8 ? w : w & ((uint64_t(1) << (8 * n)) - 1);
    }
    std::memcpy(&w, p, n);
    return w;
  }

  void insert_if_absent(uint64_t word, size_t n, uint32_t v) {
    if (2 * (size_ + 1) > slots_.size()) grow();
    for (size_t i = index(word, n);; i = (i + 1) & (slots_.size() - 1)) {
      Slot& s = slots_[i];
      if (s.len == n && s.word == word) return;
      if (s.len == 0) {
        s = Slot{word, static_cast<uint32_t>(n), v};
        ++size_;
        return;
      }
    }
  }

  // Pointer to the value of the n-byte key packed in word, or nullptr.
  const uint32_t* find(uint64_t word, size_t n) const {
    for (size_t i = index(word, n);; i = (i + 1) & (slots_.size() - 1)) {
      const Slot& s = slots_[i];
      if (s.len == n && s.word == word) return &s.value;
      if (s.len == 0) return nullptr;
    }
  }

 private:
  struct Slot {
    uint64_t word;
    uint32_t len;  // 0: empty
    uint32_t value;
  };
  size_t index(uint64_t word, size_t n) const {
    return ((word ^ (uint64_t(n) << 59)) * 0x9E3779B97F4A7C15ull) >> (64 - bits_);
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    ++bits_;
    slots_.assign(size_t(1) << bits_, Slot{0, 0, 0});
    size_ = 0;
    for (const Slot& s : old)
      if (s.len) insert_if_absent(s.word, s.len, s.value);
  }

  std::vector<Slot> slots_;
  int bits_ = 4;
  size_t size_ = 0;
};

}  // namespace fastlm::bpe
