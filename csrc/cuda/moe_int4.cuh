// Fused MoE over 4-bit experts on tensor cores: the INT4 GEMM's machinery (int4_gemm.cuh: panel
// layout, cp.async pipeline, codes turned into 16-bit floats in registers, mma.sync m16n8k16,
// scales and offsets folded once per group) run over moe_align's 16-row tiles of one expert.
// gate_up: a warp owns a gate panel and the matching up panel (ops_native's INT4 MoE layout pads
// each to whole panels), so act(gate) * up is formed in registers and only the activated
// intermediate [P, I] is written; down: weighted rows of w2 @ inter per (token, expert) pair into
// an fp32 buffer that a last kernel sums over each token's top-k (deterministic, no atomics).
// Act-order experts (w13_perm) gather each hidden row in the expert's K order while the A tiles
// load (element-wise instead of cp.async), so no extra buffer or launch is needed.
#pragma once

#include <cstdint>

#include "cuda/activation.cuh"
#include "cuda/int4_gemm.cuh"
#include "cuda/moe_int4_params.h"
#include "cuda/moe_params.h"

namespace octavo::cuda {

// Copies K tile `kt` of the tile's rows (rows[r], null: zeros) and of NP weight panels into stage
// `st`: slot s < NW holds output panel p0 + s, slot NW + s its up panel (stored at + up_base).
// perm (act order, else null): K column c of the tile is element perm[c] of each row.
template <typename T, int NW, int NP>
__device__ __forceinline__ void moe_i4_load_tile(const Int4GemmArgs& w, I4Smem<T, 1, NP>& sm, int st,
                                                 int64_t kt, int64_t p0, int64_t up_base,
                                                 int64_t out_panels, const T* const* rows, bool vec16,
                                                 const int32_t* perm) {
  constexpr int kThreads = kI4Warps * 32;
  const int tid = threadIdx.x;
  for (int c = tid; c < NP * kI4Rows * 2; c += kThreads) {
    const int slot = c / (kI4Rows * 2), row = (c / 2) % kI4Rows, half = c % 2;
    const int64_t q = p0 + slot % NW, p = q + (slot >= NW ? up_base : 0), kk = kt * kI4Rows + row;
    uint8_t* dst = &sm.w[st][slot][row][i4_wchunk(row, half)];
    if (q < out_panels && kk < w.k2) cp_async_16(dst, w.qw + (p * w.k2 + kk) * 32 + 16 * half);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
  for (int c = tid; c < kMoeBlockM * (kI4BK / 8); c += kThreads) {
    const int r = c / (kI4BK / 8), ch = c % (kI4BK / 8);
    const int64_t col = kt * kI4BK + 8 * ch;
    const T* src = rows[r];
    T* dst = &sm.x[st][r][8 * ch];
    if (src != nullptr && perm == nullptr && vec16 && col + 8 <= w.k) {
      cp_async_16(dst, src + col);
    } else {
      for (int e = 0; e < 8; ++e)
        dst[e] = (src != nullptr && col + e < w.k) ? src[perm != nullptr ? perm[col + e] : col + e]
                                                   : from_float<T>(0.f);
    }
  }
}

// grid: (P / 16 tiles, ceil(out panels / NW)), 128 threads; tiles past num_tokens_post_pad exit
// (the grid depends on shapes only). kUp: inter[tile row, 32q..] = act(gate) * up of output panel
// q; else partial[pair, 32q..] = topk weight * (w2 @ inter row). NW panels per block, one per warp
// (NW = 4), or one panel whose K tiles the four warps split and then add up (NW = 1: decode).
template <typename T, int NW, bool kUp, int ACT>
__global__ void __launch_bounds__(kI4Warps * 32) moe_int4_gemm_kernel(const MoeInt4Args a) {
  constexpr int KW = kI4Warps / NW;        // warps splitting each K tile
  constexpr int NA = kUp ? 2 : 1;          // accumulators per warp: gate and up, or down
  constexpr int NP = NA * NW;              // panels staged per block
  const int tile = blockIdx.x;
  if (int64_t(tile) * kMoeBlockM >= a.num_tokens_post_pad[0]) return;
  const int e = a.expert_ids[tile];
  if (e < 0 || e >= a.num_experts) return;
  __shared__ __align__(16) I4Smem<T, 1, NP> sm;
  __shared__ const T* rows[kMoeBlockM];
  const MoeInt4Stack& st = kUp ? a.w13 : a.w2;
  Int4GemmArgs w{};  // expert e's panels, as i4_fold and the loader read them
  w.qw = st.qw + int64_t(e) * st.panels * st.k2 * 32;
  w.so = st.so + int64_t(e) * st.panels * st.groups * 64;
  w.k = st.k;
  w.k2 = st.k2;
  w.groups = st.groups;
  const int64_t n_pairs = a.num_tokens * a.top_k, I = a.inter_size, H = a.hidden_size;
  const int64_t out_panels = kUp ? st.panels / 2 : st.panels, up_base = kUp ? st.panels / 2 : 0;
  T* inter = static_cast<T*>(a.inter);  // [P, I]
  // act-order gate_up: the expert's K order, gathered from hidden as the tiles load
  const int32_t* perm = kUp && a.w13_perm != nullptr ? a.w13_perm + int64_t(e) * a.hidden_size : nullptr;
  if (threadIdx.x < kMoeBlockM) {
    const int64_t r = int64_t(tile) * kMoeBlockM + threadIdx.x;
    if constexpr (kUp) {
      const int32_t pair = a.sorted_token_ids[r];
      rows[threadIdx.x] = pair < n_pairs
          ? static_cast<const T*>(a.hidden) + (pair / a.top_k) * a.hidden_stride : nullptr;
    } else {
      rows[threadIdx.x] = inter + r * I;
    }
  }
  const bool vec16 = kUp ? a.hidden_vec16
                         : reinterpret_cast<uintptr_t>(a.inter) % 16 == 0 && I % 8 == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4, g = lane / 4;
  const int pw = warp % NW, kw = KW == 1 ? 0 : warp / NW;
  const int64_t p0 = int64_t(blockIdx.y) * NW, q = p0 + pw;
  const bool active = q < out_panels;
  I4Acc<T, 1> r[NA];
  for (int h = 0; h < NA; ++h)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 4; ++i) r[h].acc[0][j][i] = r[h].part[0][j][i] = r[h].xsum[0][j] = 0.f;
  __syncthreads();  // rows[] written

  const int64_t ktiles = (st.k + kI4BK - 1) / kI4BK;
  for (int s = 0; s < kI4Stages - 1; ++s) {
    if (s < ktiles) moe_i4_load_tile<T, NW, NP>(w, sm, s, s, p0, up_base, out_panels, rows, vec16, perm);
    cp_async_commit();
  }
  int64_t group = -1;
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kI4Stages - 2>();
    __syncthreads();   // stage kt landed for everyone; stage kt - 1 is free again
    const int64_t next = kt + kI4Stages - 1;
    if (next < ktiles)
      moe_i4_load_tile<T, NW, NP>(w, sm, int(next % kI4Stages), next, p0, up_base, out_panels, rows,
                                  vec16, perm);
    cp_async_commit();
    if (!active) continue;
    for (int s = kw; s < kI4BK / 16; s += KW) {
      const int64_t k0 = kt * kI4BK + 16 * s;
      if (k0 >= st.k) break;
      const int64_t grp = k0 / st.group_size;
      if (grp != group) {
        if (group >= 0)
          for (int h = 0; h < NA; ++h) i4_fold<T, 1>(w, r[h], q + h * up_base, group, t);
        group = grp;
      }
      for (int h = 0; h < NA; ++h) i4_step<T, 1, NP>(sm, r[h], int(kt % kI4Stages), pw + h * NW, s, lane);
    }
  }
  cp_async_wait_all();
  if (active && group >= 0)
    for (int h = 0; h < NA; ++h) i4_fold<T, 1>(w, r[h], q + h * up_base, group, t);

