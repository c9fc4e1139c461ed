// A multi-turn chat that keeps the conversation's cache between turns
// (docs/CHAT.md).
//
// Each turn renders the whole conversation with the chat template and
// tokenizes it (no BOS). The ids already in the cache are compared with the
// new ids: when they are a prefix, only the new tokens are prefilled. The
// SSM/conv state cannot be rolled back, so when they are not a prefix (the
// model's own answer tokens need not be the tokenization of the answer's
// text) the session falls back to a snapshot of the cache taken right after
// the previous prompt's prefill (the answer is then re-read from its text),
// and only if that is no prefix either rebuilds the cache from scratch.
// Either way the prefilled ids are exactly the tokenization of the rendered
// conversation, so a turn gives the same tokens as running the whole
// conversation from scratch.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cache/hybrid_cache.h"
#include "io/tokenizer.h"
#include "model/hymba_model.h"
#include "runtime/chat_template.h"
#include "runtime/generator.h"

namespace hymba {

struct ChatOptions {
  std::string system;       // the system message; empty: none
  bool has_system = false;  // true: a system message is sent (even an empty one)
  int max_new_tokens = 512; // per answer
  SamplingParams sampling;  // the seed of turn k (from 0) is sampling.seed + k
  std::vector<std::string> stop_strings = {"</s>"};  // besides the EOS token
  bool ignore_eos = false;
  int64_t context = 0;      // cache room in tokens; 0: the model's max_position_embeddings
  bool keep_snapshot = true; // keep a copy of the cache after each prompt (faster fallback)
};

struct ChatTurn {
  GenerationResult gen;            // the answer (gen.text is what the history keeps)
  int64_t conversation_tokens = 0; // ids of the rendered prompt of this turn
  int64_t reused_tokens = 0;       // of those, already in the cache
  int64_t prefilled_tokens = 0;    // of those, run through the model this turn
  std::string cache_path;          // "extend", "snapshot" or "rebuild"
};

class ChatSession {
 public:
  ChatSession(HymbaModel& model, const Tokenizer& tok, ChatTemplate tmpl, ChatOptions opts);

  // One turn: adds the user message, prefills what the cache lacks, streams
  // the answer through on_token (return false to stop: the partial answer is
  // kept as the assistant message) and adds it to the history. On an error
  // (e.g. the conversation no longer fits the context) the user message is
  // removed again and the session stays usable.
  ChatTurn send(const std::string& user_text, const Generator::TokenCallback& on_token = {});

  // Forgets the history (the system message stays) and empties the cache.
  void reset();

  const Conversation& conversation() const { return conv_; }
  // The prompt for the next answer (or the history without the generation prompt).
  std::string render(bool add_generation_prompt) const;
  // The ids whose state is in the cache, in order.
  const std::vector<int32_t>& cached_ids() const { return cached_; }
  int64_t context() const { return ctx_; }
  int turns() const { return turns_; }

 private:
  HymbaModel& model_;
  const Tokenizer& tok_;
  ChatTemplate tmpl_;
  ChatOptions opts_;
  int64_t ctx_ = 0;
  Conversation conv_;
  std::unique_ptr<SequenceCache> seq_;
  std::vector<int32_t> cached_;
  std::unique_ptr<SequenceCache> snap_;  // the cache right after the last prompt's prefill
  std::vector<int32_t> snap_ids_;
  int turns_ = 0;
};

// Longest common prefix of two id sequences.
size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b);

}  // namespace hymba
