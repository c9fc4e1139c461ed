// The Mamba-head ops: depthwise causal conv + SiLU (and its one-token
// batched form); the selective scan (chunked-parallel over time for
// d_state <= 16, else sequential over time per channel); the batched scan of
// decode; and the fused decode step of the Mamba branch (dt/B/C norms,
// dt_proj and the scan in one kernel), for one sequence and for a batch
// (bit-identical per sequence).
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/launch.cuh"

namespace hymba::cuda {

namespace {

// ---------------------------------------------------------------- conv
// One thread per (token, channel): every output is independent once the
// history (state) is known, so prefill is fully parallel. Channels on grid x,
// tokens on grid y (no 64-bit division per element). Products are summed tap
// by tap without FMA contraction, in the CPU kernel's order.
constexpr int kConvThreads = 256;

__global__ void conv_silu_kernel(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                                 const float* bias, int k_width, const float* state, float* y, int64_t ldy) {
  const int64_t c = blockIdx.x * int64_t(kConvThreads) + threadIdx.x;
  if (c >= channels) return;
  const int hist = k_width - 1;
  for (int64_t t = blockIdx.y; t < n; t += gridDim.y) {
    float acc = bias[c];
    for (int k = 0; k < k_width; ++k) {
      const int64_t tau = t - hist + k;  // negative: an input from before this chunk (the state)
      const float in = tau >= 0 ? x[tau * ldx + c] : state[(tau + hist) * channels + c];
      acc = __fadd_rn(acc, __fmul_rn(weight[int64_t(k) * channels + c], in));
    }
    y[t * ldy + c] = silu_f(acc);
  }
}

// Prefill with the usual width (K = 4): one thread per (channel, run of
// kConvRun tokens) slides a window of K inputs along its run, so each input
// is loaded once instead of K times (the kernel above loads every tap; at
// 2K tokens x 3200 channels it ran ~10x slower than the bytes allow). Same
// arithmetic, tap by tap in the same order. The run's inputs are all
// requested before the first is used: one load in flight per thread left
// the kernel waiting on memory latency.
constexpr int kConvRun = 16;

// yb (nullptr: none): y rounded to bf16 as well (a bf16 product's operand, ld ldb).
template <int K>
__global__ void conv_silu_run_kernel(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                                     const float* bias, const float* state, float* y, int64_t ldy,
                                     uint16_t* yb, int64_t ldb) {
  const int64_t c = blockIdx.x * int64_t(kConvThreads) + threadIdx.x;
  if (c >= channels) return;
  constexpr int H = K - 1;
  const int64_t t0 = int64_t(blockIdx.y) * kConvRun;
  const int64_t t1 = min(n, t0 + kConvRun);
  float w[K], win[K];  // win[k]: the input at token t - H + k
#pragma unroll
  for (int k = 0; k < K; ++k) w[k] = weight[int64_t(k) * channels + c];
  const float b = bias[c];
#pragma unroll
  for (int k = 0; k < H; ++k) {
    const int64_t tau = t0 - H + k;  // negative: from the state
    win[k] = tau >= 0 ? x[tau * ldx + c] : state[(tau + H) * channels + c];
  }
  const int steps = int(t1 - t0);
  float in[kConvRun];
  const float* px = x + t0 * ldx + c;
#pragma unroll
  for (int i = 0; i < kConvRun; ++i) in[i] = i < steps ? px[i * ldx] : 0.0f;
  float* py = y + t0 * ldy + c;
  uint16_t* pb = yb ? yb + t0 * ldb + c : nullptr;
#pragma unroll
  for (int i = 0; i < kConvRun; ++i) {
    if (i < steps) {
      win[H] = in[i];
      float acc = b;
#pragma unroll
      for (int k = 0; k < K; ++k) acc = __fadd_rn(acc, __fmul_rn(w[k], win[k]));
      const float v = silu_f(acc);
      py[i * ldy] = v;
      if (pb) pb[i * ldb] = f32_to_bf16_bits(v);
#pragma unroll
      for (int k = 0; k < H; ++k) win[k] = win[k + 1];
    }
  }
}

// The new state, one thread per channel (after conv_silu_kernel has read the
// old one): the last k_width-1 inputs of (old state ++ chunk), oldest first.
// Row j reads row j + n of the old state when the chunk is short, which is
// ahead of the rows already written: in place is safe in this order.
__global__ void conv_state_kernel(const float* x, int64_t n, int64_t ldx, int64_t channels, int hist,
                                  float* state) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < channels; c += int64_t(gridDim.x) * blockDim.x)
    for (int j = 0; j < hist; ++j) {
      const int64_t tau = n - hist + j;
      state[int64_t(j) * channels + c] = tau >= 0 ? x[tau * ldx + c] : state[(tau + hist) * channels + c];
    }
}

// Batched: one thread per (entry, channel) runs its channel's tokens in
// order, then shifts its own column of the state (no other thread reads it,
// so one kernel suffices). Same arithmetic as conv_silu_kernel.
constexpr int kConvBatchThreads = 256;
constexpr int64_t kConvBatchMaxTokens = 64;  // longer entries: the parallel single-sequence kernel

// Channel c of one entry: its tokens in order, then the shift of its own
// column of the state (no other thread reads it, so one kernel suffices).
__device__ __forceinline__ void conv_channel(const ConvArgs& a, int64_t c) {
  const int64_t channels = a.channels;
  const int hist = a.k_width - 1;
  for (int64_t t = 0; t < a.n; ++t) {
    float acc = a.bias[c];
    for (int k = 0; k < a.k_width; ++k) {
      const int64_t tau = t - hist + k;  // negative: an input from before this chunk (the state)
      const float in = tau >= 0 ? a.x[tau * a.ldx + c] : a.state[(tau + hist) * channels + c];
      acc = __fadd_rn(acc, __fmul_rn(a.weight[int64_t(k) * channels + c], in));
    }
    a.y[t * a.ldy + c] = silu_f(acc);
  }
  // The new state (as conv_state_kernel): row j reads row j + n >= j + 1 of
  // the old state, not yet overwritten.
  for (int j = 0; j < hist; ++j) {
    const int64_t tau = a.n - hist + j;
    a.state[int64_t(j) * channels + c] = tau >= 0 ? a.x[tau * a.ldx + c] : a.state[(tau + hist) * channels + c];
  }
}

__global__ void conv_silu_batch_kernel(const ConvArgs* entries, int64_t channel_blocks) {
  const ConvArgs a = entries[blockIdx.x / channel_blocks];
  const int64_t c = (blockIdx.x % channel_blocks) * kConvBatchThreads + threadIdx.x;
  if (c < a.channels) conv_channel(a, c);
}

// Batched decode (entries of one token, k_width KW <= 4): one thread per 4
// consecutive channels of an entry, threads over (entry, channel quad)
// flattened so that no block idles. Every load of the step (bias, taps,
// state rows, x) is issued before any use, as 16-byte loads where the
// entry's rows are aligned; the state shift is register moves. The
// arithmetic is conv_channel's (tap by tap, no FMA contraction).
constexpr int kConvOneThreads = 256;

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// packed (nullptr: none): entry e's output rounded to bf16 into row e
// (leading dimension ldp), as store_rows rounds it: x_proj's operand.
template <int KW>
__global__ void __launch_bounds__(kConvOneThreads) conv_silu_one_kernel(const ConvArgs* entries, unsigned quads,
                                                                        unsigned total, uint16_t* packed, int64_t ldp) {
  constexpr int hist = KW - 1;
  const unsigned tid = blockIdx.x * unsigned(kConvOneThreads) + threadIdx.x;
  if (tid >= total) return;
  const unsigned e = tid / quads;
  const ConvArgs& a = entries[e];
  const int64_t C = a.channels, c0 = int64_t(tid - e * quads) * 4;
  if (c0 >= C) return;
  const float* x = a.x;
  float* st = a.state;
  float* y = a.y;
  float b[4], w[KW][4], in[KW][4];  // in[k]: tap k's input (state rows, then x)
  const bool vec = C % 4 == 0 && aligned16(x) && aligned16(a.weight) && aligned16(a.bias) && aligned16(st) &&
                   aligned16(y);
  if (vec) {
    const float4 b4 = *reinterpret_cast<const float4*>(a.bias + c0);
    b[0] = b4.x, b[1] = b4.y, b[2] = b4.z, b[3] = b4.w;
#pragma unroll
    for (int k = 0; k < KW; ++k) {
      const float4 w4 = *reinterpret_cast<const float4*>(a.weight + k * C + c0);
      const float4 i4 = *reinterpret_cast<const float4*>(k < hist ? st + k * C + c0 : x + c0);
      w[k][0] = w4.x, w[k][1] = w4.y, w[k][2] = w4.z, w[k][3] = w4.w;
      in[k][0] = i4.x, in[k][1] = i4.y, in[k][2] = i4.z, in[k][3] = i4.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t c = c0 + i;
      const bool ok = c < C;
      b[i] = ok ? a.bias[c] : 0.0f;
#pragma unroll
      for (int k = 0; k < KW; ++k) {
        w[k][i] = ok ? a.weight[k * C + c] : 0.0f;
        in[k][i] = ok ? (k < hist ? st[k * C + c] : x[c]) : 0.0f;
      }
    }
  }
  float out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float acc = b[i];
#pragma unroll
    for (int k = 0; k < KW; ++k) acc = __fadd_rn(acc, __fmul_rn(w[k][i], in[k][i]));
    out[i] = silu_f(acc);
  }
  if (packed) {
    uint16_t* pr = packed + int64_t(e) * ldp + c0;
    if (c0 + 4 <= C && ldp % 4 == 0 && (reinterpret_cast<uintptr_t>(packed) & 7) == 0) {
      const uint32_t lo = uint32_t(f32_to_bf16_bits(out[0])) | uint32_t(f32_to_bf16_bits(out[1])) << 16;
      const uint32_t hi = uint32_t(f32_to_bf16_bits(out[2])) | uint32_t(f32_to_bf16_bits(out[3])) << 16;
      *reinterpret_cast<uint2*>(pr) = make_uint2(lo, hi);
    } else {
      for (int i = 0; i < 4 && c0 + i < C; ++i) pr[i] = f32_to_bf16_bits(out[i]);
    }
  }
  // The new state: row j = old row j + 1, the last row = x.
  if (vec) {
    *reinterpret_cast<float4*>(y + c0) = make_float4(out[0], out[1], out[2], out[3]);
#pragma unroll
    for (int j = 0; j < hist; ++j)
      *reinterpret_cast<float4*>(st + j * C + c0) = make_float4(in[j + 1][0], in[j + 1][1], in[j + 1][2], in[j + 1][3]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t c = c0 + i;
      if (c >= C) break;
      y[c] = out[i];
#pragma unroll
      for (int j = 0; j < hist; ++j) st[j * C + c] = in[j + 1][i];
    }
  }
}

// A short chunk of one sequence (decode): one launch instead of conv + state.
__global__ void conv_silu_short_kernel(const ConvArgs a) {
  pdl_launch_dependents();
  pdl_wait();  // (launch.cuh) x and the state come from earlier kernels
  const int64_t c = blockIdx.x * int64_t(kConvBatchThreads) + threadIdx.x;
  if (c < a.channels) conv_channel(a, c);
}

// ---------------------------------------------------------------- conv + x_proj
// Backend::conv_silu_matmul for prefill-sized chunks: the conv kernel also
// writes its output as bf16 (the product's operand, as matmul would round
// it), and x_proj (W of <= kXpMaxRows rows: 132 in Hymba) runs on a
// tensor-core kernel made for that shape: cuBLASLt reached ~40 TFLOP/s on
// it (~110 us at 8K tokens, plus ~55 us for a separate rounding pass). A
// block owns kXpTokens tokens and all W rows; per step of kXpChunk columns
// the A rows and W rows arrive by cp.async (kXpStages stages in flight:
// the kernel is latency-bound; every block streams all of W, so 64 tokens
// per block rather than 32 halve that traffic: 8K prefill +2.3 % on an
// H200, 32/48/64/128 tokens and 3/4/6 stages measured), and warp w
// multiplies m16 tile w % kXpMTiles with output half w / kXpMTiles
// (mma.sync m16n8k16, fp32 accumulation). (A kernel computing the conv
// inside the product's loop was tried: instruction- and latency-bound at
// ~240 us per 8K-token layer, against ~100 us for the conv kernel.)
constexpr int kXpTokens = 64;
constexpr int kXpStages = 4;
constexpr int kXpMTiles = kXpTokens / 16;
constexpr int kXpThreads = 64 * kXpMTiles;     // m16 tiles x 2 output halves, 32 lanes each
constexpr int kXpChunk = 64;
constexpr int kXpMaxRows = 136;                // 17 n8 tiles
constexpr int kXpHalfTiles = 9;                // n8 tiles of output half 0 (half 1: 8)
constexpr int kXpLd = kXpChunk + 8;            // smem row pitch (bf16): ldmatrix rows in distinct banks
constexpr int kXpStage = (kXpTokens + kXpMaxRows) * kXpLd;  // bf16 per stage (A, then W)

