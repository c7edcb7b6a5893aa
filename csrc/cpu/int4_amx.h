// AMX for the 4-bit weight panels of int4_gemm.cpp and moe_int4.cpp (32 outputs, K in pairs, the
// byte of output j and K pair kk holding j's code in its low nibble and j+16's in its high one):
// a panel is expanded once into bf16 (128 + q) codes, exact, in AMX's B layout, and 16-row tiles
// of x are multiplied into per-group sums that are folded into fp32 totals with the group's scales
// and offsets as the vdpbf16ps kernels do: W x = s * sum x (128 + q) + (offset - 128 s) * sum x.
// x rows are zero padded to whole 32-wide K steps, so a step never reads another group's columns.
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/amx.h"
#include "cpu/cpu_types.h"

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int kInt4AmxK = 32;         // K per tile step (16 pairs)
constexpr int kInt4AmxMaxRows = 32;   // rows per block: two A tiles share each B tile

inline int64_t int4_amx_kpad(int64_t k) { return (k + kInt4AmxK - 1) / kInt4AmxK * kInt4AmxK; }

// The tiles take groups of whole 32-wide steps, or one group over all of K.
inline bool int4_amx_groups_ok(int64_t group_size, int64_t groups) {
  return groups == 1 || group_size % kInt4AmxK == 0;
}

// b [kpad / 2 pairs][32 outputs][2] bf16 = 128 + the codes of qw [ceil(k/2), 32]: per pair row,
// outputs 0-15 (low nibbles) then 16-31 (high nibbles), 128 bytes; pair rows past k are zero.
inline void int4_amx_expand(const uint8_t* qw, int64_t k, int64_t kpad, c10::BFloat16* b) {
  const __m512i magic = _mm512_set1_epi16(0x4300), low = _mm512_set1_epi16(0x000F);
  const int64_t k2 = (k + 1) / 2;
  for (int64_t kk = 0; kk < k2; ++kk) {
    const __m512i v =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + kk * 32)));
    _mm512_storeu_si512(b + kk * 64, _mm512_ternarylogic_epi32(v, low, magic, 0xEA));
    _mm512_storeu_si512(b + kk * 64 + 32, _mm512_or_si512(_mm512_srli_epi16(v, 4), magic));
  }
  std::memset(static_cast<void*>(b + k2 * 64), 0, (kpad / 2 - k2) * 64 * sizeof(c10::BFloat16));
}

// The K structure of one panel: K, group size (whole 32-wide steps, or >= K) and count.
struct Int4AmxGroups {
  int64_t k, gs, groups;
};

// tot [rows, 32] += group g's share of the panel (expanded in b) times rows <= 16 * R rows of x
// (row stride xs elements, zero padded to int4_amx_kpad(k) columns; 16 * R rows readable).
// sz [groups, 2, 32]: scales, then offsets; xsum: row r's sum over group g at xsum[r * groups +
// g]. The tiles must be configured (amx_config_full_tiles).
template <int R>
__attribute__((target("amx-tile,amx-bf16"))) inline void int4_amx_group(
    const c10::BFloat16* x, int64_t xs, const c10::BFloat16* b, const Int4AmxGroups& kg,
    int64_t g, const float* sz, const float* xsum, int rows, float* tot) {
  static_assert(R == 1 || R == 2, "one or two 16-row tiles");
  alignas(64) float acc[16 * R][32];
  const int64_t xb = xs * static_cast<int64_t>(sizeof(c10::BFloat16));
  constexpr int64_t bb = 64 * sizeof(c10::BFloat16);  // bytes from one pair row to the next
  const int64_t s0 = g * kg.gs / kInt4AmxK;
  const int64_t s1 = (std::min(kg.k, (g + 1) * kg.gs) + kInt4AmxK - 1) / kInt4AmxK;
  amx_memory_barrier();
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (R == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t st = s0; st < s1; ++st) {
    const c10::BFloat16* bk = b + st * (kInt4AmxK / 2) * 64;
    _tile_loadd(4, x + st * kInt4AmxK, xb);
    _tile_loadd(6, bk, bb);
    _tile_loadd(7, bk + 32, bb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (R == 2) {
      _tile_loadd(5, x + 16 * xs + st * kInt4AmxK, xb);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, &acc[0][0], 128);
  _tile_stored(1, &acc[0][16], 128);
  if constexpr (R == 2) {
    _tile_stored(2, &acc[16][0], 128);
    _tile_stored(3, &acc[16][16], 128);
  }
  amx_memory_barrier();
  // acc = sum x * (128 + q): W x = s * acc + (offset - 128 s) * sum(x)
  const float* s = sz + g * 64;
  const __m512 c128 = _mm512_set1_ps(128.f);
  const __m512 sc0 = _mm512_loadu_ps(s), sc1 = _mm512_loadu_ps(s + 16);
  const __m512 o0 = _mm512_fnmadd_ps(c128, sc0, _mm512_loadu_ps(s + 32));
  const __m512 o1 = _mm512_fnmadd_ps(c128, sc1, _mm512_loadu_ps(s + 48));
  for (int r = 0; r < rows; ++r) {
    const __m512 xsv = _mm512_set1_ps(xsum[r * kg.groups + g]);
    float* t = tot + r * 32;
    _mm512_storeu_ps(t, _mm512_fmadd_ps(_mm512_load_ps(acc[r]), sc0,
                                        _mm512_fmadd_ps(xsv, o0, _mm512_loadu_ps(t))));
    _mm512_storeu_ps(t + 16, _mm512_fmadd_ps(_mm512_load_ps(acc[r] + 16), sc1,
                                             _mm512_fmadd_ps(xsv, o1, _mm512_loadu_ps(t + 16))));
  }
}

// tot [rows, 32] = the panel times `rows` rows of x (any count; x readable to the next multiple
// of 32 rows). Groups outer, 32-row blocks inner: a group's slice of b (8 KiB for 128-wide
// groups) stays in L1 while every block reads it, so the tiles stream only x from L2.
inline void int4_amx_rows(const c10::BFloat16* x, int64_t xs, const c10::BFloat16* b,
                          const Int4AmxGroups& kg, const float* sz, const float* xsum, int64_t rows,
                          float* tot) {
  std::memset(static_cast<void*>(tot), 0, rows * 32 * sizeof(float));
  for (int64_t g = 0; g < kg.groups; ++g)
    for (int64_t m0 = 0; m0 < rows; m0 += kInt4AmxMaxRows) {
      const int mb = static_cast<int>(std::min<int64_t>(kInt4AmxMaxRows, rows - m0));
      const c10::BFloat16* xm = x + m0 * xs;
      const float* sm = xsum + m0 * kg.groups;
      if (mb > 16) int4_amx_group<2>(xm, xs, b, kg, g, sz, sm, mb, tot + m0 * 32);
      else int4_amx_group<1>(xm, xs, b, kg, g, sz, sm, mb, tot + m0 * 32);
    }
}

}  // namespace octavo::cpu::CPU_CAPABILITY
#endif  // CPU_CAPABILITY_AVX512
