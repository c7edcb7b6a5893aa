// Tensor-core prefill for paged attention (flash-attention-2 style): S = Q K^T and O += P V with
// mma.sync m16n8k16 (bf16/fp16, fp32 accumulate), K/V tiles gathered from the paged cache into
// shared memory with cp.async, online softmax in registers. An fp8 cache (C = Fp8Kv) is decoded
// into the same bf16/fp16 tiles with plain loads instead (exact; cp.async cannot convert); its K
// scale is in a.scale, its V scale divides the final l. No torch headers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/fp8_kv.cuh"
#include "cuda/ptx.cuh"

// Constant-trip loops over fragments must unroll on the GPU so the arrays stay in registers;
// g++ (the emulator) does not know the pragma.
#ifdef OCTAVO_SIMT
#define OCTAVO_PREFILL_UNROLL
#else
#define OCTAVO_PREFILL_UNROLL _Pragma("unroll")
#endif

namespace octavo::cuda {
namespace prefill_mma {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = kWarps * 16;  // packed (token, group head) rows per block: 16 per warp
constexpr int kBN = 64;           // keys per K/V tile
constexpr int kPad = 8;           // 16 bytes of padding per shared row: conflict-free ldmatrix
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kBM == kBN, "the Q tile is staged in the V buffer");

// Blocks per SM the register allocation must allow: 3 (168 registers) fits head sizes <= 64
// without spills, larger ones get up to 255 registers (still 2 blocks) instead of spilling.
template <int HD>
constexpr int min_blocks() { return HD <= 64 ? 3 : 2; }

template <int HD>
constexpr int smem_bytes() { return 2 * kBN * (HD + kPad) * 2; }  // K tile + V tile, 16-bit

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  T v[2] = {from_float<T>(lo), from_float<T>(hi)};
  uint32_t u;
  memcpy(&u, v, 4);
  return u;
}

template <typename T>
__device__ __forceinline__ float sum2(uint32_t u) {
  T v[2];
  memcpy(v, &u, 4);
  return to_float(v[0]) + to_float(v[1]);
}

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same_v<T, __nv_bfloat16>) mma_m16n8k16_bf16(d, a, b, d);
  else mma_m16n8k16_f16(d, a, b, d);
}

// Copies ROWS rows of HD elements into a [ROWS][HD + kPad] shared tile with 16-byte cp.async
// (rows of fp8 bytes: 8-byte loads decoded to T and stored); a row whose source row_src(r) is
// null is zero-filled (keys past the context: P = 0 must not meet NaN garbage in V).
// kThreads / ROWS threads share a row (one row_src call, i.e. one block table lookup, per thread)
// and take its 8-element chunks in turn, so neighbours fill one sector.
template <int HD, int ROWS, typename T, typename F>
__device__ __forceinline__ void load_tile(T* tile, F row_src) {
  constexpr int kChunks = HD / 8, kPerRow = kThreads / ROWS;
  static_assert(kThreads % ROWS == 0 && kChunks % kPerRow == 0, "tile shape");
  const int r = threadIdx.x / kPerRow, sub = threadIdx.x % kPerRow;
  const auto* src = row_src(r);
  T* dst = tile + r * (HD + kPad);
OCTAVO_PREFILL_UNROLL
  for (int c = sub; c < kChunks; c += kPerRow) {
    if (!src) {
      *reinterpret_cast<uint4*>(dst + c * 8) = make_uint4(0u, 0u, 0u, 0u);
    } else if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(src)>>, T>) {
      cp_async_16(dst + c * 8, src + c * 8);
    } else {
      fp8_kv_to(dst + c * 8, src + c * 8);
    }
  }
}

// Grid choice: blockIdx.x walks (sequence, row tile) pairs without reading device memory on the
// host. Sequence s owns tiles [start(s), start(s+1)) with start(s) = s + floor(qsl[s] * G / kBM),
// which is strictly increasing and gives s at least ceil(q_len * G / kBM) tiles, so
// num_seqs + floor(T * G / kBM) blocks cover every sequence and waste at most one per sequence
// (a grid over (seqs, max tiles) would waste far more on mixed batches). The lowest block of a
// sequence takes its last (most keys, causal) tile, so the long blocks start first. Returns the
// tile's first packed row, or -1 when the block has no rows.
__device__ __forceinline__ int64_t find_tile(const int32_t* qsl, int num_seqs, int64_t group,
                                             int64_t b, int& seq) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (mid + int64_t(qsl[mid]) * group / kBM <= b) lo = mid;
    else hi = mid - 1;
  }
  seq = lo;
  const int64_t local = b - (lo + int64_t(qsl[lo]) * group / kBM);
  const int64_t rows = int64_t(qsl[lo + 1] - qsl[lo]) * group;
  const int64_t tiles = (rows + kBM - 1) / kBM;
  return local >= 0 && local < tiles ? (tiles - 1 - local) * kBM : -1;
}

