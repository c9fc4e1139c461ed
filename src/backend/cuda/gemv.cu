// Batch-1..4 decode products with bf16 weights: y (+)= x_bf16 W^T as fused
// GEMV kernels that stream W once at HBM speed (cuBLASLt at n = 1 plus a
// separate rounding kernel reaches a fraction of it). Variants fold in the
// rmsnorm before the product (norm_matmul), the branch fusion
// (fuse_branches_matmul) and the SwiGLU gate (norm_swiglu).
//
// Layout of a launch: 256 threads (8 warps) per block. A "group" of KW warps
// (KW in 1, 2, 4, 8) computes two output rows together: rows 2g and 2g+1 of W
// (plain), or row g of Wg and of Wu (swiglu), so every x value read from
// shared memory feeds two weights. The G = 32*KW threads of a group split the
// row into chunks of VEC bf16 (VEC = 8: one 16-byte load); thread i takes
// chunks i, i+G, i+2G, ... A "batch" is U = kUnroll chunks per row per
// thread, loaded into registers before any is used; the batch after it is
// prefetched into L2 at the same time. A block's unit of work (a "task") is
// its 8/KW groups; the grid holds at most 3 blocks per SM for one token (so
// a block of the next kernel fits beside them, see PDL below), 2 for
// several, never more than fit in shared memory, and each block loops over
// tasks, prefetching the next task's weights into L2 while it computes the
// current one: weights are requested a task ahead whatever the matrix size.
//
// Per-kernel latency (a decode step is ~200 short products back to back):
// * The weights never depend on earlier kernels, so the first batch (and the
//   L2 prefetch of the rest), and the norm weights, are requested before
//   anything else; then x is staged (stage_x: one round of
//   cp.async), so x's latency and the norm overlap the stream.
// * Programmatic Dependent Launch (launch.cuh): a kernel may start while
//   the previous one is finishing; it issues its weight loads, allows its
//   own successor to launch, and only then waits for the previous grid
//   before reading x, the norm weights or y. HYMBA_PDL=0 turns it off.
//
// Batch invariance: the value for (token t, row r) is a chain of fmaf over
// the thread's chunks in order, a fixed xor-butterfly over the warp and a sum
// over the KW warps in order; the norm's sum of squares is per token, each
// thread over its columns in order, then the same butterfly and warp order.
// KW and VEC depend on (rows, cols, W's address) only, never on n, and each
// token has its own accumulators, so a token's result is bit-identical
// whatever the other tokens are. (bf16 x bf16 products are exact in fp32, so
// fmaf equals the CPU's multiply-then-add.)
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/launch.cuh"

namespace hymba::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // chunks per thread per row in registers (one batch)
// Groups x KW the launch aims for: about 16 warps per SM on a 132-SM Hopper.
// A constant (not the device's SM count) so that the summation order is the
// same on every card.
constexpr int64_t kTargetWarps = 2048;
constexpr int kMaxDevices = 32;  // per-device caches; devices past it query each time

enum Mode : int { kPlain = 0, kNorm = 1, kFuse = 2 };

struct GemvArgs {
  const uint16_t* w0 = nullptr;  // W, or Wg (swiglu)
  const uint16_t* w1 = nullptr;  // Wu (swiglu only)
  int64_t rows = 0, cols = 0;
  const float* x = nullptr;   // plain/norm: x; fuse: a
  int64_t ldx = 0;
  const float* x2 = nullptr;  // fuse: b
  int64_t ldx2 = 0;
  const float* nw = nullptr;   // norm weight (norm, swiglu), wa (fuse)
  const float* nw2 = nullptr;  // wb (fuse)
  float eps = 0.0f;
  float* y = nullptr;
  int64_t ldy = 0;
  bool accumulate = false;
  int kw = 1;           // warps per group
  int64_t groups = 0;   // groups with work
  int64_t cols_pad = 0;  // staged x row pitch (bf16 elements), a multiple of 8
  int x_vec4 = 0;         // stage_x: x rows (and b's) 16-byte aligned: 16-byte copies
};

// A chunk of VEC bf16 values as 32-bit words (VEC = 1: low half of word 0).
template <int VEC>
struct Chunk {
  uint32_t w[VEC >= 2 ? VEC / 2 : 1];
};

