// Fused MoE over weight-only int8 experts on tensor cores: the weight-only INT8 GEMM's machinery
// (int8_woq_gemm.cuh: 16-output panels read by ldmatrix .trans, cp.async pipeline, codes turned
// into 16-bit floats in registers, fp32 activations as three bf16 planes, mma.sync m16n8k16,
// scales and offsets folded once per group) run over moe_align's 16-row tiles of one expert.
// gate_up: a warp owns a unit of two gate panels and the matching up unit (ops_native's INT8 MoE
// layout pads each to whole panels), so act(gate) * up is formed in registers and only the
// activated intermediate [P, I] is written; down: weighted rows of w2 @ inter per (token, expert)
// pair into an fp32 buffer that a last kernel sums over each token's top-k (deterministic, no
// atomics). w13 and w2 have group sizes of their own.
#pragma once

#include <cstdint>

#include "cuda/activation.cuh"
#include "cuda/int8_woq_gemm.cuh"
#include "cuda/moe_int8_params.h"
#include "cuda/moe_params.h"

namespace octavo::cuda {

// grid: (P / 16 tiles, ceil(output units / NW)), 128 threads; tiles past num_tokens_post_pad exit
// (the grid depends on shapes only). kUp: inter[tile row, 32u..] = act(gate) * up of output unit
// u; else partial[pair, 32u..] = topk weight * (w2 @ inter row). NW units per block, one per warp
// (NW = 4), two warps each splitting K (NW = 2), or one unit whose K tiles the four warps split
// (NW = 1: decode); staged slot s < NW holds output unit u0 + s, slot NW + s its up unit.
template <typename T, int NW, bool kUp, int ACT>
__global__ void __launch_bounds__(kW8Warps * 32) moe_int8_gemm_kernel(const MoeInt8Args a) {
  using M = typename W8Mma<T>::type;
  constexpr int KW = kW8Warps / NW;        // warps splitting each K tile
  constexpr int NA = kUp ? 2 : 1;          // accumulators per warp: gate and up, or down
  constexpr int NU = NA * NW;              // units staged per block
  const int tile = blockIdx.x;
  if (int64_t(tile) * kMoeBlockM >= a.num_tokens_post_pad[0]) return;
  const int e = a.expert_ids[tile];
  if (e < 0 || e >= a.num_experts) return;
  __shared__ __align__(16) W8Smem<T, 1, NU> sm;
  __shared__ const T* rows[kMoeBlockM];
  const MoeInt8Stack& st = kUp ? a.w13 : a.w2;
  const int8_t* qw = st.qw + int64_t(e) * st.panels * st.k * 16;   // expert e's [panels, k, 16]
  const float* so = st.so + int64_t(e) * st.panels * st.groups * 32;
  const int64_t n_pairs = a.num_tokens * a.top_k, I = a.inter_size, H = a.hidden_size;
  const int64_t out_panels = kUp ? st.panels / 2 : st.panels, up_base = kUp ? st.panels / 2 : 0;
  T* inter = static_cast<T*>(a.inter);  // [P, I]
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
                         : reinterpret_cast<uintptr_t>(a.inter) % 16 == 0 && I * int64_t(sizeof(T)) % 16 == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4, g = lane / 4;
  const int uw = warp % NW, kw = KW == 1 ? 0 : warp / NW;
  const int64_t u0 = int64_t(blockIdx.y) * NW, u = u0 + uw;
  // the warp's panels in the output (gate / down) numbering, -1 past the end
  const int64_t qa = 2 * u < out_panels ? 2 * u : -1, qb = 2 * u + 1 < out_panels ? 2 * u + 1 : -1;
  const bool active = qa >= 0;
  const auto panel_of = [&](int slot, int h) -> int64_t {
    const int64_t q = 2 * (u0 + slot % NW) + h;
    return q < out_panels ? q + (slot >= NW ? up_base : 0) : -1;
  };
  const auto row_of = [&](int r) -> const T* { return rows[r]; };
  const auto shift = [](int64_t q, int64_t by) -> int64_t { return q < 0 ? -1 : q + by; };
  W8Acc<1> r[NA];
  OCTAVO_UNROLL
  for (int h = 0; h < NA; ++h) r[h].zero();
  __syncthreads();  // rows[] written

  const int64_t ktiles = (st.k + kW8BK - 1) / kW8BK;
  for (int s = 0; s < kW8Stages - 1; ++s) {
    if (s < ktiles) {
      w8_load_w<T, 1, NU>(qw, st.k, sm, s, s, panel_of);
      w8_load_x<T, 1, NU>(sm, s, s, st.k, vec16, row_of);
    }
    cp_async_commit();
  }
  int64_t group = -1;
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kW8Stages - 2>();
    __syncthreads();   // stage kt landed for everyone; stage kt - 1 is free again
    const int64_t next = kt + kW8Stages - 1;
    if (next < ktiles) {
      w8_load_w<T, 1, NU>(qw, st.k, sm, int(next % kW8Stages), next, panel_of);
      w8_load_x<T, 1, NU>(sm, int(next % kW8Stages), next, st.k, vec16, row_of);
    }
    cp_async_commit();
    if (!active) continue;
    for (int s = kw; s < kW8BK / 16; s += KW) {
      const int64_t k0 = kt * kW8BK + 16 * s;
      if (k0 >= st.k) break;
      const int64_t grp = k0 / st.group_size;
      if (grp != group) {
        if (group >= 0)
          OCTAVO_UNROLL
          for (int h = 0; h < NA; ++h)
            w8_fold<M, 1>(so, st.groups, r[h], shift(qa, h * up_base), shift(qb, h * up_base), group, t);
        group = grp;
      }
      OCTAVO_UNROLL
      for (int h = 0; h < NA; ++h) w8_step<T, 1, NU>(sm, r[h], int(kt % kW8Stages), uw + h * NW, s, lane);
    }
  }
  cp_async_wait_all();
  if (active && group >= 0)
    OCTAVO_UNROLL
    for (int h = 0; h < NA; ++h)
      w8_fold<M, 1>(so, st.groups, r[h], shift(qa, h * up_base), shift(qb, h * up_base), group, t);