  if constexpr (KW > 1) {   // decode shape: the warps of a panel add up their K slices
    __shared__ float red[(KW - 1) * NW * 32 * NA * 16];
    // red[kw - 1][pw][lane][h][16]: the accumulators of warps kw > 0
    const auto slice = [&](int kwi) { return red + ((((kwi - 1) * NW + pw) * 32 + lane) * NA) * 16; };
    if (kw > 0)
      for (int h = 0; h < NA; ++h)
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 4; ++i) slice(kw)[h * 16 + 4 * j + i] = r[h].acc[0][j][i];
    __syncthreads();
    if (kw > 0) return;
    for (int v = 1; v < KW; ++v)
      for (int h = 0; h < NA; ++h)
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 4; ++i) r[h].acc[0][j][i] += slice(v)[h * 16 + 4 * j + i];
  }
  if (!active) return;
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2);
      const int64_t col = q * 32 + 8 * j + 2 * t + i % 2, tr = int64_t(tile) * kMoeBlockM + row;
      if constexpr (kUp) {
        // every row of the tile (padding rows hold zeros), so the down GEMM reads no stale data
        if (col < I) inter[tr * I + col] = from_float<T>(act<ACT>(r[0].acc[0][j][i]) * r[1].acc[0][j][i]);
      } else {
        const int32_t pair = a.sorted_token_ids[tr];
        if (col < H && pair < n_pairs) a.partial[pair * H + col] = a.topk_weights[pair] * r[0].acc[0][j][i];
      }
    }
}

// grid: T blocks. out[t] = sum over the token's top_k pairs, in slot order.
template <typename T>
__global__ void moe_int4_sum_kernel(const MoeInt4Args a) {
  const int64_t t = blockIdx.x, H = a.hidden_size;
  const float* src = a.partial + t * a.top_k * H;
  T* out = static_cast<T*>(a.out) + t * a.out_stride;
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < a.top_k; ++j) s += src[j * H + c];
    out[c] = from_float<T>(s);
  }
}

}  // namespace octavo::cuda
