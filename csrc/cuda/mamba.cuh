// Mamba-1 kernels (no torch headers): the causal depthwise conv1d and the selective scan over a
// flat varlen batch with per-sequence state slots (semantics: octavo.ops_native's state-space
// section). Decode steps are the one-token-per-sequence case (seq_start null). Every grid
// depends on shapes only, so the decode ops can be captured in a CUDA graph.
#pragma once

#include "cuda/launch.cuh"
#include "cuda/mamba_params.h"
#include "cuda/vec.cuh"

namespace octavo::cuda {

constexpr int kMambaThreads = 128;

// The sequence of row t: the last s with seq_start[s] <= t; -1 for rows past the batch.
__device__ __forceinline__ int64_t mamba_seq_of_row(const MambaBatch& b, int64_t t) {
  if (!b.seq_start) return t < b.num_seqs ? t : -1;
  int64_t s = -1;
  for (int64_t lo = 0, hi = b.num_seqs - 1; lo <= hi;) {
    const int64_t mid = (lo + hi) / 2;
    if (b.seq_start[mid] <= t) { s = mid; lo = mid + 1; } else { hi = mid - 1; }
  }
  return s >= 0 && t < b.seq_start[s + 1] ? s : -1;
}

__device__ __forceinline__ bool mamba_has_init(const MambaBatch& b, int64_t s) {
  return !b.has_initial_state || b.has_initial_state[s];
}

__device__ __forceinline__ float mamba_silu(float x) { return x / (1.f + __expf(-x)); }

// torch's softplus (beta 1, threshold 20)
__device__ __forceinline__ float mamba_softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float state_load(const void* p, int64_t off, DType dt) {
  switch (dt) {
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[off]);
    case DType::kFloat16: return to_float(static_cast<const __half*>(p)[off]);
    default: return static_cast<const float*>(p)[off];
  }
}

__device__ __forceinline__ void state_store(void* p, int64_t off, float v, DType dt) {
  switch (dt) {
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[off] = from_float<__nv_bfloat16>(v); break;
    case DType::kFloat16: static_cast<__half*>(p)[off] = from_float<__half>(v); break;
    default: static_cast<float*>(p)[off] = v; break;
  }
}

// Outputs, one thread per (row, channel): grid (T, ceil(D / kMambaThreads)). A row's window
// reaches back into the sequence's conv state for its first W-1 rows (read before
// causal_conv1d_state_kernel, launched next on the stream, overwrites it).
template <typename T>
__global__ void causal_conv1d_out_kernel(const CausalConvArgs a) {
  const int64_t t = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= a.dim) return;
  const int64_t s = mamba_seq_of_row(a.batch, t);
  if (s < 0) return;
  T* out = static_cast<T*>(a.out) + t * a.out_stride + d;
  const int64_t slot = a.batch.state_indices[s];
  if (slot < 0) {
    *out = from_float<T>(0.f);
    return;
  }
  const T* x = static_cast<const T*>(a.x);
  const T* st = static_cast<const T*>(a.conv_states) + slot * a.cs_stride_slot + d * a.cs_stride_d;
  const int64_t begin = a.batch.seq_start ? a.batch.seq_start[s] : t;
  const bool init = mamba_has_init(a.batch, s);
  const int w = a.width;
  float acc = a.bias ? a.bias[d] : 0.f;
  for (int j = 0; j < w; ++j) {
    const int64_t rel = t - begin - (w - 1) + j;   // < 0: state column w - 1 + rel
    float v;
    if (rel >= 0) v = to_float(x[(begin + rel) * a.x_stride + d]);
    else v = init ? to_float(st[(w - 1 + rel) * a.cs_stride_w]) : 0.f;
    acc += a.weight[d * w + j] * v;
  }
  *out = from_float<T>(a.silu ? mamba_silu(acc) : acc);
}

