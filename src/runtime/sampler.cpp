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

SampleArgs Sampler::args_for(const std::vector<int32_t>& history) const {
  SampleArgs a;
  a.temperature = params_.temperature;
  a.top_k = params_.top_k;
  a.top_p = params_.top_p;
  a.min_p = params_.min_p;
  a.repeat_penalty = params_.repeat_penalty;
  // Only a penalty that applies passes history (and so has its ids checked).
  if (params_.repeat_penalty != 1.0f && params_.repeat_last_n != 0 && !history.empty()) {
    const size_t n = params_.repeat_last_n < 0
                         ? history.size()
                         : std::min(history.size(), static_cast<size_t>(params_.repeat_last_n));
    a.history = history.data() + (history.size() - n);
    a.n_history = static_cast<int64_t>(n);
  }
  return a;
}

int32_t Sampler::sample(const float* logits, int vocab, const std::vector<int32_t>& history) {
  const SampleArgs a = args_for(history);
  if (params_.temperature == 0.0f) return cpu::sample_row(logits, vocab, a, scratch_);
  // The filters (and their checks) first, then the draw: bad input consumes
  // no randomness. One draw per sampled token, even with a single survivor,
  // so the random stream does not depend on how many candidates survived.
  const auto& cand = cpu::sample_distribution(logits, vocab, a, scratch_);
  return cpu::pick_candidate(cand, uniform01());
}

SampleArgs Sampler::next_args(const std::vector<int32_t>& history) {
  SampleArgs a = args_for(history);
  if (params_.temperature != 0.0f) a.u = uniform01();
  return a;
}

std::vector<std::pair<int32_t, double>> Sampler::distribution(
    const float* logits, int vocab, const std::vector<int32_t>& history) {
  check(params_.temperature > 0.0f, "sampler: distribution() needs temperature > 0");
  return cpu::sample_distribution(logits, vocab, args_for(history), scratch_);
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