// Streaming load of a weight chunk: read once, so keep it out of L1; the
// L2::256B hint has L2 fetch whole 256-byte blocks (a warp reads 512
// contiguous bytes per instruction at VEC = 8).
template <int VEC>
__device__ __forceinline__ Chunk<VEC> load_w(const uint16_t* p) {
  Chunk<VEC> c;
  if constexpr (VEC == 8) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(c.w[0]), "=r"(c.w[1]), "=r"(c.w[2]), "=r"(c.w[3])
                 : "l"(p));
  } else if constexpr (VEC == 4) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];"
                 : "=r"(c.w[0]), "=r"(c.w[1])
                 : "l"(p));
  } else if constexpr (VEC == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(c.w[0]) : "l"(p));
  } else {
    unsigned short h;
    asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(h) : "l"(p));
    c.w[0] = h;
  }
  return c;
}

// A hint: fetch the line holding p into L2 (no register, no completion).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// The staged x chunk (shared memory, aligned to the chunk's size).
template <int VEC>
__device__ __forceinline__ Chunk<VEC> load_x(const uint16_t* p) {
  Chunk<VEC> c;
  if constexpr (VEC == 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    c.w[0] = v.x, c.w[1] = v.y, c.w[2] = v.z, c.w[3] = v.w;
  } else if constexpr (VEC == 4) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    c.w[0] = v.x, c.w[1] = v.y;
  } else if constexpr (VEC == 2) {
    c.w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    c.w[0] = *p;
  }
  return c;
}

__device__ __forceinline__ float lo_f(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float hi_f(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

// acc + sum_i w[i] x[i], elements in order (a single fmaf chain: fixed order).
template <int VEC>
__device__ __forceinline__ float dot_chunk(const Chunk<VEC>& w, const Chunk<VEC>& x, float acc) {
  if constexpr (VEC == 1) {
    return __fmaf_rn(lo_f(w.w[0]), lo_f(x.w[0]), acc);
  } else {
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      acc = __fmaf_rn(lo_f(w.w[i]), lo_f(x.w[i]), acc);
      acc = __fmaf_rn(hi_f(w.w[i]), hi_f(x.w[i]), acc);
    }
    return acc;
  }
}

// The per-token norm scales from each thread's sums of squares: an xor
// butterfly in each warp, then the warps in order (red: NS x NT x kWarps
// doubles of shared memory).
template <int NS, int NT>
__device__ __forceinline__ void norm_scales(double (&ss)[NS][NT], double* red, const GemvArgs& a,
                                            float (&inv)[NS][NT]) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
#pragma unroll
  for (int s = 0; s < NS; ++s) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss[s][t] += __shfl_xor_sync(0xffffffffu, ss[s][t], o);
      if (lane == 0) red[(s * NT + t) * kWarps + warp] = ss[s][t];
    }
  }
  __syncthreads();
#pragma unroll
  for (int s = 0; s < NS; ++s) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      double total = 0.0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += red[(s * NT + t) * kWarps + w];
      inv[s][t] = float(1.0 / sqrt(total / double(a.cols) + double(a.eps)));
    }
  }
}

// ---- Staging in one round: the rows of x (and b) and the norm weights are
// copied into shared memory as fp32 with cp.async (no registers held, every
// copy in flight at once), so staging costs one L2 round trip whatever the
// width; the norm weights, which no kernel writes, are copied before the
// PDL wait. Then the sums of squares, normalisation and bf16 rounding run
// out of shared memory (the arithmetic of cuda::rmsnorm and
// cuda::average_into: the sum of squares in double, explicit _rn products,
// no contraction into fma).
// Shared memory after xs (NT x cols_pad bf16): xf [NS][NT][cols] fp32, then
// (norm modes) wf [NS][cols] fp32. Sum of squares per token: thread i over
// the 4-column groups i, i + 256, ... in order, then the xor butterfly and
// the warps in order (fixed, independent of n: batch invariant).

// .ca (cached in L1 too): the blocks resident on an SM stage the same x rows
// and norm weights, so all but the first read them from L1 (H100, 1K decode:
// 2.41 -> 2.29 ms per step against .cg, L2 only; the fused out_proj product
// alone 11.6 -> 8.3 us). Staging runs after pdl_wait, which makes the
// previous kernels' writes visible to every load that follows, L1 included.
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, int bytes) {
  const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
  if (bytes == 16) asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
  else asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;" ::: "memory");
  asm volatile("cp.async.wait_group 0;" ::: "memory");
}

