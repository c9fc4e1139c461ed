// The CUDA Mamba kernels against the CPU backend: the fused decode step
// (normed_selective_scan for n <= 4: dt/B/C norms, dt_proj and the scan in
// one kernel) and the chunked-parallel selective scan of prefill (every
// chunk length the planner may pick, forced ones through HYMBA_SCAN_CHUNK,
// and the sequential kernel). Same harness as test_cuda_backend.cpp
// (cuda_test_util.h): fresh random inputs (the seed is printed), NaN-poisoned
// outputs, relative L2 error. Without a CUDA build or a GPU every test skips.
//
// Timing (not a correctness test):
//   hymba_cuda_tests --gtest_also_run_disabled_tests --gtest_filter='*MambaTiming*'
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "util/dtype.h"

#include "cuda_test_util.h"

namespace hymba {
namespace {

using namespace cuda_test;

// Sets HYMBA_SCAN_CHUNK (the CUDA scan's chunk-length override) for a scope.
class ScanChunkEnv {
 public:
  explicit ScanChunkEnv(const char* value) {
    if (const char* old = std::getenv("HYMBA_SCAN_CHUNK")) old_ = old, had_ = true;
    if (value) setenv("HYMBA_SCAN_CHUNK", value, 1);
    else unsetenv("HYMBA_SCAN_CHUNK");
  }
  ~ScanChunkEnv() {
    if (had_) setenv("HYMBA_SCAN_CHUNK", old_.c_str(), 1);
    else unsetenv("HYMBA_SCAN_CHUNK");
  }