// What one lane knows about its two rows (g and g + 8 of the warp's 16): the query position
// (-1: padding row, every key masked) and the ALiBi slope.
struct RowInfo {
  int pos[2];
  float slope[2];
};

// One K tile against the warp's Q fragments: s[n][i] = Q K^T of row g + 8 (i / 2), key
// kv0 + 8 n + 2 t + i % 2.
template <typename T, int HD>
__device__ __forceinline__ void qk_tile(float (&s)[kBN / 8][4], const uint32_t (&qf)[HD / 16][4],
                                        const T* ks, int lane) {
  for (int n = 0; n < kBN / 8; ++n)
    for (int i = 0; i < 4; ++i) s[n][i] = 0.f;
  const int mat = lane / 8, r = lane % 8;
OCTAVO_PREFILL_UNROLL
  for (int kk = 0; kk < HD / 16; ++kk)
OCTAVO_PREFILL_UNROLL
    for (int nn = 0; nn < kBN / 16; ++nn) {
      uint32_t b[4];  // keys 16 nn + {0..7, 8..15} x dims 16 kk + {0..7, 8..15}
      ldmatrix_x4(b, ks + (nn * 16 + (mat / 2) * 8 + r) * (HD + kPad) + kk * 16 + (mat % 2) * 8);
      mma<T>(s[2 * nn], qf[kk], b[0], b[1]);
      mma<T>(s[2 * nn + 1], qf[kk], b[2], b[3]);
    }
}

// Soft-cap, ALiBi and the causal / sliding-window mask on a tile of scores, in log2 units.
__device__ __forceinline__ void scores_to_log2(float (&s)[kBN / 8][4], const PagedAttentionArgs& a,
                                               const RowInfo& ri, int kv0, int t, bool alibi) {
  const float inv_cap = a.soft_cap > 0.f ? 1.f / a.soft_cap : 0.f;
OCTAVO_PREFILL_UNROLL
  for (int n = 0; n < kBN / 8; ++n)
OCTAVO_PREFILL_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int h = i / 2, key = kv0 + n * 8 + 2 * t + i % 2, p = ri.pos[h];
      float x = s[n][i] * a.scale;
      if (a.soft_cap > 0.f) x = a.soft_cap * tanhf(x * inv_cap);
      if (alibi) x += ri.slope[h] * float(key - p);
      const bool seen = key <= p && (a.sliding_window <= 0 || key > p - a.sliding_window);
      s[n][i] = seen ? x * kLog2e : -INFINITY;
    }
}

