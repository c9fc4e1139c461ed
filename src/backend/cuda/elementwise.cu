// Row-wise and elementwise ops: rmsnorm, rotary embedding, silu_mul,
// average_into, embedding gather, rounding and dtype stores. Each is
// memory-bound: one pass, one thread per element (a grid-stride loop over
// the n*d elements of a strided matrix), except rmsnorm (one block per row).
#include <algorithm>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/launch.cuh"

namespace hymba::cuda {

namespace {

constexpr int kThreads = 256;

// Sum over the block (blockDim.x == kThreads); the result is valid in every thread.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;
}

// The row kernels below walk a row in rounds of kRound values per thread
// (thread t: t, t + 256, ...), every load of a round issued before any
// value is used: with one block per row a plain loop paid an L2 round trip
// per 256 values. Sums keep each thread's order (its values in increasing
// column), so the bits are those of the plain loops.
constexpr int kRound = 8;

// For every column i of the row: v = load(i), then use(i, v), kRound columns
// per thread at a time (all loads of a round first), each thread's columns
// in increasing order.
template <typename L, typename U>
__device__ __forceinline__ void row_rounds(int64_t d, L load, U use) {
  for (int64_t i0 = threadIdx.x; i0 < d; i0 += int64_t(kRound) * kThreads) {
    float v[kRound];
#pragma unroll
    for (int j = 0; j < kRound; ++j) {
      const int64_t i = i0 + int64_t(j) * kThreads;
      v[j] = i < d ? load(i) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kRound; ++j) {
      const int64_t i = i0 + int64_t(j) * kThreads;
      if (i < d) use(i, v[j]);
    }
  }
}

// This thread's part of the row's sum of squares, in double (before block_sum).
template <typename F>
__device__ __forceinline__ double row_sum_sq(int64_t d, F value) {
  double ss = 0.0;
  row_rounds(d, value, [&](int64_t, float v) { ss += double(v) * double(v); });
  return ss;
}

// One block per row. Sum of squares in double, as the CPU kernel: the result
// does not depend on the summation order to fp32 precision.
__global__ void rmsnorm_kernel(const float* x, int64_t d, int64_t ldx, const float* w, float eps, float* y,
                               int64_t ldy) {
  const float* xr = x + int64_t(blockIdx.x) * ldx;
  float* yr = y + int64_t(blockIdx.x) * ldy;
  double ss = row_sum_sq(d, [&](int64_t i) { return xr[i]; });
  ss = block_sum(ss);
  const float inv = float(1.0 / sqrt(ss / double(d) + double(eps)));
  row_rounds(d, [&](int64_t i) { return __fmul_rn(xr[i], inv) * w[i]; }, [&](int64_t i, float r) { yr[i] = r; });
}

// Row t is position pos[t] (pos: a device array) or, without pos, pos0 + t.
__global__ void rope_tables_kernel(int64_t pos0, const int64_t* pos, int64_t n, const float* inv_freq, int half,
                                   float* c, float* s) {
  pdl_launch_dependents();
  pdl_wait();  // launched with launch_pdl: earlier kernels' writes first
  const int64_t total = n * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / half;
    const int j = int(i % half);
    const float angle = __fmul_rn(float(pos ? pos[t] : pos0 + t), inv_freq[j]);  // the fp32 product, as the reference
    c[i] = float(cos(double(angle)));
    s[i] = float(sin(double(angle)));
  }
}

// One thread per (token, head, pair): rotates (v[i], v[i + half]).
__global__ void rope_kernel(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* c,
                            const float* s) {
  const int half = head_dim / 2;
  const int64_t total = n * n_heads * half;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int i = int(idx % half);
    const int64_t th = idx / half;
    const int h = int(th % n_heads);
    const int64_t t = th / n_heads;
    float* v = x + t * ldx + int64_t(h) * head_dim;
    const float cs = c[t * half + i], sn = s[t * half + i];
    const float a = v[i], b = v[i + half];
    v[i] = __fmul_rn(a, cs) - __fmul_rn(b, sn);
    v[i + half] = __fmul_rn(b, cs) + __fmul_rn(a, sn);
  }
}

