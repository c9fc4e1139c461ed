#include "io/config.h"

#include <cmath>
#include <fstream>
#include <set>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "util/error.h"

namespace hymba {

using nlohmann::json;

namespace {

// Reads an optional field into `out`, failing with the field's name if the
// JSON type does not fit. JSON null leaves the default in place.
template <typename T>
void read_field(const json& j, const char* name, T& out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return;
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    // JSON has one number type; refuse 64.5 where an integer is meant.
    if (it->is_number_float()) {
      const double d = it->get<double>();
      check(d == std::floor(d), "config.json: field '", name, "' must be an integer (got ", d, ")");
    }
  }
  try {
    out = it->get<T>();
  } catch (const json::exception&) {
    fail("config.json: field '", name, "' has the wrong type (", it->type_name(), ")");
  }
}

// A field that may be absent or null (-> empty), else read like read_field.
template <typename T>
void read_optional(const json& j, const char* name, std::optional<T>& out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) {
    out.reset();
    return;
  }
  T value{};
  read_field(j, name, value);
  out = std::move(value);
}

void require_positive(int64_t v, const char* name) {
  check(v > 0, "config.json: field '", name, "' must be positive (got ", v, ")");
}

}  // namespace

HymbaConfig HymbaConfig::from_json(const json& j) {
  check(j.is_object(), "config.json: expected a JSON object at the top level");
  HymbaConfig c;
  if (auto it = j.find("model_type"); it != j.end() && it->is_string()) {
    check(it->get<std::string>() == "hymba", "config.json: model_type is '", it->get<std::string>(),
          "', expected 'hymba'");
  }
  read_field(j, "vocab_size", c.vocab_size);
  read_field(j, "tie_word_embeddings", c.tie_word_embeddings);
  read_field(j, "hidden_size", c.hidden_size);
  read_field(j, "intermediate_size", c.intermediate_size);
  read_field(j, "num_hidden_layers", c.num_hidden_layers);
  read_field(j, "num_attention_heads", c.num_attention_heads);
  if (auto it = j.find("num_key_value_heads"); it != j.end() && it->is_null()) {
    c.num_key_value_heads = c.num_attention_heads;  // reference: None -> MHA
  } else {
    read_field(j, "num_key_value_heads", c.num_key_value_heads);
  }
  read_field(j, "hidden_act", c.hidden_act);
  read_field(j, "mlp_hidden_act", c.mlp_hidden_act);
  read_field(j, "rms_norm_eps", c.rms_norm_eps);
  read_field(j, "bos_token_id", c.bos_token_id);
  read_field(j, "eos_token_id", c.eos_token_id);
  read_field(j, "pad_token_id", c.pad_token_id);
  read_optional(j, "sliding_window", c.sliding_window);
  read_field(j, "max_position_embeddings", c.max_position_embeddings);
  read_optional(j, "orig_max_position_embeddings", c.orig_max_position_embeddings);
  read_field(j, "num_experts", c.num_experts);
  read_field(j, "num_experts_per_tok", c.num_experts_per_tok);
  read_field(j, "mamba_d_state", c.mamba_d_state);
  read_field(j, "mamba_d_conv", c.mamba_d_conv);
  read_field(j, "mamba_expand", c.mamba_expand);
  if (auto it = j.find("mamba_dt_rank"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      check(it->get<std::string>() == "auto", "config.json: field 'mamba_dt_rank' must be an integer or \"auto\"");
      c.mamba_dt_rank = -1;
    } else {
      read_field(j, "mamba_dt_rank", c.mamba_dt_rank);
    }
  }
  read_field(j, "mamba_conv_bias", c.mamba_conv_bias);
  read_field(j, "mamba_proj_bias", c.mamba_proj_bias);
  read_field(j, "mamba_inner_layernorms", c.mamba_inner_layernorms);
  read_field(j, "kv_reuse_every_i_layer", c.kv_reuse_every_i_layer);
  read_optional(j, "kv_reuse_group", c.kv_reuse_group);
  read_field(j, "kv_weight_reuse", c.kv_weight_reuse);
  read_optional(j, "global_attn_idx", c.global_attn_idx);
  read_field(j, "num_mamba", c.num_mamba);
  read_field(j, "attn_hidden_size", c.attn_hidden_size);
  read_field(j, "kq_head_dim", c.kq_head_dim);
  read_field(j, "v_head_dim", c.v_head_dim);
  if (auto it = j.find("kq_norm"); it != j.end()) {
    if (it->is_null()) c.kq_norm = "none";
    else read_field(j, "kq_norm", c.kq_norm);
  }
  read_field(j, "rope", c.rope);
  read_field(j, "rope_theta", c.rope_theta);
  read_optional(j, "rope_type", c.rope_type);
  read_field(j, "num_memory_tokens", c.num_memory_tokens);
  read_field(j, "memory_tokens_interspersed_every", c.memory_tokens_interspersed_every);
  read_field(j, "layer_type", c.layer_type);
  read_field(j, "torch_dtype", c.torch_dtype);
  c.finalize();
  return c;
}

