// Micro-benchmark of cpu::attention in Hymba-1.5B's sliding-layer shape:
// 25 query heads over 5 kv heads, head dims 64 (K) / 128 (V), BF16 cache of
// 128 pinned meta rows plus a ring of past keys (wrapped: two pieces), and the
// chunk's own K/V as an F32 segment, window 1024 with the meta always visible.
//
//   bench_attention [--keys N] [--nq N] [--flush 0|1] [--reps N] [--dv N] [--threads N]
//
// Without --keys/--nq it times a small table (ring keys 512/1024, n_q 1/256,
// hot and flushed). --flush 1 evicts the caches before every call (64 MiB
// sweep), as the weight stream does between layers in the model.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/ops.h"

using namespace hymba;

namespace {

struct Config {
  int keys = 512, nq = 1, flush = 0, reps = 0, dv = 128;
};

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

struct Timing {
  double min, median;
};

Timing run(const Config& c) {
  constexpr int H = 25, G = 5, DQ = 64, META = 128, RING = 1024, WRAP = 700;
  const int DV = c.dv;
  const int64_t ldk = int64_t(G) * DQ, ldv = int64_t(G) * DV;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  auto fill_bf16 = [&](std::vector<uint16_t>& v) {
    for (auto& x : v) x = to_bf16(nd(rng));
  };
  std::vector<uint16_t> mk(size_t(META * ldk)), mv(size_t(META * ldv)), rk(size_t(RING * ldk)),
      rv(size_t(RING * ldv));
  fill_bf16(mk), fill_bf16(mv), fill_bf16(rk), fill_bf16(rv);
  // The chunk's own K/V (F32, as the model passes it).
  std::vector<float> ck(size_t(c.nq * ldk)), cv(size_t(c.nq * ldv));
  for (auto& x : ck) x = nd(rng);
  for (auto& x : cv) x = nd(rng);
  const int64_t ldq = int64_t(H) * DQ + 2 * ldk + 3200;  // q inside a wide fused projection row
  std::vector<float> q(size_t(c.nq * ldq)), out(size_t(c.nq) * H * DV);
  for (auto& x : q) x = nd(rng);

  // Ring positions META .. META+keys-1 live in slots (WRAP + i) % RING.
  const int keys = std::min(c.keys, RING);
  const int first = std::min(keys, RING - WRAP);
  std::vector<KVSegment> segs;
  segs.push_back({mk.data(), mv.data(), DType::BF16, ldk, ldv, 0, META});
  if (first > 0) segs.push_back({rk.data() + WRAP * ldk, rv.data() + WRAP * ldv, DType::BF16, ldk, ldv, META, first});
  if (keys > first) segs.push_back({rk.data(), rv.data(), DType::BF16, ldk, ldv, META + first, keys - first});
  segs.push_back({ck.data(), cv.data(), DType::F32, ldk, ldv, META + keys, c.nq});

  AttentionArgs a;
  a.q = q.data();
  a.ldq = ldq;
  a.n_q = c.nq;
  a.q_pos0 = META + keys;
  a.n_heads = H;
  a.n_kv_heads = G;
  a.head_dim_qk = DQ;
  a.head_dim_v = DV;
  a.segments = segs.data();
  a.n_segments = int(segs.size());
  a.window = 1024;
  a.n_always_visible = META;
  a.scale = 0.125f;
  a.out = out.data();
  a.ldo = int64_t(H) * DV;

  // Read-only sweep, like the weight stream: evictions are clean.
  std::vector<int64_t> junk(c.flush ? (size_t(64) << 20) / 8 : 0, 1);
  int64_t sink = 0;
  const int reps = c.reps > 0 ? c.reps : (c.nq > 16 ? 20 : 300);
  std::vector<double> t;
  for (int r = 0; r < reps + 5; ++r) {
    if (c.flush)
      for (size_t i = 0; i < junk.size(); i += 8) sink += junk[i];
    const auto t0 = std::chrono::steady_clock::now();
    cpu::attention(a);
    const auto t1 = std::chrono::steady_clock::now();
    if (r >= 5) t.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  if (sink == 42) std::printf(" ");
  std::sort(t.begin(), t.end());
  return {t.front(), t[t.size() / 2]};  // the machine may be shared: min and median
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  bool table = true;
  int threads = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (k == "--keys") c.keys = v, table = false;
    else if (k == "--nq") c.nq = v, table = false;
    else if (k == "--flush") c.flush = v;
    else if (k == "--reps") c.reps = v;
    else if (k == "--dv") c.dv = v;
    else if (k == "--threads") threads = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  omp_set_num_threads(threads);
  if (!table) {
    const Timing t = run(c);
    std::printf("keys %4d  n_q %3d  flush %d: min %9.1f  median %9.1f us/call\n", c.keys, c.nq, c.flush, t.min,
                t.median);
    return 0;
  }
  for (const int nq : {1, 256})
    for (const int keys : {512, 1024})
      for (const int flush : {0, 1}) {
        Config t = c;
        t.keys = keys, t.nq = nq, t.flush = flush;
        const Timing r = run(t);
        std::printf("keys %4d  n_q %3d  flush %d: min %9.1f  median %9.1f us/call\n", keys, nq, flush, r.min,
                    r.median);
      }
  return 0;
}
