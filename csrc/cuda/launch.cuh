// Kernel launch helper and dtype conversions shared by the CUDA kernels. Launchers call
// launch(...) instead of <<<>>> so the same source can also build under the SIMT emulator.
#pragma once

#include "cuda/params.h"

#ifdef OCTAVO_SIMT
#include "simt/simt.h"
#else
#include <cstdio>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Dynamic shared memory, spelled so that the emulator can provide it too (simt/simt.h).
#define OCTAVO_DYNAMIC_SHARED(T, name)                                  \
  extern __shared__ __align__(16) unsigned char octavo_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(octavo_dynamic_smem_)
#endif

namespace octavo::cuda {

// kernel<<<grid, block, smem, stream>>>(args...) on a GPU; under OCTAVO_SIMT every block runs
// on the CPU emulator before launch returns (the stream is ignored there).
template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
#ifdef OCTAVO_SIMT
  (void)stream;
  ::octavo::simt::launch(kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(static_cast<KArgs>(args)...);
#endif
}

// Stops the kernel when COND is false: printf + __trap() on the GPU (the launch fails), an
// error naming the kernel, block and thread under the emulator.
#ifdef OCTAVO_SIMT
#define OCTAVO_DEVICE_CHECK(COND, MSG) \
  do { if (!(COND)) ::octavo::simt::fail(MSG, ::octavo::simt::Site::current()); } while (0)
#else
#define OCTAVO_DEVICE_CHECK(COND, MSG) \
  do { if (!(COND)) { printf("octavo: %s\n", MSG); __trap(); } } while (0)
#endif

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Sum over a block (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x / 32;
  v = lane < nwarps ? partial[lane] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) partial[0] = v;
  __syncthreads();
  v = partial[0];
  __syncthreads();
  return v;
}

}  // namespace octavo::cuda

// Runs BODY with scalar_t bound to the device type of a DType; returns false if unknown.
#define OCTAVO_CUDA_DTYPE_SWITCH(DTYPE, ...)                              \
  switch (DTYPE) {                                                        \
    case ::octavo::cuda::DType::kFloat32: { using scalar_t = float; __VA_ARGS__(); return true; } \
    case ::octavo::cuda::DType::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__(); return true; } \
    case ::octavo::cuda::DType::kFloat16: { using scalar_t = __half; __VA_ARGS__(); return true; } \
  }                                                                       \
  return false;