void HymbaConfig::finalize() {
  require_positive(vocab_size, "vocab_size");
  require_positive(hidden_size, "hidden_size");
  require_positive(intermediate_size, "intermediate_size");
  require_positive(num_hidden_layers, "num_hidden_layers");
  require_positive(num_attention_heads, "num_attention_heads");
  require_positive(num_key_value_heads, "num_key_value_heads");
  require_positive(mamba_d_state, "mamba_d_state");
  require_positive(mamba_d_conv, "mamba_d_conv");
  require_positive(mamba_expand, "mamba_expand");
  require_positive(max_position_embeddings, "max_position_embeddings");
  check(rms_norm_eps > 0, "config.json: field 'rms_norm_eps' must be positive");
  check(num_memory_tokens >= 0, "config.json: field 'num_memory_tokens' must be >= 0");

  // Features of the Hymba family that this engine does not implement.
  check(kq_norm == "none", "config.json: field 'kq_norm' = '", kq_norm,
        "' is not supported (only \"none\")");
  check(num_experts == 1, "config.json: field 'num_experts' = ", num_experts,
        " is not supported (only 1: a plain MLP)");
  check(memory_tokens_interspersed_every == 0,
        "config.json: field 'memory_tokens_interspersed_every' = ", memory_tokens_interspersed_every,
        " is not supported (only 0: meta tokens as a prefix)");
  check(num_mamba == 1, "config.json: field 'num_mamba' = ", num_mamba, " is not supported (only 1)");
  check(!kv_weight_reuse, "config.json: field 'kv_weight_reuse' = true is not supported");
  check(kv_reuse_every_i_layer <= 0, "config.json: field 'kv_reuse_every_i_layer' = ",
        kv_reuse_every_i_layer, " is not supported (use kv_reuse_group)");
  check(hidden_act == "silu", "config.json: field 'hidden_act' = '", hidden_act,
        "' is not supported (only \"silu\")");
  check(mlp_hidden_act == "silu", "config.json: field 'mlp_hidden_act' = '", mlp_hidden_act,
        "' is not supported (only \"silu\")");
  check(mamba_inner_layernorms, "config.json: field 'mamba_inner_layernorms' = false is not supported");
  check(!mamba_proj_bias, "config.json: field 'mamba_proj_bias' = true is not supported");
  if (layer_type.empty()) layer_type.assign(num_hidden_layers, "h");
  check(int(layer_type.size()) == num_hidden_layers, "config.json: field 'layer_type' has ",
        layer_type.size(), " entries but num_hidden_layers is ", num_hidden_layers);
  for (size_t i = 0; i < layer_type.size(); ++i)
    check(layer_type[i] == "h", "config.json: field 'layer_type' entry ", i, " = '", layer_type[i],
          "' is not supported (only hybrid \"h\" layers)");
  if (sliding_window) require_positive(*sliding_window, "sliding_window");

  // Derived dimensions, following the reference's rules.
  attn_dim = attn_hidden_size > 0 ? attn_hidden_size : hidden_size;
  check(attn_dim % num_attention_heads == 0, "config.json: attention width ", attn_dim,
        " is not divisible by num_attention_heads ", num_attention_heads);
  head_dim_qk = kq_head_dim > 0 ? kq_head_dim : attn_dim / num_attention_heads;
  attn_dim = head_dim_qk * num_attention_heads;
  check(num_attention_heads % num_key_value_heads == 0, "config.json: num_attention_heads ",
        num_attention_heads, " is not a multiple of num_key_value_heads ", num_key_value_heads);
  if (rope) check(head_dim_qk % 2 == 0, "config.json: RoPE needs an even q/k head dim (got ", head_dim_qk, ")");
  d_inner = int64_t(mamba_expand) * hidden_size;
  check(d_inner % num_attention_heads == 0, "config.json: mamba d_inner ", d_inner,
        " is not divisible by num_attention_heads ", num_attention_heads);
  // The attention output is averaged with the SSM output, so its width is
  // d_inner; the reference derives the value head dim from that.
  head_dim_v = d_inner / num_attention_heads;
  check(v_head_dim <= 0 || v_head_dim == head_dim_v, "config.json: field 'v_head_dim' = ", v_head_dim,
        " disagrees with mamba_expand*hidden_size/num_attention_heads = ", head_dim_v);
  dt_rank = mamba_dt_rank > 0 ? mamba_dt_rank : (hidden_size + 15) / 16;

  if (rope_type && (*rope_type == "default" || rope_type->empty())) rope_type.reset();
  if (rope_type) {
    check(*rope_type == "ntk", "config.json: field 'rope_type' = '", *rope_type,
          "' is not supported (only \"ntk\" or null)");
    check(orig_max_position_embeddings.has_value() && *orig_max_position_embeddings > 0,
          "config.json: rope_type \"ntk\" needs a positive 'orig_max_position_embeddings'");
  }

  std::set<int> globals;
  if (global_attn_idx) {
    for (int g : *global_attn_idx) {
      check(g >= 0 && g < num_hidden_layers, "config.json: field 'global_attn_idx' names layer ", g,
            " but the model has ", num_hidden_layers, " layers");
      globals.insert(g);
    }
  }
  if (kv_reuse_group) {
    std::set<int> seen;
    for (const auto& group : *kv_reuse_group) {
      check(!group.empty(), "config.json: field 'kv_reuse_group' has an empty group");
      for (size_t k = 0; k < group.size(); ++k) {
        int l = group[k];
        check(l >= 0 && l < num_hidden_layers, "config.json: field 'kv_reuse_group' names layer ", l,
              " but the model has ", num_hidden_layers, " layers");
        check(seen.insert(l).second, "config.json: field 'kv_reuse_group' lists layer ", l, " twice");
        // A consumer reads the producer's cache, so both must keep the same
        // positions: the group must be all-global or all-sliding.
        bool g0 = !sliding_window || globals.count(group[0]);
        bool gl = !sliding_window || globals.count(l);
        check(g0 == gl, "config.json: field 'kv_reuse_group' mixes global and sliding-window layers (",
              group[0], " and ", l, ")");
        if (k > 0)
          check(l > group[0], "config.json: field 'kv_reuse_group': consumer layer ", l,
                " comes before its producer ", group[0]);
      }
    }
  }
}

