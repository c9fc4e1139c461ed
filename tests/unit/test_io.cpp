// Loading: config.json parsing and validation (io/config), the layer plan
// and cache sizes derived from it (model/plan, cache/hybrid_cache), the
// safetensors reader/writer (io/safetensors) and weight binding
// (model/weights). Bad input must give a hymba::Error whose message names
// the problem; expected numbers come from the spec
// (../shared/spec/hymba-model.md) and the reference HymbaConfig, never from
// the code under test.
//
// Uses ../shared (HYMBA_SHARED_DIR): the released Hymba-1.5B config.json.
// Writes its files under HYMBA_TEST_WORK/io_tests/<test name>.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cache/hybrid_cache.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/plan.h"
#include "model/presets.h"
#include "model/weights.h"
#include "test_util.h"
#include "util/error.h"

namespace hymba {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Runs f, which must throw hymba::Error with every one of `parts` in its
// message; reports the message otherwise.
void expect_error(const std::function<void()>& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown (expected one mentioning '" << *parts.begin() << "')";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-hymba exception: " << e.what();
  }
}

// A fresh, empty directory for the current test.
std::string test_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir =
      fs::path(test::work_dir()) / "io_tests" / (std::string(info->test_suite_name()) + "." + info->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  ASSERT_TRUE(f.good()) << path;
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

std::string shared_config_path() { return test::shared_dir() + "/hymba-1.5b/config.json"; }

// A small valid config (no shared files needed), which each error test
// breaks in one place.
json small_config() {
  return json{{"model_type", "hymba"},
              {"vocab_size", 100},
              {"hidden_size", 64},
              {"intermediate_size", 96},
              {"num_hidden_layers", 6},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"num_experts", 1},
              {"num_experts_per_tok", 1},
              {"sliding_window", 16},
              {"global_attn_idx", {0, 5}},
              {"kv_reuse_group", {{1, 2}, {3, 4}}},
              {"num_memory_tokens", 4},
              {"rope", true},
              {"layer_type", {"h", "h", "h", "h", "h", "h"}}};
}

// ------------------------------------------------------------------ config

TEST(IoConfig, SmallConfigParses) {
  // The base of the error tests below must itself be valid.
  const HymbaConfig c = HymbaConfig::from_json(small_config());
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.head_dim_qk, 16);  // 64 / 4 heads
  EXPECT_EQ(c.d_inner, 128);     // expand 2 x 64
  EXPECT_EQ(c.head_dim_v, 32);   // 128 / 4 heads
  EXPECT_EQ(c.dt_rank, 4);       // ceil(64 / 16)
}

TEST(IoConfig, MissingFile) {
  const std::string path = test_dir() + "/config.json";
  expect_error([&] { HymbaConfig::load(path); }, {"cannot open", path});
}

TEST(IoConfig, NotJson) {
  const std::string path = test_dir() + "/config.json";
  write_text(path, "{\"hidden_size\": 64,,, not json");
  expect_error([&] { HymbaConfig::load(path); }, {path, "not valid JSON"});
}

TEST(IoConfig, TopLevelNotAnObject) {
  const std::string path = test_dir() + "/config.json";
  write_text(path, "[1, 2, 3]");
  expect_error([&] { HymbaConfig::load(path); }, {path, "JSON object"});
}

TEST(IoConfig, WrongFieldType) {
  json j = small_config();
  j["hidden_size"] = "big";
  expect_error([&] { HymbaConfig::from_json(j); }, {"'hidden_size'", "wrong type"});
  j = small_config();
  j["rope"] = "yes";
  expect_error([&] { HymbaConfig::from_json(j); }, {"'rope'", "wrong type"});
  j = small_config();
  j["global_attn_idx"] = "0,5";
  expect_error([&] { HymbaConfig::from_json(j); }, {"'global_attn_idx'", "wrong type"});
}

TEST(IoConfig, FractionalIntegerRejected) {
  json j = small_config();
  j["hidden_size"] = 64.5;
  expect_error([&] { HymbaConfig::from_json(j); }, {"'hidden_size'", "integer"});
  j["hidden_size"] = 64.0;  // an integral float is still the integer it spells
  EXPECT_EQ(HymbaConfig::from_json(j).hidden_size, 64);
}

