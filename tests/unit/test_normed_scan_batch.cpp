// Backend::normed_selective_scan_batch's default, as the CPU backend runs it:
//  * against a double-precision reference written here from the contract
//    (backend.h / ops.h: per entry, the dt/B/C rmsnorms, dt_proj, softplus,
//    the scan), both with the model's layout (consecutive rows: one
//    composition over all rows) and with each entry's B/C and u/delta/z in
//    buffers of its own (entry by entry);
//  * with the model's layout, bit for bit against the composition that
//    HymbaModel::layer_rest ran before the op existed (three rmsnorms over
//    all rows, dt_proj, selective_scan_batch): CPU results do not change.
// Entries: one token mostly, an empty one and one of three tokens.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "util/dtype.h"

namespace hymba {
namespace {

struct Inputs {
  int count = 0;
  int64_t C = 0, R = 0, N = 0, rows = 0;
  int64_t ld_x = 0, ld_in = 0, ldy = 0;  // x: [dt | B | C | pad], in: [u | delta | z | pad]
  std::vector<int64_t> ns, row;
  std::vector<float> x, in, state;  // state: count blocks of C x N
  DType wt = DType::F32;
  std::vector<uint8_t> W;  // dt_proj [C, R] stored as wt
  std::vector<float> dt_w, B_w, C_w, dt_bias, A, D;
};

Inputs make_inputs(int count, int64_t C, int64_t R, int64_t N, DType wt, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.5f, 1.5f);
  auto randn = [&](size_t n, float mean, float sd) {
    std::vector<float> v(n);
    for (float& f : v) f = mean + sd * nd(rng);
    return v;
  };
  auto unif = [&](size_t n) {
    std::vector<float> v(n);
    for (float& f : v) f = ud(rng);
    return v;
  };
  Inputs in;
  in.count = count, in.C = C, in.R = R, in.N = N, in.wt = wt;
  in.ns.assign(static_cast<size_t>(count), 1);
  if (count >= 4) in.ns[1] = 0, in.ns[3] = 3;
  for (int i = 0; i < count; ++i) in.row.push_back(in.rows), in.rows += in.ns[size_t(i)];
  in.ld_x = R + 2 * N + 3, in.ld_in = 3 * C + 1, in.ldy = C + 2;
  in.x = randn(size_t(in.rows * in.ld_x), 0.0f, 1.0f);
  in.in = randn(size_t(in.rows * in.ld_in), 0.0f, 1.0f);
  in.state = randn(size_t(count * C * N), 0.0f, 0.5f);
  const std::vector<float> w = randn(size_t(C * R), 0.0f, 1.0f / std::sqrt(float(R)));
  in.W.resize(w.size() * dtype_size(wt));
  from_f32(w.data(), w.size(), wt, in.W.data());
  in.dt_w = unif(size_t(R)), in.B_w = unif(size_t(N)), in.C_w = unif(size_t(N));
  in.dt_bias = randn(size_t(C), -2.0f, 1.0f);
  in.A = randn(size_t(C * N), 0.0f, 1.0f);
  for (float& a : in.A) a = -std::exp(a);
  in.D = randn(size_t(C), 0.0f, 1.0f);
  return in;
}

// The op's arguments over buffers laid out like `in` (copies the caller owns).
struct Bound {
  std::vector<ScanArgs> a;
  ScanInputNorms norms;
};
Bound bind(const Inputs& in, float* x, float* u_rows, float* state, float* y, float* dtn) {
  Bound b;
  for (int i = 0; i < in.count; ++i) {
    const int64_t r = in.row[size_t(i)];
    ScanArgs a;
    a.u = u_rows + r * in.ld_in, a.delta = a.u + in.C, a.z = a.u + 2 * in.C;
    a.ldu = a.ld_delta = a.ldz = in.ld_in;
    a.B = x + r * in.ld_x + in.R, a.C = a.B + in.N, a.ldb = a.ldc = in.ld_x;
    a.dt_bias = in.dt_bias.data(), a.A = in.A.data(), a.D = in.D.data();
    a.state = state + int64_t(i) * in.C * in.N;
    a.y = y + r * in.ldy, a.ldy = in.ldy;
    a.n = in.ns[size_t(i)], a.channels = in.C, a.d_state = in.N;
    b.a.push_back(a);
  }
  b.norms = ScanInputNorms{x,           in.ld_x,         MatrixView{in.W.data(), in.wt, in.C, in.R},
                           in.dt_w.data(), in.B_w.data(), in.C_w.data(), 1e-6f, dtn};
  return b;
}

// The contract in double precision: y (rows x ldy, NaN where untouched) and the states.
void reference(const Inputs& in, std::vector<double>& y, std::vector<double>& state) {
  const int64_t C = in.C, R = in.R, N = in.N;
  std::vector<float> W(size_t(C * R));
  to_f32(in.W.data(), in.wt, W.size(), W.data());
  y.assign(size_t(in.rows * in.ldy), std::nan(""));
  state.assign(in.state.begin(), in.state.end());
  auto norm = [&](const float* x, int64_t d, const std::vector<float>& w) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(x[i]) * x[i];
    const double inv = 1.0 / std::sqrt(ss / double(d) + 1e-6);
    std::vector<double> o(static_cast<size_t>(d));
    for (int64_t i = 0; i < d; ++i) o[size_t(i)] = x[i] * inv * w[size_t(i)];
    return o;
  };
  for (int i = 0; i < in.count; ++i)
    for (int64_t t = 0; t < in.ns[size_t(i)]; ++t) {
      const int64_t r = in.row[size_t(i)] + t;
      const float* xr = in.x.data() + r * in.ld_x;
      const std::vector<double> dtn = norm(xr, R, in.dt_w), B = norm(xr + R, N, in.B_w),
                                Cn = norm(xr + R + N, N, in.C_w);
      const float* ur = in.in.data() + r * in.ld_in;
      for (int64_t c = 0; c < C; ++c) {
        double delta = 0;
        for (int64_t k = 0; k < R; ++k) delta += double(W[size_t(c * R + k)]) * dtn[size_t(k)];
        const double v = delta + in.dt_bias[size_t(c)];
        const double dt = v > 20.0 ? v : std::log1p(std::exp(v));
        const double u = ur[c], z = ur[2 * C + c];
        double acc = double(in.D[size_t(c)]) * u;
        for (int64_t s = 0; s < N; ++s) {
          double& h = state[size_t((i * C + c) * N + s)];
          h = std::exp(dt * in.A[size_t(c * N + s)]) * h + dt * u * B[size_t(s)];
          acc += Cn[size_t(s)] * h;
        }
        y[size_t(r * in.ldy + c)] = acc * z / (1.0 + std::exp(-z));
      }
    }
}

