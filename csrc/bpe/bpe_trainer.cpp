// BPE training (see bpe_trainer.h for the rules and why they are what they are).
#include "bpe/bpe_trainer.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <queue>
#include <stdexcept>
#include <thread>

namespace fastlm::bpe {

PretokenCounter::PretokenCounter(Pattern pattern, std::vector<std::string> special_tokens,
                                 int threads, size_t block_bytes)
    : pattern_(pattern), specials_(std::move(special_tokens)),
      threads_(resolve_threads(threads, size_t(1) << 20)),
      block_bytes_(std::max<size_t>(block_bytes, 1)) {
  std::vector<uint32_t> ids(specials_.size());
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<uint32_t>(i);
  special_matcher_ = SpecialMatcher(specials_, ids);
  maps_.resize(threads_);
}

void PretokenCounter::count_text(int slot, const uint8_t* s, size_t n) {
  BytesMap<int64_t>& map = maps_[slot];
  if (pattern_ == Pattern::kNone) {  // lines
    size_t i = 0;
    while (i < n) {
      const void* nl = std::memchr(s + i, '\n', n - i);
      size_t e = nl ? static_cast<const uint8_t*>(nl) - s + 1 : n;
      map.get_or_insert(s + i, e - i, 0) += 1;
      i = e;
    }
    return;
  }
  split(pattern_, s, n, [&](size_t off, size_t len) { map.get_or_insert(s + off, len, 0) += 1; });
}

void PretokenCounter::count_chunk(int slot, const uint8_t* s, size_t n) {
  size_t pos = 0;
  while (pos < n) {
    SpecialMatcher::Match m = special_matcher_.find(s, n, pos);
    count_text(slot, s + pos, m.pos - pos);
    pos = m.pos + m.len;
  }
}

bool PretokenCounter::cut_splits_special(const uint8_t* s, size_t n, size_t cut) const {
  for (const std::string& t : specials_) {
    size_t first = cut >= t.size() ? cut - t.size() + 1 : 0;
    for (size_t start = first; start < cut; ++start)
      if (start + t.size() <= n && std::memcmp(s + start, t.data(), t.size()) == 0) return true;
  }
  return false;
}

// The largest safe cut in (lo, hi] that does not fall inside a special token, or 0.
size_t PretokenCounter::find_cut(const uint8_t* s, size_t n, size_t lo, size_t hi) const {
  while (hi > lo) {
    size_t c = last_safe_cut(pattern_, s, n, lo, hi);
    if (c == 0 || !cut_splits_special(s, n, c)) return c;
    hi = c - 1;
  }
  return 0;
}

void PretokenCounter::count_region(const uint8_t* s, size_t n) {
  if (n == 0) return;
  bytes_counted_ += n;
  // Up to threads_ chunks of about equal size, each ending at a safe cut.
  std::vector<size_t> bounds{0};
  for (int k = 1; k < threads_; ++k) {
    size_t target = n * k / threads_;
    if (target <= bounds.back()) continue;
    size_t c = find_cut(s, n, bounds.back(), target);
    if (c > bounds.back() && c < n) bounds.push_back(c);
  }
  bounds.push_back(n);
  const int parts = static_cast<int>(bounds.size()) - 1;
  if (parts == 1) {
    count_chunk(0, s, n);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  std::vector<std::thread> pool;
  for (int k = 0; k < parts; ++k) {
    pool.emplace_back([&, k]() {
      try {
        count_chunk(k, s + bounds[k], bounds[k + 1] - bounds[k]);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    });
  }
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

void PretokenCounter::feed(const uint8_t* s, size_t n) {
  carry_.append(reinterpret_cast<const char*>(s), n);
  const size_t round = block_bytes_ * threads_;
  if (carry_.size() < round) return;
  const auto* data = reinterpret_cast<const uint8_t*>(carry_.data());
  // Count everything up to the last safe cut; keep the rest for the next feed. With no safe cut
  // yet (e.g. one enormous line), keep accumulating.
  // Only the bytes added since the last failed search (plus the few a cut looks at) are new.
  size_t lo = scanned_ > 8 ? scanned_ - 8 : 0;
  size_t cut = find_cut(data, carry_.size(), lo, carry_.size());
  if (cut == 0) {
    scanned_ = carry_.size();
    return;
  }
  count_region(data, cut);
  carry_.erase(0, cut);
  scanned_ = 0;
}

void PretokenCounter::end_document() {
  count_region(reinterpret_cast<const uint8_t*>(carry_.data()), carry_.size());
  carry_.clear();
  scanned_ = 0;
  carry_.shrink_to_fit();
}

void PretokenCounter::feed_documents(const std::vector<std::string_view>& docs) {
  end_document();
  // Small documents are shared out whole; a document larger than a block goes through the
  // streaming path so its pieces are still counted in parallel.
  std::vector<std::string_view> small;
  for (std::string_view d : docs) {
    if (d.size() > block_bytes_) {
      feed(reinterpret_cast<const uint8_t*>(d.data()), d.size());
      end_document();
    } else {
      small.push_back(d);
    }
  }
  if (small.empty()) return;
  int t = resolve_threads(threads_, small.size());
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&](int slot) {
    try {
      for (size_t i = next++; i < small.size(); i = next++)
        count_chunk(slot, reinterpret_cast<const uint8_t*>(small[i].data()), small[i].size());
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  if (t == 1) {
    worker(0);
  } else {
    std::vector<std::thread> pool;
    for (int k = 0; k < t; ++k) pool.emplace_back(worker, k);
    for (auto& th : pool) th.join();
  }
  if (error) std::rethrow_exception(error);
  for (std::string_view d : small) bytes_counted_ += d.size();
}

BytesMap<int64_t> PretokenCounter::merged_counts() {
  end_document();
  // Merge into the largest map (moved, not copied) and free the others as they are merged.
  size_t biggest = 0;
  for (size_t k = 1; k < maps_.size(); ++k)
    if (maps_[k].size() > maps_[biggest].size()) biggest = k;
  BytesMap<int64_t> out = std::move(maps_[biggest]);
  for (size_t k = 0; k < maps_.size(); ++k) {
    if (k != biggest) {
      maps_[k].for_each(
          [&](const uint8_t* p, size_t n, int64_t c) { out.get_or_insert(p, n, 0) += c; });
    }
    maps_[k] = BytesMap<int64_t>();
  }
  return out;
}

namespace {

struct PairInfo {
  int64_t count = 0;
  uint32_t list = UINT32_MAX;  // index into the where-lists, UINT32_MAX until the first word
};

// Max-heap order: higher count first, then the smaller (left, right) pair.
struct HeapEntry {
  int64_t count;
  uint32_t a, b;
  bool operator<(const HeapEntry& o) const {
    if (count != o.count) return count < o.count;
    if (a != o.a) return a > o.a;
    return b > o.b;
  }
};

class MergeLearner {
 public:
  explicit MergeLearner(const BytesMap<int64_t>& counts) : pairs_(counts.size()) {
    for (int b = 0; b < 256; ++b) {
      result_.tokens.emplace_back(1, static_cast<char>(b));
      by_bytes_.get_or_insert(reinterpret_cast<const uint8_t*>(result_.tokens.back().data()), 1,
                              static_cast<uint32_t>(b));
    }
    counts.for_each([&](const uint8_t* p, size_t n, int64_t c) {
      if (n < 2 || c <= 0) return;  // a single byte has no pair
      start_.push_back(syms_.size());
      len_.push_back(static_cast<uint32_t>(n));
      count_.push_back(c);
      for (size_t i = 0; i < n; ++i) syms_.push_back(p[i]);
    });
    for (uint32_t w = 0; w < count_.size(); ++w) {
      const uint32_t* s = &syms_[start_[w]];
      for (uint32_t i = 0; i + 1 < len_[w]; ++i) add(s[i], s[i + 1], w, count_[w]);
    }
    touched_.clear();
    std::vector<HeapEntry> entries;
    pairs_.for_each([&](uint64_t key, const PairInfo& info) {
      if (info.count > 0) entries.push_back(HeapEntry{info.count, uint32_t(key >> 32), uint32_t(key)});
    });
    heap_ = std::priority_queue<HeapEntry>(std::less<HeapEntry>(), std::move(entries));
    word_mark_.assign(count_.size(), UINT32_MAX);
  }

  TrainResult run(size_t n_new_tokens, const std::function<void(size_t)>& progress) {
    const size_t target = 256 + n_new_tokens;
    uint32_t step = 0;
    while (result_.tokens.size() < target && !heap_.empty()) {
      HeapEntry top = heap_.top();
      heap_.pop();
      const uint64_t key = PairMap<PairInfo>::key(top.a, top.b);
      PairInfo& info = pairs_.get_or_insert(key, PairInfo{});
      if (info.count != top.count) {  // stale: counts only change between pushes
        if (info.count > 0) heap_.push(HeapEntry{info.count, top.a, top.b});
        continue;
      }
      merge(top.a, top.b, step++);
      if (progress && (step & 255) == 0) progress(result_.tokens.size());
    }
    if (progress) progress(result_.tokens.size());
    return std::move(result_);
  }

 private:
  // Count of pair (a, b) changes by delta in word w (delta > 0: w now holds the pair).
  void add(uint32_t a, uint32_t b, uint32_t w, int64_t delta) {
    const uint64_t key = PairMap<PairInfo>::key(a, b);
    PairInfo& info = pairs_.get_or_insert(key, PairInfo{});
    info.count += delta;
    if (delta > 0) {
      if (info.list == UINT32_MAX) {
        info.list = static_cast<uint32_t>(where_.size());
        where_.emplace_back();
      }
      std::vector<uint32_t>& list = where_[info.list];
      if (list.empty() || list.back() != w) list.push_back(w);
      touched_.push_back(key);
    }
  }

  // Distinct touched pairs with their current positive counts; clears the touched list.
  std::vector<std::pair<uint64_t, int64_t>> touched_list() {
    std::sort(touched_.begin(), touched_.end());
    touched_.erase(std::unique(touched_.begin(), touched_.end()), touched_.end());
    std::vector<std::pair<uint64_t, int64_t>> out;
    for (uint64_t key : touched_) {
      int64_t c = pairs_.find(key)->count;
      if (c > 0) out.emplace_back(key, c);
    }
    touched_.clear();
    return out;
  }

  void merge(uint32_t a, uint32_t b, uint32_t step) {
    std::string bytes = result_.tokens[a] + result_.tokens[b];
    const auto* bp = reinterpret_cast<const uint8_t*>(bytes.data());
    const uint32_t new_id = static_cast<uint32_t>(result_.tokens.size());
    const uint32_t c = by_bytes_.get_or_insert(bp, bytes.size(), new_id);
    if (c == new_id) result_.tokens.push_back(std::move(bytes));
    result_.merges.emplace_back(a, b);

    const uint64_t key = PairMap<PairInfo>::key(a, b);
    std::vector<uint32_t> words = std::move(where_[pairs_.find(key)->list]);
    for (uint32_t w : words) {
      if (word_mark_[w] == step) continue;  // listed twice
      word_mark_[w] = step;
      uint32_t* s = &syms_[start_[w]];
      const uint32_t n = len_[w];
      const int64_t wc = count_[w];
      uint32_t j = 0, k = 0;  // read and write positions
      while (j < n) {
        if (j + 1 < n && s[j] == a && s[j + 1] == b) {
          if (k > 0) {  // the left neighbour, possibly a token made by this very merge
            add(s[k - 1], a, w, -wc);
            add(s[k - 1], c, w, wc);
          }
          if (j + 2 < n) {
            add(b, s[j + 2], w, -wc);
            add(c, s[j + 2], w, wc);
          }
          add(a, b, w, -wc);
          s[k++] = c;
          j += 2;
        } else {
          s[k++] = s[j++];
        }
      }
      len_[w] = k;
    }
    if (pairs_.find(key)->count != 0)
      throw std::logic_error("bpe: pair count bookkeeping is inconsistent (a bug)");
    for (const auto& [pk, count] : touched_list())
      heap_.push(HeapEntry{count, uint32_t(pk >> 32), uint32_t(pk)});
  }

  // Words: the distinct pieces of length >= 2, as symbol runs in one flat array.
  std::vector<uint32_t> syms_;
  std::vector<uint64_t> start_;
  std::vector<uint32_t> len_;
  std::vector<int64_t> count_;
  std::vector<uint32_t> word_mark_;  // last merge step that processed the word

  PairMap<PairInfo> pairs_;
  std::vector<std::vector<uint32_t>> where_;  // words that hold (or held) a pair
  std::vector<uint64_t> touched_;             // pairs whose count rose since the last push
  std::priority_queue<HeapEntry> heap_;
  BytesMap<uint32_t> by_bytes_;
  TrainResult result_;
};

}  // namespace

TrainResult learn_merges(BytesMap<int64_t> counts, size_t n_new_tokens,
                         const std::function<void(size_t)>& progress) {
  MergeLearner learner(counts);
  counts = BytesMap<int64_t>();  // the words hold everything now: free the map before merging
  return learner.run(n_new_tokens, progress);
}

}  // namespace fastlm::bpe