// Final states, one thread per (sequence, channel): the last W-1 of [state | sequence].
// grid (B, ceil(D / kMambaThreads))
template <typename T>
__global__ void causal_conv1d_state_kernel(const CausalConvArgs a) {
  const int64_t s = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t slot = a.batch.state_indices[s];
  if (d >= a.dim || slot < 0) return;
  const int64_t begin = a.batch.seq_start ? a.batch.seq_start[s] : s;
  const int64_t len = a.batch.seq_start ? a.batch.seq_start[s + 1] - begin : 1;
  if (len == 0) return;
  const T* x = static_cast<const T*>(a.x);
  T* st = static_cast<T*>(a.conv_states) + slot * a.cs_stride_slot + d * a.cs_stride_d;
  const bool init = mamba_has_init(a.batch, s);
  const int wm1 = a.width - 1;
  T vals[kMambaMaxConvWidth];
  for (int j = 0; j < wm1; ++j) {
    const int64_t idx = len + j;   // index into [state (W-1) | sequence (len)]
    vals[j] = idx < wm1 ? (init ? st[idx * a.cs_stride_w] : from_float<T>(0.f))
                        : x[(begin + idx - wm1) * a.x_stride + d];
  }
  for (int j = 0; j < wm1; ++j) st[j * a.cs_stride_w] = vals[j];
}

// One sequence's scan, kG lanes per channel each holding kNPer state columns in registers:
// grid (B, ceil(D / (kMambaThreads / kG))). Per token the lanes' partial y = sum_n h[n] C[t, n]
// meet in a shuffle reduction. Channels past D keep computing (on channel D-1) so that every
// lane reaches the shuffles, and store nothing.
template <typename T, int kNPer, int kG>
__global__ void selective_scan_kernel(const SelectiveScanArgs a) {
  constexpr int kChannels = kMambaThreads / kG;
  const int64_t s = blockIdx.x;
  const int64_t d_raw = int64_t(blockIdx.y) * kChannels + threadIdx.x / kG;
  const bool active = d_raw < a.dim;
  const int64_t d = active ? d_raw : a.dim - 1;
  const int g = threadIdx.x % kG;
  const int64_t begin = a.batch.seq_start ? a.batch.seq_start[s] : s;
  const int64_t end = a.batch.seq_start ? a.batch.seq_start[s + 1] : s + 1;
  const int64_t slot = a.batch.state_indices[s];
  T* out = static_cast<T*>(a.out);
  if (slot < 0) {   // uniform over the block
    if (active && g == 0)
      for (int64_t t = begin; t < end; ++t) out[t * a.out_stride + d] = from_float<T>(0.f);
    return;
  }
  if (end == begin) return;
  const T* u = static_cast<const T*>(a.u);
  const T* delta = static_cast<const T*>(a.delta);
  const T* z = static_cast<const T*>(a.z);
  const T* Bm = static_cast<const T*>(a.B);
  const T* Cm = static_cast<const T*>(a.C);
  const int N = a.dstate;
  const int64_t st0 = slot * a.ss_stride_slot + d * a.ss_stride_d;
  const bool init = mamba_has_init(a.batch, s);
  float h[kNPer], A[kNPer];
  OCTAVO_UNROLL
  for (int i = 0; i < kNPer; ++i) {
    const int n = g * kNPer + i;
    A[i] = n < N ? a.A[d * N + n] : 0.f;
    h[i] = n < N && init ? state_load(a.ssm_states, st0 + n * a.ss_stride_n, a.state_dtype) : 0.f;
  }
  const float dbias = a.delta_bias ? a.delta_bias[d] : 0.f;
  const float dskip = a.D_skip ? a.D_skip[d] : 0.f;
  for (int64_t t = begin; t < end; ++t) {
    const float uv = to_float(u[t * a.u_stride + d]);
    float dt = to_float(delta[t * a.delta_stride + d]) + dbias;
    if (a.delta_softplus) dt = mamba_softplus(dt);
    const float dtu = dt * uv;
    float y = 0.f;
    OCTAVO_UNROLL
    for (int i = 0; i < kNPer; ++i) {
      const int n = g * kNPer + i;
      if (n < N) {
        h[i] = __expf(dt * A[i]) * h[i] + dtu * to_float(Bm[t * a.b_stride + n]);
        y += h[i] * to_float(Cm[t * a.c_stride + n]);
      }
    }
    OCTAVO_UNROLL
    for (int o = kG / 2; o > 0; o /= 2) y += __shfl_xor_sync(0xffffffffu, y, o, kG);
    if (active && g == 0) {
      y += uv * dskip;
      if (z) y *= mamba_silu(to_float(z[t * a.z_stride + d]));
      out[t * a.out_stride + d] = from_float<T>(y);
    }
  }
  if (!active) return;
  OCTAVO_UNROLL
  for (int i = 0; i < kNPer; ++i) {
    const int n = g * kNPer + i;
    if (n < N) state_store(a.ssm_states, st0 + n * a.ss_stride_n, h[i], a.state_dtype);
  }
}

}  // namespace octavo::cuda