// Online softmax step: updates the running max m and partial sum l of both rows, rescales o,
// and turns s into P packed as A fragments (fragment f of k-chunk kk: rows g + 8 (f % 2), keys
// 16 kk + 8 (f / 2) + 2 t + {0,1}, i.e. the accumulator pair s[2 kk + f / 2][2 (f % 2) + {0,1}]).
template <typename T, int HD>
__device__ __forceinline__ void softmax_tile(float (&s)[kBN / 8][4], float (&m)[2], float (&l)[2],
                                             float (&o)[HD / 8][4], uint32_t (&pa)[kBN / 16][4]) {
OCTAVO_PREFILL_UNROLL
  for (int h = 0; h < 2; ++h) {
    float mx = m[h];
    for (int n = 0; n < kBN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float base = mx == -INFINITY ? 0.f : mx;  // a row with nothing seen yet stays at 0
    const float alpha = exp2f(m[h] - base);
    m[h] = mx;
    l[h] *= alpha;
    for (int d = 0; d < HD / 8; ++d) {
      o[d][2 * h] *= alpha;
      o[d][2 * h + 1] *= alpha;
    }
    for (int n = 0; n < kBN / 8; ++n)
      for (int e = 0; e < 2; ++e) s[n][2 * h + e] = exp2f(s[n][2 * h + e] - base);
  }
  // P rounded to T, as the PV mma consumes it; l sums the rounded weights so that numerator and
  // denominator agree.
OCTAVO_PREFILL_UNROLL
  for (int kk = 0; kk < kBN / 16; ++kk)
    for (int f = 0; f < 4; ++f) {
      const float* pair = &s[2 * kk + f / 2][2 * (f % 2)];
      pa[kk][f] = pack2<T>(pair[0], pair[1]);
      l[f % 2] += sum2<T>(pa[kk][f]);
    }
}

// o += P V for one V tile (ldmatrix.trans turns the [key][dim] rows into col-major B fragments).
template <typename T, int HD>
__device__ __forceinline__ void pv_tile(float (&o)[HD / 8][4], const uint32_t (&pa)[kBN / 16][4],
                                        const T* vs, int lane) {
  const int mat = lane / 8, r = lane % 8;
OCTAVO_PREFILL_UNROLL
  for (int kk = 0; kk < kBN / 16; ++kk)
OCTAVO_PREFILL_UNROLL
    for (int dn = 0; dn < HD / 16; ++dn) {
      uint32_t b[4];  // keys 16 kk + {0..7, 8..15} x dims 16 dn + {0..7, 8..15}
      ldmatrix_x4_trans(b, vs + (kk * 16 + (mat % 2) * 8 + r) * (HD + kPad) + dn * 16 + (mat / 2) * 8);
      mma<T>(o[2 * dn], pa[kk], b[0], b[1]);
      mma<T>(o[2 * dn + 1], pa[kk], b[2], b[3]);
    }
}

// Global row of key `key` of sequence `seq`, kv head `kvh`, in a paged cache of element type C
// (or null past hi).
template <typename C>
__device__ __forceinline__ const C* cache_row(const PagedAttentionArgs& a, const void* cache,
                                              int64_t stride_block, int64_t stride_token,
                                              int64_t stride_head, int seq, int kvh, int key, int hi) {
  if (key >= hi) return nullptr;
  const int64_t block = a.block_table[seq * a.bt_stride + key / a.block_size];
  OCTAVO_DEVICE_CHECK(block >= 0 && block < a.num_cache_blocks,
                      "paged_attention: block_table entry out of range");
  return static_cast<const C*>(cache) + block * stride_block + (key % a.block_size) * stride_token +
         kvh * stride_head;
}

// The block's tile: sequence, kv head, its packed rows [row0, row0 + nrows) and keys [kv_lo, kv_hi).
struct Tile {
  int seq, kvh, group, q0, first, nrows, kv_lo, kv_hi;  // first: position of query row 0
  int64_t row0;
};

// False when the block has no rows (uniform over the block); traps on inconsistent metadata.
__device__ __forceinline__ bool block_tile(const PagedAttentionArgs& a, Tile& tl) {
  tl.group = a.num_heads / a.num_kv_heads;
  tl.kvh = blockIdx.y;
  tl.row0 = find_tile(a.query_start_loc, a.num_seqs, tl.group, blockIdx.x, tl.seq);
  if (tl.row0 < 0) return false;
  tl.q0 = a.query_start_loc[tl.seq];
  const int q_len = a.query_start_loc[tl.seq + 1] - tl.q0, ctx = a.seq_lens[tl.seq];
  OCTAVO_DEVICE_CHECK(tl.q0 >= 0 && q_len >= 0 && tl.q0 + q_len <= a.num_tokens,
                      "paged_attention: query_start_loc must be non-decreasing within [0, T]");
  OCTAVO_DEVICE_CHECK(q_len <= ctx && int64_t(ctx) <= int64_t(a.max_blocks) * a.block_size,
                      "paged_attention: need q_len <= seq_len <= max_blocks * block_size");
  tl.nrows = int(min(int64_t(kBM), int64_t(q_len) * tl.group - tl.row0));
  tl.first = ctx - q_len;
  const int p_lo = tl.first + int(tl.row0 / tl.group);
  tl.kv_lo = a.sliding_window > 0 ? max(0, p_lo - a.sliding_window + 1) : 0;
  tl.kv_hi = tl.first + int((tl.row0 + tl.nrows - 1) / tl.group) + 1;  // causal: up to the last row
  return true;
}

// Row r of the tile in a [T, Hq, hd] tensor (query or out): token q0 + row / G, head kvh G + row % G.
template <typename P>
__device__ __forceinline__ P* packed_row(P* base, const Tile& tl, int r, int64_t stride_token,
                                         int64_t stride_head) {
  const int64_t row = tl.row0 + r;
  return base + (tl.q0 + row / tl.group) * stride_token + (tl.kvh * tl.group + row % tl.group) * stride_head;
}

// Lane's rows (pos -1 past the tile) and the warp's first and last position (hi < lo: no rows).
__device__ __forceinline__ RowInfo row_info(const PagedAttentionArgs& a, const Tile& tl, int warp,
                                            int g, int& wp_lo, int& wp_hi) {
  RowInfo ri;
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    const int64_t row = tl.row0 + r;
    ri.pos[h] = r < tl.nrows ? tl.first + int(row / tl.group) : -1;
    ri.slope[h] = a.alibi_slopes ? a.alibi_slopes[tl.kvh * tl.group + int(row % tl.group)] : 0.f;
  }
  const int wr0 = warp * 16, wr1 = min(tl.nrows, wr0 + 16) - 1;
  const bool active = wr0 < tl.nrows;
  wp_lo = active ? tl.first + int((tl.row0 + wr0) / tl.group) : 0;
  wp_hi = active ? tl.first + int((tl.row0 + wr1) / tl.group) : -1;  // sees no key
  return ri;
}

