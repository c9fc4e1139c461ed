// The harness shared by the CUDA op tests (test_cuda_*.cpp): the CudaVsCpu
// fixture runs an op on the CPU and the CUDA backend from the same fresh
// random inputs (seeded from std::random_device; the seed is printed) and
// compares them by relative L2 error, with NaN poison to catch unwritten or
// stray elements. Without a CUDA build or a GPU every test skips.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "util/dtype.h"
#include "util/error.h"
#ifdef HYMBA_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

namespace hymba {
namespace cuda_test {

// ---------------------------------------------------------------- harness

inline std::map<std::string, double>& worst() {
  static std::map<std::string, double> m;
  return m;
}

class SummaryPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    if (worst().empty()) return;
    std::printf("[cuda-vs-cpu] summary: largest relative L2 error per op (GPU vs CPU backend)\n");
    for (const auto& [op, e] : worst()) std::printf("[cuda-vs-cpu] %-28s %.3e\n", op.c_str(), e);
  }
};
inline const auto* const kSummary = ::testing::AddGlobalTestEnvironment(new SummaryPrinter);

struct Backends {
  std::unique_ptr<Backend> cpu, gpu;
};

inline Backends* backends() {
  static Backends* b = [] {
    auto* r = new Backends;
#ifdef HYMBA_HAVE_CUDA
    if (cuda_device_present()) {
      r->cpu = make_cpu_backend();
      r->gpu = make_cuda_backend();
    }
#endif
    return r;
  }();
  return b;
}

inline const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Whether one-query (decode) attention over bf16 K/V takes the decode
// kernel's tensor-core span, which rounds Q and the probabilities to bf16
// (bf16 tolerance, 1e-2, like the prefill tensor-core kernel), in
// tensor-core mode `mode` (0 automatic, 1 never, 2 wherever applicable): on
// unless mode 1 or HYMBA_DECODE_TC=0 in the environment.
inline bool decode_takes_tensor_cores(int mode = 0) {
  const char* e = std::getenv("HYMBA_DECODE_TC");
  return mode != 1 && !(e && std::strcmp(e, "0") == 0);
}

class CudaVsCpu : public ::testing::Test {
 protected:
  void SetUp() override {
#ifndef HYMBA_HAVE_CUDA
    GTEST_SKIP() << "this build has no CUDA backend (nvcc was not found at configure time)";
#else
    if (!cuda_device_present()) GTEST_SKIP() << "no CUDA GPU/driver visible to this process";
    cpu_ = backends()->cpu.get();
    gpu_ = backends()->gpu.get();
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("[ seed     ] %u\n", seed_);
#endif
  }
  void TearDown() override {
    if (gpu_) {
      gpu_->synchronize();
      for (void* p : owned_) gpu_->release(p);
    }
    owned_.clear();
  }

  std::vector<float> randn(size_t n, float mean = 0.0f, float stddev = 1.0f) {
    std::normal_distribution<float> d(mean, stddev);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng_);
    return v;
  }
  std::vector<float> uniform(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng_);
    return v;
  }

  // Uniform values with the given mean and standard deviation, from a fast
  // generator seeded by rng_ (the batched tests need tens of millions).
  std::vector<float> noise(size_t n, float mean = 0.0f, float stddev = 1.0f) {
    uint64_t s = (uint64_t(rng_()) << 32) | rng_() | 1u;
    const float k = stddev * 1.7320508f / 8388608.0f;  // [-2^23, 2^23) -> [-sqrt(3), sqrt(3)) stddev
    std::vector<float> v(n);
    for (float& x : v) {
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      x = mean + (float(int64_t(s >> 40) - 8388608)) * k;
    }
    return v;
  }
  int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng_); }

  // Device copy of a host array (freed at TearDown).
  template <typename T>
  T* up(const std::vector<T>& h) {
    void* p = gpu_->allocate(std::max<size_t>(1, h.size()) * sizeof(T));
    owned_.push_back(p);
    gpu_->upload(p, h.data(), h.size() * sizeof(T));
    return static_cast<T*>(p);
  }
  template <typename T>
  std::vector<T> down(const T* d, size_t n) {
    std::vector<T> h(n);
    gpu_->download(h.data(), d, n * sizeof(T));
    return h;
  }

  // Compares a GPU result with the CPU's: NaN (poison) exactly where the CPU
  // left NaN, finite numbers within `tol` relative L2 elsewhere.
  void expect_close(const std::string& op, const std::string& what, const std::vector<float>& gpu,
                    const std::vector<float>& cpu, double tol) {
    ASSERT_EQ(gpu.size(), cpu.size());
    double num = 0, den = 0, max_abs = 0;
    size_t unwritten = 0, stray = 0, nonfinite = 0, first_bad = SIZE_MAX;
    for (size_t i = 0; i < cpu.size(); ++i) {
      const bool cn = std::isnan(cpu[i]), gn = std::isnan(gpu[i]);
      if (cn != gn) {
        (cn ? stray : unwritten)++;
        if (first_bad == SIZE_MAX) first_bad = i;
        continue;
      }
      if (cn) continue;
      if (!std::isfinite(cpu[i]) || !std::isfinite(gpu[i])) {  // infinities (f16 overflow) must match exactly
        if (cpu[i] != gpu[i]) {
          ++nonfinite;
          if (first_bad == SIZE_MAX) first_bad = i;
        }
        continue;
      }
      const double d = double(gpu[i]) - double(cpu[i]);
      num += d * d;
      den += double(cpu[i]) * double(cpu[i]);
      max_abs = std::max(max_abs, std::fabs(d));
    }
    const double rel = std::sqrt(num / std::max(den, 1e-300));
    std::printf("[cuda-vs-cpu] %-14s %-52s rel_l2 %.3e  max_abs %.3e\n", op.c_str(), what.c_str(), rel, max_abs);
    double& w = worst()[op];
    w = std::max(w, rel);
    EXPECT_EQ(unwritten, 0u) << op << " " << what << ": GPU left " << unwritten
                             << " elements unwritten (NaN poison), first at " << first_bad;
    EXPECT_EQ(stray, 0u) << op << " " << what << ": GPU wrote " << stray
                         << " elements outside the op's region, first at " << first_bad;
    EXPECT_EQ(nonfinite, 0u) << op << " " << what << ": " << nonfinite
                             << " infinities differ, first at " << first_bad;
    EXPECT_LE(rel, tol) << op << " " << what << " (seed " << seed_ << ")";
  }

  Backend* cpu_ = nullptr;
  Backend* gpu_ = nullptr;
  uint32_t seed_ = 0;
  std::mt19937 rng_;
  std::vector<void*> owned_;
};