// norm_pack: rmsnorm (or, `b` given, the average of two rmsnorms) rounded
// to bf16 into a GEMM operand, one block per row: the arithmetic of
// rmsnorm_kernel (and average_into) followed by store_rows, in one pass.
__global__ void norm_pack_kernel(const float* a, int64_t lda, const float* wa, const float* b, int64_t ldb,
                                 const float* wb, int64_t d, float eps, uint16_t* out, int64_t ldo) {
  pdl_launch_dependents();
  pdl_wait();
  const float* ar = a + int64_t(blockIdx.x) * lda;
  const float* br = b ? b + int64_t(blockIdx.x) * ldb : nullptr;
  uint16_t* orow = out + int64_t(blockIdx.x) * ldo;
  double sa = row_sum_sq(d, [&](int64_t i) { return ar[i]; });
  double sb = br ? row_sum_sq(d, [&](int64_t i) { return br[i]; }) : 0.0;
  sa = block_sum(sa);
  __syncthreads();  // block_sum's shared sums are reused
  if (br) sb = block_sum(sb);
  const float inva = float(1.0 / sqrt(sa / double(d) + double(eps)));
  const float invb = br ? float(1.0 / sqrt(sb / double(d) + double(eps))) : 0.0f;
  row_rounds(
      d,
      [&](int64_t i) {
        // Explicit _rn operations: no contraction into fma (as the separate kernels).
        float r = __fmul_rn(__fmul_rn(ar[i], inva), wa[i]);
        if (br) r = __fmul_rn(__fadd_rn(r, __fmul_rn(__fmul_rn(br[i], invb), wb[i])), 0.5f);
        return r;
      },
      [&](int64_t i, float r) { orow[i] = f32_to_bf16_bits(r); });
}

// norm_pack for rows that are 16-byte aligned and at most 512 R floats wide
// (Hymba-1.5B's 1600 and 3200 columns): a block of 128 threads per row holds
// its float4s in registers (all loads issued at once, the row read once),
// and writes 4 bf16 per 8-byte store. Same sums (double) and products as
// norm_pack_kernel, so the same bits. d4 = d / 4.
constexpr int kPackThreads = 128;

template <int R, bool kTwo>
__global__ void __launch_bounds__(kPackThreads)
    norm_pack_vec_kernel(const float* a, int64_t lda, const float* wa, const float* b, int64_t ldb, const float* wb,
                         int d4, float eps, uint16_t* out, int64_t ldo) {
  pdl_launch_dependents();
  pdl_wait();
  const float4* ar = reinterpret_cast<const float4*>(a + int64_t(blockIdx.x) * lda);
  const float4* br = kTwo ? reinterpret_cast<const float4*>(b + int64_t(blockIdx.x) * ldb) : nullptr;
  float4 va[R], vb[R];
  const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = threadIdx.x + r * kPackThreads;
    va[r] = i < d4 ? ar[i] : zero;
    if (kTwo) vb[r] = i < d4 ? br[i] : zero;
  }
  auto sq = [](const float4& v) {
    return double(v.x) * double(v.x) + double(v.y) * double(v.y) + double(v.z) * double(v.z) +
           double(v.w) * double(v.w);
  };
  double sa = 0.0, sb = 0.0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    sa += sq(va[r]);
    if (kTwo) sb += sq(vb[r]);
  }
  __shared__ double sums[2][kPackThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    sa += __shfl_xor_sync(0xffffffffu, sa, o);
    if (kTwo) sb += __shfl_xor_sync(0xffffffffu, sb, o);
  }
  if (threadIdx.x % 32 == 0) sums[0][threadIdx.x / 32] = sa, sums[1][threadIdx.x / 32] = sb;
  __syncthreads();
  sa = sb = 0.0;
#pragma unroll
  for (int w = 0; w < kPackThreads / 32; ++w) sa += sums[0][w], sb += sums[1][w];
  const double d = 4.0 * double(d4);
  const float inva = float(1.0 / sqrt(sa / d + double(eps)));
  const float invb = kTwo ? float(1.0 / sqrt(sb / d + double(eps))) : 0.0f;
  const float4* wa4 = reinterpret_cast<const float4*>(wa);
  const float4* wb4 = reinterpret_cast<const float4*>(wb);
  uint2* orow = reinterpret_cast<uint2*>(out + int64_t(blockIdx.x) * ldo);
  // Explicit _rn operations: no contraction into fma (as norm_pack_kernel).
  auto one = [&](float x, float w, float y, float v) {
    float r = __fmul_rn(__fmul_rn(x, inva), w);
    if (kTwo) r = __fmul_rn(__fadd_rn(r, __fmul_rn(__fmul_rn(y, invb), v)), 0.5f);
    return uint32_t(f32_to_bf16_bits(r));
  };
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = threadIdx.x + r * kPackThreads;
    if (i < d4) {
      const float4 x = va[r], w = wa4[i];
      const float4 y = kTwo ? vb[r] : zero, v = kTwo ? wb4[i] : zero;
      orow[i] = make_uint2(one(x.x, w.x, y.x, v.x) | one(x.y, w.y, y.y, v.y) << 16,
                           one(x.z, w.z, y.z, v.z) | one(x.w, w.w, y.w, v.w) << 16);
    }
  }
}

