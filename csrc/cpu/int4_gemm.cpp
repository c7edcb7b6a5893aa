// INT4 weight-only GEMM on CPU: out[M, N] = x[M, K] @ W^T (+ bias), W[n, k] = q * scale + offset
// per (n, group of K), with q the 4-bit codes repacked once at load (ops_native.pack_int4_panels):
// 32-output panels, K in pairs, one byte holding output j's code (low nibble) and output j+16's
// (high nibble). Weights are read once per 8 rows of x (4 on AVX2); codes never leave registers as
// floats on avx512_bf16 CPUs (nibble | 0x4300 is the bf16 of 128 + q, fed straight to vdpbf16ps);
// on AVX2 / AVX-512 without bf16 they are widened and converted in registers and FMA'd in fp32.
// On AMX CPUs bf16 GEMMs of 8 or more rows run on tile registers (cpu/int4_amx.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/cpu_types.h"
#include "cpu/int4_amx.h"

namespace octavo::cpu {

struct Int4GemmParams {
  void* out;              // [M, N], row stride out_stride
  const void* x;          // [M, K], row stride x_stride (K already in the packed order)
  const uint8_t* qw;      // [P, ceil(K/2), 32] packed codes, P = ceil(N/32)
  const float* sz;        // [P, G, 2, 32]: scales, then offsets, of each panel's 32 outputs
  const void* bias;       // [N] or null
  const float* xsum;      // [M, G] sum of each row's x over each group (kernel fills it)
  int64_t out_stride, x_stride;
  int64_t m, n, k, group_size, groups;
  DType dtype;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int kP = 32;   // outputs per panel
constexpr int kMB = 8;   // x rows per pass over a panel

template <typename T>
static inline float xat(const T* xr, int64_t i, int64_t k) { return i < k ? to_f(xr[i]) : 0.f; }

// Any CPU, any activation dtype: fp32 math. Each K pair's 32 bytes are widened in order (low
// nibbles, then high ones) and multiplied by the repeating (x[2kk], x[2kk+1]) pattern, so every
// loop runs over contiguous lanes and vectorizes; adjacent lanes are summed once per group.
template <typename T>
static void panel_generic(const Int4GemmParams& p, int64_t pi, int64_t m0, int mb, float* tot) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t k2 = (p.k + 1) / 2;
  const uint8_t* wq = p.qw + pi * k2 * kP;
  const float* sz = p.sz + pi * p.groups * 2 * kP;
  for (int i = 0; i < mb * kP; ++i) tot[i] = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group_size, k1 = std::min(p.k, k0 + p.group_size);
    alignas(64) float acc[kMB][2 * kP] = {};  // lane 2j+i: output j (low) / j+16 (high), k = 2kk+i
    for (int64_t kk = k0 / 2; kk < (k1 + 1) / 2; ++kk) {
      const uint8_t* b = wq + kk * kP;
      alignas(64) float lo[kP], hi[kP];
      for (int j = 0; j < kP; ++j) {
        lo[j] = static_cast<float>(b[j] & 15);
        hi[j] = static_cast<float>(b[j] >> 4);
      }
      for (int m = 0; m < mb; ++m) {
        const T* xr = x + (m0 + m) * p.x_stride;
        const float x0 = xat(xr, 2 * kk, p.k), x1 = xat(xr, 2 * kk + 1, p.k);
        alignas(64) float xp[kP];
        for (int j = 0; j < kP; ++j) xp[j] = (j & 1) ? x1 : x0;
        float* a = acc[m];
        for (int j = 0; j < kP; ++j) a[j] += xp[j] * lo[j];
        for (int j = 0; j < kP; ++j) a[kP + j] += xp[j] * hi[j];
      }
    }
    const float* s = sz + g * 2 * kP;
    for (int m = 0; m < mb; ++m) {
      const float xs = p.xsum[(m0 + m) * p.groups + g];
      for (int j = 0; j < 16; ++j) {
        const float d_lo = acc[m][2 * j] + acc[m][2 * j + 1];
        const float d_hi = acc[m][kP + 2 * j] + acc[m][kP + 2 * j + 1];
        tot[m * kP + j] += d_lo * s[j] + xs * s[kP + j];
        tot[m * kP + 16 + j] += d_hi * s[16 + j] + xs * s[kP + 16 + j];
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// AVX2 + FMA, fp32 math for every activation dtype; x is an fp32 copy, zero padded to 2 * K2.
// The panel is walked in quarters of 8 bytes per K pair: one vpmovzxbd gives 8 dwords whose low
// nibbles are (output 4q + l/2, k = 2kk + l%2) and high nibbles the same for output 16 + 4q + l/2,
// so each quarter costs and + shift + 2 converts and feeds 2 FMAs per row against the broadcast
// pair (x[2kk], x[2kk+1]). Scales and offsets are applied once per group to the partial sums
// (s * sum x q + o * sum x), lanes of a pair (even / odd k) are added once per panel at the end.
constexpr int kMBv = 4;  // rows per pass: 2 * 4 accumulators + weights + x in 16 registers

template <int MB>
static void panel_avx2(const Int4GemmParams& p, int64_t pi, const float* x, int64_t xs,
                       const float* xsum, float* tot) {
  const int64_t k2 = (p.k + 1) / 2;
  const uint8_t* wq = p.qw + pi * k2 * kP;
  const float* sz = p.sz + pi * p.groups * 2 * kP;
  alignas(32) float t[MB][4][2][8];  // [row][quarter][low / high outputs][lane]
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) {
      _mm256_store_ps(t[m][q][0], _mm256_setzero_ps());
      _mm256_store_ps(t[m][q][1], _mm256_setzero_ps());
    }
  const __m256i m15 = _mm256_set1_epi32(15), dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group_size, k1 = std::min(p.k, k0 + p.group_size);
    const int64_t kk0 = k0 / 2, kk1 = (k1 + 1) / 2;
    const float* s = sz + g * 2 * kP;
    for (int q = 0; q < 4; ++q) {
      __m256 a[MB][2];
      for (int m = 0; m < MB; ++m) a[m][0] = a[m][1] = _mm256_setzero_ps();
      const uint8_t* b = wq + q * 8;
      for (int64_t kk = kk0; kk < kk1; ++kk) {
        if (q == 0) __builtin_prefetch(wq + (kk + 32) * kP, 0, 3);  // 1 KiB ahead
        const __m256i v = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + kk * kP)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, m15));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        for (int m = 0; m < MB; ++m) {
          const __m256 xb = _mm256_castpd_ps(
              _mm256_broadcast_sd(reinterpret_cast<const double*>(x + m * xs + 2 * kk)));
          a[m][0] = _mm256_fmadd_ps(xb, lo, a[m][0]);
          a[m][1] = _mm256_fmadd_ps(xb, hi, a[m][1]);
        }
      }
      // scales on both lanes of a pair, offsets (times sum x) on the even lane only
      const __m256 s_lo = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + 4 * q)), dup);
      const __m256 s_hi = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + 16 + 4 * q)), dup);
      const __m256 o_lo = _mm256_blend_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_loadu_ps(s + kP + 4 * q)), dup), 0x55);
      const __m256 o_hi = _mm256_blend_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_loadu_ps(s + kP + 16 + 4 * q)), dup), 0x55);
      for (int m = 0; m < MB; ++m) {
        const __m256 xsb = _mm256_set1_ps(xsum[m * p.groups + g]);
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

// One row of x: all four quarters per K pair (8 accumulators), so each x pair is broadcast once.
static void panel_avx2_m1(const Int4GemmParams& p, int64_t pi, const float* x, const float* xsum,
                          float* tot) {
  const int64_t k2 = (p.k + 1) / 2;
  const uint8_t* wq = p.qw + pi * k2 * kP;
  const float* sz = p.sz + pi * p.groups * 2 * kP;
  alignas(32) float t[4][2][8] = {};
  const __m256i m15 = _mm256_set1_epi32(15), dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group_size, k1 = std::min(p.k, k0 + p.group_size);
    const int64_t kk0 = k0 / 2, kk1 = (k1 + 1) / 2;
    __m256 a[4][2];
    for (int q = 0; q < 4; ++q) a[q][0] = a[q][1] = _mm256_setzero_ps();
    for (int64_t kk = kk0; kk < kk1; ++kk) {
      const uint8_t* b = wq + kk * kP;
      __builtin_prefetch(b + 32 * kP, 0, 3);  // 1 KiB ahead
      const __m256 xb = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(x + 2 * kk)));
      for (int q = 0; q < 4; ++q) {
        const __m256i v = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * q)));
        a[q][0] = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_and_si256(v, m15)), a[q][0]);
        a[q][1] = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), a[q][1]);
      }
    }
    const float* s = sz + g * 2 * kP;
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

