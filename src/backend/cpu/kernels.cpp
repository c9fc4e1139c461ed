// CPU kernels of the op contract, except matmul (matmul.cpp). Each loop is
// written so the compiler vectorises it (omp simd, contiguous inner loops);
// parallelism is OpenMP over independent rows, heads or channels.
#include "backend/cpu/kernels.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/vecmath.h"
#include "util/error.h"

namespace hymba::cpu {

void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y,
             int64_t ldy) {
#pragma omp parallel for if (n > 1)
  for (int64_t t = 0; t < n; ++t) {
    const float* xr = x + t * ldx;
    float* yr = y + t * ldy;
    double ss = 0.0;  // double: rows of thousands of values, exact enough for any order
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += double(xr[i]) * double(xr[i]);
    const float inv = float(1.0 / std::sqrt(ss / double(d) + double(eps)));
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

void rope_tables(int64_t pos0, int64_t n, const float* inv_freq, int half, float* cos_out, float* sin_out) {
  for (int64_t t = 0; t < n; ++t) {
    const float p = float(pos0 + t);
    for (int i = 0; i < half; ++i) {
      const float angle = p * inv_freq[i];  // fp32 product, as the reference
      cos_out[t * half + i] = float(std::cos(double(angle)));
      sin_out[t * half + i] = float(std::sin(double(angle)));
    }
  }
}

void rope(float* x, int64_t n, int64_t ldx, int n_heads, int head_dim, const float* cos_t, const float* sin_t) {
  const int half = head_dim / 2;
#pragma omp parallel for if (n > 4)
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cos_t + t * half;
    const float* s = sin_t + t * half;
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + t * ldx + int64_t(h) * head_dim;
#pragma omp simd
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

namespace {

// Row r of a K or V segment as fp32 (pointer into the cache for fp32, else
// converted into `tmp`).
inline const float* row_f32(const void* base, DType dt, int64_t offset, int64_t width, float* tmp) {
  if (dt == DType::F32) return static_cast<const float*>(base) + offset;
  const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
  if (dt == DType::BF16) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) tmp[i] = bf16_to_f32(src[i]);
  } else {
    for (int64_t i = 0; i < width; ++i) tmp[i] = f16_to_f32(src[i]);
  }
  return tmp;
}

struct KeyRef {
  const KVSegment* seg;
  int64_t row;  // row inside the segment
};

}  // namespace

void attention(const AttentionArgs& a) {
  const int group = a.n_heads / a.n_kv_heads;
  const int dq = a.head_dim_qk, dv = a.head_dim_v;
  int64_t total_keys = 0;
  for (int s = 0; s < a.n_segments; ++s) total_keys += a.segments[s].count;
  // Work items: (query, kv head, slice of that kv head's query heads). Query
  // heads of one group share every K/V row they load, so a slice is the
  // whole group unless there are too few items to keep the threads busy
  // (decode: one query), in which case each query head is its own item.
  const int threads = omp_get_max_threads();
  const int slices = (a.n_q * a.n_kv_heads >= 4 * threads) ? 1 : group;
  const int per_slice = group / slices;

#pragma omp parallel
  {
    std::vector<float> scores(size_t(per_slice) * size_t(std::max<int64_t>(total_keys, 1)));
    std::vector<KeyRef> keys(size_t(std::max<int64_t>(total_keys, 1)));
    std::vector<float> ktmp(dq), vtmp(dv), acc(size_t(per_slice) * dv);
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t t = 0; t < a.n_q; ++t) {
      for (int g = 0; g < a.n_kv_heads; ++g) {
        for (int sl = 0; sl < slices; ++sl) {
          const int64_t p = a.q_pos0 + t;
          const int h0 = g * group + sl * per_slice;  // first query head of this item
          const float* q0 = a.q + t * a.ldq + int64_t(h0) * dq;
          // 1. Scores for every visible key. Inside a segment the visible
          //    keys form at most two position ranges: the always-visible
          //    prefix and the window.
          int64_t nk = 0;
          for (int s = 0; s < a.n_segments; ++s) {
            const KVSegment& seg = a.segments[s];
            const int64_t lo = seg.pos0, hi = std::min(seg.pos0 + seg.count, p + 1);  // k <= p
            auto take = [&](int64_t from, int64_t to) {
              for (int64_t k = std::max(from, lo); k < std::min(to, hi); ++k) {
                const int64_t row = k - seg.pos0;
                const float* kr = row_f32(seg.k, seg.dtype, row * seg.ld_k + int64_t(g) * dq, dq, ktmp.data());
                for (int j = 0; j < per_slice; ++j) {
                  const float* qj = q0 + int64_t(j) * dq;
                  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                  for (int i = 0; i < dq; ++i) dot += qj[i] * kr[i];
                  scores[size_t(j) * total_keys + nk] = dot * a.scale;
                }
                keys[nk++] = {&seg, row};
              }
            };
            if (a.window < 0) {
              take(lo, hi);
            } else {
              const int64_t win_lo = p - a.window;
              take(lo, std::min(a.n_always_visible, win_lo));  // prefix left of the window
              take(std::max(win_lo, lo), hi);
            }
          }
          // 2. Softmax per query head (fp32), then the weighted sum of V.
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int j = 0; j < per_slice; ++j) {
            float* sc = scores.data() + size_t(j) * total_keys;
            float mx = -INFINITY;
            for (int64_t k = 0; k < nk; ++k) mx = std::max(mx, sc[k]);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t k = 0; k < nk; ++k) {
              sc[k] = fast_exp(sc[k] - mx);
              sum += sc[k];
            }
            const float inv = nk > 0 ? 1.0f / sum : 0.0f;
#pragma omp simd
            for (int64_t k = 0; k < nk; ++k) sc[k] *= inv;
          }
          for (int64_t k = 0; k < nk; ++k) {
            const KVSegment& seg = *keys[k].seg;
            const float* vr = row_f32(seg.v, seg.dtype, keys[k].row * seg.ld_v + int64_t(g) * dv, dv, vtmp.data());
            for (int j = 0; j < per_slice; ++j) {
              const float w = scores[size_t(j) * total_keys + k];
              float* o = acc.data() + size_t(j) * dv;
#pragma omp simd
              for (int i = 0; i < dv; ++i) o[i] += w * vr[i];
            }
          }
          float* out = a.out + t * a.ldo + int64_t(h0) * dv;
          std::copy(acc.begin(), acc.end(), out);
        }
      }
    }
  }
}