 private:
  std::string old_;
  bool had_ = false;
};

// The per-channel parameters of a scan, on both sides. dt_bias and A set the
// memory of the recurrence: the defaults give decays of ~0.05..0.99 per step,
// `long_memory` ~0.9999 (states carry across the whole sequence, so the
// chunked scan's carries matter).
struct ScanParams {
  int64_t C = 0, N = 0;
  std::vector<float> dt_bias, A, D, state;  // state: the CPU's, updated by the CPU calls
  const float *d_bias = nullptr, *dA = nullptr, *dD = nullptr;
  float* d_state = nullptr;
};

class CudaMamba : public CudaVsCpu {
 protected:
  ScanParams params(int64_t C, int64_t N, bool long_memory = false) {
    ScanParams p;
    p.C = C, p.N = N;
    p.dt_bias = long_memory ? randn(size_t(C), -6.0f, 0.5f) : randn(size_t(C), -2.0f, 1.0f);
    p.A = long_memory ? randn(size_t(C * N), -3.0f, 1.0f) : randn(size_t(C * N), 0.0f, 1.0f);
    for (float& v : p.A) v = -std::exp(v);
    p.D = randn(size_t(C));
    p.state = randn(size_t(C * N), 0.0f, 0.5f);  // a nonzero initial state
    p.d_bias = up(p.dt_bias), p.dA = up(p.A), p.dD = up(p.D);
    p.d_state = up(p.state);
    return p;
  }
};

// ---------------------------------------------------------------- fused decode step

struct StepCase {
  int64_t C, R, N;
  DType wt;
};

TEST_F(CudaMamba, NormedSelectiveScanStep) {
  const std::vector<StepCase> cases = {
      {3200, 100, 16, DType::BF16},  // Hymba-1.5B
      {3200, 100, 16, DType::F32},
      {37, 5, 16, DType::BF16},      // odd sizes
      {37, 5, 8, DType::F32},
      {50, 128, 5, DType::F16},      // the largest rank the fused kernel takes
      {40, 7, 40, DType::BF16},      // d_state > 16: several states per lane
      {33, 130, 16, DType::BF16},    // rank > 128: the default composition on the GPU
  };
  const float eps = 1e-6f;
  for (const StepCase& sc : cases) {
    const int64_t C = sc.C, R = sc.R, N = sc.N;
    ScanParams p = params(C, N);
    const std::vector<uint8_t> W = store_as(randn(size_t(C * R), 0.0f, 1.0f / std::sqrt(float(R))), sc.wt);
    const std::vector<float> dt_w = uniform(size_t(R), 0.5f, 1.5f);
    const std::vector<float> B_w = uniform(size_t(N), 0.5f, 1.5f);
    const std::vector<float> C_w = uniform(size_t(N), 0.5f, 1.5f);
    const uint8_t* dW = up(W);
    const float* d_dt_w = up(dt_w);
    const float* d_B_w = up(B_w);
    const float* d_C_w = up(C_w);
    // Successive calls carry the state (n = 5: the default composition, between fused steps).
    for (int64_t n : {1, 2, 3, 1, 4, 5, 1}) {
      // As the model lays them out: x_proj's output rows [dt | B | C | pad],
      // u | delta | z as column slices of one wide buffer, y strided.
      const int64_t ld_x = R + 2 * N + 3, ld_in = 3 * C + 1, ldy = C + 2;
      std::vector<float> x = randn(size_t(n * ld_x));
      std::vector<float> in = randn(size_t(n * ld_in));
      std::vector<float> dtn(size_t(n * R), kNaN);
      std::vector<float> yc(size_t(n * ldy), kNaN);
      float* dx = up(x);
      float* din = up(in);
      float* ddtn = up(dtn);
      float* dy = up(yc);

      ScanArgs a = scan_case(n, C, N, ld_in, ld_x, ldy);
      ScanInputNorms ni;
      ni.ld_dt = ld_x;
      ni.eps = eps;
      // CPU: the default composition.
      point_scan_inputs(a, in.data(), x.data() + R);
      a.dt_bias = p.dt_bias.data(), a.A = p.A.data(), a.D = p.D.data(), a.state = p.state.data();
      a.y = yc.data();
      ni.dt_raw = x.data();
      ni.dt_proj = MatrixView{W.data(), sc.wt, C, R};
      ni.dt_norm_w = dt_w.data(), ni.B_norm_w = B_w.data(), ni.C_norm_w = C_w.data();
      ni.dt_scratch = dtn.data();
      cpu_->normed_selective_scan(a, ni);
      // GPU
      point_scan_inputs(a, din, dx + R);
      a.dt_bias = p.d_bias, a.A = p.dA, a.D = p.dD, a.state = p.d_state;
      a.y = dy;
      ni.dt_raw = dx;
      ni.dt_proj = MatrixView{dW, sc.wt, C, R};
      ni.dt_norm_w = d_dt_w, ni.B_norm_w = d_B_w, ni.C_norm_w = d_C_w;
      ni.dt_scratch = ddtn;
      gpu_->normed_selective_scan(a, ni);

      const std::string what = std::string(dtype_name(sc.wt)) + " C=" + std::to_string(C) +
                               " R=" + std::to_string(R) + " N=" + std::to_string(N) + " n=" + std::to_string(n) +
                               (n > 4 || R > 128 ? " (default)" : " (fused)");
      // delta goes through a matmul summed in another order: a little looser than the scan alone.
      expect_close("normed_scan_y", what, down(dy, yc.size()), yc, 2e-5);
      expect_close("normed_scan_state", what, down(p.d_state, p.state.size()), p.state, 2e-5);
      if (HasFailure()) return;  // later steps would only repeat the first failure
    }
  }
}

// ---------------------------------------------------------------- prefill scan

// The scan in double precision on the host (the exact answer to ~1e-15),
// for the long-memory cases: y rows of ldy (untouched elsewhere), state updated.
void scan_reference(const ScanArgs& a, std::vector<double>& state, std::vector<double>& y) {
  for (int64_t c = 0; c < a.channels; ++c)
    for (int64_t t = 0; t < a.n; ++t) {
      const double v = double(a.delta[t * a.ld_delta + c]) + a.dt_bias[c];
      const double dt = v > 20.0 ? v : std::log1p(std::exp(v));
      const double u = a.u[t * a.ldu + c], z = a.z[t * a.ldz + c];
      double acc = double(a.D[c]) * u;
      for (int64_t s = 0; s < a.d_state; ++s) {
        double& h = state[size_t(c * a.d_state + s)];
        h = std::exp(dt * a.A[c * a.d_state + s]) * h + dt * u * a.B[t * a.ldb + s];
        acc += double(a.C[t * a.ldc + s]) * h;
      }
      y[size_t(t * a.ldy + c)] = acc * z / (1.0 + std::exp(-z));
    }
}

// Relative L2 error of got against a double reference, over the elements where ref is not NaN.
template <typename T>
double rel_l2_vs(const std::vector<float>& got, const std::vector<T>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(double(ref[i]))) continue;
    const double d = double(got[i]) - double(ref[i]);
    num += d * d, den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Successive calls (one state carried through, as prefill chunks of one
// prompt) from a nonzero initial state. Long memory: per-step decays of
// ~0.9999, so every step of every call matters to the state; the GPU's exp
// (MUFU ex2, <= 2 ulp, as expf uses) and the CPU's polynomial then differ by
// up to ~n ulp, hence a looser bound, and both are also compared with a
// double-precision reference (printed, for the judgement).
TEST_F(CudaMamba, SelectiveScanChunked) {
  struct Shape {
    int64_t C, N;
    bool long_memory;
  };
  for (const Shape& sh : std::vector<Shape>{{3200, 16, false}, {37, 5, false}, {200, 8, true}, {130, 16, true}}) {
    ScanParams p = params(sh.C, sh.N, sh.long_memory);
    std::vector<double> ref_state(p.state.begin(), p.state.end());
    const double tol = sh.long_memory ? 1e-4 : 1e-5;
    for (int64_t n : {1, 7, 256, 1000, 2048}) {
      const int64_t C = sh.C, N = sh.N;
      const int64_t ld_in = 3 * C + 1, ld_bc = 2 * N + 3, ldy = C + 2;
      const std::vector<float> in = noise(size_t(n * ld_in));
      const std::vector<float> bc = noise(size_t(n * ld_bc));
      ScanArgs a = scan_case(n, C, N, ld_in, ld_bc, ldy);
      std::vector<float> yc(size_t(n * ldy), kNaN);
      point_scan_inputs(a, in.data(), bc.data());
      a.dt_bias = p.dt_bias.data(), a.A = p.A.data(), a.D = p.D.data(), a.state = p.state.data();
      a.y = yc.data();
      std::vector<double> y_ref;
      if (sh.long_memory) {
        y_ref.assign(yc.size(), std::nan(""));
        scan_reference(a, ref_state, y_ref);
      }
      cpu_->selective_scan(a);
      const float* din = up(in);
      const float* dbc = up(bc);
      float* dy = up(std::vector<float>(yc.size(), kNaN));
      point_scan_inputs(a, din, dbc);
      a.dt_bias = p.d_bias, a.A = p.dA, a.D = p.dD, a.state = p.d_state;
      a.y = dy;
      gpu_->selective_scan(a);
      const std::string what = "C=" + std::to_string(C) + " N=" + std::to_string(N) + " n=" + std::to_string(n) +
                               (sh.long_memory ? " long memory" : "");
      const std::vector<float> yg = down(dy, yc.size()), sg = down(p.d_state, p.state.size());
      expect_close("scan_chunked_y", what, yg, yc, tol);
      expect_close("scan_chunked_state", what, sg, p.state, tol);
      if (sh.long_memory)
        std::printf("[cuda-vs-cpu]   vs double: y cpu %.3e gpu %.3e, state cpu %.3e gpu %.3e\n",
                    rel_l2_vs(yc, y_ref), rel_l2_vs(yg, y_ref), rel_l2_vs(p.state, ref_state),
                    rel_l2_vs(sg, ref_state));
      if (HasFailure()) return;
    }
  }
}

// Forced chunk lengths (1: a chunk per token, the most carries; 5: odd
// lengths and a short last chunk; 256: the longest) and the sequential
// kernel (-1), each from the same inputs and initial state.
TEST_F(CudaMamba, SelectiveScanChunkLengths) {
  for (auto [C, N, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{3200, 16, 1000}, {37, 16, 2048},
                                                                          {129, 3, 300}}) {
    ScanParams p = params(C, N, C == 37);
    const int64_t ld_in = 3 * C, ld_bc = 2 * N, ldy = C;  // dense this time
    const std::vector<float> in = noise(size_t(n * ld_in));
    const std::vector<float> bc = noise(size_t(n * ld_bc));
    ScanArgs a = scan_case(n, C, N, ld_in, ld_bc, ldy);
    std::vector<float> yc(size_t(n * ldy), kNaN), sc = p.state;
    point_scan_inputs(a, in.data(), bc.data());
    a.dt_bias = p.dt_bias.data(), a.A = p.A.data(), a.D = p.D.data(), a.state = sc.data();
    a.y = yc.data();
    cpu_->selective_scan(a);
    const float* din = up(in);
    const float* dbc = up(bc);
    point_scan_inputs(a, din, dbc);
    a.dt_bias = p.d_bias, a.A = p.dA, a.D = p.dD;
    const bool long_memory = C == 37;
    const double tol = long_memory ? 1e-4 : 1e-5;
    for (const char* len : {"1", "5", "16", "256", "-1"}) {
      ScanChunkEnv env(len);
      float* ds = up(p.state);
      float* dy = up(std::vector<float>(yc.size(), kNaN));
      a.state = ds, a.y = dy;
      gpu_->selective_scan(a);
      const std::string what = "C=" + std::to_string(C) + " N=" + std::to_string(N) + " n=" + std::to_string(n) +
                               (long_memory ? " long memory" : "") + " HYMBA_SCAN_CHUNK=" + len;
      expect_close("scan_chunked_y", what, down(dy, yc.size()), yc, tol);
      expect_close("scan_chunked_state", what, down(ds, sc.size()), sc, tol);
    }
    if (HasFailure()) return;
  }
}

// ---------------------------------------------------------------- timing

TEST_F(CudaMamba, DISABLED_MambaTiming) {
  Backend& g = *gpu_;
  auto report = [](const std::string& what, double ms) {
    std::printf("[cuda-timing] %-64s %9.4f ms\n", what.c_str(), ms);
  };
  const int64_t C = 3200, R = 100, N = 16;
  ScanParams p = params(C, N);
  // Decode: the fused step against the default composition (5 launches) on the GPU.
  {
    const int64_t n = 1, ld_x = R + 2 * N, ld_in = 3 * C;
    float* x = up(randn(size_t(n * ld_x)));
    float* in = up(randn(size_t(n * ld_in)));
    float* dtn = up(std::vector<float>(size_t(n * R)));
    float* y = up(std::vector<float>(size_t(n * C)));
    const uint8_t* W = up(store_as(randn(size_t(C * R), 0.0f, 0.1f), DType::BF16));
    const float* nw = up(uniform(size_t(R), 0.5f, 1.5f));
    ScanArgs a;
    a.u = in, a.delta = in + C, a.z = in + 2 * C, a.ldu = a.ld_delta = a.ldz = ld_in;
    a.B = x + R, a.C = x + R + N, a.ldb = a.ldc = ld_x;
    a.dt_bias = p.d_bias, a.A = p.dA, a.D = p.dD, a.state = p.d_state;
    a.y = y, a.ldy = C;
    a.n = n, a.channels = C, a.d_state = N;
    const ScanInputNorms ni{x, ld_x, MatrixView{W, DType::BF16, C, R}, nw, nw, nw, 1e-6f, dtn};
    report("normed_selective_scan decode (fused), 3200 ch, rank 100, N 16",
           time_ms(g, [&] { g.normed_selective_scan(a, ni); }, 200));
    report("normed_selective_scan decode (default: 5 launches)",
           time_ms(g, [&] { g.Backend::normed_selective_scan(a, ni); }, 200));
  }
  // Prefill: the chunked scan (automatic and forced chunk lengths) and the sequential kernel.
  {
    const int64_t n = 2048, ld_in = 3 * C;
    const float* in = up(randn(size_t(n * ld_in)));
    const float* bc = up(randn(size_t(n * 2 * N)));
    float* y = up(std::vector<float>(size_t(n * C)));
    ScanArgs a;
    a.u = in, a.delta = in + C, a.z = in + 2 * C, a.ldu = a.ld_delta = a.ldz = ld_in;
    a.B = bc, a.C = bc + N, a.ldb = a.ldc = 2 * N;
    a.dt_bias = p.d_bias, a.A = p.dA, a.D = p.dD, a.state = p.d_state;
    a.y = y, a.ldy = C;
    a.n = n, a.channels = C, a.d_state = N;
    const double gbytes = 4.0 * double(n * C) * 4 / 1e9;  // u, delta, z read once, y written
    for (const char* len : {"0", "16", "32", "64", "128", "256", "-1"}) {
      ScanChunkEnv env(len);
      const double ms = time_ms(g, [&] { g.selective_scan(a); }, 20);
      char buf[160];
      std::snprintf(buf, sizeof buf, "selective_scan prefill 2048 x 3200 x 16, HYMBA_SCAN_CHUNK=%s%s (%.0f GB/s eq.)",
                    len, std::string(len) == "0" ? " (auto)" : std::string(len) == "-1" ? " (sequential)" : "",
                    gbytes / ms * 1e3);
      report(buf, ms);
    }
    float* st = up(std::vector<float>(size_t(3 * C)));
    const float* w = up(randn(size_t(4 * C)));
    const float* b = up(randn(size_t(C)));
    report("causal_conv_silu prefill 2048 x 3200",
           time_ms(g, [&] { g.causal_conv_silu(in, n, ld_in, C, w, b, 4, st, y, C); }, 20));
  }
}

}  // namespace
}  // namespace hymba
