// Mixture of experts on CPU: top-k routing, alignment of (token, slot) pairs by expert, and the
// expert MLPs on weights packed once into 64-output panels, so that each selected expert's
// weights are read once per call whatever the number of tokens routed to it. FP8 experts keep
// their e4m3 bytes in the same panels and are widened to fp32 in registers. On AMX CPUs the bf16
// chunks of 4 or more rows run on tile registers: the routed hidden rows are gathered once into
// expert order, so that every chunk's rows (and the intermediate's) are contiguous for tile loads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/amx.h"
#include "cpu/cpu_types.h"
#include "cpu/moe_act.h"

namespace octavo::cpu {

// pair = token * top_k + slot; the pairs of expert e are pair_order[expert_start[e] ..
// expert_start[e + 1]), so each expert's rows of `inter` are contiguous.
struct MoeParams {
  void* out;                    // [T, H], row stride out_stride
  const void* hidden;           // [T, H], row stride hidden_stride
  const void* w13;              // [E, ceil(I/64), 2 (gate, up), ceil(H/2), 64, 2]
  const void* w2;               // [E, ceil(H/64), ceil(I/2), 64, 2]
  // e4m3 weights (uint8 codes in the panels above) only: fp32 scales per output and K-block
  const float* w13_scale;       // [E, ceil(I/64), 2, ceil(H / block_k13), 64], or null
  const float* w2_scale;        // [E, ceil(H/64), ceil(I / block_k2), 64]
  int64_t block_k13, block_k2;  // K columns per scale block: even, or all of K
  const float* topk_weights;    // [T * top_k]
  const int32_t* pair_order;    // [T * top_k] pairs grouped by expert
  const int64_t* expert_start;  // [E + 1]
  void* inter;                  // scratch [T * top_k + 16, I] (in expert order), hidden's
                                // dtype; the 16 rows past the last are read (never used) by tiles
  float* partial;               // scratch [T * top_k, H] (in pair order): weighted expert outputs
  int64_t out_stride, hidden_stride;
  int64_t num_tokens, hidden_size, inter_size, top_k, num_experts;
  int act;                      // 0 silu, 1 gelu (erf), 2 gelu (tanh)
  DType dtype;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int kPanel = 64;   // outputs per packed panel (ops_native.PANEL)
constexpr int kRows = 96;    // rows per chunk: the [96, 64] fp32 sums (24 KiB) stay in L1
constexpr int kGenericMB = 4;
constexpr int kTileRows = 16;  // rows of one AMX tile: scratch holds this many past the last row
static_assert(kRows % kTileRows == 0, "a chunk's sums must hold whole tiles");

// One chunk's rows: pointers for every kernel; where the rows are also evenly spaced (base, and
// the kTileRows - 1 rows after the last are readable), the tile kernels load them from there.
template <typename T>
struct ChunkRows {
  const T* const* ptr;  // [m]
  const T* base;        // row r at base + r * stride, or null
  int64_t stride;
  int m;
};

// acc[r * 64 + j] = sum_k rows[r][k] * W[j][k] for one packed panel [ceil(K/2), 64, 2] of W.
// Any dtype, any capability: each K pair's 128 weights are widened once and multiplied by the
// (x[2kk], x[2kk+1], x[2kk], ...) vector of every row, into [rows, 128] sums kept in L1.
template <typename T>
static void panel_generic(const T* const* rows, int m, const T* panel, int64_t k, float* acc) {
  constexpr int kW = 2 * kPanel;
  static_assert(kW % kVec == 0 && kVec % 2 == 0, "pairs must not straddle vectors");
  const int64_t kpairs = (k + 1) / 2;
  for (int r0 = 0; r0 < m; r0 += kGenericMB) {
    const int mb = std::min(kGenericMB, m - r0);
    alignas(64) float sums[kGenericMB][kW] = {};
    for (int64_t kk = 0; kk < kpairs; ++kk) {
      fVec xp[kGenericMB];
      for (int r = 0; r < mb; ++r) {
        const T* x = rows[r0 + r];
        alignas(64) float pat[kVec];
        const float x0 = to_f(x[2 * kk]), x1 = 2 * kk + 1 < k ? to_f(x[2 * kk + 1]) : 0.f;
        for (int l = 0; l < kVec; l += 2) {
          pat[l] = x0;
          pat[l + 1] = x1;
        }
        xp[r] = fVec::loadu(pat);
      }
      const T* wk = panel + kk * kW;
      for (int i = 0; i < kW; i += kVec) {
        const fVec wv = load_f(wk + i);
        for (int r = 0; r < mb; ++r)
          at::vec::fmadd(xp[r], wv, fVec::loadu(sums[r] + i)).store(sums[r] + i);
      }
    }
    for (int r = 0; r < mb; ++r)
      for (int j = 0; j < kPanel; ++j)
        acc[(r0 + r) * kPanel + j] = sums[r][2 * j] + sums[r][2 * j + 1];
  }
}

// e4m3 -> fp32 by bit operations (as csrc/cpu/fp8_gemm.cpp): the 7 magnitude bits shifted into
// fp32's exponent/mantissa fields give the value times 2^-120 (subnormals too), the sign moves to
// bit 31; one multiply by 2^120 rescales. kVec consecutive codes per call.
static inline fVec load_e4m3(const uint8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i mag = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x7F)), 20);
  const __m512i sgn = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x80)), 24);
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(mag, sgn)), _mm512_set1_ps(0x1p120f));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x7F)), 20);
  const __m256i sgn = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x80)), 24);
  return _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(mag, sgn)), _mm256_set1_ps(0x1p120f));
#else
  alignas(64) float t[kVec];
  for (int i = 0; i < kVec; ++i) {
    const uint32_t bits = (static_cast<uint32_t>(p[i] & 0x7F) << 20) |
                          (static_cast<uint32_t>(p[i] & 0x80) << 24);
    std::memcpy(&t[i], &bits, 4);
    t[i] *= 0x1p120f;
  }
  return fVec::loadu(t);
#endif
}

