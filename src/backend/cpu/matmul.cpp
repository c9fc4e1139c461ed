// hymba::cpu::matmul: ISA dispatch, threading, cache blocking, and the
// portable path. The vector tiles live in matmul_avx2.cpp / matmul_avx512.cpp;
// matmul_impl.h describes how the pieces fit.
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/cpu/matmul.h"
#include "backend/cpu/matmul_impl.h"
#include "util/dtype.h"
#include "util/error.h"

namespace hymba::cpu {
namespace mm {

// ---- packing shared by several paths ---------------------------------------

void pack_f32_plain(const float* x, int64_t ldx, int64_t cols, int64_t t0, int64_t t1, void* xpv,
                    int64_t ldxp) {
  for (int64_t t = t0; t < t1; ++t) {
    float* dst = static_cast<float*>(xpv) + t * ldxp;
    std::memcpy(dst, x + t * ldx, size_t(cols) * sizeof(float));
    std::memset(dst + cols, 0, size_t(ldxp - cols) * sizeof(float));
  }
}

void pack_bf16_as_f32(const float* x, int64_t ldx, int64_t cols, int64_t t0, int64_t t1, void* xpv,
                      int64_t ldxp) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* src = x + t * ldx;
    float* dst = static_cast<float*>(xpv) + t * ldxp;
    for (int64_t c = 0; c < cols; ++c) dst[c] = round_to_bf16(src[c]);
    std::memset(dst + cols, 0, size_t(ldxp - cols) * sizeof(float));
  }
}

// ---- tile walk --------------------------------------------------------------

namespace {

// Walks the cache lines of a block of W (rows of row_bytes, stride apart),
// prefetching a given number at a time into L2.
class PanelPrefetch {
 public:
  void start(const char* p, int64_t stride, int64_t row_bytes, int64_t rows) {
    p_ = p;
    stride_ = stride;
    row_bytes_ = row_bytes;
    rows_ = rows;
    row_ = 0;
    line_ = first_line(0);
  }
  // Lines in the block (rows may be unaligned: one more per row, at most).
  int64_t lines() const { return rows_ * (row_bytes_ / 64 + 2); }
  void issue(int64_t count) {
    for (; count > 0 && row_ < rows_; --count) {
      __builtin_prefetch(line_, 0, 2);
      line_ += 64;
      if (line_ >= p_ + row_ * stride_ + row_bytes_ && ++row_ < rows_) line_ = first_line(row_);
    }
  }

 private:
  const char* first_line(int64_t row) const {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p_ + row * stride_);
    return p_ + row * stride_ - (a & 63);
  }
  const char* p_ = nullptr;
  const char* line_ = nullptr;
  int64_t stride_ = 0, row_bytes_ = 0, rows_ = 0, row_ = 0;
};

}  // namespace

void compute_tiles(const TileSet& ts, const Job& j, int64_t r0, int64_t r1, int64_t t0,
                   int64_t t1) {
  const char* w = static_cast<const char*>(j.w);
  const char* x = static_cast<const char*>(j.xp);
  const int64_t K = j.cols, n = t1 - t0;
  const bool streaming = n <= ts.stream_n;
  auto tile = [&](int64_t r, int rr, int64_t t, int tt, int64_t k0, int64_t klen, bool add) {
    (streaming ? ts.seq : ts.fn)[rr][tt](w + (r * K + k0) * ts.w_elem, K,
                                         x + (t * j.ldxp + k0) * ts.x_elem, j.ldxp, klen,
                                         j.y + t * j.ldy + r, j.ldy, add);
  };
  if (streaming) {
    // Streaming regime (decode: memory bound). Row tiles in order, each row
    // read once, sequentially, against all n (<= stream_n <= gemm_t) tokens.
    const int R = ts.gemv_r[n];
    for (int64_t r = r0; r < r1; r += R)
      tile(r, int(std::min<int64_t>(R, r1 - r)), t0, int(n), 0, K, j.accumulate);
    return;
  }

  // Token tiles of T or T-1 tokens (not T,...,T, tiny): fewer narrow tiles.
  const int64_t T = ts.gemm_t, ntiles = (n + T - 1) / T;
  const int64_t tq = n / ntiles, trem = n % ntiles;

  // Blocked regime (prefill): a panel of mc rows x kc columns of W stays in
  // L2 while every token tile passes over it; a token tile of x (T x kc)
  // stays in L1 while the panel's row tiles stream past it. The next panel
  // is prefetched a little before each tile, so DRAM keeps streaming while
  // the cores compute (without it, each panel's first pass would wait on
  // DRAM: that halves the speed at a few dozen tokens).
  const int64_t kblocks = (K + ts.kc - 1) / ts.kc;
  const int64_t kc = (((K + kblocks - 1) / kblocks) + ts.kstep - 1) / ts.kstep * ts.kstep;
  PanelPrefetch pf;
  for (int64_t rb = r0; rb < r1; rb += ts.mc) {
    const int64_t re = std::min(rb + ts.mc, r1);
    for (int64_t kb = 0; kb < K; kb += kc) {
      const int64_t klen = std::min(kc, K - kb);
      const bool add = j.accumulate || kb > 0;
      // The panel after this one: the next K block, else the next rows.
      const int64_t nrb = kb + kc < K ? rb : re, nkb0 = kb + kc < K ? kb + kc : 0;
      const int64_t nre = kb + kc < K ? re : std::min(re + ts.mc, r1);
      pf.start(w + (nrb * K + nkb0) * ts.w_elem, K * ts.w_elem,
               std::min(kc, K - nkb0) * ts.w_elem, nre - nrb);
      const int64_t calls = ntiles * ((re - rb + ts.gemm_r - 1) / ts.gemm_r);
      const int64_t per_call = (pf.lines() + calls - 1) / calls;
      int64_t t = t0;
      for (int64_t i = 0; i < ntiles; ++i) {
        const int tt = int(tq + (i < trem));
        for (int64_t r = rb; r < re; r += ts.gemm_r) {
          pf.issue(per_call);
          tile(r, int(std::min<int64_t>(ts.gemm_r, re - r)), t, tt, kb, klen, add);
        }
        t += tt;
      }
    }
  }
}

