// The tensor-core prefill attention (backend/cuda/attention.cu,
// attention_tc_kernel) against the CPU backend.
//
// The kernel rounds Q and the softmax weights P to bf16 (K/V are bf16 in
// the cache, and the fp32 chunk segment holds bf16-exact values, as the
// model's do), so against the fp32 CPU result it is only ~1e-3 close. Three
// checks, from loose to exact:
//   * vs the CPU on the same inputs: relative L2 <= 1e-2;
//   * vs the CPU with Q rounded to bf16 first (what the kernel computes up to
//     the bf16 rounding of P, ~1e-3 per row): relative L2 <= 3e-3, and every
//     (query, head) row <= 1.5e-2 (one key too many or too few moves a row
//     with ~1000 visible keys by ~2e-2);
//   * a mask probe with exact arithmetic: K = 0 makes every visible key's
//     weight exactly 1 (also after rounding to bf16) and V holds small
//     integers that depend on position, kv head and column, so the output is
//     the mean of V over the visible keys, exact up to one division: any
//     wrong mask, key position, segment row or kv-head mapping shows far
//     above the 1e-5 tolerance.
// Without a GPU every test skips.
#include <atomic>

#include "cuda_test_util.h"

#ifdef HYMBA_HAVE_CUDA
namespace hymba::cuda {  // backend/cuda/kernels.cuh (which needs the CUDA headers)
void set_attention_tc_mode(int mode);
long long attention_tc_launches();
void set_attention_wgmma(int mode);
long long attention_wgmma_launches();
long long attention_wgmma_ws_launches();
}  // namespace hymba::cuda
#endif

namespace hymba {
namespace cuda_test {
namespace {

void set_tc_mode(int mode) {
#ifdef HYMBA_HAVE_CUDA
  cuda::set_attention_tc_mode(mode);
#else
  (void)mode;
#endif
}
long long tc_launches() {
#ifdef HYMBA_HAVE_CUDA
  return cuda::attention_tc_launches();
#else
  return 0;
#endif
}

// The warpgroup-MMA forms of the tensor-core kernel (heads 64/128, built
// for sm_90a): mode 2 (default) the warp-specialised form where TMA can
// address every K/V segment, else mode 1's; 1 the form with block
// barriers; 0 the mma.sync kernel. The tests run those shapes in all three.
int g_wgmma_mode = 2;
void set_wgmma(int mode) {
  g_wgmma_mode = mode;
#ifdef HYMBA_HAVE_CUDA
  cuda::set_attention_wgmma(mode);
#endif
}
std::pair<long long, long long> wgmma_launches() {  // (either wgmma form, warp-specialised)
#ifdef HYMBA_HAVE_CUDA
  return {cuda::attention_wgmma_launches(), cuda::attention_wgmma_ws_launches()};
#else
  return {0, 0};
#endif
}
// Whether a tensor-core launch of this shape must take a wgmma form: the
// default build carries sm_90a code, which runs on compute capability 9.0.
bool expect_wgmma(int dq, int dv) {
#ifdef HYMBA_HAVE_CUDA
  return g_wgmma_mode >= 1 && dq == 64 && dv == 128 && cuda_compute_capability() == 90;
#else
  (void)dq, (void)dv;
  return false;
#endif
}
struct WgmmaMode {
  explicit WgmmaMode(int mode) { set_wgmma(mode); }
  ~WgmmaMode() { set_wgmma(2); }
};

// Restores the automatic kernel choice when a test ends (also on failure).
struct TcMode {
  explicit TcMode(int mode) { set_tc_mode(mode); }
  ~TcMode() { set_tc_mode(0); }
};

struct Seg {
  int64_t pos0, count;
  DType dtype;  // F32: the chunk, values rounded to bf16 (as the model's)
  int64_t pad = 0;  // row pitch = width + pad (unaligned pitches take the kernel's scalar loads)
};

struct TcCase {
  std::string name;
  int n_heads, n_kv, dq, dv;
  int64_t n_q, q_pos0, window, nav;
  std::vector<Seg> segs;
};

// The model's segments of a sliding-window layer: meta [0, nav) in bf16, the
// ring's kept positions before q_pos0 in two pieces (a wrapped ring), then
// the chunk [q_pos0, q_pos0 + n_q) as fp32.
std::vector<Seg> sliding_segs(int64_t q_pos0, int64_t n_q, int64_t nav, int64_t ring, int64_t pad = 0) {
  std::vector<Seg> s{{0, nav, DType::BF16, pad}};
  const int64_t kept = std::min(q_pos0 - nav, ring), first = q_pos0 - kept, run1 = kept * 2 / 5;
  s.push_back({first, run1, DType::BF16, pad});
  s.push_back({first + run1, kept - run1, DType::BF16, pad});
  s.push_back({q_pos0, n_q, DType::F32, pad});
  return s;
}
// A global layer: the cache [0, q_pos0) in bf16, then the chunk.
std::vector<Seg> global_segs(int64_t q_pos0, int64_t n_q, int64_t pad = 0) {
  return {{0, q_pos0, DType::BF16, pad}, {q_pos0, n_q, DType::F32, pad}};
}

bool visible(int64_t k, int64_t p, int64_t window, int64_t nav) {
  return k <= p && (window < 0 || p - k <= window || k < nav);
}

class CudaAttentionTc : public CudaVsCpu {
 protected:
  // One case's inputs on both sides. K/V values: `kv(seg, row, col, is_v)`.
  struct Inputs {
    std::vector<float> q;
    std::vector<std::vector<uint8_t>> k, v;
    std::vector<KVSegment> hsegs, dsegs;
    AttentionArgs a;  // q, segments, out unset
    bool tma_pitches = true;  // every bf16 segment's rows 16-byte aligned (TMA can address them)
  };