// acc[r * 64 + j] = sum_k rows[r][k] * W[j][k] * scale[k / bk][j] for one packed e4m3 panel
// [ceil(K/2), 64, 2] and its scales [ceil(K/bk), 64]: panel_generic's loop over K pairs with the
// codes widened in registers, its sums folded into the totals with each K-block's scales.
template <typename T>
static void panel_fp8(const T* const* rows, int m, const uint8_t* panel, const float* scales,
                      int64_t k, int64_t bk, float* acc) {
  constexpr int kW = 2 * kPanel;
  const int64_t kpairs = (k + 1) / 2, block_pairs = (std::min(bk, k) + 1) / 2;
  const int64_t nblocks = (kpairs + block_pairs - 1) / block_pairs;
  for (int r0 = 0; r0 < m; r0 += kGenericMB) {
    const int mb = std::min(kGenericMB, m - r0);
    alignas(64) float total[kGenericMB][kW] = {};
    for (int64_t b = 0; b < nblocks; ++b) {
      alignas(64) float sums[kGenericMB][kW] = {};
      const int64_t kk1 = std::min(kpairs, (b + 1) * block_pairs);
      for (int64_t kk = b * block_pairs; kk < kk1; ++kk) {
        fVec xp[kGenericMB];
        for (int r = 0; r < mb; ++r) {
          const T* x = rows[r0 + r];
          alignas(64) float pat[kVec];
          const float x0 = to_f(x[2 * kk]), x1 = 2 * kk + 1 < k ? to_f(x[2 * kk + 1]) : 0.f;
          for (int l = 0; l < kVec; l += 2) {
            pat[l] = x0;
            pat[l + 1] = x1;
          }
          xp[r] = fVec::loadu(pat);
        }
        const uint8_t* wk = panel + kk * kW;
        for (int i = 0; i < kW; i += kVec) {
          const fVec wv = load_e4m3(wk + i);
          for (int r = 0; r < mb; ++r)
            at::vec::fmadd(xp[r], wv, fVec::loadu(sums[r] + i)).store(sums[r] + i);
        }
      }
      alignas(64) float sp[kW];  // output j's scale at lanes 2j and 2j + 1, as the sums
      for (int j = 0; j < kPanel; ++j) sp[2 * j] = sp[2 * j + 1] = scales[b * kPanel + j];
      for (int i = 0; i < kW; i += kVec) {
        const fVec sv = fVec::loadu(sp + i);
        for (int r = 0; r < mb; ++r)
          at::vec::fmadd(fVec::loadu(sums[r] + i), sv, fVec::loadu(total[r] + i)).store(total[r] + i);
      }
    }
    for (int r = 0; r < mb; ++r)
      for (int j = 0; j < kPanel; ++j)
        acc[(r0 + r) * kPanel + j] = total[r][2 * j] + total[r][2 * j + 1];
  }
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kBf16MB = 6;  // 6 rows x 4 vectors of accumulators + 4 weight vectors

// acc[m][t] += (x_m[2kk], x_m[2kk+1]) . the weight pairs of outputs 16t..16t+15 (one K pair)
template <int MB>
__attribute__((target("avx512bf16"))) static inline void bf16_step(__m512 (&a)[MB][4],
                                                                  const c10::BFloat16* wk,
                                                                  const int32_t* pairs) {
  const __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 32),
                w2 = _mm512_loadu_si512(wk + 64), w3 = _mm512_loadu_si512(wk + 96);
  for (int m = 0; m < MB; ++m) {
    const __m512bh xb = (__m512bh)_mm512_set1_epi32(pairs[m]);
    a[m][0] = _mm512_dpbf16_ps(a[m][0], xb, (__m512bh)w0);
    a[m][1] = _mm512_dpbf16_ps(a[m][1], xb, (__m512bh)w1);
    a[m][2] = _mm512_dpbf16_ps(a[m][2], xb, (__m512bh)w2);
    a[m][3] = _mm512_dpbf16_ps(a[m][3], xb, (__m512bh)w3);
  }
}

// acc [MB, 64] = the sums over K pairs [kk0, ceil(K/2)), added to acc's sums over [0, kk0) when
// kk0 > 0 (the tiles' share).
template <int MB>
__attribute__((target("avx512bf16"))) static void panel_bf16_block(
    const c10::BFloat16* const* rows, const c10::BFloat16* panel, int64_t k, int64_t kk0,
    bool prefetch, float* acc) {
  __m512 a[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t)
      a[m][t] = kk0 > 0 ? _mm512_loadu_ps(acc + m * kPanel + 16 * t) : _mm512_setzero_ps();
  const int64_t kfull = k / 2;
  int32_t pairs[MB];
  for (int64_t kk = kk0; kk < kfull; ++kk) {
    const c10::BFloat16* wk = panel + kk * 2 * kPanel;
    // all four lines of the pair row 16 KiB ahead into L2, as linear_packed's decode rows
    if (prefetch)
      for (int l = 0; l < 4; ++l) __builtin_prefetch(wk + 64 * 2 * kPanel + 32 * l, 0, 2);
    for (int m = 0; m < MB; ++m) std::memcpy(&pairs[m], rows[m] + 2 * kk, 4);
    bf16_step<MB>(a, wk, pairs);
  }
  if (k & 1) {  // the last pair is (x[K-1], 0); the packed weight is zero there
    for (int m = 0; m < MB; ++m) {
      c10::BFloat16 last[2] = {rows[m][k - 1], c10::BFloat16(0.f)};
      std::memcpy(&pairs[m], last, 4);
    }
    bf16_step<MB>(a, panel + kfull * 2 * kPanel, pairs);
  }
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t) _mm512_storeu_ps(acc + m * kPanel + 16 * t, a[m][t]);
}

// kk0 > 0: acc holds the sums over K pairs [0, kk0) already (panel_amx's tail).
static void panel_bf16(const c10::BFloat16* const* rows, int m, const c10::BFloat16* panel,
                       int64_t k, int64_t kk0, float* acc) {
  for (int r0 = 0; r0 < m; r0 += kBf16MB) {
    const bool pf = r0 == 0 && kk0 == 0;  // the first pass streams the panel from memory
    const c10::BFloat16* const* r = rows + r0;
    float* a = acc + r0 * kPanel;
    switch (std::min(kBf16MB, m - r0)) {
      case 1: panel_bf16_block<1>(r, panel, k, kk0, pf, a); break;
      case 2: panel_bf16_block<2>(r, panel, k, kk0, pf, a); break;
      case 3: panel_bf16_block<3>(r, panel, k, kk0, pf, a); break;
      case 4: panel_bf16_block<4>(r, panel, k, kk0, pf, a); break;
      case 5: panel_bf16_block<5>(r, panel, k, kk0, pf, a); break;
      default: panel_bf16_block<6>(r, panel, k, kk0, pf, a); break;
    }
  }
}

