// The CPU kernels of backend/cpu/kernels.h (all but matmul, which
// test_matmul.cpp covers) and the vector math of vecmath.h, each against a
// naive double-precision reference written here from the op contract
// (backend/ops.h) and spec section 4. Inputs are fresh random values from
// fixed seeds; shapes include odd sizes and leading dimensions wider than
// the data (whose padding must stay untouched); every kernel runs with 1 and
// 2 OpenMP threads and must meet the same tolerance with both.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/cpu/vecmath.h"
#include "util/dtype.h"
#include "util/error.h"

namespace hymba {
namespace {

// Written into padding columns; a kernel that writes past its width changes it.
constexpr float kSentinel = -12345.678f;

std::vector<float> randn(size_t n, std::mt19937& rng, float mean = 0.0f, float stddev = 1.0f) {
  std::normal_distribution<float> d(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

std::vector<float> uniform(size_t n, std::mt19937& rng, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Runs body() once with 1 and once with 2 OpenMP threads, then restores the
// previous setting (other tests share the process).
template <class F>
void for_thread_counts(F&& body) {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    SCOPED_TRACE("OpenMP threads = " + std::to_string(threads));
    body();
  }
  omp_set_num_threads(saved);
}

// Checks that columns [width, ld) of every row still hold the sentinel.
void expect_padding_untouched(const std::vector<float>& buf, int64_t rows, int64_t width, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = width; c < ld; ++c)
      ASSERT_EQ(buf[size_t(r * ld + c)], kSentinel) << "padding written at row " << r << " col " << c;
}

double silu_ref(double x) { return x / (1.0 + std::exp(-x)); }

double softplus_ref(double v) { return v > 20.0 ? v : std::log1p(std::exp(v)); }

// Decoders for 16-bit storage written here (not util/dtype), so a wrong
// conversion in the engine cannot hide behind an equally wrong reference.
double bf16_bits_value(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

double f16_bits_value(uint16_t h) {
  const int sign = (h & 0x8000) ? -1 : 1;
  const int e = (h >> 10) & 0x1f;
  const int m = h & 0x3ff;
  if (e == 0) return sign * std::ldexp(double(m), -24);  // subnormal: m * 2^-24
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  return sign * std::ldexp(1.0 + m / 1024.0, e - 15);
}

// A row-major buffer of n rows x ld columns of one dtype, with the value each
// stored element represents (for the reference).
struct Stored {
  DType dtype = DType::F32;
  std::vector<uint8_t> bytes;
  std::vector<double> value;
};

Stored store_as(const std::vector<float>& src, DType dt) {
  Stored s;
  s.dtype = dt;
  s.bytes.resize(src.size() * dtype_size(dt));
  s.value.resize(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (dt == DType::F32) {
      std::memcpy(s.bytes.data() + 4 * i, &src[i], 4);
      s.value[i] = src[i];
    } else {
      const uint16_t h = dt == DType::BF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
      std::memcpy(s.bytes.data() + 2 * i, &h, 2);
      s.value[i] = dt == DType::BF16 ? bf16_bits_value(h) : f16_bits_value(h);
    }
  }
  return s;
}

// ------------------------------------------------------------------ rmsnorm

struct NormShape {
  int64_t n, d, ldx, ldy;
  float scale;  // input magnitude: small values make eps matter
};

TEST(KernelRmsnorm, MatchesDoubleReference) {
  const NormShape shapes[] = {{1, 1, 1, 1, 1.0f},      {3, 7, 9, 8, 1.0f},     {5, 64, 70, 64, 3.0f},
                              {4, 1600, 1600, 1601, 1.0f}, {17, 33, 40, 35, 1e-3f}, {2, 5, 5, 6, 0.0f}};
  std::mt19937 rng(101);
  for (const NormShape& s : shapes) {
    SCOPED_TRACE("n=" + std::to_string(s.n) + " d=" + std::to_string(s.d));
    std::vector<float> x = randn(size_t(s.n * s.ldx), rng, 0.0f, s.scale);
    const std::vector<float> w = randn(size_t(s.d), rng, 1.0f, 0.5f);
    const float eps = 1e-6f;
    // Reference in double: y = x / sqrt(mean(x^2) + eps) * w.
    std::vector<double> ref(size_t(s.n * s.d));
    for (int64_t t = 0; t < s.n; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < s.d; ++i) ss += double(x[t * s.ldx + i]) * x[t * s.ldx + i];
      const double inv = 1.0 / std::sqrt(ss / double(s.d) + double(eps));
      for (int64_t i = 0; i < s.d; ++i) ref[t * s.d + i] = double(x[t * s.ldx + i]) * inv * w[i];
    }
    for_thread_counts([&] {
      std::vector<float> y(size_t(s.n * s.ldy), kSentinel);
      cpu::rmsnorm(x.data(), s.n, s.d, s.ldx, w.data(), eps, y.data(), s.ldy);
      for (int64_t t = 0; t < s.n; ++t)
        for (int64_t i = 0; i < s.d; ++i) {
          // The statistic is summed in double; each output is then a couple
          // of fp32 roundings away from exact: 1e-6 relative is ample.
          const double r = ref[t * s.d + i];
          ASSERT_NEAR(y[t * s.ldy + i], r, 1e-6 * std::fabs(r) + 1e-30) << "t=" << t << " i=" << i;
        }
      expect_padding_untouched(y, s.n, s.d, s.ldy);
    });
  }
}

TEST(KernelRmsnorm, InPlace) {
  // The model normalises some buffers in place (y == x).
  std::mt19937 rng(102);
  const int64_t n = 3, d = 19, ld = 23;
  std::vector<float> x = randn(size_t(n * ld), rng);
  const std::vector<float> w = randn(size_t(d), rng, 1.0f, 0.2f);
  std::vector<double> ref(size_t(n * d));
  for (int64_t t = 0; t < n; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(x[t * ld + i]) * x[t * ld + i];
    for (int64_t i = 0; i < d; ++i) ref[t * d + i] = x[t * ld + i] / std::sqrt(ss / d + 1e-5) * w[i];
  }
  cpu::rmsnorm(x.data(), n, d, ld, w.data(), 1e-5f, x.data(), ld);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < d; ++i) EXPECT_NEAR(x[t * ld + i], ref[t * d + i], 1e-6 * std::fabs(ref[t * d + i]));
}

// --------------------------------------------------------------------- rope

TEST(KernelRope, TablesUseFp32Angle) {
  // cos/sin must be of the fp32 product float(pos) * inv_freq (the
  // reference's angle), not of the exact product: at large positions the two
  // differ by up to ~4e-3 rad, far beyond the 1-ulp tolerance used here.
  std::mt19937 rng(201);
  struct Case { int64_t pos0, n; int half; };
  const Case cases[] = {{0, 1, 1}, {0, 7, 32}, {5, 3, 3}, {8191, 4, 32}, {100003, 5, 17}, {262100, 2, 32}};
  for (const Case& c : cases) {
    SCOPED_TRACE("pos0=" + std::to_string(c.pos0) + " half=" + std::to_string(c.half));
    std::vector<float> inv(size_t(c.half));
    // Realistic frequencies (base' of spec 4.5) with random jitter so that
    // the fp32 products are rarely exact.
    for (int i = 0; i < c.half; ++i)
      inv[i] = float(std::pow(74534.83, -double(i) / c.half) *
                     (1.0 + 1e-3 * std::uniform_real_distribution<>(-1, 1)(rng)));
    std::vector<float> cs(size_t(c.n * c.half), kSentinel), sn(size_t(c.n * c.half), kSentinel);
    cpu::rope_tables(c.pos0, c.n, inv.data(), c.half, cs.data(), sn.data());
    for (int64_t t = 0; t < c.n; ++t)
      for (int i = 0; i < c.half; ++i) {
        const float angle = float(c.pos0 + t) * inv[i];  // fp32 product
        // 6e-8 = one ulp of values in [0.5, 1): the result must be (nearly)
        // correctly rounded.
        ASSERT_NEAR(cs[t * c.half + i], std::cos(double(angle)), 6e-8) << "t=" << t << " i=" << i;
        ASSERT_NEAR(sn[t * c.half + i], std::sin(double(angle)), 6e-8) << "t=" << t << " i=" << i;
      }
  }
}

TEST(KernelRope, RotateHalfMatchesReference) {
  std::mt19937 rng(202);
  struct Case { int64_t n, extra_ld; int heads, head_dim; };
  const Case cases[] = {{1, 0, 1, 2}, {3, 5, 3, 8}, {9, 1, 5, 64}, {6, 7, 25, 64}, {4, 0, 2, 14}};
  for (const Case& c : cases) {
    SCOPED_TRACE("n=" + std::to_string(c.n) + " heads=" + std::to_string(c.heads) +
                 " head_dim=" + std::to_string(c.head_dim));
    const int half = c.head_dim / 2;
    const int64_t width = int64_t(c.heads) * c.head_dim, ld = width + c.extra_ld;
    std::vector<float> x0 = randn(size_t(c.n * ld), rng);
    for (int64_t t = 0; t < c.n; ++t)
      for (int64_t j = width; j < ld; ++j) x0[t * ld + j] = kSentinel;
    // Tables from angles computed here (any unit cos/sin pairs will do).
    std::vector<float> cs(size_t(c.n * half)), sn(size_t(c.n * half));
    for (size_t i = 0; i < cs.size(); ++i) {
      const double a = std::uniform_real_distribution<>(-10, 10)(rng);
      cs[i] = float(std::cos(a));
      sn[i] = float(std::sin(a));
    }
    for_thread_counts([&] {
      std::vector<float> x = x0;
      cpu::rope(x.data(), c.n, ld, c.heads, c.head_dim, cs.data(), sn.data());
      for (int64_t t = 0; t < c.n; ++t)
        for (int h = 0; h < c.heads; ++h)
          for (int i = 0; i < half; ++i) {
            const int64_t o = t * ld + int64_t(h) * c.head_dim;
            const double a = x0[o + i], b = x0[o + i + half];
            const double co = cs[t * half + i], si = sn[t * half + i];
            // x'[i] = a cos - b sin, x'[i+half] = b cos + a sin. Two fp32
            // products and a sum: error a few 1e-8 of |a|+|b|.
            const double mag = std::fabs(a) + std::fabs(b);
            ASSERT_NEAR(x[o + i], a * co - b * si, 1e-6 * mag) << "t=" << t << " h=" << h << " i=" << i;
            ASSERT_NEAR(x[o + i + half], b * co + a * si, 1e-6 * mag) << "t=" << t << " h=" << h << " i=" << i;
          }
      expect_padding_untouched(x, c.n, width, ld);
    });
  }
}

// ---------------------------------------------------------------- attention

struct SegSpec {
  int64_t pos0, count;
  DType dtype;
  int64_t pad;  // ld_k = kv_k + pad, ld_v = kv_v + 2*pad
};

struct AttnCase {
  std::string name;
  int n_heads, n_kv_heads, dq, dv;
  int64_t n_q, q_pos0, window, n_always_visible;
  std::vector<SegSpec> segs;
  float q_scale = 1.0f;  // > 1: large logits (softmax must subtract the max)
};

void run_attention_case(const AttnCase& c, uint32_t seed) {
  SCOPED_TRACE(c.name);
  std::mt19937 rng(seed);
  const int64_t kv_k = int64_t(c.n_kv_heads) * c.dq, kv_v = int64_t(c.n_kv_heads) * c.dv;
  const int64_t q_w = int64_t(c.n_heads) * c.dq, ldq = q_w + 3;
  const int64_t o_w = int64_t(c.n_heads) * c.dv, ldo = o_w + 5;
  const std::vector<float> q = randn(size_t(c.n_q * ldq), rng, 0.0f, c.q_scale);
  const float scale = 1.0f / std::sqrt(float(c.dq));

  // Segment storage: random keys/values, stored in the segment's dtype.
  std::vector<Stored> ks, vs;
  std::vector<KVSegment> segs;
  for (const SegSpec& s : c.segs) {
    const int64_t ldk = kv_k + s.pad, ldv = kv_v + 2 * s.pad;
    ks.push_back(store_as(randn(size_t(s.count * ldk), rng), s.dtype));
    vs.push_back(store_as(randn(size_t(s.count * ldv), rng), s.dtype));
  }
  for (size_t i = 0; i < c.segs.size(); ++i) {
    const SegSpec& s = c.segs[i];
    KVSegment seg;
    seg.k = ks[i].bytes.data();
    seg.v = vs[i].bytes.data();
    seg.dtype = s.dtype;
    seg.ld_k = kv_k + s.pad;
    seg.ld_v = kv_v + 2 * s.pad;
    seg.pos0 = s.pos0;
    seg.count = s.count;
    segs.push_back(seg);
  }

  // Reference (double): for each query position and head, softmax over every
  // visible key of every segment; GQA maps head h to kv head h / group.
  const int group = c.n_heads / c.n_kv_heads;
  std::vector<double> ref(size_t(c.n_q * o_w)), tol(size_t(c.n_q * o_w));
  for (int64_t t = 0; t < c.n_q; ++t) {
    const int64_t p = c.q_pos0 + t;
    for (int h = 0; h < c.n_heads; ++h) {
      const int g = h / group;
      std::vector<double> score, score_mag;
      std::vector<const double*> vrow;
      for (size_t si = 0; si < c.segs.size(); ++si) {
        const SegSpec& s = c.segs[si];
        for (int64_t r = 0; r < s.count; ++r) {
          const int64_t k = s.pos0 + r;
          const bool visible =
              k <= p && (c.window < 0 || p - k <= c.window || k < c.n_always_visible);
          if (!visible) continue;
          const double* kr = ks[si].value.data() + r * segs[si].ld_k + int64_t(g) * c.dq;
          double dot = 0, mag = 0;
          for (int i = 0; i < c.dq; ++i) {
            dot += double(q[t * ldq + int64_t(h) * c.dq + i]) * kr[i];
            mag += std::fabs(double(q[t * ldq + int64_t(h) * c.dq + i]) * kr[i]);
          }
          score.push_back(dot * scale);
          score_mag.push_back(mag * scale);
          vrow.push_back(vs[si].value.data() + r * segs[si].ld_v + int64_t(g) * c.dv);
        }
      }
      ASSERT_FALSE(score.empty()) << "test case must give every query a visible key";
      const double mx = *std::max_element(score.begin(), score.end());
      const double max_mag = *std::max_element(score_mag.begin(), score_mag.end());
      double sum = 0;
      for (double& s : score) sum += (s = std::exp(s - mx));
      for (int i = 0; i < c.dv; ++i) {
        double o = 0, omag = 0;
        for (size_t k = 0; k < score.size(); ++k) {
          o += score[k] / sum * vrow[k][i];
          omag += score[k] / sum * std::fabs(vrow[k][i]);
        }
        ref[t * o_w + int64_t(h) * c.dv + i] = o;
        // fp32 scores err by ~1e-7 of sum|q_i k_i| (shifting the softmax
        // weights by that relative amount), fp32 exp/normalisation and the
        // fp32 weighted sum over up to a few hundred keys add ~1e-6 of
        // sum_k w_k |v_k|; 1e-5 of that plus 1e-6 per unit of score
        // magnitude leaves a margin without hiding a wrong mask or weight.
        tol[t * o_w + int64_t(h) * c.dv + i] = omag * (1e-5 + 1e-6 * max_mag);
      }
    }
  }

  AttentionArgs a;
  a.q = q.data();
  a.ldq = ldq;
  a.n_q = c.n_q;
  a.q_pos0 = c.q_pos0;
  a.n_heads = c.n_heads;
  a.n_kv_heads = c.n_kv_heads;
  a.head_dim_qk = c.dq;
  a.head_dim_v = c.dv;
  a.segments = segs.data();
  a.n_segments = int(segs.size());
  a.window = c.window;
  a.n_always_visible = c.n_always_visible;
  a.scale = scale;
  a.ldo = ldo;
  for_thread_counts([&] {
    std::vector<float> out(size_t(c.n_q * ldo), kSentinel);
    a.out = out.data();
    cpu::attention(a);
    for (int64_t t = 0; t < c.n_q; ++t)
      for (int64_t j = 0; j < o_w; ++j)
        ASSERT_NEAR(out[t * ldo + j], ref[t * o_w + j], tol[t * o_w + j])
            << "query " << t << " (pos " << c.q_pos0 + t << ") head " << j / c.dv << " elem " << j % c.dv;
    expect_padding_untouched(out, c.n_q, o_w, ldo);
  });
}

TEST(KernelAttention, GlobalMhaPrefill) {
  run_attention_case({"mha causal prefill, one F32 segment", 3, 3, 16, 16, 9, 0, -1, 0,
                      {{0, 9, DType::F32, 5}}},
                     301);
}

TEST(KernelAttention, GqaChunkAfterCache) {
  // n_q > 1 at q_pos0 > 0: a BF16 cache segment plus the chunk's own F32 K/V;
  // head_dim_v != head_dim_qk.
  run_attention_case({"gqa chunk after cache", 6, 2, 8, 24, 5, 11, -1, 0,
                      {{0, 11, DType::BF16, 0}, {11, 5, DType::F32, 7}}},
                     302);
}

TEST(KernelAttention, FutureKeysInSegmentAreMasked) {
  // One segment holding keys past every query: k <= p must exclude them.
  run_attention_case({"future keys masked", 4, 2, 6, 10, 2, 5, -1, 0, {{0, 12, DType::F32, 1}}}, 303);
}

TEST(KernelAttention, GlobalOutOfOrderMixedDtypeSegments) {
  run_attention_case({"global, out-of-order F16/F32/BF16 segments", 4, 2, 32, 16, 4, 40, -1, 0,
                      {{20, 20, DType::F16, 2}, {0, 20, DType::F32, 0}, {40, 4, DType::BF16, 3}}},
                     304);
}

TEST(KernelAttention, MqaWindowWithMetaAndRing) {
  // The sliding-layer shape: pinned meta [0,3) (F16), the ring in two
  // out-of-order pieces [14,17) then [9,14) (BF16), the chunk [17,20) (F32).
  // Window 5: position 17 sees 0..2 and 12..17, not 9..11.
  run_attention_case({"mqa window + meta + ring", 4, 1, 12, 20, 3, 17, 5, 3,
                      {{0, 3, DType::F16, 1}, {14, 3, DType::BF16, 0}, {9, 5, DType::BF16, 2},
                       {17, 3, DType::F32, 4}}},
                     305);
}

TEST(KernelAttention, WindowOverlappingMetaPrefill) {
  // Prefill from position 0 with window 4 and 3 always-visible positions:
  // early queries see everything, later ones the meta prefix plus the
  // window; odd head dims.
  run_attention_case({"window overlapping meta", 2, 2, 5, 3, 20, 0, 4, 3, {{0, 20, DType::F32, 1}}}, 306);
}

TEST(KernelAttention, WindowZeroSeesSelfAndMeta) {
  run_attention_case({"window 0", 3, 1, 4, 6, 4, 6, 0, 2, {{0, 6, DType::F16, 0}, {6, 4, DType::F32, 0}}},
                     307);
}

TEST(KernelAttention, WindowWithoutMeta) {
  run_attention_case({"window 7, no meta", 2, 1, 9, 7, 6, 30, 7, 0,
                      {{25, 5, DType::BF16, 0}, {13, 12, DType::BF16, 1}, {30, 6, DType::F32, 0}}},
                     308);
}

TEST(KernelAttention, WindowLargerThanHistory) {
  run_attention_case({"window beyond history", 2, 1, 16, 16, 8, 0, 1000, 4, {{0, 8, DType::F32, 0}}}, 309);
}

TEST(KernelAttention, DecodeHymbaShapeLargeLogits) {
  // 25 query heads over 5 kv heads, 64/128 head dims as Hymba-1.5B; one query
  // at position 300, window 100, 16 meta positions, keys 150..199 present but
  // outside the window; q scaled x8 so scores reach the hundreds and the
  // softmax must subtract its max.
  run_attention_case({"decode 1.5B shape, large logits", 25, 5, 64, 128, 1, 300, 100, 16,
                      {{0, 16, DType::BF16, 0}, {280, 21, DType::BF16, 0}, {150, 130, DType::BF16, 0}}, 8.0f},
                     310);
}

TEST(KernelAttention, DecodeLongContextSplitsKeyBlocks) {
  // Hymba-1.5B's sliding layer at decode: 128 pinned meta positions, a full
  // 1024-position ring in two pieces and the new token; several key blocks,
  // so with 2+ threads the keys are split between work items whose partial
  // softmax states must merge exactly.
  run_attention_case({"decode, meta + wrapped ring, window 1024", 25, 5, 64, 128, 1, 3000, 1024, 128,
                      {{0, 128, DType::BF16, 0}, {2400, 600, DType::BF16, 0}, {1976, 424, DType::BF16, 0},
                       {3000, 1, DType::F32, 0}}},
                     312);
  run_attention_case({"decode, global, 2000 keys", 4, 2, 32, 48, 1, 1999, -1, 0, {{0, 2000, DType::F32, 0}}}, 313);
}

TEST(KernelAttention, PrefillManyKeyBlocksOnlineSoftmax) {
  // 40 queries after 300 cached positions: every query walks several key
  // blocks and the causal edge falls inside a block.
  run_attention_case({"prefill across key blocks", 6, 3, 16, 24, 40, 300, -1, 0,
                      {{0, 300, DType::BF16, 0}, {300, 40, DType::F32, 0}}},
                     314);
}

// The decode path (n_q <= 16, head dims multiples of 16): a work item is a
// share of the keys for all kv heads, walked in blocks of 64 keys, with V read
// straight from the segment; items' softmax states are merged.

TEST(KernelAttention, DecodePathHymbaSegmentsFewQueries) {
  // Meta (BF16) + wrapped ring in two pieces (BF16, counts not multiples of
  // 16 or 64) + the chunk's own K/V (F32, padded rows), window 200: the
  // window's edge falls inside a key block and differs per query.
  for (int64_t n_q : {1, 2, 3}) {
    const int64_t p0 = 700;
    run_attention_case({"decode path, n_q = " + std::to_string(n_q), 25, 5, 64, 128, n_q, p0, 200, 128,
                        {{0, 128, DType::BF16, 0}, {601, 99, DType::BF16, 0}, {420, 181, DType::BF16, 0},
                         {p0, n_q, DType::F32, 9}}, 4.0f},
                       uint32_t(320 + n_q));
  }
}

TEST(KernelAttention, DecodePathDtypesAndPaddedRows) {
  // F16 and F32 cache segments with padded rows (ld > heads * dim), MQA and
  // plain MHA groups, equal head dims.
  run_attention_case({"decode path, F16 + F32, gqa", 8, 2, 32, 32, 1, 150, -1, 0,
                      {{0, 77, DType::F16, 3}, {77, 73, DType::F32, 1}, {150, 1, DType::F32, 5}}},
                     330);
  run_attention_case({"decode path, mqa, n_q 2", 6, 1, 16, 48, 2, 90, 30, 5,
                      {{0, 90, DType::F16, 0}, {90, 2, DType::F32, 0}}},
                     331);
  run_attention_case({"decode path, mha, bf16, 3 queries", 4, 4, 48, 16, 3, 333, -1, 0,
                      {{100, 233, DType::BF16, 2}, {0, 100, DType::F16, 0}, {333, 3, DType::F32, 0}}},
                     332);
}

TEST(KernelAttention, DecodePathFewKeysAndTinyBlocks) {
  // Fewer keys than a block, and single-key segments: every block is a tail.
  run_attention_case({"decode path, 5 keys", 10, 5, 16, 16, 1, 4, -1, 0,
                      {{0, 1, DType::BF16, 0}, {1, 3, DType::F16, 0}, {4, 1, DType::F32, 0}}},
                     333);
  run_attention_case({"decode path, window 0 with meta", 4, 2, 32, 32, 2, 50, 0, 3,
                      {{0, 50, DType::BF16, 0}, {50, 2, DType::F32, 0}}},
                     334);
}

TEST(KernelAttention, DecodePathLargestQueryCountAndBeyond) {
  // 16 queries (the most the decode path takes) and 17 (the per-head path),
  // causal edge and window edge inside the chunk, wrapped ring.
  for (int64_t n_q : {16, 17}) {
    const int64_t p0 = 400;
    run_attention_case({"n_q = " + std::to_string(n_q), 25, 5, 64, 128, n_q, p0, 150, 128,
                        {{0, 128, DType::BF16, 0}, {300, 100, DType::BF16, 0}, {200, 100, DType::BF16, 0},
                         {p0, n_q, DType::F32, 0}}},
                       uint32_t(340 + n_q));
  }
}

TEST(KernelAttention, MhaManyQueriesGlobal) {
  run_attention_case({"mha 33 queries", 5, 5, 7, 9, 33, 3, -1, 0,
                      {{0, 3, DType::F16, 0}, {3, 33, DType::F32, 2}}},
                     311);
}

// ------------------------------------------------------------ causal conv

struct ConvRef {
  std::vector<double> y, mag;   // [n, channels]; mag = |bias| + sum |w x|
  std::vector<float> state;     // [k_width-1, channels] after the call
};

// xi_t[c] = bias[c] + sum_k w[c,k] * seq[t + k][c], seq = old state ++ x.
ConvRef conv_reference(const std::vector<float>& x, int64_t n, int64_t ldx, int64_t ch,
                       const std::vector<float>& w, const std::vector<float>& bias, int kw,
                       const std::vector<float>& state0) {
  const int hist = kw - 1;
  std::vector<float> seq(size_t((hist + n) * ch));
  for (int64_t j = 0; j < hist; ++j)
    for (int64_t c = 0; c < ch; ++c) seq[j * ch + c] = state0[j * ch + c];
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < ch; ++c) seq[(hist + t) * ch + c] = x[t * ldx + c];
  ConvRef r;
  r.y.resize(size_t(n * ch));
  r.mag.resize(size_t(n * ch));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < ch; ++c) {
      double s = bias[c], m = std::fabs(bias[c]);
      for (int k = 0; k < kw; ++k) {
        const double term = double(w[c * kw + k]) * seq[(t + k) * ch + c];
        s += term;
        m += std::fabs(term);
      }
      r.y[t * ch + c] = silu_ref(s);
      r.mag[t * ch + c] = m;
    }
  r.state.assign(seq.end() - hist * ch, seq.end());
  return r;
}