TEST(IoConfig, WrongFieldTypeThroughLoadNamesFileAndField) {
  const std::string path = test_dir() + "/config.json";
  json j = small_config();
  j["hidden_size"] = "big";
  write_text(path, j.dump());
  expect_error([&] { HymbaConfig::load(path); }, {path, "'hidden_size'"});
}

TEST(IoConfig, UnsupportedFeaturesAreRejected) {
  struct Case {
    const char* field;
    json value;
    const char* says;
  };
  const Case cases[] = {
      {"kq_norm", "rms", "'kq_norm'"},
      {"num_experts", 4, "'num_experts'"},
      {"memory_tokens_interspersed_every", 8, "'memory_tokens_interspersed_every'"},
      {"rope_type", "yarn", "'rope_type'"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    json j = small_config();
    j[c.field] = c.value;
    expect_error([&] { HymbaConfig::from_json(j); }, {c.says});
  }
  // The offending value is part of the message too.
  json j = small_config();
  j["rope_type"] = "yarn";
  expect_error([&] { HymbaConfig::from_json(j); }, {"yarn"});
  j = small_config();
  j["num_experts"] = 4;
  expect_error([&] { HymbaConfig::from_json(j); }, {"num_experts", "4"});
}

TEST(IoConfig, LayerTypeMamba) {
  json j = small_config();
  j["layer_type"] = {"h", "h", "h", "m", "h", "h"};
  expect_error([&] { HymbaConfig::from_json(j); }, {"'layer_type'", "'m'"});
}

TEST(IoConfig, KvReuseGroupLayerOutOfRange) {
  json j = small_config();
  j["kv_reuse_group"] = {{1, 2}, {3, 6}};
  expect_error([&] { HymbaConfig::from_json(j); }, {"'kv_reuse_group'", "6"});
  j["kv_reuse_group"] = {{-1, 2}};
  expect_error([&] { HymbaConfig::from_json(j); }, {"'kv_reuse_group'", "-1"});
}

TEST(IoConfig, KvReuseGroupLayerTwice) {
  json j = small_config();
  j["kv_reuse_group"] = {{1, 2}, {2, 3}};
  expect_error([&] { HymbaConfig::from_json(j); }, {"'kv_reuse_group'", "twice"});
}

TEST(IoConfig, KvReuseGroupMixesGlobalAndSliding) {
  // Layer 0 is global, layer 1 sliding: they keep different positions, so
  // one cannot read the other's K/V.
  json j = small_config();
  j["kv_reuse_group"] = {{0, 1}};
  expect_error([&] { HymbaConfig::from_json(j); }, {"'kv_reuse_group'", "global"});
}

TEST(IoConfig, GlobalAttnIdxOutOfRange) {
  json j = small_config();
  j["global_attn_idx"] = {0, 6};
  expect_error([&] { HymbaConfig::from_json(j); }, {"'global_attn_idx'", "6"});
}

TEST(IoConfig, VHeadDimInconsistent) {
  // d_inner / heads = 128 / 4 = 32; a config claiming 64 disagrees.
  json j = small_config();
  j["v_head_dim"] = 64;
  expect_error([&] { HymbaConfig::from_json(j); }, {"'v_head_dim'", "64"});
  j["v_head_dim"] = 32;
  EXPECT_NO_THROW(HymbaConfig::from_json(j));
}

TEST(IoConfig, DefaultsAreTheReferenceHymbaConfig) {
  // The reference default num_experts = 16 (MoE) is not runnable: an empty
  // config must be rejected, naming that field.
  expect_error([] { HymbaConfig::from_json(json::object()); }, {"'num_experts'"});
  // With only num_experts given, every other field takes the reference
  // HymbaConfig default (configuration_hymba.py).
  const HymbaConfig c = HymbaConfig::from_json(json{{"num_experts", 1}});
  EXPECT_EQ(c.vocab_size, 65536);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.max_position_embeddings, 262144);
  EXPECT_EQ(c.mamba_d_state, 16);
  EXPECT_EQ(c.mamba_d_conv, 4);
  EXPECT_EQ(c.mamba_expand, 2);
  EXPECT_EQ(c.dt_rank, 256);  // "auto": ceil(4096 / 16)
  EXPECT_TRUE(c.mamba_conv_bias);
  EXPECT_FALSE(c.rope);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.rope_type.has_value());
  EXPECT_EQ(c.num_memory_tokens, 0);
  EXPECT_FALSE(c.global_attn_idx.has_value());
  EXPECT_FALSE(c.kv_reuse_group.has_value());
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ(c.pad_token_id, 0);
  EXPECT_EQ(c.layer_type, std::vector<std::string>(32, "h"));
  EXPECT_EQ(c.head_dim_qk, 128);  // 4096 / 32
  EXPECT_EQ(c.d_inner, 8192);
  EXPECT_EQ(c.head_dim_v, 256);
}