// The loop every strided n x d elementwise kernel shares: f(t, c).
template <typename F>
__device__ __forceinline__ void for_each_element(int64_t n, int64_t d, F f) {
  const int64_t total = n * d;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    f(i / d, i % d);
}

__global__ void silu_mul_kernel(const float* g, int64_t ldg, const float* u, int64_t ldu, int64_t n, int64_t d,
                                float* o, int64_t ldo) {
  for_each_element(n, d, [&](int64_t t, int64_t c) { o[t * ldo + c] = silu_f(g[t * ldg + c]) * u[t * ldu + c]; });
}

// One thread per 8 columns (16-byte loads and stores); grid x over a row's
// groups of 8, y over rows (no 64-bit division per thread).
// Columns d .. 8 d8 - 1 of o (the row padding, if any) get zeros: g and u
// hold nothing there.
__global__ void silu_mul_bf16_kernel(const uint16_t* g, const uint16_t* u, int64_t ld, int64_t n, int64_t d,
                                     int64_t d8, uint16_t* o) {
  const int64_t i8 = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i8 >= d8) return;
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    const int64_t c0 = i8 * 8, off = row * ld + c0;
    uint32_t ow[4] = {0u, 0u, 0u, 0u};
    if (c0 + 8 <= d) {
      const uint4 gv = *reinterpret_cast<const uint4*>(g + off), uv = *reinterpret_cast<const uint4*>(u + off);
      const uint32_t gw[4] = {gv.x, gv.y, gv.z, gv.w}, uw[4] = {uv.x, uv.y, uv.z, uv.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float lo = silu_f(bf16_bits_to_f32(uint16_t(gw[j]))) * bf16_bits_to_f32(uint16_t(uw[j]));
        const float hi = silu_f(bf16_bits_to_f32(uint16_t(gw[j] >> 16))) * bf16_bits_to_f32(uint16_t(uw[j] >> 16));
        ow[j] = uint32_t(f32_to_bf16_bits(lo)) | (uint32_t(f32_to_bf16_bits(hi)) << 16);
      }
    } else {  // the last, partial group of a row
      for (int64_t c = c0; c < d; ++c) {
        const float v = silu_f(bf16_bits_to_f32(g[off + c - c0])) * bf16_bits_to_f32(u[off + c - c0]);
        ow[(c - c0) / 2] |= uint32_t(f32_to_bf16_bits(v)) << (16 * ((c - c0) % 2));
      }
    }
    *reinterpret_cast<uint4*>(o + off) = make_uint4(ow[0], ow[1], ow[2], ow[3]);
  }
}

__global__ void average_into_kernel(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d) {
  for_each_element(n, d, [&](int64_t t, int64_t c) {
    float* p = a + t * lda + c;
    *p = (*p + b[t * ldb + c]) * 0.5f;
  });
}

__global__ void embed_rows_kernel(const void* table, DType dt, int64_t cols, const int32_t* ids, int64_t n,
                                  float* out, int64_t ldo) {
  for_each_element(n, cols, [&](int64_t t, int64_t c) {
    out[t * ldo + c] = load_as_f32(table, dt, int64_t(ids[t]) * cols + c);
  });
}

__global__ void round_to_kernel(DType dt, float* x, int64_t n, int64_t d, int64_t ldx) {
  for_each_element(n, d, [&](int64_t t, int64_t c) {
    float* p = x + t * ldx + c;
    *p = round_f32(*p, dt);
  });
}

// dst (dt elements, leading dimension ldd) = src converted (also the
// matmul's bf16/f16 packing of x).
__global__ void store_rows_kernel(const float* src, int64_t lds, int64_t n, int64_t d, DType dt, void* dst,
                                  int64_t ldd) {
  for_each_element(n, d, [&](int64_t t, int64_t c) {
    const float v = src[t * lds + c];
    const int64_t o = t * ldd + c;
    if (dt == DType::F32) static_cast<float*>(dst)[o] = v;
    else if (dt == DType::BF16) static_cast<uint16_t*>(dst)[o] = f32_to_bf16_bits(v);
    else static_cast<uint16_t*>(dst)[o] = f32_to_f16_bits(v);
  });
}

