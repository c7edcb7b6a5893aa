// The fp8 KV cache (kv_cache_dtype="fp8") on CUDA: e4m3fn bytes without subnormals, the format of
// csrc/cpu/fp8_kv.h and ops_native.fp8_kv_quantize. A magnitude under 2^-7 stores as 0, one in
// [2^-7, 2^-6) as 2^-6, the rest round to nearest even and saturate at 448; NaN stores as 0x7f.
// No torch headers.
#pragma once

#include <cstdint>

#include "cuda/vec.cuh"

namespace octavo::cuda {

// One cache byte. A type of its own (not __nv_fp8_e4m3) so that the kernels' loads decode it
// with fp8_kv_decode below, which relies on the format having no subnormals.
struct Fp8Kv {
  uint8_t bits;
};

// fp32 -> fp8 KV byte, the same bit steps as csrc/cpu/fp8_kv.h (selects, no branches).
__device__ __forceinline__ uint8_t fp8_kv_encode(float f) {
  uint32_t u = __float_as_uint(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  u &= 0x7fffffffu;
  // normal range: drop 20 of fp32's 23 mantissa bits rounding to nearest even, exponent 127 -> 7
  const uint32_t r = (u + 0x7ffffu + ((u >> 20) & 1u)) >> 20;
  uint32_t mag = r - (120u << 3);
  mag = u < 0x3c000000u ? 0u : (u < 0x3c800000u ? 0x08u : mag);  // < 2^-7: 0; < 2^-6: 2^-6
  mag = u >= 0x43e00000u ? 0x7eu : mag;                          // >= 448 (and infinity): 448
  mag = u > 0x7f800000u ? 0x7fu : mag;                           // NaN
  return static_cast<uint8_t>(sign | mag);
}

// fp8 KV byte -> its exact fp32 value. With no subnormals, the 7 magnitude bits moved into fp32's
// exponent and mantissa give the value times 2^-120 as a normal float (or zero, for byte 0), so
// one multiply rebiases it; 0x7f / 0xff are NaN.
__device__ __forceinline__ float fp8_kv_decode(uint32_t b) {
  const float x = __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20)) * 0x1p120f;
  return (b & 0x7fu) == 0x7fu ? __uint_as_float(0x7fc00000u) : x;
}

__device__ __forceinline__ float to_float(Fp8Kv x) { return fp8_kv_decode(x.bits); }

// Kernels read 8 cache bytes at once (one 8-byte load): every head size the attention kernels
// take (a multiple of 8) is then whole vectors, and a lane holds as many values as with bf16.
template <>
struct Vec<Fp8Kv> {
  static constexpr int kElems = 8;
};

// f[0:8] = the values of the 8 bytes at p (p 8-byte aligned).
__device__ __forceinline__ void load_vec(const Fp8Kv* p, float (&f)[8]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  OCTAVO_UNROLL
  for (int e = 0; e < 4; ++e) {
    f[e] = fp8_kv_decode((raw.x >> (8 * e)) & 0xffu);
    f[4 + e] = fp8_kv_decode((raw.y >> (8 * e)) & 0xffu);
  }
}

// dst[0:8] = the 8 bytes at src as T, one 16-byte store (dst 16-byte, src 8-byte aligned). Exact
// for bf16 and fp16: every fp8 KV value (2^-6 .. 448, 4 significant bits) is normal in both.
template <typename T>
__device__ __forceinline__ void fp8_kv_to(T* dst, const Fp8Kv* src) {
  static_assert(sizeof(T) == 2, "decodes into a 16-bit type");
  float f[8];
  load_vec(src, f);
  T vals[8];
  OCTAVO_UNROLL
  for (int e = 0; e < 8; ++e) vals[e] = from_float<T>(f[e]);
  uint4 raw;
  memcpy(&raw, vals, sizeof(raw));
  *reinterpret_cast<uint4*>(dst) = raw;
}

// dst[0:N] = src[0:N] / scale as fp8 KV bytes: one load of N values, one store of N bytes (N == 1,
// or N == Vec<T>::kElems with src 16-byte and dst N-byte aligned). The division is IEEE fp32
// (__fdiv_rn, not a reciprocal multiply), so the bytes match the CPU kernel and ops_native.
template <typename T, int N>
__device__ __forceinline__ void quantize_n(Fp8Kv* dst, const T* src, float scale) {
  float f[N];
  load_n<T, N>(src, f);
  OCTAVO_UNROLL
  for (int e = 0; e < N; ++e) f[e] = __fdiv_rn(f[e], scale);
  if constexpr (N == 1) {
    dst->bits = fp8_kv_encode(f[0]);
  } else {
    static_assert(N == 4 || N == 8, "fp32 stores 4 bytes, bf16/fp16 8");
    uint32_t w[2] = {0u, 0u};
    OCTAVO_UNROLL
    for (int e = 0; e < N; ++e) w[e / 4] |= uint32_t(fp8_kv_encode(f[e])) << (8 * (e % 4));
    if constexpr (N == 4) *reinterpret_cast<uint32_t*>(dst) = w[0];
    else *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  }
}

}  // namespace octavo::cuda
