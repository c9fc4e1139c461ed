// The model's weights as views into the memory-mapped checkpoint. Large
// matrices stay in the file's dtype; small per-channel vectors (norm scales,
// biases, conv taps, A, D) are converted to fp32 once at load. After
// make_resident() every pointer refers to the backend's memory (for the CPU:
// the same mapping, nothing copied).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/ops.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/plan.h"

namespace hymba {

// A small fp32 parameter vector: its values on the host, and the copy the
// backend computes with once the weights are resident.
struct ParamVector {
  std::vector<float> host;
  const float* device = nullptr;
  const float* data() const { return device ? device : host.data(); }
  size_t size() const { return host.size(); }
  float operator[](size_t i) const { return host[i]; }
};

struct LayerWeights {
  ParamVector input_norm;      // [D]
  MatrixView in_proj;                 // [q + (k + v if owns_kv) + 2*d_inner, D]
  ParamVector conv_weight;     // [d_conv, d_inner] (tap-major, see causal_conv_silu)
  ParamVector conv_bias;       // [d_inner] (zeros when mamba_conv_bias is false)
  MatrixView x_proj;                  // [dt_rank + 2*d_state, d_inner]
  ParamVector dt_norm;         // [dt_rank]
  ParamVector B_norm, C_norm;  // [d_state]
  MatrixView dt_proj;                 // [d_inner, dt_rank]
  ParamVector dt_bias;         // [d_inner]
  ParamVector A;               // [d_inner, d_state] = -exp(A_log)
  ParamVector D;               // [d_inner]
  ParamVector attn_out_norm;   // pre_avg_layernorm1 [d_inner]
  ParamVector ssm_out_norm;    // pre_avg_layernorm2 [d_inner]
  MatrixView out_proj;                // [D, d_inner]
  ParamVector mlp_norm;        // pre_moe_layernorm [D]
  MatrixView gate_proj, up_proj;      // [I, D]
  MatrixView down_proj;               // [D, I]
};

struct ModelWeights {
  MatrixView embed;                   // [vocab, D]
  MatrixView lm_head;                 // [vocab, D] (= embed when tied)
  ParamVector memory_tokens;   // [M, D]
  ParamVector final_norm;      // [D]
  std::vector<LayerWeights> layers;
  DType matrix_dtype = DType::F32;    // dtype of the large matrices (embed)
  size_t file_bytes = 0;              // bytes of tensor data in the checkpoint

  // Checks every tensor's presence, dtype and shape against the config and
  // plan; errors name the tensor.
  static ModelWeights bind(const SafetensorsCheckpoint& ck, const HymbaConfig& c, const ModelPlan& plan);
  // Points every matrix and vector at a backend-resident copy (uploads for a
  // GPU backend; a no-op for the CPU). The checkpoint must stay open.
  // `progress` (may be empty) is told the fraction of layers done.
  void make_resident(Backend& be, const std::function<void(double)>& progress = {});
};

// Every tensor name and shape a checkpoint of this config holds (HF layout);
// shared by loading, `hymba init` and tests.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<TensorSpec> checkpoint_layout(const HymbaConfig& c, const ModelPlan& plan);

// Number of parameters (tied head counted once).
int64_t parameter_count(const HymbaConfig& c, const ModelPlan& plan);

}  // namespace hymba