// ---- AMX: 16-row blocks of a chunk's contiguous rows through tile registers -------------------
// As gemm.cpp's linear_packed: amx_panel_block (amx.h) takes K in steps of 32 (16 pairs); the
// pairs past the last full step (K mod 32, an odd K's last pair) go through panel_bf16_block,
// starting from the tile sums.
constexpr int64_t kAmxPairs = 16;
constexpr int kAmxMinRows = 4;  // fewer rows: the vdpbf16ps blocks (as linear_packed)

// acc [m, 64] for rows.m rows at rows.base (acc has room for m rounded up to 16 rows). The tile
// configuration is loaded per call: a chunk's work (up to kRows rows x K x 64) dwarfs it.
static void panel_amx(const ChunkRows<c10::BFloat16>& rows, const c10::BFloat16* panel, int64_t k,
                      float* acc) {
  const int64_t kmain = k / 32 * kAmxPairs;
  if (kmain > 0) {
    amx_config_full_tiles();
    for (int r0 = 0; r0 < rows.m; r0 += kTileRows)
      amx_panel_block(rows.base + r0 * rows.stride, rows.stride, panel, kmain, acc + r0 * kPanel);
    amx_release();
  }
  if (kmain < (k + 1) / 2) panel_bf16(rows.ptr, rows.m, panel, k, kmain, acc);
}

static bool use_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") &&
                         std::getenv("OCTAVO_CPU_NO_AVX512BF16") == nullptr;
  return ok;
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// AVX2 + FMA panels for decode-sized token counts: the weights stream from memory once per call
// and every FMA reads registers only. A panel's K pair holds 128 values (64 outputs x 2); the
// micro-kernels take vectors [v0, v0 + NV) of each pair block and MB rows, keeping the MB x NV
// accumulators in the 16 ymm registers (MB * NV <= 12 leaves room for weights and broadcasts).
constexpr int kPrefetchPairs = 16;  // prefetch 16 K pairs ahead (4 KiB of bf16, 8 KiB of fp32)

// bf16: 8 vectors per K pair, each the (w[j][2kk], w[j][2kk+1]) words of 8 outputs 8v..8v+7.
// A word's low half widens with a 16-bit shift, its high half with a mask: both are fp32 bits.
template <int MB, int NV>
static void avx2_bf16_block(const c10::BFloat16* const* rows, const c10::BFloat16* panel,
                            int64_t k, int v0, bool prefetch, float* acc) {
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 a[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) a[m][v] = _mm256_setzero_ps();
  const int64_t kpairs = (k + 1) / 2, kfull = k / 2;
  for (int64_t kk = 0; kk < kpairs; ++kk) {
    const c10::BFloat16* wk = panel + kk * 2 * kPanel + v0 * 16;
    if (prefetch && kk + kPrefetchPairs < kpairs)
      for (int l = 0; l < NV * 32; l += 64)  // one cache line per 2 vectors
        __builtin_prefetch(reinterpret_cast<const char*>(wk + kPrefetchPairs * 2 * kPanel) + l, 0, 3);
    __m256 x0[MB], x1[MB];
    for (int m = 0; m < MB; ++m) {
      int32_t word;
      if (kk < kfull) {
        std::memcpy(&word, rows[m] + 2 * kk, 4);
      } else {  // odd K: the last pair is (x[K-1], 0), its packed weight zero
        const c10::BFloat16 last[2] = {rows[m][k - 1], c10::BFloat16(0.f)};
        std::memcpy(&word, last, 4);
      }
      const __m256i xw = _mm256_set1_epi32(word);
      x0[m] = _mm256_castsi256_ps(_mm256_slli_epi32(xw, 16));
      x1[m] = _mm256_castsi256_ps(_mm256_and_si256(xw, hi_mask));
    }
    for (int v = 0; v < NV; ++v) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 16 * v));
      const __m256 wlo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
      const __m256 whi = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
      for (int m = 0; m < MB; ++m)
        a[m][v] = _mm256_fmadd_ps(x1[m], whi, _mm256_fmadd_ps(x0[m], wlo, a[m][v]));
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + m * kPanel + 8 * (v0 + v), a[m][v]);
}

