#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "util/error.h"

namespace hymba {

void validate_sampling(const SamplingParams& p) {
  check(std::isfinite(p.temperature) && p.temperature >= 0.0f,
        "sampling option temperature must be a finite number >= 0 (0 = greedy), got ",
        p.temperature);
  check(p.top_k >= 0, "sampling option top_k must be >= 0 (0 = off), got ", p.top_k);
  check(std::isfinite(p.top_p) && p.top_p > 0.0f && p.top_p <= 1.0f,
        "sampling option top_p must be in (0, 1], got ", p.top_p);
  check(std::isfinite(p.min_p) && p.min_p >= 0.0f && p.min_p <= 1.0f,
        "sampling option min_p must be in [0, 1], got ", p.min_p);
  check(std::isfinite(p.repeat_penalty) && p.repeat_penalty > 0.0f,
        "sampling option repeat_penalty must be a finite number > 0 (1 = off), got ",
        p.repeat_penalty);
  check(p.repeat_last_n >= -1,
        "sampling option repeat_last_n must be >= -1 (-1 = whole history, 0 = off), got ",
        p.repeat_last_n);
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {
  validate_sampling(params_);
}

void Sampler::reseed(uint64_t seed) {
  params_.seed = seed;
  rng_.seed(seed);
}

double Sampler::uniform01() {
  // std::uniform_real_distribution is implementation-defined; the top 53
  // bits of the (standard-specified) engine output are not.
  return static_cast<double>(rng_() >> 11) * 0x1.0p-53;
}

void Sampler::prepare(const float* logits, int vocab, const std::vector<int32_t>& history) {
  check(vocab > 0, "sampler: vocabulary size must be positive, got ", vocab);
  check(logits != nullptr, "sampler: logits pointer is null");
  work_.assign(logits, logits + vocab);
  for (int i = 0; i < vocab; ++i) {
    const float v = work_[static_cast<size_t>(i)];
    if (std::isnan(v)) fail("sampler: logit of token ", i, " is NaN");
    if (v == std::numeric_limits<float>::infinity())
      fail("sampler: logit of token ", i, " is +inf");
  }

  if (params_.repeat_penalty != 1.0f && params_.repeat_last_n != 0 && !history.empty()) {
    const size_t n = params_.repeat_last_n < 0
                         ? history.size()
                         : std::min(history.size(), static_cast<size_t>(params_.repeat_last_n));
    seen_.assign(history.end() - static_cast<std::ptrdiff_t>(n), history.end());
    std::sort(seen_.begin(), seen_.end());
    seen_.erase(std::unique(seen_.begin(), seen_.end()), seen_.end());  // each id once
    for (int32_t id : seen_) {
      if (id < 0 || id >= vocab)
        fail("sampler: history token id ", id, " is out of range for vocabulary of size ", vocab);
      float& l = work_[static_cast<size_t>(id)];
      l = l > 0.0f ? l / params_.repeat_penalty : l * params_.repeat_penalty;
    }
  }
}

void Sampler::filter() {
  const int vocab = static_cast<int>(work_.size());
  const float neg_inf = -std::numeric_limits<float>::infinity();
  cand_.clear();
  for (int i = 0; i < vocab; ++i)
    if (work_[static_cast<size_t>(i)] != neg_inf) cand_.emplace_back(i, 0.0);
  if (cand_.empty()) fail("sampler: no token has a finite logit");

  // Descending logit, ties to the lower id, so every cut is deterministic.
  auto by_logit = [&](const std::pair<int32_t, double>& a, const std::pair<int32_t, double>& b) {
    const float la = work_[static_cast<size_t>(a.first)], lb = work_[static_cast<size_t>(b.first)];
    return la != lb ? la > lb : a.first < b.first;
  };
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < cand_.size()) {
    // Exactly k survive (ties at the boundary go to the lower ids).
    std::nth_element(cand_.begin(), cand_.begin() + params_.top_k - 1, cand_.end(), by_logit);
    cand_.resize(static_cast<size_t>(params_.top_k));
  }

  float max_l = neg_inf;
  for (const auto& c : cand_) max_l = std::max(max_l, work_[static_cast<size_t>(c.first)]);
  const double inv_t = 1.0 / static_cast<double>(params_.temperature);
  double total = 0.0;
  for (auto& c : cand_) {
    c.second = std::exp((static_cast<double>(work_[static_cast<size_t>(c.first)]) - max_l) * inv_t);
    total += c.second;
  }

  // min-p keeps the prefix with p >= min_p * p_max. Its cut never depends on
  // top-p (p_max survives top-p) and the two prefixes intersect to the
  // shorter one, so pruning it first (before the sort) gives the same set.
  if (params_.min_p > 0.0f) {
    const double thr = static_cast<double>(params_.min_p);  // p_max is exp(0) = 1
    cand_.erase(std::remove_if(cand_.begin(), cand_.end(),
                               [&](const auto& c) { return c.second < thr; }),
                cand_.end());
  }
  std::sort(cand_.begin(), cand_.end(), by_logit);

  if (params_.top_p < 1.0f) {
    // Smallest prefix whose mass (in the top-k distribution) reaches top_p.
    const double target = static_cast<double>(params_.top_p) * total;
    double cum = 0.0;
    size_t keep = 0;
    while (keep < cand_.size()) {
      cum += cand_[keep].second;
      ++keep;
      if (cum >= target) break;
    }
    cand_.resize(std::max<size_t>(keep, 1));
  }

  double kept = 0.0;
  for (const auto& c : cand_) kept += c.second;
  for (auto& c : cand_) c.second /= kept;
}

int32_t Sampler::sample(const float* logits, int vocab, const std::vector<int32_t>& history) {
  prepare(logits, vocab, history);
  if (params_.temperature == 0.0f) {
    int32_t best = 0;
    for (int i = 1; i < vocab; ++i)  // strict '>' keeps the lowest id on ties
      if (work_[static_cast<size_t>(i)] > work_[static_cast<size_t>(best)]) best = i;
    if (work_[static_cast<size_t>(best)] == -std::numeric_limits<float>::infinity())
      fail("sampler: no token has a finite logit");
    return best;
  }
  filter();
  // One draw per sampled token, even with a single survivor, so the random
  // stream does not depend on how many candidates survived.
  const double u = uniform01();
  double cum = 0.0;
  for (const auto& c : cand_) {
    cum += c.second;
    if (u < cum) return c.first;
  }
  return cand_.back().first;  // u landed in the rounding slack at the top
}

std::vector<std::pair<int32_t, double>> Sampler::distribution(
    const float* logits, int vocab, const std::vector<int32_t>& history) {
  check(params_.temperature > 0.0f, "sampler: distribution() needs temperature > 0");
  prepare(logits, vocab, history);
  filter();
  return cand_;
}

// ---------------------------------------------------------------------------

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (const auto& s : stops_)
    check(!s.empty(), "stop strings must not be empty (an empty stop would end generation at once)");
}

StopMatcher::Result StopMatcher::feed(std::string_view chunk) {
  Result r;
  if (stopped_) {
    r.stopped = true;
    return r;
  }
  std::string buf = std::move(held_);
  held_.clear();
  buf.append(chunk);

  size_t hit = std::string::npos;  // earliest start of any stop string
  for (const auto& s : stops_) hit = std::min(hit, buf.find(s));
  if (hit != std::string::npos) {
    stopped_ = true;
    r.stopped = true;
    r.text = buf.substr(0, hit);
    return r;
  }

  // Hold back the longest tail that is still a proper prefix of a stop string.
  size_t hold = 0;
  for (const auto& s : stops_) {
    const size_t max_len = std::min(buf.size(), s.size() - 1);
    for (size_t len = max_len; len > hold; --len) {
      if (std::string_view(buf).substr(buf.size() - len) == std::string_view(s).substr(0, len)) {
        hold = len;
        break;
      }
    }
  }
  held_ = buf.substr(buf.size() - hold);
  buf.resize(buf.size() - hold);
  r.text = std::move(buf);
  return r;
}

std::string StopMatcher::flush() {
  std::string out = std::move(held_);
  held_.clear();
  return out;
}

}  // namespace hymba