TEST(IoConfig, DtRankAutoRoundsUp) {
  // ceil, not floor: 1000 / 16 = 62.5 -> 63, given as "auto" or absent.
  json j = small_config();
  j["hidden_size"] = 1000;
  j["num_attention_heads"] = 8;
  j["num_key_value_heads"] = 4;
  j["rope"] = false;  // head dim 125 is odd
  j.erase("mamba_dt_rank");
  EXPECT_EQ(HymbaConfig::from_json(j).dt_rank, 63);
  j["mamba_dt_rank"] = "auto";
  EXPECT_EQ(HymbaConfig::from_json(j).dt_rank, 63);
  j["mamba_dt_rank"] = 7;
  EXPECT_EQ(HymbaConfig::from_json(j).dt_rank, 7);
}

TEST(IoConfig, UnknownFieldsIgnored) {
  json j = small_config();
  j["some_future_option"] = {{"nested", {1, 2, 3}}};
  j["use_cache"] = false;
  j["conv_dim"] = {{"0", 128}};
  j["initializer_range"] = 0.02;
  const HymbaConfig c = HymbaConfig::from_json(j);
  EXPECT_EQ(c.hidden_size, 64);
}

TEST(IoConfig, Released1p5bConfig) {
  // Uses ../shared/hymba-1.5b/config.json; derived dims from spec section 2.
  const HymbaConfig c = HymbaConfig::load(shared_config_path());
  EXPECT_EQ(c.vocab_size, 32001);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.hidden_size, 1600);
  EXPECT_EQ(c.head_dim_qk, 64);
  EXPECT_EQ(c.head_dim_v, 128);
  EXPECT_EQ(c.attn_dim, 1600);
  EXPECT_EQ(c.d_inner, 3200);
  EXPECT_EQ(c.dt_rank, 100);
  EXPECT_EQ(c.num_memory_tokens, 128);
  ASSERT_TRUE(c.sliding_window.has_value());
  EXPECT_EQ(*c.sliding_window, 1024);

  // Spec 4.5: inv_freq[i] = base'^(-2i/64), base' = 10000 * 7^(64/62).
  const std::vector<float> inv = c.rope_inv_freq();
  ASSERT_EQ(inv.size(), 32u);
  const double spec_values[][2] = {
      {0, 1.0}, {1, 0.70426933}, {2, 0.49599528}, {3, 0.34931426}, {31, 1.9050306e-5}};
  for (const auto& [i, v] : spec_values) EXPECT_NEAR(inv[size_t(i)], v, 1e-6 * v) << "inv_freq[" << i << "]";
  const double base = 10000.0 * std::pow(7.0, 64.0 / 62.0);
  EXPECT_NEAR(base, 74534.83031811893, 1e-6);  // the spec's value: the formula above is the spec's
  for (int i = 0; i < 32; ++i) {
    // The reference evaluates the power in fp32: ~1e-7 relative; 1e-6 is ample.
    const double want = std::pow(base, -2.0 * i / 64.0);
    EXPECT_NEAR(inv[size_t(i)], want, 1e-6 * want) << "inv_freq[" << i << "]";
  }
}

