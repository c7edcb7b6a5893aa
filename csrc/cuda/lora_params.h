// Host-side arguments and launcher declarations of the CUDA LoRA kernels (cuda/lora.cu): plain
// C++, shared by the Tensor-level wrappers and the launchers (no torch, no CUDA headers).
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

struct LoraShrinkArgs {
  float* out;                // [T, R], row stride out_stride
  const void* x;             // [T, K], row stride x_stride
  const void* w;             // [L, R, K] contiguous
  const int64_t* indices;    // [T]; outside [0, L): no adapter (row of zeros)
  int64_t out_stride, x_stride;
  int64_t num_tokens, num_slots, rank, k;
  float scale;
  DType dtype;
};

struct LoraExpandArgs {
  void* out;                 // [T, N_total], row stride out_stride; columns [offset, offset+N)
  const float* x;            // [T, R], row stride x_stride
  const void* w;             // [L, N, R] contiguous
  const int64_t* indices;    // [T]; outside [0, L): row unchanged
  int64_t out_stride, x_stride;
  int64_t num_tokens, num_slots, n, rank, offset;
  DType dtype;
};

// Rank rows (one warp each) per shrink block; output columns (one thread each) per expand block.
constexpr int kLoraShrinkWarps = 4;
constexpr int kLoraExpandThreads = 128;

// Each returns false for an unsupported dtype.
bool launch_lora_shrink(const LoraShrinkArgs& a, cudaStream_t stream);
bool launch_lora_expand(const LoraExpandArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