struct XpParams {
  const uint16_t* a;  // [n][lda] bf16
  int64_t lda, n;
  const uint16_t* w;  // [rows][k] bf16
  int rows;
  int64_t k;          // a multiple of kXpChunk
  float* y;
  int64_t ldy;
};

__global__ void __launch_bounds__(kXpThreads, 1) xproj_gemm_kernel(const XpParams p) {
  extern __shared__ uint4 xp_smem4[];
  uint16_t* smem = reinterpret_cast<uint16_t*>(xp_smem4);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t t_base = int64_t(blockIdx.x) * kXpTokens;
  const int mt = warp % kXpMTiles, nh = warp / kXpMTiles;
  const int nt0 = nh * kXpHalfTiles, ntn = nh == 0 ? kXpHalfTiles : kXpMaxRows / 8 - kXpHalfTiles;
  // This thread's 16-byte pieces of a stage (the same every step, the
  // source moving kXpChunk columns on): addresses computed once.
  constexpr int kPieces = kXpChunk / 8;  // per row
  constexpr int kPer = ((kXpTokens + kXpMaxRows) * kPieces + kXpThreads - 1) / kXpThreads;
  const uint16_t* src[kPer];
  int dst[kPer], bytes[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int i = tid + k * kXpThreads, r = i / kPieces, q = i % kPieces;
    bool ok;
    if (r < kXpTokens) {
      ok = t_base + r < p.n;
      src[k] = p.a + (ok ? t_base + r : 0) * p.lda + 8 * q;
    } else {
      ok = r - kXpTokens < p.rows;
      src[k] = p.w + (ok ? r - kXpTokens : 0) * p.k + 8 * q;
    }
    dst[k] = r * kXpLd + 8 * q;
    bytes[k] = i < (kXpTokens + kXpMaxRows) * kPieces ? (ok ? 16 : 0) : -1;  // -1: no piece
  }
  auto stage = [&](int64_t c0, uint16_t* st) {
#pragma unroll
    for (int k = 0; k < kPer; ++k)
      if (bytes[k] >= 0) cp_async16(st + dst[k], src[k] + c0, bytes[k]);
    cp_async_commit();
  };
  float acc[kXpHalfTiles][4];
#pragma unroll
  for (int j = 0; j < kXpHalfTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  const int64_t steps = p.k / kXpChunk;
  // Steps 0 .. kXpStages-2 in flight; each step then stages the one
  // kXpStages-1 ahead (an empty group past the end keeps the count).
  for (int s = 0; s < kXpStages - 1; ++s) {
    if (s < steps) stage(s * kXpChunk, smem + s * kXpStage);
    else cp_async_commit();
  }
  for (int64_t s = 0; s < steps; ++s) {
    uint16_t* st = smem + (s % kXpStages) * kXpStage;
    cp_async_wait<kXpStages - 2>();
    __syncthreads();  // step s has landed for every thread; step s-1's stage is free
    const int64_t ahead = s + kXpStages - 1;
    if (ahead < steps) stage(ahead * kXpChunk, smem + (ahead % kXpStages) * kXpStage);
    else cp_async_commit();
    const uint16_t* sA = st;
    const uint16_t* sW = st + kXpTokens * kXpLd;
#pragma unroll
    for (int ks = 0; ks < kXpChunk / 16; ++ks) {
      uint32_t af[4];
      ldmatrix_x4(af, smem_u32(sA + (16 * mt + lane % 16) * kXpLd + 16 * ks + (lane / 16) * 8));
#pragma unroll
      for (int j = 0; j < kXpHalfTiles; j += 2) {
        // n8 tiles nt0 + j and nt0 + j + 1 (the latter may be the other half's, or past the end: unused)
        uint32_t bf[4];
        const int row = min(8 * (nt0 + j) + lane % 8 + (lane / 16) * 8, kXpMaxRows - 1);
        ldmatrix_x4(bf, smem_u32(sW + row * kXpLd + 16 * ks + ((lane / 8) % 2) * 8));
        if (j < ntn) mma_bf16(acc[j], af, bf[0], bf[1]);
        if (j + 1 < kXpHalfTiles && j + 1 < ntn) mma_bf16(acc[j + 1], af, bf[2], bf[3]);
      }
    }
  }
  const int64_t r0 = t_base + 16 * mt + lane / 4;
#pragma unroll
  for (int j = 0; j < kXpHalfTiles; ++j) {
    if (j >= ntn) continue;
    const int col = 8 * (nt0 + j) + 2 * (lane % 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t t = r0 + 8 * h;
      if (t >= p.n) continue;
      if (col < p.rows) p.y[t * p.ldy + col] = acc[j][2 * h];
      if (col + 1 < p.rows) p.y[t * p.ldy + col + 1] = acc[j][2 * h + 1];
    }
  }
}

// ---------------------------------------------------------------- sequential scan
// Channel-parallel, sequential over time (the recurrence): the batched
// decode scan, the single-sequence scan for d_state > 16, and (through the
// same per-step helpers) the fused decode step. A block holds kChannels
// channels x kLanes threads; a thread owns states s = lane, lane + 16, ... of
// its channel in registers (d_state <= 16 * kMaxK), and the kLanes threads of
// a channel sum C.h with shuffles. Inputs are staged in shared memory kChunk
// time steps at a time, so the loop over time reads no global memory: the
// loads of a chunk are issued together and overlap.
constexpr int kLanes = 16;
constexpr int kChannels = 16;
constexpr int kScanThreads = kLanes * kChannels;
constexpr int kMaxK = 16;
constexpr int kChunk = 16;

__device__ __forceinline__ float softplus_f(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

// The sum of v over the kLanes lanes of a channel (aligned groups of 16
// lanes; the whole warp must call it). Butterfly: every lane gets the same
// bits (each stage adds the same two values in either order).
__device__ __forceinline__ float lane_sum(float v) {
  for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, kLanes);
  return v;
}

// A channel's states and A owned by this lane (zero where it owns none).
__device__ __forceinline__ void load_lane_states(const ScanArgs& a, int64_t c, bool live, int lane, float (&h)[kMaxK],
                                                 float (&A)[kMaxK]) {
  const int64_t N = a.d_state;
  const int nk = int((N + kLanes - 1) / kLanes);
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int64_t s = lane + int64_t(k) * kLanes;
    const bool ok = live && k < nk && s < N;
    h[k] = ok ? a.state[c * N + s] : 0.0f;
    A[k] = ok ? a.A[c * N + s] : 0.0f;
  }
}

__device__ __forceinline__ void store_lane_states(const ScanArgs& a, int64_t c, bool live, int lane,
                                                  const float (&h)[kMaxK]) {
  const int64_t N = a.d_state;
  const int nk = int((N + kLanes - 1) / kLanes);
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int64_t s = lane + int64_t(k) * kLanes;
    if (live && k < nk && s < N) a.state[c * N + s] = h[k];
  }
}

// One state's step, h = exp(dt A) h + du B, with the roundings spelled out
// (the contraction the compiler picks for the plain expression), so that
// every kernel using it (the single and the batched fused steps) gives the
// same bits for the same inputs.
__device__ __forceinline__ float state_step(float h, float A, float dt, float du, float B) {
  return __fmaf_rn(expf(__fmul_rn(dt, A)), h, __fmul_rn(du, B));
}
// y of a channel from its C.h sum: (C.h + D u) silu(z), roundings spelled out.
__device__ __forceinline__ float scan_out(float ch, float D, float u, float z) {
  return __fmul_rn(__fmaf_rn(D, u, ch), silu_f(z));
}

// One time step of this lane's states: h = exp(dt A) h + du B; returns the
// lane's part of C.h (lane_sum gives the channel's), summed from +0 in
// order of k.
__device__ __forceinline__ float lane_step(float (&h)[kMaxK], const float (&A)[kMaxK], int64_t N, int lane,
                                           float dt, float du, const float* Brow, const float* Crow) {
  const int nk = int((N + kLanes - 1) / kLanes);
  float part = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int64_t s = lane + int64_t(k) * kLanes;
    if (k < nk && s < N) {
      h[k] = state_step(h[k], A[k], dt, du, Brow[s]);
      part = __fmaf_rn(Crow[s], h[k], part);
    }
  }
  return part;
}

// Channel block `cblock` of one sequence's scan (every thread of the block
// calls this); smem holds at least 2 * kChunk * d_state + 3 * kChunk * kChannels floats.
__device__ __forceinline__ void scan_block(const ScanArgs& a, int64_t cblock, float* smem) {
  const int64_t N = a.d_state;
  float* sB = smem;                       // [kChunk][N]
  float* sC = sB + kChunk * N;            // [kChunk][N]
  float* sU = sC + kChunk * N;            // [kChunk][kChannels]
  float* sDelta = sU + kChunk * kChannels;
  float* sZ = sDelta + kChunk * kChannels;

  const int lane = threadIdx.x % kLanes, cl = threadIdx.x / kLanes;
  const int64_t c0 = cblock * kChannels;
  const int64_t c = c0 + cl;
  const bool live = c < a.channels;

  float h[kMaxK], A[kMaxK];
  load_lane_states(a, c, live, lane, h, A);
  const float bias = live ? a.dt_bias[c] : 0.0f, D = live ? a.D[c] : 0.0f;

  for (int64_t t0 = 0; t0 < a.n; t0 += kChunk) {
    const int steps = int(min(int64_t(kChunk), a.n - t0));
    __syncthreads();  // the previous chunk's readers are done
    for (int idx = threadIdx.x; idx < kChunk * N; idx += kScanThreads) {
      const int tt = int(idx / N);
      const int64_t s = idx % N;
      const bool ok = tt < steps;
      sB[idx] = ok ? a.B[(t0 + tt) * a.ldb + s] : 0.0f;
      sC[idx] = ok ? a.C[(t0 + tt) * a.ldc + s] : 0.0f;
    }
    for (int idx = threadIdx.x; idx < kChunk * kChannels; idx += kScanThreads) {
      const int tt = idx / kChannels, j = idx % kChannels;
      const bool ok = tt < steps && c0 + j < a.channels;
      const int64_t t = t0 + tt;
      sU[idx] = ok ? a.u[t * a.ldu + c0 + j] : 0.0f;
      sDelta[idx] = ok ? a.delta[t * a.ld_delta + c0 + j] : 0.0f;
      sZ[idx] = ok ? a.z[t * a.ldz + c0 + j] : 0.0f;
    }
    __syncthreads();
    // Unrolled: only h carries a dependency from step to step; the
    // softplus/exp work of the next steps can overlap this one's chain.
#pragma unroll 4
    for (int tt = 0; tt < steps; ++tt) {
      const float u = sU[tt * kChannels + cl];
      const float dt = softplus_f(sDelta[tt * kChannels + cl] + bias);
      const float part = lane_sum(lane_step(h, A, N, lane, dt, dt * u, sB + tt * N, sC + tt * N));
      if (lane == 0 && live) a.y[(t0 + tt) * a.ldy + c] = (part + D * u) * silu_f(sZ[tt * kChannels + cl]);
    }
  }
  store_lane_states(a, c, live, lane, h);
}

__global__ void __launch_bounds__(kScanThreads) selective_scan_kernel(ScanArgs a) {
  extern __shared__ float smem[];
  scan_block(a, blockIdx.x, smem);
}

// Batched: grid x = entry * channel_blocks + channel block; each entry has
// its own pointers, n, channels and d_state (smem sized for the largest).
__global__ void __launch_bounds__(kScanThreads) selective_scan_batch_kernel(const ScanArgs* entries,
                                                                            int64_t channel_blocks) {
  extern __shared__ float smem[];
  const ScanArgs a = entries[blockIdx.x / channel_blocks];
  const int64_t cb = blockIdx.x % channel_blocks;
  if (cb * kChannels >= a.channels) return;  // the whole block: this entry has fewer channels
  scan_block(a, cb, smem);
}

// ---------------------------------------------------------------- fused decode step
// Backend::normed_selective_scan for n <= kFusedMaxTokens tokens in one
// launch, with scan_block's thread layout (kChannels channels x kLanes lanes
// per block). Every block normalises the tokens' dt, B and C rows itself
// (a few hundred values) into shared memory, then computes delta for its own
// channels only (its rows of dt_proj; lane l takes columns l, l + 16, ...),
// then runs the tokens through the scan in order. Nothing is written to
// a.delta, a.B, a.C or dt_scratch (the contract leaves them unspecified).
constexpr int kFusedMaxTokens = 4;
constexpr int kFusedWPerLane = 8;  // dt_proj columns per lane: rank <= kLanes * 8

