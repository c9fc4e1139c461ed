// CPU kernels of the op contract, except matmul (matmul.cpp). Each loop is
// written so the compiler vectorises it (omp simd, contiguous inner loops);
// parallelism is OpenMP over independent rows, heads or channels.
#include "backend/cpu/kernels.h"

#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "backend/cpu/vecmath.h"
#include "util/error.h"

namespace hymba::cpu {

void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y,
             int64_t ldy) {
#pragma omp parallel for if (n > 1)
  for (int64_t t = 0; t < n; ++t) {
    const float* xr = x + t * ldx;
    float* yr = y + t * ldy;
    double ss = 0.0;  // double: rows of thousands of values, exact enough for any order
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += double(xr[i]) * double(xr[i]);
    const float inv = float(1.0 / std::sqrt(ss / double(d) + double(eps)));
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* cos_out, float* sin_out) {
  for (int64_t t = 0; t < n; ++t) {
    const float p = float(pos0 + t);
    for (int i = 0; i < half; ++i) {
      const float angle = p * inv_freq[i];  // fp32 product, as the reference
      cos_out[t * half + i] = float(std::cos(double(angle)));
      sin_out[t * half + i] = float(std::sin(double(angle)));
    }
  }
}

void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* cos_t, const float* sin_t) {
  const int half = head_dim / 2;
#pragma omp parallel for if (n > 4)
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cos_t + t * half;
    const float* s = sin_t + t * half;
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + t * ldx + int64_t(h) * head_dim;
#pragma omp simd
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

namespace {

// Row r of a K or V segment as fp32 (pointer into the cache for fp32, else
// converted into `tmp`).
inline const float* row_f32(const void* base, DType dt, int64_t offset, int64_t width, float* tmp) {
  if (dt == DType::F32) return static_cast<const float*>(base) + offset;
  const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
  if (dt == DType::BF16) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) tmp[i] = bf16_to_f32(src[i]);
  } else {
    for (int64_t i = 0; i < width; ++i) tmp[i] = f16_to_f32(src[i]);
  }
  return tmp;
}

}  // namespace

