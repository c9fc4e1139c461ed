// The CUDA Mamba kernels against the CPU backend: the fused decode step
// (normed_selective_scan for n <= 4: dt/B/C norms, dt_proj and the scan in
// one kernel) and its prefill path (one norms launch, dt_proj on padded
// weights, then the scan), and the selective scans of prefill: the one-pass
// scan (short runs; HYMBA_SCAN_ONEPASS=1 forces it) and the chunked-parallel
// one (every chunk length the planner may pick, forced ones through
// HYMBA_SCAN_CHUNK, and the sequential kernel). Same harness as test_cuda_backend.cpp
// (cuda_test_util.h): fresh random inputs (the seed is printed), NaN-poisoned
// outputs, relative L2 error. Without a CUDA build or a GPU every test skips.
//
// Batched decode: normed_selective_scan_batch (the GPU op against the CPU's
// default, and bit for bit against the single-sequence op per entry) and the
// one-token path of causal_conv_silu_batch.
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
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "util/dtype.h"

#include "cuda_test_util.h"
#include "test_util.h"

namespace hymba {
namespace {

using namespace cuda_test;

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

// dt_proj and the dt/B/C norm weights of the fused scan, host and device copies.
struct ScanNormWeights {
  DType wt = DType::F32;
  int64_t C = 0, R = 0;
  std::vector<uint8_t> W;
  std::vector<float> dt_w, B_w, C_w;
  const uint8_t* dW = nullptr;
  const float *d_dt_w = nullptr, *d_B_w = nullptr, *d_C_w = nullptr;
  // ni's weights: the host copies (CPU backend) or the device ones.
  void point(ScanInputNorms& ni, bool device) const {
    ni.dt_proj = MatrixView{device ? static_cast<const void*>(dW) : W.data(), wt, C, R};
    ni.dt_norm_w = device ? d_dt_w : dt_w.data();
    ni.B_norm_w = device ? d_B_w : B_w.data();
    ni.C_norm_w = device ? d_C_w : C_w.data();
  }
};

class CudaMamba : public CudaVsCpu {
 protected:
  ScanNormWeights norm_weights(int64_t C, int64_t R, int64_t N, DType wt) {
    ScanNormWeights w;
    w.wt = wt, w.C = C, w.R = R;
    w.W = store_as(randn(size_t(C * R), 0.0f, 1.0f / std::sqrt(float(R))), wt);
    w.dt_w = uniform(size_t(R), 0.5f, 1.5f);
    w.B_w = uniform(size_t(N), 0.5f, 1.5f);
    w.C_w = uniform(size_t(N), 0.5f, 1.5f);
    w.dW = up(w.W), w.d_dt_w = up(w.dt_w), w.d_B_w = up(w.B_w), w.d_C_w = up(w.C_w);
    return w;
  }
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
      {36, 9, 200, DType::BF16},     // d_state > 128: warp_norm_row's long-row loops for B and C
      {33, 130, 16, DType::BF16},    // rank > 128: the default composition on the GPU
  };
  const float eps = 1e-6f;
  for (const StepCase& sc : cases) {
    const int64_t C = sc.C, R = sc.R, N = sc.N;
    ScanParams p = params(C, N);
    const ScanNormWeights nw = norm_weights(C, R, N, sc.wt);
    // Successive calls carry the state (n = 5, 37, 300: more tokens than the
    // fused step takes, between fused steps; bf16 weights: the prefill path,
    // the others the default composition). The two calls with a chunk
    // length (the chunked scan forced, as at >= 1280 tokens) cover its
    // first pass handing dt over to the second in the prefill path's delta
    // scratch, the last chunk (13 and 12 steps) included.
    struct Call {
      int64_t n;
      const char* chunk;  // HYMBA_SCAN_CHUNK, or null: the automatic choice
    };
    for (const Call call : {Call{1, nullptr}, Call{2, nullptr}, Call{3, nullptr}, Call{1, nullptr}, Call{4, nullptr},
                            Call{5, nullptr}, Call{1, nullptr}, Call{37, nullptr}, Call{300, nullptr},
                            Call{77, "16"}, Call{1, nullptr}, Call{300, "32"}, Call{1, nullptr}}) {
      const int64_t n = call.n;
      test::ScopedEnv onepass("HYMBA_SCAN_ONEPASS", call.chunk ? "0" : nullptr);
      test::ScopedEnv chunk("HYMBA_SCAN_CHUNK", call.chunk);
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
      nw.point(ni, false);
      ni.dt_scratch = dtn.data();
      cpu_->normed_selective_scan(a, ni);
      // GPU
      point_scan_inputs(a, din, dx + R);
      a.dt_bias = p.d_bias, a.A = p.dA, a.D = p.dD, a.state = p.d_state;
      a.y = dy;
      ni.dt_raw = dx;
      nw.point(ni, true);
      ni.dt_scratch = ddtn;
      gpu_->normed_selective_scan(a, ni);

      const std::string what = std::string(dtype_name(sc.wt)) + " C=" + std::to_string(C) +
                               " R=" + std::to_string(R) + " N=" + std::to_string(N) + " n=" + std::to_string(n) +
                               (n > 4 ? (sc.wt == DType::BF16 ? " (prefill path)" : " (default)")
                                      : R > 128 ? " (default)" : " (fused)") +
                               (call.chunk ? std::string(" HYMBA_SCAN_CHUNK=") + call.chunk : std::string());
      // delta goes through a matmul summed in another order: a little looser than the scan alone.
      expect_close("normed_scan_y", what, down(dy, yc.size()), yc, 2e-5);
      expect_close("normed_scan_state", what, down(p.d_state, p.state.size()), p.state, 2e-5);
      if (HasFailure()) return;  // later steps would only repeat the first failure
    }
  }
}

// ---------------------------------------------------------------- batched fused decode step

// Elements whose bits differ (NaN poison included: it must match too).
size_t bit_mismatches(const std::vector<float>& a, const std::vector<float>& b, size_t& first) {
  size_t bad = 0;
  first = SIZE_MAX;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      if (first == SIZE_MAX) first = i;
      ++bad;
    }
  return bad + (a.size() > b.size() ? a.size() - b.size() : b.size() - a.size());
}

