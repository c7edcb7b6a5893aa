// Chunked gated delta rule for prefill rows (sequences of two or more tokens): the WY /
// UT-transform form of flash-linear-attention's chunk_kda / chunk_gated_delta_rule. A block owns
// kGdrCols state columns of one (sequence, head), as the recurrent kernel does, and walks its
// sequence C tokens at a time. For a chunk of L tokens with S0 the state before it and
// b_t = g_1 + ... + g_t (per key dim, summed from the chunk start):
//   A[s, r] = beta_s sum_i k_s[i] k_r[i] e^(b_s[i] - b_r[i])  (r < s);  T = (I + A)^-1
//   U = T R,  R[s] = beta_s (v_s - (k_s e^b_s)^T S0)  (U = T beta V - W S0, W = T beta K e^b)
//   o_t = (q_t e^b_t)^T S0 + sum_{s <= t} M[t, s] U[s]
//   M[t, s] = sum_i q_t[i] k_s[i] e^(b_t[i] - b_s[i])
//   S = e^b_L S0 + sum_s (k_s e^(b_L - b_s)) U[s]^T
// Every exponent is a sum of gates forward in time (b_s - b_r with r <= s, b_t, b_L - b_s): never
// the exp of a large positive for decaying gates, however strong the decay. b is summed in double
// and kept as a float plus a bf16 remainder: after one strongly decaying token b is large, and a
// float alone would lose the small differences b_s - b_r of the tokens after it.
#pragma once

#include "cuda/gated_delta_rule_params.h"
#include "cuda/launch.cuh"

