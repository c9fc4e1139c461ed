// CudaBackend: the Backend interface (backend/backend.h) on one CUDA device.
// All work goes to one stream the backend owns, so ops run in call order
// and asynchronously to the host; download() and synchronize() wait.
// Memory is plain cudaMalloc (never managed memory). Matrix products of up
// to 4 tokens with bf16 weights (decode) run the GEMV kernels of gemv.cu,
// wider ones cuBLASLt; every other op is a kernel of kernels.cuh.
#include "backend/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.cuh"
#include "util/error.h"

namespace hymba {

namespace {

using cuda::check_cuda;

void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt error in ", what, ": ", cublasLtGetStatusString(s), " (", int(s), ")");
}
#define HYMBA_CUBLAS_CHECK(call) check_cublas((call), #call)

// Largest power of two (up to 256) dividing both the address and the row
// pitch: what cuBLASLt may assume about every column of the operand.
uint32_t alignment_of(const void* p, int64_t ld_bytes) {
  const uint64_t v = uint64_t(reinterpret_cast<uintptr_t>(p)) | uint64_t(ld_bytes) | 256u;
  return uint32_t(v & (~v + 1));
}

// A cached cuBLASLt plan: descriptors and the heuristic's algorithm for one
// problem shape (decode calls the same few shapes every token).
struct GemmPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};
using GemmKey = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t, uint32_t, uint32_t>;