  if constexpr (KW > 1) {   // the warps of a unit add up their K slices
    __shared__ float red[(KW - 1) * NW * 32 * NA * 16];
    // red[kw - 1][uw][lane][h][16]: the accumulators of warps kw > 0
    const auto slice = [&](int kwi) { return red + ((((kwi - 1) * NW + uw) * 32 + lane) * NA) * 16; };
    if (kw > 0)
      OCTAVO_UNROLL
      for (int h = 0; h < NA; ++h)
        OCTAVO_UNROLL
        for (int j = 0; j < 4; ++j)
          OCTAVO_UNROLL
          for (int i = 0; i < 4; ++i) slice(kw)[h * 16 + 4 * j + i] = r[h].acc[0][j][i];
    __syncthreads();
    if (kw > 0) return;
    for (int v = 1; v < KW; ++v)
      OCTAVO_UNROLL
      for (int h = 0; h < NA; ++h)
        OCTAVO_UNROLL
        for (int j = 0; j < 4; ++j)
          OCTAVO_UNROLL
          for (int i = 0; i < 4; ++i) r[h].acc[0][j][i] += slice(v)[h * 16 + 4 * j + i];
  }
  if (!active) return;
  OCTAVO_UNROLL
  for (int j = 0; j < 4; ++j) {
    const int64_t q = j < 2 ? qa : qb;
    if (q < 0) continue;
    OCTAVO_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2);
      const int64_t col = 16 * q + w8_col(j, i, t), tr = int64_t(tile) * kMoeBlockM + row;
      if constexpr (kUp) {
        // every row of the tile (padding rows hold zeros), so the down GEMM reads no stale data
        if (col < I) inter[tr * I + col] = from_float<T>(act<ACT>(r[0].acc[0][j][i]) * r[1].acc[0][j][i]);
      } else {
        const int32_t pair = a.sorted_token_ids[tr];
        if (col < H && pair < n_pairs) a.partial[pair * H + col] = a.topk_weights[pair] * r[0].acc[0][j][i];
      }
    }
  }
}

// grid: T blocks. out[t] = sum over the token's top_k pairs, in slot order (zeros for top_k 0).
template <typename T>
__global__ void moe_int8_sum_kernel(const MoeInt8Args a) {
  const int64_t t = blockIdx.x, H = a.hidden_size;
  const float* src = a.partial + t * a.top_k * H;
  T* out = static_cast<T*>(a.out) + t * a.out_stride;
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    float s = 0.f;
    OCTAVO_UNROLL
    for (int j = 0; j < a.top_k; ++j) s += src[j * H + c];
    out[c] = from_float<T>(s);
  }
}

}  // namespace octavo::cuda
