// Attention over cached K/V segments (AttentionArgs, backend/ops.h), flash
// style: a block owns up to kRows (query, head) rows of one kv head, walks
// the visible keys kBK at a time (a tile of K/V converted to fp32 in shared
// memory once for all its rows, which is what GQA saves), and keeps each
// row's running max, denominator and output in registers (online softmax),
// so memory stays O(tile) whatever the context length.
//
// Within a warp, lane j scores key j of the tile (dot product over the head
// dim from shared memory), the warp reduces max and sum with shuffles, and
// for P.V each lane owns output dims lane, lane+32, ... (DVL of them).
//
// Decode (few queries) cannot fill the GPU with one block per kv head, so
// the key tiles of each row are split between `splits` blocks, each writing
// an unnormalised partial state (m, l, acc); a second kernel merges them
// exactly as the CPU kernel does. Prefill uses splits = 1 and writes out
// directly.
//
// Prefill with bf16 K/V has a tensor-core kernel (attention_tc_kernel below);
// fp32 caches (the fp32 mode, accurate to ~1e-6) stay here. Decode (one
// query) at the usual shapes has its own kernels (decode_kernel below, K/V
// straight from global memory); the split path here takes the other shapes
// (few queries, odd head dims, unaligned rows).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/wgmma.cuh"

#include <cuda.h>
#include <cudaTypedefs.h>

namespace hymba::cuda {

namespace {

constexpr int kBK = 32;           // keys per tile: one per lane
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 32;         // (query, head) rows per block
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr int kMaxSegments = 16;
constexpr int kMaxHeadDim = 256;
constexpr int kBatchSegments = 8;  // segments a batched entry holds inline
constexpr int kBatchMinTilesPerSplit = 2;
constexpr int kBatchMaxSplits = 64;
constexpr int kBatchDVL = 4;  // the batched kernel's value columns per lane: head_dim_v <= 128
// The single-sequence decode's per-kv-head counters (fast decode, below)
// head the attention scratch; every kernel's partial states lie after them.
constexpr int kFMaxKv = 1024;
constexpr size_t kFCounterBytes = size_t(kFMaxKv) * sizeof(unsigned);

struct SegDesc {
  const void* k;
  const void* v;
  int64_t ld_k, ld_v, pos0, count;
  DType dtype;
};

// The launch-wide shape: heads, dims and how a block's rows are chosen.
struct Shape {
  int n_heads, dq, dv, group;
  int heads_per_block, q_per_block, head_blocks;
  int q_rows;  // (query, head) rows sQ holds: q_per_block * heads_per_block, or heads_per_block in decode
  int splits;
};

// One sequence's attention: queries, visibility, output, and (launch
// splits > 1) its partial softmax states: m, l [n_split][n_q][n_heads],
// acc x dv. Its keys are split between the blocks z < n_split.
struct Job {
  const float* q;
  int64_t ldq, n_q, q_pos0;
  int64_t window, n_always_visible;
  float scale;
  int n_seg;
  int n_split;
  float* out;
  int64_t ldo;
  float* part_m;
  float* part_l;
  float* part_acc;
};

// A single-sequence launch: everything in kernel parameters.
struct Params {
  Shape sh;
  Job job;
  SegDesc seg[kMaxSegments];
};

// A batched decode launch: one BatchEntry per sequence in device memory
// (staged by the backend), one block row per entry.
struct BatchEntry {
  Job job;
  SegDesc seg[kBatchSegments];
};
struct BatchParams {
  Shape sh;
  const BatchEntry* entries;
};

// The key ranges a tile of queries at positions p_first..p_last can see:
// per segment, the always-visible prefix and the union of the windows (the
// CPU kernel's blocks). Calls f(segment, first row, row count) per range.
template <typename F>
__host__ __device__ void for_each_range(const SegDesc* seg, int n_seg, int64_t window, int64_t nav,
                                        int64_t p_first, int64_t p_last, F f) {
  for (int s = 0; s < n_seg; ++s) {
    const int64_t pos0 = seg[s].pos0;
    const int64_t end = min(pos0 + seg[s].count, p_last + 1);
    if (window < 0) {
      if (end > pos0) f(s, int64_t(0), end - pos0);
    } else {
      const int64_t win_lo = max(pos0, p_first - window);
      const int64_t pre_hi = min(end, min(nav, win_lo));
      if (pre_hi > pos0) f(s, int64_t(0), pre_hi - pos0);
      const int64_t lo = max(win_lo, pre_hi);
      if (end > lo) f(s, lo - pos0, end - lo);
    }
  }
}

__host__ __device__ inline int64_t count_tiles(const SegDesc* seg, int n_seg, int64_t window, int64_t nav,
                                               int64_t p_first, int64_t p_last) {
  int64_t tiles = 0;
  for_each_range(seg, n_seg, window, nav, p_first, p_last,
                 [&](int, int64_t, int64_t len) { tiles += (len + kBK - 1) / kBK; });
  return tiles;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Rows r0 .. r0+kBK-1, columns col0 .. col0+width-1 of a K or V segment
// into dst[j * ld_dst + i] as fp32; rows past nk become zeros (they are
// masked, but 0 * garbage could be NaN). With 16-byte-aligned rows each
// thread converts 16 bytes (8 bf16/f16 or 4 fp32 values) per load: decode
// is bound by this load.
__device__ __forceinline__ void load_tile(float* dst, int ld_dst, const void* base, DType dt, int64_t ld, int64_t r0,
                                          int nk, int64_t col0, int width) {
  const int es = dt == DType::F32 ? 4 : 2;
  const int vec = 16 / es;
  const bool fast = width % vec == 0 && ld % vec == 0 && col0 % vec == 0 &&
                    reinterpret_cast<uintptr_t>(base) % 16 == 0;  // uniform over the block
  if (fast) {
    const int per_row = width / vec;
    for (int idx = threadIdx.x; idx < kBK * per_row; idx += kThreads) {
      const int j = idx / per_row, c = (idx % per_row) * vec;
      float* d = dst + j * ld_dst + c;
      if (j >= nk) {
        for (int e = 0; e < vec; ++e) d[e] = 0.0f;
        continue;
      }
      const uint4 raw =
          *reinterpret_cast<const uint4*>(static_cast<const char*>(base) + ((r0 + j) * ld + col0 + c) * es);
      if (es == 4) {
        d[0] = __uint_as_float(raw.x), d[1] = __uint_as_float(raw.y);
        d[2] = __uint_as_float(raw.z), d[3] = __uint_as_float(raw.w);
      } else {
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint16_t lo = uint16_t(w[e] & 0xffffu), hi = uint16_t(w[e] >> 16);  // little-endian pairs
          d[2 * e] = dt == DType::BF16 ? bf16_bits_to_f32(lo) : f16_bits_to_f32(lo);
          d[2 * e + 1] = dt == DType::BF16 ? bf16_bits_to_f32(hi) : f16_bits_to_f32(hi);
        }
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < kBK * width; idx += kThreads) {
      const int j = idx / width, i = idx % width;
      dst[j * ld_dst + i] = j < nk ? load_as_f32(base, dt, (r0 + j) * ld + col0 + i) : 0.0f;
    }
  }
}

// The work of one block: query tile q_tile of job `jb`, kv head block gy
// (kv head * head_blocks + head block), key split `split`. seg: the job's
// segments (kernel parameters or shared memory). Every thread of the block
// calls this (it synchronises the block).
template <int DVL>
__device__ __forceinline__ void attend(const Shape& sh, const Job& jb, const SegDesc* seg, int64_t q_tile, int gy,
                                       int split, float* smem) {
  const int dq = sh.dq, dv = sh.dv;
  float* sQ = smem;                    // [q_rows][dq], pre-scaled
  float* sK = sQ + sh.q_rows * dq;     // [kBK][dq + 1] (padded: lane j reads row j without bank conflicts)
  float* sV = sK + kBK * (dq + 1);     // [kBK][dv]
  const int ldk = dq + 1;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = gy / sh.head_blocks;                     // kv head
  const int hb = gy % sh.head_blocks;
  const int h0 = g * sh.group + hb * sh.heads_per_block;  // first query head of this block
  const int hib = min(sh.heads_per_block, sh.group - hb * sh.heads_per_block);
  const int64_t t0 = q_tile * sh.q_per_block;
  const int nq = int(min(int64_t(sh.q_per_block), jb.n_q - t0));
  const int rows = nq * hib;  // row r = (query t0 + r / hib, head h0 + r % hib); rows <= q_rows
  const int64_t p_first = jb.q_pos0 + t0, p_last = p_first + nq - 1;

  for (int idx = threadIdx.x; idx < rows * dq; idx += kThreads) {
    const int r = idx / dq, i = idx % dq;
    sQ[idx] = jb.q[(t0 + r / hib) * jb.ldq + int64_t(h0 + r % hib) * dq + i] * jb.scale;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DVL];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int d = 0; d < DVL; ++d) acc[rr][d] = 0.0f;
  }

  // This block's share of the tiles.
  const int64_t n_tiles = count_tiles(seg, jb.n_seg, jb.window, jb.n_always_visible, p_first, p_last);
  const int64_t tile_lo = n_tiles * split / jb.n_split, tile_hi = n_tiles * (split + 1) / jb.n_split;
  int64_t tile = 0;

  for_each_range(seg, jb.n_seg, jb.window, jb.n_always_visible, p_first, p_last,
                 [&](int s, int64_t first, int64_t len) {
    const SegDesc& sg = seg[s];
    for (int64_t off = 0; off < len; off += kBK, ++tile) {
      if (tile < tile_lo || tile >= tile_hi) continue;
      const int nk = int(min(int64_t(kBK), len - off));
      const int64_t r0 = first + off;     // first segment row of the tile
      const int64_t kp0 = sg.pos0 + r0;   // its position
      __syncthreads();  // previous tile's readers are done (and sQ is written, first time)
      load_tile(sK, ldk, sg.k, sg.dtype, sg.ld_k, r0, nk, int64_t(g) * dq, dq);
      load_tile(sV, dv, sg.v, sg.dtype, sg.ld_v, r0, nk, int64_t(g) * dv, dv);
      __syncthreads();

      const int64_t kp = kp0 + lane;
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp + rr * kWarps;
        if (r >= rows) break;  // warp-uniform
        const int64_t pos = p_first + r / hib;
        const bool visible = lane < nk && kp <= pos &&
                             (jb.window < 0 || pos - kp <= jb.window || kp < jb.n_always_visible);
        const float* qr = sQ + r * dq;
        const float* kr = sK + lane * ldk;
        float s0 = 0.0f, s1 = 0.0f;
        int i = 0;
        for (; i + 1 < dq; i += 2) {
          s0 += qr[i] * kr[i];
          s1 += qr[i + 1] * kr[i + 1];
        }
        if (i < dq) s0 += qr[i] * kr[i];
        const float score = visible ? s0 + s1 : -INFINITY;
        const float tile_max = warp_max(score);
        if (tile_max == -INFINITY) continue;  // no visible key in this tile for this row (uniform)
        const float m_new = fmaxf(m[rr], tile_max);
        const float corr = expf(m[rr] - m_new);  // 0 while m is -inf (acc and l are 0 then)
        const float pj = visible ? expf(score - m_new) : 0.0f;
        l[rr] = l[rr] * corr + warp_sum(pj);
        m[rr] = m_new;
#pragma unroll
        for (int d = 0; d < DVL; ++d) acc[rr][d] *= corr;
        for (int j = 0; j < nk; ++j) {
          const float pk = __shfl_sync(0xffffffffu, pj, j);
          const float* vr = sV + j * dv;
#pragma unroll
          for (int d = 0; d < DVL; ++d) {
            const int col = lane + 32 * d;
            if (col < dv) acc[rr][d] += pk * vr[col];
          }
        }
      }
    }
  });

  // Results: normalised output, or this split's partial state.
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp + rr * kWarps;
    if (r >= rows) break;
    const int64_t t = t0 + r / hib;
    const int h = h0 + r % hib;
    if (sh.splits == 1) {
      const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
      float* o = jb.out + t * jb.ldo + int64_t(h) * dv;
#pragma unroll
      for (int d = 0; d < DVL; ++d)
        if (lane + 32 * d < dv) o[lane + 32 * d] = acc[rr][d] * inv;
    } else {
      const int64_t at = (int64_t(split) * jb.n_q + t) * sh.n_heads + h;
      if (lane == 0) {
        jb.part_m[at] = m[rr];
        jb.part_l[at] = l[rr];
      }
#pragma unroll
      for (int d = 0; d < DVL; ++d)
        if (lane + 32 * d < dv) jb.part_acc[at * dv + lane + 32 * d] = acc[rr][d];
    }
  }
}

// grid: x = query tile, y = kv head * head_blocks + head block, z = split.
template <int DVL>
__global__ void __launch_bounds__(kThreads) attention_kernel(const Params p) {
  extern __shared__ float smem[];
  attend<DVL>(p.sh, p.job, p.seg, blockIdx.x, int(blockIdx.y), int(blockIdx.z), smem);
}

// Batched decode (n_q = 1 per entry). grid: x = entry, y = kv head *
// head_blocks + head block, z = split. The entry (job and segments) is
// copied to shared memory first: attend reads it for every tile, and held
// in registers it would spill.
template <int DVL>
__global__ void __launch_bounds__(kThreads) attention_batch_kernel(const BatchParams p) {
  extern __shared__ float smem[];
  __shared__ BatchEntry entry;
  const BatchEntry* e = p.entries + blockIdx.x;
  if (threadIdx.x == 0) entry.job = e->job;
  if (int(threadIdx.x) < kBatchSegments) entry.seg[threadIdx.x] = e->seg[threadIdx.x];
  __syncthreads();
  if (int(blockIdx.z) >= entry.job.n_split) return;  // (the whole block) this entry has fewer splits
  attend<DVL>(p.sh, entry.job, entry.seg, 0, int(blockIdx.y), int(blockIdx.z), smem);
}

// Merges the splits' partial softmax states of row (query t, head h) of a
// job into its output; the threads of the block share the dims.
__device__ __forceinline__ void merge_row(const Shape& sh, const Job& jb, int64_t t, int h) {
  const int64_t th = t * sh.n_heads + h;
  const int64_t stride = jb.n_q * sh.n_heads;
  float mx = -INFINITY;
  for (int s = 0; s < jb.n_split; ++s) mx = fmaxf(mx, jb.part_m[s * stride + th]);
  float* o = jb.out + t * jb.ldo + int64_t(h) * sh.dv;
  float l = 0.0f;
  for (int s = 0; s < jb.n_split; ++s) {
    const float ms = jb.part_m[s * stride + th];
    if (ms != -INFINITY) l += jb.part_l[s * stride + th] * expf(ms - mx);
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int d = threadIdx.x; d < sh.dv; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < jb.n_split; ++s) {
      const float ms = jb.part_m[s * stride + th];
      if (ms != -INFINITY) acc += jb.part_acc[(s * stride + th) * sh.dv + d] * expf(ms - mx);
    }
    o[d] = acc * inv;
  }
}

// One block per (query, head).
__global__ void attention_merge_kernel(const Params p) {
  const int64_t th = blockIdx.x;  // t * n_heads + h
  merge_row(p.sh, p.job, th / p.sh.n_heads, int(th % p.sh.n_heads));
}

// One block per (entry, head).
__global__ void attention_batch_merge_kernel(const BatchParams p) {
  const int64_t eh = blockIdx.x;  // entry * n_heads + h
  const Job jb = p.entries[eh / p.sh.n_heads].job;
  merge_row(p.sh, jb, 0, int(eh % p.sh.n_heads));
}

// The block shape for these heads: rows are (query, head) pairs of one kv head.
void shape(const AttentionArgs& a, int& heads_per_block, int& q_per_block, int& head_blocks) {
  const int group = a.n_heads / a.n_kv_heads;
  heads_per_block = std::min(group, kRows);
  q_per_block = kRows / heads_per_block;
  head_blocks = (group + heads_per_block - 1) / heads_per_block;
}

void validate(const AttentionArgs& a) {
  check(a.n_heads > 0 && a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0, "attention: n_heads ", a.n_heads,
        " is not a multiple of n_kv_heads ", a.n_kv_heads);
  check(a.head_dim_qk >= 1 && a.head_dim_qk <= kMaxHeadDim && a.head_dim_v >= 1 && a.head_dim_v <= kMaxHeadDim,
        "attention: head dims must be within 1..", kMaxHeadDim, " on CUDA (got ", a.head_dim_qk, ", ",
        a.head_dim_v, ")");
  check(a.n_segments >= 0 && a.n_segments <= kMaxSegments, "attention: at most ", kMaxSegments,
        " KV segments on CUDA (got ", a.n_segments, ")");
}

std::vector<SegDesc> descs(const AttentionArgs& a) {
  std::vector<SegDesc> v;
  for (int s = 0; s < a.n_segments; ++s) {
    const KVSegment& sg = a.segments[s];
    v.push_back({sg.k, sg.v, sg.ld_k, sg.ld_v, sg.pos0, sg.count, sg.dtype});
  }
  return v;
}

// ---------------------------------------------------------------- tensor-core prefill
//
// Prefill with bf16 K/V (the engine's bf16 mode) on tensor cores, in the
// FlashAttention-2 arrangement: a block owns kBM (query, head) rows of one kv
// head (row r = query r / group, head r % group of the group, so the heads
// sharing a kv head share each K/V tile); each warp owns 16 rows. Per key
// tile (kBN keys of one segment, bf16 in shared memory, double-buffered with
// cp.async) a warp computes S = Q K^T with mma.sync m16n8k16 (bf16 in, fp32
// accumulate; Q is rounded to bf16 once, in registers), masks it when the
// tile straddles a mask edge, updates the online softmax in fp32 (exp2
// domain) and accumulates O += P V with P rounded to bf16 (taken straight
// from the S accumulators, which have the A-operand layout). The key tiles
// are those of for_each_range's ranges (the same key ranges as the SIMT
// kernel: the always-visible prefix and the union of the windows), so
// windowed prefill touches only ~window + meta keys per row tile.
//
// fp32 segments (the current chunk) are first copied to bf16 (scratch; see
// tc_staging_bytes): exact when the cache is bf16, since the model rounds
// the chunk's K/V to the cache precision before attention.
namespace tc {
constexpr int kWarps = 8;         // default warps per block (tc_cfg), 16 (query, head) rows each
constexpr int kBN = 64;           // keys per tile
constexpr int kPad = 8;           // bf16 of padding per smem row: rows 16 bytes apart mod 128 B, so ldmatrix is conflict-free
constexpr int kMinQ = 16;         // fewer queries: the SIMT kernel (decode, split keys)
}  // namespace tc

std::atomic<int> g_tc_mode{0};               // 0 auto, 1 never, 2 wherever applicable
std::atomic<long long> g_tc_launches{0};     // tensor-core prefill launches (either kernel)
std::atomic<int> g_wgmma_mode{-1};           // -1 not read yet; else wgmma_mode's answer before the build check
std::atomic<long long> g_wgmma_launches{0};  // either wgmma form
std::atomic<long long> g_wgmma_ws_launches{0};

// Two floats as bf16x2 (lo in the low half), bit-identical to the host's
// f32_to_bf16: for Q and fp32 K/V, once per element.
__device__ __forceinline__ uint32_t pack_bf16_exact(float lo, float hi) {
  return uint32_t(f32_to_bf16_bits(lo)) | (uint32_t(f32_to_bf16_bits(hi)) << 16);
}
// The same with the hardware conversion (round to nearest even; NaN aside,
// identical): for P, in the inner loop. cvt puts its first operand high.
__device__ __forceinline__ uint32_t pack_bf16_fast(float lo, float hi) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

// Part `part` of segment sg's keys visible to some query at p_first..p_last,
// as rows [first, first + len) of the segment: part 0 is the always-visible
// prefix (everything up to p_last when global), part 1 the window. The same
// ranges as for_each_range.
__device__ __forceinline__ void seg_part(const SegDesc& sg, int part, int64_t window, int64_t nav, int64_t p_first,
                                         int64_t p_last, int64_t& first, int64_t& len) {
  const int64_t pos0 = sg.pos0;
  const int64_t end = min(pos0 + sg.count, p_last + 1);
  first = 0, len = 0;
  if (window < 0) {
    if (part == 0 && end > pos0) len = end - pos0;
    return;
  }
  const int64_t win_lo = max(pos0, p_first - window);
  const int64_t pre_hi = min(end, min(nav, win_lo));
  if (part == 0) {
    if (pre_hi > pos0) len = pre_hi - pos0;
    return;
  }
  const int64_t lo = max(win_lo, pre_hi);
  if (end > lo) first = lo - pos0, len = end - lo;
}

