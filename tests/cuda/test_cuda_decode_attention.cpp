// Decode attention (one query per sequence) on the CUDA backend against the
// CPU backend: the single-sequence op (Backend::attention) and the batched op
// (Backend::attention_batch), at the engine's cache layouts (meta rows, ring
// pieces of a sliding window, a linear global cache, the current token as an
// fp32 segment) and at the edges of AttentionArgs' masking rules. Outputs
// start poisoned with NaN (see cuda_test_util.h). A batched entry's result
// must not depend on the rest of the batch or on the path: each entry of a
// batch is compared bit for bit with the same entry alone (attention_batch,
// count 1) and through the single-sequence op.
// bf16 K/V go through the decode kernel's tensor-core span (Q and the
// probabilities rounded to bf16): those entries are held to the bf16
// tolerance of the prefill tensor-core kernel (1e-2 relative), fp32 and f16
// entries (fp32 FMA span) to 1e-5; HYMBA_DECODE_TC=0 (the FMA span for every
// dtype) restores 1e-5 everywhere. The bit-for-bit invariance checks are
// the same either way.
// Without a CUDA build or a GPU every test skips.
#include <cstring>

#include "cuda_test_util.h"

namespace hymba {
namespace cuda_test {
namespace {

struct DSeg {
  int64_t pos0, count;
  DType dtype;
  int64_t pad = 0;  // ld_k = n_kv*dq + pad, ld_v = n_kv*dv + 2*pad (1: rows not 16-byte aligned)
};

struct DCase {
  std::string name;
  int n_heads, n_kv, dq, dv;
  int64_t pos, window, nav;  // the query's position, the window (-1: global), always-visible prefix
  std::vector<DSeg> segs;
  float q_scale = 1.0f;
};

// The tolerance against the CPU backend (see the top of the file).
double tolerance(const DCase& c) {
  if (!decode_takes_tensor_cores()) return 1e-5;
  for (const DSeg& s : c.segs)
    if (s.dtype == DType::BF16 && s.count > 0) return 1e-2;
  return 1e-5;
}

// The engine's layouts for a query at position p: a global cache [0, p) plus
// the current token, or meta rows + a ring of the last `ring` positions
// before p (wrapped at `wrap` positions from its oldest, when > 0) + the
// current token.
std::vector<DSeg> global_layout(int64_t p, DType dt = DType::BF16) {
  std::vector<DSeg> s;
  if (p > 0) s.push_back({0, p, dt});
  s.push_back({p, 1, DType::F32});
  return s;
}
std::vector<DSeg> window_layout(int64_t p, int64_t meta, int64_t ring, int64_t wrap, DType dt = DType::BF16) {
  std::vector<DSeg> s;
  meta = std::min(meta, p);
  if (meta > 0) s.push_back({0, meta, dt});
  ring = std::min(ring, p - meta);
  if (ring > 0) {
    const int64_t start = p - ring;
    wrap = std::min(wrap, ring);
    if (wrap > 0 && wrap < ring) {
      s.push_back({start + wrap, ring - wrap, dt});  // the newest part first, as a wrapped ring holds it
      s.push_back({start, wrap, dt});
    } else {
      s.push_back({start, ring, dt});
    }
  }
  s.push_back({p, 1, DType::F32});
  return s;
}

int64_t visible_keys(const DCase& c) {
  int64_t n = 0;
  for (const DSeg& s : c.segs)
    for (int64_t k = s.pos0; k < s.pos0 + s.count; ++k)
      n += k <= c.pos && (c.window < 0 || c.pos - k <= c.window || k < c.nav);
  return n;
}

class DecodeAttention : public CudaVsCpu {
 protected:
  // Host and device copies of a set of decode cases: K/V in one pool
  // (16-byte aligned segment starts), queries and outputs in one array each
  // (the padding around each output row stays poisoned).
  struct Built {
    std::vector<uint8_t> pool;
    std::vector<float> q;
    std::vector<std::vector<KVSegment>> hsegs, dsegs;
    std::vector<AttentionArgs> ha, da;  // host (CPU) and device args; out offsets in ooff
    std::vector<size_t> ooff, olen;
    size_t out_size = 0;
    const uint8_t* dpool = nullptr;
    const float* dq = nullptr;
  };