double rel_err(const std::vector<float>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(ref[i])) {
      if (!std::isnan(got[i])) return INFINITY;  // written outside the op's rows
      continue;
    }
    num += (got[i] - ref[i]) * (got[i] - ref[i]), den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(NormedScanBatch, DefaultMatchesReferenceInBothLayouts) {
  auto be = make_cpu_backend();
  for (DType wt : {DType::F32, DType::F16}) {
    for (auto [count, C, R, N] : std::vector<std::tuple<int, int64_t, int64_t, int64_t>>{{6, 37, 7, 5}, {4, 64, 100, 16}}) {
      const std::string what = std::string(dtype_name(wt)) + " count=" + std::to_string(count) + " C=" +
                               std::to_string(C) + " R=" + std::to_string(R) + " N=" + std::to_string(N);
      const Inputs in = make_inputs(count, C, R, N, wt, 1234u + uint32_t(count));
      std::vector<double> y_ref, s_ref;
      reference(in, y_ref, s_ref);

      // The model's layout: consecutive rows.
      std::vector<float> x = in.x, u = in.in, st = in.state, y(size_t(in.rows * in.ldy), NAN),
                         dtn(size_t(in.rows * R));
      Bound b = bind(in, x.data(), u.data(), st.data(), y.data(), dtn.data());
      be->normed_selective_scan_batch(b.a.data(), count, b.norms);
      EXPECT_LT(rel_err(y, y_ref), 2e-5) << what << " (joint)";
      EXPECT_LT(rel_err(st, s_ref), 2e-5) << what << " (joint)";

      // Each entry's B | C and u | delta | z in buffers of its own (dt rows stay
      // consecutive rows of one matrix, as the contract says).
      std::vector<float> x2 = in.x, st2 = in.state, y2(size_t(in.rows * in.ldy), NAN), dtn2(size_t(in.rows * R));
      std::vector<float> u2 = in.in;
      Bound b2 = bind(in, x2.data(), u2.data(), st2.data(), y2.data(), dtn2.data());
      std::vector<std::vector<float>> own_bc(static_cast<size_t>(count)), own_u(static_cast<size_t>(count));
      for (int i = 0; i < count; ++i) {
        ScanArgs& a = b2.a[size_t(i)];
        const int64_t r = in.row[size_t(i)], n = in.ns[size_t(i)];
        own_bc[size_t(i)].assign(in.x.begin() + r * in.ld_x, in.x.begin() + (r + n) * in.ld_x);
        own_u[size_t(i)].assign(in.in.begin() + r * in.ld_in, in.in.begin() + (r + n) * in.ld_in);
        own_bc[size_t(i)].push_back(0.0f), own_u[size_t(i)].push_back(0.0f);  // (non-empty)
        a.B = own_bc[size_t(i)].data() + R, a.C = a.B + N;
        a.u = own_u[size_t(i)].data(), a.delta = a.u + C, a.z = a.u + 2 * C;
      }
      be->normed_selective_scan_batch(b2.a.data(), count, b2.norms);
      EXPECT_LT(rel_err(y2, y_ref), 2e-5) << what << " (entry by entry)";
      EXPECT_LT(rel_err(st2, s_ref), 2e-5) << what << " (entry by entry)";
    }
  }
}