class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    check(cuda_device_present(), "CUDA backend: no usable CUDA device");
    HYMBA_CUDA_CHECK(cudaGetDevice(&device_));
    HYMBA_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_));
    // The main stream at the highest priority, the side stream (attention
    // beside the Mamba branch) at the default: where both have blocks
    // waiting, the main line's short kernels go first and the long
    // attention grid fills the SMs behind them (H100, 128 x 8K batched
    // decode, alternated: 11.76 -> 11.38 ms per step; batch-1 unchanged).
    int least = 0, greatest = 0;
    HYMBA_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    HYMBA_CUDA_CHECK(cudaStreamCreateWithPriority(&main_stream_, cudaStreamNonBlocking, greatest));
    stream_ = main_stream_;
    HYMBA_CUBLAS_CHECK(cublasLtCreate(&lt_));
    workspace_bytes_ = 32u << 20;  // cuBLAS' recommendation for Hopper
    HYMBA_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
  }

  ~CudaBackend() override {
    drain_streams();
    for (cudaGraphExec_t g : graphs_) cudaGraphExecDestroy(g);
    for (void* p : retired_scratch_) cudaFree(p);
    for (auto& [k, p] : plans_) {
      if (!p.op) continue;
      cublasLtMatmulDescDestroy(p.op);
      cublasLtMatrixLayoutDestroy(p.a);
      cublasLtMatrixLayoutDestroy(p.b);
      cublasLtMatrixLayoutDestroy(p.c);
    }
    for (void* p : resident_allocs_) cudaFree(p);
    for (auto& s : scratch_) cudaFree(s.ptr);
    for (auto& s : staging_) {
      if (s.host) cudaFreeHost(s.host);
      if (s.done) cudaEventDestroy(s.done);
    }
    cudaFree(workspace_);
    cublasLtDestroy(lt_);
    for (cudaEvent_t e : join_evs_) cudaEventDestroy(e);
    if (side_stream_) {
      cudaEventDestroy(fork_ev_);
      cudaStreamDestroy(side_stream_);
    }
    cudaStreamDestroy(main_stream_);
  }

  std::string name() const override { return "cuda"; }
  // Prefill chunks as long as the model's context: fewer launches, larger
  // GEMMs, and attention grids of several waves (H100, 8K prompt: 64K tok/s
  // with 2048-token chunks, 74K with 8192). The workspace grows only as far
  // as a prompt needs (~210 KB per token at the 1.5B shapes, a third of it
  // the K/V of every KV-owning layer until the chunk is committed).
  int64_t preferred_chunk() const override { return 8192; }

  // ---- memory
  void* allocate(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 256));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      fail("CUDA backend: cudaMalloc of ", bytes, " bytes failed: ", cudaGetErrorString(e));
    }
    HYMBA_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
    return p;
  }
  void release(void* p) noexcept override {
    if (!p) return;
    // Work queued on the streams may still use p: cudaFree waits for the
    // device, but only after the streams have been drained is that certain.
    drain_streams();
    cudaFree(p);
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes) HYMBA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes) HYMBA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    HYMBA_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) HYMBA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  void fill_zero(void* dst, size_t bytes) override {
    if (bytes) HYMBA_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream_));
  }
  const void* resident(const void* host, size_t bytes) override {
    std::lock_guard<std::mutex> lock(resident_mutex_);
    auto it = resident_.find(host);
    if (it != resident_.end() && it->second.second == bytes) return it->second.first;  // already uploaded
    void* p = allocate(bytes);
    resident_allocs_.push_back(p);
    upload(p, host, bytes);
    // The host copy may go away as soon as this returns (pageable memory is
    // staged by the copy, but be certain): wait for the upload.
    HYMBA_CUDA_CHECK(cudaStreamSynchronize(stream_));
    resident_[host] = {p, bytes};  // (an earlier copy of another size stays alive in resident_allocs_)
    return p;
  }
  void resident_adjacent(const void* const* hosts, const size_t* bytes, int count, const void** out) override {
    if (count <= 0) return;
    std::lock_guard<std::mutex> lock(resident_mutex_);
    size_t total = 0;
    std::vector<size_t> offset(static_cast<size_t>(count));
    for (int i = 0; i < count; ++i) offset[size_t(i)] = total, total += (bytes[i] + 15) / 16 * 16;
    auto* base = static_cast<char*>(allocate(total));
    resident_allocs_.push_back(base);
    for (int i = 0; i < count; ++i) {
      upload(base + offset[size_t(i)], hosts[i], bytes[i]);
      out[i] = base + offset[size_t(i)];
    }
    HYMBA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // (as resident: the host copies may go away)
  }
  void synchronize() override {
    side_join();
    HYMBA_CUDA_CHECK(cudaStreamSynchronize(main_stream_));
  }

  // The side branch runs on a second stream: it starts after an event
  // recorded on the main stream, side_end records the key's join event on
  // the side stream, and side_join has the main stream wait for it (inside a
  // recording: as an external event wait node, which a replay resolves to
  // the event's latest record, i.e. the branch issued just before). Scratch
  // has one set of buffers per stream (scratch_at), so the two never share
  // a buffer.
  void side_begin(int key) override {
    if (on_side_ || key < 0) return;
    if (!side_stream_) {
      HYMBA_CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
      HYMBA_CUDA_CHECK(cudaEventCreateWithFlags(&fork_ev_, cudaEventDisableTiming));
    }
    while (int(join_evs_.size()) <= key) {
      cudaEvent_t e = nullptr;
      HYMBA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      join_evs_.push_back(e);
    }
    HYMBA_CUDA_CHECK(cudaEventRecord(fork_ev_, main_stream_));
    HYMBA_CUDA_CHECK(cudaStreamWaitEvent(side_stream_, fork_ev_, 0));
    stream_ = side_stream_;
    on_side_ = true;
    side_key_ = key;
  }
  void side_end() override {
    if (!on_side_) return;
    HYMBA_CUDA_CHECK(cudaEventRecord(join_evs_[size_t(side_key_)], side_stream_));
    stream_ = main_stream_;
    on_side_ = false;
    side_pending_ = true;
  }
  void side_join() override {
    side_end();
    if (!side_pending_) return;
    side_pending_ = false;
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    HYMBA_CUDA_CHECK(cudaStreamIsCapturing(main_stream_, &cap));
    HYMBA_CUDA_CHECK(cudaStreamWaitEvent(main_stream_, join_evs_[size_t(side_key_)],
                                         cap == cudaStreamCaptureStatusActive ? cudaEventWaitExternal : 0));
  }

  // Recordings are CUDA graphs captured from this backend's stream.
  bool can_record() const override { return true; }
  void begin_recording() override {
    HYMBA_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  }
  int end_recording() override {
    cudaGraph_t graph = nullptr;
    HYMBA_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t st = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    HYMBA_CUDA_CHECK(st);
    graphs_.push_back(exec);
    return int(graphs_.size()) - 1;
  }
  void replay(int recording) override {
    check(recording >= 0 && size_t(recording) < graphs_.size(), "no recording ", recording);
    HYMBA_CUDA_CHECK(cudaGraphLaunch(graphs_[size_t(recording)], stream_));
  }
  void drop_recordings() override {
    if (graphs_.empty() && retired_scratch_.empty()) return;
    HYMBA_CUDA_CHECK(cudaStreamSynchronize(stream_));
    for (cudaGraphExec_t g : graphs_) cudaGraphExecDestroy(g);
    graphs_.clear();
    for (void* p : retired_scratch_) cudaFree(p);
    retired_scratch_.clear();
  }

  // ---- ops
  void matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
              bool accumulate) override;

  void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y,
               int64_t ldy) override {
    cuda::rmsnorm(x, n, d, ldx, w, eps, y, ldy, stream_);
  }
  void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* c, float* s) override {
    cuda::rope_tables(pos0, n, inv_freq, half, c, s, stream_);
  }
  void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* c, const float* s) override {
    cuda::rope(x, n, ldx, n_heads, head_dim, c, s, stream_);
  }
  void attention(const AttentionArgs& a) override {
    const int splits = cuda::attention_splits(a, sm_count_);
    void* scratch = scratch_at(kScratchAttention, cuda::attention_scratch_bytes(a, splits));
    cuda::attention(a, splits, scratch, stream_);
  }
  void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                        const float* bias, int k_width, float* state, float* y, int64_t ldy) override {
    cuda::causal_conv_silu(x, n, ldx, channels, weight, bias, k_width, state, y, ldy, stream_);
  }
  void conv_silu_matmul(const ConvArgs& a, const MatrixView& W, float* y2, int64_t ldy2) override {
    // Beyond decode sizes: the conv kernel writes the product's bf16 operand
    // too, and a tensor-core kernel made for x_proj's few rows replaces
    // cuBLASLt; decode sizes: the conv kernel and the GEMV.
    if (a.n > cuda::kGemvMaxRows &&
        cuda::conv_silu_matmul(a, W, y2, ldy2, scratch_at(kScratchX, cuda::conv_silu_matmul_scratch_bytes(a)),
                               stream_))
      return;
    Backend::conv_silu_matmul(a, W, y2, ldy2);
  }
  void selective_scan(const ScanArgs& a) override { run_scan(a, false); }
  // delta_is_scratch: a.delta may be overwritten (normed_selective_scan).
  void run_scan(const ScanArgs& a, bool delta_is_scratch) {
    // The chunked scan's carries (prefill only: short scans need none, so
    // recorded decode steps never grow scratch).
    void* scratch = scratch_at(kScratchBatchPartial, cuda::selective_scan_scratch_bytes(a, sm_count_));
    cuda::selective_scan(a, sm_count_, scratch, stream_, delta_is_scratch);
  }

  // ---- fused ops (backend.h): one kernel each where the kernels take the
  // shape (small n: decode), else the primitives as the defaults compose them.
  void norm_matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, const float* norm_w, float eps,
                   float* scratch, float* y, int64_t ldy, bool accumulate) override {
    if (n <= cuda::kGemvMaxRows &&
        cuda::norm_gemv_bf16(W, x, n, ldx, norm_w, eps, y, ldy, accumulate, stream_))
      return;
    if (W.dtype == DType::BF16 && n > 0 && W.rows > 0 && W.cols > 0) {  // prefill / batches: norm into the operand
      int64_t ld_b = 0;
      const void* b = norm_packed(x, ldx, norm_w, nullptr, 0, nullptr, n, W.cols, eps, ld_b);
      gemm(W, b, ld_b, n, y, ldy, accumulate);
      return;
    }
    Backend::norm_matmul(W, x, n, ldx, norm_w, eps, scratch, y, ldy, accumulate);
  }
  void fuse_branches_matmul(const MatrixView& W, float* a, int64_t lda, float* b, int64_t ldb, int64_t n,
                            const float* wa, const float* wb, float eps, float* y, int64_t ldy,
                            bool accumulate) override {
    // The fused kernel only reads a and b (the contract lets them hold anything afterwards).
    if (n <= cuda::kGemvMaxRows &&
        cuda::fuse_branches_gemv_bf16(W, a, lda, b, ldb, n, wa, wb, eps, y, ldy, accumulate, stream_))
      return;
    if (W.dtype == DType::BF16 && n > 0 && W.rows > 0 && W.cols > 0) {
      int64_t ld_p = 0;
      const void* p = norm_packed(a, lda, wa, b, ldb, wb, n, W.cols, eps, ld_p);
      gemm(W, p, ld_p, n, y, ldy, accumulate);
      return;
    }
    Backend::fuse_branches_matmul(W, a, lda, b, ldb, n, wa, wb, eps, y, ldy, accumulate);
  }
  void norm_swiglu(const MatrixView& Wg, const MatrixView& Wu, const float* x, int64_t n, int64_t ldx,
                   const float* norm_w, float eps, float* scratch_norm, float* scratch_up, float* out,
                   int64_t ldo) override {
    if (n <= cuda::kGemvMaxRows &&
        cuda::norm_swiglu_gemv_bf16(Wg, Wu, x, n, ldx, norm_w, eps, out, ldo, stream_))
      return;
    if (Wg.dtype == DType::BF16 && Wu.dtype == DType::BF16 && Wg.cols == Wu.cols && Wg.rows == Wu.rows && n > 0 &&
        Wg.rows > 0 && Wg.cols > 0) {  // one packed operand for both products
      int64_t ld_b = 0;
      const void* b = norm_packed(x, ldx, norm_w, nullptr, 0, nullptr, n, Wg.cols, eps, ld_b);
      gemm(Wg, b, ld_b, n, out, ldo, false);
      gemm(Wu, b, ld_b, n, scratch_up, Wu.rows, false);
      silu_mul(out, ldo, scratch_up, Wu.rows, n, Wg.rows, out, ldo);
      return;
    }
    Backend::norm_swiglu(Wg, Wu, x, n, ldx, norm_w, eps, scratch_norm, scratch_up, out, ldo);
  }
  // Many tokens with bf16 weights: the two products in bf16 (half the bytes
  // of fp32 tensors written and read back), their SiLU product straight into
  // the down projection's bf16 operand, then one accumulating GEMM.
  // Decode-sized n: the default (the fused GEMVs keep the products fp32).
  void mlp_residual(const MatrixView& Wg, const MatrixView& Wu, const MatrixView& Wd, const float* x, int64_t n,
                    int64_t ldx, const float* norm_w, float eps, float* scratch_norm, float* scratch_up,
                    float* scratch_act, float* y, int64_t ldy) override {
    const int64_t I = Wg.rows;
    const bool bf16 = Wg.dtype == DType::BF16 && Wu.dtype == DType::BF16 && Wd.dtype == DType::BF16;
    if (n > cuda::kGemvMaxRows && bf16 && Wu.rows == I && Wu.cols == Wg.cols && Wd.cols == I && I > 0 &&
        Wg.cols > 0 && Wd.rows > 0) {
      int64_t ld_b = 0;
      const void* b = norm_packed(x, ldx, norm_w, nullptr, 0, nullptr, n, Wg.cols, eps, ld_b);
      // Gate and up back to back (resident_adjacent): one product of 2I
      // rows, gate in the first I columns of each output row, up after
      // (I % 8 == 0: silu_mul's 8-value groups then stay inside each half).
      const int64_t cols = Wg.cols;
      if (I % 8 == 0 && static_cast<const char*>(Wu.data) == static_cast<const char*>(Wg.data) + I * cols * 2) {
        const int64_t ld2 = (2 * I + 7) / 8 * 8;
        auto* gu = static_cast<uint16_t*>(scratch_at(kScratchMlp, size_t(n * ld2) * 2));
        if (gemm_to_bf16({Wg.data, DType::BF16, 2 * I, cols}, b, ld_b, n, gu, ld2)) {
          cuda::silu_mul_bf16(gu, gu + I, ld2, n, I, gu, stream_);
          gemm(Wd, gu, ld2, n, y, ldy, true);
          return;
        }
      }
      const int64_t ld = (I + 7) / 8 * 8;
      auto* g = static_cast<uint16_t*>(scratch_at(kScratchMlp, size_t(2 * n * ld) * 2));
      uint16_t* u = g + n * ld;
      if (gemm_to_bf16(Wg, b, ld_b, n, g, ld) && gemm_to_bf16(Wu, b, ld_b, n, u, ld)) {
        cuda::silu_mul_bf16(g, u, ld, n, I, g, stream_);
        gemm(Wd, g, ld, n, y, ldy, true);
        return;
      }
    }
    Backend::mlp_residual(Wg, Wu, Wd, x, n, ldx, norm_w, eps, scratch_norm, scratch_up, scratch_act, y, ldy);
  }
  void prepare_qkv(float* q, const float* k, const float* v, int64_t ld, int64_t n, int n_heads, int n_kv_heads,
                   int head_dim, const float* cos_t, const float* sin_t, DType round_dt, float* k_out,
                   int64_t k_width, float* v_out, int64_t v_width) override {
    if (!cuda::prepare_qkv(q, k, v, ld, n, n_heads, n_kv_heads, head_dim, cos_t, sin_t, round_dt, k_out, k_width,
                           v_out, v_width, stream_))
      Backend::prepare_qkv(q, k, v, ld, n, n_heads, n_kv_heads, head_dim, cos_t, sin_t, round_dt, k_out, k_width,
                           v_out, v_width);
  }
  void normed_selective_scan(const ScanArgs& a, const ScanInputNorms& in) override {
    if (cuda::normed_selective_scan_step(a, in, stream_)) return;
    const MatrixView& W = in.dt_proj;
    if (W.dtype == DType::BF16 && a.n > 0 && W.rows == a.channels && W.cols > 0) {
      // More tokens than the fused step takes (prefill): the three norms in
      // one launch, dt's straight into dt_proj's bf16 operand, then dt_proj
      // on a copy of its weights with 16-byte rows (rank 100: rows of 200
      // bytes get cuBLASLt's slow 4-byte-aligned kernels), then the scan.
      const int64_t ld = (W.cols + 7) / 8 * 8;
      auto* dtn = static_cast<uint16_t*>(scratch_at(kScratchX, size_t(a.n) * size_t(ld) * 2));
      cuda::scan_input_norms(a, in, dtn, ld, stream_);
      gemm(rows_padded(W), dtn, ld, a.n, const_cast<float*>(a.delta), a.ld_delta, false);
      run_scan(a, true);
      return;
    }
    Backend::normed_selective_scan(a, in);
  }
  void sample_tokens(const float* logits, int64_t rows, int64_t vocab, int64_t ld, const SampleArgs* args,
                     int32_t* out_ids) override {
    cuda::sample_tokens(logits, rows, vocab, ld, args, out_ids, stream_,
                        [this](size_t bytes) { return scratch_at(kScratchSample, bytes); });
  }

  // Batched: one launch for the entries the kernels take (cuda::*_batch),
  // the others (unusual shapes) one by one as the default does.
  void attention_batch(const AttentionArgs* a, int count) override {
    if (count <= 0) return;
    std::vector<int> rest;
    cuda::attention_batch(a, count, batch_host(), rest);
    for (int i : rest) attention(a[i]);
  }
  // Batches of one-token entries: the conv kernel writes x_proj's bf16
  // operand as well (no separate rounding pass), then the product. Decode
  // sizes (the GEMV) and the rest: the default.
  void conv_silu_matmul_batch(const ConvArgs* a, int count, const MatrixView& W, float* y2, int64_t ldy2) override {
    if (count <= 0) return;
    const int64_t ld_b = (W.cols + 7) / 8 * 8;
    if (count > cuda::kGemvMaxRows && stacked_rows(a, count) == count && W.dtype == DType::BF16 && W.rows > 0 &&
        a[0].channels == W.cols) {
      auto* packed = static_cast<uint16_t*>(scratch_at(kScratchX, size_t(count) * size_t(ld_b) * 2));
      if (cuda::conv_silu_one_packed(a, count, batch_host(), packed, ld_b)) {
        gemm(W, packed, ld_b, count, y2, ldy2, false);
        return;
      }
    }
    Backend::conv_silu_matmul_batch(a, count, W, y2, ldy2);
  }
  void causal_conv_silu_batch(const ConvArgs* a, int count) override {
    if (count <= 0) return;
    std::vector<int> rest;
    cuda::causal_conv_silu_batch(a, count, batch_host(), rest);
    for (int i : rest)
      causal_conv_silu(a[i].x, a[i].n, a[i].ldx, a[i].channels, a[i].weight, a[i].bias, a[i].k_width, a[i].state,
                       a[i].y, a[i].ldy);
  }
  void selective_scan_batch(const ScanArgs* a, int count) override {
    if (count <= 0) return;
    std::vector<int> rest;
    cuda::selective_scan_batch(a, count, batch_host(), rest);
    for (int i : rest) selective_scan(a[i]);
  }
  void normed_selective_scan_batch(const ScanArgs* a, int count, const ScanInputNorms& in) override {
    if (count <= 0) return;
    std::vector<int> rest;
    cuda::normed_selective_scan_batch(a, count, in, batch_host(), rest);
    if (rest.empty()) return;
    std::vector<int64_t> row(size_t(count), 0);  // each entry's first row of in.dt_raw
    for (int i = 1; i < count; ++i) row[size_t(i)] = row[size_t(i - 1)] + std::max<int64_t>(a[i - 1].n, 0);
    for (int i : rest) {
      ScanInputNorms ni = in;
      ni.dt_raw += row[size_t(i)] * in.ld_dt;
      ni.dt_scratch += row[size_t(i)] * in.dt_proj.cols;
      normed_selective_scan(a[i], ni);
    }
  }
  void rope_tables_at(const int64_t* positions, int64_t n, const float* inv_freq, int half, float* c,
                      float* s) override {
    if (n <= 0) return;
    const void* dev = stage(positions, size_t(n) * sizeof(int64_t));
    cuda::rope_tables_at(static_cast<const int64_t*>(dev), n, inv_freq, half, c, s, stream_);
  }
  void store_rows_batch(const StoreArgs* a, int count) override {
    if (count <= 0) return;
    int64_t most = 0;
    for (int i = 0; i < count; ++i) most = std::max(most, a[i].n * a[i].d);
    if (count == 1 || most <= 0) {  // (nothing to gain from staging)
      Backend::store_rows_batch(a, count);
      return;
    }
    const void* dev = stage(a, size_t(count) * sizeof(StoreArgs));
    cuda::store_rows_batch(static_cast<const StoreArgs*>(dev), count, most, stream_);
  }
  void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t n, int64_t d, float* out,
                int64_t ldo) override {
    cuda::silu_mul(gate, ldg, up, ldu, n, d, out, ldo, stream_);
  }
  void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d) override {
    cuda::average_into(a, lda, b, ldb, n, d, stream_);
  }
  void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo) override {
    if (n <= 0) return;
    // ids are host memory: range-checked here (the CPU kernel's message),
    // then staged to device scratch on the stream.
    for (int64_t t = 0; t < n; ++t)
      check(ids[t] >= 0 && ids[t] < table.rows, "token id ", ids[t], " is out of range (vocabulary has ",
            table.rows, " tokens)");
    void* d_ids = scratch_at(kScratchIds, size_t(n) * sizeof(int32_t));
    upload(d_ids, ids, size_t(n) * sizeof(int32_t));
    cuda::embed_rows(table, static_cast<const int32_t*>(d_ids), n, out, ldo, stream_);
  }
  void round_to(DType dt, float* x, int64_t n, int64_t d, int64_t ldx) override {
    cuda::round_to(dt, x, n, d, ldx, stream_);
  }
  void store_rows(const float* src, int64_t lds, int64_t n, int64_t d, DType dt, void* dst,
                  int64_t ldd) override {
    cuda::store_rows(src, lds, n, d, dt, dst, ldd, stream_);
  }

 private:
  enum ScratchSlot {
    kScratchX = 0,
    kScratchW,
    kScratchY,
    kScratchIds,
    kScratchAttention,
    kScratchWide,
    kScratchBatchDesc,       // the batched ops' descriptors (stage())
    kScratchBatchPartial,    // the batched ops' partial results (attention's split states)
    kScratchSample,          // sample_tokens' per-row keys and probabilities
    kScratchMlp,             // mlp_residual's bf16 products
    kScratchSlots
  };
  struct Scratch {
    void* ptr = nullptr;
    size_t bytes = 0;
  };

  // Grow-only device scratch, one buffer per use. Growing waits for the
  // stream (queued work may still read the old buffer).
  void* scratch_at(ScratchSlot slot, size_t bytes) {
    if (bytes == 0) return nullptr;
    Scratch& s = scratch_[slot + (on_side_ ? kScratchSlots : 0)];
    if (s.bytes < bytes) {
      HYMBA_CUDA_CHECK(cudaStreamSynchronize(stream_));
      // A recording may still use the old buffer: keep it until the
      // recordings are dropped.
      if (s.ptr && !graphs_.empty()) retired_scratch_.push_back(s.ptr);
      else if (s.ptr) HYMBA_CUDA_CHECK(cudaFree(s.ptr));
      s.ptr = nullptr, s.bytes = 0;
      const size_t want = std::max(bytes, s.bytes * 3 / 2);
      HYMBA_CUDA_CHECK(cudaMalloc(&s.ptr, want));
      s.bytes = want;
      // The single-sequence decode keeps per-kv-head counters at the head of
      // this buffer and expects them zero (its kernels leave them zero).
      if (slot == kScratchAttention) HYMBA_CUDA_CHECK(cudaMemsetAsync(s.ptr, 0, want, stream_));
    }
    return s.ptr;
  }

  // Host memory of `bytes` copied to the device (scratch slot
  // kScratchBatchDesc) on the stream, through a pinned staging buffer so
  // the copy is truly asynchronous. The staging buffers form a ring; each
  // records an event after its copy, and is refilled only once that event
  // has completed, so a pending copy never reads a buffer being rewritten.
  // The device copy is stream-ordered: work queued before the next stage()
  // sees it intact (the next copy into the slot is queued after that work).
  const void* stage(const void* host, size_t bytes) {
    Staging& s = staging_[staging_next_];
    staging_next_ = (staging_next_ + 1) % kStagingRing;
    if (!s.done) HYMBA_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
    if (s.pending) {
      HYMBA_CUDA_CHECK(cudaEventSynchronize(s.done));
      s.pending = false;
    }
    if (s.bytes < bytes) {
      if (s.host) HYMBA_CUDA_CHECK(cudaFreeHost(s.host));
      s.host = nullptr;
      const size_t want = std::max({bytes, s.bytes * 2, size_t(16) << 10});
      s.bytes = 0;
      HYMBA_CUDA_CHECK(cudaHostAlloc(&s.host, want, cudaHostAllocDefault));
      s.bytes = want;
    }
    std::memcpy(s.host, host, bytes);
    void* dev = scratch_at(kScratchBatchDesc, bytes);
    HYMBA_CUDA_CHECK(cudaMemcpyAsync(dev, s.host, bytes, cudaMemcpyHostToDevice, stream_));
    HYMBA_CUDA_CHECK(cudaEventRecord(s.done, stream_));
    s.pending = true;
    return dev;
  }

  cuda::BatchHost batch_host() {
    cuda::BatchHost h;
    h.stream = stream_;
    h.sm_count = sm_count_;
    h.stage = [this](const void* host, size_t bytes) { return stage(host, bytes); };
    h.scratch = [this](size_t bytes) { return scratch_at(kScratchBatchPartial, bytes); };
    return h;
  }

  // y (+)= B W^T with B already in W's type (cuBLASLt).
  void gemm(const MatrixView& W, const void* b, int64_t ld_b, int64_t n, float* y, int64_t ldy, bool accumulate);
  // y = bf16(B W^T) (fp32 accumulation) for bf16 W and B; false (nothing
  // queued) when cuBLASLt has no algorithm for the operands' alignments.
  bool gemm_to_bf16(const MatrixView& W, const void* b, int64_t ld_b, int64_t n, uint16_t* y, int64_t ldy) {
    return lt_matmul(W, b, ld_b, n, y, DType::BF16, ldy, false);
  }
  // y (of type yt: fp32, or bf16 for 16-bit W) (+)= B W^T through the cached
  // plan for these operands; false (nothing queued) when cuBLASLt has none.
  bool lt_matmul(const MatrixView& W, const void* b, int64_t ld_b, int64_t n, void* y, DType yt, int64_t ldy,
                 bool accumulate);
  // W with rows padded to a multiple of 8 elements (zeros), copied once per
  // matrix (W itself where its rows are already 16-byte aligned).
  MatrixView rows_padded(const MatrixView& W) {
    const int64_t es = int64_t(dtype_size(W.dtype)), ld = (W.cols + 7) / 8 * 8;
    if (ld == W.cols && reinterpret_cast<uintptr_t>(W.data) % 16 == 0) return W;
    std::lock_guard<std::mutex> lock(resident_mutex_);
    auto it = padded_.find(W.data);
    if (it == padded_.end()) {
      void* p = allocate(size_t(W.rows) * size_t(ld) * size_t(es));  // zeroed
      resident_allocs_.push_back(p);
      HYMBA_CUDA_CHECK(cudaMemcpy2DAsync(p, size_t(ld * es), W.data, size_t(W.cols * es), size_t(W.cols * es),
                                         size_t(W.rows), cudaMemcpyDeviceToDevice, stream_));
      it = padded_.emplace(W.data, p).first;
    }
    return MatrixView{it->second, W.dtype, W.rows, ld};
  }
  // rmsnorm(a) (or the average of the rmsnorms of a and b) as a bf16 GEMM
  // operand in scratch (dense rows of ld_b = cols rounded up to 8).
  const void* norm_packed(const float* a, int64_t lda, const float* wa, const float* b, int64_t ldb, const float* wb,
                          int64_t n, int64_t cols, float eps, int64_t& ld_b) {
    ld_b = (cols + 7) / 8 * 8;
    auto* packed = static_cast<uint16_t*>(scratch_at(kScratchX, size_t(n) * size_t(ld_b) * 2));
    cuda::norm_pack_bf16(a, lda, wa, b, ldb, wb, n, cols, eps, packed, ld_b, stream_);
    return packed;
  }

  // Waits for everything queued on both streams (errors are left to the
  // next checked call: used where nothing may throw).
  void drain_streams() noexcept {
    cudaStreamSynchronize(main_stream_);
    if (side_stream_) cudaStreamSynchronize(side_stream_);
  }

  // The cached plan for a shape and operand alignments; nullptr when
  // cuBLASLt has no algorithm for them.
  const GemmPlan* plan(DType wt, DType yt, int64_t m, int64_t nn, int64_t k, int64_t ld_w, int64_t ld_b, int64_t ld_y,
                       uint32_t al_a, uint32_t al_b, uint32_t al_c);

  int device_ = 0;
  int sm_count_ = 0;
  cudaStream_t stream_ = nullptr;  // where ops go: main_stream_, or side_stream_ in a side branch
  cudaStream_t main_stream_ = nullptr, side_stream_ = nullptr;
  cudaEvent_t fork_ev_ = nullptr;
  std::vector<cudaEvent_t> join_evs_;  // per side-branch key
  int side_key_ = 0;
  bool on_side_ = false, side_pending_ = false;
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  Scratch scratch_[2 * kScratchSlots];  // the main stream's, then the side stream's
  struct Staging {
    void* host = nullptr;  // pinned
    size_t bytes = 0;
    cudaEvent_t done = nullptr;  // recorded after the copy out of `host`
    bool pending = false;
  };
  static constexpr int kStagingRing = 16;
  Staging staging_[kStagingRing];
  int staging_next_ = 0;
  std::map<GemmKey, GemmPlan> plans_;
  std::mutex resident_mutex_;
  std::unordered_map<const void*, std::pair<void*, size_t>> resident_;
  std::unordered_map<const void*, void*> padded_;  // rows_padded copies, by the original's address
  std::vector<cudaGraphExec_t> graphs_;  // recordings (see begin_recording)
  std::vector<void*> retired_scratch_;    // outgrown scratch a recording may use
  std::vector<void*> resident_allocs_;  // every resident copy, freed with the backend
};

