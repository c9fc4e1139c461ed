// Helpers shared by the whole-model tests on the CPU (test_model_reference)
// and on the GPU (tests/cuda/test_cuda_model): golden cases, logits, greedy
// generation, and the batched-decode check.
#pragma once

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "model/hymba_model.h"
#include "runtime/generator.h"
#include "test_util.h"

namespace hymba::test {

inline std::vector<int32_t> ids_of(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

// The goldens' logits, rounded to float as the engine's output is.
inline std::vector<double> flatten(const nlohmann::json& rows) {
  std::vector<double> v;
  for (const auto& r : rows)
    for (const auto& x : r) v.push_back(double(float(x.get<double>())));
  return v;
}

// Names of the reference golden configs (ctest fixture reference_goldens).
inline std::vector<std::string> golden_cases() {
  const auto index = read_json(work_dir() + "/goldens/index.json");
  std::vector<std::string> names;
  for (const auto& c : index["cases"]) names.push_back(c["name"].get<std::string>());
  return names;
}

// The longest prompt of a golden case (it runs past window + meta tokens).
inline std::vector<int32_t> longest_prompt(const nlohmann::json& golden) {
  std::vector<int32_t> ids;
  for (const auto& p : golden["prompts"])
    if (p["input_ids"].size() > ids.size()) ids = ids_of(p["input_ids"]);
  return ids;
}

inline std::vector<float> all_logits(HymbaModel& m, const std::vector<int32_t>& ids) {
  auto seq = m.new_sequence(int64_t(ids.size()));
  std::vector<float> out(ids.size() * size_t(m.vocab_size()));
  m.forward(*seq, ids.data(), int64_t(ids.size()), out.data(), true);
  return out;
}

// Feeds the tokens one at a time, collecting each step's logits.
inline std::vector<float> incremental_logits(HymbaModel& m, const std::vector<int32_t>& ids) {
  auto seq = m.new_sequence(int64_t(ids.size()));
  const size_t V = size_t(m.vocab_size());
  std::vector<float> out(ids.size() * V);
  for (size_t t = 0; t < ids.size(); ++t) m.forward(*seq, &ids[t], 1, out.data() + t * V, false, true);
  return out;
}

inline std::vector<int32_t> greedy(HymbaModel& m, const std::vector<int32_t>& prompt, int n) {
  Generator gen(m, nullptr);
  GenerationRequest req;
  req.prompt = prompt;
  req.max_new_tokens = n;
  req.ignore_eos = true;
  return gen.generate(req).tokens;
}

// One case of ../shared/fixtures/tiny-a (NVIDIA's reference outputs): the
// logits of every position within the fixture README's fp32 tolerance.
inline void expect_fixture_logits(HymbaModel& model, const nlohmann::json& c) {
  const auto got = all_logits(model, ids_of(c["input_ids"]));
  const auto want = flatten(c["logits"]);
  ASSERT_EQ(got.size(), want.size());
  double max_abs = 0;
  for (size_t i = 0; i < got.size(); ++i) max_abs = std::max(max_abs, std::fabs(double(got[i]) - want[i]));
  EXPECT_LE(max_abs, 1e-3);
  EXPECT_LT(rel_l2(got, want), 1e-4);
}

inline int32_t argmax(const float* x, int64_t n) { return int32_t(std::max_element(x, x + n) - x); }

// Four sequences of different lengths (prefixes of ids: 1, 5, half, all)
// decode 6 greedy steps together with forward_batch; each must get what
// decoding it alone gives (logits within tol, identical tokens).
inline void expect_batched_decode_equals_alone(HymbaModel& model, const std::vector<int32_t>& ids, double tol) {
  const int64_t V = model.vocab_size();
  const std::vector<size_t> lens = {1, 5, ids.size() / 2, ids.size()};
  const int steps = 6;
  std::vector<std::unique_ptr<SequenceCache>> alone, batched;
  std::vector<std::vector<float>> last(lens.size(), std::vector<float>(size_t(V)));
  for (size_t b = 0; b < lens.size(); ++b) {
    alone.push_back(model.new_sequence(int64_t(lens[b]) + steps));
    batched.push_back(model.new_sequence(int64_t(lens[b]) + steps));
    model.forward(*alone[b], ids.data(), int64_t(lens[b]), last[b].data(), false);
    model.forward(*batched[b], ids.data(), int64_t(lens[b]), nullptr, false);
  }
  std::vector<int32_t> next(lens.size());
  for (size_t b = 0; b < lens.size(); ++b) next[b] = argmax(last[b].data(), V);
  std::vector<SequenceCache*> ptrs;
  for (auto& s : batched) ptrs.push_back(s.get());
  for (int step = 0; step < steps; ++step) {
    std::vector<float> out(lens.size() * size_t(V));
    model.forward_batch(ptrs.data(), next.data(), int64_t(lens.size()), out.data());
    for (size_t b = 0; b < lens.size(); ++b) {
      model.forward(*alone[b], &next[b], 1, last[b].data(), false, true);
      const float* mine = out.data() + b * size_t(V);
      const std::vector<double> ref(last[b].begin(), last[b].end());
      EXPECT_LT(rel_l2(std::vector<float>(mine, mine + V), ref), tol) << "sequence " << b << " step " << step;
      EXPECT_EQ(argmax(mine, V), argmax(last[b].data(), V)) << "sequence " << b << " step " << step;
      EXPECT_EQ(batched[b]->length(), alone[b]->length());
      next[b] = argmax(last[b].data(), V);
    }
  }
}

}  // namespace hymba::test