  template <typename KV>
  Inputs make(const TcCase& c, KV kv) {
    Inputs in;
    const int64_t kv_k = int64_t(c.n_kv) * c.dq, kv_v = int64_t(c.n_kv) * c.dv;
    const int64_t ldq = int64_t(c.n_heads) * c.dq + 3;
    in.q = randn(size_t(c.n_q * ldq));
    for (size_t s = 0; s < c.segs.size(); ++s) {
      const Seg& sg = c.segs[s];
      const int64_t ldk = kv_k + sg.pad, ldv = kv_v + 2 * sg.pad;
      std::vector<float> kf(size_t(sg.count * ldk), 0.0f), vf(size_t(sg.count * ldv), 0.0f);
      for (int64_t r = 0; r < sg.count; ++r) {
        for (int64_t i = 0; i < kv_k; ++i) kf[size_t(r * ldk + i)] = round_to_bf16(kv(sg.pos0 + r, i, false));
        for (int64_t i = 0; i < kv_v; ++i) vf[size_t(r * ldv + i)] = round_to_bf16(kv(sg.pos0 + r, i, true));
      }
      in.k.push_back(store_as(kf, sg.dtype));
      in.v.push_back(store_as(vf, sg.dtype));
      if (sg.dtype == DType::BF16 && ((ldk * 2) % 16 != 0 || (ldv * 2) % 16 != 0)) in.tma_pitches = false;
      KVSegment seg;
      seg.dtype = sg.dtype;
      seg.ld_k = ldk;
      seg.ld_v = ldv;
      seg.pos0 = sg.pos0;
      seg.count = sg.count;
      seg.k = in.k.back().data();
      seg.v = in.v.back().data();
      in.hsegs.push_back(seg);
      seg.k = up(in.k.back());
      seg.v = up(in.v.back());
      in.dsegs.push_back(seg);
    }
    in.a = attention_case(c.n_heads, c.n_kv, c.dq, c.dv, c.n_q, c.q_pos0, c.window, c.nav, int(c.segs.size()), ldq,
                          int64_t(c.n_heads) * c.dv + 5);
    return in;
  }