// ---- portable path ------------------------------------------------------------
// Plain C++; eight independent partial sums per output keep the fp32 chain
// short (and let a compiler vectorise without reassociating anything).

struct CvtF32 {
  using Elem = float;
  static float get(float v) { return v; }
};
struct CvtBf16 {
  using Elem = uint16_t;
  static float get(uint16_t v) { return bf16_to_f32(v); }
};
// f16 -> f32 through a 64K-entry table (built once): the scalar conversion is
// branchy, and this path is the fallback, not the fast one.
const float* f16_table() {
  static const std::unique_ptr<float[]> table = [] {
    std::unique_ptr<float[]> t(new float[65536]);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = f16_to_f32(uint16_t(i));
    return t;
  }();
  return table.get();
}
struct CvtF16 {
  using Elem = uint16_t;
  static float get(uint16_t v) { return f16_table()[v]; }
};

template <class C, int R, int T>
struct TilePortable {
  static void run(const void* wv, int64_t ldw, const void* xv, int64_t ldx, int64_t klen, float* y,
                  int64_t ldy, bool add) {
    const auto* w = static_cast<const typename C::Elem*>(wv);
    const float* x = static_cast<const float*>(xv);
    float acc[R][T][8] = {};
    int64_t k = 0;
    for (; k + 8 <= klen; k += 8)
      for (int r = 0; r < R; ++r) {
        float wr[8];
        for (int i = 0; i < 8; ++i) wr[i] = C::get(w[r * ldw + k + i]);
        for (int t = 0; t < T; ++t)
          for (int i = 0; i < 8; ++i) acc[r][t][i] += wr[i] * x[t * ldx + k + i];
      }
    for (int i = 0; k < klen; ++k, ++i)
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t][i] += C::get(w[r * ldw + k]) * x[t * ldx + k];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) {
        const float(&a)[8] = acc[r][t];
        const float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        float& out = y[t * ldy + r];
        out = add ? out + s : s;
      }
  }
};

template <int R, int T> using TilePortableF32 = TilePortable<CvtF32, R, T>;
template <int R, int T> using TilePortableBf16 = TilePortable<CvtBf16, R, T>;
template <int R, int T> using TilePortableF16 = TilePortable<CvtF16, R, T>;

template <template <int, int> class K>
TileSet make_portable(PackFn pack, int w_elem) {
  // 1 x 1 tiles only. With bigger ones GCC 12 (-O3, AVX-512) SLP-vectorises
  // the rows of a tile into wider loads that also touch the row after the
  // tile -- past the end of W for the last tile (seen to fault on a mapped
  // file; the NeverReadsPastTheEnd test covers it).
  TileSet ts;
  fill_tiles<K, 1, 1, 1>(ts.fn);
  fill_tiles<K, 1, 1, 1>(ts.seq);
  ts.pack = pack;
  ts.w_elem = w_elem;
  ts.x_elem = 4;
  ts.kstep = 8;
  ts.gemm_r = 1;
  ts.gemm_t = 1;
  ts.stream_n = 1;
  ts.gemv_r[1] = 1;
  ts.mc = 64;
  ts.kc = 512;
  return ts;
}

