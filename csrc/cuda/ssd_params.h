// Host-side arguments and launcher declaration of the Mamba-2 SSD kernels (cuda/ssd.cu): plain
// C++, shared by the Tensor-level wrappers and the launchers (no torch, no CUDA headers).
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

constexpr int kSsdMaxState = 256;  // N limit: 8 state values per lane of a warp

struct SsdArgs {
  void* out;                        // [T, H, P] contiguous, dtype
  const void* x;                    // [T, H, P], strides (x_t, x_h, 1)
  const void* dt;                   // [T, H], strides (dt_t, 1)
  const float* A;                   // [H]
  const void* B;                    // [T, G, N], strides (b_t, b_g, 1)
  const void* C;                    // [T, G, N], strides (c_t, c_g, 1)
  const float* D;                   // [H] or null
  const float* dt_bias;             // [H] or null
  void* states;                     // [S, H, P, N] contiguous: float, or dtype when !state_float
  const int32_t* query_start_loc;   // [num_seqs + 1], or null: sequence b is row b (decode)
  const int32_t* state_indices;     // [num_seqs], negative: padding row (output zeros)
  const bool* has_initial_state;    // [num_seqs] or null (all true)
  int64_t x_t, x_h, dt_t, b_t, b_g, c_t, c_g;
  int num_seqs, heads, head_dim, dstate, groups;
  bool dt_softplus, state_float;
  float dt_min, dt_max;
  DType dtype;
};

// Grid (num_seqs, heads, ceil(P / 4)): shapes only, no host sync (graph-capturable).
bool launch_ssd(const SsdArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
