// Many sequences generating together: each prompt is prefilled on its own
// (chunked), then every decode step advances all unfinished sequences with
// one batched forward (HymbaModel::forward_batch). Each sequence keeps its
// own cache and sampler, so its tokens are those it would get alone.
#pragma once

#include <cstdint>
#include <vector>

#include "cache/hybrid_cache.h"
#include "model/hymba_model.h"
#include "runtime/sampler.h"

namespace hymba {

struct BatchRequest {
  std::vector<std::vector<int32_t>> prompts;  // one per sequence, each non-empty
  int max_new_tokens = 16;
  SamplingParams sampling;  // sequence i draws with seed sampling.seed + i
  bool ignore_eos = false;
  int32_t eos_id = -1;      // stop a sequence at this id (unless ignore_eos); -1: none
};

struct BatchResult {
  std::vector<std::vector<int32_t>> tokens;  // generated ids per sequence
  double prefill_seconds = 0;                // all prompts
  double decode_seconds = 0;                 // the batched steps
  int64_t decode_steps = 0;
  int64_t decoded_tokens = 0;                // tokens produced by the batched steps
  CacheBytes cache_allocated;                // summed over the sequences
  CacheBytes cache_formula;                  // CacheLayout::bytes, summed likewise
};

BatchResult generate_batch(HymbaModel& model, const BatchRequest& req);

}  // namespace hymba
