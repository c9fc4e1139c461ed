// AVX2 + FMA (+ F16C) matmul tiles, for x86 CPUs without AVX-512. Same
// structure as matmul_avx512.cpp with 8-float vectors and 16 registers; W of
// every dtype is widened to fp32 in registers and multiplied with FMA.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "backend/cpu/matmul_impl.h"

#define HYMBA_T256 "avx2,fma,f16c"
#define HYMBA_AVX2 __attribute__((target(HYMBA_T256)))
#define HYMBA_AVX2_INLINE __attribute__((target(HYMBA_T256), always_inline)) inline

namespace hymba::cpu::mm {
namespace {

// {sum a, sum b, sum c, sum d}
HYMBA_AVX2_INLINE __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  __m256 abcd = _mm256_add_ps(
      _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))),
      _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

template <int R, int T>
HYMBA_AVX2_INLINE void store_tile(const __m256 (&acc)[R][T], float* y, int64_t ldy, bool add) {
  const __m256 z = _mm256_setzero_ps();
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
      const __m128i m = _mm_setr_epi32(-1, left > 1 ? -1 : 0, left > 2 ? -1 : 0, 0);
      __m128 s;
      if constexpr (left == 1) s = reduce4(acc[r0][t], z, z, z);
      else if constexpr (left == 2) s = reduce4(acc[r0][t], acc[r0 + 1][t], z, z);
      else s = reduce4(acc[r0][t], acc[r0 + 1][t], acc[r0 + 2][t], z);
      if (add) s = _mm_add_ps(s, _mm_maskload_ps(yt + r0, m));
      _mm_maskstore_ps(yt + r0, m, s);
    }
  }
}

// Loaders: one K step of a W row -> kSub vectors of 8 floats lined up with
// packed x[k + 8*s ..]. Tails never read past the row: maskload for fp32, a
// zero-padded copy for 16-bit types (AVX2 has no 16-bit masked load).

struct LoadF32 {
  static constexpr int kStep = 8, kSub = 1;
  using Elem = float;
  HYMBA_AVX2_INLINE static void load(const float* w, __m256* out) { out[0] = _mm256_loadu_ps(w); }
  HYMBA_AVX2_INLINE static void load_tail(const float* w, int m, __m256* out) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    out[0] = _mm256_maskload_ps(w, mask);
  }
};

struct LoadF16 {
  static constexpr int kStep = 8, kSub = 1;
  using Elem = uint16_t;
  HYMBA_AVX2_INLINE static void load(const uint16_t* w, __m256* out) {
    out[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  }
  HYMBA_AVX2_INLINE static void load_tail(const uint16_t* w, int m, __m256* out) {
    alignas(16) uint16_t buf[8] = {};
    std::memcpy(buf, w, size_t(m) * 2);
    load(buf, out);
  }
};

// bf16 pairs widened by shift/mask; x packed by pack_bf16_split<8>.
struct LoadBf16Split {
  static constexpr int kStep = 16, kSub = 2;
  using Elem = uint16_t;
  HYMBA_AVX2_INLINE static void load(const uint16_t* w, __m256* out) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    out[1] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
  }
  HYMBA_AVX2_INLINE static void load_tail(const uint16_t* w, int m, __m256* out) {
    alignas(32) uint16_t buf[16] = {};
    std::memcpy(buf, w, size_t(m) * 2);
    load(buf, out);
  }
};

template <class L, int R, int T>
struct TileFma {
  HYMBA_AVX2_INLINE static void step(__m256 (&acc)[R][T], const typename L::Elem* w, int64_t ldw,
                                     const float* x, int64_t ldx, int64_t k, int tail) {
    __m256 wr[R][L::kSub];
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
        __m256 xt = _mm256_loadu_ps(x + t * ldx + k + 8 * s);
        // Load x once into a register: folded into each of the R FMAs as a
        // memory operand it would cost R loads, and loads are the limit.
        asm("" : "+v"(xt));
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wr[r][s], xt, acc[r][t]);
      }
  }

  HYMBA_AVX2 static void run(const void* wv, int64_t ldw, const void* xv, int64_t ldx, int64_t klen,
                             float* y, int64_t ldy, bool add) {
    const auto* w = static_cast<const typename L::Elem*>(wv);
    const float* x = static_cast<const float*>(xv);
    __m256 acc[R][T];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + L::kStep <= klen; k += L::kStep) step(acc, w, ldw, x, ldx, k, 0);
    if (k < klen) step(acc, w, ldw, x, ldx, k, int(klen - k));
    store_tile<R, T>(acc, y, ldy, add);
  }
};

