// Backend adapter over the CPU kernels.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "backend/backend.h"
#include "backend/cpu/kernels.h"
#include "util/error.h"

namespace hymba {

namespace {

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  void* allocate(size_t bytes) override {
    // 64-byte aligned (whole cache lines, any vector width), zero-filled.
    void* p = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));
    check(p != nullptr, "out of memory allocating ", bytes, " bytes");
    std::memset(p, 0, bytes);
    return p;
  }
  void release(void* p) noexcept override { std::free(p); }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
  void fill_zero(void* dst, size_t bytes) override { std::memset(dst, 0, bytes); }
  const void* resident(const void* host, size_t) override { return host; }

  void matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
              bool accumulate) override {
    cpu::matmul(W, x, n, ldx, y, ldy, accumulate);
  }
  void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y,
               int64_t ldy) override {
    cpu::rmsnorm(x, n, d, ldx, w, eps, y, ldy);
  }
  void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* c, float* s) override {
    cpu::rope_tables(pos0, n, inv_freq, half, c, s);
  }
  void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* c, const float* s) override {
    cpu::rope(x, n, ldx, n_heads, head_dim, c, s);
  }
  void attention(const AttentionArgs& a) override { cpu::attention(a); }
  void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                        const float* bias, int k_width, float* state, float* y, int64_t ldy) override {
    cpu::causal_conv_silu(x, n, ldx, channels, weight, bias, k_width, state, y, ldy);
  }
  void selective_scan(const ScanArgs& a) override { cpu::selective_scan(a); }
  void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t n, int64_t d, float* out,
                int64_t ldo) override {
    cpu::silu_mul(gate, ldg, up, ldu, n, d, out, ldo);
  }
  void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d) override {
    cpu::average_into(a, lda, b, ldb, n, d);
  }
  void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo) override {
    cpu::embed_rows(table, ids, n, out, ldo);
  }
  void round_to(DType dt, float* x, int64_t n, int64_t d, int64_t ldx) override {
    if (dt == DType::F32) return;
    for (int64_t t = 0; t < n; ++t) {
      float* r = x + t * ldx;
      if (dt == DType::BF16) {
        for (int64_t i = 0; i < d; ++i) r[i] = round_to_bf16(r[i]);
      } else {
        for (int64_t i = 0; i < d; ++i) r[i] = f16_to_f32(f32_to_f16(r[i]));
      }
    }
  }
  void store_rows(const float* src, int64_t lds, int64_t n, int64_t d, DType dt, void* dst,
                  int64_t ldd) override {
    const size_t es = dtype_size(dt);
    for (int64_t t = 0; t < n; ++t)
      from_f32(src + t * lds, size_t(d), dt, static_cast<uint8_t*>(dst) + size_t(t * ldd) * es);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

void set_cpu_threads(int n) {
  if (n > 0) omp_set_num_threads(n);
}

int cpu_threads() { return omp_get_max_threads(); }

}  // namespace hymba