// fp32: 16 vectors per K pair, each (w[j][2kk], w[j][2kk+1]) of 4 outputs 4v..4v+3, multiplied
// by (x[2kk], x[2kk+1]) repeated (one 8-byte broadcast); the lane pairs are added at the end.
template <int MB, int NV>
static void avx2_f32_block(const float* const* rows, const float* panel, int64_t k, int v0,
                           bool prefetch, float* acc) {
  __m256 a[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) a[m][v] = _mm256_setzero_ps();
  const int64_t kpairs = (k + 1) / 2, kfull = k / 2;
  for (int64_t kk = 0; kk < kpairs; ++kk) {
    const float* wk = panel + kk * 2 * kPanel + v0 * 8;
    if (prefetch && kk + kPrefetchPairs < kpairs)
      for (int l = 0; l < NV * 32; l += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(wk + kPrefetchPairs * 2 * kPanel) + l, 0, 3);
    __m256 xp[MB];
    for (int m = 0; m < MB; ++m) {
      double pair;
      if (kk < kfull) {
        std::memcpy(&pair, rows[m] + 2 * kk, 8);
      } else {
        const float last[2] = {rows[m][k - 1], 0.f};
        std::memcpy(&pair, last, 8);
      }
      xp[m] = _mm256_castpd_ps(_mm256_set1_pd(pair));
    }
    for (int v = 0; v < NV; ++v) {
      const __m256 w = _mm256_loadu_ps(wk + 8 * v);
      for (int m = 0; m < MB; ++m) a[m][v] = _mm256_fmadd_ps(xp[m], w, a[m][v]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) {
      alignas(32) float s[8];
      _mm256_store_ps(s, a[m][v]);
      float* dst = acc + m * kPanel + 4 * (v0 + v);
      for (int l = 0; l < 4; ++l) dst[l] = s[2 * l] + s[2 * l + 1];
    }
}

// acc[r * 64 + j] = sum_k rows[r][k] * W[j][k] over one packed panel. One row takes all 64
// outputs in one pass (8 accumulators; fp32: two 32-output passes); more rows go 32 outputs
// at a time, 3 rows per pass, so the half panel is re-read from cache, not memory.
template <typename T>
static void panel_avx2(const T* const* rows, int m, const T* panel, int64_t k, float* acc) {
  constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
  constexpr int kVecs = bf16 ? 8 : 16;  // vectors per K pair
  auto block = [&](auto mb, auto nv, int r0, int v0) {
    constexpr int MB = decltype(mb)::value, NV = decltype(nv)::value;
    const bool pf = r0 == 0;  // the first pass over a column range streams it from memory
    if constexpr (bf16)
      avx2_bf16_block<MB, NV>(rows + r0, panel, k, v0, pf, acc + r0 * kPanel);
    else
      avx2_f32_block<MB, NV>(rows + r0, panel, k, v0, pf, acc + r0 * kPanel);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  using I4 = std::integral_constant<int, 4>;
  using I8 = std::integral_constant<int, 8>;
  if (m == 1) {
    if constexpr (bf16) {
      block(I1{}, I8{}, 0, 0);
    } else {
      block(I1{}, std::integral_constant<int, 16>{}, 0, 0);
    }
    return;
  }
  for (int v0 = 0; v0 < kVecs; v0 += 4) {
    int r0 = 0;
    for (; r0 + 3 <= m; r0 += 3) block(I3{}, I4{}, r0, v0);
    if (m - r0 == 2) block(I2{}, I4{}, r0, v0);
    if (m - r0 == 1) block(I1{}, I4{}, r0, v0);
  }
}
#endif

// (expert, panel) work items over the experts that received at least one pair.
static std::vector<std::pair<int64_t, int64_t>> expert_tasks(const MoeParams& p, int64_t panels) {
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t e = 0; e < p.num_experts; ++e)
    if (p.expert_start[e + 1] > p.expert_start[e])
      for (int64_t q = 0; q < panels; ++q) tasks.emplace_back(e, q);
  return tasks;
}

// The hidden rows of the pairs in expert order, [T * top_k + 16, H] (the 16 rows after the last
// zeroed for the tiles), so that each expert's gate/up rows are contiguous like the down rows.
template <typename T>
static std::unique_ptr<T[]> gather_rows(const MoeParams& p) {
  const int64_t pairs = p.num_tokens * p.top_k, h = p.hidden_size;
  std::unique_ptr<T[]> xg(new T[(pairs + kTileRows) * h]);
  const T* hidden = static_cast<const T*>(p.hidden);
  at::parallel_for(0, pairs, std::max<int64_t>(1, 16384 / h), [&](int64_t b, int64_t end) {
    for (int64_t pos = b; pos < end; ++pos)
      std::memcpy(xg.get() + pos * h, hidden + (p.pair_order[pos] / p.top_k) * p.hidden_stride,
                  h * sizeof(T));
  });
  std::memset(static_cast<void*>(xg.get() + pairs * h), 0, kTileRows * h * sizeof(T));
  return xg;
}

// panel_gemm(rows, panel, scales, k, block_k, acc) with rows a ChunkRows<T>: W is the weights'
// element type (T, or uint8_t e4m3 codes with scales; the others ignore scales). gather: copy the
// routed hidden rows into expert order first (gather_rows), so gate/up rows get a base too.
template <typename T, typename W, class Panel>
static void moe_impl(const MoeParams& p, bool gather, Panel panel_gemm) {
  const T* hidden = static_cast<const T*>(p.hidden);
  const W* w13 = static_cast<const W*>(p.w13);
  const W* w2 = static_cast<const W*>(p.w2);
  T* inter = static_cast<T*>(p.inter);
  const int64_t h = p.hidden_size, i = p.inter_size;
  const int64_t pi = (i + kPanel - 1) / kPanel, ph = (h + kPanel - 1) / kPanel;
  const int64_t panel_h = (h + 1) / 2 * 2 * kPanel, panel_i = (i + 1) / 2 * 2 * kPanel;
  // scale rows per panel: ceil(K / block_k) blocks of 64 outputs
  const int64_t sc13 = p.w13_scale ? (h + p.block_k13 - 1) / p.block_k13 * kPanel : 0;
  const int64_t sc2 = p.w2_scale ? (i + p.block_k2 - 1) / p.block_k2 * kPanel : 0;

  // 1. inter[row, 64q..] = act(gate) * up for one 64-column panel pair of one expert
  const std::unique_ptr<T[]> xg = gather ? gather_rows<T>(p) : nullptr;
  const auto up_tasks = expert_tasks(p, pi);
  at::parallel_for(0, static_cast<int64_t>(up_tasks.size()), 1, [&](int64_t b, int64_t end) {
    alignas(64) float g[kRows * kPanel], u[kRows * kPanel];
    const T* rows[kRows];
    for (int64_t task = b; task < end; ++task) {
      const auto [e, q] = up_tasks[task];
      const W* gate = w13 + (e * pi + q) * 2 * panel_h;
      const float* gate_s = p.w13_scale ? p.w13_scale + (e * pi + q) * 2 * sc13 : nullptr;
      const int64_t s0 = p.expert_start[e], s1 = p.expert_start[e + 1];
      const int valid = static_cast<int>(std::min<int64_t>(kPanel, i - q * kPanel));
      for (int64_t c0 = s0; c0 < s1; c0 += kRows) {
        const int mc = static_cast<int>(std::min<int64_t>(kRows, s1 - c0));
        for (int r = 0; r < mc; ++r)
          rows[r] = xg ? xg.get() + (c0 + r) * h
                       : hidden + (p.pair_order[c0 + r] / p.top_k) * p.hidden_stride;
        const ChunkRows<T> cr{rows, xg ? xg.get() + c0 * h : nullptr, h, mc};
        panel_gemm(cr, gate, gate_s, h, p.block_k13, g);
        panel_gemm(cr, gate + panel_h, gate_s ? gate_s + sc13 : nullptr, h, p.block_k13, u);
        for (int r = 0; r < mc; ++r)
          act_mul(g + r * kPanel, u + r * kPanel, valid, p.act, inter + (c0 + r) * i + q * kPanel);
      }
    }
  });

  // 2. partial[pair, 64q..] = weight * (w2[e] @ inter row) for one output panel of one expert
  const auto down_tasks = expert_tasks(p, ph);
  at::parallel_for(0, static_cast<int64_t>(down_tasks.size()), 1, [&](int64_t b, int64_t end) {
    alignas(64) float y[kRows * kPanel];
    const T* rows[kRows];
    for (int64_t task = b; task < end; ++task) {
      const auto [e, q] = down_tasks[task];
      const W* panel = w2 + (e * ph + q) * panel_i;
      const float* panel_s = p.w2_scale ? p.w2_scale + (e * ph + q) * sc2 : nullptr;
      const int64_t s0 = p.expert_start[e], s1 = p.expert_start[e + 1];
      const int valid = static_cast<int>(std::min<int64_t>(kPanel, h - q * kPanel));
      for (int64_t c0 = s0; c0 < s1; c0 += kRows) {
        const int mc = static_cast<int>(std::min<int64_t>(kRows, s1 - c0));
        for (int r = 0; r < mc; ++r) rows[r] = inter + (c0 + r) * i;
        panel_gemm(ChunkRows<T>{rows, inter + c0 * i, i, mc}, panel, panel_s, i, p.block_k2, y);
        for (int r = 0; r < mc; ++r) {
          const int64_t pair = p.pair_order[c0 + r];
          const float wgt = p.topk_weights[pair];
          float* dst = p.partial + pair * h + q * kPanel;
          for (int j = 0; j < valid; ++j) dst[j] = wgt * y[r * kPanel + j];
        }
      }
    }
  });

  // 3. out[t] = sum over its top_k pairs, in slot order (deterministic)
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.num_tokens, 16, [&](int64_t b, int64_t end) {
    for (int64_t t = b; t < end; ++t) {
      const float* src = p.partial + t * p.top_k * h;
      T* dst = out + t * p.out_stride;
      for (int64_t c = 0; c < h; ++c) {
        float s = 0.f;
        for (int64_t j = 0; j < p.top_k; ++j) s += src[j * h + c];
        dst[c] = from_f<T>(s);
      }
    }
  });
}

// True when some expert gets at least `rows` pairs.
static bool any_expert_rows(const MoeParams& p, int64_t rows) {
  for (int64_t e = 0; e < p.num_experts; ++e)
    if (p.expert_start[e + 1] - p.expert_start[e] >= rows) return true;
  return false;
}

void fused_moe_kernel(const MoeParams& p) {
  if (p.w13_scale != nullptr) {
    OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] {
      moe_impl<scalar_t, uint8_t>(p, false, [](const ChunkRows<scalar_t>& r, const uint8_t* panel,
                                               const float* s, int64_t k, int64_t bk, float* acc) {
        panel_fp8<scalar_t>(r.ptr, r.m, panel, s, k, bk, acc);
      });
    });
    return;
  }
