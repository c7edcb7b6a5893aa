// INT4 weight-only GEMM kernels in the Marlin style: out[M, N] = x[M, K] @ W^T (+ bias), W[n, k] =
// q[n, k] * scale[n, g] + offset[n, g] (g = k / group_size), q 4-bit codes in the CPU kernel's
// 32-output panels (ops_native.pack_int4_panels), which happen to be mma-friendly: byte 2j + i of
// panel row kk holds (output j, k = 2kk + i) in its low nibble and (output j + 16, same k) in its
// high one, so the 16-bit pair of row t + 4r at byte 2g is lane (g, t)'s B fragment register (k =
// 2t + 8r + {0,1}) of four n8 tiles at once, and one ldmatrix .trans with the rows addressed in a
// permuted order hands every lane its pairs (i4_step). A block streams K in 64-wide tiles through a
// 3-stage cp.async pipeline (x and weight tiles in shared memory, x fragments by ldmatrix too);
// codes are turned into 16-bit floats in registers by OR-ing a magic exponent (q + 1024 in fp16, q
// + 128 in bf16: exact, a few integer ops per pair, no conversions) and fed to mma.sync m16n8k16.
// The products x (q + c) are exact in fp32; the magic c and the group's scale and offset are
// applied in fp32 once per group: sum_k x (q s + o) = s (sum x (q + c)) + (o - c s) sum x, with the
// row sums of x from one more mma against ones. Two shapes: decode (M <= 16: one panel per block,
// the four warps split each K tile and add up at the end, so N/32 blocks fill the GPU) and prefill
// (32 rows x 4 panels per block). Launch shape: tensor shapes only.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/int4_gemm_params.h"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

namespace octavo::cuda {

constexpr int kI4Warps = 4;
constexpr int kI4BK = 64;                  // K per pipeline stage
constexpr int kI4Rows = kI4BK / 2;         // packed rows per stage and panel
constexpr int kI4Stages = 3;
constexpr int kI4XPitch = kI4BK + 8;       // x tile row pitch (elements): ldmatrix without bank conflicts

// The 16-bit float of value kValue + q is (kBits | q) for q in 0..15; kOne is 1.0.
template <typename T> struct I4Magic;
template <> struct I4Magic<__nv_bfloat16> {
  static constexpr uint32_t kBits = 0x4300u;   // 128
  static constexpr float kValue = 128.f;
  static constexpr uint32_t kOne = 0x3F80u;    // 1.0
};
template <> struct I4Magic<__half> {
  static constexpr uint32_t kBits = 0x6400u;   // 1024
  static constexpr float kValue = 1024.f;
  static constexpr uint32_t kOne = 0x3C00u;
};

template <typename T>
__device__ __forceinline__ void i4_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) mma_m16n8k16_bf16(d, a, b, d);
  else mma_m16n8k16_f16(d, a, b, d);
}

// Codes of two consecutive k (bytes 0 and 1 of v, nibble `nib`) as a pair of 16-bit floats
// magic + q, the lower k in the lower half.
template <typename T>
__device__ __forceinline__ uint32_t i4_pair(uint32_t v, int nib) {
  const uint32_t s = v >> (4 * nib);
  return (s & 0xFu) | ((s & 0xF00u) << 8) | (I4Magic<T>::kBits * 0x10001u);
}

template <typename T, int MT, int NW>
struct I4Smem {
  static constexpr int kBM = 16 * MT;
  T x[kI4Stages][kBM][kI4XPitch];                 // [stage][row][k]
  uint8_t w[kI4Stages][NW][kI4Rows][32];          // [stage][panel][packed row][byte]
};

// Copies K tile `kt` of x rows m0.. and of panels p0..p0+NW-1 into stage `st` (zeros outside).
// Byte offset of 16-byte chunk `half` of packed weight row `row` in shared memory: rows 4-7 of each
// 8 swap their halves, so that an ldmatrix of 8 rows x 16 bytes (32-byte pitch) is free of bank
// conflicts. Writers (cp.async) and readers (ldmatrix) both go through it.
__device__ __forceinline__ int i4_wchunk(int row, int half) { return 16 * (half ^ ((row >> 2) & 1)); }

