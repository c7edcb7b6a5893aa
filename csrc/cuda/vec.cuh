// 16-byte vector loads and stores of the kernel element types, converted to/from fp32, for the
// memory-bound kernels (no torch headers). N = 1 is the scalar fallback of the same code.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "cuda/launch.cuh"

// g++ (the emulator) has no `#pragma unroll`
#ifdef OCTAVO_SIMT
#define OCTAVO_UNROLL
#else
#define OCTAVO_UNROLL _Pragma("unroll")
#endif

namespace octavo::cuda {

template <typename T>
struct Vec {
  static constexpr int kElems = 16 / sizeof(T);  // elements in one 16-byte load
};

// f[0:N] = p[0:N] as floats, one 16-byte load (p 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[Vec<T>::kElems]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  T vals[Vec<T>::kElems];
  memcpy(vals, &raw, sizeof(raw));
  OCTAVO_UNROLL
  for (int e = 0; e < Vec<T>::kElems; ++e) f[e] = to_float(vals[e]);
}

// p[0:N] = f[0:N] rounded to T, one 16-byte store (p 16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[Vec<T>::kElems]) {
  T vals[Vec<T>::kElems];
  OCTAVO_UNROLL
  for (int e = 0; e < Vec<T>::kElems; ++e) vals[e] = from_float<T>(f[e]);
  uint4 raw;
  memcpy(&raw, vals, sizeof(raw));
  *reinterpret_cast<uint4*>(p) = raw;
}

// N elements at p: N == 1 (scalar) or N == Vec<T>::kElems (one 16-byte access).
template <typename T, int N>
__device__ __forceinline__ void load_n(const T* p, float (&f)[N]) {
  static_assert(N == 1 || N == Vec<T>::kElems, "N must be 1 or a 16-byte vector");
  if constexpr (N == 1) f[0] = to_float(*p);
  else load_vec(p, f);
}

template <typename T, int N>
__device__ __forceinline__ void store_n(T* p, const float (&f)[N]) {
  static_assert(N == 1 || N == Vec<T>::kElems, "N must be 1 or a 16-byte vector");
  if constexpr (N == 1) *p = from_float<T>(f[0]);
  else store_vec(p, f);
}

// N elements copied unchanged.
template <typename T, int N>
__device__ __forceinline__ void copy_n(T* dst, const T* src) {
  static_assert(N == 1 || N == Vec<T>::kElems, "N must be 1 or a 16-byte vector");
  if constexpr (N == 1) *dst = *src;
  else *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

// Host side: whether every pointer is 16-byte aligned and every size / stride (in elements of
// T) a multiple of Vec<T>::kElems, so a kernel may take N = Vec<T>::kElems.
template <typename T>
inline bool can_vectorize(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> sizes) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (int64_t s : sizes)
    if (s % Vec<T>::kElems != 0) return false;
  return true;
}

}  // namespace octavo::cuda
