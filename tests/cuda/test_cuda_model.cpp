// The whole engine on the GPU (--device cuda) against independent
// references and against itself:
//  * the PyTorch reference goldens (tests/reference, ctest fixture
//    `reference_goldens`) and NVIDIA's fixture ../shared/fixtures/tiny-a:
//    logits within the goldens' tolerance, identical greedy tokens;
//  * the CPU engine on the same checkpoint;
//  * incremental decode == prefill, and batched decode == decoding alone
//    (batch invariance of the tokens).
// Every test skips when this build has no CUDA backend or no GPU is visible.
// HYMBA_TEST_WORK / HYMBA_SHARED_DIR may point elsewhere (device machine).
#include <algorithm>
#include <memory>

#include "model/hymba_model.h"
#include "runtime/generator.h"
#include "test_util.h"

namespace hymba {
namespace {

using test::read_json;
using test::rel_l2;

#define REQUIRE_GPU()                                                            \
  if (default_device() != "cuda") GTEST_SKIP() << "no CUDA backend in this build or no GPU visible"

std::vector<int32_t> ids_of(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

std::vector<double> flatten(const nlohmann::json& rows) {
  std::vector<double> out;
  for (const auto& r : rows)
    for (const auto& v : r) out.push_back(v.get<double>());
  return out;
}

std::vector<std::string> golden_cases() {
  const auto index = read_json(test::work_dir() + "/goldens/index.json");
  std::vector<std::string> names;
  for (const auto& c : index["cases"]) names.push_back(c["name"].get<std::string>());
  return names;
}

std::unique_ptr<HymbaModel> load(const std::string& dir, const std::string& device) {
  ModelOptions o;
  o.kv_dtype = DType::F32;  // exact cache: tolerances cover arithmetic order only
  o.device = device;
  return HymbaModel::load(dir, o);
}

std::vector<float> all_logits(HymbaModel& m, const std::vector<int32_t>& ids) {
  auto seq = m.new_sequence(int64_t(ids.size()));
  std::vector<float> out(ids.size() * size_t(m.vocab_size()));
  m.forward(*seq, ids.data(), int64_t(ids.size()), out.data(), true);
  return out;
}

std::vector<int32_t> greedy(HymbaModel& m, const std::vector<int32_t>& prompt, int n) {
  Generator gen(m, nullptr);
  GenerationRequest req;
  req.prompt = prompt;
  req.max_new_tokens = n;
  req.ignore_eos = true;
  return gen.generate(req).tokens;
}

int32_t argmax(const float* x, int64_t n) { return int32_t(std::max_element(x, x + n) - x); }

TEST(CudaModel, GoldensMatchReferenceAndCpuEngine) {
  REQUIRE_GPU();
  for (const std::string& name : golden_cases()) {
    SCOPED_TRACE("case " + name);
    const std::string dir = test::work_dir() + "/goldens/" + name;
    const auto g = read_json(dir + "/golden.json");
    auto gpu = load(dir, "cuda");
    auto cpu = load(dir, "cpu");
    ASSERT_EQ(gpu->backend().name(), "cuda");
    const double tol = g["tolerance"].get<double>();
    for (const auto& p : g["prompts"]) {
      const auto ids = ids_of(p["input_ids"]);
      SCOPED_TRACE("prompt of " + std::to_string(ids.size()) + " tokens");
      const auto got = all_logits(*gpu, ids);
      EXPECT_LT(rel_l2(got, flatten(p["logits"])), tol);
      const auto on_cpu = all_logits(*cpu, ids);
      EXPECT_LT(rel_l2(got, std::vector<double>(on_cpu.begin(), on_cpu.end())), tol);
      const auto want = ids_of(p["greedy"]);
      EXPECT_EQ(greedy(*gpu, ids, int(want.size())), want);
    }
  }
}

TEST(CudaModel, FixtureTinyA) {
  REQUIRE_GPU();
  const auto fx = read_json(test::shared_dir() + "/fixtures/tiny-a/expected.json");
  ModelOptions o;
  o.device = "cuda";
  auto model = HymbaModel::load(test::shared_dir() + "/fixtures/tiny-a", o);
  for (const auto& c : fx["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const auto ids = ids_of(c["input_ids"]);
    const auto got = all_logits(*model, ids);
    const auto want = flatten(c["logits"]);
    ASSERT_EQ(got.size(), want.size());
    double max_abs = 0;
    for (size_t i = 0; i < got.size(); ++i) max_abs = std::max(max_abs, std::fabs(double(got[i]) - want[i]));
    EXPECT_LE(max_abs, 1e-3);  // the fixture README's fp32 tolerance
    EXPECT_LT(rel_l2(got, want), 1e-4);
    const auto tokens = ids_of(c["greedy"]["tokens"]);
    EXPECT_EQ(greedy(*model, ids, int(tokens.size())), tokens);
  }
}

TEST(CudaModel, IncrementalDecodeEqualsPrefill) {
  REQUIRE_GPU();
  for (const std::string& name : golden_cases()) {
    SCOPED_TRACE("case " + name);
    const std::string dir = test::work_dir() + "/goldens/" + name;
    const auto g = read_json(dir + "/golden.json");
    auto model = load(dir, "cuda");
    std::vector<int32_t> ids;
    for (const auto& p : g["prompts"])
      if (p["input_ids"].size() > ids.size()) ids = ids_of(p["input_ids"]);
    const auto full = all_logits(*model, ids);
    auto seq = model->new_sequence(int64_t(ids.size()));
    const size_t V = size_t(model->vocab_size());
    std::vector<float> inc(ids.size() * V);
    for (size_t t = 0; t < ids.size(); ++t) model->forward(*seq, &ids[t], 1, inc.data() + t * V, false, true);
    const double tol = g["weights_dtype"] == "BF16" ? 1e-2 : 1e-5;
    EXPECT_LT(rel_l2(inc, std::vector<double>(full.begin(), full.end())), tol);
  }
}

TEST(CudaModel, BatchedDecodeEqualsDecodingAlone) {
  REQUIRE_GPU();
  for (const std::string& name : golden_cases()) {
    SCOPED_TRACE("case " + name);
    const std::string dir = test::work_dir() + "/goldens/" + name;
    const auto g = read_json(dir + "/golden.json");
    std::vector<int32_t> ids;
    for (const auto& p : g["prompts"])
      if (p["input_ids"].size() > ids.size()) ids = ids_of(p["input_ids"]);
    auto model = load(dir, "cuda");
    const int64_t V = model->vocab_size();
    const std::vector<size_t> lens = {1, 5, ids.size() / 2, ids.size()};
    const int steps = 6;
    std::vector<std::unique_ptr<SequenceCache>> alone, batched;
    std::vector<std::vector<float>> last(lens.size(), std::vector<float>(size_t(V)));
    for (size_t b = 0; b < lens.size(); ++b) {
      alone.push_back(model->new_sequence(int64_t(lens[b]) + steps));
      batched.push_back(model->new_sequence(int64_t(lens[b]) + steps));
      model->forward(*alone[b], ids.data(), int64_t(lens[b]), last[b].data(), false);
      model->forward(*batched[b], ids.data(), int64_t(lens[b]), nullptr, false);
    }
    std::vector<int32_t> next(lens.size());
    for (size_t b = 0; b < lens.size(); ++b) next[b] = argmax(last[b].data(), V);
    std::vector<SequenceCache*> ptrs;
    for (auto& s : batched) ptrs.push_back(s.get());
    const double tol = g["weights_dtype"] == "BF16" ? 1e-2 : 1e-5;
    for (int step = 0; step < steps; ++step) {
      std::vector<float> out(lens.size() * size_t(V));
      model->forward_batch(ptrs.data(), next.data(), int64_t(lens.size()), out.data());
      for (size_t b = 0; b < lens.size(); ++b) {
        model->forward(*alone[b], &next[b], 1, last[b].data(), false, true);
        const float* mine = out.data() + b * size_t(V);
        EXPECT_LT(rel_l2(std::vector<float>(mine, mine + V), std::vector<double>(last[b].begin(), last[b].end())),
                  tol)
            << "sequence " << b << " step " << step;
        EXPECT_EQ(argmax(mine, V), argmax(last[b].data(), V)) << "sequence " << b << " step " << step;
        next[b] = argmax(last[b].data(), V);
      }
    }
  }
}

}  // namespace
}  // namespace hymba
