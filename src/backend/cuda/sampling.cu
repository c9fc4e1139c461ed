// Backend::sample_tokens on the GPU: one block per row, the host kernel's
// rules (backend/cpu/sampling.cpp) without sorting.
//
// The candidates after every filter are always a prefix of the row in the
// order (penalised logit descending, id ascending), and so is every cut the
// host makes (top-k, min-p, top-p, the inverse-CDF walk). A prefix of length
// L is "all keys > t, plus the r lowest ids of key t" for the L-th largest
// key t. The kernel finds each cut with a 16-way search over the 32-bit
// order-preserving key of the logits: a pass evaluates, for 16 thresholds T
// at once, count(key >= T) and sum(p over key >= T), so 8 passes pin one
// key exactly. All comparisons and counts are exact, so greedy, top-k and
// the tie handling agree with the host bit for bit. Probabilities are
// exp((double(l) - max) / T) in double as on the host; the sums run in
// another order (deterministic: a fixed per-thread stride and tree), and
// CUDA's exp may differ from the host's by an ulp. So a sum differs from the
// host's by ~1e-15 relative (n * 2^-53 at worst), and the chosen token can
// differ only when a cut is that close to a boundary: u * kept within that of
// a cumulative sum, top_p * total within that of a prefix sum, or a
// probability within an ulp of min_p.
#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "backend/cpu/sampling.h"
#include "backend/cuda/common.cuh"
#include "backend/cuda/kernels.cuh"

namespace hymba::cuda {

namespace {

constexpr int kThreads = 512;  // 16 ways x (double + int) per thread: 128 registers allowed
constexpr int kWarps = kThreads / 32;
constexpr int kWays = 16;
constexpr uint32_t kNegInfKey = 0x007fffffu;  // key_of(-inf)

enum : int32_t { kOk = 0, kNaN, kPosInf, kPenaltyInf, kNoFinite };

struct RowDesc {
  const float* logits;
  const int32_t* hist;  // device, validated on the host; null when no penalty applies
  int64_t n_hist;
  double u;
  float temperature, top_p, min_p, penalty;
  int32_t top_k, pad;
};

struct RowOut {
  int32_t token;
  int32_t code;
  int64_t index;  // the token an error names
};

// Order-preserving map of non-NaN floats to uint32 (-0 folded into +0: the
// host compares values, so they tie).
__device__ __forceinline__ uint32_t key_of(float f) {
  uint32_t b = __float_as_uint(f);
  if ((b << 1) == 0) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float float_of(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// The host's probability expression, bit for bit up to exp's last ulp.
__device__ __forceinline__ double prob_of(uint32_t k, float max_l, double inv_t) {
  return exp((static_cast<double>(float_of(k)) - static_cast<double>(max_l)) * inv_t);
}

struct Shared {
  double ws[kWarps][kWays];
  int wc[kWarps][kWays];
  double s[kWays];  // the last pass: sum of p over key >= thr[b]
  int c[kWays];     // and the count
  double red_d[kWarps];
  int red_i[kWarps];
  unsigned long long red_u[kWarps];
  int pen_bad;
};

// Deterministic block reduction (fixed tree), the result in every thread.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T* buf) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  __syncthreads();  // earlier readers of buf are done
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = buf[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, buf[w]);
  return r;
}

// Per-thread partials of the 16 ways -> sh.s / sh.c (visible to all on return).
__device__ void reduce_ways(double (&s)[kWays], int (&c)[kWays], Shared& sh) {
#pragma unroll
  for (int b = 0; b < kWays; ++b)
    for (int o = 16; o > 0; o >>= 1) {
      s[b] += __shfl_down_sync(0xffffffffu, s[b], o);
      c[b] += __shfl_down_sync(0xffffffffu, c[b], o);
    }
  __syncthreads();  // earlier readers of sh.s / sh.c are done
  const int w = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int b = 0; b < kWays; ++b) sh.ws[w][b] = s[b], sh.wc[w][b] = c[b];
  }
  __syncthreads();
  if (threadIdx.x < kWays) {
    double t = 0.0;
    int ct = 0;
    for (int i = 0; i < kWarps; ++i) t += sh.ws[i][threadIdx.x], ct += sh.wc[i][threadIdx.x];
    sh.s[threadIdx.x] = t, sh.c[threadIdx.x] = ct;
  }
  __syncthreads();
}

// count / sum of p over the elements with key >= thr[b].
template <bool kSums>
__device__ void eval_keys(const uint32_t* keys, const double* p, int n, const uint32_t (&thr)[kWays], Shared& sh) {
  double s[kWays];
  int c[kWays];
#pragma unroll
  for (int b = 0; b < kWays; ++b) s[b] = 0.0, c[b] = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const uint32_t k = keys[i];
    if (k < thr[0]) continue;  // thr ascends: below all of them (most elements once the search narrows)
    const double q = kSums ? p[i] : 0.0;
#pragma unroll
    for (int b = 0; b < kWays; ++b)
      if (k >= thr[b]) {
        if (kSums) s[b] += q;
        ++c[b];
      }
  }
  reduce_ways(s, c, sh);
}