void expect_conv_close(const std::vector<float>& y, int64_t ldy, const ConvRef& r, int64_t n, int64_t ch) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < ch; ++c) {
      // At most k_width+1 fp32 additions (~4e-7 of the terms' magnitude),
      // silu's slope <= 1.1 and its own few-1e-7 error: 1e-6 is ample.
      const double ref = r.y[t * ch + c];
      ASSERT_NEAR(y[t * ldy + c], ref, 1e-6 * r.mag[t * ch + c] + 1e-6 * std::fabs(ref) + 1e-30)
          << "t=" << t << " c=" << c;
    }
}

// [channels][k] (checkpoint) -> [k][channels] (the kernel's contract).
std::vector<float> taps_major(const std::vector<float>& w, int64_t ch, int kw) {
  std::vector<float> t(w.size());
  for (int64_t c = 0; c < ch; ++c)
    for (int k = 0; k < kw; ++k) t[size_t(k * ch + c)] = w[size_t(c * kw + k)];
  return t;
}

struct ConvShape {
  int64_t ch;
  int kw;
  int64_t n;
};
const ConvShape kConvShapes[] = {{1, 4, 1}, {5, 4, 9}, {37, 4, 23}, {64, 2, 7}, {33, 1, 5}, {19, 5, 3}, {200, 4, 16}};

