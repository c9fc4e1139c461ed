// The CUDA backend's decode GEMV kernels (backend/cuda/gemv.cu): bf16
// matmul with n <= 4 tokens (more take the general path) and the fused
// norm_matmul, fuse_branches_matmul and norm_swiglu, against the CPU backend
// (the reference; its fused ops run the default composition), on odd
// shapes, strided and misaligned operands, and a batch-invariance check (a
// token's result is bit-identical whether it is computed alone or with
// others). Without a GPU every test skips.
//
// DISABLED_GemvTiming prints the weight-streaming bandwidth of each decode
// product of Hymba-1.5B and of whole decode steps (32 layers + lm_head, each
// with Programmatic Dependent Launch on and off, and replayed from a
// recording): run with --gtest_also_run_disabled_tests
// --gtest_filter='*GemvTiming*'.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "util/dtype.h"
#include "cuda_test_util.h"

#ifdef HYMBA_HAVE_CUDA
namespace hymba::cuda {  // backend/cuda/kernels.cuh (which needs the CUDA headers)
void set_gemv_pdl(bool on);
bool gemv_pdl();
}  // namespace hymba::cuda
#else
namespace hymba::cuda {  // (this build has no CUDA backend: every test skips before using these)
inline void set_gemv_pdl(bool) {}
inline bool gemv_pdl() { return false; }
}  // namespace hymba::cuda
#endif

namespace hymba {
namespace {

using namespace cuda_test;

constexpr double kTol = 1e-5;  // fp32 sums of exact bf16 products, different order only

struct GemvShape {
  int64_t rows, cols;
  int64_t pad_x = 0, pad_y = 0;  // ldx = cols + pad_x, ldy = rows + pad_y
  int64_t x_off = 0, y_off = 0;  // x / y start this many floats into their buffers
  int64_t w_off = 0;             // W starts this many bf16 elements into its buffer (alignment)
};

std::string describe(const GemvShape& s, int64_t n, bool acc) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "n=%ld %ldx%ld ldx+%ld ldy+%ld xoff%ld yoff%ld woff%ld%s", long(n), long(s.rows),
                long(s.cols), long(s.pad_x), long(s.pad_y), long(s.x_off), long(s.y_off), long(s.w_off),
                acc ? " acc" : "");
  return buf;
}

// Finds the first bit difference of two float arrays (-1: identical).
int64_t first_bit_difference(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return int64_t(i);
  return -1;
}

class GemvTest : public CudaVsCpu {
 protected:
  // bf16 weights: host bytes (aligned, for the CPU) and the device copy
  // starting w_off elements into its allocation.
  struct Weights {
    std::vector<uint8_t> host;
    const uint8_t* dev = nullptr;
    MatrixView cpu_view(int64_t rows, int64_t cols) const { return {host.data(), DType::BF16, rows, cols}; }
    MatrixView gpu_view(int64_t rows, int64_t cols) const { return {dev, DType::BF16, rows, cols}; }
  };
  Weights weights(int64_t rows, int64_t cols, int64_t w_off) {
    Weights w;
    w.host = store_as(noise(size_t(rows * cols), 0.0f, 1.0f / std::sqrt(float(std::max<int64_t>(cols, 1)))),
                      DType::BF16);
    std::vector<uint8_t> shifted(size_t(w_off) * 2, 0);
    shifted.insert(shifted.end(), w.host.begin(), w.host.end());
    w.dev = up(shifted) + w_off * 2;
    return w;
  }
  // An n x ld activation buffer (plus `off` leading floats) of noise.
  std::vector<float> acts(int64_t n, int64_t ld, int64_t off, float mean = 0.0f, float sd = 1.0f) {
    return noise(size_t(n * ld + off), mean, sd);
  }
  // The y buffer: NaN poison, with random values in the op's region when accumulating.
  std::vector<float> out_buffer(int64_t n, int64_t rows, int64_t ldy, int64_t off, bool acc) {
    std::vector<float> y(size_t(n * ldy + off), kNaN);
    if (acc) {
      const std::vector<float> r = noise(size_t(n * rows));
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < rows; ++j) y[size_t(off + t * ldy + j)] = r[size_t(t * rows + j)];
    }
    return y;
  }
};

