#include "runtime/chat_session.h"

#include <algorithm>

#include "util/error.h"

namespace hymba {

size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

ChatSession::ChatSession(HymbaModel& model, const Tokenizer& tok, ChatTemplate tmpl, ChatOptions opts)
    : model_(model), tok_(tok), tmpl_(std::move(tmpl)), opts_(std::move(opts)) {
  check(opts_.max_new_tokens >= 0, "the number of tokens to generate must be >= 0");
  validate_sampling(opts_.sampling);
  ctx_ = opts_.context > 0 ? opts_.context : std::min<int64_t>(model_.config().max_position_embeddings, 8192);
  check(ctx_ >= 1, "the context must hold at least one token");
  reset();
}

void ChatSession::reset() {
  conv_ = Conversation();
  if (opts_.has_system || !opts_.system.empty()) conv_.add_message("system", opts_.system);
  seq_.reset();
  snap_.reset();
  cached_.clear();
  snap_ids_.clear();
  turns_ = 0;
}

std::string ChatSession::render(bool add_generation_prompt) const {
  Conversation c = conv_;
  c.add_generation_prompt = add_generation_prompt;
  return tmpl_.render(c);
}

ChatTurn ChatSession::send(const std::string& user_text, const Generator::TokenCallback& on_token) {
  conv_.add_message("user", user_text);
  bool touched_cache = false;
  try {
    const std::vector<int32_t> ids = tok_.encode(render(true), /*add_bos=*/false);
    check(int64_t(ids.size()) <= ctx_, "the conversation is ", ids.size(), " tokens long and no longer fits the ",
          ctx_, "-token context: /reset to start over (or give a larger --ctx)");
    ChatTurn turn;
    turn.conversation_tokens = int64_t(ids.size());
    // Extend the cache if it holds a prefix of the new ids (and at least one
    // new token is left to produce logits from); otherwise go back to the
    // snapshot after the last prompt, otherwise start from scratch.
    touched_cache = true;
    if (seq_ && common_prefix(cached_, ids) == cached_.size() && ids.size() > cached_.size()) {
      turn.cache_path = "extend";
    } else if (snap_ && !snap_ids_.empty() && common_prefix(snap_ids_, ids) == snap_ids_.size() &&
               ids.size() > snap_ids_.size()) {
      if (!seq_) seq_ = model_.new_sequence(ctx_);
      seq_->copy_from(*snap_);
      cached_ = snap_ids_;
      turn.cache_path = "snapshot";
    } else {
      seq_ = model_.new_sequence(ctx_);
      cached_.clear();
      turn.cache_path = "rebuild";
    }
    turn.reused_tokens = int64_t(cached_.size());
    turn.prefilled_tokens = int64_t(ids.size() - cached_.size());

    GenerationRequest req;
    req.prompt.assign(ids.begin() + std::ptrdiff_t(cached_.size()), ids.end());
    req.history = cached_;
    req.max_new_tokens = opts_.max_new_tokens;
    req.sampling = opts_.sampling;
    req.sampling.seed = opts_.sampling.seed + uint64_t(turns_);
    req.stop_strings = opts_.stop_strings;
    req.ignore_eos = opts_.ignore_eos;
    Generator gen(model_, &tok_);
    auto after_prefill = [&] {
      if (!opts_.keep_snapshot) return;
      snap_ids_.clear();  // not valid while copying
      if (!snap_) snap_ = model_.new_sequence(ctx_);
      snap_->copy_from(*seq_);
      snap_ids_ = ids;
    };
    turn.gen = gen.continue_sequence(*seq_, req, on_token, after_prefill);
    cached_ = ids;
    cached_.insert(cached_.end(), turn.gen.tokens.begin(),
                   turn.gen.tokens.begin() + std::ptrdiff_t(turn.gen.tokens_in_cache));
    conv_.add_message("assistant", turn.gen.text);
    ++turns_;
    return turn;
  } catch (...) {
    conv_.messages.erase(conv_.messages.end() - 1);
    if (touched_cache) {  // the cache's content is unknown now: rebuild next time
      seq_.reset();
      cached_.clear();
    }
    throw;
  }
}

}  // namespace hymba