#if defined(CPU_CAPABILITY_AVX512)
  if (p.dtype == DType::kBFloat16 && use_avx512_bf16()) {
    using Rows = ChunkRows<c10::BFloat16>;
    if (use_amx() && any_expert_rows(p, kAmxMinRows)) {
      moe_impl<c10::BFloat16, c10::BFloat16>(
          p, true, [](const Rows& r, const c10::BFloat16* panel, const float*, int64_t k, int64_t,
                      float* acc) {
            if (r.base != nullptr && r.m >= kAmxMinRows) panel_amx(r, panel, k, acc);
            else panel_bf16(r.ptr, r.m, panel, k, 0, acc);
          });
      return;
    }
    moe_impl<c10::BFloat16, c10::BFloat16>(
        p, false, [](const Rows& r, const c10::BFloat16* panel, const float*, int64_t k, int64_t,
                     float* acc) { panel_bf16(r.ptr, r.m, panel, k, 0, acc); });
    return;
  }
#endif
#if defined(CPU_CAPABILITY_AVX2)
  if (p.dtype == DType::kBFloat16) {
    moe_impl<c10::BFloat16, c10::BFloat16>(
        p, false, [](const ChunkRows<c10::BFloat16>& r, const c10::BFloat16* panel, const float*,
                     int64_t k, int64_t, float* acc) { panel_avx2(r.ptr, r.m, panel, k, acc); });
    return;
  }
  if (p.dtype == DType::kFloat32) {
    moe_impl<float, float>(p, false, [](const ChunkRows<float>& r, const float* panel, const float*,
                                        int64_t k, int64_t, float* acc) {
      panel_avx2(r.ptr, r.m, panel, k, acc);
    });
    return;
  }
#endif
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] {
    moe_impl<scalar_t, scalar_t>(p, false, [](const ChunkRows<scalar_t>& r, const scalar_t* panel,
                                              const float*, int64_t k, int64_t, float* acc) {
      panel_generic<scalar_t>(r.ptr, r.m, panel, k, acc);
    });
  });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <ATen/ATen.h>

#include <vector>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "cpu/moe_checks.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(fused_moe_kernel, MoeParams)

namespace octavo {
namespace {

// Picks k of n values by repeated arg-max; the lower index wins ties (as a stable sort).
void pick_top(const float* v, int64_t n, int64_t k, std::vector<char>& taken, int32_t* ids) {
  std::fill(taken.begin(), taken.begin() + n, 0);
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < n; ++e)
      if (!taken[e] && (best < 0 || v[e] > v[best])) best = e;
    taken[best] = 1;
    ids[j] = static_cast<int32_t>(best);
  }
}

