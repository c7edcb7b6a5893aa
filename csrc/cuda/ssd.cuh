// Mamba-2 SSD scan (no torch headers): one block per (sequence, head, 4 rows p of the state);
// a warp owns one state row h[p, :] in registers (N/32 values per lane) and runs the recurrence
// over the sequence's tokens, which the block stages in shared memory kSsdChunk at a time.
// Sequential in T like mamba's selective scan; the chunked SSD (tensor-core) form is not done.
#pragma once

#include "cuda/launch.cuh"
#include "cuda/ssd_params.h"
#include "cuda/vec.cuh"

namespace octavo::cuda {

constexpr int kSsdWarps = 4;   // state rows per block
constexpr int kSsdChunk = 16;  // tokens staged per pass

__device__ __forceinline__ float ssd_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float ssd_dt(const SsdArgs& a, float d, int h) {
  if (a.dt_bias != nullptr) d += a.dt_bias[h];
  if (a.dt_softplus) d = d > 20.f ? d : log1pf(expf(d));  // torch's softplus threshold
  return fminf(fmaxf(d, a.dt_min), a.dt_max);
}

// NPL: state values per lane (N <= 32 * NPL); S: the state slots' element type.
template <typename T, typename S, int NPL>
__global__ void ssd_scan_kernel(SsdArgs a) {
  constexpr int kN = 32 * NPL;
  __shared__ float sB[kSsdChunk][kN], sC[kSsdChunk][kN];
  __shared__ float sdt[kSsdChunk], sdA[kSsdChunk], sx[kSsdChunk][kSsdWarps];
  const int b = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int P = a.head_dim, N = a.dstate, H = a.heads;
  const int p = blockIdx.z * kSsdWarps + warp;
  const bool active = p < P;
  const int64_t t0 = a.query_start_loc != nullptr ? a.query_start_loc[b] : b;
  const int64_t t1 = a.query_start_loc != nullptr ? a.query_start_loc[b + 1] : b + 1;
  T* out = static_cast<T*>(a.out);
  const int slot = a.state_indices[b];
  if (slot < 0) {  // padding (uniform over the block)
    if (active)
      for (int64_t t = t0 + lane; t < t1; t += 32) out[(t * H + h) * P + p] = from_float<T>(0.f);
    return;
  }
  const T* x = static_cast<const T*>(a.x);
  const T* dt = static_cast<const T*>(a.dt);
  const T* Bp = static_cast<const T*>(a.B);
  const T* Cp = static_cast<const T*>(a.C);
  const int g = h / (H / a.groups);
  S* sp = static_cast<S*>(a.states) + ((int64_t(slot) * H + h) * P + (active ? p : 0)) * N;
  const bool init = a.has_initial_state == nullptr || a.has_initial_state[b];
  float st[NPL];
  OCTAVO_UNROLL
  for (int k = 0; k < NPL; ++k) {
    const int n = lane + 32 * k;
    st[k] = (active && init && n < N) ? to_float(sp[n]) : 0.f;
  }
  const float a_h = a.A[h], d_h = a.D != nullptr ? a.D[h] : 0.f;
  for (int64_t c0 = t0; c0 < t1; c0 += kSsdChunk) {
    const int len = static_cast<int>(t1 - c0 < kSsdChunk ? t1 - c0 : kSsdChunk);
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < len * kN; i += blockDim.x) {
      const int tt = i / kN, n = i % kN;
      const int64_t t = c0 + tt;
      sB[tt][n] = n < N ? to_float(Bp[t * a.b_t + g * a.b_g + n]) : 0.f;
      sC[tt][n] = n < N ? to_float(Cp[t * a.c_t + g * a.c_g + n]) : 0.f;
    }
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
      const float d = ssd_dt(a, to_float(dt[(c0 + i) * a.dt_t + h]), h);
      sdt[i] = d;
      sdA[i] = expf(d * a_h);
    }
    for (int i = threadIdx.x; i < len * kSsdWarps; i += blockDim.x) {
      const int tt = i / kSsdWarps, pp = blockIdx.z * kSsdWarps + i % kSsdWarps;
      sx[tt][i % kSsdWarps] = pp < P ? to_float(x[(c0 + tt) * a.x_t + h * a.x_h + pp]) : 0.f;
    }
    __syncthreads();
    if (!active) continue;
    for (int tt = 0; tt < len; ++tt) {
      const float dA = sdA[tt], xv = sx[tt][warp], dx = sdt[tt] * xv;
      float y = 0.f;
      OCTAVO_UNROLL
      for (int k = 0; k < NPL; ++k) {
        const int n = lane + 32 * k;
        st[k] = st[k] * dA + dx * sB[tt][n];
        y += st[k] * sC[tt][n];
      }
      y = ssd_warp_sum(y);
      if (lane == 0) out[((c0 + tt) * H + h) * P + p] = from_float<T>(y + d_h * xv);
    }
  }
  if (!active) return;
  OCTAVO_UNROLL
  for (int k = 0; k < NPL; ++k) {
    const int n = lane + 32 * k;
    if (n < N) sp[n] = from_float<S>(st[k]);
  }
}

}  // namespace octavo::cuda