// cuBLASLt is column-major. Row-major y[n, rows] = x[n, cols] W^T reads, in
// column-major terms, as Y (rows x n, ld ldy) = W^T(A: cols x rows, ld cols,
// transposed) * X (B: cols x n, ld ldx): m = rows, n = tokens, k = cols.
const GemmPlan* CudaBackend::plan(DType wt, DType yt, int64_t m, int64_t nn, int64_t k, int64_t ld_w, int64_t ld_b,
                                  int64_t ld_y, uint32_t al_a, uint32_t al_b, uint32_t al_c) {
  const GemmKey key{int(wt), int(yt), m, nn, k, ld_w, ld_b, ld_y, al_a, al_b, al_c};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second.op ? &it->second : nullptr;
  const cudaDataType_t ab = wt == DType::F32 ? CUDA_R_32F : wt == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
  GemmPlan p;
  // CUBLAS_COMPUTE_32F: true fp32 products (TF32 only with the _FAST_TF32 compute types).
  HYMBA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  HYMBA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  HYMBA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  HYMBA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, ab, uint64_t(k), uint64_t(m), ld_w));
  HYMBA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, ab, uint64_t(k), uint64_t(nn), ld_b));
  HYMBA_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&p.c, yt == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F, uint64_t(m), uint64_t(nn), ld_y));

  cublasLtMatmulPreference_t pref = nullptr;
  HYMBA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  HYMBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &workspace_bytes_, sizeof workspace_bytes_));
  HYMBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                                          sizeof al_a));
  HYMBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                                          sizeof al_b));
  HYMBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c,
                                                          sizeof al_c));
  HYMBA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c,
                                                          sizeof al_c));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(lt_, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
    if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED)
      check_cublas(st, "cublasLtMatmulAlgoGetHeuristic");
    cublasLtMatmulDescDestroy(p.op);
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    plans_.emplace(key, GemmPlan{});  // remembered as "none"
    return nullptr;
  }
  p.algo = result.algo;
  return &plans_.emplace(key, p).first->second;
}

