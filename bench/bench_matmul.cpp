// Times hymba::cpu::matmul on the Hymba-1.5B weight shapes: decode (n=1,
// reported as GB/s of weights streamed) and prefill (n=512, GFLOP/s), with 1
// and 2 threads, next to a plain streaming-read probe of memory bandwidth.
//
//   bench_matmul [--isa NAME] [--dtype bf16|f32|f16] [--threads 1,2] [--n 1,512]
//                [--reps R] [--shape ROWSxCOLS]
//
// Calls cycle through enough copies of W (>= 256 MiB) that W is never served
// from the last-level cache, as in a real forward pass over the model.
// Every figure is the median of R timed repetitions.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/cpu/matmul.h"
#include "util/dtype.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    out.push_back(std::stoll(s.substr(pos, end - pos)));
    pos = end + 1;
  }
  return out;
}

struct Rng {
  uint64_t s = 0x9e3779b97f4a7c15ull;
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  float uniform() { return float(next() >> 40) / float(1 << 24) * 2.0f - 1.0f; }  // [-1, 1)
};

void* alloc64(size_t bytes) { return std::aligned_alloc(64, (bytes + 63) / 64 * 64); }

void fill_weights(void* p, hymba::DType dt, size_t count, Rng& rng) {
  for (size_t i = 0; i < count; ++i) {
    const float v = rng.uniform() * 0.05f;
    if (dt == hymba::DType::F32) static_cast<float*>(p)[i] = v;
    else if (dt == hymba::DType::BF16) static_cast<uint16_t*>(p)[i] = hymba::f32_to_bf16(v);
    else static_cast<uint16_t*>(p)[i] = hymba::f32_to_f16(v);
  }
}

// Streaming read of a 512 MiB buffer (8-byte integer sums vectorise without
// reassociation concerns), split over the threads. GB/s, median.
double memory_probe(int threads, int reps) {
  const size_t bytes = size_t(512) << 20, count = bytes / 8;
  auto* a = static_cast<uint64_t*>(alloc64(bytes));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t i = 0; i < count; ++i) a[i] = i;
  std::vector<double> gbs;
  volatile uint64_t sink = 0;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = Clock::now();
    uint64_t s = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : s)
    for (size_t i = 0; i < count; ++i) s += a[i];
    gbs.push_back(double(bytes) / seconds_since(t0) / 1e9);
    sink = sink + s;
  }
  std::free(a);
  return median(gbs);
}

struct Shape {
  int64_t rows, cols;
  const char* what;
};

}  // namespace

int main(int argc, char** argv) {
  std::string isa, dtype_s = "bf16";
  std::vector<int64_t> threads = {1, 2}, ns = {1, 512};
  int reps = 7;
  std::vector<Shape> shapes = {{8960, 1600, "mlp up+gate / in_proj"},
                               {8000, 1600, "in_proj (fused)"},
                               {132, 3200, "x_proj"},
                               {3200, 100, "dt_proj"},
                               {1600, 3200, "out_proj"},
                               {5504, 1600, "mlp up"},
                               {1600, 5504, "mlp down"},
                               {32001, 1600, "lm_head"}};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--isa") isa = val();
    else if (a == "--dtype") dtype_s = val();
    else if (a == "--threads") threads = parse_list(val());
    else if (a == "--n") ns = parse_list(val());
    else if (a == "--reps") reps = std::max(1, std::atoi(val().c_str()));
    else if (a == "--shape") {
      const std::string s = val();
      const size_t x = s.find('x');
      shapes = {{std::stoll(s.substr(0, x)), std::stoll(s.substr(x + 1)), "custom"}};
    } else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (!isa.empty()) hymba::cpu::set_matmul_isa(isa.c_str());
  const hymba::DType dt = hymba::parse_dtype(dtype_s);
  const size_t esz = hymba::dtype_size(dt);

  std::printf("matmul ISA: %s, weights %s, median of %d\n", hymba::cpu::matmul_isa(),
              hymba::dtype_name(dt), reps);
  for (int64_t th : threads)
    std::printf("memory read probe, %lld thread(s): %.1f GB/s\n", (long long)th,
                memory_probe(int(th), reps));

  Rng rng;
  std::printf("\n%-12s %-22s %4s %3s %10s %9s %9s\n", "shape", "", "n", "thr", "ms", "GB/s",
              "GFLOP/s");
  for (const Shape& s : shapes) {
    const size_t wbytes = size_t(s.rows * s.cols) * esz;
    for (int64_t n : ns) {
      // Rotate over copies of W (>= 256 MiB in all) so that W always comes
      // from DRAM, never from the 32 MiB L3, as in a pass over the model.
      const size_t copies = std::max<size_t>(1, ((size_t(256) << 20) + wbytes - 1) / wbytes);
      std::vector<void*> w(copies);
      for (auto& p : w) {
        p = alloc64(wbytes);
        fill_weights(p, dt, size_t(s.rows * s.cols), rng);
      }
      std::vector<float> x(size_t(n * s.cols)), y(size_t(n * s.rows));
      for (float& v : x) v = rng.uniform();
      for (int64_t th : threads) {
        omp_set_num_threads(int(th));
        auto call = [&](size_t c) {
          hymba::cpu::matmul(hymba::MatrixView{w[c], dt, s.rows, s.cols}, x.data(), n, s.cols,
                             y.data(), s.rows, false);
        };
        for (size_t c = 0; c < copies; ++c) call(c);  // warm up (page faults, threads)
        // Calls per timed repetition: enough for ~20 ms.
        const auto tw = Clock::now();
        call(0);
        const double one = std::max(1e-6, seconds_since(tw));
        const int64_t calls = std::max<int64_t>(1, int64_t(0.02 / one));
        std::vector<double> per_call;
        size_t c = 0;
        for (int rep = 0; rep < reps; ++rep) {
          const auto t0 = Clock::now();
          for (int64_t i = 0; i < calls; ++i, c = (c + 1) % copies) call(c);
          per_call.push_back(seconds_since(t0) / double(calls));
        }
        const double t = median(per_call);
        const double flops = 2.0 * double(s.rows) * double(s.cols) * double(n);
        char name[32];
        std::snprintf(name, sizeof name, "%lldx%lld", (long long)s.rows, (long long)s.cols);
        std::printf("%-12s %-22s %4lld %3lld %10.3f %9.1f %9.1f\n", name, s.what, (long long)n,
                    (long long)th, t * 1e3, double(wbytes) / t / 1e9, flops / t / 1e9);
        std::fflush(stdout);
      }
      for (void* p : w) std::free(p);
    }
  }
  return 0;
}
