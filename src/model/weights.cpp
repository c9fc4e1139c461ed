#include "model/weights.h"

#include <cmath>

#include "util/error.h"

namespace hymba {

namespace {

std::string layer_name(int i, const char* rest) { return "model.layers." + std::to_string(i) + "." + rest; }

int64_t in_proj_rows(const HymbaConfig& c, const LayerPlan& l) {
  int64_t rows = c.attn_dim + 2 * c.d_inner;
  if (l.owns_kv) rows += int64_t(c.num_key_value_heads) * (c.head_dim_qk + c.head_dim_v);
  return rows;
}

}  // namespace

std::vector<TensorSpec> checkpoint_layout(const HymbaConfig& c, const ModelPlan& plan) {
  const int64_t D = c.hidden_size, Di = c.d_inner, N = c.mamba_d_state, R = c.dt_rank;
  std::vector<TensorSpec> t;
  t.push_back({"model.embed_tokens.weight", {c.vocab_size, D}});
  if (c.num_memory_tokens > 0) t.push_back({"model.memory_tokens", {c.num_memory_tokens, D}});
  for (const LayerPlan& l : plan.layers) {
    const int i = l.index;
    t.push_back({layer_name(i, "input_layernorm.weight"), {D}});
    t.push_back({layer_name(i, "mamba.in_proj.weight"), {in_proj_rows(c, l), D}});
    t.push_back({layer_name(i, "mamba.conv1d.weight"), {Di, 1, c.mamba_d_conv}});
    if (c.mamba_conv_bias) t.push_back({layer_name(i, "mamba.conv1d.bias"), {Di}});
    t.push_back({layer_name(i, "mamba.x_proj.0.weight"), {R + 2 * N, Di}});
    t.push_back({layer_name(i, "mamba.dt_proj.0.weight"), {Di, R}});
    t.push_back({layer_name(i, "mamba.dt_proj.0.bias"), {Di}});
    t.push_back({layer_name(i, "mamba.A_log.0"), {Di, N}});
    t.push_back({layer_name(i, "mamba.D.0"), {Di}});
    t.push_back({layer_name(i, "mamba.dt_layernorm.weight"), {R}});
    t.push_back({layer_name(i, "mamba.B_layernorm.weight"), {N}});
    t.push_back({layer_name(i, "mamba.C_layernorm.weight"), {N}});
    t.push_back({layer_name(i, "mamba.pre_avg_layernorm1.weight"), {Di}});
    t.push_back({layer_name(i, "mamba.pre_avg_layernorm2.weight"), {Di}});
    t.push_back({layer_name(i, "mamba.out_proj.weight"), {D, Di}});
    t.push_back({layer_name(i, "pre_moe_layernorm.weight"), {D}});
    t.push_back({layer_name(i, "moe.experts.0.gate_proj.weight"), {c.intermediate_size, D}});
    t.push_back({layer_name(i, "moe.experts.0.up_proj.weight"), {c.intermediate_size, D}});
    t.push_back({layer_name(i, "moe.experts.0.down_proj.weight"), {D, c.intermediate_size}});
  }
  t.push_back({"model.final_layernorm.weight", {D}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, D}});
  return t;
}

int64_t parameter_count(const HymbaConfig& c, const ModelPlan& plan) {
  int64_t n = 0;
  for (const auto& t : checkpoint_layout(c, plan)) {
    int64_t k = 1;
    for (int64_t d : t.shape) k *= d;
    n += k;
  }
  return n;
}