// Counting sort of the pairs by expert: fills order [n] and start [E + 1]; checks the ids.
void group_pairs(const at::Tensor& topk_ids, int64_t num_experts, std::vector<int32_t>& order,
                 std::vector<int64_t>& start) {
  const int32_t* ids = topk_ids.data_ptr<int32_t>();
  const int64_t n = topk_ids.numel();
  start.assign(num_experts + 1, 0);
  for (int64_t pair = 0; pair < n; ++pair) {
    TORCH_CHECK(ids[pair] >= 0 && ids[pair] < num_experts, "moe: expert id ", ids[pair],
                " out of range [0, ", num_experts, ")");
    ++start[ids[pair] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  order.resize(n);
  for (int64_t pair = 0; pair < n; ++pair) order[cursor[ids[pair]]++] = static_cast<int32_t>(pair);
}

// [E, N, K] -> [E, ceil(N/64), ceil(K/2), 64, 2] (ops_native.pack_moe_panels)
at::Tensor pack_panels(const at::Tensor& w) {
  const int64_t e = w.size(0), n = w.size(1), k = w.size(2);
  const int64_t n_pad = (64 - n % 64) % 64, k_pad = k % 2;
  at::Tensor padded = at::constant_pad_nd(w, {0, k_pad, 0, n_pad}, 0);
  return padded.view({e, (n + n_pad) / 64, 64, (k + k_pad) / 2, 2}).permute({0, 1, 3, 2, 4}).contiguous();
}

// [E, N, Kb] fp32 row scales -> [E, ceil(N/64), Kb, 64] (ops_native.pack_moe_fp8_scales)
at::Tensor pack_scale_panels(const at::Tensor& s) {
  const int64_t e = s.size(0), n = s.size(1), kb = s.size(2), n_pad = (64 - n % 64) % 64;
  at::Tensor padded = at::constant_pad_nd(s, {0, 0, 0, n_pad}, 0);
  return padded.view({e, (n + n_pad) / 64, 64, kb}).permute({0, 1, 3, 2}).contiguous();
}

}  // namespace

void topk_routing_cpu(at::Tensor& topk_weights, at::Tensor& topk_ids,
                      const at::Tensor& gating_output, const std::string& scoring,
                      bool renormalize, const std::optional<at::Tensor>& bias, int64_t n_group,
                      int64_t topk_group, const std::string& group_score,
                      double routed_scaling_factor) {
  OCTAVO_CHECK_CPU(gating_output);
  TORCH_CHECK(gating_output.dim() == 2, "topk_routing: gating_output must be [T, E], got ",
              gating_output.sizes());
  const int64_t t = gating_output.size(0), e = gating_output.size(1), k = topk_ids.size(-1);
  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == t && topk_weights.size(1) == k &&
                  topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
              "topk_routing: topk_weights must be a contiguous [T, k] float32 tensor");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == t && topk_ids.scalar_type() == at::kInt &&
                  topk_ids.is_contiguous(),
              "topk_routing: topk_ids must be a contiguous [T, k] int32 tensor");
  TORCH_CHECK(scoring == "softmax" || scoring == "sigmoid", "topk_routing: scoring must be "
              "'softmax' or 'sigmoid', got '", scoring, "'");
  TORCH_CHECK(group_score == "max" || group_score == "top2_sum", "topk_routing: group_score must "
              "be 'max' or 'top2_sum', got '", group_score, "'");
  TORCH_CHECK(n_group >= 1 && e % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
              "topk_routing: n_group must divide E and 1 <= topk_group <= n_group");
  const int64_t gsize = e / n_group;
  TORCH_CHECK(k >= 1 && k <= (n_group > 1 ? topk_group * gsize : e),
              "topk_routing: top_k out of range for the experts of the chosen groups");
  TORCH_CHECK(!(n_group > 1 && group_score == "top2_sum" && gsize < 2),
              "topk_routing: top2_sum needs 2 experts per group");
  at::Tensor logits = gating_output.to(at::kFloat).contiguous();  // [T, E]
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == e, "topk_routing: bias must be [E]");
    b = bias->to(at::kFloat).contiguous();
  }
  const float* lp = logits.data_ptr<float>();
  const float* bp = bias.has_value() ? b.data_ptr<float>() : nullptr;
  float* wout = topk_weights.data_ptr<float>();
  int32_t* iout = topk_ids.data_ptr<int32_t>();
  const bool softmax = scoring == "softmax", top2 = group_score == "top2_sum";
  at::parallel_for(0, t, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> score(e), choice(e), gscore(n_group);
    std::vector<char> taken(std::max(e, n_group));
    std::vector<int32_t> groups(topk_group), top2ids(2);
    for (int64_t tok = begin; tok < end; ++tok) {
      const float* x = lp + tok * e;
      if (softmax) {
        float mx = x[0], sum = 0.f;
        for (int64_t j = 1; j < e; ++j) mx = std::max(mx, x[j]);
        for (int64_t j = 0; j < e; ++j) sum += (score[j] = std::exp(x[j] - mx));
        for (int64_t j = 0; j < e; ++j) score[j] /= sum;
      } else {
        for (int64_t j = 0; j < e; ++j) score[j] = 1.f / (1.f + std::exp(-x[j]));
      }
      for (int64_t j = 0; j < e; ++j) choice[j] = score[j] + (bp ? bp[j] : 0.f);
      if (n_group > 1) {
        for (int64_t g = 0; g < n_group; ++g) {
          const float* c = choice.data() + g * gsize;
          if (top2) {
            pick_top(c, gsize, 2, taken, top2ids.data());
            gscore[g] = c[top2ids[0]] + c[top2ids[1]];
          } else {
            gscore[g] = *std::max_element(c, c + gsize);
          }
        }
        pick_top(gscore.data(), n_group, topk_group, taken, groups.data());
        std::vector<char> keep(n_group, 0);
        for (int32_t g : groups) keep[g] = 1;
        for (int64_t j = 0; j < e; ++j)
          if (!keep[j / gsize]) choice[j] = -INFINITY;
      }
      int32_t* ids = iout + tok * k;
      float* w = wout + tok * k;
      pick_top(choice.data(), e, k, taken, ids);
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += (w[j] = score[ids[j]]);
      const float scale = static_cast<float>(routed_scaling_factor) / (renormalize ? sum : 1.f);
      for (int64_t j = 0; j < k; ++j) w[j] *= scale;
    }
  });
}

