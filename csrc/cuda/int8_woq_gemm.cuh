// Weight-only INT8 GEMM kernels (W8A16): out[M, N] = x[M, K] @ W^T (+ bias), W[n, k] = q[n, k] *
// scale[n, g] + offset[n, g] (g = k / group_size), as ops_native.int8_woq_gemm. The codes stay in
// the CPU kernel's 16-output panels (ops_native.pack_int8_woq_panels: element [p, k, j] is output
// 16p + j), whose 16-byte rows suit ldmatrix: 8 rows are 128 contiguous bytes (no bank
// conflicts), and read .trans as an 8 x 8 matrix of 16-bit pairs they hand lane (g, t) the codes
// of outputs 2g and 2g + 1 at k = 2t and 2t + 1, i.e. B fragment registers of two n8 tiles (the
// panel's even and odd outputs). Codes become 16-bit floats in registers, exactly: fp16 by OR-ing
// a magic exponent onto q + 128 (value q + 1152), bf16 through fp32 (2^23 + q + 128 minus 2^23 +
// 128); they feed mma.sync m16n8k16 with fp32 accumulation. fp32 activations are split into three
// bf16 planes (hi + mid + lo = x), so every product is exact there too. Scales and offsets are
// applied in fp32 once per group, as the CPU kernel does: sum_k x (q s + o) = s (sum x (q + c)) +
// (o - c s) sum x, the row sums of x from one more mma against ones.
// A block streams K in 64-wide tiles through a 3-stage cp.async pipeline; a warp covers 32 outputs
// (a unit of two panels). Two shapes: decode (M <= 16: one unit per block, the four warps split
// each K tile and add up at the end, so N/32 blocks fill the GPU) and prefill (32 rows, 16 for
// fp32, x 4 units per block). Launch shape: tensor shapes only.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/int8_woq_gemm_params.h"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"
#include "cuda/vec.cuh"

namespace octavo::cuda {

constexpr int kW8Warps = 4;
constexpr int kW8BK = 64;              // K per pipeline stage (four k16 steps)
constexpr int kW8Stages = 3;
constexpr int kW8XPitch = kW8BK + 8;   // x tile row pitch (16-bit elements): ldmatrix without bank conflicts

// The tensor-core operand type of activations T: bf16 / fp16 themselves, fp32 as three bf16 planes.
template <typename T>
struct W8Mma {
  using type = T;
  static constexpr int kPlanes = 1;
};
template <>
struct W8Mma<float> {
  using type = __nv_bfloat16;
  static constexpr int kPlanes = 3;
};

// kValue: what the 16-bit weight operand adds to each code (folded out with the offsets); kOne: 1.0.
template <typename M> struct W8Magic;
template <> struct W8Magic<__nv_bfloat16> {
  static constexpr float kValue = 0.f;
  static constexpr uint32_t kOne = 0x3F80u;
};
template <> struct W8Magic<__half> {
  static constexpr float kValue = 1152.f;   // 0x6400 | (q + 128) is 1024 + q + 128
  static constexpr uint32_t kOne = 0x3C00u;
};

template <typename M>
__device__ __forceinline__ void w8_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<M, __nv_bfloat16>) mma_m16n8k16_bf16(d, a, b, d);
  else mma_m16n8k16_f16(d, a, b, d);
}

// Four codes, bytes of v: (k, output 2g), (k, 2g + 1), (k + 1, 2g), (k + 1, 2g + 1) -> the 16-bit
// float pairs (k, k + 1) of output 2g (even) and of 2g + 1 (odd), the lower k in the lower half.
template <typename M>
__device__ __forceinline__ void w8_pairs(uint32_t v, uint32_t& even, uint32_t& odd) {
  const uint32_t u = v ^ 0x80808080u;   // q + 128 in each byte, unsigned
  if constexpr (std::is_same_v<M, __half>) {
    even = (u & 0x00FF00FFu) | 0x64006400u;
    odd = ((u >> 8) & 0x00FF00FFu) | 0x64006400u;
  } else {
    // 2^23 + (q + 128) as fp32, minus 2^23 + 128: q exactly, so its bf16 is the upper half
    uint32_t h[4];
    OCTAVO_UNROLL
    for (int i = 0; i < 4; ++i)
      h[i] = __float_as_uint(__uint_as_float(0x4B000000u | ((u >> (8 * i)) & 0xFFu)) - 8388736.f);
    even = (h[0] >> 16) | (h[2] & 0xFFFF0000u);
    odd = (h[1] >> 16) | (h[3] & 0xFFFF0000u);
  }
}

