// The Hymba cache of one sequence, holding only what the model needs:
//  * global-attention K/V: every position (meta tokens included), linear;
//  * sliding-window K/V: the meta positions pinned, plus a ring buffer of the
//    last `window` real positions (a query at p sees k >= p - window; itself
//    comes from the chunk being processed, so `window` past entries suffice);
//  * consumer layers: nothing (they read their producer's K/V);
//  * per layer: the Mamba conv state (last d_conv-1 inputs) and SSM state,
//    both fp32.
// Its size is a closed formula of the config and the context length
// (CacheLayout::bytes), which is exactly what it allocates.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "backend/ops.h"
#include "io/config.h"
#include "model/plan.h"

namespace hymba {

struct CacheBytes {
  int64_t global_kv = 0, sliding_kv = 0, ssm = 0, conv = 0;
  int64_t total() const { return global_kv + sliding_kv + ssm + conv; }
};

// Shapes of a cache, shared by all sequences of a model.
struct CacheLayout {
  int n_layers = 0;
  int64_t n_meta = 0;     // M
  int64_t window = -1;    // -1: no sliding layers
  int64_t kv_k = 0, kv_v = 0;  // K and V widths of one position (kv heads x head dim)
  int64_t d_inner = 0, d_state = 0, d_conv = 0;
  DType kv_dtype = DType::F32;
  std::vector<bool> kv_global;  // per kv slot

  static CacheLayout build(const HymbaConfig& c, const ModelPlan& plan, DType kv_dtype);
  // Bytes held by one sequence with room for n_tokens real tokens.
  CacheBytes bytes(int64_t n_tokens) const;
  // Ring rows of a sliding layer for a context of n_tokens.
  int64_t ring_rows(int64_t n_tokens) const;
};

class SequenceCache {
 public:
  // Room for max_tokens real tokens (positions up to n_meta + max_tokens - 1),
  // in the memory of `be` (which must outlive the cache).
  SequenceCache(const CacheLayout& layout, int64_t max_tokens, Backend& be = host_backend());

  const CacheLayout& layout() const { return layout_; }
  int64_t max_tokens() const { return max_tokens_; }
  // Positions processed so far, meta tokens included.
  int64_t length() const { return length_; }
  // Real tokens that can still be added.
  int64_t remaining() const { return layout_.n_meta + max_tokens_ - length_; }

  // Cached K/V of slot s before the current chunk, as at most 3 segments
  // (pinned meta, and the ring in up to two pieces). Returns the count.
  int kv_segments(int slot, KVSegment* out) const;
  // Stores K/V rows (fp32 in the backend's memory, already rounded to the
  // cache dtype by the caller if desired) for positions
  // length()..length()+n-1 of slot s. With `pending`, the stores are
  // appended there instead, for the caller to run together
  // (Backend::store_rows_batch) before advance().
  void store_kv(int slot, const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t n,
                std::vector<StoreArgs>* pending = nullptr);
  // Marks n more positions processed (after all slots were stored).
  void advance(int64_t n);

  // Per-layer Mamba state, in the backend's memory.
  float* conv_state(int layer) { return conv_.data() + size_t(layer) * conv_stride(); }
  float* ssm_state(int layer) { return ssm_.data() + size_t(layer) * ssm_stride(); }

  // Copies the state of `other` (same layout; its length must fit) into this.
  void copy_from(const SequenceCache& other);
  CacheBytes allocated_bytes() const;

 private:
  struct KV {
    DeviceArray<uint8_t> k, v;  // rows x width, kv dtype
    int64_t rows = 0;
  };
  // Stores n consecutive rows of slot s starting at cache row `row`.
  void store_run(int slot, int64_t row, const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t n,
                 std::vector<StoreArgs>* pending);
  size_t conv_stride() const { return size_t((layout_.d_conv - 1) * layout_.d_inner); }
  size_t ssm_stride() const { return size_t(layout_.d_inner * layout_.d_state); }
  int64_t row_of(int slot, int64_t pos) const;

  Backend* be_;
  CacheLayout layout_;
  int64_t max_tokens_ = 0;
  int64_t length_ = 0;
  std::vector<KV> kv_;
  DeviceArray<float> conv_, ssm_;
};

}  // namespace hymba