struct BatchStepCase {
  int count;
  int64_t C, R, N;
  DType wt;
  bool misalign;     // states 4 bytes off 16-byte alignment (the kernel's scalar path)
  bool mixed;        // an empty entry, a two-token entry and one with its own A/D/dt_bias (all fall back)
  const char* note;
};

// normed_selective_scan_batch: the GPU op against the CPU backend (whose
// default composes rmsnorm x 3, dt_proj and selective_scan_batch over all
// rows), and each entry against the GPU's single-sequence op for that
// entry alone, which must give the same bits (batch invariance). Entries are
// laid out as the model lays them out: consecutive rows of x_proj's output
// [dt | B | C | pad] and of u | delta | z, each with its own state. Two
// rounds: the states carry over.
TEST_F(CudaMamba, NormedSelectiveScanBatch) {
  const std::vector<BatchStepCase> cases = {
      {128, 3200, 100, 16, DType::BF16, false, false, "Hymba-1.5B, 128 sequences"},
      // Several entry groups per block, the last one short; unaligned states.
      {125, 3200, 100, 16, DType::BF16, true, false, "125 sequences, unaligned states"},
      {141, 3200, 100, 16, DType::F16, false, true, "141 sequences, fp16 dt_proj"},
      {7, 3200, 100, 16, DType::F32, false, true, "fp32 dt_proj"},
      {6, 3200, 100, 16, DType::BF16, true, false, "unaligned states"},
      {9, 37, 5, 16, DType::BF16, false, true, "odd sizes"},
      {5, 37, 5, 8, DType::F32, false, false, "d_state 8"},
      {6, 50, 128, 5, DType::F16, false, true, "rank 128, d_state 5"},
      {3, 40, 7, 40, DType::BF16, false, false, "d_state > 16: single op per entry"},
      {4, 33, 130, 16, DType::BF16, false, false, "rank > 128: single op (default) per entry"},
      {1, 65, 9, 16, DType::BF16, false, false, "one entry"},
  };
  const float eps = 1e-6f;
  for (const BatchStepCase& bc : cases) {
    const int count = bc.count;
    const int64_t C = bc.C, R = bc.R, N = bc.N;
    const ScanParams p = params(C, N);
    const ScanParams other = params(C, N);  // the odd entry's own parameters (mixed)
    const ScanNormWeights nw = norm_weights(C, R, N, bc.wt);
    auto own = [&](int i) { return bc.mixed && i == count - 1; };

    // States: one pool, entry i at soff[i] (+1 float: unaligned).
    std::vector<size_t> soff(static_cast<size_t>(count));
    size_t pool = bc.misalign ? 1 : 0;
    for (int i = 0; i < count; ++i) soff[size_t(i)] = pool, pool += size_t(C * N);
    std::vector<float> sc = noise(pool, 0.0f, 0.5f);
    float* ds_batch = up(sc);
    float* ds_single = up(sc);

    for (int round = 0; round < 2; ++round) {
      std::vector<int64_t> ns(static_cast<size_t>(count), 1);
      if (bc.mixed) ns[1] = 0, ns[2] = 2;
      std::vector<int64_t> row(static_cast<size_t>(count));
      int64_t rows = 0;
      for (int i = 0; i < count; ++i) row[size_t(i)] = rows, rows += ns[size_t(i)];
      const int64_t ld_x = R + 2 * N + 3, ld_in = 3 * C + 1, ldy = C + 2;
      const std::vector<float> x = randn(size_t(rows * ld_x));
      const std::vector<float> in = randn(size_t(rows * ld_in));
      const std::vector<float> poison(size_t(rows * ldy), kNaN);
      // The CPU's copies (it normalises B and C in place and writes delta).
      std::vector<float> xc = x, in_cpu = in, yc = poison, dtn(size_t(rows * R), kNaN);
      float* dx_b = up(x);
      float* dx_s = up(x);
      float* din = up(in);
      float* din_s = up(in);
      float* dy_b = up(poison);
      float* dy_s = up(poison);
      float* ddtn_b = up(dtn);
      float* ddtn_s = up(dtn);

      std::vector<ScanArgs> ac(static_cast<size_t>(count)), ab(static_cast<size_t>(count)), as(static_cast<size_t>(count));
      for (int i = 0; i < count; ++i) {
        const size_t k = size_t(i);
        const ScanParams& q = own(i) ? other : p;
        ScanArgs a = scan_case(ns[k], C, N, ld_in, ld_x, ldy);
        point_scan_inputs(a, in_cpu.data() + row[k] * ld_in, xc.data() + row[k] * ld_x + R);
        a.dt_bias = q.dt_bias.data(), a.A = q.A.data(), a.D = q.D.data(), a.state = sc.data() + soff[k];
        a.y = yc.data() + row[k] * ldy;
        ac[k] = a;
        point_scan_inputs(a, din + row[k] * ld_in, dx_b + row[k] * ld_x + R);
        a.dt_bias = q.d_bias, a.A = q.dA, a.D = q.dD, a.state = ds_batch + soff[k];
        a.y = dy_b + row[k] * ldy;
        ab[k] = a;
        point_scan_inputs(a, din_s + row[k] * ld_in, dx_s + row[k] * ld_x + R);
        a.state = ds_single + soff[k], a.y = dy_s + row[k] * ldy;
        as[k] = a;
      }
      ScanInputNorms ni;
      ni.ld_dt = ld_x;
      ni.eps = eps;
      ni.dt_raw = xc.data();
      nw.point(ni, false);
      ni.dt_scratch = dtn.data();
      cpu_->normed_selective_scan_batch(ac.data(), count, ni);

      ni.dt_raw = dx_b;
      nw.point(ni, true);
      ni.dt_scratch = ddtn_b;
      gpu_->normed_selective_scan_batch(ab.data(), count, ni);
      // Each entry alone through the single-sequence op (its own copies of the inputs).
      for (int i = 0; i < count; ++i) {
        const size_t k = size_t(i);
        ScanInputNorms n1 = ni;
        n1.dt_raw = dx_s + row[k] * ld_x;
        n1.dt_scratch = ddtn_s + row[k] * R;
        gpu_->normed_selective_scan(as[k], n1);
      }

      const std::string what = std::to_string(count) + "x " + dtype_name(bc.wt) + " C=" + std::to_string(C) +
                               " R=" + std::to_string(R) + " N=" + std::to_string(N) + " round " +
                               std::to_string(round) + " (" + bc.note + ")";
      const std::vector<float> yb = down(dy_b, yc.size()), sb = down(ds_batch, sc.size());
      expect_close("normed_scan_batch_y", what, yb, yc, 2e-5);
      expect_close("normed_scan_batch_state", what, sb, sc, 2e-5);
      size_t first = 0;
      const size_t bad_y = bit_mismatches(yb, down(dy_s, yc.size()), first);
      EXPECT_EQ(bad_y, 0u) << what << ": y differs from the single-sequence op, first at " << first << " (seed "
                           << seed_ << ")";
      const size_t bad_s = bit_mismatches(sb, down(ds_single, sc.size()), first);
      EXPECT_EQ(bad_s, 0u) << what << ": state differs from the single-sequence op, first at " << first
                           << " (seed " << seed_ << ")";
      if (HasFailure()) return;
    }
  }
}

