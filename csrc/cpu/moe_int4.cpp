// Fused MoE over 4-bit experts on CPU: gate_up -> act-and-mul -> down -> weighted sum over top-k,
// with each expert's weights packed once by ops_native.prepare_moe_int4_weights (pack_int4_panels
// per expert: 32-output panels, K in pairs, output j's code in the low nibble and j+16's in the
// high one). Codes are unpacked in registers as in int4_gemm.cpp: fed to vdpbf16ps as bf16
// (128 + q) on avx512_bf16 CPUs with bf16 activations, widened to fp32 FMAs otherwise. Work is
// split over (expert, panel) so both threads stream weights even for one token and one expert.
// Act-order experts (GPTQ desc_act) carry w13_perm: each (token, expert) row is gathered in its
// expert's K order into the chunk's scratch before the gate_up GEMM (H values per row). On AMX
// CPUs, bf16 experts with 8 or more rows in a chunk run on tile registers (cpu/int4_amx.h): the
// routed rows are gathered into expert order with K zero padded to whole 32-wide steps.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/cpu_types.h"
#include "cpu/moe_act.h"
#include "cpu/int4_amx.h"

namespace octavo::cpu {

struct MoeInt4Params {
  void* out;                  // [T, H], row stride out_stride
  const void* hidden;         // [T, H], row stride hidden_stride
  const uint8_t* w13;         // [E, 2 * ceil(I/32), ceil(H/2), 32]: gate panels, then up panels
  const float* w13_so;        // [E, 2 * ceil(I/32), G13, 2, 32]: scales, then offsets
  const uint8_t* w2;          // [E, ceil(H/32), ceil(I/2), 32]
  const float* w2_so;         // [E, ceil(H/32), G2, 2, 32]
  const float* topk_weights;  // [T * top_k]
  const int32_t* topk_ids;    // [T * top_k], each in [0, E)
  const int32_t* w13_perm;    // [E, H] or null: packed w13 column c of expert e reads x[perm[e][c]]
  int64_t out_stride, hidden_stride;
  int64_t num_tokens, hidden_size, inter_size, top_k, num_experts;
  int64_t gs13, groups13, gs2, groups2;  // group size (even, or the whole K) and count per K
  int act;                    // 0 silu, 1 gelu (erf), 2 gelu (tanh)
  DType dtype;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int kP = 32;               // outputs per panel
constexpr int64_t kChunk = 1024;     // tokens per pass: bounds the scratch buffers

// One panel's weights and the K it spans; rows are zero padded to 2 * ceil(k/2).
struct Panel {
  const uint8_t* qw;  // [ceil(k/2), 32]
  const float* sz;    // [groups, 2, 32]
  int64_t k, gs, groups;
};

// Any CPU: fp32 math written over contiguous lanes so that it vectorizes (as int4_gemm.cpp's
// panel_generic): lane 2j+i holds output j (low nibble) or j+16 (high) at k = 2kk+i.
static void panel_generic(const Panel& w, const float* const* x, const float* const* xsum, int mb,
                          float* tot) {
  for (int i = 0; i < mb * kP; ++i) tot[i] = 0.f;
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t k0 = g * w.gs, k1 = std::min(w.k, k0 + w.gs);
    alignas(64) float acc[8][2 * kP] = {};
    for (int64_t kk = k0 / 2; kk < (k1 + 1) / 2; ++kk) {
      const uint8_t* b = w.qw + kk * kP;
      alignas(64) float lo[kP], hi[kP];
      for (int j = 0; j < kP; ++j) {
        lo[j] = static_cast<float>(b[j] & 15);
        hi[j] = static_cast<float>(b[j] >> 4);
      }
      for (int m = 0; m < mb; ++m) {
        const float x0 = x[m][2 * kk], x1 = x[m][2 * kk + 1];
        alignas(64) float xp[kP];
        for (int j = 0; j < kP; ++j) xp[j] = (j & 1) ? x1 : x0;
        for (int j = 0; j < kP; ++j) acc[m][j] += xp[j] * lo[j];
        for (int j = 0; j < kP; ++j) acc[m][kP + j] += xp[j] * hi[j];
      }
    }
    const float* s = w.sz + g * 2 * kP;
    for (int m = 0; m < mb; ++m) {
      const float xs = xsum[m][g];
      for (int j = 0; j < 16; ++j) {
        tot[m * kP + j] += (acc[m][2 * j] + acc[m][2 * j + 1]) * s[j] + xs * s[kP + j];
        tot[m * kP + 16 + j] +=
            (acc[m][kP + 2 * j] + acc[m][kP + 2 * j + 1]) * s[16 + j] + xs * s[kP + 16 + j];
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// AVX2 + FMA on fp32 rows: the panel in quarters of 8 bytes per K pair, each widened with one
// vpmovzxbd, low / high nibbles converted and FMA'd against the broadcast pair (x[2kk], x[2kk+1]);
// scales and offsets once per group on the partial sums (int4_gemm.cpp's panel_avx2).
template <int MB>
static void panel_avx2(const Panel& w, const float* const* x, const float* const* xsum,
                       float* tot) {
  alignas(32) float t[MB][4][2][8];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) {
      _mm256_store_ps(t[m][q][0], _mm256_setzero_ps());
      _mm256_store_ps(t[m][q][1], _mm256_setzero_ps());
    }
  const __m256i m15 = _mm256_set1_epi32(15), dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t k0 = g * w.gs, k1 = std::min(w.k, k0 + w.gs);
    const int64_t kk0 = k0 / 2, kk1 = (k1 + 1) / 2;
    const float* s = w.sz + g * 2 * kP;
    for (int q = 0; q < 4; ++q) {
      __m256 a[MB][2];
      for (int m = 0; m < MB; ++m) a[m][0] = a[m][1] = _mm256_setzero_ps();
      const uint8_t* b = w.qw + q * 8;
      for (int64_t kk = kk0; kk < kk1; ++kk) {
        if (q == 0) __builtin_prefetch(w.qw + (kk + 32) * kP, 0, 3);
        const __m256i v = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + kk * kP)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, m15));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        for (int m = 0; m < MB; ++m) {
          const __m256 xb = _mm256_castpd_ps(
              _mm256_broadcast_sd(reinterpret_cast<const double*>(x[m] + 2 * kk)));
          a[m][0] = _mm256_fmadd_ps(xb, lo, a[m][0]);
          a[m][1] = _mm256_fmadd_ps(xb, hi, a[m][1]);
        }
      }
      const __m256 s_lo = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + 4 * q)), dup);
      const __m256 s_hi = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + 16 + 4 * q)), dup);
      const __m256 o_lo = _mm256_blend_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_loadu_ps(s + kP + 4 * q)), dup), 0x55);
      const __m256 o_hi = _mm256_blend_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_loadu_ps(s + kP + 16 + 4 * q)), dup), 0x55);
      for (int m = 0; m < MB; ++m) {
        const __m256 xsb = _mm256_set1_ps(xsum[m][g]);
        _mm256_store_ps(t[m][q][0], _mm256_fmadd_ps(a[m][0], s_lo,
            _mm256_fmadd_ps(xsb, o_lo, _mm256_load_ps(t[m][q][0]))));
        _mm256_store_ps(t[m][q][1], _mm256_fmadd_ps(a[m][1], s_hi,
            _mm256_fmadd_ps(xsb, o_hi, _mm256_load_ps(t[m][q][1]))));
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q)
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 4; ++l)
          tot[m * kP + h * 16 + 4 * q + l] = t[m][q][h][2 * l] + t[m][q][h][2 * l + 1];
}