// Sum of squares in double and the row scale as cuda::rmsnorm computes it
// (elementwise.cu), so the normalised values match the primitive's bits:
// lane l sums x[l], x[l + 32], ... in order, then the xor butterfly.
__device__ __forceinline__ float warp_rms_finish(double ss, int64_t d, float eps) {
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  return float(1.0 / sqrt(ss / double(d) + double(eps)));
}

// Element x of a row normalised with scale inv and weight w, as the fused
// steps stage it: rmsnorm's product, and for dt (is_dt) with bf16 weights
// the matmul's input rounding (CudaBackend::matmul / the CPU's packing).
template <DType WT>
__device__ __forceinline__ float normed_value(float x, float inv, float w, bool is_dt) {
  const float v = __fmul_rn(x, inv) * w;
  return is_dt && WT == DType::BF16 ? round_f32(v, DType::BF16) : v;
}

// warp_norm_row's short-row path (below) in two halves, so that a warp can
// have the loads of several rows in flight before it reduces any (d, dp <=
// 128).
struct ShortRow {
  float v[4], w[4];
};
__device__ __forceinline__ void short_row_load(const float* x, const float* wn, int d, ShortRow& r) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = lane + 32 * j;
    r.v[j] = i < d ? x[i] : 0.0f;
    r.w[j] = i < d ? wn[i] : 0.0f;
  }
}
template <DType WT>
__device__ __forceinline__ void short_row_finish(const ShortRow& r, int d, int dp, float eps, bool is_dt, float* out) {
  const int lane = threadIdx.x % 32;
  double ss = 0.0;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (lane + 32 * j < d) ss += double(r.v[j]) * double(r.v[j]);
  const float inv = warp_rms_finish(ss, d, eps);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = lane + 32 * j;
    if (i < dp) out[i] = i < d ? normed_value<WT>(r.v[j], inv, r.w[j], is_dt) : 0.0f;
  }
}

// One warp normalises a row of d values (x, weights wn) into out[0, dp),
// zeros past d. Rows of up to 128 values (dt, B and C at the model's
// ranks) are loaded at once, 4 values and 4 weights per lane, before any is
// used: the rows were just written by x_proj, so a loop of dependent loads
// paid an L2 round trip per 32 values, twice (H100, Nsight: the batched
// step 50-53 -> 47 us per layer with 128 sequences, the single step 8.4 ->
// 7.7-8.3 us). Longer rows (d_state > 128) take the plain loops. Either
// way the arithmetic and its order are warp_rms_finish's and normed_value's.
template <DType WT>
__device__ __forceinline__ void warp_norm_row(const float* x, const float* wn, int64_t d, int64_t dp, float eps,
                                              bool is_dt, float* out) {
  const int lane = threadIdx.x % 32;
  if (d <= 128 && dp <= 128) {
    ShortRow r;
    short_row_load(x, wn, int(d), r);
    short_row_finish<WT>(r, int(d), int(dp), eps, is_dt, out);
    return;
  }
  double ss = 0.0;
  for (int64_t i = lane; i < d; i += 32) ss += double(x[i]) * double(x[i]);
  const float inv = warp_rms_finish(ss, d, eps);
  for (int64_t i = lane; i < dp; i += 32) out[i] = i < d ? normed_value<WT>(x[i], inv, wn[i], is_dt) : 0.0f;
}

template <DType WT>
__global__ void __launch_bounds__(kScanThreads) normed_scan_step_kernel(ScanArgs a, ScanInputNorms in) {
  extern __shared__ float smem[];
  const int64_t N = a.d_state, R = in.dt_proj.cols;
  const int n = int(a.n);
  float* sDtn = smem;        // [n][R]: dtn as the matmul sees it (bf16 weights: rounded to bf16)
  float* sB = sDtn + n * R;  // [n][N]: rmsnorm(B)
  float* sC = sB + n * N;    // [n][N]: rmsnorm(C)

  const int lane = threadIdx.x % kLanes, cl = threadIdx.x / kLanes;
  const int64_t c = blockIdx.x * int64_t(kChannels) + cl;
  const bool live = c < a.channels;

  // Everything that does not depend on the norms first: its latency overlaps theirs.
  float w[kFusedWPerLane];
#pragma unroll
  for (int j = 0; j < kFusedWPerLane; ++j) {
    const int64_t k = lane + int64_t(j) * kLanes;
    w[j] = live && k < R ? load_as_f32(in.dt_proj.data, WT, c * R + k) : 0.0f;
  }
  float h[kMaxK], A[kMaxK];
  const int64_t N_ = a.d_state;
  const int nk = int((N_ + kLanes - 1) / kLanes);
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int64_t s = lane + int64_t(k) * kLanes;
    A[k] = live && k < nk && s < N_ ? a.A[c * N_ + s] : 0.0f;
  }
  const float bias = live ? a.dt_bias[c] : 0.0f, D = live ? a.D[c] : 0.0f;
  // Only weights above (launch.cuh): the state and activations come from
  // earlier kernels.
  pdl_launch_dependents();
  pdl_wait();
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int64_t s = lane + int64_t(k) * kLanes;
    h[k] = live && k < nk && s < N_ ? a.state[c * N_ + s] : 0.0f;
  }
  float u[kFusedMaxTokens], z[kFusedMaxTokens];
#pragma unroll
  for (int t = 0; t < kFusedMaxTokens; ++t) {
    u[t] = live && t < n ? a.u[t * a.ldu + c] : 0.0f;
    z[t] = live && t < n ? a.z[t * a.ldz + c] : 0.0f;
  }

  // The norms: one warp per row (dt, B and C of each token).
  for (int r = threadIdx.x / 32; r < 3 * n; r += kScanThreads / 32) {
    const int t = r / 3, kind = r % 3;
    const float* x = kind == 0 ? in.dt_raw + t * in.ld_dt : kind == 1 ? a.B + t * a.ldb : a.C + t * a.ldc;
    const float* wn = kind == 0 ? in.dt_norm_w : kind == 1 ? in.B_norm_w : in.C_norm_w;
    float* out = kind == 0 ? sDtn + t * R : kind == 1 ? sB + t * N : sC + t * N;
    const int64_t d = kind == 0 ? R : N;
    warp_norm_row<WT>(x, wn, d, d, in.eps, kind == 0, out);
  }
  __syncthreads();

  // delta[t, c] = dt_proj[c, :] . dtn[t, :]: fp32 products and sums.
  float acc[kFusedMaxTokens];
#pragma unroll
  for (int t = 0; t < kFusedMaxTokens; ++t) acc[t] = 0.0f;
#pragma unroll
  for (int j = 0; j < kFusedWPerLane; ++j) {
    const int64_t k = lane + int64_t(j) * kLanes;
    if (k < R) {
#pragma unroll
      for (int t = 0; t < kFusedMaxTokens; ++t)
        if (t < n) acc[t] = fmaf(w[j], sDtn[t * R + k], acc[t]);
    }
  }

  // The tokens in order (scan_block's step).
#pragma unroll
  for (int t = 0; t < kFusedMaxTokens; ++t) {
    if (t < n) {  // uniform over the block: the shuffles below see the whole warp
      const float delta = lane_sum(acc[t]);
      const float dt = softplus_f(__fadd_rn(delta, bias));
      const float part = lane_sum(lane_step(h, A, N, lane, dt, __fmul_rn(dt, u[t]), sB + t * N, sC + t * N));
      if (lane == 0 && live) a.y[t * a.ldy + c] = scan_out(part, D, u[t], z[t]);
    }
  }
  store_lane_states(a, c, live, lane, h);
}

// ---------------------------------------------------------------- batched fused decode step
// Backend::normed_selective_scan_batch for entries of one token with
// d_state <= 16 (the model's batched decode): per entry, bit for bit what
// normed_scan_step_kernel computes for that sequence alone (the same
// helpers, its 16-lane sums rebuilt as the same trees; see
// quad_sum_scatter). 128 x 3200 x 16 fp32 states are 26 MB each way, hence
// another thread layout: 4 threads per channel, thread q owning states
// 4q..4q+3 (one float4; a warp moves 8 channels = 512 contiguous bytes),
// 64 channels per block, and groups of kNsbEntries entries sharing the
// block's weights (dt_proj rows, A, dt_bias, D loaded once).
constexpr int kNsbQuads = 4;
constexpr int kNsbThreads = 256;
constexpr int kNsbChannels = kNsbThreads / kNsbQuads;
constexpr int kNsbEntries = 4;  // == kNsbQuads: quad_sum_scatter gives thread q entry q
constexpr int kNsbMaxState = 16;
constexpr int kNsbMaxRank = kLanes * kFusedWPerLane;  // the single kernel's limit

// One entry's token: its rows (n == 1, so no leading dimensions).
struct NormedScanEntry {
  const float* dt_raw;
  const float* B;
  const float* C;
  const float* u;
  const float* z;
  float* state;
  float* y;
};
constexpr int kNsbEntryWords = int(sizeof(NormedScanEntry) / sizeof(unsigned long long));

// What the entries share (the host checks that they do).
struct NormedScanShared {
  const void* dt_proj;  // [channels, R]
  const float *dt_norm_w, *B_norm_w, *C_norm_w;
  const float *dt_bias, *A, *D;
  int channels, N, R, count;
  float eps;
  bool w_vec;  // R % 4 == 0 and dt_proj aligned for 4-value loads
};

// The single kernel's lane_sum (butterfly xor 8, 4, 2, 1 over 16 lane
// values v_L) for 4 entries at once, where this thread holds v_{4q+i},
// i < 4, of its channel for each entry (v[e][i]); thread q returns entry
// q's sum. Xor 8 and 4 are xor 2 and 1 of q (shuffles), xor 2 and 1 pair
// values inside the thread: (v_0 + v_2) + (v_1 + v_3). Every add pairs the
// same two values as the butterfly does (fp addition is commutative): the
// same bits. A thread sends only the half it does not keep (12 shuffles
// for the 4 entries instead of 32). The whole warp must call it.
__device__ __forceinline__ float quad_sum_scatter(const float (&v)[4][4]) {
  const int q = threadIdx.x % 4;
  const bool hi2 = q & 2, hi1 = q & 1;
  float a[2][4];  // entries (hi2 ? 2 : 0) + k, summed with thread q ^ 2
#pragma unroll
  for (int k = 0; k < 2; ++k) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float keep = hi2 ? v[2 + k][i] : v[k][i];
      const float send = hi2 ? v[k][i] : v[2 + k][i];
      a[k][i] = __fadd_rn(keep, __shfl_xor_sync(0xffffffffu, send, 2));
    }
  }
  float b[4];  // entry q, summed with thread q ^ 1
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float keep = hi1 ? a[1][i] : a[0][i];
    const float send = hi1 ? a[0][i] : a[1][i];
    b[i] = __fadd_rn(keep, __shfl_xor_sync(0xffffffffu, send, 1));
  }
  return __fadd_rn(__fadd_rn(b[0], b[2]), __fadd_rn(b[1], b[3]));
}

// A block owns 64 channels and `per_block` entries (whole groups of
// kNsbEntries), so that the grid is about one wave and its dt_proj rows
// are loaded once (whole 8- or 16-byte pieces where the rows allow), before
// the PDL wait. Every entry's dt, B and C norms are computed up front, with
// kNsbRowsInFlight rows' loads in flight per warp; then the groups run in
// order, the next group's states and u loading while the current one is
// computed. A group's quad sums are taken together (quad_sum_scatter), so
// the softplus and the output of an entry run once per quad, not 4 times:
// the kernel is instruction-bound (H100, 128 x 8K, Nsight: 19.4M -> 14.6M
// instructions, 50 -> 45 us per layer). At most 112 registers: two blocks
// take 57K of the SM's 64K, leaving room for a block of the kernels that
// run beside it (the attention branch on the other stream, PDL
// neighbours): at 128 registers the batched step went 11.8 -> 13.9 ms.
// kVec: d_state == 16 and 16-byte aligned states and A (float4 accesses).
constexpr int kNsbMaxGroups = 7;
constexpr int kNsbMaxBlockEntries = kNsbMaxGroups * kNsbEntries;
constexpr int kNsbRowsInFlight = 4;

