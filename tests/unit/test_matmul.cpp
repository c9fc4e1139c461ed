// hymba::cpu::matmul against a naive double-precision reference, for every
// ISA path this CPU can run x every weight dtype, over awkward shapes (tiny,
// odd, K tails, several cache blocks), leading dimensions wider than the
// data, and accumulate on/off. Also: nothing outside y's rows is written,
// nothing past W's end or x's columns is read, bf16 rounding of x is exact.
#include <gtest/gtest.h>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/cpu/matmul.h"
#include "util/dtype.h"
#include "util/error.h"

namespace hymba {
namespace {

using cpu::matmul;

// Weights of one dtype, with their exact fp32 values for the reference.
struct Weights {
  DType dtype;
  int64_t rows, cols;
  std::vector<uint8_t> bytes;
  std::vector<float> exact;  // the value each stored element represents
  MatrixView view() const { return MatrixView{bytes.data(), dtype, rows, cols}; }
};

Weights random_weights(DType dt, int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Weights w{dt, rows, cols, std::vector<uint8_t>(size_t(rows * cols) * dtype_size(dt)),
            std::vector<float>(size_t(rows * cols))};
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float v = dist(rng);
    if (dt == DType::F32) {
      std::memcpy(w.bytes.data() + 4 * i, &v, 4);
      w.exact[i] = v;
    } else if (dt == DType::BF16) {
      const uint16_t h = f32_to_bf16(v);
      std::memcpy(w.bytes.data() + 2 * i, &h, 2);
      w.exact[i] = bf16_to_f32(h);
    } else {
      const uint16_t h = f32_to_f16(v);
      std::memcpy(w.bytes.data() + 2 * i, &h, 2);
      w.exact[i] = f16_to_f32(h);
    }
  }
  return w;
}

// What matmul must compute, in double, plus the scale of the fp32 rounding
// error it may make: sum |w||x| per output.
void reference(const Weights& w, const std::vector<float>& x, int64_t n, int64_t ldx,
               std::vector<double>& ref, std::vector<double>& scale) {
  ref.assign(size_t(n * w.rows), 0.0);
  scale.assign(size_t(n * w.rows), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t r = 0; r < w.rows; ++r) {
      double s = 0, a = 0;
      for (int64_t c = 0; c < w.cols; ++c) {
        // bf16 weights: the model computes with x rounded to bf16.
        const float xv = w.dtype == DType::BF16 ? round_to_bf16(x[t * ldx + c]) : x[t * ldx + c];
        const double p = double(w.exact[r * w.cols + c]) * double(xv);
        s += p;
        a += std::fabs(p);
      }
      ref[t * w.rows + r] = s;
      scale[t * w.rows + r] = a;
    }
}

constexpr float kSentinel = -7777.25f;
constexpr double kRelTol = 1e-5;  // fp32 accumulation over up to a few thousand terms

// Compares y (with ld ldy) against y0 + ref, and checks that every element of
// y outside the rows x n result still holds kSentinel.
testing::AssertionResult check_result(const std::vector<float>& y, int64_t n, int64_t rows,
                                      int64_t ldy, const std::vector<float>& y0,
                                      const std::vector<double>& ref,
                                      const std::vector<double>& scale, bool accumulate) {
  int bad = 0;
  std::string first;
  for (size_t i = 0; i < y.size(); ++i) {
    const int64_t t = int64_t(i) / ldy, r = int64_t(i) % ldy;
    if (t >= n || r >= rows) {
      if (std::memcmp(&y[i], &kSentinel, 4) != 0 && bad++ == 0)
        first = "y[" + std::to_string(i) + "] outside the result was overwritten";
      continue;
    }
    const double base = accumulate ? double(y0[i]) : 0.0;
    const double want = base + ref[t * rows + r];
    const double tol = kRelTol * scale[t * rows + r] + 1e-6 * std::fabs(base);
    if (!(std::fabs(double(y[i]) - want) <= tol) && bad++ == 0)
      first = "t=" + std::to_string(t) + " r=" + std::to_string(r) + ": got " +
              std::to_string(y[i]) + ", want " + std::to_string(want) + " (tol " +
              std::to_string(tol) + ")";
  }
  if (bad == 0) return testing::AssertionSuccess();
  return testing::AssertionFailure() << bad << " bad elements; first: " << first;
}

struct Case {
  int64_t rows, cols, n;
  int64_t xpad, ypad;
  bool accumulate;
};

// Runs one case: returns the check (and leaves y for tests that tamper with it).
testing::AssertionResult run_case(DType dt, const Case& c, std::mt19937& rng,
                                  std::vector<float>* y_out = nullptr, bool corrupt = false) {
  const Weights w = random_weights(dt, c.rows, c.cols, rng);
  const int64_t ldx = c.cols + c.xpad, ldy = c.rows + c.ypad;
  std::normal_distribution<float> dist(0.0f, 1.0f);
  // Columns beyond cols hold NaN: reading them would poison the result.
  std::vector<float> x(size_t(c.n * ldx), std::numeric_limits<float>::quiet_NaN());
  for (int64_t t = 0; t < c.n; ++t)
    for (int64_t k = 0; k < c.cols; ++k) x[t * ldx + k] = dist(rng);
  std::vector<float> y(size_t(c.n * ldy), kSentinel);
  for (int64_t t = 0; t < c.n; ++t)
    for (int64_t r = 0; r < c.rows; ++r) y[t * ldy + r] = c.accumulate ? dist(rng) : kSentinel;
  const std::vector<float> y0 = y;
  std::vector<double> ref, scale;
  reference(w, x, c.n, ldx, ref, scale);
  matmul(w.view(), x.data(), c.n, ldx, y.data(), ldy, c.accumulate);
  if (corrupt) {
    // A deliberately wrong result: one output off by 1e-3 of its scale.
    const size_t i = size_t((c.n / 2) * ldy + c.rows / 2);
    y[i] += float(1e-3 * scale[(c.n / 2) * c.rows + c.rows / 2]);
  }
  if (y_out) *y_out = y;
  return check_result(y, c.n, c.rows, ldy, y0, ref, scale, c.accumulate);
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  const int64_t shapes[][2] = {{1, 1},   {1, 5},    {3, 1},     {2, 31},   {5, 7},   {4, 32},
                               {9, 33},  {8, 64},   {13, 100},  {17, 129}, {31, 31}, {64, 257},
                               {132, 320}, {37, 1100}, {300, 48}, {19, 2100}};
  const int64_t ns[] = {1, 2, 3, 4, 5, 6, 7, 64, 130};
  int i = 0;
  for (const auto& s : shapes)
    for (const int64_t n : ns) {
      // Keep the naive reference cheap on the largest shapes.
      if (s[0] * s[1] * n > 6'000'000) continue;
      const bool acc = (i % 2) == 1;
      const int64_t xpad = (i % 3 == 0) ? 0 : 3 + i % 5;
      const int64_t ypad = (i % 4 == 0) ? 0 : 1 + i % 3;
      cases.push_back({s[0], s[1], n, xpad, ypad, acc});
      // The same shape again with the other accumulate mode.
      cases.push_back({s[0], s[1], n, ypad, xpad, !acc});
      ++i;
    }
  return cases;
}

using Param = std::tuple<std::string, DType>;

class MatmulTest : public testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    saved_ = cpu::matmul_isa();
    cpu::set_matmul_isa(std::get<0>(GetParam()).c_str());
  }
  void TearDown() override { cpu::set_matmul_isa(saved_.c_str()); }
  DType dtype() const { return std::get<1>(GetParam()); }
  std::string saved_;
};