TEST(KernelCausalConv, OneCallMatchesReference) {
  std::mt19937 rng(401);
  for (const ConvShape& s : kConvShapes) {
    SCOPED_TRACE("channels=" + std::to_string(s.ch) + " k=" + std::to_string(s.kw) + " n=" + std::to_string(s.n));
    const int64_t ldx = s.ch + 3, ldy = s.ch + 5;
    const std::vector<float> x = randn(size_t(s.n * ldx), rng);
    const std::vector<float> w = randn(size_t(s.ch * s.kw), rng, 0.0f, 0.5f);  // checkpoint layout [c][k]
    const std::vector<float> wt = taps_major(w, s.ch, s.kw);                    // the kernel's layout
    const std::vector<float> bias = randn(size_t(s.ch), rng, 0.0f, 0.3f);
    // A non-zero initial state: the history before this call must be used.
    const std::vector<float> state0 = randn(size_t((s.kw - 1) * s.ch), rng);
    const ConvRef r = conv_reference(x, s.n, ldx, s.ch, w, bias, s.kw, state0);
    for_thread_counts([&] {
      std::vector<float> state = state0;
      std::vector<float> y(size_t(s.n * ldy), kSentinel);
      cpu::causal_conv_silu(x.data(), s.n, ldx, s.ch, wt.data(), bias.data(), s.kw, state.data(), y.data(), ldy);
      expect_conv_close(y, ldy, r, s.n, s.ch);
      expect_padding_untouched(y, s.n, s.ch, ldy);
      // The new state is a plain copy of the last k_width-1 inputs: exact.
      EXPECT_EQ(state, r.state);
    });
  }
}