// Attention, flash style: a work item is (block of queries, kv head, slice of
// that kv head's query heads). It walks the visible keys in blocks of kKeyBlock:
// converts the block to fp32 once (K transposed, so scores vectorise over
// keys; V padded to whole vectors), then updates each query's running max,
// denominator and output (online softmax). Working set per item stays in L2
// whatever the context length.
namespace {

constexpr int kKeyBlock = 128;
constexpr int kQueryBlock = 16;

int pad16(int x) { return (x + 15) / 16 * 16; }

// 16x16 transpose in registers: four stages, each swapping the off-diagonal
// h x h blocks of every 2h x 2h block (h = 8, 4, 2, 1).
template <int H, int... J>
inline v16f stage_lo(v16f a, v16f b, std::integer_sequence<int, J...>) {
  return __builtin_shufflevector(a, b, ((J & H) ? 16 + J - H : J)...);
}
template <int H, int... J>
inline v16f stage_hi(v16f a, v16f b, std::integer_sequence<int, J...>) {
  return __builtin_shufflevector(a, b, ((J & H) ? 16 + J : J + H)...);
}
template <int H>
inline void transpose_stage(v16f* r) {
  constexpr auto seq = std::make_integer_sequence<int, 16>{};
  for (int i = 0; i < 16; ++i)
    if (!(i & H)) {
      const v16f a = r[i], b = r[i + H];
      r[i] = stage_lo<H>(a, b, seq);
      r[i + H] = stage_hi<H>(a, b, seq);
    }
}
inline void transpose16(v16f* r) {
  transpose_stage<8>(r);
  transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
}

// 16 consecutive values of a K/V segment as fp32, for a segment element type DT.
template <DType DT>
inline v16f load16_as(const void* base, int64_t offset) {
  if constexpr (DT == DType::F32) {
    return v16_load(static_cast<const float*>(base) + offset);
  } else if constexpr (DT == DType::BF16) {  // bf16 -> fp32 is a 16-bit shift
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
#if defined(__AVX512F__)
    // (maskz form: the plain one trips a GCC 12 -Wmaybe-uninitialized false positive)
    const __m512i wide =
        _mm512_maskz_cvtepu16_epi32(__mmask16(0xFFFF), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    return (v16f)((v16i)wide << 16);
#else
    typedef uint16_t v16u16 __attribute__((vector_size(32)));
    v16u16 h;
    std::memcpy(&h, src, sizeof h);
    return (v16f)(__builtin_convertvector(h, v16i) << 16);
#endif
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
#if defined(__AVX512F__)
    // vcvtph2ps: exact, subnormals included (MXCSR.DAZ does not apply to it);
    // maskz form for the same GCC 12 false positive as above
    return (v16f)_mm512_maskz_cvtph_ps(__mmask16(0xFFFF), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
#else
    alignas(64) float tmp[16];
    for (int i = 0; i < 16; ++i) tmp[i] = f16_to_f32(src[i]);
    return v16_load(tmp);
#endif
  }
}

// scores[q][k] = q_q . K[:, k] for R query rows against a transposed block
// Kt [dq][kKeyBlock], 16 keys per vector; one K load feeds R FMAs.
template <int R>
void block_scores(const float* q, int ldq, int dq, const float* kt, int nkv, float* const* scores) {
  for (int kv = 0; kv < nkv; ++kv) {
    v16f acc[R];
    for (int r = 0; r < R; ++r) acc[r] = v16_splat(0.0f);
    for (int i = 0; i < dq; ++i) {
      const v16f k = v16_load(kt + size_t(i) * kKeyBlock + kv * 16);
      for (int r = 0; r < R; ++r) acc[r] += q[size_t(r) * ldq + i] * k;
    }
    for (int r = 0; r < R; ++r) v16_store(scores[r] + kv * 16, acc[r]);
  }
}

// out[r] = out[r] * corr[r] + sum_k p[r][k] V[k] for R rows; one V load
// feeds R FMAs.
template <int R>
void block_pv(float* const* p, const float* corr, const float* v, int DV, int nk, float* const* out) {
  for (int i = 0; i < DV; i += 16) {
    v16f acc[R];
    for (int r = 0; r < R; ++r) acc[r] = v16_load(out[r] + i) * corr[r];
    for (int k = 0; k < nk; ++k) {
      const v16f vk = v16_load(v + size_t(k) * DV + i);
      for (int r = 0; r < R; ++r) acc[r] += p[r][k] * vk;
    }
    for (int r = 0; r < R; ++r) v16_store(out[r] + i, acc[r]);
  }
}

constexpr int kMaxRows = 6;  // (query, head) rows sharing one pass over a key block

// Dispatches f.template operator()<R>() for R = n in 1..kMaxRows.
template <typename F>
void with_rows(int n, F&& f) {
  switch (n) {
    case 6: f.template operator()<6>(); break;
    case 5: f.template operator()<5>(); break;
    case 4: f.template operator()<4>(); break;
    case 3: f.template operator()<3>(); break;
    case 2: f.template operator()<2>(); break;
    default: f.template operator()<1>(); break;
  }
}

void grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

struct AttnScratch {
  std::vector<float> kt, v, q, scores, m, l, acc;
};

// ---------------------------------------------------------------------------
// Decode path (a few query positions): the K/V rows are read once, in memory
// order. A work item is a contiguous share of the visible keys for ALL kv
// heads (rows are head-major, so a block of keys is one contiguous stretch of
// the cache: the hardware prefetcher streams it from DRAM, where a per-head
// item would read 128-byte slices at a row stride). For each block of
// kDecKeys keys and each kv head: K is transposed into a small L1 buffer, the
// group's rows score it, and P*V reads V straight from the cache (bf16 ->
// fp32 is a shift) into register accumulators. Items' partial softmax states
// are merged at the end.
constexpr int kDecKeys = 64;    // keys per block: kDecVecs vectors of scores per row
constexpr int kDecVecs = kDecKeys / 16;
// Query positions up to which attention takes this path (measured faster than
// the per-head path up to 16 queries, 1 thread, Hymba shape).
constexpr int kDecMaxQ = 16;

// Horizontal max / sum of a vector: halving folds (the _mm512_reduce_*
// intrinsics trip a GCC 12 -Wmaybe-uninitialized false positive).
inline v16f fold8(v16f v) {
  return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
}
inline v16f fold4(v16f v) {
  return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
}
inline v16f fold2(v16f v) {
  return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
}
inline v16f fold1(v16f v) {
  return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
}
inline v16f vmax(v16f a, v16f b) { return a > b ? a : b; }
inline float hmax16(v16f v) {
  v = vmax(v, fold8(v));
  v = vmax(v, fold4(v));
  v = vmax(v, fold2(v));
  return vmax(v, fold1(v))[0];
}
inline float hsum16(v16f v) {
  v += fold8(v);
  v += fold4(v);
  v += fold2(v);
  return (v + fold1(v))[0];
}

// transpose16, always inlined: as a call its 16 rows go through memory.
[[gnu::always_inline]] inline void dec_transpose16(v16f* r) {
  transpose_stage<8>(r);
  transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
}

template <DType DT>
using elem_t = std::conditional_t<DT == DType::F32, float, uint16_t>;

struct DecodeShape {
  const float* q;  // [n_kv][rows_g][dq], pre-scaled; rows r = t * group + j
  int n_kv, group, n_q, rows_g, dq, dv;
  int64_t q_pos0, window, n_always_visible;
};

// acc[r][c0*16 .. (c0+CN)*16) = acc * corr[r] + sum_k p[r][k] V[k], V rows of
// type DT read from the cache at vg + k*ldv.
template <int R, int CN, DType DT>
inline void dec_pv(const elem_t<DT>* __restrict vg, int64_t ldv, int nk, const float* __restrict p,
                   const float* corr, float* __restrict acc, int dv) {
  v16f o[R][CN];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CN; ++c) o[r][c] = v16_load(acc + size_t(r) * dv + c * 16) * corr[r];
  for (int k = 0; k < nk; ++k) {
    const elem_t<DT>* vr = vg + k * ldv;
    v16f vv[CN];
    for (int c = 0; c < CN; ++c) vv[c] = load16_as<DT>(vr, c * 16);
    for (int r = 0; r < R; ++r) {
      const float pk = p[r * kDecKeys + k];
      for (int c = 0; c < CN; ++c) o[r][c] += pk * vv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CN; ++c) v16_store(acc + size_t(r) * dv + c * 16, o[r][c]);
}

// R rows (consecutive rows rb.. of one kv head) against one block of NV*16
// keys: scores from the transposed block kt [dq][kDecKeys], online softmax
// update of m, l, then P*V.
template <int R, int NV, DType DT>
void dec_rows(const DecodeShape& d, int rb, const float* __restrict q, const float* __restrict kt,
              const v16i (*vis)[kDecVecs], const elem_t<DT>* __restrict vg, int64_t ldv, int nk, float* __restrict m,
              float* __restrict l, float* __restrict acc) {
  const int dq = d.dq;
  v16f s[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) s[r][v] = v16_splat(0.0f);
  for (int i = 0; i < dq; ++i) {
    v16f k[NV];
    for (int v = 0; v < NV; ++v) k[v] = v16_load(kt + size_t(i) * kDecKeys + v * 16);
    for (int r = 0; r < R; ++r) {
      const float qi = q[size_t(r) * dq + i];
      for (int v = 0; v < NV; ++v) s[r][v] += qi * k[v];
    }
  }
  alignas(64) float p[R * kDecKeys];
  float corr[R];
  for (int r = 0; r < R; ++r) {
    const v16i* vt = vis[(rb + r) / d.group];
    v16f mx = v16_splat(-INFINITY);
    for (int v = 0; v < NV; ++v) {
      s[r][v] = vt[v] ? s[r][v] : v16_splat(-INFINITY);
      mx = v == 0 ? s[r][v] : vmax(mx, s[r][v]);
    }
    const float mb = hmax16(mx);
    if (mb == -INFINITY) {  // no visible key in this block: contributes nothing
      corr[r] = 1.0f;
      for (int v = 0; v < NV; ++v) v16_store(p + r * kDecKeys + v * 16, v16_splat(0.0f));
      continue;
    }
    const float m_new = std::max(m[r], mb);
    corr[r] = fast_exp(m[r] - m_new);  // ~0 when m was -inf (acc is 0 then)
    m[r] = m_new;
    v16f sum = v16_splat(0.0f);
    for (int v = 0; v < NV; ++v) {
      // Masked keys get exactly 0 (the exp saturates at e^-87, not 0).
      const v16f e = vt[v] ? v16_exp(s[r][v] - m_new) : v16_splat(0.0f);
      v16_store(p + r * kDecKeys + v * 16, e);
      sum += e;
    }
    l[r] = l[r] * corr[r] + hsum16(sum);
  }
  const int dv = d.dv, nc = dv / 16;
  for (int c0 = 0; c0 < nc; c0 += 4) {
    const elem_t<DT>* vc = vg + c0 * 16;
    float* ac = acc + c0 * 16;
    switch (std::min(4, nc - c0)) {
      case 4: dec_pv<R, 4, DT>(vc, ldv, nk, p, corr, ac, dv); break;
      case 3: dec_pv<R, 3, DT>(vc, ldv, nk, p, corr, ac, dv); break;
      case 2: dec_pv<R, 2, DT>(vc, ldv, nk, p, corr, ac, dv); break;
      default: dec_pv<R, 1, DT>(vc, ldv, nk, p, corr, ac, dv); break;
    }
  }
}

// One block of nk <= kDecKeys keys (rows r0.. of seg) for every kv head.
// m, l, acc: the item's running state, rows ordered (kv head, t, j).
template <DType DT>
void dec_block(const DecodeShape& d, const KVSegment& seg, int64_t r0, int nk, float* __restrict m,
               float* __restrict l, float* __restrict acc, float* __restrict kt) {
  using T = elem_t<DT>;
  const int dq = d.dq, dv = d.dv, rows_g = d.rows_g;
  const int64_t ldk = seg.ld_k, ldv = seg.ld_v;
  const T* const kbase = static_cast<const T*>(seg.k) + r0 * ldk;
  const T* const vbase = static_cast<const T*>(seg.v) + r0 * ldv;
  const int64_t kp0 = seg.pos0 + r0;
  // Visibility of key kp0 + k to query t, as lane masks: k < nk, k <= p - kp0
  // and (k >= p - window - kp0 or k < n_always_visible - kp0); bounds
  // clamped to int.
  v16i vis[kDecMaxQ][kDecVecs];
  bool any = false;
  {
    const auto clampi = [](int64_t x) { return int(std::clamp<int64_t>(x, -1, kDecKeys + 1)); };
    const v16i iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int t = 0; t < d.n_q; ++t) {
      const int64_t p = d.q_pos0 + t;
      const int hi = std::min(clampi(p - kp0), nk - 1);
      const int lo = d.window < 0 ? -1 : clampi(p - d.window - kp0);
      const int pre = d.window < 0 ? -1 : clampi(d.n_always_visible - kp0);
      any |= hi >= 0 && (lo <= hi || pre > 0);
      for (int v = 0; v < kDecVecs; ++v) {
        const v16i k = iota + 16 * v;
        vis[t][v] = (k <= hi) & ((k >= lo) | (k < pre));
      }
    }
  }
  if (!any) return;
  const int nv = (nk + 15) / 16;
  const int n_groups = (rows_g + kMaxRows - 1) / kMaxRows;
  for (int g = 0; g < d.n_kv; ++g) {
    // K of this head transposed into kt [dq][kDecKeys]; missing keys are 0.
    const T* kg = kbase + int64_t(g) * dq;
    for (int k16 = 0; k16 < nk; k16 += 16) {
      const int kn = std::min(16, nk - k16);
      for (int i16 = 0; i16 < dq; i16 += 16) {
        v16f r[16];
        const T* src = kg + k16 * ldk + i16;
        if (kn == 16) {
          for (int k = 0; k < 16; ++k) r[k] = load16_as<DT>(src, k * ldk);
        } else {
          for (int k = 0; k < 16; ++k) r[k] = k < kn ? load16_as<DT>(src, k * ldk) : v16_splat(0.0f);
        }
        dec_transpose16(r);
        for (int i = 0; i < 16; ++i) v16_store(kt + size_t(i16 + i) * kDecKeys + k16, r[i]);
      }
    }
    const T* vg = vbase + int64_t(g) * dv;
    const float* qg = d.q + size_t(g) * rows_g * dq;
    const size_t s0 = size_t(g) * rows_g;
    for (int gi = 0; gi < n_groups; ++gi) {
      const int rb = rows_g * gi / n_groups;
      const int nr = rows_g * (gi + 1) / n_groups - rb;
      with_rows(nr, [&]<int R>() {
        const float* qr = qg + size_t(rb) * dq;
        float* mr = m + s0 + rb;
        float* lr = l + s0 + rb;
        float* ar = acc + (s0 + rb) * dv;
        if constexpr (kDecVecs >= 4) {
          if (nv == 4) return dec_rows<R, 4, DT>(d, rb, qr, kt, vis, vg, ldv, nk, mr, lr, ar);
          if (nv == 3) return dec_rows<R, 3, DT>(d, rb, qr, kt, vis, vg, ldv, nk, mr, lr, ar);
        }
        if (nv == 2) dec_rows<R, 2, DT>(d, rb, qr, kt, vis, vg, ldv, nk, mr, lr, ar);
        else dec_rows<R, 1, DT>(d, rb, qr, kt, vis, vg, ldv, nk, mr, lr, ar);
      });
    }
  }
}

// Reads one word of every cache line of rows r0 .. r0+n-1 of a segment's K
// (first wk elements of each row) and V (first wv), in address order. In
// decode the cache rows were evicted by the weight stream since the last
// token: a plain sequential sweep lets the hardware stream them in at full
// bandwidth, where the block loop's strided per-head accesses (and software
// prefetches, measured: no gain or worse) leave it latency bound. Measured
// (bench_attention, 2 threads, 512 ring keys): cold call 115 -> 73 us, ~4 us
// extra when the rows are already cached; in the model 155-200 -> 105-120 us.
inline void touch_rows(const KVSegment& seg, int64_t r0, int64_t n, int64_t wk, int64_t wv) {
  const int64_t es = int64_t(dtype_size(seg.dtype));
  uint32_t sum = 0;
  const auto sweep = [&](const void* base, int64_t ld, int64_t w) {
    const char* b = static_cast<const char*>(base) + r0 * ld * es;
    const int64_t len = (ld == w ? n * w : w) * es;  // contiguous rows: one run
    for (int64_t r = 0; r < (ld == w ? 1 : n); ++r)
      for (int64_t off = 0; off < len; off += 64) {
        uint32_t x;
        std::memcpy(&x, b + r * ld * es + off, sizeof x);
        sum += x;
      }
  };
  sweep(seg.k, seg.ld_k, wk);
  sweep(seg.v, seg.ld_v, wv);
  asm volatile("" : : "r"(sum));  // keeps the loads
}

void attention_decode(const AttentionArgs& a) {
  DecodeShape d;
  d.n_kv = a.n_kv_heads;
  d.group = a.n_heads / a.n_kv_heads;
  d.n_q = int(a.n_q);
  d.rows_g = d.n_q * d.group;
  d.dq = a.head_dim_qk;
  d.dv = a.head_dim_v;
  d.q_pos0 = a.q_pos0;
  d.window = a.window;
  d.n_always_visible = a.n_always_visible;
  const int dq = d.dq, dv = d.dv, group = d.group;
  const int rows = d.rows_g * d.n_kv;

  // Scratch of the calling thread, grown only (no allocation per call).
  struct Piece {
    const KVSegment* seg;
    int64_t r0, r1;
  };
  static thread_local std::vector<float> qbuf, part_m, part_l, part_acc;
  static thread_local std::vector<Piece> pieces;

  // Queries, pre-scaled, rows ordered (kv head, t, j).
  grow(qbuf, size_t(rows) * dq);
  for (int g = 0; g < d.n_kv; ++g)
    for (int t = 0; t < d.n_q; ++t)
      for (int j = 0; j < group; ++j) {
        const float* src = a.q + t * a.ldq + int64_t(g * group + j) * dq;
        float* dst = qbuf.data() + (size_t(g) * d.rows_g + size_t(t) * group + j) * dq;
        for (int i = 0; i < dq; ++i) dst[i] = src[i] * a.scale;
      }
  d.q = qbuf.data();

  // The keys any of the queries can see: in each segment the always-visible
  // prefix and the union of the windows.
  pieces.clear();
  int64_t total = 0;
  {
    const int64_t p_first = a.q_pos0, p_last = a.q_pos0 + a.n_q - 1;
    for (int s = 0; s < a.n_segments; ++s) {
      const KVSegment& seg = a.segments[s];
      const int64_t end = std::min(seg.pos0 + seg.count, p_last + 1);
      auto add = [&](int64_t k0, int64_t k1) {
        if (k1 <= k0) return;
        pieces.push_back({&seg, k0 - seg.pos0, k1 - seg.pos0});
        total += k1 - k0;
      };
      if (a.window < 0) {
        add(seg.pos0, end);
      } else {
        const int64_t win_lo = std::max(seg.pos0, p_first - a.window);
        const int64_t pre_hi = std::min(end, std::min(a.n_always_visible, win_lo));
        add(seg.pos0, pre_hi);
        add(std::max(win_lo, pre_hi), end);
      }
    }
  }

  // Items: equal shares of the keys, in memory order.
  const int threads = omp_get_max_threads();
  const int n_items = int(std::max<int64_t>(1, std::min<int64_t>(threads, total / kDecKeys)));
  grow(part_m, size_t(n_items) * rows);
  grow(part_l, size_t(n_items) * rows);
  grow(part_acc, size_t(n_items) * rows * dv);
  float* const pm = part_m.data();
  float* const pl = part_l.data();
  float* const pacc = part_acc.data();
  const Piece* const pc = pieces.data();
  const int n_pieces = int(pieces.size());

#pragma omp parallel if (n_items > 1)
  {
    static thread_local std::vector<float> kt;
    grow(kt, size_t(dq) * kDecKeys);
    float* const ktp = kt.data();
#pragma omp for schedule(static, 1)
    for (int item = 0; item < n_items; ++item) {
      float* const m = pm + size_t(item) * rows;
      float* const l = pl + size_t(item) * rows;
      float* const acc = pacc + size_t(item) * rows * dv;
      std::fill(m, m + rows, -INFINITY);
      std::fill(l, l + rows, 0.0f);
      std::fill(acc, acc + size_t(rows) * dv, 0.0f);
      const int64_t k_begin = total * item / n_items, k_end = total * (item + 1) / n_items;
      {  // bring this item's rows in first (see touch_rows)
        int64_t at = 0;
        for (int pi = 0; pi < n_pieces; ++pi) {
          const int64_t len = pc[pi].r1 - pc[pi].r0;
          const int64_t lo = std::max(k_begin, at), hi = std::min(k_end, at + len);
          if (hi > lo)
            touch_rows(*pc[pi].seg, pc[pi].r0 + (lo - at), hi - lo, int64_t(d.n_kv) * dq, int64_t(d.n_kv) * dv);
          at += len;
        }
      }
      int64_t at = 0;  // keys of the pieces before this one
      for (int pi = 0; pi < n_pieces; ++pi) {
        const Piece& pc_i = pc[pi];
        const int64_t len = pc_i.r1 - pc_i.r0;
        const int64_t lo = std::max(k_begin, at), hi = std::min(k_end, at + len);
        for (int64_t k = lo; k < hi; k += kDecKeys) {
          const int64_t r0 = pc_i.r0 + (k - at);
          const int nk = int(std::min<int64_t>(kDecKeys, hi - k));
          const KVSegment& seg = *pc_i.seg;
          if (seg.dtype == DType::BF16) dec_block<DType::BF16>(d, seg, r0, nk, m, l, acc, ktp);
          else if (seg.dtype == DType::F32) dec_block<DType::F32>(d, seg, r0, nk, m, l, acc, ktp);
          else dec_block<DType::F16>(d, seg, r0, nk, m, l, acc, ktp);
        }
        at += len;
      }
    }
    // Merge the items' partial softmax states into the output.
#pragma omp for schedule(static)
    for (int r = 0; r < rows; ++r) {
      const int g = r / d.rows_g, t = (r % d.rows_g) / group, j = r % group;
      float* out = a.out + t * a.ldo + int64_t(g * group + j) * dv;
      float mx = -INFINITY;
      for (int it = 0; it < n_items; ++it) mx = std::max(mx, pm[size_t(it) * rows + r]);
      float lsum = 0.0f;
      std::fill(out, out + dv, 0.0f);
      for (int it = 0; it < n_items; ++it) {
        const size_t at = size_t(it) * rows + r;
        if (pm[at] == -INFINITY) continue;  // this item saw no key of this row
        const float c = n_items == 1 ? 1.0f : fast_exp(pm[at] - mx);
        lsum += pl[at] * c;
        const float* ac = pacc + at * dv;
        for (int i = 0; i < dv; ++i) out[i] += ac[i] * c;
      }
      const float inv = lsum > 0 ? 1.0f / lsum : 0.0f;
      for (int i = 0; i < dv; ++i) out[i] *= inv;
    }
  }
}

}  // namespace


void attention(const AttentionArgs& a) {
  if (a.n_q <= kDecMaxQ && a.head_dim_qk % 16 == 0 && a.head_dim_v % 16 == 0 && a.head_dim_qk <= 512 &&
      a.head_dim_v <= 512) {
    attention_decode(a);
    return;
  }
  const int group = a.n_heads / a.n_kv_heads;
  const int dq = a.head_dim_qk, dv = a.head_dim_v;
  const int DQ = pad16(dq), DV = pad16(dv);
  check(dq <= 512 && dv <= 512, "attention: head dims above 512 are not supported");
  const int threads = omp_get_max_threads();
  const int64_t q_blocks = (a.n_q + kQueryBlock - 1) / kQueryBlock;

  // The key blocks a query block can see (the same for every kv head): in
  // each segment the always-visible prefix and the union of the windows.
  struct KeyBlock {
    const KVSegment* seg;
    int64_t r0;  // first row in the segment
    int nk;
  };
  std::vector<std::vector<KeyBlock>> blocks(static_cast<size_t>(q_blocks));
  for (int64_t qb = 0; qb < q_blocks; ++qb) {
    const int64_t p_first = a.q_pos0 + qb * kQueryBlock;
    const int64_t p_last = std::min(a.q_pos0 + a.n_q, p_first + kQueryBlock) - 1;
    for (int s = 0; s < a.n_segments; ++s) {
      const KVSegment& seg = a.segments[s];
      const int64_t end = std::min(seg.pos0 + seg.count, p_last + 1);
      int64_t ranges[2][2];
      int n_ranges = 0;
      if (a.window < 0) {
        ranges[n_ranges][0] = seg.pos0, ranges[n_ranges++][1] = end;
      } else {
        const int64_t win_lo = std::max(seg.pos0, p_first - a.window);
        const int64_t pre_hi = std::min(end, std::min(a.n_always_visible, win_lo));
        if (pre_hi > seg.pos0) ranges[n_ranges][0] = seg.pos0, ranges[n_ranges++][1] = pre_hi;
        ranges[n_ranges][0] = std::max(win_lo, pre_hi), ranges[n_ranges++][1] = end;
      }
      for (int rg = 0; rg < n_ranges; ++rg)
        for (int64_t k = ranges[rg][0]; k < ranges[rg][1]; k += kKeyBlock)
          blocks[qb].push_back({&seg, k - seg.pos0, int(std::min<int64_t>(kKeyBlock, ranges[rg][1] - k))});
    }
  }
  // Work items: (query block, kv head, share of the key blocks). The query
  // heads of a group share every K/V block they load. With too few query
  // blocks to keep the threads busy (decode), the key blocks are split
  // between items whose partial softmax states are merged at the end.
  int splits = 1;
  if (q_blocks * a.n_kv_heads < 4 * threads) {
    size_t most = 1;
    for (const auto& b : blocks) most = std::max(most, b.size());
    splits = int(std::min<size_t>(most, size_t((4 * threads + q_blocks * a.n_kv_heads - 1) /
                                                (q_blocks * a.n_kv_heads))));
  }
  const int rows_max = int(std::min<int64_t>(kQueryBlock, a.n_q)) * group;
  const int64_t n_items = q_blocks * a.n_kv_heads * splits;
  // Scratch lives as long as the thread and only grows: attention runs once
  // per layer per token, and fresh large allocations would page-fault each time.
  static thread_local std::vector<float> part_m, part_l, part_acc;
  if (splits > 1) {
    grow(part_m, size_t(n_items) * rows_max);
    grow(part_l, size_t(n_items) * rows_max);
    grow(part_acc, size_t(n_items) * rows_max * DV);
  }
  // Inside the parallel region a thread_local name would mean each worker's
  // own copy: hand the workers the caller's buffers.
  float* const pm = part_m.data();
  float* const pl = part_l.data();
  float* const pacc = part_acc.data();

#pragma omp parallel
  {
    static thread_local AttnScratch w;
    grow(w.kt, size_t(DQ) * kKeyBlock);
    grow(w.v, size_t(kKeyBlock) * DV);
    grow(w.q, size_t(rows_max) * DQ);
    grow(w.scores, size_t(kMaxRows) * kKeyBlock);
    grow(w.m, size_t(rows_max));
    grow(w.l, size_t(rows_max));
    grow(w.acc, size_t(rows_max) * DV);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      const int split = int(item % splits);
      const int g = int((item / splits) % a.n_kv_heads);
      const int64_t qb = item / splits / a.n_kv_heads;
      const int64_t t0 = qb * kQueryBlock;
      const int nt = int(std::min<int64_t>(kQueryBlock, a.n_q - t0));
      const int h0 = g * group;
      const int64_t p_first = a.q_pos0 + t0;
      const int rows = nt * group;
      // Queries, pre-scaled, padded with zeros to DQ.
      for (int t = 0; t < nt; ++t)
        for (int j = 0; j < group; ++j) {
          float* dst = w.q.data() + size_t(t * group + j) * DQ;
          const float* src = a.q + (t0 + t) * a.ldq + int64_t(h0 + j) * dq;
          for (int i = 0; i < DQ; ++i) dst[i] = i < dq ? src[i] * a.scale : 0.0f;
        }
      std::fill(w.m.begin(), w.m.begin() + rows, -INFINITY);
      std::fill(w.l.begin(), w.l.begin() + rows, 0.0f);
      std::fill(w.acc.begin(), w.acc.begin() + size_t(rows) * DV, 0.0f);

      // One block of keys at positions kp0 .. kp0+nk-1 (rows r0.. of seg).
      auto process_block = [&](const KVSegment& seg, int64_t r0, int nk) {
        const int64_t kp0 = seg.pos0 + r0;
        float tmp[512];
        // K transposed into kt [dim][key]: whole 16x16 tiles in registers
        // when the head dim allows (reads stay inside this head's columns),
        // element by element otherwise.
        const int full = (dq % 16 == 0) ? nk / 16 * 16 : 0;
        // The element type is fixed per segment: dispatch once per block.
        auto tiles = [&]<DType DT>() {
          for (int k16 = 0; k16 < full; k16 += 16)
            for (int i16 = 0; i16 < dq; i16 += 16) {
              v16f r[16];
              for (int k = 0; k < 16; ++k)
                r[k] = load16_as<DT>(seg.k, (r0 + k16 + k) * seg.ld_k + int64_t(g) * dq + i16);
              transpose16(r);
              for (int i = 0; i < 16; ++i) v16_store(w.kt.data() + size_t(i16 + i) * kKeyBlock + k16, r[i]);
            }
          if (dv % 16 == 0)  // V straight into the block, 16 values at a time
            for (int k = 0; k < nk; ++k)
              for (int i = 0; i < dv; i += 16)
                v16_store(w.v.data() + size_t(k) * DV + i,
                          load16_as<DT>(seg.v, (r0 + k) * seg.ld_v + int64_t(g) * dv + i));
        };
        if (seg.dtype == DType::BF16) tiles.template operator()<DType::BF16>();
        else if (seg.dtype == DType::F32) tiles.template operator()<DType::F32>();
        else tiles.template operator()<DType::F16>();
        for (int k = full; k < nk; ++k) {
          const float* kr = row_f32(seg.k, seg.dtype, (r0 + k) * seg.ld_k + int64_t(g) * dq, dq, tmp);
          for (int i = 0; i < dq; ++i) w.kt[size_t(i) * kKeyBlock + k] = kr[i];
        }
        if (dv % 16 != 0) {
          for (int k = 0; k < nk; ++k) {
            const float* vr = row_f32(seg.v, seg.dtype, (r0 + k) * seg.ld_v + int64_t(g) * dv, dv, tmp);
            std::copy(vr, vr + dv, w.v.begin() + size_t(k) * DV);
          }
        }
        const int nkv = (nk + 15) / 16;
        // Columns past nk in the last vector of keys are read by the score
        // loop: they must hold numbers, not stale NaN garbage.
        for (int k = nk; k < nkv * 16; ++k)
          for (int i = 0; i < dq; ++i) w.kt[size_t(i) * kKeyBlock + k] = 0.0f;
        // Rows (query, head) in balanced groups of at most kMaxRows share each
        // K and V load.
        const int n_groups = (rows + kMaxRows - 1) / kMaxRows;
        for (int gi = 0; gi < n_groups; ++gi) {
          const int rb = rows * gi / n_groups;
          const int nr = rows * (gi + 1) / n_groups - rb;
          float* sc[kMaxRows];
          for (int q = 0; q < kMaxRows; ++q) sc[q] = w.scores.data() + size_t(q) * kKeyBlock;
          with_rows(nr, [&]<int R>() { block_scores<R>(w.q.data() + size_t(rb) * DQ, DQ, dq, w.kt.data(), nkv, sc); });
          float corr[kMaxRows] = {1, 1, 1, 1, 1, 1};
          for (int q = 0; q < nr; ++q) {
            const int r = rb + q;
            const int64_t p = p_first + r / group;  // rows are (query t, head j): r = t * group + j
            float* scr = sc[q];
            // Mask only blocks that straddle a boundary of this query's view.
            const int64_t kp_last = kp0 + nk - 1;
            const bool all_visible = kp_last <= p && (a.window < 0 || p - kp0 <= a.window ||
                                                      kp_last < a.n_always_visible);
            bool any_visible = all_visible;
            if (!all_visible) {
              for (int k = 0; k < nk; ++k) {
                const int64_t kp = kp0 + k;
                const bool visible = kp <= p && (a.window < 0 || p - kp <= a.window || kp < a.n_always_visible);
                if (!visible) scr[k] = -INFINITY;
                any_visible |= visible;
              }
            }
            for (int k = nk; k < nkv * 16; ++k) scr[k] = -INFINITY;  // padding keys
            if (!any_visible) {
              std::fill(scr, scr + nkv * 16, 0.0f);  // contributes nothing; acc unchanged
              continue;
            }
            float mb = -INFINITY;
#pragma omp simd reduction(max : mb)
            for (int k = 0; k < nk; ++k) mb = std::max(mb, scr[k]);
            const float m_new = std::max(w.m[r], mb);
            corr[q] = fast_exp(w.m[r] - m_new);  // ~0 when m was -inf (acc is 0 then)
            w.m[r] = m_new;
            v16f vsum = v16_splat(0.0f);
            for (int k = 0; k < nkv * 16; k += 16) {
              const v16f sv = v16_load(scr + k);
              // Masked keys get exactly 0 (the exp saturates at e^-87, not 0).
              const v16f e = sv == -INFINITY ? v16_splat(0.0f) : v16_exp(sv - m_new);
              v16_store(scr + k, e);
              vsum += e;
            }
            float sum = 0.0f;
            for (int l = 0; l < 16; ++l) sum += vsum[l];
            w.l[r] = w.l[r] * corr[q] + sum;
          }
          float* outs[kMaxRows];
          for (int q = 0; q < nr; ++q) outs[q] = w.acc.data() + size_t(rb + q) * DV;
          with_rows(nr, [&]<int R>() { block_pv<R>(sc, corr, w.v.data(), DV, nk, outs); });
        }
      };

      const auto& bl = blocks[size_t(qb)];
      const size_t b0 = bl.size() * size_t(split) / size_t(splits);
      const size_t b1 = bl.size() * size_t(split + 1) / size_t(splits);
      for (size_t b = b0; b < b1; ++b) process_block(*bl[b].seg, bl[b].r0, bl[b].nk);
      if (splits == 1) {
        for (int r = 0; r < rows; ++r) {
          float* out = a.out + (t0 + r / group) * a.ldo + int64_t(h0 + r % group) * dv;
          const float inv = w.l[r] > 0 ? 1.0f / w.l[r] : 0.0f;
          for (int i = 0; i < dv; ++i) out[i] = w.acc[size_t(r) * DV + i] * inv;
        }
      } else {
        std::copy(w.m.begin(), w.m.begin() + rows, pm + item * rows_max);
        std::copy(w.l.begin(), w.l.begin() + rows, pl + item * rows_max);
        std::copy(w.acc.begin(), w.acc.begin() + size_t(rows) * DV, pacc + item * rows_max * DV);
      }
    }
  }
  if (splits == 1) return;
  // Merge the partial softmax states of the splits of each (query block, kv head).
  for (int64_t qb = 0; qb < q_blocks; ++qb)
    for (int g = 0; g < a.n_kv_heads; ++g) {
      const int64_t t0 = qb * kQueryBlock;
      const int nt = int(std::min<int64_t>(kQueryBlock, a.n_q - t0));
      const int64_t first = (qb * a.n_kv_heads + g) * splits;
      for (int r = 0; r < nt * group; ++r) {
        float m = -INFINITY;
        for (int sp = 0; sp < splits; ++sp) m = std::max(m, pm[size_t(first + sp) * rows_max + r]);
        float* out = a.out + (t0 + r / group) * a.ldo + int64_t(g * group + r % group) * dv;
        std::fill(out, out + dv, 0.0f);
        float l = 0.0f;
        for (int sp = 0; sp < splits; ++sp) {
          const size_t at = size_t(first + sp) * rows_max + r;
          if (pm[at] == -INFINITY) continue;  // this split saw no key of this row
          const float c = fast_exp(pm[at] - m);
          l += pl[at] * c;
          const float* acc = pacc + at * DV;
          for (int i = 0; i < dv; ++i) out[i] += acc[i] * c;
        }
        const float inv = l > 0 ? 1.0f / l : 0.0f;
        for (int i = 0; i < dv; ++i) out[i] *= inv;
      }
    }
}