// Loader of the K or V tile starting at key kv0 (rows past kv_hi zero-filled).
template <typename T, typename C, int HD>
__device__ __forceinline__ void load_kv(const PagedAttentionArgs& a, const Tile& tl, T* tile,
                                        bool value, int kv0) {
  load_tile<HD, kBN>(tile, [&](int r) {
    return value ? cache_row<C>(a, a.value_cache, a.vc_stride_block, a.vc_stride_token,
                                a.vc_stride_head, tl.seq, tl.kvh, kv0 + r, tl.kv_hi)
                 : cache_row<C>(a, a.key_cache, a.kc_stride_block, a.kc_stride_token,
                                a.kc_stride_head, tl.seq, tl.kvh, kv0 + r, tl.kv_hi);
  });
}

// Q tile -> the warp's A fragments (staged in vs), then V tile 0 is issued into vs; K tile 0 is
// in ks when this returns.
template <typename T, typename C, int HD>
__device__ __forceinline__ void load_q_and_first_kv(const PagedAttentionArgs& a, const Tile& tl,
                                                    T* ks, T* vs, uint32_t (&qf)[HD / 16][4]) {
  const T* query = static_cast<const T*>(a.query);
  load_tile<HD, kBM>(vs, [&](int r) {
    return r < tl.nrows ? packed_row(query, tl, r, a.q_stride_token, a.q_stride_head) : nullptr;
  });
  load_kv<T, C, HD>(a, tl, ks, false, tl.kv_lo);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, mat = lane / 8, r = lane % 8;
OCTAVO_PREFILL_UNROLL
  for (int kk = 0; kk < HD / 16; ++kk)
    ldmatrix_x4(qf[kk], vs + (warp * 16 + (mat % 2) * 8 + r) * (HD + kPad) + kk * 16 + (mat / 2) * 8);
  __syncthreads();  // every warp has its Q fragments before V overwrites the Q tile
  load_kv<T, C, HD>(a, tl, vs, true, tl.kv_lo);
  cp_async_commit();
}

// out rows = o / (l * l_scale) (l summed over the 4 lanes of a row; l_scale: 1 / v_scale for an
// fp8 cache, else 1); padding rows are not written.
template <typename T, int HD>
__device__ __forceinline__ void store_rows(const PagedAttentionArgs& a, const Tile& tl,
                                           const float (&o)[HD / 8][4], const float (&l)[2],
                                           float l_scale) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
