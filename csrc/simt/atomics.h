// CUDA atomics on the CPU. Fibers of a block never preempt each other, but the operations are
// real atomics anyway so that host threads touching the same memory stay well defined.
#pragma once

#include <atomic>
#include <type_traits>

namespace octavo::simt {

template <typename T, typename F>
T atomic_update(T* p, F f) {
  std::atomic_ref<T> ref(*p);
  T old = ref.load();
  while (!ref.compare_exchange_weak(old, f(old))) {
  }
  return old;
}

}  // namespace octavo::simt

template <typename T>
  requires std::is_arithmetic_v<T>
T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename T>
  requires std::is_arithmetic_v<T>
T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <typename T>
  requires std::is_arithmetic_v<T>
T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T>
  requires std::is_arithmetic_v<T>
T atomicMax(T* p, T v) { return ::octavo::simt::atomic_update(p, [v](T o) { return o < v ? v : o; }); }
template <typename T>
  requires std::is_arithmetic_v<T>
T atomicMin(T* p, T v) { return ::octavo::simt::atomic_update(p, [v](T o) { return v < o ? v : o; }); }
template <typename T>
  requires std::is_integral_v<T>
T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); }
template <typename T>
  requires std::is_integral_v<T>
T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }
template <typename T>
  requires std::is_integral_v<T>
T atomicXor(T* p, T v) { return std::atomic_ref<T>(*p).fetch_xor(v); }
template <typename T>
  requires std::is_integral_v<T>
T atomicCAS(T* p, T compare, T v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(compare, v);
  return compare;
}
// ((old >= limit) ? 0 : old + 1), CUDA's wrapping increment
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  return ::octavo::simt::atomic_update(p, [limit](unsigned o) { return o >= limit ? 0u : o + 1; });
}
inline __half atomicAdd(__half* p, __half v) {
  return ::octavo::simt::atomic_update(p, [v](__half o) { return o + v; });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return ::octavo::simt::atomic_update(p, [v](__nv_bfloat16 o) { return o + v; });
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