void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t channels, const float* weight,
                      const float* bias, int k_width, float* state, float* y, int64_t ldy) {
  const int hist = k_width - 1;
  // Input at chunk time tau (may be negative: then it comes from the state).
  auto in = [&](int64_t tau) -> const float* {
    return tau >= 0 ? x + tau * ldx : state + (tau + hist) * channels;
  };
#pragma omp parallel
  {
    // Channel blocks per thread keep each thread's state slice private.
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = (channels + nt - 1) / nt;
    const int64_t c0 = std::min(channels, id * per), c1 = std::min(channels, c0 + per);
    for (int64_t t = 0; t < n; ++t) {
      float* yr = y + t * ldy;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) yr[c] = bias[c];
      for (int k = 0; k < k_width; ++k) {
        const float* xr = in(t - hist + k);
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) yr[c] += weight[c * k_width + k] * xr[c];
      }
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) yr[c] = silu(yr[c]);
    }
    // New state: the last `hist` inputs of (old state ++ chunk), oldest first.
    if (n >= hist) {
      for (int j = 0; j < hist; ++j)
        std::copy(x + (n - hist + j) * ldx + c0, x + (n - hist + j) * ldx + c1, state + j * channels + c0);
    } else if (n > 0) {
      for (int j = 0; j < hist; ++j) {
        const int64_t tau = n - hist + j;  // < n, possibly negative: shift the state left
        const float* src = in(tau);
        std::copy(src + c0, src + c1, state + j * channels + c0);  // j increasing reads ahead of writes
      }
    }
  }
}