  Built build(const std::vector<DCase>& cs) {
    Built b;
    const size_t n = cs.size();
    std::vector<std::vector<std::pair<size_t, size_t>>> offs(n);
    std::vector<size_t> qoff(n);
    for (size_t i = 0; i < n; ++i) {
      const DCase& c = cs[i];
      const int64_t kv_k = int64_t(c.n_kv) * c.dq, kv_v = int64_t(c.n_kv) * c.dv;
      for (const DSeg& s : c.segs) {
        auto add = [&](int64_t ld) {
          b.pool.resize((b.pool.size() + 15) / 16 * 16);
          const size_t at = b.pool.size();
          const std::vector<uint8_t> bytes = store_as(noise(size_t(s.count * ld)), s.dtype);
          b.pool.insert(b.pool.end(), bytes.begin(), bytes.end());
          return at;
        };
        const size_t k = add(kv_k + s.pad);
        const size_t v = add(kv_v + 2 * s.pad);
        offs[i].push_back({k, v});
      }
      qoff[i] = b.q.size();
      const int64_t qn = int64_t(c.n_heads) * c.dq + 3;
      const std::vector<float> q = noise(size_t(qn), 0.0f, c.q_scale);
      b.q.insert(b.q.end(), q.begin(), q.end());
      b.ooff.push_back(b.out_size);
      b.olen.push_back(size_t(c.n_heads) * size_t(c.dv));
      b.out_size += size_t(c.n_heads) * size_t(c.dv) + 5;
    }
    b.pool.resize(std::max<size_t>(b.pool.size(), 16));
    b.dpool = up(b.pool);
    b.dq = up(b.q);
    b.hsegs.resize(n), b.dsegs.resize(n), b.ha.resize(n), b.da.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const DCase& c = cs[i];
      const int64_t kv_k = int64_t(c.n_kv) * c.dq, kv_v = int64_t(c.n_kv) * c.dv;
      for (size_t j = 0; j < c.segs.size(); ++j) {
        const DSeg& s = c.segs[j];
        add_pool_segment(s.dtype, kv_k + s.pad, kv_v + 2 * s.pad, s.pos0, s.count, b.pool.data(), b.dpool,
                         offs[i][j], b.hsegs[i], b.dsegs[i]);
      }
      const AttentionArgs a = attention_case(c.n_heads, c.n_kv, c.dq, c.dv, 1, c.pos, c.window, c.nav,
                                             int(c.segs.size()), int64_t(c.n_heads) * c.dq + 3,
                                             int64_t(c.n_heads) * c.dv + 5);
      b.ha[i] = b.da[i] = a;
      b.ha[i].q = b.q.data() + qoff[i];
      b.ha[i].segments = b.hsegs[i].data();
      b.da[i].q = b.dq + qoff[i];
      b.da[i].segments = b.dsegs[i].data();
    }
    return b;
  }

