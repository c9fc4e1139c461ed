// The generation driver: chunked prefill of a prompt, then token-by-token
// decode on the sequence's cache with a sampler, until EOS, the token budget,
// a stop string or the caller says stop.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cache/hybrid_cache.h"
#include "io/tokenizer.h"
#include "model/hymba_model.h"
#include "runtime/sampler.h"

namespace hymba {

struct GenerationRequest {
  std::vector<int32_t> prompt;
  int max_new_tokens = 128;
  SamplingParams sampling;
  std::vector<std::string> stop_strings;  // needs a tokenizer
  bool ignore_eos = false;
  int64_t context = 0;  // cache room in real tokens; 0: prompt + max_new_tokens
  // Ids already in the sequence before `prompt` (continue() only): the
  // repetition penalty's history starts with them. Not run through the model.
  std::vector<int32_t> history;
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated ids (a stop string's tokens included)
  std::string text;             // emitted text (without the stop string); empty without tokenizer
  std::string stop_reason;      // "eos", "length", "stop_string", "context", "cancelled"
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;   // prompt prefill (first token's logits included)
  double decode_seconds = 0;    // all decode steps after the first token
  double ttft_seconds = 0;      // request start to the first generated token
  // How many of `tokens` were run through the model, i.e. appended to the
  // sequence's cache after the prompt. Every generated token but the last is:
  // the last one is only sampled (nobody needs its logits).
  int64_t tokens_in_cache = 0;
};

class Generator {
 public:
  // tokenizer may be null (ids only; stop strings then unavailable).
  Generator(HymbaModel& model, const Tokenizer* tokenizer) : model_(model), tok_(tokenizer) {}

  // on_token(id, text) is called for every generated token with the text it
  // completes (possibly empty); returning false cancels generation. At the
  // end it may be called once more with id -1 for text held back until then.
  using TokenCallback = std::function<bool(int32_t id, const std::string& text)>;
  GenerationResult generate(const GenerationRequest& req, const TokenCallback& on_token = {});

  // Continues an existing sequence (multi-turn chat): prefills req.prompt (at
  // least one id: only the tokens not yet in `seq`) at the end of `seq`, calls
  // after_prefill (if set; the cache then holds exactly the prompt), then
  // decodes. req.context is ignored: the room is what `seq` has left. On
  // return `seq` holds the prompt plus the first res.tokens_in_cache
  // generated ids.
  GenerationResult continue_sequence(SequenceCache& seq, const GenerationRequest& req,
                                     const TokenCallback& on_token = {},
                                     const std::function<void()>& after_prefill = {});

 private:
  HymbaModel& model_;
  const Tokenizer* tok_;
};

}  // namespace hymba
