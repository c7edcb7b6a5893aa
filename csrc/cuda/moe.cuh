// Mixture-of-experts kernels: top-k routing (a thread per token), moe_align (one block: counting
// sort of the (token, slot) pairs into tiles of one expert), and fused_moe's two grouped GEMMs
// over those tiles on tensor cores (mma.sync m16n8k16), then a per-token sum (no torch headers).
// e4m3 experts are dequantized (code x row/K-block scale) into bf16 / fp16 as their slices are
// staged in shared memory; the mma tiles are the same.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/activation.cuh"
#include "cuda/moe_params.h"
#include "cuda/ptx.cuh"
#include "cuda/vec.cuh"

namespace octavo::cuda {

constexpr int kMoeMaxGroups = kMoeMaxGroupsHost;  // n_group limit (a 64-bit group mask)

// ---- routing ----------------------------------------------------------------------------
// grid: ceil(T / blockDim.x); one thread per token. Ties go to the lower index (strict >).
template <typename T>
__global__ void topk_routing_kernel(TopkRoutingArgs a) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= a.num_tokens) return;
  const T* x = static_cast<const T*>(a.gating_output) + t * a.gating_stride;  // [E]
  const int E = a.num_experts;
  float mx = -INFINITY, sum = 0.f;
  if (a.softmax) {
    for (int e = 0; e < E; ++e) mx = fmaxf(mx, to_float(x[e]));
    for (int e = 0; e < E; ++e) sum += expf(to_float(x[e]) - mx);
  }
  auto score = [&](int e) {
    const float v = to_float(x[e]);
    return a.softmax ? expf(v - mx) / sum : 1.f / (1.f + expf(-v));
  };
  auto choice = [&](int e) { return score(e) + (a.bias != nullptr ? a.bias[e] : 0.f); };
  const int gsize = E / a.n_group;
  uint64_t keep = ~0ull;  // bit g: group g may be chosen
  if (a.n_group > 1) {
    float gs[kMoeMaxGroups];
    for (int g = 0; g < a.n_group; ++g) {
      int b1 = -1;
      float v1 = 0.f, v2 = -INFINITY;
      for (int e = g * gsize; e < (g + 1) * gsize; ++e) {
        const float c = choice(e);
        if (b1 < 0 || c > v1) { v2 = b1 < 0 ? v2 : v1; v1 = c; b1 = e; }
        else if (c > v2) v2 = c;
      }
      gs[g] = a.top2_sum ? v1 + v2 : v1;
    }
    keep = 0;
    for (int j = 0; j < a.topk_group; ++j) {
      int best = -1;
      for (int g = 0; g < a.n_group; ++g)
        if (!(keep >> g & 1) && (best < 0 || gs[g] > gs[best])) best = g;
      keep |= 1ull << best;
    }
  }
  int32_t* ids = a.topk_ids + t * a.top_k;
  float* w = a.topk_weights + t * a.top_k;
  float total = 0.f;
  for (int j = 0; j < a.top_k; ++j) {
    int best = -1;
    float bv = 0.f;
    for (int e = 0; e < E; ++e) {
      if (!(keep >> (e / gsize) & 1)) continue;
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= ids[i] == e;
      if (taken) continue;
      const float c = choice(e);
      if (best < 0 || c > bv) { best = e; bv = c; }
    }
    ids[j] = best;
    total += (w[j] = score(best));
  }
  const float scale = a.routed_scaling_factor / (a.renormalize ? total : 1.f);
  for (int j = 0; j < a.top_k; ++j) w[j] *= scale;
}

