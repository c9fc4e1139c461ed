// The host sampling kernel (sampling.h) and Backend::sample_tokens' default.
#include "backend/cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "backend/backend.h"
#include "util/error.h"

namespace hymba {
namespace cpu {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Copies the row, checks it and the history, applies the penalty (s.work).
void prepare(const float* logits, int64_t vocab, const SampleArgs& a, SampleScratch& s) {
  check_sample_args(a);
  check(vocab > 0, "sampler: vocabulary size must be positive, got ", vocab);
  check(vocab <= std::numeric_limits<int32_t>::max(), "sampler: vocabulary size ", vocab, " does not fit token ids");
  check(logits != nullptr, "sampler: logits pointer is null");
  s.work.assign(logits, logits + vocab);
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = s.work[static_cast<size_t>(i)];
    if (std::isnan(v)) fail("sampler: logit of token ", i, " is NaN");
    if (v == std::numeric_limits<float>::infinity()) fail("sampler: logit of token ", i, " is +inf");
  }
  if (a.n_history <= 0) return;
  s.seen.assign(a.history, a.history + a.n_history);
  std::sort(s.seen.begin(), s.seen.end());
  s.seen.erase(std::unique(s.seen.begin(), s.seen.end()), s.seen.end());  // each id once
  // Sorted: the first bad id is the smallest one (what the CUDA path names too).
  for (int32_t id : s.seen)
    if (id < 0 || id >= vocab)
      fail("sampler: history token id ", id, " is out of range for vocabulary of size ", vocab);
  if (a.repeat_penalty == 1.0f) return;
  for (int32_t id : s.seen) {
    float& l = s.work[static_cast<size_t>(id)];
    l = l > 0.0f ? l / a.repeat_penalty : l * a.repeat_penalty;
    // repeat_penalty < 1 can push a huge logit past FLT_MAX; the filters
    // below would turn that into NaN probabilities.
    if (l == std::numeric_limits<float>::infinity())
      fail("sampler: logit of token ", id, " is +inf after the repetition penalty");
  }
}

// Fills s.cand (sorted, normalised) from s.work. The order of every step is
// the contract the CUDA kernel reproduces (see sampling.cu).
void filter(const SampleArgs& a, SampleScratch& s) {
  const std::vector<float>& work = s.work;
  auto& cand = s.cand;
  const int32_t vocab = static_cast<int32_t>(work.size());
  cand.clear();
  for (int32_t i = 0; i < vocab; ++i)
    if (work[static_cast<size_t>(i)] != kNegInf) cand.emplace_back(i, 0.0);
  if (cand.empty()) fail("sampler: no token has a finite logit");

  // Descending logit, ties to the lower id, so every cut is deterministic.
  auto by_logit = [&](const std::pair<int32_t, double>& x, const std::pair<int32_t, double>& y) {
    const float lx = work[static_cast<size_t>(x.first)], ly = work[static_cast<size_t>(y.first)];
    return lx != ly ? lx > ly : x.first < y.first;
  };
  if (a.top_k > 0 && static_cast<size_t>(a.top_k) < cand.size()) {
    // Exactly k survive (ties at the boundary go to the lower ids).
    std::nth_element(cand.begin(), cand.begin() + a.top_k - 1, cand.end(), by_logit);
    cand.resize(static_cast<size_t>(a.top_k));
  }

  float max_l = kNegInf;
  for (const auto& c : cand) max_l = std::max(max_l, work[static_cast<size_t>(c.first)]);
  const double inv_t = 1.0 / static_cast<double>(a.temperature);
  double total = 0.0;
  for (auto& c : cand) {
    c.second = std::exp((static_cast<double>(work[static_cast<size_t>(c.first)]) - max_l) * inv_t);
    total += c.second;
  }

  // min-p keeps the prefix with p >= min_p * p_max. Its cut never depends on
  // top-p (p_max survives top-p) and the two prefixes intersect to the
  // shorter one, so pruning it first (before the sort) gives the same set.
  if (a.min_p > 0.0f) {
    const double thr = static_cast<double>(a.min_p);  // p_max is exp(0) = 1
    cand.erase(std::remove_if(cand.begin(), cand.end(), [&](const auto& c) { return c.second < thr; }),
               cand.end());
  }
  std::sort(cand.begin(), cand.end(), by_logit);

  if (a.top_p < 1.0f) {
    // Smallest prefix whose mass (in the top-k distribution) reaches top_p.
    const double target = static_cast<double>(a.top_p) * total;
    double cum = 0.0;
    size_t keep = 0;
    while (keep < cand.size()) {
      cum += cand[keep].second;
      ++keep;
      if (cum >= target) break;
    }
    cand.resize(std::max<size_t>(keep, 1));
  }

  double kept = 0.0;
  for (const auto& c : cand) kept += c.second;
  for (auto& c : cand) c.second /= kept;
}

}  // namespace

int32_t pick_candidate(const std::vector<std::pair<int32_t, double>>& cand, double u) {
  double cum = 0.0;
  for (const auto& c : cand) {
    cum += c.second;
    if (u < cum) return c.first;
  }
  return cand.back().first;  // u landed in the rounding slack at the top
}

int32_t sample_row(const float* logits, int64_t vocab, const SampleArgs& a, SampleScratch& s) {
  if (a.temperature != 0.0f) return pick_candidate(sample_distribution(logits, vocab, a, s), a.u);
  prepare(logits, vocab, a, s);
  const std::vector<float>& work = s.work;
  int32_t best = 0;
  for (int32_t i = 1; i < static_cast<int32_t>(vocab); ++i)  // strict '>' keeps the lowest id on ties
    if (work[static_cast<size_t>(i)] > work[static_cast<size_t>(best)]) best = i;
  if (work[static_cast<size_t>(best)] == kNegInf) fail("sampler: no token has a finite logit");
  return best;
}

const std::vector<std::pair<int32_t, double>>& sample_distribution(const float* logits, int64_t vocab,
                                                                   const SampleArgs& a, SampleScratch& s) {
  check(a.temperature > 0.0f, "sampler: the candidate distribution needs temperature > 0");
  prepare(logits, vocab, a, s);
  filter(a, s);
  return s.cand;
}

}  // namespace cpu

void Backend::sample_tokens(const float* logits, int64_t rows, int64_t vocab, int64_t ld, const SampleArgs* args,
                            int32_t* out_ids) {
  if (rows <= 0) return;
  // Every row's options first, as the CUDA backend checks them (before any row runs).
  for (int64_t r = 0; r < rows; ++r) cpu::check_sample_args(args[r]);
  check(vocab > 0, "sampler: vocabulary size must be positive, got ", vocab);
  check(ld >= vocab, "sample_tokens: leading dimension ", ld, " is smaller than the vocabulary (", vocab, ")");
  std::vector<float> host(static_cast<size_t>((rows - 1) * ld + vocab));
  download(host.data(), logits, host.size() * sizeof(float));
  cpu::SampleScratch s;
  for (int64_t r = 0; r < rows; ++r)
    out_ids[r] = cpu::sample_row(host.data() + static_cast<size_t>(r * ld), vocab, args[r], s);
}

}  // namespace hymba