// One row: all four quarters per K pair (8 accumulators), each x pair broadcast once.
static void panel_avx2_m1(const Panel& w, const float* x, const float* xsum, float* tot) {
  alignas(32) float t[4][2][8] = {};
  const __m256i m15 = _mm256_set1_epi32(15), dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t k0 = g * w.gs, k1 = std::min(w.k, k0 + w.gs);
    const int64_t kk0 = k0 / 2, kk1 = (k1 + 1) / 2;
    __m256 a[4][2];
    for (int q = 0; q < 4; ++q) a[q][0] = a[q][1] = _mm256_setzero_ps();
    for (int64_t kk = kk0; kk < kk1; ++kk) {
      const uint8_t* b = w.qw + kk * kP;
      __builtin_prefetch(b + 32 * kP, 0, 3);
      const __m256 xb = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(x + 2 * kk)));
      for (int q = 0; q < 4; ++q) {
        const __m256i v = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * q)));
        a[q][0] = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_and_si256(v, m15)), a[q][0]);
        a[q][1] = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), a[q][1]);
      }
    }
    const float* s = w.sz + g * 2 * kP;
    const __m256 xsb = _mm256_set1_ps(xsum[g]);
    for (int q = 0; q < 4; ++q)
      for (int h = 0; h < 2; ++h) {
        const __m256 sc = _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_loadu_ps(s + 16 * h + 4 * q)), dup);
        const __m256 of = _mm256_blend_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_loadu_ps(s + kP + 16 * h + 4 * q)), dup), 0x55);
        _mm256_store_ps(t[q][h], _mm256_fmadd_ps(a[q][h], sc,
            _mm256_fmadd_ps(xsb, of, _mm256_load_ps(t[q][h]))));
      }
  }
  for (int q = 0; q < 4; ++q)
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 4; ++l) tot[h * 16 + 4 * q + l] = t[q][h][2 * l] + t[q][h][2 * l + 1];
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// bf16 rows: acc[m] += (x[m][2kk], x[m][2kk+1]) . (128 + codes), the codes or'ed into bf16 128.
template <int MB>
__attribute__((target("avx512bf16"))) static void panel_bf16(const Panel& w,
                                                            const c10::BFloat16* const* x,
                                                            const float* const* xsum, float* tot) {
  const __m512i magic = _mm512_set1_epi16(0x4300), low = _mm512_set1_epi16(0x000F);
  const __m512 c128 = _mm512_set1_ps(128.f);
  __m512 t[MB][2];
  for (int m = 0; m < MB; ++m) t[m][0] = t[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t k0 = g * w.gs, k1 = std::min(w.k, k0 + w.gs);
    __m512 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t kk = k0 / 2; kk < (k1 + 1) / 2; ++kk) {
      const uint8_t* b = w.qw + kk * kP;
      __builtin_prefetch(b + 64 * kP, 0, 3);
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
      const __m512i lo = _mm512_ternarylogic_epi32(v, low, magic, 0xEA);  // (v & 15) | magic
      const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
      for (int m = 0; m < MB; ++m) {
        int32_t pair;
        std::memcpy(&pair, x[m] + 2 * kk, 4);
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, (__m512bh)lo);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, (__m512bh)hi);
      }
    }
    // acc = sum x * (128 + q): W x = s * acc + (offset - 128 s) * sum(x)
    const float* s = w.sz + g * 2 * kP;
    const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
    const __m512 o0 = _mm512_fnmadd_ps(c128, s0, _mm512_loadu_ps(s + kP));
    const __m512 o1 = _mm512_fnmadd_ps(c128, s1, _mm512_loadu_ps(s + kP + 16));
    for (int m = 0; m < MB; ++m) {
      const __m512 xs = _mm512_set1_ps(xsum[m][g]);
      t[m][0] = _mm512_fmadd_ps(acc[m][0], s0, _mm512_fmadd_ps(xs, o0, t[m][0]));
      t[m][1] = _mm512_fmadd_ps(acc[m][1], s1, _mm512_fmadd_ps(xs, o1, t[m][1]));
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm512_storeu_ps(tot + m * kP, t[m][0]);
    _mm512_storeu_ps(tot + m * kP + 16, t[m][1]);
  }
}