// ---- alignment ----------------------------------------------------------------------------
// grid: 1 block; dynamic smem: 2E + 1 ints. Pairs keep their order inside an expert (a stable
// scatter by warp 0), so the result is deterministic and equals ops_native.moe_align.
__global__ void moe_align_kernel(MoeAlignArgs a) {
  OCTAVO_DYNAMIC_SHARED(int32_t, smem);
  const int E = a.num_experts, B = a.block_size;
  int32_t* count = smem;           // [E]
  int32_t* cursor = smem + E;      // [E + 1]: each expert's first slot, then its next free slot
  for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < a.num_pairs; i += blockDim.x) {
    const int e = a.topk_ids[i];
    if (e >= 0 && e < E) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t pos = 0;
    for (int e = 0; e < E; ++e) {
      cursor[e] = pos;
      pos += (count[e] + B - 1) / B * B;
    }
    cursor[E] = pos;
    a.num_tokens_post_pad[0] = pos;
  }
  __syncthreads();
  const int32_t total = cursor[E];
  for (int64_t i = threadIdx.x; i < a.padded_len; i += blockDim.x)
    a.sorted_token_ids[i] = static_cast<int32_t>(a.num_pairs);
  for (int64_t b = threadIdx.x; b < a.padded_len / B; b += blockDim.x) {
    int32_t ex = -1;
    if (b * B < total) {  // the last expert whose first slot is <= b * B
      int lo = 0, hi = E - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (cursor[mid] <= b * B) lo = mid; else hi = mid - 1;
      }
      ex = lo;
    }
    a.expert_ids[b] = ex;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    for (int64_t base = 0; base < a.num_pairs; base += 32) {
      const int64_t i = base + lane;
      int e = i < a.num_pairs ? a.topk_ids[i] : -1;
      if (e >= E) e = -1;
      int rank = 0, same = 0;
      for (int j = 0; j < 32; ++j) {
        const int ej = __shfl_sync(0xffffffffu, e, j);
        same += ej == e;
        rank += (ej == e) & (j < lane);
      }
      if (e >= 0) a.sorted_token_ids[cursor[e] + rank] = static_cast<int32_t>(i);
      __syncwarp();
      if (e >= 0 && rank == same - 1) cursor[e] += same;
      __syncwarp();
    }
  }
}

// ---- grouped GEMMs ------------------------------------------------------------------------
constexpr int kMoeBlockN = 64;   // output columns per block: 4 warps x 16
constexpr int kMoeBlockK = 32;
constexpr int kMoeSmemK = kMoeBlockK + 8;  // padded rows: fewer bank conflicts, pairs stay aligned
constexpr int kMoeThreads = 128;

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) mma_m16n8k16_bf16(d, a, b, d);
  else mma_m16n8k16_f16(d, a, b, d);
}

template <typename T>
__device__ __forceinline__ uint32_t pair_at(const T* p) {  // two adjacent 16-bit values
  return *reinterpret_cast<const uint32_t*>(p);
}

// acc[m][nt] += A [16, BK] @ W[warp cols of matrix m, BK]^T for one BK slice in shared memory.
template <typename T, int M>
__device__ __forceinline__ void mma_slice(float (&acc)[M][2][4], const T (*xs)[kMoeSmemK],
                                          const T (*ws)[kMoeBlockN][kMoeSmemK], int warp, int lane) {
  const int g = lane / 4, t = lane % 4;
  OCTAVO_UNROLL
  for (int kk = 0; kk < kMoeBlockK; kk += 16) {
    const uint32_t af[4] = {pair_at(&xs[g][kk + 2 * t]), pair_at(&xs[g + 8][kk + 2 * t]),
                            pair_at(&xs[g][kk + 2 * t + 8]), pair_at(&xs[g + 8][kk + 2 * t + 8])};
    OCTAVO_UNROLL
    for (int m = 0; m < M; ++m) {
      OCTAVO_UNROLL
      for (int nt = 0; nt < 2; ++nt) {
        const T* wr = ws[m][warp * 16 + nt * 8 + g];
        const uint32_t bf[2] = {pair_at(wr + kk + 2 * t), pair_at(wr + kk + 2 * t + 8)};
        mma_16816<T>(acc[m][nt], af, bf);
      }
    }
  }
}

// Stages a [16, BK] slice of the tile's rows (row_ptr[r] or zero) and M [64, BK] weight slices
// (rows w[m] + n * ldw, n < n_valid) into shared memory, zero past k_valid. N elements per copy:
// 8 (16 bytes; rows, strides and k_valid multiples of 8, pointers 16-byte aligned) or 1.
// e4m3fn -> float by bit operations (as fp8_gemm.cuh): the magnitude bits land 2^120 too small.
static __device__ __forceinline__ float moe_e4m3_to_float(uint8_t b) {
  const uint32_t bits = (uint32_t(b & 0x7F) << 20) | (uint32_t(b & 0x80) << 24);
  float f;
  memcpy(&f, &bits, 4);
  return f * 0x1p120f;
}