// Copies `cols` floats from src into dst (both 16-byte aligned when vec4).
__device__ __forceinline__ void copy_row_async(float* dst, const float* src, int cols, bool vec4) {
  const int tid = int(threadIdx.x);
  if (vec4) {
    for (int i = tid; i < cols / 4; i += kThreads) cp_async(dst + 4 * i, src + 4 * i, 16);
    for (int c = cols / 4 * 4 + tid; c < cols; c += kThreads) cp_async(dst + c, src + c, 4);
  } else {
    for (int c = tid; c < cols; c += kThreads) cp_async(dst + c, src + c, 4);
  }
}

// The weights' part: the norm weights into wf (before the PDL wait).
template <int MODE>
__device__ __forceinline__ void stage_norm_weights(const GemvArgs& a, float* wf) {
  if constexpr (MODE != kPlain) {
    const int cols = int(a.cols);
    const bool v4 = cols % 4 == 0 && (reinterpret_cast<uintptr_t>(a.nw) % 16 == 0) &&
                    (MODE != kFuse || reinterpret_cast<uintptr_t>(a.nw2) % 16 == 0);
    copy_row_async(wf, a.nw, cols, v4);
    if constexpr (MODE == kFuse) copy_row_async(wf + cols, a.nw2, cols, v4);
  }
}

template <int NT, int MODE>
__device__ __forceinline__ void stage_x(const GemvArgs& a, uint16_t* xs, float* xf, const float* wf, double* red) {
  constexpr int NS = MODE == kFuse ? 2 : 1;
  const int cols = int(a.cols);
  const int tid = int(threadIdx.x);
#pragma unroll
  for (int s = 0; s < NS; ++s) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
      copy_row_async(xf + (s * NT + t) * cols, s == 0 ? a.x + t * a.ldx : a.x2 + t * a.ldx2, cols, a.x_vec4 != 0);
  }
  cp_async_wait_all();  // this thread's copies (x, and the norm weights)
  __syncthreads();      // everyone's
  const int g4 = (cols + 3) / 4;  // 4-column groups (the last may be partial)
  if constexpr (MODE == kPlain) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
      for (int c = tid; c < cols; c += kThreads) xs[t * a.cols_pad + c] = f32_to_bf16_bits(xf[t * cols + c]);
    return;
  } else {
    double ss[NS][NT];
#pragma unroll
    for (int s = 0; s < NS; ++s) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float* xr = xf + (s * NT + t) * cols;
        ss[s][t] = 0.0;
        for (int i = tid; i < g4; i += kThreads) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int c = 4 * i + j;
            const double d = c < cols ? xr[c] : 0.0f;
            ss[s][t] += d * d;
          }
        }
      }
    }
    float inv[NS][NT];
    norm_scales<NS, NT>(ss, red, a, inv);
    // Normalise, round, store (the arithmetic of cuda::rmsnorm / average_into).
    for (int c = tid; c < cols; c += kThreads) {
      const float w0 = wf[c];
      const float w1 = MODE == kFuse ? wf[cols + c] : 0.0f;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        float r = __fmul_rn(__fmul_rn(xf[t * cols + c], inv[0][t]), w0);
        if constexpr (MODE == kFuse) {
          const float rb = __fmul_rn(__fmul_rn(xf[(NT + t) * cols + c], inv[NS - 1][t]), w1);
          r = __fmul_rn(__fadd_rn(r, rb), 0.5f);
        }
        xs[t * a.cols_pad + c] = f32_to_bf16_bits(r);
      }
    }
  }
}

// Blocks per SM the register allocation must allow: 4 (<= 64 registers)
// for one token, so that a kernel's blocks and its PDL successor's share
// the SMs; 2 (<= 128) for several, whose accumulators and x values
// otherwise spill (at 64 registers 4 tokens spilled 100-600 bytes per
// thread: the 4-token products ran at ~0.6 TB/s; H200, session 14).
template <int NT>
constexpr int kMinBlocks = NT == 1 ? 4 : 2;