template <DType WT, bool kVec>
__global__ void __maxnreg__(112) normed_scan_batch_kernel(const NormedScanEntry* entries, NormedScanShared p,
                                                          int per_block) {
  __shared__ NormedScanEntry sEnt[kNsbMaxBlockEntries];
  __shared__ float4 sW4[kFusedWPerLane][kNsbThreads];  // this thread's 4 weights of step j (one load)
  // The entries' normalised rows (nsb_norm_bytes): dt (Rp, zero-padded), B, C (16 each).
  extern __shared__ float4 nsb_norms4[];
  const int Rp = (p.R + 15) / 16 * 16;
  float* const sDtn = reinterpret_cast<float*>(nsb_norms4);
  float* const sB = sDtn + per_block * Rp;
  float* const sC = sB + per_block * kNsbMaxState;

  const int q = threadIdx.x % kNsbQuads;
  const int64_t c = int64_t(blockIdx.y) * kNsbChannels + threadIdx.x / kNsbQuads;
  const bool live = c < p.channels;
  const int N = p.N, R = p.R;

  // The weights (no kernel writes them: before the PDL wait).
#pragma unroll
  for (int j = 0; j < kFusedWPerLane; ++j) {
    const int k0 = 4 * q + 16 * j;
    float w4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (p.w_vec) {  // R % 4 == 0 and aligned rows: the 4 values in one load
      if (live && k0 < R) {
        if constexpr (WT == DType::F32) {
          const float4 f = *reinterpret_cast<const float4*>(static_cast<const float*>(p.dt_proj) + c * R + k0);
          w4[0] = f.x, w4[1] = f.y, w4[2] = f.z, w4[3] = f.w;
        } else {
          const uint2 b = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p.dt_proj) + c * R + k0);
          const uint16_t h[4] = {uint16_t(b.x & 0xffffu), uint16_t(b.x >> 16), uint16_t(b.y & 0xffffu),
                                 uint16_t(b.y >> 16)};
#pragma unroll
          for (int i = 0; i < 4; ++i) w4[i] = WT == DType::BF16 ? bf16_bits_to_f32(h[i]) : f16_bits_to_f32(h[i]);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) w4[i] = live && k0 + i < R ? load_as_f32(p.dt_proj, WT, c * R + k0 + i) : 0.0f;
    }
    sW4[j][threadIdx.x] = make_float4(w4[0], w4[1], w4[2], w4[3]);
  }
  float A[4];
  if (kVec) {
    const float4 a4 = live ? reinterpret_cast<const float4*>(p.A + c * kNsbMaxState)[q] : float4{};
    A[0] = a4.x, A[1] = a4.y, A[2] = a4.z, A[3] = a4.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) A[i] = live && 4 * q + i < N ? p.A[c * N + 4 * q + i] : 0.0f;
  }
  const float bias = live ? p.dt_bias[c] : 0.0f, D = live ? p.D[c] : 0.0f;
  pdl_launch_dependents();
  pdl_wait();  // the entry table (a staged copy), the states and the activations come from earlier work

  const int e0 = blockIdx.x * per_block;
  const int ne = min(per_block, p.count - e0);  // >= 1 (grid)
  if (threadIdx.x < ne * kNsbEntryWords)
    reinterpret_cast<unsigned long long*>(sEnt)[threadIdx.x] =
        reinterpret_cast<const unsigned long long*>(entries + e0)[threadIdx.x];
  __syncthreads();

  // Group g's states and u into registers, and z of this thread's entry
  // (g's entry q: the one whose output it writes).
  auto load_group = [&](int g, float (&h)[kNsbEntries][4], float (&u)[kNsbEntries], float& z) {
    const int em = g * kNsbEntries + q;
    z = live && em < ne ? sEnt[em].z[c] : 0.0f;
#pragma unroll
    for (int e = 0; e < kNsbEntries; ++e) {
      const int ei = g * kNsbEntries + e;
      const bool on = live && ei < ne;
      const NormedScanEntry& en = sEnt[on ? ei : 0];
      if (kVec) {
        // Streaming (evict-first): a state is touched once per step.
        const float4 h4 = on ? __ldcs(reinterpret_cast<const float4*>(en.state + c * kNsbMaxState) + q) : float4{};
        h[e][0] = h4.x, h[e][1] = h4.y, h[e][2] = h4.z, h[e][3] = h4.w;
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) h[e][i] = on && 4 * q + i < N ? en.state[c * N + 4 * q + i] : 0.0f;
      }
      u[e] = on ? en.u[c] : 0.0f;
    }
  };
  float h[kNsbEntries][4], u[kNsbEntries], z;
  load_group(0, h, u, z);

  // Every entry's norms: row r (entry r / 3; dt, B, C) by warp r % 8, the
  // loads of kNsbRowsInFlight rows issued before any is reduced.
  const int warp = threadIdx.x / 32;
  for (int r0 = warp; r0 < 3 * ne; r0 += kNsbRowsInFlight * (kNsbThreads / 32)) {
    ShortRow rows[kNsbRowsInFlight];
#pragma unroll
    for (int b = 0; b < kNsbRowsInFlight; ++b) {
      const int r = r0 + b * (kNsbThreads / 32);
      if (r < 3 * ne) {  // uniform over the warp
        const int e = r / 3, kind = r % 3;
        const NormedScanEntry& en = sEnt[e];
        short_row_load(kind == 0 ? en.dt_raw : kind == 1 ? en.B : en.C,
                       kind == 0 ? p.dt_norm_w : kind == 1 ? p.B_norm_w : p.C_norm_w, kind == 0 ? R : N, rows[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < kNsbRowsInFlight; ++b) {
      const int r = r0 + b * (kNsbThreads / 32);
      if (r < 3 * ne) {
        const int e = r / 3, kind = r % 3;
        short_row_finish<WT>(rows[b], kind == 0 ? R : N, kind == 0 ? Rp : kNsbMaxState, p.eps, kind == 0,
                             kind == 0 ? sDtn + e * Rp : (kind == 1 ? sB : sC) + e * kNsbMaxState);
      }
    }
  }
  __syncthreads();

  // The groups in order (quad_sum_scatter: thread q ends with entry q's sums).
  const int lane = threadIdx.x % 32;
  const int ng = (ne + kNsbEntries - 1) / kNsbEntries;
  for (int g = 0; g < ng; ++g) {
    float hn[kNsbEntries][4], un[kNsbEntries];
    float zn = 0.0f;
    if (g + 1 < ng) load_group(g + 1, hn, un, zn);
    // delta: the single kernel's lane sums, fma by fma. Past R both w and
    // dtn are +0, and fmaf(+0, +0, acc) == acc (acc, summed from +0, is
    // never -0), so the padded columns change no bit.
    float acc[kNsbEntries][4];
#pragma unroll
    for (int e = 0; e < kNsbEntries; ++e) {
      const int ei = min(g * kNsbEntries + e, ne - 1);  // past ne: any real row (never stored)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[e][i] = 0.0f;
#pragma unroll
      for (int j = 0; j < kFusedWPerLane; ++j) {
        if (16 * j < R) {
          const float4 d4 = reinterpret_cast<const float4*>(sDtn + ei * Rp + 16 * j)[q];
          const float4 w4 = sW4[j][threadIdx.x];
          acc[e][0] = fmaf(w4.x, d4.x, acc[e][0]);
          acc[e][1] = fmaf(w4.y, d4.y, acc[e][1]);
          acc[e][2] = fmaf(w4.z, d4.z, acc[e][2]);
          acc[e][3] = fmaf(w4.w, d4.w, acc[e][3]);
        }
      }
    }
    const float dt_mine = softplus_f(__fadd_rn(quad_sum_scatter(acc), bias));  // entry q's
    float part[kNsbEntries][4];
#pragma unroll
    for (int e = 0; e < kNsbEntries; ++e) {
      const int ei = min(g * kNsbEntries + e, ne - 1);
      const float dt = __shfl_sync(0xffffffffu, dt_mine, (lane & ~(kNsbQuads - 1)) | e);
      const float du = __fmul_rn(dt, u[e]);
      const float4 b4 = reinterpret_cast<const float4*>(sB + ei * kNsbMaxState)[q];
      const float4 c4 = reinterpret_cast<const float4*>(sC + ei * kNsbMaxState)[q];
      const float bv[4] = {b4.x, b4.y, b4.z, b4.w}, cv[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // the single kernel's lane parts: fma(C, h, +0), +0 where a lane owns no state
        part[e][i] = 0.0f;
        if (kVec || 4 * q + i < N) {
          h[e][i] = state_step(h[e][i], A[i], dt, du, bv[i]);
          part[e][i] = __fmaf_rn(cv[i], h[e][i], 0.0f);
        }
      }
    }
    const float ch = quad_sum_scatter(part);  // entry q's
    const float u_mine = q == 0 ? u[0] : q == 1 ? u[1] : q == 2 ? u[2] : u[3];
    const int em = g * kNsbEntries + q;
    if (live && em < ne) sEnt[em].y[c] = scan_out(ch, D, u_mine, z);
#pragma unroll
    for (int e = 0; e < kNsbEntries; ++e) {
      const int ei = g * kNsbEntries + e;
      if (live && ei < ne) {
        float* st = sEnt[ei].state;
        if (kVec) {
          __stcs(reinterpret_cast<float4*>(st + c * kNsbMaxState) + q, make_float4(h[e][0], h[e][1], h[e][2], h[e][3]));
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (4 * q + i < N) st[c * N + 4 * q + i] = h[e][i];
        }
      }
    }
    if (g + 1 < ng) {
      z = zn;
#pragma unroll
      for (int e = 0; e < kNsbEntries; ++e) {
        u[e] = un[e];
#pragma unroll
        for (int i = 0; i < 4; ++i) h[e][i] = hn[e][i];
      }
    }
  }
}

// ---------------------------------------------------------------- prefill input norms
// One warp per token, with the fused step's warp helpers (warp_rms_finish,
// normed_value, warp_norm_row): the same sums and products, so the same bits.
constexpr int kNormWarps = 8;

__global__ void __launch_bounds__(32 * kNormWarps)
    scan_input_norms_kernel(ScanArgs a, ScanInputNorms in, uint16_t* dtn, int64_t ld_dtn) {
  const int64_t t = int64_t(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= a.n) return;
  const int64_t rank = in.dt_proj.cols;
  const float* xr = in.dt_raw + t * in.ld_dt;
  double ss = 0.0;
  for (int64_t i = lane; i < rank; i += 32) ss += double(xr[i]) * double(xr[i]);
  const float inv = warp_rms_finish(ss, rank, in.eps);
  uint16_t* out = dtn + t * ld_dtn;
  for (int64_t i = lane; i < ld_dtn; i += 32)
    out[i] = i < rank ? f32_to_bf16_bits(normed_value<DType::F32>(xr[i], inv, in.dt_norm_w[i], false)) : uint16_t(0);
  // B and C in place (warp_norm_row reads a row before it writes it).
  float* B = const_cast<float*>(a.B) + t * a.ldb;
  float* C = const_cast<float*>(a.C) + t * a.ldc;
  warp_norm_row<DType::F32>(B, in.B_norm_w, a.d_state, a.d_state, in.eps, false, B);
  warp_norm_row<DType::F32>(C, in.C_norm_w, a.d_state, a.d_state, in.eps, false, C);
}

// ---------------------------------------------------------------- chunked scan
// The recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t B_t
// u_t) over a long chunk of tokens, parallel over time: the tokens are cut
// into K pieces ("chunks" below) of L steps, and
//   1. chunk_local: per (channel, chunk k < K-1), the chunk's end state from
//      a zero start (chunk 0 from the real initial state) and sum(dt) over
//      the chunk (its decay is exp(A sum(dt)) per state);
//   2. chunk_carry: per (channel, state), the true start state of every
//      chunk, sequentially over the K chunks: H_k = exp(A sum_dt_k) H_{k-1} + local_k;
//   3. chunk_out: per (channel, chunk), the chunk's steps again from its
//      true start state, writing y; the last chunk writes the final state.
// Pass 3 recomputes the recurrence exactly as a sequential scan would from
// the carried state, so the only extra rounding is in the carry (pass 2).
// A thread owns one channel with all its (<= 16) states in registers: the
// per-token work (softplus, silu, the C.h sum) is done once per channel
// step, with no shuffles, and the u/delta/z/y accesses of a warp are 32
// consecutive channels. B and C rows (shared by all channels) are staged in
// shared memory per chunk and read as broadcasts. States beyond d_state are
// padded with A = B = C = 0, which keeps them at exactly 0.
constexpr int kCkThreads = 128;  // channels per block
constexpr int kCkN = 16;         // max d_state of this path
constexpr int kCkGroup = 8;      // steps whose global loads are issued together
constexpr int64_t kCkMinLen = 16, kCkMaxLen = 256;

// exp(dt A) is ex2_fast(dt A log2 e) (common.cuh): the decay is most of the
// work (one per state and step), and a multiply plus one MUFU op replaces
// expf's ~8 instructions; relative error ~2 ulp.

// Rows t0 .. t0+steps-1 of src (d_state wide, leading dimension ld) into
// dst [steps][kCkN], zero-padded beyond d_state.
__device__ __forceinline__ void stage_rows(const float* src, int64_t ld, int64_t t0, int steps, int64_t N,
                                           float* dst) {
  for (int i = threadIdx.x; i < steps * kCkN; i += kCkThreads) {
    const int tt = i / kCkN, s = i % kCkN;
    dst[i] = s < N ? src[(t0 + tt) * ld + s] : 0.0f;
  }
}

// A (times log2 e) of channel c, padded with 0.
__device__ __forceinline__ void load_chunk_A(const ScanArgs& a, int64_t c, float (&A2)[kCkN]) {
#pragma unroll
  for (int s = 0; s < kCkN; ++s) A2[s] = s < a.d_state ? a.A[c * a.d_state + s] * kLog2e : 0.0f;
}

// One step of all the thread's states; B is a staged row (16-byte aligned).
__device__ __forceinline__ void chunk_step(float (&h)[kCkN], const float (&A2)[kCkN], float dt, float du,
                                           const float* Brow) {
  const float4* b4 = reinterpret_cast<const float4*>(Brow);
#pragma unroll
  for (int q = 0; q < kCkN / 4; ++q) {
    const float4 b = b4[q];
    h[4 * q + 0] = ex2_fast(dt * A2[4 * q + 0]) * h[4 * q + 0] + du * b.x;
    h[4 * q + 1] = ex2_fast(dt * A2[4 * q + 1]) * h[4 * q + 1] + du * b.y;
    h[4 * q + 2] = ex2_fast(dt * A2[4 * q + 2]) * h[4 * q + 2] + du * b.z;
    h[4 * q + 3] = ex2_fast(dt * A2[4 * q + 3]) * h[4 * q + 3] + du * b.w;
  }
}

// Pass 1. grid (channel blocks, K-1, or K with dt_out). carry
// [K][channels][d_state], sum_dt [K][channels]; chunk k's results go to slot
// k. dt_out (null: not written) gets each step's dt = softplus(delta + bias)
// in delta's layout (the caller's delta itself where it is scratch), so that
// pass 3 reads dt instead of computing it again (the softplus is ~1/4 of
// pass 3's instructions; the bits are the same either way); the blocks of
// chunk K-1, which needs no carry, only write its dt.
__global__ void __launch_bounds__(kCkThreads) chunk_local_kernel(ScanArgs a, int L, float* carry, float* sum_dt,
                                                                 float* dt_out) {
  extern __shared__ float4 ck_smem[];
  float* sB = reinterpret_cast<float*>(ck_smem);  // [L][kCkN]
  const int64_t N = a.d_state, k = blockIdx.y, t0 = k * L;
  const int steps = int(min(int64_t(L), a.n - t0));
  const int64_t c = blockIdx.x * int64_t(kCkThreads) + threadIdx.x;
  if (dt_out && k == gridDim.y - 1) {  // the last chunk (block-uniform): its dt only
    if (c >= a.channels) return;
    const float bias = a.dt_bias[c];
    const float* pd = a.delta + t0 * a.ld_delta + c;
    float* pdt = dt_out + t0 * a.ld_delta + c;
    for (int j = 0; j < steps; ++j, pd += a.ld_delta, pdt += a.ld_delta) *pdt = softplus_f(*pd + bias);
    return;
  }
  stage_rows(a.B, a.ldb, t0, steps, N, sB);
  __syncthreads();  // the only barrier: threads past the last channel may leave after it
  if (c >= a.channels) return;
  const float bias = a.dt_bias[c];

  float A2[kCkN], h[kCkN];
  load_chunk_A(a, c, A2);
#pragma unroll
  for (int s = 0; s < kCkN; ++s) h[s] = k == 0 && s < N ? a.state[c * N + s] : 0.0f;
  float sdt = 0.0f;
  const float* pu = a.u + t0 * a.ldu + c;  // row pointers, advanced step by step (no 64-bit products)
  const float* pd = a.delta + t0 * a.ld_delta + c;
  float* pdt = dt_out ? dt_out + t0 * a.ld_delta + c : nullptr;
  for (int g = 0; g < steps; g += kCkGroup) {
    float u[kCkGroup], d[kCkGroup];
#pragma unroll
    for (int j = 0; j < kCkGroup; ++j) {
      u[j] = d[j] = 0.0f;
      if (g + j < steps) {
        u[j] = *pu, d[j] = *pd;
        pu += a.ldu, pd += a.ld_delta;
      }
    }
#pragma unroll
    for (int j = 0; j < kCkGroup; ++j) {
      if (g + j < steps) {
        const float dt = softplus_f(d[j] + bias);
        if (pdt) *pdt = dt, pdt += a.ld_delta;
        sdt += dt;
        chunk_step(h, A2, dt, dt * u[j], sB + (g + j) * kCkN);
      }
    }
  }
  float* out = carry + (k * a.channels + c) * N;
#pragma unroll
  for (int s = 0; s < kCkN; ++s)
    if (s < N) out[s] = h[s];
  sum_dt[k * a.channels + c] = sdt;
}

// Pass 2. One thread per (channel, state). On return carry slot k holds the
// start state of chunk k (slot 0: the initial state), for k < K.
constexpr int kCarryThreads = 256;
constexpr int kCarryGroup = 8;

__global__ void __launch_bounds__(kCarryThreads) chunk_carry_kernel(ScanArgs a, int64_t K, float* carry,
                                                                    const float* sum_dt) {
  const int64_t CN = a.channels * a.d_state;
  const int64_t i = blockIdx.x * int64_t(kCarryThreads) + threadIdx.x;  // c * N + s
  if (i >= CN) return;
  const int64_t c = i / a.d_state;
  const float A2 = a.A[i] * kLog2e;
  float H = a.state[i];
  // Chunk k < K-1 ends at H_k = (k == 0 ? local_0 : exp(A sum_dt_k) H_{k-1} + local_k);
  // the loads of a group are issued before its serial combine.
  for (int64_t k0 = 0; k0 < K - 1; k0 += kCarryGroup) {
    float loc[kCarryGroup], sd[kCarryGroup];
#pragma unroll
    for (int j = 0; j < kCarryGroup; ++j) {
      const int64_t k = k0 + j;
      loc[j] = k < K - 1 ? carry[k * CN + i] : 0.0f;
      sd[j] = k < K - 1 ? sum_dt[k * a.channels + c] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kCarryGroup; ++j) {
      const int64_t k = k0 + j;
      if (k < K - 1) {
        carry[k * CN + i] = H;  // the start of chunk k
        H = k == 0 ? loc[j] : ex2_fast(A2 * sd[j]) * H + loc[j];
      }
    }
  }
  carry[(K - 1) * CN + i] = H;
}

// Pass 3. grid (channel blocks, K). init [K][channels][d_state]: the chunks'
// start states (K == 1: a.state itself, read before this thread writes it).
// The work of block (channel block cb, chunk k); the caller's whole block
// calls it (it has a barrier). kDt: a.delta holds dt itself (pass 1's
// dt_out) rather than delta.
template <bool kDt>
__device__ __forceinline__ void chunk_out(const ScanArgs& a, int L, int64_t K, const float* init, int64_t cb,
                                          int64_t k, float* sB) {
  float* sC = sB + L * kCkN;  // sB, sC: [L][kCkN]
  const int64_t N = a.d_state, t0 = k * L;
  const int steps = int(min(int64_t(L), a.n - t0));
  stage_rows(a.B, a.ldb, t0, steps, N, sB);
  stage_rows(a.C, a.ldc, t0, steps, N, sC);
  __syncthreads();  // the only barrier
  const int64_t c = cb * int64_t(kCkThreads) + threadIdx.x;
  if (c >= a.channels) return;

  float A2[kCkN], h[kCkN];
  load_chunk_A(a, c, A2);
  const float* h0 = init + (k * a.channels + c) * N;
#pragma unroll
  for (int s = 0; s < kCkN; ++s) h[s] = s < N ? h0[s] : 0.0f;
  const float bias = a.dt_bias[c], D = a.D[c];
  const float* pu = a.u + t0 * a.ldu + c;  // row pointers, advanced step by step (no 64-bit products)
  const float* pd = a.delta + t0 * a.ld_delta + c;
  const float* pz = a.z + t0 * a.ldz + c;
  float* py = a.y + t0 * a.ldy + c;
  for (int g = 0; g < steps; g += kCkGroup) {
    float u[kCkGroup], d[kCkGroup], z[kCkGroup];
#pragma unroll
    for (int j = 0; j < kCkGroup; ++j) {
      u[j] = d[j] = z[j] = 0.0f;
      if (g + j < steps) {
        u[j] = *pu, d[j] = *pd, z[j] = *pz;
        pu += a.ldu, pd += a.ld_delta, pz += a.ldz;
      }
    }
#pragma unroll
    for (int j = 0; j < kCkGroup; ++j) {
      if (g + j < steps) {
        const float dt = kDt ? d[j] : softplus_f(d[j] + bias);
        chunk_step(h, A2, dt, dt * u[j], sB + (g + j) * kCkN);
        // y as the CPU sums it: D u first, then C[s] h[s] in order of s.
        const float4* c4 = reinterpret_cast<const float4*>(sC + (g + j) * kCkN);
        float y = D * u[j];
#pragma unroll
        for (int q = 0; q < kCkN / 4; ++q) {
          const float4 cv = c4[q];
          y += cv.x * h[4 * q + 0];
          y += cv.y * h[4 * q + 1];
          y += cv.z * h[4 * q + 2];
          y += cv.w * h[4 * q + 3];
        }
        *py = y * silu_f(z[j]);
        py += a.ldy;
      }
    }
  }
  if (k == K - 1) {
#pragma unroll
    for (int s = 0; s < kCkN; ++s)
      if (s < N) a.state[c * N + s] = h[s];
  }
}

template <bool kDt>
__global__ void __launch_bounds__(kCkThreads) chunk_out_kernel(ScanArgs a, int L, int64_t K, const float* init) {
  extern __shared__ float4 ck_smem[];
  chunk_out<kDt>(a, L, K, init, blockIdx.x, blockIdx.y, reinterpret_cast<float*>(ck_smem));
}

// ---------------------------------------------------------------- one-pass scan
// The whole run of tokens in one pass, sequential in time: lane q of a group
// of 8 owns states 2q and 2q+1 of one channel (in registers), a warp 4
// channels, so a state step costs one exp (the chunked scan pays two: its
// local pass and its rerun) and u, delta and z are read once. The
// parallelism is channels x states / 2 (25,600 lanes for Hymba-1.5B), and a
// state's serial dependence is one multiply-add per step, so each warp needs
// independent work beside its chains: it works in groups of 8 tokens, and
// beside a group's steps it prepares the next group's (dt, dt u) (lane q:
// token q of the group, for its channel; dt = softplus(delta + bias), once
// per token and channel) and finishes the group's y (the 8 lanes' parts of
// C.h summed by a transposing shuffle tree, so lane q holds token q's sum;
// y = (C.h + D u) silu(z)). Tiles of T tokens of u, delta, z (the block's
// channels) and B, C are staged by cp.async in a ring of 3 (tile k is
// scanned while k+1 is prepared from and k+2 loads), one block barrier per
// tile. Tokens past n get (dt, dt u) = (0, 0): exp(0) h + 0 leaves h exactly
// as it was. States past d_state are padded with A = B = C = 0 (they stay 0).
constexpr int kOpStages = 3;

constexpr int kOpSpl = 2;  // states per lane (4 was slower: fewer warps than schedulers, each stalled)

template <int WPB, int T>
struct OnePass {
  static constexpr int kLpc = kCkN / kOpSpl;      // lanes per channel = tokens per group
  static constexpr int kCpw = 32 / kLpc;       // channels per warp
  static constexpr int kCpb = kCpw * WPB;      // channels per block
  static constexpr int kThreads = 32 * WPB;
  // Staged row pitch: an odd multiple of kCpw, so the L rows a warp reads at
  // once (lane q: row q, its channel's column) fall on distinct banks.
  static constexpr int kLd = (kCpb / kCpw) % 2 == 1 ? kCpb : kCpb + kCpw;
  static constexpr int kRaw = 3 * T * kLd;     // u, delta, z: [3][T][kLd]
  static constexpr int kStage = kRaw + 2 * T * kCkN;  // + B, C: [2][T][16]
  static constexpr int kDtPerWarp = 2 * kLpc * kCpw;  // two groups of (dt, dt u): [2][kLpc][kCpw] float2
  static constexpr size_t kSmemBytes = sizeof(float) * size_t(kOpStages * kStage + WPB * kDtPerWarp * 2);
  static_assert(T % kLpc == 0, "a tile is whole groups");
};

__device__ __forceinline__ void cp_async4(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}

// Up to three row-major sources (one per staged array) and their leading
// dimensions; picked by comparisons, not indexing, so they stay in registers.
struct StageSources {
  const float* p0;
  const float* p1;
  const float* p2;
  int64_t ld0, ld1, ld2;
  __device__ const float* row(int arr, int64_t t, int64_t c) const {
    return arr == 0 ? p0 + t * ld0 + c : arr == 1 ? p1 + t * ld1 + c : p2 + t * ld2 + c;
  }
};

// Rows t0 .. t0+T-1, columns col0 .. col0+COLS-1 of the first ARRAYS sources
// into dst[(i * T + t) * LD + j] by cp.async, VEC floats (4: 16 bytes,
// aligned; or 1) per copy; zeros past row n or column col_end. NTHREADS
// threads share the copies.
template <int VEC, int ARRAYS, int T, int COLS, int LD, int NTHREADS>
__device__ __forceinline__ void stage_tile(const StageSources& src, int64_t t0, int64_t n, int64_t col0,
                                           int64_t col_end, float* dst) {
  static_assert(COLS % VEC == 0, "whole copies per row");
  constexpr int kPerRow = COLS / VEC;
  for (int i = threadIdx.x; i < ARRAYS * T * kPerRow; i += NTHREADS) {
    const int arr = i / (T * kPerRow), t = i / kPerRow % T, j = VEC * (i % kPerRow);
    const int64_t c = col0 + j;
    const bool ok = t0 + t < n && c < col_end;
    const float* from = ok ? src.row(arr, t0 + t, c) : src.p0;
    float* to = dst + (arr * T + t) * LD + j;
    if constexpr (VEC == 4) cp_async16(to, from, ok ? 16 : 0);
    else cp_async4(to, from, ok ? 4 : 0);
  }
}

// Stages tokens t0 .. t0+T-1 (zeros past n, past the last channel or state):
// u, delta, z of channels cb .. cb+kCpb-1 and the B, C rows. vec_c / vec_bc:
// those rows may be copied 16 bytes at a time (the host checked alignment;
// vec_bc also means d_state == 16).
template <class P, int T>
__device__ __forceinline__ void onepass_stage(const ScanArgs& a, int64_t cb, int64_t t0, bool vec_c, bool vec_bc,
                                              float* st) {
  const StageSources raw{a.u, a.delta, a.z, a.ldu, a.ld_delta, a.ldz};
  if (vec_c) stage_tile<4, 3, T, P::kCpb, P::kLd, P::kThreads>(raw, t0, a.n, cb, a.channels, st);
  else stage_tile<1, 3, T, P::kCpb, P::kLd, P::kThreads>(raw, t0, a.n, cb, a.channels, st);
  const StageSources bc{a.B, a.C, a.C, a.ldb, a.ldc, a.ldc};
  float* sbc = st + P::kRaw;  // [2][T][kCkN]
  if (vec_bc) stage_tile<4, 2, T, kCkN, kCkN, P::kThreads>(bc, t0, a.n, 0, a.d_state, sbc);
  else stage_tile<1, 2, T, kCkN, kCkN, P::kThreads>(bc, t0, a.n, 0, a.d_state, sbc);
}

// The sum over the L lanes of a channel of p[q], left in lane q (a
// transposing butterfly: each round halves what a lane holds, the lane with
// bit o set keeping the upper half; fp addition commutes, so both lanes of a
// pair get the same bits).
template <int L>
__device__ __forceinline__ float group_transpose_sum(const float (&p)[L], int q) {
  float r[L];
#pragma unroll
  for (int j = 0; j < L; ++j) r[j] = p[j];
#pragma unroll
  for (int o = L / 2; o > 0; o /= 2) {
    const bool upper = q & o;
#pragma unroll
    for (int j = 0; j < o; ++j) {
      const float keep = upper ? r[j + o] : r[j], send = upper ? r[j] : r[j + o];
      r[j] = keep + __shfl_xor_sync(0xffffffffu, send, o);
    }
  }
  return r[0];
}

// softplus_f without branches (log1pf branches), so that the one-pass scan's
// instruction stream stays one block the compiler can interleave with the
// state steps (with silu_fast_f). Within ~2 ulp of it.
//
// log1p(x) for 0 <= x < 2^64: u = 1 + x rounded and log1p(x) = log(u) +
// (x - (u - 1)) / u, the rounding of u corrected to first order (u - 1 is
// exact below 2^24; above, the correction is below 1e-7 of the result). log(u)
// = e ln2 + log(1 + f) with u = 2^e (1 + f), 1 + f in [sqrt(1/2), sqrt(2)),
// and log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)), s = f / (2 + f), R the
// minimax polynomial of the classic single-precision logf (its coefficients).
__device__ __forceinline__ float log1p_nb(float x) {
  const float u = 1.0f + x;
  const int bits = __float_as_int(u);
  const int e = (bits - 0x3f3504f3) >> 23;
  const float f = __int_as_float(bits - (e << 23)) - 1.0f;
  const float s = __fdividef(f, 2.0f + f), z = s * s, w = z * z;
  const float R = z * (0.66666662693f + w * 0.28498786688f) + w * (0.40000972152f + w * 0.24279078841f);
  const float hfsq = 0.5f * f * f, fe = float(e);
  const float log_u = fe * 6.9313812256e-01f + (f - (hfsq - (s * (hfsq + R) + fe * 9.0580006145e-06f)));
  return log_u + __fdividef(x - (u - 1.0f), u);
}
__device__ __forceinline__ float softplus_nb(float v) {
  const float l = log1p_nb(expf(fminf(v, 20.0f)));
  return v > 20.0f ? v : l;
}

template <int WPB, int T>
__global__ void __launch_bounds__(32 * WPB) scan_onepass_kernel(ScanArgs a, bool vec_c, bool vec_bc) {
  using P = OnePass<WPB, T>;
  constexpr int L = P::kLpc, kGroups = T / L;
  extern __shared__ float4 op_smem[];
  float* stages = reinterpret_cast<float*>(op_smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q = lane % L;
  float2* sDt = reinterpret_cast<float2*>(stages + kOpStages * P::kStage) + warp * P::kDtPerWarp;
  const int cw = lane / L;                   // the lane's channel in the warp
  const int cb_local = warp * P::kCpw + cw;  // ... in the block
  const int64_t cb = int64_t(blockIdx.x) * P::kCpb, c = cb + cb_local, N = a.d_state;
  const bool live = c < a.channels;
  float A2[kOpSpl], h[kOpSpl];
#pragma unroll
  for (int j = 0; j < kOpSpl; ++j) {
    const int s = q * kOpSpl + j;
    const bool ok = live && s < N;
    A2[j] = ok ? a.A[c * N + s] * kLog2e : 0.0f;
    h[j] = ok ? a.state[c * N + s] : 0.0f;
  }
  const float bias = live ? a.dt_bias[c] : 0.0f, D = live ? a.D[c] : 0.0f;

  // (dt, dt u) of token t of stage st (absolute position pos) for this
  // lane's channel. Branch-free, so that it fills the scan's latencies.
  auto prepare = [&](const float* st, int t, int64_t pos) {
    const float u = st[t * P::kLd + cb_local], dt = softplus_nb(st[(T + t) * P::kLd + cb_local] + bias);
    const bool in = pos < a.n;
    return make_float2(in ? dt : 0.0f, in ? dt * u : 0.0f);
  };
  float2* my_dt = sDt + q * P::kCpw + cw;  // this lane's slot in half 0 (half 1: + L * kCpw)

  const int64_t tiles = (a.n + T - 1) / T;
  onepass_stage<P, T>(a, cb, 0, vec_c, vec_bc, stages);
  cp_async_commit();
  if (tiles > 1) onepass_stage<P, T>(a, cb, T, vec_c, vec_bc, stages + P::kStage);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  my_dt[0] = prepare(stages, q, q);
  __syncwarp();
  int half = 0;
  for (int64_t k = 0; k < tiles; ++k) {
    const int64_t t0 = k * T;
    const float* st = stages + (k % kOpStages) * P::kStage;
    const float* next = stages + ((k + 1) % kOpStages) * P::kStage;
    cp_async_wait<0>();
    __syncthreads();  // tile k+1 is staged; every warp is done with tile k-1, whose stage k+2 reuses
    if (k + 2 < tiles) onepass_stage<P, T>(a, cb, t0 + 2 * T, vec_c, vec_bc, stages + ((k + 2) % kOpStages) * P::kStage);
    cp_async_commit();
    const float* sB = st + P::kRaw;
    const float* sC = sB + T * kCkN;
    float* yrow = a.y + t0 * a.ldy + (live ? c : 0);
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      // The next group's (dt, dt u) (the next tile's first group after the
      // last), independent of this group's steps.
      const float2 dt_next =
          prepare(g + 1 < kGroups ? st : next, (g + 1) % kGroups * L + q, t0 + (g + 1) * L + q);
      const float2* dts = sDt + half * L * P::kCpw + cw;
      float p[L];
#pragma unroll
      for (int j = 0; j < L; ++j) {
        const int t = g * L + j;
        const float2 dd = dts[j * P::kCpw];
        const float2 b2 = *reinterpret_cast<const float2*>(sB + t * kCkN + 2 * q);
        const float2 c2 = *reinterpret_cast<const float2*>(sC + t * kCkN + 2 * q);
        const float b[kOpSpl] = {b2.x, b2.y}, cv[kOpSpl] = {c2.x, c2.y};
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < kOpSpl; ++i) {
          h[i] = ex2_fast(dd.x * A2[i]) * h[i] + dd.y * b[i];
          part = i == 0 ? cv[0] * h[0] : part + cv[i] * h[i];
        }
        p[j] = part;
      }
      const float ch = group_transpose_sum<L>(p, q);
      const int t = g * L + q;
      const float y =
          __fmul_rn(__fmaf_rn(D, st[t * P::kLd + cb_local], ch), silu_fast_f(st[(2 * T + t) * P::kLd + cb_local]));
      if (live && t0 + t < a.n) yrow[t * a.ldy] = y;
      half ^= 1;
      my_dt[half * L * P::kCpw] = dt_next;
      __syncwarp();  // the next group's (dt, dt u) written; this group's read before it is overwritten
    }
  }
#pragma unroll
  for (int j = 0; j < kOpSpl; ++j) {
    const int s = q * kOpSpl + j;
    if (live && s < N) a.state[c * N + s] = h[j];
  }
}

// The one-pass scan's launch shape: 4 warps (16 channels) a block, tiles of
// 64 tokens. Against the chunked scan (H100, 3200 channels x 16 states): 64
// tokens 8 us against 25, 512 38 against 53, 1024 75 against 79, 2048 144
// against 130, 8192 558 against 429 (its warps, ~1.5 per scheduler, stall on
// their chains; 4 states a lane, fewer warps, was slower still), hence the
// token limit.
using OnePassShape = OnePass<4, 64>;
constexpr int64_t kOnePassMinTokens = 16, kOnePassMaxTokens = 1280;

bool aligned16(const void* p, int64_t ld) { return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 4 == 0; }

// Whether the one-pass scan takes a: d_state <= 16 and kOnePassMinTokens <=
// n < kOnePassMaxTokens. HYMBA_SCAN_ONEPASS (A/B timing, tests): 0 never, 1
// at any length from kOnePassMinTokens on.
bool onepass_for(const ScanArgs& a) {
  int mode = -1;
  if (const char* e = std::getenv("HYMBA_SCAN_ONEPASS")) mode = std::atoi(e);
  if (mode == 0 || a.d_state > kCkN || a.n < kOnePassMinTokens || (mode < 0 && a.n >= kOnePassMaxTokens))
    return false;
  return (a.channels + OnePassShape::kCpb - 1) / OnePassShape::kCpb <= 0x7fffffff;
}

bool selective_scan_onepass(const ScanArgs& a, cudaStream_t stream) {
  if (!onepass_for(a)) return false;
  using P = OnePassShape;
  const int64_t blocks = (a.channels + P::kCpb - 1) / P::kCpb;
  const bool vec_c = aligned16(a.u, a.ldu) && aligned16(a.delta, a.ld_delta) && aligned16(a.z, a.ldz) &&
                     a.channels % 4 == 0;
  const bool vec_bc = a.d_state == kCkN && aligned16(a.B, a.ldb) && aligned16(a.C, a.ldc);
  auto* kernel = scan_onepass_kernel<4, 64>;
  HYMBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(P::kSmemBytes)));
  kernel<<<unsigned(blocks), unsigned(P::kThreads), P::kSmemBytes, stream>>>(a, vec_c, vec_bc);
  HYMBA_CUDA_LAUNCHED("scan_onepass");
  return true;
}