// A key tile: rows r0 .. r0 + nk - 1 (nk <= kBN) of segment s, positions
// consecutive from seg[s].pos0 + r0.
struct TcTile {
  int s;
  int nk;
  int64_t r0;
};
struct TcCursor {
  int s = 0, part = 0;
  int64_t off = 0;
};

// The next tile of the ranges (segment by segment, part 0 then 1); false at the end.
__device__ __forceinline__ bool next_tile(const SegDesc* seg, int n_seg, int64_t window, int64_t nav, int64_t p_first,
                                          int64_t p_last, int bn, TcCursor& c, TcTile& t) {
  while (c.s < n_seg) {
    int64_t first, len;
    seg_part(seg[c.s], c.part, window, nav, p_first, p_last, first, len);
    if (c.off < len) {
      t.s = c.s;
      t.r0 = first + c.off;
      t.nk = int(min(int64_t(bn), len - c.off));
      c.off += bn;
      return true;
    }
    c.off = 0;
    if (++c.part == 2) c.part = 0, ++c.s;
  }
  return false;
}

// next_tile for a cursor that may live in shared memory (the one thread
// that walks publishes tiles to the others): dst.nk == 0 at the end.
__device__ __forceinline__ void next_tile_shared(const SegDesc* seg, int n_seg, int64_t window, int64_t nav,
                                                 int64_t p_first, int64_t p_last, int bn, TcCursor& cur, TcTile& dst) {
  TcCursor c = cur;
  TcTile t{};
  if (!next_tile(seg, n_seg, window, nav, p_first, p_last, bn, c, t)) t.nk = 0;
  cur = c;
  dst = t;
}

// Rows r0 .. r0 + nk - 1, columns col0 .. col0 + D - 1 of a bf16 or fp32
// K/V segment as bf16 into dst[j * (D + kPad) + i]; rows j >= nk become
// zeros (masked, but 0 * garbage could be NaN). bf16 with 16-byte-aligned
// rows: cp.async (waited for by the caller); fp32 with aligned rows: two
// float4 loads per 8 values; anything else: element by element.
template <int D, int NTHREADS, int BN>
__device__ __forceinline__ void tc_load_rows(uint16_t* dst, const void* base, DType dt, int64_t ld, int64_t r0, int nk,
                                             int64_t col0) {
  // (Loops unrolled by 2 only: fully unrolled, their addresses would take
  // ~50 registers on top of the accumulators, live across the loads.)
  constexpr int kChunks = D / 8;  // 16-byte chunks of a bf16 row
  constexpr int kLd = D + tc::kPad;
  const bool aligned = reinterpret_cast<uintptr_t>(base) % 16 == 0;
  if (dt == DType::BF16 && aligned && ld % 8 == 0) {
    const uint16_t* src = static_cast<const uint16_t*>(base);
#pragma unroll 2
    for (int idx = threadIdx.x; idx < BN * kChunks; idx += NTHREADS) {
      const int j = idx / kChunks, c = (idx % kChunks) * 8;
      const bool in = j < nk;
      cp_async16(dst + j * kLd + c, in ? src + (r0 + j) * ld + col0 + c : src, in ? 16 : 0);
    }
  } else {
#pragma unroll 1
    for (int idx = threadIdx.x; idx < BN * D; idx += NTHREADS) {
      const int j = idx / D, i = idx % D;
      dst[j * kLd + i] = j < nk ? f32_to_bf16_bits(load_as_f32(base, dt, (r0 + j) * ld + col0 + i)) : uint16_t(0);
    }
  }
}

// W warps of MT m16 tiles (16 MT (query, head) rows) each: a warp's K/V
// fragments serve its MT tiles, so MT = 2 halves the shared-memory reads per
// mma and doubles the independent accumulator chains. MINB: blocks per SM
// asked of the register allocator. ST: K/V stages in shared memory, 2 (a
// barrier before and after each tile's math) or 3 (one barrier per tile:
// the stage refilled is the one read two tiles back).
// grid: x = row tile (reversed: under a causal mask the last tiles have the
// most keys and start first), y = kv head. Head dims DQ, DV (multiples of 32
// and 16). Rows past n_q * group load zero queries and are not stored.
template <int DQ, int DV, int W, int MT, int BN, int MINB, int ST>
__global__ void __launch_bounds__(32 * W, MINB) attention_tc_kernel(const Params p) {
  constexpr int kWR = 16 * MT;  // rows per warp
  constexpr int kBM = kWR * W;  // (query, head) rows of the block
  static_assert(DQ % 32 == 0 && DV % 16 == 0 && BN % 16 == 0, "tile shapes");
  constexpr int kLdK = DQ + tc::kPad, kLdV = DV + tc::kPad;
  constexpr int kStage = BN * (kLdK + kLdV);  // bf16 elements of one K + V stage
  constexpr int kNT = BN / 8;                  // n8 tiles of S
  extern __shared__ __align__(16) unsigned char tc_smem_raw[];
  uint16_t* const smem = reinterpret_cast<uint16_t*>(tc_smem_raw);
  __shared__ SegDesc sseg[kMaxSegments];  // indexed at run time: shared, not the parameter space

  const Job& jb = p.job;
  const int n_seg = jb.n_seg;
  if (int(threadIdx.x) < n_seg) sseg[threadIdx.x] = p.seg[threadIdx.x];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gq = lane >> 2, tq = lane & 3;  // fragment row (and row + 8), column pair 2 * tq
  const int group = p.sh.group;
  const int kvh = blockIdx.y;
  const int64_t window = jb.window, nav = jb.n_always_visible;
  const int64_t n_rows = jb.n_q * group;
  const int64_t row0 = int64_t(gridDim.x - 1 - blockIdx.x) * kBM;
  const int64_t p_first = jb.q_pos0 + row0 / group;
  const int64_t p_last = jb.q_pos0 + (min(row0 + kBM, n_rows) - 1) / group;
  const int64_t wrow0 = row0 + kWR * warp;
  const bool warp_active = wrow0 < n_rows;  // warp-uniform
  const int64_t wp_first = jb.q_pos0 + min(wrow0, n_rows - 1) / group;
  const int64_t wp_last = jb.q_pos0 + min(wrow0 + kWR - 1, n_rows - 1) / group;

  // This thread's rows wrow0 + 16 mt + gq + 8 i at position rpos[mt][i].
  int64_t rpos[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) rpos[mt][i] = jb.q_pos0 + min(wrow0 + 16 * mt + gq + 8 * i, n_rows - 1) / group;

  // Q as bf16 A fragments: qa[mt][kk] covers dims 16 kk .. 16 kk + 15.
  uint32_t qa[MT][DQ / 16][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t r = wrow0 + 16 * mt + gq + 8 * i, rc = min(r, n_rows - 1);
      const float* q = jb.q + (rc / group) * jb.ldq + int64_t(kvh * group + int(rc % group)) * DQ + 2 * tq;
#pragma unroll
      for (int kk = 0; kk < DQ / 16; ++kk)
#pragma unroll
        for (int hi = 0; hi < 2; ++hi)
          qa[mt][kk][i + 2 * hi] = r < n_rows ? pack_bf16_exact(q[16 * kk + 8 * hi], q[16 * kk + 8 * hi + 1]) : 0u;
    }

  float o[MT][DV / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int d = 0; d < DV / 8; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.0f;
  float m[MT][2], l[MT][2];  // raw-score max; this thread's part of the sum
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;
  const float sl2 = jb.scale * kLog2e;

  // Per-lane ldmatrix offsets (bytes). K (B of S, not transposed): lane
  // addresses key lane & 7 of an n8 tile, dims 8 (lane >> 3) on: matrices
  // 0..3 = dims +0, +8, +16, +24 = b0, b1 of two k16 steps. V (B of P V,
  // transposed): key (lane & 7) + 8 ((lane >> 3) & 1), dims 8 (lane >> 4)
  // on: matrices = (keys +0, dims +0), (keys +8, dims +0), (keys +0, dims
  // +8), (keys +8, dims +8) = b0, b1 of two n8 tiles.
  const uint32_t k_lane = uint32_t(((lane & 7) * kLdK + (lane >> 3) * 8) * 2);
  const uint32_t v_lane = uint32_t((((lane & 7) + ((lane >> 3) & 1) * 8) * kLdV + (lane >> 4) * 8) * 2);

  // The tile sequence: thread 0 advances a cursor kept in shared memory and
  // publishes tiles in s_tile[stage] (nk == 0: no more), so the other
  // threads hold no cursor state in registers.
  __shared__ TcTile s_tile[ST];
  __shared__ TcCursor s_cur;
  auto advance = [&](TcTile& dst) {  // thread 0 only
    next_tile_shared(sseg, n_seg, window, nav, p_first, p_last, BN, s_cur, dst);
  };
  __syncthreads();  // sseg
  if (threadIdx.x == 0) {
    s_cur = TcCursor{};
    advance(s_tile[0]);
    advance(s_tile[1]);
  }
  __syncthreads();
  if (ST == 3 && threadIdx.x == 0) advance(s_tile[2 % ST]);  // read only after the loop's first barrier

  auto load_stage = [&](int stage, const TcTile& t) {
    const SegDesc& sg = sseg[t.s];
    uint16_t* sK = smem + stage * kStage;
    tc_load_rows<DQ, 32 * W, BN>(sK, sg.k, sg.dtype, sg.ld_k, t.r0, t.nk, int64_t(kvh) * DQ);
    tc_load_rows<DV, 32 * W, BN>(sK + BN * kLdK, sg.v, sg.dtype, sg.ld_v, t.r0, t.nk, int64_t(kvh) * DV);
  };

  int stage = 0;
  if (s_tile[0].nk > 0) load_stage(0, s_tile[0]);
  cp_async_commit();
  if (ST == 3) {
    if (s_tile[1].nk > 0) load_stage(1, s_tile[1]);
    cp_async_commit();
  }
  for (;;) {
    const TcTile tile = s_tile[stage];
    if (tile.nk == 0) break;  // block-uniform
    if (ST == 2) {
      const TcTile next = s_tile[stage ^ 1];
      if (next.nk > 0) load_stage(stage ^ 1, next);  // its buffer was released by the barrier ending the last pass
      cp_async_commit();
      cp_async_wait<1>();  // this tile's copies (all but the newest group) have landed
      __syncthreads();     // ... for every thread; and everyone has read s_tile[stage]
    } else {
      // Three stages, one barrier per tile: after it, this tile has landed
      // for every thread, everyone is done with the previous tile (whose
      // stage now takes the tile after next) and has read s_tile[stage].
      cp_async_wait<1>();
      __syncthreads();
      const int st2 = stage == 0 ? 2 : stage - 1;  // (stage + 2) % 3
      const TcTile next2 = s_tile[st2];
      if (next2.nk > 0) load_stage(st2, next2);
      cp_async_commit();
      if (threadIdx.x == 0) advance(s_tile[stage]);  // three tiles ahead; read after the next barrier
    }

    const int64_t k0 = sseg[tile.s].pos0 + tile.r0, k1 = k0 + tile.nk - 1;  // key positions of the tile
    // Warp-uniform: no key of the tile visible to any of the warp's rows
    // (all in the future, or all out of the window and not always visible).
    const bool none = !warp_active || k0 > wp_last || (window >= 0 && k0 >= nav && wp_first - k1 > window);
    if (!none) {
      const bool full = tile.nk == BN && k1 <= wp_first && (window < 0 || wp_last - k0 <= window || k1 < nav);
      const uint32_t sK = smem_u32(smem + stage * kStage);
      const uint32_t sV = sK + uint32_t(BN * kLdK * 2);

      // S = Q K^T (raw scores).
      float s[MT][kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
        for (int k2 = 0; k2 < DQ / 32; ++k2) {
          uint32_t b[4];
          ldmatrix_x4(b, sK + k_lane + uint32_t((nt * 8 * kLdK + k2 * 32) * 2));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_bf16(s[mt][nt], qa[mt][2 * k2], b[0], b[1]);
            mma_bf16(s[mt][nt], qa[mt][2 * k2 + 1], b[2], b[3]);
          }
        }
      }
      // Element e of s[mt][nt]: row 16 mt + gq + 8 (e >> 1), key j = 8 nt +
      // 2 tq + (e & 1) at position k0 + j. The mask in tile-relative int32:
      // visible iff j < nk, j <= hi (k <= p), and j >= lo (p - k <= window)
      // or j < nv (k < n_always_visible).
      if (!full) {
        const int nv = int(max(int64_t(0), min(nav - k0, int64_t(BN))));
        const int nk = tile.nk;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          int hi[2], lo[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int64_t d = rpos[mt][i] - k0;  // the row's position, relative
            hi[i] = int(max(int64_t(-1), min(d, int64_t(BN))));
            lo[i] = window < 0 ? 0 : int(max(int64_t(0), min(d - window, int64_t(BN))));
          }
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int j = 8 * nt + 2 * tq + (e & 1), i = e >> 1;
              if (!(j < nk && j <= hi[i] && (j >= lo[i] || j < nv))) s[mt][nt][e] = -INFINITY;
            }
        }
      }
      // Online softmax, per row (the 4 lanes of a quad share a row).
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          // (Four independent chains for the max and the sum: one chain
          // of 2 kNT dependent operations per tile was a visible latency.)
          float m4[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) m4[(nt & 1) * 2 + e] = fmaxf(m4[(nt & 1) * 2 + e], s[mt][nt][2 * i + e]);
          float mx = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m[mt][i], mx);
          const float ms = m_new == -INFINITY ? 0.0f : m_new * sl2;  // nothing visible yet: p = 0, no NaN
          const float corr = ex2_fast(m[mt][i] * sl2 - ms);                // 0 while m was -inf (o, l are 0)
          m[mt][i] = m_new;
          float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 2 * i; e < 2 * i + 2; ++e) {
              const float pe = ex2_fast(fmaf(s[mt][nt][e], sl2, -ms));  // masked: -inf -> 0
              s[mt][nt][e] = pe;
              s4[(nt & 1) * 2 + (e & 1)] += pe;
            }
          l[mt][i] = l[mt][i] * corr + ((s4[0] + s4[1]) + (s4[2] + s4[3]));
#pragma unroll
          for (int d = 0; d < DV / 8; ++d) o[mt][d][2 * i] *= corr, o[mt][d][2 * i + 1] *= corr;
        }
      // O += P V: the S accumulators of keys 16 kc .. 16 kc + 15 are the A
      // fragment of P (n8 tiles 2 kc, 2 kc + 1), rounded to bf16.
#pragma unroll
      for (int kc = 0; kc < BN / 16; ++kc) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          pa[mt][0] = pack_bf16_fast(s[mt][2 * kc][0], s[mt][2 * kc][1]);
          pa[mt][1] = pack_bf16_fast(s[mt][2 * kc][2], s[mt][2 * kc][3]);
          pa[mt][2] = pack_bf16_fast(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
          pa[mt][3] = pack_bf16_fast(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < DV / 16; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, sV + v_lane + uint32_t((kc * 16 * kLdV + dp * 16) * 2));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_bf16(o[mt][2 * dp], pa[mt], b[0], b[1]);
            mma_bf16(o[mt][2 * dp + 1], pa[mt], b[2], b[3]);
          }
        }
      }
    }
    if (ST == 2) {
      if (threadIdx.x == 0) advance(s_tile[stage]);  // the tile after `next`
      __syncthreads();  // everyone is done with this stage before it is refilled; s_tile published
      stage ^= 1;
    } else {
      stage = stage == 2 ? 0 : stage + 1;
    }
  }

  // Output: the quad's partial sums, then o / l.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[mt][i] += __shfl_xor_sync(0xffffffffu, l[mt][i], 1);
      l[mt][i] += __shfl_xor_sync(0xffffffffu, l[mt][i], 2);
    }
  if (!warp_active) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t r = wrow0 + 16 * mt + gq + 8 * i;
      if (r >= n_rows) continue;
      const float inv = l[mt][i] > 0.0f ? 1.0f / l[mt][i] : 0.0f;
      float* out = jb.out + (r / group) * jb.ldo + int64_t(kvh * group + int(r % group)) * DV + 2 * tq;
#pragma unroll
      for (int d = 0; d < DV / 8; ++d) {
        out[8 * d] = o[mt][d][2 * i] * inv;
        out[8 * d + 1] = o[mt][d][2 * i + 1] * inv;
      }
    }
}

// ---- The same attention on Hopper warpgroup MMAs (sm_90a; head dims 64/128,
// the shape of Hymba-1.5B). Block, rows, tile walk, masks and softmax are
// those of attention_tc_kernel<64, 128, 8, 1, 128, 1, 3>; what changes is
// how the products run. The 8 warps form two warpgroups of 64 (query, head)
// rows; per 128-key tile each warpgroup issues 4 wgmma m64n128k16 for S =
// Q K^T (Q from registers, K from shared memory) and 16 m64n64k16 for
// O += P V (P from registers, V from shared memory read transposed), where
// the mma.sync kernel needed 192 mma, 96 ldmatrix and their address
// arithmetic per warp: that instruction stream was its limit (Nsight: 8.4
// instructions per mma at one block per SM). K and V land by cp.async in
// the 128-byte-swizzled layout wgmma reads (K: 128 keys x 128 bytes; V: two
// halves of 64 value dims, 128 keys x 128 bytes each), three stages, one
// barrier per tile. The products accumulate in a different order than
// mma.sync's, so the bits differ from the older kernel within the bf16
// tolerance of the tests.
namespace wg {
constexpr int kThreads = 256;        // two warpgroups
[[maybe_unused]] constexpr int kBM = 128;  // (query, head) rows of a block, 64 per warpgroup
constexpr int kBN = 128;             // keys per tile
constexpr int kStages = 4;
[[maybe_unused]] constexpr int kDQ = 64, kDV = 128;
constexpr uint32_t kRowBytes = 128;                     // one swizzled row: 64 bf16
constexpr uint32_t kKBytes = kBN * kRowBytes;           // K tile: 128 keys x 64 dims
constexpr uint32_t kVHalfBytes = kBN * kRowBytes;       // V tile half: 128 keys x 64 value dims
constexpr uint32_t kStageBytes = kKBytes + 2 * kVHalfBytes;
constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + 1024;  // + the 1024-byte alignment
}  // namespace wg

#if HYMBA_WGMMA
// Byte offset of bf16 element (row j, column i < 64) in a 128-byte-swizzled
// tile of 128-byte rows: chunk i / 8 of row j sits at chunk (i / 8) ^ (j % 8).
__device__ __forceinline__ uint32_t sw128_offset(int j, int i) {
  return uint32_t(j) * wg::kRowBytes + uint32_t((((i >> 3) ^ (j & 7)) << 4) | ((i & 7) << 1));
}

// Rows r0 .. r0 + nk - 1 of a K (64 columns from col0) or V (128 columns,
// two 64-column halves kVHalfBytes apart) segment into the swizzled layout;
// rows >= nk become zeros. bf16 with 16-byte-aligned rows: cp.async (the
// caller commits and waits), a thread taking one 16-byte column chunk of
// rows j0, j0 + 256 / chunks, ...: all of one row % 8, so one swizzled
// offset and two pointer steps per copy; otherwise element by element.
template <int D>
__device__ __forceinline__ void wg_load_rows(unsigned char* dst, const void* base, DType dt, int64_t ld, int64_t r0,
                                             int nk, int64_t col0) {
  constexpr int kChunks = D / 8;                    // 16-byte chunks of a bf16 row
  constexpr int kRowsPerPass = wg::kThreads / kChunks;
  static_assert(kRowsPerPass % 8 == 0 && wg::kBN % kRowsPerPass == 0, "one swizzle phase per thread");
  const bool aligned = reinterpret_cast<uintptr_t>(base) % 16 == 0;
  if (dt == DType::BF16 && aligned && ld % 8 == 0 && col0 % 8 == 0) {
    const int c = int(threadIdx.x) % kChunks, j0 = int(threadIdx.x) / kChunks;
    unsigned char* d = dst + (c >> 3) * wg::kVHalfBytes + sw128_offset(j0, (c & 7) * 8);
    const uint16_t* src = static_cast<const uint16_t*>(base);
    const uint16_t* s0 = src + (r0 + j0) * ld + col0 + c * 8;
    const int64_t step = int64_t(kRowsPerPass) * ld;
#pragma unroll
    for (int u = 0; u < wg::kBN / kRowsPerPass; ++u) {
      const bool in = j0 + kRowsPerPass * u < nk;
      cp_async16(d + u * kRowsPerPass * wg::kRowBytes, in ? s0 + u * step : src, in ? 16 : 0);
    }
  } else {
#pragma unroll 1
    for (int idx = threadIdx.x; idx < wg::kBN * D; idx += wg::kThreads) {
      const int j = idx / D, i = idx % D;
      const uint16_t v = j < nk ? f32_to_bf16_bits(load_as_f32(base, dt, (r0 + j) * ld + col0 + i)) : uint16_t(0);
      *reinterpret_cast<uint16_t*>(dst + (i >> 6) * wg::kVHalfBytes + sw128_offset(j, i & 63)) = v;
    }
  }
}

