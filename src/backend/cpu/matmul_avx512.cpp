// AVX-512 matmul tiles. Every function carries its own target attribute so
// this file builds (and the binary runs elsewhere) whatever -march says; the
// dispatcher in matmul.cpp only calls in here after checking the CPU.
#if defined(__x86_64__) || defined(__i386__)

// GCC 12's AVX-512 headers trip -Wuninitialized on their own
// _mm512_undefined_ps() when inlined into target-attributed functions.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstdint>

#include "backend/cpu/matmul_impl.h"

#define HYMBA_T512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2"
#define HYMBA_AVX512 __attribute__((target(HYMBA_T512)))
#define HYMBA_AVX512_INLINE __attribute__((target(HYMBA_T512), always_inline)) inline
#define HYMBA_AVX512BF16 __attribute__((target(HYMBA_T512 ",avx512bf16")))

namespace hymba::cpu::mm {
namespace {

// Sums each of a, b, c, d horizontally: returns {sum a, sum b, sum c, sum d}.
HYMBA_AVX512_INLINE __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Per 128-bit lane: {a0+a2, b0+b2, a1+a3, b1+b3}, likewise for c, d.
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // Per lane: {a, b, c, d} partial sums of that lane's four floats.
  __m512 abcd = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Reduces the R x T accumulators and writes (or adds) them to y.
template <int R, int T>
HYMBA_AVX512_INLINE void store_tile(const __m512 (&acc)[R][T], float* y, int64_t ldy, bool add) {
  const __m512 z = _mm512_setzero_ps();
  #pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    float* yt = y + t * ldy;
    #pragma GCC unroll 16
    for (int r = 0; r + 4 <= R; r += 4) {
      __m128 s = reduce4(acc[r][t], acc[r + 1][t], acc[r + 2][t], acc[r + 3][t]);
      if (add) s = _mm_add_ps(s, _mm_loadu_ps(yt + r));
      _mm_storeu_ps(yt + r, s);
    }
    if constexpr (R % 4 != 0) {
      // 1..3 rows left: masked so y beyond the tile is never touched.
      constexpr int left = R % 4, r0 = R - left;
      const __mmask8 m = (1u << left) - 1;
      __m128 s;
      if constexpr (left == 1) s = reduce4(acc[r0][t], z, z, z);
      else if constexpr (left == 2) s = reduce4(acc[r0][t], acc[r0 + 1][t], z, z);
      else s = reduce4(acc[r0][t], acc[r0 + 1][t], acc[r0 + 2][t], z);
      if (add) s = _mm_add_ps(s, _mm_maskz_loadu_ps(m, yt + r0));
      _mm_mask_storeu_ps(yt + r0, m, s);
    }
  }
}

// ---- BF16 weights with AVX512_BF16: vdpbf16ps on bf16 W x bf16 x ----------

template <int R, int T>
struct TileDpBf16 {
  HYMBA_AVX512BF16 static void run(const void* wv, int64_t ldw, const void* xv, int64_t ldx,
                                   int64_t klen, float* y, int64_t ldy, bool add) {
    const uint16_t* w = static_cast<const uint16_t*>(wv);
    const uint16_t* x = static_cast<const uint16_t*>(xv);
    __m512 acc[R][T];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    // W is read in place, so every W load is masked to the row's end (which
    // may be the end of the mapping); x is zero padded and needs no mask.
    for (int64_t k = 0; k < klen; k += 32) {
      const __mmask32 m = klen - k >= 32 ? ~__mmask32(0) : __mmask32(_bzhi_u32(~0u, unsigned(klen - k)));
      __m512i wr[R];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) wr[r] = _mm512_maskz_loadu_epi16(m, w + r * ldw + k);
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        const __m512i xt = _mm512_loadu_si512(x + t * ldx + k);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wr[r], (__m512bh)xt);
      }
    }
    store_tile<R, T>(acc, y, ldy, add);
  }
};