template <int NT, int VEC, int MODE, bool SWIGLU>
__global__ void __launch_bounds__(kThreads, kMinBlocks<NT>) gemv_kernel(const GemvArgs a) {
  static_assert(!SWIGLU || MODE == kNorm, "swiglu normalises x");
  constexpr int NS = MODE == kFuse ? 2 : 1;
  extern __shared__ uint4 gemv_smem[];  // NT x cols_pad bf16 (16-byte aligned rows)
  __shared__ double red[NS * NT * kWarps];  // stage_x's sums of squares
  __shared__ float part[kWarps][2][NT];     // per-warp sums when KW > 1
  uint16_t* xs = reinterpret_cast<uint16_t*>(gemv_smem);

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int kw = a.kw;
  const int gpb = kWarps / kw;            // groups per block task
  const int gt = (warp % kw) * 32 + lane;  // thread index within the group
  const int gsize = kw * 32;
  const int step = kUnroll * gsize;  // chunks per batch
  const int64_t cols = a.cols;
  const int nchunks = int(cols / VEC);
  const int64_t n_tasks = (a.groups + gpb - 1) / gpb;

  // The two weight rows of group g (an odd row count: the last group's
  // second row repeats the first and is not written).
  auto rows_of = [&](int64_t g, const uint16_t*& p0, const uint16_t*& p1, int64_t& r0, int64_t& r1) {
    if (SWIGLU) {
      r0 = r1 = g;
    } else {
      r0 = 2 * g;
      r1 = r0 + 1 < a.rows ? r0 + 1 : r0;
    }
    p0 = a.w0 + r0 * cols;
    p1 = (SWIGLU ? a.w1 : a.w0) + r1 * cols;
  };
  // This thread's chunks of group g from chunk `from` on, into L2.
  auto prefetch_group = [&](int64_t g, int from) {
    if (g >= a.groups) return;
    const uint16_t *q0, *q1;
    int64_t s0, s1;
    rows_of(g, q0, q1, s0, s1);
    for (int c = from + gt; c < nchunks; c += gsize) {
      prefetch_l2(q0 + int64_t(c) * VEC);
      if (q1 != q0) prefetch_l2(q1 + int64_t(c) * VEC);
    }
  };

  // A block takes tasks blockIdx.x, + gridDim.x, ... (a task: gpb groups);
  // the grid is at most ~3 blocks per SM so that a block of the next kernel
  // fits beside this one's (PDL), and every task's weights are requested one
  // task ahead (into L2) so the stream never drains between tasks.
  Chunk<VEC> wa[kUnroll], wb[kUnroll];
  int64_t task = blockIdx.x;
  int64_t group = task * gpb + warp / kw;
  const uint16_t *p0, *p1;
  int64_t r0, r1;
  rows_of(group < a.groups ? group : 0, p0, p1, r0, r1);
  auto load_batch = [&](int base, bool active) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + gt + u * gsize;
      if (active && c < nchunks) {
        wa[u] = load_w<VEC>(p0 + int64_t(c) * VEC);
        wb[u] = load_w<VEC>(p1 + int64_t(c) * VEC);
      }
    }
  };

  // Weights first: they don't depend on earlier kernels.
  float* xf = reinterpret_cast<float*>(xs + NT * a.cols_pad);  // stage_x's fp32 rows
  float* wf = xf + NS * NT * a.cols;                            // and norm weights
  stage_norm_weights<MODE>(a, wf);
  load_batch(0, group < a.groups);
  if (group < a.groups) prefetch_group(group, step);
  prefetch_group((task + gridDim.x) * gpb + warp / kw, 0);
  pdl_launch_dependents();
  pdl_wait();  // from here on, earlier kernels' results are visible
  stage_x<NT, MODE>(a, xs, xf, wf, red);
  __syncthreads();

  for (bool first = true; task < n_tasks; task += gridDim.x, first = false) {
    group = task * gpb + warp / kw;
    const bool active = group < a.groups;  // the last task may have idle groups
    if (!first) {
      if (active) rows_of(group, p0, p1, r0, r1);
      load_batch(0, active);  // in L2 already (prefetched a task ahead)
      prefetch_group((task + gridDim.x) * gpb + warp / kw, 0);
    }
    float acc0[NT], acc1[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc0[t] = 0.0f, acc1[t] = 0.0f;

    if (active) {
      for (int base = 0;;) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = base + gt + u * gsize;
          if (c < nchunks) {
#pragma unroll
            for (int t = 0; t < NT; ++t) {
              const Chunk<VEC> xv = load_x<VEC>(xs + t * a.cols_pad + int64_t(c) * VEC);
              acc0[t] = dot_chunk<VEC>(wa[u], xv, acc0[t]);
              acc1[t] = dot_chunk<VEC>(wb[u], xv, acc1[t]);
            }
          }
        }
        base += step;
        if (base >= nchunks) break;
        load_batch(base, true);  // in L2 already (prefetched)
      }
    }

    // Warp sums (xor butterfly: every lane holds the same bits).
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        acc0[t] += __shfl_xor_sync(0xffffffffu, acc0[t], o);
        acc1[t] += __shfl_xor_sync(0xffffffffu, acc1[t], o);
      }
    }
    bool writer = active && lane == 0;
    if (kw > 1) {  // uniform over the block
      if (lane == 0) {
#pragma unroll
        for (int t = 0; t < NT; ++t) part[warp][0][t] = acc0[t], part[warp][1][t] = acc1[t];
      }
      __syncthreads();
      if (warp % kw == 0) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          float s0 = part[warp][0][t], s1 = part[warp][1][t];
          for (int k = 1; k < kw; ++k) s0 += part[warp + k][0][t], s1 += part[warp + k][1][t];
          acc0[t] = s0, acc1[t] = s1;
        }
      }
      writer = writer && warp % kw == 0;
      __syncthreads();  // part is rewritten by the next task
    }
    if (writer) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        float* yr = a.y + t * a.ldy;
        if (SWIGLU) {
          yr[r0] = silu_f(acc0[t]) * acc1[t];  // as cuda::silu_mul
        } else {
          yr[r0] = a.accumulate ? yr[r0] + acc0[t] : acc0[t];
          if (r1 != r0) yr[r1] = a.accumulate ? yr[r1] + acc1[t] : acc1[t];
        }
      }
    }
  }
}