// Batched decode with d_state <= 16: lane l of a 16-lane group owns state l
// of a channel (scan_block's layout and arithmetic, so no staging), and each
// thread takes kStepItems channels 16 apart, their loads issued together: a
// decode step is latency-bound, and a block per 16 channels of every
// sequence made many short waves. grid (channel blocks, entry).
constexpr int kStepItems = 4;

__global__ void __launch_bounds__(kScanThreads, 4) scan_step_batch_kernel(const ScanArgs* entries) {
  const ScanArgs a = entries[blockIdx.y];
  const int lane = threadIdx.x % kLanes, cl = threadIdx.x / kLanes;
  const int64_t N = a.d_state, c0 = int64_t(blockIdx.x) * kStepItems * kChannels + cl;
  float h[kStepItems], A[kStepItems], bias[kStepItems], D[kStepItems];
#pragma unroll
  for (int i = 0; i < kStepItems; ++i) {
    const int64_t c = c0 + i * kChannels;
    const bool ch = c < a.channels, live = ch && lane < N;
    h[i] = live ? a.state[c * N + lane] : 0.0f;
    A[i] = live ? a.A[c * N + lane] : 0.0f;
    bias[i] = ch ? a.dt_bias[c] : 0.0f;
    D[i] = ch ? a.D[c] : 0.0f;
  }
  for (int64_t t = 0; t < a.n; ++t) {
    const float Bs = lane < N ? a.B[t * a.ldb + lane] : 0.0f;
    const float Cs = lane < N ? a.C[t * a.ldc + lane] : 0.0f;
    float u[kStepItems], d[kStepItems], z[kStepItems];
#pragma unroll
    for (int i = 0; i < kStepItems; ++i) {
      const int64_t c = c0 + i * kChannels;
      const bool ch = c < a.channels;
      u[i] = ch ? a.u[t * a.ldu + c] : 0.0f;
      d[i] = ch ? a.delta[t * a.ld_delta + c] : 0.0f;
      z[i] = ch ? a.z[t * a.ldz + c] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kStepItems; ++i) {
      const float dt = softplus_f(d[i] + bias[i]);
      h[i] = expf(dt * A[i]) * h[i] + (dt * u[i]) * Bs;  // lane_step's arithmetic (one state per lane)
      const float part = lane_sum(Cs * h[i]);         // every lane: the shuffles need the whole warp
      const int64_t c = c0 + i * kChannels;
      if (lane == 0 && c < a.channels) a.y[t * a.ldy + c] = (part + D[i] * u[i]) * silu_f(z[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kStepItems; ++i) {
    const int64_t c = c0 + i * kChannels;
    if (c < a.channels && lane < N) a.state[c * N + lane] = h[i];
  }
}

// How a single-sequence scan runs: chunked (L steps per chunk, K chunks) or
// the sequential kernel (chunked == false).
struct ScanPlan {
  bool chunked = false;
  int64_t L = 0, K = 0;
  size_t carry_floats = 0, sum_dt_floats = 0;  // scratch (none when K == 1)
};

// Blocks of chunk_out_kernel (the heavier pass) resident per SM, in the
// form the prefill path runs (reading pass 1's dt): its registers bound it
// (6 blocks of 128 threads at 80 registers on sm_90a; the form computing
// softplus itself takes 86, 5 blocks), which sets how many chunks fill
// exactly one wave.
int chunk_blocks_per_sm() {
  static const int blocks = [] {
    int b = 0;
    const size_t smem = 2 * size_t(kCkMaxLen) * kCkN * sizeof(float);
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, chunk_out_kernel<true>, kCkThreads, smem) != cudaSuccess) {
      (void)cudaGetLastError();
      b = 0;
    }
    return b > 0 ? b : 4;
  }();
  return blocks;
}

// HYMBA_SCAN_CHUNK (tuning and A/B timing): unset or 0 = automatic, a
// negative value = the sequential kernel, a positive one = that chunk length
// (clamped to 1..kCkMaxLen).
ScanPlan plan_scan(const ScanArgs& a, int sm_count) {
  ScanPlan p;
  if (a.n <= 0 || a.channels <= 0 || a.d_state < 1 || a.d_state > kCkN) return p;
  int64_t force = 0;
  if (const char* e = std::getenv("HYMBA_SCAN_CHUNK")) force = std::atoll(e);
  if (force < 0) return p;
  const int64_t cblocks = (a.channels + kCkThreads - 1) / kCkThreads;
  int64_t L;
  if (force > 0) {
    L = std::min(force, kCkMaxLen);
  } else if (a.n <= kCkMinLen) {
    L = kCkMinLen;  // one chunk, one launch (decode-sized scans)
  } else {
    // As many chunks as fill whole waves of (channel block, chunk) blocks,
    // one wave unless the chunks would exceed kCkMaxLen steps, in lengths of
    // a multiple of kCkMinLen (shorter chunks add carries for little gain).
    const int64_t wave = int64_t(std::max(sm_count, 1)) * chunk_blocks_per_sm();
    const int64_t per_wave = std::max<int64_t>(1, wave / cblocks);
    const int64_t waves = std::max<int64_t>(1, (a.n + per_wave * kCkMaxLen - 1) / (per_wave * kCkMaxLen));
    const int64_t k_plan = waves * per_wave;
    L = (a.n + k_plan - 1) / k_plan;
    L = std::clamp((L + kCkMinLen - 1) / kCkMinLen * kCkMinLen, kCkMinLen, kCkMaxLen);
  }
  const int64_t K = (a.n + L - 1) / L;
  if (K > 65535 || cblocks > 0x7fffffff) return p;  // grid limits: the sequential kernel
  p.chunked = true;
  p.L = L, p.K = K;
  if (K > 1) {
    p.carry_floats = size_t(K * a.channels * a.d_state);
    p.sum_dt_floats = size_t(K * a.channels);
  }
  return p;
}

size_t carry_bytes_aligned(const ScanPlan& p) { return (p.carry_floats * sizeof(float) + 255) / 256 * 256; }

// causal_conv_silu for more than 4 tokens: the conv kernel (with yb, the
// output's bf16 copy, [n][channels]: the run kernel only, k_width 4 and at
// most 65535 runs, as conv_silu_matmul checks), then the state update.
void conv_silu_chunk(const ConvArgs& a, uint16_t* yb, cudaStream_t stream) {
  const int64_t cblocks = (a.channels + kConvThreads - 1) / kConvThreads;
  const int64_t runs = (a.n + kConvRun - 1) / kConvRun;
  if (a.k_width == 4 && runs <= 65535) {
    conv_silu_run_kernel<4><<<dim3(unsigned(cblocks), unsigned(runs)), kConvThreads, 0, stream>>>(
        a.x, a.n, a.ldx, a.channels, a.weight, a.bias, a.state, a.y, a.ldy, yb, a.channels);
  } else {
    const dim3 grid(unsigned(cblocks), unsigned(std::min<int64_t>(a.n, 65535)));
    conv_silu_kernel<<<grid, kConvThreads, 0, stream>>>(a.x, a.n, a.ldx, a.channels, a.weight, a.bias, a.k_width,
                                                        a.state, a.y, a.ldy);
  }
  HYMBA_CUDA_LAUNCHED("conv_silu");
  if (a.k_width > 1) {
    conv_state_kernel<<<blocks_for(a.channels, 256), 256, 0, stream>>>(a.x, a.n, a.ldx, a.channels, a.k_width - 1,
                                                                        a.state);
    HYMBA_CUDA_LAUNCHED("conv_state");
  }
}

}  // namespace