namespace octavo::cuda {

// b_s - b_r from (float, remainder) pairs: the floats' difference is exact when they are close
__device__ __forceinline__ float gdr_log_decay(float hs, float ls, float hr, __nv_bfloat16 lr) {
  return (hs - hr) + (ls - to_float(lr));
}
__device__ __forceinline__ float gdr_log_decay(float hs, __nv_bfloat16 ls, float hr,
                                               __nv_bfloat16 lr) {
  return gdr_log_decay(hs, to_float(ls), hr, lr);
}

// grid: (num_seqs, H, ceil(V / kGdrCols)), block: 32 * kGdrWarps; lane c owns column
// blockIdx.z * kGdrCols + c, warp w the state rows (and chunk rows) w, w + kGdrWarps, ...
template <typename T, int C>
__global__ void __launch_bounds__(32 * kGdrWarps) gated_delta_rule_chunk_kernel(GdrArgs a) {
  constexpr int kThreads = 32 * kGdrWarps, kCols = kGdrCols;
  OCTAVO_DYNAMIC_SHARED(float, smem);  // gdr_chunk_smem_floats(K, C) floats
  const int K = static_cast<int>(a.kdim), Kp = K | 1;  // Kp: odd row stride, no bank conflicts
  float* S = smem;                 // [K, kCols] this block's state slice
  float* qs = S + K * kCols;       // [C, Kp] q (normalized, scaled), then q e^b
  float* ks = qs + C * Kp;         // [C, Kp] k (normalized), then beta k e^b
  float* bs = ks + C * Kp;         // [C, Kp] b, then k e^(b_L - b)
  float* bl = bs + C * Kp;         // [2, K] b_L (float, remainder): the chunk's whole log decay
  float* betas = bl + 2 * K;       // [C]
  float* AT = betas + C;           // [C, C] A below the diagonal, T^T above it (T's diagonal: 1)
  float* M = AT + C * C;           // [C, C] M on and below the diagonal
  float* R = M + C * C;            // [C, kCols]
  float* U = R + C * kCols;        // [C, kCols]
  __nv_bfloat16* bs_lo = reinterpret_cast<__nv_bfloat16*>(U + C * kCols);  // [C, Kp] b - float(b)

  const int64_t b = blockIdx.x, h = blockIdx.y, V = a.vdim;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t c = int64_t(blockIdx.z) * kCols + lane;
  const bool has_col = c < V;
  const int64_t t0 = a.query_start_loc[b], t1 = a.query_start_loc[b + 1];
  OCTAVO_DEVICE_CHECK(t0 >= 0 && t0 <= t1 && t1 <= a.num_tokens,
                      "gated_delta_rule: query_start_loc must be non-decreasing within [0, T]");
  if (t1 - t0 <= 1) return;  // a decode row: gated_delta_rule_kernel's
  const int64_t slot = a.state_indices[b];
  OCTAVO_DEVICE_CHECK(slot < a.num_slots, "gated_delta_rule: a state index is past the slots");
  T* out = static_cast<T*>(a.out);
  if (slot < 0) {  // padding: zeros out (the whole block leaves: no barrier is skipped)
    for (int64_t t = t0 + warp; t < t1; t += kGdrWarps)
      if (has_col) out[(t * a.heads + h) * V + c] = from_float<T>(0.f);
    return;
  }
  float* gS = a.states + (slot * a.heads + h) * a.kdim * V;  // [K, V]
  const bool init = a.has_initial_state == nullptr || a.has_initial_state[b];
  for (int i = warp; i < K; i += kGdrWarps)
    S[i * kCols + lane] = init && has_col ? gS[i * V + c] : 0.f;

  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const bool head_gate = a.g_k == 0;  // one gate per head: pairwise decays are scalars
  for (int64_t c0 = t0; c0 < t1; c0 += C) {
    const int L = static_cast<int>(t1 - c0 < C ? t1 - c0 : C);
    // 1. q and k (FLA's l2norm x / sqrt(sum x^2 + 1e-6); q scaled), a warp per token; b, a
    //    thread per key dim
    for (int t = warp; t < L; t += kGdrWarps) {
      const T* qr = q + (c0 + t) * a.q_t + h * a.q_h;
      const T* kr = k + (c0 + t) * a.k_t + h * a.k_h;
      float qq = 0.f, kk = 0.f;
      for (int i = lane; i < K; i += 32) {
        const float qf = to_float(qr[i]), kf = to_float(kr[i]);
        qs[t * Kp + i] = qf;
        ks[t * Kp + i] = kf;
        qq += qf * qf;
        kk += kf * kf;
      }
      for (int o = 16; o > 0; o >>= 1) {
        qq += __shfl_xor_sync(0xffffffffu, qq, o);
        kk += __shfl_xor_sync(0xffffffffu, kk, o);
      }
      const float qscale = a.scale * (a.l2norm ? rsqrtf(qq + 1e-6f) : 1.f);
      const float kscale = a.l2norm ? rsqrtf(kk + 1e-6f) : 1.f;
      for (int i = lane; i < K; i += 32) {
        qs[t * Kp + i] *= qscale;
        ks[t * Kp + i] *= kscale;
      }
      if (lane == 0) betas[t] = a.beta[(c0 + t) * a.beta_t + h];
    }
    for (int i = tid; i < K; i += kThreads) {
      const float* gr = a.g + c0 * a.g_t + h * a.g_h + i * a.g_k;
      double acc = 0.0;
      for (int t = 0; t < L; ++t) {
        acc += gr[t * a.g_t];
        bs[t * Kp + i] = static_cast<float>(acc);
        bs_lo[t * Kp + i] = from_float<__nv_bfloat16>(static_cast<float>(acc - bs[t * Kp + i]));
      }
      bl[i] = static_cast<float>(acc);
      bl[K + i] = static_cast<float>(acc - bl[i]);
    }
    __syncthreads();
    // 2. A (strictly lower) and M (lower with the diagonal), an entry per thread
    for (int e = tid; e < L * L; e += kThreads) {
      const int s = e / L, r = e % L;
      if (r > s) continue;
      const float *kS = ks + s * Kp, *kR = ks + r * Kp, *qS = qs + s * Kp;
      const float *bS = bs + s * Kp, *bR = bs + r * Kp;
      float kk = 0.f, qk = 0.f;
      if (head_gate) {
        for (int i = 0; i < K; ++i) {
          kk += kS[i] * kR[i];
          qk += qS[i] * kR[i];
        }
        const float d = expf(gdr_log_decay(bS[0], bs_lo[s * Kp], bR[0], bs_lo[r * Kp]));
        kk *= d;
        qk *= d;
      } else {
        for (int i = 0; i < K; ++i) {
          const float d =
              expf(gdr_log_decay(bS[i], bs_lo[s * Kp + i], bR[i], bs_lo[r * Kp + i]));
          kk += kS[i] * kR[i] * d;
          qk += qS[i] * kR[i] * d;
        }
      }
      M[s * C + r] = qk;
      if (r < s) AT[s * C + r] = betas[s] * kk;
    }
    __syncthreads();
    // 3. T = (I + A)^-1 by forward substitution, a column j per thread, written as T^T above the
    //    diagonal (row j; A below it is only read); then the decayed q and k, b's last use
    for (int j = tid; j < L; j += kThreads)
      for (int s = j + 1; s < L; ++s) {
        float acc = AT[s * C + j];  // T[j, j] = 1
        for (int r = j + 1; r < s; ++r) acc += AT[s * C + r] * AT[j * C + r];
        AT[j * C + s] = -acc;
      }
    for (int e = tid; e < L * K; e += kThreads) {
      const int t = e / K, i = e % K;
      const float bt = bs[t * Kp + i], kt = ks[t * Kp + i];
      const float et = expf(bt + to_float(bs_lo[t * Kp + i]));
      qs[t * Kp + i] *= et;
      ks[t * Kp + i] = kt * et * betas[t];
      bs[t * Kp + i] = kt * expf(gdr_log_decay(bl[i], bl[K + i], bt, bs_lo[t * Kp + i]));
    }
    __syncthreads();
    // 4. R = beta V - (beta K e^b) S0
    for (int s = warp; s < L; s += kGdrWarps) {
      const float* kg = ks + s * Kp;
      float acc = 0.f;
      for (int i = 0; i < K; ++i) acc += kg[i] * S[i * kCols + lane];
      const float vf = has_col ? to_float(v[(c0 + s) * a.v_t + h * a.v_h + c]) : 0.f;
      R[s * kCols + lane] = betas[s] * vf - acc;
    }
    __syncthreads();
    // 5. U = T R
    for (int s = warp; s < L; s += kGdrWarps) {
      float acc = R[s * kCols + lane];
      for (int r = 0; r < s; ++r) acc += AT[r * C + s] * R[r * kCols + lane];
      U[s * kCols + lane] = acc;
    }
    __syncthreads();
    // 6. o = (Q e^b) S0 + (M, causal) U
    for (int t = warp; t < L; t += kGdrWarps) {
      const float* qg = qs + t * Kp;
      float acc = 0.f;
      for (int i = 0; i < K; ++i) acc += qg[i] * S[i * kCols + lane];
      for (int s = 0; s <= t; ++s) acc += M[t * C + s] * U[s * kCols + lane];
      if (has_col) out[((c0 + t) * a.heads + h) * V + c] = from_float<T>(acc);
    }
    __syncthreads();  // S0 is read up to here
    // 7. S = e^b_L S0 + (K e^(b_L - b))^T U
    for (int i = warp; i < K; i += kGdrWarps) {
      float acc = expf(bl[i] + bl[K + i]) * S[i * kCols + lane];
      for (int s = 0; s < L; ++s) acc += bs[s * Kp + i] * U[s * kCols + lane];
      S[i * kCols + lane] = acc;
    }
    __syncthreads();  // the next chunk rewrites qs, ks, bs and bl
  }
  if (has_col)
    for (int i = warp; i < K; i += kGdrWarps) gS[i * V + c] = S[i * kCols + lane];
}

}  // namespace octavo::cuda