  std::vector<float> run_cpu(const Inputs& in, const std::vector<float>& q) {
    AttentionArgs a = in.a;
    std::vector<float> out(size_t(a.n_q * a.ldo), kNaN);
    a.q = q.data();
    a.segments = in.hsegs.data();
    a.out = out.data();
    cpu_->attention(a);
    return out;
  }

  // The GPU result; expects the tensor-core kernel to have run iff want_tc.
  std::vector<float> run_gpu(const Inputs& in, bool want_tc, const std::string& what) {
    AttentionArgs a = in.a;
    const size_t n = size_t(a.n_q * a.ldo);
    float* dout = up(std::vector<float>(n, kNaN));
    a.q = up(in.q);
    a.segments = in.dsegs.data();
    a.out = dout;
    const long long before = tc_launches();
    const auto before_wg = wgmma_launches();
    gpu_->attention(a);
    std::vector<float> out = down(dout, n);
    EXPECT_EQ(tc_launches() - before, want_tc ? 1 : 0)
        << what << ": the tensor-core kernel " << (want_tc ? "did not run" : "ran") << " (routing)";
    const bool want_wg = want_tc && expect_wgmma(a.head_dim_qk, a.head_dim_v);
    const bool want_ws = want_wg && g_wgmma_mode == 2 && in.tma_pitches;
    const auto after_wg = wgmma_launches();
    EXPECT_EQ(after_wg.first - before_wg.first, want_wg ? 1 : 0)
        << what << ": a wgmma form " << (want_wg ? "did not run" : "ran") << " (routing, mode " << g_wgmma_mode << ")";
    EXPECT_EQ(after_wg.second - before_wg.second, want_ws ? 1 : 0)
        << what << ": the warp-specialised form " << (want_ws ? "did not run" : "ran") << " (routing)";
    return out;
  }

  // Per (query, head) row relative L2 errors: fails if any exceeds tol,
  // printing the worst rows (query, position, head, visible keys).
  void expect_rows_close(const TcCase& c, const std::string& what, const std::vector<float>& gpu,
                         const std::vector<float>& ref, int64_t ldo, double tol) {
    struct Row {
      double err;
      int64_t t;
      int h;
    };
    std::vector<Row> rows;
    int64_t over = 0;
    for (int64_t t = 0; t < c.n_q; ++t)
      for (int h = 0; h < c.n_heads; ++h) {
        double num = 0, den = 0;
        for (int d = 0; d < c.dv; ++d) {
          const size_t i = size_t(t * ldo + int64_t(h) * c.dv + d);
          const double diff = double(gpu[i]) - double(ref[i]);
          num += diff * diff;
          den += double(ref[i]) * double(ref[i]);
        }
        const double e = std::isnan(num) ? INFINITY : std::sqrt(num / std::max(den, 1e-300));
        rows.push_back({e, t, h});
        over += e > tol;
      }
    std::sort(rows.begin(), rows.end(), [](const Row& x, const Row& y) { return x.err > y.err; });
    std::printf("[cuda-vs-cpu] %-14s %-52s worst row %.3e (query %lld, head %d)\n", "attention_tc", what.c_str(),
                rows.empty() ? 0.0 : rows[0].err, rows.empty() ? -1LL : (long long)rows[0].t,
                rows.empty() ? -1 : rows[0].h);
    if (over == 0) return;
    std::string worst;
    for (size_t i = 0; i < std::min<size_t>(rows.size(), 5); ++i) {
      const int64_t p = c.q_pos0 + rows[i].t;
      int64_t nvis = 0;
      for (const Seg& s : c.segs)
        for (int64_t k = s.pos0; k < s.pos0 + s.count; ++k) nvis += visible(k, p, c.window, c.nav);
      worst += "\n  query " + std::to_string(rows[i].t) + " (position " + std::to_string(p) + "), head " +
               std::to_string(rows[i].h) + " (kv head " + std::to_string(rows[i].h / (c.n_heads / c.n_kv)) +
               "), " + std::to_string(nvis) + " visible keys: rel err " + std::to_string(rows[i].err);
    }
    ADD_FAILURE() << what << ": " << over << " of " << rows.size() << " rows exceed " << tol
                  << " (seed " << seed_ << "); worst:" << worst;
  }