void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                      const float* bias, int k_width, float* state, float* y, int64_t ldy, cudaStream_t stream) {
  check(k_width >= 1, "causal_conv_silu: k_width must be at least 1 (got ", k_width, ")");
  if (n <= 0 || channels <= 0) return;
  const int64_t cblocks = (channels + kConvThreads - 1) / kConvThreads;
  check(cblocks <= 0x7fffffff, "causal_conv_silu: too many channels (", channels, ")");
  if (n <= 4) {  // decode: tokens run in order per channel, state shifted in the same kernel
    launch_pdl("conv_silu_short", conv_silu_short_kernel,
               dim3(unsigned((channels + kConvBatchThreads - 1) / kConvBatchThreads)), dim3(kConvBatchThreads), 0,
               stream, ConvArgs{x, ldx, n, channels, weight, bias, k_width, state, y, ldy});
    return;
  }
  conv_silu_chunk(ConvArgs{x, ldx, n, channels, weight, bias, k_width, state, y, ldy}, nullptr, stream);
}

size_t conv_silu_matmul_scratch_bytes(const ConvArgs& a) {
  return size_t(std::max<int64_t>(a.n, 0)) * size_t(std::max<int64_t>(a.channels, 0)) * sizeof(uint16_t);
}

bool conv_silu_matmul(const ConvArgs& a, const MatrixView& W, float* y2, int64_t ldy2, void* scratch,
                      cudaStream_t stream) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const int64_t C = a.channels, runs = (a.n + kConvRun - 1) / kConvRun, cblocks = (C + kConvThreads - 1) / kConvThreads;
  if (a.n <= 4 || a.k_width != 4 || C <= 0 || C % kXpChunk != 0 || runs > 65535 || cblocks > 0x7fffffff ||
      a.n / kXpTokens >= 0x7fffffff || W.dtype != DType::BF16 || W.cols != C || W.rows < 1 ||
      W.rows > kXpMaxRows || !aligned(W.data) || !aligned(scratch))
    return false;
  auto* b = static_cast<uint16_t*>(scratch);  // [n][C] bf16
  conv_silu_chunk(a, b, stream);
  const XpParams p{b, C, a.n, static_cast<const uint16_t*>(W.data), int(W.rows), C, y2, ldy2};
  const size_t smem = kXpStages * size_t(kXpStage) * sizeof(uint16_t);
  HYMBA_CUDA_CHECK(cudaFuncSetAttribute(xproj_gemm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  xproj_gemm_kernel<<<unsigned((a.n + kXpTokens - 1) / kXpTokens), kXpThreads, smem, stream>>>(p);
  HYMBA_CUDA_LAUNCHED("xproj_gemm");
  return true;
}

size_t selective_scan_scratch_bytes(const ScanArgs& a, int sm_count) {
  if (onepass_for(a)) return 0;
  const ScanPlan p = plan_scan(a, sm_count);
  if (p.carry_floats == 0) return 0;
  return carry_bytes_aligned(p) + p.sum_dt_floats * sizeof(float);
}

void selective_scan(const ScanArgs& a, int sm_count, void* scratch, cudaStream_t stream, bool delta_is_scratch) {
  check(a.d_state >= 1 && a.d_state <= kLanes * kMaxK, "selective_scan: d_state ", a.d_state,
        " is outside the supported 1..", kLanes * kMaxK);
  if (a.n <= 0 || a.channels <= 0) return;
  if (selective_scan_onepass(a, stream)) return;
  const ScanPlan p = plan_scan(a, sm_count);
  if (!p.chunked) {
    const size_t smem = sizeof(float) * size_t(2 * kChunk * a.d_state + 3 * kChunk * kChannels);
    const int64_t blocks = (a.channels + kChannels - 1) / kChannels;
    check(blocks <= 0x7fffffff, "selective_scan: too many channels (", a.channels, ")");
    selective_scan_kernel<<<unsigned(blocks), kScanThreads, smem, stream>>>(a);
    HYMBA_CUDA_LAUNCHED("selective_scan");
    return;
  }
  const unsigned cblocks = unsigned((a.channels + kCkThreads - 1) / kCkThreads);
  const size_t row_bytes = size_t(p.L) * kCkN * sizeof(float);  // one staged [L][16] matrix
  const float* init = a.state;  // K == 1: the chunk starts from the state itself
  float* dt = nullptr;          // pass 1's dt, over delta (where delta is scratch)
  if (p.K > 1) {
    check(scratch != nullptr, "selective_scan: the chunked scan needs scratch (selective_scan_scratch_bytes)");
    float* carry = static_cast<float*>(scratch);
    float* sum_dt = reinterpret_cast<float*>(static_cast<char*>(scratch) + carry_bytes_aligned(p));
    dt = delta_is_scratch ? const_cast<float*>(a.delta) : nullptr;
    const unsigned chunks = unsigned(dt ? p.K : p.K - 1);
    chunk_local_kernel<<<dim3(cblocks, chunks), kCkThreads, row_bytes, stream>>>(a, int(p.L), carry, sum_dt, dt);
    HYMBA_CUDA_LAUNCHED("scan_chunk_local");
    const int64_t cn = a.channels * a.d_state;
    chunk_carry_kernel<<<blocks_for(cn, kCarryThreads, 0x7fffffff), kCarryThreads, 0, stream>>>(a, p.K, carry,
                                                                                                  sum_dt);
    HYMBA_CUDA_LAUNCHED("scan_chunk_carry");
    init = carry;
  }
  const dim3 grid(cblocks, unsigned(p.K));
  if (dt)  // a.delta now holds dt
    chunk_out_kernel<true><<<grid, kCkThreads, 2 * row_bytes, stream>>>(a, int(p.L), p.K, init);
  else
    chunk_out_kernel<false><<<grid, kCkThreads, 2 * row_bytes, stream>>>(a, int(p.L), p.K, init);
  HYMBA_CUDA_LAUNCHED("scan_chunk_out");
}

void scan_input_norms(const ScanArgs& a, const ScanInputNorms& in, uint16_t* dtn, int64_t ld_dtn,
                      cudaStream_t stream) {
  if (a.n <= 0) return;
  const int64_t blocks = (a.n + kNormWarps - 1) / kNormWarps;
  check(blocks <= 0x7fffffff, "scan_input_norms: too many tokens (", a.n, ")");
  scan_input_norms_kernel<<<unsigned(blocks), 32 * kNormWarps, 0, stream>>>(a, in, dtn, ld_dtn);
  HYMBA_CUDA_LAUNCHED("scan_input_norms");
}

bool normed_selective_scan_step(const ScanArgs& a, const ScanInputNorms& in, cudaStream_t stream) {
  const int64_t R = in.dt_proj.cols;
  if (a.n > kFusedMaxTokens || R < 1 || R > kLanes * kFusedWPerLane || in.dt_proj.rows != a.channels ||
      a.d_state < 1 || a.d_state > kLanes * kMaxK)
    return false;
  if (a.n <= 0 || a.channels <= 0) return true;  // nothing to do
  const int64_t blocks = (a.channels + kChannels - 1) / kChannels;
  if (blocks > 0x7fffffff) return false;
  const size_t smem = sizeof(float) * size_t(a.n * (R + 2 * a.d_state));
  const dim3 grid{unsigned(blocks)}, block{unsigned(kScanThreads)};
  switch (in.dt_proj.dtype) {
    case DType::F32:
      launch_pdl("normed_scan_step", normed_scan_step_kernel<DType::F32>, grid, block, smem, stream, a, in);
      break;
    case DType::BF16:
      launch_pdl("normed_scan_step", normed_scan_step_kernel<DType::BF16>, grid, block, smem, stream, a, in);
      break;
    case DType::F16:
      launch_pdl("normed_scan_step", normed_scan_step_kernel<DType::F16>, grid, block, smem, stream, a, in);
      break;
    default:
      return false;
  }
  return true;
}

// conv_silu_one_kernel<kw> (kw 1 to 4) over `count` one-token entries of up
// to 4 * quads channels (host memory, staged here); packed as the kernel's.
void launch_conv_one(const ConvArgs* entries, size_t count, int64_t quads, int kw, const BatchHost& host,
                     uint16_t* packed, int64_t ldp) {
  const int64_t total = int64_t(count) * quads;
  const auto* d = static_cast<const ConvArgs*>(host.stage(entries, count * sizeof(ConvArgs)));
  const unsigned blocks = unsigned((total + kConvOneThreads - 1) / kConvOneThreads);
  auto* k = kw == 1 ? conv_silu_one_kernel<1> : kw == 2 ? conv_silu_one_kernel<2> : kw == 3 ? conv_silu_one_kernel<3>
                                                                                : conv_silu_one_kernel<4>;
  k<<<blocks, kConvOneThreads, 0, host.stream>>>(d, unsigned(quads), unsigned(total), packed, ldp);
  HYMBA_CUDA_LAUNCHED("conv_silu_batch (one token)");
}

void causal_conv_silu_batch(const ConvArgs* a, int count, const BatchHost& host, std::vector<int>& rest) {
  std::vector<ConvArgs> take, one;  // one: one-token entries of one k_width <= 4 (conv_silu_one_kernel)
  int64_t max_channels = 0, max_one = 0;
  int one_kw = 0;
  for (int i = 0; i < count; ++i) {
    const ConvArgs& e = a[i];
    if (e.k_width < 1) rest.push_back(i);  // the single op reports it
    else if (e.n <= 0 || e.channels <= 0) continue;  // nothing to do (as the single op)
    else if (e.n == 1 && e.k_width <= 4 && (one_kw == 0 || e.k_width == one_kw)) {
      one_kw = e.k_width;
      one.push_back(e);
      max_one = std::max(max_one, e.channels);
    } else if (e.n > kConvBatchMaxTokens) rest.push_back(i);
    else {
      take.push_back(e);
      max_channels = std::max(max_channels, e.channels);
    }
  }
  if (!one.empty()) {
    const int64_t quads = (max_one + 3) / 4, total = int64_t(one.size()) * quads;
    if (total > 0x7fffff00) {  // (beyond any real batch) the general kernel
      take.insert(take.end(), one.begin(), one.end());
      max_channels = std::max(max_channels, max_one);
    } else {
      launch_conv_one(one.data(), one.size(), quads, one_kw, host, nullptr, 0);
    }
  }
  if (take.empty()) return;
  const int64_t channel_blocks = (max_channels + kConvBatchThreads - 1) / kConvBatchThreads;
  const int64_t blocks = int64_t(take.size()) * channel_blocks;
  check(blocks <= 0x7fffffff, "causal_conv_silu_batch: too many blocks");
  const auto* d = static_cast<const ConvArgs*>(host.stage(take.data(), take.size() * sizeof(ConvArgs)));
  conv_silu_batch_kernel<<<unsigned(blocks), kConvBatchThreads, 0, host.stream>>>(d, channel_blocks);
  HYMBA_CUDA_LAUNCHED("conv_silu_batch");
}

bool conv_silu_one_packed(const ConvArgs* a, int count, const BatchHost& host, uint16_t* packed, int64_t ldp) {
  if (count <= 0) return false;
  const int kw = a[0].k_width;
  const int64_t C = a[0].channels;
  if (kw < 1 || kw > 4 || C <= 0 || C > ldp) return false;
  for (int i = 0; i < count; ++i)
    if (a[i].n != 1 || a[i].k_width != kw || a[i].channels != C) return false;
  const int64_t quads = (C + 3) / 4;
  if (int64_t(count) * quads > 0x7fffff00) return false;
  launch_conv_one(a, size_t(count), quads, kw, host, packed, ldp);
  return true;
}

void selective_scan_batch(const ScanArgs* a, int count, const BatchHost& host, std::vector<int>& rest) {
  std::vector<ScanArgs> take;
  int64_t max_channels = 0, max_state = 0;
  for (int i = 0; i < count; ++i) {
    const ScanArgs& e = a[i];
    if (e.d_state < 1 || e.d_state > kLanes * kMaxK) rest.push_back(i);  // the single op reports it
    else if (e.n <= 0 || e.channels <= 0) continue;  // nothing to do (as the single op)
    else {
      take.push_back(e);
      max_channels = std::max(max_channels, e.channels);
      max_state = std::max(max_state, e.d_state);
    }
  }
  if (take.empty()) return;
  // Decode-sized entries with d_state <= 16 (the model's): one lane per
  // state, several channels per thread (scan_step_batch_kernel).
  int64_t max_n = 0;
  for (const ScanArgs& e : take) max_n = std::max(max_n, e.n);
  const int64_t step_blocks = (max_channels + kStepItems * kChannels - 1) / (kStepItems * kChannels);
  if (max_state <= kLanes && max_n <= kCkMinLen && take.size() <= 65535 && step_blocks <= 0x7fffffff) {
    const auto* d = static_cast<const ScanArgs*>(host.stage(take.data(), take.size() * sizeof(ScanArgs)));
    scan_step_batch_kernel<<<dim3(unsigned(step_blocks), unsigned(take.size())), kScanThreads, 0, host.stream>>>(d);
    HYMBA_CUDA_LAUNCHED("selective_scan_batch (decode)");
    return;
  }
  const int64_t channel_blocks = (max_channels + kChannels - 1) / kChannels;
  const int64_t blocks = int64_t(take.size()) * channel_blocks;
  check(blocks <= 0x7fffffff, "selective_scan_batch: too many blocks");
  const size_t smem = sizeof(float) * size_t(2 * kChunk * max_state + 3 * kChunk * kChannels);
  const auto* d = static_cast<const ScanArgs*>(host.stage(take.data(), take.size() * sizeof(ScanArgs)));
  selective_scan_batch_kernel<<<unsigned(blocks), kScanThreads, smem, host.stream>>>(d, channel_blocks);
  HYMBA_CUDA_LAUNCHED("selective_scan_batch");
}

// normed_scan_batch_kernel's dynamic shared memory for `entries` entries of rank R.
size_t nsb_norm_bytes(int entries, int64_t R) {
  return size_t(entries) * size_t((R + 15) / 16 * 16 + 2 * kNsbMaxState) * sizeof(float);
}

// Resident blocks per SM of a normed_scan_batch_kernel instantiation at
// its largest dynamic shared memory (opted in here; asked once per kernel;
// 1 if the runtime cannot tell).
using NsbKernel = void (*)(const NormedScanEntry*, NormedScanShared, int);
int nsb_blocks_per_sm(NsbKernel k) {
  static std::mutex mu;
  static std::vector<std::pair<NsbKernel, int>> known;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& [kk, b] : known)
    if (kk == k) return b;
  const size_t smem = nsb_norm_bytes(kNsbMaxBlockEntries, kNsbMaxRank);
  HYMBA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int b = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, k, kNsbThreads, smem) != cudaSuccess) {
    (void)cudaGetLastError();
    b = 0;
  }
  known.emplace_back(k, b > 0 ? b : 1);
  return known.back().second;
}