void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                      const float* bias, int k_width, float* state, float* y, int64_t ldy) {
  const int hist = k_width - 1;
  // Input at chunk time tau (may be negative: then it comes from the state).
  auto in = [&](int64_t tau) -> const float* {
    return tau >= 0 ? x + tau * ldx : state + (tau + hist) * channels;
  };
#pragma omp parallel
  {
    // Channel blocks per thread keep each thread's state slice private.
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = (channels + nt - 1) / nt;
    const int64_t c0 = std::min(channels, id * per), c1 = std::min(channels, c0 + per);
    const int64_t c_vec = c0 + (c1 - c0) / 16 * 16;
    for (int64_t t = 0; t < n; ++t) {
      float* yr = y + t * ldy;
      for (int64_t c = c0; c < c_vec; c += 16) {
        v16f acc = v16_load(bias + c);
        for (int k = 0; k < k_width; ++k) acc += v16_load(weight + k * channels + c) * v16_load(in(t - hist + k) + c);
        v16_store(yr + c, v16_silu(acc));
      }
      for (int64_t c = c_vec; c < c1; ++c) {
        float acc = bias[c];
        for (int k = 0; k < k_width; ++k) acc += weight[k * channels + c] * in(t - hist + k)[c];
        yr[c] = silu(acc);
      }
    }
    // New state: the last `hist` inputs of (old state ++ chunk), oldest first.
    if (n >= hist) {
      for (int j = 0; j < hist; ++j)
        std::copy(x + (n - hist + j) * ldx + c0, x + (n - hist + j) * ldx + c1, state + j * channels + c0);
    } else if (n > 0) {
      for (int j = 0; j < hist; ++j) {
        const int64_t tau = n - hist + j;  // < n, possibly negative: shift the state left
        const float* src = in(tau);
        std::copy(src + c0, src + c1, state + j * channels + c0);  // j increasing reads ahead of writes
      }
    }
  }
}