  // Random inputs: the three-way comparison of the header.
  void check_random(const TcCase& c) {
    SCOPED_TRACE(c.name);
    const Inputs in = make(c, [&](int64_t, int64_t, bool) { return float(unit_(rng_)); });
    const std::vector<float> g = run_gpu(in, true, c.name);
    const std::vector<float> ref = run_cpu(in, in.q);
    expect_close("attention_tc", c.name + " vs fp32", g, ref, 1e-2);
    std::vector<float> qb = in.q;
    for (float& x : qb) x = round_to_bf16(x);
    const std::vector<float> ref_b = run_cpu(in, qb);
    expect_close("attention_tc_q", c.name + " vs bf16 Q", g, ref_b, 3e-3);
    expect_rows_close(c, c.name + " vs bf16 Q", g, ref_b, in.a.ldo, 1.5e-2);
    TearDown();
  }

  // K = 0, V = small integers: exact means over the visible keys.
  void check_probe(const TcCase& c) {
    SCOPED_TRACE(c.name + " (mask probe)");
    const int dv = c.dv;
    const Inputs in = make(c, [&](int64_t pos, int64_t i, bool is_v) {
      if (!is_v) return 0.0f;
      const int64_t g = i / dv, col = i % dv;
      return float((pos * 7 + col * 3 + g * 13) % 61 - 30);
    });
    const std::vector<float> g = run_gpu(in, true, c.name + " (mask probe)");
    const std::vector<float> ref = run_cpu(in, in.q);
    expect_close("attention_tc_probe", c.name, g, ref, 1e-5);
    expect_rows_close(c, c.name + " (mask probe)", g, ref, in.a.ldo, 1e-5);
    TearDown();
  }

