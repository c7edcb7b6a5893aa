// The SIMT emulator: what a .cuh kernel needs from CUDA, for g++ -DOCTAVO_SIMT on the CPU.
// Each GPU thread of a block is a fiber; barriers and warp collectives switch fibers
// (runtime.cpp). Blocks run one after another, so static __shared__ variables are plain statics
// in one linker section that is poisoned (0xFF bytes) at the start of every block.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <source_location>
#include <string>
#include <cstring>
#include <tuple>
#include <utility>

#include "simt/fp_types.h"

#ifndef OCTAVO_SIMT
#error "simt/simt.h is the CPU emulator; build with -DOCTAVO_SIMT"
#endif

// Kernels are inline so that their static __shared__ variables, like those of inline device
// functions, land in COMDAT groups: GCC refuses to mix both kinds in one named section.
#define __global__ inline __attribute__((visibility("default"), used))
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static __attribute__((section("octavo_simt_shared"), aligned(16)))

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define OCTAVO_SIMT_VEC2(T, N, A) struct alignas(A) N { T x, y; }; \
  inline N make_##N(T x, T y) { return {x, y}; }
#define OCTAVO_SIMT_VEC4(T, N, A) struct alignas(A) N { T x, y, z, w; }; \
  inline N make_##N(T x, T y, T z, T w) { return {x, y, z, w}; }
OCTAVO_SIMT_VEC2(float, float2, 8)
OCTAVO_SIMT_VEC4(float, float4, 16)
OCTAVO_SIMT_VEC2(int, int2, 8)
OCTAVO_SIMT_VEC4(int, int4, 16)
OCTAVO_SIMT_VEC2(unsigned, uint2, 8)
OCTAVO_SIMT_VEC4(unsigned, uint4, 16)
OCTAVO_SIMT_VEC2(double, double2, 16)
OCTAVO_SIMT_VEC4(unsigned char, uchar4, 4)
OCTAVO_SIMT_VEC4(signed char, char4, 4)
#undef OCTAVO_SIMT_VEC2
#undef OCTAVO_SIMT_VEC4