// This thread's rows wrow0 + lane / 4 + 8 i: their positions, and Q as the
// bf16 A fragments of S (qa[kk]: dims 16 kk .. 16 kk + 15); rows past n_rows
// get zeros (their position is clamped; they are not stored).
__device__ __forceinline__ void wg_load_q(const Job& jb, int group, int kvh, int64_t wrow0, int lane,
                                          int64_t (&rpos)[2], uint32_t (&qa)[wg::kDQ / 16][4]) {
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t n_rows = jb.n_q * group;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t r = wrow0 + gq + 8 * i, rc = min(r, n_rows - 1);
    rpos[i] = jb.q_pos0 + rc / group;
    const float* q = jb.q + (rc / group) * jb.ldq + int64_t(kvh * group + int(rc % group)) * wg::kDQ + 2 * tq;
#pragma unroll
    for (int kk = 0; kk < wg::kDQ / 16; ++kk)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi)
        qa[kk][i + 2 * hi] = r < n_rows ? pack_bf16_exact(q[16 * kk + 8 * hi], q[16 * kk + 8 * hi + 1]) : 0u;
  }
}

// Whether a 128-key tile at key positions k0 .. k1 (nk keys) needs no mask
// for this thread's rows (at positions rpos; rows beyond n_rows see their
// clamped position and are not stored).
__device__ __forceinline__ bool wg_tile_full(int nk, int64_t k0, int64_t k1, const int64_t (&rpos)[2],
                                             int64_t window, int64_t nav) {
  return nk == wg::kBN && k1 <= min(rpos[0], rpos[1]) &&
         (window < 0 || max(rpos[0], rpos[1]) - k0 <= window || k1 < nav);
}

// S = Q K^T for one 128-key tile whose K starts at shared address sK (raw
// scores: key 8 nt + 2 tq + (e & 1) in s[4 nt + e]), issued and committed
// as one group, not waited for; O's registers are fenced first (the P V
// product that follows accumulates into them).
__device__ __forceinline__ void wg_issue_s(float (&s)[64], const uint32_t (&qa)[wg::kDQ / 16][4], uint32_t sK,
                                           float (&o)[2][32]) {
  wgmma_fence_operand(o[0]);
  wgmma_fence_operand(o[1]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < wg::kDQ / 16; ++kk)
    wgmma_m64n128k16_rs(s, qa[kk], wgmma_desc_sw128(sK + 32u * kk, 16u, 1024u), kk);
  wgmma_commit();
}

// O += P V for one 128-key tile whose V halves start at shared address sV.
__device__ __forceinline__ void wg_issue_pv(float (&o)[2][32], const uint32_t (&pa)[wg::kBN / 16][4], uint32_t sV) {
#pragma unroll
  for (int kc = 0; kc < wg::kBN / 16; ++kc)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      wgmma_m64n64k16_rs_tb(o[h], pa[kc],
                            wgmma_desc_sw128(sV + h * wg::kVHalfBytes + kc * 16u * wg::kRowBytes, 1024u, 1024u), 1);
  wgmma_commit();
}

// The quad's partial sums, then O / l for this thread's rows (zeros when
// the block had no tile).
__device__ __forceinline__ void wg_store(const Job& jb, int group, int kvh, int64_t wrow0, int lane,
                                         const float (&o)[2][32], float (&l)[2], bool no_tiles) {
  const int gq = lane >> 2, tq = lane & 3;
  const int64_t n_rows = jb.n_q * group;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t r = wrow0 + gq + 8 * i;
    if (r >= n_rows) continue;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    float* out = jb.out + (r / group) * jb.ldo + int64_t(kvh * group + int(r % group)) * wg::kDV + 2 * tq;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int d = 0; d < 8; ++d) {
        out[64 * h + 8 * d] = no_tiles ? 0.0f : o[h][4 * d + 2 * i] * inv;
        out[64 * h + 8 * d + 1] = no_tiles ? 0.0f : o[h][4 * d + 2 * i + 1] * inv;
      }
  }
}

// The scores s of a 128-key tile at key position k0 (key 8 nt + 2 tq + (e &
// 1) in s[4 nt + e], of the row at position rpos[e >> 1]) masked as
// attention_tc_kernel masks them, then the online softmax: s becomes the
// probabilities, m and l the running maximum and sum, corr the factor for O.
__device__ __forceinline__ void wg_mask_softmax(float (&s)[64], bool full, int nk, int64_t k0, const int64_t (&rpos)[2],
                                                int64_t window, int64_t nav, int tq, float sl2, float (&m)[2],
                                                float (&l)[2], float (&corr)[2]) {
  using wg::kBN;
  if (!full) {
    // The mask of attention_tc_kernel (key jj of the tile visible iff jj <
    // nk, jj <= hi (k <= p) and jj >= lo (p - k <= window) or jj < nv (k <
    // n_always_visible)) as one range per row, [lo, min(hi, nk - 1)],
    // tested with one unsigned compare, plus the prefix [0, min(nv, that
    // end + 1)) where the tile holds always-visible keys.
    const int nv = int(max(int64_t(0), min(nav - k0, int64_t(kBN))));
    int base[2], width[2], pre[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t d = rpos[i] - k0;
      const int hi = int(max(int64_t(-1), min(d, int64_t(nk - 1))));
      const int lo = window < 0 ? 0 : int(max(int64_t(0), min(d - window, int64_t(kBN))));
      base[i] = 2 * tq - lo;  // jj - lo = 8 nt + (e & 1) + base
      width[i] = max(0, hi - lo + 1);
      pre[i] = min(nv, hi + 1);
    }
    if (nv == 0) {  // block-uniform
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          if (!(unsigned(8 * nt + (e & 1) + base[i]) < unsigned(width[i]))) s[4 * nt + e] = -INFINITY;
        }
    } else {
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1, jj = 8 * nt + 2 * tq + (e & 1);
          if (!(unsigned(8 * nt + (e & 1) + base[i]) < unsigned(width[i]) || jj < pre[i])) s[4 * nt + e] = -INFINITY;
        }
    }
  }
  // Online softmax per row (the 4 lanes of a quad share a row).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float m4[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) m4[(nt & 1) * 2 + e] = fmaxf(m4[(nt & 1) * 2 + e], s[4 * nt + 2 * i + e]);
    float mx = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[i], mx);
    const float ms = m_new == -INFINITY ? 0.0f : m_new * sl2;  // nothing visible yet: p = 0, no NaN
    corr[i] = ex2_fast(m[i] * sl2 - ms);                       // 0 while m was -inf (o, l are 0)
    m[i] = m_new;
    float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 2 * i; e < 2 * i + 2; ++e) {
        const float pe = ex2_fast(fmaf(s[4 * nt + e], sl2, -ms));  // masked: -inf -> 0
        s[4 * nt + e] = pe;
        s4[(nt & 1) * 2 + (e & 1)] += pe;
      }
    l[i] = l[i] * corr[i] + ((s4[0] + s4[1]) + (s4[2] + s4[3]));
  }
}

// O *= corr per row, skipped where every factor of the warp is exactly 1.
__device__ __forceinline__ void wg_rescale(float (&o)[2][32], const float (&corr)[2]) {
  if (__all_sync(0xffffffffu, corr[0] == 1.0f && corr[1] == 1.0f)) return;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int d = 0; d < 8; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[h][4 * d + e] *= corr[e >> 1];
}

// P as the A fragments of its product: keys 16 kc .. 16 kc + 15 (n8 blocks
// 2 kc, 2 kc + 1 of S), rounded to bf16.
__device__ __forceinline__ void wg_pack_p(const float (&s)[64], uint32_t (&pa)[wg::kBN / 16][4]) {
#pragma unroll
  for (int kc = 0; kc < wg::kBN / 16; ++kc) {
    pa[kc][0] = pack_bf16_fast(s[8 * kc + 0], s[8 * kc + 1]);
    pa[kc][1] = pack_bf16_fast(s[8 * kc + 2], s[8 * kc + 3]);
    pa[kc][2] = pack_bf16_fast(s[8 * kc + 4], s[8 * kc + 5]);
    pa[kc][3] = pack_bf16_fast(s[8 * kc + 6], s[8 * kc + 7]);
  }
}

#endif  // HYMBA_WGMMA

// grid: x = row tile (reversed, as attention_tc_kernel), y = kv head.
__global__ void __launch_bounds__(wg::kThreads, 1) attention_wgmma_kernel(const Params p) {
#if HYMBA_WGMMA
  using namespace wg;
  extern __shared__ __align__(1024) unsigned char wg_smem_raw[];
  // (The swizzle atoms must be 1024-byte aligned; the dynamic window's start
  // need not be.)
  unsigned char* const smem = wg_smem_raw + ((1024u - (smem_u32(wg_smem_raw) & 1023u)) & 1023u);
  __shared__ SegDesc sseg[kMaxSegments];

  const Job& jb = p.job;
  const int n_seg = jb.n_seg;
  if (int(threadIdx.x) < n_seg) sseg[threadIdx.x] = p.seg[threadIdx.x];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tq = lane & 3;
  const int group = p.sh.group;
  const int kvh = blockIdx.y;
  const int64_t window = jb.window, nav = jb.n_always_visible;
  const int64_t n_rows = jb.n_q * group;
  const int64_t row0 = int64_t(gridDim.x - 1 - blockIdx.x) * kBM;
  const int64_t p_first = jb.q_pos0 + row0 / group;
  const int64_t p_last = jb.q_pos0 + (min(row0 + kBM, n_rows) - 1) / group;
  const int64_t wrow0 = row0 + 16 * warp;  // this warp's 16 rows

  int64_t rpos[2];
  uint32_t qa[kDQ / 16][4];
  wg_load_q(jb, group, kvh, wrow0, lane, rpos, qa);

  float o[2][32];  // value dims 64 h + 8 d + 2 tq + (e & 1) in o[h][4 d + e]
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[h][i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float sl2 = jb.scale * kLog2e;

  // Tile descriptors: thread 0 walks the ranges and publishes tile j in
  // s_tile[j % kStages] three tiles ahead (read after a barrier), so the
  // other threads keep no cursor in registers.
  __shared__ TcTile s_tile[kStages];
  __shared__ TcCursor s_cur;
  auto advance = [&](TcTile& dst) {  // thread 0 only
    next_tile_shared(sseg, n_seg, window, nav, p_first, p_last, kBN, s_cur, dst);
  };
  __syncthreads();  // sseg
  if (threadIdx.x == 0) {
    s_cur = TcCursor{};
    advance(s_tile[0]);
    advance(s_tile[1]);
    advance(s_tile[2]);
  }
  __syncthreads();

  auto load_stage = [&](int stage, const TcTile& t) {
    const SegDesc& sg = sseg[t.s];
    unsigned char* st = smem + stage * kStageBytes;
    wg_load_rows<kDQ>(st, sg.k, sg.dtype, sg.ld_k, t.r0, t.nk, int64_t(kvh) * kDQ);
    wg_load_rows<kDV>(st + kKBytes, sg.v, sg.dtype, sg.ld_v, t.r0, t.nk, int64_t(kvh) * kDV);
  };
  auto issue_pv = [&](const uint32_t (&pa)[kBN / 16][4], int st) {
    wg_issue_pv(o, pa, smem_u32(smem + st * kStageBytes) + kKBytes);
  };

  // The pipeline of a warpgroup, tile j: issue S_j = Q K_j^T, then O +=
  // P_{j-1} V_{j-1} behind it; wait for S_j only, so the softmax of tile j
  // runs while the tensor cores take P_{j-1} V_{j-1}; then wait for that,
  // rescale O and keep P_j (bf16) for the next round. Stages hold tiles
  // j-1 (its V still read), j, and j+1, j+2 in flight: tile j+2 is loaded
  // into the stage tile j-2 left, which both warpgroups finished with
  // before the barrier of round j. Every round issues the same wgmma
  // sequence (no tile is skipped; a tile no row of the warpgroup sees is
  // all masked, and round 0 multiplies P = 0 by tile 0's V): wgmma on a
  // path the compiler cannot prove uniform is serialised.
  uint32_t pa[kBN / 16][4];  // P_{j-1}
#pragma unroll
  for (int kc = 0; kc < kBN / 16; ++kc) pa[kc][0] = pa[kc][1] = pa[kc][2] = pa[kc][3] = 0u;
  int prev_stage = 0;
  const bool no_tiles = s_tile[0].nk == 0;  // (segments without the queries' own keys)
  if (s_tile[0].nk > 0) load_stage(0, s_tile[0]);
  cp_async_commit();
  if (s_tile[1].nk > 0) load_stage(1, s_tile[1]);
  cp_async_commit();
  for (int j = 0;; ++j) {
    const int stage = j % kStages;
    const TcTile tile = s_tile[stage];
    if (tile.nk == 0) break;  // block-uniform
    cp_async_wait<1>();  // tile j (tile j+1 may still be in flight)
    fence_proxy_async();
    __syncthreads();
    {
      const int st2 = (j + 2) % kStages;
      const TcTile next2 = s_tile[st2];
      if (next2.nk > 0) load_stage(st2, next2);
      cp_async_commit();
      if (threadIdx.x == 0) advance(s_tile[(j + 3) % kStages]);
    }

    const int64_t k0 = sseg[tile.s].pos0 + tile.r0, k1 = k0 + tile.nk - 1;
    const bool full = wg_tile_full(tile.nk, k0, k1, rpos, window, nav);

    float s[64];
    wg_issue_s(s, qa, smem_u32(smem + stage * kStageBytes), o);
    issue_pv(pa, prev_stage);
    wgmma_wait<1>();  // S_j (the older group)
    wgmma_fence_operand(s);

    float corr[2];
    wg_mask_softmax(s, full, tile.nk, k0, rpos, window, nav, tq, sl2, m, l, corr);
    wgmma_wait<0>();  // P_{j-1} V_{j-1} is in O (and pa is free)
    wgmma_fence_operand(o[0]);
    wgmma_fence_operand(o[1]);
    wg_rescale(o, corr);
    wg_pack_p(s, pa);  // P_j
    prev_stage = stage;
  }
  // The last tile's product (with no tile at all, a product of zeros with
  // whatever stage 0 holds: the output is then written as zeros).
  wgmma_fence_operand(o[0]);
  wgmma_fence_operand(o[1]);
  wgmma_fence();
  issue_pv(pa, prev_stage);
  wgmma_wait<0>();
  wgmma_fence_operand(o[0]);
  wgmma_fence_operand(o[1]);

  wg_store(jb, group, kvh, wrow0, lane, o, l, no_tiles);
#else
  __trap();  // dispatched only where wgmma_built() (an sm_90a build on an sm_90 device)
#endif
}

// ---- The warp-specialised form (the default where every segment suits
// TMA): a producer (one thread of its own warpgroup) and two consumer
// warpgroups that never wait for each other at a block barrier. The
// producer walks the tiles and loads
// each into its stage with three TMA copies (K, the two V halves; the
// tensor maps give the same 128-byte swizzle, and rows past a segment's
// end arrive as zeros), signalling a per-stage "full" mbarrier by bytes;
// consumers release a stage on its "empty" mbarrier once their P V on it
// has completed. The consumers take turns issuing their products (two
// named barriers), so one warpgroup's softmax overlaps the other's
// products (FlashAttention-3's ping-pong); within a warpgroup the round is
// that of attention_wgmma_kernel (S_j, then P_{j-1} V_{j-1}, softmax of j).
namespace wg {
constexpr int kWsThreads = kThreads + 128;  // + the producer warpgroup (one thread of it works)
// Registers per thread after setmaxnreg: the producer warpgroup gives
// its share to the consumers (128 x 40 + 256 x 232 <= 64K).
[[maybe_unused]] constexpr int kProducerRegs = 40, kConsumerRegs = 232;
}  // namespace wg

// The kernel's parameters: Params and a K and a V tensor map per segment
// (__grid_constant__: TMA reads the maps where they lie, in parameter space).
struct WsParams {  // (CUtensorMap brings its own alignment)
  CUtensorMap k[kMaxSegments];
  CUtensorMap v[kMaxSegments];
  Params p;
};

#if HYMBA_WGMMA
__device__ __forceinline__ void tma_load_2d(uint32_t smem_dst, const CUtensorMap* map, int c0, int c1,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::
          "r"(smem_dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(uint32_t(__cvta_generic_to_shared(bar)))
      : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(uint32_t(__cvta_generic_to_shared(bar))),
               "r"(bytes)
               : "memory");
}
#endif  // HYMBA_WGMMA

// grid: x = row tile (reversed), y = kv head; 384 threads (warps 0-7
// consumers, warps 8-11 the producer warpgroup, of which one thread works).
__global__ void __launch_bounds__(wg::kWsThreads, 1) attention_wgmma_ws_kernel(const __grid_constant__ WsParams wp) {
#if HYMBA_WGMMA
  using namespace wg;
  extern __shared__ __align__(1024) unsigned char wg_smem_raw[];
  unsigned char* const smem = wg_smem_raw + ((1024u - (smem_u32(wg_smem_raw) & 1023u)) & 1023u);
  __shared__ SegDesc sseg[kMaxSegments];
  __shared__ TcTile s_tile[kStages];
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];

  const Params& p = wp.p;
  const Job& jb = p.job;
  const int n_seg = jb.n_seg;
  if (int(threadIdx.x) < n_seg) sseg[threadIdx.x] = p.seg[threadIdx.x];
  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(&full_bar[st], 1);         // the producer's arrive (with the tile's bytes)
      mbar_init(&empty_bar[st], wg::kThreads / 32);  // one per consumer warp
    }
  }
  __syncthreads();  // sseg, barriers (the last block-wide barrier)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = p.sh.group;
  const int kvh = blockIdx.y;
  const int64_t window = jb.window, nav = jb.n_always_visible;
  const int64_t n_rows = jb.n_q * group;
  const int64_t row0 = int64_t(gridDim.x - 1 - blockIdx.x) * kBM;

  if (warp >= wg::kThreads / 32) {  // the producer warpgroup: one thread
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (warp != wg::kThreads / 32 || lane != 0) return;
    const int64_t p_first = jb.q_pos0 + row0 / group;
    const int64_t p_last = jb.q_pos0 + (min(row0 + kBM, n_rows) - 1) / group;
    TcCursor cur{};
    for (int t = 0;; ++t) {
      const int st = t % kStages;
      if (t >= kStages) mbar_wait(&empty_bar[st], unsigned((t / kStages - 1) & 1));  // tile t - 4 consumed
      TcTile tile;
      next_tile_shared(sseg, n_seg, window, nav, p_first, p_last, kBN, cur, tile);
      s_tile[st] = tile;
      if (tile.nk == 0) {
        mbar_arrive(&full_bar[st]);  // the end: no bytes
        return;
      }
      mbar_arrive_expect_tx(&full_bar[st], kStageBytes);
      const uint32_t dst = smem_u32(smem + st * kStageBytes);
      const int row = int(tile.r0);  // (TMA coordinates are int32; attention_tc checks the counts)
      tma_load_2d(dst, &wp.k[tile.s], kvh * kDQ, row, &full_bar[st]);
      tma_load_2d(dst + kKBytes, &wp.v[tile.s], kvh * kDV, row, &full_bar[st]);
      tma_load_2d(dst + kKBytes + kVHalfBytes, &wp.v[tile.s], kvh * kDV + 64, row, &full_bar[st]);
    }
  }

  // Consumers.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));
  const int wgi = warp / 4;  // warpgroup 0 or 1
  const int tq = lane & 3;
  const int64_t wrow0 = row0 + 16 * warp;
  int64_t rpos[2];
  uint32_t qa[kDQ / 16][4];
  wg_load_q(jb, group, kvh, wrow0, lane, rpos, qa);
  float o[2][32];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[h][i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float sl2 = jb.scale * kLog2e;
  uint32_t pa[kBN / 16][4];  // P_{j-1} (round 0: zeros against tile 0's V)
#pragma unroll
  for (int kc = 0; kc < kBN / 16; ++kc) pa[kc][0] = pa[kc][1] = pa[kc][2] = pa[kc][3] = 0u;

  // Turns: warpgroup 0 issues on barrier 1 and hands over on 2, warpgroup
  // 1 the reverse; warpgroup 1 hands the first turn over up front and skips
  // its last hand-over, so both barriers end balanced.
  constexpr int kConsumers = wg::kThreads;
  const int my_turn = wgi == 0 ? 1 : 2, their_turn = wgi == 0 ? 2 : 1;
  if (wgi == 1) named_bar_arrive(1, kConsumers);

  int prev_stage = 0;
  bool no_tiles = true;
  for (int j = 0;; ++j) {
    const int stage = j % kStages;
    mbar_wait(&full_bar[stage], unsigned((j / kStages) & 1));
    // Lane 0 reads the descriptor for its warp (and is the lane that
    // releases the stage later: its own read comes before its release).
    TcTile tile{};
    if (lane == 0) tile = s_tile[stage];
    tile.s = __shfl_sync(0xffffffffu, tile.s, 0);
    tile.nk = __shfl_sync(0xffffffffu, tile.nk, 0);
    tile.r0 = __shfl_sync(0xffffffffu, tile.r0, 0);
    if (tile.nk == 0) break;  // block-uniform
    no_tiles = false;
    const int64_t k0 = sseg[tile.s].pos0 + tile.r0, k1 = k0 + tile.nk - 1;
    const bool full = wg_tile_full(tile.nk, k0, k1, rpos, window, nav);

    float s[64];
    named_bar_sync(my_turn, kConsumers);
    wg_issue_s(s, qa, smem_u32(smem + stage * kStageBytes), o);
    wg_issue_pv(o, pa, smem_u32(smem + prev_stage * kStageBytes) + kKBytes);
    named_bar_arrive(their_turn, kConsumers);
    wgmma_wait<1>();  // S_j
    wgmma_fence_operand(s);

    float corr[2];
    wg_mask_softmax(s, full, tile.nk, k0, rpos, window, nav, tq, sl2, m, l, corr);
    wgmma_wait<0>();  // P_{j-1} V_{j-1} is in O: its stage is free
    wgmma_fence_operand(o[0]);
    wgmma_fence_operand(o[1]);
    // (Lane 0 releases the stage for its warp once every lane is past the wait.)
    __syncwarp();
    if (j > 0 && lane == 0) mbar_arrive(&empty_bar[prev_stage]);
    wg_rescale(o, corr);
    wg_pack_p(s, pa);
    prev_stage = stage;
  }
  // The last tile's product, in turn (warpgroup 1 hands no turn back).
  named_bar_sync(my_turn, kConsumers);
  wgmma_fence_operand(o[0]);
  wgmma_fence_operand(o[1]);
  wgmma_fence();
  wg_issue_pv(o, pa, smem_u32(smem + prev_stage * kStageBytes) + kKBytes);
  if (wgi == 0) named_bar_arrive(their_turn, kConsumers);
  wgmma_wait<0>();
  wgmma_fence_operand(o[0]);
  wgmma_fence_operand(o[1]);
  wg_store(jb, group, kvh, wrow0, lane, o, l, no_tiles);
#else
  __trap();
#endif
}