static void panel_avx2_any(const Int4GemmParams& p, int64_t pi, const float* x, int64_t xs,
                           const float* xsum, int mb, float* tot) {
  switch (mb) {
    case 1: panel_avx2_m1(p, pi, x, xsum, tot); break;
    case 2: panel_avx2<2>(p, pi, x, xs, xsum, tot); break;
    case 3: panel_avx2<3>(p, pi, x, xs, xsum, tot); break;
    default: panel_avx2<4>(p, pi, x, xs, xsum, tot); break;
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// acc[m][0..1] += (x[m][2kk], x[m][2kk+1]) . (128 + codes) of the panel's 32 outputs.
template <int MB>
__attribute__((target("avx512bf16"))) static inline void bf16_step(__m512 (&acc)[MB][2],
                                                                  const uint8_t* b,
                                                                  const c10::BFloat16* x,
                                                                  int64_t xs) {
  const __m512i magic = _mm512_set1_epi16(0x4300), low = _mm512_set1_epi16(0x000F);
  const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  const __m512i lo = _mm512_ternarylogic_epi32(v, low, magic, 0xEA);  // (v & 15) | magic
  const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
  for (int m = 0; m < MB; ++m) {
    int32_t pair;
    std::memcpy(&pair, x + m * xs, 4);
    const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
    acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, (__m512bh)lo);
    acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, (__m512bh)hi);
  }
}

