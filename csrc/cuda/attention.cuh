// Paged attention kernels on CUDA cores (no torch headers): a split-context decode kernel with a
// log-sum-exp merge, and a tiled online-softmax prefill kernel for varlen query batches. T is the
// query/output type, C the cache element type: T, or Fp8Kv for an fp8 cache, whose loads decode
// each byte to its fp32 value (cuda/fp8_kv.cuh) before the same fp32 arithmetic. An fp8 cache's
// K scale is in a.scale (the host folds it in); the softmax normalizer l becomes l / v_scale.
#pragma once

#include <type_traits>

#include "cuda/fp8_kv.cuh"
#include "cuda/vec.cuh"

namespace octavo::cuda::attn {

constexpr int kThreads = 128;         // both kernels: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 512;           // keys a decode block scores at once (its shared logits)
constexpr int kMaxPartitions = 64;    // splits of a context at most (bounds the workspace)
constexpr int kMaxPartitionChunks = 16;  // a split scores at most this many chunks unless capped
constexpr int kDecodeBlocks = 2048;   // split until the decode grid has about this many blocks
constexpr unsigned kFull = 0xffffffffu;

// Head sizes are bucketed: a kernel for HD_MAX serves any multiple of 8 up to it.
constexpr int head_bucket(int head_size) {
  return head_size <= 32 ? 32 : head_size <= 64 ? 64 : head_size <= 128 ? 128 : 256;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Max over a block of kThreads threads.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[kWarps];
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float m = partial[0];
  OCTAVO_UNROLL
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, partial[w]);
  __syncthreads();
  return m;
}

// Where query row `pos` of a context of seq_len keys looks: keys [lo, hi).
struct KeyRange {
  int lo, hi;
};
__device__ __forceinline__ KeyRange key_range(int pos, int sliding_window) {
  return {sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0, pos + 1};
}

// scale * q.k, then soft-cap, then ALiBi (the order of ops_native.paged_attention).
__device__ __forceinline__ float logit(float dot, const PagedAttentionArgs& a, float slope,
                                       int key, int pos) {
  float x = dot * a.scale;
  if (a.soft_cap > 0.f) x = a.soft_cap * tanhf(x / a.soft_cap);
  return x + slope * static_cast<float>(key - pos);
}

// Sequence s's query rows [q0, q0 + q_len) and seq_len, checked against the shapes.
struct SeqRows {
  int q0, q_len, seq_len;
};
__device__ __forceinline__ SeqRows seq_rows(const PagedAttentionArgs& a, int s) {
  const SeqRows r{a.query_start_loc[s], a.query_start_loc[s + 1] - a.query_start_loc[s],
                  a.seq_lens[s]};
  OCTAVO_DEVICE_CHECK(r.q0 >= 0 && r.q_len >= 0 && r.q0 + r.q_len <= a.num_tokens,
                      "paged_attention: query_start_loc must be non-decreasing within [0, T]");
  OCTAVO_DEVICE_CHECK(r.q_len <= r.seq_len &&
                          int64_t(r.seq_len) <= int64_t(a.max_blocks) * a.block_size,
                      "paged_attention: need q_len <= seq_len <= max_blocks * block_size");
  return r;
}

// Element offset of token `key` of sequence s in a cache with the given strides.
__device__ __forceinline__ int64_t cache_offset(const PagedAttentionArgs& a, const int32_t* bt_row,
                                                int key, int64_t stride_block, int64_t stride_token) {
  const int block = bt_row[key / a.block_size];
  OCTAVO_DEVICE_CHECK(block >= 0 && block < a.num_cache_blocks,
                      "paged_attention: block_table entry out of range");
  return block * stride_block + int64_t(key % a.block_size) * stride_token;
}

