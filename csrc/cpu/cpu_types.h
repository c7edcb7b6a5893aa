// Vector helpers for the CPU kernels. Every kernel .cpp is compiled once per CPU capability
// (DEFAULT, AVX2, AVX512; see CMakeLists.txt), so everything here lives in the namespace
// octavo::cpu::CPU_CAPABILITY and must not be used from other translation units.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu/params.h"

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must be defined by the build (DEFAULT, AVX2 or AVX512)"
#endif

namespace octavo::cpu::CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;
constexpr int kVec = fVec::size();  // floats per vector: 16 (AVX512) or 8

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }  // round-to-nearest-even for bf16/fp16

// Loads kVec elements as floats.
inline fVec load_f(const float* p) { return fVec::loadu(p); }
inline fVec load_f(const c10::BFloat16* p) {
  fVec v;
  at::vec::load_to_float(p, v);
  return v;
}
inline fVec load_f(const c10::Half* p) {
  fVec v;
  at::vec::load_to_float(p, v);
  return v;
}

// Loads n < kVec elements (zero padded), for tails.
template <typename T>
inline fVec load_f_partial(const T* p, int n) {
  alignas(64) float tmp[kVec] = {};
  for (int i = 0; i < n; ++i) tmp[i] = to_f(p[i]);
  return fVec::loadu(tmp);
}

// Stores kVec floats, converting to T (round to nearest even). at::vec's conversions take two
// vectors; given one twice (v, v) they convert it twice and pack: the fused residual-add + RMSNorm
// of 2040 x 768 bf16 values ran 2.5x slower for it on the AMX Xeon.
inline void store_f(float* p, const fVec& v) { v.store(p); }
inline void store_f(c10::BFloat16* p, const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  // One vector's round-to-nearest-even (NaN -> 0xffff), as at::vec's two-vector conversion
  // computes it, without converting v twice and packing
  const __m512i u = _mm512_castps_si512(v);
  __m512i t = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  t = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(t, _mm512_set1_epi32(0x7fff)), u), 16);
  t = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0xffff), t);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(t));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i u = _mm256_castps_si256(v);
  __m256i t = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(t, _mm256_set1_epi32(0x7fff)), u), 16);
  t = _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), t, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)));
#else
  at::vec::convert_from_float<c10::BFloat16>(v, v).store(p, kVec);
#endif
}
inline void store_f(c10::Half* p, const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  at::vec::convert_from_float<c10::Half>(v, v).store(p, kVec);
#endif
}

template <typename T>
inline void store_f_partial(T* p, const fVec& v, int n) {
  alignas(64) float tmp[kVec];
  v.store(tmp);
  for (int i = 0; i < n; ++i) p[i] = from_f<T>(tmp[i]);
}

#if defined(CPU_CAPABILITY_AVX512)
// (_mm512_reduce_*_ps trip GCC 12's -Wuninitialized inside its own headers.)
inline __m256 half_sum(const fVec& v) {
  const __m512 x = v;
  return _mm256_add_ps(_mm512_castps512_ps256(x),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256 half_sum(const fVec& v) { return v; }
#endif

// Horizontal sum of one vector.
inline float hsum(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  __m256 v8 = half_sum(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  alignas(64) float tmp[kVec];
  v.store(tmp);
  float s = 0.f;
  for (int i = 0; i < kVec; ++i) s += tmp[i];
  return s;
#endif
}

}  // namespace octavo::cpu::CPU_CAPABILITY

// Runs BODY with scalar_t bound to the C++ type of a DType.
#define OCTAVO_CPU_DTYPE_SWITCH(DTYPE, ...)                         \
  switch (DTYPE) {                                                  \
    case ::octavo::cpu::DType::kFloat32: {                          \
      using scalar_t = float;                                       \
      __VA_ARGS__();                                                \
      break;                                                        \
    }                                                               \
    case ::octavo::cpu::DType::kBFloat16: {                         \
      using scalar_t = c10::BFloat16;                               \
      __VA_ARGS__();                                                \
      break;                                                        \
    }                                                               \
    case ::octavo::cpu::DType::kFloat16: {                          \
      using scalar_t = c10::Half;                                   \
      __VA_ARGS__();                                                \
      break;                                                        \
    }                                                               \
  }

namespace octavo::cpu::CPU_CAPABILITY {

// Horizontal max of one vector.
inline float hmax(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  __m256 m8 = _mm256_max_ps(_mm512_castps512_ps256(x),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
#else
  alignas(64) float tmp[kVec];
  v.store(tmp);
  float m = tmp[0];
  for (int i = 1; i < kVec; ++i) m = tmp[i] > m ? tmp[i] : m;
  return m;
#endif
}

// out[i] = hsum(v[i]) for 4 vectors, sharing the shuffles.
inline void hsum4(const fVec* v, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 a0 = v[0], a1 = v[1], a2 = v[2], a3 = v[3];
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  // each 128-bit lane now holds partial sums [a0, a1, a2, a3]
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  for (int i = 0; i < 4; ++i) out[i] = hsum(v[i]);
#endif
}

}  // namespace octavo::cpu::CPU_CAPABILITY