void selective_scan(const ScanArgs& a) {
  constexpr int kLanes = 16;  // channels processed together: one v16f
  const int64_t N = a.d_state;
  check(N <= 256, "selective_scan: d_state ", N, " is larger than supported (256)");
  const int64_t n_blocks = (a.channels + kLanes - 1) / kLanes;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t c0 = blk * kLanes;
    const int lanes = int(std::min<int64_t>(kLanes, a.channels - c0));
    // State and A of this channel block, transposed to [s][lane] so that the
    // vector runs over channels: no horizontal sums in the recurrence.
    alignas(64) float hbuf[256][kLanes];
    alignas(64) float Abuf[256][kLanes];
    alignas(64) float tmp[kLanes];
    auto gather = [&](const float* src, int64_t stride) {  // lanes beyond the end read as 0
      for (int l = 0; l < kLanes; ++l) tmp[l] = l < lanes ? src[l * stride] : 0.0f;
      return v16_load(tmp);
    };
    for (int64_t s = 0; s < N; ++s) {
      v16_store(hbuf[s], gather(a.state + c0 * N + s, N));
      v16_store(Abuf[s], gather(a.A + c0 * N + s, N));
    }
    const v16f bias = gather(a.dt_bias + c0, 1), D = gather(a.D + c0, 1);
    for (int64_t t = 0; t < a.n; ++t) {
      const v16f u = gather(a.u + t * a.ldu + c0, 1);
      const v16f dt = v16_softplus(gather(a.delta + t * a.ld_delta + c0, 1) + bias);
      const v16f du = dt * u;
      v16f y = D * u;
      const float* B = a.B + t * a.ldb;
      const float* C = a.C + t * a.ldc;
      for (int64_t s = 0; s < N; ++s) {
        const v16f h = v16_exp(dt * v16_load(Abuf[s])) * v16_load(hbuf[s]) + du * B[s];
        v16_store(hbuf[s], h);
        y += h * C[s];
      }
      y *= v16_silu(gather(a.z + t * a.ldz + c0, 1));
      v16_store(tmp, y);
      float* yr = a.y + t * a.ldy + c0;
      for (int l = 0; l < lanes; ++l) yr[l] = tmp[l];
    }
    for (int64_t s = 0; s < N; ++s)
      for (int l = 0; l < lanes; ++l) a.state[(c0 + l) * N + s] = hbuf[s][l];
  }
}

void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t n, int64_t d, float* out,
              int64_t ldo) {
#pragma omp parallel for if (n * d > 65536)
  for (int64_t t = 0; t < n; ++t) {
    const float* g = gate + t * ldg;
    const float* u = up + t * ldu;
    float* o = out + t * ldo;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = silu(g[i]) * u[i];
  }
}

void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d) {
  for (int64_t t = 0; t < n; ++t) {
    float* ar = a + t * lda;
    const float* br = b + t * ldb;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) ar[i] = (ar[i] + br[i]) * 0.5f;
  }
}

void embed_rows(const MatrixView& table, const int32_t* ids, int64_t n, float* out, int64_t ldo) {
  const size_t es = dtype_size(table.dtype);
  for (int64_t t = 0; t < n; ++t) {
    check(ids[t] >= 0 && ids[t] < table.rows, "token id ", ids[t], " is out of range (vocabulary has ",
          table.rows, " tokens)");
    to_f32(static_cast<const uint8_t*>(table.data) + size_t(ids[t]) * size_t(table.cols) * es, table.dtype,
           size_t(table.cols), out + t * ldo);
  }
}

}  // namespace hymba::cpu