TEST(KernelCausalConv, StateCarriesAcrossCalls) {
  // One call over n tokens == consecutive calls over pieces, including
  // pieces shorter than k_width-1 (the state must shift, not be replaced)
  // and an empty piece.
  std::mt19937 rng(402);
  const std::vector<std::vector<int64_t>> piece_lists = {
      {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, {2, 1, 0, 5, 1, 3}, {1, 2, 9}, {7, 1, 2, 2}};
  for (const ConvShape& s : kConvShapes) {
    for (const auto& pieces : piece_lists) {
      int64_t n = 0;
      for (int64_t p : pieces) n += p;
      SCOPED_TRACE("channels=" + std::to_string(s.ch) + " k=" + std::to_string(s.kw) + " n=" + std::to_string(n));
      const int64_t ldx = s.ch + 2, ldy = s.ch + 1;
      const std::vector<float> x = randn(size_t(n * ldx), rng);
      const std::vector<float> w = randn(size_t(s.ch * s.kw), rng, 0.0f, 0.5f);  // checkpoint layout [c][k]
      const std::vector<float> wt = taps_major(w, s.ch, s.kw);                    // the kernel's layout
      const std::vector<float> bias = randn(size_t(s.ch), rng, 0.0f, 0.3f);
      const std::vector<float> state0 = randn(size_t((s.kw - 1) * s.ch), rng);
      const ConvRef r = conv_reference(x, n, ldx, s.ch, w, bias, s.kw, state0);
      for_thread_counts([&] {
        std::vector<float> state = state0;
        std::vector<float> y(size_t(n * ldy), kSentinel);
        int64_t t0 = 0;
        for (int64_t p : pieces) {
          cpu::causal_conv_silu(x.data() + t0 * ldx, p, ldx, s.ch, wt.data(), bias.data(), s.kw, state.data(),
                                y.data() + t0 * ldy, ldy);
          t0 += p;
        }
        expect_conv_close(y, ldy, r, n, s.ch);
        expect_padding_untouched(y, n, s.ch, ldy);
        EXPECT_EQ(state, r.state);
      });
    }
  }
}

// ---------------------------------------------------------- selective scan

struct ScanData {
  int64_t n, ch, N;
  int64_t ldu, ldd, ldb, ldc, ldz, ldy;
  std::vector<float> u, delta, B, C, z, dt_bias, A, D, state0;
};

// Random inputs at realistic scales: dt_bias as Mamba's init (softplus^-1
// of dt in [1e-3, 0.1]), A = -(1..N) scaled randomly, D around 1.
ScanData make_scan(int64_t n, int64_t ch, int64_t N, std::mt19937& rng) {
  ScanData d{n, ch, N, ch + 1, ch + 3, N + 2, N + 5, ch + 7, ch + 4, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  d.u = randn(size_t(n * d.ldu), rng);
  d.delta = randn(size_t(n * d.ldd), rng);
  d.B = randn(size_t(n * d.ldb), rng);
  d.C = randn(size_t(n * d.ldc), rng);
  d.z = randn(size_t(n * d.ldz), rng, 0.0f, 2.0f);
  d.dt_bias.resize(size_t(ch));
  for (float& b : d.dt_bias) {
    const double dt = std::exp(std::uniform_real_distribution<>(std::log(1e-3), std::log(0.1))(rng));
    b = float(dt + std::log(-std::expm1(-dt)));
  }
  d.A.resize(size_t(ch * N));
  for (int64_t c = 0; c < ch; ++c)
    for (int64_t s = 0; s < N; ++s)
      d.A[c * N + s] = -float(s + 1) * std::uniform_real_distribution<float>(0.5f, 2.0f)(rng);
  d.D = randn(size_t(ch), rng, 1.0f, 0.5f);
  d.state0 = randn(size_t(ch * N), rng);
  return d;
}

struct ScanRef {
  std::vector<double> y, ymag;  // [n, ch]
  std::vector<double> h, hmag;  // [ch, N] final state and the magnitude bound
};

// The recurrence of ops.h ScanArgs, in double. hmag follows the same
// recurrence on absolute values: it bounds |h| and scales the rounding error.
ScanRef scan_reference(const ScanData& d) {
  ScanRef r;
  r.y.resize(size_t(d.n * d.ch));
  r.ymag.resize(size_t(d.n * d.ch));
  r.h.assign(d.state0.begin(), d.state0.end());
  r.hmag.resize(r.h.size());
  for (size_t i = 0; i < r.h.size(); ++i) r.hmag[i] = std::fabs(r.h[i]);
  for (int64_t t = 0; t < d.n; ++t)
    for (int64_t c = 0; c < d.ch; ++c) {
      const double dt = softplus_ref(double(d.delta[t * d.ldd + c]) + d.dt_bias[c]);
      const double u = d.u[t * d.ldu + c];
      double y = 0, ym = 0;
      for (int64_t s = 0; s < d.N; ++s) {
        double& h = r.h[c * d.N + s];
        double& hm = r.hmag[c * d.N + s];
        const double decay = std::exp(dt * d.A[c * d.N + s]);
        const double inc = dt * d.B[t * d.ldb + s] * u;
        h = decay * h + inc;
        hm = decay * hm + std::fabs(inc);
        y += d.C[t * d.ldc + s] * h;
        ym += std::fabs(d.C[t * d.ldc + s]) * hm;
      }
      const double g = silu_ref(d.z[t * d.ldz + c]);
      r.y[t * d.ch + c] = (y + d.D[c] * u) * g;
      r.ymag[t * d.ch + c] = (ym + std::fabs(d.D[c] * u)) * std::fabs(g);
    }
  return r;
}

// Runs the scan over the given pieces of d's tokens, carrying the state.
void run_scan(const ScanData& d, const std::vector<int64_t>& pieces, std::vector<float>& state, std::vector<float>& y) {
  int64_t t0 = 0;
  for (int64_t p : pieces) {
    ScanArgs a;
    a.u = d.u.data() + t0 * d.ldu;
    a.ldu = d.ldu;
    a.delta = d.delta.data() + t0 * d.ldd;
    a.ld_delta = d.ldd;
    a.B = d.B.data() + t0 * d.ldb;
    a.ldb = d.ldb;
    a.C = d.C.data() + t0 * d.ldc;
    a.ldc = d.ldc;
    a.z = d.z.data() + t0 * d.ldz;
    a.ldz = d.ldz;
    a.dt_bias = d.dt_bias.data();
    a.A = d.A.data();
    a.D = d.D.data();
    a.state = state.data();
    a.y = y.data() + t0 * d.ldy;
    a.ldy = d.ldy;
    a.n = p;
    a.channels = d.ch;
    a.d_state = d.N;
    cpu::selective_scan(a);
    t0 += p;
  }
}

void expect_scan_close(const ScanData& d, const ScanRef& r, const std::vector<float>& state,
                       const std::vector<float>& y) {
  // Per step a handful of fp32 roundings (~4e-7 of the magnitudes) that the
  // decay exp(dt*A) < 1 keeps from compounding; over the <= 40 steps used
  // here the error stays well under 1e-5 of the absolute-value recurrence.
  for (int64_t t = 0; t < d.n; ++t)
    for (int64_t c = 0; c < d.ch; ++c)
      ASSERT_NEAR(y[t * d.ldy + c], r.y[t * d.ch + c], 1e-5 * r.ymag[t * d.ch + c] + 1e-30)
          << "y at t=" << t << " c=" << c;
  for (int64_t c = 0; c < d.ch; ++c)
    for (int64_t s = 0; s < d.N; ++s)
      ASSERT_NEAR(state[c * d.N + s], r.h[c * d.N + s], 1e-5 * r.hmag[c * d.N + s] + 1e-30)
          << "state at c=" << c << " s=" << s;
  expect_padding_untouched(y, d.n, d.ch, d.ldy);
}

struct ScanShape {
  int64_t n, ch, N;
};
// d_state 16 (Hymba), odd 5 and 1; channel counts below, at and not a
// multiple of the kernel's 16-channel blocks.
const ScanShape kScanShapes[] = {{1, 1, 16},   {9, 17, 16}, {13, 37, 5}, {4, 100, 1},
                                 {33, 48, 16}, {5, 16, 16}, {7, 3, 7}};

TEST(KernelSelectiveScan, OneCallMatchesReference) {
  std::mt19937 rng(501);
  for (const ScanShape& s : kScanShapes) {
    SCOPED_TRACE("n=" + std::to_string(s.n) + " channels=" + std::to_string(s.ch) + " d_state=" + std::to_string(s.N));
    const ScanData d = make_scan(s.n, s.ch, s.N, rng);
    const ScanRef r = scan_reference(d);
    for_thread_counts([&] {
      std::vector<float> state = d.state0;
      std::vector<float> y(size_t(d.n * d.ldy), kSentinel);
      run_scan(d, {d.n}, state, y);
      expect_scan_close(d, r, state, y);
    });
  }
}

TEST(KernelSelectiveScan, StateCarriesAcrossCalls) {
  std::mt19937 rng(502);
  const std::vector<std::vector<int64_t>> piece_lists = {{1, 1, 1, 1, 1, 1, 1, 1}, {3, 1, 0, 12, 2}, {20, 1, 19}};
  for (const ScanShape& s : kScanShapes) {
    for (const auto& pieces : piece_lists) {
      int64_t n = 0;
      for (int64_t p : pieces) n += p;
      SCOPED_TRACE("n=" + std::to_string(n) + " channels=" + std::to_string(s.ch) + " d_state=" + std::to_string(s.N));
      const ScanData d = make_scan(n, s.ch, s.N, rng);
      const ScanRef r = scan_reference(d);
      for_thread_counts([&] {
        std::vector<float> state = d.state0;
        std::vector<float> y(size_t(d.n * d.ldy), kSentinel);
        run_scan(d, pieces, state, y);
        expect_scan_close(d, r, state, y);
      });
    }
  }
}

TEST(KernelSelectiveScan, SoftplusThresholdPath) {
  // delta + dt_bias above 20 (up to 60): dt must be the value itself, with
  // no overflow in exp. Small |A| keeps exp(dt*A) far from 0 so the state
  // and output depend on dt; mixed with channels below the threshold.
  std::mt19937 rng(503);
  ScanData d = make_scan(6, 21, 16, rng);
  for (int64_t t = 0; t < d.n; ++t)
    for (int64_t c = 0; c < d.ch; ++c)
      if (c % 3 != 2) d.delta[t * d.ldd + c] = std::uniform_real_distribution<float>(20.5f, 60.0f)(rng) - d.dt_bias[c];
  for (float& a : d.A) a = -std::uniform_real_distribution<float>(1e-3f, 2e-2f)(rng);
  const ScanRef r = scan_reference(d);
  for_thread_counts([&] {
    std::vector<float> state = d.state0;
    std::vector<float> y(size_t(d.n * d.ldy), kSentinel);
    run_scan(d, {d.n}, state, y);
    expect_scan_close(d, r, state, y);
  });
}

TEST(KernelSelectiveScan, RejectsOversizedState) {
  // d_state beyond the kernel's fixed buffer must be an error, not a
  // stack overflow.
  std::vector<float> one(1024, 0.0f), state(300, 0.0f), y(4, 0.0f);
  ScanArgs a;
  a.u = a.delta = a.B = a.C = a.z = a.dt_bias = a.A = a.D = one.data();
  a.ldu = a.ld_delta = a.ldb = a.ldc = a.ldz = a.ldy = 1;
  a.state = state.data();
  a.y = y.data();
  a.n = 1;
  a.channels = 1;
  a.d_state = 300;
  EXPECT_THROW(cpu::selective_scan(a), Error);
}

// ------------------------------------------------- silu_mul / average_into

TEST(KernelSiluMul, MatchesReference) {
  std::mt19937 rng(601);
  struct Case { int64_t n, d, pad; };
  // 70 x 1001 exceeds the kernel's threading threshold.
  const Case cases[] = {{1, 1, 0}, {3, 17, 2}, {5, 5504, 3}, {70, 1001, 1}};
  for (const Case& c : cases) {
    SCOPED_TRACE("n=" + std::to_string(c.n) + " d=" + std::to_string(c.d));
    const int64_t ldg = c.d + c.pad, ldu = c.d + 2 * c.pad, ldo = c.d + 3 * c.pad;
    const std::vector<float> g = uniform(size_t(c.n * ldg), rng, -30.0f, 30.0f);
    const std::vector<float> u = randn(size_t(c.n * ldu), rng);
    for_thread_counts([&] {
      std::vector<float> o(size_t(c.n * ldo), kSentinel);
      cpu::silu_mul(g.data(), ldg, u.data(), ldu, c.n, c.d, o.data(), ldo);
      for (int64_t t = 0; t < c.n; ++t)
        for (int64_t i = 0; i < c.d; ++i) {
          const double ref = silu_ref(g[t * ldg + i]) * u[t * ldu + i];
          // silu is accurate to ~2e-7 (see KernelVecmath), one more rounding.
          ASSERT_NEAR(o[t * ldo + i], ref, 1e-6 * std::fabs(ref) + 1e-37) << "t=" << t << " i=" << i;
        }
      expect_padding_untouched(o, c.n, c.d, ldo);
    });
  }
}

TEST(KernelAverageInto, MatchesReference) {
  std::mt19937 rng(602);
  struct Case { int64_t n, d, lda, ldb; };
  const Case cases[] = {{1, 1, 1, 1}, {4, 13, 15, 20}, {3, 3200, 3201, 3200}};
  for (const Case& c : cases) {
    SCOPED_TRACE("n=" + std::to_string(c.n) + " d=" + std::to_string(c.d));
    std::vector<float> a0 = randn(size_t(c.n * c.lda), rng, 0.0f, 3.0f);
    for (int64_t t = 0; t < c.n; ++t)
      for (int64_t i = c.d; i < c.lda; ++i) a0[t * c.lda + i] = kSentinel;
    const std::vector<float> b = randn(size_t(c.n * c.ldb), rng);
    for_thread_counts([&] {
      std::vector<float> a = a0;
      cpu::average_into(a.data(), c.lda, b.data(), c.ldb, c.n, c.d);
      for (int64_t t = 0; t < c.n; ++t)
        for (int64_t i = 0; i < c.d; ++i) {
          // (a+b)/2 with one fp32 rounding: within an ulp of the exact value.
          const double ref = (double(a0[t * c.lda + i]) + b[t * c.ldb + i]) * 0.5;
          ASSERT_NEAR(a[t * c.lda + i], ref, 1.2e-7 * std::fabs(ref) + 1e-38) << "t=" << t << " i=" << i;
        }
      expect_padding_untouched(a, c.n, c.d, c.lda);
    });
  }
}

// --------------------------------------------------------------- embed_rows

// An embedding table with values chosen as bit patterns, decoded here.
Stored make_table(DType dt, int64_t rows, int64_t cols, std::mt19937& rng) {
  Stored s;
  s.dtype = dt;
  s.bytes.resize(size_t(rows * cols) * dtype_size(dt));
  s.value.resize(size_t(rows * cols));
  std::uniform_int_distribution<uint32_t> bits;
  for (int64_t i = 0; i < rows * cols; ++i) {
    if (dt == DType::F32) {
      const float v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
      std::memcpy(s.bytes.data() + 4 * i, &v, 4);
      s.value[i] = v;
    } else {
      uint16_t h;
      do {
        h = uint16_t(bits(rng));
        // Finite values only; includes subnormals and negative zero.
      } while (dt == DType::BF16 ? ((h >> 7) & 0xff) == 0xff : ((h >> 10) & 0x1f) == 0x1f);
      std::memcpy(s.bytes.data() + 2 * i, &h, 2);
      s.value[i] = dt == DType::BF16 ? bf16_bits_value(h) : f16_bits_value(h);
    }
  }
  return s;
}

TEST(KernelEmbedRows, GathersEveryDtype) {
  std::mt19937 rng(701);
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    SCOPED_TRACE(dtype_name(dt));
    const int64_t vocab = 37, cols = 13, ldo = cols + 4;
    const Stored table = make_table(dt, vocab, cols, rng);
    const MatrixView view{table.bytes.data(), dt, vocab, cols};
    const std::vector<int32_t> ids = {0, 36, 5, 5, 17, 1, 36, 0, 22};
    std::vector<float> out(ids.size() * ldo, kSentinel);
    cpu::embed_rows(view, ids.data(), int64_t(ids.size()), out.data(), ldo);
    for (size_t t = 0; t < ids.size(); ++t)
      for (int64_t c = 0; c < cols; ++c) {
        // Widening to fp32 is exact, so are the expected values.
        const double want = table.value[size_t(ids[t]) * cols + c];
        ASSERT_EQ(double(out[t * ldo + c]), want) << "row " << t << " (id " << ids[t] << ") col " << c;
        ASSERT_EQ(std::signbit(out[t * ldo + c]), std::signbit(want));
      }
    expect_padding_untouched(out, int64_t(ids.size()), cols, ldo);
  }
}

TEST(KernelEmbedRows, OutOfRangeIdIsAnError) {
  std::vector<float> table(5 * 3, 1.0f), out(3 * 3, 0.0f);
  const MatrixView view{table.data(), DType::F32, 5, 3};
  for (int32_t bad : {5, -1, 1000000}) {
    const std::vector<int32_t> ids = {0, bad, 1};
    try {
      cpu::embed_rows(view, ids.data(), 3, out.data(), 3);
      ADD_FAILURE() << "id " << bad << " was accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("token id " + std::to_string(bad)), std::string::npos) << msg;
      EXPECT_NE(msg.find("out of range"), std::string::npos) << msg;
    }
  }
}

// ----------------------------------------------------------------- vecmath

// Points spread evenly (linearly, or logarithmically for positive ranges)
// over [lo, hi], plus as many random ones.
std::vector<float> sweep_points(double lo, double hi, bool log_spaced) {
  constexpr int kPoints = 1 << 21;
  std::mt19937 rng(801);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<float> xs(2 * kPoints);
  for (int i = 0; i < 2 * kPoints; ++i) {
    const double t = i < kPoints ? double(i) / (kPoints - 1) : u01(rng);
    xs[i] = log_spaced ? float(std::exp(std::log(lo) + t * (std::log(hi) - std::log(lo))))
                       : float(lo + t * (hi - lo));
  }
  return xs;
}

// The scalar function and its 16-lane twin evaluated on the same points
// (the twin on 16 different points per call, so every lane is checked).
struct Evaluated {
  std::vector<float> x, scalar, lanes;
};

template <class S, class V>
Evaluated evaluate(S scalar, V vec, double lo, double hi, bool log_spaced) {
  Evaluated e;
  e.x = sweep_points(lo, hi, log_spaced);
  e.scalar.resize(e.x.size());
  e.lanes.resize(e.x.size());
  for (size_t i = 0; i < e.x.size(); ++i) e.scalar[i] = scalar(e.x[i]);
  for (size_t i = 0; i < e.x.size(); i += 16) {  // size is a multiple of 16
    cpu::v16f v = cpu::v16_load(&e.x[i]);
    cpu::v16_store(&e.lanes[i], vec(v));
  }
  return e;
}

// Largest relative error of `got` against ref(x); NaN counts as infinite.
template <class R>
double max_rel_error(const std::vector<float>& x, const std::vector<float>& got, R ref, double* worst_x) {
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = ref(double(x[i]));
    if (want == 0) {
      EXPECT_EQ(got[i], 0.0f) << "x=" << x[i];
      continue;
    }
    double e = std::fabs(double(got[i]) - want) / std::fabs(want);
    if (std::isnan(e)) e = INFINITY;
    if (e > worst) {
      worst = e;
      *worst_x = x[i];
    }
  }
  return worst;
}