// Streaming variant (decode): the R rows are walked one after another, so W
// is read strictly sequentially -- a single stream per thread, which the
// hardware prefetchers follow far better than R interleaved row streams.
// U independent partial sums per output hide the vdpbf16ps latency when T
// is small.
template <int R, int T>
struct TileDpBf16Seq {
  static constexpr int U = T == 1 ? 4 : T == 2 ? 2 : 1;
  HYMBA_AVX512BF16 static void run(const void* wv, int64_t ldw, const void* xv, int64_t ldx,
                                   int64_t klen, float* y, int64_t ldy, bool add) {
    const uint16_t* x = static_cast<const uint16_t*>(xv);
    __m512 acc[R][T];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const uint16_t* w = static_cast<const uint16_t*>(wv) + r * ldw;
      __m512 a[T][U];
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t)
        #pragma GCC unroll 16
        for (int u = 0; u < U; ++u) a[t][u] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 * U <= klen; k += 32 * U) {
        #pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
          const __m512i wu = _mm512_loadu_si512(w + k + 32 * u);
          #pragma GCC unroll 16
          for (int t = 0; t < T; ++t)
            a[t][u] = _mm512_dpbf16_ps(a[t][u], (__m512bh)wu, (__m512bh)_mm512_loadu_si512(x + t * ldx + k + 32 * u));
        }
      }
      // The last < U steps still go to separate partial sums (short rows,
      // e.g. K = 100, are all remainder); W loads are masked at the row end.
      #pragma GCC unroll 16
      for (int u = 0; u < U; ++u) {
        const int64_t left = klen - k - 32 * u;
        if (left <= 0) break;
        const __mmask32 m = left >= 32 ? ~__mmask32(0) : __mmask32(_bzhi_u32(~0u, unsigned(left)));
        const __m512i wu = _mm512_maskz_loadu_epi16(m, w + k + 32 * u);
        #pragma GCC unroll 16
        for (int t = 0; t < T; ++t)
          a[t][u] = _mm512_dpbf16_ps(a[t][u], (__m512bh)wu, (__m512bh)_mm512_loadu_si512(x + t * ldx + k + 32 * u));
      }
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        #pragma GCC unroll 16
        for (int u = 1; u < U; ++u) a[t][0] = _mm512_add_ps(a[t][0], a[t][u]);
        acc[r][t] = a[t][0];
      }
    }
    store_tile<R, T>(acc, y, ldy, add);
  }
};

// Rounds 16 floats (as bits) to bf16, nearest-even, NaN kept quiet: exactly
// hymba::f32_to_bf16, including for subnormals (vcvtne2ps2bf16 would flush).
HYMBA_AVX512_INLINE __m256i round_to_bf16(__m512i b) {
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

HYMBA_AVX512 void pack_bf16(const float* x, int64_t ldx, int64_t cols, int64_t t0, int64_t t1,
                            void* xpv, int64_t ldxp) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* src = x + t * ldx;
    uint16_t* dst = static_cast<uint16_t*>(xpv) + t * ldxp;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                          round_to_bf16(_mm512_loadu_si512(src + c)));
    if (c < cols) {
      const __mmask16 m = (1u << (cols - c)) - 1;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                          round_to_bf16(_mm512_maskz_loadu_epi32(m, src + c)));
      c += 16;
    }
    for (; c < ldxp; c += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), _mm256_setzero_si256());
  }
}

// ---- fp32-FMA tiles: W widened to fp32 in registers ------------------------
// A loader turns one K step of a W row into kSub vectors of 16 floats whose
// lanes line up with packed x vectors x[k + 16*s .. k + 16*s + 15].

struct LoadF32 {
  static constexpr int kStep = 16, kSub = 1;
  using Elem = float;
  HYMBA_AVX512_INLINE static void load(const float* w, __m512* out) { out[0] = _mm512_loadu_ps(w); }
  HYMBA_AVX512_INLINE static void load_tail(const float* w, int m, __m512* out) {
    out[0] = _mm512_maskz_loadu_ps(__mmask16((1u << m) - 1), w);
  }
};

struct LoadF16 {
  static constexpr int kStep = 16, kSub = 1;
  using Elem = uint16_t;
  HYMBA_AVX512_INLINE static void load(const uint16_t* w, __m512* out) {
    out[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  }
  HYMBA_AVX512_INLINE static void load_tail(const uint16_t* w, int m, __m512* out) {
    out[0] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << m) - 1), w));
  }
};