  // The CPU backend's outputs (poisoned array, entries at b.ooff).
  std::vector<float> cpu_out(Built& b) {
    std::vector<float> oc(b.out_size, kNaN);
    for (size_t i = 0; i < b.ha.size(); ++i) {
      AttentionArgs a = b.ha[i];
      a.out = oc.data() + b.ooff[i];
      cpu_->attention(a);
    }
    return oc;
  }
};

// ---------------------------------------------------------------- single sequence

TEST_F(DecodeAttention, SingleVsCpu) {
  const DType B = DType::BF16, F = DType::F32, H = DType::F16;
  std::vector<DCase> cases = {
      // 1152 visible keys: meta 128 + window ring (wrapped, with one row just
      // out of the window) + the current token.
      {"w1024 meta128 ring wrapped, 64/128", 25, 5, 64, 128, 3000, 1024, 128,
       {{0, 128, B}, {2400, 600, B}, {1975, 425, B}, {3000, 1, F}}},
      {"w1024 meta128 ring wrapped, 64/64", 25, 5, 64, 64, 3000, 1024, 128,
       {{0, 128, B}, {2400, 600, B}, {1975, 425, B}, {3000, 1, F}}},
      {"w1024 meta128 ring one piece, 64/128", 25, 5, 64, 128, 1500, 1024, 128, window_layout(1500, 128, 1024, 0)},
      {"w1024 meta128 before the ring fills", 25, 5, 64, 128, 700, 1024, 128, window_layout(700, 128, 1024, 300)},
      {"global 1 key (current token only)", 25, 5, 64, 128, 0, -1, 0, {{0, 0, B}, {0, 1, F}}},
      {"global 100 keys", 25, 5, 64, 128, 99, -1, 0, global_layout(99)},
      {"global 4096 keys", 25, 5, 64, 128, 4095, -1, 0, global_layout(4095)},
      {"global 33000 keys", 25, 5, 64, 128, 32999, -1, 0, global_layout(32999)},
      {"global 33000 keys, 64/64", 25, 5, 64, 64, 32999, -1, 0, global_layout(32999)},
      {"window 50 < meta 128", 25, 5, 64, 128, 500, 50, 128, {{0, 128, B}, {128, 372, B}, {500, 1, F}}},
      {"window 0, meta 3", 25, 5, 64, 128, 300, 0, 3, {{0, 300, B}, {300, 1, F}}},
      {"empty and future segments", 25, 5, 64, 128, 777, -1, 0,
       {{0, 0, B}, {0, 400, B}, {400, 0, F}, {400, 377, H}, {778, 33, B}, {777, 1, F}}},
      {"no visible key (zero output)", 25, 5, 64, 128, 10, -1, 0, {{11, 40, B}, {20, 0, F}}},
      {"no segments (zero output)", 25, 5, 64, 128, 10, -1, 0, {}},
      {"GQA 8/8, 64/64", 8, 8, 64, 64, 2000, -1, 0, global_layout(2000)},
      {"GQA 4/1, 64/128", 4, 1, 64, 128, 2000, 1024, 128, window_layout(2000, 128, 1024, 500)},
      {"GQA 6/2 (group 3), 64/64", 6, 2, 64, 64, 900, -1, 0, global_layout(900)},
      {"GQA 7/1 (group 7), 64/128", 7, 1, 64, 128, 900, -1, 0, global_layout(900)},
      {"GQA 16/2 (group 8), 64/128", 16, 2, 64, 128, 1900, 256, 16, window_layout(1900, 16, 300, 100)},
      {"head dims 128/128, 8/2", 8, 2, 128, 128, 1300, -1, 0, global_layout(1300)},
      {"head dims 128/64, 4/4", 4, 4, 128, 64, 1300, 512, 4, window_layout(1300, 4, 600, 77)},
      {"fp32 cache", 25, 5, 64, 128, 2100, -1, 0, global_layout(2100, F)},
      {"fp32 cache, window", 25, 5, 64, 64, 2100, 1024, 128, window_layout(2100, 128, 1024, 333, F)},
      {"f16 cache", 25, 5, 64, 128, 2100, 1024, 128, window_layout(2100, 128, 1024, 1000, H)},
      {"f16 cache, global", 8, 2, 128, 128, 3333, -1, 0, global_layout(3333, H)},
      {"large logits", 25, 5, 64, 128, 3000, 1024, 128, window_layout(3000, 128, 1024, 200), 5.0f},
      {"unaligned rows (general kernel)", 25, 5, 64, 128, 1200, -1, 0, {{0, 1200, B, 1}, {1200, 1, F}}},
      {"head dim 32 (general kernel)", 4, 2, 32, 48, 500, -1, 0, global_layout(500)},
      // The single-sequence kernel's chunking (after the general kernel's
      // split states in the same scratch): chunks of 64 bf16 / 32 fp32 keys
      // cut at range ends, longer chunks (several sub-tiles) at long contexts,
      // a merge by the last block of each kv head.
      {"global 8192 keys (multi-tile chunks), 64/128", 25, 5, 64, 128, 8191, -1, 0, global_layout(8191)},
      {"global 8192 keys, 64/64", 25, 5, 64, 64, 8191, -1, 0, global_layout(8191)},
      {"GQA 4/2 (group 2), global 5000", 4, 2, 64, 128, 4999, -1, 0, global_layout(4999)},
      {"GQA 16/2 (group 8), global 9000, 64/64", 16, 2, 64, 64, 8999, -1, 0, global_layout(8999)},
      {"one bf16 segment holding the query's row", 25, 5, 64, 128, 1500, -1, 0, {{0, 1501, B}}},
      {"one segment, window 1024 meta 128", 25, 5, 64, 128, 3000, 1024, 128, {{0, 3001, B}}},
      {"window 5 < a chunk, no meta", 25, 5, 64, 128, 2000, 5, 0, window_layout(2000, 0, 1024, 300)},
      {"window 70, meta 1, ring wrapped", 25, 5, 64, 64, 2000, 70, 1, window_layout(2000, 1, 80, 33)},
      {"fp32 chunk of 70 rows after bf16", 25, 5, 64, 128, 1069, -1, 0, {{0, 1000, B}, {1000, 70, F}}},
      {"fp32 rows first, then f16", 8, 2, 128, 64, 600, -1, 0, {{0, 97, F}, {97, 503, H}, {600, 1, F}}},
      {"64 kv heads (group 1), 3000 keys", 64, 64, 64, 64, 2999, -1, 0, global_layout(2999)},
      {"65 keys (a chunk and one key)", 25, 5, 64, 128, 64, -1, 0, {{0, 65, B}}},
  };
  for (const DCase& c : cases) {
    SCOPED_TRACE(c.name);
    Built b = build({c});
    const std::vector<float> oc = cpu_out(b);
    float* dout = up(std::vector<float>(b.out_size, kNaN));
    AttentionArgs a = b.da[0];
    a.out = dout + b.ooff[0];
    gpu_->attention(a);
    expect_close("decode_attention",
                 c.name + " (" + std::to_string(visible_keys(c)) + " keys)", down(dout, b.out_size), oc, tolerance(c));
    // The same call again into a fresh buffer: deterministic, bit for bit.
    float* dout2 = up(std::vector<float>(b.out_size, kNaN));
    a.out = dout2 + b.ooff[0];
    gpu_->attention(a);
    const std::vector<float> o1 = down(dout, b.out_size), o2 = down(dout2, b.out_size);
    EXPECT_EQ(0, std::memcmp(o1.data(), o2.data(), o1.size() * sizeof(float))) << c.name << ": not deterministic";
    TearDown();
  }
}

// ---------------------------------------------------------------- batched

class DecodeAttentionBatch : public DecodeAttention {
 protected:
  DType any_dtype() {
    const DType d[4] = {DType::BF16, DType::BF16, DType::F16, DType::F32};
    return d[pick(0, 3)];
  }