const IsaKernels& portable_kernels() {
  static const TileSet f32 = make_portable<TilePortableF32>(pack_f32_plain, 4);
  static const TileSet bf16 = make_portable<TilePortableBf16>(pack_bf16_as_f32, 2);
  static const TileSet f16 = make_portable<TilePortableF16>(pack_f32_plain, 2);
  static const IsaKernels k{"portable", &f32, &bf16, &f16};
  return k;
}

}  // namespace mm

// ---- ISA selection ---------------------------------------------------------------

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  // F16C from CPUID leaf 1 (ECX bit 29): not every compiler's
  // __builtin_cpu_supports knows "f16c". (The avx2 check already covers the
  // OS support for the YMM state that F16C needs.)
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// nullptr: unknown name. Throws for a known name this CPU cannot run.
const mm::IsaKernels* kernels_by_name(const std::string& name) {
  if (name.empty() || name == "auto") {
#if defined(__x86_64__) || defined(__i386__)
    if (cpu_has_avx512()) return &mm::avx512_kernels(cpu_has_avx512_bf16());
    if (cpu_has_avx2()) return &mm::avx2_kernels();
#endif
    return &mm::portable_kernels();
  }
  if (name == "portable") return &mm::portable_kernels();
#if defined(__x86_64__) || defined(__i386__)
  if (name == "avx2") {
    check(cpu_has_avx2(), "matmul ISA 'avx2' is not supported by this CPU");
    return &mm::avx2_kernels();
  }
  if (name == "avx512" || name == "avx512-nobf16") {
    check(cpu_has_avx512(), "matmul ISA '", name, "' is not supported by this CPU");
    return &mm::avx512_kernels(name == "avx512" && cpu_has_avx512_bf16());
  }
#else
  if (name == "avx2" || name == "avx512" || name == "avx512-nobf16")
    fail("matmul ISA '", name, "' is not supported by this CPU");
#endif
  return nullptr;
}

std::atomic<const mm::IsaKernels*> g_kernels{nullptr};

const mm::IsaKernels& active_kernels() {
  if (const mm::IsaKernels* k = g_kernels.load(std::memory_order_acquire)) return *k;
  // First use: HYMBA_CPU_ISA decides (read once; a bad value throws here,
  // on every call, rather than silently running another path).
  static const mm::IsaKernels* from_env = [] {
    const char* env = std::getenv("HYMBA_CPU_ISA");
    const std::string name = env ? env : "";
    const mm::IsaKernels* k = kernels_by_name(name);
    check(k != nullptr, "HYMBA_CPU_ISA='", name,
          "' is not one of: auto, portable, avx2, avx512, avx512-nobf16");
    return k;
  }();
  const mm::IsaKernels* expected = nullptr;
  g_kernels.compare_exchange_strong(expected, from_env, std::memory_order_acq_rel);
  return *g_kernels.load(std::memory_order_acquire);
}

}  // namespace

const char* matmul_isa() { return active_kernels().name; }

void set_matmul_isa(const char* name) {
  const std::string s = name ? name : "";
  const mm::IsaKernels* k = kernels_by_name(s);
  check(k != nullptr, "unknown matmul ISA '", s,
        "' (expected auto, portable, avx2, avx512 or avx512-nobf16)");
  g_kernels.store(k, std::memory_order_release);
}

bool matmul_isa_supported(const char* name) {
  const std::string s = name ? name : "";
  if (s.empty() || s == "auto" || s == "portable") return true;
  if (s == "avx2") return cpu_has_avx2();
  if (s == "avx512" || s == "avx512-nobf16") return cpu_has_avx512();
  return false;
}

std::vector<std::string> matmul_isas_available() {
  std::vector<std::string> out{"portable"};
  if (cpu_has_avx2()) out.push_back("avx2");
  if (cpu_has_avx512()) {
    out.push_back("avx512-nobf16");
    out.push_back("avx512");
  }
  return out;
}

// ---- the op -------------------------------------------------------------------------

namespace {

// Per calling thread, reused across calls: the packed activations.
struct PackBuffer {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data;
  size_t bytes = 0;
  void* get(size_t need) {
    if (need > bytes) {
      const size_t cap = (std::max(need, bytes + bytes / 2) + 63) / 64 * 64;
      void* p = std::aligned_alloc(64, cap);
      check(p != nullptr, "matmul: out of memory packing ", need, " bytes of activations");
      data.reset(p);
      bytes = cap;
    }
    return data.get();
  }
};

}  // namespace

void matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
            bool accumulate) {
  const int64_t rows = W.rows, cols = W.cols;
  check(n >= 0 && rows >= 0 && cols >= 0, "matmul: negative size (n=", n, ", W ", rows, "x", cols,
        ")");
  if (n == 0 || rows == 0) return;
  check(y != nullptr && (n == 1 || ldy >= rows), "matmul: bad output (ldy=", ldy, ", rows=", rows,
        ")");
  if (cols == 0) {
    if (!accumulate)
      for (int64_t t = 0; t < n; ++t) std::fill(y + t * ldy, y + t * ldy + rows, 0.0f);
    return;
  }
  check(W.data != nullptr && x != nullptr && (n == 1 || ldx >= cols), "matmul: bad input (ldx=", ldx,
        ", cols=", cols, ")");

  const mm::IsaKernels& isa = active_kernels();
  const mm::TileSet& ts = W.dtype == DType::F32 ? *isa.f32 : W.dtype == DType::BF16 ? *isa.bf16 : *isa.f16;

  // Packed x rows: padded to the K step; a row stride of a multiple of 4 KiB
  // would make the T rows of a tile alias in L1, so nudge it off.
  int64_t ldxp = (cols + ts.kstep - 1) / ts.kstep * ts.kstep;
  if ((ldxp * ts.x_elem) % 4096 == 0) ldxp += ts.kstep;
  thread_local PackBuffer buffer;
  void* xp = buffer.get(size_t(n * ldxp * ts.x_elem));

  const mm::Job job{W.data, rows, cols, xp, ldxp, y, ldy, accumulate};

  // Work split. Items are chunks of rows (each thread streams its own part
  // of W; x is shared) times, when rows are too few to go round, chunks of
  // tokens. Several items per thread, handed out dynamically: the machine
  // is often shared, and a thread that loses its core must not leave the
  // other one idle at the end. Tiny products are not worth waking the team.
  const int max_threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  const double work = double(rows) * double(cols) * double(n);
  const int nth = work < 65536.0 ? 1 : max_threads;
  // Rows go in units (16 rows when streaming, one L2 panel when blocked),
  // spread evenly over the row items so that the items are of equal size.
  const int64_t unit = n <= ts.stream_n ? 16 : ts.mc;
  const int64_t units = (rows + unit - 1) / unit;
  int64_t row_items = 1, tok_chunks = 1;
  if (nth > 1) {
    // Streaming: ~8 items per thread. Blocked: ~4 per thread, each a run of
    // whole panels (within an item the next panel is prefetched while this
    // one is computed), plus token chunks when there are too few panels.
    const int64_t per_thread = n <= ts.stream_n ? 8 : 4;
    row_items = std::min(units, per_thread * nth);
    if (n > ts.stream_n && row_items < per_thread * nth)
      tok_chunks = std::max<int64_t>(
          1, std::min((per_thread * nth + row_items - 1) / row_items, n / (4 * ts.gemm_t)));
  }
  const int64_t items = row_items * tok_chunks;
  auto run_item = [&](int64_t item) {
    const int64_t ri = item / tok_chunks, tc = item % tok_chunks;
    const int64_t r0 = std::min(rows, unit * (units * ri / row_items));
    const int64_t r1 = std::min(rows, unit * (units * (ri + 1) / row_items));
    const int64_t t0 = n * tc / tok_chunks, t1 = n * (tc + 1) / tok_chunks;
    if (r0 < r1 && t0 < t1) mm::compute_tiles(ts, job, r0, r1, t0, t1);
  };

  if (nth == 1 || items == 1) {
    ts.pack(x, ldx, cols, 0, n, xp, ldxp);
    for (int64_t i = 0; i < items; ++i) run_item(i);
    return;
  }
  // Packing a few tokens is quicker than a barrier; many are split.
  const bool serial_pack = n * cols <= (int64_t(1) << 16);
  if (serial_pack) ts.pack(x, ldx, cols, 0, n, xp, ldxp);
#pragma omp parallel num_threads(int(std::min<int64_t>(nth, items)))
  {
    if (!serial_pack) {
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();
      ts.pack(x, ldx, cols, n * tid / team, n * (tid + 1) / team, xp, ldxp);
#pragma omp barrier
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i) run_item(i);
  }
}

}  // namespace hymba::cpu