// ---- decode ---------------------------------------------------------------------------------
// One block per (query head, sequence, partition of the keys). A group of kGroup lanes reads
// one key row with vector loads of the cache type C (16 bytes; 8 for fp8), kSlots per lane: a
// warp scores 32 / kGroup keys at once, one block 512 keys (kChunk) per round.
template <typename C, int HD_MAX>
struct DecodeShape {
  static constexpr int kVec = Vec<C>::kElems;
  static constexpr int kGroup = HD_MAX / kVec < 32 ? HD_MAX / kVec : 32;  // lanes per key
  static constexpr int kSlots = HD_MAX / kVec / kGroup;                     // vectors per lane
  static constexpr int kGroups = kThreads / kGroup;                         // keys per step
};

// Partial results of one (row, head, partition): out [hd] unnormalized, then (max, sum).
struct Partials {
  float* out;  // [T, Hq, P, hd]
  float* ml;   // [T, Hq, P, 2]
};
__device__ __forceinline__ Partials partials(const PagedAttentionArgs& a, int num_partitions) {
  float* out = a.workspace;
  if (!out) return {nullptr, nullptr};
  return {out, out + a.num_tokens * a.num_heads * num_partitions * a.head_size};
}

// q . k for the key row k (this lane's vectors; summed over the group by the caller).
template <typename C, int HD_MAX>
__device__ __forceinline__ float decode_dot(const C* k, const float (*q)[Vec<C>::kElems], int nv) {
  using S = DecodeShape<C, HD_MAX>;
  const int g_lane = threadIdx.x % S::kGroup;
  float dot = 0.f;
  OCTAVO_UNROLL
  for (int sl = 0; sl < S::kSlots; ++sl) {
    const int v = g_lane + sl * S::kGroup;
    if (v >= nv) break;
    float kf[S::kVec];
    load_vec(k + v * S::kVec, kf);
    OCTAVO_UNROLL
    for (int e = 0; e < S::kVec; ++e) dot += q[sl][e] * kf[e];
  }
  return dot;
}

// Scores keys [lo, hi) of the partition against q into logits[0, hi - lo). Each step a warp
// scores kUnroll * 32 / G keys, its loads independent of each other's shuffles.
template <typename C, int HD_MAX>
__device__ __forceinline__ void decode_scores(const PagedAttentionArgs& a, const int32_t* bt_row,
                                              const C* k_head, const float (*q)[Vec<C>::kElems],
                                              int lo, int hi, int pos, float slope, float* logits) {
  using S = DecodeShape<C, HD_MAX>;
  constexpr int kUnroll = 4;
  const int lane = threadIdx.x % 32, g_lane = lane % S::kGroup;
  const int nv = a.head_size / S::kVec;
  // kb is warp-uniform, so every lane of a warp reaches the same shuffles
  for (int kb = lo + (threadIdx.x / 32) * (32 / S::kGroup); kb < hi; kb += S::kGroups * kUnroll) {
    float dot[kUnroll];
    OCTAVO_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int key = kb + u * S::kGroups + lane / S::kGroup;
      dot[u] = key < hi ? decode_dot<C, HD_MAX>(k_head + cache_offset(a, bt_row, key, a.kc_stride_block,
                                                                      a.kc_stride_token), q, nv)
                        : 0.f;
    }
    OCTAVO_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      for (int o = S::kGroup / 2; o > 0; o >>= 1) dot[u] += __shfl_xor_sync(kFull, dot[u], o);
      const int key = kb + u * S::kGroups + lane / S::kGroup;
      if (key < hi && g_lane == 0) logits[key - lo] = logit(dot[u], a, slope, key, pos);
    }
  }
}