// Stages M [64, BK] slices of e4m3 weight rows (w[m] + n * ldw, n < n_valid) into shared memory
// as T: code x scale[m][n * kblocks + k / block_k], zero past k_valid.
template <typename T, int M>
__device__ __forceinline__ void stage_fp8_weights(T (*ws)[kMoeBlockN][kMoeSmemK],
                                                  const uint8_t* const (&w)[M],
                                                  const float* const (&scale)[M], int64_t kblocks,
                                                  int64_t block_k, int64_t ldw, int n_valid,
                                                  int64_t k0, int64_t k_valid) {
  for (int idx = threadIdx.x; idx < M * kMoeBlockN * kMoeBlockK; idx += blockDim.x) {
    const int m = idx / (kMoeBlockN * kMoeBlockK), rem = idx % (kMoeBlockN * kMoeBlockK);
    const int n = rem / kMoeBlockK, c = rem % kMoeBlockK;
    const int64_t k = k0 + c;
    float v = 0.f;
    if (n < n_valid && k < k_valid)
      v = moe_e4m3_to_float(w[m][n * ldw + k]) * scale[m][n * kblocks + k / block_k];
    ws[m][n][c] = from_float<T>(v);
  }
}

template <typename T, int M, int N>
__device__ __forceinline__ void stage_slice(T (*xs)[kMoeSmemK], T (*ws)[kMoeBlockN][kMoeSmemK],
                                            const T* const* row_ptr, const T* const (&w)[M],
                                            int64_t ldw, int n_valid, int64_t k0, int64_t k_valid,
                                            bool stage_w = true) {
  const T zero = from_float<T>(0.f);
  constexpr int kPer = kMoeBlockK / N;  // copies per row
  for (int idx = threadIdx.x; idx < kMoeBlockM * kPer; idx += blockDim.x) {
    const int r = idx / kPer, c = idx % kPer * N;
    const T* src = row_ptr[r];
    if (src != nullptr && k0 + c + N <= k_valid) {
      copy_n<T, N>(&xs[r][c], src + k0 + c);
    } else {
      OCTAVO_UNROLL
      for (int i = 0; i < N; ++i) xs[r][c + i] = (src != nullptr && k0 + c + i < k_valid) ? src[k0 + c + i] : zero;
    }
  }
  for (int idx = threadIdx.x; stage_w && idx < M * kMoeBlockN * kPer; idx += blockDim.x) {
    const int m = idx / (kMoeBlockN * kPer), rem = idx % (kMoeBlockN * kPer);
    const int n = rem / kPer, c = rem % kPer * N;
    const T* src = w[m] + n * ldw + k0 + c;
    if (n < n_valid && k0 + c + N <= k_valid) {
      copy_n<T, N>(&ws[m][n][c], src);
    } else {
      OCTAVO_UNROLL
      for (int i = 0; i < N; ++i) ws[m][n][c + i] = (n < n_valid && k0 + c + i < k_valid) ? src[i] : zero;
    }
  }
}

// grid: (P / 16, ceil(I / 64)), 128 threads. inter[tile row, n] = act(gate) * up for one tile of
// moe_align's output; tiles past num_tokens_post_pad exit (the grid depends on shapes only).
// FP8: e4m3 w13 / w2 with a.w13_scale / a.w2_scale (W = uint8_t), else W = T.
template <typename T, int ACT, int N, typename W = T>
__global__ void moe_gate_up_kernel(FusedMoeArgs a) {
  const int tile = blockIdx.x;
  if (tile * kMoeBlockM >= a.num_tokens_post_pad[0]) return;
  const int e = a.expert_ids[tile];
  if (e < 0 || e >= a.num_experts) return;
  __shared__ __align__(16) T xs[kMoeBlockM][kMoeSmemK];
  __shared__ __align__(16) T ws[2][kMoeBlockN][kMoeSmemK];
  __shared__ const T* rows[kMoeBlockM];
  const int64_t H = a.hidden_size, I = a.inter_size, n_pairs = a.num_tokens * a.top_k;
  if (threadIdx.x < kMoeBlockM) {
    const int32_t pair = a.sorted_token_ids[tile * kMoeBlockM + threadIdx.x];
    rows[threadIdx.x] = pair < n_pairs
        ? static_cast<const T*>(a.hidden) + (pair / a.top_k) * a.hidden_stride : nullptr;
  }
  const int64_t n0 = int64_t(blockIdx.y) * kMoeBlockN;
  const W* w13 = static_cast<const W*>(a.w13) + int64_t(e) * 2 * I * H;  // [2I, H]
  const W* const w[2] = {w13 + n0 * H, w13 + (I + n0) * H};               // gate, up rows
  constexpr bool kFp8 = std::is_same_v<W, uint8_t>;
  const int64_t kb = kFp8 ? (H + a.block_k13 - 1) / a.block_k13 : 0;
  const float* s13 = kFp8 ? a.w13_scale + int64_t(e) * 2 * I * kb : nullptr;  // [2I, kb]
  const float* const s[2] = {kFp8 ? s13 + n0 * kb : nullptr, kFp8 ? s13 + (I + n0) * kb : nullptr};
  const int n_valid = static_cast<int>(I - n0 < kMoeBlockN ? I - n0 : kMoeBlockN);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[2][2][4] = {};
  __syncthreads();
  for (int64_t k0 = 0; k0 < H; k0 += kMoeBlockK) {
    if constexpr (kFp8) {
      const T* const none[2] = {nullptr, nullptr};
      stage_slice<T, 2, N>(xs, ws, rows, none, H, n_valid, k0, H, false);
      stage_fp8_weights<T, 2>(ws, w, s, kb, a.block_k13, H, n_valid, k0, H);
    } else {
      stage_slice<T, 2, N>(xs, ws, rows, w, H, n_valid, k0, H);
    }
    __syncthreads();
    mma_slice<T, 2>(acc, xs, ws, warp, lane);
    __syncthreads();
  }
  T* inter = static_cast<T*>(a.inter);  // [P, I]
  const int g = lane / 4, t = lane % 4;
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i / 2), c = warp * 16 + nt * 8 + 2 * t + i % 2;
      if (c < n_valid)
        inter[(int64_t(tile) * kMoeBlockM + r) * I + n0 + c] =
            from_float<T>(act<ACT>(acc[0][nt][i]) * acc[1][nt][i]);
    }
}