// bf16 without the BF16 extension: a bf16 is the top half of an fp32, so a
// 32-bit lane holding the pair (w[2j], w[2j+1]) gives w[2j] by a left shift
// and w[2j+1] by masking the low half. x is packed deinterleaved to match
// (per 32 columns: 16 even ones, then 16 odd ones).
struct LoadBf16Split {
  static constexpr int kStep = 32, kSub = 2;
  using Elem = uint16_t;
  HYMBA_AVX512_INLINE static void widen(__m512i v, __m512* out) {
    out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    out[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
  }
  HYMBA_AVX512_INLINE static void load(const uint16_t* w, __m512* out) { widen(_mm512_loadu_si512(w), out); }
  HYMBA_AVX512_INLINE static void load_tail(const uint16_t* w, int m, __m512* out) {
    widen(_mm512_maskz_loadu_epi16(__mmask32((uint32_t(1) << m) - 1), w), out);
  }
};

template <class L, int R, int T>
struct TileFma {
  HYMBA_AVX512_INLINE static void step(__m512 (&acc)[R][T], const typename L::Elem* w, int64_t ldw,
                                       const float* x, int64_t ldx, int64_t k, int tail) {
    __m512 wr[R][L::kSub];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if (tail) L::load_tail(w + r * ldw + k, tail, wr[r]);
      else L::load(w + r * ldw + k, wr[r]);
      #pragma GCC unroll 16
      for (int s = 0; s < L::kSub; ++s) asm("" : "+v"(wr[r][s]));  // (same reason as x below)
    }
    #pragma GCC unroll 16
    for (int s = 0; s < L::kSub; ++s)
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        __m512 xt = _mm512_loadu_ps(x + t * ldx + k + 16 * s);
        // Load x once into a register: folded into each of the R FMAs as a
        // memory operand it would cost R loads, and loads are the limit.
        asm("" : "+v"(xt));
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wr[r][s], xt, acc[r][t]);
      }
  }

  HYMBA_AVX512 static void run(const void* wv, int64_t ldw, const void* xv, int64_t ldx, int64_t klen,
                               float* y, int64_t ldy, bool add) {
    const auto* w = static_cast<const typename L::Elem*>(wv);
    const float* x = static_cast<const float*>(xv);
    __m512 acc[R][T];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + L::kStep <= klen; k += L::kStep) step(acc, w, ldw, x, ldx, k, 0);
    if (k < klen) step(acc, w, ldw, x, ldx, k, int(klen - k));
    store_tile<R, T>(acc, y, ldy, add);
  }
};

// Streaming variant: rows one after another (see TileDpBf16Seq), U partial
// sums per output when T is small.
template <class L, int R, int T>
struct TileFmaSeq {
  static constexpr int U = T * L::kSub >= 4 ? 1 : 4 / (T * L::kSub);
  HYMBA_AVX512_INLINE static void step(__m512 (&a)[T][U], int u, const typename L::Elem* w,
                                       const float* x, int64_t ldx, int64_t k, int tail) {
    __m512 wv[L::kSub];
    if (tail) L::load_tail(w + k, tail, wv);
    else L::load(w + k, wv);
    #pragma GCC unroll 16
    for (int s = 0; s < L::kSub; ++s)
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t)
        a[t][u] = _mm512_fmadd_ps(wv[s], _mm512_loadu_ps(x + t * ldx + k + 16 * s), a[t][u]);
  }

  HYMBA_AVX512 static void run(const void* wv, int64_t ldw, const void* xv, int64_t ldx, int64_t klen,
                               float* y, int64_t ldy, bool add) {
    const float* x = static_cast<const float*>(xv);
    constexpr int S = L::kStep;
    __m512 acc[R][T];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const auto* w = static_cast<const typename L::Elem*>(wv) + r * ldw;
      __m512 a[T][U];
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t)
        #pragma GCC unroll 16
        for (int u = 0; u < U; ++u) a[t][u] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + S * U <= klen; k += S * U)
        #pragma GCC unroll 16
        for (int u = 0; u < U; ++u) step(a, u, w, x, ldx, k + S * u, 0);
      #pragma GCC unroll 16
      for (int u = 0; u < U; ++u) {
        const int64_t left = klen - k - S * u;
        if (left <= 0) break;
        step(a, u, w, x, ldx, k + S * u, left >= S ? 0 : int(left));
      }
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        #pragma GCC unroll 16
        for (int u = 1; u < U; ++u) a[t][0] = _mm512_add_ps(a[t][0], a[t][u]);
        acc[r][t] = a[t][0];
      }
    }
    store_tile<R, T>(acc, y, ldy, add);
  }
};

