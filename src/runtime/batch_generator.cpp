#include "runtime/batch_generator.h"

#include <chrono>
#include <memory>

#include "util/error.h"

namespace hymba {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
void add(CacheBytes& a, const CacheBytes& b) {
  a.global_kv += b.global_kv, a.sliding_kv += b.sliding_kv, a.ssm += b.ssm, a.conv += b.conv;
}
}  // namespace

BatchResult generate_batch(HymbaModel& model, const BatchRequest& req) {
  check(!req.prompts.empty(), "batch: no prompts");
  check(req.max_new_tokens >= 1, "batch: max_new_tokens must be at least 1");
  validate_sampling(req.sampling);
  const size_t B = req.prompts.size();
  for (size_t i = 0; i < B; ++i) check(!req.prompts[i].empty(), "batch: prompt ", i, " is empty");

  BatchResult res;
  res.tokens.resize(B);
  std::vector<std::unique_ptr<SequenceCache>> seqs;
  std::vector<Sampler> samplers;
  std::vector<std::vector<int32_t>> history(B);
  std::vector<int32_t> next(B);  // each sequence's next token, picked on the device

  // Prefill each prompt (its first token comes from the prompt's logits).
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < B; ++i) {
    const auto& p = req.prompts[i];
    const int64_t room = int64_t(p.size()) + req.max_new_tokens;
    seqs.push_back(model.new_sequence(room));
    add(res.cache_allocated, seqs.back()->allocated_bytes());
    add(res.cache_formula, model.cache_layout().bytes(room));
    SamplingParams sp = req.sampling;
    sp.seed = req.sampling.seed + i;
    samplers.emplace_back(sp);
    history[i] = p;
    next[i] = model.forward_sample(*seqs[i], p.data(), int64_t(p.size()), samplers[i].next_args(history[i]));
  }
  res.prefill_seconds = seconds_since(t0);

  // Sample, then one batched step for every sequence still running.
  const auto t1 = std::chrono::steady_clock::now();
  std::vector<size_t> active(B);
  for (size_t i = 0; i < B; ++i) active[i] = i;
  std::vector<SequenceCache*> step_seqs;
  std::vector<int32_t> step_ids;
  std::vector<SampleArgs> step_args;
  std::vector<int32_t> step_out;
  for (;;) {
    step_seqs.clear();
    step_ids.clear();
    std::vector<size_t> still;
    for (size_t i : active) {
      const int32_t tok = next[i];
      res.tokens[i].push_back(tok);
      history[i].push_back(tok);
      const bool done = int(res.tokens[i].size()) >= req.max_new_tokens ||
                        (!req.ignore_eos && req.eos_id >= 0 && tok == req.eos_id);
      if (done) continue;
      still.push_back(i);
      step_seqs.push_back(seqs[i].get());
      step_ids.push_back(tok);
    }
    active = std::move(still);
    if (active.empty()) break;
    step_args.clear();
    for (size_t i : active) step_args.push_back(samplers[i].next_args(history[i]));
    step_out.resize(active.size());
    model.forward_batch_sample(step_seqs.data(), step_ids.data(), int64_t(active.size()), step_args.data(),
                               step_out.data());
    for (size_t j = 0; j < active.size(); ++j) next[active[j]] = step_out[j];
    ++res.decode_steps;
    res.decoded_tokens += int64_t(active.size());
  }
  res.decode_seconds = seconds_since(t1);
  return res;
}

}  // namespace hymba
