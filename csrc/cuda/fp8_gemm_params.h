// Host-side arguments and launcher declaration of the FP8 (E4M3) weight GEMM (cuda/fp8_gemm.cu):
// plain C++, shared by the CUDA wrapper and the emulator's CPU wrapper.
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

struct Fp8GemmArgs {
  void* out;              // [M, N], row stride out_stride, dtype `dtype`
  const void* x;          // [M, K], row stride x_stride: `dtype`, or e4m3 codes when x_scale is set
  const float* x_scale;   // [M] per-row scales of e4m3 x (W8A8), or null
  const uint8_t* w;       // [N, K] e4m3 codes, contiguous
  const float* scale;     // [ceil(N / block_n), kblocks] fp32, contiguous
  const void* bias;       // [N] of `dtype`, or null
  int64_t out_stride, x_stride;
  int64_t m, n, k, block_n, block_k, kblocks;
  DType dtype;            // bf16 or fp16 (tensor cores)
  bool fp8_mma;           // e4m3 x e4m3 mma.sync (sm_89+, needs e4m3 x); else e4m3 -> 16-bit
};

// K step of each path: scale blocks along K must be whole steps (or one block over all of K).
constexpr int kFp8StepK16 = 16;   // bf16 / fp16 mma m16n8k16
constexpr int kFp8StepK32 = 32;   // e4m3 mma m16n8k32

bool launch_fp8_gemm(const Fp8GemmArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