// count of the elements with key == t and id < thr[b].
__device__ void eval_ids(const uint32_t* keys, int n, uint32_t t, const uint32_t (&thr)[kWays], Shared& sh) {
  double s[kWays];
  int c[kWays];
#pragma unroll
  for (int b = 0; b < kWays; ++b) s[b] = 0.0, c[b] = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    if (keys[i] != t) continue;
#pragma unroll
    for (int b = 0; b < kWays; ++b) c[b] += uint32_t(i) < thr[b] ? 1 : 0;
  }
  reduce_ways(s, c, sh);
}

// A point of a search: a threshold and the sum / count of the pass at it.
struct Bound {
  uint64_t at;
  double s;
  int c;
};

// Narrows [lo, hi) to hi == lo + 1, where lo is the largest threshold with
// pred(sum, count) true, given pred(lo) true, pred(hi) false and pred
// monotone (true below some point, false above). eval(thr) fills sh.s/sh.c
// at 16 ascending thresholds strictly inside (lo, hi). Every thread runs this in
// lockstep on the same shared values, so all agree on lo and hi.
template <class Eval, class Pred>
__device__ void search(Bound& lo, Bound& hi, Eval eval, Pred pred, Shared& sh) {
  while (hi.at - lo.at > 1) {
    const uint64_t span = hi.at - lo.at;
    uint32_t thr[kWays];
#pragma unroll
    for (int b = 0; b < kWays; ++b)
      thr[b] = uint32_t(span <= kWays + 1 ? (lo.at + 1 + b < hi.at ? lo.at + 1 + b : hi.at - 1)
                                          : lo.at + span * uint64_t(b + 1) / uint64_t(kWays + 1));
    eval(thr);
    const Bound lo0 = lo;
    Bound nlo = lo0, nhi = hi;
#pragma unroll
    for (int b = 0; b < kWays; ++b) {
      if (nhi.at != hi.at) break;  // already found the first false
      const Bound x{thr[b], sh.s[b], sh.c[b]};
      if (pred(x.s, x.c)) nlo = x;
      else nhi = x;
    }
    lo = nlo, hi = nhi;
  }
}

// The smallest j in [1, c] with s0 + j * q (>= or >) target: the host adds
// a tie group's equal probabilities one by one.
__device__ int64_t first_reaching(double s0, double q, int64_t c, double target, bool strict) {
  auto ok = [&](int64_t j) {
    const double v = s0 + double(j) * q;
    return strict ? v > target : v >= target;
  };
  const double guess = (target - s0) / q;  // q > 0 here; NaN / inf still land in [1, c]
  int64_t j = c;
  if (guess < 1.0) {
    j = 1;
  } else if (guess < double(c)) {
    j = int64_t(strict ? floor(guess) + 1.0 : ceil(guess));
    if (j < 1) j = 1;
    if (j > c) j = c;
  }
  while (j > 1 && ok(j - 1)) --j;
  while (j < c && !ok(j)) ++j;
  return j;
}

