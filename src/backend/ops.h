// The op contract: every operation the Hymba forward pass needs, with exact
// semantics, independent of the model. A backend (backend/cpu, later
// backend/cuda) implements all of them; model code calls only these.
//
// Conventions: activations are row-major float matrices of n rows (tokens)
// with a leading dimension (ld*) in elements, so a column slice of a wider
// buffer (e.g. the Q part of the fused in_proj output) is passed as a pointer
// plus the wide buffer's ld. Weights are MatrixView (row-major [rows, cols],
// PyTorch nn.Linear "out x in" layout), any DType, never copied.
#pragma once

#include <cstdint>

#include "util/dtype.h"

namespace hymba {

struct MatrixView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;  // output features
  int64_t cols = 0;  // input features
};

// A run of cached keys/values at consecutive positions pos0 .. pos0+count-1.
// Row j of K is at k + j*ld_k (head-major: kv head g occupies elements
// [g*head_dim, (g+1)*head_dim)), likewise V.
struct KVSegment {
  const void* k = nullptr;
  const void* v = nullptr;
  DType dtype = DType::F32;
  int64_t ld_k = 0, ld_v = 0;
  int64_t pos0 = 0;
  int64_t count = 0;
};

// Attention of n_q queries at consecutive positions q_pos0.. over the union of
// segments. Key at position k is visible to query at position p iff
//   k <= p  and  (window < 0  or  p - k <= window  or  k < n_always_visible).
// Output head h (uses kv head h / (n_heads / n_kv_heads)) is written to
// out[t*ldo + h*head_dim_v ...]. Softmax in fp32, scores scaled by `scale`.
struct AttentionArgs {
  const float* q = nullptr;
  int64_t ldq = 0;
  int64_t n_q = 0;
  int64_t q_pos0 = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim_qk = 0, head_dim_v = 0;
  const KVSegment* segments = nullptr;
  int n_segments = 0;
  int64_t window = -1;
  int64_t n_always_visible = 0;
  float scale = 1.0f;
  float* out = nullptr;
  int64_t ldo = 0;
};

// Selective-scan inputs for n tokens of one sequence (Mamba-1, one B/C group).
//   dt[t,c]    = softplus(delta[t,c] + dt_bias[c])   (softplus(v) = v for v > 20)
//   h[c,s]     = exp(dt*A[c,s]) * h[c,s] + dt * B[t,s] * u[t,c]
//   y[t,c]     = (sum_s C[t,s] h[c,s] + D[c] u[t,c]) * silu(z[t,c])
// state is [channels, d_state] fp32, updated in place.
struct ScanArgs {
  const float* u = nullptr;      int64_t ldu = 0;
  const float* delta = nullptr;  int64_t ld_delta = 0;
  const float* B = nullptr;      int64_t ldb = 0;
  const float* C = nullptr;      int64_t ldc = 0;
  const float* z = nullptr;      int64_t ldz = 0;
  const float* dt_bias = nullptr;  // [channels]
  const float* A = nullptr;        // [channels, d_state], already -exp(A_log)
  const float* D = nullptr;        // [channels]
  float* state = nullptr;          // [channels, d_state]
  float* y = nullptr;            int64_t ldy = 0;
  int64_t n = 0, channels = 0, d_state = 0;
};

// The Mamba inputs that precede the scan, for Backend::normed_selective_scan:
//   dtn   = rmsnorm(dt_raw[t, 0:rank]; dt_norm_w)      rank = dt_proj.cols
//   delta = dt_proj dtn                                  (written to ScanArgs::delta)
//   B, C  = rmsnorm(B; B_norm_w), rmsnorm(C; C_norm_w)  (ScanArgs::B / C, in place)
struct ScanInputNorms {
  const float* dt_raw = nullptr;  int64_t ld_dt = 0;
  MatrixView dt_proj;             // [channels, rank]
  const float* dt_norm_w = nullptr;  // [rank]
  const float* B_norm_w = nullptr;   // [d_state]
  const float* C_norm_w = nullptr;   // [d_state]
  float eps = 0.0f;
  float* dt_scratch = nullptr;    // [n, rank], dense: where the default puts dtn
};

// How to pick one token from a row of logits (Backend::sample_tokens). The
// rules are runtime/sampler.h's, in its order: the repetition penalty over
// the distinct ids of `history` (l > 0: l / penalty, else l * penalty), then
// greedy when temperature == 0 (the largest logit, ties to the lowest id), or
// temperature -> top-k -> top-p -> min-p, and the token is the first
// surviving candidate, in descending logit order (ties: lower id first), at
// which the running sum of normalised probabilities exceeds u.
struct SampleArgs {
  float temperature = 0.0f;     // 0 = greedy
  int top_k = 0;                // 0 = off
  float top_p = 1.0f;           // 1 = off
  float min_p = 0.0f;           // 0 = off
  float repeat_penalty = 1.0f;  // 1 = off
  const int32_t* history = nullptr;  // host memory: ids the penalty applies to (repeats allowed)
  int64_t n_history = 0;
  double u = 0.0;               // uniform in [0, 1), drawn by the caller
};

// One Backend::store_rows call (for store_rows_batch): n rows of d values
// from src (fp32, leading dimension lds) converted to dt into dst (leading
// dimension ldd, in elements).
struct StoreArgs {
  const float* src = nullptr;  int64_t lds = 0;
  int64_t n = 0, d = 0;
  DType dt = DType::F32;
  void* dst = nullptr;         int64_t ldd = 0;
};

// Depthwise causal conv + SiLU of n tokens of one sequence (see
// Backend::causal_conv_silu for the exact semantics of each field).
struct ConvArgs {
  const float* x = nullptr;  int64_t ldx = 0;
  int64_t n = 0, channels = 0;
  const float* weight = nullptr;  // [k_width, channels], tap-major
  const float* bias = nullptr;    // [channels]
  int k_width = 0;
  float* state = nullptr;         // [k_width-1, channels], updated in place
  float* y = nullptr;        int64_t ldy = 0;
};

}  // namespace hymba
