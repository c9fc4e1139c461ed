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
// out[t, 0:d] = bf16(rmsnorm(a[t]; wa)), or with b given
// bf16((rmsnorm(a[t]; wa) + rmsnorm(b[t]; wb)) / 2): bit-identical to
// rmsnorm (+ average_into) + store_rows, in one launch (a GEMM operand).
void norm_pack_bf16(const float* a, int64_t lda, const float* wa, const float* b, int64_t ldb, const float* wb,
                    int64_t n, int64_t d, float eps, uint16_t* out, int64_t ldo, cudaStream_t stream);
void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* cos_out, float* sin_out,
                 cudaStream_t stream);
void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* cos_t, const float* sin_t,
          cudaStream_t stream);
// rope_tables for n rows at positions[0..n) (a device array).
void rope_tables_at(const int64_t* positions, int64_t n, const float* inv_freq, int half, float* cos_out,
                    float* sin_out, cudaStream_t stream);
void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t n, int64_t d, float* out,
              int64_t ldo, cudaStream_t stream);
// out[t, c] = bf16(silu(g[t, c]) * u[t, c]) for bf16 g, u and out (rows of
// pitch ld, a multiple of 8 elements, 16-byte aligned; out may be g): the
// SwiGLU product as the down projection's GEMM operand.
void silu_mul_bf16(const uint16_t* g, const uint16_t* u, int64_t ld, int64_t n, int64_t d, uint16_t* out,
                   cudaStream_t stream);
void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d, cudaStream_t stream);
// ids: device array of n ids, already range-checked on the host.
void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo,
                cudaStream_t stream);
void round_to(DType dt, float* x, int64_t n, int64_t d, int64_t ldx, cudaStream_t stream);
void store_rows(const float* src, int64_t lds, int64_t n, int64_t d, DType dt, void* dst, int64_t ldd,
                cudaStream_t stream);
// Backend::prepare_qkv in one launch; false (nothing queued) for shapes it
// does not take (the caller then runs the default).
bool prepare_qkv(float* q, const float* k, const float* v, int64_t ld, int64_t n, int n_heads, int n_kv_heads,
                 int head_dim, const float* cos_t, const float* sin_t, DType round_dt, float* k_out, int64_t k_width,
                 float* v_out, int64_t v_width, cudaStream_t stream);
// store_rows for `count` descriptors in device memory in one launch;
// most_elements: the largest n * d among them.
void store_rows_batch(const StoreArgs* entries, int count, int64_t most_elements, cudaStream_t stream);
// dst[i] = src[i] as fp32 for count elements of type dt.
void widen_to_f32(const void* src, DType dt, int64_t count, float* dst, cudaStream_t stream);
// y[t, 0:d] = 0 for n rows (a matmul with no input features).
void zero_rows(float* y, int64_t n, int64_t d, int64_t ldy, cudaStream_t stream);

// ---- mamba.cu
void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                      const float* bias, int k_width, float* state, float* y, int64_t ldy, cudaStream_t stream);
// Backend::conv_silu_matmul for bf16 W of at most 136 rows, k_width 4 and
// channels a multiple of 64 (more than 4 tokens): the conv kernel writing a
// bf16 copy of its output into scratch (conv_silu_matmul_scratch_bytes,
// 16-byte aligned), then a tensor-core product; false (nothing queued)
// for other shapes.
size_t conv_silu_matmul_scratch_bytes(const ConvArgs& a);
bool conv_silu_matmul(const ConvArgs& a, const MatrixView& W, float* y2, int64_t ldy2, void* scratch,
                      cudaStream_t stream);
// The single-sequence scan. d_state <= 16: from 16 to 1279 tokens one pass
// over time (lanes own states; HYMBA_SCAN_ONEPASS=0 never, =1 at any length
// from 16), otherwise chunked-parallel over time (three launches when n is
// long enough to split, one otherwise), needing device scratch of
// selective_scan_scratch_bytes(a, sm_count) (0: none, scratch may be null);
// larger d_state: sequential over time per channel. The environment variable
// HYMBA_SCAN_CHUNK overrides the chunk length (tuning: 0/unset automatic,
// < 0 the sequential kernel, > 0 that many steps). delta_is_scratch: a.delta
// may be overwritten (normed_selective_scan's contract); the chunked scan
// then leaves dt = softplus(delta + bias) there for its second pass.
size_t selective_scan_scratch_bytes(const ScanArgs& a, int sm_count);
void selective_scan(const ScanArgs& a, int sm_count, void* scratch, cudaStream_t stream,
                    bool delta_is_scratch = false);