// ---------------------------------------------------------------- matmul

TEST_F(GemvTest, GemvMatmul) {
  struct Case {
    GemvShape s;
    std::vector<int64_t> ns;
  };
  const std::vector<int64_t> all = {1, 2, 3, 4, 5, 6, 7, 8}, few = {1, 4, 8};
  const std::vector<Case> cases = {
      {{37, 1600}, all},                  // odd rows, 4 warps per group
      {{8640, 1600}, few},                // in_proj
      {{132, 3200}, few},                 // x_proj (8 warps per group)
      {{1600, 3200}, few},                // out_proj
      {{1600, 5504}, few},                // down_proj: n=4 stages 132 KB of x (> 48 KB opt-in)
      {{3200, 100}, few},                 // dt_proj: 8-byte chunks
      {{32001, 1600}, {1, 3}},            // lm_head: odd row count
      {{37, 1604, 5, 3, 1, 1, 0}, all},   // 8-byte chunks, strided, misaligned x and y
      {{64, 1600, 0, 0, 0, 0, 1}, few},   // W misaligned (2-byte chunks of one element)
      {{64, 1600, 0, 0, 0, 0, 2}, few},   // W 4-byte aligned
      {{64, 1600, 0, 0, 0, 0, 4}, few},   // W 8-byte aligned
      {{7, 6, 1, 1, 0, 0, 0}, all},       // 4-byte chunks
      {{5, 3, 2, 0, 1, 0, 0}, all},       // 2-byte chunks, fewer columns than threads
      {{1, 1}, {1, 8}},
      {{9, 20000}, {4}},                  // x too long for shared memory: the general path
  };
  for (const Case& c : cases) {
    const GemvShape& s = c.s;
    const Weights w = weights(s.rows, s.cols, s.w_off);
    for (int64_t n : c.ns) {
      const int64_t ldx = s.cols + s.pad_x, ldy = s.rows + s.pad_y;
      const std::vector<float> x = acts(n, ldx, s.x_off);
      const float* dx = up(x) + s.x_off;
      for (bool acc : {false, true}) {
        const std::vector<float> y0 = out_buffer(n, s.rows, ldy, s.y_off, acc);
        std::vector<float> yc = y0;
        cpu_->matmul(w.cpu_view(s.rows, s.cols), x.data() + s.x_off, n, ldx, yc.data() + s.y_off, ldy, acc);
        float* dy = up(y0);
        gpu_->matmul(w.gpu_view(s.rows, s.cols), dx, n, ldx, dy + s.y_off, ldy, acc);
        expect_close("gemv_matmul", describe(s, n, acc), down(dy, y0.size()), yc, kTol);
      }
    }
    TearDown();  // frees this case's buffers
  }
}

// ---------------------------------------------------------------- fused ops

