// MLA attention over the paged latent cache (no torch headers): each query row attends to its
// sequence's latents c_j = [kv_c | k_pe] (L+R values shared by all heads) with keys c_j and
// values c_j[:L]; q is the absorbed [q_nope W_UK | q_pe] and out (still to be multiplied by
// W_UV) is [T, H, L]. Grid: (T, ceil(H / kMlaHeadsPerBlock)); one warp per head; the block
// stages kMlaKeyTile latent rows in shared memory and every warp reads them for its head, with
// an online softmax in fp32. The grid depends on shapes only (graph-capturable).
#pragma once

#include "cuda/launch.cuh"
#include "cuda/mla_params.h"

namespace octavo::cuda {

template <typename T>
__global__ void mla_paged_attention_kernel(MlaAttentionArgs a) {
  OCTAVO_DYNAMIC_SHARED(float, smem);
  const int D = a.latent_size, L = a.kv_lora_rank;
  float* keys = smem;                                        // [kMlaKeyTile, D]
  float* qs = keys + kMlaKeyTile * D;                        // [kMlaHeadsPerBlock, D]
  float* acc = qs + kMlaHeadsPerBlock * D;                   // [kMlaHeadsPerBlock, L]
  const int t = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y * kMlaHeadsPerBlock + warp;
  const bool active = h < a.num_heads;

  // the row's sequence: the last s with query_start_loc[s] <= t (rows past the batch: none)
  int s = -1;
  for (int lo = 0, hi = a.num_seqs - 1; lo <= hi;) {
    const int mid = (lo + hi) / 2;
    if (a.query_start_loc[mid] <= t) { s = mid; lo = mid + 1; } else { hi = mid - 1; }
  }
  const bool valid = s >= 0 && t < a.query_start_loc[s + 1];
  // keys [0, n): the row's own position and everything before it
  const int n = valid ? a.seq_lens[s] - (a.query_start_loc[s + 1] - t) + 1 : 0;
  const int32_t* table = a.block_table + (valid ? s : 0) * a.bt_stride;

  if (active) {
    const T* q = static_cast<const T*>(a.q) + t * a.q_stride_token + h * a.q_stride_head;
    for (int d = lane; d < D; d += 32) qs[warp * D + d] = to_float(q[d]) * a.scale;
    for (int d = lane; d < L; d += 32) acc[warp * L + d] = 0.f;
  }
  float m = -INFINITY, l = 0.f;  // running max and sum of exp (the same in every lane)
  const T* cache = static_cast<const T*>(a.kv_cache);
  for (int j0 = 0; j0 < n; j0 += kMlaKeyTile) {
    const int nk = n - j0 < kMlaKeyTile ? n - j0 : kMlaKeyTile;
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < nk * D; idx += blockDim.x) {
      const int k = idx / D, d = idx % D, j = j0 + k;
      const T* row = cache + int64_t(table[j / a.block_size]) * a.c_stride_block +
                     int64_t(j % a.block_size) * a.c_stride_token;
      keys[k * D + d] = to_float(row[d]);
    }
    __syncthreads();
    if (!active) continue;
    float p[kMlaKeyTile];
    float tile_max = -INFINITY;
    for (int k = 0; k < nk; ++k) {
      float dot = 0.f;
      for (int d = lane; d < D; d += 32) dot += qs[warp * D + d] * keys[k * D + d];
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      p[k] = dot;
      tile_max = fmaxf(tile_max, dot);
    }
    const float m_new = fmaxf(m, tile_max);
    const float corr = __expf(m - m_new);  // 0 on the first tile (m = -inf)
    l *= corr;
    for (int k = 0; k < nk; ++k) {
      p[k] = __expf(p[k] - m_new);
      l += p[k];
    }
    for (int d = lane; d < L; d += 32) {
      float v = acc[warp * L + d] * corr;
      for (int k = 0; k < nk; ++k) v += p[k] * keys[k * D + d];
      acc[warp * L + d] = v;
    }
    m = m_new;
  }
  if (!active || !valid) return;
  T* out = static_cast<T*>(a.out) + t * a.o_stride_token + h * a.o_stride_head;
  const float inv = 1.f / l;
  for (int d = lane; d < L; d += 32) out[d] = from_float<T>(acc[warp * L + d] * inv);
}

}  // namespace octavo::cuda