TEST_P(MatmulTest, MatchesReference) {
  std::mt19937 rng(1234);
  for (const Case& c : all_cases()) {
    SCOPED_TRACE("rows=" + std::to_string(c.rows) + " cols=" + std::to_string(c.cols) +
                 " n=" + std::to_string(c.n) + " xpad=" + std::to_string(c.xpad) +
                 " ypad=" + std::to_string(c.ypad) + " acc=" + std::to_string(c.accumulate));
    ASSERT_TRUE(run_case(dtype(), c, rng));
  }
}

TEST_P(MatmulTest, OddThreadCounts) {
  // Splits over 3 and 1 threads (rows, and tokens when rows are few).
  const int saved = omp_get_max_threads();
  std::mt19937 rng(99);
  for (int threads : {3, 1}) {
    omp_set_num_threads(threads);
    for (const Case& c : {Case{67, 200, 1, 0, 0, false}, Case{67, 200, 70, 2, 1, true},
                          Case{5, 96, 100, 0, 2, false}, Case{250, 40, 33, 1, 0, false}}) {
      SCOPED_TRACE("threads=" + std::to_string(threads) + " rows=" + std::to_string(c.rows) +
                   " n=" + std::to_string(c.n));
      EXPECT_TRUE(run_case(dtype(), c, rng));
    }
  }
  omp_set_num_threads(saved);
}

