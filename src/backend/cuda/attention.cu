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
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.cuh"

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

}  // namespace

int attention_splits(const AttentionArgs& a, int sm_count) {
  validate(a);
  if (a.n_q <= 0) return 1;
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

size_t attention_scratch_bytes(const AttentionArgs& a, int splits) {
  if (splits <= 1) return 0;
  return sizeof(float) * size_t(splits) * size_t(a.n_q) * size_t(a.n_heads) * size_t(a.head_dim_v + 2);
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
    jb.part_m = static_cast<float*>(scratch);
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

}  // namespace

void attention_batch(const AttentionArgs* a, int count, const BatchHost& host, std::vector<int>& rest) {
  // Entries with one query and the first such entry's heads go in the launch.
  std::vector<int> take;
  for (int i = 0; i < count; ++i) {
    if (batchable(a[i]) && (take.empty() || same_heads(a[take[0]], a[i]))) take.push_back(i);
    else rest.push_back(i);  // (n_q <= 0 included: the single op validates and returns)
  }
  if (take.empty()) return;
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

}  // namespace hymba::cuda