void selective_scan(const ScanArgs& a) {
  constexpr int kLanes = 16;  // channels processed together: one v16f
  const int64_t N = a.d_state;
  check(N <= 256, "selective_scan: d_state ", N, " is larger than supported (256)");
  const int64_t n_blocks = (a.channels + kLanes - 1) / kLanes;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t c0 = blk * kLanes;
    const int lanes = int(std::min<int64_t>(kLanes, a.channels - c0));
    // State and A of this channel block, transposed to [s][lane] so that the
    // vector runs over channels: no horizontal sums in the recurrence.
    alignas(64) float hbuf[256][kLanes];
    alignas(64) float Abuf[256][kLanes];
    alignas(64) float tmp[kLanes];
    auto gather = [&](const float* src, int64_t stride) {  // lanes beyond the end read as 0
      for (int l = 0; l < kLanes; ++l) tmp[l] = l < lanes ? src[l * stride] : 0.0f;
      return v16_load(tmp);
    };
    if (N == 16 && lanes == 16) {
      // Hymba's d_state: a whole 16x16 tile, transposed in registers.
      v16f h[16], A[16];
      for (int l = 0; l < 16; ++l) {
        h[l] = v16_load(a.state + (c0 + l) * 16);
        A[l] = v16_load(a.A + (c0 + l) * 16);
      }
      transpose16(h);
      transpose16(A);
      for (int s = 0; s < 16; ++s) {
        v16_store(hbuf[s], h[s]);
        v16_store(Abuf[s], A[s]);
      }
    } else {
      for (int64_t s = 0; s < N; ++s) {
        v16_store(hbuf[s], gather(a.state + c0 * N + s, N));
        v16_store(Abuf[s], gather(a.A + c0 * N + s, N));
      }
    }
    const v16f bias = gather(a.dt_bias + c0, 1), D = gather(a.D + c0, 1);
    for (int64_t t = 0; t < a.n; ++t) {
      const v16f u = gather(a.u + t * a.ldu + c0, 1);
      const v16f dt = v16_softplus(gather(a.delta + t * a.ld_delta + c0, 1) + bias);
      const v16f du = dt * u;
      v16f y = D * u;
      const float* B = a.B + t * a.ldb;
      const float* C = a.C + t * a.ldc;
      for (int64_t s = 0; s < N; ++s) {
        const v16f h = v16_exp(dt * v16_load(Abuf[s])) * v16_load(hbuf[s]) + du * B[s];
        v16_store(hbuf[s], h);
        y += h * C[s];
      }
      y *= v16_silu(gather(a.z + t * a.ldz + c0, 1));
      v16_store(tmp, y);
      float* yr = a.y + t * a.ldy + c0;
      for (int l = 0; l < lanes; ++l) yr[l] = tmp[l];
    }
    if (N == 16 && lanes == 16) {
      v16f h[16];
      for (int s = 0; s < 16; ++s) h[s] = v16_load(hbuf[s]);
      transpose16(h);
      for (int l = 0; l < 16; ++l) v16_store(a.state + (c0 + l) * 16, h[l]);
    } else {
      for (int64_t s = 0; s < N; ++s)
        for (int l = 0; l < lanes; ++l) a.state[(c0 + l) * N + s] = hbuf[s][l];
    }
  }
}

void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t n, int64_t d, float* out,
              int64_t ldo) {
#pragma omp parallel for if (n * d > 65536)
  for (int64_t t = 0; t < n; ++t) {
    const float* g = gate + t * ldg;
    const float* u = up + t * ldu;
    float* o = out + t * ldo;
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) v16_store(o + i, v16_silu(v16_load(g + i)) * v16_load(u + i));
    for (; i < d; ++i) o[i] = silu(g[i]) * u[i];
  }
}

void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d) {
  for (int64_t t = 0; t < n; ++t) {
    float* ar = a + t * lda;
    const float* br = b + t * ldb;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) ar[i] = (ar[i] + br[i]) * 0.5f;
  }
}

void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo) {
  const size_t es = dtype_size(table.dtype);
  for (int64_t t = 0; t < n; ++t) {
    check(ids[t] >= 0 && ids[t] < table.rows, "token id ", ids[t], " is out of range (vocabulary has ",
          table.rows, " tokens)");
    to_f32(static_cast<const uint8_t*>(table.data) + size_t(ids[t]) * size_t(table.cols) * es, table.dtype,
           size_t(table.cols), out + t * ldo);
  }
}

}  // namespace hymba::cpu
