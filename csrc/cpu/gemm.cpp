// Dense linear out[M, N] = x[M, K] @ weight[N, K]^T (+ bias) on CPU, weights streamed once per
// call for all M rows: linear (plain row-major weight, small M) and linear_packed (bf16 or fp32
// weight in 64-output panels of K pairs, any M; what models/layers/cpu_gemm.py uses).
#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/amx.h"
#include "cpu/cpu_types.h"

namespace octavo::cpu::CPU_CAPABILITY {

// Register blocks: MB rows of x times NB weight rows, one K-dot accumulator each (see
// block_shape); at most 4 x 4 or 8 x 2.
constexpr int kMaxMB = 4;
constexpr int kNB = 4;

// sums[m * NB + n] = hsum(acc[m][n]), four at a time where the shuffles can be shared.
template <int MB, int NB>
static inline void reduce_block(const fVec (&acc)[MB][NB], float* sums) {
  for (int m = 0; m < MB; ++m) {
    int n = 0;
    if constexpr (NB >= 4) {
      hsum4(acc[m], sums + m * NB);
      n = 4;
    }
    for (; n < NB; ++n) sums[m * NB + n] = hsum(acc[m][n]);
  }
}

// Any dtype, any capability: fp32 fused multiply-adds on kVec lanes (bf16/fp16 widened on load).
template <typename T>
struct GenericBlock {
  template <int MB, int NB>
  static void run(const T* x, int64_t xs, const T* w, int64_t k, const T* pf, float* sums) {
    // x: [MB, k] row stride xs; w: [NB, k] contiguous
    fVec acc[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) acc[m][n] = fVec(0.f);
    int64_t i = 0;
    for (; i + kVec <= k; i += kVec) {
      fVec wv[NB];
      for (int n = 0; n < NB; ++n) wv[n] = load_f(w + n * k + i);
      if (pf != nullptr)
        for (int n = 0; n < NB; ++n) __builtin_prefetch(pf + n * k + i, 0, 3);
      for (int m = 0; m < MB; ++m) {
        const fVec xv = load_f(x + m * xs + i);
        for (int n = 0; n < NB; ++n) acc[m][n] = at::vec::fmadd(xv, wv[n], acc[m][n]);
      }
    }
    if (i < k) {  // zero-padded tail: the padding adds 0 * 0
      const int r = static_cast<int>(k - i);
      fVec wv[NB];
      for (int n = 0; n < NB; ++n) wv[n] = load_f_partial(w + n * k + i, r);
      for (int m = 0; m < MB; ++m) {
        const fVec xv = load_f_partial(x + m * xs + i, r);
        for (int n = 0; n < NB; ++n) acc[m][n] = at::vec::fmadd(xv, wv[n], acc[m][n]);
      }
    }
    reduce_block<MB, NB>(acc, sums);
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// Zen 4/5, Sapphire Rapids: vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 lanes per
// instruction, so weights are never widened. Built for this target only; called only when
// the CPU reports avx512_bf16.
struct Bf16DotBlock {
  // One x row: the NB weight rows are read one after another (one sequential stream), with
  // four accumulators per row to cover the dot-product latency.
  template <int NB>
  __attribute__((target("avx512bf16"))) static void gemv(const c10::BFloat16* x,
                                                         const c10::BFloat16* w, int64_t k,
                                                         const c10::BFloat16* pf, float* sums) {
    // x: [k]; w: [NB, k] contiguous
    fVec v[1][NB];
    for (int n = 0; n < NB; ++n) {
      const c10::BFloat16* wr = w + n * k;
      const c10::BFloat16* pr = pf != nullptr ? pf + n * k : nullptr;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t i = 0;
      for (; i + 128 <= k; i += 128) {
        if (pr != nullptr)
          for (int j = 0; j < 128; j += 32) __builtin_prefetch(pr + i + j, 0, 3);
        a0 = dot32(a0, x + i, wr + i);
        a1 = dot32(a1, x + i + 32, wr + i + 32);
        a2 = dot32(a2, x + i + 64, wr + i + 64);
        a3 = dot32(a3, x + i + 96, wr + i + 96);
      }
      for (; i + 32 <= k; i += 32) {
        if (pr != nullptr) __builtin_prefetch(pr + i, 0, 3);
        a0 = dot32(a0, x + i, wr + i);
      }
      if (i < k) {
        const __mmask32 mask = (1u << static_cast<unsigned>(k - i)) - 1u;
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i),
                              (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + i));
      }
      v[0][n] = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    }
    reduce_block<1, NB>(v, sums);
  }

  __attribute__((target("avx512bf16"))) static inline __m512 dot32(__m512 acc,
                                                                   const c10::BFloat16* a,
                                                                   const c10::BFloat16* b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a), (__m512bh)_mm512_loadu_si512(b));
  }

  template <int MB, int NB>
  __attribute__((target("avx512bf16"))) static void run(const c10::BFloat16* x, int64_t xs,
                                                        const c10::BFloat16* w, int64_t k,
                                                        const c10::BFloat16* pf, float* sums) {
    // x: [MB, k] row stride xs; w: [NB, k] contiguous
    if constexpr (MB == 1) {
      gemv<NB>(x, w, k, pf, sums);
      return;
    }
    __m512 acc[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      __m512i wv[NB];
      for (int n = 0; n < NB; ++n) wv[n] = _mm512_loadu_si512(w + n * k + i);
      if (pf != nullptr)
        for (int n = 0; n < NB; ++n) __builtin_prefetch(pf + n * k + i, 0, 3);
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_loadu_si512(x + m * xs + i);
        for (int n = 0; n < NB; ++n)
          acc[m][n] = _mm512_dpbf16_ps(acc[m][n], (__m512bh)xv, (__m512bh)wv[n]);
      }
    }
    if (i < k) {  // masked tail: lanes past k load as zero
      const __mmask32 mask = (1u << static_cast<unsigned>(k - i)) - 1u;
      __m512i wv[NB];
      for (int n = 0; n < NB; ++n) wv[n] = _mm512_maskz_loadu_epi16(mask, w + n * k + i);
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * xs + i);
        for (int n = 0; n < NB; ++n)
          acc[m][n] = _mm512_dpbf16_ps(acc[m][n], (__m512bh)xv, (__m512bh)wv[n]);
      }
    }
    fVec v[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) v[m][n] = acc[m][n];
    reduce_block<MB, NB>(v, sums);
  }
};

// OCTAVO_CPU_NO_AVX512BF16=1 takes the generic AVX-512 path (tests use it on bf16 CPUs).
static bool use_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") &&
                         std::getenv("OCTAVO_CPU_NO_AVX512BF16") == nullptr;
  return ok;
}
#endif

