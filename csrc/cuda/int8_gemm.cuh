// INT8 W8A8 GEMM kernels: out[m, n] = sx[m] sw[n] (sum_k xq[m, k] wq[n, k] - azp[m] colsum[n])
// (+ bias[n]), as ops_native.int8_gemm. A first kernel quantizes x per token (one block per row:
// amax or min/max, then codes) with the reference's exact fp32 roundings into a workspace; the
// GEMM streams K in 64-wide tiles through a 3-stage cp.async pipeline and runs mma.sync m16n8k32
// .s8 with exact int32 sums. The weight codes stay in the CPU kernel's 16-output panels
// (ops_native.pack_int8_panels: element [p, kk, j, i] is output 16p + j at k = 2kk + i): read as
// 16-bit pairs, one ldmatrix .x4 .trans of a panel's 16 rows gives lane (g, t) its B fragments
// (k = 4t + 16r + 0..3 of outputs g and g + 8). Each warp covers 32 outputs (two panels); decode
// shape (M <= 16): two warps per 32 outputs split each K tile; prefill: 32 rows x 128 outputs
// per block.
#pragma once

#include <cstdint>

#include "cuda/int8_gemm_params.h"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"
#include "cuda/vec.cuh"

namespace octavo::cuda {

constexpr int kI8Warps = 4;
constexpr int kI8BK = 64;                 // K per pipeline stage (two k32 steps)
constexpr int kI8Rows = kI8BK / 2;        // packed rows per stage and panel
constexpr int kI8Stages = 3;
constexpr int kI8XPitch = kI8BK + 16;     // x tile row pitch (bytes): ldmatrix without bank conflicts
constexpr int kI8QuantThreads = 256;

// ---- per-token quantization --------------------------------------------------------------

// Max (MAX) or min of v over the block; every thread gets the result.
template <bool MAX>
__device__ __forceinline__ float i8_block_reduce(float v, float* partial) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : fminf(v, w);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();   // partial[] may still be read from a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = partial[0];
  for (int w = 1; w < kI8QuantThreads / 32; ++w) v = MAX ? fmaxf(v, partial[w]) : fminf(v, partial[w]);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kI8QuantThreads) int8_quantize_kernel(const Int8GemmArgs a) {
  __shared__ float partial[kI8QuantThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
  float inv, s;
  int32_t z = 0;
  // The reference's fp32 operations one by one (no contraction into FMAs): ops_native's
  // tensor / tensor divisions are IEEE divisions, its rounding torch.round (half to even).
  if (a.in_scale != nullptr) {
    s = a.in_scale[0];
    inv = 1.f / s;
    if (a.in_zp != nullptr) z = a.in_zp[0];
  } else if (a.asymmetric) {
    float mn = 0.f, mx = 0.f;
    for (int64_t i = threadIdx.x; i < a.k; i += kI8QuantThreads) {
      const float v = to_float(x[i]);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
    mn = i8_block_reduce<false>(mn, partial);
    mx = i8_block_reduce<true>(mx, partial);
    const float range = mx - mn;
    inv = range > 0.f ? 255.f / range : 0.f;
    s = range > 0.f ? range / 255.f : 1.f;
    const float zf = rintf(__fadd_rn(-128.f, -__fmul_rn(mn, inv)));
    z = static_cast<int32_t>(fminf(127.f, fmaxf(-128.f, zf)));
  } else {
    float amax = 0.f;
    for (int64_t i = threadIdx.x; i < a.k; i += kI8QuantThreads) amax = fmaxf(amax, fabsf(to_float(x[i])));
    amax = i8_block_reduce<true>(amax, partial);
    inv = amax > 0.f ? 127.f / amax : 0.f;
    s = amax > 0.f ? amax / 127.f : 1.f;
  }
  int8_t* q = a.xq + row * a.kq;
  for (int64_t i = threadIdx.x; i < a.kq; i += kI8QuantThreads) {
    float v = 0.f;
    if (i < a.k) v = fminf(127.f, fmaxf(-128.f, rintf(__fmul_rn(to_float(x[i]), inv)) + float(z)));
    q[i] = static_cast<int8_t>(v);
  }
  if (threadIdx.x == 0) {
    a.xscale[row] = s;
    a.azp[row] = z;
  }
}

// ---- the GEMM ----------------------------------------------------------------------------

template <int MT, int NW>
struct I8Smem {
  int8_t x[kI8Stages][16 * MT][kI8XPitch];        // [stage][row][k]
  int8_t w[kI8Stages][NW][2][kI8Rows][32];        // [stage][warp unit][panel][packed row][byte]
};

// Byte offset of 16-byte chunk `half` of packed weight row `row` in shared memory: rows 4-7 of each
// 8 swap their halves, so that an ldmatrix of 8 rows x 16 bytes (32-byte pitch) is free of bank
// conflicts. Writers (cp.async) and readers (ldmatrix) both go through it.
__device__ __forceinline__ int i8_wchunk(int row, int half) { return 16 * (half ^ ((row >> 2) & 1)); }

template <int MT, int NW>
__device__ __forceinline__ void i8_load_tile(const Int8GemmArgs& a, I8Smem<MT, NW>& sm, int st,
                                             int64_t kt, int64_t m0, int64_t u0) {
  constexpr int kThreads = kI8Warps * 32;
  const int tid = threadIdx.x;
  for (int c = tid; c < NW * 2 * kI8Rows * 2; c += kThreads) {
    const int uw = c / (4 * kI8Rows), q = (c / (2 * kI8Rows)) % 2, row = (c / 2) % kI8Rows, half = c % 2;
    const int64_t p = 2 * (u0 + uw) + q, kk = kt * kI8Rows + row;
    int8_t* dst = &sm.w[st][uw][q][row][i8_wchunk(row, half)];
    if (p < a.panels && kk < a.k2) cp_async_16(dst, a.qw + (p * a.k2 + kk) * 32 + 16 * half);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
  for (int c = tid; c < 16 * MT * (kI8BK / 16); c += kThreads) {
    const int r = c / (kI8BK / 16), ch = c % (kI8BK / 16);
    const int64_t row = m0 + r, col = kt * kI8BK + 16 * ch;
    int8_t* dst = &sm.x[st][r][16 * ch];
    if (row < a.m && col < a.kq) cp_async_16(dst, a.xq + row * a.kq + col);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
}

template <int MT, int NW>
__device__ __forceinline__ void i8_step(I8Smem<MT, NW>& sm, int (&acc)[MT][4][4], int st, int uw, int s,
                                        int lane) {
  // ldmatrix .trans of the panel rows as 8 x 8 matrices of 16-bit pairs: lane (g, t) gets the
  // pairs (row 2t, output g) and (row 2t + 1, output g), i.e. k = 4t..4t+3 of output g, the
  // B fragment register as it stands. Matrices: rows 0-7 / 8-15 of the step x outputs 0-7 / 8-15.
  uint32_t b[4][2];
  for (int q = 0; q < 2; ++q) {
    uint32_t r[4];
    const int row = 16 * s + 8 * ((lane / 8) % 2) + lane % 8;
    ldmatrix_x4_trans(r, &sm.w[st][uw][q][row][i8_wchunk(row, lane / 16)]);
    b[2 * q][0] = r[0];
    b[2 * q][1] = r[1];
    b[2 * q + 1][0] = r[2];
    b[2 * q + 1][1] = r[3];
  }
  for (int mt = 0; mt < MT; ++mt) {
    uint32_t af[4];
    ldmatrix_x4(af, &sm.x[st][16 * mt + lane % 8 + 8 * ((lane / 8) % 2)][32 * s + 16 * (lane / 16)]);
    for (int jt = 0; jt < 4; ++jt) mma_m16n8k32_s8(acc[mt][jt], af, b[jt], acc[mt][jt]);
  }
}

template <typename T, int MT, int NW>
__global__ void __launch_bounds__(kI8Warps * 32) int8_gemm_kernel(const Int8GemmArgs a) {
  constexpr int KW = kI8Warps / NW;           // warps splitting each K tile
  constexpr int kSteps = kI8BK / 32;
  __shared__ __align__(16) I8Smem<MT, NW> sm;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4, g = lane / 4;
  const int uw = warp % NW, kw = KW == 1 ? 0 : warp / NW;
  const int64_t m0 = int64_t(blockIdx.y) * 16 * MT, u0 = int64_t(blockIdx.x) * NW, u = u0 + uw;
  const bool active = 2 * u < a.panels;
  int acc[MT][4][4];
  for (int mt = 0; mt < MT; ++mt)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0;

  const int64_t ktiles = (a.kq + kI8BK - 1) / kI8BK;
  for (int s = 0; s < kI8Stages - 1; ++s) {
    if (s < ktiles) i8_load_tile<MT, NW>(a, sm, s, s, m0, u0);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kI8Stages - 2>();
    __syncthreads();   // stage kt landed for everyone; stage kt - 1 is free again
    const int64_t next = kt + kI8Stages - 1;
    if (next < ktiles) i8_load_tile<MT, NW>(a, sm, int(next % kI8Stages), next, m0, u0);
    cp_async_commit();
    if (!active) continue;
    OCTAVO_UNROLL
    for (int s = kw; s < kSteps; s += KW)
      if (kt * kI8BK + 32 * s < a.kq) i8_step<MT, NW>(sm, acc, int(kt % kI8Stages), uw, s, lane);
  }
  cp_async_wait_all();

  if constexpr (KW > 1) {   // decode shape: the warps of a unit add up their K slices (exact)
    __shared__ int red[(KW - 1) * NW * 32 * MT * 16];
    // red[kw - 1][uw][lane][mt][16]: the accumulators of warps kw > 0
    const auto slice = [&](int kwi) { return red + ((((kwi - 1) * NW + uw) * 32 + lane) * MT) * 16; };
    if (kw > 0)
      for (int mt = 0; mt < MT; ++mt)
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 4; ++i) slice(kw)[mt * 16 + 4 * j + i] = acc[mt][j][i];
    __syncthreads();
    if (kw > 0) return;
    for (int w = 1; w < KW; ++w)
      for (int mt = 0; mt < MT; ++mt)
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 4; ++i) acc[mt][j][i] += slice(w)[mt * 16 + 4 * j + i];
  }
  if (!active) return;
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  OCTAVO_UNROLL
  for (int mt = 0; mt < MT; ++mt)
    OCTAVO_UNROLL
    for (int j = 0; j < 4; ++j)
      OCTAVO_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int64_t row = m0 + 16 * mt + g + 8 * (i / 2), col = u * 32 + 8 * j + 2 * t + i % 2;
        if (row >= a.m || col >= a.n) continue;
        // as the reference: the integer sum to fp32, times (sx sw), plus bias, rounded once each
        const int64_t dot = int64_t(acc[mt][j][i]) - int64_t(a.azp[row]) * a.colsum[col];
        float v = __fmul_rn(static_cast<float>(dot), __fmul_rn(a.xscale[row], a.wscale[col]));
        if (bias != nullptr) v = __fadd_rn(v, to_float(bias[col]));
        out[row * a.out_stride + col] = from_float<T>(v);
      }
}

}  // namespace octavo::cuda