TEST_F(GemvTest, GemvNormMatmul) {
  const std::vector<std::pair<GemvShape, std::vector<int64_t>>> cases = {
      {{8640, 1600}, {1, 2, 8}},             // in_proj after input_norm
      {{32001, 1600}, {1}},                  // lm_head after the final norm
      {{37, 1604, 3, 2, 1, 1, 0}, {1, 3, 5, 8}},
      {{33, 100, 0, 0, 0, 0, 1}, {1, 7}},    // misaligned W
      {{4, 3}, {2}},
      {{5, 3000, 0, 0, 0, 0, 0}, {9}},       // n > 4: the default composition
  };
  const float eps = 1e-6f;
  for (const auto& [s, ns] : cases) {
    const Weights w = weights(s.rows, s.cols, s.w_off);
    const std::vector<float> nw = noise(size_t(s.cols), 1.0f, 0.3f);
    const float* dnw = up(nw);
    for (int64_t n : ns) {
      const int64_t ldx = s.cols + s.pad_x, ldy = s.rows + s.pad_y;
      const std::vector<float> x = acts(n, ldx, s.x_off, 0.3f, 2.0f);
      const float* dx = up(x) + s.x_off;
      float* dscratch = up(std::vector<float>(size_t(n * s.cols), kNaN));
      for (bool acc : {false, true}) {
        const std::vector<float> y0 = out_buffer(n, s.rows, ldy, s.y_off, acc);
        std::vector<float> yc = y0, scratch(size_t(n * s.cols));
        cpu_->norm_matmul(w.cpu_view(s.rows, s.cols), x.data() + s.x_off, n, ldx, nw.data(), eps, scratch.data(),
                          yc.data() + s.y_off, ldy, acc);
        float* dy = up(y0);
        gpu_->norm_matmul(w.gpu_view(s.rows, s.cols), dx, n, ldx, dnw, eps, dscratch, dy + s.y_off, ldy, acc);
        expect_close("gemv_norm_matmul", describe(s, n, acc), down(dy, y0.size()), yc, kTol);
      }
    }
    TearDown();
  }
}

TEST_F(GemvTest, GemvFuseBranchesMatmul) {
  const std::vector<std::pair<GemvShape, std::vector<int64_t>>> cases = {
      {{1600, 3200}, {1, 2, 8}},             // out_proj
      {{37, 1604, 3, 2, 1, 1, 0}, {1, 4, 8}},
      {{20, 77, 0, 0, 0, 0, 1}, {3}},
      {{5, 3000}, {9}},                      // n > 4: the default composition
  };
  const float eps = 1e-6f;
  for (const auto& [s, ns] : cases) {
    const Weights w = weights(s.rows, s.cols, s.w_off);
    const std::vector<float> wa = noise(size_t(s.cols), 1.0f, 0.3f), wb = noise(size_t(s.cols), 0.8f, 0.3f);
    const float* dwa = up(wa);
    const float* dwb = up(wb);
    for (int64_t n : ns) {
      // a and b with different strides (b's is wider by 2 more), both offset by x_off.
      const int64_t lda = s.cols + s.pad_x, ldb = s.cols + s.pad_x + 2, ldy = s.rows + s.pad_y;
      const std::vector<float> a = acts(n, lda, s.x_off, 0.1f, 1.5f), b = acts(n, ldb, s.x_off, -0.2f, 0.7f);
      for (bool acc : {false, true}) {
        const std::vector<float> y0 = out_buffer(n, s.rows, ldy, s.y_off, acc);
        std::vector<float> yc = y0, ac = a, bc = b;  // the default overwrites a and b
        cpu_->fuse_branches_matmul(w.cpu_view(s.rows, s.cols), ac.data() + s.x_off, lda, bc.data() + s.x_off, ldb,
                                   n, wa.data(), wb.data(), eps, yc.data() + s.y_off, ldy, acc);
        float* da = up(a) + s.x_off;
        float* db = up(b) + s.x_off;
        float* dy = up(y0);
        gpu_->fuse_branches_matmul(w.gpu_view(s.rows, s.cols), da, lda, db, ldb, n, dwa, dwb, eps, dy + s.y_off,
                                   ldy, acc);
        expect_close("gemv_fuse_branches", describe(s, n, acc), down(dy, y0.size()), yc, kTol);
      }
    }
    TearDown();
  }
}