template <class Block, int MB, typename T>
static void call_nb(int nb, const T* x, int64_t xs, const T* w, int64_t k, const T* pf,
                    float* sums) {
  switch (nb) {
    case 1: Block::template run<MB, 1>(x, xs, w, k, pf, sums); break;
    case 2: Block::template run<MB, 2>(x, xs, w, k, pf, sums); break;
    default:  // 3 or 4 weight rows: only with up to 4 x rows (block_shape)
      if constexpr (MB <= 4) {
        if (nb == 3) Block::template run<MB, 3>(x, xs, w, k, pf, sums);
        else Block::template run<MB, 4>(x, xs, w, k, pf, sums);
      } else {
        TORCH_INTERNAL_ASSERT(false, "linear: no ", MB, " x ", nb, " block");
      }
      break;
  }
}

template <class Block, typename T>
static void call_block(int mb, int nb, const T* x, int64_t xs, const T* w, int64_t k,
                       const T* pf, float* sums) {
  switch (mb) {
    case 1: call_nb<Block, 1>(nb, x, xs, w, k, pf, sums); break;
    case 2: call_nb<Block, 2>(nb, x, xs, w, k, pf, sums); break;
    case 3: call_nb<Block, 3>(nb, x, xs, w, k, pf, sums); break;
    case 4: call_nb<Block, 4>(nb, x, xs, w, k, pf, sums); break;
    case 5: call_nb<Block, 5>(nb, x, xs, w, k, pf, sums); break;
    case 6: call_nb<Block, 6>(nb, x, xs, w, k, pf, sums); break;
    case 7: call_nb<Block, 7>(nb, x, xs, w, k, pf, sums); break;
    default: call_nb<Block, 8>(nb, x, xs, w, k, pf, sums); break;
  }
}

// Block shape for M rows: up to 8 rows in one pass (so the weight block is read once, from
// memory) with 2 weight rows, or 4 x 4 blocks, re-reading the weight block from L1, beyond.
struct BlockShape { int mb, nb; };
static BlockShape block_shape(int64_t m) {
  if (m <= 4) return {static_cast<int>(m), kNB};
  if (m <= 8) return {static_cast<int>(m), 2};
  return {kMaxMB, kNB};
}

// Threads split the N blocks; each walks its weight rows once, all M rows per block of rows.
template <typename T, class Block>
static void linear_impl(const LinearParams& p) {
  const T* x = static_cast<const T*>(p.x);            // [M, K] row stride x_stride
  const T* w = static_cast<const T*>(p.weight);       // [N, K]
  const T* bias = static_cast<const T*>(p.bias);      // [N] or null
  T* out = static_cast<T*>(p.out);                    // [M, N] row stride out_stride
  const BlockShape bs = block_shape(p.m);
  const int64_t k = p.k, nblocks = (p.n + bs.nb - 1) / bs.nb;
  // at least ~64 KiB of weight per task, so small layers do not pay for a thread handoff
  const int64_t block_bytes = std::max<int64_t>(1, bs.nb * k * static_cast<int64_t>(sizeof(T)));
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / block_bytes);
  // prefetch distance in bytes of weight, about one 4-row block of a 2048-wide layer
  const int64_t pf_blocks = std::max<int64_t>(1, (16 << 10) / block_bytes);
  at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
    float sums[8 * kNB];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * bs.nb;
      const int nb = static_cast<int>(std::min<int64_t>(bs.nb, p.n - n0));
      for (int64_t m0 = 0; m0 < p.m; m0 += bs.mb) {
        const int mb = static_cast<int>(std::min<int64_t>(bs.mb, p.m - m0));
        // the first pass over a block prefetches the one pf_blocks ahead
        const T* pf = (m0 == 0 && b + pf_blocks < nblocks) ? w + (n0 + pf_blocks * bs.nb) * k : nullptr;
        call_block<Block>(mb, nb, x + m0 * p.x_stride, p.x_stride, w + n0 * k, k, pf, sums);
        for (int m = 0; m < mb; ++m) {
          T* o = out + (m0 + m) * p.out_stride + n0;
          for (int n = 0; n < nb; ++n)
            o[n] = from_f<T>(sums[m * nb + n] + (bias ? to_f(bias[n0 + n]) : 0.f));
        }
      }
    }
  });
}

// ---- packed layout: weight [ceil(N/64), ceil(K/2), 64, 2] (pairs of K for 64 outputs) --------
// One 64-output panel is read front to back (a single sequential stream); outputs stay in
// vector lanes, so there are no horizontal sums. Works for any M: the panel stays in L2.
constexpr int kPanel = 64;
constexpr int kMaxPackedMB = 6;

// Generic: fp32 math on any CPU, bf16 or fp32 weights (T is also x's and out's type).
template <typename T>
static void packed_block_generic(const LinearParams& p, const T* wp, int64_t n0, int64_t m0, int mb) {
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int64_t kpairs = (p.k + 1) / 2;
  const int valid = static_cast<int>(std::min<int64_t>(kPanel, p.n - n0));
  for (int m = 0; m < mb; ++m) {
    const T* xr = x + (m0 + m) * p.x_stride;
    float acc[kPanel] = {};
    for (int64_t kk = 0; kk < kpairs; ++kk) {
      const float x0 = to_f(xr[2 * kk]);
      const float x1 = 2 * kk + 1 < p.k ? to_f(xr[2 * kk + 1]) : 0.f;
      const T* wk = wp + kk * 2 * kPanel;
      for (int j = 0; j < kPanel; ++j) acc[j] += x0 * to_f(wk[2 * j]) + x1 * to_f(wk[2 * j + 1]);
    }
    T* o = out + (m0 + m) * p.out_stride + n0;
    for (int j = 0; j < valid; ++j) o[j] = from_f<T>(acc[j] + (bias ? to_f(bias[n0 + j]) : 0.f));
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// acc[m][t] += (x[m][0], x[m][1]) . the weight pairs of outputs 16t..16t+15, for one K pair.
template <int MB>
__attribute__((target("avx512bf16"))) static inline void packed_step(__m512 (&acc)[MB][4],
                                                                    const c10::BFloat16* wk,
                                                                    const c10::BFloat16* x,
                                                                    int64_t xs) {
  const __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 32),
                w2 = _mm512_loadu_si512(wk + 64), w3 = _mm512_loadu_si512(wk + 96);
  for (int m = 0; m < MB; ++m) {
    int32_t pair;  // x[m][2kk], x[m][2kk + 1]
    std::memcpy(&pair, x + m * xs, 4);
    const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
    acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, (__m512bh)w0);
    acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, (__m512bh)w1);
    acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xb, (__m512bh)w2);
    acc[m][3] = _mm512_dpbf16_ps(acc[m][3], xb, (__m512bh)w3);
  }
}

// K pairs [kk0, kk1) of one MB x 64 output block. Partial sums live in scratch [MB, 64] between
// K ranges (first: start from zero; last: add the bias and store the outputs).
struct PackedRange {
  int64_t kk0, kk1;
  float* scratch;
  bool first, last;
  int64_t prefetch_pairs;  // prefetch the weights this many K pairs ahead (0: none)
  int prefetch_line = 0, prefetch_lines = 4;  // packed_range_asm: those lines of the pair row
};