// "A few 1e-7" relative: an fp32 result within ~3 ulp of the exact value.
constexpr double kVecmathTol = 4e-7;

template <class R>
void expect_accurate(const Evaluated& e, R ref) {
  double wx = 0;
  EXPECT_LT(max_rel_error(e.x, e.scalar, ref, &wx), kVecmathTol) << "scalar, worst at x=" << wx;
  EXPECT_LT(max_rel_error(e.x, e.lanes, ref, &wx), kVecmathTol) << "16-lane, worst at x=" << wx;
}

TEST(KernelVecmath, FastExp) {
  expect_accurate(evaluate([](float x) { return cpu::fast_exp(x); }, [](cpu::v16f v) { return cpu::v16_exp(v); },
                           -87.0, 88.0, false),
                  [](double x) { return std::exp(x); });
  EXPECT_EQ(cpu::fast_exp(0.0f), 1.0f);
  // Saturates instead of producing inf/NaN outside the range.
  for (float x : {1000.0f, -1000.0f}) {
    const float s = cpu::fast_exp(x), v = cpu::v16_exp(cpu::v16_splat(x))[0];
    EXPECT_TRUE(std::isfinite(s) && std::isfinite(v)) << x;
    EXPECT_TRUE(s >= 0.0f && v >= 0.0f) << x;
  }
  EXPECT_LT(cpu::fast_exp(-1000.0f), 1.2e-38f);
  EXPECT_LT(cpu::v16_exp(cpu::v16_splat(-1000.0f))[0], 1.2e-38f);
}

