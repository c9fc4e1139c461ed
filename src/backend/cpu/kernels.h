// CPU implementations of the op contract (backend/ops.h). Multithreaded with
// OpenMP; the thread count is whatever omp_set_num_threads last set.
#pragma once

#include <cstdint>

#include "backend/ops.h"

namespace hymba::cpu {

// y[t, r] (+)= sum_c W[r, c] * x[t, c] for t < n, r < W.rows.
// Numerics by weight dtype: F32 -> fp32 products; BF16 -> x is rounded to
// bf16 (as a bf16 model computes), products accumulated in fp32; F16 -> W
// widened to fp32 in registers. Weights are never widened in memory.
void matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
            bool accumulate);

// y[t,:] = x[t,:] / sqrt(mean(x[t,:]^2) + eps) * w   (w has d elements, fp32).
void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y,
             int64_t ldy);

// Rotary embedding tables for n positions pos0..: cos/sin [n, half] of the
// fp32 angle (float)pos * inv_freq[i], as the reference computes them.
void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* cos_out,
                 float* sin_out);

// Rotary embedding, non-interleaved ("rotate_half") layout, in place, for n
// tokens, n_heads heads of head_dim (= 2*half) each, with tables from rope_tables.
void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* cos_t,
          const float* sin_t);

void attention(const AttentionArgs& a);

// Depthwise causal conv over time with bias, then SiLU.
// weight [k_width, channels], tap-major (the checkpoint's [channels, 1, k_width]
// transposed once at load, so the channel loop reads taps contiguously);
// tap k_width-1 multiplies the current token.
// state [k_width-1, channels]: the previous k_width-1 inputs, oldest first;
// updated in place to the last k_width-1 inputs after this call.
void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels,
                      const float* weight, const float* bias, int k_width, float* state, float* y,
                      int64_t ldy);

void selective_scan(const ScanArgs& a);

// out[t,:] = silu(gate[t,:]) * up[t,:]
void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t n, int64_t d,
              float* out, int64_t ldo);

// a[t,:] = (a[t,:] + b[t,:]) * 0.5
void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d);

// Gathers rows of an embedding table (any dtype) into fp32 rows.
void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo);

}  // namespace hymba::cpu