// The K loop of an MB x 64 block (MB <= 6) in inline assembly: packed_k_loop<MB>(wk, xk, x_stride,
// pairs, sums, zero, prefetch_pairs, prefetch_line, prefetch_lines) zeroes (zero) or loads the sums [MB, 64] fp32 (row stride 64),
// adds `pairs` K pairs, from the panel's pair row at wk on (256 bytes a pair) and from x's MB rows
// at xk on (row stride x_stride elements), and stores the sums back; prefetch_pairs > 0: each
// pair row also pulls prefetch_lines (1, 2 or 4) of the 64-byte lines of the one that many pairs
// ahead into L2, from line prefetch_line on. Accumulators zmm0-23, the pair row's
// four weight vectors zmm24-27, the broadcast x pair zmm31: the instructions of the intrinsics
// (packed_step), which GCC schedules and addresses differently; the same 6 x 4 block ran at
// 430-434 GFLOP/s from intrinsics and 446-453 from this loop (Zen 4 VM, M = 2016, K = 2048,
// N = 2304, weights hot, alternated 3 times, 2026-12-05).
#define OCTAVO_ROW_ADDR_0 "(%[x])"
#define OCTAVO_ROW_ADDR_1 "(%[x],%[xs],1)"
#define OCTAVO_ROW_ADDR_2 "(%[x],%[xs],2)"
#define OCTAVO_ROW_ADDR_3 "(%[x3])"
#define OCTAVO_ROW_ADDR_4 "(%[x3],%[xs],1)"
#define OCTAVO_ROW_ADDR_5 "(%[x3],%[xs],2)"
#define OCTAVO_ROW_FMA(m, a0, a1, a2, a3)                      \
  "vpbroadcastd " OCTAVO_ROW_ADDR_##m ", %%zmm31\n\t"         \
  "vdpbf16ps %%zmm31, %%zmm24, %%zmm" #a0 "\n\t"              \
  "vdpbf16ps %%zmm31, %%zmm25, %%zmm" #a1 "\n\t"              \
  "vdpbf16ps %%zmm31, %%zmm26, %%zmm" #a2 "\n\t"              \
  "vdpbf16ps %%zmm31, %%zmm27, %%zmm" #a3 "\n\t"
#define OCTAVO_ROW_MOV(op, m, a0, a1, a2, a3)                  \
  op " " #m "*256(%[sums]), %%zmm" #a0 "\n\t"                  \
  op " " #m "*256+64(%[sums]), %%zmm" #a1 "\n\t"               \
  op " " #m "*256+128(%[sums]), %%zmm" #a2 "\n\t"              \
  op " " #m "*256+192(%[sums]), %%zmm" #a3 "\n\t"
#define OCTAVO_ROW_STORE(m, a0, a1, a2, a3)                    \
  "vmovups %%zmm" #a0 ", " #m "*256(%[sums])\n\t"              \
  "vmovups %%zmm" #a1 ", " #m "*256+64(%[sums])\n\t"           \
  "vmovups %%zmm" #a2 ", " #m "*256+128(%[sums])\n\t"          \
  "vmovups %%zmm" #a3 ", " #m "*256+192(%[sums])\n\t"
#define OCTAVO_ROW_ZERO(m, a0, a1, a2, a3)                     \
  "vpxord %%zmm" #a0 ", %%zmm" #a0 ", %%zmm" #a0 "\n\t"        \
  "vpxord %%zmm" #a1 ", %%zmm" #a1 ", %%zmm" #a1 "\n\t"        \
  "vpxord %%zmm" #a2 ", %%zmm" #a2 ", %%zmm" #a2 "\n\t"        \
  "vpxord %%zmm" #a3 ", %%zmm" #a3 ", %%zmm" #a3 "\n\t"
#define OCTAVO_ROWS_1(F, ...) F(__VA_ARGS__ 0, 0, 1, 2, 3)
#define OCTAVO_ROWS_2(F, ...) OCTAVO_ROWS_1(F, __VA_ARGS__) F(__VA_ARGS__ 1, 4, 5, 6, 7)
#define OCTAVO_ROWS_3(F, ...) OCTAVO_ROWS_2(F, __VA_ARGS__) F(__VA_ARGS__ 2, 8, 9, 10, 11)
#define OCTAVO_ROWS_4(F, ...) OCTAVO_ROWS_3(F, __VA_ARGS__) F(__VA_ARGS__ 3, 12, 13, 14, 15)
#define OCTAVO_ROWS_5(F, ...) OCTAVO_ROWS_4(F, __VA_ARGS__) F(__VA_ARGS__ 4, 16, 17, 18, 19)
#define OCTAVO_ROWS_6(F, ...) OCTAVO_ROWS_5(F, __VA_ARGS__) F(__VA_ARGS__ 5, 20, 21, 22, 23)
#define OCTAVO_PACKED_LOOP(MB)                                                              \
  asm volatile(                                                                             \
      "test %[first], %[first]\n\t"                                                        \
      "jz 1f\n\t" OCTAVO_ROWS_##MB(OCTAVO_ROW_ZERO, ) "jmp 2f\n\t"                         \
      "1:\n\t" OCTAVO_ROWS_##MB(OCTAVO_ROW_MOV, "vmovups", )                                \
      "2:\n\t"                                                                             \
      "test %[n], %[n]\n\t"                                                                \
      "jz 5f\n\t"                                                                          \
      "3:\n\t"                                                                             \
      "test %[pf], %[pf]\n\t"                                                              \
      "jz 4f\n\t"                                                                          \
      "prefetcht1 (%[w],%[pf],1)\n\t"                                                      \
      "cmp $1, %[pfn]\n\t"                                                                 \
      "je 4f\n\t"                                                                          \
      "prefetcht1 64(%[w],%[pf],1)\n\t"                                                    \
      "cmp $2, %[pfn]\n\t"                                                                 \
      "je 4f\n\t"                                                                          \
      "prefetcht1 128(%[w],%[pf],1)\n\t"                                                   \
      "prefetcht1 192(%[w],%[pf],1)\n\t"                                                   \
      "4:\n\t"                                                                             \
      "vmovdqu64 (%[w]), %%zmm24\n\t"                                                      \
      "vmovdqu64 64(%[w]), %%zmm25\n\t"                                                    \
      "vmovdqu64 128(%[w]), %%zmm26\n\t"                                                   \
      "vmovdqu64 192(%[w]), %%zmm27\n\t" OCTAVO_ROWS_##MB(OCTAVO_ROW_FMA, )                 \
      "add $256, %[w]\n\t"                                                                 \
      "add $4, %[x]\n\t"                                                                   \
      "add $4, %[x3]\n\t"                                                                  \
      "dec %[n]\n\t"                                                                       \
      "jnz 3b\n\t"                                                                         \
      "5:\n\t" OCTAVO_ROWS_##MB(OCTAVO_ROW_STORE, )                                         \
      : [w] "+r"(w), [x] "+r"(x), [x3] "+r"(x3), [n] "+r"(n)                                \
      : [sums] "r"(sums), [xs] "r"(xs), [pf] "r"(pf), [pfn] "r"(pfn), [first] "r"(first) \
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",      \
        "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16",      \
        "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25",    \
        "xmm26", "xmm27", "xmm31")

template <int MB>
static void packed_k_loop(const c10::BFloat16* wk, const c10::BFloat16* xk, int64_t x_stride, int64_t pairs,
                          float* sums, bool zero, int64_t prefetch_pairs, int prefetch_line = 0,
                          int prefetch_lines = 4) {
  static_assert(MB >= 1 && MB <= 6);
  const char* w = reinterpret_cast<const char*>(wk);
  const char* x = reinterpret_cast<const char*>(xk);
  const int64_t xs = x_stride * 2;
  const char* x3 = x + 3 * xs;
  int64_t n = pairs;
  const int64_t pf = prefetch_pairs > 0 ? prefetch_pairs * 2 * kPanel * 2 + 64 * prefetch_line : 0;
  const int64_t pfn = prefetch_lines;
  const int64_t first = zero;
  if constexpr (MB == 1) OCTAVO_PACKED_LOOP(1);
  else if constexpr (MB == 2) OCTAVO_PACKED_LOOP(2);
  else if constexpr (MB == 3) OCTAVO_PACKED_LOOP(3);
  else if constexpr (MB == 4) OCTAVO_PACKED_LOOP(4);
  else if constexpr (MB == 5) OCTAVO_PACKED_LOOP(5);
  else OCTAVO_PACKED_LOOP(6);
}

// The block's outputs from its sums over K's whole pairs: an odd K's last pair added, then the
// bias, rounded to bf16 and stored (masked past N).
template <int MB>
__attribute__((target("avx512bf16"))) static inline void packed_block_store(const LinearParams& p,
                                                                           __m512 (&acc)[MB][4],
                                                                           const c10::BFloat16* wp,
                                                                           int64_t n0, int64_t m0) {
  const c10::BFloat16* x = static_cast<const c10::BFloat16*>(p.x) + m0 * p.x_stride;  // [MB, K]
  if (p.k & 1) {  // the last pair holds x[K-1] and 0 (the packed weight is zero there)
    c10::BFloat16 last[MB][2];
    for (int m = 0; m < MB; ++m) {
      last[m][0] = x[m * p.x_stride + p.k - 1];
      last[m][1].x = 0;
    }
    packed_step<MB>(acc, wp + p.k / 2 * 2 * kPanel, &last[0][0], 2);
  }
  const c10::BFloat16* bias = static_cast<const c10::BFloat16*>(p.bias);
  c10::BFloat16* out = static_cast<c10::BFloat16*>(p.out);
  for (int t = 0; t < 4; ++t) {
    const int64_t col = n0 + 16 * t;
    if (col >= p.n) break;
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, p.n - col)) - 1u);
    __m512 b = _mm512_setzero_ps();
    if (bias) b = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask, bias + col));
    for (int m = 0; m < MB; ++m) {
      const __m256bh r = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][t], b));
      _mm256_mask_storeu_epi16(out + (m0 + m) * p.out_stride + col, mask, (__m256i)r);
    }
  }
}

