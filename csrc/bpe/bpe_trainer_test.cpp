// Unit tests of training: the incremental learner against a brute-force recount written here,
// and streamed counting against counting whole documents.
#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "bpe/bpe_test_util.h"
#include "bpe/bpe_trainer.h"

using namespace fastlm::bpe;

// Brute force: recount every pair of every word before each merge.
static std::vector<std::pair<uint32_t, uint32_t>> brute_force(
    const std::map<std::string, int64_t>& counts, size_t n_new) {
  std::vector<std::pair<std::vector<uint32_t>, int64_t>> words;
  for (const auto& [w, c] : counts) {
    std::vector<uint32_t> syms;
    for (unsigned char ch : w) syms.push_back(ch);
    words.emplace_back(syms, c);
  }
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.emplace_back(1, static_cast<char>(b));
  std::vector<std::pair<uint32_t, uint32_t>> merges;
  while (tokens.size() < 256 + n_new) {
    std::map<std::pair<uint32_t, uint32_t>, int64_t> pc;
    for (auto& [syms, c] : words)
      for (size_t i = 0; i + 1 < syms.size(); ++i) pc[{syms[i], syms[i + 1]}] += c;
    if (pc.empty()) break;
    auto best = pc.begin();  // map order: smallest pair first, so ">" keeps the tie rule
    for (auto it = pc.begin(); it != pc.end(); ++it)
      if (it->second > best->second) best = it;
    if (best->second <= 0) break;
    auto [a, b] = best->first;
    std::string bytes = tokens[a] + tokens[b];
    uint32_t id = static_cast<uint32_t>(std::find(tokens.begin(), tokens.end(), bytes) - tokens.begin());
    if (id == tokens.size()) tokens.push_back(bytes);
    merges.emplace_back(a, b);
    for (auto& [syms, c] : words) {
      std::vector<uint32_t> out;
      for (size_t i = 0; i < syms.size();) {
        if (i + 1 < syms.size() && syms[i] == a && syms[i + 1] == b) {
          out.push_back(id);
          i += 2;
        } else {
          out.push_back(syms[i++]);
        }
      }
      syms = out;
    }
  }
  return merges;
}

int main() {
  std::string text;
  const char* words[] = {"the ", "then ", "there ", "aaaa ", "abab ", "banana ", "x\n", "a\n\n"};
  for (int i = 0; i < 500; ++i) text += words[(i * 7 + i / 3) % 8];

  for (Pattern p : {Pattern::kGpt2, Pattern::kGpt4, Pattern::kNone}) {
    PretokenCounter whole(p, {}, 1);
    std::vector<std::string_view> docs = {text};
    whole.feed_documents(docs);
    BytesMap<int64_t> counts = whole.merged_counts();
    std::map<std::string, int64_t> as_map;
    counts.for_each([&](const uint8_t* k, size_t n, int64_t c) {
      as_map[std::string(reinterpret_cast<const char*>(k), n)] = c;
    });
    TrainResult r = learn_merges(std::move(counts), 40);
    BPE_CHECK(r.merges == brute_force(as_map, 40));
    BPE_CHECK(r.tokens.size() <= 256 + 40);

    // Streaming in 13-byte slices with 8-byte blocks on 2 threads counts the same.
    PretokenCounter streamed(p, {}, 2, 8);
    for (size_t i = 0; i < text.size(); i += 13)
      streamed.feed(reinterpret_cast<const uint8_t*>(text.data()) + i,
                    std::min<size_t>(13, text.size() - i));
    streamed.end_document();
    std::map<std::string, int64_t> streamed_map;
    streamed.merged_counts().for_each([&](const uint8_t* k, size_t n, int64_t c) {
      streamed_map[std::string(reinterpret_cast<const char*>(k), n)] = c;
    });
    BPE_CHECK(streamed_map == as_map);
  }
  BPE_TEST_MAIN_END();
}