  // A decode entry at the engine's layouts: global or window 1024 (or a
  // small window) with meta rows; lengths mostly short, some long.
  DCase make(int n_heads, int n_kv, int dq, int dv, bool allow_unaligned) {
    DCase c;
    c.n_heads = n_heads, c.n_kv = n_kv, c.dq = dq, c.dv = dv;
    const int64_t r = pick(0, 99);
    const int64_t L = r < 10 ? pick(0, 3) : r < 60 ? pick(4, 300) : r < 95 ? pick(301, 2000) : pick(2001, 9000);
    c.pos = L;
    const DType dt = any_dtype();
    const int64_t kind = pick(0, 3);
    if (kind == 0) {
      c.window = -1, c.nav = 0;
      c.segs = global_layout(L, dt);
      c.name = "global";
    } else {
      c.window = kind == 1 ? pick(3, 200) : 1024;
      c.nav = pick(0, 1) ? 128 : pick(0, 20);
      c.segs = window_layout(L, c.nav, c.window + pick(0, 2), pick(0, c.window), dt);
      c.name = "window";
    }
    if (pick(0, 9) == 0) c.segs.insert(c.segs.begin() + pick(0, int64_t(c.segs.size())), {L + 1, pick(1, 40), dt});
    if (pick(0, 9) == 0) c.segs.insert(c.segs.begin(), {0, 0, dt});
    if (allow_unaligned && pick(0, 9) == 0) c.segs[0].pad = 1;  // the general batched kernel
    c.name += " L=" + std::to_string(L) + " w=" + std::to_string(c.window) + " nav=" + std::to_string(c.nav) +
              " " + dtype_name(dt);
    return c;
  }

