// Launchers of the CUDA kernels, one per op (semantics: backend/ops.h and
// backend/cpu/kernels.h). All pointers are device pointers; every launcher
// queues its work on `stream` and checks the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "backend/ops.h"

namespace hymba::cuda {

// What the batched launchers (the *_batch functions below) need from the
// backend. Each takes the entries it can run in one launch and appends the
// indices of the others to `rest`, for the caller to run one by one with the
// single-sequence op (entries with nothing to do may be in neither).
struct BatchHost {
  cudaStream_t stream = nullptr;
  int sm_count = 1;
  // A device copy of `bytes` of host memory, queued on `stream` (through
  // pinned staging): valid for work queued after it, until the next stage().
  std::function<const void*(const void* host, size_t bytes)> stage;
  // Device scratch of at least `bytes` (for partial results), valid for work
  // queued until the next scratch().
  std::function<void*(size_t bytes)> scratch;
};

// ---- elementwise.cu
void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y, int64_t ldy,
             cudaStream_t stream);
void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* cos_out, float* sin_out,
                 cudaStream_t stream);
void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* cos_t, const float* sin_t,
          cudaStream_t stream);
void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t n, int64_t d, float* out,
              int64_t ldo, cudaStream_t stream);
void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d, cudaStream_t stream);
// ids: device array of n ids, already range-checked on the host.
void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo,
                cudaStream_t stream);
void round_to(DType dt, float* x, int64_t n, int64_t d, int64_t ldx, cudaStream_t stream);
void store_rows(const float* src, int64_t lds, int64_t n, int64_t d, DType dt, void* dst, int64_t ldd,
                cudaStream_t stream);
// dst[i] = src[i] as fp32 for count elements of type dt.
void widen_to_f32(const void* src, DType dt, int64_t count, float* dst, cudaStream_t stream);
// y[t, 0:d] = 0 for n rows (a matmul with no input features).
void zero_rows(float* y, int64_t n, int64_t d, int64_t ldy, cudaStream_t stream);

// ---- mamba.cu
void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                      const float* bias, int k_width, float* state, float* y, int64_t ldy, cudaStream_t stream);
void selective_scan(const ScanArgs& a, cudaStream_t stream);
// Batched: one launch over (entry, channel block). Every entry has its own
// pointers, sizes and state; conv takes entries of up to 64 tokens.
void causal_conv_silu_batch(const ConvArgs* a, int count, const BatchHost& host, std::vector<int>& rest);
void selective_scan_batch(const ScanArgs* a, int count, const BatchHost& host, std::vector<int>& rest);

// ---- attention.cu
// Scratch the split-key path needs for its partial softmax states, in bytes
// (0 when the launch needs none); `splits` is chosen by attention_splits.
int attention_splits(const AttentionArgs& a, int sm_count);
size_t attention_scratch_bytes(const AttentionArgs& a, int splits);
void attention(const AttentionArgs& a, int splits, void* scratch, cudaStream_t stream);
// Batched decode: the entries with n_q == 1, head_dim_v <= 128, at most 8
// segments and the heads/dims of the first such entry, in one launch over
// (entry, kv head, key split) plus a merge of the splits.
void attention_batch(const AttentionArgs* a, int count, const BatchHost& host, std::vector<int>& rest);

}  // namespace hymba::cuda
