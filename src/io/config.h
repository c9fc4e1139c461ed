// HymbaConfig: every field of a Hugging Face Hymba config.json, with the
// reference config class's defaults for absent fields, plus the derived
// dimensions the engine needs. Unknown fields are ignored; values the engine
// cannot run (MoE, interspersed meta tokens, QK-norm, ...) are rejected with
// an error naming the field.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace hymba {

struct HymbaConfig {
  // --- fields as stored in config.json (defaults: the reference HymbaConfig) ---
  int64_t vocab_size = 65536;
  bool tie_word_embeddings = false;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 14336;
  int num_hidden_layers = 32;
  int num_attention_heads = 32;
  int num_key_value_heads = 8;
  std::string hidden_act = "silu";
  std::string mlp_hidden_act = "silu";
  double rms_norm_eps = 1e-6;
  int bos_token_id = 1;
  int eos_token_id = 2;
  int pad_token_id = 0;
  std::optional<int64_t> sliding_window;  // null: every layer is global
  int64_t max_position_embeddings = 262144;
  std::optional<int64_t> orig_max_position_embeddings;
  int num_experts = 16;
  int num_experts_per_tok = 2;
  int mamba_d_state = 16;
  int mamba_d_conv = 4;
  int mamba_expand = 2;
  int64_t mamba_dt_rank = -1;  // "auto" resolves to ceil(hidden_size / 16)
  bool mamba_conv_bias = true;
  bool mamba_proj_bias = false;
  bool mamba_inner_layernorms = true;
  int kv_reuse_every_i_layer = -1;
  std::optional<std::vector<std::vector<int>>> kv_reuse_group;
  bool kv_weight_reuse = false;
  std::optional<std::vector<int>> global_attn_idx;
  int num_mamba = 1;
  int64_t attn_hidden_size = -1;
  int64_t kq_head_dim = -1;
  int64_t v_head_dim = -1;
  std::string kq_norm = "none";
  bool rope = false;
  double rope_theta = 10000.0;
  std::optional<std::string> rope_type;  // null/"default": plain; "ntk": static NTK scaling
  int64_t num_memory_tokens = 0;
  int64_t memory_tokens_interspersed_every = 0;
  std::vector<std::string> layer_type;  // empty: all "h"
  std::string torch_dtype = "float32";

  // --- derived (filled by finalize()) ---
  int64_t attn_dim = 0;     // query width = num_attention_heads * head_dim_qk
  int64_t head_dim_qk = 0;  // q and k head dim
  int64_t head_dim_v = 0;   // v head dim (= d_inner / num_attention_heads)
  int64_t d_inner = 0;      // mamba_expand * hidden_size
  int64_t dt_rank = 0;

  // Parses and validates; throws hymba::Error naming the field on problems.
  static HymbaConfig from_json(const nlohmann::json& j);
  static HymbaConfig load(const std::string& path);
  // Writes every field in the HF key set (used by `hymba init`).
  nlohmann::json to_json() const;

  // Computes derived fields and checks consistency; called by from_json.
  void finalize();

  // RoPE inverse frequencies (head_dim_qk / 2 entries), fp32 like the reference.
  std::vector<float> rope_inv_freq() const;
};

}  // namespace hymba