template <typename T, int MT, int NU>
struct W8Smem {
  using M = typename W8Mma<T>::type;
  M x[kW8Stages][W8Mma<T>::kPlanes][16 * MT][kW8XPitch];   // [stage][plane][row][k]
  int8_t w[kW8Stages][NU][2][kW8BK][16];                   // [stage][unit][panel][k][output]
};

// Copies K tile `kt` of NU units of codes qw [P, K, 16] into stage `st`: panel_of(slot, h) is the
// panel of unit `slot`'s half h, or -1 (zeros, as are the rows past K).
template <typename T, int MT, int NU, typename PanelOf>
__device__ __forceinline__ void w8_load_w(const int8_t* qw, int64_t k, W8Smem<T, MT, NU>& sm, int st,
                                          int64_t kt, PanelOf panel_of) {
  constexpr int kThreads = kW8Warps * 32;
  for (int c = threadIdx.x; c < NU * 2 * kW8BK; c += kThreads) {
    const int slot = c / (2 * kW8BK), h = (c / kW8BK) % 2, row = c % kW8BK;
    const int64_t p = panel_of(slot, h), kk = kt * kW8BK + row;
    int8_t* dst = &sm.w[st][slot][h][row][0];
    if (p >= 0 && kk < k) cp_async_16(dst, qw + (p * k + kk) * 16);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// Copies K tile `kt` of the rows row_of(r), r < 16 MT (K elements of T each; null: zeros) into
// stage `st`. fp32 rows are split: hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid).
template <typename T, int MT, int NU, typename RowOf>
__device__ __forceinline__ void w8_load_x(W8Smem<T, MT, NU>& sm, int st, int64_t kt, int64_t k,
                                          bool vec16, RowOf row_of) {
  using M = typename W8Mma<T>::type;
  constexpr int kThreads = kW8Warps * 32;
  for (int c = threadIdx.x; c < 16 * MT * (kW8BK / 8); c += kThreads) {
    const int r = c / (kW8BK / 8), ch = c % (kW8BK / 8);
    const int64_t col = kt * kW8BK + 8 * ch;
    const T* src = row_of(r);
    if constexpr (std::is_same_v<T, float>) {
      OCTAVO_UNROLL
      for (int e = 0; e < 8; ++e) {
        const float v = src != nullptr && col + e < k ? src[col + e] : 0.f;
        const M hi = from_float<M>(v);
        const float rest = v - to_float(hi);
        const M mid = from_float<M>(rest);
        sm.x[st][0][r][8 * ch + e] = hi;
        sm.x[st][1][r][8 * ch + e] = mid;
        sm.x[st][2][r][8 * ch + e] = from_float<M>(rest - to_float(mid));
      }
    } else {
      M* dst = &sm.x[st][0][r][8 * ch];
      if (src != nullptr && vec16 && col + 8 <= k) {
        cp_async_16(dst, src + col);
      } else {
        OCTAVO_UNROLL
        for (int e = 0; e < 8; ++e) dst[e] = src != nullptr && col + e < k ? src[col + e] : from_float<M>(0.f);
      }
    }
  }
}

// One warp's accumulators; n8 tiles 0 / 1: even / odd outputs of the unit's first panel, 2 / 3:
// of its second.
template <int MT>
struct W8Acc {
  float acc[MT][4][4];   // output tile: [m16 tile][n8 tile][C fragment]
  float part[MT][4][4];  // the current group's sum_k x (q + magic)
  float xsum[MT][4];     // the current group's sum_k x (C fragment of x @ ones)

  __device__ __forceinline__ void zero() {
    OCTAVO_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      OCTAVO_UNROLL
      for (int j = 0; j < 4; ++j) {
        xsum[mt][j] = 0.f;
        OCTAVO_UNROLL
        for (int i = 0; i < 4; ++i) acc[mt][j][i] = part[mt][j][i] = 0.f;
      }
  }
};

// Output (within its panel) of n8 tile jt's C fragment element i in lane (g, t).
__device__ __forceinline__ int w8_col(int jt, int i, int t) { return 4 * t + 2 * (i % 2) + jt % 2; }

// acc += s * part + (o - magic s) * xsum for group `grp` of the unit's panels pa and pb (-1: none)
// in scales_offsets so [P, G, 2, 16]; clears the partials.
template <typename M, int MT>
__device__ __forceinline__ void w8_fold(const float* so, int64_t groups, W8Acc<MT>& r, int64_t pa,
                                        int64_t pb, int64_t grp, int t) {
  OCTAVO_UNROLL
  for (int jt = 0; jt < 4; ++jt) {
    const int64_t p = jt < 2 ? pa : pb;
    if (p < 0) continue;
    const float* sg = so + (p * groups + grp) * 32;
    OCTAVO_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int j = w8_col(jt, e, t);
      const float s = sg[j], oc = sg[16 + j] - W8Magic<M>::kValue * s;
      OCTAVO_UNROLL
      for (int mt = 0; mt < MT; ++mt)
        OCTAVO_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int i = 2 * h + e;
          r.acc[mt][jt][i] += s * r.part[mt][jt][i] + oc * r.xsum[mt][2 * h];
        }
    }
  }
  OCTAVO_UNROLL
  for (int mt = 0; mt < MT; ++mt)
    OCTAVO_UNROLL
    for (int j = 0; j < 4; ++j) {
      r.xsum[mt][j] = 0.f;
      OCTAVO_UNROLL
      for (int i = 0; i < 4; ++i) r.part[mt][j][i] = 0.f;
    }
}