// Decode rows (one pass over the panel) and the AMX path's leftover pairs: the K loop from
// intrinsics, which streams the weights from memory at M = 1 as fast as packed_k_loop or 1-3%
// faster (in-process A/B over medium's 64 GEMMs, THP weights, 2026-12-05).
template <int MB>
__attribute__((target("avx512bf16"))) static void packed_block_bf16(const LinearParams& p,
                                                                   const c10::BFloat16* wp,
                                                                   int64_t n0, int64_t m0,
                                                                   const PackedRange& r) {
  const c10::BFloat16* x = static_cast<const c10::BFloat16*>(p.x) + m0 * p.x_stride;  // [MB, K]
  const int64_t kfull = p.k / 2;
  const bool prefetch = r.prefetch_pairs > 0;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t)
      acc[m][t] = r.first ? _mm512_setzero_ps() : _mm512_loadu_ps(r.scratch + m * kPanel + 16 * t);
  for (int64_t kk = r.kk0; kk < std::min(r.kk1, kfull); ++kk) {
    const c10::BFloat16* wk = wp + kk * 2 * kPanel;
    // all four lines of the pair row, into L2 (decode: 16 KiB ahead, 1.1-1.2x the weight
    // streaming rate of one line 8 KiB ahead into L1 when the weights come from DRAM, Xeon,
    // 2026-12-03)
    if (prefetch)
      for (int l = 0; l < 4; ++l) __builtin_prefetch(wk + r.prefetch_pairs * 2 * kPanel + 32 * l, 0, 2);
    packed_step<MB>(acc, wk, x + 2 * kk, p.x_stride);
  }
  if (!r.last) {
    for (int m = 0; m < MB; ++m)
      for (int t = 0; t < 4; ++t) _mm512_storeu_ps(r.scratch + m * kPanel + 16 * t, acc[m][t]);
    return;
  }
  packed_block_store<MB>(p, acc, wp, n0, m0);
}

// Chunks of rows: K range [kk0, kk1) of one block through packed_k_loop (sums in r.scratch), the
// last range also storing the outputs. packed_k_loop ran the chunks' ranges at 422-444 GFLOP/s
// where these intrinsics ran 409-437 (Zen 4 VM, M = 2016-2048 prefill shapes, best of 3,
// alternated, 2026-12-05).
template <int MB>
__attribute__((target("avx512bf16"))) static void packed_range_asm(const LinearParams& p,
                                                                  const c10::BFloat16* wp,
                                                                  int64_t n0, int64_t m0,
                                                                  const PackedRange& r) {
  const c10::BFloat16* x = static_cast<const c10::BFloat16*>(p.x) + m0 * p.x_stride;
  const int64_t kk1 = std::min(r.kk1, p.k / 2);
  packed_k_loop<MB>(wp + r.kk0 * 2 * kPanel, x + 2 * r.kk0, p.x_stride, std::max<int64_t>(0, kk1 - r.kk0),
                    r.scratch, r.first, r.prefetch_pairs, r.prefetch_line, r.prefetch_lines);
  if (!r.last) return;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < 4; ++t) acc[m][t] = _mm512_load_ps(r.scratch + m * kPanel + 16 * t);
  packed_block_store<MB>(p, acc, wp, n0, m0);
}

static void packed_block_bf16_any(const LinearParams& p, const c10::BFloat16* wp, int64_t n0,
                                  int64_t m0, int mb, const PackedRange& r) {
  switch (mb) {
    case 1: packed_block_bf16<1>(p, wp, n0, m0, r); break;
    case 2: packed_block_bf16<2>(p, wp, n0, m0, r); break;
    case 3: packed_block_bf16<3>(p, wp, n0, m0, r); break;
    case 4: packed_block_bf16<4>(p, wp, n0, m0, r); break;
    case 5: packed_block_bf16<5>(p, wp, n0, m0, r); break;
    default: packed_block_bf16<6>(p, wp, n0, m0, r); break;
  }
}