// 1 in the sm_90a build of this file (read back per device: which build a
// device runs is the driver's choice among the embedded ones).
__device__ int g_wgmma_built = HYMBA_WGMMA;

// Whether a's shape and segments suit the tensor-core kernel (mode aside):
// enough queries, head dims 64/128, bf16 K/V (fp32 segments alongside are
// taken as bf16-exact), a positive scale.
bool tc_shape_ok(const AttentionArgs& a) {
  auto dim_ok = [](int d) { return d == 64 || d == 128; };
  if (a.n_q < tc::kMinQ || !dim_ok(a.head_dim_qk) || !dim_ok(a.head_dim_v)) return false;
  if (a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0 || a.n_kv_heads > 65535) return false;
  if (!(a.scale > 0.0f) || !std::isfinite(a.scale)) return false;
  if (a.n_segments < 1 || a.n_segments > kMaxSegments || a.segments == nullptr) return false;
  bool any_bf16 = false;
  for (int s = 0; s < a.n_segments; ++s) {
    const DType dt = a.segments[s].dtype;
    if (dt != DType::BF16 && dt != DType::F32) return false;
    any_bf16 |= dt == DType::BF16;
  }
  return any_bf16;  // all fp32: the engine's fp32 mode (or a first chunk; see attention_splits)
}

// A launch shape of the tensor-core kernel: W warps of MT m16 tiles, BN
// keys per tile, MINB blocks per SM asked of the register allocator.
struct TcCfg {
  int w, mt, bn, minb, stages;
};
// Measured on an H100 (CudaAttentionTc.DISABLED_Timing, 2048 queries of an
// 8K prompt, 25/5 heads, sliding window / global):
//  * 64/64: two blocks of 4 warps of two m16 tiles per SM, 0.137 / 0.571 ms
//    (one block of 8 warps of one tile: 0.189 / 0.792; 128-key tiles:
//    0.165 / 0.623);
//  * 64/128 (Hymba-1.5B): one block of 8 warps of one tile with 128-key
//    tiles, 0.219 / 0.826 ms (64-key tiles: 0.240 / 0.979; two tiles per
//    warp or two blocks of 4 warps: 0.210-0.238 / 0.866-0.993);
//  * both then with three K/V stages and one barrier per tile instead of
//    two stages and two barriers: 64/128 0.217 / 0.815-0.826 -> 0.201 /
//    0.751-0.763 ms, 64/64 0.140 / 0.593 -> 0.132 / 0.558 (same call).
// Other head dims keep the first shape (not measured).
TcCfg tc_cfg(const AttentionArgs& a) {
  if (a.head_dim_qk == 64 && a.head_dim_v == 64) return {4, 2, 64, 2, 3};
  if (a.head_dim_qk == 64 && a.head_dim_v == 128) return {8, 1, 128, 1, 3};
  return {tc::kWarps, 1, tc::kBN, 1, 2};
}

int64_t tc_blocks(const AttentionArgs& a) {
  const int64_t rows = a.n_q * (a.n_heads / a.n_kv_heads);
  const TcCfg c = tc_cfg(a);
  const int64_t bm = 16 * c.w * c.mt;
  return (rows + bm - 1) / bm * a.n_kv_heads;
}

// Automatic choice: the tensor-core kernel once it has blocks for at least
// half the SMs (below that the SIMT kernel's key splits may win; tune with
// the timing test).
bool use_tc(const AttentionArgs& a, int sm_count) {
  const int mode = g_tc_mode.load(std::memory_order_relaxed);
  if (mode == 1 || !tc_shape_ok(a)) return false;
  return mode == 2 || 2 * tc_blocks(a) >= sm_count;
}

size_t tc_smem_bytes(int dq, int dv, int bn, int stages) {
  return size_t(stages) * sizeof(uint16_t) * size_t(bn) * size_t(dq + dv + 2 * tc::kPad);
}

// fp32 segments (a prefill chunk's own K/V, already rounded to the bf16
// cache) are copied to dense bf16 before the tensor-core kernel, so that
// every tile arrives by cp.async: converting them while loading a tile
// made those loads synchronous, and they are most of a windowed layer's keys.
// Bytes of the copies: per fp32 segment, [count][n_kv dq] then [count][n_kv dv].
size_t tc_staging_bytes(const AttentionArgs& a) {
  size_t bytes = 0;
  for (int s = 0; s < a.n_segments; ++s)
    if (a.segments[s].dtype == DType::F32)
      bytes += sizeof(uint16_t) * size_t(a.segments[s].count) * size_t(a.n_kv_heads) *
               size_t(a.head_dim_qk + a.head_dim_v);
  return bytes;
}

// One thread per 8 values: rows x cols (cols % 8 == 0) of src (pitch ld)
// to dense bf16, the same rounding as tc_load_rows.
__global__ void tc_stage_bf16_kernel(const float* k, int64_t ld_k, int cols_k, uint16_t* k_out, const float* v,
                                     int64_t ld_v, int cols_v, uint16_t* v_out, int64_t rows) {
  const bool is_v = blockIdx.y == 1;
  const float* src = is_v ? v : k;
  const int64_t ld = is_v ? ld_v : ld_k;
  const int cols = is_v ? cols_v : cols_k;
  uint16_t* dst = is_v ? v_out : k_out;
  const int64_t per_row = cols / 8;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * per_row) return;
  const int64_t r = i / per_row;
  const int c = int(i % per_row) * 8;
  const float* x = src + r * ld + c;
  const uint4 w = make_uint4(pack_bf16_exact(x[0], x[1]), pack_bf16_exact(x[2], x[3]), pack_bf16_exact(x[4], x[5]),
                             pack_bf16_exact(x[6], x[7]));
  *reinterpret_cast<uint4*>(dst + r * cols + c) = w;
}

// Whether the current device runs the sm_90a build of this file (so
// attention_wgmma_kernel has its body), asked once per device. Not asked
// inside a stream capture (the answer needs a copy): false there until known.
bool wgmma_built(cudaStream_t stream) {
  int dev = 0;
  HYMBA_CUDA_CHECK(cudaGetDevice(&dev));
  static std::mutex mu;
  static std::map<int, bool> known;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = known.find(dev);
    if (it != known.end()) return it->second;
  }
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  HYMBA_CUDA_CHECK(cudaStreamIsCapturing(stream, &cs));
  if (cs != cudaStreamCaptureStatusNone) return false;
  int v = 0;
  HYMBA_CUDA_CHECK(cudaMemcpyFromSymbol(&v, g_wgmma_built, sizeof v));
  std::lock_guard<std::mutex> lock(mu);
  known[dev] = v != 0;
  return v != 0;
}

// Which form 64/128 heads take where the wgmma build runs: 2 (default) the
// warp-specialised kernel where every segment suits TMA, else 1; 1 the
// wgmma kernel with block barriers; 0 the mma.sync kernel. Set by
// set_attention_wgmma (tests) or HYMBA_ATTN_WGMMA (A/B timing; read once).
int wgmma_mode(cudaStream_t stream) {
  int mode = g_wgmma_mode.load(std::memory_order_relaxed);
  if (mode < 0) {
    const char* e = std::getenv("HYMBA_ATTN_WGMMA");
    int expected = -1;
    g_wgmma_mode.compare_exchange_strong(expected, e && std::strcmp(e, "0") == 0   ? 0
                                                   : e && std::strcmp(e, "1") == 0 ? 1
                                                                                   : 2);
    mode = g_wgmma_mode.load(std::memory_order_relaxed);
  }
  return mode > 0 && wgmma_built(stream) ? mode : 0;
}

// cuTensorMapEncodeTiled from the driver (through the runtime, so nothing
// links libcuda); null where the driver has none.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    (void)cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 2-D map of `cols` bf16 columns x `rows` rows (pitch ld elements), read
// in boxes of 64 columns x 128 rows with the 128-byte swizzle; rows past
// the end read as zeros. False where TMA cannot address it.
bool encode_kv_map(CUtensorMap& map, const void* base, int64_t cols, int64_t rows, int64_t ld) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (!encode || reinterpret_cast<uintptr_t>(base) % 16 != 0 || (ld * 2) % 16 != 0 || rows < 1 ||
      rows >= (int64_t(1) << 31) || cols < 64 || ld < cols)
    return false;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(ld * 2)};
  const cuuint32_t box[2] = {64, uint32_t(wg::kBN)};
  const cuuint32_t elem[2] = {1, 1};
  return encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, elem,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The warp-specialised launch, if every non-empty segment (bf16 by now)
// gets its tensor maps; false leaves the launch to the caller.
bool launch_wgmma_ws(const AttentionArgs& a, const Params& p, dim3 grid, cudaStream_t stream) {
  WsParams wp;  // (~5 KB: the launch copies it)
  std::memset(static_cast<void*>(&wp), 0, sizeof wp);
  wp.p = p;
  for (int s = 0; s < p.job.n_seg; ++s) {
    const SegDesc& sg = p.seg[s];
    if (sg.count <= 0) continue;
    if (sg.dtype != DType::BF16) return false;
    if (!encode_kv_map(wp.k[s], sg.k, int64_t(a.n_kv_heads) * wg::kDQ, sg.count, sg.ld_k) ||
        !encode_kv_map(wp.v[s], sg.v, int64_t(a.n_kv_heads) * wg::kDV, sg.count, sg.ld_v))
      return false;
  }
  const auto kernel = attention_wgmma_ws_kernel;
  HYMBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(wg::kSmemBytes)));
  kernel<<<grid, wg::kWsThreads, wg::kSmemBytes, stream>>>(wp);
  HYMBA_CUDA_LAUNCHED("attention_wgmma_ws");
  return true;
}

void attention_tc(const AttentionArgs& a, void* staging, cudaStream_t stream) {
  Params p{};
  p.sh.n_heads = a.n_heads, p.sh.dq = a.head_dim_qk, p.sh.dv = a.head_dim_v;
  p.sh.group = a.n_heads / a.n_kv_heads;
  p.sh.splits = 1;
  Job& jb = p.job;
  jb.q = a.q, jb.ldq = a.ldq, jb.n_q = a.n_q, jb.q_pos0 = a.q_pos0;
  jb.window = a.window, jb.n_always_visible = a.n_always_visible, jb.scale = a.scale;
  jb.n_seg = a.n_segments, jb.n_split = 1;
  jb.out = a.out, jb.ldo = a.ldo;
  uint16_t* next = static_cast<uint16_t*>(staging);
  for (int s = 0; s < a.n_segments; ++s) {
    const KVSegment& sg = a.segments[s];
    p.seg[s] = {sg.k, sg.v, sg.ld_k, sg.ld_v, sg.pos0, sg.count, sg.dtype};
    if (sg.dtype != DType::F32 || sg.count <= 0) continue;
    check(next != nullptr, "attention: the tensor-core kernel needs staging for fp32 K/V (attention_scratch_bytes)");
    const int ck = a.n_kv_heads * a.head_dim_qk, cv = a.n_kv_heads * a.head_dim_v;
    uint16_t* kb = next;
    uint16_t* vb = kb + sg.count * ck;
    next = vb + sg.count * cv;
    const int64_t items = sg.count * (std::max(ck, cv) / 8);
    tc_stage_bf16_kernel<<<dim3(blocks_for(items, 256, 0x7fffffff), 2), 256, 0, stream>>>(
        static_cast<const float*>(sg.k), sg.ld_k, ck, kb, static_cast<const float*>(sg.v), sg.ld_v, cv, vb,
        sg.count);
    HYMBA_CUDA_LAUNCHED("attention_tc_stage");
    p.seg[s] = {kb, vb, ck, cv, sg.pos0, sg.count, DType::BF16};
  }
  const int64_t row_tiles = tc_blocks(a) / a.n_kv_heads;
  check(row_tiles <= 0x7fffffff, "attention: launch grid too large");
  const dim3 grid(unsigned(row_tiles), unsigned(a.n_kv_heads));
  const TcCfg c = tc_cfg(a);
  const size_t smem = tc_smem_bytes(a.head_dim_qk, a.head_dim_v, c.bn, c.stages);
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024)
      HYMBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, 32 * c.w, smem, stream>>>(p);
    HYMBA_CUDA_LAUNCHED("attention_tc");
  };
  const int dq = a.head_dim_qk, dv = a.head_dim_v;
  g_tc_launches.fetch_add(1, std::memory_order_relaxed);
  const int wmode = dq == 64 && dv == 128 ? wgmma_mode(stream) : 0;
  if (wmode == 2 && launch_wgmma_ws(a, p, grid, stream)) {
    g_wgmma_launches.fetch_add(1, std::memory_order_relaxed);
    g_wgmma_ws_launches.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (wmode >= 1) {
    const auto kernel = attention_wgmma_kernel;
    HYMBA_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(wg::kSmemBytes)));
    kernel<<<grid, wg::kThreads, wg::kSmemBytes, stream>>>(p);
    HYMBA_CUDA_LAUNCHED("attention_wgmma");
    g_wgmma_launches.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  constexpr int W = tc::kWarps, BN = tc::kBN;
  // (the shapes of tc_cfg)
  if (dq == 64 && dv == 64) launch(attention_tc_kernel<64, 64, 4, 2, 64, 2, 3>);
  else if (dq == 64) launch(attention_tc_kernel<64, 128, 8, 1, 128, 1, 3>);
  else if (dv == 64) launch(attention_tc_kernel<128, 64, W, 1, BN, 1, 2>);
  else launch(attention_tc_kernel<128, 128, W, 1, BN, 1, 2>);
}

}  // namespace

// ---------------------------------------------------------------- decode (n_q == 1)
//
// One query per sequence: the work is streaming K/V once, so the kernel is
// built around the loads. A block (kDecWarps warps) owns (entry, kv head,
// key chunk); a chunk is chunk_tiles consecutive 32-key tiles of the visible
// ranges (for_each_range: for one query every key of a range is visible, so
// only a partial last tile needs a mask). Warp w takes the chunk's tiles w,
// w + kDecWarps, ... and processes all G query heads of the kv head together,
// so each K/V row is read once, straight from global memory into registers
// with 16-byte loads (no shared-memory staging):
//  * QK: 8 lanes per K row (lane slice DQ/8 dims, Q held in registers), 4
//    rows per load step, 8 steps per tile; the 8 partial dot products of a
//    lane are reduce-scattered over its 8-lane group (7 shuffles per head),
//    leaving lane L with the full score of key 4 (L & 7) + (L >> 3).
//  * softmax: per head a warp max per tile (online softmax, fp32, expf);
//    the denominators stay per lane until the end.
//  * PV: DV/8 lanes per V row (8 dims each), 32/(DV/8) rows per step; the
//    probabilities come from the score lanes by shuffles.
// At the end the warps merge through shared memory and the block writes the
// output (one chunk) or its partial state (m, l, acc) for decode_merge_kernel,
// which combines the chunks with independent loads.
//
// The chunking of an entry depends only on that entry (and, for the single
// op, the SM count), so a batch entry's result does not depend on the batch.

namespace {

constexpr int kDecWarps = 4;
constexpr int kDecThreads = 32 * kDecWarps;
constexpr int kDecTile = 32;          // keys per warp tile
constexpr int kDecSegments = 8;       // segments an entry holds inline
constexpr int kDecRanges = 2 * kDecSegments;
constexpr int kDecMaxChunks = 1024;   // decode_merge_kernel's shared weights

struct DecEntry {
  const float* q;
  float* out;
  int64_t q_pos0, window, nav;
  int64_t prow0;  // first partial row (n_chunks > 1): row of (head h, chunk c) = prow0 + h * n_chunks + c
  float scale;
  int n_seg;
  int n_chunks;
  int chunk_tiles;
  SegDesc seg[kDecSegments];
};

struct DecParams {
  DecEntry one;               // the single-sequence launch's entry (entries == nullptr)
  const DecEntry* entries;    // batched: device array, one per blockIdx.z
  int n_heads, group;         // group: query heads per kv head (<= the kernel's G)
  float* part_m;
  float* part_l;
  float* part_acc;
};

// N consecutive elements of a K/V row as fp32: 16-byte loads (the caller
// guarantees alignment); zeros when !ok (the address is always a valid row).
template <DType DT, int N>
__device__ __forceinline__ void dec_load(const void* base, int64_t elem, bool ok, float (&x)[N]) {
  if constexpr (DT == DType::F32) {
    static_assert(N % 4 == 0, "fp32 slices are whole float4s");
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + elem);
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      float4 v = __ldg(p + i);
      if (!ok) v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
    }
  } else {
    static_assert(N % 8 == 0, "16-bit slices are whole uint4s");
    const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + elem);
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
      uint4 v = __ldg(p + i);
      if (!ok) v = make_uint4(0u, 0u, 0u, 0u);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {  // little-endian pairs: element 2k in the low half
        if constexpr (DT == DType::BF16) {
          x[8 * i + 2 * k] = __uint_as_float(w[k] << 16);
          x[8 * i + 2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
        } else {
          x[8 * i + 2 * k] = f16_bits_to_f32(uint16_t(w[k] & 0xffffu));
          x[8 * i + 2 * k + 1] = f16_bits_to_f32(uint16_t(w[k] >> 16));
        }
      }
    }
  }
}