// grid: (P / 16, ceil(H / 64)), 128 threads. partial[pair, n] = weight * (w2[e] @ inter row).
template <typename T, int N, typename W = T>
__global__ void moe_down_kernel(FusedMoeArgs a) {
  const int tile = blockIdx.x;
  if (tile * kMoeBlockM >= a.num_tokens_post_pad[0]) return;
  const int e = a.expert_ids[tile];
  if (e < 0 || e >= a.num_experts) return;
  __shared__ __align__(16) T xs[kMoeBlockM][kMoeSmemK];
  __shared__ __align__(16) T ws[1][kMoeBlockN][kMoeSmemK];
  __shared__ const T* rows[kMoeBlockM];
  const int64_t H = a.hidden_size, I = a.inter_size;
  if (threadIdx.x < kMoeBlockM)
    rows[threadIdx.x] = static_cast<const T*>(a.inter) + (int64_t(tile) * kMoeBlockM + threadIdx.x) * I;
  const int64_t n0 = int64_t(blockIdx.y) * kMoeBlockN;
  const W* const w[1] = {static_cast<const W*>(a.w2) + (int64_t(e) * H + n0) * I};  // [64, I]
  constexpr bool kFp8 = std::is_same_v<W, uint8_t>;
  const int64_t kb = kFp8 ? (I + a.block_k2 - 1) / a.block_k2 : 0;
  const float* const s[1] = {kFp8 ? a.w2_scale + (int64_t(e) * H + n0) * kb : nullptr};
  const int n_valid = static_cast<int>(H - n0 < kMoeBlockN ? H - n0 : kMoeBlockN);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[1][2][4] = {};
  __syncthreads();
  for (int64_t k0 = 0; k0 < I; k0 += kMoeBlockK) {
    if constexpr (kFp8) {
      const T* const none[1] = {nullptr};
      stage_slice<T, 1, N>(xs, ws, rows, none, I, n_valid, k0, I, false);
      stage_fp8_weights<T, 1>(ws, w, s, kb, a.block_k2, I, n_valid, k0, I);
    } else {
      stage_slice<T, 1, N>(xs, ws, rows, w, I, n_valid, k0, I);
    }
    __syncthreads();
    mma_slice<T, 1>(acc, xs, ws, warp, lane);
    __syncthreads();
  }
  const int64_t n_pairs = a.num_tokens * a.top_k;
  const int g = lane / 4, t = lane % 4;
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i / 2), c = warp * 16 + nt * 8 + 2 * t + i % 2;
      const int32_t pair = a.sorted_token_ids[tile * kMoeBlockM + r];
      if (c < n_valid && pair < n_pairs)
        a.partial[pair * H + n0 + c] = a.topk_weights[pair] * acc[0][nt][i];
    }
}

// grid: T blocks. out[t] = sum over the token's top_k pairs, in slot order.
template <typename T>
__global__ void moe_sum_kernel(FusedMoeArgs a) {
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