// Many rows (prefill, batched decode): chunks of kChunkRows rows x K ranges of kKPairs pairs,
// so the 64 x 2*kKPairs weight tile (32 KiB) is read from memory once while all the chunk's row
// blocks use it. The chunk's first blocks prefetch the next tile (the next range, or the next
// panel's first) into L2, so the next range's first block does not wait on memory.
constexpr int64_t kChunkRows = 96;
constexpr int64_t kKPairs = 128;
// Decode (at most 2 * kMaxPackedMB rows): one pass over each panel; its first row block
// prefetches the weights this many K pairs (16 KiB) ahead.
constexpr int64_t kDecodePrefetchPairs = 64;

// Rows of the block that starts at row m0 when `rows` rows are cut into the fewest blocks of at
// most kMaxPackedMB, as evenly as can be: 32 rows as 6, 6, 5, 5, 5, 5 rather than five blocks of 6
// and one of 2, which re-reads the whole weight tile for a third of a block's products.
static int even_block_rows(int64_t rows, int64_t m0) {
  const int64_t blocks = (rows + kMaxPackedMB - 1) / kMaxPackedMB;
  const int64_t base = rows / blocks, longer = rows % blocks;  // the first `longer` get base + 1
  return static_cast<int>(m0 < longer * (base + 1) ? base + 1 : base);
}

static void packed_panel_bf16(const LinearParams& p, const c10::BFloat16* wp, int64_t n0) {
  const int64_t kfull = p.k / 2;
  if (p.m <= 2 * kMaxPackedMB) {  // decode: one pass over the panel, the weights from memory
    for (int64_t m0 = 0; m0 < p.m;) {
      const int mb = even_block_rows(p.m, m0);
      const PackedRange whole{0, kfull, nullptr, true, true, m0 == 0 ? kDecodePrefetchPairs : 0};
      packed_block_bf16_any(p, wp, n0, m0, mb, whole);
      m0 += mb;
    }
    return;
  }
  alignas(64) float scratch[kChunkRows * kPanel];  // [kChunkRows, 64] partial sums
  const int64_t nranges = std::max<int64_t>(1, (kfull + kKPairs - 1) / kKPairs);
  const c10::BFloat16* x = static_cast<const c10::BFloat16*>(p.x);
  // by block rows: the K loop alone (the ranges before the last), the last range with the stores
  static constexpr void (*loops[kMaxPackedMB + 1])(const c10::BFloat16*, const c10::BFloat16*, int64_t, int64_t,
                                                    float*, bool, int64_t, int, int) = {
      nullptr, packed_k_loop<1>, packed_k_loop<2>, packed_k_loop<3>, packed_k_loop<4>, packed_k_loop<5>, packed_k_loop<6>};
  static constexpr void (*lasts[kMaxPackedMB + 1])(const LinearParams&, const c10::BFloat16*, int64_t, int64_t,
                                                    const PackedRange&) = {
      nullptr, packed_range_asm<1>, packed_range_asm<2>, packed_range_asm<3>,
      packed_range_asm<4>, packed_range_asm<5>, packed_range_asm<6>};
  int block_rows[kChunkRows];
  for (int64_t c0 = 0; c0 < p.m; c0 += kChunkRows) {
    const int64_t c1 = std::min(p.m, c0 + kChunkRows);
    int nblocks = 0;  // the chunk's row blocks, cut once (even_block_rows divides)
    for (int64_t m0 = c0; m0 < c1; m0 += block_rows[nblocks++]) block_rows[nblocks] = even_block_rows(c1 - c0, m0 - c0);
    // The next tile's prefetch, four lines a pair row: one chunk (batched decode, weights
    // streamed from memory once) splits them over its first blocks (two blocks 2 + 2, three
    // 2 + 1 + 1, four or more one each) so that memory is asked at an even pace, not all
    // during the first block (small Llama's 49 M = 32 decode GEMMs on cold weights 1.02-1.14x
    // faster, M = 16 1.05-1.15x; Zen 4 VM, 2026-12-05); row chunks of prefill read their panel
    // back from L2 after the first and keep it on the first block (level or 1-2% better there).
    const int pf_blocks = p.m <= kChunkRows ? std::min(nblocks, 4) : 1;
    auto pf_line = [&](int b) { return (4 * b + pf_blocks - 1) / pf_blocks; };  // block b's first line
    auto pf_lines = [&](int b) { return pf_line(b + 1) - pf_line(b); };
    auto pf_pairs = [&](int b) -> int64_t { return b < pf_blocks ? kKPairs : 0; };
    for (int64_t r = 0; r + 1 < nranges; ++r) {
      const int64_t kk0 = r * kKPairs;
      int64_t m0 = c0;
      for (int b = 0; b < nblocks; m0 += block_rows[b++])
        loops[block_rows[b]](wp + kk0 * 2 * kPanel, x + m0 * p.x_stride + 2 * kk0, p.x_stride, kKPairs,
                             scratch + (m0 - c0) * kPanel, r == 0, pf_pairs(b), pf_line(b), pf_lines(b));
    }
    const int64_t r = nranges - 1;
    int64_t m0 = c0;
    for (int b = 0; b < nblocks; m0 += block_rows[b++]) {
      const PackedRange range{r * kKPairs, (r + 1) * kKPairs, scratch + (m0 - c0) * kPanel, r == 0, true,
                              pf_pairs(b), pf_line(b), pf_lines(b)};
      lasts[block_rows[b]](p, wp, n0, m0, range);
    }
  }
}

// ---- AMX: 16-row blocks of the packed layout through tile registers ---------------------------
// amx_panel_block (amx.h) takes K in steps of 32 (16 pairs). The pairs past the last full step
// (K mod 32, an odd K's last pair) and the epilogue (bias, bf16 store) go through
// packed_block_bf16, starting from the tile sums. Rows come in chunks of about 1 MiB of x (at least 256 rows, so that a
// long-K panel streamed from memory serves enough rows), panels inner, so a chunk of x stays in
// L2 while every panel of a thread reads it.
constexpr int kAmxRows = 16;
constexpr int64_t kAmxPairs = 16;
constexpr int64_t kAmxChunkBytes = 1 << 20;
constexpr int64_t kAmxChunkRows = 256;