__global__ void __launch_bounds__(kThreads) sample_rows(const RowDesc* __restrict__ desc, int n,
                                                        uint32_t* keys_all, double* p_all, RowOut* out) {
  __shared__ Shared sh;
  const RowDesc d = desc[blockIdx.x];
  const float* logits = d.logits;
  // Written and read back within this block: no __restrict__ / read-only cache.
  uint32_t* keys = keys_all + int64_t(blockIdx.x) * n;
  double* p = p_all + int64_t(blockIdx.x) * n;
  const int tid = threadIdx.x;
  auto add_d = [](double a, double b) { return a + b; };
  auto add_i = [](int a, int b) { return a + b; };

  // Greedy without a penalty (the common decode case): one pass over the
  // logits for the checks and the argmax, no key array.
  if (d.temperature == 0.0f && d.n_hist <= 0) {
    int bad = INT_MAX, n_fin = 0;
    unsigned long long best = 0;
#pragma unroll 8
    for (int i = tid; i < n; i += kThreads) {
      const float v = logits[i];
      if ((v != v || v == __int_as_float(0x7f800000)) && i < bad) bad = i;
      const uint32_t k = key_of(v);
      const unsigned long long b = (static_cast<unsigned long long>(k) << 32) | (0xffffffffu - uint32_t(i));
      best = b > best ? b : best;
      n_fin += k != kNegInfKey;
    }
    bad = block_reduce(bad, [](int a, int b) { return a < b ? a : b; }, sh.red_i);
    best = block_reduce(best, [](unsigned long long a, unsigned long long b) { return a > b ? a : b; }, sh.red_u);
    n_fin = block_reduce(n_fin, add_i, sh.red_i);
    if (tid == 0) {
      if (bad != INT_MAX) out[blockIdx.x] = RowOut{-1, logits[bad] != logits[bad] ? kNaN : kPosInf, bad};
      else if (n_fin == 0) out[blockIdx.x] = RowOut{-1, kNoFinite, 0};
      else out[blockIdx.x] = RowOut{int32_t(0xffffffffu - uint32_t(best)), kOk, 0};
    }
    return;
  }

  // 1. The first NaN / +inf, as the host reports it.
  int bad = INT_MAX;
  for (int i = tid; i < n; i += kThreads) {
    const float v = logits[i];
    if (v != v || v == __int_as_float(0x7f800000)) {
      bad = i;
      break;  // a thread's indices increase: its first is its smallest
    }
  }
  bad = block_reduce(bad, [](int a, int b) { return a < b ? a : b; }, sh.red_i);
  if (bad != INT_MAX) {
    if (tid == 0) {
      const float v = logits[bad];
      out[blockIdx.x] = RowOut{-1, v != v ? kNaN : kPosInf, bad};
    }
    return;
  }

  // 2. Keys of the penalised logits. A repeated history id rewrites the same
  // value (computed from the input), so the duplicates race harmlessly.
  for (int i = tid; i < n; i += kThreads) keys[i] = key_of(logits[i]);
  if (tid == 0) sh.pen_bad = INT_MAX;
  __syncthreads();
  if (d.n_hist > 0) {
    for (int64_t h = tid; h < d.n_hist; h += kThreads) {
      const int id = d.hist[h];
      const float v = logits[id];
      const float w = v > 0.0f ? __fdiv_rn(v, d.penalty) : __fmul_rn(v, d.penalty);
      if (w == __int_as_float(0x7f800000)) atomicMin(&sh.pen_bad, id);
      keys[id] = key_of(w);
    }
    __syncthreads();
    if (sh.pen_bad != INT_MAX) {
      if (tid == 0) out[blockIdx.x] = RowOut{-1, kPenaltyInf, sh.pen_bad};
      return;
    }
  }

  // 3. The largest key with its lowest id (greedy), and the finite count.
  unsigned long long best = 0;
  int n_fin = 0;
  for (int i = tid; i < n; i += kThreads) {
    const uint32_t k = keys[i];
    const unsigned long long v = (static_cast<unsigned long long>(k) << 32) | (0xffffffffu - uint32_t(i));
    best = v > best ? v : best;
    n_fin += k != kNegInfKey;
  }
  best = block_reduce(best, [](unsigned long long a, unsigned long long b) { return a > b ? a : b; }, sh.red_u);
  n_fin = block_reduce(n_fin, add_i, sh.red_i);
  if (n_fin == 0) {
    if (tid == 0) out[blockIdx.x] = RowOut{-1, kNoFinite, 0};
    return;
  }
  if (d.temperature == 0.0f) {
    if (tid == 0) out[blockIdx.x] = RowOut{int32_t(0xffffffffu - uint32_t(best)), kOk, 0};
    return;
  }

  // 4. Probabilities relative to the largest logit (p = 1 there, exactly).
  const float max_l = float_of(uint32_t(best >> 32));
  const double inv_t = 1.0 / static_cast<double>(d.temperature);
  for (int i = tid; i < n; i += kThreads) p[i] = prob_of(keys[i], max_l, inv_t);
  __syncthreads();

  auto counts = [&](const uint32_t(&thr)[kWays]) { eval_keys<false>(keys, p, n, thr, sh); };
  auto sums = [&](const uint32_t(&thr)[kWays]) { eval_keys<true>(keys, p, n, thr, sh); };
  const Bound top{uint64_t(1) << 32, 0.0, 0};

  // 5. top-k: tK is the K-th largest key; the r_k lowest ids of key tK are in.
  const int K = d.top_k > 0 && d.top_k < n_fin ? d.top_k : n_fin;
  Bound lo{kNegInfKey + 1, 0.0, n_fin}, hi = top;
  search(lo, hi, counts, [&](double, int c) { return c >= K; }, sh);
  const uint32_t tK = uint32_t(lo.at);
  const int r_k = K - hi.c;
  const double p_tK = prob_of(tK, max_l, inv_t);

  // 6. The top-k mass, and the min-p prefix (p >= min_p is a prefix: p
  // falls along the order).
  const double thr_minp = static_cast<double>(d.min_p);
  double s_gt = 0.0;
  int c_minp = 0;
  for (int i = tid; i < n; i += kThreads) {
    if (keys[i] <= tK) continue;
    s_gt += p[i];
    c_minp += p[i] >= thr_minp;
  }
  s_gt = block_reduce(s_gt, add_d, sh.red_d);
  c_minp = block_reduce(c_minp, add_i, sh.red_i);
  const double total = s_gt + double(r_k) * p_tK;
  const int L_minp = d.min_p > 0.0f ? c_minp + (p_tK >= thr_minp ? r_k : 0) : K;

  // 7. top-p: the shortest prefix whose mass reaches top_p * total.
  int L_topp = K;
  if (d.top_p < 1.0f) {
    const double target = static_cast<double>(d.top_p) * total;
    lo = Bound{tK, total, K}, hi = top;
    search(lo, hi, sums, [&](double s, int) { return s >= target; }, sh);
    const uint32_t t = uint32_t(lo.at);
    L_topp = hi.c + int(first_reaching(hi.s, prob_of(t, max_l, inv_t), lo.c - hi.c, target, false));
  }

  // 8. The survivors: the L-prefix, and their mass.
  const int L = L_minp < L_topp ? L_minp : L_topp;
  lo = Bound{tK, total, K}, hi = top;
  search(lo, hi, sums, [&](double, int c) { return c >= L; }, sh);
  const uint32_t tL = uint32_t(lo.at);
  const int r_l = L - hi.c;
  const double p_tL = prob_of(tL, max_l, inv_t);
  const double kept = hi.s + double(r_l) * p_tL;

  // 9. The inverse-CDF walk: the first prefix whose mass exceeds u * kept
  // (the host: u < running sum of p / kept), else the last survivor.
  const double x = d.u * kept;
  uint32_t t = tL;
  int64_t j = r_l;
  if (kept > x) {
    lo = Bound{tL, kept, L}, hi = top;
    search(lo, hi, sums, [&](double s, int) { return s > x; }, sh);
    t = uint32_t(lo.at);
    j = first_reaching(hi.s, prob_of(t, max_l, inv_t), lo.c - hi.c, x, true);
  }

  // 10. The token: the j-th lowest id with key t (the largest M with fewer
  // than j such ids below M is that id).
  lo = Bound{0, 0.0, 0}, hi = Bound{uint64_t(n), 0.0, 0};
  search(lo, hi, [&](const uint32_t(&thr)[kWays]) { eval_ids(keys, n, t, thr, sh); },
         [&](double, int c) { return c < j; }, sh);
  if (tid == 0) out[blockIdx.x] = RowOut{int32_t(lo.at), kOk, 0};
}

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

}  // namespace