// The attention inputs of a chunk (Backend::prepare_qkv) in one pass. Per
// token, the work items are: q's rotation pairs (none without RoPE), then
// K's pairs (or its elements without RoPE), then V's elements. Each item does
// what the default's store_rows + rope + round_to do to its elements, in the
// same order, so the results are bit-identical.
struct QkvParams {
  float* q;
  const float *k, *v;
  int64_t ld, n;
  int n_heads, n_kv_heads, head_dim;
  const float *c, *s;
  DType dt;
  float* k_out;
  int64_t k_width;
  float* v_out;
  int64_t v_width;
};

__device__ __forceinline__ void rotate_pair(float& a, float& b, float cs, float sn) {
  const float x = a, y = b;
  a = __fmul_rn(x, cs) - __fmul_rn(y, sn);
  b = __fmul_rn(y, cs) + __fmul_rn(x, sn);
}

// Element i (of the per_token of a token: q pairs, then k pairs or columns,
// then v columns) of token t.
__device__ __forceinline__ void qkv_element(const QkvParams& p, int64_t t, int i, int half, int nq, int nk) {
  const bool rope = p.c != nullptr;
  const float* ct = rope ? p.c + t * half : nullptr;
  const float* st = rope ? p.s + t * half : nullptr;
  if (i < nq) {
    const int h = i / half, j = i % half;
    float* x = p.q + t * p.ld + int64_t(h) * p.head_dim;
    float a = x[j], b = x[j + half];
    rotate_pair(a, b, ct[j], st[j]);
    x[j] = a, x[j + half] = b;
    return;
  }
  i -= nq;
  if (i < nk) {
    const float* src = p.k + t * p.ld;
    float* dst = p.k_out + t * p.k_width;
    if (!rope) {
      dst[i] = round_f32(src[i], p.dt);
      return;
    }
    const int g = i / half, j = i % half;
    const int64_t o = int64_t(g) * p.head_dim + j;
    float a = src[o], b = src[o + half];
    rotate_pair(a, b, ct[j], st[j]);
    dst[o] = round_f32(a, p.dt), dst[o + half] = round_f32(b, p.dt);
    return;
  }
  i -= nk;
  p.v_out[t * p.v_width + i] = round_f32(p.v[t * p.ld + i], p.dt);
}

// grid.x over a token's per_token elements, grid.y strides over the tokens
// (32-bit element arithmetic: 64-bit divisions by the row width made the
// one-dimensional form instruction-bound).
__global__ void prepare_qkv_kernel(const QkvParams p, int per_token) {
  pdl_launch_dependents();
  pdl_wait();  // launched with launch_pdl: earlier kernels' writes first
  const int i = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (i >= per_token) return;
  const int half = p.head_dim / 2;
  const int nq = p.c ? p.n_heads * half : 0;
  const int nk = p.k ? (p.c ? p.n_kv_heads * half : int(p.k_width)) : 0;
  for (int64_t t = blockIdx.y; t < p.n; t += gridDim.y) qkv_element(p, t, i, half, nq, nk);
}

// grid.y = entry (of count), grid.x strides over the entry's n x d elements.
__global__ void store_rows_batch_kernel(const StoreArgs* entries, int count) {
  pdl_launch_dependents();
  pdl_wait();  // launched with launch_pdl: earlier kernels' writes first
  for (int e = blockIdx.y; e < count; e += gridDim.y) {
    const StoreArgs a = entries[e];
    const int64_t total = a.n * a.d;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
      const int64_t t = i / a.d, c = i % a.d;
      const float v = a.src[t * a.lds + c];
      const int64_t o = t * a.ldd + c;
      if (a.dt == DType::F32) static_cast<float*>(a.dst)[o] = v;
      else if (a.dt == DType::BF16) static_cast<uint16_t*>(a.dst)[o] = f32_to_bf16_bits(v);
      else static_cast<uint16_t*>(a.dst)[o] = f32_to_f16_bits(v);
    }
  }
}

__global__ void widen_kernel(const void* src, DType dt, int64_t count, float* dst) {
  for_each_element(1, count, [&](int64_t, int64_t i) { dst[i] = load_as_f32(src, dt, i); });
}