// Values stored as dt (what a checkpoint or a cache holds).
// Milliseconds per call of f on be: one untimed call, then `reps` calls
// back to back between two synchronisations (launch gaps included unless
// the device runs ahead of the host).
template <typename F>
double time_ms(Backend& be, F&& f, int reps = 20) {
  f();
  be.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  be.synchronize();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
}

// The AttentionArgs of a test case (heads, dims, visibility, strides, and
// the model's scale 1/sqrt(dq)); q, segments and out are left to the caller.
inline AttentionArgs attention_case(int n_heads, int n_kv_heads, int dq, int dv, int64_t n_q, int64_t q_pos0,
                                    int64_t window, int64_t n_always_visible, int n_segments, int64_t ldq,
                                    int64_t ldo) {
  AttentionArgs a;
  a.ldq = ldq;
  a.n_q = n_q;
  a.q_pos0 = q_pos0;
  a.n_heads = n_heads;
  a.n_kv_heads = n_kv_heads;
  a.head_dim_qk = dq;
  a.head_dim_v = dv;
  a.n_segments = n_segments;
  a.window = window;
  a.n_always_visible = n_always_visible;
  a.scale = 1.0f / std::sqrt(float(dq));
  a.ldo = ldo;
  return a;
}

// The scan tests' layout: u | delta | z as column slices of one buffer
// (leading dimension ld_in), B | C of another (ld_bc), y with ldy. The
// pointers are set by point_scan_inputs (host or device buffers) and the
// caller (parameters, state, y).
// One K/V segment whose K and V start at `off` (K, V byte offsets) in a
// pool with a host copy and a device copy: its host view appended to hsegs,
// its device view to dsegs.
inline void add_pool_segment(DType dt, int64_t ld_k, int64_t ld_v, int64_t pos0, int64_t count,
                             const uint8_t* host_pool, const uint8_t* dev_pool, std::pair<size_t, size_t> off,
                             std::vector<KVSegment>& hsegs, std::vector<KVSegment>& dsegs) {
  KVSegment seg;
  seg.dtype = dt, seg.ld_k = ld_k, seg.ld_v = ld_v, seg.pos0 = pos0, seg.count = count;
  seg.k = host_pool + off.first, seg.v = host_pool + off.second;
  hsegs.push_back(seg);
  seg.k = dev_pool + off.first, seg.v = dev_pool + off.second;
  dsegs.push_back(seg);
}

inline ScanArgs scan_case(int64_t n, int64_t C, int64_t N, int64_t ld_in, int64_t ld_bc, int64_t ldy) {
  ScanArgs a;
  a.ldu = a.ld_delta = a.ldz = ld_in;
  a.ldb = a.ldc = ld_bc;
  a.ldy = ldy;
  a.n = n, a.channels = C, a.d_state = N;
  return a;
}
inline void point_scan_inputs(ScanArgs& a, const float* in, const float* bc) {
  a.u = in, a.delta = in + a.channels, a.z = in + 2 * a.channels;
  a.B = bc, a.C = bc + a.d_state;
}

inline std::vector<uint8_t> store_as(const std::vector<float>& v, DType dt) {
  std::vector<uint8_t> b(v.size() * dtype_size(dt));
  from_f32(v.data(), v.size(), dt, b.data());
  return b;
}


}  // namespace cuda_test
}  // namespace hymba