void sample_tokens(const float* logits, int64_t rows, int64_t vocab, int64_t ld, const SampleArgs* args,
                   int32_t* out_ids, cudaStream_t stream, const std::function<void*(size_t)>& scratch) {
  if (rows <= 0) return;
  // The checks and messages of the host path (backend/cpu/sampling.cpp).
  for (int64_t r = 0; r < rows; ++r) cpu::check_sample_args(args[r]);
  check(vocab > 0, "sampler: vocabulary size must be positive, got ", vocab);
  check(ld >= vocab, "sample_tokens: leading dimension ", ld, " is smaller than the vocabulary (", vocab, ")");
  check(vocab < (int64_t(1) << 30), "sample_tokens (CUDA): vocabulary of ", vocab, " tokens is too large");

  // Rows per launch: keys (4 B) + probabilities (8 B) per logit, ~96 MiB at most.
  const int64_t per_row = vocab * int64_t(sizeof(uint32_t) + sizeof(double));
  const int64_t chunk = std::clamp<int64_t>((int64_t(96) << 20) / per_row, 1, 1024);
  std::vector<unsigned char> blob;
  std::vector<int64_t> bad_hist;
  std::vector<RowOut> res;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t nr = std::min(chunk, rows - r0);
    // History ids are checked here (the smallest bad id of a row is named,
    // as on the host) but reported after the row's NaN check, in row order.
    bad_hist.assign(size_t(nr), INT64_MIN);
    int64_t n_ids = 0;
    for (int64_t r = 0; r < nr; ++r) {
      const SampleArgs& a = args[r0 + r];
      int64_t worst = INT64_MIN;
      for (int64_t h = 0; h < a.n_history; ++h) {
        const int32_t id = a.history[h];
        if (id < 0 || id >= vocab) {
          // smallest bad id: negatives first, else the smallest >= vocab
          if (worst == INT64_MIN || id < worst) worst = id;
        }
      }
      bad_hist[size_t(r)] = worst;
      if (worst == INT64_MIN && a.repeat_penalty != 1.0f) n_ids += a.n_history;
    }
    const size_t desc_bytes = align256(size_t(nr) * sizeof(RowDesc));
    const size_t ids_bytes = align256(size_t(n_ids) * sizeof(int32_t));
    const size_t out_bytes = align256(size_t(nr) * sizeof(RowOut));
    const size_t keys_bytes = align256(size_t(nr * vocab) * sizeof(uint32_t));
    const size_t p_bytes = size_t(nr * vocab) * sizeof(double);
    unsigned char* base = static_cast<unsigned char*>(scratch(desc_bytes + ids_bytes + out_bytes + keys_bytes + p_bytes));
    int32_t* d_ids = reinterpret_cast<int32_t*>(base + desc_bytes);
    RowOut* d_out = reinterpret_cast<RowOut*>(base + desc_bytes + ids_bytes);
    uint32_t* d_keys = reinterpret_cast<uint32_t*>(base + desc_bytes + ids_bytes + out_bytes);
    double* d_p = reinterpret_cast<double*>(base + desc_bytes + ids_bytes + out_bytes + keys_bytes);

    blob.assign(desc_bytes + ids_bytes, 0);
    RowDesc* h_desc = reinterpret_cast<RowDesc*>(blob.data());
    int32_t* h_ids = reinterpret_cast<int32_t*>(blob.data() + desc_bytes);
    int64_t off = 0;
    for (int64_t r = 0; r < nr; ++r) {
      const SampleArgs& a = args[r0 + r];
      RowDesc& dd = h_desc[r];
      dd.logits = logits + (r0 + r) * ld;
      dd.hist = nullptr;
      dd.n_hist = 0;
      if (bad_hist[size_t(r)] == INT64_MIN && a.repeat_penalty != 1.0f && a.n_history > 0) {
        std::copy(a.history, a.history + a.n_history, h_ids + off);
        dd.hist = d_ids + off;
        dd.n_hist = a.n_history;
        off += a.n_history;
      }
      dd.u = a.u;
      dd.temperature = a.temperature, dd.top_p = a.top_p, dd.min_p = a.min_p, dd.penalty = a.repeat_penalty;
      dd.top_k = a.top_k, dd.pad = 0;
    }
    // Pageable source: the call returns once the bytes are staged, so blob
    // may be reused right after.
    HYMBA_CUDA_CHECK(cudaMemcpyAsync(base, blob.data(), blob.size(), cudaMemcpyHostToDevice, stream));
    sample_rows<<<unsigned(nr), kThreads, 0, stream>>>(reinterpret_cast<const RowDesc*>(base), int(vocab), d_keys,
                                                        d_p, d_out);
    HYMBA_CUDA_LAUNCHED("sample_rows");
    res.resize(size_t(nr));
    HYMBA_CUDA_CHECK(cudaMemcpyAsync(res.data(), d_out, size_t(nr) * sizeof(RowOut), cudaMemcpyDeviceToHost, stream));
    HYMBA_CUDA_CHECK(cudaStreamSynchronize(stream));

    for (int64_t r = 0; r < nr; ++r) {
      const RowOut& o = res[size_t(r)];
      if (o.code == kNaN) fail("sampler: logit of token ", o.index, " is NaN");
      if (o.code == kPosInf) fail("sampler: logit of token ", o.index, " is +inf");
      if (bad_hist[size_t(r)] != INT64_MIN)
        fail("sampler: history token id ", bad_hist[size_t(r)], " is out of range for vocabulary of size ", vocab);
      if (o.code == kPenaltyInf) fail("sampler: logit of token ", o.index, " is +inf after the repetition penalty");
      if (o.code == kNoFinite) fail("sampler: no token has a finite logit");
      check(o.code == kOk && o.token >= 0 && o.token < vocab, "sample_tokens (CUDA): internal error: row ", r0 + r,
            " gave code ", o.code, " token ", o.token);
      out_ids[r0 + r] = o.token;
    }
  }
}

}  // namespace hymba::cuda
