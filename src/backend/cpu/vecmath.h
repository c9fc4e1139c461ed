// Branch-free float math that the compiler vectorises inside `omp simd`
// loops (libm calls would block vectorisation without -ffast-math). Accurate
// to a few ulp over the ranges the model uses; inputs are clamped so that
// over/underflow saturates like expf does (to +inf is never needed here).
#pragma once

#include <cstdint>
#include <cstring>

namespace hymba::cpu {

#pragma omp declare simd
inline float fast_exp(float x) {
  // exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2/2.
  x = x < -87.33654f ? -87.33654f : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_roundevenf(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;        // ln2 split in a high part exact in float
  r = r - n * -2.12194440e-4f;           // ... and the low remainder
  // Minimax polynomial for exp(r) on [-ln2/2, ln2/2].
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

#pragma omp declare simd
inline float fast_log(float x) {
  // x > 0 assumed. x = 2^e * m with m in [sqrt(.5), sqrt(2)).
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  int32_t mbits = (bits & 0x007fffff) | 0x3f800000;
  float m;
  std::memcpy(&m, &mbits, 4);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  // log(1+f) = 2 atanh(s), s = f / (2 + f): odd series in s.
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  // Taylor coefficients 2/(2k+1); |s| <= 0.1716, so the s^11 tail is < 1e-9.
  float p = 2.0f / 9.0f;
  p = p * s2 + 2.0f / 7.0f;
  p = p * s2 + 2.0f / 5.0f;
  p = p * s2 + 2.0f / 3.0f;
  const float log1pf_ = 2.0f * s + s * s2 * p;
  return float(e) * 0.693147180559945f + log1pf_;
}

#pragma omp declare simd
inline float silu(float x) { return x / (1.0f + fast_exp(-x)); }

// softplus with the reference's threshold: v for v > 20, else log(1 + e^v).
#pragma omp declare simd
inline float softplus(float v) {
  const float e = fast_exp(v < 20.0f ? v : 20.0f);
  // log1p(e) for tiny e: the series avoids the cancellation in 1 + e.
  const float small = e * (1.0f - 0.5f * e);
  // Elsewhere log(u) * e / (u - 1), u = fl(1 + e): corrects the rounding of
  // 1 + e, which plain log(u) would turn into a relative error up to ~6e-4
  // for e just above 1e-4 (v around -9).
  const float u = 1.0f + e;
  const float lg = fast_log(u) * (e / (u - 1.0f));
  const float sp = e < 1e-4f ? small : lg;
  return v > 20.0f ? v : sp;
}

}  // namespace hymba::cpu

// ---------------------------------------------------------------------------
// 16-lane versions on GCC/Clang vector extensions: one zmm register with
// AVX-512, two ymm with AVX2, scalar code elsewhere — one source for all.
namespace hymba::cpu {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f v16_splat(float x) { return v16f{} + x; }
inline v16f v16_load(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void v16_store(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }

inline v16f v16_exp(v16f x) {
  x = x < -87.33654f ? v16_splat(-87.33654f) : x;
  x = x > 88.0f ? v16_splat(88.0f) : x;
  // Round to nearest even with the 1.5 * 2^23 trick (|x * log2e| < 2^22).
  const v16f n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  v16f r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16f p = v16_splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  return p * (v16f)bits;
}

inline v16f v16_log(v16f x) {  // x > 0
  const v16i bits = (v16i)x;
  v16i e = ((bits >> 23) & 0xff) - 127;
  v16f m = (v16f)((bits & 0x007fffff) | 0x3f800000);
  const v16i big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const v16f f = m - 1.0f;
  const v16f s = f / (2.0f + f);
  const v16f s2 = s * s;
  v16f p = v16_splat(2.0f / 9.0f);
  p = p * s2 + 2.0f / 7.0f;
  p = p * s2 + 2.0f / 5.0f;
  p = p * s2 + 2.0f / 3.0f;
  return __builtin_convertvector(e, v16f) * 0.693147180559945f + (2.0f * s + s * s2 * p);
}

inline v16f v16_silu(v16f x) { return x / (1.0f + v16_exp(-x)); }

inline v16f v16_softplus(v16f v) {
  const v16f e = v16_exp(v < 20.0f ? v : v16_splat(20.0f));
  const v16f small = e * (1.0f - 0.5f * e);
  const v16f u = 1.0f + e;  // log1p(e) = log(u) * e / (u - 1): see softplus()
  const v16f sp = e < 1e-4f ? small : v16_log(u) * (e / (u - 1.0f));
  return v > 20.0f ? v : sp;
}

}  // namespace hymba::cpu
