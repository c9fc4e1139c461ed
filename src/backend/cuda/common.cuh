// Shared helpers of the CUDA backend: error checks that throw hymba::Error
// naming the failed call, and bit-exact dtype conversions that match the
// host ones in util/dtype.h (round-to-nearest-even, quiet NaN).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "util/dtype.h"
#include "util/error.h"

namespace hymba::cuda {

// Throws hymba::Error naming `what` when a CUDA runtime call failed.
inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear a sticky launch error so later calls report their own
    fail("CUDA error in ", what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  }
}
#define HYMBA_CUDA_CHECK(call) ::hymba::cuda::check_cuda((call), #call)
// After a kernel launch: configuration errors surface here, not at the next sync.
#define HYMBA_CUDA_LAUNCHED(name) ::hymba::cuda::check_cuda(cudaGetLastError(), "launch of kernel " name)

inline unsigned blocks_for(int64_t work, int threads, int64_t cap = 65535LL * 8) {
  int64_t b = (work + threads - 1) / threads;
  if (b < 1) b = 1;
  return unsigned(b < cap ? b : cap);
}

// ---- element conversions (device), bit-identical to util/dtype.h

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  const uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // NaN stays quiet
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding) >> 16);
}

__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }

__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) {
  // __float2half_rn is IEEE round-to-nearest-even (subnormals and overflow to
  // inf included), as f32_to_f16 on the host; only NaN needs the host's form.
  if (f != f) return uint16_t((__float_as_uint(f) >> 16) & 0x8000) | 0x7e00;
  return __half_as_ushort(__float2half_rn(f));
}

// Element i of an array of type dt as fp32.
__device__ __forceinline__ float load_as_f32(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(base)[i];
    case DType::BF16: return bf16_bits_to_f32(static_cast<const uint16_t*>(base)[i]);
    default: return f16_bits_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
}

// f rounded to dt precision, kept as fp32.
__device__ __forceinline__ float round_f32(float f, DType dt) {
  if (dt == DType::BF16) return bf16_bits_to_f32(f32_to_bf16_bits(f));
  if (dt == DType::F16) return f16_bits_to_f32(f32_to_f16_bits(f));
  return f;
}

__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }
// silu_f with the fast division (within 2 ulp of it, no slow-path branch),
// for straight-line code the compiler can interleave with other work.
__device__ __forceinline__ float silu_fast_f(float x) { return __fdividef(x, 1.0f + expf(-x)); }

// ---- small PTX helpers shared by the kernels

constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = 2^(x log2 e)

// 2^x in one MUFU op (ex2.approx: ~2 ulp; results below 2^-126 flush to 0,
// -inf gives +0).
__device__ __forceinline__ float ex2_fast(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// 16 bytes global -> shared without registers (both 16-byte aligned);
// src_bytes < 16 reads that many and zero-fills the rest (0: nothing read).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N of this thread's committed groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---- tensor-core fragments (mma.sync m16n8k16, bf16 in, fp32 out)

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c += a * b: a 16x16 (row), b 16x8 (col) bf16, c 16x8 fp32.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace hymba::cuda
