#include "model/presets.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/plan.h"
#include "model/weights.h"
#include "util/error.h"

namespace hymba {

namespace {

// Fields every preset shares with the released model.
HymbaConfig family_base() {
  HymbaConfig c;
  c.vocab_size = 32001;  // Llama-2 tokenizer + [PAD]
  c.tie_word_embeddings = true;
  c.num_experts = 1;
  c.num_experts_per_tok = 1;
  c.mamba_d_state = 16;
  c.mamba_d_conv = 4;
  c.mamba_expand = 2;
  c.rope = true;
  c.rope_type = "ntk";
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 8192;
  c.orig_max_position_embeddings = 2048;
  c.kq_norm = "none";
  c.torch_dtype = "bfloat16";
  return c;
}

// KV-sharing groups over each run of consecutive sliding layers: pairs, and
// one group of three at the start of an odd run (as 16-17-18 in the 1.5B).
std::vector<std::vector<int>> pair_groups(int layers, const std::vector<int>& globals) {
  std::vector<std::vector<int>> groups;
  std::vector<int> run;
  auto flush = [&] {
    size_t i = 0;
    if (run.size() >= 3 && run.size() % 2 == 1) {
      groups.push_back({run[0], run[1], run[2]});
      i = 3;
    }
    for (; i + 1 < run.size(); i += 2) groups.push_back({run[i], run[i + 1]});
    run.clear();
  };
  for (int l = 0; l < layers; ++l) {
    if (std::find(globals.begin(), globals.end(), l) != globals.end()) flush();
    else run.push_back(l);
  }
  flush();
  return groups;
}

}  // namespace

std::vector<std::string> preset_names() { return {"tiny", "125m", "350m", "1.5b"}; }

HymbaConfig preset_config(const std::string& name) {
  HymbaConfig c = family_base();
  if (name == "1.5b") {
    c.hidden_size = 1600;
    c.intermediate_size = 5504;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 25;
    c.num_key_value_heads = 5;
    c.v_head_dim = 128;
    c.mamba_dt_rank = 100;
    c.num_memory_tokens = 128;
    c.sliding_window = 1024;
    c.global_attn_idx = std::vector<int>{0, 15, 31};
  } else if (name == "350m") {
    c.hidden_size = 1024;
    c.intermediate_size = 2816;
    c.num_hidden_layers = 24;
    c.num_attention_heads = 16;
    c.num_key_value_heads = 4;
    c.num_memory_tokens = 128;
    c.sliding_window = 1024;
    c.global_attn_idx = std::vector<int>{0, 12, 23};
  } else if (name == "125m") {
    c.hidden_size = 768;
    c.intermediate_size = 2048;
    c.num_hidden_layers = 12;
    c.num_attention_heads = 12;
    c.num_key_value_heads = 4;
    c.num_memory_tokens = 128;
    c.sliding_window = 1024;
    c.global_attn_idx = std::vector<int>{0, 6, 11};
  } else if (name == "tiny") {
    c.hidden_size = 128;
    c.intermediate_size = 352;
    c.num_hidden_layers = 6;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.num_memory_tokens = 16;
    c.sliding_window = 64;
    c.global_attn_idx = std::vector<int>{0, 3, 5};
    c.torch_dtype = "float32";
  } else {
    fail("unknown preset '", name, "' (expected tiny, 125m, 350m or 1.5b)");
  }
  c.layer_type.assign(c.num_hidden_layers, "h");
  c.kv_reuse_group = pair_groups(c.num_hidden_layers, *c.global_attn_idx);
  if (c.mamba_dt_rank < 0) c.mamba_dt_rank = (c.hidden_size + 15) / 16;
  c.finalize();
  return c;
}

namespace {

// Counter-based generator: value i of stream `seed` depends only on (seed, i),
// so tensors can be filled in parallel and reproducibly.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// Uniform in [-1, 1) times sqrt(3): unit variance, cheap enough for 1.5B values.
inline float unit_noise(uint64_t seed, uint64_t i) {
  const uint64_t r = mix64(seed ^ mix64(i));
  return (float(r >> 40) * (1.0f / 8388608.0f) - 1.0f) * 1.7320508f;
}

enum class Init { Normal, Ones, ALog, DtBias };

struct TensorInit {
  Init kind;
  float scale;
};

TensorInit init_for(const std::string& name) {
  auto ends = [&](const char* s) {
    const std::string suf(s);
    return name.size() >= suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0;
  };
  if (ends("layernorm.weight") || ends("_layernorm.weight")) return {Init::Ones, 0};
  if (ends("mamba.D.0")) return {Init::Ones, 0};
  if (ends("mamba.A_log.0")) return {Init::ALog, 0};
  if (ends("dt_proj.0.bias")) return {Init::DtBias, 0};
  if (ends("conv1d.bias")) return {Init::Normal, 0.0f};
  if (name == "model.memory_tokens") return {Init::Normal, 1.0f};
  if (ends("conv1d.weight")) return {Init::Normal, 0.2f};
  return {Init::Normal, 0.02f};
}

}  // namespace

void write_config(const HymbaConfig& config, DType dtype, const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  check(!ec && fs::is_directory(dir), "cannot create output directory '", dir, "'");
  HymbaConfig c = config;
  c.torch_dtype = dtype == DType::F32 ? "float32" : (dtype == DType::BF16 ? "bfloat16" : "float16");
  std::ofstream f(fs::path(dir) / "config.json");
  f << c.to_json().dump(2) << "\n";
  check(f.good(), "cannot write '", (fs::path(dir) / "config.json").string(), "'");
}

void write_random_checkpoint(const HymbaConfig& c, DType dtype, uint64_t seed, const std::string& dir) {
  namespace fs = std::filesystem;
  write_config(c, dtype, dir);
  const ModelPlan plan = ModelPlan::build(c);
  const auto layout = checkpoint_layout(c, plan);
  SafetensorsWriter w((fs::path(dir) / "model.safetensors").string());
  for (const auto& t : layout) w.declare(t.name, dtype, t.shape);
  w.begin();
  constexpr size_t kBlock = size_t(1) << 20;  // values per write
  std::vector<float> f32(kBlock);
  std::vector<uint8_t> out(kBlock * 4);
  uint64_t tensor_seed = seed;
  for (const auto& t : layout) {
    tensor_seed = mix64(tensor_seed + 1);
    size_t numel = 1;
    for (int64_t d : t.shape) numel *= size_t(d);
    const TensorInit ini = init_for(t.name);
    const size_t inner = t.shape.size() > 1 ? size_t(t.shape.back()) : numel;
    for (size_t b0 = 0; b0 < numel; b0 += kBlock) {
      const size_t nb = std::min(kBlock, numel - b0);
#pragma omp parallel for schedule(static)
      for (size_t j = 0; j < nb; ++j) {
        const size_t i = b0 + j;
        float v = 0.0f;
        switch (ini.kind) {
          case Init::Normal: v = ini.scale * unit_noise(tensor_seed, i); break;
          case Init::Ones: v = 1.0f; break;
          case Init::ALog: v = std::log(float(i % inner + 1)); break;  // A = -(1..d_state)
          case Init::DtBias: {
            // Inverse softplus of a log-uniform dt in [1e-3, 1e-1] (Mamba's init).
            const float u01 = 0.5f + unit_noise(tensor_seed, i) / (2.0f * 1.7320508f);
            const float dt = std::exp(std::log(1e-3f) + u01 * (std::log(1e-1f) - std::log(1e-3f)));
            v = dt + std::log(-std::expm1(-dt));
            break;
          }
        }
        f32[j] = v;
      }
      from_f32(f32.data(), nb, dtype, out.data());
      w.write(t.name, out.data(), nb * dtype_size(dtype));
    }
  }
  w.finish();
}

}  // namespace hymba
