#include "cache/hybrid_cache.h"

#include <algorithm>

#include "util/error.h"

namespace hymba {

CacheLayout CacheLayout::build(const HymbaConfig& c, const ModelPlan& plan, DType kv_dtype) {
  CacheLayout l;
  l.n_layers = c.num_hidden_layers;
  l.n_meta = c.num_memory_tokens;
  l.window = c.sliding_window ? *c.sliding_window : -1;
  l.kv_k = int64_t(c.num_key_value_heads) * c.head_dim_qk;
  l.kv_v = int64_t(c.num_key_value_heads) * c.head_dim_v;
  l.d_inner = c.d_inner;
  l.d_state = c.mamba_d_state;
  l.d_conv = c.mamba_d_conv;
  l.kv_dtype = kv_dtype;
  for (int owner : plan.kv_owner) l.kv_global.push_back(plan.layers[owner].global);
  return l;
}

int64_t CacheLayout::ring_rows(int64_t n_tokens) const { return std::min(window, n_tokens); }

CacheBytes CacheLayout::bytes(int64_t n_tokens) const {
  CacheBytes b;
  const int64_t row = (kv_k + kv_v) * int64_t(dtype_size(kv_dtype));
  for (bool g : kv_global) {
    if (g) b.global_kv += (n_meta + n_tokens) * row;
    else b.sliding_kv += (n_meta + ring_rows(n_tokens)) * row;
  }
  b.ssm = int64_t(n_layers) * d_inner * d_state * 4;
  b.conv = int64_t(n_layers) * d_inner * (d_conv - 1) * 4;
  return b;
}

SequenceCache::SequenceCache(const CacheLayout& layout, int64_t max_tokens, Backend& be)
    : be_(&be), layout_(layout), max_tokens_(max_tokens) {
  check(max_tokens >= 0, "context length must be >= 0");
  const size_t es = dtype_size(layout.kv_dtype);
  for (bool g : layout_.kv_global) {
    KV kv;
    kv.rows = layout_.n_meta + (g ? max_tokens : layout_.ring_rows(max_tokens));
    kv.k = DeviceArray<uint8_t>(be, size_t(kv.rows * layout_.kv_k) * es);
    kv.v = DeviceArray<uint8_t>(be, size_t(kv.rows * layout_.kv_v) * es);
    kv_.push_back(std::move(kv));
  }
  conv_ = DeviceArray<float>(be, conv_stride() * size_t(layout_.n_layers));
  ssm_ = DeviceArray<float>(be, ssm_stride() * size_t(layout_.n_layers));
}

// Global slots store position p at row p. Sliding slots pin the meta
// positions at rows [0, M) and put real position p at ring row
// M + (p - M) mod ring.
int64_t SequenceCache::row_of(int slot, int64_t pos) const {
  if (layout_.kv_global[slot] || pos < layout_.n_meta) return pos;
  const int64_t ring = kv_[slot].rows - layout_.n_meta;
  return layout_.n_meta + (pos - layout_.n_meta) % ring;
}

int SequenceCache::kv_segments(int slot, KVSegment* out) const {
  const KV& kv = kv_[slot];
  const size_t es = dtype_size(layout_.kv_dtype);
  auto seg = [&](int64_t row, int64_t pos, int64_t count) {
    KVSegment s;
    s.k = kv.k.data() + size_t(row * layout_.kv_k) * es;
    s.v = kv.v.data() + size_t(row * layout_.kv_v) * es;
    s.dtype = layout_.kv_dtype;
    s.ld_k = layout_.kv_k;
    s.ld_v = layout_.kv_v;
    s.pos0 = pos;
    s.count = count;
    return s;
  };
  if (length_ == 0) return 0;
  const int64_t M = layout_.n_meta;
  if (layout_.kv_global[slot] || length_ <= M) {
    out[0] = seg(0, 0, length_);
    return 1;
  }
  int n = 0;
  if (M > 0) out[n++] = seg(0, 0, M);
  const int64_t ring = kv.rows - M;
  const int64_t real = length_ - M;             // real positions seen so far
  const int64_t kept = std::min(real, ring);    // those still in the ring
  const int64_t first = length_ - kept;         // oldest kept position
  const int64_t first_row = row_of(slot, first);
  const int64_t run1 = std::min(kept, M + ring - first_row);
  out[n++] = seg(first_row, first, run1);
  if (run1 < kept) out[n++] = seg(M, first + run1, kept - run1);
  return n;
}

void SequenceCache::store_run(int slot, int64_t row, const float* k, int64_t ldk, const float* v, int64_t ldv,
                              int64_t n, std::vector<StoreArgs>* pending) {
  if (n <= 0) return;
  KV& kv = kv_[slot];
  const size_t es = dtype_size(layout_.kv_dtype);
  const StoreArgs ks{k, ldk, n, layout_.kv_k, layout_.kv_dtype, kv.k.data() + size_t(row * layout_.kv_k) * es,
                     layout_.kv_k};
  const StoreArgs vs{v, ldv, n, layout_.kv_v, layout_.kv_dtype, kv.v.data() + size_t(row * layout_.kv_v) * es,
                     layout_.kv_v};
  if (pending) {
    pending->push_back(ks);
    pending->push_back(vs);
    return;
  }
  for (const StoreArgs& a : {ks, vs}) be_->store_rows(a.src, a.lds, a.n, a.d, a.dt, a.dst, a.ldd);
}

void SequenceCache::store_kv(int slot, const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t n,
                             std::vector<StoreArgs>* pending) {
  check(length_ + n <= layout_.n_meta + max_tokens_, "sequence is longer than its context (",
        max_tokens_, " tokens)");
  const KV& kv = kv_[slot];
  const int64_t M = layout_.n_meta;
  if (layout_.kv_global[slot]) {
    store_run(slot, length_, k, ldk, v, ldv, n, pending);  // row = position
    return;
  }
  // Meta positions go to their pinned rows; of the real positions only the
  // last `ring` of the chunk survive, written in runs that end where the
  // ring wraps.
  const int64_t meta_end = std::min(length_ + n, M);
  if (meta_end > length_) store_run(slot, length_, k, ldk, v, ldv, meta_end - length_, pending);
  const int64_t ring = kv.rows - M;
  if (ring <= 0) return;
  const int64_t first_real = std::max(length_, M);
  const int64_t last = length_ + n;  // one past
  for (int64_t p = std::max(first_real, last - ring); p < last;) {
    const int64_t row = row_of(slot, p);
    const int64_t run = std::min(last - p, M + ring - row);
    const int64_t t = p - length_;
    store_run(slot, row, k + t * ldk, ldk, v + t * ldv, ldv, run, pending);
    p += run;
  }
}

void SequenceCache::advance(int64_t n) {
  check(length_ + n <= layout_.n_meta + max_tokens_, "sequence is longer than its context (",
        max_tokens_, " tokens)");
  length_ += n;
}

void SequenceCache::copy_from(const SequenceCache& other) {
  const CacheLayout& o = other.layout_;
  check(o.kv_global == layout_.kv_global && o.kv_k == layout_.kv_k && o.kv_v == layout_.kv_v &&
            o.kv_dtype == layout_.kv_dtype && o.n_meta == layout_.n_meta && o.window == layout_.window &&
            o.n_layers == layout_.n_layers && o.d_inner == layout_.d_inner && o.d_state == layout_.d_state &&
            o.d_conv == layout_.d_conv,
        "cache layouts differ");
  check(other.length_ <= layout_.n_meta + max_tokens_, "cache copy does not fit the context");
  check(other.be_ == be_, "cannot copy a cache between backends");
  const size_t es = dtype_size(layout_.kv_dtype);
  for (size_t s = 0; s < kv_.size(); ++s) {
    // Rows in use: for a global slot, [0, length); for a sliding slot the
    // meta rows plus the ring, which only maps identically when both rings
    // have the same size or nothing real has been stored yet.
    const KV& src = other.kv_[s];
    KV& dst = kv_[s];
    int64_t rows = std::min(src.rows, other.length_);
    if (!layout_.kv_global[s]) {
      check(other.length_ <= layout_.n_meta || src.rows == dst.rows,
            "cannot copy a sliding-window cache between different ring sizes");
    }
    rows = std::min(rows, dst.rows);
    be_->copy(dst.k.data(), src.k.data(), size_t(rows * layout_.kv_k) * es);
    be_->copy(dst.v.data(), src.v.data(), size_t(rows * layout_.kv_v) * es);
  }
  be_->copy(conv_.data(), other.conv_.data(), conv_.bytes());
  be_->copy(ssm_.data(), other.ssm_.data(), ssm_.bytes());
  length_ = other.length_;
}

CacheBytes SequenceCache::allocated_bytes() const {
  CacheBytes b;
  for (size_t s = 0; s < kv_.size(); ++s) {
    int64_t n = int64_t(kv_[s].k.bytes() + kv_[s].v.bytes());
    (layout_.kv_global[s] ? b.global_kv : b.sliding_kv) += n;
  }
  b.ssm = int64_t(ssm_.bytes());
  b.conv = int64_t(conv_.bytes());
  return b;
}

}  // namespace hymba