// One k16 step (step s of stage st) of unit `slot`: the B fragments of both panels from one
// ldmatrix .x4 .trans (lanes 8j..8j+7 address matrix j: rows 16s + 0..7, 16s + 8..15 of the first
// panel, then of the second), then per m16 tile and plane the A fragments and five mma (four n8
// tiles and x @ ones).
template <typename T, int MT, int NU>
__device__ __forceinline__ void w8_step(W8Smem<T, MT, NU>& sm, W8Acc<MT>& r, int st, int slot, int s,
                                        int lane) {
  using M = typename W8Mma<T>::type;
  uint32_t v[4];
  ldmatrix_x4_trans(v, &sm.w[st][slot][lane / 16][16 * s + lane % 16][0]);
  uint32_t b[4][2];
  OCTAVO_UNROLL
  for (int h = 0; h < 2; ++h) {
    w8_pairs<M>(v[2 * h], b[2 * h][0], b[2 * h + 1][0]);
    w8_pairs<M>(v[2 * h + 1], b[2 * h][1], b[2 * h + 1][1]);
  }
  constexpr uint32_t kOnes = W8Magic<M>::kOne * 0x10001u;
  const uint32_t ones[2] = {kOnes, kOnes};
  OCTAVO_UNROLL
  for (int mt = 0; mt < MT; ++mt)
    OCTAVO_UNROLL
    for (int pl = 0; pl < W8Mma<T>::kPlanes; ++pl) {
      uint32_t af[4];
      ldmatrix_x4(af, &sm.x[st][pl][16 * mt + lane % 8 + 8 * ((lane / 8) % 2)][16 * s + 8 * (lane / 16)]);
      OCTAVO_UNROLL
      for (int jt = 0; jt < 4; ++jt) w8_mma<M>(r.part[mt][jt], af, b[jt]);
      w8_mma<M>(r.xsum[mt], af, ones);
    }
}

