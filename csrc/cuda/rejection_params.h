// Host-side arguments and launcher declaration of the CUDA rejection sampler (cuda/rejection.cu):
// plain C++, shared by the Tensor-level wrappers and the launcher (no torch, no CUDA headers).
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace octavo::cuda {

struct RejectionArgs {
  int64_t* out;                     // [B, K+1] contiguous; -1 after a row's emitted tokens
  const int64_t* draft_token_ids;   // [B, K], row stride draft_stride
  const int64_t* num_draft_tokens;  // [B], each in [0, K] (checked by the kernel)
  const float* draft_probs;         // [B, K, V] with strides (q_stride_b, q_stride_k), or null
  const float* target_probs;        // [B, K+1, V] with strides (p_stride_b, p_stride_k)
  const double* uniform;            // [B, K], row stride u_stride
  const float* exp_noise;           // [B, K+1, V] with strides (n_stride_b, n_stride_k)
  const bool* greedy;               // [B]
  int64_t draft_stride, q_stride_b, q_stride_k, p_stride_b, p_stride_k, u_stride;
  int64_t n_stride_b, n_stride_k;
  int64_t batch, k, vocab;
};

// Threads per block (one block per row).
constexpr int kRejectionThreads = 256;

// The grid is (B): a function of shapes only, so the launch can be captured in a CUDA graph.
bool launch_rejection_sample(const RejectionArgs& a, cudaStream_t stream);

}  // namespace octavo::cuda