template <typename T, int MT, int NW>
__device__ __forceinline__ void i4_load_tile(const Int4GemmArgs& a, I4Smem<T, MT, NW>& sm, int st,
                                             int64_t kt, int64_t m0, int64_t p0) {
  constexpr int kBM = 16 * MT, kThreads = kI4Warps * 32;
  const int tid = threadIdx.x;
  for (int c = tid; c < NW * kI4Rows * 2; c += kThreads) {
    const int pw = c / (kI4Rows * 2), row = (c / 2) % kI4Rows, half = c % 2;
    const int64_t p = p0 + pw, kk = kt * kI4Rows + row;
    uint8_t* dst = &sm.w[st][pw][row][i4_wchunk(row, half)];
    if (p < a.panels && kk < a.k2) cp_async_16(dst, a.qw + (p * a.k2 + kk) * 32 + 16 * half);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
  const T* x = static_cast<const T*>(a.x);
  for (int c = tid; c < kBM * (kI4BK / 8); c += kThreads) {
    const int r = c / (kI4BK / 8), ch = c % (kI4BK / 8);
    const int64_t row = m0 + r, col = kt * kI4BK + 8 * ch;
    T* dst = &sm.x[st][r][8 * ch];
    if (row < a.m && a.x_vec16 && col + 8 <= a.k) {
      cp_async_16(dst, x + row * a.x_stride + col);
    } else {
      for (int e = 0; e < 8; ++e)
        dst[e] = (row < a.m && col + e < a.k) ? x[row * a.x_stride + col + e] : from_float<T>(0.f);
    }
  }
}

template <typename T, int MT>
struct I4Acc {
  float acc[MT][4][4];   // output tile: [m16 tile][n8 tile][C fragment]
  float part[MT][4][4];  // the current group's sum_k x (q + magic)
  float xsum[MT][4];     // the current group's sum_k x (C fragment of x @ ones)
};

// acc += s * part + (o - magic s) * xsum for the group `grp` of panel p; clears the partials.
template <typename T, int MT>
__device__ __forceinline__ void i4_fold(const Int4GemmArgs& a, I4Acc<T, MT>& r, int64_t p, int64_t grp,
                                        int t) {
  const float* so = a.so + (p * a.groups + grp) * 64;
  for (int jt = 0; jt < 4; ++jt)
    for (int e = 0; e < 2; ++e) {
      const int c = 8 * jt + 2 * t + e;
      const float s = so[c], o = so[32 + c], oc = o - I4Magic<T>::kValue * s;
      for (int mt = 0; mt < MT; ++mt)
        for (int h = 0; h < 2; ++h) {
          const int i = 2 * h + e;
          r.acc[mt][jt][i] += s * r.part[mt][jt][i] + oc * r.xsum[mt][2 * h];
          r.part[mt][jt][i] = 0.f;
        }
    }
  for (int mt = 0; mt < MT; ++mt)
    for (int i = 0; i < 4; ++i) r.xsum[mt][i] = 0.f;
}

// One k16 step of stage `st` (step s of the tile) for this warp's panel `pw`.
template <typename T, int MT, int NW>
__device__ __forceinline__ void i4_step(I4Smem<T, MT, NW>& sm, I4Acc<T, MT>& r, int st, int pw, int s,
                                        int lane) {
  // ldmatrix .x2 .trans of the step's 8 packed rows as 8 x 8 matrices of 16-bit pairs, the rows
  // addressed in the order 0, 4, 1, 5, 2, 6, 3, 7: lane (g, t) gets the pairs of rows t (low half:
  // k = 2t, 2t + 1) and t + 4 (high half: k = 2t + 8, 2t + 9) at output g (matrix 0) and g + 8
  // (matrix 1), i.e. b[0] and b[1] of four n8 tiles (low nibbles: outputs 0-15, high: 16-31).
  const int i = lane % 8;
  uint32_t v[2];
  const int row = 8 * s + i / 2 + 4 * (i % 2);
  ldmatrix_x2_trans(v, &sm.w[st][pw][row][i4_wchunk(row, (lane / 8) % 2)]);
  uint32_t b[4][2];
  for (int h = 0; h < 2; ++h)
    for (int nib = 0; nib < 2; ++nib) {
      b[h + 2 * nib][0] = i4_pair<T>(v[h], nib);
      b[h + 2 * nib][1] = i4_pair<T>(v[h] >> 16, nib);
    }
  constexpr uint32_t kOnes = I4Magic<T>::kOne * 0x10001u;
  const uint32_t ones[2] = {kOnes, kOnes};
  for (int mt = 0; mt < MT; ++mt) {
    uint32_t af[4];
    ldmatrix_x4(af, &sm.x[st][16 * mt + lane % 8 + 8 * ((lane / 8) % 2)][16 * s + 8 * (lane / 16)]);
    for (int jt = 0; jt < 4; ++jt) i4_mma<T>(r.part[mt][jt], af, b[jt]);
    i4_mma<T>(r.xsum[mt], af, ones);
  }
}

template <typename T, int MT, int NW>
__global__ void __launch_bounds__(kI4Warps * 32) int4_gemm_kernel(const Int4GemmArgs a) {
  constexpr int KW = kI4Warps / NW;              // warps splitting each K tile
  __shared__ __align__(16) I4Smem<T, MT, NW> sm;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4, g = lane / 4;
  const int pw = warp % NW, kw = KW == 1 ? 0 : warp / NW;
  const int64_t m0 = int64_t(blockIdx.y) * 16 * MT, p0 = int64_t(blockIdx.x) * NW, p = p0 + pw;
  const bool active = p < a.panels;
  I4Acc<T, MT> r;
  for (int mt = 0; mt < MT; ++mt)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 4; ++i) r.acc[mt][j][i] = r.part[mt][j][i] = r.xsum[mt][j] = 0.f;

  const int64_t ktiles = (a.k + kI4BK - 1) / kI4BK;
  for (int s = 0; s < kI4Stages - 1; ++s) {
    if (s < ktiles) i4_load_tile<T, MT, NW>(a, sm, s, s, m0, p0);
    cp_async_commit();
  }
  int64_t group = -1;
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kI4Stages - 2>();
    __syncthreads();   // stage kt landed for everyone; stage kt - 1 is free again
    const int64_t next = kt + kI4Stages - 1;
    if (next < ktiles) i4_load_tile<T, MT, NW>(a, sm, int(next % kI4Stages), next, m0, p0);
    cp_async_commit();
    if (!active) continue;
    for (int s = kw; s < kI4BK / 16; s += KW) {
      const int64_t k0 = kt * kI4BK + 16 * s;
      if (k0 >= a.k) break;
      const int64_t grp = k0 / a.group_size;
      if (grp != group) {
        if (group >= 0) i4_fold<T, MT>(a, r, p, group, t);
        group = grp;
      }
      i4_step<T, MT, NW>(sm, r, int(kt % kI4Stages), pw, s, lane);
    }
  }
  cp_async_wait_all();
  if (active && group >= 0) i4_fold<T, MT>(a, r, p, group, t);

  if constexpr (KW > 1) {   // decode shape: the warps of a panel add up their K slices
    __shared__ float red[(KW - 1) * NW * 32 * MT * 16];
    // red[kw - 1][pw][lane][mt][16]: the accumulators of warps kw > 0
    const auto slice = [&](int kwi) { return red + ((((kwi - 1) * NW + pw) * 32 + lane) * MT) * 16; };
    if (kw > 0)
      for (int mt = 0; mt < MT; ++mt)
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 4; ++i) slice(kw)[mt * 16 + 4 * j + i] = r.acc[mt][j][i];
    __syncthreads();
    if (kw > 0) return;
    for (int w = 1; w < KW; ++w)
      for (int mt = 0; mt < MT; ++mt)
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 4; ++i) r.acc[mt][j][i] += slice(w)[mt * 16 + 4 * j + i];
  }
  if (!active) return;
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  for (int mt = 0; mt < MT; ++mt)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 4; ++i) {
        const int64_t row = m0 + 16 * mt + g + 8 * (i / 2), col = p * 32 + 8 * j + 2 * t + i % 2;
        if (row >= a.m || col >= a.n) continue;
        float v = r.acc[mt][j][i];
        if (bias != nullptr) v += to_float(bias[col]);
        out[row * a.out_stride + col] = from_float<T>(v);
      }
}

}  // namespace octavo::cuda