TEST(NormedScanBatch, DefaultEqualsTheFormerComposition) {
  auto be = make_cpu_backend();
  for (DType wt : {DType::BF16, DType::F32}) {
    const int count = 5;
    const Inputs in = make_inputs(count, 3200 / 32, 100, 16, wt, 99u);
    const int64_t R = in.R, N = in.N;
    std::vector<float> x = in.x, u = in.in, st = in.state, y(size_t(in.rows * in.ldy), NAN), dtn(size_t(in.rows * R));
    Bound b = bind(in, x.data(), u.data(), st.data(), y.data(), dtn.data());
    be->normed_selective_scan_batch(b.a.data(), count, b.norms);

    std::vector<float> x2 = in.x, u2 = in.in, st2 = in.state, y2(size_t(in.rows * in.ldy), NAN),
                       dtn2(size_t(in.rows * R));
    Bound b2 = bind(in, x2.data(), u2.data(), st2.data(), y2.data(), dtn2.data());
    const ScanInputNorms& nm = b2.norms;
    const int64_t XD = in.ld_x;
    be->rmsnorm(x2.data(), in.rows, R, XD, nm.dt_norm_w, nm.eps, dtn2.data(), R);
    be->rmsnorm(x2.data() + R, in.rows, N, XD, nm.B_norm_w, nm.eps, x2.data() + R, XD);
    be->rmsnorm(x2.data() + R + N, in.rows, N, XD, nm.C_norm_w, nm.eps, x2.data() + R + N, XD);
    be->matmul(nm.dt_proj, dtn2.data(), in.rows, R, u2.data() + in.C, in.ld_in, false);
    be->selective_scan_batch(b2.a.data(), count);
    EXPECT_TRUE(same_bits(y, y2)) << dtype_name(wt);
    EXPECT_TRUE(same_bits(st, st2)) << dtype_name(wt);
  }
}

}  // namespace
}  // namespace hymba