inline float2 __half22float2(__half2 v) { return {float(v.x), float(v.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {float(v.x), float(v.y)}; }
inline __half2 __float22half2_rn(float2 v) { return {__half(v.x), __half(v.y)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }

namespace octavo::simt {

using Site = std::source_location;

// The state of the running GPU thread (one fiber); read through threadIdx & co.
struct ThreadCtx {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  unsigned lane, warp;
  unsigned char* dynamic_smem;
};
extern thread_local ThreadCtx* tls_current;
inline ThreadCtx& current() { return *tls_current; }

// One lane's part in a warp collective; `fn` runs once, when every lane of `mask` has arrived,
// with the calls of all 32 lanes (null for lanes not in the mask).
struct WarpCall;
using WarpFn = void (*)(WarpCall* const* lanes, unsigned mask);
struct WarpCall {
  WarpFn fn;
  unsigned mask;
  const void* in;
  void* out;
  uint64_t arg;
  const char* what;
  Site site;
};

void warp_collective(WarpCall& call);  // suspends the fiber until the collective completes
void block_barrier(const char* what, Site site);
[[noreturn]] void fail(const std::string& msg, Site site);
void run_kernel(const void* kernel_ptr, dim3 grid, dim3 block, size_t smem,
                const std::function<void()>& body);

// cp.async emulation: copies are queued per thread and land at the matching wait.
void cp_async_enqueue(void* dst, const void* src, unsigned bytes);
void cp_async_commit();
void cp_async_wait(int keep_pending);

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  std::tuple<KArgs...> converted(static_cast<KArgs>(args)...);
  run_kernel(reinterpret_cast<const void*>(kernel), grid, block, smem,
             [&] { std::apply(kernel, converted); });
}

// ---- warp shuffles and votes -------------------------------------------------------------
enum class Shfl : uint64_t { kIdx, kUp, kDown, kXor };

template <typename T, Shfl KIND>
void shfl_fn(WarpCall* const* lanes, unsigned mask) {
  for (unsigned l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    const unsigned width = static_cast<unsigned>(lanes[l]->arg >> 32);
    const unsigned v = static_cast<unsigned>(lanes[l]->arg);
    const unsigned base = l & ~(width - 1);
    unsigned src = l;
    if constexpr (KIND == Shfl::kIdx) src = base + (v % width);
    if constexpr (KIND == Shfl::kUp) src = l - v >= base && v <= l ? l - v : l;
    if constexpr (KIND == Shfl::kDown) src = l + v < base + width ? l + v : l;
    if constexpr (KIND == Shfl::kXor) src = (l ^ v) < base + width ? (l ^ v) : l;
    T* out = static_cast<T*>(lanes[l]->out);
    if (src < 32 && (mask >> src & 1u)) *out = *static_cast<const T*>(lanes[src]->in);
    else std::memset(static_cast<void*>(out), 0xff, sizeof(T));  // undefined on the GPU: poison
  }
}

template <Shfl KIND, typename T>
T shfl(unsigned mask, T var, unsigned v, int width, const char* what, Site site) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail(std::string(what) + ": width must be a power of two <= 32", site);
  T out;
  WarpCall c{&shfl_fn<T, KIND>, mask, &var, &out, (uint64_t(width) << 32) | v, what, site};
  warp_collective(c);
  return out;
}

enum class Vote { kBallot, kAny, kAll };
template <Vote KIND>
void vote_fn(WarpCall* const* lanes, unsigned mask) {
  unsigned ballot = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (lanes[l] && lanes[l]->arg) ballot |= 1u << l;
  unsigned r = ballot;
  if constexpr (KIND == Vote::kAny) r = ballot != 0;
  if constexpr (KIND == Vote::kAll) r = ballot == mask;
  for (unsigned l = 0; l < 32; ++l)
    if (lanes[l]) *static_cast<unsigned*>(lanes[l]->out) = r;
}

template <Vote KIND>
unsigned vote(unsigned mask, int pred, const char* what, Site site) {
  unsigned out;
  WarpCall c{&vote_fn<KIND>, mask, nullptr, &out, uint64_t(pred != 0), what, site};
  warp_collective(c);
  return out;
}

inline void syncwarp_fn(WarpCall* const*, unsigned) {}

}  // namespace octavo::simt

#define threadIdx (::octavo::simt::current().thread_idx)
#define blockIdx (::octavo::simt::current().block_idx)
#define blockDim (::octavo::simt::current().block_dim)
#define gridDim (::octavo::simt::current().grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads(std::source_location s = std::source_location::current()) {
  ::octavo::simt::block_barrier("__syncthreads", s);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location s = std::source_location::current()) {
  ::octavo::simt::WarpCall c{&::octavo::simt::syncwarp_fn, mask, nullptr, nullptr, 0, "__syncwarp", s};
  ::octavo::simt::warp_collective(c);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src, int width = 32,
              std::source_location s = std::source_location::current()) {
  return ::octavo::simt::shfl<::octavo::simt::Shfl::kIdx>(mask, var, unsigned(src), width, "__shfl_sync", s);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 std::source_location s = std::source_location::current()) {
  return ::octavo::simt::shfl<::octavo::simt::Shfl::kUp>(mask, var, delta, width, "__shfl_up_sync", s);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   std::source_location s = std::source_location::current()) {
  return ::octavo::simt::shfl<::octavo::simt::Shfl::kDown>(mask, var, delta, width, "__shfl_down_sync", s);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  std::source_location s = std::source_location::current()) {
  return ::octavo::simt::shfl<::octavo::simt::Shfl::kXor>(mask, var, unsigned(lane_mask), width, "__shfl_xor_sync", s);
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location s = std::source_location::current()) {
  return ::octavo::simt::vote<::octavo::simt::Vote::kBallot>(mask, pred, "__ballot_sync", s);
}
inline int __any_sync(unsigned mask, int pred, std::source_location s = std::source_location::current()) {
  return int(::octavo::simt::vote<::octavo::simt::Vote::kAny>(mask, pred, "__any_sync", s));
}
inline int __all_sync(unsigned mask, int pred, std::source_location s = std::source_location::current()) {
  return int(::octavo::simt::vote<::octavo::simt::Vote::kAll>(mask, pred, "__all_sync", s));
}
unsigned __activemask();

// Dynamic shared memory: CUDA's `extern __shared__ T name[];` cannot be spelled with a static,
// so kernels write OCTAVO_DYNAMIC_SHARED(T, name) (launch.cuh defines it for nvcc).
#define OCTAVO_DYNAMIC_SHARED(T, name) \
  T* name = reinterpret_cast<T*>(::octavo::simt::current().dynamic_smem)

#include "simt/atomics.h"
#include "simt/math.h"