void moe_align_cpu(at::Tensor& sorted_token_ids, at::Tensor& expert_ids,
                   at::Tensor& num_tokens_post_pad, const at::Tensor& topk_ids,
                   int64_t num_experts, int64_t block_size) {
  OCTAVO_CHECK_CPU(topk_ids);
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.scalar_type() == at::kInt && topk_ids.is_contiguous(),
              "moe_align: topk_ids must be a contiguous [T, k] int32 tensor");
  TORCH_CHECK(num_experts >= 1 && block_size >= 1, "moe_align: num_experts and block_size must be positive");
  const int64_t n = topk_ids.numel();
  const int64_t p = sorted_token_ids.numel(), nblocks = expert_ids.numel();
  for (const at::Tensor* o : std::initializer_list<const at::Tensor*>{&sorted_token_ids, &expert_ids, &num_tokens_post_pad})
    TORCH_CHECK(o->scalar_type() == at::kInt && o->is_contiguous() && o->dim() == 1,
                "moe_align: outputs must be contiguous 1-D int32 tensors");
  TORCH_CHECK(p % block_size == 0 && nblocks == p / block_size && num_tokens_post_pad.numel() == 1,
              "moe_align: outputs must be [P], [P / block_size], [1] (ops_native.moe_align_sizes)");
  std::vector<int32_t> order;
  std::vector<int64_t> start;
  group_pairs(topk_ids, num_experts, order, start);
  int32_t* s = sorted_token_ids.data_ptr<int32_t>();
  int32_t* ex = expert_ids.data_ptr<int32_t>();
  std::fill(s, s + p, static_cast<int32_t>(n));
  std::fill(ex, ex + nblocks, -1);
  int64_t pos = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t c = start[e + 1] - start[e];
    if (c == 0) continue;
    const int64_t padded = (c + block_size - 1) / block_size * block_size;
    TORCH_CHECK(pos + padded <= p, "moe_align: sorted_token_ids is too short");
    std::copy(order.begin() + start[e], order.begin() + start[e + 1], s + pos);
    std::fill(ex + pos / block_size, ex + (pos + padded) / block_size, static_cast<int32_t>(e));
    pos += padded;
  }
  num_tokens_post_pad.data_ptr<int32_t>()[0] = static_cast<int32_t>(pos);
}

namespace {

// e4m3 experts: codes [E, ceil(N/64), ceil(K/2), 64, 2] beside fp32 scales [.., ceil(K/bk), 64]
struct Fp8Scales {
  const at::Tensor& w13;  // [E, ceil(I/64), 2, ceil(H / block_k13), 64]
  const at::Tensor& w2;   // [E, ceil(H/64), ceil(I / block_k2), 64]
  int64_t block_k13, block_k2;
};

void check_fp8_scales(const Fp8Scales& s, int64_t e, int64_t h, int64_t i) {
  OCTAVO_CHECK_CPU(s.w13);
  OCTAVO_CHECK_CPU(s.w2);
  for (int64_t bk : {s.block_k13, s.block_k2})
    TORCH_CHECK(bk >= 1, "fused_moe_fp8: block_k must be positive, got ", bk);
  // a K pair of the panels must not straddle two scale blocks
  TORCH_CHECK((s.block_k13 % 2 == 0 || s.block_k13 >= h) && (s.block_k2 % 2 == 0 || s.block_k2 >= i),
              "fused_moe_fp8: block_k must be even unless one block spans all of K, got ",
              s.block_k13, " and ", s.block_k2);
  const int64_t kb13 = (h + s.block_k13 - 1) / s.block_k13, kb2 = (i + s.block_k2 - 1) / s.block_k2;
  TORCH_CHECK(s.w13.scalar_type() == at::kFloat && s.w13.is_contiguous() && s.w13.dim() == 5 &&
                  s.w13.size(0) == e && s.w13.size(1) == (i + 63) / 64 && s.w13.size(2) == 2 &&
                  s.w13.size(3) == kb13 && s.w13.size(4) == 64,
              "fused_moe_fp8: w13_scale must be a contiguous float32 [", e, ", ", (i + 63) / 64,
              ", 2, ", kb13, ", 64] tensor (ops_native.pack_moe_fp8_scales), got ", s.w13.sizes());
  TORCH_CHECK(s.w2.scalar_type() == at::kFloat && s.w2.is_contiguous() && s.w2.dim() == 4 &&
                  s.w2.size(0) == e && s.w2.size(1) == (h + 63) / 64 && s.w2.size(2) == kb2 &&
                  s.w2.size(3) == 64,
              "fused_moe_fp8: w2_scale must be a contiguous float32 [", e, ", ", (h + 63) / 64,
              ", ", kb2, ", 64] tensor (ops_native.pack_moe_fp8_scales), got ", s.w2.sizes());
}

// The packed launchers' checks and run; fp8 null: weights in hidden's dtype.
void moe_packed(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13_packed,
                const at::Tensor& w2_packed, const Fp8Scales* fp8, const at::Tensor& topk_weights,
                const at::Tensor& topk_ids, int64_t inter_size, const std::string& activation) {
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&out, &hidden, &w13_packed, &w2_packed, &topk_weights, &topk_ids})
    OCTAVO_CHECK_CPU(*x);
  TORCH_CHECK(hidden.dim() == 2 && out.sizes() == hidden.sizes(),
              "fused_moe: hidden and out must be [T, H], got ", hidden.sizes(), " and ", out.sizes());
  OCTAVO_CHECK_SAME_DTYPE(hidden, out);
  if (fp8 != nullptr) {
    for (const at::Tensor* w : {&w13_packed, &w2_packed})
      TORCH_CHECK(w->scalar_type() == at::kByte || w->scalar_type() == at::kFloat8_e4m3fn,
                  "fused_moe_fp8: packed weights must be e4m3 codes (uint8 or float8_e4m3fn), got ",
                  w->scalar_type());
  } else {
    OCTAVO_CHECK_SAME_DTYPE(hidden, w13_packed);
    OCTAVO_CHECK_SAME_DTYPE(hidden, w2_packed);
  }
  OCTAVO_CHECK_LAST_CONTIG(hidden);
  OCTAVO_CHECK_LAST_CONTIG(out);
  const int64_t t = hidden.size(0), h = hidden.size(1), i = inter_size, e = w13_packed.size(0);
  TORCH_CHECK(w13_packed.dim() == 6 && w13_packed.size(1) == (i + 63) / 64 && w13_packed.size(2) == 2 &&
                  w13_packed.size(3) == (h + 1) / 2 && w13_packed.size(4) == 64 &&
                  w13_packed.size(5) == 2 && w13_packed.is_contiguous(),
              "fused_moe: w13_packed must be a contiguous [E, ", (i + 63) / 64, ", 2, ", (h + 1) / 2,
              ", 64, 2] tensor (ops_native.pack_moe_weights), got ", w13_packed.sizes());
  TORCH_CHECK(w2_packed.dim() == 5 && w2_packed.size(0) == e && w2_packed.size(1) == (h + 63) / 64 &&
                  w2_packed.size(2) == (i + 1) / 2 && w2_packed.size(3) == 64 &&
                  w2_packed.size(4) == 2 && w2_packed.is_contiguous(),
              "fused_moe: w2_packed must be a contiguous [", e, ", ", (h + 63) / 64, ", ", (i + 1) / 2,
              ", 64, 2] tensor (ops_native.pack_moe_weights), got ", w2_packed.sizes());
  cpu::check_moe_routing(topk_ids, topk_weights, t, "fused_moe");
  const int act = cpu::moe_activation_kind(activation, "fused_moe");
  if (fp8 != nullptr) check_fp8_scales(*fp8, e, h, i);
  if (t == 0 || h == 0) return;
  const int64_t k = topk_ids.size(1);
  std::vector<int32_t> order;
  std::vector<int64_t> start;
  group_pairs(topk_ids, e, order, start);
  // 16 rows past the last: the tiles' reads of a last partial 16-row block
  at::Tensor inter = at::empty({t * k + 16, i}, hidden.options());
  inter.narrow(0, t * k, 16).zero_();
  at::Tensor partial = at::empty({t * k, h}, hidden.options().dtype(at::kFloat));
  cpu::MoeParams p{};
  p.out = out.data_ptr();
  p.hidden = hidden.data_ptr();
  p.w13 = w13_packed.data_ptr();
  p.w2 = w2_packed.data_ptr();
  p.topk_weights = topk_weights.data_ptr<float>();
  p.pair_order = order.data();
  p.expert_start = start.data();
  p.inter = inter.data_ptr();
  p.partial = partial.data_ptr<float>();
  p.out_stride = out.stride(0);
  p.hidden_stride = hidden.stride(0);
  p.num_tokens = t;
  p.hidden_size = h;
  p.inter_size = i;
  p.top_k = k;
  p.num_experts = e;
  p.act = act;
  p.dtype = cpu::to_dtype(hidden, "fused_moe");
  if (fp8 != nullptr) {
    p.w13_scale = fp8->w13.data_ptr<float>();
    p.w2_scale = fp8->w2.data_ptr<float>();
    p.block_k13 = fp8->block_k13;
    p.block_k2 = fp8->block_k2;
  }
  if (k == 0) {
    out.zero_();
    return;
  }
  OCTAVO_CALL_CPU_KERNEL(fused_moe_kernel, p);
}

}  // namespace

