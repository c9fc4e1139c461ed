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

#include <fstream>
#include <sstream>

#include "io/tokenizer.h"
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
using test::longest_prompt;
using test::read_json;
using test::rel_l2;
using test::incremental_logits;

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

#ifdef HYMBA_HAVE_CUDA
namespace cuda {  // backend/cuda/kernels.cuh (which needs the CUDA headers)
void set_attention_tc_mode(int mode);
}  // namespace cuda
#endif

namespace {

// The repository (models/): the build's source dir unless HYMBA_REPO_DIR
// names another (the device machine).
std::string repo_dir() { return test::env_or("HYMBA_REPO_DIR", HYMBA_REPO_DIR); }

// The shipped model: bf16 weights and bf16 cache with head dims 64/128, so
// the GPU's bf16 paths run (fused GEMVs, the tensor-core prefill attention,
// forced on for the 300-token prompt, the one-query decode attention, the
// fused Mamba step, GPU sampling), against the CPU engine at the bf16
// tolerance ||d||/||ref|| < 1e-2 and identical greedy tokens.
TEST(CudaModel, EmbeddedBf16ModelMatchesCpuEngine) {
  REQUIRE_GPU();
  const std::string dir = repo_dir() + "/models/hymba-pd-7m";
  std::ifstream f(dir + "/heldout_sample.txt");
  ASSERT_TRUE(f.good()) << dir;
  std::stringstream text;
  text << f.rdbuf();
  std::vector<int32_t> ids = Tokenizer::load(dir).encode(text.str(), true);
  ASSERT_GE(ids.size(), 340u);
  ids.resize(300);
  ModelOptions o;
  o.device = "cuda";
  auto gpu = HymbaModel::load(dir, o);
  o.device = "cpu";
  auto cpu = HymbaModel::load(dir, o);
  ASSERT_EQ(gpu->cache_layout().kv_dtype, DType::BF16);
#ifdef HYMBA_HAVE_CUDA
  cuda::set_attention_tc_mode(2);  // tensor cores wherever the shape allows
#endif
  const auto g_all = all_logits(*gpu, ids);
#ifdef HYMBA_HAVE_CUDA
  cuda::set_attention_tc_mode(0);
#endif
  const auto c_all = all_logits(*cpu, ids);
  const double d_prefill = rel_l2(g_all, std::vector<double>(c_all.begin(), c_all.end()));
  std::printf("[embedded-model] prefill logits rel L2 GPU vs CPU %.3e\n", d_prefill);
  EXPECT_LT(d_prefill, 1e-2);
  const std::vector<int32_t> head(ids.begin(), ids.begin() + 48);
  const auto g_inc = incremental_logits(*gpu, head), c_inc = incremental_logits(*cpu, head);
  const double d_decode = rel_l2(g_inc, std::vector<double>(c_inc.begin(), c_inc.end()));
  std::printf("[embedded-model] decode logits rel L2 GPU vs CPU %.3e\n", d_decode);
  EXPECT_LT(d_decode, 1e-2);
  EXPECT_EQ(greedy(*gpu, ids, 24), greedy(*cpu, ids, 24));
}

}  // namespace
}  // namespace hymba