// OCTAVO_CPU_NO_AVX512BF16=1 takes the fp32 path (tests use it on bf16 CPUs).
static bool moe_int4_use_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") &&
                         std::getenv("OCTAVO_CPU_NO_AVX512BF16") == nullptr;
  return ok;
}
#endif

// tot[m][0..32) = W_panel x[m] for mb <= kRowBlock<C>() rows.
template <typename C>
static constexpr int kRowBlock() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return std::is_same_v<C, float> ? 4 : 8;
#else
  return 8;
#endif
}

template <typename C>
static void panel_rows(const Panel& w, const C* const* x, const float* const* xsum, int mb,
                       float* tot) {
  if constexpr (std::is_same_v<C, float>) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    switch (mb) {
      case 1: panel_avx2_m1(w, x[0], xsum[0], tot); break;
      case 2: panel_avx2<2>(w, x, xsum, tot); break;
      case 3: panel_avx2<3>(w, x, xsum, tot); break;
      default: panel_avx2<4>(w, x, xsum, tot); break;
    }
#else
    panel_generic(w, x, xsum, mb, tot);
#endif
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    switch (mb) {
      case 1: panel_bf16<1>(w, x, xsum, tot); break;
      case 2: panel_bf16<2>(w, x, xsum, tot); break;
      case 3: panel_bf16<3>(w, x, xsum, tot); break;
      case 4: panel_bf16<4>(w, x, xsum, tot); break;
      case 5: panel_bf16<5>(w, x, xsum, tot); break;
      case 6: panel_bf16<6>(w, x, xsum, tot); break;
      case 7: panel_bf16<7>(w, x, xsum, tot); break;
      default: panel_bf16<8>(w, x, xsum, tot); break;
    }
#endif
  }
}