HymbaConfig HymbaConfig::load(const std::string& path) {
  std::ifstream f(path);
  check(f.good(), "cannot open config file '", path, "'");
  json j;
  try {
    f >> j;
  } catch (const json::exception& e) {
    fail("config file '", path, "' is not valid JSON: ", e.what());
  }
  try {
    return from_json(j);
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
}

json HymbaConfig::to_json() const {
  json j;
  j["architectures"] = {"HymbaForCausalLM"};
  j["attention_dropout"] = 0.0;
  j["attn_hidden_size"] = attn_hidden_size;
  j["attn_implementation"] = "flex";
  j["attn_implementation_new"] = "flex";
  j["auto_map"] = {{"AutoConfig", "configuration_hymba.HymbaConfig"},
                   {"AutoModelForCausalLM", "modeling_hymba.HymbaForCausalLM"}};
  j["bos_token_id"] = bos_token_id;
  j["calc_logits_for_entire_prompt"] = false;
  json conv = json::object();
  for (int i = 0; i < num_hidden_layers; ++i) conv[std::to_string(i)] = d_inner;
  j["conv_dim"] = conv;
  j["eos_token_id"] = eos_token_id;
  j["global_attn_idx"] = global_attn_idx ? json(*global_attn_idx) : json(nullptr);
  j["hidden_act"] = hidden_act;
  j["hidden_size"] = hidden_size;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = intermediate_size;
  j["kq_head_dim"] = kq_head_dim;
  j["kq_norm"] = kq_norm;
  j["kv_reuse_every_i_layer"] = kv_reuse_every_i_layer;
  j["kv_reuse_group"] = kv_reuse_group ? json(*kv_reuse_group) : json(nullptr);
  j["kv_weight_reuse"] = kv_weight_reuse;
  j["layer_type"] = layer_type;
  j["mamba_conv_bias"] = mamba_conv_bias;
  j["mamba_d_conv"] = mamba_d_conv;
  j["mamba_d_state"] = mamba_d_state;
  j["mamba_dt_rank"] = dt_rank;
  j["mamba_expand"] = mamba_expand;
  j["mamba_inner_layernorms"] = mamba_inner_layernorms;
  j["mamba_proj_bias"] = mamba_proj_bias;
  j["max_position_embeddings"] = max_position_embeddings;
  j["memory_tokens_interspersed_every"] = memory_tokens_interspersed_every;
  j["mlp_hidden_act"] = mlp_hidden_act;
  j["model_type"] = "hymba";
  j["num_attention_heads"] = num_attention_heads;
  j["num_experts"] = num_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_key_value_heads"] = num_key_value_heads;
  j["num_mamba"] = num_mamba;
  j["num_memory_tokens"] = num_memory_tokens;
  j["orig_max_position_embeddings"] =
      orig_max_position_embeddings ? json(*orig_max_position_embeddings) : json(nullptr);
  j["output_router_logits"] = false;
  j["pad_token_id"] = pad_token_id;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope"] = rope;
  j["rope_theta"] = rope_theta;
  j["rope_type"] = rope_type ? json(*rope_type) : json(nullptr);
  j["router_aux_loss_coef"] = 0.001;
  j["seq_length"] = max_position_embeddings;
  j["sliding_window"] = sliding_window ? json(*sliding_window) : json(nullptr);
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["torch_dtype"] = torch_dtype;
  j["transformers_version"] = "4.44.0";
  j["use_cache"] = false;
  j["use_mamba_kernels"] = true;
  j["v_head_dim"] = v_head_dim > 0 ? v_head_dim : head_dim_v;
  j["vocab_size"] = vocab_size;
  return j;
}

std::vector<float> HymbaConfig::rope_inv_freq() const {
  const int64_t dim = head_dim_qk;
  double base = rope_theta;
  if (rope_type && *rope_type == "ntk") {
    // Static NTK scaling with factor 2 (hard-coded in the reference), spec 4.5.
    const double factor = 2.0;
    double ratio = factor * double(max_position_embeddings) / double(*orig_max_position_embeddings) -
                   (factor - 1.0);
    base = rope_theta * std::pow(ratio, double(dim) / double(dim - 2));
  }
  // The reference evaluates base ** (arange(0, dim, 2).float() / dim) in fp32.
  std::vector<float> inv(dim / 2);
  for (int64_t i = 0; i < dim / 2; ++i) {
    float e = float(2 * i) / float(dim);
    inv[i] = 1.0f / std::pow(float(base), e);
  }
  return inv;
}

}  // namespace hymba
