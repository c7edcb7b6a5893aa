// Host-side arguments and launcher declaration of the CUDA gated delta rule
// (cuda/gated_delta_rule.cu): plain C++, shared by the Tensor-level wrappers and the launcher.
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

struct GdrArgs {
  void* out;                        // [T, H, V] contiguous, dtype
  const void* q;                    // [T, H, K], strides (q_t, q_h, 1), dtype
  const void* k;                    // [T, H, K], strides (k_t, k_h, 1), dtype
  const void* v;                    // [T, H, V], strides (v_t, v_h, 1), dtype
  const float* g;                   // [T, H, K], strides (g_t, g_h, g_k); g_k = 0: one per head
  const float* beta;                // [T, H], strides (beta_t, 1)
  float* states;                    // [S, H, K, V] contiguous
  const int32_t* query_start_loc;   // [num_seqs + 1], or null: sequence b is token b (decode)
  const int32_t* state_indices;     // [num_seqs], negative: padding (output zeros)
  const bool* has_initial_state;    // [num_seqs] or null (all true)
  int64_t q_t, q_h, k_t, k_h, v_t, v_h, g_t, g_h, g_k, beta_t;
  int64_t num_tokens, num_seqs, num_slots, heads, kdim, vdim;
  float scale;
  bool l2norm;
  DType dtype;
};

// State columns per block (one per lane) and warps per block (each owns every kNumWarps-th
// state row); the block keeps its [K, kGdrCols] state slice in shared memory.
constexpr int kGdrCols = 32;
constexpr int kGdrWarps = 4;
constexpr int64_t kGdrMaxKeyDim = 256;

// Chunked prefill (gated_delta_rule_chunk.cuh): tokens per chunk, kGdrChunk for key dims up to
// kGdrChunkMaxKeyDim and kGdrChunkLargeK above, so that a block's shared memory (90 KiB at
// K = 128, 96 KiB at K = 256) fits every GPU from sm_80 on, sm_86/89's 99 KiB included.
constexpr int kGdrChunk = 32;
constexpr int kGdrChunkLargeK = 16;
constexpr int64_t kGdrChunkMaxKeyDim = 128;

// Floats of shared memory of the chunked kernel for key dim K and chunk C (its layout there).
constexpr int64_t gdr_chunk_smem_floats(int64_t K, int64_t C) {
  return K * kGdrCols + 3 * C * (K | 1) + 2 * K + C + 2 * C * C + 2 * C * kGdrCols +
         (C * (K | 1) + 1) / 2;
}

// Sequences of one token (and every sequence when query_start_loc is null: decode) run the
// recurrent kernel; with query_start_loc, a second launch runs the chunked kernel, whose blocks
// take the sequences of two or more tokens (each kernel returns at once for the other's rows).
// Both grids are (num_seqs, H, ceil(V / kGdrCols)): shapes only, so both can be graph-captured.
// A bad query_start_loc or state_indices entry traps the kernel. Returns false for an
// unsupported dtype.
bool launch_gated_delta_rule(const GdrArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