TEST(IoConfig, PlainRopeInvFreq) {
  // No rope_type: base = rope_theta, inv_freq[i] = theta^(-2i/dim).
  json j = small_config();
  j["rope_theta"] = 500.0;
  const HymbaConfig c = HymbaConfig::from_json(j);
  const std::vector<float> inv = c.rope_inv_freq();
  ASSERT_EQ(inv.size(), 8u);  // head_dim_qk 16
  for (int i = 0; i < 8; ++i)
    EXPECT_NEAR(inv[i], std::pow(500.0, -2.0 * i / 16.0), 1e-6 * std::pow(500.0, -2.0 * i / 16.0));
}

// ------------------------------------------------------------- plan / cache

TEST(IoPlan, Released1p5bRoles) {
  // Spec section 2, layer roles.
  const HymbaConfig c = HymbaConfig::load(shared_config_path());
  const ModelPlan p = ModelPlan::build(c);
  ASSERT_EQ(p.layers.size(), 32u);
  const std::vector<int> globals = {0, 15, 31};
  const std::vector<int> producers = {1, 3, 5, 7, 9, 11, 13, 16, 19, 21, 23, 25, 27, 29};
  // consumer -> producer
  const std::vector<std::pair<int, int>> consumers = {{2, 1},   {4, 3},   {6, 5},   {8, 7},   {10, 9},
                                                      {12, 11}, {14, 13}, {17, 16}, {18, 16}, {20, 19},
                                                      {22, 21}, {24, 23}, {26, 25}, {28, 27}, {30, 29}};
  ASSERT_EQ(globals.size() + producers.size() + consumers.size(), 32u);
  for (int g : globals) {
    SCOPED_TRACE("layer " + std::to_string(g));
    EXPECT_TRUE(p.layers[g].global);
    EXPECT_TRUE(p.layers[g].owns_kv);
    EXPECT_TRUE(p.layers[g].consumers.empty());
    EXPECT_EQ(p.layers[g].role(), "global");
    EXPECT_EQ(p.layers[g].kv_layer, g);
  }
  for (int l : producers) {
    SCOPED_TRACE("layer " + std::to_string(l));
    EXPECT_FALSE(p.layers[l].global);
    EXPECT_TRUE(p.layers[l].owns_kv);
    EXPECT_EQ(p.layers[l].role(), "producer");
    EXPECT_EQ(p.layers[l].kv_layer, l);
  }
  for (const auto& [l, prod] : consumers) {
    SCOPED_TRACE("layer " + std::to_string(l));
    EXPECT_FALSE(p.layers[l].global);
    EXPECT_FALSE(p.layers[l].owns_kv);
    EXPECT_EQ(p.layers[l].role(), "consumer");
    EXPECT_EQ(p.layers[l].kv_layer, prod);
    EXPECT_EQ(p.layers[l].kv_slot, p.layers[prod].kv_slot);
    const auto& cons = p.layers[prod].consumers;
    EXPECT_NE(std::find(cons.begin(), cons.end(), l), cons.end());
  }
  EXPECT_EQ(p.layers[16].consumers, (std::vector<int>{17, 18}));
  // 17 KV slots, one per owning layer, each slot naming its owner.
  ASSERT_EQ(p.kv_owner.size(), 17u);
  for (size_t s = 0; s < p.kv_owner.size(); ++s) {
    EXPECT_TRUE(p.layers[p.kv_owner[s]].owns_kv);
    EXPECT_EQ(p.layers[p.kv_owner[s]].kv_slot, int(s));
  }
}

TEST(IoCacheLayout, Released1p5bBytesAt8k) {
  // Spec section 7, BF16 K/V: per KV position (5x64 + 5x128) x 2 B = 1920 B.
  const HymbaConfig c = HymbaConfig::load(shared_config_path());
  const CacheLayout l = CacheLayout::build(c, ModelPlan::build(c), DType::BF16);
  const CacheBytes b = l.bytes(8192);
  EXPECT_EQ(b.global_kv, 47923200);   // 3 x 8320 x 1920
  EXPECT_EQ(b.sliding_kv, 30965760);  // 14 x 1152 x 1920
  // fp32 states: SSM 32 x 3200 x 16 x 4 B, conv 3 taps: 32 x 3200 x 3 x 4 B.
  EXPECT_EQ(b.ssm, 6553600);
  EXPECT_EQ(b.conv, 1228800);
  // Past the window only the 3 global layers grow: 3 x 1920 = 5,760 B/token.
  for (int64_t n : {1025, 2000, 8191}) EXPECT_EQ(l.bytes(n + 1).total() - l.bytes(n).total(), 5760) << n;
  // Below the window the sliding layers grow too: 17 x 1920.
  EXPECT_EQ(l.bytes(11).total() - l.bytes(10).total(), 17 * 1920);
}

