// The Hymba model: weights + layer plan + the forward pass over a sequence's
// cache. One forward call runs a chunk of tokens through every layer,
// reading and extending the sequence's hybrid cache; prefill and decode are
// both forward calls (runtime/ decides chunk sizes and sampling).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <tuple>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "cache/hybrid_cache.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/plan.h"
#include "model/weights.h"

namespace hymba {

struct ModelOptions {
  // Element type of the K/V cache; default: F32 for fp32 checkpoints, else BF16.
  std::optional<DType> kv_dtype;
  // Reproduce the reference's decode-time window (q - k <= window - 1 during
  // single-token decode, spec 8.1) instead of the training rule q - k <= window.
  bool hf_decode_window = false;
  // Largest number of tokens per forward chunk (bounds working memory);
  // 0: the backend's preferred_chunk().
  int64_t max_chunk = 0;
  // Time every op (see backend/profiling.h); report with profile_report().
  bool profile = false;
  // Copy the weights into transparent-huge-page memory instead of mapping
  // the file (see MappedFile): faster weight streaming, slower load (CPU).
  bool huge_pages = false;
  // Compute device: "cpu", "cuda" or "auto" (see make_backend).
  std::string device = "cpu";
  // Single-token decode steps record their step-invariant stretches of ops
  // once and replay them (CUDA graphs) where the backend can record.
  bool record_decode = true;
  // Wraps the backend after it is made (tests and tools: e.g. a decorator
  // that checks or counts ops); may be empty.
  std::function<std::unique_ptr<Backend>(std::unique_ptr<Backend>)> wrap_backend;
  // Called during load with a stage name and its fraction done (0..1), e.g.
  // while weights are copied to a GPU; may be empty.
  std::function<void(const char* stage, double fraction)> progress;
};

class HymbaModel {
 public:
  // Loads config.json and the safetensors weights of a HF model directory.
  static std::unique_ptr<HymbaModel> load(const std::string& dir, const ModelOptions& opts = {});
  ~HymbaModel();

  const HymbaConfig& config() const { return cfg_; }
  const ModelPlan& plan() const { return plan_; }
  const ModelWeights& weights() const { return w_; }
  const CacheLayout& cache_layout() const { return layout_; }
  const ModelOptions& options() const { return opts_; }
  const Backend& backend() const { return *be_; }
  Backend& backend() { return *be_; }
  int64_t vocab_size() const { return cfg_.vocab_size; }

  // A new sequence with room for max_tokens real tokens, starting from the
  // state after the meta tokens (computed once at load).
  std::unique_ptr<SequenceCache> new_sequence(int64_t max_tokens) const;

  // Runs ids[0..n) through the model at the end of `seq` (any n; processed
  // in chunks of at most max_chunk). If logits is not null it receives the
  // logits of the last token ([vocab]) or, with all_positions, of every token
  // ([n, vocab]). `decode` marks a single-token generation step (only
  // matters with hf_decode_window).
  void forward(SequenceCache& seq, const int32_t* ids, int64_t n, float* logits, bool all_positions,
               bool decode = false);

  // One decode step for a batch: token ids[b] is appended to seqs[b] (each
  // sequence at its own length, with its own cache; no padding) and its
  // logits go to logits[b * vocab ...]. Each sequence's result equals a
  // forward() of that token alone, up to the matrix products' rounding.
  void forward_batch(SequenceCache* const* seqs, const int32_t* ids, int64_t batch, float* logits);

  // forward() of the prompt or decode token(s) ids[0..n), then the next token
  // picked from the last position's logits by `args` on the backend (the
  // logits never leave the device; see Backend::sample_tokens).
  int32_t forward_sample(SequenceCache& seq, const int32_t* ids, int64_t n, const SampleArgs& args,
                         bool decode = false);
  // forward_batch(), then out[b] = the token args[b] picks from sequence b's
  // logits, on the backend.
  void forward_batch_sample(SequenceCache* const* seqs, const int32_t* ids, int64_t batch, const SampleArgs* args,
                            int32_t* out);

  // The meta-prefix snapshot (for tests); null when the model has no meta tokens.
  const SequenceCache* meta_snapshot() const { return meta_.get(); }
  // Recomputes the meta prefix into a fresh cache (for tests of the snapshot).
  std::unique_ptr<SequenceCache> compute_meta_prefix(int64_t max_tokens);

 private:
  HymbaModel() = default;
  struct Workspace;
  void ensure_workspace(int64_t n);
  // Final norm + LM head of workspace rows first..first+rows-1 into
  // ws.logits, then downloaded to out unless out is null.
  void lm_head(int64_t first, int64_t rows, float* out);
  // Which logits a chunked forward pass produces.
  enum class Logits { kNone, kLast, kAll, kLastOnDevice };
  void run_forward(SequenceCache& seq, const int32_t* ids, int64_t n, bool decode, Logits want, float* logits);
  // forward_batch's body: logits to the host (logits) or sampled (args, out).
  void run_batch(SequenceCache* const* seqs, const int32_t* ids, int64_t batch, float* logits,
                 const SampleArgs* args, int32_t* out);
  // Rows row0 .. row0+n-1 of the workspace belong to `seq` (a chunk of one
  // sequence is one span; a batched decode step has one span per sequence).
  struct RowSpan {
    SequenceCache* seq;
    int64_t row0, n;
  };
  // h (n rows in the workspace) through every layer; commits K/V and
  // advances each span's sequence.
  void run_layers(const RowSpan* spans, int n_spans, int64_t n, bool decode);
  // The three parts of a layer: its inputs (in_proj, q/k/v from the
  // workspace), attention (per sequence), and the rest (the Mamba branch,
  // the fusion and the MLP: workspace, weights and per-sequence state).
  void layer_inputs(const LayerPlan& lp, const LayerWeights& w, int64_t n);
  void layer_attention(const LayerPlan& lp, const RowSpan* spans, int n_spans, int64_t n, bool decode);
  void layer_rest(const LayerPlan& lp, const LayerWeights& w, const RowSpan* spans, int n_spans, int64_t n);
  // A recordable stretch of a layer: (layer, part, the sequence state it
  // touches, rows).
  struct RecordKey {
    int layer, part;
    const float *conv, *ssm;
    int64_t n;
    bool operator<(const RecordKey& o) const {
      return std::tie(layer, part, conv, ssm, n) < std::tie(o.layer, o.part, o.conv, o.ssm, o.n);
    }
  };
  template <typename F>
  void recorded(const RecordKey& key, F&& ops);

  HymbaConfig cfg_;
  ModelPlan plan_;
  ModelOptions opts_;
  SafetensorsCheckpoint ckpt_;
  ModelWeights w_;
  CacheLayout layout_;
  std::unique_ptr<Backend> be_;  // before everything that holds backend memory
  DeviceArray<float> inv_freq_;
  std::unique_ptr<Workspace> ws_;
  std::unique_ptr<SequenceCache> meta_;
  bool recording_on_ = false;
  bool recording_broken_ = false;  // a recording failed: run op by op
  std::map<RecordKey, int> recordings_;  // -1: seen once, not recorded yet
};

}  // namespace hymba