// acc += this group's share of sum_k p_k v_k over keys [lo, hi), p_k = logits[k - lo]; kUnroll
// keys per group are loaded before they are accumulated.
template <typename C, int HD_MAX>
__device__ __forceinline__ void decode_values(const PagedAttentionArgs& a, const int32_t* bt_row,
                                              const C* v_head, const float* logits, int lo, int hi,
                                              float (&acc)[DecodeShape<C, HD_MAX>::kSlots][Vec<C>::kElems]) {
  using S = DecodeShape<C, HD_MAX>;
  constexpr int kUnroll = S::kSlots > 1 ? 2 : 4;  // at most 32 loaded floats per lane
  const int g_lane = threadIdx.x % S::kGroup, group = threadIdx.x / S::kGroup;
  const int nv = a.head_size / S::kVec;
  for (int kb = lo + group; kb < hi; kb += S::kGroups * kUnroll) {
    float vf[kUnroll][S::kSlots][S::kVec] = {};
    OCTAVO_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int key = kb + u * S::kGroups;
      if (key >= hi) break;
      const C* v = v_head + cache_offset(a, bt_row, key, a.vc_stride_block, a.vc_stride_token);
      OCTAVO_UNROLL
      for (int sl = 0; sl < S::kSlots; ++sl)
        if (g_lane + sl * S::kGroup < nv) load_vec(v + (g_lane + sl * S::kGroup) * S::kVec, vf[u][sl]);
    }
    OCTAVO_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int key = kb + u * S::kGroups;
      const float p = key < hi ? logits[key - lo] : 0.f;
      OCTAVO_UNROLL
      for (int sl = 0; sl < S::kSlots; ++sl)
        OCTAVO_UNROLL
        for (int e = 0; e < S::kVec; ++e) acc[sl][e] += p * vf[u][sl][e];
    }
  }
}

// Sums acc over the block's groups (through red [kGroups, HD_MAX]) and writes the output row
// (no workspace) or the partition's partials at `slot`.
template <typename T, typename C, int HD_MAX>
__device__ __forceinline__ void decode_store(const PagedAttentionArgs& a,
                                             const float (&acc)[DecodeShape<C, HD_MAX>::kSlots][Vec<C>::kElems],
                                             float m, float l, float* red, const Partials& ws, int t,
                                             int h, int64_t slot) {
  using S = DecodeShape<C, HD_MAX>;
  const int g_lane = threadIdx.x % S::kGroup, group = threadIdx.x / S::kGroup;
  const int nv = a.head_size / S::kVec;
  OCTAVO_UNROLL
  for (int sl = 0; sl < S::kSlots; ++sl) {
    const int i = g_lane + sl * S::kGroup;
    if (i < nv) {
      OCTAVO_UNROLL
      for (int e = 0; e < S::kVec; ++e) red[group * HD_MAX + i * S::kVec + e] = acc[sl][e];
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(a.out) + t * a.o_stride_token + h * a.o_stride_head;
  for (int d = threadIdx.x; d < a.head_size; d += kThreads) {
    float o = 0.f;
    for (int g = 0; g < S::kGroups; ++g) o += red[g * HD_MAX + d];
    if (a.workspace) ws.out[slot * a.head_size + d] = o;
    else out[d] = from_float<T>(o / l);
  }
  if (a.workspace && threadIdx.x == 0) {
    ws.ml[2 * slot] = m;
    ws.ml[2 * slot + 1] = l;
  }
  __syncthreads();  // red is reused by the next row
}

// This lane's query vectors of row t, head h (zeros past head_size), laid out like the keys.
template <typename T, typename C, int HD_MAX>
__device__ __forceinline__ void decode_query(const PagedAttentionArgs& a, int t, int h,
                                             float (&q)[DecodeShape<C, HD_MAX>::kSlots][Vec<C>::kElems]) {
  using S = DecodeShape<C, HD_MAX>;
  const T* q_row = static_cast<const T*>(a.query) + t * a.q_stride_token + h * a.q_stride_head;
  OCTAVO_UNROLL
  for (int sl = 0; sl < S::kSlots; ++sl) {
    OCTAVO_UNROLL
    for (int e = 0; e < S::kVec; ++e) {
      const int d = (threadIdx.x % S::kGroup + sl * S::kGroup) * S::kVec + e;
      q[sl][e] = d < a.head_size ? to_float(q_row[d]) : 0.f;
    }
  }
}

// Online softmax state of one (row, head) over the chunks of a partition.
struct MaxSum {
  float m = -INFINITY, l = 0.f;
};

// Folds the chunk's scores logits[0, n) into st: logits <- exp(logits - new max) (published to
// the block); returns the factor exp(old max - new max) for what was accumulated before.
__device__ __forceinline__ float softmax_chunk(float* logits, int n, MaxSum& st) {
  __syncthreads();  // scores written
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += kThreads) mx = fmaxf(mx, logits[j]);
  const float m_new = fmaxf(st.m, block_max(mx));
  float sum = 0.f;
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const float e = expf(logits[j] - m_new);
    logits[j] = e;
    sum += e;
  }
  const float corr = st.m == -INFINITY ? 0.f : expf(st.m - m_new);
  st.l = st.l * corr + block_sum(sum);  // block_sum's barriers also publish the exp'd logits
  st.m = m_new;
  return corr;
}