// One 32-key tile (rows r0 .. r0 + nk - 1 of segment sg, nk >= 1) for the
// warp's running state (m, l per lane, acc: this lane's 8 value dims).
template <int G, int DQ, int DV, DType DT>
__device__ __forceinline__ void dec_tile(const float (&q)[G][DQ / 8], const SegDesc& sg, int64_t r0, int nk, int g,
                                         int lane, float (&m)[G], float (&l)[G], float (&acc)[G][8]) {
  constexpr int QS = DQ / 8;
  constexpr int VL = DV / 8, RV = 32 / VL;
  const unsigned full = 0xffffffffu;
  const int sub = lane & 7, grp = lane >> 3;

  // Scores. Step i (of 8) reads row 4 i + grp, dims sub * QS ...; steps i
  // and i + 4 are combined at once (first reduce-scatter stage, mask 4).
  const int64_t kcol = int64_t(g) * DQ + sub * QS;
  float s1[4][G];
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    float pp[2][G];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = 4 * (jj + 4 * half) + grp;
      const bool ok = j < nk;
      float x[QS];
      dec_load<DT, QS>(sg.k, (r0 + (ok ? j : 0)) * sg.ld_k + kcol, ok, x);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float d = 0.0f;
#pragma unroll
        for (int e = 0; e < QS; ++e) d = fmaf(q[h][e], x[e], d);
        pp[half][h] = d;
      }
    }
    const bool up = lane & 4;  // keeps steps with bit 2 set
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float send = up ? pp[0][h] : pp[1][h];
      const float keep = up ? pp[1][h] : pp[0][h];
      s1[jj][h] = keep + __shfl_xor_sync(full, send, 4);
    }
  }
  float s2[2][G];
  {
    const bool up = lane & 2;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const float send = up ? s1[kk][h] : s1[kk + 2][h];
        const float keep = up ? s1[kk + 2][h] : s1[kk][h];
        s2[kk][h] = keep + __shfl_xor_sync(full, send, 2);
      }
  }
  // Lane holds key 4 sub + grp (step sub, row grp of the step).
  const bool key_ok = 4 * sub + grp < nk;
  float p[G];
  {
    const bool up = lane & 1;
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float send = up ? s2[0][h] : s2[1][h];
      const float keep = up ? s2[1][h] : s2[0][h];
      // (Every lane shuffles: a shuffle skipped by some lanes of its mask hangs the warp.)
      const float other = __shfl_xor_sync(full, send, 1);
      const float sc = key_ok ? keep + other : -INFINITY;
      const float m_new = fmaxf(m[h], warp_max(sc));  // finite: the tile has a visible key
      const float corr = expf(m[h] - m_new);          // 0 while m is -inf (l, acc are 0)
      p[h] = expf(sc - m_new);                         // masked: 0
      l[h] = fmaf(l[h], corr, p[h]);
      m[h] = m_new;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] *= corr;
    }
  }

  // P V. Step t reads row t * RV + vgrp, dims vsub * 8 .. + 7.
  const int vsub = lane % VL, vgrp = lane / VL;
  const int64_t vcol = int64_t(g) * DV + vsub * 8;
#pragma unroll
  for (int t = 0; t < VL; ++t) {
    const int j = t * RV + vgrp;
    const bool ok = j < nk;
    const int src = (j >> 2) | ((j & 3) << 3);  // the lane holding key j's probability
    float x[8];
    dec_load<DT, 8>(sg.v, (r0 + (ok ? j : 0)) * sg.ld_v + vcol, ok, x);
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float ph = __shfl_sync(full, p[h], src);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(ph, x[e], acc[h][e]);
    }
  }
}

// grid: x = chunk, y = kv head, z = entry (batched) or 0.
template <int G, int DQ, int DV>
__global__ void __launch_bounds__(kDecThreads, G <= 5 ? 3 : 2) decode_kernel(const DecParams P) {
  static_assert(DQ % 64 == 0 && (DV == 64 || DV == 128), "decode head dims");
  constexpr int VL = DV / 8;
  __shared__ DecEntry e;
  __shared__ int64_t rg_first[kDecRanges], rg_len[kDecRanges], rg_tile0[kDecRanges + 1];
  __shared__ int rg_seg[kDecRanges];
  __shared__ int n_rg;
  __shared__ float sM[kDecWarps][G], sL[kDecWarps][G];
  __shared__ float sAcc[kDecWarps][G][DV];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (P.entries) {
    const int* src = reinterpret_cast<const int*>(P.entries + blockIdx.z);
    int* dst = reinterpret_cast<int*>(&e);
    for (int i = tid; i < int(sizeof(DecEntry) / 4); i += kDecThreads) dst[i] = src[i];
  } else if (tid == 0) {
    e = P.one;
  }
  __syncthreads();
  const int chunk = blockIdx.x;
  if (chunk >= e.n_chunks) return;  // (whole block) this entry has fewer chunks
  if (tid == 0) {
    int n = 0;
    int64_t tiles = 0;
    for_each_range(e.seg, e.n_seg, e.window, e.nav, e.q_pos0, e.q_pos0, [&](int s, int64_t first, int64_t len) {
      rg_seg[n] = s, rg_first[n] = first, rg_len[n] = len, rg_tile0[n] = tiles;
      tiles += (len + kDecTile - 1) / kDecTile;
      ++n;
    });
    rg_tile0[n] = tiles;
    n_rg = n;
  }
  __syncthreads();

  const int g = blockIdx.y;
  const int group = P.group;
  const int sub = lane & 7;
  float q[G][DQ / 8];
#pragma unroll
  for (int h = 0; h < G; ++h)
#pragma unroll
    for (int i = 0; i < DQ / 8; ++i)
      q[h][i] = h < group ? e.q[int64_t(g * group + h) * DQ + sub * (DQ / 8) + i] * e.scale : 0.0f;

  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = -INFINITY, l[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.0f;
  }

  const int nr = n_rg;
  const int64_t t_hi = min(rg_tile0[nr], int64_t(chunk + 1) * e.chunk_tiles);
  int r = 0;
  for (int64_t t = int64_t(chunk) * e.chunk_tiles + warp; t < t_hi; t += kDecWarps) {
    while (rg_tile0[r + 1] <= t) ++r;  // warp-uniform; tiles only grow
    const int64_t off = (t - rg_tile0[r]) * kDecTile;
    const int nk = int(min(int64_t(kDecTile), rg_len[r] - off));
    const SegDesc& sg = e.seg[rg_seg[r]];
    const int64_t r0 = rg_first[r] + off;
    if (sg.dtype == DType::BF16) dec_tile<G, DQ, DV, DType::BF16>(q, sg, r0, nk, g, lane, m, l, acc);
    else if (sg.dtype == DType::F16) dec_tile<G, DQ, DV, DType::F16>(q, sg, r0, nk, g, lane, m, l, acc);
    else dec_tile<G, DQ, DV, DType::F32>(q, sg, r0, nk, g, lane, m, l, acc);
  }

  // The warp's state: l summed over lanes, acc over the lanes sharing dims.
#pragma unroll
  for (int h = 0; h < G; ++h) {
    l[h] = warp_sum(l[h]);
#pragma unroll
    for (int o = VL; o < 32; o <<= 1)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] += __shfl_xor_sync(0xffffffffu, acc[h][i], o);
  }
  if (lane == 0)
#pragma unroll
    for (int h = 0; h < G; ++h) sM[warp][h] = m[h], sL[warp][h] = l[h];
  if (lane < VL)
#pragma unroll
    for (int h = 0; h < G; ++h)
#pragma unroll
      for (int i = 0; i < 8; ++i) sAcc[warp][h][lane * 8 + i] = acc[h][i];
  __syncthreads();

  // The block's state per (head, dim), in a fixed order (deterministic).
  for (int idx = tid; idx < G * DV; idx += kDecThreads) {
    const int h = idx / DV, d = idx % DV;
    if (h >= group) break;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) M = fmaxf(M, sM[w][h]);
    float A = 0.0f, L = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) {
      const float wt = sM[w][h] == -INFINITY ? 0.0f : expf(sM[w][h] - M);
      A = fmaf(wt, sAcc[w][h][d], A);
      L = fmaf(wt, sL[w][h], L);
    }
    const int hg = g * group + h;
    if (e.n_chunks == 1) {
      e.out[int64_t(hg) * DV + d] = L > 0.0f ? A * (1.0f / L) : 0.0f;
    } else {
      const int64_t row = e.prow0 + int64_t(hg) * e.n_chunks + chunk;
      if (d == 0) P.part_m[row] = M, P.part_l[row] = L;
      P.part_acc[row * DV + d] = A;
    }
  }
}

// Combines an entry's chunks for one query head: grid x = entry * n_heads +
// head. Every load is independent: the maxima, then the weights and the
// denominator, then per dim a weighted sum over the chunks.
__global__ void __launch_bounds__(kDecThreads) decode_merge_kernel(const DecParams P, int dv) {
  __shared__ float sw[kDecMaxChunks];
  __shared__ float red[kDecWarps];
  const int64_t ei = blockIdx.x / P.n_heads;
  const int h = int(blockIdx.x % P.n_heads);
  const int nc = P.entries ? P.entries[ei].n_chunks : P.one.n_chunks;
  if (nc <= 1) return;  // written directly
  float* const out = (P.entries ? P.entries[ei].out : P.one.out) + int64_t(h) * dv;
  const int64_t row0 = (P.entries ? P.entries[ei].prow0 : P.one.prow0) + int64_t(h) * nc;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  float mx = -INFINITY;
  for (int c = tid; c < nc; c += kDecThreads) mx = fmaxf(mx, P.part_m[row0 + c]);
  mx = warp_max(mx);
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
#pragma unroll
  for (int w = 1; w < kDecWarps; ++w) mx = fmaxf(mx, red[w]);
  __syncthreads();  // red is reused

  float ls = 0.0f;
  for (int c = tid; c < nc; c += kDecThreads) {
    const float ms = P.part_m[row0 + c];
    const float wt = ms == -INFINITY ? 0.0f : expf(ms - mx);
    sw[c] = wt;
    ls = fmaf(wt, P.part_l[row0 + c], ls);
  }
  ls = warp_sum(ls);
  if (lane == 0) red[warp] = ls;
  __syncthreads();
  float L = 0.0f;
#pragma unroll
  for (int w = 0; w < kDecWarps; ++w) L += red[w];
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;

  const float* acc = P.part_acc + row0 * dv;
  for (int d = tid; d < dv; d += kDecThreads) {
    float a = 0.0f;
#pragma unroll 8
    for (int c = 0; c < nc; ++c) a = fmaf(sw[c], acc[int64_t(c) * dv + d], a);
    out[d] = a * inv;
  }
}

using DecKernel = void (*)(DecParams);

// The kernel for padded group gp and head dims (nullptr: not taken).
// The (padded group, qk dim, v dim) shapes both decode kernels are built
// for: X(G, DQ, DV) for each.
#define HYMBA_DECODE_SHAPES(X)                                                                    \
  X(1, 64, 64) X(2, 64, 64) X(4, 64, 64) X(5, 64, 64) X(8, 64, 64) X(1, 64, 128) X(2, 64, 128) \
  X(4, 64, 128) X(5, 64, 128) X(8, 64, 128) X(1, 128, 64) X(2, 128, 64) X(4, 128, 64)          \
  X(1, 128, 128) X(2, 128, 128) X(4, 128, 128)

DecKernel dec_kernel_for(int gp, int dq, int dv) {
#define HYMBA_DEC(G, Q, V) \
  if (gp == G && dq == Q && dv == V) return decode_kernel<G, Q, V>;
  HYMBA_DECODE_SHAPES(HYMBA_DEC)
#undef HYMBA_DEC
  return nullptr;
}

// Query heads per kv head, rounded up to an instantiated G (0: none).
int dec_padded_group(int group) {
  if (group <= 2) return group >= 1 ? group : 0;
  if (group <= 4) return 4;
  if (group == 5) return 5;
  return group <= 8 ? 8 : 0;
}

// Whether the decode kernels take a: one query, instantiated heads/dims,
// at most kDecSegments segments, every non-empty segment's rows 16-byte
// aligned (what the vector loads need; others run the general kernel).
bool dec_ok(const AttentionArgs& a) {
  if (a.n_q != 1 || a.n_heads <= 0 || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0) return false;
  if (a.n_kv_heads > 65535) return false;
  if (!dec_kernel_for(dec_padded_group(a.n_heads / a.n_kv_heads), a.head_dim_qk, a.head_dim_v)) return false;
  if (a.n_segments < 0 || a.n_segments > kDecSegments || (a.n_segments > 0 && a.segments == nullptr)) return false;
  for (int s = 0; s < a.n_segments; ++s) {
    const KVSegment& sg = a.segments[s];
    if (sg.count <= 0) continue;
    if (sg.dtype != DType::F32 && sg.dtype != DType::BF16 && sg.dtype != DType::F16) return false;
    const int64_t es = int64_t(dtype_size(sg.dtype));
    if (reinterpret_cast<uintptr_t>(sg.k) % 16 != 0 || reinterpret_cast<uintptr_t>(sg.v) % 16 != 0) return false;
    if ((sg.ld_k * es) % 16 != 0 || (sg.ld_v * es) % 16 != 0) return false;
  }
  return true;
}

// a as a DecEntry (chunking and partial rows left to the caller) and its
// count of visible 32-key tiles.
int64_t dec_entry(const AttentionArgs& a, DecEntry& d) {
  d = DecEntry{};
  d.q = a.q, d.out = a.out;
  d.q_pos0 = a.q_pos0, d.window = a.window, d.nav = a.n_always_visible;
  d.scale = a.scale;
  d.n_seg = a.n_segments;
  for (int s = 0; s < a.n_segments; ++s) {
    const KVSegment& sg = a.segments[s];
    d.seg[s] = {sg.k, sg.v, sg.ld_k, sg.ld_v, sg.pos0, sg.count, sg.dtype};
  }
  static_assert(kDecTile == kBK, "count_tiles counts kBK-key tiles");
  return count_tiles(d.seg, d.n_seg, d.window, d.nav, d.q_pos0, d.q_pos0);
}

// At most `want` chunks over n_tiles tiles, balanced, whole warps' worth of
// tiles each: sets chunk_tiles and n_chunks (>= 1).
void dec_chunking(int64_t n_tiles, int64_t want, DecEntry& d) {
  want = std::max<int64_t>(1, std::min<int64_t>(want, kDecMaxChunks));
  if (n_tiles <= 0) {
    d.chunk_tiles = kDecWarps, d.n_chunks = 1;
    return;
  }
  int64_t ct = (n_tiles + want - 1) / want;
  ct = (ct + kDecWarps - 1) / kDecWarps * kDecWarps;
  d.chunk_tiles = int(ct);
  d.n_chunks = int((n_tiles + ct - 1) / ct);
}

// Single sequence: chunks for ~4 blocks per SM over the kv heads, whole
// warps' worth of tiles each (short contexts: one tile per warp).
int64_t dec_single_chunks(int64_t n_tiles, int n_kv, int sm_count) {
  if (n_tiles <= kDecWarps) return 1;
  const int64_t per_head = std::max<int64_t>(1, (4 * int64_t(std::max(sm_count, 1)) + n_kv - 1) / n_kv);
  const int64_t tpw = std::max<int64_t>(1, (n_tiles + kDecWarps * per_head - 1) / (kDecWarps * per_head));
  return std::min<int64_t>(kDecMaxChunks, (n_tiles + kDecWarps * tpw - 1) / (kDecWarps * tpw));
}

// Batched: from the entry alone (batch invariance): chunks of 8 tiles (256
// keys) for short contexts, 16 (512 keys) beyond 2K keys.
int64_t dec_batch_chunks(int64_t n_tiles) {
  const int64_t ct = n_tiles <= 64 ? 2 * kDecWarps : 4 * kDecWarps;
  return std::max<int64_t>(1, (n_tiles + ct - 1) / ct);
}

void dec_launch(const DecParams& p, int gp, int dq, int dv, int64_t n_entries, int max_chunks, bool merge,
                cudaStream_t stream) {
  const DecKernel k = dec_kernel_for(gp, dq, dv);
  check(k != nullptr, "attention: no decode kernel for these heads");
  const int n_kv = p.n_heads / p.group;
  check(n_entries <= 65535 && n_kv <= 65535, "attention: decode grid too large");
  k<<<dim3(unsigned(max_chunks), unsigned(n_kv), unsigned(n_entries)), kDecThreads, 0, stream>>>(p);
  HYMBA_CUDA_LAUNCHED("attention_decode");
  if (merge) {
    const int64_t n = n_entries * p.n_heads;
    check(n <= 0x7fffffff, "attention: too many query rows");
    decode_merge_kernel<<<unsigned(n), kDecThreads, 0, stream>>>(p, dv);
    HYMBA_CUDA_LAUNCHED("attention_decode_merge");
  }
}

// The single-sequence decode: `splits` from attention_splits (chunks at
// most); scratch for the partial states when more than one chunk.
void attention_decode(const AttentionArgs& a, int splits, void* scratch, cudaStream_t stream) {
  DecParams p{};
  const int64_t tiles = dec_entry(a, p.one);
  dec_chunking(tiles, std::max(1, splits), p.one);
  p.entries = nullptr;
  p.n_heads = a.n_heads;
  p.group = a.n_heads / a.n_kv_heads;
  const int nc = p.one.n_chunks;
  if (nc > 1) {
    check(scratch != nullptr, "attention: split-key launch without scratch");
    const size_t rows = size_t(a.n_heads) * size_t(nc);
    p.part_m = reinterpret_cast<float*>(static_cast<char*>(scratch) + kFCounterBytes);  // past the counters
    p.part_l = p.part_m + rows;
    p.part_acc = p.part_l + rows;
    p.one.prow0 = 0;
  }
  dec_launch(p, dec_padded_group(p.group), a.head_dim_qk, a.head_dim_v, 1, nc, nc > 1, stream);
}

}  // namespace

// ---------------------------------------------------------------- fast decode (single and batched)
//
// The decode (n_q == 1) of one sequence (Backend::attention) or of a batch
// (attention_batch) in one launch: grid (block job, kv head[, nothing]),
// kFThreads threads. The visible key ranges (for_each_range) are cut into
// chunks, never across a range, so a block's keys come from one segment and
// one dtype (the block picks its code path once). A chunk is `sub`
// sub-tiles of kFTile16 keys (16-bit K/V) or kFTile16 / 2 (fp32: the same
// bytes); `sub` comes from the entry's own layout only (fast_entry_sub:
// <= kFChunkCap chunks per kv head, more only past kFChunkCap x
// kFCapKeys keys), so an entry's chunks, and so its bits, are the same
// alone and in any batch. bf16 ranges run on tensor cores (f_span_tc,
// below; Q and the probabilities rounded to bf16, as in prefill), unless
// the tensor-core mode is "never" or HYMBA_DECODE_TC=0; the rest (fp32 and
// f16 ranges: the current token, the fp32 mode) on fp32 FMAs (f_span). Per
// sub-tile of f_span:
//  * every thread issues its 16-byte K and V loads at once (the next
//    sub-tile's K loads go out as soon as the scores are done, its V loads
//    after P.V: the loads of a long span overlap the math);
//  * scores: thread (key, 16-byte slice of the K row) dots its slice with
//    the G query heads (Q scaled, in shared memory); the slice sums go
//    through shared memory;
//  * softmax: warp h sums head h's slices per key in a fixed order, updates
//    the running max and denominator (online softmax, fp32, expf) and leaves
//    the probabilities in shared memory;
//  * P.V: thread (key subset, 16-byte slice of the V row) accumulates G x
//    (slice) outputs in registers, rescaled by the max correction.
// At the end of each chunk the threads sharing a V slice are summed
// (shuffles, then the warps in shared memory, fixed order), and the block
// writes the output (one chunk) or the chunk's partial state (m, l, acc) to
// scratch. A block runs a span of consecutive chunks of one range (the
// single launch: one chunk; a batch: a few, fewer blocks with longer load
// streams); each chunk's state is computed from scratch whatever the span,
// so the span changes no bit. The last block of an (entry, kv head) to
// finish (threadfence + counter) merges its chunks in chunk order (the
// result does not depend on which block is last), writes the output and
// zeroes the counter (CUDA graph replays included). The single launch's
// counters sit at the head of the attention scratch (kFCounterBytes,
// zeroed when the backend allocates it; every partial state, this path's
// and the general kernel's, lies after them); a batch's sit at the head of
// its scratch, zeroed before the launch (that scratch is shared).
//
// Launched with PDL: before pdl_wait a block reads only its parameters (the
// single launch: the chunk's range) and writes nothing; a batch's block
// reads its job (staged by a copy) after the wait.

