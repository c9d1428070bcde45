// BPE encoding and decoding (see bpe_encoder.h for the semantics).
#include "bpe/bpe_encoder.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <queue>
#include <thread>

#ifdef __linux__
#include <sched.h>
#endif

namespace fastlm::bpe {

// Cores this process may run on: the affinity mask (taskset, cgroup cpusets) where the OS has
// one, else every hardware thread.
static int usable_cores() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
  return static_cast<int>(std::thread::hardware_concurrency());
}

int resolve_threads(int requested, size_t work_items) {
  int t = requested > 0 ? requested : usable_cores();
  if (t < 1) t = 1;
  if (work_items < static_cast<size_t>(t)) t = static_cast<int>(std::max<size_t>(work_items, 1));
  return t;
}

SpecialMatcher::SpecialMatcher(std::vector<std::string> texts, std::vector<uint32_t> ids) {
  std::vector<size_t> order(texts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  // Longest first, so the first text that matches at a position is the longest one there.
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return texts[a].size() > texts[b].size(); });
  for (size_t i : order) {
    if (texts[i].empty()) throw std::invalid_argument("a special token cannot be empty");
    first_byte_[static_cast<uint8_t>(texts[i][0])] = true;
    texts_.push_back(texts[i]);
    ids_.push_back(ids[i]);
  }
}

SpecialMatcher::Match SpecialMatcher::find(const uint8_t* s, size_t n, size_t from) const {
  if (!texts_.empty()) {
    for (size_t i = from; i < n; ++i) {
      if (!first_byte_[s[i]]) continue;
      for (size_t k = 0; k < texts_.size(); ++k) {
        const std::string& t = texts_[k];
        if (t.size() <= n - i && std::memcmp(s + i, t.data(), t.size()) == 0)
          return Match{i, t.size(), ids_[k]};
      }
    }
  }
  return Match{n, 0, 0};
}

Encoder::Encoder(std::vector<std::string> tokens, const std::vector<uint32_t>& special_ids,
                 Pattern pattern)
    : tokens_(std::move(tokens)), pattern_(pattern), by_bytes_(tokens_.size()),
      short_ids_(tokens_.size()), pairs_(tokens_.size()) {
  if (tokens_.size() >= kNoRank) throw std::invalid_argument("vocabulary too large");
  is_special_.assign(tokens_.size(), 0);
  for (uint32_t id : special_ids) {
    if (id >= tokens_.size())
      throw std::invalid_argument("special token id " + std::to_string(id) +
                                  " is outside the vocabulary of " +
                                  std::to_string(tokens_.size()));
    if (tokens_[id].empty()) throw std::invalid_argument("a special token cannot be empty");
    if (is_special_[id]) throw std::invalid_argument("special token id " + std::to_string(id) +
                                                     " is given twice");
    is_special_[id] = 1;
    special_ids_.push_back(id);
  }
  std::fill(std::begin(byte_id_), std::end(byte_id_), kNoRank);
  for (uint32_t id = 0; id < tokens_.size(); ++id) {
    const std::string& t = tokens_[id];
    if (is_special_[id] || t.empty()) continue;  // specials and holes are not mergeable
    const auto* p = reinterpret_cast<const uint8_t*>(t.data());
    uint32_t& slot = by_bytes_.get_or_insert(p, t.size(), id);
    if (slot != id)
      throw std::invalid_argument("tokens " + std::to_string(slot) + " and " + std::to_string(id) +
                                  " have the same bytes; every regular token must be unique");
    if (t.size() == 1) byte_id_[p[0]] = id;
    if (t.size() <= ShortKeyTable::kMaxLen)
      short_ids_.insert_if_absent(ShortKeyTable::pack(p, t.size(), t.size()), t.size(), id);
  }
  for (int b = 0; b < 256; ++b)
    if (byte_id_[b] == kNoRank)
      throw std::invalid_argument("byte " + std::to_string(b) +
                                  " has no token; a byte-level vocabulary needs all 256 bytes");
  // Every split of a token into two tokens is a pair that merges into it.
  for (uint32_t id = 0; id < tokens_.size(); ++id) {
    const std::string& t = tokens_[id];
    if (is_special_[id] || t.size() < 2) continue;
    no_merges_ = false;
    const auto* p = reinterpret_cast<const uint8_t*>(t.data());
    for (size_t k = 1; k < t.size(); ++k) {
      const uint32_t* a = by_bytes_.find(p, k);
      if (!a) continue;
      const uint32_t* b = by_bytes_.find(p + k, t.size() - k);
      if (b) pairs_.insert_if_absent(PairMap<uint32_t>::key(*a, *b), id);  // lowest id wins
    }
  }
}