// The tile sums of rows [m0, m0 + rows) of a panel (scratch [16, 64] fp32) plus the bias, to bf16
// output, where K is whole 32-wide steps (no pairs left for packed_block_bf16): one pass, two
// cvtne2ps2bf16 a row, instead of packed_block_bf16's calls of up to 6 rows each (~4% of a
// 2040 x 768 x 4096 GEMM on the AMX Xeon).
__attribute__((target("avx512bf16"))) static void amx_epilogue(const LinearParams& p, const float* scratch,
                                                              int64_t n0, int64_t m0, int rows) {
  const c10::BFloat16* bias = static_cast<const c10::BFloat16*>(p.bias);
  c10::BFloat16* out = static_cast<c10::BFloat16*>(p.out) + m0 * p.out_stride;
  const int cols = static_cast<int>(std::min<int64_t>(kPanel, p.n - n0));
  __m512 b[4];
  __mmask16 mask[4];
  for (int t = 0; t < 4; ++t) {
    const int c = std::max(0, std::min(16, cols - 16 * t));
    mask[t] = static_cast<__mmask16>((1u << c) - 1u);
    b[t] = bias != nullptr ? _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask[t], bias + n0 + 16 * t))
                           : _mm512_setzero_ps();
  }
  if (cols == kPanel) {
    for (int m = 0; m < rows; ++m) {
      const float* sr = scratch + m * kPanel;
      c10::BFloat16* o = out + m * p.out_stride + n0;
      _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_loadu_ps(sr + 16), b[1]),
                                                          _mm512_add_ps(_mm512_loadu_ps(sr), b[0])));
      _mm512_storeu_si512(o + 32, (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_loadu_ps(sr + 48), b[3]),
                                                               _mm512_add_ps(_mm512_loadu_ps(sr + 32), b[2])));
    }
    return;
  }
  for (int m = 0; m < rows; ++m)
    for (int t = 0; t < 4; ++t)
      if (mask[t] != 0)
        _mm256_mask_storeu_epi16(out + m * p.out_stride + n0 + 16 * t, mask[t],
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(scratch + m * kPanel + 16 * t), b[t])));
}

// Rows [r0, r1) through one panel. tail: the last partial 16-row block of x, zero padded to 16
// rows (row stride K), or nullptr when M is a multiple of 16.
static void packed_panel_amx(const LinearParams& p, const c10::BFloat16* wp, int64_t n0,
                             int64_t r0, int64_t r1, const c10::BFloat16* tail) {
  const c10::BFloat16* x = static_cast<const c10::BFloat16*>(p.x);
  const int64_t kfull = p.k / 2, kmain = p.k / 32 * kAmxPairs;
  alignas(64) float scratch[kAmxRows * kPanel];
  int64_t m_start = r0;
  // OCTAVO_CPU_AMX_BLOCKS=0: every 16-row block through the whole panel alone (the kernel lab's A/B)
  static const bool multi = [] {
    const char* e = std::getenv("OCTAVO_CPU_AMX_BLOCKS");
    return e == nullptr || e[0] != '0';
  }();
  if (multi && p.k % 32 == 0 && p.k > 0) {
    // whole 16-row blocks, up to four at a time through each chunk of K (amx_panel_blocks):
    // M = 32 decode GEMMs -5..-14% at K = 2048/5632 in the kernel lab, level at K = 768
    alignas(64) float sums[4 * kAmxRows * kPanel];
    const int64_t full_end = r0 + (r1 - r0) / kAmxRows * kAmxRows;
    while (full_end - m_start >= 2 * kAmxRows) {
      const int nblk = static_cast<int>(std::min<int64_t>(4, (full_end - m_start) / kAmxRows));
      amx_panel_blocks(x + m_start * p.x_stride, p.x_stride, nblk, wp, kmain, sums);
      for (int b = 0; b < nblk; ++b) amx_epilogue(p, sums + b * kAmxRows * kPanel, n0, m_start + b * kAmxRows, kAmxRows);
      m_start += nblk * kAmxRows;
    }
  }
  for (int64_t m0 = m_start; m0 < r1; m0 += kAmxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kAmxRows, r1 - m0));
    if (kmain > 0) {
      if (rows == kAmxRows) amx_panel_block(x + m0 * p.x_stride, p.x_stride, wp, kmain, scratch);
      else amx_panel_block(tail, p.k, wp, kmain, scratch);
    }
    if (p.k % 32 == 0 && p.k > 0) {  // no pairs left (nor an odd last column): sums straight to bf16
      amx_epilogue(p, scratch, n0, m0, rows);
      continue;
    }
    for (int r = 0; r < rows; r += kMaxPackedMB)
      packed_block_bf16_any(p, wp, n0, m0 + r, std::min(kMaxPackedMB, rows - r),
                            PackedRange{kmain, kfull, scratch + r * kPanel, kmain == 0, true, 0});
  }
}

static void linear_packed_amx(const LinearParams& p) {
  const c10::BFloat16* w = static_cast<const c10::BFloat16*>(p.weight);
  const c10::BFloat16* x = static_cast<const c10::BFloat16*>(p.x);
  const int64_t panels = (p.n + kPanel - 1) / kPanel, panel_elems = (p.k + 1) / 2 * 2 * kPanel;
  const int64_t full = p.m / kAmxRows * kAmxRows;
  std::vector<c10::BFloat16> tail(p.m > full ? kAmxRows * p.k : 0);  // value-initialized: zeros
  for (int64_t m = full; m < p.m; ++m)
    std::memcpy(tail.data() + (m - full) * p.k, x + m * p.x_stride, p.k * sizeof(c10::BFloat16));
  const int64_t chunk = std::max<int64_t>(
      kAmxChunkRows, kAmxChunkBytes / (p.k * static_cast<int64_t>(sizeof(c10::BFloat16))) / kAmxRows * kAmxRows);
  for (int64_t c0 = 0; c0 < p.m; c0 += chunk) {
    const int64_t c1 = std::min(p.m, c0 + chunk);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      amx_config_full_tiles();
      for (int64_t pi = begin; pi < end; ++pi)
        packed_panel_amx(p, w + pi * panel_elems, pi * kPanel, c0, c1, tail.data());
      amx_release();
    });
  }
}

// Fewest rows that take the tiles (below: the AVX-512 dot products, which stream the weights at
// the same speed). OCTAVO_CPU_AMX_MIN_ROWS overrides it (the kernel lab measures both).
static int64_t amx_min_rows() {
  static const int64_t v = [] {
    const char* e = std::getenv("OCTAVO_CPU_AMX_MIN_ROWS");
    return e != nullptr ? std::max<int64_t>(1, std::atoll(e)) : int64_t{4};
  }();
  return v;
}
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// ---- AVX2 + FMA path for the packed layout, bf16 or fp32 weights ------------------------------
// x is read as fp32 rows with K padded to pairs (converted once per call where needed), so the
// inner loops only load weights, broadcast x and FMA.
//  bf16: one 256-bit load of a K-pair row holds 8 outputs x (k, k+1) as 32-bit words; the word
//        shifted left 16 is the even-k weight as fp32, the word masked to its high half the odd-k
//        weight. 8 vectors cover the panel's 64 outputs.
//  fp32: one load holds 4 outputs x (k, k+1); FMA'd against the broadcast (x[k], x[k+1]) pair,
//        the accumulators keep the two k parities in adjacent lanes, summed at the end. 16 vectors.
// Work unit: a tile of MB rows x NV vectors over a chunk of K pairs small enough (16 KiB of
// weights) to stay in L1 while every row block and vector group of the chunk reads it; partial
// sums wait in a [rows, 128] fp32 scratch between chunks.
template <typename W>
struct Avx2Panel;

template <>
struct Avx2Panel<c10::BFloat16> {
  static constexpr int kVecs = 8;          // 256-bit vectors per K-pair row of a panel