template <int MB>
__attribute__((target("avx512bf16"))) static void panel_bf16(const Int4GemmParams& p, int64_t pi,
                                                            int64_t m0, float* tot) {
  const c10::BFloat16* x = static_cast<const c10::BFloat16*>(p.x) + m0 * p.x_stride;
  const int64_t k2 = (p.k + 1) / 2, kfull = p.k / 2;
  const uint8_t* wq = p.qw + pi * k2 * kP;
  const float* sz = p.sz + pi * p.groups * 2 * kP;
  __m512 t[MB][2];
  for (int m = 0; m < MB; ++m) t[m][0] = t[m][1] = _mm512_setzero_ps();
  const __m512 c128 = _mm512_set1_ps(128.f);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group_size, k1 = std::min(p.k, k0 + p.group_size);
    const int64_t kk1 = (k1 + 1) / 2;
    __m512 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t kk = k0 / 2;
    const int64_t kkf = std::min(kk1, kfull);
    for (; kk < kkf; ++kk) {
      __builtin_prefetch(wq + (kk + 64) * kP, 0, 3);  // 2 KiB ahead
      bf16_step<MB>(acc, wq + kk * kP, x + 2 * kk, p.x_stride);
    }
    if (kk < kk1) {  // odd K: the last pair is (x[K-1], 0)
      c10::BFloat16 last[MB][2];
      for (int m = 0; m < MB; ++m) {
        last[m][0] = x[m * p.x_stride + p.k - 1];
        last[m][1].x = 0;
      }
      bf16_step<MB>(acc, wq + kk * kP, &last[0][0], 2);
    }
    // acc = sum x * (128 + q): W x = s * acc + (offset - 128 s) * sum(x)
    const float* s = sz + g * 2 * kP;
    const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
    const __m512 o0 = _mm512_fnmadd_ps(c128, s0, _mm512_loadu_ps(s + kP));
    const __m512 o1 = _mm512_fnmadd_ps(c128, s1, _mm512_loadu_ps(s + kP + 16));
    for (int m = 0; m < MB; ++m) {
      const __m512 xs = _mm512_set1_ps(p.xsum[(m0 + m) * p.groups + g]);
      t[m][0] = _mm512_fmadd_ps(acc[m][0], s0, _mm512_fmadd_ps(xs, o0, t[m][0]));
      t[m][1] = _mm512_fmadd_ps(acc[m][1], s1, _mm512_fmadd_ps(xs, o1, t[m][1]));
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm512_storeu_ps(tot + m * kP, t[m][0]);
    _mm512_storeu_ps(tot + m * kP + 16, t[m][1]);
  }
}

