// The host sampling kernel: picks one token from one row of logits with the
// rules of SampleArgs (backend/ops.h). runtime/sampler.cpp (Sampler) and the
// default Backend::sample_tokens both run this code; the CUDA kernel
// (backend/cuda/sampling.cu) is tested against it.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "backend/ops.h"
#include "util/error.h"

namespace hymba::cpu {

// Working memory of the kernel, reused across calls (no allocation per token
// once grown).
struct SampleScratch {
  std::vector<float> work;                        // the penalised logits
  std::vector<std::pair<int32_t, double>> cand;   // (id, probability)
  std::vector<int32_t> seen;                      // distinct history ids
};

// The option ranges runtime/sampler.h's validate_sampling enforces (a
// Sampler never fails these; other callers of sample_tokens might). Inline:
// the CUDA backend checks with the same code.
inline void check_sample_args(const SampleArgs& a) {
  check(std::isfinite(a.temperature) && a.temperature >= 0.0f,
        "sample_tokens: temperature must be a finite number >= 0, got ", a.temperature);
  check(a.top_k >= 0, "sample_tokens: top_k must be >= 0, got ", a.top_k);
  check(std::isfinite(a.top_p) && a.top_p > 0.0f && a.top_p <= 1.0f, "sample_tokens: top_p must be in (0, 1], got ",
        a.top_p);
  check(std::isfinite(a.min_p) && a.min_p >= 0.0f && a.min_p <= 1.0f, "sample_tokens: min_p must be in [0, 1], got ",
        a.min_p);
  check(std::isfinite(a.repeat_penalty) && a.repeat_penalty > 0.0f,
        "sample_tokens: repeat_penalty must be a finite number > 0, got ", a.repeat_penalty);
  check(a.n_history >= 0 && (a.n_history == 0 || a.history != nullptr),
        "sample_tokens: history of ", a.n_history, " ids with pointer ", static_cast<const void*>(a.history));
  check(a.temperature == 0.0f || (a.u >= 0.0 && a.u < 1.0), "sample_tokens: u must be in [0, 1), got ", a.u);
}

// The token `a` picks from logits[0, vocab) (host memory). Checks, in this
// order, each throwing hymba::Error with a "sampler: ..." message: vocab > 0;
// no NaN or +inf logit (the first one is named); every history id in
// [0, vocab) (checked whenever n_history > 0, the smallest bad id is named);
// no logit made +inf by the penalty (repeat_penalty < 1 on a huge logit); at
// least one finite logit. Temperature 0: the largest penalised logit, ties
// to the lowest id, a.u unused. Otherwise the first candidate of
// sample_distribution() (in its order) at which the running sum of the
// probabilities exceeds a.u; the last candidate when rounding leaves the sum
// below a.u.
int32_t sample_row(const float* logits, int64_t vocab, const SampleArgs& a, SampleScratch& s);

// The candidates surviving every filter with their normalised probabilities,
// in descending logit order (ties: lower id first): penalty, temperature,
// top-k, top-p, min-p. Needs a.temperature > 0; ignores a.u. Same checks as
// sample_row. The result lives in s.cand.
const std::vector<std::pair<int32_t, double>>& sample_distribution(const float* logits, int64_t vocab,
                                                                   const SampleArgs& a, SampleScratch& s);

// The inverse-CDF step of sample_row: the first candidate at which the
// running sum of probabilities exceeds u (the last one if none does).
int32_t pick_candidate(const std::vector<std::pair<int32_t, double>>& cand, double u);

}  // namespace hymba::cpu