  template <int MB, int NV>
  static inline void step(__m256 (&acc)[MB][NV], const c10::BFloat16* wk, const float* x, int64_t xs) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m256 wv[NV];
    for (int v = 0; v < NV; ++v)
      wv[v] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(wk + 16 * v)), 16));
    for (int m = 0; m < MB; ++m) {
      const __m256 b = _mm256_broadcast_ss(x + m * xs);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(wv[v], b, acc[m][v]);
    }
    for (int v = 0; v < NV; ++v)
      wv[v] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256((const __m256i*)(wk + 16 * v)), hi));
    for (int m = 0; m < MB; ++m) {
      const __m256 b = _mm256_broadcast_ss(x + m * xs + 1);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(wv[v], b, acc[m][v]);
    }
  }
  // scratch row [64 outputs] -> outputs
  static inline float result(const float* s, int j) { return s[j]; }
};

template <>
struct Avx2Panel<float> {
  static constexpr int kVecs = 16;

  template <int MB, int NV>
  static inline void step(__m256 (&acc)[MB][NV], const float* wk, const float* x, int64_t xs) {
    __m256 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(wk + 8 * v);
    for (int m = 0; m < MB; ++m) {
      double pair;  // (x[k], x[k + 1])
      std::memcpy(&pair, x + m * xs, 8);
      const __m256 b = _mm256_castpd_ps(_mm256_set1_pd(pair));
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(wv[v], b, acc[m][v]);
    }
  }
  // scratch row [64 outputs x 2 parities] -> outputs
  static inline float result(const float* s, int j) { return s[2 * j] + s[2 * j + 1]; }
};

constexpr int64_t kScratchRow = 128;  // floats per row of partial sums

struct Avx2Tile {
  int64_t kk0, kk1;   // K pairs of the chunk
  bool first;         // start from zero (else from the scratch)
  bool prefetch;      // also pull in the next chunk's weights
};

// K pairs per chunk: 16 KiB of weights for up to 8 rows (streamed once, prefetched a chunk
// ahead); 32 KiB for more rows, halving the per-tile overhead (accumulator loads and stores).
template <typename W>
static int64_t avx2_chunk(int64_t rows) {
  const int64_t c = (16 << 10) / (2 * kPanel * static_cast<int64_t>(sizeof(W)));
  return rows > 8 ? 2 * c : c;
}

// acc for rows [0, MB) x vectors [v0, v0 + NV) of one panel over the tile's K pairs.
template <typename W, int MB, int NV>
static void avx2_tile(const W* wp, int v0, const float* x, int64_t xs, float* scratch, const Avx2Tile& t) {
  // wp: [kpairs, 64, 2] one panel; x: [MB, 2 * kpairs] fp32, row stride xs; scratch: [MB, 128]
  using P = Avx2Panel<W>;
  constexpr int64_t row = 2 * kPanel;           // weights per K pair
  constexpr int64_t lines = row * sizeof(W) / 64;
  constexpr int64_t vw = row / P::kVecs;        // weights per vector
  __m256 acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = t.first ? _mm256_setzero_ps() : _mm256_loadu_ps(scratch + m * kScratchRow + 8 * (v0 + v));
  for (int64_t kk = t.kk0; kk < t.kk1; ++kk) {
    const W* wk = wp + kk * row;
    if (t.prefetch) {
      const char* ahead = reinterpret_cast<const char*>(wk + (t.kk1 - t.kk0) * row);
      for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(ahead + 64 * l, 0, 3);
    }
    P::template step<MB, NV>(acc, wk + v0 * vw, x + 2 * kk, xs);
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(scratch + m * kScratchRow + 8 * (v0 + v), acc[m][v]);
}

// Vectors per tile for MB rows: accumulators + weight vectors + a broadcast within 16 registers.
template <int MB>
constexpr int avx2_nv() { return MB == 1 ? 8 : MB <= 3 ? 4 : 2; }

template <typename W, int MB>
static void avx2_rows(const W* wp, const float* x, int64_t xs, float* scratch, Avx2Tile t) {
  constexpr int NV = avx2_nv<MB>();
  for (int v0 = 0; v0 < Avx2Panel<W>::kVecs; v0 += NV) {
    avx2_tile<W, MB, NV>(wp, v0, x, xs, scratch, t);
    t.prefetch = false;
  }
}

template <typename W>
static void avx2_rows_any(int mb, const W* wp, const float* x, int64_t xs, float* scratch, const Avx2Tile& t) {
  switch (mb) {
    case 1: avx2_rows<W, 1>(wp, x, xs, scratch, t); break;
    case 2: avx2_rows<W, 2>(wp, x, xs, scratch, t); break;
    case 3: avx2_rows<W, 3>(wp, x, xs, scratch, t); break;
    case 4: avx2_rows<W, 4>(wp, x, xs, scratch, t); break;
    case 5: avx2_rows<W, 5>(wp, x, xs, scratch, t); break;
    default: avx2_rows<W, 6>(wp, x, xs, scratch, t); break;
  }
}

// Row blocks of one pass: up to 8 rows as one or two blocks (the chunk's weights come from memory
// once, then from L1), more rows as blocks of 6 (12 accumulators of 8 lanes).
static int avx2_block_rows(int64_t rows, int64_t done) {
  if (rows <= 4) return static_cast<int>(rows);
  if (rows <= 8) return static_cast<int>(done == 0 ? (rows + 1) / 2 : rows - done);
  return static_cast<int>(std::min<int64_t>(6, rows - done));
}

// Rows [r0, r0 + rows) of x (fp32, xs) through one panel into out.
template <typename W>
static void avx2_panel(const LinearParams& p, const W* wp, int64_t n0, const float* x, int64_t xs,
                       int64_t r0, int64_t rows, float* scratch) {
  using P = Avx2Panel<W>;
  const int64_t kpairs = (p.k + 1) / 2;
  const int64_t kc = avx2_chunk<W>(rows);
  for (int64_t k0 = 0; k0 < kpairs || k0 == 0; k0 += kc) {
    Avx2Tile t{k0, std::min(kpairs, k0 + kc), k0 == 0, true};
    for (int64_t m = 0; m < rows;) {
      const int mb = avx2_block_rows(rows, m);
      avx2_rows_any<W>(mb, wp, x + m * xs, xs, scratch + m * kScratchRow, t);
      t.prefetch = false;
      m += mb;
    }
    if (kpairs == 0) break;
  }
  const W* bias = static_cast<const W*>(p.bias);
  W* out = static_cast<W*>(p.out);
  const int valid = static_cast<int>(std::min<int64_t>(kPanel, p.n - n0));
  for (int64_t m = 0; m < rows; ++m) {
    const float* s = scratch + m * kScratchRow;
    W* o = out + (r0 + m) * p.out_stride + n0;
    for (int j = 0; j < valid; ++j) o[j] = from_f<W>(P::result(s, j) + (bias ? to_f(bias[n0 + j]) : 0.f));
  }
}

// Rows in chunks of kAvx2Rows (bounding the fp32 copy of x and the scratch); threads split the
// panels into one contiguous range each.
constexpr int64_t kAvx2Rows = 120;

template <typename W>
static void linear_packed_avx2(const LinearParams& p) {
  const W* w = static_cast<const W*>(p.weight);      // [panels, kpairs, 64, 2]
  const W* x = static_cast<const W*>(p.x);           // [M, K] row stride x_stride
  const int64_t kpairs = (p.k + 1) / 2, kp = 2 * kpairs;
  const int64_t panels = (p.n + kPanel - 1) / kPanel, panel_elems = kpairs * 2 * kPanel;
  // fp32 x with even K is used in place; else an fp32 copy, K padded to pairs with a zero
  const bool direct = std::is_same_v<W, float> && kp == p.k;
  std::vector<float> xbuf(direct ? 0 : std::min(p.m, kAvx2Rows) * kp);
  for (int64_t r0 = 0; r0 < p.m; r0 += kAvx2Rows) {
    const int64_t rows = std::min(kAvx2Rows, p.m - r0);
    const float* xf = reinterpret_cast<const float*>(x + r0 * p.x_stride);
    int64_t xs = p.x_stride;
    if (!direct) {
      for (int64_t m = 0; m < rows; ++m) {
        const W* xr = x + (r0 + m) * p.x_stride;
        float* d = xbuf.data() + m * kp;
        for (int64_t i = 0; i < p.k; ++i) d[i] = to_f(xr[i]);
        if (kp != p.k) d[p.k] = 0.f;
      }
      xf = xbuf.data();
      xs = kp;
    }
    // at least ~64 KiB of weights per task, so small layers do not pay for a thread handoff
    const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, panel_elems * sizeof(W)));
    at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
      alignas(32) float small[8 * kScratchRow];
      std::vector<float> big(rows > 8 ? rows * kScratchRow : 0);
      float* scratch = rows > 8 ? big.data() : small;
      for (int64_t pi = begin; pi < end; ++pi)
        avx2_panel<W>(p, w + pi * panel_elems, pi * kPanel, xf, xs, r0, rows, scratch);
    });
  }
}
#endif

