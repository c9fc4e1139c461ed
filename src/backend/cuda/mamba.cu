// The Mamba-head ops: depthwise causal conv + SiLU, and the selective scan.
#include <algorithm>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.cuh"

namespace hymba::cuda {

namespace {

// ---------------------------------------------------------------- conv
// One thread per (token, channel): every output is independent once the
// history (state) is known, so prefill is fully parallel. Products are
// summed tap by tap without FMA contraction, in the CPU kernel's order.
__global__ void conv_silu_kernel(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                                 const float* bias, int k_width, const float* state, float* y, int64_t ldy) {
  const int hist = k_width - 1;
  const int64_t total = n * channels;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / channels, c = i % channels;
    float acc = bias[c];
    for (int k = 0; k < k_width; ++k) {
      const int64_t tau = t - hist + k;  // negative: an input from before this chunk (the state)
      const float in = tau >= 0 ? x[tau * ldx + c] : state[(tau + hist) * channels + c];
      acc = __fadd_rn(acc, __fmul_rn(weight[int64_t(k) * channels + c], in));
    }
    y[t * ldy + c] = silu_f(acc);
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

__global__ void conv_silu_batch_kernel(const ConvArgs* entries, int64_t channel_blocks) {
  const ConvArgs a = entries[blockIdx.x / channel_blocks];
  const int64_t c = (blockIdx.x % channel_blocks) * kConvBatchThreads + threadIdx.x;
  if (c >= a.channels) return;
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

// ---------------------------------------------------------------- scan
// Channel-parallel, sequential over time (the recurrence). A block holds
// kChannels channels x kLanes threads; a thread owns states s = lane,
// lane + 16, ... of its channel in registers (d_state <= 16 * kMaxK), and the
// kLanes threads of a channel sum C.h with shuffles. Inputs are staged in
// shared memory kChunk time steps at a time, so the loop over time reads no
// global memory: the loads of a chunk are issued together and overlap.
constexpr int kLanes = 16;
constexpr int kChannels = 16;
constexpr int kScanThreads = kLanes * kChannels;
constexpr int kMaxK = 16;
constexpr int kChunk = 16;

__device__ __forceinline__ float softplus_f(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

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
  const int nk = int((N + kLanes - 1) / kLanes);

  float h[kMaxK], A[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int64_t s = lane + int64_t(k) * kLanes;
    const bool ok = live && k < nk && s < N;
    h[k] = ok ? a.state[c * N + s] : 0.0f;
    A[k] = ok ? a.A[c * N + s] : 0.0f;
  }
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
      const float du = dt * u;
      float part = 0.0f;
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) {
        const int64_t s = lane + int64_t(k) * kLanes;
        if (k < nk && s < N) {
          h[k] = expf(dt * A[k]) * h[k] + du * sB[tt * N + s];
          part += sC[tt * N + s] * h[k];
        }
      }
      // Sum over the channel's kLanes threads (aligned groups of 16 lanes).
      for (int o = kLanes / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o, kLanes);
      if (lane == 0 && live) a.y[(t0 + tt) * a.ldy + c] = (part + D * u) * silu_f(sZ[tt * kChannels + cl]);
    }
  }
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int64_t s = lane + int64_t(k) * kLanes;
    if (live && k < nk && s < N) a.state[c * N + s] = h[k];
  }
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

}  // namespace

void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                      const float* bias, int k_width, float* state, float* y, int64_t ldy, cudaStream_t stream) {
  check(k_width >= 1, "causal_conv_silu: k_width must be at least 1 (got ", k_width, ")");
  if (n <= 0 || channels <= 0) return;
  conv_silu_kernel<<<blocks_for(n * channels, 256), 256, 0, stream>>>(x, n, ldx, channels, weight, bias, k_width,
                                                                       state, y, ldy);
  HYMBA_CUDA_LAUNCHED("conv_silu");
  if (k_width > 1) {
    conv_state_kernel<<<blocks_for(channels, 256), 256, 0, stream>>>(x, n, ldx, channels, k_width - 1, state);
    HYMBA_CUDA_LAUNCHED("conv_state");
  }
}

void selective_scan(const ScanArgs& a, cudaStream_t stream) {
  check(a.d_state >= 1 && a.d_state <= kLanes * kMaxK, "selective_scan: d_state ", a.d_state,
        " is outside the supported 1..", kLanes * kMaxK);
  if (a.n <= 0 || a.channels <= 0) return;
  const size_t smem = sizeof(float) * size_t(2 * kChunk * a.d_state + 3 * kChunk * kChannels);
  const int64_t blocks = (a.channels + kChannels - 1) / kChannels;
  check(blocks <= 0x7fffffff, "selective_scan: too many channels (", a.channels, ")");
  selective_scan_kernel<<<unsigned(blocks), kScanThreads, smem, stream>>>(a);
  HYMBA_CUDA_LAUNCHED("selective_scan");
}

void causal_conv_silu_batch(const ConvArgs* a, int count, const BatchHost& host, std::vector<int>& rest) {
  std::vector<ConvArgs> take;
  int64_t max_channels = 0;
  for (int i = 0; i < count; ++i) {
    const ConvArgs& e = a[i];
    if (e.k_width < 1) rest.push_back(i);  // the single op reports it
    else if (e.n <= 0 || e.channels <= 0) continue;  // nothing to do (as the single op)
    else if (e.n > kConvBatchMaxTokens) rest.push_back(i);
    else {
      take.push_back(e);
      max_channels = std::max(max_channels, e.channels);
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
  const int64_t channel_blocks = (max_channels + kChannels - 1) / kChannels;
  const int64_t blocks = int64_t(take.size()) * channel_blocks;
  check(blocks <= 0x7fffffff, "selective_scan_batch: too many blocks");
  const size_t smem = sizeof(float) * size_t(2 * kChunk * max_state + 3 * kChunk * kChannels);
  const auto* d = static_cast<const ScanArgs*>(host.stage(take.data(), take.size() * sizeof(ScanArgs)));
  selective_scan_batch_kernel<<<unsigned(blocks), kScanThreads, smem, host.stream>>>(d, channel_blocks);
  HYMBA_CUDA_LAUNCHED("selective_scan_batch");
}

}  // namespace hymba::cuda