ModelWeights ModelWeights::bind(const SafetensorsCheckpoint& ck, const HymbaConfig& c, const ModelPlan& plan) {
  std::map<std::string, std::vector<int64_t>> expected;
  for (const auto& t : checkpoint_layout(c, plan)) expected[t.name] = t.shape;

  auto tensor = [&](const std::string& name) -> const TensorView& {
    check(ck.has(name), "checkpoint is missing tensor '", name, "'");
    const TensorView& t = ck.get(name);
    const auto& shape = expected.at(name);
    check(t.shape == shape, "tensor '", name, "' has shape ", t.shape_str(), ", expected ",
          TensorView{name, nullptr, t.dtype, shape}.shape_str(), " for this config");
    return t;
  };
  auto matrix = [&](const std::string& name) {
    const TensorView& t = tensor(name);
    return MatrixView{t.data, t.dtype, t.shape[0], t.numel() / t.shape[0]};
  };
  auto vec = [&](const std::string& name) {
    const TensorView& t = tensor(name);
    ParamVector v;
    v.host.resize(size_t(t.numel()));
    to_f32(t.data, t.dtype, v.host.size(), v.host.data());
    for (float x : v.host) check(std::isfinite(x), "tensor '", name, "' contains a non-finite value");
    return v;
  };

  ModelWeights w;
  w.file_bytes = ck.total_bytes();
  w.embed = matrix("model.embed_tokens.weight");
  w.matrix_dtype = w.embed.dtype;
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
    if (ck.has("lm_head.weight")) {
      // Tied checkpoints normally omit it; a stored copy must at least fit.
      const TensorView& t = ck.get("lm_head.weight");
      check(t.shape == std::vector<int64_t>{c.vocab_size, c.hidden_size}, "tensor 'lm_head.weight' has shape ",
            t.shape_str(), " but embeddings are tied and need [", c.vocab_size, ", ", c.hidden_size, "]");
    }
  } else {
    w.lm_head = matrix("lm_head.weight");
  }
  if (c.num_memory_tokens > 0) w.memory_tokens = vec("model.memory_tokens");
  w.final_norm = vec("model.final_layernorm.weight");

  for (const LayerPlan& l : plan.layers) {
    const int i = l.index;
    LayerWeights lw;
    lw.input_norm = vec(layer_name(i, "input_layernorm.weight"));
    lw.in_proj = matrix(layer_name(i, "mamba.in_proj.weight"));
    {
      const ParamVector taps = vec(layer_name(i, "mamba.conv1d.weight"));  // [d_inner, d_conv]
      const int64_t K = c.mamba_d_conv, Di = c.d_inner;
      lw.conv_weight.host.resize(taps.size());
      for (int64_t ch = 0; ch < Di; ++ch)
        for (int64_t k = 0; k < K; ++k) lw.conv_weight.host[size_t(k * Di + ch)] = taps[size_t(ch * K + k)];
    }
    lw.conv_bias = c.mamba_conv_bias ? vec(layer_name(i, "mamba.conv1d.bias"))
                                     : ParamVector{std::vector<float>(size_t(c.d_inner), 0.0f)};
    lw.x_proj = matrix(layer_name(i, "mamba.x_proj.0.weight"));
    lw.dt_proj = matrix(layer_name(i, "mamba.dt_proj.0.weight"));
    lw.dt_bias = vec(layer_name(i, "mamba.dt_proj.0.bias"));
    lw.A = vec(layer_name(i, "mamba.A_log.0"));
    for (float& a : lw.A.host) a = -std::exp(a);
    lw.D = vec(layer_name(i, "mamba.D.0"));
    lw.dt_norm = vec(layer_name(i, "mamba.dt_layernorm.weight"));
    lw.B_norm = vec(layer_name(i, "mamba.B_layernorm.weight"));
    lw.C_norm = vec(layer_name(i, "mamba.C_layernorm.weight"));
    lw.attn_out_norm = vec(layer_name(i, "mamba.pre_avg_layernorm1.weight"));
    lw.ssm_out_norm = vec(layer_name(i, "mamba.pre_avg_layernorm2.weight"));
    lw.out_proj = matrix(layer_name(i, "mamba.out_proj.weight"));
    lw.mlp_norm = vec(layer_name(i, "pre_moe_layernorm.weight"));
    lw.gate_proj = matrix(layer_name(i, "moe.experts.0.gate_proj.weight"));
    lw.up_proj = matrix(layer_name(i, "moe.experts.0.up_proj.weight"));
    lw.down_proj = matrix(layer_name(i, "moe.experts.0.down_proj.weight"));
    w.layers.push_back(std::move(lw));
  }
  return w;
}

void ModelWeights::make_resident(Backend& be, const std::function<void(double)>& progress) {
  auto bytes_of = [](const MatrixView& m) { return size_t(m.rows * m.cols) * dtype_size(m.dtype); };
  auto matrix = [&](MatrixView& m) { m.data = be.resident(m.data, bytes_of(m)); };
  auto vec = [&](ParamVector& v) {
    if (v.host.empty()) return;
    const void* p = be.resident(v.host.data(), v.size() * sizeof(float));
    // Host-memory backends hand back the vector itself: keep reading it
    // through host (stays right if the weights are moved).
    v.device = p == v.host.data() ? nullptr : static_cast<const float*>(p);
  };
  const bool tied = lm_head.data == embed.data;
  matrix(embed);
  if (tied) lm_head = embed;  // one copy of a tied table
  else matrix(lm_head);
  vec(memory_tokens);
  vec(final_norm);
  for (size_t i = 0; i < layers.size(); ++i) {
    LayerWeights& l = layers[i];
    if (progress) progress(double(i) / double(layers.size()));
    for (MatrixView* m : {&l.in_proj, &l.x_proj, &l.dt_proj, &l.out_proj, &l.down_proj}) matrix(*m);
    {  // gate and up back to back: a backend may run the two products as one
      const void* hosts[2] = {l.gate_proj.data, l.up_proj.data};
      const size_t bytes[2] = {bytes_of(l.gate_proj), bytes_of(l.up_proj)};
      const void* out[2] = {nullptr, nullptr};
      be.resident_adjacent(hosts, bytes, 2, out);
      l.gate_proj.data = out[0];
      l.up_proj.data = out[1];
    }
    for (ParamVector* v : {&l.input_norm, &l.conv_weight, &l.conv_bias, &l.dt_norm, &l.B_norm, &l.C_norm, &l.dt_bias,
                           &l.A, &l.D, &l.attn_out_norm, &l.ssm_out_norm, &l.mlp_norm})
      vec(*v);
  }
  if (progress) progress(1.0);
}

}  // namespace hymba