int64_t Encoder::token_id(std::string_view bytes) const {
  const uint32_t* id = by_bytes_.find(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  return id ? int64_t(*id) : -1;
}

SpecialMatcher Encoder::matcher(const std::vector<uint32_t>& ids, bool all) const {
  const std::vector<uint32_t>& use = all ? special_ids_ : ids;
  std::vector<std::string> texts;
  for (uint32_t id : use) {
    if (!is_special(id)) throw std::invalid_argument("id " + std::to_string(id) +
                                                     " is not a special token");
    texts.push_back(tokens_[id]);
  }
  return SpecialMatcher(std::move(texts), use);
}

void Encoder::encode(const uint8_t* s, size_t n, const SpecialMatcher& allowed,
                     const SpecialMatcher& disallowed, std::vector<uint32_t>* out) const {
  PieceCache cache;
  encode_cached(s, n, allowed, disallowed, out, &cache);
}

void Encoder::encode_ordinary(const uint8_t* s, size_t n, std::vector<uint32_t>* out) const {
  PieceCache cache;
  encode_ordinary_cached(s, n, out, &cache);
}

void Encoder::encode_cached(const uint8_t* s, size_t n, const SpecialMatcher& allowed,
                            const SpecialMatcher& disallowed, std::vector<uint32_t>* out,
                            PieceCache* cache) const {
  if (!disallowed.empty()) {
    SpecialMatcher::Match m = disallowed.find(s, n, 0);
    if (m.pos < n) {
      throw DisallowedSpecialError(
          "the text contains the special token '" + tokens_[m.id] +
          "', which is not allowed: pass allowed_special={'" + tokens_[m.id] +
          "'} (or 'all') to encode it as a special token, or disallowed_special=() to encode it "
          "as plain text");
    }
  }
  size_t pos = 0;
  while (true) {
    SpecialMatcher::Match m = allowed.find(s, n, pos);
    encode_ordinary_cached(s + pos, m.pos - pos, out, cache);
    if (m.pos == n) break;
    out->push_back(m.id);
    pos = m.pos + m.len;
  }
}

void Encoder::encode_ordinary_cached(const uint8_t* s, size_t n, std::vector<uint32_t>* out,
                                     PieceCache* cache) const {
  if (no_merges_) {
    for (size_t i = 0; i < n; ++i) out->push_back(byte_id_[s[i]]);
    return;
  }
  split(pattern_, s, n,
        [&](size_t off, size_t len) { encode_piece(s + off, len, n - off, out, cache); });
}

void Encoder::encode_piece(const uint8_t* p, size_t n, size_t readable,
                           std::vector<uint32_t>* out, PieceCache* cache) const {
  if (n == 1) {
    out->push_back(byte_id_[p[0]]);
    return;
  }
  if (n <= ShortKeyTable::kMaxLen) {
    if (const uint32_t* id = short_ids_.find(ShortKeyTable::pack(p, n, readable), n)) {
      out->push_back(*id);
      return;
    }
  }
  const uint64_t h = hash_bytes(p, n);  // one hash serves the vocabulary and the cache
  if (n > ShortKeyTable::kMaxLen) {
    if (const uint32_t* id = by_bytes_.find_hashed(p, n, h)) {
      out->push_back(*id);
      return;
    }
  }
  if (n <= PieceCache::kMaxPieceBytes) {
    size_t count = 0;
    if (const uint32_t* ids = cache->find(p, n, h, &count)) {
      out->insert(out->end(), ids, ids + count);
      return;
    }
    const size_t before = out->size();
    merge_short(p, n, out);
    cache->insert(p, n, h, out->data() + before, out->size() - before);
  } else if (n <= 256) {
    merge_short(p, n, out);
  } else {
    merge_long(p, n, out);
  }
}

// O(n^2) in the worst case but with tiny constants: the usual piece is a few bytes long.
void Encoder::merge_short(const uint8_t* p, size_t n, std::vector<uint32_t>* out) const {
  uint32_t ids[256], ranks[256];  // ranks[i]: rank of merging parts i and i+1
  for (size_t i = 0; i < n; ++i) ids[i] = byte_id_[p[i]];
  for (size_t i = 0; i + 1 < n; ++i) ranks[i] = pair_rank(ids[i], ids[i + 1]);
  size_t m = n;
  while (m > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < m; ++i)
      if (ranks[i] < ranks[best]) best = i;  // strict: the leftmost of equal ranks
    if (ranks[best] == kNoRank) break;
    ids[best] = ranks[best];  // the rank is the merged token's id
    std::memmove(ids + best + 1, ids + best + 2, (m - best - 2) * sizeof(uint32_t));
    if (m >= best + 3)
      std::memmove(ranks + best + 1, ranks + best + 2, (m - best - 3) * sizeof(uint32_t));
    --m;
    if (best > 0) ranks[best - 1] = pair_rank(ids[best - 1], ids[best]);
    if (best + 1 < m) ranks[best] = pair_rank(ids[best], ids[best + 1]);
  }
  out->insert(out->end(), ids, ids + m);
}