// grid: (Hq, S, P), partitions of partition_keys keys (a multiple of kChunk). With a workspace
// (P > 1) each block writes its partials; without, the output.
template <typename T, typename C, int HD_MAX>
__global__ void __launch_bounds__(kThreads, 5) paged_decode_kernel(PagedAttentionArgs a,
                                                                   int partition_keys) {
  using S = DecodeShape<C, HD_MAX>;
  __shared__ float logits[kChunk];               // scores, then exp(score - max)
  __shared__ float red[S::kGroups * HD_MAX];     // per-group value sums
  const int h = blockIdx.x, s = blockIdx.y, part = blockIdx.z, num_partitions = gridDim.z;
  const SeqRows r = seq_rows(a, s);
  const int kvh = h / (a.num_heads / a.num_kv_heads);
  const float slope = a.alibi_slopes ? a.alibi_slopes[h] : 0.f;
  const int32_t* bt_row = a.block_table + s * a.bt_stride;
  const C* k_head = static_cast<const C*>(a.key_cache) + kvh * a.kc_stride_head;
  const C* v_head = static_cast<const C*>(a.value_cache) + kvh * a.vc_stride_head;
  const Partials ws = partials(a, num_partitions);
  // a decode batch has one row per sequence; other rows of a batch with T == S loop here
  for (int i = 0; i < r.q_len; ++i) {
    const int t = r.q0 + i, pos = r.seq_len - r.q_len + i;
    const KeyRange kr = key_range(pos, a.sliding_window);
    const int lo = max(kr.lo, part * partition_keys), hi = min(kr.hi, (part + 1) * partition_keys);
    const int64_t slot = (int64_t(t) * a.num_heads + h) * num_partitions + part;
    if (lo >= hi) {  // partition outside this row's keys: zero weight in the merge
      if (a.workspace && threadIdx.x == 0) {
        ws.ml[2 * slot] = -INFINITY;
        ws.ml[2 * slot + 1] = 0.f;
      }
      continue;
    }
    float q[S::kSlots][S::kVec];
    decode_query<T, C, HD_MAX>(a, t, h, q);
    float acc[S::kSlots][S::kVec] = {};
    MaxSum st;
    for (int c0 = lo; c0 < hi; c0 += kChunk) {
      const int c1 = min(hi, c0 + kChunk);
      decode_scores<C, HD_MAX>(a, bt_row, k_head, q, c0, c1, pos, slope, logits);
      const float corr = softmax_chunk(logits, c1 - c0, st);
      OCTAVO_UNROLL
      for (int sl = 0; sl < S::kSlots; ++sl)
        OCTAVO_UNROLL
        for (int e = 0; e < S::kVec; ++e) acc[sl][e] *= corr;
      decode_values<C, HD_MAX>(a, bt_row, v_head, logits, c0, c1, acc);
      __syncthreads();  // logits read before the next chunk's scores
    }
    // an fp8 cache's V scale multiplies the output: folded into the normalizer, which the
    // split-context merge sums too (a model-dtype cache compiles without it)
    const float l = std::is_same_v<C, Fp8Kv> ? st.l * a.inv_v_scale : st.l;
    decode_store<T, C, HD_MAX>(a, acc, st.m, l, red, ws, t, h, slot);
  }
}

