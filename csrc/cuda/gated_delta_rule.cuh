// Gated delta rule (Kimi-Linear's KDA; GDN with one gate per head) on CUDA: the recurrence for
// sequences of at most one token (decode; prefill rows take gated_delta_rule_chunk.cuh), fp32
// state slots [S, H, K, V].
// The columns of a state are independent (m = k^T S, the update and o = q^T S are per column),
// so a block owns kGdrCols columns of one (sequence, head) state and walks its tokens:
//   S[i, c] *= exp(g[i]); m[c] = sum_i k[i] S[i, c]; d[c] = (v[c] - m[c]) beta
//   S[i, c] += k[i] d[c]; o[c] = sum_i q[i] S[i, c]
#pragma once

#include "cuda/gated_delta_rule_params.h"
#include "cuda/launch.cuh"

namespace octavo::cuda {

// grid: (num_seqs, H, ceil(V / kGdrCols)), block: 32 * kGdrWarps; lane c owns column
// blockIdx.z * kGdrCols + c, warp w the state rows w, w + kGdrWarps, ...
template <typename T>
__global__ void __launch_bounds__(32 * kGdrWarps) gated_delta_rule_kernel(GdrArgs a) {
  OCTAVO_DYNAMIC_SHARED(float, smem);
  const int64_t K = a.kdim, V = a.vdim;
  float* S = smem;                  // [K, kGdrCols]: this block's state slice
  float* qs = S + K * kGdrCols;     // [K] q (normalized, scaled)
  float* ks = qs + K;               // [K] k (normalized)
  float* es = ks + K;               // [K] exp(g)
  __shared__ float part[kGdrWarps][kGdrCols];
  __shared__ float col[kGdrCols];
  // (not launch.cuh's block_sum: under the emulator its __shared__ array, in an inline function
  // that kernels.cpp also uses, would be defined twice in the test extension)
  __shared__ float norms[2][kGdrWarps];

  const int64_t b = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c = int64_t(blockIdx.z) * kGdrCols + lane;
  const bool has_col = c < V;
  int64_t t0 = b, t1 = b + 1;
  if (a.query_start_loc != nullptr) {
    t0 = a.query_start_loc[b];
    t1 = a.query_start_loc[b + 1];
  }
  OCTAVO_DEVICE_CHECK(t0 >= 0 && t0 <= t1 && t1 <= a.num_tokens,
                      "gated_delta_rule: query_start_loc must be non-decreasing within [0, T]");
  if (t1 - t0 > 1) return;  // a prefill row: gated_delta_rule_chunk_kernel's
  const int64_t slot = a.state_indices[b];
  OCTAVO_DEVICE_CHECK(slot < a.num_slots, "gated_delta_rule: a state index is past the slots");
  T* out = static_cast<T*>(a.out);
  if (slot < 0) {  // padding: zeros out (the whole block leaves: no barrier is skipped)
    for (int64_t t = t0; t < t1; ++t)
      if (warp == 0 && has_col) out[(t * a.heads + h) * V + c] = from_float<T>(0.f);
    return;
  }
  float* gS = a.states + (slot * a.heads + h) * K * V;  // [K, V]
  const bool init = a.has_initial_state == nullptr || a.has_initial_state[b];
  for (int64_t i = warp; i < K; i += kGdrWarps)
    S[i * kGdrCols + lane] = init && has_col ? gS[i * V + c] : 0.f;

  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  for (int64_t t = t0; t < t1; ++t) {
    const T* qr = q + t * a.q_t + h * a.q_h;
    const T* kr = k + t * a.k_t + h * a.k_h;
    const float* gr = a.g + t * a.g_t + h * a.g_h;
    float qq = 0.f, kk = 0.f;
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const float qf = to_float(qr[i]), kf = to_float(kr[i]);
      qs[i] = qf;
      ks[i] = kf;
      es[i] = expf(gr[i * a.g_k]);
      qq += qf * qf;
      kk += kf * kf;
    }
    for (int o = 16; o > 0; o >>= 1) {
      qq += __shfl_xor_sync(0xffffffffu, qq, o);
      kk += __shfl_xor_sync(0xffffffffu, kk, o);
    }
    if (lane == 0) {
      norms[0][warp] = qq;
      norms[1][warp] = kk;
    }
    __syncthreads();  // (also publishes qs / ks / es)
    qq = kk = 0.f;
    for (int w = 0; w < kGdrWarps; ++w) qq += norms[0][w], kk += norms[1][w];
    // FLA's l2norm: x / sqrt(sum x^2 + 1e-6)
    const float qscale = a.scale * (a.l2norm ? rsqrtf(qq + 1e-6f) : 1.f);
    const float kscale = a.l2norm ? rsqrtf(kk + 1e-6f) : 1.f;
    float m = 0.f;  // pass 1: decay, m = k^T S over this warp's rows
    for (int64_t i = warp; i < K; i += kGdrWarps) {
      float& s = S[i * kGdrCols + lane];
      s *= es[i];
      m += ks[i] * kscale * s;
    }
    part[warp][lane] = m;
    __syncthreads();
    if (warp == 0) {
      float mt = 0.f;
      for (int w = 0; w < kGdrWarps; ++w) mt += part[w][lane];
      const float vf = has_col ? to_float(v[t * a.v_t + h * a.v_h + c]) : 0.f;
      col[lane] = (vf - mt) * a.beta[t * a.beta_t + h];
    }
    __syncthreads();
    const float d = col[lane];
    float o = 0.f;  // pass 2: the rank-1 update, o = q^T S over this warp's rows
    for (int64_t i = warp; i < K; i += kGdrWarps) {
      float& s = S[i * kGdrCols + lane];
      s += ks[i] * kscale * d;
      o += qs[i] * qscale * s;
    }
    part[warp][lane] = o;
    __syncthreads();
    if (warp == 0 && has_col) {
      float ot = 0.f;
      for (int w = 0; w < kGdrWarps; ++w) ot += part[w][lane];
      out[(t * a.heads + h) * V + c] = from_float<T>(ot);
    }
    __syncthreads();  // part, qs, ks and es are rewritten by the next token
  }
  if (has_col)
    for (int64_t i = warp; i < K; i += kGdrWarps) gS[i * V + c] = S[i * kGdrCols + lane];
}

}  // namespace octavo::cuda