__global__ void zero_rows_kernel(float* y, int64_t n, int64_t d, int64_t ldy) {
  for_each_element(n, d, [&](int64_t t, int64_t c) { y[t * ldy + c] = 0.0f; });
}

}  // namespace

void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y, int64_t ldy,
             cudaStream_t stream) {
  if (n <= 0) return;
  check(n <= 0x7fffffff, "rmsnorm: too many rows (", n, ")");
  rmsnorm_kernel<<<unsigned(n), kThreads, 0, stream>>>(x, d, ldx, w, eps, y, ldy);
  HYMBA_CUDA_LAUNCHED("rmsnorm");
}

void norm_pack_bf16(const float* a, int64_t lda, const float* wa, const float* b, int64_t ldb, const float* wb,
                    int64_t n, int64_t d, float eps, uint16_t* out, int64_t ldo, cudaStream_t stream) {
  if (n <= 0) return;
  check(n <= 0x7fffffff, "norm_pack: too many rows (", n, ")");
  auto al16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = d % 4 == 0 && d <= 8 * 4 * kPackThreads && lda % 4 == 0 && al16(a) && al16(wa) &&
                   (!b || (ldb % 4 == 0 && al16(b) && al16(wb))) && ldo % 4 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 8 == 0;
  if (vec) {
    const int d4 = int(d / 4);
    const dim3 grid{unsigned(n)}, block{unsigned(kPackThreads)};
    const bool wide = d4 > 4 * kPackThreads;
    auto* k = b ? (wide ? &norm_pack_vec_kernel<8, true> : &norm_pack_vec_kernel<4, true>)
                : (wide ? &norm_pack_vec_kernel<8, false> : &norm_pack_vec_kernel<4, false>);
    launch_pdl("norm_pack", k, grid, block, 0, stream, a, lda, wa, b, ldb, wb, d4, eps, out, ldo);
    return;
  }
  launch_pdl("norm_pack", norm_pack_kernel, dim3(unsigned(n)), dim3(kThreads), 0, stream, a, lda, wa, b, ldb, wb, d,
             eps, out, ldo);
}

void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* c, float* s,
                 cudaStream_t stream) {
  if (n <= 0 || half <= 0) return;
  launch_pdl("rope_tables", rope_tables_kernel, dim3(blocks_for(n * half, kThreads)), dim3(kThreads), 0, stream, pos0,
             static_cast<const int64_t*>(nullptr), n, inv_freq, half, c, s);
}

void rope_tables_at(const int64_t* positions, int64_t n, const float* inv_freq, int half, float* c, float* s,
                    cudaStream_t stream) {
  if (n <= 0 || half <= 0) return;
  launch_pdl("rope_tables_at", rope_tables_kernel, dim3(blocks_for(n * half, kThreads)), dim3(kThreads), 0, stream,
             int64_t(0), positions, n, inv_freq, half, c, s);
}

void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* c, const float* s,
          cudaStream_t stream) {
  if (n <= 0 || n_heads <= 0 || head_dim < 2) return;
  rope_kernel<<<blocks_for(n * n_heads * (head_dim / 2), kThreads), kThreads, 0, stream>>>(x, n, ldx, n_heads,
                                                                                           head_dim, c, s);
  HYMBA_CUDA_LAUNCHED("rope");
}

void silu_mul(const float* g, int64_t ldg, const float* u, int64_t ldu, int64_t n, int64_t d, float* o,
              int64_t ldo, cudaStream_t stream) {
  if (n <= 0 || d <= 0) return;
  silu_mul_kernel<<<blocks_for(n * d, kThreads), kThreads, 0, stream>>>(g, ldg, u, ldu, n, d, o, ldo);
  HYMBA_CUDA_LAUNCHED("silu_mul");
}

void silu_mul_bf16(const uint16_t* g, const uint16_t* u, int64_t ld, int64_t n, int64_t d, uint16_t* o,
                   cudaStream_t stream) {
  if (n <= 0 || d <= 0) return;
  check(ld % 8 == 0 && ld >= d && reinterpret_cast<uintptr_t>(g) % 16 == 0 && reinterpret_cast<uintptr_t>(u) % 16 == 0 &&
            reinterpret_cast<uintptr_t>(o) % 16 == 0,
        "silu_mul_bf16: rows must be 16-byte aligned with a pitch that is a multiple of 8");
  const int64_t d8 = (d + 7) / 8;
  const dim3 grid(blocks_for(d8, kThreads, 0x7fffffff), unsigned(std::min<int64_t>(n, 65535)));
  silu_mul_bf16_kernel<<<grid, kThreads, 0, stream>>>(g, u, ld, n, d, d8, o);
  HYMBA_CUDA_LAUNCHED("silu_mul_bf16");
}