template <int R, int T> using TileF32 = TileFma<LoadF32, R, T>;
template <int R, int T> using TileF16 = TileFma<LoadF16, R, T>;
template <int R, int T> using TileBf16Split = TileFma<LoadBf16Split, R, T>;
template <int R, int T> using TileF32Seq = TileFmaSeq<LoadF32, R, T>;
template <int R, int T> using TileF16Seq = TileFmaSeq<LoadF16, R, T>;
template <int R, int T> using TileBf16SplitSeq = TileFmaSeq<LoadBf16Split, R, T>;

TileSet make_dp_bf16() {
  TileSet ts;
  fill_tiles<TileDpBf16, 4, 6, 24>(ts.fn);
  fill_tiles<TileDpBf16Seq, 4, 3, 24>(ts.seq);
  ts.pack = pack_bf16;
  ts.w_elem = 2;
  ts.x_elem = 2;
  ts.kstep = 32;
  ts.gemm_r = 4;
  ts.gemm_t = 6;
  // Streaming beats blocking up to 3 tokens here (measured; decode n = 1).
  ts.stream_n = 3;
  for (int t = 1; t <= 3; ++t) ts.gemv_r[t] = 4;
  // Measured on Zen 4 (32 KiB L1, 1 MiB L2): K blocks as long as a token
  // tile of x (6 x kc bf16) plus the W rows streaming past it still fit L1
  // win (fewer horizontal reductions); a 32-row panel (~100 KiB at K =
  // 1600) is plenty to keep the reloads of x from L3 negligible.
  ts.mc = 32;
  ts.kc = 1600;
  return ts;
}

template <template <int, int> class K, template <int, int> class KSeq>
TileSet make_fma(PackFn pack, int w_elem, int kstep) {
  TileSet ts;
  fill_tiles<K, 4, 6, 24>(ts.fn);
  fill_tiles<KSeq, 4, 1, 24>(ts.seq);
  ts.pack = pack;
  ts.w_elem = w_elem;
  ts.x_elem = 4;
  ts.kstep = kstep;
  ts.gemm_r = 4;
  ts.gemm_t = 6;
  // With the widening in the loop, streaming only wins for one token: past
  // that, the out-of-order window no longer covers enough of the DRAM
  // latency and the blocked regime's explicit prefetch does better.
  ts.stream_n = 1;
  ts.gemv_r[1] = 4;
  ts.mc = 128;
  ts.kc = 512;
  return ts;
}

TileSet make_bf16_split() {
  // Two W vectors per row per step: keep accumulators + 2R W registers <= 32.
  TileSet ts;
  fill_tiles<TileBf16Split, 4, 5, 20>(ts.fn);
  fill_tiles<TileBf16SplitSeq, 4, 1, 20>(ts.seq);
  ts.pack = pack_bf16_split<16>;
  ts.w_elem = 2;
  ts.x_elem = 4;
  ts.kstep = 32;
  ts.gemm_r = 4;
  ts.gemm_t = 5;
  ts.stream_n = 1;  // as in make_fma
  ts.gemv_r[1] = 4;
  ts.mc = 128;
  ts.kc = 512;
  return ts;
}

}  // namespace

const IsaKernels& avx512_kernels(bool use_bf16_extension) {
  static const TileSet f32 = make_fma<TileF32, TileF32Seq>(pack_f32_plain, 4, 16);
  static const TileSet f16 = make_fma<TileF16, TileF16Seq>(pack_f32_plain, 2, 16);
  static const TileSet bf16_split = make_bf16_split();
  static const TileSet bf16_dp = make_dp_bf16();
  static const IsaKernels with_ext{"avx512", &f32, &bf16_dp, &f16};
  static const IsaKernels without_ext{"avx512-nobf16", &f32, &bf16_split, &f16};
  return use_bf16_extension ? with_ext : without_ext;
}

}  // namespace hymba::cpu::mm

#endif  // x86
