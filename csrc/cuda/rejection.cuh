// Speculative decoding's rejection sampler (octavo.spec_decode.rejection states the rule): one
// block per row walks the row's draft positions; each argmax over the vocabulary is a block
// reduction in torch.argmax's order, so the tokens equal the reference's for the same noise.
#pragma once

#include "cuda/launch.cuh"
#include "cuda/rejection_params.h"

namespace octavo::cuda {

// torch.argmax's order on (value, index): a NaN beats every number (the lower index among
// NaNs), otherwise the larger value, ties to the lower index.
__device__ __forceinline__ bool argmax_better(float a, int ia, float b, int ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an && (!bn || ia < ib);
  return a > b || (a == b && ia < ib);
}

// What a block takes the argmax of: p itself (greedy), p / noise (a draw from p), or
// max(0, p - q) / noise (a draw from the residual; q null: one-hot(d)).
enum class RejectionScore { kProbs, kSample, kResidual };

struct BlockArgmax {
  int index;
  bool positive;  // kResidual: some residual entry is > 0 or NaN (its sum is not <= 0)
};

template <RejectionScore S>
__device__ BlockArgmax block_argmax(const float* __restrict__ p, const float* __restrict__ q,
                                    int d, const float* __restrict__ noise, int n) {
  __shared__ float s_val[32];
  __shared__ int s_idx[32];
  __shared__ int s_pos[32];
  const float neg_inf = __int_as_float(0xff800000);
  float best = neg_inf;
  int best_i = 0x7fffffff;
  bool pos = false;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float v;
    if constexpr (S == RejectionScore::kProbs) {
      v = p[i];
    } else if constexpr (S == RejectionScore::kSample) {
      v = p[i] / noise[i];
    } else {
      float r = p[i] - (q != nullptr ? q[i] : (i == d ? 1.f : 0.f));
      r = r < 0.f ? 0.f : r;  // torch.clamp(min=0): NaN stays NaN
      pos |= r > 0.f || r != r;
      v = r / noise[i];
    }
    if (argmax_better(v, i, best, best_i)) {
      best = v;
      best_i = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (argmax_better(ov, oi, best, best_i)) {
      best = ov;
      best_i = oi;
    }
  }
  pos = __any_sync(0xffffffffu, pos);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_val[warp] = best;
    s_idx[warp] = best_i;
    s_pos[warp] = pos;
  }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / 32;
    best = lane < nwarps ? s_val[lane] : neg_inf;
    best_i = lane < nwarps ? s_idx[lane] : 0x7fffffff;
    pos = lane < nwarps && s_pos[lane] != 0;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (argmax_better(ov, oi, best, best_i)) {
        best = ov;
        best_i = oi;
      }
    }
    pos = __any_sync(0xffffffffu, pos);
    if (lane == 0) {
      s_idx[0] = best_i;
      s_pos[0] = pos;
    }
  }
  __syncthreads();
  const BlockArgmax r{s_idx[0], s_pos[0] != 0};
  __syncthreads();  // the arrays are reused by the next call
  return r;
}

// grid: (B), block: kRejectionThreads. Every thread takes the same branches (they read the same
// values), so the barriers inside block_argmax are reached by the whole block.
__global__ void __launch_bounds__(kRejectionThreads) rejection_sample_kernel(RejectionArgs a) {
  const int64_t b = blockIdx.x;
  const int64_t k = a.num_draft_tokens[b];
  OCTAVO_DEVICE_CHECK(k >= 0 && k <= a.k, "rejection_sample: num_draft_tokens is outside [0, K]");
  const bool greedy = a.greedy[b];
  const int n = static_cast<int>(a.vocab);
  const int64_t* drafts = a.draft_token_ids + b * a.draft_stride;
  int64_t* out = a.out + b * (a.k + 1);
  int64_t emitted = 0;
  for (int64_t i = 0; i <= k; ++i) {
    const float* p = a.target_probs + b * a.p_stride_b + i * a.p_stride_k;
    const float* noise = a.exp_noise + b * a.n_stride_b + i * a.n_stride_k;
    int64_t token;
    bool stop = true;
    if (greedy) {
      token = block_argmax<RejectionScore::kProbs>(p, nullptr, -1, nullptr, n).index;
      stop = i == k || token != drafts[i];
    } else if (i == k) {  // every draft accepted: the bonus token
      token = block_argmax<RejectionScore::kSample>(p, nullptr, -1, noise, n).index;
    } else {
      const int64_t d = drafts[i];
      OCTAVO_DEVICE_CHECK(d >= 0 && d < a.vocab,
                          "rejection_sample: a draft token id is outside the vocabulary");
      const float* q = a.draft_probs == nullptr
                           ? nullptr
                           : a.draft_probs + b * a.q_stride_b + i * a.q_stride_k;
      const float qd = q == nullptr ? 1.f : q[d];
      // u < p(d) / q(d), compared in double as the reference does
      if (qd > 0.f && a.uniform[b * a.u_stride + i] * double(qd) < double(p[d])) {
        token = d;
        stop = false;
      } else {
        const BlockArgmax r =
            block_argmax<RejectionScore::kResidual>(p, q, static_cast<int>(d), noise, n);
        // a residual that is all zero (p == q there): the reference draws from p
        token = r.positive
                    ? r.index
                    : block_argmax<RejectionScore::kSample>(p, nullptr, -1, noise, n).index;
      }
    }
    if (threadIdx.x == 0) out[emitted] = token;
    ++emitted;
    if (stop) break;
  }
  for (int64_t i = emitted + threadIdx.x; i <= a.k; i += blockDim.x) out[i] = -1;
}

}  // namespace octavo::cuda