TEST(IoCacheLayout, AllocatedBytesEqualTheFormula) {
  const HymbaConfig c = HymbaConfig::load(shared_config_path());
  for (DType dt : {DType::BF16, DType::F32}) {
    const CacheLayout l = CacheLayout::build(c, ModelPlan::build(c), dt);
    const int64_t row = 960 * int64_t(dtype_size(dt));
    for (int64_t n : {0, 1, 1000, 1024, 1025, 3000}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " n=" + std::to_string(n));
      const SequenceCache seq(l, n);
      const CacheBytes a = seq.allocated_bytes(), f = l.bytes(n);
      EXPECT_EQ(a.global_kv, f.global_kv);
      EXPECT_EQ(a.sliding_kv, f.sliding_kv);
      EXPECT_EQ(a.ssm, f.ssm);
      EXPECT_EQ(a.conv, f.conv);
      // And both equal the closed formula of spec section 7.
      EXPECT_EQ(f.global_kv, 3 * (128 + n) * row);
      EXPECT_EQ(f.sliding_kv, 14 * (128 + std::min<int64_t>(n, 1024)) * row);
    }
  }
}

// ------------------------------------------------------------- safetensors

struct TestTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

std::vector<uint8_t> bytes_of_f32(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}
std::vector<uint8_t> bytes_of_u16(const std::vector<uint16_t>& v) {
  std::vector<uint8_t> b(v.size() * 2);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// F32, BF16 (1.0, -2.5, 0.15625, 3.0 as raw bits) and F16 (1.0, -2.0, 0.5,
// 65504, 2^-24 as raw bits) tensors.
std::vector<TestTensor> sample_tensors() {
  return {
      {"a.f32", DType::F32, {2, 3}, bytes_of_f32({1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f})},
      {"b.bf16", DType::BF16, {4}, bytes_of_u16({0x3f80, 0xc020, 0x3e20, 0x4040})},
      {"c.f16", DType::F16, {5, 1}, bytes_of_u16({0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001})},
      {"d.empty", DType::F32, {0, 4}, {}},
  };
}

void write_tensors(const std::string& path, const std::vector<TestTensor>& ts) {
  SafetensorsWriter w(path);
  for (const auto& t : ts) w.declare(t.name, t.dtype, t.shape);
  w.begin();
  static const uint8_t none = 0;  // an empty tensor is written as 0 bytes
  for (const auto& t : ts) w.write(t.name, t.bytes.empty() ? &none : t.bytes.data(), t.bytes.size());
  w.finish();
}

void expect_tensors(const SafetensorsCheckpoint& ck, const std::vector<TestTensor>& ts) {
  ASSERT_EQ(ck.tensors().size(), ts.size());
  size_t total = 0;
  for (const auto& t : ts) {
    SCOPED_TRACE(t.name);
    ASSERT_TRUE(ck.has(t.name));
    const TensorView& v = ck.get(t.name);
    EXPECT_EQ(v.dtype, t.dtype);
    EXPECT_EQ(v.shape, t.shape);
    if (!t.bytes.empty()) {
      ASSERT_NE(v.data, nullptr);
      EXPECT_EQ(std::memcmp(v.data, t.bytes.data(), t.bytes.size()), 0);
    }
    total += t.bytes.size();
  }
  EXPECT_EQ(ck.total_bytes(), total);
}

TEST(IoSafetensors, RoundTrip) {
  const std::string dir = test_dir();
  write_tensors(dir + "/model.safetensors", sample_tensors());
  expect_tensors(SafetensorsCheckpoint::open_file(dir + "/model.safetensors"), sample_tensors());
  expect_tensors(SafetensorsCheckpoint::open_dir(dir), sample_tensors());
  // Values as the checkpoint's element types mean them.
  const auto ck = SafetensorsCheckpoint::open_dir(dir);
  const auto* bf = static_cast<const uint16_t*>(ck.get("b.bf16").data);
  std::vector<float> f(4);
  to_f32(bf, DType::BF16, 4, f.data());
  EXPECT_EQ(f, (std::vector<float>{1.0f, -2.5f, 0.15625f, 3.0f}));
  std::vector<float> h(5);
  to_f32(ck.get("c.f16").data, DType::F16, 5, h.data());
  EXPECT_EQ(h, (std::vector<float>{1.0f, -2.0f, 0.5f, 65504.0f, std::ldexp(1.0f, -24)}));
}

TEST(IoSafetensors, HeaderIsStandard) {
  // The file layout itself (u64 little-endian header length, JSON header
  // with dtype/shape/data_offsets), read here without the engine's reader,
  // so files it writes open in other tools.
  const std::string path = test_dir() + "/model.safetensors";
  write_tensors(path, sample_tensors());
  std::ifstream f(path, std::ios::binary);
  std::vector<uint8_t> all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  ASSERT_GE(all.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | all[size_t(i)];
  ASSERT_LE(8 + n, all.size());
  const json h = json::parse(all.begin() + 8, all.begin() + 8 + std::ptrdiff_t(n));
  EXPECT_EQ(h["a.f32"]["dtype"], "F32");
  EXPECT_EQ(h["b.bf16"]["dtype"], "BF16");
  EXPECT_EQ(h["c.f16"]["dtype"], "F16");
  EXPECT_EQ(h["a.f32"]["shape"], json({2, 3}));
  const auto off = h["c.f16"]["data_offsets"].get<std::vector<uint64_t>>();
  ASSERT_EQ(off.size(), 2u);
  EXPECT_EQ(off[1] - off[0], 10u);
  EXPECT_EQ(std::memcmp(all.data() + 8 + n + off[0], sample_tensors()[2].bytes.data(), 10), 0);
  EXPECT_EQ(all.size(), 8 + n + 24 + 8 + 10);
}

TEST(IoSafetensors, ShardedIndex) {
  const std::string dir = test_dir();
  auto ts = sample_tensors();
  write_tensors(dir + "/model-00001-of-00002.safetensors", {ts[0], ts[1]});
  write_tensors(dir + "/model-00002-of-00002.safetensors", {ts[2], ts[3]});
  json idx = {{"metadata", {{"total_size", 58}}},
              {"weight_map",
               {{"a.f32", "model-00001-of-00002.safetensors"},
                {"b.bf16", "model-00001-of-00002.safetensors"},
                {"c.f16", "model-00002-of-00002.safetensors"},
                {"d.empty", "model-00002-of-00002.safetensors"}}}};
  write_text(dir + "/model.safetensors.index.json", idx.dump());
  expect_tensors(SafetensorsCheckpoint::open_dir(dir), ts);
}

// A valid file's bytes, for corrupting by hand.
std::vector<uint8_t> header_file(const std::string& header, size_t data_bytes) {
  std::vector<uint8_t> b(8 + header.size() + data_bytes, 0);
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) b[size_t(i)] = uint8_t(n >> (8 * i));
  std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}

TEST(IoSafetensors, FileShorterThan8Bytes) {
  const std::string path = test_dir() + "/model.safetensors";
  write_bytes(path, {1, 2, 3});
  expect_error([&] { SafetensorsCheckpoint::open_file(path); }, {path, "too short"});
}

TEST(IoSafetensors, MissingFile) {
  const std::string dir = test_dir();
  expect_error([&] { SafetensorsCheckpoint::open_file(dir + "/nope.safetensors"); },
               {dir + "/nope.safetensors"});
  expect_error([&] { SafetensorsCheckpoint::open_dir(dir); }, {dir, "model.safetensors"});
}

TEST(IoSafetensors, HeaderLengthPastTheEnd) {
  const std::string path = test_dir() + "/model.safetensors";
  auto b = header_file("{}", 0);
  b[0] = 200;  // claims a 200-byte header in a 10-byte file
  write_bytes(path, b);
  expect_error([&] { SafetensorsCheckpoint::open_file(path); }, {path, "header length", "past the end"});
}

TEST(IoSafetensors, HeaderNotJson) {
  const std::string path = test_dir() + "/model.safetensors";
  write_bytes(path, header_file("{\"a\": {\"dtype\": \"F32\",", 16));
  expect_error([&] { SafetensorsCheckpoint::open_file(path); }, {path, "not valid JSON"});
}

TEST(IoSafetensors, TruncatedData) {
  // A valid file cut short: the last tensor's data_offsets run past the end.
  const std::string path = test_dir() + "/model.safetensors";
  write_tensors(path, sample_tensors());
  fs::resize_file(path, fs::file_size(path) - 3);
  expect_error([&] { SafetensorsCheckpoint::open_file(path); },
               {path, "'c.f16'", "data_offsets", "truncated"});
}

TEST(IoSafetensors, UnsupportedDtype) {
  const std::string path = test_dir() + "/model.safetensors";
  write_bytes(path, header_file(R"({"q": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}})", 4));
  expect_error([&] { SafetensorsCheckpoint::open_file(path); }, {path, "'q'", "I8"});
}

TEST(IoSafetensors, ByteCountDoesNotMatchShape) {
  // [2, 2] F32 needs 16 bytes; the offsets give 12.
  const std::string path = test_dir() + "/model.safetensors";
  write_bytes(path, header_file(R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})", 16));
  expect_error([&] { SafetensorsCheckpoint::open_file(path); }, {path, "'w'", "12", "16"});
}

TEST(IoSafetensors, ShardMissing) {
  const std::string dir = test_dir();
  auto ts = sample_tensors();
  write_tensors(dir + "/model-00001-of-00002.safetensors", {ts[0]});
  json idx = {
      {"weight_map",
       {{"a.f32", "model-00001-of-00002.safetensors"}, {"c.f16", "model-00002-of-00002.safetensors"}}}};
  write_text(dir + "/model.safetensors.index.json", idx.dump());
  expect_error([&] { SafetensorsCheckpoint::open_dir(dir); }, {"model-00002-of-00002.safetensors"});
}

TEST(IoSafetensors, IndexNamesTensorTheShardLacks) {
  const std::string dir = test_dir();
  auto ts = sample_tensors();
  write_tensors(dir + "/model-00001-of-00001.safetensors", {ts[0], ts[1]});
  json idx = {{"weight_map",
               {{"a.f32", "model-00001-of-00001.safetensors"},
                {"b.bf16", "model-00001-of-00001.safetensors"},
                {"ghost.weight", "model-00001-of-00001.safetensors"}}}};
  write_text(dir + "/model.safetensors.index.json", idx.dump());
  expect_error([&] { SafetensorsCheckpoint::open_dir(dir); },
               {"'ghost.weight'", "model-00001-of-00001.safetensors"});
}

TEST(IoSafetensors, GetUnknownTensorNamesIt) {
  const std::string dir = test_dir();
  write_tensors(dir + "/model.safetensors", sample_tensors());
  const auto ck = SafetensorsCheckpoint::open_dir(dir);
  expect_error([&] { ck.get("no.such.tensor"); }, {"'no.such.tensor'"});
}

// ----------------------------------------------------------------- weights

// A small model with every layer role: 6 layers, globals 0 and 5, groups
// [1,2] and [3,4] (1 and 3 produce, 2 and 4 consume).
HymbaConfig small_model_config() { return HymbaConfig::from_json(small_config()); }

// Rewrites dir/model.safetensors through `edit`, which may drop tensors
// (return false), or change their shape or bytes.
void rewrite_checkpoint(const std::string& src_dir, const std::string& dst_dir,
                        const std::function<bool(TestTensor&)>& edit) {
  const auto ck = SafetensorsCheckpoint::open_dir(src_dir);
  std::vector<TestTensor> out;
  for (const auto& [name, v] : ck.tensors()) {
    TestTensor t{name, v.dtype, v.shape, {}};
    const auto* p = static_cast<const uint8_t*>(v.data);
    t.bytes.assign(p, p + size_t(v.numel()) * dtype_size(v.dtype));
    if (edit(t)) out.push_back(std::move(t));
  }
  fs::create_directories(dst_dir);
  write_tensors(dst_dir + "/model.safetensors", out);
}

class IoWeights : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test_dir();
    cfg_ = small_model_config();
    plan_ = ModelPlan::build(cfg_);
    write_random_checkpoint(cfg_, DType::BF16, 7, dir_ + "/good");
  }
  ModelWeights bind(const std::string& sub) {
    const auto ck = SafetensorsCheckpoint::open_dir(dir_ + "/" + sub);
    return ModelWeights::bind(ck, cfg_, plan_);
  }
  std::string dir_;
  HymbaConfig cfg_;
  ModelPlan plan_;
};