void CudaBackend::matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
                         bool accumulate) {
  const int64_t rows = W.rows, cols = W.cols;
  if (n <= 0 || rows <= 0) return;
  if (cols <= 0) {  // an empty sum
    if (!accumulate) cuda::zero_rows(y, n, rows, ldy, stream_);
    return;
  }
  // Decode-sized bf16 products: the fused GEMV (x rounded in the kernel, W
  // streamed once), unless it declines the shape.
  if (W.dtype == DType::BF16 && n <= cuda::kGemvMaxRows &&
      cuda::gemv_bf16(W, x, n, ldx, y, ldy, accumulate, stream_))
    return;
  if (W.dtype == DType::F16) {
    // The CPU's F16 semantics: W widened to fp32, x kept in fp32. W is
    // widened into scratch on every call, then the product is a true fp32
    // GEMM: exact, at the cost of extra traffic (f16 checkpoints are rare;
    // Hymba ships bf16).
    float* wide = static_cast<float*>(scratch_at(kScratchWide, size_t(rows * cols) * sizeof(float)));
    cuda::widen_to_f32(W.data, W.dtype, rows * cols, wide, stream_);
    matmul(MatrixView{wide, DType::F32, rows, cols}, x, n, ldx, y, ldy, accumulate);
    return;
  }
  // B operand: x itself for fp32 weights; for bf16 weights x rounded to bf16
  // into dense rows padded to 16 bytes (as the CPU kernel and a bf16 model
  // compute).
  const void* b = x;
  int64_t ld_b = ldx;
  if (W.dtype != DType::F32) {
    ld_b = (cols + 7) / 8 * 8;
    void* packed = scratch_at(kScratchX, size_t(n) * size_t(ld_b) * 2);
    cuda::store_rows(x, ldx, n, cols, W.dtype, packed, ld_b, stream_);
    b = packed;
  }
  gemm(W, b, ld_b, n, y, ldy, accumulate);
}

