// Batch-1..8 decode products with bf16 weights: y (+)= x_bf16 W^T as fused
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
// chunks i, i+G, i+2G, ... and U chunks per row are loaded before any is used.
// x (all n tokens, normalised and rounded to bf16) is staged in shared memory
// by each block; the block's first weight loads are issued before staging,
// so the two overlap.
//
// Batch invariance: the value for (token t, row r) is a chain of fmaf over
// the thread's chunks in order, a fixed xor-butterfly over the warp and a sum
// over the KW warps in order. KW and VEC depend on (rows, cols, W's address)
// only, never on n, and each token has its own accumulators, so a token's
// result is bit-identical whatever the other tokens are. (bf16 x bf16
// products are exact in fp32, so fmaf equals the CPU's multiply-then-add.)
#include <atomic>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.cuh"

namespace hymba::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // chunks per thread per row in flight
// Groups x KW the launch aims for: about 16 warps per SM on a 132-SM Hopper.
// A constant (not the device's SM count) so that the summation order is the
// same on every card.
constexpr int64_t kTargetWarps = 2048;

enum Mode : int { kPlain = 0, kNorm = 1, kFuse = 2 };

struct GemvArgs {
  const uint16_t* w0 = nullptr;  // W, or Wg (swiglu)
  const uint16_t* w1 = nullptr;  // Wu (swiglu only)
  int64_t rows = 0, cols = 0;
  int mode = kPlain;
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
};

// A chunk of VEC bf16 values as 32-bit words (VEC = 1: low half of word 0).
template <int VEC>
struct Chunk {
  uint32_t w[VEC >= 2 ? VEC / 2 : 1];
};

// Streaming load of a weight chunk: read once, so keep it out of L1.
template <int VEC>
__device__ __forceinline__ Chunk<VEC> load_w(const uint16_t* p) {
  Chunk<VEC> c;
  if constexpr (VEC == 8) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(c.w[0]), "=r"(c.w[1]), "=r"(c.w[2]), "=r"(c.w[3])
                 : "l"(p));
  } else if constexpr (VEC == 4) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(c.w[0]), "=r"(c.w[1]) : "l"(p));
  } else if constexpr (VEC == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(c.w[0]) : "l"(p));
  } else {
    unsigned short h;
    asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(h) : "l"(p));
    c.w[0] = h;
  }
  return c;
}

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

// xs[t][c] = the matrix input of token t as bf16 bits (see Mode), for all NT
// tokens. The arithmetic is cuda::rmsnorm's and cuda::average_into's: the sum
// of squares in double, each thread over c = tid, tid + 256, ..., then an xor
// butterfly in each warp and the warps in order (the order of rmsnorm's
// block_sum), and explicit _rn products (no contraction into fma). All
// tokens' sums are reduced together: one pass over x, one barrier.
// red: 2 x NT x kWarps doubles of shared memory.
template <int NT>
__device__ __forceinline__ void stage_x(const GemvArgs& a, uint16_t* xs, double* red) {
  const int64_t cols = a.cols;
  const int tid = int(threadIdx.x);
  if (a.mode == kPlain) {
    for (int64_t c = tid; c < cols; c += kThreads) {
#pragma unroll
      for (int t = 0; t < NT; ++t) xs[t * a.cols_pad + c] = f32_to_bf16_bits(a.x[t * a.ldx + c]);
    }
    return;
  }
  const bool fuse = a.mode == kFuse;
  double ss[2][NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) ss[0][t] = 0.0, ss[1][t] = 0.0;
#pragma unroll 2
  for (int64_t c = tid; c < cols; c += kThreads) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const double v = a.x[t * a.ldx + c];
      ss[0][t] += v * v;
      if (fuse) {
        const double u = a.x2[t * a.ldx2 + c];
        ss[1][t] += u * u;
      }
    }
  }
  const int warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (s == 1 && !fuse) break;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss[s][t] += __shfl_xor_sync(0xffffffffu, ss[s][t], o);
      if (lane == 0) red[(s * NT + t) * kWarps + warp] = ss[s][t];
    }
  }
  __syncthreads();
  float inv[2][NT];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      double total = 0.0;
      if (s == 1 && !fuse) break;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += red[(s * NT + t) * kWarps + w];
      inv[s][t] = float(1.0 / sqrt(total / double(cols) + double(a.eps)));
    }
  }
  for (int64_t c = tid; c < cols; c += kThreads) {
    const float wa = a.nw[c];
    const float wb = fuse ? a.nw2[c] : 0.0f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      float v = __fmul_rn(__fmul_rn(a.x[t * a.ldx + c], inv[0][t]), wa);
      if (fuse) {
        const float vb = __fmul_rn(__fmul_rn(a.x2[t * a.ldx2 + c], inv[1][t]), wb);
        v = __fmul_rn(__fadd_rn(v, vb), 0.5f);
      }
      xs[t * a.cols_pad + c] = f32_to_bf16_bits(v);
    }
  }
}