// Largest of 8, 4, 2, 1 bf16 that divides cols and W's address (in elements):
// every row start is then aligned for VEC-wide loads. 0: W is not even
// 2-byte aligned.
int vec_width(const void* w, int64_t cols) {
  const uint64_t addr = uint64_t(reinterpret_cast<uintptr_t>(w));
  if (addr % 2) return 0;
  int v = 8;
  while (v > 1 && ((addr / 2) % uint64_t(v) != 0 || cols % v != 0)) v /= 2;
  return v;
}

// Warps per group: enough groups x warps to fill the GPU, but each thread
// keeps at least one chunk. A function of (rows, cols, VEC) only.
int warps_per_group(int64_t groups, int64_t nchunks) {
  int kw = 1;
  while (kw < kWarps && groups * kw < kTargetWarps && nchunks >= int64_t(64) * kw) kw *= 2;
  return kw;
}

// Resident blocks per SM the grid aims at for one token: 3 (H100, 1K
// decode: 2.60 ms/step against 2.70 with 2, 2.63 with 4, 2.87 with 1), or
// HYMBA_GEMV_BLOCKS_PER_SM (1-4; read once) for tuning. For several tokens:
// 2 (kMinBlocks' register bound lets 2 share an SM; H200, 1K decode of 2 /
// 4 sequences: 2.56 / 3.87 ms per step against 2.81 / 4.86 with 3 blocks of
// 64 registers).
constexpr int kMultiTokenBlocksPerSm = 2;
int blocks_per_sm() {
  static const int v = [] {
    const char* e = std::getenv("HYMBA_GEMV_BLOCKS_PER_SM");
    const int b = e ? std::atoi(e) : 0;
    return b >= 1 && b <= 4 ? b : 3;
  }();
  return v;
}

int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return dev;
}

