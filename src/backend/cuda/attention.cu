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

struct SegDesc {
  const void* k;
  const void* v;
  int64_t ld_k, ld_v, pos0, count;
  DType dtype;
};

struct Params {
  const float* q;
  int64_t ldq, n_q, q_pos0;
  int n_heads, dq, dv, group;
  int heads_per_block, q_per_block, head_blocks;
  int n_seg;
  SegDesc seg[kMaxSegments];
  int64_t window, n_always_visible;
  float scale;
  float* out;
  int64_t ldo;
  int splits;
  float* part_m;    // [splits][n_q][n_heads]
  float* part_l;    // [splits][n_q][n_heads]
  float* part_acc;  // [splits][n_q][n_heads][dv]
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

// grid: x = query tile, y = kv head * head_blocks + head block, z = split.
template <int DVL>
__global__ void __launch_bounds__(kThreads) attention_kernel(const Params p) {
  extern __shared__ float smem[];
  const int dq = p.dq, dv = p.dv;
  float* sQ = smem;                    // [kRows][dq], pre-scaled
  float* sK = sQ + kRows * dq;         // [kBK][dq + 1] (padded: lane j reads row j without bank conflicts)
  float* sV = sK + kBK * (dq + 1);     // [kBK][dv]
  const int ldk = dq + 1;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = blockIdx.y / p.head_blocks;             // kv head
  const int hb = blockIdx.y % p.head_blocks;
  const int h0 = g * p.group + hb * p.heads_per_block;  // first query head of this block
  const int hib = min(p.heads_per_block, p.group - hb * p.heads_per_block);
  const int64_t t0 = int64_t(blockIdx.x) * p.q_per_block;
  const int nq = int(min(int64_t(p.q_per_block), p.n_q - t0));
  const int rows = nq * hib;  // row r = (query t0 + r / hib, head h0 + r % hib)
  const int64_t p_first = p.q_pos0 + t0, p_last = p_first + nq - 1;

  for (int idx = threadIdx.x; idx < rows * dq; idx += kThreads) {
    const int r = idx / dq, i = idx % dq;
    sQ[idx] = p.q[(t0 + r / hib) * p.ldq + int64_t(h0 + r % hib) * dq + i] * p.scale;
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
  const int64_t n_tiles = count_tiles(p.seg, p.n_seg, p.window, p.n_always_visible, p_first, p_last);
  const int64_t tile_lo = n_tiles * blockIdx.z / p.splits, tile_hi = n_tiles * (blockIdx.z + 1) / p.splits;
  int64_t tile = 0;

  for_each_range(p.seg, p.n_seg, p.window, p.n_always_visible, p_first, p_last,
                 [&](int s, int64_t first, int64_t len) {
    const SegDesc& sg = p.seg[s];
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
                             (p.window < 0 || pos - kp <= p.window || kp < p.n_always_visible);
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
    if (p.splits == 1) {
      const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
      float* o = p.out + t * p.ldo + int64_t(h) * dv;
#pragma unroll
      for (int d = 0; d < DVL; ++d)
        if (lane + 32 * d < dv) o[lane + 32 * d] = acc[rr][d] * inv;
    } else {
      const int64_t at = (int64_t(blockIdx.z) * p.n_q + t) * p.n_heads + h;
      if (lane == 0) {
        p.part_m[at] = m[rr];
        p.part_l[at] = l[rr];
      }
#pragma unroll
      for (int d = 0; d < DVL; ++d)
        if (lane + 32 * d < dv) p.part_acc[at * dv + lane + 32 * d] = acc[rr][d];
    }
  }
}

// One block per (query, head): merges the splits' partial softmax states.
__global__ void attention_merge_kernel(const Params p) {
  const int64_t th = blockIdx.x;  // t * n_heads + h
  const int64_t t = th / p.n_heads;
  const int h = int(th % p.n_heads);
  const int64_t stride = p.n_q * p.n_heads;
  float mx = -INFINITY;
  for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.part_m[s * stride + th]);
  float* o = p.out + t * p.ldo + int64_t(h) * p.dv;
  float l = 0.0f;
  for (int s = 0; s < p.splits; ++s) {
    const float ms = p.part_m[s * stride + th];
    if (ms != -INFINITY) l += p.part_l[s * stride + th] * expf(ms - mx);
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int d = threadIdx.x; d < p.dv; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < p.splits; ++s) {
      const float ms = p.part_m[s * stride + th];
      if (ms != -INFINITY) acc += p.part_acc[(s * stride + th) * p.dv + d] * expf(ms - mx);
    }
    o[d] = acc * inv;
  }
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

void attention(const AttentionArgs& a, int splits, void* scratch, cudaStream_t stream) {
  validate(a);
  if (a.n_q <= 0) return;
  Params p{};
  p.q = a.q, p.ldq = a.ldq, p.n_q = a.n_q, p.q_pos0 = a.q_pos0;
  p.n_heads = a.n_heads, p.dq = a.head_dim_qk, p.dv = a.head_dim_v, p.group = a.n_heads / a.n_kv_heads;
  shape(a, p.heads_per_block, p.q_per_block, p.head_blocks);
  p.n_seg = a.n_segments;
  for (int s = 0; s < a.n_segments; ++s) {
    const KVSegment& sg = a.segments[s];
    p.seg[s] = {sg.k, sg.v, sg.ld_k, sg.ld_v, sg.pos0, sg.count, sg.dtype};
  }
  p.window = a.window, p.n_always_visible = a.n_always_visible, p.scale = a.scale;
  p.out = a.out, p.ldo = a.ldo;
  p.splits = std::max(1, splits);
  if (p.splits > 1) {
    check(scratch != nullptr, "attention: split-key launch without scratch");
    const size_t rows = size_t(p.splits) * size_t(a.n_q) * size_t(a.n_heads);
    p.part_m = static_cast<float*>(scratch);
    p.part_l = p.part_m + rows;
    p.part_acc = p.part_l + rows;
  }
  const int64_t q_tiles = (a.n_q + p.q_per_block - 1) / p.q_per_block;
  const int64_t gy = int64_t(a.n_kv_heads) * p.head_blocks;
  check(q_tiles <= 0x7fffffff && gy <= 65535 && p.splits <= 65535, "attention: launch grid too large");
  const dim3 grid(unsigned(q_tiles), unsigned(gy), unsigned(p.splits));
  const size_t smem = sizeof(float) * size_t(kRows * p.dq + kBK * (p.dq + 1) + kBK * p.dv);

  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024)
      HYMBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    HYMBA_CUDA_LAUNCHED("attention");
  };
  if (p.dv <= 32) launch(attention_kernel<1>);
  else if (p.dv <= 64) launch(attention_kernel<2>);
  else if (p.dv <= 128) launch(attention_kernel<4>);
  else launch(attention_kernel<8>);

  if (p.splits > 1) {
    const int64_t n = a.n_q * a.n_heads;
    check(n <= 0x7fffffff, "attention: too many query rows");
    attention_merge_kernel<<<unsigned(n), 64, 0, stream>>>(p);
    HYMBA_CUDA_LAUNCHED("attention_merge");
  }
}

}  // namespace hymba::cuda
