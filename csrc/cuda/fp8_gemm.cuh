// FP8 (E4M3) weight GEMM kernels: out[M, N] = x[M, K] @ W^T (+ bias), W = e4m3 codes [N, K] times
// fp32 scales over block_n x block_k blocks. Each warp computes a 16 x 16 output tile (two n8
// mma tiles) and walks K: on sm_89+ with e4m3 activations (W8A8) both operands go to
// mma.sync m16n8k32 .e4m3 as stored; otherwise (sm_80, or bf16/fp16 activations) the weight bytes
// are widened to bf16/fp16 in registers (exact: every e4m3 value is one) for m16n8k16. Scales
// are applied to each K step's partial product in fp32, so fragments never hold scaled values.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/fp8_gemm_params.h"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

namespace octavo::cuda {

constexpr int kFp8Warps = 4;
constexpr int kFp8BlockN = kFp8Warps * 16;  // output columns per block
constexpr int kFp8BlockM = 16;

// e4m3fn -> float by bit operations (the 7 magnitude bits land in float's exponent/mantissa
// 2^120 too small, subnormals included; 0x7f, NaN in e4m3fn, reads as 480).
__device__ __forceinline__ float e4m3_to_float_bits(uint8_t b) {
  const uint32_t bits = (uint32_t(b & 0x7F) << 20) | (uint32_t(b & 0x80) << 24);
  float f;
  memcpy(&f, &bits, 4);
  return f * 0x1p120f;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t a, b;
  memcpy(&a, &l, 2);
  memcpy(&b, &h, 2);
  return uint32_t(a) | (uint32_t(b) << 16);
}

// Activation x[row][col] as float (0 outside the matrix); e4m3 codes when `fp8x`.
template <typename T, bool FP8X>
__device__ __forceinline__ float x_at(const Fp8GemmArgs& a, int64_t row, int64_t col) {
  if (row >= a.m || col >= a.k) return 0.f;
  if constexpr (FP8X) return e4m3_to_float_bits(static_cast<const uint8_t*>(a.x)[row * a.x_stride + col]);
  else return to_float(static_cast<const T*>(a.x)[row * a.x_stride + col]);
}

__device__ __forceinline__ uint8_t byte_at(const uint8_t* p, int64_t rows, int64_t cols, int64_t stride,
                                           int64_t row, int64_t col) {
  return (row < rows && col < cols) ? p[row * stride + col] : uint8_t(0);
}

// Four consecutive e4m3 bytes along K (lowest K in the lowest byte), 0 outside the matrix.
__device__ __forceinline__ uint32_t bytes4(const uint8_t* p, int64_t rows, int64_t cols, int64_t stride,
                                           int64_t row, int64_t col) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(byte_at(p, rows, cols, stride, row, col + i)) << (8 * i);
  return v;
}

// One warp's 16 x 16 tile at (m0, n0): acc[j][i] is C[g + 8 (i / 2)][8 j + 2 t + i % 2].
template <typename T, bool FP8X>
__device__ __forceinline__ void tile_16bit(const Fp8GemmArgs& a, int64_t m0, int64_t n0, int lane,
                                           float (&acc)[2][4]) {
  const int g = lane / 4, t = lane % 4;
  for (int64_t k0 = 0; k0 < a.k; k0 += kFp8StepK16) {
    uint32_t af[4];
    for (int r = 0; r < 4; ++r) {
      const int64_t row = m0 + g + 8 * (r % 2), col = k0 + 2 * t + 8 * (r / 2);
      af[r] = pack2<T>(x_at<T, FP8X>(a, row, col), x_at<T, FP8X>(a, row, col + 1));
    }
    const int64_t kb = k0 / a.block_k;
    for (int j = 0; j < 2; ++j) {
      const int64_t n = n0 + 8 * j + g;
      uint32_t bf[2];
      for (int r = 0; r < 2; ++r) {
        const int64_t col = k0 + 2 * t + 8 * r;
        bf[r] = pack2<T>(e4m3_to_float_bits(byte_at(a.w, a.n, a.k, a.k, n, col)),
                         e4m3_to_float_bits(byte_at(a.w, a.n, a.k, a.k, n, col + 1)));
      }
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      if constexpr (std::is_same_v<T, __nv_bfloat16>) mma_m16n8k16_bf16(d, af, bf, d);
      else mma_m16n8k16_f16(d, af, bf, d);
      for (int i = 0; i < 4; ++i) {
        const int64_t c = n0 + 8 * j + 2 * t + i % 2, col_n = c < a.n ? c : a.n - 1;
        acc[j][i] += d[i] * a.scale[(col_n / a.block_n) * a.kblocks + kb];
      }
    }
  }
}

// The same with e4m3 x e4m3 operands (m16n8k32): a[r] holds A[g + 8 (r % 2)][4t + 16 (r / 2) +
// 0..3], b[r] holds B[4t + 16 r + 0..3][g], four bytes each (PTX ISA, mma .m16n8k32 .e4m3).
__device__ __forceinline__ void tile_fp8(const Fp8GemmArgs& a, int64_t m0, int64_t n0, int lane,
                                         float (&acc)[2][4]) {
  const int g = lane / 4, t = lane % 4;
  const auto* x = static_cast<const uint8_t*>(a.x);
  for (int64_t k0 = 0; k0 < a.k; k0 += kFp8StepK32) {
    uint32_t af[4];
    for (int r = 0; r < 4; ++r)
      af[r] = bytes4(x, a.m, a.k, a.x_stride, m0 + g + 8 * (r % 2), k0 + 4 * t + 16 * (r / 2));
    const int64_t kb = k0 / a.block_k;
    for (int j = 0; j < 2; ++j) {
      const int64_t n = n0 + 8 * j + g;
      const uint32_t bf[2] = {bytes4(a.w, a.n, a.k, a.k, n, k0 + 4 * t),
                              bytes4(a.w, a.n, a.k, a.k, n, k0 + 4 * t + 16)};
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      mma_m16n8k32_e4m3(d, af, bf, d);
      for (int i = 0; i < 4; ++i) {
        const int64_t c = n0 + 8 * j + 2 * t + i % 2, col_n = c < a.n ? c : a.n - 1;
        acc[j][i] += d[i] * a.scale[(col_n / a.block_n) * a.kblocks + kb];
      }
    }
  }
}

template <typename T, bool FP8X, bool FP8MMA>
__global__ void fp8_gemm_kernel(const Fp8GemmArgs a) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t m0 = int64_t(blockIdx.y) * kFp8BlockM;
  const int64_t n0 = int64_t(blockIdx.x) * kFp8BlockN + warp * 16;
  float acc[2][4] = {};
  if (n0 < a.n) {   // no barriers: a warp past N just has nothing to do
    if constexpr (FP8MMA) tile_fp8(a, m0, n0, lane, acc);
    else tile_16bit<T, FP8X>(a, m0, n0, lane, acc);
  }
  const int g = lane / 4, t = lane % 4;
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  for (int j = 0; j < 2; ++j)
    for (int i = 0; i < 4; ++i) {
      const int64_t row = m0 + g + 8 * (i / 2), col = n0 + 8 * j + 2 * t + i % 2;
      if (row >= a.m || col >= a.n) continue;
      float v = acc[j][i];
      if (a.x_scale != nullptr) v *= a.x_scale[row];
      if (bias != nullptr) v += to_float(bias[col]);
      out[row * a.out_stride + col] = from_float<T>(v);
    }
}

}  // namespace octavo::cuda