void normed_selective_scan_batch(const ScanArgs* a, int count, const ScanInputNorms& in, const BatchHost& host,
                                 std::vector<int>& rest) {
  const int64_t R = in.dt_proj.cols;
  const DType wt = in.dt_proj.dtype;
  const bool shape_ok = R >= 1 && R <= kNsbMaxRank && in.dt_proj.rows >= 1 && in.dt_proj.rows <= 0x7fffffff &&
                        (in.dt_proj.rows + kNsbChannels - 1) / kNsbChannels <= 65535 &&
                        (wt == DType::F32 || wt == DType::BF16 || wt == DType::F16);
  std::vector<NormedScanEntry> take;
  const ScanArgs* first = nullptr;
  bool vec = true;
  int64_t row = 0;  // the entry's first row of in.dt_raw
  for (int i = 0; i < count; ++i) {
    const ScanArgs& e = a[i];
    if (e.n <= 0) continue;  // nothing to do (as the single op)
    const int64_t r = row;
    row += e.n;
    // One token, the model's shapes, and the first taken entry's parameters
    // (the kernel loads them once per block for all its entries).
    const bool ok = shape_ok && e.n == 1 && e.channels == in.dt_proj.rows && e.d_state >= 1 &&
                    e.d_state <= kNsbMaxState &&
                    (!first || (e.A == first->A && e.D == first->D && e.dt_bias == first->dt_bias &&
                                e.d_state == first->d_state));
    if (!ok) {
      rest.push_back(i);
      continue;
    }
    if (!first) first = &e;
    take.push_back(NormedScanEntry{in.dt_raw + r * in.ld_dt, e.B, e.C, e.u, e.z, e.state, e.y});
    vec = vec && (reinterpret_cast<uintptr_t>(e.state) & 15) == 0;
  }
  if (take.empty()) return;
  vec = vec && first->d_state == kNsbMaxState && (reinterpret_cast<uintptr_t>(first->A) & 15) == 0;
  const auto* d = static_cast<const NormedScanEntry*>(host.stage(take.data(), take.size() * sizeof(NormedScanEntry)));
  const size_t wbytes = wt == DType::F32 ? 4 : 2;
  const bool w_vec = R % 4 == 0 && reinterpret_cast<uintptr_t>(in.dt_proj.data) % (4 * wbytes) == 0;
  const NormedScanShared p{in.dt_proj.data, in.dt_norm_w, in.B_norm_w, in.C_norm_w, first->dt_bias, first->A,
                           first->D, int(first->channels), int(first->d_state), int(R), int(take.size()), in.eps,
                           w_vec};
  // Entries per block: about one wave of blocks (at the kernel's occupancy).
  const int64_t cblocks = (first->channels + kNsbChannels - 1) / kNsbChannels;
  const int64_t groups = (int64_t(take.size()) + kNsbEntries - 1) / kNsbEntries;
  auto launch = [&](NsbKernel kernel) {
    const int64_t resident = std::max<int64_t>(1, int64_t(host.sm_count) * nsb_blocks_per_sm(kernel));
    const int per_block =
        int(std::clamp<int64_t>((groups * cblocks + resident - 1) / resident, 1, kNsbMaxGroups)) * kNsbEntries;
    const dim3 grid(unsigned((int64_t(take.size()) + per_block - 1) / per_block), unsigned(cblocks));
    launch_pdl("normed_scan_batch", kernel, grid, dim3(kNsbThreads), nsb_norm_bytes(per_block, R), host.stream, d, p,
               per_block);
  };
  if (wt == DType::F32) vec ? launch(normed_scan_batch_kernel<DType::F32, true>)
                            : launch(normed_scan_batch_kernel<DType::F32, false>);
  else if (wt == DType::BF16) vec ? launch(normed_scan_batch_kernel<DType::BF16, true>)
                                  : launch(normed_scan_batch_kernel<DType::BF16, false>);
  else vec ? launch(normed_scan_batch_kernel<DType::F16, true>) : launch(normed_scan_batch_kernel<DType::F16, false>);
  HYMBA_CUDA_LAUNCHED("normed_scan_batch");
}

}  // namespace hymba::cuda