template <int NT, int VEC, bool SWIGLU>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const GemvArgs a) {
  extern __shared__ uint4 gemv_smem[];  // NT x cols_pad bf16 (16-byte aligned rows)
  __shared__ double red[2 * NT * kWarps];     // stage_x's sums of squares
  __shared__ float part[kWarps][2][NT];  // per-warp sums when KW > 1
  uint16_t* xs = reinterpret_cast<uint16_t*>(gemv_smem);

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int kw = a.kw;
  const int64_t group = int64_t(blockIdx.x) * (kWarps / kw) + warp / kw;
  const int gt = (warp % kw) * 32 + lane;  // thread index within the group
  const int gsize = kw * 32;
  const bool active = group < a.groups;  // the last block may have idle groups
  const int64_t cols = a.cols;
  const int nchunks = active ? int(cols / VEC) : 0;

  // The group's two weight rows (an odd row count: the last group's second
  // row repeats the first and is not written).
  int64_t r0 = 0, r1 = 0;
  if (active) {
    if (SWIGLU) {
      r0 = r1 = group;
    } else {
      r0 = 2 * group;
      r1 = r0 + 1 < a.rows ? r0 + 1 : r0;
    }
  }
  const uint16_t* p0 = a.w0 + r0 * cols;
  const uint16_t* p1 = (SWIGLU ? a.w1 : a.w0) + r1 * cols;

  Chunk<VEC> wa[kUnroll], wb[kUnroll];
  auto load_batch = [&](int base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + gt + u * gsize;
      if (c < nchunks) {
        wa[u] = load_w<VEC>(p0 + int64_t(c) * VEC);
        wb[u] = load_w<VEC>(p1 + int64_t(c) * VEC);
      }
    }
  };

  load_batch(0);  // in flight while x is staged
  stage_x<NT>(a, xs, red);
  __syncthreads();

  float acc0[NT], acc1[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc0[t] = 0.0f, acc1[t] = 0.0f;

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
    base += kUnroll * gsize;
    if (base >= nchunks) break;
    load_batch(base);
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
  if (kw > 1) {  // uniform over the block
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < NT; ++t) part[warp][0][t] = acc0[t], part[warp][1][t] = acc1[t];
    }
    __syncthreads();
    if (warp % kw != 0) return;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      float s0 = part[warp][0][t], s1 = part[warp][1][t];
      for (int k = 1; k < kw; ++k) s0 += part[warp + k][0][t], s1 += part[warp + k][1][t];
      acc0[t] = s0, acc1[t] = s1;
    }
  }
  if (!active || lane != 0) return;
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

int max_dynamic_smem() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 48 << 10;
  }
  return v - 2048;  // leave room for the kernel's static shared memory
}

template <int NT, int VEC, bool SWIGLU>
void launch_t(const GemvArgs& a, unsigned blocks, size_t smem, cudaStream_t stream) {
  auto* k = gemv_kernel<NT, VEC, SWIGLU>;
  if (smem > (40u << 10)) {
    // Past 48 KB (static included) a kernel must opt in: once per kernel and
    // size (grow only).
    static std::atomic<size_t> granted{0};
    if (smem > granted.load()) {
      HYMBA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      size_t g = granted.load();
      while (g < smem && !granted.compare_exchange_weak(g, smem)) {
      }
    }
  }
  k<<<blocks, kThreads, smem, stream>>>(a);
  HYMBA_CUDA_LAUNCHED("gemv");
}

template <int NT, bool SWIGLU>
void launch_vec(const GemvArgs& a, int vec, unsigned blocks, size_t smem, cudaStream_t stream) {
  switch (vec) {
    case 8: return launch_t<NT, 8, SWIGLU>(a, blocks, smem, stream);
    case 4: return launch_t<NT, 4, SWIGLU>(a, blocks, smem, stream);
    case 2: return launch_t<NT, 2, SWIGLU>(a, blocks, smem, stream);
    default: return launch_t<NT, 1, SWIGLU>(a, blocks, smem, stream);
  }
}

template <bool SWIGLU>
void launch_n(const GemvArgs& a, int64_t n, int vec, unsigned blocks, size_t smem, cudaStream_t stream) {
  switch (n) {
    case 1: return launch_vec<1, SWIGLU>(a, vec, blocks, smem, stream);
    case 2: return launch_vec<2, SWIGLU>(a, vec, blocks, smem, stream);
    case 3: return launch_vec<3, SWIGLU>(a, vec, blocks, smem, stream);
    case 4: return launch_vec<4, SWIGLU>(a, vec, blocks, smem, stream);
    case 5: return launch_vec<5, SWIGLU>(a, vec, blocks, smem, stream);
    case 6: return launch_vec<6, SWIGLU>(a, vec, blocks, smem, stream);
    case 7: return launch_vec<7, SWIGLU>(a, vec, blocks, smem, stream);
    default: return launch_vec<8, SWIGLU>(a, vec, blocks, smem, stream);
  }
}