// grid: (Hq, S). out = sum_p w_p out_p / sum_p w_p l_p with w_p = exp(m_p - max_p m_p).
template <typename T>
__global__ void __launch_bounds__(kThreads) paged_decode_merge_kernel(PagedAttentionArgs a,
                                                                      int num_partitions) {
  const int h = blockIdx.x, s = blockIdx.y;
  const SeqRows r = seq_rows(a, s);
  const Partials part = partials(a, num_partitions);
  for (int t = r.q0; t < r.q0 + r.q_len; ++t) {
    const int64_t slot0 = (int64_t(t) * a.num_heads + h) * num_partitions;
    const float* ml = part.ml + 2 * slot0;
    float mx = -INFINITY, total = 0.f;
    for (int p = 0; p < num_partitions; ++p)
      if (ml[2 * p + 1] > 0.f) mx = fmaxf(mx, ml[2 * p]);
    for (int p = 0; p < num_partitions; ++p)
      if (ml[2 * p + 1] > 0.f) total += expf(ml[2 * p] - mx) * ml[2 * p + 1];
    T* out = static_cast<T*>(a.out) + t * a.o_stride_token + h * a.o_stride_head;
    for (int d = threadIdx.x; d < a.head_size; d += kThreads) {
      float o = 0.f;
      for (int p = 0; p < num_partitions; ++p)
        if (ml[2 * p + 1] > 0.f) o += expf(ml[2 * p] - mx) * part.out[(slot0 + p) * a.head_size + d];
      out[d] = from_float<T>(o / total);
    }
  }
}

// ---- prefill --------------------------------------------------------------------------------
// One block per (tile of kRows query rows of one sequence, query head); each warp owns kRows /
// kWarps rows and walks the keys in tiles of 32 (lane j scores key j) with an online softmax.
template <int HD_MAX>
struct PrefillShape {
  static constexpr int kRowsPerWarp = HD_MAX > 128 ? 2 : 4;  // keeps shared memory < 48 KiB
  static constexpr int kRows = kWarps * kRowsPerWarp;
  static constexpr int kKeys = 32;
  static constexpr int kDims = HD_MAX / 32;  // output dims per lane
};

// The tile slots of sequence s are [qsl[s] / rows + s, qsl[s+1] / rows + s + 1): at least
// ceil(q_len / rows) of them, so a grid of T / rows + S blocks covers every sequence. Returns
// the s whose slots hold `tile` (binary search: no host sync on query_start_loc).
__device__ __forceinline__ int tile_seq(const int32_t* qsl, int num_seqs, int tile, int rows) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (qsl[mid] / rows + mid <= tile) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// kv_s[d * 32 + j] = key (k0 + j)'s dim d (transposed: lane j reads a row without conflicts);
// keys at or past `hi` read as 0.
template <typename C, int HD_MAX>
__device__ __forceinline__ void load_keys_t(const PagedAttentionArgs& a, const int32_t* bt_row,
                                            const C* k_head, int k0, int hi, float* kv_s) {
  constexpr int kVec = Vec<C>::kElems, kKeys = PrefillShape<HD_MAX>::kKeys;
  const int nv = a.head_size / kVec;
  for (int idx = threadIdx.x; idx < kKeys * nv; idx += kThreads) {
    const int j = idx % kKeys, v = idx / kKeys, key = k0 + j;
    float f[kVec] = {};
    if (key < hi)
      load_vec(k_head + cache_offset(a, bt_row, key, a.kc_stride_block, a.kc_stride_token) + v * kVec, f);
    OCTAVO_UNROLL
    for (int e = 0; e < kVec; ++e) kv_s[(v * kVec + e) * kKeys + j] = f[e];
  }
}