void linear_packed_kernel(const LinearParams& p) {
#if defined(CPU_CAPABILITY_AVX512)
  if (p.dtype == DType::kBFloat16 && use_avx512_bf16() && use_amx() && p.m >= amx_min_rows()) {
    linear_packed_amx(p);
    return;
  }
  if (p.dtype == DType::kBFloat16 && use_avx512_bf16()) {
    const c10::BFloat16* w = static_cast<const c10::BFloat16*>(p.weight);
    const int64_t panels = (p.n + kPanel - 1) / kPanel, panel_elems = (p.k + 1) / 2 * 2 * kPanel;
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pi = begin; pi < end; ++pi) packed_panel_bf16(p, w + pi * panel_elems, pi * kPanel);
    });
    return;
  }
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (p.dtype == DType::kBFloat16) linear_packed_avx2<c10::BFloat16>(p);
  else linear_packed_avx2<float>(p);
#else
  auto generic = [&](auto* w) {
    const int64_t panels = (p.n + kPanel - 1) / kPanel, panel_elems = (p.k + 1) / 2 * 2 * kPanel;
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pi = begin; pi < end; ++pi)
        for (int64_t m0 = 0; m0 < p.m; m0 += kMaxPackedMB)
          packed_block_generic(p, w + pi * panel_elems, pi * kPanel, m0,
                               static_cast<int>(std::min<int64_t>(kMaxPackedMB, p.m - m0)));
    });
  };
  if (p.dtype == DType::kBFloat16) generic(static_cast<const c10::BFloat16*>(p.weight));
  else generic(static_cast<const float*>(p.weight));
#endif
}

void linear_kernel(const LinearParams& p) {
#if defined(CPU_CAPABILITY_AVX512)
  if (p.dtype == DType::kBFloat16 && use_avx512_bf16()) {
    linear_impl<c10::BFloat16, Bf16DotBlock>(p);
    return;
  }
#endif
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { linear_impl<scalar_t, GenericBlock<scalar_t>>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(linear_kernel, LinearParams)
OCTAVO_DECLARE_CPU_KERNEL(linear_packed_kernel, LinearParams)

namespace octavo {

void linear_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias) {
  OCTAVO_CHECK_CPU(out);
  OCTAVO_CHECK_CPU(x);
  OCTAVO_CHECK_CPU(weight);
  TORCH_CHECK(x.dim() == 2, "linear: expected a 2-D [M, K] input, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "linear: weight must be [N, ",
              x.size(1), "], got ", weight.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == weight.size(0),
              "linear: out must be [", x.size(0), ", ", weight.size(0), "], got ", out.sizes());
  OCTAVO_CHECK_SAME_DTYPE(x, weight);
  OCTAVO_CHECK_SAME_DTYPE(x, out);
  OCTAVO_CHECK_LAST_CONTIG(x);
  OCTAVO_CHECK_LAST_CONTIG(out);
  TORCH_CHECK(weight.is_contiguous(), "linear: weight must be contiguous (call .contiguous())");
  if (bias.has_value()) {
    OCTAVO_CHECK_CPU(*bias);
    OCTAVO_CHECK_SAME_DTYPE(x, *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "linear: bias must be [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->is_contiguous(), "linear: bias must be contiguous");
  }
  cpu::LinearParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.m = x.size(0);
  p.n = weight.size(0);
  p.k = x.size(1);
  p.dtype = cpu::to_dtype(x, "linear");
  if (p.m == 0 || p.n == 0) return;
  OCTAVO_CALL_CPU_KERNEL(linear_kernel, p);
}

void linear_packed_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                       const std::optional<at::Tensor>& bias) {
  OCTAVO_CHECK_CPU(out);
  OCTAVO_CHECK_CPU(x);
  OCTAVO_CHECK_CPU(packed);
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0),
              "linear_packed: expected x [M, K] and out [M, N], got ", x.sizes(), " and ", out.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "linear_packed: only bfloat16 or float32, got ", x.scalar_type());
  OCTAVO_CHECK_SAME_DTYPE(x, packed);
  OCTAVO_CHECK_SAME_DTYPE(x, out);
  const int64_t n = out.size(1), k = x.size(1);
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == (n + 63) / 64 && packed.size(1) == (k + 1) / 2 &&
                  packed.size(2) == 64 && packed.size(3) == 2 && packed.is_contiguous(),
              "linear_packed: packed must be a contiguous [", (n + 63) / 64, ", ", (k + 1) / 2,
              ", 64, 2] weight (ops_native.pack_linear_panels), got ", packed.sizes());
  OCTAVO_CHECK_LAST_CONTIG(x);
  OCTAVO_CHECK_LAST_CONTIG(out);
  if (bias.has_value()) {
    OCTAVO_CHECK_SAME_DTYPE(x, *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
                "linear_packed: bias must be a contiguous [", n, "], got ", bias->sizes());
  }
  cpu::LinearParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.weight = packed.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.m = x.size(0);
  p.n = n;
  p.k = k;
  p.dtype = cpu::to_dtype(x, "linear_packed");
  if (p.m == 0 || p.n == 0) return;
  OCTAVO_CALL_CPU_KERNEL(linear_packed_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