TEST_F(GemvTest, GemvNormSwiglu) {
  const std::vector<std::pair<GemvShape, std::vector<int64_t>>> cases = {
      {{5504, 1600}, {1, 3, 8}},             // gate/up of the 1.5B MLP
      {{37, 1604, 3, 2, 1, 1, 0}, {1, 2, 5, 8}},
      {{19, 50, 0, 0, 0, 0, 1}, {4}},        // misaligned Wg (Wu aligned)
      {{6, 3000}, {9}},                      // n > 4: the default composition
  };
  const float eps = 1e-6f;
  for (const auto& [s, ns] : cases) {
    const Weights wg = weights(s.rows, s.cols, s.w_off), wu = weights(s.rows, s.cols, 0);
    const std::vector<float> nw = noise(size_t(s.cols), 1.0f, 0.3f);
    const float* dnw = up(nw);
    for (int64_t n : ns) {
      const int64_t ldx = s.cols + s.pad_x, ldo = s.rows + s.pad_y;
      const std::vector<float> x = acts(n, ldx, s.x_off, 0.3f, 2.0f);
      const std::vector<float> o0(size_t(n * ldo + s.y_off), kNaN);
      std::vector<float> oc = o0, sn(size_t(n * s.cols)), su(size_t(n * s.rows));
      cpu_->norm_swiglu(wg.cpu_view(s.rows, s.cols), wu.cpu_view(s.rows, s.cols), x.data() + s.x_off, n, ldx,
                        nw.data(), eps, sn.data(), su.data(), oc.data() + s.y_off, ldo);
      float* dsn = up(std::vector<float>(sn.size(), kNaN));
      float* dsu = up(std::vector<float>(su.size(), kNaN));
      float* dout = up(o0);
      gpu_->norm_swiglu(wg.gpu_view(s.rows, s.cols), wu.gpu_view(s.rows, s.cols), up(x) + s.x_off, n, ldx, dnw, eps,
                        dsn, dsu, dout + s.y_off, ldo);
      expect_close("gemv_norm_swiglu", describe(s, n, false), down(dout, o0.size()), oc, kTol);
    }
    TearDown();
  }
}

// ---------------------------------------------------------------- batch invariance