// kv_s[j * HD_MAX + d] = value (k0 + j)'s dim d; values at or past `hi` read as 0.
template <typename C, int HD_MAX>
__device__ __forceinline__ void load_values(const PagedAttentionArgs& a, const int32_t* bt_row,
                                            const C* v_head, int k0, int hi, float* kv_s) {
  constexpr int kVec = Vec<C>::kElems, kKeys = PrefillShape<HD_MAX>::kKeys;
  const int nv = a.head_size / kVec;
  for (int idx = threadIdx.x; idx < kKeys * nv; idx += kThreads) {
    const int j = idx / nv, v = idx % nv, key = k0 + j;
    float f[kVec] = {};
    if (key < hi)
      load_vec(v_head + cache_offset(a, bt_row, key, a.vc_stride_block, a.vc_stride_token) + v * kVec, f);
    OCTAVO_UNROLL
    for (int e = 0; e < kVec; ++e) kv_s[j * HD_MAX + v * kVec + e] = f[e];
  }
}

// Running softmax state of one query row: max, sum of exp, unnormalized output dims.
template <int HD_MAX>
struct RowState {
  float m = -INFINITY, l = 0.f;
  float acc[PrefillShape<HD_MAX>::kDims] = {};
};

// Folds lane's key score x (-inf: masked) into st; returns the key's weight exp(x - m).
template <int HD_MAX>
__device__ __forceinline__ float online_softmax(RowState<HD_MAX>& st, float x) {
  const float m_new = fmaxf(st.m, warp_max(x));
  const float p = x == -INFINITY ? 0.f : expf(x - m_new);
  const float corr = st.m == -INFINITY ? 0.f : expf(st.m - m_new);
  st.l = st.l * corr + warp_sum(p);
  OCTAVO_UNROLL
  for (int i = 0; i < PrefillShape<HD_MAX>::kDims; ++i) st.acc[i] *= corr;
  st.m = m_new;
  return p;
}

// Folds the 32 keys [k0, k0 + 32) of K^T in kv_s into the warp's rows; writes their weights
// to p_s. Row rr of the tile sits at position pos0 + rr; rows at or past nrows see nothing.
template <typename T, int HD_MAX>
__device__ __forceinline__ void prefill_scores(const PagedAttentionArgs& a, const float* q_s,
                                               const float* kv_s, float* p_s, int k0, int pos0,
                                               int nrows, float slope,
                                               RowState<HD_MAX> (&st)[PrefillShape<HD_MAX>::kRowsPerWarp]) {
  using P = PrefillShape<HD_MAX>;
  const int lane = threadIdx.x % 32, key = k0 + lane;
  OCTAVO_UNROLL
  for (int i = 0; i < P::kRowsPerWarp; ++i) {
    const int rr = (threadIdx.x / 32) * P::kRowsPerWarp + i, pos = pos0 + rr;
    float dot = 0.f;
    for (int d = 0; d < a.head_size; ++d) dot += q_s[rr * HD_MAX + d] * kv_s[d * P::kKeys + lane];
    const KeyRange kr = key_range(pos, a.sliding_window);
    const bool seen = rr < nrows && key >= kr.lo && key < kr.hi;
    p_s[rr * P::kKeys + lane] = online_softmax(st[i], seen ? logit(dot, a, slope, key, pos) : -INFINITY);
  }
}

// acc of the warp's rows += p_s . V (V [32, HD_MAX] in kv_s); lane owns dims lane + 32 c.
template <int HD_MAX>
__device__ __forceinline__ void prefill_values(const float* kv_s, const float* p_s,
                                               RowState<HD_MAX> (&st)[PrefillShape<HD_MAX>::kRowsPerWarp]) {
  using P = PrefillShape<HD_MAX>;
  const int lane = threadIdx.x % 32;
  OCTAVO_UNROLL
  for (int i = 0; i < P::kRowsPerWarp; ++i) {
    const int rr = (threadIdx.x / 32) * P::kRowsPerWarp + i;
    for (int j = 0; j < P::kKeys; ++j) {
      const float p = p_s[rr * P::kKeys + j];
      OCTAVO_UNROLL
      for (int c = 0; c < P::kDims; ++c) st[i].acc[c] += p * kv_s[j * HD_MAX + lane + 32 * c];
    }
  }
}

