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
#include "model_test_util.h"
#include "test_util.h"

namespace hymba {
namespace {

using test::all_logits;
using test::flatten;
using test::golden_cases;
using test::greedy;
using test::ids_of;
using test::incremental_logits;
using test::longest_prompt;
using test::read_json;
using test::rel_l2;

#define REQUIRE_GPU()                                                            \
  if (default_device() != "cuda") GTEST_SKIP() << "no CUDA backend in this build or no GPU visible"

std::unique_ptr<HymbaModel> load(const std::string& dir, const std::string& device) {
  ModelOptions o;
  o.kv_dtype = DType::F32;  // exact cache: tolerances cover arithmetic order only
  o.device = device;
  return HymbaModel::load(dir, o);
}

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
    test::expect_fixture_logits(*model, c);
    const auto ids = ids_of(c["input_ids"]);
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
    const std::vector<int32_t> ids = longest_prompt(g);
    const auto full = all_logits(*model, ids);
    const auto inc = incremental_logits(*model, ids);
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
    auto model = load(dir, "cuda");
    test::expect_batched_decode_equals_alone(*model, longest_prompt(g), g["weights_dtype"] == "BF16" ? 1e-2 : 1e-5);
  }
}

}  // namespace
}  // namespace hymba