// Streaming variant: rows one after another, so W is one sequential stream
// per thread (the prefetchers follow that far better than R row streams); U
// partial sums per output when T is small, to hide the FMA latency.
template <class L, int R, int T>
struct TileFmaSeq {
  static constexpr int U = T * L::kSub >= 4 ? 1 : 4 / (T * L::kSub);
  HYMBA_AVX2_INLINE static void step(__m256 (&a)[T][U], int u, const typename L::Elem* w,
                                     const float* x, int64_t ldx, int64_t k, int tail) {
    __m256 wv[L::kSub];
    if (tail) L::load_tail(w + k, tail, wv);
    else L::load(w + k, wv);
    #pragma GCC unroll 16
    for (int s = 0; s < L::kSub; ++s)
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t)
        a[t][u] = _mm256_fmadd_ps(wv[s], _mm256_loadu_ps(x + t * ldx + k + 8 * s), a[t][u]);
  }

  HYMBA_AVX2 static void run(const void* wv, int64_t ldw, const void* xv, int64_t ldx, int64_t klen,
                             float* y, int64_t ldy, bool add) {
    const float* x = static_cast<const float*>(xv);
    constexpr int S = L::kStep;
    __m256 acc[R][T];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const auto* w = static_cast<const typename L::Elem*>(wv) + r * ldw;
      __m256 a[T][U];
      #pragma GCC unroll 16
      for (int t = 0; t < T; ++t)
        #pragma GCC unroll 16
        for (int u = 0; u < U; ++u) a[t][u] = _mm256_setzero_ps();
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
        for (int u = 1; u < U; ++u) a[t][0] = _mm256_add_ps(a[t][0], a[t][u]);
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

TileSet make_f32_like(bool f16) {
  TileSet ts;
  if (f16) {
    fill_tiles<TileF16, 3, 4, 12>(ts.fn);
    fill_tiles<TileF16Seq, 4, 1, 12>(ts.seq);
  } else {
    fill_tiles<TileF32, 3, 4, 12>(ts.fn);
    fill_tiles<TileF32Seq, 4, 1, 12>(ts.seq);
  }
  ts.pack = pack_f32_plain;
  ts.w_elem = f16 ? 2 : 4;
  ts.x_elem = 4;
  ts.kstep = 8;
  ts.gemm_r = 3;
  ts.gemm_t = 4;
  ts.stream_n = 1;  // streaming only for decode (measured, as for AVX-512)
  ts.gemv_r[1] = 4;
  ts.mc = 96;
  ts.kc = 512;
  return ts;
}

TileSet make_bf16() {
  TileSet ts;
  fill_tiles<TileBf16Split, 2, 4, 8>(ts.fn);
  fill_tiles<TileBf16SplitSeq, 4, 1, 12>(ts.seq);
  ts.pack = pack_bf16_split<8>;
  ts.w_elem = 2;
  ts.x_elem = 4;
  ts.kstep = 16;
  ts.gemm_r = 2;
  ts.gemm_t = 4;
  ts.stream_n = 1;  // streaming only for decode (measured, as for AVX-512)
  ts.gemv_r[1] = 4;
  ts.mc = 96;
  ts.kc = 512;
  return ts;
}

}  // namespace

const IsaKernels& avx2_kernels() {
  static const TileSet f32 = make_f32_like(false);
  static const TileSet f16 = make_f32_like(true);
  static const TileSet bf16 = make_bf16();
  static const IsaKernels k{"avx2", &f32, &bf16, &f16};
  return k;
}

}  // namespace hymba::cpu::mm

#endif  // x86