// Each op on n tokens, then on each token alone (n = 1): the rows must be
// bit-identical.
TEST_F(GemvTest, GemvBatchInvariance) {
  const float eps = 1e-6f;
  const std::vector<GemvShape> shapes = {
      {8640, 1600},  // 1 warp per group
      {132, 3200},   // 8 warps per group
      {1600, 3200},  // 4 warps per group
      {37, 1604, 3, 2, 1, 1, 0},
      {33, 100, 0, 0, 0, 0, 1},
  };
  auto check_rows = [&](const char* op, const GemvShape& s, int64_t n, const std::vector<float>& batched,
                        const std::vector<std::vector<float>>& alone, int64_t ldy) {
    for (int64_t t = 0; t < n; ++t) {
      const std::vector<float> row_b(batched.begin() + s.y_off + t * ldy,
                                     batched.begin() + s.y_off + t * ldy + s.rows);
      const std::vector<float>& row_a = alone[size_t(t)];
      const int64_t i = first_bit_difference(row_b, row_a);
      EXPECT_EQ(i, -1) << op << " " << describe(s, n, false) << ": token " << t << " computed with " << n
                       << " tokens differs from it alone at output " << i << ": "
                       << (i >= 0 ? row_b[size_t(i)] : 0.0f) << " vs " << (i >= 0 ? row_a[size_t(i)] : 0.0f)
                       << " (seed " << seed_ << ")";
    }
  };
  for (const GemvShape& s : shapes) {
    const Weights w = weights(s.rows, s.cols, s.w_off), w2 = weights(s.rows, s.cols, 0);
    const float* dnw = up(noise(size_t(s.cols), 1.0f, 0.3f));
    const float* dnw2 = up(noise(size_t(s.cols), 0.9f, 0.3f));
    for (int64_t n : {2, 4}) {
      const int64_t ldx = s.cols + s.pad_x, ldy = s.rows + s.pad_y;
      const std::vector<float> x = acts(n, ldx, s.x_off, 0.2f, 1.5f), x2 = acts(n, ldx, s.x_off, -0.1f, 0.8f);
      const std::vector<float> y0(size_t(n * ldy + s.y_off), kNaN);
      float* scratch = up(std::vector<float>(size_t(n * std::max(s.rows, s.cols)), kNaN));
      float* scratch2 = up(std::vector<float>(size_t(n * std::max(s.rows, s.cols)), kNaN));
      // op(xp, x2p, count, yp): runs one op on `count` tokens starting at the given rows.
      auto run = [&](const char* op, auto&& call) {
        float* dy = up(y0);
        call(up(x) + s.x_off, up(x2) + s.x_off, n, dy + s.y_off);
        const std::vector<float> batched = down(dy, y0.size());
        std::vector<std::vector<float>> alone;
        for (int64_t t = 0; t < n; ++t) {
          float* dy1 = up(std::vector<float>(size_t(s.rows), kNaN));
          // fresh copies: a fallback to a default composition could modify its inputs
          call(up(x) + s.x_off + t * ldx, up(x2) + s.x_off + t * ldx, 1, dy1);
          alone.push_back(down(dy1, size_t(s.rows)));
        }
        check_rows(op, s, n, batched, alone, ldy);
      };
      run("matmul", [&](float* xp, float*, int64_t cnt, float* yp) {
        gpu_->matmul(w.gpu_view(s.rows, s.cols), xp, cnt, ldx, yp, ldy, false);
      });
      run("norm_matmul", [&](float* xp, float*, int64_t cnt, float* yp) {
        gpu_->norm_matmul(w.gpu_view(s.rows, s.cols), xp, cnt, ldx, dnw, eps, scratch, yp, ldy, false);
      });
      run("fuse_branches_matmul", [&](float* xp, float* x2p, int64_t cnt, float* yp) {
        gpu_->fuse_branches_matmul(w.gpu_view(s.rows, s.cols), xp, ldx, x2p, ldx, cnt, dnw, dnw2, eps, yp, ldy,
                                   false);
      });
      run("norm_swiglu", [&](float* xp, float*, int64_t cnt, float* yp) {
        gpu_->norm_swiglu(w.gpu_view(s.rows, s.cols), w2.gpu_view(s.rows, s.cols), xp, cnt, ldx, dnw, eps, scratch,
                          scratch2, yp, ldy);
      });
    }
    TearDown();
  }
}

// ---------------------------------------------------------------- timing

double gemv_time_ms(Backend& be, const std::function<void()>& f, int reps = 50) { return time_ms(be, f, reps); }