OCTAVO_PREFILL_UNROLL
  for (int h = 0; h < 2; ++h) {
    float sum = l[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = warp * 16 + g + 8 * h;
    if (r >= tl.nrows) continue;
    const float inv = 1.f / (sum * l_scale);
    T* orow = packed_row(static_cast<T*>(a.out), tl, r, a.o_stride_token, a.o_stride_head);
OCTAVO_PREFILL_UNROLL
    for (int d = 0; d < HD / 8; ++d)
      *reinterpret_cast<uint32_t*>(orow + d * 8 + 2 * t) =
          pack2<T>(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
  }
}

// grid: (num_seqs + T * G / kBM, num_kv_heads), kThreads threads. Block rows are (token, group
// head) pairs of one kv head, token-major, so the G query heads share each K/V tile. Each K/V
// tile has its own buffer: the next K tile loads during P V, the next V tile during Q K^T.
template <typename T, typename C, int HD>
__global__ void __launch_bounds__(kThreads, min_blocks<HD>()) paged_prefill_mma_kernel(PagedAttentionArgs a) {
  static_assert(HD % 16 == 0, "head size must be a multiple of 16");
  Tile tl;
  if (!block_tile(a, tl)) return;
  OCTAVO_DYNAMIC_SHARED(T, smem);
  T* ks = smem;                      // [kBN][HD + kPad]
  T* vs = smem + kBN * (HD + kPad);  // [kBN][HD + kPad]; holds the Q tile first
  uint32_t qf[HD / 16][4];           // A fragments of the warp's 16 rows
  load_q_and_first_kv<T, C, HD>(a, tl, ks, vs, qf);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int wp_lo, wp_hi;
  const RowInfo ri = row_info(a, tl, warp, lane / 4, wp_lo, wp_hi);

  float o[HD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int num_tiles = (tl.kv_hi - tl.kv_lo + kBN - 1) / kBN;
  for (int j = 0; j < num_tiles; ++j) {
    const int kv0 = tl.kv_lo + j * kBN;
    // warp-uniform: some key of the tile is seen by some row of the warp
    const bool work = kv0 <= wp_hi && (a.sliding_window <= 0 || kv0 + kBN - 1 > wp_lo - a.sliding_window);
    float s[kBN / 8][4];
    uint32_t pa[kBN / 16][4];
    cp_async_wait<1>();  // K tile j has landed (V tile j may still be in flight)
    __syncthreads();
    if (work) {
      qk_tile<T, HD>(s, qf, ks, lane);
      scores_to_log2(s, a, ri, kv0, lane % 4, a.alibi_slopes != nullptr);
      softmax_tile<T, HD>(s, m, l, o, pa);
    }
    __syncthreads();  // K tile j is consumed
    if (j + 1 < num_tiles) load_kv<T, C, HD>(a, tl, ks, false, kv0 + kBN);
    cp_async_commit();
    cp_async_wait<1>();  // V tile j has landed
    __syncthreads();
    if (work) pv_tile<T, HD>(o, pa, vs, lane);
    __syncthreads();  // V tile j is consumed
    if (j + 1 < num_tiles) load_kv<T, C, HD>(a, tl, vs, true, kv0 + kBN);
    cp_async_commit();
  }
  cp_async_wait_all();
  const float l_scale = std::is_same_v<C, Fp8Kv> ? a.inv_v_scale : 1.f;
  if (wp_hi >= wp_lo) store_rows<T, HD>(a, tl, o, l, l_scale);
}

template <typename T, typename C, int HD>
inline void launch_for(const PagedAttentionArgs& a, cudaStream_t stream) {
  const int64_t group = a.num_heads / a.num_kv_heads;
  const dim3 grid(unsigned(a.num_seqs + a.num_tokens * group / kBM), unsigned(a.num_kv_heads));
  launch(paged_prefill_mma_kernel<T, C, HD>, grid, dim3(kThreads), smem_bytes<HD>(), stream, a);
}

// The query type (bf16/fp16) and the cache's (the same, or fp8 bytes) of a head size.
template <int HD>
inline void launch_hd(const PagedAttentionArgs& a, cudaStream_t stream) {
  const bool bf16 = a.dtype == DType::kBFloat16;
  if (a.cache_fp8) {
    if (bf16) launch_for<__nv_bfloat16, Fp8Kv, HD>(a, stream);
    else launch_for<__half, Fp8Kv, HD>(a, stream);
  } else if (bf16) {
    launch_for<__nv_bfloat16, __nv_bfloat16, HD>(a, stream);
  } else {
    launch_for<__half, __half, HD>(a, stream);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace prefill_mma

// Runs the tensor-core prefill kernel and returns true, or returns false without launching when
// it does not handle the case (fp32, head size not in {32, 64, 80, 96, 128}, rows not 16-byte
// aligned); the caller then uses its plain prefill kernel.
inline bool launch_paged_prefill_mma(const PagedAttentionArgs& a, cudaStream_t stream) {
  using namespace prefill_mma;
  if (a.dtype == DType::kFloat32 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads) return false;
  const int64_t strides[] = {a.q_stride_token, a.q_stride_head, a.o_stride_token, a.o_stride_head,
                             a.kc_stride_block, a.kc_stride_token, a.kc_stride_head,
                             a.vc_stride_block, a.vc_stride_token, a.vc_stride_head};
  for (const int64_t s : strides)
    if (s % 8) return false;
  if (!aligned16(a.query) || !aligned16(a.out) || !aligned16(a.key_cache) || !aligned16(a.value_cache))
    return false;
  if (a.num_tokens == 0 || a.num_seqs == 0) return true;
#define OCTAVO_PREFILL_HD(HD) \
  case HD:                    \
    launch_hd<HD>(a, stream); \
    return true;
  switch (a.head_size) {
    OCTAVO_PREFILL_HD(32)
    OCTAVO_PREFILL_HD(64)
    OCTAVO_PREFILL_HD(80)
    OCTAVO_PREFILL_HD(96)
    OCTAVO_PREFILL_HD(128)
    default:
      return false;
  }
#undef OCTAVO_PREFILL_HD
}

}  // namespace octavo::cuda
