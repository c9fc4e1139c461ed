// A backend executes the op contract (ops.h) on one device. The model holds
// a Backend and calls only these methods, so it never branches on the device.
// Buffers passed to ops live in the backend's memory (host memory for the
// CPU), allocated with allocate() or made resident with resident(); the only
// host pointers an op takes are embed_rows' token ids. Ops may run
// asynchronously: download() and synchronize() wait for the work queued
// before them.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/ops.h"

namespace hymba {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // ---- memory
  // Zero-filled device memory of `bytes` bytes (any alignment a float or a
  // 16-byte vector needs); throws hymba::Error when the device is full.
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* p) noexcept = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;  // device to device
  virtual void fill_zero(void* dst, size_t bytes) = 0;
  // A read-only device copy of host data (weights) that lives as long as the
  // backend. The CPU backend returns `host` itself: nothing is copied, so a
  // memory-mapped checkpoint stays mapped, never duplicated.
  virtual const void* resident(const void* host, size_t bytes) = 0;
  // Resident copies of `count` host tensors, placed back to back in one
  // allocation where the device copies (each at the previous one's end,
  // rounded up to 16 bytes), so that products over weights that share an
  // operand (the MLP's gate and up) can run as one; out[i] is hosts[i]'s
  // copy. The default (and any backend that copies nothing) makes each
  // resident on its own.
  virtual void resident_adjacent(const void* const* hosts, const size_t* bytes, int count, const void** out) {
    for (int i = 0; i < count; ++i) out[i] = resident(hosts[i], bytes[i]);
  }
  // Waits until all queued work is done (no-op where ops are synchronous).
  virtual void synchronize() {}
  // Tokens per forward chunk that keep this device efficient (the model's
  // default max_chunk): matrix products want wide chunks on a GPU, while on
  // a CPU a small chunk keeps the working set in cache.
  virtual int64_t preferred_chunk() const { return 256; }

  // ---- concurrency (optional): the ops issued between side_begin(key) and
  // side_end() form a side branch that may run concurrently with the ops
  // issued after side_end(), until side_join(), after which every op runs
  // after the branch. The caller guarantees the branch reads nothing the
  // concurrent main-line ops write and writes nothing they read or write.
  // A branch is not itself recorded, but a recording may hold the join:
  // when replayed, it waits for the latest branch issued with the same key
  // (so each recorded join needs its branch issued anew, with that key,
  // before every replay). side_join() with no branch pending does nothing.
  // The default runs everything in order.
  virtual void side_begin(int key) { (void)key; }
  virtual void side_end() {}
  virtual void side_join() {}

  // ---- recording (optional): ops issued between begin_recording() and
  // end_recording() are recorded, not run, and replay() runs them again with
  // the same arguments (CUDA graphs: one launch instead of dozens). Only ops
  // whose arguments point at device memory may be recorded (not embed_rows'
  // host ids, not download). A backend that cannot record returns false from
  // can_record() and is never asked to.
  virtual bool can_record() const { return false; }
  virtual void begin_recording() {}
  // Returns an id for replay(); throws hymba::Error if recording failed.
  virtual int end_recording() { return -1; }
  virtual void replay(int recording) {}
  // Frees every recording (their buffers changed or are gone).
  virtual void drop_recordings() {}

  // ---- ops (semantics in ops.h and backend/cpu/kernels.h)

  virtual void matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
                      bool accumulate) = 0;
  virtual void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y,
                       int64_t ldy) = 0;
  virtual void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* cos_out,
                           float* sin_out) = 0;
  virtual void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* cos_t,
                    const float* sin_t) = 0;
  virtual void attention(const AttentionArgs& a) = 0;
  virtual void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                                const float* bias, int k_width, float* state, float* y, int64_t ldy) = 0;
  virtual void selective_scan(const ScanArgs& a) = 0;
  virtual void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t n, int64_t d,
                        float* out, int64_t ldo) = 0;
  virtual void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d) = 0;
  virtual void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo) = 0;
  // Rounds n rows of d values to `dt` precision in place (keeps fp32 storage).
  virtual void round_to(DType dt, float* x, int64_t n, int64_t d, int64_t ldx) = 0;
  // dst row r (elements of type dt, leading dimension ldd) = src row r
  // converted with round-to-nearest-even, for n rows of d values (the cache
  // commit of a chunk's K/V).
  virtual void store_rows(const float* src, int64_t lds, int64_t n, int64_t d, DType dt, void* dst,
                          int64_t ldd) = 0;

  // ---- fused ops: stretches of the primitives above that a device backend
  // may run as one kernel (single-token decode is a chain of small ops whose
  // launches cost more than their work). The defaults compose the primitives,
  // so they define the semantics; `scratch` buffers are where the defaults
  // put intermediate values (a fusing backend may leave them untouched).

  // y (+)= W rmsnorm(x; norm_w). scratch: n x W.cols, dense.
  virtual void norm_matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, const float* norm_w,
                           float eps, float* scratch, float* y, int64_t ldy, bool accumulate) {
    rmsnorm(x, n, W.cols, ldx, norm_w, eps, scratch, W.cols);
    matmul(W, scratch, n, W.cols, y, ldy, accumulate);
  }
  // Hymba's branch fusion and output projection:
  //   y (+)= W ((rmsnorm(a; wa) + rmsnorm(b; wb)) / 2)
  // a and b (n x W.cols) are overwritten with intermediate values.
  virtual void fuse_branches_matmul(const MatrixView& W, float* a, int64_t lda, float* b, int64_t ldb, int64_t n,
                                    const float* wa, const float* wb, float eps, float* y, int64_t ldy,
                                    bool accumulate) {
    rmsnorm(a, n, W.cols, lda, wa, eps, a, lda);
    rmsnorm(b, n, W.cols, ldb, wb, eps, b, ldb);
    average_into(a, lda, b, ldb, n, W.cols);
    matmul(W, a, n, lda, y, ldy, accumulate);
  }
  // The SwiGLU MLP's first half: out = silu(Wg xn) * (Wu xn), xn = rmsnorm(x; norm_w)
  // (n x Wg.rows, leading dimension ldo). scratch_norm: n x Wg.cols, dense;
  // scratch_up: n x Wu.rows, dense.
  virtual void norm_swiglu(const MatrixView& Wg, const MatrixView& Wu, const float* x, int64_t n, int64_t ldx,
                           const float* norm_w, float eps, float* scratch_norm, float* scratch_up, float* out,
                           int64_t ldo) {
    rmsnorm(x, n, Wg.cols, ldx, norm_w, eps, scratch_norm, Wg.cols);
    matmul(Wg, scratch_norm, n, Wg.cols, out, ldo, false);
    matmul(Wu, scratch_norm, n, Wu.cols, scratch_up, Wu.rows, false);
    silu_mul(out, ldo, scratch_up, Wu.rows, n, Wg.rows, out, ldo);
  }
  // The Mamba branch's conv and x_proj: causal_conv_silu(a), then
  // y2 = a.y W^T (n x W.rows, leading dimension ldy2, not accumulated).
  // a.y is written as causal_conv_silu writes it (the scan reads it).
  virtual void conv_silu_matmul(const ConvArgs& a, const MatrixView& W, float* y2, int64_t ldy2) {
    causal_conv_silu(a.x, a.n, a.ldx, a.channels, a.weight, a.bias, a.k_width, a.state, a.y, a.ldy);
    matmul(W, a.y, a.n, a.ldy, y2, ldy2, false);
  }
  // conv_silu_matmul for many sequences (batched decode):
  // causal_conv_silu_batch(a, count), then y2 = Y W^T for Y the entries'
  // outputs stacked in order, which must be consecutive rows of one matrix
  // (a[i].y = a[0].y + (the earlier entries' rows) * a[0].ldy, one ldy).
  virtual void conv_silu_matmul_batch(const ConvArgs* a, int count, const MatrixView& W, float* y2, int64_t ldy2) {
    if (count <= 0) return;
    const int64_t n = stacked_rows(a, count);
    causal_conv_silu_batch(a, count);
    matmul(W, a[0].y, n, a[0].ldy, y2, ldy2, false);
  }
  // The rows of conv_silu_matmul_batch's entries (count >= 1); throws
  // std::invalid_argument where their outputs are not consecutive rows.
  static int64_t stacked_rows(const ConvArgs* a, int count) {
    int64_t n = 0;
    for (int i = 0; i < count; ++i) {
      if (a[i].y != a[0].y + n * a[0].ldy || a[i].ldy != a[0].ldy)
        throw std::invalid_argument("conv_silu_matmul_batch: the entries' outputs are not consecutive rows");
      n += a[i].n;
    }
    return n;
  }
  // The whole SwiGLU MLP added to the residual stream:
  //   y += Wd (silu(Wg xn) * (Wu xn)),  xn = rmsnorm(x; norm_w)
  // x and y may be the same rows (x is read before y changes). scratch_norm,
  // scratch_up: as norm_swiglu's; scratch_act: n x Wg.rows, dense (the
  // product before Wd). A device backend may round the two products Wg xn
  // and Wu xn to bf16 (bf16 weights, many tokens: what a bf16 model
  // computes), keeping the tensors of the default off its memory bus.
  virtual void mlp_residual(const MatrixView& Wg, const MatrixView& Wu, const MatrixView& Wd, const float* x,
                            int64_t n, int64_t ldx, const float* norm_w, float eps, float* scratch_norm,
                            float* scratch_up, float* scratch_act, float* y, int64_t ldy) {
    norm_swiglu(Wg, Wu, x, n, ldx, norm_w, eps, scratch_norm, scratch_up, scratch_act, Wg.rows);
    matmul(Wd, scratch_act, n, Wg.rows, y, ldy, true);
  }
  // The attention inputs of a chunk, from the fused input projection (rows
  // of leading dimension ld): RoPE on q (n_heads heads) in place; when k is
  // not null, the chunk's K and V packed into dense rows of k_out (k_width
  // wide) and v_out (v_width wide), RoPE on the packed K (n_kv_heads heads),
  // and both rounded to `round_dt` (the cache's precision). cos/sin null: no
  // RoPE.
  virtual void prepare_qkv(float* q, const float* k, const float* v, int64_t ld, int64_t n, int n_heads,
                           int n_kv_heads, int head_dim, const float* cos_t, const float* sin_t, DType round_dt,
                           float* k_out, int64_t k_width, float* v_out, int64_t v_width) {
    if (cos_t) rope(q, n, ld, n_heads, head_dim, cos_t, sin_t);
    if (!k) return;
    store_rows(k, ld, n, k_width, DType::F32, k_out, k_width);
    store_rows(v, ld, n, v_width, DType::F32, v_out, v_width);
    if (cos_t) rope(k_out, n, k_width, n_kv_heads, head_dim, cos_t, sin_t);
    round_to(round_dt, k_out, n, k_width, k_width);
    round_to(round_dt, v_out, n, v_width, v_width);
  }
  // The Mamba branch from x_proj's output to y: the dt/B/C norms and dt_proj
  // (ScanInputNorms) then selective_scan(a). a.delta ([n, channels]), a.B,
  // a.C and in.dt_scratch are scratch: writable, unspecified afterwards
  // (the default leaves delta, the normalised B and C and dtn there).
  virtual void normed_selective_scan(const ScanArgs& a, const ScanInputNorms& in) {
    const int64_t rank = in.dt_proj.cols;
    rmsnorm(in.dt_raw, a.n, rank, in.ld_dt, in.dt_norm_w, in.eps, in.dt_scratch, rank);
    rmsnorm(a.B, a.n, a.d_state, a.ldb, in.B_norm_w, in.eps, const_cast<float*>(a.B), a.ldb);
    rmsnorm(a.C, a.n, a.d_state, a.ldc, in.C_norm_w, in.eps, const_cast<float*>(a.C), a.ldc);
    matmul(in.dt_proj, in.dt_scratch, a.n, rank, const_cast<float*>(a.delta), a.ld_delta, false);
    selective_scan(a);
  }

  // ---- sampling: out_ids[r] (host memory) = the token SampleArgs args[r]
  // picks from row r of logits ([rows, vocab], leading dimension ld, in the
  // backend's memory). Throws hymba::Error on NaN/+inf logits, a row without
  // a finite logit, or history ids outside [0, vocab). Waits for the result.
  // The default downloads the rows and picks on the host
  // (backend/cpu/sampling.cpp).
  virtual void sample_tokens(const float* logits, int64_t rows, int64_t vocab, int64_t ld, const SampleArgs* args,
                             int32_t* out_ids);

  // ---- the per-sequence ops over many sequences at once (batched decode:
  // each entry has its own cache segments / state). The defaults run the
  // entries one by one; a device backend overrides them with one launch.
  virtual void attention_batch(const AttentionArgs* a, int count) {
    for (int i = 0; i < count; ++i) attention(a[i]);
  }
  virtual void causal_conv_silu_batch(const ConvArgs* a, int count) {
    for (int i = 0; i < count; ++i)
      causal_conv_silu(a[i].x, a[i].n, a[i].ldx, a[i].channels, a[i].weight, a[i].bias, a[i].k_width, a[i].state,
                       a[i].y, a[i].ldy);
  }
  virtual void selective_scan_batch(const ScanArgs* a, int count) {
    for (int i = 0; i < count; ++i) selective_scan(a[i]);
  }
  // normed_selective_scan over many sequences (the Mamba branch of a batched
  // decode step): entry i is normed_selective_scan(a[i], in_i), where in_i is
  // `in` with dt_raw advanced by r_i rows (ld_dt) and dt_scratch by r_i rows
  // (rank): the entries' dt rows are consecutive rows of in.dt_raw, in order
  // (r_i = the sum of a[j].n over j < i, entries with n <= 0 counting 0), and
  // in.dt_scratch is [sum of n, rank], dense. dt_proj, the norm weights and
  // eps are shared; each entry has its own state, inputs and outputs. Scratch
  // (a[i].delta, B, C, dt_scratch) as in normed_selective_scan. The default
  // runs the norms and dt_proj over all rows at once when the entries' delta,
  // B and C rows are consecutive rows of one matrix each (the model's layout;
  // rows are independent, so this equals the per-entry composition), else
  // entry by entry; then selective_scan_batch.
  virtual void normed_selective_scan_batch(const ScanArgs* a, int count, const ScanInputNorms& in) {
    if (count <= 0) return;
    const int64_t rank = in.dt_proj.cols;
    const ScanArgs& f = a[0];
    int64_t rows = 0;
    bool joint = true;
    for (int i = 0; i < count && joint; ++i) {
      const ScanArgs& e = a[i];
      joint = e.ld_delta == f.ld_delta && e.ldb == f.ldb && e.ldc == f.ldc && e.d_state == f.d_state &&
              e.channels == f.channels && (e.n <= 0 || (e.delta == f.delta + rows * f.ld_delta &&
                                                         e.B == f.B + rows * f.ldb && e.C == f.C + rows * f.ldc));
      if (e.n > 0) rows += e.n;
    }
    if (joint) {
      if (rows <= 0) return;
      rmsnorm(in.dt_raw, rows, rank, in.ld_dt, in.dt_norm_w, in.eps, in.dt_scratch, rank);
      rmsnorm(f.B, rows, f.d_state, f.ldb, in.B_norm_w, in.eps, const_cast<float*>(f.B), f.ldb);
      rmsnorm(f.C, rows, f.d_state, f.ldc, in.C_norm_w, in.eps, const_cast<float*>(f.C), f.ldc);
      matmul(in.dt_proj, in.dt_scratch, rows, rank, const_cast<float*>(f.delta), f.ld_delta, false);
      selective_scan_batch(a, count);
      return;
    }
    int64_t r = 0;
    for (int i = 0; i < count; ++i) {
      if (a[i].n <= 0) continue;
      ScanInputNorms ni = in;
      ni.dt_raw += r * in.ld_dt;
      ni.dt_scratch += r * rank;
      normed_selective_scan(a[i], ni);
      r += a[i].n;
    }
  }
  // rope_tables for rows at arbitrary positions: row i of cos_out/sin_out
  // (half values each) for position positions[i] (host memory), n rows; the
  // batched decode step's one row per sequence.
  virtual void rope_tables_at(const int64_t* positions, int64_t n, const float* inv_freq, int half, float* cos_out,
                              float* sin_out) {
    for (int64_t i = 0; i < n; ++i)
      rope_tables(positions[i], 1, inv_freq, half, cos_out + i * half, sin_out + i * half);
  }
  // Many store_rows at once (the cache commit of a step: every K/V slot of
  // every sequence). The stores must not overlap each other's destinations.
  virtual void store_rows_batch(const StoreArgs* a, int count) {
    for (int i = 0; i < count; ++i) store_rows(a[i].src, a[i].lds, a[i].n, a[i].d, a[i].dt, a[i].dst, a[i].ldd);
  }
};