// Fills in the launch shape and queues the kernel; false (nothing queued)
// when the kernels don't take the problem.
bool run(GemvArgs a, int64_t n, int vec, cudaStream_t stream) {
  static_assert(kGemvMaxRows == 8, "launch_n instantiates 1..8 tokens");
  if (n < 1 || n > kGemvMaxRows || a.rows <= 0 || a.cols <= 0 || vec == 0) return false;
  if (a.cols / vec > 0x7fffffff) return false;  // chunk indices are int
  a.cols_pad = (a.cols + 7) / 8 * 8;
  const size_t smem = size_t(n) * size_t(a.cols_pad) * sizeof(uint16_t);
  if (smem > size_t(max_dynamic_smem())) return false;
  const bool swiglu = a.w1 != nullptr;
  a.groups = swiglu ? a.rows : (a.rows + 1) / 2;
  a.kw = warps_per_group(a.groups, a.cols / vec);
  const int64_t per_block = kWarps / a.kw;
  const int64_t blocks = (a.groups + per_block - 1) / per_block;
  if (blocks > 0x7fffffff) return false;
  if (swiglu) launch_n<true>(a, n, vec, unsigned(blocks), smem, stream);
  else launch_n<false>(a, n, vec, unsigned(blocks), smem, stream);
  return true;
}

}  // namespace

bool gemv_bf16(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, bool accumulate,
               cudaStream_t stream) {
  if (W.dtype != DType::BF16) return false;
  GemvArgs a;
  a.w0 = static_cast<const uint16_t*>(W.data);
  a.rows = W.rows, a.cols = W.cols;
  a.mode = kPlain;
  a.x = x, a.ldx = ldx;
  a.y = y, a.ldy = ldy, a.accumulate = accumulate;
  return run(a, n, vec_width(W.data, W.cols), stream);
}

bool norm_gemv_bf16(const MatrixView& W, const float* x, int64_t n, int64_t ldx, const float* norm_w, float eps,
                    float* y, int64_t ldy, bool accumulate, cudaStream_t stream) {
  if (W.dtype != DType::BF16) return false;
  GemvArgs a;
  a.w0 = static_cast<const uint16_t*>(W.data);
  a.rows = W.rows, a.cols = W.cols;
  a.mode = kNorm;
  a.x = x, a.ldx = ldx, a.nw = norm_w, a.eps = eps;
  a.y = y, a.ldy = ldy, a.accumulate = accumulate;
  return run(a, n, vec_width(W.data, W.cols), stream);
}

bool fuse_branches_gemv_bf16(const MatrixView& W, const float* a_in, int64_t lda, const float* b_in, int64_t ldb,
                             int64_t n, const float* wa, const float* wb, float eps, float* y, int64_t ldy,
                             bool accumulate, cudaStream_t stream) {
  if (W.dtype != DType::BF16) return false;
  GemvArgs a;
  a.w0 = static_cast<const uint16_t*>(W.data);
  a.rows = W.rows, a.cols = W.cols;
  a.mode = kFuse;
  a.x = a_in, a.ldx = lda, a.x2 = b_in, a.ldx2 = ldb, a.nw = wa, a.nw2 = wb, a.eps = eps;
  a.y = y, a.ldy = ldy, a.accumulate = accumulate;
  return run(a, n, vec_width(W.data, W.cols), stream);
}

bool norm_swiglu_gemv_bf16(const MatrixView& Wg, const MatrixView& Wu, const float* x, int64_t n, int64_t ldx,
                           const float* norm_w, float eps, float* out, int64_t ldo, cudaStream_t stream) {
  if (Wg.dtype != DType::BF16 || Wu.dtype != DType::BF16 || Wg.rows != Wu.rows || Wg.cols != Wu.cols) return false;
  GemvArgs a;
  a.w0 = static_cast<const uint16_t*>(Wg.data);
  a.w1 = static_cast<const uint16_t*>(Wu.data);
  a.rows = Wg.rows, a.cols = Wg.cols;
  a.mode = kNorm;
  a.x = x, a.ldx = ldx, a.nw = norm_w, a.eps = eps;
  a.y = out, a.ldy = ldo, a.accumulate = false;
  const int vg = vec_width(Wg.data, Wg.cols), vu = vec_width(Wu.data, Wu.cols);
  return run(a, n, vg < vu ? vg : vu, stream);
}

}  // namespace hymba::cuda