// O(n log n): a linked list of parts and a min-heap of (rank, position) with lazy invalidation,
// for long pieces (pattern "none", long runs of one character class).
void Encoder::merge_long(const uint8_t* p, size_t n, std::vector<uint32_t>* out) const {
  struct Node {
    uint32_t id, version;
    int64_t prev, next;
  };
  struct Cand {
    uint32_t rank;
    int64_t left, right;
    uint32_t lv, rv;
    bool operator>(const Cand& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::vector<Node> nodes(n);
  for (size_t i = 0; i < n; ++i)
    nodes[i] = Node{byte_id_[p[i]], 0, int64_t(i) - 1, i + 1 < n ? int64_t(i) + 1 : -1};
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int64_t l, int64_t r) {
    if (l < 0 || r < 0) return;
    uint32_t rank = pair_rank(nodes[l].id, nodes[r].id);
    if (rank != kNoRank) heap.push(Cand{rank, l, r, nodes[l].version, nodes[r].version});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(i, i + 1);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    Node& l = nodes[c.left];
    Node& r = nodes[c.right];
    // A part that merged (or was merged away) changed version: the candidate is stale.
    if (l.version != c.lv || r.version != c.rv || l.next != c.right) continue;
    l.id = c.rank;
    ++l.version;
    r.version += 2;  // never matches again (merged-away parts are not revived)
    r.id = kNoRank;
    l.next = r.next;
    if (r.next >= 0) nodes[r.next].prev = c.left;
    push(l.prev, c.left);
    push(c.left, l.next);
  }
  for (int64_t i = 0; i >= 0; i = nodes[i].next) out->push_back(nodes[i].id);
}

std::vector<std::vector<uint32_t>> Encoder::encode_batch(
    const std::vector<std::string_view>& texts, const SpecialMatcher& allowed,
    const SpecialMatcher& disallowed, int threads) const {
  std::vector<std::vector<uint32_t>> out(texts.size());
  encode_batch_into(texts, allowed, disallowed, threads, &out, nullptr);
  return out;
}

void Encoder::encode_batch_into(const std::vector<std::string_view>& texts,
                                const SpecialMatcher& allowed, const SpecialMatcher& disallowed,
                                int threads, std::vector<std::vector<uint32_t>>* out_ptr,
                                const std::function<void(size_t)>& done) const {
  std::vector<std::vector<uint32_t>>& out = *out_ptr;
  int t = resolve_threads(threads, texts.size());
  auto work = [&](size_t i, PieceCache* cache) {
    const auto* s = reinterpret_cast<const uint8_t*>(texts[i].data());
    out[i].reserve(texts[i].size() / 3 + 1);
    encode_cached(s, texts[i].size(), allowed, disallowed, &out[i], cache);
    if (done) done(i);
  };
  if (t <= 1) {
    PieceCache cache;
    for (size_t i = 0; i < texts.size(); ++i) work(i, &cache);
    return;
  }
  // Dynamic scheduling in small blocks: texts vary a lot in length. Each worker keeps its own
  // piece cache across its texts.
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&]() {
    try {
      PieceCache cache;
      const size_t block = 16;
      for (size_t b = next.fetch_add(block); b < texts.size(); b = next.fetch_add(block))
        for (size_t i = b; i < std::min(texts.size(), b + block); ++i) work(i, &cache);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int k = 0; k < t; ++k) pool.emplace_back(worker);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

std::string Encoder::decode(const uint32_t* ids, size_t n) const {
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] >= tokens_.size() || (tokens_[ids[i]].empty()))
      throw std::out_of_range("token id " + std::to_string(ids[i]) +
                              " is not in the vocabulary (size " +
                              std::to_string(tokens_.size()) + ")");
    total += tokens_[ids[i]].size();
  }
  std::string s;
  s.reserve(total);
  for (size_t i = 0; i < n; ++i) s += tokens_[ids[i]];
  return s;
}

}  // namespace fastlm::bpe