// Weight-streaming bandwidth of each decode product of Hymba-1.5B (weights
// and activations are zero-filled device memory: contents don't matter for
// bandwidth). Back-to-back launches: includes launch gaps unless the GPU
// runs ahead of the host.
TEST_F(GemvTest, DISABLED_GemvTiming) {
  Backend& g = *gpu_;
  auto report = [](const std::string& what, double bytes, double ms) {
    std::printf("[gemv-timing] %-58s %8.2f us %8.1f GB/s\n", what.c_str(), ms * 1e3, bytes / ms / 1e6);
  };
  auto zeros = [&](size_t bytes) {
    void* p = g.allocate(bytes);
    owned_.push_back(p);
    return p;
  };
  {  // the card's copy bandwidth, for reference (bytes read + written)
    const size_t bytes = size_t(512) << 20;
    void* a = zeros(bytes);
    void* b = zeros(bytes);
    report("reference: device copy 512 MiB (read + write)", 2.0 * double(bytes),
           gemv_time_ms(g, [&] { g.copy(b, a, bytes); }, 10));
  }
  struct Shape {
    const char* name;
    int64_t rows, cols;
  };
  const std::vector<Shape> shapes = {
      {"in_proj", 8640, 1600},  {"in_proj (no kv)", 8000, 1600}, {"x_proj", 132, 3200},
      {"dt_proj", 3200, 100},   {"out_proj", 1600, 3200},        {"gate (one of two)", 5504, 1600},
      {"down_proj", 1600, 5504}, {"lm_head", 32001, 1600},
  };
  const int64_t max_cols = 5504, max_rows = 32001;
  const float* x = static_cast<const float*>(zeros(size_t(8 * max_cols) * 4));
  const float* x2 = static_cast<const float*>(zeros(size_t(8 * max_cols) * 4));
  const float* nw = static_cast<const float*>(zeros(size_t(max_cols) * 4));
  float* y = static_cast<float*>(zeros(size_t(8 * max_rows) * 4));
  float* scratch = static_cast<float*>(zeros(size_t(8 * max_rows) * 4));
  float* scratch2 = static_cast<float*>(zeros(size_t(8 * max_rows) * 4));
  for (int64_t n : {1, 2, 4, 8}) {
    for (const Shape& s : shapes) {
      const MatrixView W{zeros(size_t(s.rows * s.cols) * 2), DType::BF16, s.rows, s.cols};
      const double bytes = double(s.rows * s.cols) * 2.0;
      const std::string tag = " n=" + std::to_string(n) + " " + std::to_string(s.rows) + "x" + std::to_string(s.cols);
      report(std::string("matmul ") + s.name + tag, bytes,
             gemv_time_ms(g, [&] { g.matmul(W, x, n, s.cols, y, s.rows, false); }));
      if (std::string(s.name) == "in_proj" || std::string(s.name) == "lm_head")
        report(std::string("norm_matmul ") + s.name + tag, bytes,
               gemv_time_ms(g, [&] { g.norm_matmul(W, x, n, s.cols, nw, 1e-6f, scratch, y, s.rows, false); }));
      if (std::string(s.name) == "out_proj")
        report(std::string("fuse_branches_matmul ") + s.name + tag, bytes, gemv_time_ms(g, [&] {
                 g.fuse_branches_matmul(W, const_cast<float*>(x), s.cols, const_cast<float*>(x2), s.cols, n, nw, nw,
                                        1e-6f, y, s.rows, false);
               }));
      if (std::string(s.name) == "gate (one of two)") {
        const MatrixView Wu{zeros(size_t(s.rows * s.cols) * 2), DType::BF16, s.rows, s.cols};
        report("norm_swiglu gate+up" + tag, 2.0 * bytes, gemv_time_ms(g, [&] {
                 g.norm_swiglu(W, Wu, x, n, s.cols, nw, 1e-6f, scratch, scratch2, y, s.rows);
               }));
      }
    }
    // One decode step's products over 32 layers (each layer its own weights,
    // so L2 does not hold them) plus lm_head, back to back.
    struct Layer {
      MatrixView in_proj, x_proj, dt_proj, out_proj, gate, up, down;
    };
    std::vector<Layer> layers;
    double step_bytes = 0;
    auto mat = [&](int64_t r, int64_t c) {
      step_bytes += double(r * c) * 2.0;
      return MatrixView{zeros(size_t(r * c) * 2), DType::BF16, r, c};
    };
    for (int l = 0; l < 32; ++l)
      layers.push_back({mat(8640, 1600), mat(132, 3200), mat(3200, 100), mat(1600, 3200), mat(5504, 1600),
                        mat(5504, 1600), mat(1600, 5504)});
    const MatrixView lm_head = mat(32001, 1600);
    const double lm_bytes = double(32001 * 1600) * 2.0;
    // The fused sequence as the model runs it per layer (no dt_proj: it is
    // folded into the scan), with its own bytes.
    double model_bytes = lm_bytes;
    for (const Layer& L : layers)
      for (const MatrixView* m : {&L.in_proj, &L.x_proj, &L.out_proj, &L.gate, &L.up, &L.down})
        model_bytes += double(m->rows * m->cols) * 2.0;
    auto all_products = [&] {
      for (const Layer& L : layers) {
        g.norm_matmul(L.in_proj, x, n, 1600, nw, 1e-6f, scratch, y, 8640, false);
        g.matmul(L.x_proj, x, n, 3200, y, 132, false);
        g.matmul(L.dt_proj, x, n, 100, y, 3200, false);
        g.fuse_branches_matmul(L.out_proj, const_cast<float*>(x), 3200, const_cast<float*>(x2), 3200, n, nw, nw,
                               1e-6f, y, 1600, true);
        g.norm_swiglu(L.gate, L.up, x, n, 1600, nw, 1e-6f, scratch, scratch2, y, 5504);
        g.matmul(L.down, x, n, 5504, y, 1600, true);
      }
      g.norm_matmul(lm_head, x, n, 1600, nw, 1e-6f, scratch, y, 32001, false);
    };
    auto layer_products = [&](const Layer& L) {
      g.norm_matmul(L.in_proj, x, n, 1600, nw, 1e-6f, scratch, y, 8640, false);
      g.matmul(L.x_proj, x, n, 3200, y, 132, false);
      g.fuse_branches_matmul(L.out_proj, const_cast<float*>(x), 3200, const_cast<float*>(x2), 3200, n, nw, nw,
                             1e-6f, y, 1600, true);
      g.norm_swiglu(L.gate, L.up, x, n, 1600, nw, 1e-6f, scratch, scratch2, y, 5504);
      g.matmul(L.down, x, n, 5504, y, 1600, true);
    };
    auto model_step = [&] {
      for (const Layer& L : layers) layer_products(L);
      g.norm_matmul(lm_head, x, n, 1600, nw, 1e-6f, scratch, y, 32001, false);
    };
    const bool pdl_was = cuda::gemv_pdl();
    const std::string ns = " n=" + std::to_string(n);
    for (bool pdl : {true, false}) {
      cuda::set_gemv_pdl(pdl);
      const std::string tag = ns + (pdl ? " PDL on" : " PDL off");
      report("decode step: 32 layers' products + lm_head" + tag, step_bytes, gemv_time_ms(g, all_products, 10));
      report("model step: fused sequence x 32 + lm_head" + tag, model_bytes, gemv_time_ms(g, model_step, 10));
      g.begin_recording();  // a CUDA graph, as the model replays its decode stretches
      model_step();
      const int rec = g.end_recording();
      report("model step, replayed recording" + tag, model_bytes, gemv_time_ms(g, [&] { g.replay(rec); }, 10));
      // As the model replays decode: one recording per layer, replayed back
      // to back; the difference from the single recording is what the
      // boundaries between recordings cost.
      std::vector<int> recs;
      for (const Layer& L : layers) {
        g.begin_recording();
        layer_products(L);
        recs.push_back(g.end_recording());
      }
      report("model step, one recording per layer" + tag, model_bytes - lm_bytes, gemv_time_ms(g, [&] {
               for (int r : recs) g.replay(r);
             }, 10));
      g.drop_recordings();
    }
    cuda::set_gemv_pdl(pdl_was);
    g.synchronize();
    for (void* p : owned_) g.release(p);
    owned_.clear();
    // re-create the shared buffers for the next n
    x = static_cast<const float*>(zeros(size_t(8 * max_cols) * 4));
    x2 = static_cast<const float*>(zeros(size_t(8 * max_cols) * 4));
    nw = static_cast<const float*>(zeros(size_t(max_cols) * 4));
    y = static_cast<float*>(zeros(size_t(8 * max_rows) * 4));
    scratch = static_cast<float*>(zeros(size_t(8 * max_rows) * 4));
    scratch2 = static_cast<float*>(zeros(size_t(8 * max_rows) * 4));
  }
}

}  // namespace
}  // namespace hymba