// grid: (T / kRows + S, Hq); blocks past their sequence's rows exit at once.
template <typename T, typename C, int HD_MAX>
__global__ void __launch_bounds__(kThreads, 4) paged_prefill_kernel(PagedAttentionArgs a) {
  using P = PrefillShape<HD_MAX>;
  __shared__ float q_s[P::kRows * HD_MAX];   // [rows, HD_MAX] query tile
  __shared__ float kv_s[P::kKeys * HD_MAX];  // K^T [HD_MAX, 32], then V [32, HD_MAX]
  __shared__ float p_s[P::kRows * P::kKeys]; // [rows, 32] key weights of the tile
  const int h = blockIdx.y, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int s = tile_seq(a.query_start_loc, a.num_seqs, blockIdx.x, P::kRows);
  const SeqRows r = seq_rows(a, s);
  const int row0 = (blockIdx.x - (r.q0 / P::kRows + s)) * P::kRows;
  if (row0 >= r.q_len) return;  // block-uniform
  const int nrows = min(P::kRows, r.q_len - row0), pos0 = r.seq_len - r.q_len + row0;
  const int kvh = h / (a.num_heads / a.num_kv_heads);
  const float slope = a.alibi_slopes ? a.alibi_slopes[h] : 0.f;
  const int32_t* bt_row = a.block_table + s * a.bt_stride;
  const C* k_head = static_cast<const C*>(a.key_cache) + kvh * a.kc_stride_head;
  const C* v_head = static_cast<const C*>(a.value_cache) + kvh * a.vc_stride_head;
  const int64_t t0 = r.q0 + row0;
  for (int idx = threadIdx.x; idx < P::kRows * a.head_size; idx += kThreads) {
    const int rr = idx / a.head_size, d = idx % a.head_size;
    const T* q = static_cast<const T*>(a.query) + (t0 + rr) * a.q_stride_token + h * a.q_stride_head;
    q_s[rr * HD_MAX + d] = rr < nrows ? to_float(q[d]) : 0.f;
  }
  RowState<HD_MAX> st[P::kRowsPerWarp];
  const int lo = key_range(pos0, a.sliding_window).lo, hi = pos0 + nrows;
  for (int k0 = lo; k0 < hi; k0 += P::kKeys) {
    load_keys_t<C, HD_MAX>(a, bt_row, k_head, k0, hi, kv_s);
    __syncthreads();
    prefill_scores<T, HD_MAX>(a, q_s, kv_s, p_s, k0, pos0, nrows, slope, st);
    __syncthreads();  // K read, weights written
    load_values<C, HD_MAX>(a, bt_row, v_head, k0, hi, kv_s);
    __syncthreads();
    prefill_values<HD_MAX>(kv_s, p_s, st);
    __syncthreads();  // V read before the next tile's K lands
  }
  OCTAVO_UNROLL
  for (int i = 0; i < P::kRowsPerWarp; ++i) {
    const int rr = warp * P::kRowsPerWarp + i;
    if (rr >= nrows) continue;
    T* out = static_cast<T*>(a.out) + (t0 + rr) * a.o_stride_token + h * a.o_stride_head;
    const float l = std::is_same_v<C, Fp8Kv> ? st[i].l * a.inv_v_scale : st[i].l;  // fp8: V scale
    OCTAVO_UNROLL
    for (int c = 0; c < P::kDims; ++c)
      if (lane + 32 * c < a.head_size) out[lane + 32 * c] = from_float<T>(st[i].acc[c] / l);
  }
}

}  // namespace octavo::cuda::attn
