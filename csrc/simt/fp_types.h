// CPU stand-ins for CUDA's 16-bit and fp8 types (__half, __nv_bfloat16, __nv_fp8_e4m3), their
// two-element vectors and conversions. Bit-exact round-to-nearest-even, like the hardware.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace octavo::simt::fp {

inline uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t float_to_half(float f) {
  uint32_t x = bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= (143u << 23)) return sign | (x > (255u << 23) ? 0x7e00u : 0x7c00u);  // >= 2^16, inf, NaN
  if (x < (113u << 23)) {  // |f| < 2^-14: the float adder rounds into the subnormal grid
    const uint32_t magic = 126u << 23;
    return sign | static_cast<uint16_t>(bits(from_bits(x) + from_bits(magic)) - magic);
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
  return sign | static_cast<uint16_t>(x >> 13);  // a carry into exponent 31 gives inf
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return from_bits(sign | bits(std::ldexp(static_cast<float>(m), -24)));
  if (e == 31) return from_bits(sign | 0x7f800000u | (m << 13));
  return from_bits(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) { return from_bits(static_cast<uint32_t>(b) << 16); }

// e4m3 "fn": bias 7, no infinities, 0x7f is NaN, largest finite 448. Saturates like __NV_SATFINITE.
inline uint8_t float_to_e4m3(float f) {
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  if (std::isnan(f)) return sign | 0x7f;
  const double a = std::fabs(static_cast<double>(f));
  if (a < 0x1p-6) return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0));  // 8 -> 2^-6
  int e;
  std::frexp(a, &e);
  int exp = e - 1;
  double q = std::nearbyint(std::ldexp(a, 3 - exp));  // in [8, 16]
  if (q == 16.0) { q = 8.0; ++exp; }
  if (exp > 8 || (exp == 8 && q > 14.0)) return sign | 0x7e;
  return sign | static_cast<uint8_t>(((exp + 7) << 3) | (static_cast<int>(q) - 8));
}

inline float e4m3_to_float(uint8_t c) {
  const int e = (c >> 3) & 0xf, m = c & 7;
  float v;
  if (e == 15 && m == 7) v = NAN;
  else if (e == 0) v = std::ldexp(static_cast<float>(m), -9);
  else v = std::ldexp(1.f + m / 8.f, e - 7);
  return (c & 0x80) ? -v : v;
}

}  // namespace octavo::simt::fp

// Arithmetic goes through float and rounds once: exact for + - * / because float has more than
// 2p+2 bits for p = 11 (half) and p = 8 (bf16).
#define OCTAVO_SIMT_16BIT_TYPE(NAME, TO, FROM)                                                   \
  struct NAME {                                                                                  \
    uint16_t __x;                                                                                \
    NAME() = default;                                                                            \
    NAME(float f) : __x(::octavo::simt::fp::TO(f)) {}                                            \
    NAME(double f) : __x(::octavo::simt::fp::TO(static_cast<float>(f))) {}                      \
    NAME(int i) : __x(::octavo::simt::fp::TO(static_cast<float>(i))) {}                          \
    operator float() const { return ::octavo::simt::fp::FROM(__x); }                             \
    NAME& operator+=(NAME o) { return *this = NAME(float(*this) + float(o)); }                   \
    NAME& operator-=(NAME o) { return *this = NAME(float(*this) - float(o)); }                   \
    NAME& operator*=(NAME o) { return *this = NAME(float(*this) * float(o)); }                   \
    NAME& operator/=(NAME o) { return *this = NAME(float(*this) / float(o)); }                   \
  };                                                                                             \
  inline NAME operator+(NAME a, NAME b) { return NAME(float(a) + float(b)); }                    \
  inline NAME operator-(NAME a, NAME b) { return NAME(float(a) - float(b)); }                    \
  inline NAME operator*(NAME a, NAME b) { return NAME(float(a) * float(b)); }                    \
  inline NAME operator/(NAME a, NAME b) { return NAME(float(a) / float(b)); }                    \
  inline NAME operator-(NAME a) { NAME r; r.__x = a.__x ^ 0x8000u; return r; }

OCTAVO_SIMT_16BIT_TYPE(__half, float_to_half, half_to_float)
OCTAVO_SIMT_16BIT_TYPE(__nv_bfloat16, float_to_bf16, bf16_to_float)
#undef OCTAVO_SIMT_16BIT_TYPE

using half = __half;
using nv_bfloat16 = __nv_bfloat16;

struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
using half2 = __half2;
using nv_bfloat162 = __nv_bfloat162;

struct __nv_fp8_e4m3 {
  uint8_t __x;
  __nv_fp8_e4m3() = default;
  explicit __nv_fp8_e4m3(float f) : __x(::octavo::simt::fp::float_to_e4m3(f)) {}
  explicit __nv_fp8_e4m3(__half h) : __nv_fp8_e4m3(float(h)) {}
  explicit __nv_fp8_e4m3(__nv_bfloat16 b) : __nv_fp8_e4m3(float(b)) {}
  explicit operator float() const { return ::octavo::simt::fp::e4m3_to_float(__x); }
};

inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }

inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float2half2_rn(float a) { return {__half(a), __half(a)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return {__nv_bfloat16(a), __nv_bfloat16(a)}; }
inline float __low2float(__half2 v) { return float(v.x); }
inline float __high2float(__half2 v) { return float(v.y); }
inline float __low2float(__nv_bfloat162 v) { return float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return float(v.y); }
inline __half2 __hadd2(__half2 a, __half2 b) { return {a.x + b.x, a.y + b.y}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {a.x * b.x, a.y * b.y}; }
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return {a.x + b.x, a.y + b.y}; }
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return {a.x * b.x, a.y * b.y}; }
inline __half __hfma(__half a, __half b, __half c) { return __half(std::fmaf(float(a), float(b), float(c))); }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __nv_bfloat16(std::fmaf(float(a), float(b), float(c)));
}