static void panel_bf16_any(const Int4GemmParams& p, int64_t pi, int64_t m0, int mb, float* tot) {
  switch (mb) {
    case 1: panel_bf16<1>(p, pi, m0, tot); break;
    case 2: panel_bf16<2>(p, pi, m0, tot); break;
    case 3: panel_bf16<3>(p, pi, m0, tot); break;
    case 4: panel_bf16<4>(p, pi, m0, tot); break;
    case 5: panel_bf16<5>(p, pi, m0, tot); break;
    case 6: panel_bf16<6>(p, pi, m0, tot); break;
    case 7: panel_bf16<7>(p, pi, m0, tot); break;
    default: panel_bf16<8>(p, pi, m0, tot); break;
  }
}

// OCTAVO_CPU_NO_AVX512BF16=1 takes the generic path (tests use it on bf16 CPUs).
static bool int4_use_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") &&
                         std::getenv("OCTAVO_CPU_NO_AVX512BF16") == nullptr;
  return ok;
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// ---- AMX: bf16 x of 8 or more rows ---------------------------------------------------------
// x copied once into rows zero padded to whole 32-wide K steps (and to 32 rows); rows in chunks
// of about 1 MiB of x (at least 256 rows), panels inner, so a chunk stays in L2 while each panel
// is expanded once per chunk into its thread's bf16 B buffer and read by all the chunk's rows.
constexpr int64_t kInt4AmxMinRows = 8;  // M = 8: 2x the vdpbf16ps kernel; 4-7 rows measured even
constexpr int64_t kInt4AmxChunkRows = 256;
constexpr int64_t kInt4AmxChunkBytes = 1 << 20;

static bool int4_use_amx(const Int4GemmParams& p) {
  return p.dtype == DType::kBFloat16 && int4_use_avx512_bf16() && use_amx() &&
         p.m >= kInt4AmxMinRows && int4_amx_groups_ok(p.group_size, p.groups);
}

static void int4_gemm_amx(const Int4GemmParams& p) {
  using bf16 = c10::BFloat16;
  const int64_t kpad = int4_amx_kpad(p.k), mpad = (p.m + 31) / 32 * 32;
  const int64_t k2 = (p.k + 1) / 2, panels = (p.n + kP - 1) / kP;
  std::unique_ptr<bf16[]> xp(new bf16[mpad * kpad]);  // [mpad, kpad]
  const bf16* x = static_cast<const bf16*>(p.x);
  at::parallel_for(0, mpad, 64, [&](int64_t b, int64_t end) {
    for (int64_t r = b; r < end; ++r) {
      bf16* dst = xp.get() + r * kpad;
      const int64_t n = r < p.m ? p.k : 0;
      if (n > 0) std::memcpy(dst, x + r * p.x_stride, n * sizeof(bf16));
      std::memset(static_cast<void*>(dst + n), 0, (kpad - n) * sizeof(bf16));
    }
  });
  bf16* out = static_cast<bf16*>(p.out);
  const bf16* bias = static_cast<const bf16*>(p.bias);
  const Int4AmxGroups kg{p.k, p.group_size, p.groups};
  const int64_t chunk = std::max<int64_t>(
      kInt4AmxChunkRows, kInt4AmxChunkBytes / (kpad * static_cast<int64_t>(sizeof(bf16))) / 32 * 32);
  for (int64_t c0 = 0; c0 < p.m; c0 += chunk) {
    const int64_t c1 = std::min(p.m, c0 + chunk);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<bf16[]> wb(new bf16[kpad * kP]);  // [kpad / 2, 32, 2]
      std::unique_ptr<float[]> tot(new float[(c1 - c0) * kP]);  // [c1 - c0, 32]
      amx_config_full_tiles();
      for (int64_t pi = begin; pi < end; ++pi) {
        int4_amx_expand(p.qw + pi * k2 * kP, p.k, kpad, wb.get());
        const float* sz = p.sz + pi * p.groups * 2 * kP;
        const int64_t n0 = pi * kP;
        const int valid = static_cast<int>(std::min<int64_t>(kP, p.n - n0));
        int4_amx_rows(xp.get() + c0 * kpad, kpad, wb.get(), kg, sz, p.xsum + c0 * p.groups,
                      c1 - c0, tot.get());
        for (int64_t m = c0; m < c1; ++m) {
          bf16* o = out + m * p.out_stride + n0;
          const float* t = tot.get() + (m - c0) * kP;
          for (int j = 0; j < valid; ++j)
            o[j] = from_f<bf16>(t[j] + (bias ? to_f(bias[n0 + j]) : 0.f));
        }
      }
      amx_release();
    });
  }
}
#endif