TEST_P(MatmulTest, DetectsWrongResult) {
  // The checker must be able to fail: a result off by 1e-3 of sum|w||x| in
  // one element is reported, for small and large n.
  std::mt19937 rng(7);
  for (const Case& c : {Case{13, 100, 1, 0, 0, false}, Case{37, 300, 64, 3, 2, true}}) {
    std::vector<float> y;
    EXPECT_TRUE(run_case(dtype(), c, rng, &y, false));
    EXPECT_FALSE(run_case(dtype(), c, rng, &y, true));
  }
}

// `bytes` of storage that end exactly where an unmapped page begins, so any
// access past the end faults.
class GuardedBuffer {
 public:
  explicit GuardedBuffer(size_t bytes) : page_(size_t(sysconf(_SC_PAGESIZE))) {
    span_ = (bytes + page_ - 1) / page_ * page_;
    void* p = mmap(nullptr, span_ + page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    base_ = static_cast<uint8_t*>(p);
    if (mprotect(base_ + span_, page_, PROT_NONE) != 0) throw std::runtime_error("mprotect failed");
    data_ = base_ + span_ - bytes;
  }
  ~GuardedBuffer() { munmap(base_, span_ + page_); }
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
  uint8_t* data() { return data_; }

 private:
  size_t page_, span_;
  uint8_t* base_;
  uint8_t* data_;
};

TEST_P(MatmulTest, NeverReadsPastTheEnd) {
  // W is memory-mapped in the engine: put it (and x) flush against an
  // unmapped page so that any load past the last element faults. Row counts
  // end on a partial tile and on whole tiles of 2, 3, 4 rows (a whole last
  // tile is where an over-read of "row R" would land).
  std::mt19937 rng(5);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (const int64_t rows : {11, 12})
    for (const int64_t cols : {1, 7, 33, 95, 192})
      for (const int64_t n : {1, 3, 40}) {
        const Weights w = random_weights(dtype(), rows, cols, rng);
        GuardedBuffer wbuf(w.bytes.size()), xbuf(size_t(n * cols) * sizeof(float));
        std::memcpy(wbuf.data(), w.bytes.data(), w.bytes.size());
        std::vector<float> x(size_t(n * cols)), y(size_t(n * rows));
        for (float& v : x) v = dist(rng);
        std::memcpy(xbuf.data(), x.data(), x.size() * sizeof(float));
        matmul(MatrixView{wbuf.data(), dtype(), rows, cols}, reinterpret_cast<float*>(xbuf.data()),
               n, cols, y.data(), rows, false);
        std::vector<double> ref, scale;
        reference(w, x, n, cols, ref, scale);
        for (int64_t i = 0; i < n * rows; ++i) EXPECT_NEAR(y[i], ref[i], kRelTol * scale[i]);
      }
}

TEST_P(MatmulTest, NaNPropagates) {
  std::mt19937 rng(3);
  const Weights w = random_weights(dtype(), 10, 70, rng);
  for (const int64_t n : {1, 20}) {
    std::vector<float> x(size_t(n * 70), 0.5f), y(size_t(n * 10), 0.0f);
    x[(n - 1) * 70 + 69] = std::numeric_limits<float>::quiet_NaN();
    matmul(w.view(), x.data(), n, 70, y.data(), 10, false);
    for (int64_t t = 0; t < n; ++t)
      for (int r = 0; r < 10; ++r) EXPECT_EQ(std::isnan(y[t * 10 + r]), t == n - 1) << t << "," << r;
  }
}

TEST_P(MatmulTest, ZeroColumnsAndRows) {
  std::vector<float> y(6, 3.0f);
  const float x[1] = {1.0f};
  const uint8_t wbytes[8] = {};
  matmul(MatrixView{wbytes, dtype(), 3, 0}, x, 2, 0, y.data(), 3, true);
  EXPECT_EQ(y, std::vector<float>(6, 3.0f));
  matmul(MatrixView{wbytes, dtype(), 3, 0}, x, 2, 0, y.data(), 3, false);
  EXPECT_EQ(y, std::vector<float>(6, 0.0f));
  matmul(MatrixView{wbytes, dtype(), 0, 1}, x, 1, 1, y.data(), 0, false);  // no rows: no-op
}

std::string param_name(const testing::TestParamInfo<Param>& info) {
  std::string isa = std::get<0>(info.param);
  for (char& ch : isa)
    if (ch == '-') ch = '_';
  return isa + "_" + dtype_name(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(AllPaths, MatmulTest,
                         testing::Combine(testing::ValuesIn(cpu::matmul_isas_available()),
                                          testing::Values(DType::F32, DType::BF16, DType::F16)),
                         param_name);

// bf16 weights: x must be rounded to bf16 exactly like hymba::f32_to_bf16
// (nearest-even ties, NaN quiet). With W = identity the output is that value.
TEST(MatmulIsa, Bf16RoundingOfXIsExact) {
  const std::string saved = cpu::matmul_isa();
  const int64_t K = 40;
  std::vector<uint16_t> eye(size_t(K * K), 0);
  for (int64_t i = 0; i < K; ++i) eye[i * K + i] = f32_to_bf16(1.0f);
  std::vector<float> x(size_t(2 * K));
  for (int64_t i = 0; i < 2 * K; ++i) {
    // Ties (bf16 value + half an ulp) both ways, odd and even mantissas,
    // values just below/above a tie, big and small normals.
    const uint32_t base = 0x3f800000u + (uint32_t(i) << 16) + (i % 2 ? 0x10000u : 0u);
    const uint32_t frac[] = {0x8000u, 0x7fffu, 0x8001u, 0x0u, 0xffffu};
    uint32_t bits = base + frac[i % 5];
    if (i % 7 == 3) bits ^= 0x80000000u;
    if (i % 11 == 5) bits = 0x00800000u + 0x8000u;  // smallest normal + tie
    if (i % 13 == 6) bits = 0x7f7f7fffu;            // largest finite, just below a tie
    float v;
    std::memcpy(&v, &bits, 4);
    x[i] = v;
  }
  for (const std::string& isa : cpu::matmul_isas_available()) {
    cpu::set_matmul_isa(isa.c_str());
    for (const int64_t n : {1, 2}) {
      std::vector<float> y(size_t(n * K), 0.0f);
      matmul(MatrixView{eye.data(), DType::BF16, K, K}, x.data(), n, K, y.data(), K, false);
      for (int64_t i = 0; i < n * K; ++i) {
        const float want = round_to_bf16(x[i]);
        EXPECT_EQ(std::memcmp(&y[i], &want, 4), 0)
            << isa << " i=" << i << " x=" << x[i] << " got " << y[i] << " want " << want;
      }
    }
  }
  cpu::set_matmul_isa(saved.c_str());
}

TEST(MatmulIsa, Selection) {
  const std::string saved = cpu::matmul_isa();
  const std::vector<std::string> isas = cpu::matmul_isas_available();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), "portable");
  for (const std::string& isa : isas) {
    EXPECT_TRUE(cpu::matmul_isa_supported(isa.c_str()));
    cpu::set_matmul_isa(isa.c_str());
    // "avx512" on a CPU without AVX512_BF16 runs as "avx512-nobf16".
    if (isa != "avx512") {
      EXPECT_EQ(std::string(cpu::matmul_isa()), isa);
    }
  }
  EXPECT_THROW(cpu::set_matmul_isa("sse9"), Error);
  EXPECT_FALSE(cpu::matmul_isa_supported("sse9"));
  // "auto" is the best path: the last one listed.
  cpu::set_matmul_isa(isas.back().c_str());
  const std::string best = cpu::matmul_isa();
  cpu::set_matmul_isa("auto");
  EXPECT_EQ(std::string(cpu::matmul_isa()), best);
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    EXPECT_EQ(best, __builtin_cpu_supports("avx512bf16") ? "avx512" : "avx512-nobf16");
  }
#endif
  cpu::set_matmul_isa(saved.c_str());
}

}  // namespace
}  // namespace hymba