// causal_conv_silu_batch in decode (entries of one token: a launch of their
// own, 16-byte accesses where an entry's rows allow) against the CPU backend
// and, bit for bit, against the GPU's single-sequence op per entry. Entries
// as the model lays them out (x in rows of in_proj's output, y dense, a
// state block each); unaligned rows (the scalar path); mixed in, an entry of
// three tokens and one of another width (the general batched kernel).
TEST_F(CudaMamba, ConvSiluBatchOneToken) {
  struct Case {
    int count;
    int64_t C, ldx_pad;
    int kw;
    bool mixed;
    const char* note;
  };
  const std::vector<Case> cases = {
      {128, 3200, 0, 4, false, "Hymba-1.5B, 128 sequences"},
      {33, 3200, 1, 4, false, "unaligned x rows"},
      {9, 37, 0, 3, true, "odd channels, mixed"},
      {5, 64, 0, 1, false, "width 1 (no state)"},
      {6, 40, 4, 2, true, "width 2, mixed"},
  };
  for (const Case& cs : cases) {
    const int count = cs.count;
    const int64_t C = cs.C, ldx = 2 * C + cs.ldx_pad;
    const int kw2 = cs.kw == 4 ? 2 : 4;
    auto odd = [&](int i) { return cs.mixed && i == count - 1; };  // the other width
    auto width = [&](int i) { return odd(i) ? kw2 : cs.kw; };
    const std::vector<float> w = randn(size_t(cs.kw * C), 0.0f, 0.5f), b = randn(size_t(C));
    const std::vector<float> w2 = randn(size_t(kw2 * C), 0.0f, 0.5f);
    const float* dw = up(w);
    const float* dw2 = up(w2);
    const float* db = up(b);
    std::vector<size_t> soff(static_cast<size_t>(count));
    size_t state_size = 0;
    for (int i = 0; i < count; ++i) soff[size_t(i)] = state_size, state_size += size_t(std::max(1, width(i) - 1) * C);
    std::vector<float> sc = noise(state_size);
    float* ds_b = up(sc);
    float* ds_s = up(sc);
    for (int round = 0; round < 2; ++round) {
      std::vector<int64_t> ns(static_cast<size_t>(count), 1), row(static_cast<size_t>(count));
      if (cs.mixed) ns[2] = 3;
      int64_t rows = 0;
      for (int i = 0; i < count; ++i) row[size_t(i)] = rows, rows += ns[size_t(i)];
      const std::vector<float> x = noise(size_t(rows * ldx));
      const std::vector<float> poison(size_t(rows * C), kNaN);
      std::vector<float> yc = poison;
      const float* dx = up(x);
      float* dy_b = up(poison);
      float* dy_s = up(poison);
      std::vector<ConvArgs> da(static_cast<size_t>(count));
      for (int i = 0; i < count; ++i) {
        const size_t k = size_t(i);
        cpu_->causal_conv_silu(x.data() + row[k] * ldx, ns[k], ldx, C, (odd(i) ? w2 : w).data(), b.data(), width(i),
                               sc.data() + soff[k], yc.data() + row[k] * C, C);
        da[k] = ConvArgs{dx + row[k] * ldx, ldx, ns[k], C, odd(i) ? dw2 : dw, db, width(i), ds_b + soff[k],
                         dy_b + row[k] * C, C};
      }
      gpu_->causal_conv_silu_batch(da.data(), count);
      for (int i = 0; i < count; ++i) {
        const ConvArgs& a = da[size_t(i)];
        gpu_->causal_conv_silu(a.x, a.n, a.ldx, a.channels, a.weight, a.bias, a.k_width, ds_s + soff[size_t(i)],
                               dy_s + row[size_t(i)] * C, a.ldy);
      }
      const std::string what = std::to_string(count) + "x C=" + std::to_string(C) + " k=" + std::to_string(cs.kw) +
                               " round " + std::to_string(round) + " (" + cs.note + ")";
      const std::vector<float> yb = down(dy_b, yc.size()), sb = down(ds_b, sc.size());
      expect_close("conv_batch1_y", what, yb, yc, 1e-5);
      expect_close("conv_batch1_state", what, sb, sc, 0.0);
      size_t first = 0;
      EXPECT_EQ(bit_mismatches(yb, down(dy_s, yc.size()), first), 0u)
          << what << ": y differs from the single-sequence op, first at " << first << " (seed " << seed_ << ")";
      EXPECT_EQ(bit_mismatches(sb, down(ds_s, sc.size()), first), 0u)
          << what << ": state differs from the single-sequence op, first at " << first << " (seed " << seed_ << ")";
      if (HasFailure()) return;
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
struct ScanShape {
  int64_t C, N;
  bool long_memory;
};
class CudaScan : public CudaMamba {
 protected:
  // pad: extra floats per row of the inputs (odd: rows not 16-byte aligned).
  // onepass: HYMBA_SCAN_ONEPASS for the calls (null: unset, the default).
  void successive_calls(const std::vector<ScanShape>& shapes, const std::vector<int64_t>& ns, int64_t pad,
                        const char* env_value, const char* onepass = nullptr) {
    test::ScopedEnv env("HYMBA_SCAN_CHUNK", env_value);
    test::ScopedEnv env_onepass("HYMBA_SCAN_ONEPASS", onepass);
    for (const ScanShape& sh : shapes) {
      ScanParams p = params(sh.C, sh.N, sh.long_memory);
      std::vector<double> ref_state(p.state.begin(), p.state.end());
      const double tol = sh.long_memory ? 1e-4 : 1e-5;
      for (int64_t n : ns) {
        const int64_t C = sh.C, N = sh.N;
        const int64_t ld_in = 3 * C + pad, ld_bc = 2 * N + pad, ldy = C + 2;
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
                                 (sh.long_memory ? " long memory" : "") + " pad=" + std::to_string(pad) +
                                 " HYMBA_SCAN_CHUNK=" + (env_value ? env_value : "(unset)") +
                                 " HYMBA_SCAN_ONEPASS=" + (onepass ? onepass : "(unset)");
        const std::vector<float> yg = down(dy, yc.size()), sg = down(p.d_state, p.state.size());
        expect_close("scan_y", what, yg, yc, tol);
        expect_close("scan_state", what, sg, p.state, tol);
        if (sh.long_memory)
          std::printf("[cuda-vs-cpu]   vs double: y cpu %.3e gpu %.3e, state cpu %.3e gpu %.3e\n",
                      rel_l2_vs(yc, y_ref), rel_l2_vs(yg, y_ref), rel_l2_vs(p.state, ref_state),
                      rel_l2_vs(sg, ref_state));
        if (HasFailure()) return;
      }
    }
  }
};

// Rows not 16-byte aligned: the chunked scan at every length the planner picks.
TEST_F(CudaScan, SelectiveScanChunked) {
  successive_calls({{3200, 16, false}, {37, 5, false}, {200, 8, true}, {130, 16, true}}, {1, 7, 256, 1000, 2048}, 1,
                   nullptr, "0");
}

// The one-pass scan (HYMBA_SCAN_ONEPASS=1: at every length from 16 tokens
// on), with rows 16-byte aligned (pad 0: copied 16 bytes at a time where
// d_state is 16 and the channel count a multiple of 4) and not (pad 1);
// partial blocks of channels, d_state below 16, runs that end inside a tile
// or a group of 8, and a call below 16 tokens (the chunked scan) between
// them, all carrying one state.
TEST_F(CudaScan, SelectiveScanOnePass) {
  const std::vector<ScanShape> shapes{{3200, 16, false}, {36, 16, false}, {37, 5, false}, {200, 8, true},
                                      {130, 16, true}};
  for (const int64_t pad : {0, 1}) {
    successive_calls(shapes, {64, 7, 100, 1000, 16, 2048}, pad, nullptr, "1");
    if (HasFailure()) return;
  }
}

// Forced chunk lengths (1: a chunk per token, the most carries; 5: odd
// lengths and a short last chunk; 256: the longest) and the sequential
// kernel (-1), each from the same inputs and initial state.
TEST_F(CudaScan, SelectiveScanChunkLengths) {
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
    test::ScopedEnv chunked("HYMBA_SCAN_ONEPASS", "0");
    for (const char* len : {"1", "5", "16", "256", "-1"}) {
      test::ScopedEnv env("HYMBA_SCAN_CHUNK", len);
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
  // Prefill: the one-pass scan, the chunked scan (automatic and forced chunk lengths).
  for (const int64_t n : {int64_t(64), int64_t(256), int64_t(512), int64_t(1024), int64_t(2048), int64_t(8192)}) {
    const int64_t ld_in = 3 * C;
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
    {
      test::ScopedEnv env("HYMBA_SCAN_ONEPASS", "1");
      const double ms = time_ms(g, [&] { g.selective_scan(a); }, 20);
      char buf[160];
      std::snprintf(buf, sizeof buf, "selective_scan prefill %lld x 3200 x 16, one pass (%.0f GB/s eq.)",
                    static_cast<long long>(n), gbytes / ms * 1e3);
      report(buf, ms);
    }
    test::ScopedEnv chunked("HYMBA_SCAN_ONEPASS", "0");
    for (const char* len : {"0", "96", "160"}) {
      test::ScopedEnv env("HYMBA_SCAN_CHUNK", len);
      const double ms = time_ms(g, [&] { g.selective_scan(a); }, 20);
      char buf[160];
      std::snprintf(buf, sizeof buf, "selective_scan prefill %lld x 3200 x 16, HYMBA_SCAN_CHUNK=%s%s (%.0f GB/s eq.)",
                    static_cast<long long>(n), len, std::string(len) == "0" ? " (auto)" : "",
                    gbytes / ms * 1e3);
      report(buf, ms);
    }
    float* st = up(std::vector<float>(size_t(3 * C)));
    const float* w = up(randn(size_t(4 * C)));
    const float* b = up(randn(size_t(C)));
    report("causal_conv_silu prefill " + std::to_string(n) + " x 3200",
           time_ms(g, [&] { g.causal_conv_silu(in, n, ld_in, C, w, b, 4, st, y, C); }, 20));
  }
  // Batched decode, 128 sequences of one token (the model's layout): the
  // fused op against its default (rmsnorm x 3, dt_proj, selective_scan_batch),
  // and the one-token conv. GB/s: the states' bytes (read + written) per call.
  {
    const int count = 128;
    const int64_t ld_x = R + 2 * N, ld_in = 3 * C;
    float* x = up(randn(size_t(count * ld_x)));
    float* in = up(randn(size_t(count * ld_in)));
    float* y = up(std::vector<float>(size_t(count * C)));
    float* dtn = up(std::vector<float>(size_t(count * R)));
    float* states = up(noise(size_t(count * C * N), 0.0f, 0.5f));
    const uint8_t* W = up(store_as(randn(size_t(C * R), 0.0f, 0.1f), DType::BF16));
    const float* nw = up(uniform(size_t(R), 0.5f, 1.5f));
    std::vector<ScanArgs> e(static_cast<size_t>(count));
    for (int i = 0; i < count; ++i) {
      ScanArgs& a = e[size_t(i)];
      a.u = in + i * ld_in, a.delta = a.u + C, a.z = a.u + 2 * C, a.ldu = a.ld_delta = a.ldz = ld_in;
      a.B = x + i * ld_x + R, a.C = a.B + N, a.ldb = a.ldc = ld_x;
      a.dt_bias = p.d_bias, a.A = p.dA, a.D = p.dD, a.state = states + int64_t(i) * C * N;
      a.y = y + i * C, a.ldy = C;
      a.n = 1, a.channels = C, a.d_state = N;
    }
    const ScanInputNorms ni{x, ld_x, MatrixView{W, DType::BF16, C, R}, nw, nw, nw, 1e-6f, dtn};
    const double gb = 2.0 * double(count * C * N) * 4 / 1e9;
    char buf[160];
    double ms = time_ms(g, [&] { g.normed_selective_scan_batch(e.data(), count, ni); }, 50);
    std::snprintf(buf, sizeof buf, "normed_selective_scan_batch 128 x 3200 x 16 (fused, %.0f GB/s of state)",
                  gb / ms * 1e3);
    report(buf, ms);
    ms = time_ms(g, [&] { g.Backend::normed_selective_scan_batch(e.data(), count, ni); }, 50);
    std::snprintf(buf, sizeof buf, "normed_selective_scan_batch (default: 5 launches, %.0f GB/s of state)",
                  gb / ms * 1e3);
    report(buf, ms);
    float* cst = up(noise(size_t(count * 3 * C)));
    const float* w = up(randn(size_t(4 * C)));
    const float* b = up(randn(size_t(C)));
    std::vector<ConvArgs> ca(static_cast<size_t>(count));
    for (int i = 0; i < count; ++i)
      ca[size_t(i)] = ConvArgs{in + i * ld_in, ld_in, 1, C, w, b, 4, cst + int64_t(i) * 3 * C, y + i * C, C};
    const double conv_gb = double(count * C) * 4 * (2 * 3 + 2) / 1e9;  // state both ways, x, y
    ms = time_ms(g, [&] { g.causal_conv_silu_batch(ca.data(), count); }, 50);
    std::snprintf(buf, sizeof buf, "causal_conv_silu_batch 128 x 3200, one token (%.0f GB/s)", conv_gb / ms * 1e3);
    report(buf, ms);
  }
}

}  // namespace
}  // namespace hymba