// The dt/B/C norms of normed_selective_scan over many tokens (prefill), one
// warp per token and one launch: rmsnorm(dt_raw; dt_norm_w) rounded to bf16
// into dtn (rows of ld_dtn >= rank, zeros past rank: dt_proj's GEMM operand,
// the bits the default's matmul would round it to), rmsnorm(B) and
// rmsnorm(C) in place (a.B, a.C). rmsnorm_kernel's arithmetic.
void scan_input_norms(const ScanArgs& a, const ScanInputNorms& in, uint16_t* dtn, int64_t ld_dtn,
                      cudaStream_t stream);
// Backend::normed_selective_scan in one launch for n <= 4 tokens (decode):
// every block normalises dt/B/C itself and computes delta for its own
// channels; a.delta, a.B, a.C and in.dt_scratch are not written. Returns
// false (nothing queued) for shapes it does not take (n > 4, rank > 128,
// d_state > 256, dt_proj rows != channels): the caller runs the default.
bool normed_selective_scan_step(const ScanArgs& a, const ScanInputNorms& in, cudaStream_t stream);
// Batched: one launch over (entry, channel block). Every entry has its own
// pointers, sizes and state; conv takes entries of up to 64 tokens (those of
// one token and one k_width <= 4, the decode step, in a launch of their own).
void causal_conv_silu_batch(const ConvArgs* a, int count, const BatchHost& host, std::vector<int>& rest);
// causal_conv_silu_batch for entries of one token, one k_width <= 4 and one
// channel count C <= ldp, also writing entry e's output rounded to bf16 into
// row e of packed (x_proj's operand, as store_rows rounds it); false, with
// nothing queued, for other entries.
bool conv_silu_one_packed(const ConvArgs* a, int count, const BatchHost& host, uint16_t* packed, int64_t ldp);
void selective_scan_batch(const ScanArgs* a, int count, const BatchHost& host, std::vector<int>& rest);
// Backend::normed_selective_scan_batch for the entries of one token with
// d_state <= 16, rank <= 128 and the first such entry's A, D and dt_bias,
// in one launch over (entry group, channel block): per entry bit-identical
// to normed_selective_scan_step for that entry alone; a.delta/B/C and
// in.dt_scratch are not written. The others (n > 1, other shapes) go to
// `rest`, for the caller's single-sequence op (entry i's dt rows start at
// row r_i of in.dt_raw, as the contract in backend.h says).
void normed_selective_scan_batch(const ScanArgs* a, int count, const ScanInputNorms& in, const BatchHost& host,
                                 std::vector<int>& rest);

// ---- attention.cu
// Scratch the split-key path needs for its partial softmax states, in bytes
// (0 when the launch needs none); `splits` is chosen by attention_splits.
// Decode (n_q == 1, group <= 8, head dims 64/128, <= 8 segments with
// 16-byte-aligned rows) runs one kernel over (key chunk, kv head) whose last
// block per kv head merges the chunks: `splits` is then its chunk count,
// chosen from a's own visible keys (not the SM count), the same cut
// attention_batch makes. The scratch starts with that kernel's counters,
// which must be zero when the scratch is new (the backend zeroes it) and
// are left zero by every launch.
int attention_splits(const AttentionArgs& a, int sm_count);
size_t attention_scratch_bytes(const AttentionArgs& a, int splits);
// Prefill (n_q >= 16) with bf16 K/V segments (fp32 segments alongside, i.e.
// the chunk, taken as bf16-exact) and head dims 64/128 runs on tensor cores:
// Q and P rounded to bf16, fp32 accumulation and softmax (attention.cu).
void attention(const AttentionArgs& a, int splits, void* scratch, cudaStream_t stream);
// For tests and benchmarks: 0 (default) picks the tensor-core kernel where it
// applies and fills the GPU, 1 never, 2 wherever it applies; and the count
// of its launches so far.
void set_attention_tc_mode(int mode);
long long attention_tc_launches();
// Head dims 64/128 on an sm_90 device with the sm_90a build take a
// warpgroup-MMA (wgmma) form of the tensor-core kernel. Mode 2 (default):
// the warp-specialised form (TMA loads, mbarriers) where every K/V segment
// suits TMA, else mode 1's; 1: the wgmma form with block barriers and
// cp.async loads; 0: the mma.sync kernel. Also HYMBA_ATTN_WGMMA=0/1/2.
// The counts of wgmma launches (either form) and of warp-specialised ones.
void set_attention_wgmma(int mode);
long long attention_wgmma_launches();
long long attention_wgmma_ws_launches();
// Batched decode: the entries the decode kernel takes (see above; the heads
// of the first such entry) in one launch of that kernel over (span of key
// chunks, kv head), each entry chunked as attention() chunks it alone, so
// its output is bit-identical alone, in any batch and through attention();
// the chunks merged in-kernel per (entry, kv head) (counters at the head of
// host.scratch, zeroed before the launch). Then the other entries with n_q
// == 1, head_dim_v <= 128, at most 8 segments and the heads/dims of the
// first of them in the general batched launch (key splits plus a merge).
void attention_batch(const AttentionArgs* a, int count, const BatchHost& host, std::vector<int>& rest);

