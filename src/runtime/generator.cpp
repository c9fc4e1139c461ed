#include "runtime/generator.h"

#include <chrono>

#include "util/error.h"

namespace hymba {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

GenerationResult Generator::generate(const GenerationRequest& req, const TokenCallback& on_token) {
  check(!req.prompt.empty(), "the prompt is empty: at least one token is needed");
  check(req.max_new_tokens >= 0, "the number of tokens to generate must be >= 0");
  const int64_t need = int64_t(req.prompt.size()) + req.max_new_tokens;
  const int64_t ctx = req.context > 0 ? req.context : need;
  check(int64_t(req.prompt.size()) <= ctx, "the prompt has ", req.prompt.size(),
        " tokens but the context holds ", ctx);
  auto seq = model_.new_sequence(ctx);
  GenerationRequest r = req;
  r.history.clear();
  return continue_sequence(*seq, r, on_token);
}

GenerationResult Generator::continue_sequence(SequenceCache& seq, const GenerationRequest& req,
                                              const TokenCallback& on_token,
                                              const std::function<void()>& after_prefill) {
  check(!req.prompt.empty(), "the prompt is empty: at least one token is needed");
  check(req.max_new_tokens >= 0, "the number of tokens to generate must be >= 0");
  check(req.stop_strings.empty() || tok_ != nullptr, "stop strings need a tokenizer");
  check(int64_t(req.prompt.size()) <= seq.remaining(), "the prompt has ", req.prompt.size(),
        " new tokens but the context has room for ", seq.remaining(), " more");
  Sampler sampler(req.sampling);
  StopMatcher stops(req.stop_strings);
  std::unique_ptr<StreamDecoder> detok;
  if (tok_) detok = std::make_unique<StreamDecoder>(*tok_);

  GenerationResult res;
  res.prompt_tokens = int64_t(req.prompt.size());
  std::vector<int32_t> history = req.history;
  history.insert(history.end(), req.prompt.begin(), req.prompt.end());
  const auto t0 = std::chrono::steady_clock::now();
  // Each forward also picks the next token on the device (the logits stay
  // there); with nothing to generate, the prompt is only prefilled.
  int32_t next = -1;
  if (req.max_new_tokens > 0)
    next = model_.forward_sample(seq, req.prompt.data(), int64_t(req.prompt.size()), sampler.next_args(history));
  else
    model_.forward(seq, req.prompt.data(), int64_t(req.prompt.size()), nullptr, false);
  res.prefill_seconds = seconds_since(t0);
  if (after_prefill) after_prefill();
  const int eos = model_.config().eos_token_id;

  std::chrono::steady_clock::time_point t_first;
  res.stop_reason = "length";
  for (int i = 0; i < req.max_new_tokens; ++i) {
    const int32_t id = next;
    if (i == 0) {
      t_first = std::chrono::steady_clock::now();
      res.ttft_seconds = seconds_since(t0);
    }
    res.tokens.push_back(id);
    history.push_back(id);
    if (id == eos && !req.ignore_eos) {
      res.stop_reason = "eos";
      break;
    }
    std::string text;
    if (detok) {
      auto r = stops.feed(detok->push(id));
      text = std::move(r.text);
      res.text += text;
      if (r.stopped) {
        if (on_token) on_token(id, text);
        res.stop_reason = "stop_string";
        break;
      }
    }
    if (on_token && !on_token(id, text)) {
      res.stop_reason = "cancelled";
      break;
    }
    if (i + 1 == req.max_new_tokens) break;  // no forward for a token nobody will see
    if (seq.remaining() < 1) {
      res.stop_reason = "context";
      break;
    }
    next = model_.forward_sample(seq, &id, 1, sampler.next_args(history), /*decode=*/true);
    ++res.tokens_in_cache;
  }
  if (!res.tokens.empty()) res.decode_seconds = seconds_since(t_first);
  if (detok && res.stop_reason != "stop_string") {
    std::string tail = stops.feed(detok->flush()).text + stops.flush();
    res.text += tail;
    if (on_token && !tail.empty()) on_token(-1, tail);
  }
  return res;
}

}  // namespace hymba