  std::normal_distribution<float> unit_{0.0f, 1.0f};
};

// The shapes of the tests: the model's (25/5 heads, dims 64 and 64/128),
// other GQA groups, dims 128, windows narrower than a key tile, odd query
// counts, unaligned row pitches (the kernel's scalar loads).
std::vector<TcCase> cases() {
  std::vector<TcCase> v;
  for (int64_t n_q : {16, 100, 256, 1024})
    v.push_back({"1.5B sliding w1024 meta128, ring 2 pieces, n_q " + std::to_string(n_q), 25, 5, 64, 64, n_q, 3000,
                 1024, 128, sliding_segs(3000, n_q, 128, 1100)});
  for (int64_t n_q : {100, 1024})
    v.push_back({"1.5B global causal, 1500 cached, n_q " + std::to_string(n_q), 25, 5, 64, 64, n_q, 1500, -1, 0,
                 global_segs(1500, n_q)});
  v.push_back({"25/5 dq 64 dv 128 sliding w1024 meta128, n_q 333", 25, 5, 64, 128, 333, 2000, 1024, 128,
               sliding_segs(2000, 333, 128, 1100)});
  v.push_back({"25/5 dq 64 dv 128 global, n_q 1024 (first chunk + meta)", 25, 5, 64, 128, 1024, 128, -1, 0,
               global_segs(128, 1024)});
  // (64/128 more: a second warpgroup with few or no rows, a wider GQA
  // group, a window narrower than a tile, padded and odd pitches.)
  v.push_back({"25/5 64/128 sliding w1024 meta128, n_q 16", 25, 5, 64, 128, 16, 3000, 1024, 128,
               sliding_segs(3000, 16, 128, 1100)});
  v.push_back({"25/5 64/128 global causal, 1500 cached, n_q 100, pitch +8", 25, 5, 64, 128, 100, 1500, -1, 0,
               global_segs(1500, 100, 8)});
  v.push_back({"8/1 64/128 window 0 meta 3, n_q 40", 8, 1, 64, 128, 40, 10, 0, 3, sliding_segs(10, 40, 3, 7)});
  v.push_back({"10/2 64/128 window 200 meta 9, odd pitches, n_q 300", 10, 2, 64, 128, 300, 700, 200, 9,
               sliding_segs(700, 300, 9, 220, 1)});
  v.push_back({"25/5 64/128 window 100 meta 128 (meta wider than window), n_q 300", 25, 5, 64, 128, 300, 700, 100,
               128, sliding_segs(700, 300, 128, 200)});
  v.push_back({"4/1 128/128 window 300 meta 16, odd pitches, n_q 257", 4, 1, 128, 128, 257, 700, 300, 16,
               sliding_segs(700, 257, 16, 320, 1)});
  v.push_back({"8/8 64/64 global, pitch +8, n_q 1000", 8, 8, 64, 64, 1000, 500, -1, 0, global_segs(500, 1000, 8)});
  v.push_back({"8/2 128/64 window 50 meta 5, n_q 77", 8, 2, 128, 64, 77, 90, 50, 5, sliding_segs(90, 77, 5, 60)});
  v.push_back({"4/2 64/64 window 0 meta 3, n_q 40", 4, 2, 64, 64, 40, 10, 0, 3, sliding_segs(10, 40, 3, 7)});
  v.push_back({"25/5 64/64 window 100 meta 128 (meta wider than window), n_q 300", 25, 5, 64, 64, 300, 700, 100,
               128, sliding_segs(700, 300, 128, 200)});
  return v;
}

// Every case, heads 64/128 in each form: warp-specialised (the default),
// wgmma with block barriers, mma.sync.
template <typename Check>
void in_each_form(Check check) {
  TcMode mode(2);  // the tensor-core kernel wherever it applies (also for few blocks)
  for (const TcCase& c : cases()) {
    check(c);
    if (c.dq == 64 && c.dv == 128)
      for (int form : {1, 0}) {
        WgmmaMode w(form);
        check(c);
      }
  }
}

TEST_F(CudaAttentionTc, RandomInputs) {
  in_each_form([&](const TcCase& c) { check_random(c); });
}

TEST_F(CudaAttentionTc, MaskProbeExact) {
  in_each_form([&](const TcCase& c) { check_probe(c); });
}

// Which calls take the tensor-core kernel in the automatic mode: prefill with
// bf16 K/V; not decode, fp32 or f16 caches, other head dims.
TEST_F(CudaAttentionTc, Routing) {
  TcMode mode(0);
  struct R {
    TcCase c;
    bool tc;
  };
  std::vector<R> rs = {
      {{"bf16 prefill 1024", 25, 5, 64, 64, 1024, 3000, 1024, 128, sliding_segs(3000, 1024, 128, 1100)}, true},
      {{"decode (n_q 1)", 25, 5, 64, 64, 1, 3000, 1024, 128, sliding_segs(3000, 1, 128, 1100)}, false},
      {{"8 queries", 25, 5, 64, 64, 8, 3000, -1, 0, global_segs(3000, 8)}, false},
      {{"fp32 cache", 25, 5, 64, 64, 1024, 3000, -1, 0, {{0, 3000, DType::F32}, {3000, 1024, DType::F32}}}, false},
      {{"f16 cache", 25, 5, 64, 64, 1024, 3000, -1, 0, {{0, 3000, DType::F16}, {3000, 1024, DType::F32}}}, false},
      {{"head dim 80", 8, 2, 80, 80, 1024, 100, -1, 0, global_segs(100, 1024)}, false},
  };
  for (const R& r : rs) {
    SCOPED_TRACE(r.c.name);
    const Inputs in = make(r.c, [&](int64_t, int64_t, bool) { return float(unit_(rng_)); });
    const std::vector<float> g = run_gpu(in, r.tc, r.c.name);
    // (The decode case takes the decode kernel's tensor-core span, not the
    // prefill kernel: bf16 Q and probabilities as well.)
    const bool bf16_math = r.tc || (r.c.n_q == 1 && decode_takes_tensor_cores());
    expect_close("attention_route", r.c.name, g, run_cpu(in, in.q), bf16_math ? 1e-2 : 1e-5);
    TearDown();
  }
  // Mode 1: never.
  set_tc_mode(1);
  const R& r = rs[0];
  const Inputs in = make(r.c, [&](int64_t, int64_t, bool) { return float(unit_(rng_)); });
  const std::vector<float> g = run_gpu(in, false, r.c.name + ", mode 1");
  expect_close("attention_route", r.c.name + ", SIMT forced", g, run_cpu(in, in.q), 1e-5);
}

// Timing (run with --gtest_also_run_disabled_tests): an 8K prompt's last
// 2048-token chunk at the 1.5B shapes, global causal and sliding window,
// the tensor-core kernel's two forms vs the fp32 SIMT kernel on the same
// bf16 data.
TEST_F(CudaAttentionTc, DISABLED_Timing) {
  const int64_t q0 = 6144, n_q = 2048;
  std::vector<TcCase> ts = {
      {"8K global causal, 25/5, 64/64", 25, 5, 64, 64, n_q, q0, -1, 0, global_segs(q0, n_q)},
      {"8K global causal, 25/5, 64/128", 25, 5, 64, 128, n_q, q0, -1, 0, global_segs(q0, n_q)},
      {"8K sliding w1024 meta128, 25/5, 64/64", 25, 5, 64, 64, n_q, q0, 1024, 128,
       sliding_segs(q0, n_q, 128, 1100)},
      {"8K sliding w1024 meta128, 25/5, 64/128", 25, 5, 64, 128, n_q, q0, 1024, 128,
       sliding_segs(q0, n_q, 128, 1100)},
  };
  for (const TcCase& c : ts) {
    SCOPED_TRACE(c.name);
    const Inputs in = make(c, [&](int64_t, int64_t, bool) { return float(unit_(rng_)); });
    int64_t pairs = 0;  // visible (query, key) pairs per head
    for (int64_t t = 0; t < c.n_q; ++t)
      for (const Seg& s : c.segs)
        for (int64_t k = s.pos0; k < s.pos0 + s.count; ++k) pairs += visible(k, c.q_pos0 + t, c.window, c.nav);
    const double flops = 2.0 * double(pairs) * c.n_heads * (c.dq + c.dv);
    AttentionArgs a = in.a;
    const size_t n = size_t(a.n_q * a.ldo);
    a.q = up(in.q);
    a.segments = in.dsegs.data();
    // The forms: 0 warp-specialised wgmma, 1 wgmma with block barriers
    // (both, where not built, the same as 2), 2 mma.sync, 3 fp32 SIMT.
    double ms[4];
    float* outs[4];
    for (int form = 0; form < 4; ++form) {
      TcMode m(form == 3 ? 1 : 2);
      WgmmaMode w(form == 0 ? 2 : form == 1 ? 1 : 0);
      outs[form] = up(std::vector<float>(n, kNaN));
      a.out = outs[form];
      for (int i = 0; i < 2; ++i) gpu_->attention(a);  // warm-up
      gpu_->synchronize();
      const int reps = 10;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < reps; ++i) gpu_->attention(a);
      gpu_->synchronize();
      ms[form] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
    }
    std::printf(
        "[ timing   ] %-40s wgmma ws %7.3f ms %6.1f TFLOP/s | wgmma %7.3f ms %6.1f | mma.sync %7.3f ms %6.1f | "
        "fp32 SIMT %7.3f ms %6.1f\n",
        c.name.c_str(), ms[0], flops / ms[0] * 1e-9, ms[1], flops / ms[1] * 1e-9, ms[2], flops / ms[2] * 1e-9, ms[3],
        flops / ms[3] * 1e-9);
    for (int form = 0; form < 3; ++form)
      expect_close("attention_tc_vs_simt", c.name + " form " + std::to_string(form), down(outs[form], n),
                   down(outs[3], n), 1e-2);
    TearDown();
  }
}

}  // namespace
}  // namespace cuda_test
}  // namespace hymba
