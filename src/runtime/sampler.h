// Token sampling (greedy / temperature / top-k / top-p / min-p with a
// repetition penalty) and stop-string matching for generation.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "backend/cpu/sampling.h"

namespace hymba {

struct SamplingParams {
  float temperature = 0.0f;    // 0 = greedy
  int top_k = 0;               // 0 = off
  float top_p = 1.0f;          // (0, 1]; 1 = off
  float min_p = 0.0f;          // [0, 1]; 0 = off
  float repeat_penalty = 1.0f; // > 0; 1 = off
  int repeat_last_n = 64;      // history window for the penalty; 0 = off, -1 = all
  uint64_t seed = 0;
};

// Throws hymba::Error naming the offending option.
void validate_sampling(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);  // validates

  // Picks the next token from `vocab` logits. Order (as HF's warpers):
  // repetition penalty, then greedy (temperature 0, ties -> lowest id) or
  // temperature -> top-k -> top-p -> min-p -> draw from the renormalised rest.
  // Throws on NaN/+inf logits, no finite logit, or history ids outside vocab.
  // The rules are backend/cpu/sampling.h's kernel (Backend::sample_tokens
  // runs the same); the Sampler adds the draw and the history window.
  int32_t sample(const float* logits, int vocab, const std::vector<int32_t>& history);

  // The arguments of Backend::sample_tokens (HymbaModel::forward_sample)
  // for the next token, with its random draw when sampling: the device then
  // picks what sample() would pick from the same logits, and the random
  // stream advances as sample() advances it. history.data() must stay valid
  // until the pick is done.
  SampleArgs next_args(const std::vector<int32_t>& history);

  const SamplingParams& params() const { return params_; }
  // Restarts the random stream (same seed -> same samples again).
  void reseed(uint64_t seed);

  // The surviving candidates and their normalised probabilities after all
  // filters, in descending probability (ties: lower id first). Does not
  // consume randomness; sample() draws from exactly this set. For tests and
  // diagnostics; requires temperature > 0.
  std::vector<std::pair<int32_t, double>> distribution(const float* logits, int vocab,
                                                       const std::vector<int32_t>& history);

 private:
  // The kernel's arguments: the options and the penalty window of `history`.
  SampleArgs args_for(const std::vector<int32_t>& history) const;
  double uniform01();  // [0, 1) with 53 random bits, platform independent

  SamplingParams params_;
  std::mt19937_64 rng_;  // the engine's output sequence is fixed by the standard
  cpu::SampleScratch scratch_;
};

// Watches generated text for stop strings. Text that could be the start of a
// stop string is held back until it is ruled out; on a hit, everything before
// the stop string is released and the stop string itself never is.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);  // empty strings rejected

  struct Result {
    std::string text;      // safe to emit now
    bool stopped = false;  // a stop string was hit (now or earlier)
  };
  Result feed(std::string_view chunk);
  // End of generation without a hit: releases the held-back text.
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace hymba
