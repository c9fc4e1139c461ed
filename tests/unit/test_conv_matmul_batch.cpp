// Backend::conv_silu_matmul_batch's default, as the CPU backend runs it,
// against a double-precision reference written here from the contract
// (backend.h / ops.h: per entry, the causal conv over its state then its
// tokens, tap k on the k-th oldest input, plus bias, SiLU; the new state is
// the last k_width - 1 inputs; then y2 = Y W^T over the stacked outputs),
// with entries of different token counts; and its refusal of outputs that
// are not consecutive rows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace hymba {
namespace {

TEST(ConvSiluMatmulBatch, DefaultMatchesReference) {
  auto be = make_cpu_backend();
  const int K = 4, hist = K - 1;
  const int64_t C = 24, R = 7, ldx = C + 5, ldy = C + 2, ld2 = R + 1;
  const std::vector<int64_t> ns = {1, 3, 1, 2, 1};
  const int count = int(ns.size());
  int64_t rows = 0;
  std::vector<int64_t> row0;
  for (int64_t n : ns) row0.push_back(rows), rows += n;

  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  auto randn = [&](size_t n) {
    std::vector<float> v(n);
    for (float& f : v) f = nd(rng);
    return v;
  };
  const std::vector<float> x = randn(size_t(rows * ldx)), w = randn(size_t(K * C)), b = randn(size_t(C));
  const std::vector<float> W = randn(size_t(R * C));
  const std::vector<float> state0 = randn(size_t(count * hist * C));
  std::vector<float> state = state0, y(size_t(rows * ldy), NAN), y2(size_t(rows * ld2), NAN);

  std::vector<ConvArgs> a;
  for (int i = 0; i < count; ++i)
    a.push_back(ConvArgs{x.data() + row0[size_t(i)] * ldx, ldx, ns[size_t(i)], C, w.data(), b.data(), K,
                         state.data() + size_t(i) * hist * C, y.data() + row0[size_t(i)] * ldy, ldy});
  be->conv_silu_matmul_batch(a.data(), count, MatrixView{W.data(), DType::F32, R, C}, y2.data(), ld2);

  for (int i = 0; i < count; ++i) {
    const int64_t n = ns[size_t(i)];
    for (int64_t c = 0; c < C; ++c) {
      // The entry's inputs of channel c, oldest first: its state, then its tokens.
      std::vector<double> in;
      for (int j = 0; j < hist; ++j) in.push_back(state0[size_t(i * hist * C + j * C + c)]);
      for (int64_t t = 0; t < n; ++t) in.push_back(x[size_t((row0[size_t(i)] + t) * ldx + c)]);
      for (int64_t t = 0; t < n; ++t) {
        double acc = b[size_t(c)];
        for (int k = 0; k < K; ++k) acc += double(w[size_t(k * C + c)]) * in[size_t(t + k)];
        const double want = acc / (1.0 + std::exp(-acc));
        EXPECT_NEAR(y[size_t((row0[size_t(i)] + t) * ldy + c)], want, 1e-5 * (1.0 + std::fabs(want)))
            << "entry " << i << " token " << t << " channel " << c;
      }
      for (int j = 0; j < hist; ++j)
        EXPECT_EQ(state[size_t(i * hist * C + j * C + c)], float(in[in.size() - size_t(hist) + size_t(j)]))
            << "entry " << i << " state row " << j << " channel " << c;
    }
  }
  // y2 from the op's own y (the product's part of the contract).
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < R; ++o) {
      double want = 0;
      for (int64_t c = 0; c < C; ++c) want += double(y[size_t(r * ldy + c)]) * W[size_t(o * C + c)];
      EXPECT_NEAR(y2[size_t(r * ld2 + o)], want, 1e-4 * (1.0 + std::fabs(want))) << "row " << r << " output " << o;
    }
}

TEST(ConvSiluMatmulBatch, RefusesOutputsThatAreNotConsecutiveRows) {
  auto be = make_cpu_backend();
  const int64_t C = 8;
  std::vector<float> x(size_t(2 * C), 0.5f), w(size_t(4 * C), 0.1f), b(size_t(C), 0.0f), st(size_t(6 * C), 0.0f);
  std::vector<float> y(size_t(4 * C), 0.0f), y2(8, 0.0f), W(size_t(4 * C), 0.2f);
  const std::vector<float> st0 = st;
  const ConvArgs gap[2] = {ConvArgs{x.data(), C, 1, C, w.data(), b.data(), 4, st.data(), y.data(), C},
                           ConvArgs{x.data() + C, C, 1, C, w.data(), b.data(), 4, st.data() + 3 * C,
                                    y.data() + 2 * C, C}};
  try {
    be->conv_silu_matmul_batch(gap, 2, MatrixView{W.data(), DType::F32, 4, C}, y2.data(), 4);
    ADD_FAILURE() << "no error for outputs with a gap between them";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("consecutive rows"), std::string::npos) << e.what();
  }
  EXPECT_EQ(st, st0) << "nothing may run before the refusal";
}

}  // namespace
}  // namespace hymba