TEST(KernelVecmath, FastLog) {
  const auto ref = [](double x) { return std::log(x); };
  expect_accurate(evaluate([](float x) { return cpu::fast_log(x); }, [](cpu::v16f v) { return cpu::v16_log(v); },
                           1e-30, 1e30, true),
                  ref);
  // Near 1 (log ~ 0) relative accuracy is hardest; check densely there too.
  expect_accurate(evaluate([](float x) { return cpu::fast_log(x); }, [](cpu::v16f v) { return cpu::v16_log(v); },
                           0.5, 2.0, false),
                  ref);
}

TEST(KernelVecmath, Softplus) {
  // Covers log1p(e^v) for small e^v (v around -9, where log(1 + e) in fp32
  // loses the low bits of e) and the v > 20 threshold.
  expect_accurate(evaluate([](float x) { return cpu::softplus(x); },
                           [](cpu::v16f v) { return cpu::v16_softplus(v); }, -30.0, 40.0, false),
                  softplus_ref);
  EXPECT_EQ(cpu::softplus(25.0f), 25.0f);
  EXPECT_EQ(cpu::softplus(1e6f), 1e6f);
  EXPECT_EQ(cpu::v16_softplus(cpu::v16_splat(1e6f))[7], 1e6f);
}

TEST(KernelVecmath, Silu) {
  expect_accurate(evaluate([](float x) { return cpu::silu(x); }, [](cpu::v16f v) { return cpu::v16_silu(v); },
                           -87.0, 100.0, false),
                  silu_ref);
  EXPECT_EQ(cpu::silu(0.0f), 0.0f);
}

}  // namespace
}  // namespace hymba
