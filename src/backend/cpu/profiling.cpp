#include "backend/profiling.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <vector>

namespace hymba {

namespace {

class ProfilingBackend final : public Backend {
 public:
  explicit ProfilingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }

  // Memory traffic is not timed (it is not an op of the forward pass).
  void* allocate(size_t bytes) override { return inner_->allocate(bytes); }
  void release(void* p) noexcept override { inner_->release(p); }
  void upload(void* dst, const void* src, size_t bytes) override { inner_->upload(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { inner_->download(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { inner_->copy(dst, src, bytes); }
  void fill_zero(void* dst, size_t bytes) override { inner_->fill_zero(dst, bytes); }
  const void* resident(const void* host, size_t bytes) override { return inner_->resident(host, bytes); }
  void resident_adjacent(const void* const* hosts, const size_t* bytes, int count, const void** out) override {
    inner_->resident_adjacent(hosts, bytes, count, out);
  }
  void synchronize() override { inner_->synchronize(); }
  int64_t preferred_chunk() const override { return inner_->preferred_chunk(); }

  void matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
              bool accumulate) override {
    // Split by regime: decode-like products behave differently from prefill GEMMs.
    timed(n <= 8 ? "matmul (n<=8)" : "matmul (n>8)", double(W.rows) * double(W.cols) * double(n) * 2,
          [&] { inner_->matmul(W, x, n, ldx, y, ldy, accumulate); });
  }
  void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y,
               int64_t ldy) override {
    timed("rmsnorm", 0, [&] { inner_->rmsnorm(x, n, d, ldx, w, eps, y, ldy); });
  }
  void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* c, float* s) override {
    timed("rope", 0, [&] { inner_->rope_tables(pos0, n, inv_freq, half, c, s); });
  }
  void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* c, const float* s) override {
    timed("rope", 0, [&] { inner_->rope(x, n, ldx, n_heads, head_dim, c, s); });
  }
  void attention(const AttentionArgs& a) override {
    timed("attention", 0, [&] { inner_->attention(a); });
  }
  void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                        const float* bias, int k_width, float* state, float* y, int64_t ldy) override {
    timed("conv+silu", 0, [&] { inner_->causal_conv_silu(x, n, ldx, channels, weight, bias, k_width, state, y, ldy); });
  }
  void selective_scan(const ScanArgs& a) override {
    timed("selective_scan", 0, [&] { inner_->selective_scan(a); });
  }
  void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t n, int64_t d, float* out,
                int64_t ldo) override {
    timed("silu_mul", 0, [&] { inner_->silu_mul(gate, ldg, up, ldu, n, d, out, ldo); });
  }
  void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d) override {
    timed("average", 0, [&] { inner_->average_into(a, lda, b, ldb, n, d); });
  }
  void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo) override {
    timed("embed", 0, [&] { inner_->embed_rows(table, ids, n, out, ldo); });
  }
  void round_to(DType dt, float* x, int64_t n, int64_t d, int64_t ldx) override {
    timed("round_to", 0, [&] { inner_->round_to(dt, x, n, d, ldx); });
  }
  void attention_batch(const AttentionArgs* a, int count) override {
    timed("attention", 0, [&] { inner_->attention_batch(a, count); });
  }
  void causal_conv_silu_batch(const ConvArgs* a, int count) override {
    timed("conv+silu", 0, [&] { inner_->causal_conv_silu_batch(a, count); });
  }
  void selective_scan_batch(const ScanArgs* a, int count) override {
    timed("selective_scan", 0, [&] { inner_->selective_scan_batch(a, count); });
  }
  void normed_selective_scan_batch(const ScanArgs* a, int count, const ScanInputNorms& in) override {
    int64_t rows = 0;
    for (int i = 0; i < count; ++i) rows += a[i].n > 0 ? a[i].n : 0;
    timed("normed_scan", 2.0 * double(rows) * double(in.dt_proj.rows) * double(in.dt_proj.cols),
          [&] { inner_->normed_selective_scan_batch(a, count, in); });
  }
  void rope_tables_at(const int64_t* positions, int64_t n, const float* inv_freq, int half, float* c,
                      float* s) override {
    timed("rope", 0, [&] { inner_->rope_tables_at(positions, n, inv_freq, half, c, s); });
  }
  void store_rows_batch(const StoreArgs* a, int count) override {
    timed("store_rows", 0, [&] { inner_->store_rows_batch(a, count); });
  }
  void store_rows(const float* src, int64_t lds, int64_t n, int64_t d, DType dt, void* dst,
                  int64_t ldd) override {
    timed("store_rows", 0, [&] { inner_->store_rows(src, lds, n, d, dt, dst, ldd); });
  }

  // Fused ops are timed as one op each (what the inner backend runs).
  void norm_matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, const float* norm_w, float eps,
                   float* scratch, float* y, int64_t ldy, bool accumulate) override {
    timed(n <= 8 ? "norm_matmul (n<=8)" : "norm_matmul (n>8)", 2.0 * double(W.rows) * double(W.cols) * double(n),
          [&] { inner_->norm_matmul(W, x, n, ldx, norm_w, eps, scratch, y, ldy, accumulate); });
  }
  void fuse_branches_matmul(const MatrixView& W, float* a, int64_t lda, float* b, int64_t ldb, int64_t n,
                            const float* wa, const float* wb, float eps, float* y, int64_t ldy,
                            bool accumulate) override {
    timed(n <= 8 ? "fuse_matmul (n<=8)" : "fuse_matmul (n>8)", 2.0 * double(W.rows) * double(W.cols) * double(n),
          [&] { inner_->fuse_branches_matmul(W, a, lda, b, ldb, n, wa, wb, eps, y, ldy, accumulate); });
  }
  void norm_swiglu(const MatrixView& Wg, const MatrixView& Wu, const float* x, int64_t n, int64_t ldx,
                   const float* norm_w, float eps, float* scratch_norm, float* scratch_up, float* out,
                   int64_t ldo) override {
    timed(n <= 8 ? "norm_swiglu (n<=8)" : "norm_swiglu (n>8)", 4.0 * double(Wg.rows) * double(Wg.cols) * double(n),
          [&] { inner_->norm_swiglu(Wg, Wu, x, n, ldx, norm_w, eps, scratch_norm, scratch_up, out, ldo); });
  }
  void conv_silu_matmul_batch(const ConvArgs* a, int count, const MatrixView& W, float* y2, int64_t ldy2) override {
    int64_t n = 0;
    for (int i = 0; i < count; ++i) n += a[i].n;
    timed("conv+x_proj (batch)", 2.0 * double(W.rows) * double(W.cols) * double(n),
          [&] { inner_->conv_silu_matmul_batch(a, count, W, y2, ldy2); });
  }
  void conv_silu_matmul(const ConvArgs& a, const MatrixView& W, float* y2, int64_t ldy2) override {
    timed(a.n <= 8 ? "conv+x_proj (n<=8)" : "conv+x_proj (n>8)", 2.0 * double(W.rows) * double(W.cols) * double(a.n),
          [&] { inner_->conv_silu_matmul(a, W, y2, ldy2); });
  }
  void mlp_residual(const MatrixView& Wg, const MatrixView& Wu, const MatrixView& Wd, const float* x, int64_t n,
                    int64_t ldx, const float* norm_w, float eps, float* scratch_norm, float* scratch_up,
                    float* scratch_act, float* y, int64_t ldy) override {
    timed(n <= 8 ? "mlp (n<=8)" : "mlp (n>8)",
          2.0 * double(n) * (double(Wg.rows) * double(Wg.cols) * 2.0 + double(Wd.rows) * double(Wd.cols)), [&] {
            inner_->mlp_residual(Wg, Wu, Wd, x, n, ldx, norm_w, eps, scratch_norm, scratch_up, scratch_act, y, ldy);
          });
  }
  void prepare_qkv(float* q, const float* k, const float* v, int64_t ld, int64_t n, int n_heads, int n_kv_heads,
                   int head_dim, const float* cos_t, const float* sin_t, DType round_dt, float* k_out,
                   int64_t k_width, float* v_out, int64_t v_width) override {
    timed("prepare_qkv", 0, [&] {
      inner_->prepare_qkv(q, k, v, ld, n, n_heads, n_kv_heads, head_dim, cos_t, sin_t, round_dt, k_out, k_width,
                          v_out, v_width);
    });
  }
  void normed_selective_scan(const ScanArgs& a, const ScanInputNorms& in) override {
    timed("normed_scan", 2.0 * double(a.n) * double(in.dt_proj.rows) * double(in.dt_proj.cols),
          [&] { inner_->normed_selective_scan(a, in); });
  }
  void sample_tokens(const float* logits, int64_t rows, int64_t vocab, int64_t ld, const SampleArgs* args,
                     int32_t* out_ids) override {
    timed("sample", 0, [&] { inner_->sample_tokens(logits, rows, vocab, ld, args, out_ids); });
  }

  void reset() { stats_.clear(); }

  std::string report() const {
    std::vector<std::pair<std::string, Stat>> rows(stats_.begin(), stats_.end());
    std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.seconds > b.second.seconds; });
    double total = 0;
    for (auto& r : rows) total += r.second.seconds;
    std::string out = "op                    calls      seconds   share   GFLOP/s\n";
    char buf[160];
    for (auto& [name, s] : rows) {
      std::snprintf(buf, sizeof buf, "%-18s %8lld %12.4f  %5.1f%%  %8s\n", name.c_str(), (long long)s.calls, s.seconds,
                    total > 0 ? 100 * s.seconds / total : 0.0,
                    s.flops > 0 ? std::to_string(int(s.flops / s.seconds / 1e9)).c_str() : "");
      out += buf;
    }
    std::snprintf(buf, sizeof buf, "%-18s %8s %12.4f\n", "total", "", total);
    return out + buf;
  }

 private:
  struct Stat {
    long long calls = 0;
    double seconds = 0, flops = 0;
  };
  template <typename F>
  void timed(const char* name, double flops, F&& f) {
    // Asynchronous backends: drain the queue on both sides of the op so the
    // wall clock measures this op alone.
    inner_->synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    inner_->synchronize();
    Stat& s = stats_[name];
    ++s.calls;
    s.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    s.flops += flops;
  }
  std::unique_ptr<Backend> inner_;
  std::map<std::string, Stat> stats_;
};

}  // namespace

std::unique_ptr<Backend> make_profiling_backend(std::unique_ptr<Backend> inner) {
  return std::make_unique<ProfilingBackend>(std::move(inner));
}

std::string profile_report(const Backend& b) {
  if (auto* p = dynamic_cast<const ProfilingBackend*>(&b)) return p->report();
  return {};
}

void profile_reset(Backend& b) {
  if (auto* p = dynamic_cast<ProfilingBackend*>(&b)) p->reset();
}

}  // namespace hymba