TEST_F(IoWeights, GoodCheckpointBinds) {
  const auto ck = SafetensorsCheckpoint::open_dir(dir_ + "/good");
  const ModelWeights w = ModelWeights::bind(ck, cfg_, plan_);
  ASSERT_EQ(w.layers.size(), 6u);
  EXPECT_EQ(w.embed.rows, 100);
  EXPECT_EQ(w.embed.cols, 64);
  EXPECT_EQ(w.embed.dtype, DType::BF16);
  // in_proj rows (spec section 3): q 64 + (k 2x16 + v 2x32 for K/V owners)
  // + x 128 + z 128.
  EXPECT_EQ(w.layers[1].in_proj.rows, 64 + 96 + 256);  // producer
  EXPECT_EQ(w.layers[2].in_proj.rows, 64 + 256);       // consumer
  EXPECT_EQ(w.layers[0].in_proj.rows, 64 + 96 + 256);  // global
  EXPECT_EQ(w.memory_tokens.size(), 4u * 64u);
  // A = -exp(A_log) with A_log = log(1..16) (bf16-rounded): A ~ -(s+1).
  for (int s = 0; s < 16; ++s) EXPECT_NEAR(w.layers[3].A[size_t(s)], -(s + 1.0), 0.01 * (s + 1.0)) << s;
}