  // The batch against the CPU backend; each decode-kernel entry (aligned
  // rows, <= 8 segments) bit for bit against the same entry alone in a
  // batch of one, through the single-sequence op (attention()), and (with
  // `reversed`) in the same batch in reverse order.
  void run(const std::string& name, const std::vector<DCase>& cs, bool reversed = false) {
    SCOPED_TRACE(name);
    Built b = build(cs);
    const size_t n = cs.size();
    const std::vector<float> oc = cpu_out(b);
    const std::vector<float> poison(b.out_size, kNaN);
    float* d_batch = up(poison);
    float* d_alone = up(poison);
    float* d_single = up(poison);
    float* d_rev = up(poison);
    std::vector<AttentionArgs> a = b.da;
    for (size_t i = 0; i < n; ++i) a[i].out = d_batch + b.ooff[i];
    gpu_->attention_batch(a.data(), int(n));
    for (size_t i = 0; i < n; ++i) {
      AttentionArgs one = b.da[i];
      one.out = d_alone + b.ooff[i];
      gpu_->attention_batch(&one, 1);
      one.out = d_single + b.ooff[i];
      gpu_->attention(one);
    }
    if (reversed) {
      std::vector<AttentionArgs> r;
      for (size_t i = n; i-- > 0;) {
        r.push_back(b.da[i]);
        r.back().out = d_rev + b.ooff[i];
      }
      gpu_->attention_batch(r.data(), int(n));
    }
    const std::vector<float> ob = down(d_batch, b.out_size), oa = down(d_alone, b.out_size);
    const std::vector<float> os = down(d_single, b.out_size), orv = down(d_rev, b.out_size);
    double tol = 1e-5;
    for (const DCase& c : cs) tol = std::max(tol, tolerance(c));
    expect_close("decode_attention_batch", name + " (" + std::to_string(n) + " entries)", ob, oc, tol);
    for (size_t i = 0; i < n; ++i) {
      const size_t lo = b.ooff[i], len = b.olen[i];
      std::vector<float> g(ob.begin() + lo, ob.begin() + lo + len), c(oc.begin() + lo, oc.begin() + lo + len);
      double num = 0, den = 0;
      size_t nan_mismatch = 0;
      for (size_t k = 0; k < len; ++k) {
        if (std::isnan(g[k]) || std::isnan(c[k])) {
          nan_mismatch += std::isnan(g[k]) != std::isnan(c[k]);
          continue;
        }
        num += (double(g[k]) - c[k]) * (double(g[k]) - c[k]);
        den += double(c[k]) * c[k];
      }
      EXPECT_EQ(nan_mismatch, 0u) << "entry " << i << ": " << cs[i].name;
      EXPECT_LE(std::sqrt(num / std::max(den, 1e-300)), tolerance(cs[i])) << "entry " << i << ": " << cs[i].name << " (seed "
                                                              << seed_ << ")";
      // Batch invariance (the decode kernels: aligned entries; the general
      // batched kernel promises 1e-7 only).
      bool aligned = cs[i].segs.size() <= 8;
      for (const DSeg& s : cs[i].segs) aligned &= s.pad == 0;
      if (aligned) {
        EXPECT_EQ(0, std::memcmp(ob.data() + lo, oa.data() + lo, len * sizeof(float)))
            << "entry " << i << " differs from the same entry alone: " << cs[i].name;
        EXPECT_EQ(0, std::memcmp(ob.data() + lo, os.data() + lo, len * sizeof(float)))
            << "entry " << i << " differs from the single-sequence op (attention()): " << cs[i].name;
        if (reversed) {
          EXPECT_EQ(0, std::memcmp(ob.data() + lo, orv.data() + lo, len * sizeof(float)))
              << "entry " << i << " differs in the reversed batch: " << cs[i].name;
        }
      }
    }
  }
};

TEST_F(DecodeAttentionBatch, VsCpuAndInvariant) {
  for (int count : {1, 2, 7, 37, 128}) {
    std::vector<DCase> cs;
    for (int i = 0; i < count; ++i) cs.push_back(make(25, 5, 64, 128, count >= 37));
    run("1.5B 25/5 64/128", cs);
    TearDown();
  }
  for (auto [nh, nkv, dq, dv, count] : std::vector<std::tuple<int, int, int, int, int>>{
           {8, 8, 64, 64, 20}, {4, 1, 64, 128, 20}, {8, 2, 128, 128, 9}, {25, 5, 64, 64, 30}}) {
    std::vector<DCase> cs;
    for (int i = 0; i < count; ++i) cs.push_back(make(nh, nkv, dq, dv, false));
    run(std::to_string(nh) + "/" + std::to_string(nkv) + " " + std::to_string(dq) + "/" + std::to_string(dv), cs);
    TearDown();
  }
  // Fixed edge entries in one batch: no keys, one key, exactly one tile,
  // a tile and one key, the 1152-key window layout, a long global context.
  {
    const DType B = DType::BF16, F = DType::F32;
    std::vector<DCase> cs = {
        {"no segments", 25, 5, 64, 128, 5, -1, 0, {}},
        {"current token only", 25, 5, 64, 128, 0, -1, 0, global_layout(0)},
        {"32 keys", 25, 5, 64, 128, 31, -1, 0, global_layout(31)},
        {"33 keys", 25, 5, 64, 128, 32, -1, 0, global_layout(32)},
        {"w1024 meta128 wrapped", 25, 5, 64, 128, 3000, 1024, 128,
         {{0, 128, B}, {2400, 600, B}, {1975, 425, B}, {3000, 1, F}}},
        {"global 12000", 25, 5, 64, 128, 11999, -1, 0, global_layout(11999)},
    };
    run("edges", cs);
  }
}

// The paper's batch shapes mixed: 1153-key window layouts (meta 128 + a
// wrapped ring + the token: 64-key chunks, several per block in a big
// batch), 8K global contexts (multi-sub-tile chunks), short entries, an fp32
// cache (the fast kernel's fp32 path) and entries the decode kernel does not
// take (unaligned rows: the general batched kernel; nine segments: the
// single op), in one batch and reversed. Batch sizes around the point where
// blocks start to take spans of several chunks (~4 waves of blocks).
TEST_F(DecodeAttentionBatch, MixedPaperShapes) {
  const DType B = DType::BF16, F = DType::F32, H = DType::F16;
  auto window = [&](int64_t p, int64_t wrap, DType dt = DType::BF16) {
    return DCase{"w1024 meta128 p=" + std::to_string(p) + " wrap=" + std::to_string(wrap) + " " + dtype_name(dt),
                 25, 5, 64, 128, p, 1024, 128, window_layout(p, 128, 1024, wrap, dt)};
  };
  auto global = [&](int64_t p, DType dt = DType::BF16) {
    return DCase{"global p=" + std::to_string(p) + " " + dtype_name(dt), 25, 5, 64, 128, p, -1, 0,
                 global_layout(p, dt)};
  };
  for (int n_window : {1, 6, 40}) {
    std::vector<DCase> cs;
    for (int i = 0; i < n_window; ++i) cs.push_back(window(8320 + 37 * i, pick(0, 1023)));
    cs.push_back(global(8320));
    cs.push_back(global(8191 + pick(0, 200)));
    cs.push_back(global(pick(0, 3)));
    cs.push_back(global(pick(4, 200)));
    cs.push_back(window(pick(129, 1100), pick(0, 500)));  // before the ring fills
    cs.push_back(global(pick(1000, 3000), F));            // fp32 cache
    cs.push_back(window(pick(2000, 5000), pick(0, 1023), H));
    {
      DCase u = global(pick(500, 1500), F);  // unaligned fp32 rows: the general batched kernel
      u.segs[0].pad = 1;
      u.name = "unaligned fp32 " + u.name;
      cs.push_back(u);
    }
    {
      DCase m{"nine segments (the single op)", 25, 5, 64, 128, 800, -1, 0, {}};
      for (int64_t k = 0; k < 8; ++k) m.segs.push_back({100 * k, 100, B});
      m.segs.push_back({800, 1, F});
      cs.push_back(m);
    }
    run("mixed, " + std::to_string(n_window) + " window entries", cs, true);
    TearDown();
  }
}

// ---------------------------------------------------------------- timing
// Not a correctness test (run with --gtest_also_run_disabled_tests
// --gtest_filter='*DecodeAttentionTiming*'): wall time per call after a
// warm-up, the stream drained around each batch of calls, and the visible
// K/V bytes over that time.

class DecodeAttentionTiming : public CudaVsCpu {};

TEST_F(DecodeAttentionTiming, DISABLED_DecodeAttentionTiming) {
  Backend& g = *gpu_;
  const int nh = 25, nkv = 5, dq = 64;
  auto time_us = [&](auto&& f, int reps) { return 1e3 * time_ms(g, f, reps); };
  // Device K/V of `keys` rows (bf16; zeros: the values do not change the work).
  std::vector<uint8_t> zeros(size_t(64) << 20, 0);
  auto device_rows = [&](int64_t keys, int64_t width) {
    const size_t bytes = size_t(keys) * size_t(width) * 2;
    uint8_t* p = static_cast<uint8_t*>(g.allocate(std::max<size_t>(bytes, 16)));
    owned_.push_back(p);
    for (size_t off = 0; off < bytes; off += zeros.size())
      g.upload(p + off, zeros.data(), std::min(zeros.size(), bytes - off));
    return p;
  };
  for (int dv : {128, 64}) {
    const int64_t ldk = int64_t(nkv) * dq, ldv = int64_t(nkv) * dv;
    const double key_bytes = double(nkv) * (dq + dv) * 2;
    const float* q = up(randn(size_t(nh * dq)));
    float* out = up(std::vector<float>(size_t(nh * dv)));
    const float* cur_k = up(randn(size_t(ldk)));
    const float* cur_v = up(randn(size_t(ldv)));
    struct T {
      const char* what;
      int64_t keys;  // cached keys before the current token
      int64_t window;
    };
    for (const T& t : {T{"window 1024 + meta 128 (1152 keys)", 8191, 1024}, T{"global 4096 keys", 4095, -1},
                       T{"global 32768 keys", 32767, -1}}) {
      const int64_t rows = t.window < 0 ? t.keys : 128 + t.window;
      const uint8_t* k = device_rows(rows, ldk);
      const uint8_t* v = device_rows(rows, ldv);
      std::vector<KVSegment> segs;
      if (t.window < 0) {
        segs.push_back({k, v, DType::BF16, ldk, ldv, 0, t.keys});
      } else {  // meta, then the ring wrapped in the middle
        const int64_t start = t.keys - t.window + 1, half = t.window / 2;
        segs.push_back({k, v, DType::BF16, ldk, ldv, 0, 128});
        segs.push_back({k + 128 * ldk * 2, v + 128 * ldv * 2, DType::BF16, ldk, ldv, start + half, t.window - 1 - half});
        segs.push_back({k + (128 + t.window - 1 - half) * ldk * 2, v + (128 + t.window - 1 - half) * ldv * 2,
                        DType::BF16, ldk, ldv, start, half});
      }
      segs.push_back({cur_k, cur_v, DType::F32, ldk, ldv, t.keys, 1});
      AttentionArgs a;
      a.q = q, a.ldq = nh * dq, a.n_q = 1, a.q_pos0 = t.keys;
      a.n_heads = nh, a.n_kv_heads = nkv, a.head_dim_qk = dq, a.head_dim_v = dv;
      a.segments = segs.data(), a.n_segments = int(segs.size());
      a.window = t.window, a.n_always_visible = t.window < 0 ? 0 : 128;
      a.scale = 0.125f, a.out = out, a.ldo = nh * dv;
      const int64_t vis = t.window < 0 ? t.keys + 1 : 128 + t.window;  // ring: window - 1 rows + the token
      const double us = time_us([&] { g.attention(a); }, 200);
      std::printf("[decode-timing] single, 25/5 64/%d, %-36s %9.2f us  %7.1f GB/s\n", dv, t.what, us,
                  vis * key_bytes / us / 1e3);
    }
  }
  // Batches of 128 sequences, each its own cache (global 8192 + 128 keys,
  // or window 1024 + meta 128), 25/5 64/128.
  {
    const int dv = 128, n = 128;
    const int64_t ldk = int64_t(nkv) * dq, ldv = int64_t(nkv) * dv;
    const double key_bytes = double(nkv) * (dq + dv) * 2;
    const float* q = up(randn(size_t(n) * nh * dq));
    float* out = up(std::vector<float>(size_t(n) * nh * dv));
    const float* cur_k = up(randn(size_t(n * ldk)));
    const float* cur_v = up(randn(size_t(n * ldv)));
    for (int64_t window : {int64_t(-1), int64_t(1024)}) {
      const int64_t keys = 8192 + 128;  // cached keys before the current token
      const int64_t rows = window < 0 ? keys : 128 + window;
      const uint8_t* k = device_rows(rows * n, ldk);
      const uint8_t* v = device_rows(rows * n, ldv);
      std::vector<std::vector<KVSegment>> segs(n);
      std::vector<AttentionArgs> as(n);
      for (int i = 0; i < n; ++i) {
        const uint8_t* ki = k + size_t(i) * rows * ldk * 2;
        const uint8_t* vi = v + size_t(i) * rows * ldv * 2;
        if (window < 0) {
          segs[i].push_back({ki, vi, DType::BF16, ldk, ldv, 0, keys});
        } else {
          segs[i].push_back({ki, vi, DType::BF16, ldk, ldv, 0, 128});
          segs[i].push_back({ki + 128 * ldk * 2, vi + 128 * ldv * 2, DType::BF16, ldk, ldv, keys - window + 1, window - 1});
        }
        segs[i].push_back({cur_k + i * ldk, cur_v + i * ldv, DType::F32, ldk, ldv, keys, 1});
        AttentionArgs& a = as[size_t(i)];
        a.q = q + size_t(i) * nh * dq, a.ldq = nh * dq, a.n_q = 1, a.q_pos0 = keys;
        a.n_heads = nh, a.n_kv_heads = nkv, a.head_dim_qk = dq, a.head_dim_v = dv;
        a.segments = segs[i].data(), a.n_segments = int(segs[i].size());
        a.window = window, a.n_always_visible = window < 0 ? 0 : 128;
        a.scale = 0.125f, a.out = out + size_t(i) * nh * dv, a.ldo = nh * dv;
      }
      const int64_t vis = window < 0 ? keys + 1 : 128 + window;
      const double us = time_us([&] { g.attention_batch(as.data(), n); }, 20);
      std::printf("[decode-timing] batch 128, 25/5 64/128, %-27s %9.2f us  %7.1f GB/s\n",
                  window < 0 ? "global 8192 + 128 keys" : "window 1024 + meta 128", us,
                  double(n) * vis * key_bytes / us / 1e3);
    }
  }
}

}  // namespace
}  // namespace cuda_test
}  // namespace hymba