// Panels per parallel task: at least ~64 KiB of weights each, so a small matrix (a decode step's
// K/V projection) runs on one thread rather than paying an OpenMP wake-up comparable to its work.
static int64_t min_panels_per_task(int64_t panel_bytes) {
  return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, panel_bytes));
}

// [M, G] sums of each row of x over each group, in 16 interleaved partial sums so the loop
// vectorizes; a scalar loop with a division per element cost as much as the GEMM at M = 8.
template <typename T>
static void group_sums(const Int4GemmParams& p, float* xsum) {
  const T* x = static_cast<const T*>(p.x);
  for (int64_t r = 0; r < p.m; ++r) {
    const T* xr = x + r * p.x_stride;
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t k0 = g * p.group_size, k1 = std::min(p.k, k0 + p.group_size);
      float part[16] = {};
      int64_t i = k0;
      for (; i + 16 <= k1; i += 16)
        for (int l = 0; l < 16; ++l) part[l] += to_f(xr[i + l]);
      float sum = 0.f;
      for (; i < k1; ++i) sum += to_f(xr[i]);
      for (int l = 0; l < 16; ++l) sum += part[l];
      xsum[r * p.groups + g] = sum;
    }
  }
}

template <typename T>
static void int4_gemm_impl(const Int4GemmParams& params) {
  std::vector<float> xsum(params.m * params.groups);
  group_sums<T>(params, xsum.data());
  Int4GemmParams p = params;
  p.xsum = xsum.data();
#if defined(CPU_CAPABILITY_AVX512)
  if (std::is_same_v<T, c10::BFloat16> && int4_use_amx(p)) {
    int4_gemm_amx(p);
    return;
  }
#endif
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t panels = (p.n + kP - 1) / kP;
#if defined(CPU_CAPABILITY_AVX512)
  const bool bf16 = std::is_same_v<T, c10::BFloat16> && int4_use_avx512_bf16();
#else
  const bool bf16 = false;
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // fp32 copy of x, zero padded to whole K pairs (the odd K tail pairs x[K-1] with 0)
  const bool vec = !bf16;
  const int64_t xs = 2 * ((p.k + 1) / 2);
  std::vector<float> xf;
  if (vec) {
    xf.assign(p.m * xs, 0.f);
    const T* x = static_cast<const T*>(p.x);
    for (int64_t r = 0; r < p.m; ++r)
      for (int64_t i = 0; i < p.k; ++i) xf[r * xs + i] = to_f(x[r * p.x_stride + i]);
  }
  const int mblock = vec ? kMBv : kMB;
#else
  const int mblock = kMB;
#endif
  at::parallel_for(0, panels, min_panels_per_task((p.k + 1) / 2 * kP + p.groups * 2 * kP * 4),
                   [&](int64_t begin, int64_t end) {
    alignas(64) float tot[kMB * kP];
    for (int64_t pi = begin; pi < end; ++pi) {
      const int64_t n0 = pi * kP;
      const int valid = static_cast<int>(std::min<int64_t>(kP, p.n - n0));
      for (int64_t m0 = 0; m0 < p.m; m0 += mblock) {
        const int mb = static_cast<int>(std::min<int64_t>(mblock, p.m - m0));
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
        if (vec) panel_avx2_any(p, pi, xf.data() + m0 * xs, xs, p.xsum + m0 * p.groups, mb, tot);
#if defined(CPU_CAPABILITY_AVX512)
        else panel_bf16_any(p, pi, m0, mb, tot);
#endif
#else
        (void)bf16;
        panel_generic<T>(p, pi, m0, mb, tot);
#endif
        for (int m = 0; m < mb; ++m) {
          T* o = out + (m0 + m) * p.out_stride + n0;
          for (int j = 0; j < valid; ++j)
            o[j] = from_f<T>(tot[m * kP + j] + (bias ? to_f(bias[n0 + j]) : 0.f));
        }
      }
    }
  });
}