TEST_F(IoWeights, MissingTensor) {
  rewrite_checkpoint(dir_ + "/good", dir_ + "/missing",
                     [](TestTensor& t) { return t.name != "model.layers.3.mamba.D.0"; });
  expect_error([&] { bind("missing"); }, {"missing", "'model.layers.3.mamba.D.0'"});
}

TEST_F(IoWeights, WrongShape) {
  // The consumer layer 2 given a producer's in_proj (with K/V rows).
  rewrite_checkpoint(dir_ + "/good", dir_ + "/shape", [](TestTensor& t) {
    if (t.name == "model.layers.2.mamba.in_proj.weight") {
      t.shape = {416, 64};
      t.bytes.resize(416 * 64 * 2, 0);
    }
    return true;
  });
  expect_error([&] { bind("shape"); }, {"'model.layers.2.mamba.in_proj.weight'", "[416, 64]", "[320, 64]"});
}

TEST_F(IoWeights, TransposedMatrix) {
  rewrite_checkpoint(dir_ + "/good", dir_ + "/transposed", [](TestTensor& t) {
    if (t.name == "model.layers.4.moe.experts.0.down_proj.weight") t.shape = {96, 64};
    return true;
  });
  expect_error([&] { bind("transposed"); }, {"'model.layers.4.moe.experts.0.down_proj.weight'", "[96, 64]"});
}

TEST_F(IoWeights, NonFiniteNormWeight) {
  for (uint16_t bad : {uint16_t(0x7fc0) /* NaN */, uint16_t(0x7f80) /* +inf */}) {
    SCOPED_TRACE(bad);
    rewrite_checkpoint(dir_ + "/good", dir_ + "/nonfinite", [bad](TestTensor& t) {
      if (t.name == "model.layers.1.pre_moe_layernorm.weight") std::memcpy(t.bytes.data() + 2 * 17, &bad, 2);
      return true;
    });
    expect_error([&] { bind("nonfinite"); }, {"'model.layers.1.pre_moe_layernorm.weight'", "non-finite"});
  }
}

}  // namespace
}  // namespace hymba