// Device attribute `attr` of device dev, cached per device (slot: one
// cache per attribute); `fallback` when it cannot be read.
template <int slot>
int cached_attribute(int dev, cudaDeviceAttr attr, int fallback) {
  static std::atomic<int> cache[kMaxDevices];  // 0: not asked yet
  if (dev >= 0 && dev < kMaxDevices) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int v = 0;
  if (dev < 0 || cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess || v <= 0) {
    (void)cudaGetLastError();
    return fallback;
  }
  if (dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// Dynamic shared memory a block may use (room left for the kernel's static
// shared memory).
int max_dynamic_smem(int dev) {
  return cached_attribute<0>(dev, cudaDevAttrMaxSharedMemoryPerBlockOptin, (48 << 10) + 2048) - 2048;
}
int sm_count(int dev) { return cached_attribute<1>(dev, cudaDevAttrMultiProcessorCount, 132); }
// Shared memory of an SM, and a bound on what a block takes beside its
// dynamic shared memory (the kernel's static arrays plus the 1 KB the
// runtime reserves per block).
int smem_per_sm(int dev) { return cached_attribute<2>(dev, cudaDevAttrMaxSharedMemoryPerMultiprocessor, 228 << 10); }
constexpr size_t kStaticSmemBound = 3 << 10;

template <int NT, int VEC, int MODE, bool SWIGLU>
void launch_t(const GemvArgs& a, unsigned blocks, size_t smem, int dev, cudaStream_t stream) {
  auto* k = gemv_kernel<NT, VEC, MODE, SWIGLU>;
  // Per device: the dynamic shared memory granted so far (0: none asked).
  static std::atomic<size_t> granted[kMaxDevices];
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (smem > (40u << 10)) {
    // Past 48 KB (static included) a kernel must opt in: once per kernel,
    // device and size (grow only).
    if (!cached || smem > granted[dev].load()) {
      HYMBA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      if (cached) {
        size_t g = granted[dev].load();
        while (g < smem && !granted[dev].compare_exchange_weak(g, smem)) {
        }
      }
    }
  }
  launch_pdl("gemv", k, dim3(blocks), dim3(kThreads), smem, stream, a);
}

struct Launch {
  unsigned blocks;
  size_t smem;
  int dev;
  cudaStream_t stream;
};

template <int NT, int MODE, bool SWIGLU>
void launch_vec(const GemvArgs& a, int vec, const Launch& l) {
  switch (vec) {
    case 8: return launch_t<NT, 8, MODE, SWIGLU>(a, l.blocks, l.smem, l.dev, l.stream);
    case 4: return launch_t<NT, 4, MODE, SWIGLU>(a, l.blocks, l.smem, l.dev, l.stream);
    case 2: return launch_t<NT, 2, MODE, SWIGLU>(a, l.blocks, l.smem, l.dev, l.stream);
    default: return launch_t<NT, 1, MODE, SWIGLU>(a, l.blocks, l.smem, l.dev, l.stream);
  }
}

template <int MODE, bool SWIGLU>
void launch_n(const GemvArgs& a, int64_t n, int vec, const Launch& l) {
  switch (n) {
    case 1: return launch_vec<1, MODE, SWIGLU>(a, vec, l);
    case 2: return launch_vec<2, MODE, SWIGLU>(a, vec, l);
    case 3: return launch_vec<3, MODE, SWIGLU>(a, vec, l);
    default: return launch_vec<4, MODE, SWIGLU>(a, vec, l);
  }
}

// Fills in the launch shape and queues the kernel; false (nothing queued)
// when the kernels don't take the problem.
bool run(GemvArgs a, Mode mode, int64_t n, int vec, cudaStream_t stream) {
  static_assert(kGemvMaxRows == 4, "launch_n instantiates 1..4 tokens");
  if (n < 1 || n > kGemvMaxRows || a.rows <= 0 || a.cols <= 0 || vec == 0) return false;
  if (a.cols / vec > 0x3fffffff) return false;  // chunk indices (plus a batch) are int
  const int dev = current_device();
  a.cols_pad = (a.cols + 7) / 8 * 8;
  size_t smem = size_t(n) * size_t(a.cols_pad) * sizeof(uint16_t);
  {  // stage_x's fp32 rows and norm weights
    const size_t ns = mode == kFuse ? 2 : 1;
    smem += sizeof(float) * size_t(a.cols) * (ns * size_t(n) + (mode == kPlain ? 0 : ns));
    auto al = [](const float* p, int64_t ld) { return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 4 == 0; };
    a.x_vec4 = al(a.x, a.ldx) && (mode != kFuse || al(a.x2, a.ldx2)) && a.cols % 4 == 0 ? 1 : 0;
  }
  if (smem > size_t(max_dynamic_smem(dev))) return false;
  const bool swiglu = a.w1 != nullptr;
  a.groups = swiglu ? a.rows : (a.rows + 1) / 2;
  a.kw = warps_per_group(a.groups, a.cols / vec);
  const int64_t per_block = kWarps / a.kw;
  const int64_t tasks = (a.groups + per_block - 1) / per_block;
  // A grid of resident blocks that loop over the tasks (a row's result does
  // not depend on the grid): for one token 3 per SM, so that a block of the
  // next kernel fits beside them (PDL); for several 2 (their registers),
  // and no more than fit beside each other in shared memory: a block
  // stages x once and then loops over its tasks, so blocks beyond that
  // would wait for the first ones to leave and stage x again (several
  // tokens of a long row take 100 KB or more: the 4-token fused out_proj
  // took 56 us instead of 25).
  const int per_sm = n == 1 ? blocks_per_sm() : kMultiTokenBlocksPerSm;
  const int fit = int(std::max<size_t>(1, size_t(smem_per_sm(dev)) / (smem + kStaticSmemBound)));
  const int64_t resident = int64_t(sm_count(dev)) * std::min(per_sm, fit);
  const int64_t blocks = tasks < resident ? tasks : resident;
  const Launch l{unsigned(blocks), smem, dev, stream};
  if (swiglu) launch_n<kNorm, true>(a, n, vec, l);
  else if (mode == kPlain) launch_n<kPlain, false>(a, n, vec, l);
  else if (mode == kNorm) launch_n<kNorm, false>(a, n, vec, l);
  else launch_n<kFuse, false>(a, n, vec, l);
  return true;
}

}  // namespace

void set_gemv_pdl(bool on) { set_pdl(on); }
bool gemv_pdl() { return pdl_enabled(); }

bool gemv_bf16(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, bool accumulate,
               cudaStream_t stream) {
  if (W.dtype != DType::BF16) return false;
  GemvArgs a;
  a.w0 = static_cast<const uint16_t*>(W.data);
  a.rows = W.rows, a.cols = W.cols;
  a.x = x, a.ldx = ldx;
  a.y = y, a.ldy = ldy, a.accumulate = accumulate;
  return run(a, kPlain, n, vec_width(W.data, W.cols), stream);
}

bool norm_gemv_bf16(const MatrixView& W, const float* x, int64_t n, int64_t ldx, const float* norm_w, float eps,
                    float* y, int64_t ldy, bool accumulate, cudaStream_t stream) {
  if (W.dtype != DType::BF16) return false;
  GemvArgs a;
  a.w0 = static_cast<const uint16_t*>(W.data);
  a.rows = W.rows, a.cols = W.cols;
  a.x = x, a.ldx = ldx, a.nw = norm_w, a.eps = eps;
  a.y = y, a.ldy = ldy, a.accumulate = accumulate;
  return run(a, kNorm, n, vec_width(W.data, W.cols), stream);
}

bool fuse_branches_gemv_bf16(const MatrixView& W, const float* a_in, int64_t lda, const float* b_in, int64_t ldb,
                             int64_t n, const float* wa, const float* wb, float eps, float* y, int64_t ldy,
                             bool accumulate, cudaStream_t stream) {
  if (W.dtype != DType::BF16) return false;
  GemvArgs a;
  a.w0 = static_cast<const uint16_t*>(W.data);
  a.rows = W.rows, a.cols = W.cols;
  a.x = a_in, a.ldx = lda, a.x2 = b_in, a.ldx2 = ldb, a.nw = wa, a.nw2 = wb, a.eps = eps;
  a.y = y, a.ldy = ldy, a.accumulate = accumulate;
  return run(a, kFuse, n, vec_width(W.data, W.cols), stream);
}

bool norm_swiglu_gemv_bf16(const MatrixView& Wg, const MatrixView& Wu, const float* x, int64_t n, int64_t ldx,
                           const float* norm_w, float eps, float* out, int64_t ldo, cudaStream_t stream) {
  if (Wg.dtype != DType::BF16 || Wu.dtype != DType::BF16 || Wg.rows != Wu.rows || Wg.cols != Wu.cols) return false;
  GemvArgs a;
  a.w0 = static_cast<const uint16_t*>(Wg.data);
  a.w1 = static_cast<const uint16_t*>(Wu.data);
  a.rows = Wg.rows, a.cols = Wg.cols;
  a.x = x, a.ldx = ldx, a.nw = norm_w, a.eps = eps;
  a.y = out, a.ldy = ldo, a.accumulate = false;
  const int vg = vec_width(Wg.data, Wg.cols), vu = vec_width(Wu.data, Wu.cols);
  return run(a, kNorm, n, vg < vu ? vg : vu, stream);
}

}  // namespace hymba::cuda
