// Branch-free float math on 16-lane vectors (libm calls would not vectorise
// without -ffast-math). Accurate to a few ulp over the ranges the model uses;
// inputs are clamped so that exp saturates (e^-87 .. e^88) instead of
// producing denormals or infinities.
#pragma once

#include <cstdint>
#include <cstring>

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
  // log1p(e) = log(u) * e / (u - 1) with u = 1 + e: the factor undoes the
  // rounding of 1 + e, which matters for e just above 1e-4.
  const v16f u = 1.0f + e;
  const v16f sp = e < 1e-4f ? small : v16_log(u) * (e / (u - 1.0f));
  return v > 20.0f ? v : sp;
}

// Scalar forms for loop tails and one-off values: lane 0 of the vector
// versions, so the scalar and vector paths agree bit for bit.
inline float fast_exp(float x) { return v16_exp(v16_splat(x))[0]; }
inline float fast_log(float x) { return v16_log(v16_splat(x))[0]; }
inline float silu(float x) { return v16_silu(v16_splat(x))[0]; }
inline float softplus(float v) { return v16_softplus(v16_splat(v))[0]; }

}  // namespace hymba::cpu