// ---- gemv.cu
// Decode-sized products with bf16 weights (n <= kGemvMaxRows tokens) as fused
// GEMV kernels: x rounded to bf16, fp32 products and sums, the same result
// for a token whatever n is (batch invariant). Each returns false, queueing
// nothing, when it does not take the problem (not bf16, n out of range, x
// rows too long for shared memory, W not 2-byte aligned): the caller then
// runs the general path. Semantics: Backend::matmul and the fused ops'
// defaults in backend/backend.h. Up to 4 tokens: from 5 on the general path
// (cuBLASLt) is faster (H200: the decode step's products at 8 tokens 2.11
// ms against 4.23; 1K decode of 8 sequences 3.2-4.3 ms per step against
// 5.04 with the GEMV; at 5 sequences 3.05-3.09 against 3.83 alternated in
// one call, though other runs spread up to 5.08 (BENCHMARKS.md, session
// 14)), at the price of the bit-level batch invariance, which holds up to
// 4 tokens (from 5 on a sequence's tokens are the same alone and in a batch
// within the bf16 tolerance, as for every batch before).
constexpr int64_t kGemvMaxRows = 4;
// y (+)= x_bf16 W^T
bool gemv_bf16(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy, bool accumulate,
               cudaStream_t stream);
// y (+)= W rmsnorm(x; norm_w) (Backend::norm_matmul)
bool norm_gemv_bf16(const MatrixView& W, const float* x, int64_t n, int64_t ldx, const float* norm_w, float eps,
                    float* y, int64_t ldy, bool accumulate, cudaStream_t stream);
// y (+)= W ((rmsnorm(a; wa) + rmsnorm(b; wb)) / 2) (Backend::fuse_branches_matmul; a and b are only read)
bool fuse_branches_gemv_bf16(const MatrixView& W, const float* a, int64_t lda, const float* b, int64_t ldb,
                             int64_t n, const float* wa, const float* wb, float eps, float* y, int64_t ldy,
                             bool accumulate, cudaStream_t stream);
// out = silu(Wg xn) * (Wu xn), xn = rmsnorm(x; norm_w) (Backend::norm_swiglu)
bool norm_swiglu_gemv_bf16(const MatrixView& Wg, const MatrixView& Wu, const float* x, int64_t n, int64_t ldx,
                           const float* norm_w, float eps, float* out, int64_t ldo, cudaStream_t stream);
// Programmatic Dependent Launch of these kernels (sm_90+: each may start
// while the previous kernel finishes, streaming its weights before it waits
// for that kernel's results). On unless HYMBA_GEMV_PDL=0 (read once);
// set_gemv_pdl overrides it (A/B timing), gemv_pdl reports the setting.
void set_gemv_pdl(bool on);
bool gemv_pdl();

// ---- sampling.cu
// Backend::sample_tokens (backend.h) on `stream`: the host path's checks and
// messages, one block per row, waits for the tokens. scratch(bytes): device
// scratch of at least `bytes` (the per-row work arrays), valid until the next
// call.
void sample_tokens(const float* logits, int64_t rows, int64_t vocab, int64_t ld, const SampleArgs* args,
                   int32_t* out_ids, cudaStream_t stream, const std::function<void*(size_t)>& scratch);

}  // namespace hymba::cuda
