// A backend executes the op contract (ops.h) on one device. The model holds
// a Backend and calls only these methods, so it never branches on the device.
// Buffers passed in live in the backend's memory (host memory for the CPU).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "backend/ops.h"

namespace hymba {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

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
};

// The CPU backend (OpenMP threads; the count is set with set_threads).
std::unique_ptr<Backend> make_cpu_backend();
void set_cpu_threads(int n);
int cpu_threads();

}  // namespace hymba