// grid: (ceil(units / NU), ceil(M / 16 MT)), 128 threads. NU units per block, one per warp
// (NU = 4), or one unit whose K tiles the four warps split and then add up (NU = 1: decode).
template <typename T, int MT, int NU>
__global__ void __launch_bounds__(kW8Warps * 32) int8_woq_gemm_kernel(const Int8WoqGemmArgs a) {
  using M = typename W8Mma<T>::type;
  constexpr int KW = kW8Warps / NU;              // warps splitting each K tile
  __shared__ __align__(16) W8Smem<T, MT, NU> sm;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4, g = lane / 4;
  const int uw = warp % NU, kw = KW == 1 ? 0 : warp / NU;
  const int64_t m0 = int64_t(blockIdx.y) * 16 * MT, u0 = int64_t(blockIdx.x) * NU, u = u0 + uw;
  const int64_t pa = 2 * u < a.panels ? 2 * u : -1, pb = 2 * u + 1 < a.panels ? 2 * u + 1 : -1;
  const bool active = pa >= 0;
  const T* x = static_cast<const T*>(a.x);
  const auto panel_of = [&](int slot, int h) -> int64_t {
    const int64_t p = 2 * (u0 + slot) + h;
    return p < a.panels ? p : -1;
  };
  const auto row_of = [&](int r) -> const T* { return m0 + r < a.m ? x + (m0 + r) * a.x_stride : nullptr; };
  W8Acc<MT> r;
  r.zero();

  const int64_t ktiles = (a.k + kW8BK - 1) / kW8BK;
  for (int s = 0; s < kW8Stages - 1; ++s) {
    if (s < ktiles) {
      w8_load_w<T, MT, NU>(a.qw, a.k, sm, s, s, panel_of);
      w8_load_x<T, MT, NU>(sm, s, s, a.k, a.x_vec16, row_of);
    }
    cp_async_commit();
  }
  int64_t group = -1;
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kW8Stages - 2>();
    __syncthreads();   // stage kt landed for everyone; stage kt - 1 is free again
    const int64_t next = kt + kW8Stages - 1;
    if (next < ktiles) {
      w8_load_w<T, MT, NU>(a.qw, a.k, sm, int(next % kW8Stages), next, panel_of);
      w8_load_x<T, MT, NU>(sm, int(next % kW8Stages), next, a.k, a.x_vec16, row_of);
    }
    cp_async_commit();
    if (!active) continue;
    for (int s = kw; s < kW8BK / 16; s += KW) {
      const int64_t k0 = kt * kW8BK + 16 * s;
      if (k0 >= a.k) break;
      const int64_t grp = k0 / a.group_size;
      if (grp != group) {
        if (group >= 0) w8_fold<M, MT>(a.so, a.groups, r, pa, pb, group, t);
        group = grp;
      }
      w8_step<T, MT, NU>(sm, r, int(kt % kW8Stages), uw, s, lane);
    }
  }
  cp_async_wait_all();
  if (active && group >= 0) w8_fold<M, MT>(a.so, a.groups, r, pa, pb, group, t);

  if constexpr (KW > 1) {   // decode shape: the warps of a unit add up their K slices
    __shared__ float red[(KW - 1) * NU * 32 * MT * 16];
    // red[kw - 1][uw][lane][mt][16]: the accumulators of warps kw > 0
    const auto slice = [&](int kwi) { return red + ((((kwi - 1) * NU + uw) * 32 + lane) * MT) * 16; };
    if (kw > 0)
      OCTAVO_UNROLL
      for (int mt = 0; mt < MT; ++mt)
        OCTAVO_UNROLL
        for (int j = 0; j < 4; ++j)
          OCTAVO_UNROLL
          for (int i = 0; i < 4; ++i) slice(kw)[mt * 16 + 4 * j + i] = r.acc[mt][j][i];
    __syncthreads();
    if (kw > 0) return;
    for (int w = 1; w < KW; ++w)
      OCTAVO_UNROLL
      for (int mt = 0; mt < MT; ++mt)
        OCTAVO_UNROLL
        for (int j = 0; j < 4; ++j)
          OCTAVO_UNROLL
          for (int i = 0; i < 4; ++i) r.acc[mt][j][i] += slice(w)[mt * 16 + 4 * j + i];
  }
  if (!active) return;
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  OCTAVO_UNROLL
  for (int mt = 0; mt < MT; ++mt)
    OCTAVO_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int64_t p = j < 2 ? pa : pb;
      if (p < 0) continue;
      OCTAVO_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int64_t row = m0 + 16 * mt + g + 8 * (i / 2), col = 16 * p + w8_col(j, i, t);
        if (row >= a.m || col >= a.n) continue;
        float v = r.acc[mt][j][i];
        if (bias != nullptr) v += to_float(bias[col]);
        out[row * a.out_stride + col] = from_float<T>(v);
      }
    }
}

}  // namespace octavo::cuda