template <typename C>
static inline C to_c(float v) {
  if constexpr (std::is_same_v<C, float>) return v;
  else return static_cast<C>(v);
}

// Rows [r0, r1) of buf [*, width] (width even: pairs) -> their per-group sums as the kernel reads them.
template <typename C>
static void group_sums(const C* buf, int64_t width, int64_t r0, int64_t r1, int64_t k, int64_t gs,
                       int64_t groups, float* sums) {
  for (int64_t r = r0; r < r1; ++r) {
    float* s = sums + r * groups;
    const C* row = buf + r * width;
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0.f;
      for (int64_t c = g * gs; c < std::min(k, (g + 1) * gs); ++c) acc += to_f(row[c]);
      s[g] = acc;
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// an expert's rows in a chunk that take the tiles: from 8 rows 1.3-1.6x faster than vdpbf16ps
// (1024 x 2816 experts, one thread, Xeon 2026-12-03); 4-7 rows measured even
constexpr int64_t kAmxMinRows = 8;

// Whether this chunk takes the tiles: bf16 rows, AMX, groups of whole 32-wide K steps (or one
// group) on both GEMMs, and some expert with kAmxMinRows rows.
template <typename C>
static bool chunk_uses_amx(const MoeInt4Params& p, const std::vector<int64_t>& start) {
  if (!std::is_same_v<C, c10::BFloat16> || !use_amx() ||
      !int4_amx_groups_ok(p.gs13, p.groups13) || !int4_amx_groups_ok(p.gs2, p.groups2))
    return false;
  for (size_t e = 0; e + 1 < start.size(); ++e)
    if (start[e + 1] - start[e] >= kAmxMinRows) return true;
  return false;
}

// A thread's tiles, expanded panel and output totals for one parallel region of a chunk that
// takes the tiles.
struct AmxScratch {
  bool on;
  std::vector<c10::BFloat16> b0;  // [kpad / 2, 32, 2]
  std::vector<float> t[2];        // [rows, 32] each
  AmxScratch(bool use, int64_t kpad) : on(use) {
    if (!on) return;
    b0.resize(kpad * kP);
    amx_config_full_tiles();
  }
  float* totals(int which, int64_t rows) {
    if (static_cast<int64_t>(t[which].size()) < rows * kP) t[which].resize(rows * kP);
    return t[which].data();
  }
  ~AmxScratch() {
    if (on) amx_release();
  }
};
#endif

// One pass over tokens [t0, t1): C is the rows' compute type (float, or bf16 for vdpbf16ps).
template <typename T, typename C>
static void moe_int4_chunk(const MoeInt4Params& p, int64_t t0, int64_t t1) {
  const int64_t h = p.hidden_size, i = p.inter_size, k = p.top_k, e_count = p.num_experts;
  const int64_t nt = t1 - t0, pairs = nt * k;
  const int64_t hp = 2 * ((h + 1) / 2), ip = 2 * ((i + 1) / 2);  // rows padded to whole pairs
  const int64_t pi = (i + kP - 1) / kP, ph = (h + kP - 1) / kP;
  const int64_t bytes13 = (h + 1) / 2 * kP, bytes2 = (i + 1) / 2 * kP;
  const int64_t so13 = p.groups13 * 2 * kP, so2 = p.groups2 * 2 * kP;
  constexpr int kMB = kRowBlock<C>();

  // pairs grouped by expert (counting sort, pair order kept inside an expert)
  std::vector<int64_t> start(e_count + 1, 0);
  for (int64_t q = 0; q < pairs; ++q) ++start[p.topk_ids[t0 * k + q] + 1];
  for (int64_t e = 0; e < e_count; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(pairs), fill(start.begin(), start.end() - 1);
  for (int64_t q = 0; q < pairs; ++q) order[fill[p.topk_ids[t0 * k + q]]++] = q;
  std::vector<int64_t> active;
  for (int64_t e = 0; e < e_count; ++e)
    if (start[e + 1] > start[e]) active.push_back(e);
  const int64_t na = static_cast<int64_t>(active.size());
#if defined(CPU_CAPABILITY_AVX512)
  const bool amx = chunk_uses_amx<C>(p, start);
  const int64_t kpad13 = int4_amx_kpad(h), kpad2 = int4_amx_kpad(i);
  const Int4AmxGroups kg13{h, p.gs13, p.groups13}, kg2{i, p.gs2, p.groups2};
  auto tiles = [&](int64_t e) { return amx && start[e + 1] - start[e] >= kAmxMinRows; };
#else
  const bool amx = false;
#endif
  // rows of the gathered hidden and of the intermediate: whole 32-wide K steps for the tiles,
  // and tile_pad rows past the last (zeros) that a last partial tile block reads
  const int64_t hw = amx ? (h + 31) / 32 * 32 : hp, iw = amx ? (i + 31) / 32 * 32 : ip;
  const int64_t tile_pad = amx ? 32 : 0;

  // the chunk's hidden rows in C, zero padded, and their group sums; with w13_perm (or the
  // tiles), each pair's row gathered (in its expert's K order) into xg, in expert order, and
  // the sums of that
  std::vector<C> xin(nt * hp, to_c<C>(0.f));
  const T* hidden = static_cast<const T*>(p.hidden);
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t c = 0; c < h; ++c) xin[t * hp + c] = to_c<C>(to_f(hidden[(t0 + t) * p.hidden_stride + c]));
  const bool gather = p.w13_perm != nullptr || amx;
  std::vector<C> xg;
  std::vector<float> xs13;
  if (!gather) {
    xs13.resize(nt * p.groups13);
    group_sums(xin.data(), hp, 0, nt, h, p.gs13, p.groups13, xs13.data());
  } else {
    xg.assign((pairs + tile_pad) * hw, to_c<C>(0.f));
    xs13.resize(pairs * p.groups13);
    std::atomic<bool> bad{false};
    at::parallel_for(0, pairs, std::max<int64_t>(1, 16384 / h), [&](int64_t b, int64_t end) {
      for (int64_t pos = b; pos < end; ++pos) {
        const int64_t q = order[pos];
        const C* src = xin.data() + (q / k) * hp;
        C* dst = xg.data() + pos * hw;
        if (p.w13_perm == nullptr) {
          std::memcpy(static_cast<void*>(dst), src, h * sizeof(C));
          continue;
        }
        const int32_t* perm = p.w13_perm + p.topk_ids[t0 * k + q] * h;
        for (int64_t c = 0; c < h; ++c) {
          const int32_t from = perm[c];
          if (from < 0 || from >= h) {
            bad = true;
            break;
          }
          dst[c] = src[from];
        }
      }
      group_sums(xg.data(), hw, b, end, h, p.gs13, p.groups13, xs13.data());
    });
    TORCH_CHECK(!bad, "fused_moe_int4: w13_perm holds a column outside [0, ", h, ")");
  }
  const C* xrows = gather ? xg.data() : xin.data();
  const int64_t xw = gather ? hw : hp;

  // 1. inter[pos, 32q..] = act(gate) * up, pos = the pair's place in expert order
  std::vector<C> inter((pairs + tile_pad) * iw, to_c<C>(0.f));
  at::parallel_for(0, na * pi, 1, [&](int64_t b, int64_t end) {
    alignas(64) float g[8 * kP], u[8 * kP];
    const C* rows[8];
    const float* sums[8];
#if defined(CPU_CAPABILITY_AVX512)
    AmxScratch sc(amx, kpad13);
#endif
    for (int64_t task = b; task < end; ++task) {
      const int64_t e = active[task / pi], q = task % pi;
      const Panel gate{p.w13 + (e * 2 * pi + q) * bytes13, p.w13_so + (e * 2 * pi + q) * so13, h,
                       p.gs13, p.groups13};
      const Panel up{gate.qw + pi * bytes13, gate.sz + pi * so13, h, p.gs13, p.groups13};
      const int valid = static_cast<int>(std::min<int64_t>(kP, i - q * kP));
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<C, c10::BFloat16>) {
        if (tiles(e)) {
          const int64_t c0 = start[e], n = start[e + 1] - c0;
          float* tg = sc.totals(0, n);
          float* tu = sc.totals(1, n);
          const float* xs = xs13.data() + c0 * p.groups13;
          int4_amx_expand(gate.qw, h, kpad13, sc.b0.data());
          int4_amx_rows(xg.data() + c0 * hw, hw, sc.b0.data(), kg13, gate.sz, xs, n, tg);
          int4_amx_expand(up.qw, h, kpad13, sc.b0.data());
          int4_amx_rows(xg.data() + c0 * hw, hw, sc.b0.data(), kg13, up.sz, xs, n, tu);
          for (int64_t r = 0; r < n; ++r)
            act_mul(tg + r * kP, tu + r * kP, valid, p.act, inter.data() + (c0 + r) * iw + q * kP);
          continue;
        }
      }
#endif
      for (int64_t c0 = start[e]; c0 < start[e + 1]; c0 += kMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMB, start[e + 1] - c0));
        for (int r = 0; r < mb; ++r) {
          const int64_t x = gather ? c0 + r : order[c0 + r] / k;  // pair or token
          rows[r] = xrows + x * xw;
          sums[r] = xs13.data() + x * p.groups13;
        }
        panel_rows<C>(gate, rows, sums, mb, g);
        panel_rows<C>(up, rows, sums, mb, u);
        for (int r = 0; r < mb; ++r)
          act_mul(g + r * kP, u + r * kP, valid, p.act, inter.data() + (c0 + r) * iw + q * kP);
      }
    }
  });
  std::vector<float> xs2(pairs * p.groups2);
  at::parallel_for(0, pairs, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, i)),
                   [&](int64_t b, int64_t end) {
    group_sums(inter.data(), iw, b, end, i, p.gs2, p.groups2, xs2.data());
  });

  // 2. out[t, 32q..] = sum over the active experts of weight * (w2[e] panel q @ inter): tasks
  //    own output columns, so the sums need no atomics and run in expert order
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, ph, 1, [&](int64_t b, int64_t end) {
    alignas(64) float y[32 * kP];
    std::vector<float> acc(nt * kP);
    const C* rows[8];
    const float* sums[8];
#if defined(CPU_CAPABILITY_AVX512)
    AmxScratch sc(amx, kpad2);
#endif
    for (int64_t q = b; q < end; ++q) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const int valid = static_cast<int>(std::min<int64_t>(kP, h - q * kP));
      for (const int64_t e : active) {
        const Panel down{p.w2 + (e * ph + q) * bytes2, p.w2_so + (e * ph + q) * so2, i, p.gs2,
                         p.groups2};
        // rows [c0, c0 + mb) of the expert done: yr [mb, 32] into the tokens' sums
        auto add_rows = [&](int64_t c0, int64_t mb, const float* yr) {
          for (int64_t r = 0; r < mb; ++r) {
            const int64_t pair = order[c0 + r];
            const float wgt = p.topk_weights[t0 * k + pair];
            float* dst = acc.data() + (pair / k) * kP;
            for (int j = 0; j < valid; ++j) dst[j] += wgt * yr[r * kP + j];
          }
        };
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<C, c10::BFloat16>) {
          if (tiles(e)) {
            const int64_t c0 = start[e], n = start[e + 1] - c0;
            float* ty = sc.totals(0, n);
            int4_amx_expand(down.qw, i, kpad2, sc.b0.data());
            int4_amx_rows(inter.data() + c0 * iw, iw, sc.b0.data(), kg2, down.sz,
                          xs2.data() + c0 * p.groups2, n, ty);
            add_rows(c0, n, ty);
            continue;
          }
        }
#endif
        for (int64_t c0 = start[e]; c0 < start[e + 1]; c0 += kMB) {
          const int mb = static_cast<int>(std::min<int64_t>(kMB, start[e + 1] - c0));
          for (int r = 0; r < mb; ++r) {
            rows[r] = inter.data() + (c0 + r) * iw;
            sums[r] = xs2.data() + (c0 + r) * p.groups2;
          }
          panel_rows<C>(down, rows, sums, mb, y);
          add_rows(c0, mb, y);
        }
      }
      for (int64_t t = 0; t < nt; ++t) {
        T* o = out + (t0 + t) * p.out_stride + q * kP;
        for (int j = 0; j < valid; ++j) o[j] = from_f<T>(acc[t * kP + j]);
      }
    }
  });
}