namespace {

constexpr int kFThreads = 256;
constexpr int kFWarps = kFThreads / 32;
constexpr int kFTile16 = 64;          // keys per sub-tile with 16-bit K/V (fp32: 32)
constexpr int kFRanges = 2 * kDecSegments;
constexpr int kFMaxChunks = 256;      // chunks per kv head (the merge's shared weights)
constexpr int kFMaxG = 8;
// Chunking (per entry): at most kFChunkCap chunks per kv head, or one per
// kFCapKeys visible keys where that is more (<= kFMaxChunks), and at least
// kFMinSub sub-tiles long. A 1152-key window layout (meta 128 + ring in two
// pieces + the token) gets 512-key chunks (~3-4 per kv head, chunks never
// cross a range); 8K keys 576-key chunks (15). Every chunk ends
// with a cross-warp reduction and a partial state, which a batch pays per
// chunk: on an H200, 128 x 8K batched decode took 16.0 ms/step with a cap
// of 32, 14.9 with 16, 14.3 with 8, while batch-1 decode was the same with
// 16 and 3-6 % slower with 8 (BENCHMARKS.md).
constexpr int kFChunkCap = 16;
constexpr int kFCapKeys = 1024;
// And chunks of at least kFMinSub sub-tiles (512 bf16 keys): fewer chunk
// ends for a window layer's 1152 keys. H100, alternated runs: 128 x 8K
// batch 14.35 -> 13.68 ms/step going from 1 to 4 sub-tiles (session 6),
// 13.00 / 13.01 -> 12.77 / 12.84 from 4 to 8 (session 8); batch-1 decode
// lost 2 % at 4 when attention ran alone, and nothing at 8 (2.33-2.35 ms
// at 1K, 2.40-2.43 at 8K) now that it runs beside the Mamba branch.
constexpr int64_t kFMinSub = 8;
// A batch launch's blocks: spans of ~kFSpanSubTiles sub-tiles where the
// batch has the work for that (fewer, longer blocks: less per-block
// overhead), else one chunk each. H100, 128 x 8K, alternated runs (session
// 9): 12.33 / 12.50 ms per step with spans of 8 sub-tiles (one chunk),
// 12.32 with 16, 12.16 / 12.19 with 32, 12.22 with 64, 12.26 with 256.
constexpr int kFSpanSubTiles = 32;
constexpr int kFBlocksPerSm = 2;      // resident blocks per SM (launch bounds, register budget)

// A visible key range of one segment: rows [0, len) from k / v (row 0 is
// the range's first row, kv head 0), cut into chunks of ckeys keys numbered
// from chunk0.
struct FRange {
  const char* k;
  const char* v;
  int64_t len, ckeys;
  int ld_k, ld_v;  // bytes between rows (< 2^31: fast_ok)
  int chunk0;
  int dt;  // 0 bf16, 1 f16, 2 fp32
};

// A block's work: a span of n keys (rows from k / v, kv head 0's columns)
// cut into chunks of ckeys keys (the span's first chunk is chunk c0 of the
// entry), and the entry it belongs to. The batch launch stages one per block.
struct alignas(16) FJob {
  const char* k;
  const char* v;
  const float* q;
  float* out;
  float* part;         // acc [rows][dv], then m [rows], l [rows]; rows = n_kv * nc * group
  unsigned* counters;  // [n_kv], zero between launches
  int n, ckeys;
  int ld_k, ld_v;
  int c0;
  int nc;    // the entry's chunks per kv head
  int nblk;  // the entry's blocks per kv head (counter target)
  int dt;    // 0 bf16, 1 f16, 2 fp32
  float scale;
};

struct FParams {
  const FJob* jobs;     // batch launch: one per blockIdx.x (device); nullptr: the single launch below
  const float* q;
  float* out;
  float* part;          // acc [rows][dv], then m [rows], l [rows]; rows = n_kv * n_chunks * group
  unsigned* counters;   // [n_kv], zero between launches
  float scale;
  int group;            // query heads per kv head (<= G)
  int n_chunks;         // per kv head
  int n_rg;
  FRange rg[kFRanges];
};

template <DType DT>
__host__ __device__ constexpr int f_elems() { return DT == DType::F32 ? 4 : 8; }  // elements per 16 bytes

template <DType DT>
__device__ __forceinline__ void f_unpack(const uint4 w, float (&x)[f_elems<DT>()]) {
  if constexpr (DT == DType::F32) {
    x[0] = __uint_as_float(w.x), x[1] = __uint_as_float(w.y);
    x[2] = __uint_as_float(w.z), x[3] = __uint_as_float(w.w);
  } else {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // little-endian pairs: element 2k in the low half
      if constexpr (DT == DType::BF16) {
        x[2 * k] = __uint_as_float(u[k] << 16);
        x[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
      } else {
        x[2 * k] = f16_bits_to_f32(uint16_t(u[k] & 0xffffu));
        x[2 * k + 1] = f16_bits_to_f32(uint16_t(u[k] >> 16));
      }
    }
  }
}

// The shared floats the union region needs: the score slices, the warps'
// outputs, or the merge.
template <int G, int DQ, int DV>
__host__ __device__ constexpr int f_union_floats() {
  const int part16 = G * kFTile16 * (DQ / 8 + 4), part32 = G * (kFTile16 / 2) * (DQ / 4 + 4);
  const int red = kFWarps * G * DV;
  const int merge = 2 * kFMaxChunks * G + 16 + 4 * kFThreads;
  int m = part16 > part32 ? part16 : part32;
  m = m > red ? m : red;
  return m > merge ? m : merge;
}

// A chunk's state (the warps' sums in sRed [warp][G][DV], m and l in sFin)
// written for chunk c of kv head g: the output (the entry's only chunk) or
// the chunk's partial rows.
template <int G, int DV>
__device__ __forceinline__ void f_store(const FJob& J, int group, int g, int c, const float* sRed,
                                        const float* sFin) {
  constexpr int DV4 = DV / 4;
  const int tid = threadIdx.x, nc = J.nc;
  const int ncol = group * DV4;  // <= kFThreads
  if (tid >= ncol) return;
  // The block's state per (head, 4 dims): the warps in order.
  const int h = tid / DV4, d4 = tid % DV4;
  float4 A = *reinterpret_cast<const float4*>(sRed + h * DV + 4 * d4);
#pragma unroll
  for (int w = 1; w < kFWarps; ++w) {
    const float4 b = *reinterpret_cast<const float4*>(sRed + (w * G + h) * DV + 4 * d4);
    A.x += b.x, A.y += b.y, A.z += b.z, A.w += b.w;
  }
  if (nc == 1) {
    const float L = sFin[G + h];
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    float* o = J.out + int64_t(g * group + h) * DV + 4 * d4;  // (any alignment)
    o[0] = A.x * inv, o[1] = A.y * inv, o[2] = A.z * inv, o[3] = A.w * inv;
  } else {
    const int64_t rows = int64_t(gridDim.y) * nc * group;
    float* const part_m = J.part + rows * DV;
    const int64_t row = (int64_t(g) * nc + c) * group + h;
    *reinterpret_cast<float4*>(J.part + row * DV + 4 * d4) = A;
    if (d4 == 0) part_m[row] = sFin[h], part_m[rows + row] = sFin[G + h];
  }
}

// sQ [G][DQ] = the scaled queries of kv head g's heads (zero rows past
// `group`), for every thread (the block's barrier included).
template <int G, int DQ>
__device__ __forceinline__ void f_stage_q(const FJob& J, int group, int g, float* sQ) {
  for (int i = int(threadIdx.x); i < G * DQ; i += kFThreads) {
    const int h = i / DQ;
    sQ[i] = h < group ? J.q[int64_t(g * group + h) * DQ + i % DQ] * J.scale : 0.0f;
  }
  __syncthreads();
}

// The block's span for kv head g: J.n keys from J.k / J.v (kv head 0's
// columns) in chunks of J.ckeys (a multiple of the sub-tile), the first
// being chunk J.c0. Fills sQ, then computes each chunk's state from zero
// (so a chunk's bits do not depend on the span) and stores it (f_store);
// the loads run ahead across chunk boundaries.
template <int G, int DQ, int DV, DType DT>
__device__ __forceinline__ void f_span(const FJob& J, int group, int g, float* sQ, float* sU, float* sP,
                                       float* sCorr, float* sFin) {
  constexpr int E = f_elems<DT>();
  constexpr int BK = kFTile16 * E / 8;                        // keys per sub-tile
  constexpr int SK = DQ / E, KPS = kFThreads / SK, NPK = BK / KPS, LDP = SK + 4;
  constexpr int SV = DV / E, VPS = kFThreads / SV, NPV = BK / VPS;
  static_assert(SK <= 32 && SV <= 32 && NPK >= 1 && NPV >= 1 && BK % KPS == 0 && BK % VPS == 0 && BK % 32 == 0,
                "fast decode tiling");
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int ks = tid % SK, kj = tid / SK;
  const int vs = tid % SV, vj = tid / SV;
  constexpr int ES = E == 4 ? 4 : 2;
  // (J lives in shared memory: what a chunk's end needs is read there when
  // needed; the span's base, strides and length are held in registers.)
  float* sPart = sU;  // [G][BK][LDP]: score slices
  float* sRed = sU;   // [warp][G][DV] at a chunk's end (sPart is dead by then)

  // (Sub-tile t0's rows past the span are zeros; chunk ends are sub-tile
  // ends, so a sub-tile never straddles two chunks.)
  uint4 kr[NPK], vr[NPV];
  const char* const kb = J.k + int64_t(g) * DQ * ES + ks * 16;
  const char* const vb = J.v + int64_t(g) * DV * ES + vs * 16;
  const int n = J.n, ld_k = J.ld_k, ld_v = J.ld_v;
  auto load_k = [&](int t0) {
    const int nk = min(BK, n - t0);
#pragma unroll
    for (int i = 0; i < NPK; ++i) {
      const int j = kj + i * KPS;
      kr[i] = j < nk ? __ldg(reinterpret_cast<const uint4*>(kb + (long long)(t0 + j) * ld_k)) : make_uint4(0, 0, 0, 0);
    }
  };
  auto load_v = [&](int t0) {
    const int nk = min(BK, n - t0);
#pragma unroll
    for (int i = 0; i < NPV; ++i) {
      const int j = vj + i * VPS;
      vr[i] = j < nk ? __ldg(reinterpret_cast<const uint4*>(vb + (long long)(t0 + j) * ld_v)) : make_uint4(0, 0, 0, 0);
    }
  };
  if (n > 0) {  // the first sub-tile's K/V loads go out before Q's
    load_k(0);
    load_v(0);
  }
  f_stage_q<G, DQ>(J, group, g, sQ);

  // Chunk by chunk (t0: the next sub-tile's first key; no keys: one empty
  // chunk, zeros). Few live registers: t0, the chunk's end, n.
  int t0 = 0;
  do {
    const int ce = min(n, t0 + J.ckeys);
    float acc[G][E];
#pragma unroll
    for (int h = 0; h < G; ++h)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] = 0.0f;
    float m_run = -INFINITY, l_run = 0.0f;  // warp h < G: head h's running state

    for (; t0 < ce; t0 += BK) {
      const int nk = min(BK, ce - t0);
      const bool more = t0 + BK < n;  // (the next sub-tile may be the next chunk's first)
      // Score slices (head-major: one head's Q slice live at a time).
      float xk[NPK][E];
#pragma unroll
      for (int i = 0; i < NPK; ++i) f_unpack<DT>(kr[i], xk[i]);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float qh[E];
#pragma unroll
        for (int e4 = 0; e4 < E / 4; ++e4) {
          const float4 qq = reinterpret_cast<const float4*>(sQ + h * DQ + ks * E)[e4];
          qh[4 * e4] = qq.x, qh[4 * e4 + 1] = qq.y, qh[4 * e4 + 2] = qq.z, qh[4 * e4 + 3] = qq.w;
        }
#pragma unroll
        for (int i = 0; i < NPK; ++i) {
          float d = 0.0f;
#pragma unroll
          for (int e = 0; e < E; ++e) d = fmaf(qh[e], xk[i][e], d);
          sPart[(h * BK + kj + i * KPS) * LDP + ks] = d;
        }
      }
      if (more) load_k(t0 + BK);
      __syncthreads();

      // Softmax: warp h, keys lane + 32 i.
      if (warp < G) {
        const int h = warp;
        constexpr int KPL = BK / 32;
        float sc[KPL];
        float tmax = -INFINITY;
#pragma unroll
        for (int i = 0; i < KPL; ++i) {
          const int j = lane + 32 * i;
          float v = -INFINITY;
          if (j < nk) {
            const float4* p4 = reinterpret_cast<const float4*>(sPart + (h * BK + j) * LDP);
            v = 0.0f;
#pragma unroll
            for (int s4 = 0; s4 < SK / 4; ++s4) {
              const float4 a = p4[s4];
              v += a.x;
              v += a.y;
              v += a.z;
              v += a.w;
            }
          }
          sc[i] = v;
          tmax = fmaxf(tmax, v);
        }
        tmax = warp_max(tmax);  // finite: the sub-tile has a key
        const float m_new = fmaxf(m_run, tmax);
        const float corr = expf(m_run - m_new);  // 0 while m_run is -inf (l, acc are 0)
        float ps = 0.0f;
#pragma unroll
        for (int i = 0; i < KPL; ++i) {
          const float p = expf(sc[i] - m_new);  // masked: 0
          sP[h * BK + lane + 32 * i] = p;
          ps += p;
        }
        l_run = fmaf(l_run, corr, warp_sum(ps));
        m_run = m_new;
        if (lane == 0) sCorr[h] = corr;
      }
      __syncthreads();

      // P.V.
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const float cr = sCorr[h];
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] *= cr;
      }
#pragma unroll
      for (int i = 0; i < NPV; ++i) {
        const int j = vj + i * VPS;
        float x[E];
        f_unpack<DT>(vr[i], x);
#pragma unroll
        for (int h = 0; h < G; ++h) {
          const float p = sP[h * BK + j];
#pragma unroll
          for (int e = 0; e < E; ++e) acc[h][e] = fmaf(p, x[e], acc[h][e]);
        }
      }
      if (more) load_v(t0 + BK);
    }

    // Sum the lanes sharing a V slice, then leave the warp's sums in sRed.
#pragma unroll
    for (int o = SV; o < 32; o <<= 1)
#pragma unroll
      for (int h = 0; h < G; ++h)
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], o);
    if (lane < SV) {
#pragma unroll
      for (int h = 0; h < G; ++h)
#pragma unroll
        for (int e4 = 0; e4 < E / 4; ++e4)
          *reinterpret_cast<float4*>(sRed + (warp * G + h) * DV + vs * E + 4 * e4) =
              make_float4(acc[h][4 * e4], acc[h][4 * e4 + 1], acc[h][4 * e4 + 2], acc[h][4 * e4 + 3]);
    }
    if (warp < G && lane == 0) sFin[warp] = m_run, sFin[G + warp] = l_run;
    __syncthreads();
    f_store<G, DV>(J, group, g, J.c0 + max(ce - 1, 0) / J.ckeys, sRed, sFin);
    __syncthreads();  // sU (and sFin) are rewritten by the next chunk or the merge
  } while (t0 < n);  // (t0 == ce here: chunk ends are sub-tile ends)
}

// ---- Tensor-core span (bf16 K/V ranges of the TC variant of the kernel).
// The same chunks and chunk states as f_span, from mma.sync m16n8k16
// instead of fp32 FMAs (the FMA span is issue-bound: ~1.45 TB/s on a
// batch's windowed layers). Transposed, so that the G <= 8 query heads are
// the n8 side and no accumulator is wasted on padding rows:
//  * S^T (16 keys x 8 heads) = K (A: 16 keys x DQ) Q^T (B), per warp step
//    of 16 keys; head dims permuted so that thread (gq, tq) reads one
//    contiguous DQ/2-byte slice of key rows gq and gq + 8 (dims tq*DQ/4 +
//    4kk + {0,1,2,3} stand for the fragment columns {2tq, 2tq+1, 2tq+8,
//    2tq+9} of k16 step kk), the same permutation for Q;
//  * online softmax per head over the keys (ex2, scores scaled by log2 e),
//    each thread holding heads 2tq and 2tq+1; P^T is regrouped into the B
//    fragment of the next product with shuffles and rounded to bf16;
//  * O^T (DV x 8 heads) += V^T (A: DV dims x 16 keys) P^T: output dims
//    permuted so that thread gq reads DV/8 contiguous dims of its 4 key rows
//    (m16 tile i, rows gq and gq + 8 are dims gq*DV/8 + 2i and + 2i + 1);
//    the key pairs of the A fragments are put together with byte permutes.
// Each warp runs its own online softmax over the chunk's 16-key steps w,
// w + 8, ...; at a chunk's end the warps' states are combined in warp order
// (max, then each warp's O and l scaled by e^(m_w - max)) into f_store's
// layout. A warp's next step is hinted into L2 a step ahead. Everything
// depends on the entry's chunking only: the same bits alone and in a batch.
template <int G, int DQ, int DV>
__device__ __forceinline__ void f_span_tc(const FJob& J, int group, int g, float* sQ, float* sU,
                                          float* sFin) {
  static_assert(G <= 8 && DQ % 32 == 0 && DV % 64 == 0, "tensor-core decode shapes");
  constexpr int KU = DQ / 32;  // uint4 of a thread's K slice (DQ/4 dims)
  constexpr int VU = DV / 64;  // uint4 of a thread's V slice (DV/8 dims)
  constexpr int KK = DQ / 16;  // k16 steps of S^T
  constexpr int MI = DV / 16;  // m16 tiles of O^T
  constexpr int kStep = 16;    // keys per warp step
  __shared__ float sMw[kFWarps][8], sLw[kFWarps][8];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gq = lane >> 2, tq = lane & 3;
  float* sRed = sU;  // [warp][G][DV]

  f_stage_q<G, DQ>(J, group, g, sQ);
  uint32_t qb[KK][2];  // B fragments of Q^T: head gq
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    const float* q = sQ + (gq < G ? gq : 0) * DQ + tq * (DQ / 4) + 4 * kk;
    qb[kk][0] = gq < G ? pack_bf16_exact(q[0], q[1]) : 0u;
    qb[kk][1] = gq < G ? pack_bf16_exact(q[2], q[3]) : 0u;
  }

  const char* const kb = J.k + int64_t(g) * DQ * 2;
  const char* const vb = J.v + int64_t(g) * DV * 2;
  const int n = J.n, ld_k = J.ld_k, ld_v = J.ld_v;
  constexpr int LK = DQ * 2 / 128, LV = DV * 2 / 128;  // 128-byte lines per key row
  auto hint = [&](int k0) {  // this warp's step at key k0 into L2
    if (k0 >= n) return;
    for (int i = lane; i < kStep * (LK + LV); i += 32) {
      const int j = i / (LK + LV), l = i % (LK + LV);
      if (k0 + j < n) {
        const char* p = l < LK ? kb + (long long)(k0 + j) * ld_k + l * 128 : vb + (long long)(k0 + j) * ld_v + (l - LK) * 128;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
      }
    }
  };
  auto word = [](const uint4* a, int w) {  // 32-bit word w of a run of uint4
    const uint4& x = a[w >> 2];
    return (w & 3) == 0 ? x.x : (w & 3) == 1 ? x.y : (w & 3) == 2 ? x.z : x.w;
  };
  constexpr int kWarpStride = kStep * kFWarps;
  hint(warp * kStep);

  int c0 = 0;
  do {
    const int ce = min(n, c0 + J.ckeys);
    float o[MI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // heads 2tq + e: running max, this thread's sum

    for (int k0 = c0 + warp * kStep; k0 < ce; k0 += kWarpStride) {
      hint(k0 + kWarpStride);
      uint4 kr[2][KU], vr[4][VU];
#pragma unroll
      for (int t = 0; t < 2; ++t) {  // key rows gq, gq + 8
        const int r = k0 + gq + 8 * t;
        const uint4* p = reinterpret_cast<const uint4*>(kb + (long long)r * ld_k + tq * (DQ / 2));
#pragma unroll
        for (int u = 0; u < KU; ++u) kr[t][u] = r < ce ? __ldg(p + u) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // key rows 2tq, 2tq + 1, 2tq + 8, 2tq + 9
        const int r = k0 + 2 * tq + (i & 1) + 8 * (i >> 1);
        const uint4* p = reinterpret_cast<const uint4*>(vb + (long long)r * ld_v + gq * (DV / 4));
#pragma unroll
        for (int u = 0; u < VU; ++u) vr[i][u] = r < ce ? __ldg(p + u) : make_uint4(0u, 0u, 0u, 0u);
      }
      // S^T: c0/c1 key gq, heads 2tq, 2tq+1; c2/c3 key gq + 8.
      float st[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) {
        const uint32_t a[4] = {word(kr[0], 2 * kk), word(kr[1], 2 * kk), word(kr[0], 2 * kk + 1),
                               word(kr[1], 2 * kk + 1)};
        mma_bf16(st, a, qb[kk][0], qb[kk][1]);
      }
      if (k0 + gq >= ce) st[0] = st[1] = -INFINITY;
      if (k0 + gq + 8 >= ce) st[2] = st[3] = -INFINITY;
      float p[4], corr[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float mx = fmaxf(st[e], st[2 + e]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float m_new = fmaxf(m[e], mx);  // finite: the step's first key is visible
        corr[e] = ex2_fast((m[e] - m_new) * kLog2e);  // 0 while m is -inf (l, o are 0)
        p[e] = ex2_fast((st[e] - m_new) * kLog2e);    // masked: 0
        p[2 + e] = ex2_fast((st[2 + e] - m_new) * kLog2e);
        l[e] = fmaf(l[e], corr[e], p[e] + p[2 + e]);
        m[e] = m_new;
      }
      // B fragment of P^T for head gq: keys 2tq, 2tq+1 (b0) and 2tq+8, 2tq+9
      // (b1), held by lanes 4 * key + gq / 2 as p[(key >= 8) * 2 + (gq & 1)].
      const int srcA = 4 * (2 * tq) + (gq >> 1), srcB = srcA + 4;
      const bool odd = gq & 1;
      float x[4], y[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        x[i] = __shfl_sync(0xffffffffu, p[i], srcA);
        y[i] = __shfl_sync(0xffffffffu, p[i], srcB);
      }
      const uint32_t b0 = pack_bf16_fast(odd ? x[1] : x[0], odd ? y[1] : y[0]);
      const uint32_t b1 = pack_bf16_fast(odd ? x[3] : x[2], odd ? y[3] : y[2]);
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        o[i][0] *= corr[0], o[i][1] *= corr[1], o[i][2] *= corr[0], o[i][3] *= corr[1];
        const uint32_t w0 = word(vr[0], i), w1 = word(vr[1], i), w2 = word(vr[2], i), w3 = word(vr[3], i);
        const uint32_t a[4] = {__byte_perm(w0, w1, 0x5410u), __byte_perm(w0, w1, 0x7632u),
                               __byte_perm(w2, w3, 0x5410u), __byte_perm(w2, w3, 0x7632u)};
        mma_bf16(o[i], a, b0, b1);
      }
    }

    // The chunk's state: each head's sum over the 8 key lanes, then the
    // warps combined in warp order.
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      l[e] += __shfl_xor_sync(0xffffffffu, l[e], 4);
      l[e] += __shfl_xor_sync(0xffffffffu, l[e], 8);
      l[e] += __shfl_xor_sync(0xffffffffu, l[e], 16);
    }
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (gq == 0 && 2 * tq + e < G) sMw[warp][2 * tq + e] = m[e];
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = 2 * tq + e;
      if (h < G) {
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < kFWarps; ++w) M = fmaxf(M, sMw[w][h]);
        const float sc = m[e] == -INFINITY ? 0.0f : ex2_fast((m[e] - M) * kLog2e);
        float* red = sRed + (warp * G + h) * DV + gq * (DV / 8);
#pragma unroll
        for (int i = 0; i < MI; ++i) red[2 * i] = o[i][e] * sc, red[2 * i + 1] = o[i][2 + e] * sc;
        if (gq == 0) sLw[warp][h] = l[e] * sc;
      }
    }
    __syncthreads();
    if (tid < G) {
      float M = -INFINITY, L = 0.0f;
#pragma unroll
      for (int w = 0; w < kFWarps; ++w) M = fmaxf(M, sMw[w][tid]);
#pragma unroll
      for (int w = 0; w < kFWarps; ++w) L += sLw[w][tid];
      sFin[tid] = M, sFin[G + tid] = L;
    }
    __syncthreads();
    f_store<G, DV>(J, group, g, J.c0 + max(ce - 1, 0) / J.ckeys, sRed, sFin);
    __syncthreads();  // sU, sFin, sMw, sLw are rewritten by the next chunk or the merge
    c0 = ce;
  } while (c0 < n);
}

