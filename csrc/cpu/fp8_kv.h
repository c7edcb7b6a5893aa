// The fp8 KV cache (kv_cache_dtype="fp8"): e4m3fn bytes (bias 7, largest 448, no infinities)
// with no subnormals. A magnitude under 2^-7 is stored as 0 and one in [2^-7, 2^-6) as 2^-6;
// above that the value is rounded to nearest even, and beyond 448 saturates (as torch's
// conversion to float8_e4m3fn does). Without subnormals, the 7 magnitude bits of every stored byte
// shifted into a bf16's exponent and mantissa give an exact normal bf16 of the value times 2^-120
// (or zero), which is what the decode kernels multiply with vdpbf16ps (it flushes subnormal inputs).
#pragma once

#include <cstdint>
#include <cstring>

namespace octavo::cpu {

inline uint8_t fp8_kv_encode(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  u &= 0x7fffffffu;
  // normal range: drop 20 of fp32's 23 mantissa bits rounding to nearest even, exponent 127 -> 7
  const uint32_t r = (u + 0x7ffffu + ((u >> 20) & 1u)) >> 20;
  uint8_t mag = uint8_t(r - (120u << 3));
  if (u < 0x3c000000u) mag = 0;              // < 2^-7
  else if (u < 0x3c800000u) mag = 0x08;      // [2^-7, 2^-6): 2^-6
  if (u >= 0x43e00000u) mag = 0x7e;          // >= 448 (and infinity): 448
  if (u > 0x7f800000u) mag = 0x7f;           // NaN
  return uint8_t(sign | mag);
}

// The value of a stored byte (0x7f / 0xff: NaN).
inline float fp8_kv_decode(uint8_t b) {
  const uint32_t mag = b & 0x7fu;
  if (mag == 0x7f) return __builtin_nanf("");
  uint32_t u = mag == 0 ? 0u : ((mag << 20) + (120u << 23));
  u |= uint32_t(b & 0x80u) << 24;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace octavo::cpu