template <typename T, typename C>
static void moe_int4_impl(const MoeInt4Params& p) {
  for (int64_t t0 = 0; t0 < p.num_tokens; t0 += kChunk)
    moe_int4_chunk<T, C>(p, t0, std::min(p.num_tokens, t0 + kChunk));
}

void fused_moe_int4_kernel(const MoeInt4Params& p) {
#if defined(CPU_CAPABILITY_AVX512)
  if (p.dtype == DType::kBFloat16 && moe_int4_use_avx512_bf16()) {
    moe_int4_impl<c10::BFloat16, c10::BFloat16>(p);
    return;
  }
#endif
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { moe_int4_impl<scalar_t, float>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <string>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "cpu/moe_checks.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(fused_moe_int4_kernel, MoeInt4Params)

namespace octavo {
namespace {

void check_int4_stack(const at::Tensor& packed, const at::Tensor& so, int64_t e, int64_t panels,
                      int64_t k, int64_t groups, const char* name) {
  OCTAVO_CHECK_CPU(packed);
  OCTAVO_CHECK_CPU(so);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(0) == e &&
                  packed.size(1) == panels && packed.size(2) == (k + 1) / 2 &&
                  packed.size(3) == 32 && packed.is_contiguous(),
              "fused_moe_int4: ", name, "_packed must be a contiguous uint8 [", e, ", ", panels, ", ",
              (k + 1) / 2, ", 32] (ops_native.prepare_moe_int4_weights), got ",
              packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(so.scalar_type() == at::kFloat && so.dim() == 5 && so.size(0) == e &&
                  so.size(1) == panels && so.size(2) == groups && so.size(3) == 2 &&
                  so.size(4) == 32 && so.is_contiguous(),
              "fused_moe_int4: ", name, "_scales_offsets must be a contiguous float32 [", e, ", ",
              panels, ", ", groups, ", 2, 32], got ", so.scalar_type(), " ", so.sizes());
}

// group size over K (group_size -1: all of K); groups must hold whole K pairs
int64_t resolve_group(int64_t group_size, int64_t k) {
  TORCH_CHECK(group_size == -1 || group_size > 0,
              "fused_moe_int4: group_size must be positive or -1, got ", group_size);
  const int64_t gs = group_size == -1 ? std::max<int64_t>(k, 1) : group_size;
  TORCH_CHECK(gs % 2 == 0 || gs >= k, "fused_moe_int4: group_size must be even (or at least K = ",
              k, "), got ", group_size);
  return gs;
}

}  // namespace

void fused_moe_int4_packed_cpu(at::Tensor& out, const at::Tensor& hidden,
                               const at::Tensor& w13_packed, const at::Tensor& w2_packed,
                               const at::Tensor& w13_scales_offsets,
                               const at::Tensor& w2_scales_offsets, const at::Tensor& topk_weights,
                               const at::Tensor& topk_ids, int64_t inter_size, int64_t group_size,
                               const std::string& activation,
                               const std::optional<at::Tensor>& w13_perm) {
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&out, &hidden, &topk_weights, &topk_ids})
    OCTAVO_CHECK_CPU(*x);
  TORCH_CHECK(hidden.dim() == 2 && out.sizes() == hidden.sizes(),
              "fused_moe_int4: hidden and out must be [T, H], got ", hidden.sizes(), " and ",
              out.sizes());
  OCTAVO_CHECK_SAME_DTYPE(hidden, out);
  OCTAVO_CHECK_LAST_CONTIG(hidden);
  OCTAVO_CHECK_LAST_CONTIG(out);
  const int64_t t = hidden.size(0), h = hidden.size(1), i = inter_size;
  TORCH_CHECK(i > 0 && h > 0, "fused_moe_int4: hidden and inter sizes must be positive");
  TORCH_CHECK(w13_packed.dim() == 4, "fused_moe_int4: w13_packed must be [E, 2 * ceil(I/32), ceil(H/2), 32]");
  const int64_t e = w13_packed.size(0);
  const int64_t gs13 = resolve_group(group_size, h), gs2 = resolve_group(group_size, i);
  const int64_t g13 = (h + gs13 - 1) / gs13, g2 = (i + gs2 - 1) / gs2;
  check_int4_stack(w13_packed, w13_scales_offsets, e, 2 * ((i + 31) / 32), h, g13, "w13");
  check_int4_stack(w2_packed, w2_scales_offsets, e, (h + 31) / 32, i, g2, "w2");
  cpu::check_moe_routing(topk_ids, topk_weights, t, "fused_moe_int4");
  const int act = cpu::moe_activation_kind(activation, "fused_moe_int4");
  if (w13_perm.has_value()) {
    const at::Tensor& pm = *w13_perm;
    OCTAVO_CHECK_CPU(pm);
    TORCH_CHECK(pm.scalar_type() == at::kInt && pm.dim() == 2 && pm.size(0) == e && pm.size(1) == h &&
                    pm.is_contiguous(),
                "fused_moe_int4: w13_perm must be a contiguous int32 [E, H] = [", e, ", ", h,
                "] (ops_native.prepare_moe_int4_weights), got ", pm.scalar_type(), " ", pm.sizes());
  }
  const cpu::DType dtype = cpu::to_dtype(hidden, "fused_moe_int4");
  if (t == 0) return;
  const int64_t k = topk_ids.size(1);
  if (k == 0) {
    out.zero_();
    return;
  }
  cpu::check_expert_ids(topk_ids, e, "fused_moe_int4");
  cpu::MoeInt4Params p{};
  p.out = out.data_ptr();
  p.hidden = hidden.data_ptr();
  p.w13 = w13_packed.data_ptr<uint8_t>();
  p.w13_so = w13_scales_offsets.data_ptr<float>();
  p.w2 = w2_packed.data_ptr<uint8_t>();
  p.w2_so = w2_scales_offsets.data_ptr<float>();
  p.topk_weights = topk_weights.data_ptr<float>();
  p.topk_ids = topk_ids.data_ptr<int32_t>();
  p.w13_perm = w13_perm.has_value() ? w13_perm->data_ptr<int32_t>() : nullptr;
  p.out_stride = out.stride(0);
  p.hidden_stride = hidden.stride(0);
  p.num_tokens = t;
  p.hidden_size = h;
  p.inter_size = i;
  p.top_k = k;
  p.num_experts = e;
  p.gs13 = gs13;
  p.groups13 = g13;
  p.gs2 = gs2;
  p.groups2 = g2;
  p.act = act;
  p.dtype = dtype;
  OCTAVO_CALL_CPU_KERNEL(fused_moe_int4_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