// grid: x = chunk (single launch) or job (batch launch), y = kv head. Two
// blocks per SM (<= 128 registers) where the accumulators allow; TC: bf16
// ranges through f_span_tc.
template <int G, int DQ, int DV, bool TC>
__global__ void __launch_bounds__(kFThreads, (TC || G <= 5) && DQ == 64 ? kFBlocksPerSm : 1)
    decode_fast_kernel(const FParams P) {
  static_assert(G <= kFMaxG && G <= kFWarps && (DQ == 64 || DQ == 128) && (DV == 64 || DV == 128),
                "fast decode shapes");
  constexpr int DV4 = DV / 4;
  __shared__ __align__(16) float sQ[G * DQ];
  __shared__ __align__(16) float sP[G * kFTile16];
  __shared__ __align__(16) float sU[f_union_floats<G, DQ, DV>()];
  __shared__ float sCorr[G], sFin[2 * G], sInv[G];
  __shared__ int sLast;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = blockIdx.y;

  // The block's job, in shared memory (read where used: no registers held
  // across the chunk loop). The single launch builds it from the parameters
  // before pdl_wait; a batch's was staged by a copy, read after the wait.
  // Either way the code below is the same (an entry's bits do not depend on
  // the launch).
  __shared__ FJob sJ;
  if (P.jobs == nullptr) {
    if (tid == 0) {
      const int c = blockIdx.x;
      FRange R = P.rg[0];
#pragma unroll
      for (int i = 1; i < kFRanges; ++i)
        if (i < P.n_rg && P.rg[i].chunk0 <= c) R = P.rg[i];
      const int64_t row0 = int64_t(c - R.chunk0) * R.ckeys;
      FJob J;
      J.k = R.k + row0 * R.ld_k;
      J.v = R.v + row0 * R.ld_v;
      J.q = P.q, J.out = P.out, J.part = P.part, J.counters = P.counters;
      J.n = int(max(int64_t(0), min(R.ckeys, R.len - row0)));
      J.ckeys = int(R.ckeys);
      J.ld_k = R.ld_k, J.ld_v = R.ld_v;
      J.c0 = c, J.nc = P.n_chunks, J.nblk = P.n_chunks, J.dt = R.dt;
      J.scale = P.scale;
      sJ = J;
    }
    pdl_wait();
  } else {
    pdl_wait();
    static_assert(sizeof(FJob) % 16 == 0 && sizeof(FJob) / 16 <= kFThreads, "FJob copy");
    if (tid < int(sizeof(FJob) / 16))
      reinterpret_cast<uint4*>(&sJ)[tid] = reinterpret_cast<const uint4*>(P.jobs + blockIdx.x)[tid];
  }
  pdl_launch_dependents();
  __syncthreads();
  const FJob& J = sJ;

  const int group = P.group;
  if (J.dt == 0) {
    if constexpr (TC) f_span_tc<G, DQ, DV>(J, group, g, sQ, sU, sFin);
    else f_span<G, DQ, DV, DType::BF16>(J, group, g, sQ, sU, sP, sCorr, sFin);
  }
  else if (J.dt == 1) f_span<G, DQ, DV, DType::F16>(J, group, g, sQ, sU, sP, sCorr, sFin);
  else f_span<G, DQ, DV, DType::F32>(J, group, g, sQ, sU, sP, sCorr, sFin);

  const int nc = J.nc;
  if (nc == 1) return;  // written directly
  const int ncol = group * DV4;  // <= kFThreads
  const int64_t rows = int64_t(gridDim.y) * nc * group;
  float* const part_acc = J.part;
  float* const part_m = J.part + rows * DV;
  float* const part_l = part_m + rows;

  // The last block of (entry, kv head g) merges its chunks.
  __threadfence();
  __syncthreads();
  if (tid == 0) sLast = atomicAdd(J.counters + g, 1u) == unsigned(J.nblk - 1);
  __syncthreads();
  if (!sLast) return;
  __threadfence();
  if (tid == 0) J.counters[g] = 0;  // every block of this (entry, kv head) has counted

  // Column (head, 4 dims) over the chunks, split between S thread groups
  // (chunks part, part + S, ... in that order). The first kFPre loads of a
  // thread need no weight: they go out with the m, l loads.
  float* sW = sU;                         // [nc][group]: m, then the weights
  float* sL = sU + kFMaxChunks * G;       // [nc][group]
  float4* sM4 = reinterpret_cast<float4*>(sU + 2 * kFMaxChunks * G + 16);  // [S][ncol]
  const int64_t prow = int64_t(g) * nc * group;
  const int S = max(1, kFThreads / ncol);
  const bool active = tid < S * ncol;
  const int col = tid % ncol, part = tid / ncol;
  const int h = col / DV4, d4 = col % DV4;
  const float4* src = reinterpret_cast<const float4*>(part_acc + (prow + h) * DV) + d4;
  const int64_t stride4 = int64_t(group) * DV4;  // float4s between chunks
  constexpr int kFPre = 16;  // (more spills: the merge's registers beside the block's)
  float4 pre[kFPre];
#pragma unroll
  for (int k = 0; k < kFPre; ++k) {
    const int cc = part + k * S;
    pre[k] = active && cc < nc ? __ldcg(src + cc * stride4) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  for (int i = tid; i < nc * group; i += kFThreads) {
    sW[i] = __ldcg(part_m + prow + i);
    sL[i] = __ldcg(part_l + prow + i);
  }
  __syncthreads();
  if (warp < group) {
    const int hh = warp;
    float M = -INFINITY;
    for (int cc = lane; cc < nc; cc += 32) M = fmaxf(M, sW[cc * group + hh]);
    M = warp_max(M);
    float ls = 0.0f;
    for (int cc = lane; cc < nc; cc += 32) {
      const float ms = sW[cc * group + hh];
      const float w = ms == -INFINITY ? 0.0f : expf(ms - M);
      sW[cc * group + hh] = w;
      ls = fmaf(w, sL[cc * group + hh], ls);
    }
    ls = warp_sum(ls);
    if (lane == 0) sInv[hh] = ls > 0.0f ? 1.0f / ls : 0.0f;
  }
  __syncthreads();
  if (active) {
    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int k = 0; k < kFPre; ++k) {
      const int cc = part + k * S;
      const float w = cc < nc ? sW[cc * group + h] : 0.0f;
      a.x = fmaf(w, pre[k].x, a.x), a.y = fmaf(w, pre[k].y, a.y), a.z = fmaf(w, pre[k].z, a.z),
      a.w = fmaf(w, pre[k].w, a.w);
    }
#pragma unroll 8
    for (int cc = part + kFPre * S; cc < nc; cc += S) {
      const float w = sW[cc * group + h];
      const float4 x = __ldcg(src + cc * stride4);
      a.x = fmaf(w, x.x, a.x), a.y = fmaf(w, x.y, a.y), a.z = fmaf(w, x.z, a.z), a.w = fmaf(w, x.w, a.w);
    }
    sM4[part * ncol + col] = a;
  }
  __syncthreads();
  if (tid < ncol) {
    const int h = tid / DV4, d4 = tid % DV4;
    float4 a = sM4[tid];
    for (int s = 1; s < S; ++s) {
      const float4 b = sM4[s * ncol + tid];
      a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
    }
    const float inv = sInv[h];
    float* o = J.out + int64_t(g * group + h) * DV + 4 * d4;
    o[0] = a.x * inv, o[1] = a.y * inv, o[2] = a.z * inv, o[3] = a.w * inv;
  }
}

using FKernel = void (*)(FParams);

// The kernel for padded group gp and head dims (nullptr: not taken).
// Whether bf16 ranges take the tensor-core span: unless the tensor-core mode
// is 1 (never: the fp32 FMA span, as the tests of the exact kernels want) or
// HYMBA_DECODE_TC=0 (read once; A/B timing). Either way an entry's bits are
// the same alone and in a batch (both launches take the kernel from here).
bool decode_tc_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("HYMBA_DECODE_TC");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on && g_tc_mode.load(std::memory_order_relaxed) != 1;
}

FKernel fast_kernel_for(int gp, int dq, int dv) {
  const bool tc = decode_tc_enabled();
#define HYMBA_FDEC(G, Q, V) \
  if (gp == G && dq == Q && dv == V) return tc ? decode_fast_kernel<G, Q, V, true> : decode_fast_kernel<G, Q, V, false>;
  HYMBA_DECODE_SHAPES(HYMBA_FDEC)
#undef HYMBA_FDEC
  return nullptr;
}

// Whether the fast path takes a: what the decode kernels take (dec_ok), a
// counter per kv head, fewer than 2^31 keys per segment.
// HYMBA_DECODE_FAST=0 in the environment turns it off (A/B timing against
// decode_kernel + decode_merge_kernel).
bool fast_ok(const AttentionArgs& a) {
  static const bool on = [] {
    const char* e = std::getenv("HYMBA_DECODE_FAST");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  if (!on || !dec_ok(a) || a.n_kv_heads > kFMaxKv) return false;
  if (!fast_kernel_for(dec_padded_group(a.n_heads / a.n_kv_heads), a.head_dim_qk, a.head_dim_v)) return false;
  for (int s = 0; s < a.n_segments; ++s) {
    const KVSegment& sg = a.segments[s];
    const int64_t es = int64_t(dtype_size(sg.dtype));
    if (sg.count >= (int64_t(1) << 31) || sg.ld_k * es >= (int64_t(1) << 31) || sg.ld_v * es >= (int64_t(1) << 31))
      return false;
  }
  return true;
}

// a's visible key ranges (for_each_range for its one query).
struct FLayout {
  SegDesc sd[kDecSegments];
  int n = 0;
  int seg[kFRanges];
  int64_t first[kFRanges], len[kFRanges];
};
struct FCollect {  // (a functor, not a host lambda: for_each_range is __host__ __device__)
  FLayout* l;
  __host__ __device__ void operator()(int s, int64_t first, int64_t len) const {
    l->seg[l->n] = s, l->first[l->n] = first, l->len[l->n] = len;
    ++l->n;
  }
};
void fast_layout(const AttentionArgs& a, FLayout& l) {
  l.n = 0;
  for (int s = 0; s < a.n_segments; ++s) {
    const KVSegment& sg = a.segments[s];
    l.sd[s] = {sg.k, sg.v, sg.ld_k, sg.ld_v, sg.pos0, sg.count, sg.dtype};
  }
  for_each_range(l.sd, a.n_segments, a.window, a.n_always_visible, a.q_pos0, a.q_pos0, FCollect{&l});
}

int64_t fast_base(const FLayout& l, int r) { return l.sd[l.seg[r]].dtype == DType::F32 ? kFTile16 / 2 : kFTile16; }

// The ranges cut into chunks of `sub` sub-tiles; returns the chunk count
// (>= 1: no visible key is one empty chunk) and, with p, fills p's ranges.
int64_t fast_ranges(const FLayout& l, int64_t sub, FParams* p) {
  int64_t nc = 0;
  for (int r = 0; r < l.n; ++r) {
    const SegDesc& sg = l.sd[l.seg[r]];
    const int64_t ck = sub * fast_base(l, r);
    if (p) {
      const int64_t es = int64_t(dtype_size(sg.dtype));
      FRange& f = p->rg[r];
      f.k = static_cast<const char*>(sg.k) + l.first[r] * sg.ld_k * es;
      f.v = static_cast<const char*>(sg.v) + l.first[r] * sg.ld_v * es;
      f.ld_k = int(sg.ld_k * es), f.ld_v = int(sg.ld_v * es);
      f.len = l.len[r], f.ckeys = ck;
      f.chunk0 = int(std::min<int64_t>(nc, 0x7fffffff));
      f.dt = sg.dtype == DType::BF16 ? 0 : sg.dtype == DType::F16 ? 1 : 2;
    }
    nc += (l.len[r] + ck - 1) / ck;
  }
  if (p) p->n_rg = l.n;
  if (l.n == 0) {  // nothing visible: one chunk without keys writes zeros
    if (p) p->rg[0] = FRange{nullptr, nullptr, 0, kFTile16, 0, 0, 0, 0}, p->n_rg = 1;
    nc = 1;
  }
  return nc;
}

// The smallest chunk length `sub` in 1 .. (one chunk per range) whose chunk
// count passes ok (monotone: counts only fall as sub grows); the largest
// when none does.
template <typename Ok>
int64_t fast_sub(const FLayout& l, Ok ok) {
  int64_t lo = 1, hi = 1;
  for (int r = 0; r < l.n; ++r) hi = std::max(hi, (l.len[r] + fast_base(l, r) - 1) / fast_base(l, r));
  if (!ok(fast_ranges(l, hi, nullptr))) return hi;
  while (lo < hi) {  // ok at hi
    const int64_t mid = lo + (hi - lo) / 2;
    if (ok(fast_ranges(l, mid, nullptr))) hi = mid;
    else lo = mid + 1;
  }
  return hi;
}

// The chunk length (sub-tiles) of a layout, from the layout alone (batch
// invariance: the single launch and every batch cut an entry the same
// way): the shortest chunks that give at most kFChunkCap chunks per kv
// head, or one per kFCapKeys visible keys where that is more (at most
// kFMaxChunks: the merge's shared weights), and no shorter than kFMinSub
// sub-tiles (or the longest range).
// kFChunkCap, or HYMBA_ATTN_CHUNK_CAP (1-256, read once) for A/B timing.
int64_t fast_chunk_cap() {
  static const int64_t v = [] {
    const char* e = std::getenv("HYMBA_ATTN_CHUNK_CAP");
    const int c = e ? std::atoi(e) : 0;
    return int64_t(c >= 1 && c <= kFMaxChunks ? c : kFChunkCap);
  }();
  return v;
}

// kFSpanSubTiles, or HYMBA_ATTN_SPAN (1-256 sub-tiles, read once) for A/B
// timing (a span changes no bit).
int64_t fast_span_cap() {
  static const int64_t v = [] {
    const char* e = std::getenv("HYMBA_ATTN_SPAN");
    const int c = e ? std::atoi(e) : 0;
    return int64_t(c >= 1 && c <= 256 ? c : kFSpanSubTiles);
  }();
  return v;
}

int64_t fast_entry_sub(const FLayout& l) {
  int64_t vis = 0, longest = 1;
  for (int r = 0; r < l.n; ++r)
    vis += l.len[r], longest = std::max(longest, (l.len[r] + fast_base(l, r) - 1) / fast_base(l, r));
  const int64_t cap = std::min<int64_t>(kFMaxChunks, std::max<int64_t>(fast_chunk_cap(), vis / kFCapKeys));
  return std::min(longest, std::max(kFMinSub, fast_sub(l, [&](int64_t nc) { return nc <= cap; })));
}

// a's ranges cut by fast_entry_sub (p filled); returns the chunk count and
// sets sub.
int64_t fast_entry(const AttentionArgs& a, FParams& p, int64_t& sub) {
  FLayout l;
  fast_layout(a, l);
  sub = fast_entry_sub(l);
  p = FParams{};
  const int64_t nc = fast_ranges(l, sub, &p);
  check(nc <= kFMaxChunks && sub * kFTile16 < (int64_t(1) << 31), "attention: decode chunks (", nc, ")");
  return nc;
}

// Chunks per kv head of a (its scratch's split count).
int fast_chunks(const AttentionArgs& a) {
  FLayout l;
  fast_layout(a, l);
  return int(fast_ranges(l, fast_entry_sub(l), nullptr));
}

FKernel fast_kernel_checked(const AttentionArgs& a) {
  const FKernel k = fast_kernel_for(dec_padded_group(a.n_heads / a.n_kv_heads), a.head_dim_qk, a.head_dim_v);
  check(k != nullptr, "attention: no decode kernel for these heads");
  return k;
}

// The single-sequence decode in one launch, one chunk per block; `splits`:
// fast_chunks' count (sizes the scratch).
void attention_fast(const AttentionArgs& a, int splits, void* scratch, cudaStream_t stream) {
  FParams p;
  int64_t sub = 0;
  const int64_t nc = fast_entry(a, p, sub);
  check(nc <= std::max(splits, 1), "attention: decode chunks (", nc, ") beyond the scratch's (", splits, ")");
  p.jobs = nullptr;
  p.q = a.q, p.out = a.out, p.scale = a.scale;
  p.group = a.n_heads / a.n_kv_heads;
  p.n_chunks = int(nc);
  if (nc > 1) {
    check(scratch != nullptr, "attention: split-key launch without scratch");
    p.counters = static_cast<unsigned*>(scratch);
    p.part = reinterpret_cast<float*>(static_cast<char*>(scratch) + kFCounterBytes);
  }
  launch_pdl("attention_decode_fast", fast_kernel_checked(a), dim3(unsigned(nc), unsigned(a.n_kv_heads)),
             dim3(kFThreads), 0, stream, p);
}

// Whether attention() takes the tensor-core prefill kernel for a and its
// split count (the fast and decode kernels are tried first).
bool takes_tc(const AttentionArgs& a, int splits) {
  return a.n_q > 0 && !fast_ok(a) && !dec_ok(a) && splits <= 1 && g_tc_mode.load(std::memory_order_relaxed) != 1 &&
         tc_shape_ok(a);
}

}  // namespace