// y (+)= B W^T through cuBLASLt, B (n x W.cols, leading dimension ld_b)
// already in W's type.
bool CudaBackend::lt_matmul(const MatrixView& W, const void* b, int64_t ld_b, int64_t n, void* y, DType yt,
                            int64_t ldy, bool accumulate) {
  const int64_t rows = W.rows, cols = W.cols;
  const int64_t es = int64_t(dtype_size(W.dtype));
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const GemmPlan* p = plan(W.dtype, yt, rows, n, cols, cols, ld_b, ldy, alignment_of(W.data, cols * es),
                           alignment_of(b, ld_b * es), alignment_of(y, ldy * int64_t(dtype_size(yt))));
  if (!p) return false;
  HYMBA_CUBLAS_CHECK(cublasLtMatmul(lt_, p->op, &alpha, W.data, p->a, b, p->b, &beta, y, p->c, y, p->c, &p->algo,
                                    workspace_, workspace_bytes_, stream_));
  return true;
}

void CudaBackend::gemm(const MatrixView& W, const void* b, int64_t ld_b, int64_t n, float* y, int64_t ldy,
                       bool accumulate) {
  if (lt_matmul(W, b, ld_b, n, y, DType::F32, ldy, accumulate)) return;
  const int64_t rows = W.rows, cols = W.cols;
  const int64_t es = int64_t(dtype_size(W.dtype));
  auto round8 = [](int64_t v) { return (v + 7) / 8 * 8; };
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  // No algorithm for these alignments (odd row pitches or offsets): run on
  // 16-byte-aligned copies of every operand instead (rare: model shapes are
  // multiples of 8).
  const int64_t ld_w2 = round8(cols), ld_b2 = round8(cols), ld_y2 = round8(rows);
  void* w2 = scratch_at(kScratchW, size_t(rows) * size_t(ld_w2) * size_t(es));
  HYMBA_CUDA_CHECK(cudaMemcpy2DAsync(w2, size_t(ld_w2 * es), W.data, size_t(cols * es), size_t(cols * es),
                                     size_t(rows), cudaMemcpyDeviceToDevice, stream_));
  const void* b2 = b;
  if (W.dtype == DType::F32) {
    void* xc = scratch_at(kScratchX, size_t(n) * size_t(ld_b2) * 4);
    HYMBA_CUDA_CHECK(cudaMemcpy2DAsync(xc, size_t(ld_b2 * 4), b, size_t(ld_b * 4), size_t(cols * 4), size_t(n),
                                       cudaMemcpyDeviceToDevice, stream_));
    b2 = xc;
  }
  float* y2 = static_cast<float*>(scratch_at(kScratchY, size_t(n) * size_t(ld_y2) * 4));
  if (accumulate)
    HYMBA_CUDA_CHECK(cudaMemcpy2DAsync(y2, size_t(ld_y2 * 4), y, size_t(ldy * 4), size_t(rows * 4), size_t(n),
                                       cudaMemcpyDeviceToDevice, stream_));
  const GemmPlan* p2 = plan(W.dtype, DType::F32, rows, n, cols, ld_w2, ld_b2, ld_y2, 16, 16, 16);
  check(p2 != nullptr, "cuBLASLt found no algorithm for a ", dtype_name(W.dtype), " matmul of ", rows, " x ", cols,
        " weights and ", n, " tokens");
  HYMBA_CUBLAS_CHECK(cublasLtMatmul(lt_, p2->op, &alpha, w2, p2->a, b2, p2->b, &beta, y2, p2->c, y2, p2->c,
                                    &p2->algo, workspace_, workspace_bytes_, stream_));
  HYMBA_CUDA_CHECK(cudaMemcpy2DAsync(y, size_t(ldy * 4), y2, size_t(ld_y2 * 4), size_t(rows * 4), size_t(n),
                                     cudaMemcpyDeviceToDevice, stream_));
}

}  // namespace

bool cuda_device_present() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // no driver / no device: not an error for the caller
    return false;
  }
  return n > 0;
}

int cuda_compute_capability() {
  int dev = 0, major = 0, minor = 0;
  if (!cuda_device_present() || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return 10 * major + minor;
}

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace hymba