// The CPU backend (OpenMP threads; the count is set with set_threads).
std::unique_ptr<Backend> make_cpu_backend();
// Backends compiled into this build, e.g. {"cpu", "cuda"}.
std::vector<std::string> compiled_backends();
// "cpu", "cuda" or "auto" (cuda when this build has it and a GPU is present,
// else cpu). Unknown or unavailable devices throw hymba::Error.
std::unique_ptr<Backend> make_backend(const std::string& device);
// The name make_backend("auto") would pick.
std::string default_device();

// A process-wide CPU backend for host-side objects that need one (tests,
// caches built without a model).
Backend& host_backend();
void set_cpu_threads(int n);
int cpu_threads();

// Backend memory owned RAII-style: an array of T on the backend's device.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(Backend& be, size_t count) : be_(&be), count_(count) {
    if (count) ptr_ = static_cast<T*>(be.allocate(count * sizeof(T)));
  }
  DeviceArray(DeviceArray&& o) noexcept { *this = std::move(o); }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      reset();
      be_ = o.be_, ptr_ = o.ptr_, count_ = o.count_;
      o.ptr_ = nullptr, o.count_ = 0;
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { reset(); }
  void reset() {
    if (ptr_) be_->release(ptr_);
    ptr_ = nullptr, count_ = 0;
  }
  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

 private:
  Backend* be_ = nullptr;
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

}  // namespace hymba