void fused_moe_packed_cpu(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13_packed,
                          const at::Tensor& w2_packed, const at::Tensor& topk_weights,
                          const at::Tensor& topk_ids, int64_t inter_size,
                          const std::string& activation) {
  moe_packed(out, hidden, w13_packed, w2_packed, nullptr, topk_weights, topk_ids, inter_size,
             activation);
}

void fused_moe_fp8_packed_cpu(at::Tensor& out, const at::Tensor& hidden,
                              const at::Tensor& w13_packed, const at::Tensor& w2_packed,
                              const at::Tensor& w13_scale, const at::Tensor& w2_scale,
                              const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                              int64_t inter_size, int64_t block_k13, int64_t block_k2,
                              const std::string& activation) {
  const Fp8Scales fp8{w13_scale, w2_scale, block_k13, block_k2};
  moe_packed(out, hidden, w13_packed, w2_packed, &fp8, topk_weights, topk_ids, inter_size,
             activation);
}

void fused_moe_cpu(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13,
                   const at::Tensor& w2, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                   const std::string& activation) {
  OCTAVO_CHECK_CPU(w13);
  OCTAVO_CHECK_CPU(w2);
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(1) % 2 == 0 && w2.size(0) == w13.size(0) &&
                  w2.size(1) == w13.size(2) && w2.size(2) == w13.size(1) / 2,
              "fused_moe: w13 must be [E, 2I, H] and w2 [E, H, I], got ", w13.sizes(), " and ", w2.sizes());
  // Packs on every call: layers pack once with prepare_moe_weights and call fused_moe_packed.
  const int64_t i = w13.size(1) / 2;
  at::Tensor w13p = at::stack({pack_panels(w13.narrow(1, 0, i)), pack_panels(w13.narrow(1, i, i))}, 2);
  fused_moe_packed_cpu(out, hidden, w13p, pack_panels(w2), topk_weights, topk_ids, i, activation);
}

void fused_moe_fp8_cpu(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& w13,
                       const at::Tensor& w2, const at::Tensor& w13_scale, const at::Tensor& w2_scale,
                       const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t block_k13,
                       int64_t block_k2, const std::string& activation) {
  for (const at::Tensor* x : {&w13, &w2, &w13_scale, &w2_scale}) OCTAVO_CHECK_CPU(*x);
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(1) % 2 == 0 && w2.size(0) == w13.size(0) &&
                  w2.size(1) == w13.size(2) && w2.size(2) == w13.size(1) / 2,
              "fused_moe_fp8: w13 must be [E, 2I, H] and w2 [E, H, I], got ", w13.sizes(), " and ", w2.sizes());
  for (const at::Tensor* w : {&w13, &w2})
    TORCH_CHECK(w->scalar_type() == at::kByte || w->scalar_type() == at::kFloat8_e4m3fn,
                "fused_moe_fp8: w13 and w2 must be e4m3 codes (uint8 or float8_e4m3fn), got ",
                w->scalar_type());
  TORCH_CHECK(w13_scale.dim() == 3 && w13_scale.size(0) == w13.size(0) &&
                  w13_scale.size(1) == w13.size(1) && w2_scale.dim() == 3 &&
                  w2_scale.size(0) == w2.size(0) && w2_scale.size(1) == w2.size(1),
              "fused_moe_fp8: scales must be [E, 2I, K-blocks] and [E, H, K-blocks] "
              "(ops_native.fp8_moe_row_scales), got ", w13_scale.sizes(), " and ", w2_scale.sizes());
  // Packs on every call: layers pack once with prepare_moe_fp8_weights (fused_moe_fp8_packed).
  const int64_t i = w13.size(1) / 2;
  const at::Tensor c13 = w13.view(at::kByte), c2 = w2.view(at::kByte);
  const at::Tensor s13 = w13_scale.to(at::kFloat), s2 = w2_scale.to(at::kFloat);
  at::Tensor w13p = at::stack({pack_panels(c13.narrow(1, 0, i)), pack_panels(c13.narrow(1, i, i))}, 2);
  at::Tensor s13p = at::stack({pack_scale_panels(s13.narrow(1, 0, i)), pack_scale_panels(s13.narrow(1, i, i))}, 2);
  fused_moe_fp8_packed_cpu(out, hidden, w13p, pack_panels(c2), s13p, pack_scale_panels(s2),
                           topk_weights, topk_ids, i, block_k13, block_k2, activation);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