void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d, cudaStream_t stream) {
  if (n <= 0 || d <= 0) return;
  average_into_kernel<<<blocks_for(n * d, kThreads), kThreads, 0, stream>>>(a, lda, b, ldb, n, d);
  HYMBA_CUDA_LAUNCHED("average_into");
}

void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo,
                cudaStream_t stream) {
  if (n <= 0 || table.cols <= 0) return;
  embed_rows_kernel<<<blocks_for(n * table.cols, kThreads), kThreads, 0, stream>>>(table.data, table.dtype,
                                                                                   table.cols, ids, n, out, ldo);
  HYMBA_CUDA_LAUNCHED("embed_rows");
}

void round_to(DType dt, float* x, int64_t n, int64_t d, int64_t ldx, cudaStream_t stream) {
  if (dt == DType::F32 || n <= 0 || d <= 0) return;
  round_to_kernel<<<blocks_for(n * d, kThreads), kThreads, 0, stream>>>(dt, x, n, d, ldx);
  HYMBA_CUDA_LAUNCHED("round_to");
}

void store_rows(const float* src, int64_t lds, int64_t n, int64_t d, DType dt, void* dst, int64_t ldd,
                cudaStream_t stream) {
  if (n <= 0 || d <= 0) return;
  store_rows_kernel<<<blocks_for(n * d, kThreads), kThreads, 0, stream>>>(src, lds, n, d, dt, dst, ldd);
  HYMBA_CUDA_LAUNCHED("store_rows");
}

bool prepare_qkv(float* q, const float* k, const float* v, int64_t ld, int64_t n, int n_heads, int n_kv_heads,
                 int head_dim, const float* cos_t, const float* sin_t, DType round_dt, float* k_out, int64_t k_width,
                 float* v_out, int64_t v_width, cudaStream_t stream) {
  // RoPE over K needs K's width to be whole heads (what the model passes),
  // and rotation needs an even head size; other shapes take the default.
  if (cos_t && (head_dim < 2 || head_dim % 2 != 0 || (k && k_width != int64_t(n_kv_heads) * head_dim))) return false;
  if (n <= 0) return true;
  const QkvParams p{q, k, v, ld, n, n_heads, n_kv_heads, head_dim, cos_t, sin_t, round_dt, k_out, k_width,
                    v_out, v_width};
  const int64_t half = head_dim / 2;
  const int64_t per_token = (cos_t ? int64_t(n_heads) * half : 0) +
                            (k ? (cos_t ? int64_t(n_kv_heads) * half : k_width) + v_width : 0);
  if (per_token <= 0) return true;
  check(per_token <= 0x7fffffff, "prepare_qkv: rows too wide (", per_token, " elements)");
  const dim3 grid{unsigned((per_token + kThreads - 1) / kThreads), unsigned(std::min<int64_t>(n, 65535))};
  launch_pdl("prepare_qkv", prepare_qkv_kernel, grid, dim3(kThreads), 0, stream, p, int(per_token));
  return true;
}

void store_rows_batch(const StoreArgs* entries, int count, int64_t most_elements, cudaStream_t stream) {
  if (count <= 0 || most_elements <= 0) return;
  const dim3 grid(blocks_for(most_elements, kThreads, 1024), unsigned(std::min(count, 65535)));
  launch_pdl("store_rows_batch", store_rows_batch_kernel, grid, dim3(kThreads), 0, stream, entries, count);
}

void widen_to_f32(const void* src, DType dt, int64_t count, float* dst, cudaStream_t stream) {
  if (count <= 0) return;
  widen_kernel<<<blocks_for(count, kThreads), kThreads, 0, stream>>>(src, dt, count, dst);
  HYMBA_CUDA_LAUNCHED("widen_to_f32");
}

void zero_rows(float* y, int64_t n, int64_t d, int64_t ldy, cudaStream_t stream) {
  if (n <= 0 || d <= 0) return;
  zero_rows_kernel<<<blocks_for(n * d, kThreads), kThreads, 0, stream>>>(y, n, d, ldy);
  HYMBA_CUDA_LAUNCHED("zero_rows");
}

}  // namespace hymba::cuda