void int4_gemm_kernel(const Int4GemmParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { int4_gemm_impl<scalar_t>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(int4_gemm_kernel, Int4GemmParams)

namespace octavo {

void int4_gemm_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                   const at::Tensor& scales_offsets, int64_t group_size,
                   const std::optional<at::Tensor>& bias) {
  OCTAVO_CHECK_CPU(out);
  OCTAVO_CHECK_CPU(x);
  OCTAVO_CHECK_CPU(qweight);
  OCTAVO_CHECK_CPU(scales_offsets);
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0),
              "int4_gemm: expected x [M, K] and out [M, N], got ", x.sizes(), " and ", out.sizes());
  OCTAVO_CHECK_SAME_DTYPE(x, out);
  OCTAVO_CHECK_LAST_CONTIG(x);
  OCTAVO_CHECK_LAST_CONTIG(out);
  const int64_t n = out.size(1), k = x.size(1), panels = (n + 31) / 32;
  TORCH_CHECK(k > 0, "int4_gemm: K must be positive");
  TORCH_CHECK(group_size > 0 && (group_size % 2 == 0 || group_size >= k),
              "int4_gemm: group_size must be even (or at least K = ", k, "), got ", group_size);
  const int64_t groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 &&
                  qweight.size(0) == panels && qweight.size(1) == (k + 1) / 2 &&
                  qweight.size(2) == 32 && qweight.is_contiguous(),
              "int4_gemm: qweight must be a contiguous uint8 [", panels, ", ", (k + 1) / 2,
              ", 32] (ops_native.pack_int4_panels), got ", qweight.scalar_type(), " ",
              qweight.sizes());
  TORCH_CHECK(scales_offsets.scalar_type() == at::kFloat && scales_offsets.dim() == 4 &&
                  scales_offsets.size(0) == panels && scales_offsets.size(1) == groups &&
                  scales_offsets.size(2) == 2 && scales_offsets.size(3) == 32 &&
                  scales_offsets.is_contiguous(),
              "int4_gemm: scales_offsets must be a contiguous float32 [", panels, ", ", groups,
              ", 2, 32], got ", scales_offsets.scalar_type(), " ", scales_offsets.sizes());
  if (bias.has_value()) {
    OCTAVO_CHECK_CPU(*bias);
    OCTAVO_CHECK_SAME_DTYPE(x, *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
                "int4_gemm: bias must be a contiguous [", n, "], got ", bias->sizes());
  }
  if (x.size(0) == 0 || n == 0) return;
  const cpu::DType dtype = cpu::to_dtype(x, "int4_gemm");
  cpu::Int4GemmParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.qw = qweight.data_ptr<uint8_t>();
  p.sz = scales_offsets.data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.m = x.size(0);
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  p.groups = groups;
  p.dtype = dtype;
  OCTAVO_CALL_CPU_KERNEL(int4_gemm_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
