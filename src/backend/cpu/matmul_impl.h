// Private plumbing shared by the matmul paths (matmul.cpp, matmul_avx2.cpp,
// matmul_avx512.cpp). Not part of the op contract.
//
// Every path works the same way:
//  1. x (fp32 activations) is packed once per call into a contiguous,
//     zero-padded buffer in the form the path's kernel wants (bf16 for
//     vdpbf16ps, even/odd-deinterleaved fp32 for the shift-widening bf16
//     kernels, plain fp32 otherwise). Padding makes whole-vector x loads safe,
//     so only W (read in place, never copied) needs masked tail loads.
//  2. y tiles of R rows x T tokens are computed by register-tiled "dot
//     product" kernels: both W rows and x rows run along K, so a tile keeps
//     R*T vector accumulators, and reduces them horizontally once at the end.
//  3. compute_tiles() walks the tiles. Streaming regime (decode, n <=
//     stream_n): "seq" tiles walk their rows one after another, so each
//     thread reads W as one sequential stream, once. Blocked regime (larger
//     n): W is cut into L2-sized panels that every token tile reuses, and
//     the next panel is prefetched meanwhile so DRAM keeps streaming.
#pragma once

#include <cstdint>
#include <utility>

#include "util/dtype.h"

namespace hymba::cpu::mm {

// One tile: y[t*ldy + r] (+)= sum_{k<klen} W[r*ldw + k] * x[t*ldx + k] for
// r < R, t < T. w and x already point at the tile's first row / column;
// ldw, ldx are in elements of their own types. x rows are readable up to
// klen rounded up to the kernel's K step (zero padding).
using TileFn = void (*)(const void* w, int64_t ldw, const void* x, int64_t ldx, int64_t klen,
                        float* y, int64_t ldy, bool add);

// Packs tokens [t0, t1) of x (row t at x + t*ldx, cols valid floats) into
// xp (row t at byte offset t*ldxp*x_elem), zero-filling columns [cols, ldxp).
using PackFn = void (*)(const float* x, int64_t ldx, int64_t cols, int64_t t0, int64_t t1,
                        void* xp, int64_t ldxp);

constexpr int kMaxR = 8;
constexpr int kMaxT = 8;

struct TileSet {
  // fn[R][T]: tiles of the blocked regime; seq[R][T]: tiles of the
  // streaming regime, which walk their rows one after another (one
  // sequential stream through W). Null where not instantiated.
  TileFn fn[kMaxR + 1][kMaxT + 1] = {};
  TileFn seq[kMaxR + 1][kMaxT + 1] = {};
  PackFn pack = nullptr;
  int w_elem = 0;  // bytes per W element
  int x_elem = 0;  // bytes per packed x element
  int kstep = 0;   // K elements per vector step; packed rows are a multiple
  int gemm_r = 0, gemm_t = 0;  // register tile of the blocked (prefill) regime
  int stream_n = 0;            // n <= stream_n (<= gemm_t): streaming regime
  int gemv_r[kMaxT + 1] = {};  // rows per streaming tile, by n
  int64_t mc = 0;  // rows per W panel kept in L2 (multiple of gemm_r)
  int64_t kc = 0;  // max K per panel (multiple of kstep)
};

struct IsaKernels {
  const char* name;
  const TileSet* f32;
  const TileSet* bf16;
  const TileSet* f16;
};

struct Job {
  const void* w;
  int64_t rows, cols;
  const void* xp;
  int64_t ldxp;
  float* y;
  int64_t ldy;
  bool accumulate;
};

// Computes y rows [r0, r1) for tokens [t0, t1) (single thread).
void compute_tiles(const TileSet& ts, const Job& job, int64_t r0, int64_t r1, int64_t t0,
                   int64_t t1);

const IsaKernels& portable_kernels();
#if defined(__x86_64__) || defined(__i386__)
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels(bool use_bf16_extension);
#endif

// Packs: plain fp32 copy; fp32 rounded to bf16 values (kept as fp32).
void pack_f32_plain(const float* x, int64_t ldx, int64_t cols, int64_t t0, int64_t t1, void* xp,
                    int64_t ldxp);
void pack_bf16_as_f32(const float* x, int64_t ldx, int64_t cols, int64_t t0, int64_t t1, void* xp,
                      int64_t ldxp);

// fp32 rounded to bf16, deinterleaved per 2H columns: x[2j] for j < H, then
// x[2j+1]. Matches kernels that widen bf16 pairs by shifting (the even
// element of a 32-bit lane by << 16, the odd one by masking). ldxp % 2H == 0.
template <int H>
void pack_bf16_split(const float* x, int64_t ldx, int64_t cols, int64_t t0, int64_t t1, void* xpv,
                     int64_t ldxp) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* src = x + t * ldx;
    float* dst = static_cast<float*>(xpv) + t * ldxp;
    for (int64_t base = 0; base < ldxp; base += 2 * H)
      for (int j = 0; j < 2 * H; ++j) {
        const int64_t from = base + (j < H ? 2 * j : 2 * (j - H) + 1);
        dst[base + j] = from < cols ? round_to_bf16(src[from]) : 0.0f;
      }
  }
}

// Fills table[R][T] with &K<R, T>::run for R <= MaxR, T <= MaxT, R*T <= MaxAcc
// (bigger tiles would not fit the register file and are never requested).
using TileTable = TileFn[kMaxR + 1][kMaxT + 1];

template <template <int, int> class K, int R, int MaxT, int MaxAcc>
void fill_tile_row(TileTable& table) {
  [&]<int... J>(std::integer_sequence<int, J...>) {
    (
        [&] {
          if constexpr (R * (J + 1) <= MaxAcc) table[R][J + 1] = &K<R, J + 1>::run;
        }(),
        ...);
  }(std::make_integer_sequence<int, MaxT>{});
}

template <template <int, int> class K, int MaxR, int MaxT, int MaxAcc>
void fill_tiles(TileTable& table) {
  static_assert(MaxR <= kMaxR && MaxT <= kMaxT);
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (fill_tile_row<K, I + 1, MaxT, MaxAcc>(table), ...);
  }(std::make_integer_sequence<int, MaxR>{});
}

}  // namespace hymba::cpu::mm