int attention_splits(const AttentionArgs& a, int sm_count) {
  validate(a);
  if (a.n_q <= 0) return 1;
  if (fast_ok(a)) return fast_chunks(a);  // attention() then takes the fast decode kernel (chunks from a alone)
  if (dec_ok(a)) {  // attention() then takes the decode kernels: their chunk count
    DecEntry d;
    return int(dec_single_chunks(dec_entry(a, d), a.n_kv_heads, sm_count));
  }
  if (use_tc(a, sm_count)) return 1;  // attention() then takes the tensor-core kernel
  int hpb, qpb, hbs;
  shape(a, hpb, qpb, hbs);
  const int64_t q_tiles = (a.n_q + qpb - 1) / qpb;
  const int64_t blocks = q_tiles * a.n_kv_heads * hbs;
  if (blocks >= 2 * int64_t(sm_count)) return 1;
  // The most tiles any query tile walks bounds the useful split count.
  const std::vector<SegDesc> sd = descs(a);
  int64_t most = 1;
  for (int64_t qt = 0; qt < q_tiles; ++qt) {
    const int64_t pf = a.q_pos0 + qt * qpb, pl = std::min(a.q_pos0 + a.n_q, pf + qpb) - 1;
    most = std::max(most, count_tiles(sd.data(), int(sd.size()), a.window, a.n_always_visible, pf, pl));
  }
  // Decode is bound by loading K/V: aim at ~8 blocks per SM so that many
  // tile loads are in flight (the merge reads only splits x dv per row).
  const int64_t want = (8 * int64_t(sm_count) + blocks - 1) / blocks;
  return int(std::max<int64_t>(1, std::min<int64_t>({want, most, 1024})));
}

// The fast decode's counters first (kFCounterBytes, left zero by every
// launch), then the partial states of whichever kernel runs.
size_t attention_scratch_bytes(const AttentionArgs& a, int splits) {
  if (splits <= 1) {
    const size_t staging = takes_tc(a, splits) ? tc_staging_bytes(a) : 0;
    return staging ? kFCounterBytes + staging : 0;
  }
  return kFCounterBytes +
         sizeof(float) * size_t(splits) * size_t(a.n_q) * size_t(a.n_heads) * size_t(a.head_dim_v + 2);
}

// The launch shape of a's heads; q_rows for a single-sequence launch.
Shape make_shape(const AttentionArgs& a, int splits) {
  Shape sh{};
  sh.n_heads = a.n_heads, sh.dq = a.head_dim_qk, sh.dv = a.head_dim_v, sh.group = a.n_heads / a.n_kv_heads;
  shape(a, sh.heads_per_block, sh.q_per_block, sh.head_blocks);
  sh.q_rows = sh.q_per_block * sh.heads_per_block;
  sh.splits = std::max(1, splits);
  return sh;
}

// Shared memory of an attention block.
size_t smem_bytes(const Shape& sh) {
  return sizeof(float) * size_t(sh.q_rows * sh.dq + kBK * (sh.dq + 1) + kBK * sh.dv);
}

void attention(const AttentionArgs& a, int splits, void* scratch, cudaStream_t stream) {
  validate(a);
  if (a.n_q <= 0) return;
  if (fast_ok(a)) {  // one query: the fast decode kernel
    attention_fast(a, splits, scratch, stream);
    return;
  }
  if (dec_ok(a)) {  // one query: the decode kernels
    attention_decode(a, splits, scratch, stream);
    return;
  }
  // One split (attention_splits' answer where use_tc holds) on a shape the
  // tensor-core kernel takes: bf16 prefill.
  if (takes_tc(a, splits)) {
    attention_tc(a, scratch ? static_cast<char*>(scratch) + kFCounterBytes : nullptr, stream);
    return;
  }
  Params p{};
  p.sh = make_shape(a, splits);
  Job& jb = p.job;
  jb.q = a.q, jb.ldq = a.ldq, jb.n_q = a.n_q, jb.q_pos0 = a.q_pos0;
  jb.n_seg = a.n_segments;
  jb.n_split = p.sh.splits;
  for (int s = 0; s < a.n_segments; ++s) {
    const KVSegment& sg = a.segments[s];
    p.seg[s] = {sg.k, sg.v, sg.ld_k, sg.ld_v, sg.pos0, sg.count, sg.dtype};
  }
  jb.window = a.window, jb.n_always_visible = a.n_always_visible, jb.scale = a.scale;
  jb.out = a.out, jb.ldo = a.ldo;
  if (p.sh.splits > 1) {
    check(scratch != nullptr, "attention: split-key launch without scratch");
    const size_t rows = size_t(p.sh.splits) * size_t(a.n_q) * size_t(a.n_heads);
    jb.part_m = reinterpret_cast<float*>(static_cast<char*>(scratch) + kFCounterBytes);  // past the counters
    jb.part_l = jb.part_m + rows;
    jb.part_acc = jb.part_l + rows;
  }
  const int64_t q_tiles = (a.n_q + p.sh.q_per_block - 1) / p.sh.q_per_block;
  const int64_t gy = int64_t(a.n_kv_heads) * p.sh.head_blocks;
  check(q_tiles <= 0x7fffffff && gy <= 65535 && p.sh.splits <= 65535, "attention: launch grid too large");
  const dim3 grid(unsigned(q_tiles), unsigned(gy), unsigned(p.sh.splits));
  const size_t smem = smem_bytes(p.sh);

  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024)
      HYMBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    HYMBA_CUDA_LAUNCHED("attention");
  };
  if (p.sh.dv <= 32) launch(attention_kernel<1>);
  else if (p.sh.dv <= 64) launch(attention_kernel<2>);
  else if (p.sh.dv <= 128) launch(attention_kernel<4>);
  else launch(attention_kernel<8>);

  if (p.sh.splits > 1) {
    const int64_t n = a.n_q * a.n_heads;
    check(n <= 0x7fffffff, "attention: too many query rows");
    attention_merge_kernel<<<unsigned(n), 64, 0, stream>>>(p);
    HYMBA_CUDA_LAUNCHED("attention_merge");
  }
}

void set_attention_tc_mode(int mode) { g_tc_mode.store(mode, std::memory_order_relaxed); }
long long attention_tc_launches() { return g_tc_launches.load(std::memory_order_relaxed); }
void set_attention_wgmma(int mode) { g_wgmma_mode.store(mode < 0 ? 0 : mode > 2 ? 2 : mode, std::memory_order_relaxed); }
long long attention_wgmma_launches() { return g_wgmma_launches.load(std::memory_order_relaxed); }
long long attention_wgmma_ws_launches() { return g_wgmma_ws_launches.load(std::memory_order_relaxed); }

// ---------------------------------------------------------------- batched decode

namespace {

// Whether entry a can join a batched decode launch at all (one query, heads
// and dims the kernel takes (head_dim_v <= 128), segments that fit a BatchEntry).
bool batchable(const AttentionArgs& a) {
  return a.n_q == 1 && a.n_heads > 0 && a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0 &&
         a.head_dim_qk >= 1 && a.head_dim_qk <= kMaxHeadDim && a.head_dim_v >= 1 && a.head_dim_v <= 32 * kBatchDVL &&
         a.n_segments >= 0 && a.n_segments <= kBatchSegments && (a.n_segments == 0 || a.segments != nullptr);
}

bool same_heads(const AttentionArgs& a, const AttentionArgs& b) {
  return a.n_heads == b.n_heads && a.n_kv_heads == b.n_kv_heads && a.head_dim_qk == b.head_dim_qk &&
         a.head_dim_v == b.head_dim_v;
}

// The entries `take` (all fast_ok, one shape) in one launch of the fast
// decode kernel: each entry cut exactly as attention() cuts it alone
// (fast_entry: from its own layout), so its bits do not depend on the batch
// or on the path; blocks take spans of up to kFSpanSubTiles sub-tiles of
// one range where the batch has ~4 waves of blocks (a span changes no bit);
// the last block of each (entry, kv head) merges its chunks. Counters
// (zeroed here: the batch scratch is shared) then each entry's partial
// states in the batch scratch.
void attention_batch_fast(const AttentionArgs* a, const std::vector<int>& take, const BatchHost& host) {
  const AttentionArgs& ref = a[take[0]];
  const size_t n = take.size();
  const int n_kv = ref.n_kv_heads, group = ref.n_heads / ref.n_kv_heads, dv = ref.head_dim_v;
  thread_local std::vector<FParams> ent;  // reused: no allocation per call once grown
  thread_local std::vector<int64_t> subs;
  thread_local std::vector<FJob> jobs;
  ent.resize(n), subs.resize(n);
  int64_t tiles = 0;  // sub-tiles per kv head over the batch
  size_t part_floats = 0;
  for (size_t k = 0; k < n; ++k) {
    FParams& e = ent[k];
    e.n_chunks = int(fast_entry(a[take[k]], e, subs[k]));
    for (int r = 0; r < e.n_rg; ++r) {
      const int64_t base = e.rg[r].dt == 2 ? kFTile16 / 2 : kFTile16;
      tiles += std::max<int64_t>(1, (e.rg[r].len + base - 1) / base);
    }
    if (e.n_chunks > 1) part_floats += (size_t(n_kv) * size_t(e.n_chunks) * size_t(group) * size_t(dv + 2) + 3) / 4 * 4;
  }
  const int64_t slots = int64_t(kFBlocksPerSm) * std::max(host.sm_count, 1);
  const int64_t span = std::clamp<int64_t>(tiles * n_kv / (4 * slots), 1, fast_span_cap());

  const size_t counter_bytes = (n * size_t(n_kv) * sizeof(unsigned) + 255) / 256 * 256;
  char* scratch = nullptr;
  if (part_floats > 0) {
    scratch = static_cast<char*>(host.scratch(counter_bytes + sizeof(float) * part_floats));
    HYMBA_CUDA_CHECK(cudaMemsetAsync(scratch, 0, counter_bytes, host.stream));
  }
  float* part = scratch ? reinterpret_cast<float*>(scratch + counter_bytes) : nullptr;
  jobs.clear();
  for (size_t k = 0; k < n; ++k) {
    const AttentionArgs& x = a[take[k]];
    const FParams& e = ent[k];
    const size_t first = jobs.size();
    float* const ep = e.n_chunks > 1 ? part : nullptr;
    if (ep) part += (size_t(n_kv) * size_t(e.n_chunks) * size_t(group) * size_t(dv + 2) + 3) / 4 * 4;
    const int64_t per = std::max<int64_t>(1, span / subs[k]);  // chunks per block (at most)
    for (int r = 0; r < e.n_rg; ++r) {
      const FRange& R = e.rg[r];
      const int64_t nr = std::max<int64_t>(1, (R.len + R.ckeys - 1) / R.ckeys);
      const int64_t nb = (nr + per - 1) / per;
      const int64_t cpb = (nr + nb - 1) / nb;  // balanced spans
      for (int64_t c = 0; c < nr; c += cpb) {
        FJob j{};
        const int64_t row0 = c * R.ckeys;
        j.k = R.k ? R.k + row0 * R.ld_k : nullptr;
        j.v = R.v ? R.v + row0 * R.ld_v : nullptr;
        j.q = x.q, j.out = x.out, j.part = ep;
        j.counters = scratch ? reinterpret_cast<unsigned*>(scratch) + k * size_t(n_kv) : nullptr;
        j.n = int(std::max<int64_t>(0, std::min(R.len - row0, cpb * R.ckeys)));
        j.ckeys = int(R.ckeys);
        j.ld_k = R.ld_k, j.ld_v = R.ld_v;
        j.c0 = R.chunk0 + int(c);
        j.nc = e.n_chunks;
        j.dt = R.dt;
        j.scale = x.scale;
        jobs.push_back(j);
      }
    }
    const int nblk = int(jobs.size() - first);
    for (size_t i = first; i < jobs.size(); ++i) jobs[i].nblk = nblk;
  }
  check(jobs.size() <= 0x7fffffffu, "attention_batch: too many decode blocks");
  FParams p{};
  p.jobs = static_cast<const FJob*>(host.stage(jobs.data(), jobs.size() * sizeof(FJob)));
  p.group = group;
  launch_pdl("attention_batch_decode_fast", fast_kernel_checked(ref), dim3(unsigned(jobs.size()), unsigned(n_kv)),
             dim3(kFThreads), 0, host.stream, p);
}

// The entries `take` (all dec_ok, one shape) in one decode launch (plus the
// merge where some entry has several chunks).
void attention_batch_decode(const AttentionArgs* a, const std::vector<int>& take, const BatchHost& host) {
  const AttentionArgs& ref = a[take[0]];
  const int64_t n_entries = int64_t(take.size());
  thread_local std::vector<DecEntry> desc;  // reused: no allocation per call once grown
  desc.resize(size_t(n_entries));
  int64_t rows = 0;
  int most = 1;
  for (int64_t k = 0; k < n_entries; ++k) {
    DecEntry& d = desc[size_t(k)];
    const int64_t tiles = dec_entry(a[take[size_t(k)]], d);
    dec_chunking(tiles, dec_batch_chunks(tiles), d);  // from the entry alone
    if (d.n_chunks > 1) {
      d.prow0 = rows;
      rows += int64_t(ref.n_heads) * d.n_chunks;
    }
    most = std::max(most, d.n_chunks);
  }
  DecParams p{};
  p.n_heads = ref.n_heads;
  p.group = ref.n_heads / ref.n_kv_heads;
  if (rows > 0) {
    float* part = static_cast<float*>(host.scratch(sizeof(float) * size_t(rows) * size_t(ref.head_dim_v + 2)));
    p.part_m = part;
    p.part_l = part + rows;
    p.part_acc = part + 2 * rows;
  }
  p.entries = static_cast<const DecEntry*>(host.stage(desc.data(), desc.size() * sizeof(DecEntry)));
  dec_launch(p, dec_padded_group(p.group), ref.head_dim_qk, ref.head_dim_v, n_entries, most, rows > 0, host.stream);
}

// The entries `take` (batchable, one shape) in the general (SIMT) batched launch.
void attention_batch_simt(const AttentionArgs* a, const std::vector<int>& take, const BatchHost& host,
                          std::vector<int>& rest) {
  const AttentionArgs& ref = a[take[0]];
  const int64_t n_entries = int64_t(take.size());
  Shape sh = make_shape(ref, 1);
  sh.q_rows = sh.heads_per_block;  // one query per entry
  sh.q_per_block = 1;
  const int64_t gy = int64_t(ref.n_kv_heads) * sh.head_blocks;
  if (gy > 65535) {  // (the single op reports it)
    rest.insert(rest.end(), take.begin(), take.end());
    return;
  }

  // Key splits per entry, from its own key count only (so an entry's result
  // does not depend on the rest of the batch): ~kBatchMinTilesPerSplit
  // tiles per split, at most kBatchMaxSplits. The grid has the most splits
  // any entry has; blocks past an entry's splits return at once. With one
  // split everywhere the blocks write the output directly, else the merge
  // combines each entry's splits (bit-identical to the direct write for an
  // entry with one split: its state is scaled by exp(0) = 1).
  std::vector<int> n_split(static_cast<size_t>(n_entries));
  std::vector<SegDesc> sd(kBatchSegments);
  int most = 1;
  for (int64_t k = 0; k < n_entries; ++k) {
    const AttentionArgs& e = a[take[size_t(k)]];
    for (int s = 0; s < e.n_segments; ++s) {
      const KVSegment& sg = e.segments[s];
      sd[size_t(s)] = {sg.k, sg.v, sg.ld_k, sg.ld_v, sg.pos0, sg.count, sg.dtype};
    }
    const int64_t tiles = count_tiles(sd.data(), e.n_segments, e.window, e.n_always_visible, e.q_pos0, e.q_pos0);
    const int64_t want = (tiles + kBatchMinTilesPerSplit - 1) / kBatchMinTilesPerSplit;
    n_split[size_t(k)] = int(std::max<int64_t>(1, std::min<int64_t>(want, kBatchMaxSplits)));
    most = std::max(most, n_split[size_t(k)]);
  }
  sh.splits = most;

  // Partial states of entry k: rows [row0_k, row0_k + n_split_k * n_heads)
  // of m and l, times dv for acc.
  float* part = nullptr;
  int64_t part_rows = 0;
  for (int v : n_split) part_rows += int64_t(v) * sh.n_heads;
  if (sh.splits > 1)
    part = static_cast<float*>(host.scratch(sizeof(float) * size_t(part_rows) * size_t(sh.dv + 2)));

  std::vector<BatchEntry> desc(static_cast<size_t>(n_entries));
  int64_t row0 = 0;
  for (int64_t k = 0; k < n_entries; ++k) {
    const AttentionArgs& e = a[take[size_t(k)]];
    BatchEntry& d = desc[size_t(k)];
    d = BatchEntry{};
    Job& jb = d.job;
    jb.q = e.q, jb.ldq = e.ldq, jb.n_q = 1, jb.q_pos0 = e.q_pos0;
    jb.window = e.window, jb.n_always_visible = e.n_always_visible, jb.scale = e.scale;
    jb.n_seg = e.n_segments;
    jb.n_split = n_split[size_t(k)];
    jb.out = e.out, jb.ldo = e.ldo;
    if (part) {
      jb.part_m = part + row0;
      jb.part_l = part + part_rows + row0;
      jb.part_acc = part + 2 * part_rows + row0 * sh.dv;
    }
    row0 += int64_t(jb.n_split) * sh.n_heads;
    for (int s = 0; s < e.n_segments; ++s) {
      const KVSegment& sg = e.segments[s];
      d.seg[s] = {sg.k, sg.v, sg.ld_k, sg.ld_v, sg.pos0, sg.count, sg.dtype};
    }
  }
  BatchParams p{};
  p.sh = sh;
  p.entries = static_cast<const BatchEntry*>(host.stage(desc.data(), desc.size() * sizeof(BatchEntry)));

  check(n_entries <= 0x7fffffff, "attention_batch: too many entries");
  const dim3 grid(unsigned(n_entries), unsigned(gy), unsigned(sh.splits));
  const size_t smem = smem_bytes(sh);
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024)
      HYMBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, kThreads, smem, host.stream>>>(p);
    HYMBA_CUDA_LAUNCHED("attention_batch");
  };
  // One instantiation only (compile time): dv <= 128 (batchable), smaller
  // dv masked as any partial last column group is.
  launch(attention_batch_kernel<kBatchDVL>);

  if (sh.splits > 1) {
    const int64_t n = n_entries * sh.n_heads;
    check(n <= 0x7fffffff, "attention_batch: too many query rows");
    attention_batch_merge_kernel<<<unsigned(n), 64, 0, host.stream>>>(p);
    HYMBA_CUDA_LAUNCHED("attention_batch_merge");
  }
}

}  // namespace

void attention_batch(const AttentionArgs* a, int count, const BatchHost& host, std::vector<int>& rest) {
  // Entries the fast decode kernel takes (with the first such entry's heads)
  // in one launch of it; entries only the older decode kernels take
  // (HYMBA_DECODE_FAST=0, more than kFMaxKv kv heads, ...) in one decode
  // launch; other one-query entries (with the first such entry's
  // heads) in the general batched launch; the rest one by one.
  std::vector<int> fast, dec, take;
  for (int i = 0; i < count; ++i) {
    if (fast_ok(a[i])) {  // the fast decode kernel, as attention() runs it alone
      if (fast.empty() || same_heads(a[fast[0]], a[i])) fast.push_back(i);
      else rest.push_back(i);  // (the single op: the same kernel, the same bits)
    } else if (dec_ok(a[i]) && (dec.empty() || same_heads(a[dec[0]], a[i])) && dec.size() < 65535) {
      dec.push_back(i);
    } else if (batchable(a[i]) && (take.empty() || same_heads(a[take[0]], a[i]))) {
      take.push_back(i);
    } else {
      rest.push_back(i);  // (n_q <= 0 included: the single op validates and returns)
    }
  }
  // The launches are stream-ordered: a later one's scratch() / stage() reuse
  // the buffers only after the earlier kernels (scratch growth synchronises).
  if (!fast.empty()) attention_batch_fast(a, fast, host);
  if (!dec.empty()) attention_batch_decode(a, dec, host);
  if (!take.empty()) attention_batch_simt(a, take, host, rest);
}

}  // namespace hymba::cuda
