// Paged attention on CPU: one kernel for prefill and decode over the block table.
// Work item = (sequence, kv heads, chunk of query tokens); the query heads sharing a kv head are
// processed together so each K/V block is loaded once. Softmax in fp32, online across chunks.
// Decode items (few rows, all kv heads): scores of a whole chunk of keys, one softmax, then PV,
// each pass reading the cache blocks in address order with the next block prefetched; with bf16
// caches on avx512_bf16 CPUs, items of one or two rows per kv head multiply in bf16 (vdpbf16ps).
// Prefill items (one kv head, up to kTargetRows rows): register tiles over (keys x rows) against
// the transposed queries, softmax vectorized over the rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/amx.h"
#include "cpu/cpu_types.h"
#include "cpu/fp8_kv.h"

namespace octavo::cpu::CPU_CAPABILITY {

namespace {

constexpr int kTargetRows = 64;    // rows (tokens x grouped heads) per prefill work item
// bf16 prefill without AMX: keys per softmax / PV chunk (whole cache blocks; bf16_key_chunks)
constexpr int kBf16ChunkKeys = 128;  // 2040-token prefill attention 1.25-1.35x faster than 16-key blocks (Zen 4)
constexpr int kDecodeRows = 256;   // sequences with q_len * Hq <= this take all kv heads per item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Decode items compute the scores of up to this many (row, key) pairs before one softmax and the
// PV pass: big enough that a row normally sees its whole context at once, small enough for L2.
constexpr int kChunkScores = 32 * 1024;
// Decode passes walk a full cache block this many tokens at a time over all kv heads, so the block
// (contiguous [block_size, Hk, hd]) is read nearly in address order.
constexpr int kTokenGroup = 8;
// Decode items with at most this many rows per kv head take the vdpbf16ps passes (bf16 caches on
// avx512_bf16 CPUs). A vdpbf16ps (32 products) issues once per two cycles on the Xeon measured, an
// FMA (16) twice per cycle, so the fp32 passes, which convert each key once for all the rows that
// share it, are the faster ones at 4 rows per kv head (GQA 4 decode: ~8%); at 1 and 2 rows the
// bf16 passes are (~10-25%).
constexpr int kBf16DecodeRows = 2;
// The AMX prefill softmax exponentiates a chunk's scores against the rows' running max in one
// pass and keeps that max unless a score rose more than this (natural log units) above it:
// probabilities up to e^8 stay far from fp32 and bf16 limits, and the pass that only looked
// for the new max is gone (~5% of a 2040-token prefill's attention on the AMX Xeon).
constexpr float kLazyMax = 8.f;
// fp8 caches (fp8_kv.h) in the decode passes: the stored bytes become bf16 words of the value
// times 2^-120, which vdpbf16ps multiplies as they are, so the queries go in times 2^64 (the
// scores' scale takes 2^56 back) and the probabilities times 2^100 (the softmax sums take 2^-20):
// every product and partial sum stays far inside fp32's normal range.
constexpr float kFp8QueryMul = 0x1p64f, kFp8ScoreMul = 0x1p56f;
constexpr float kFp8ProbMul = 0x1p100f, kFp8SumMul = 0x1p-20f;

// Query tokens [t0, t1) (local to the sequence) of kv heads [h0, h1).
struct WorkItem {
  int seq, h0, h1, t0, t1;
  int64_t cost;
};

// v holds at least n elements (grown, never shrunk: the per-thread buffers below are reused)
template <typename V>
void grow(std::vector<V>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// Per-thread buffers, grown on demand and reused across calls.
struct Scratch {
  std::vector<float> q, acc, scores, vf, m, l, pos;
  std::vector<float> qt, kf, slope, corr;  // prefill tiles only
  std::vector<uint32_t> qt2;               // prefill tiles, bf16 scores: Q as transposed pairs
  std::vector<uint32_t> vp2, pp2;          // prefill tiles, bf16 PV: V and P as pairs of keys
  std::vector<uint32_t> pa, kpad;          // AMX prefill: P rows as A tiles, keys gathered to 16 rows
  std::vector<uint16_t> qb, pb;            // bf16 decode: unscaled queries, probabilities
  void reserve(int rows, int rows_per_head, int hdp, int bsp, size_t logits = 0) {
    grow(q, size_t(rows) * hdp);
    grow(acc, size_t(rows) * hdp);
    grow(scores, std::max(size_t(rows_per_head) * bsp, logits));
    grow(vf, size_t(bsp) * hdp);
    grow(m, rows);
    grow(l, rows);
    grow(pos, rows);
  }
};

// scores[r * lds] = dot(q_r, k) for NR rows of Q (fp32, padded to nfull + (tail > 0) chunks).
#define OCTAVO_UNROLL _Pragma("GCC unroll 16")
#define OCTAVO_INLINE inline __attribute__((always_inline))
#define OCTAVO_INLINE_LAMBDA __attribute__((always_inline))

// Rows per register block: 4 rows x 4 keys (or 4 chunks) of accumulators fit the 32 AVX-512
// registers; AVX2 has 16, so 2 rows.
constexpr int kRowBlock = kVec == 16 ? 4 : 2;

template <int NR, typename T>
OCTAVO_INLINE void dot_rows(const float* q, int ldq, const T* k, int nfull, int tail, float* s, int lds) {
  fVec acc[NR];
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) acc[r] = fVec(0.f);
  for (int c = 0; c < nfull; ++c) {
    const fVec kv = load_f(k + c * kVec);
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) acc[r] = at::vec::fmadd(fVec::loadu(q + r * ldq + c * kVec), kv, acc[r]);
  }
  if (tail > 0) {
    const fVec kv = load_f_partial(k + nfull * kVec, tail);
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) acc[r] = at::vec::fmadd(fVec::loadu(q + r * ldq + nfull * kVec), kv, acc[r]);
  }
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) s[r * lds] = hsum(acc[r]);
}

// s[r * lds + i] = dot(q_r, k_i) for NR rows and 4 keys (k_i = k + i * kstride): each loaded
// K and Q vector is used 4 times, and the 4 sums of a row share one reduction.
template <int NR, typename T>
OCTAVO_INLINE void dot_rows_4keys(const float* q, int ldq, const T* k, int64_t kstride, int nfull,
                                  int tail, float* s, int lds) {
  fVec acc[NR][4];
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int i = 0; i < 4; ++i) acc[r][i] = fVec(0.f);
  }
  auto step = [&](const fVec (&kv)[4], int c) OCTAVO_INLINE_LAMBDA {
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
      const fVec qv = fVec::loadu(q + r * ldq + c * kVec);
      OCTAVO_UNROLL for (int i = 0; i < 4; ++i) acc[r][i] = at::vec::fmadd(qv, kv[i], acc[r][i]);
    }
  };
  for (int c = 0; c < nfull; ++c) {
    const fVec kv[4] = {load_f(k + c * kVec), load_f(k + kstride + c * kVec),
                        load_f(k + 2 * kstride + c * kVec), load_f(k + 3 * kstride + c * kVec)};
    step(kv, c);
  }
  if (tail > 0) {
    const int c = nfull;
    const fVec kv[4] = {load_f_partial(k + c * kVec, tail), load_f_partial(k + kstride + c * kVec, tail),
                        load_f_partial(k + 2 * kstride + c * kVec, tail),
                        load_f_partial(k + 3 * kstride + c * kVec, tail)};
    step(kv, c);
  }
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) hsum4(acc[r], s + r * lds);
}

// acc_r[c0 + 0:NC chunks] += sum_j p_r[j] * v_j for NR rows, reading V straight from the cache
// (converted once per key and chunk, reused by the NR rows).
template <int NR, int NC, typename T>
OCTAVO_INLINE void pv_rows_direct(float* acc, int ldacc, const float* p, int ldp, const T* v,
                           int64_t vstride, int nk) {
  fVec a[NR][NC];
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c] = fVec::loadu(acc + r * ldacc + c * kVec);
  }
  for (int j = 0; j < nk; ++j) {
    fVec vv[NC];
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) vv[c] = load_f(v + j * vstride + c * kVec);
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
      const fVec pj(p[r * ldp + j]);
      OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c] = at::vec::fmadd(pj, vv[c], a[r][c]);
    }
  }
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c].store(acc + r * ldacc + c * kVec);
  }
}

// Prefill tiles. Q is transposed once per work item (qt[d * ldq + r]), so the scores of JB keys
// against RB vectors of rows are plain broadcast FMAs (no horizontal sums):
// st[j * ldst + r] = sum_d kf[j * ldk + d] * qt[d * ldq + r].
template <int JB, int RB>
OCTAVO_INLINE void qk_tile(const float* qt, int ldq, const float* kf, int ldk, int hd, float* st,
                           int ldst) {
  fVec acc[JB][RB];
  OCTAVO_UNROLL for (int j = 0; j < JB; ++j) {
    OCTAVO_UNROLL for (int v = 0; v < RB; ++v) acc[j][v] = fVec(0.f);
  }
  for (int d = 0; d < hd; ++d) {
    fVec qv[RB];
    OCTAVO_UNROLL for (int v = 0; v < RB; ++v) qv[v] = fVec::loadu(qt + d * ldq + v * kVec);
    OCTAVO_UNROLL for (int j = 0; j < JB; ++j) {
      const fVec kb(kf[j * ldk + d]);
      OCTAVO_UNROLL for (int v = 0; v < RB; ++v) acc[j][v] = at::vec::fmadd(kb, qv[v], acc[j][v]);
    }
  }
  OCTAVO_UNROLL for (int j = 0; j < JB; ++j) {
    OCTAVO_UNROLL for (int v = 0; v < RB; ++v) acc[j][v].store(st + j * ldst + v * kVec);
  }
}

// acc[r * ldacc + c * kVec] += sum_j pt[j * ldp + r] * vf[j * ldv + c * kVec] for NR rows and NC
// chunks: each V vector serves NR rows, each broadcast probability NC chunks.
template <int NR, int NC>
OCTAVO_INLINE void pv_tile(float* acc, int ldacc, const float* pt, int ldp, const float* vf, int ldv,
                           int nk) {
  fVec a[NR][NC];
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c] = fVec::loadu(acc + r * ldacc + c * kVec);
  }
  for (int j = 0; j < nk; ++j) {
    fVec vv[NC];
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) vv[c] = fVec::loadu(vf + j * ldv + c * kVec);
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
      const fVec pj(pt[j * ldp + r]);
      OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c] = at::vec::fmadd(pj, vv[c], a[r][c]);
    }
  }
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c].store(acc + r * ldacc + c * kVec);
  }
}

// Keys x row-vectors per QK tile: 4 x 4 accumulators fit AVX-512's 32 registers, 2 x 4 AVX2's 16.
constexpr int kTileKeys = kVec == 16 ? 4 : 2;
constexpr int kTileRowVecs = 4;

template <int JB>
OCTAVO_INLINE void qk_tile_rows(const float* qt, int ldq, const float* kf, int ldk, int hd, float* st,
                                int ldst, int nvec) {
  int v = 0;
  for (; v + kTileRowVecs <= nvec; v += kTileRowVecs)
    qk_tile<JB, kTileRowVecs>(qt + v * kVec, ldq, kf, ldk, hd, st + v * kVec, ldst);
  switch (nvec - v) {
    case 3: qk_tile<JB, 3>(qt + v * kVec, ldq, kf, ldk, hd, st + v * kVec, ldst); break;
    case 2: qk_tile<JB, 2>(qt + v * kVec, ldq, kf, ldk, hd, st + v * kVec, ldst); break;
    case 1: qk_tile<JB, 1>(qt + v * kVec, ldq, kf, ldk, hd, st + v * kVec, ldst); break;
    default: break;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// bf16 prefill scores on avx512_bf16 CPUs: Q transposed once per work item into pairs
// qt2[dd * ldq + r] = (q_r[2dd], q_r[2dd + 1]) straight from the bf16 queries, and K's pairs
// broadcast from the cache rows, so one vdpbf16ps adds 2 dims of 16 rows' dot products (the
// products of bf16 values are exact in fp32, as in the fp32 path); the scale is applied on store:
// st[j * ldst + r] = scale * sum_d k_j[d] * q_r[d].
template <int JB, int RB>
__attribute__((target("avx512bf16"))) OCTAVO_INLINE void qk_tile_bf16(
    const uint32_t* qt2, int ldq, const uint16_t* k, int64_t ks, int hd2, float* st, int ldst,
    float scale) {
  __m512 acc[JB][RB];
  OCTAVO_UNROLL for (int j = 0; j < JB; ++j) {
    OCTAVO_UNROLL for (int v = 0; v < RB; ++v) acc[j][v] = _mm512_setzero_ps();
  }
  for (int dd = 0; dd < hd2; ++dd) {
    __m512i qv[RB];
    OCTAVO_UNROLL for (int v = 0; v < RB; ++v) qv[v] = _mm512_loadu_si512(qt2 + dd * ldq + v * 16);
    OCTAVO_UNROLL for (int j = 0; j < JB; ++j) {
      uint32_t pair;
      std::memcpy(&pair, k + j * ks + 2 * dd, 4);
      const __m512bh kb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      OCTAVO_UNROLL for (int v = 0; v < RB; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], kb, (__m512bh)qv[v]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
  OCTAVO_UNROLL for (int j = 0; j < JB; ++j) {
    OCTAVO_UNROLL for (int v = 0; v < RB; ++v) _mm512_storeu_ps(st + j * ldst + v * 16, _mm512_mul_ps(acc[j][v], vs));
  }
}

template <int JB>
__attribute__((target("avx512bf16"))) void qk_tile_rows_bf16(const uint32_t* qt2, int ldq,
    const uint16_t* k, int64_t ks, int hd2, float* st, int ldst, int nvec, float scale) {
  int v = 0;
  for (; v + kTileRowVecs <= nvec; v += kTileRowVecs)
    qk_tile_bf16<JB, kTileRowVecs>(qt2 + v * 16, ldq, k, ks, hd2, st + v * 16, ldst, scale);
  switch (nvec - v) {
    case 3: qk_tile_bf16<JB, 3>(qt2 + v * 16, ldq, k, ks, hd2, st + v * 16, ldst, scale); break;
    case 2: qk_tile_bf16<JB, 2>(qt2 + v * 16, ldq, k, ks, hd2, st + v * 16, ldst, scale); break;
    case 1: qk_tile_bf16<JB, 1>(qt2 + v * 16, ldq, k, ks, hd2, st + v * 16, ldst, scale); break;
    default: break;
  }
}

// PV with bf16 products: V of one cache block as pairs of keys, vp2[(jj * nc + c) * 16 + i] =
// (v_{2jj}[16c + i], v_{2jj+1}[16c + i]) (a missing odd key is 0), and the probabilities of
// each row as pairs pp2[jj * ldp + r] = bf16(p_r[2jj]), bf16(p_r[2jj + 1]) (rounded to nearest
// even, as flash attention kernels feed P to their bf16 PV product); the sums stay fp32.
__attribute__((target("avx512bf16"))) inline void pair_v_rows(const uint16_t* v, int64_t vs,
                                                              int nk, int nc, uint32_t* vp2) {
  for (int jj = 0; jj < (nk + 1) / 2; ++jj) {
    const uint16_t* a = v + 2 * jj * vs;
    const bool odd = 2 * jj + 1 < nk;
    for (int c = 0; c < nc; ++c) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * c)));
      const __m512i hi = odd ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + vs + 16 * c)))
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(vp2 + (jj * nc + c) * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// 2^t for t <= 0 (t = -inf included), as accurate as at::vec's exp_u20 (relative error ~3e-6)
// in about half its instructions: t = n + f with n an integer and |f| <= 1/2, 2^f by its degree-5
// Taylor polynomial, 2^n applied by vscalefps. Lanes with t < -125 (2^t < 2.4e-38) come out 0,
// as exp_u20 gives 0 below FLT_MIN: a scalef whose result is subnormal or underflows takes a microcode
// assist (fully masked keys made a softmax pass ~20% slower before this). A NaN stays NaN.
__attribute__((target("avx512f"))) OCTAVO_INLINE __m512 exp2_neg(__m512 t) {
  const __m512 lo = _mm512_set1_ps(-125.f);
  const __mmask16 keep = _mm512_cmp_ps_mask(t, lo, _CMP_NLT_UQ);  // t >= -125 or NaN
  t = _mm512_max_ps(lo, t);                                       // max returns a NaN second operand
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558e-3f);                    // ln2^5 / 120
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));    // ln2^4 / 24
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));    // ln2^3 / 6
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));    // ln2^2 / 2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));    // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// Two fp32 vectors rounded to bf16 and paired lane by lane: (a_i, b_i) in 32-bit lane i, a low.
__attribute__((target("avx512bf16"))) OCTAVO_INLINE __m512i pair_bf16(__m512 a, __m512 b) {
  // one conversion of both (words 0..15 from a, 16..31 from b), then one word permute
  // interleaves them (two conversions, two widenings, a shift and an or before: ~4% of a
  // 2040-token prefill's attention)
  const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, ab);
}

__attribute__((target("avx512bf16"))) inline void pair_probs(const float* st, int ldst, int nk, int nvec,
                                                             uint32_t* pp2) {
  for (int jj = 0; jj < (nk + 1) / 2; ++jj) {
    const bool odd = 2 * jj + 1 < nk;
    for (int v = 0; v < nvec; ++v) {
      const __m512 b = odd ? _mm512_loadu_ps(st + (2 * jj + 1) * ldst + 16 * v) : _mm512_setzero_ps();
      _mm512_storeu_si512(pp2 + jj * ldst + 16 * v, pair_bf16(_mm512_loadu_ps(st + 2 * jj * ldst + 16 * v), b));
    }
  }
}

// acc[r * ldacc + 16c + i] += sum_jj pp2[jj * ldp + r] . vp2[(jj * nc + c) * 16 + i] for NR rows
// and NC chunks of 16 dims.
template <int NR, int NC>
__attribute__((target("avx512bf16"))) OCTAVO_INLINE void pv_tile_bf16(float* acc, int ldacc,
    const uint32_t* pp2, int ldp, const uint32_t* vp2, int nc, int njj) {
  __m512 a[NR][NC];
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c] = _mm512_loadu_ps(acc + r * ldacc + 16 * c);
  }
  for (int jj = 0; jj < njj; ++jj) {
    __m512i vv[NC];
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) vv[c] = _mm512_loadu_si512(vp2 + (jj * nc + c) * 16);
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp2[jj * ldp + r]));
      OCTAVO_UNROLL for (int c = 0; c < NC; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], pb, (__m512bh)vv[c]);
    }
  }
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + r * ldacc + 16 * c, a[r][c]);
  }
}

template <int NR>
__attribute__((target("avx512bf16"))) void pv_tile_chunks_bf16(float* acc, int ldacc,
    const uint32_t* pp2, int ldp, const uint32_t* vp2, int nc, int njj) {
  int c = 0;
  for (; c + 4 <= nc; c += 4) pv_tile_bf16<NR, 4>(acc + 16 * c, ldacc, pp2, ldp, vp2 + 16 * c, nc, njj);
  switch (nc - c) {
    case 3: pv_tile_bf16<NR, 3>(acc + 16 * c, ldacc, pp2, ldp, vp2 + 16 * c, nc, njj); break;
    case 2: pv_tile_bf16<NR, 2>(acc + 16 * c, ldacc, pp2, ldp, vp2 + 16 * c, nc, njj); break;
    case 1: pv_tile_bf16<NR, 1>(acc + 16 * c, ldacc, pp2, ldp, vp2 + 16 * c, nc, njj); break;
    default: break;
  }
}

// AMX prefill items hold at most this many rows (four 16-row accumulator tiles); keys go in
// chunks of this many (up to four 32-key steps of PV per accumulator tile load and store).
constexpr int kAmxMaxRows = 64;
constexpr int kAmxKeys = 128;

// dst[i * ldd + j] = src[j * lds + i] for a 16 x 16 block of 32-bit words.
inline void transpose16x16(const uint32_t* src, int lds, uint32_t* dst, int ldd) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + size_t(i) * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + k] now holds, in its 128-bit lane L, column 4L + k of rows 4q..4q+3
  for (int i = 0; i < 16; i += 8) {
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + 4 + k], 0x88);
      t[i + 4 + k] = _mm512_shuffle_i32x4(r[i + k], r[i + 4 + k], 0xdd);
    }
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xdd);
  }
  // r[i] is now column i
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + size_t(i) * ldd, r[i]);
}

// dst[16c + i] = (a[16c + i], b[16c + i]) as a bf16 pair for nc chunks of 16 dims; a missing
// row (nullptr) is zero.
inline void pair_two_rows(const uint16_t* a, const uint16_t* b, int nc, uint32_t* dst) {
  for (int c = 0; c < nc; ++c) {
    const __m512i lo = a != nullptr ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * c)))
                                    : _mm512_setzero_si512();
    const __m512i hi = b != nullptr ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 * c)))
                                    : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + 16 * c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

// Decode on avx512_bf16 CPUs (bf16 cache, head size a multiple of 32 up to 256, at most
// kBf16DecodeRows rows per kv head). The few rows of a decode item cannot fill the prefill tiles,
// so QK goes the other way round: per key, hd/32 vdpbf16ps of the key row (read straight from the
// cache) against the row's unscaled bf16 query leave one vector of partial sums, and a
// transpose-add tree reduces 16 such vectors (16 keys) to one vector of 16 scores; the scale is
// applied in fp32 afterwards.

// out[i] = sum of the lanes of a[i] for 16 vectors: each level adds pairs of vectors after
// interleaving them (32-bit, 64-bit, then twice 128-bit lanes), halving the lanes per key.
OCTAVO_INLINE __m512 hsum16(const __m512 (&a)[16]) {
  __m512 b[8], c[4], d[2];
  // b[i]: per 128-bit lane (a_2i, a_2i+1, a_2i, a_2i+1) partial sums
  OCTAVO_UNROLL for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  // c[i]: per 128-bit lane one partial sum of each of keys 4i..4i+3
  OCTAVO_UNROLL for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // d[i]: 128-bit lanes (keys 8i..8i+3 twice, keys 8i+4..8i+7 twice), each half of the sums
  OCTAVO_UNROLL for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
}

// 32 cache values as bf16 words: a bf16 cache's as they are; an fp8 cache's (fp8_kv.h) as the
// value times 2^-120: each byte sign-extended to 16 bits, shifted left 4 (the magnitude lands in
// bf16's exponent and mantissa, the sign-extension bits at 11..15) and masked to 0x87f0 (the
// sign kept at bit 15).
OCTAVO_INLINE __m512i load_bf16x32(const uint16_t* p) { return _mm512_loadu_si512(p); }
OCTAVO_INLINE __m512i load_bf16x32(const uint8_t* p) {
  const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x87f0));
}

// Prefetch into L2 for the 32-value chunk c of a cache row: every chunk of bf16 rows, every
// other one (64 bytes) of fp8 rows.
template <typename C>
OCTAVO_INLINE void prefetch_chunk(const C* p, int c) {
  if (sizeof(C) == 2 || c % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
}

// acc[i] += q . k_i (per-lane partial sums) over NC chunks of 32 dims for the n keys
// k + i * ks of a group of 16 (FULL: n = 16); the query's chunks stay in registers. Each
// 64-byte chunk read also pulls the same chunk of row pf + i * ks into L2 (the next block), so
// the prefetches are spread over the work instead of queueing up at once. C: uint16_t for a
// bf16 cache, uint8_t for an fp8 one (load_bf16x32).
template <int NC, bool FULL, typename C>
__attribute__((target("avx512bf16"))) OCTAVO_INLINE void qk_16keys_bf16(const uint16_t* q,
    const C* k, int64_t ks, int n, const C* pf, __m512 (&acc)[16]) {
  __m512bh qv[NC];
  OCTAVO_UNROLL for (int c = 0; c < NC; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
  OCTAVO_UNROLL for (int i = 0; i < 16; ++i) {
    if (!FULL && i == n) break;
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) {
      prefetch_chunk(pf + i * ks + 32 * c, c);
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)load_bf16x32(k + i * ks + 32 * c), qv[c]);
    }
  }
}

// s[r * lds + j] = scale * dot(q_r, k_j) for nrows bf16 query rows (q + r * 32 * NC) and nk keys
// (k + j * ks) of one kv head, 16 keys at a time; the first row's pass prefetches the rows
// pf + j * ks (pf = k where there is nothing to prefetch).
template <int NC, typename C>
__attribute__((target("avx512bf16"))) void qk_span_bf16(const uint16_t* q, int nrows,
    const C* k, int64_t ks, int nk, const C* pf, float scale, float* s, int lds) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int j = 0; j < nk; j += 16) {
    const int n = std::min(16, nk - j);
    for (int r = 0; r < nrows; ++r) {
      __m512 acc[16];
      OCTAVO_UNROLL for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      const C* pr = r == 0 ? pf + j * ks : k + j * ks;
      if (n == 16) qk_16keys_bf16<NC, true>(q + r * 32 * NC, k + j * ks, ks, n, pr, acc);
      else qk_16keys_bf16<NC, false>(q + r * 32 * NC, k + j * ks, ks, n, pr, acc);
      _mm512_mask_storeu_ps(s + size_t(r) * lds + j, __mmask16((1u << n) - 1), _mm512_mul_ps(hsum16(acc), vs));
    }
  }
}

// qk_span_bf16 for head sizes of 32 to 256 (hd / 32 query vectors in registers).
template <typename C>
void qk_span_bf16_hd(const uint16_t* q, int nrows, int hd, const C* k, int64_t ks, int nk,
                     const C* pf, float scale, float* s, int lds) {
  switch (hd / 32) {
    case 1: qk_span_bf16<1>(q, nrows, k, ks, nk, pf, scale, s, lds); break;
    case 2: qk_span_bf16<2>(q, nrows, k, ks, nk, pf, scale, s, lds); break;
    case 3: qk_span_bf16<3>(q, nrows, k, ks, nk, pf, scale, s, lds); break;
    case 4: qk_span_bf16<4>(q, nrows, k, ks, nk, pf, scale, s, lds); break;
    case 5: qk_span_bf16<5>(q, nrows, k, ks, nk, pf, scale, s, lds); break;
    case 6: qk_span_bf16<6>(q, nrows, k, ks, nk, pf, scale, s, lds); break;
    case 7: qk_span_bf16<7>(q, nrows, k, ks, nk, pf, scale, s, lds); break;
    case 8: qk_span_bf16<8>(q, nrows, k, ks, nk, pf, scale, s, lds); break;
    default: TORCH_CHECK(false, "paged_attention: bf16 decode scores need 32 <= head size <= 256");
  }
}

// PV of decode items: the probabilities of two keys as one bf16 pair (p_j, p_j+1) broadcast,
// against the two keys' V rows interleaved into pairs by unpacklo/hi_epi16, so one vdpbf16ps
// adds both keys to 16 dims. The unpacks work inside 128-bit lanes: for the 32 dims at 32c,
// lane 4L + i of the lo accumulator acc[32c + 4L + i] holds dim 32c + 8L + i, of the hi one
// acc[32c + 16 + 4L + i] dim 32c + 8L + 4 + i; unpermute_acc_bf16 restores the order at the end.
// acc_r (+ ldacc) += sum_j p_r[j] (+ ldp) v_j (+ vs) for NR rows, NC chunks of 32 dims, nk keys;
// the same chunks of rows pf + j * vs go to L2 meanwhile, as in qk_16keys_bf16.
template <int NR, int NC, typename C>
__attribute__((target("avx512bf16"))) OCTAVO_INLINE void pv_rows_bf16(float* acc, int ldacc,
    const uint16_t* p, int ldp, const C* v, int64_t vs, int nk, const C* pf) {
  __m512 a[NR][2 * NC];
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < 2 * NC; ++c) a[r][c] = _mm512_loadu_ps(acc + r * ldacc + 16 * c);
  }
  auto step = [&](const C* v0, const C* v1, int j)
      __attribute__((always_inline, target("avx512bf16"))) {
    __m512i lo[NC], hi[NC];
    OCTAVO_UNROLL for (int c = 0; c < NC; ++c) {
      prefetch_chunk(pf + j * vs + 32 * c, c);
      if (v1 != nullptr) prefetch_chunk(pf + (j + 1) * vs + 32 * c, c);
      const __m512i x = load_bf16x32(v0 + 32 * c);
      const __m512i y = v1 != nullptr ? load_bf16x32(v1 + 32 * c) : _mm512_setzero_si512();
      lo[c] = _mm512_unpacklo_epi16(x, y);
      hi[c] = _mm512_unpackhi_epi16(x, y);
    }
    OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
      uint32_t pair = p[r * ldp + j];  // (p_j, p_j+1), or (p_j, 0) for a last odd key
      if (v1 != nullptr) std::memcpy(&pair, p + r * ldp + j, 4);
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      OCTAVO_UNROLL for (int c = 0; c < NC; ++c) {
        a[r][2 * c] = _mm512_dpbf16_ps(a[r][2 * c], pb, (__m512bh)lo[c]);
        a[r][2 * c + 1] = _mm512_dpbf16_ps(a[r][2 * c + 1], pb, (__m512bh)hi[c]);
      }
    }
  };
  int j = 0;
  for (; j + 2 <= nk; j += 2) step(v + j * vs, v + (j + 1) * vs, j);
  if (j < nk) step(v + j * vs, nullptr, j);
  OCTAVO_UNROLL for (int r = 0; r < NR; ++r) {
    OCTAVO_UNROLL for (int c = 0; c < 2 * NC; ++c) _mm512_storeu_ps(acc + r * ldacc + 16 * c, a[r][c]);
  }
}

// pv_rows_bf16 over all hd / 32 chunks of nrows rows: 2 rows x 2 chunks or one row x 4 chunks
// (8 accumulators) per register block; the first block of rows prefetches pf (pf = v: nothing).
template <typename C>
__attribute__((target("avx512bf16"))) void pv_span_bf16(float* acc, int ldacc, const uint16_t* p,
    int ldp, int nrows, int hd, const C* v, int64_t vs, int nk, const C* pf) {
  const int nc = hd / 32;
  int r = 0;
  for (; r + 2 <= nrows; r += 2) {
    float* a = acc + size_t(r) * ldacc;
    const uint16_t* pr = p + size_t(r) * ldp;
    const C* f = r == 0 ? pf : v;
    int c = 0;
    for (; c + 2 <= nc; c += 2) pv_rows_bf16<2, 2>(a + 32 * c, ldacc, pr, ldp, v + 32 * c, vs, nk, f + 32 * c);
    if (c < nc) pv_rows_bf16<2, 1>(a + 32 * c, ldacc, pr, ldp, v + 32 * c, vs, nk, f + 32 * c);
  }
  for (; r < nrows; ++r) {
    float* a = acc + size_t(r) * ldacc;
    const uint16_t* pr = p + size_t(r) * ldp;
    const C* f = r == 0 ? pf : v;
    int c = 0;
    for (; c + 4 <= nc; c += 4) pv_rows_bf16<1, 4>(a + 32 * c, ldacc, pr, ldp, v + 32 * c, vs, nk, f + 32 * c);
    switch (nc - c) {
      case 3: pv_rows_bf16<1, 3>(a + 32 * c, ldacc, pr, ldp, v + 32 * c, vs, nk, f + 32 * c); break;
      case 2: pv_rows_bf16<1, 2>(a + 32 * c, ldacc, pr, ldp, v + 32 * c, vs, nk, f + 32 * c); break;
      case 1: pv_rows_bf16<1, 1>(a + 32 * c, ldacc, pr, ldp, v + 32 * c, vs, nk, f + 32 * c); break;
      default: break;
    }
  }
}

// n probabilities (a multiple of 16) times mul (a power of two: 1, or kFp8ProbMul) to bf16,
// rounded to nearest even as in pair_probs.
__attribute__((target("avx512bf16"))) void probs_to_bf16(const float* src, int n, uint16_t* dst, float mul) {
  const __m512 m = _mm512_set1_ps(mul);
  for (int i = 0; i < n; i += 16) {
    __m512 x = _mm512_loadu_ps(src + i);
    if (mul != 1.f) x = _mm512_mul_ps(x, m);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(x));
  }
}

// 16 fp8 KV bytes (fp8_kv.h) to their exact fp32 values: each byte sign-extended to 32 bits and
// shifted into fp32's exponent/mantissa (the value times 2^-120, normal or zero), times 2^120.
OCTAVO_INLINE __m512 fp8_to_f32x16(const uint8_t* p) {
  const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(w, 20),
                                                            _mm512_set1_epi32(int32_t(0x87f00000u)))),
                       _mm512_set1_ps(0x1p120f));
}

// The dims of an accumulator row (hd a multiple of 32) back in order after pv_rows_bf16.
inline void unpermute_acc_bf16(float* acc, int hd) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int d = 0; d < hd; d += 32) {
    const __m512 lo = _mm512_loadu_ps(acc + d), hi = _mm512_loadu_ps(acc + d + 16);
    _mm512_storeu_ps(acc + d, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(acc + d + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
}

// OCTAVO_CPU_NO_AVX512BF16=1 takes the fp32 path (tests use it on bf16 CPUs).
bool attention_use_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") &&
                         std::getenv("OCTAVO_CPU_NO_AVX512BF16") == nullptr;
  return ok;
}
#endif

template <int NR>
OCTAVO_INLINE void pv_tile_chunks(float* acc, int ldacc, const float* pt, int ldp, const float* vf,
                                  int ldv, int nk, int nchunks) {
  int c = 0;
  for (; c + 4 <= nchunks; c += 4) pv_tile<NR, 4>(acc + c * kVec, ldacc, pt, ldp, vf + c * kVec, ldv, nk);
  switch (nchunks - c) {
    case 3: pv_tile<NR, 3>(acc + c * kVec, ldacc, pt, ldp, vf + c * kVec, ldv, nk); break;
    case 2: pv_tile<NR, 2>(acc + c * kVec, ldacc, pt, ldp, vf + c * kVec, ldv, nk); break;
    case 1: pv_tile<NR, 1>(acc + c * kVec, ldacc, pt, ldp, vf + c * kVec, ldv, nk); break;
    default: break;
  }
}

// Rows of a work item are ordered (kv head, token, grouped query head), so the rows that share
// one kv head are contiguous: [kvh_local * rows_per_head, (kvh_local + 1) * rows_per_head).
template <typename T>
class Attention {
 public:
  explicit Attention(const PagedAttentionParams& p)
      : p_(p), group_(p.num_heads / p.num_kv_heads), hd_(p.head_size),
        nfull_(p.head_size / kVec), tail_(p.head_size % kVec),
        hdp_((p.head_size + kVec - 1) / kVec * kVec),
        bsp_((p.block_size + kVec - 1) / kVec * kVec), kv_fp8_(p.kv_fp8) {}

  // Whether decode items can read an fp8 cache directly (avx512_bf16, head size a multiple of 32
  // up to 256); paged_attention_impl dequantizes the blocks of every other sequence first.
  static bool fp8_decode_supported(const PagedAttentionParams& p) {
#if defined(CPU_CAPABILITY_AVX512)
    return p.head_size % 32 == 0 && p.head_size <= 256 && attention_use_avx512_bf16();
#else
    (void)p;
    return false;
#endif
  }

  // Whether the AMX prefill items may read V pairs made once per sequence and kv head (bf16,
  // head size a multiple of 32, AMX, no sliding window: every item's key chunks start at even
  // keys), instead of pairing every chunk's V again for each item.
  bool amx_prefill_shares_values() const {
#if defined(CPU_CAPABILITY_AVX512)
    return std::is_same_v<T, c10::BFloat16> && hd_ % 32 == 0 && p_.sliding_window <= 0 &&
           attention_use_avx512_bf16() && use_amx();
#else
    return false;
#endif
  }

  // npairs rows of V pairs of kv head h from key j0 on (blocks: the sequence's block table): row
  // i holds V of keys j0 + 2i and j0 + 2i + 1, zero from key jend on, as amx_pv's B tiles want
  // them, hd words a row.
  void pair_values(const int32_t* blocks, int h, int64_t j0, int64_t jend, int64_t npairs, uint32_t* dst) const {
#if defined(CPU_CAPABILITY_AVX512)
    const int bs = p_.block_size;
    auto row = [&](int64_t j) {
      return j < jend ? reinterpret_cast<const uint16_t*>(value_row(blocks[j / bs], int(j % bs), h)) : nullptr;
    };
    for (int64_t i = 0; i < npairs; ++i)
      pair_two_rows(row(j0 + 2 * i), row(j0 + 2 * i + 1), hd_ / 16, dst + i * hd_);
#endif
  }

  void set_shared_values(const uint32_t* base, const int64_t* off, const int64_t* rows) {
    vp_base_ = base;
    vp_off_ = off;
    vp_rows_ = rows;
  }

  // The shared V pairs of sequence s, kv head h, or nullptr.
  const uint32_t* shared_values(int s, int h) const {
    if (vp_base_ == nullptr || vp_off_[s] < 0) return nullptr;
    return vp_base_ + vp_off_[s] + int64_t(h) * vp_rows_[s] * hd_;
  }

  void run(const WorkItem& w, Scratch& sc) const {
    if (kv_fp8_ || w.h1 - w.h0 > 1 || (w.t1 - w.t0) * group_ <= 8) {
      run_chunked(w, sc);
    } else {
      run_tiled(w, sc);
    }
  }

  // Decode-like items: for a chunk of blocks, the scores of every row (K of each block read once,
  // all kv heads together, in order), one softmax per row, then PV reading V the same way.
  void run_chunked(const WorkItem& w, Scratch& sc) const {
    const int q_start = p_.query_start_loc[w.seq];
    const int q_len = p_.query_start_loc[w.seq + 1] - q_start;
    const int ctx = p_.seq_lens[w.seq];
    const int rows_per_head = (w.t1 - w.t0) * group_, rows = rows_per_head * (w.h1 - w.h0);
    const int bs = p_.block_size;
    const int chunk_blocks = std::max(1, kChunkScores / (rows * bs));
    const int ld = (chunk_blocks * bs + kVec - 1) / kVec * kVec;
    sc.reserve(rows, rows_per_head, hdp_, bsp_, size_t(rows) * ld);
    // fp8 caches: the bf16 passes reading the bytes in registers (1-2 rows per kv head), or the
    // fp32 ones over each block's rows converted once for all the rows
    const bool fp8 = kv_fp8_;
    const bool bf16 = (fp8 || decode_bf16()) && rows_per_head <= kBf16DecodeRows;
    load_queries(w, q_start, ctx - q_len, sc, !bf16);
    if (bf16) load_queries_bf16(w, q_start, ld, sc, fp8 ? kFp8QueryMul : 1.f);
    const int first_pos = ctx - q_len + w.t0, last_pos = ctx - q_len + w.t1 - 1;
    const int lo = p_.sliding_window > 0 ? std::max(0, first_pos - p_.sliding_window + 1) : 0;
    const int hi = std::min(ctx, last_pos + 1);
    const int32_t* blocks = p_.block_table + int64_t(w.seq) * p_.bt_stride;
    const int b_first = lo / bs, b_end = (hi + bs - 1) / bs;
    float* logits = sc.scores.data();
    for (int cb0 = b_first; cb0 < b_end; cb0 += chunk_blocks) {
      const int cb1 = std::min(b_end, cb0 + chunk_blocks);
      const int c0 = std::max(lo, cb0 * bs), c1 = std::min(hi, cb1 * bs);
      for (int b = cb0; b < cb1; ++b) {
        const int j0 = std::max(lo, b * bs), j1 = std::min(hi, (b + 1) * bs);
        const int64_t next = b + 1 < cb1 ? blocks[b + 1] : -1;
        if (fp8 && bf16)
          qk_block_bf16<uint8_t>(w, blocks[b], next, j0 - b * bs, j1 - b * bs, logits + (j0 - c0), ld, sc,
                                 p_.scale * kFp8ScoreMul);
        else if (fp8) qk_block_fp8_f32(w, blocks[b], next, j0 - b * bs, j1 - b * bs, logits + (j0 - c0), ld, sc);
        else if (bf16)
          qk_block_bf16<uint16_t>(w, blocks[b], next, j0 - b * bs, j1 - b * bs, logits + (j0 - c0), ld, sc, p_.scale);
        else qk_block(w, blocks[b], next, j0 - b * bs, j1 - b * bs, logits + (j0 - c0), ld, sc);
      }
      for (int kvh = w.h0; kvh < w.h1; ++kvh) {  // the first V block's rows, into L2
        if (fp8) prefetch_rows<2>(value_at<uint8_t>(blocks[cb0], 0, kvh), p_.vc_stride_token);
        else prefetch_rows<2>(value_row(blocks[cb0], 0, kvh), p_.vc_stride_token);
      }
      for (int r = 0; r < rows; ++r) {
        float* prow = logits + size_t(r) * ld;
        const int kvh = w.h0 + r / rows_per_head;
        float corr = 1.f;
        const bool any = softmax_span(prow, r, kvh * group_ + r % group_, c0, c1 - c0, sc, corr);
        if (!any) std::fill(prow, prow + ld, 0.f);
        if (bf16) row_to_bf16(prow, (c1 - c0 + kVec - 1) / kVec * kVec, sc.pb.data() + size_t(r) * ld,
                              fp8 ? kFp8ProbMul : 1.f);
        if (any && corr != 1.f) {
          float* acc = sc.acc.data() + size_t(r) * hdp_;
          const fVec vc(corr);
          for (int c = 0; c < hdp_; c += kVec) (fVec::loadu(acc + c) * vc).store(acc + c);
        }
      }
      for (int b = cb0; b < cb1; ++b) {
        const int j0 = std::max(lo, b * bs), j1 = std::min(hi, (b + 1) * bs);
        const int64_t next = b + 1 < cb1 ? blocks[b + 1] : -1;
        if (fp8 && bf16) pv_block_bf16<uint8_t>(w, blocks[b], next, j0 - b * bs, j1 - b * bs, sc.pb.data() + (j0 - c0), ld, sc);
        else if (fp8) pv_block_fp8_f32(w, blocks[b], next, j0 - b * bs, j1 - b * bs, logits + (j0 - c0), ld, sc);
        else if (bf16) pv_block_bf16<uint16_t>(w, blocks[b], next, j0 - b * bs, j1 - b * bs, sc.pb.data() + (j0 - c0), ld, sc);
        else pv_block(w, blocks[b], next, j0 - b * bs, j1 - b * bs, logits + (j0 - c0), ld, sc);
      }
    }
    if (bf16) unpermute_rows(rows, sc);
    if (fp8 && bf16)
      for (int r = 0; r < rows; ++r) sc.l[r] *= kFp8SumMul;
    store_output(w, q_start, sc);
  }

  // Prefill items (one kv head, many rows): per block, K and V rows in fp32, scores as
  // [keys, rows] tiles against the transposed Q, softmax vectorized over the rows, PV tiles.
  void run_tiled(const WorkItem& w, Scratch& sc) const {
    const int q_start = p_.query_start_loc[w.seq];
    const int q_len = p_.query_start_loc[w.seq + 1] - q_start;
    const int ctx = p_.seq_lens[w.seq];
    const int rows = (w.t1 - w.t0) * group_;
    const int rp = (rows + kVec - 1) / kVec * kVec;  // rows padded to whole vectors
    const int bs = p_.block_size;
    sc.reserve(rp, rp, hdp_, bsp_, size_t(bs) * rp);
    grow(sc.qt, size_t(hd_) * rp);
    grow(sc.kf, size_t(bs) * hdp_);
    grow(sc.vf, size_t(bs) * hdp_);
    grow(sc.slope, rp);
    grow(sc.corr, rp);
#if defined(CPU_CAPABILITY_AVX512)
    const bool bf16_qk = std::is_same_v<T, c10::BFloat16> && hd_ % 2 == 0 && attention_use_avx512_bf16();
#else
    constexpr bool bf16_qk = false;
#endif
    load_queries(w, q_start, ctx - q_len, sc, !bf16_qk);
    if (bf16_qk) grow(sc.qt2, size_t(hd_ / 2) * rp);
    // Padding rows repeat the last row (finite softmax state); their outputs are never stored.
    auto query_row = [&](int r) {
      const int src = std::min(r, rows - 1);
      return reinterpret_cast<const char*>(static_cast<const T*>(p_.query) +
                                           int64_t(q_start + token_of(w, src)) * p_.q_stride_token +
                                           int64_t(head_of(w, src)) * p_.q_stride_head);
    };
#if defined(CPU_CAPABILITY_AVX512)
    // whole 16 x 16 blocks of (rows, dim pairs) through one register transpose each
    const bool block_qt2 = bf16_qk && hd_ % 32 == 0;
    if (block_qt2) {
      alignas(64) uint32_t blk[16 * 16];
      for (int r0 = 0; r0 < rp; r0 += 16)
        for (int d0 = 0; d0 < hd_ / 2; d0 += 16) {
          for (int i = 0; i < 16; ++i) std::memcpy(blk + 16 * i, query_row(r0 + i) + 4 * d0, 64);
          transpose16x16(blk, 16, sc.qt2.data() + size_t(d0) * rp + r0, rp);
        }
    }
#else
    constexpr bool block_qt2 = false;
#endif
    for (int r = 0; r < rp; ++r) {
      const int src = std::min(r, rows - 1);
      if (bf16_qk) {   // the unscaled bf16 query, its dims in pairs
        if (!block_qt2) {
          const char* q2 = query_row(r);
          for (int dd = 0; dd < hd_ / 2; ++dd) std::memcpy(&sc.qt2[size_t(dd) * rp + r], q2 + 4 * dd, 4);
        }
      } else {
        for (int d = 0; d < hd_; ++d) sc.qt[size_t(d) * rp + r] = sc.q[size_t(src) * hdp_ + d];
      }
      sc.pos[r] = sc.pos[src];
      sc.m[r] = kNegInf;
      sc.l[r] = 0.f;
      sc.slope[r] = p_.alibi_slopes != nullptr ? p_.alibi_slopes[w.h0 * group_ + src % group_] : 0.f;
      std::fill(sc.acc.data() + size_t(r) * hdp_, sc.acc.data() + size_t(r + 1) * hdp_, 0.f);
    }
    const int first_pos = ctx - q_len + w.t0, last_pos = ctx - q_len + w.t1 - 1;
    const int lo = p_.sliding_window > 0 ? std::max(0, first_pos - p_.sliding_window + 1) : 0;
    const int hi = std::min(ctx, last_pos + 1);
    const int32_t* blocks = p_.block_table + int64_t(w.seq) * p_.bt_stride;
#if defined(CPU_CAPABILITY_AVX512)
    if (bf16_qk && hd_ % 32 == 0 && rp <= kAmxMaxRows && use_amx()) {
      amx_keys(w, sc, rows, rp, lo, hi, blocks);
      store_output(w, q_start, sc);
      return;
    }
#endif
    const int b_first = lo / bs, b_end = (hi + bs - 1) / bs;
    const int nvec = rp / kVec, nchunks = hdp_ / kVec;
#if defined(CPU_CAPABILITY_AVX512)
    if (bf16_qk && hd_ % 16 == 0) {  // bf16 PV as well where the head size is whole 16-dim chunks
      bf16_key_chunks(w, sc, rows, rp, lo, hi, blocks);
      store_output(w, q_start, sc);
      return;
    }
#endif
    float* st = sc.scores.data();
    for (int b = b_first; b < b_end; ++b) {
      const int j0 = std::max(lo, b * bs), j1 = std::min(hi, (b + 1) * bs), nk = j1 - j0;
      const int off = j0 - b * bs;
      if (b + 1 < b_end) {
        prefetch_rows<2>(key_row(blocks[b + 1], 0, w.h0), p_.kc_stride_token);
        prefetch_rows<2>(value_row(blocks[b + 1], 0, w.h0), p_.vc_stride_token);
      }
      if (bf16_qk) {
#if defined(CPU_CAPABILITY_AVX512)
        qk_keys_bf16(sc, rp, key_row(blocks[b], off, w.h0), nk, st);
#endif
      } else {
        convert_rows(key_row(blocks[b], off, w.h0), p_.kc_stride_token, nk, sc.kf.data());
        int j = 0;
        for (; j + kTileKeys <= nk; j += kTileKeys)
          qk_tile_rows<kTileKeys>(sc.qt.data(), rp, sc.kf.data() + size_t(j) * hdp_, hdp_, hd_, st + size_t(j) * rp, rp, nvec);
        for (; j < nk; ++j)
          qk_tile_rows<1>(sc.qt.data(), rp, sc.kf.data() + size_t(j) * hdp_, hdp_, hd_, st + size_t(j) * rp, rp, nvec);
      }
      softmax_cols(st, rp, j0, nk, sc);
      rescale_acc(sc, rows);
      convert_rows(value_row(blocks[b], off, w.h0), p_.vc_stride_token, nk, sc.vf.data());
      int r = 0;
      for (; r + 4 <= rows; r += 4)
        pv_tile_chunks<4>(sc.acc.data() + size_t(r) * hdp_, hdp_, st + r, rp, sc.vf.data(), hdp_, nk, nchunks);
      for (; r < rows; ++r)
        pv_tile_chunks<1>(sc.acc.data() + size_t(r) * hdp_, hdp_, st + r, rp, sc.vf.data(), hdp_, nk, nchunks);
    }
    store_output(w, q_start, sc);
  }

  // acc rows times the corrections the last softmax pass left in sc.corr (1: unchanged)
  void rescale_acc(Scratch& sc, int rows) const {
    for (int r = 0; r < rows; ++r) {
      const float c = sc.corr[r];
      if (c == 1.f) continue;
      float* acc = sc.acc.data() + size_t(r) * hdp_;
      const fVec vc(c);
      for (int x = 0; x < hdp_; x += kVec) (fVec::loadu(acc + x) * vc).store(acc + x);
    }
  }

#if defined(CPU_CAPABILITY_AVX512)
  // st[j * rp + r] = scale * dot(q_r, k_j) for nk bf16 cache rows from k (vdpbf16ps tiles over
  // the item's transposed query pairs sc.qt2)
  void qk_keys_bf16(const Scratch& sc, int rp, const T* k, int nk, float* st) const {
    const uint16_t* k0 = reinterpret_cast<const uint16_t*>(k);
    const int64_t ks = p_.kc_stride_token;
    const int nvec = rp / kVec;
    int j = 0;
    for (; j + kTileKeys <= nk; j += kTileKeys)
      qk_tile_rows_bf16<kTileKeys>(sc.qt2.data(), rp, k0 + j * ks, ks, hd_ / 2, st + size_t(j) * rp, rp, nvec, p_.scale);
    for (; j < nk; ++j)
      qk_tile_rows_bf16<1>(sc.qt2.data(), rp, k0 + j * ks, ks, hd_ / 2, st + size_t(j) * rp, rp, nvec, p_.scale);
  }

  // bf16 prefill without AMX (bf16 cache, head size a multiple of 16): keys in chunks of whole
  // cache blocks, up to kBf16ChunkKeys, rather than one block at a time, so the PV tiles load and
  // store their accumulators, and the rows' running sums are rescaled, once per chunk instead of
  // once per 16 keys. A block with an odd number of keys ends its chunk, so V's and P's key pairs
  // (pair_v_rows, pair_probs) line up across the chunk's blocks.
  void bf16_key_chunks(const WorkItem& w, Scratch& sc, int rows, int rp, int lo, int hi,
                       const int32_t* blocks) const {
    const int bs = p_.block_size, nvec = rp / kVec, nc = hd_ / 16;
    const int max_keys = std::max(bs, kBf16ChunkKeys / bs * bs);
    grow(sc.scores, size_t(max_keys + bs) * rp);
    grow(sc.vp2, size_t(max_keys + bs) / 2 * hd_ + hd_);
    grow(sc.pp2, size_t(max_keys + bs) / 2 * rp + rp);
    float* st = sc.scores.data();
    const int64_t ks = p_.kc_stride_token;
    const bool plain = p_.soft_cap <= 0.f && p_.alibi_slopes == nullptr;
    const int first_pos = static_cast<int>(sc.pos[0]);
    const int b_end = (hi + bs - 1) / bs;
    for (int b = lo / bs; b < b_end;) {
      const int c0 = std::max(lo, b * bs);
      int nk = 0;
      while (b < b_end && nk < max_keys) {
        const int j0 = std::max(lo, b * bs), j1 = std::min(hi, (b + 1) * bs), nkb = j1 - j0;
        const int off = j0 - b * bs;
        if (b + 1 < b_end) {
          prefetch_rows<2>(key_row(blocks[b + 1], 0, w.h0), ks);
          prefetch_rows<2>(value_row(blocks[b + 1], 0, w.h0), p_.vc_stride_token);
        }
        qk_keys_bf16(sc, rp, key_row(blocks[b], off, w.h0), nkb, st + size_t(nk) * rp);
        pair_v_rows(reinterpret_cast<const uint16_t*>(value_row(blocks[b], off, w.h0)), p_.vc_stride_token,
                    nkb, nc, sc.vp2.data() + size_t(nk / 2) * hd_);
        nk += nkb;
        ++b;
        if (nkb & 1) break;
      }
      // keys every row sees unmasked go through amx_keys' one-pass softmax, which writes P's
      // pairs itself (the scores are scaled already here)
      const bool visible = plain && c0 + nk - 1 <= first_pos &&
                           (p_.sliding_window <= 0 || c0 > last_row_pos(sc, rows) - p_.sliding_window);
      if (visible) softmax_cols_visible(st, rp, nk, sc, 1.f, sc.pp2.data());
      else softmax_cols(st, rp, c0, nk, sc);
      rescale_acc(sc, rows);
      if (!visible) pair_probs(st, rp, nk, nvec, sc.pp2.data());
      const int njj = (nk + 1) / 2;
      int r = 0;
      for (; r + 4 <= rows; r += 4)
        pv_tile_chunks_bf16<4>(sc.acc.data() + size_t(r) * hdp_, hdp_, sc.pp2.data() + r, rp, sc.vp2.data(), nc, njj);
      for (; r < rows; ++r)
        pv_tile_chunks_bf16<1>(sc.acc.data() + size_t(r) * hdp_, hdp_, sc.pp2.data() + r, rp, sc.vp2.data(), nc, njj);
    }
  }
#endif

#if defined(CPU_CAPABILITY_AVX512)
  // AMX prefill (bf16, head size a multiple of 32, at most 64 rows): keys in chunks of 128,
  // wherever the cache blocks start and end. Scores come transposed, S^T = K Q^T: A tiles are 16
  // keys x 32 dims read straight from the cache (or gathered into 16 zero-padded rows where the
  // keys cross a block or run out), B tiles the item's Q pairs qt2 (16 dim pairs x 16 rows). The
  // softmax runs over st[key * rp + row] as on the other paths (the scale applied there), P goes
  // to bf16 key pairs (pair_probs) and is transposed to rows x 32 keys (the A tile of PV), V to
  // key pairs (16 pairs x the head's dims: the B tiles of PV), and the accumulator tiles are
  // loaded from and stored back to sc.acc after its rescale.
  void amx_keys(const WorkItem& w, Scratch& sc, int rows, int rp, int lo, int hi,
                const int32_t* blocks) const {
    const int bs = p_.block_size, nrt = rp / 16, nc = hd_ / 16;
    grow(sc.scores, size_t(kAmxKeys) * rp);
    grow(sc.pp2, size_t(kAmxKeys / 2) * rp);
    grow(sc.pa, size_t(rp) * (kAmxKeys / 2));
    grow(sc.vp2, size_t(kAmxKeys / 2) * hd_);
    grow(sc.kpad, size_t(16) * hd_ / 2);
    float* st = sc.scores.data();
    const int64_t ks = p_.kc_stride_token;
    // keys every row sees unmasked: before the first row's position and inside every window
    const bool plain = p_.soft_cap <= 0.f && p_.alibi_slopes == nullptr;
    const int first_pos = static_cast<int>(sc.pos[0]);
    const uint32_t* vshared = shared_values(w.seq, w.h0);
    amx_config_full_tiles();
    for (int c0 = lo; c0 < hi; c0 += kAmxKeys) {
      const int nk = std::min(kAmxKeys, hi - c0), steps = (nk + 31) / 32;
      if (c0 + kAmxKeys < hi) {  // the next chunk's first block into L2
        const int n0 = c0 + kAmxKeys, o = n0 % bs, n = std::min(16, bs - o);
        prefetch_rows<2>(key_row(blocks[n0 / bs], o, w.h0), ks, n);
        prefetch_rows<2>(value_row(blocks[n0 / bs], o, w.h0), p_.vc_stride_token, n);
      }
      for (int g = 0; g * 16 < nk; ++g) {
        const int j0 = c0 + 16 * g, ng = std::min(16, nk - 16 * g);
        const T* a = key_row(blocks[j0 / bs], j0 % bs, w.h0);
        int64_t as = ks;
        if (ng < 16 || j0 % bs + 16 > bs) {
          uint16_t* kp = reinterpret_cast<uint16_t*>(sc.kpad.data());
          for (int i = 0; i < 16; ++i) {
            if (i < ng) std::memcpy(kp + i * hd_, key_row(blocks[(j0 + i) / bs], (j0 + i) % bs, w.h0), hd_ * 2);
            else std::memset(kp + i * hd_, 0, hd_ * 2);
          }
          a = reinterpret_cast<const T*>(kp);
          as = hd_;
        }
        amx_scores(a, as, sc.qt2.data(), rp, nrt, st + size_t(16 * g) * rp);
      }
      const bool visible = plain && c0 + nk - 1 <= first_pos &&
                           (p_.sliding_window <= 0 || c0 > last_row_pos(sc, rows) - p_.sliding_window);
      if (visible) softmax_cols_visible(st, rp, nk, sc, p_.scale, sc.pp2.data());
      else softmax_cols(st, rp, c0, nk, sc, p_.scale);
      rescale_acc(sc, rows);
      // P: key pairs of every row, missing pairs zero, then 16 x 16 pair transposes into one
      // A tile per row tile and 32 keys
      if (!visible) pair_probs(st, rp, nk, rp / 16, sc.pp2.data());
      const int pairs = (nk + 1) / 2;
      std::memset(sc.pp2.data() + size_t(pairs) * rp, 0, size_t(16 * steps - pairs) * rp * 4);
      for (int rt = 0; rt < nrt; ++rt)
        for (int s = 0; s < steps; ++s)
          transpose16x16(sc.pp2.data() + size_t(16 * s) * rp + 16 * rt, rp,
                         sc.pa.data() + size_t(rt * steps + s) * 256, 16);
      // V: key pairs x dims, made once for the sequence (keys past the chunk meet zero
      // probabilities there) or here, missing keys zero
      const uint32_t* vp = sc.vp2.data();
      if (vshared != nullptr && c0 % 2 == 0) {
        vp = vshared + size_t(c0 / 2) * hd_;
      } else {
        pair_values(blocks, w.h0, c0, c0 + nk, 16 * steps, sc.vp2.data());
      }
      amx_pv(sc.pa.data(), vp, nrt, steps, nc, hd_, sc.acc.data(), hdp_);
    }
    amx_release();
  }

  static int last_row_pos(const Scratch& sc, int rows) {
    int m = 0;
    for (int r = 0; r < rows; ++r) m = std::max(m, static_cast<int>(sc.pos[r]));
    return m;
  }

  // st[key * rp + 16 rt + i] (keys 0..15) = dot(a key row, q row) for the nrt row tiles.
  __attribute__((target("amx-tile,amx-bf16"))) void amx_scores(const T* a, int64_t as, const uint32_t* qt2,
                                                              int rp, int nrt, float* st) const {
    amx_memory_barrier();
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t qb = int64_t(rp) * 4;
    for (int s = 0; s < hd_ / 32; ++s) {
      _tile_loadd(4, a + 32 * s, as * 2);
      const uint32_t* q = qt2 + size_t(16 * s) * rp;
      _tile_loadd(5, q, qb);
      _tile_dpbf16ps(0, 4, 5);
      if (nrt > 1) {
        _tile_loadd(5, q + 16, qb);
        _tile_dpbf16ps(1, 4, 5);
      }
      if (nrt > 2) {
        _tile_loadd(5, q + 32, qb);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (nrt > 3) {
        _tile_loadd(5, q + 48, qb);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    _tile_stored(0, st, qb);
    if (nrt > 1) _tile_stored(1, st + 16, qb);
    if (nrt > 2) _tile_stored(2, st + 32, qb);
    if (nrt > 3) _tile_stored(3, st + 48, qb);
    amx_memory_barrier();
  }

  // acc[16 rt + i][16 c + d] += sum over steps x 32 keys of P x V, for every row tile and dim
  // chunk: pa holds (row tile, step) A tiles, vp2 the key pairs (row stride hd words).
  __attribute__((target("amx-tile,amx-bf16"))) static void amx_pv(const uint32_t* pa, const uint32_t* vp2,
                                                                  int nrt, int steps, int nc, int hd,
                                                                  float* acc, int ldacc) {
    amx_memory_barrier();
    const int64_t ab = int64_t(ldacc) * 4, vb = int64_t(hd) * 4;
    for (int rt = 0; rt < nrt; ++rt) {
      const uint32_t* a = pa + size_t(rt * steps) * 256;
      float* o = acc + size_t(rt) * 16 * ldacc;
      _tile_loadd(1, a, 64);
      if (steps > 1) _tile_loadd(2, a + 256, 64);
      if (steps > 2) _tile_loadd(3, a + 512, 64);
      if (steps > 3) _tile_loadd(4, a + 768, 64);
      for (int c = 0; c < nc; ++c) {
        const uint32_t* v = vp2 + 16 * c;
        _tile_loadd(0, o + 16 * c, ab);
        _tile_loadd(5, v, vb);
        _tile_dpbf16ps(0, 1, 5);
        if (steps > 1) {
          _tile_loadd(6, v + size_t(16) * hd, vb);
          _tile_dpbf16ps(0, 2, 6);
        }
        if (steps > 2) {
          _tile_loadd(5, v + size_t(32) * hd, vb);
          _tile_dpbf16ps(0, 3, 5);
        }
        if (steps > 3) {
          _tile_loadd(6, v + size_t(48) * hd, vb);
          _tile_dpbf16ps(0, 4, 6);
        }
        _tile_stored(0, o + 16 * c, ab);
      }
    }
    amx_memory_barrier();
  }
#endif

#if defined(CPU_CAPABILITY_AVX512)
  // softmax_cols for a chunk of keys every row sees unmasked, without caps or biases, on raw
  // scores st[j * ld + r] that the scale (> 0) has not touched yet: exp(scale * x - m) in one
  // fused step (base 2, exp2_neg), m the rows' running max where they have one (kept, corr = 1, unless the chunk's
  // max rose more than kLazyMax above it: then, as for rows seeing their first keys, the max of
  // the raw scores times the scale first); four independent max and sum chains so that the 128
  // keys of a chunk do not wait on one another.
  // The probabilities leave as bf16 key pairs, pp2[jj * ld + r] = (p_2jj, p_2jj+1) (p_nk = 0 for an
  // odd nk), as pair_probs would make them from the fp32 values: one pass over the scores fewer.
  __attribute__((target("avx512bf16"))) void softmax_cols_visible(float* st, int ld, int nk, Scratch& sc,
                                                                  float scale, uint32_t* pp2) const {
    const __m512 vs = _mm512_set1_ps(scale), vinf = _mm512_set1_ps(kNegInf);
    const __m512 vlog2e = _mm512_set1_ps(1.4426950408889634f);
    for (int r0 = 0; r0 < ld; r0 += 16) {
      float* col = st + r0;
      // probabilities exp(scale * x - vm) of every key to pp2, their sums per row; the raw max of
      // the scores comes back in m4 when TRACK
      auto exp_pass = [&](__m512 vm, auto track, __m512 (&m4)[4])
          __attribute__((always_inline, target("avx512bf16"))) {
        constexpr bool kTrack = decltype(track)::value;
        fVec s4[4] = {fVec(0.f), fVec(0.f), fVec(0.f), fVec(0.f)};
        // exp(scale * x - vm) = 2^(x * scale log2 e - vm log2 e)
        const __m512 vs2 = _mm512_mul_ps(vs, vlog2e), vm2 = _mm512_mul_ps(vm, vlog2e);
        auto prob = [&](int key, int u) OCTAVO_INLINE_LAMBDA {
          const __m512 x = _mm512_loadu_ps(col + size_t(key) * ld);
          if constexpr (kTrack) m4[u] = _mm512_max_ps(m4[u], x);
          return fVec(exp2_neg(_mm512_fmsub_ps(x, vs2, vm2)));
        };
        int j = 0;
        for (; j + 4 <= nk; j += 4) {
          const fVec e0 = prob(j, 0), e1 = prob(j + 1, 1), e2 = prob(j + 2, 2), e3 = prob(j + 3, 3);
          s4[0] = s4[0] + e0;
          s4[1] = s4[1] + e1;
          s4[2] = s4[2] + e2;
          s4[3] = s4[3] + e3;
          _mm512_storeu_si512(pp2 + size_t(j / 2) * ld + r0, pair_bf16(e0, e1));
          _mm512_storeu_si512(pp2 + size_t(j / 2 + 1) * ld + r0, pair_bf16(e2, e3));
        }
        for (; j < nk; j += 2) {
          const fVec e0 = prob(j, 0), e1 = j + 1 < nk ? prob(j + 1, 1) : fVec(0.f);
          s4[0] = s4[0] + e0;
          s4[1] = s4[1] + e1;
          _mm512_storeu_si512(pp2 + size_t(j / 2) * ld + r0, pair_bf16(e0, e1));
        }
        return (s4[0] + s4[1]) + (s4[2] + s4[3]);
      };
      const fVec m_old = fVec::loadu(sc.m.data() + r0);
      __m512 m4[4] = {vinf, vinf, vinf, vinf};
      // Rows that have seen keys already: exponentiate against their running max in one pass,
      // keeping it (no rescale) unless a score rose more than kLazyMax above it.
      if (_mm512_cmp_ps_mask(m_old, vinf, _CMP_EQ_OQ) == 0) {
        const fVec sum = exp_pass(m_old, std::true_type{}, m4);
        const __m512 vmax = _mm512_mul_ps(_mm512_max_ps(_mm512_max_ps(m4[0], m4[1]), _mm512_max_ps(m4[2], m4[3])), vs);
        if (_mm512_cmp_ps_mask(vmax, _mm512_add_ps(m_old, _mm512_set1_ps(kLazyMax)), _CMP_GT_OQ) == 0) {
          (fVec::loadu(sc.l.data() + r0) + sum).store(sc.l.data() + r0);
          fVec(1.f).store(sc.corr.data() + r0);
          continue;
        }
        m4[0] = m4[1] = m4[2] = m4[3] = vinf;
      }
      int j = 0;
      for (; j + 4 <= nk; j += 4)
        for (int u = 0; u < 4; ++u) m4[u] = _mm512_max_ps(m4[u], _mm512_loadu_ps(col + size_t(j + u) * ld));
      for (; j < nk; ++j) m4[0] = _mm512_max_ps(m4[0], _mm512_loadu_ps(col + size_t(j) * ld));
      const __m512 vmax = _mm512_mul_ps(_mm512_max_ps(_mm512_max_ps(m4[0], m4[1]), _mm512_max_ps(m4[2], m4[3])), vs);
      const fVec m_new = at::vec::maximum(m_old, fVec(vmax));
      const fVec m_sub = fVec::blendv(m_new, fVec(0.f), m_new == fVec(kNegInf));
      const fVec corr = (m_old - m_sub).exp_u20();
      const fVec sum = exp_pass(m_sub, std::false_type{}, m4);
      (fVec::loadu(sc.l.data() + r0) * corr + sum).store(sc.l.data() + r0);
      m_new.store(sc.m.data() + r0);
      corr.store(sc.corr.data() + r0);
    }
  }
#endif

  // Softmax step over st[j * ld + r] (keys j0 + j, j < nk) for every row r < ld, vectorized over
  // rows: masks, caps and exponentiates in place, updates m and l, and leaves in sc.corr the
  // factor that rescales each row's accumulator.
  void softmax_cols(float* st, int ld, int j0, int nk, Scratch& sc, float in_scale = 1.f) const {
    const fVec vinf(kNegInf), zero(0.f);
    for (int r0 = 0; r0 < ld; r0 += kVec) {
      const fVec vpos = fVec::loadu(sc.pos.data() + r0);
      const fVec vlo = p_.sliding_window > 0 ? vpos - fVec(float(p_.sliding_window)) : fVec(-1.f);
      const fVec vslope = fVec::loadu(sc.slope.data() + r0);
      fVec vmax(kNegInf);
      for (int j = 0; j < nk; ++j) {
        const fVec key(float(j0 + j));
        fVec x = fVec::loadu(st + size_t(j) * ld + r0);
        if (in_scale != 1.f) x = x * fVec(in_scale);
        if (p_.soft_cap > 0.f) x = fVec(p_.soft_cap) * (x / fVec(p_.soft_cap)).tanh();
        if (p_.alibi_slopes != nullptr) x = at::vec::fmadd(vslope, key - vpos, x);
        x = fVec::blendv(vinf, x, (key <= vpos) & (key > vlo));
        x.store(st + size_t(j) * ld + r0);
        vmax = at::vec::maximum(vmax, x);
      }
      const fVec m_old = fVec::loadu(sc.m.data() + r0);
      const fVec m_new = at::vec::maximum(m_old, vmax);
      // Rows with nothing visible yet keep m = -inf; subtract 0 instead so exp gives 0, not NaN.
      const fVec m_sub = fVec::blendv(m_new, zero, m_new == vinf);
      const fVec corr = (m_old - m_sub).exp_u20();
      fVec sum(0.f);
      for (int j = 0; j < nk; ++j) {
        const fVec e = (fVec::loadu(st + size_t(j) * ld + r0) - m_sub).exp_u20();
        e.store(st + size_t(j) * ld + r0);
        sum = sum + e;
      }
      (fVec::loadu(sc.l.data() + r0) * corr + sum).store(sc.l.data() + r0);
      m_new.store(sc.m.data() + r0);
      corr.store(sc.corr.data() + r0);
    }
  }

  // nk cache rows (stride `stride`) to fp32 dst[j * hdp_], zero padded.
  void convert_rows(const T* src0, int64_t stride, int nk, float* dst0) const {
    for (int j = 0; j < nk; ++j) {
      const T* src = src0 + j * stride;
      float* dst = dst0 + size_t(j) * hdp_;
      for (int c = 0; c < nfull_; ++c) load_f(src + c * kVec).store(dst + c * kVec);
      if (tail_ > 0) load_f_partial(src + nfull_ * kVec, tail_).store(dst + nfull_ * kVec);
    }
  }

 private:
  // Scores of block offsets [o0, o1) for every row of the item into s (row stride ld), pulling
  // the same part of block `next` (if >= 0) into L2 meanwhile: a block ahead hides the DRAM latency
  // of scattered blocks, and the prefetches are spread out so they never queue up.
  void qk_block(const WorkItem& w, int64_t block, int64_t next, int o0, int o1, float* s, int ld,
                Scratch& sc) const {
    const int rows_per_head = (w.t1 - w.t0) * group_;
    const int step = o1 - o0 == p_.block_size && o1 % kTokenGroup == 0 ? kTokenGroup : o1 - o0;
    for (int j = o0; j < o1; j += step) {
      for (int kvh = w.h0; kvh < w.h1; ++kvh) {
        if (next >= 0) prefetch_rows<2>(key_row(next, j, kvh), p_.kc_stride_token, step);
        const int r0 = (kvh - w.h0) * rows_per_head;
        scores(sc.q.data() + size_t(r0) * hdp_, key_row(block, j, kvh), p_.kc_stride_token, step,
               rows_per_head, s + size_t(r0) * ld + (j - o0), ld);
      }
    }
  }

  // acc += p x V for block offsets [o0, o1), in the same order as qk_block.
  void pv_block(const WorkItem& w, int64_t block, int64_t next, int o0, int o1, const float* p,
                int ld, Scratch& sc) const {
    const int rows_per_head = (w.t1 - w.t0) * group_;
    const int step = o1 - o0 == p_.block_size && o1 % kTokenGroup == 0 ? kTokenGroup : o1 - o0;
    for (int j = o0; j < o1; j += step) {
      for (int kvh = w.h0; kvh < w.h1; ++kvh) {
        if (next >= 0) prefetch_rows<2>(value_row(next, j, kvh), p_.vc_stride_token, step);
        const int r0 = (kvh - w.h0) * rows_per_head;
        pv_direct(sc.acc.data() + size_t(r0) * hdp_, p + size_t(r0) * ld + (j - o0), ld,
                  value_row(block, j, kvh), p_.vc_stride_token, step, rows_per_head, sc);
      }
    }
  }

  // Decode items on avx512_bf16 CPUs: bf16 cache and a head size of whole 32-dim chunks up to
  // 256 (the fp32 passes above otherwise, and under OCTAVO_CPU_NO_AVX512BF16=1); run_chunked
  // also needs at most kBf16DecodeRows rows per kv head.
  bool decode_bf16() const {
#if defined(CPU_CAPABILITY_AVX512)
    return std::is_same_v<T, c10::BFloat16> && hd_ % 32 == 0 && hd_ <= 256 && attention_use_avx512_bf16();
#else
    return false;
#endif
  }

  // The item's query rows in bf16 (unscaled, sc.qb[r * hd_]): as they are, or times mul (a power
  // of two, exact) for fp8 caches, from any query dtype; sc.pb sized for the probabilities of a
  // chunk (row stride ld).
  void load_queries_bf16(const WorkItem& w, int q_start, int ld, Scratch& sc, float mul = 1.f) const {
    const int rows = (w.t1 - w.t0) * group_ * (w.h1 - w.h0);
    grow(sc.qb, size_t(rows) * hd_);
    grow(sc.pb, size_t(rows) * ld);
    for (int r = 0; r < rows; ++r) {
      const T* src = static_cast<const T*>(p_.query) + int64_t(q_start + token_of(w, r)) * p_.q_stride_token +
                     int64_t(head_of(w, r)) * p_.q_stride_head;
      uint16_t* dst = sc.qb.data() + size_t(r) * hd_;
      if (std::is_same_v<T, c10::BFloat16> && mul == 1.f) {
        std::memcpy(dst, src, size_t(hd_) * 2);
      } else {
        for (int d = 0; d < hd_; ++d) {
          const c10::BFloat16 b(static_cast<float>(src[d]) * mul);  // rounded to nearest even
          std::memcpy(dst + d, &b, 2);
        }
      }
    }
  }

  // qk_block with bf16 products: per kv head, the span's keys 16 at a time against each row (head
  // by head, as the 16-key reduction wants one head's keys together; the rows of the next block
  // are prefetched alongside). C: uint16_t for a bf16 cache (scale p_.scale), uint8_t for an fp8
  // one (each chunk read as bf16 times 2^-120 by load_bf16x32, against the queries times 2^64:
  // scale p_.scale * kFp8ScoreMul).
  template <typename C>
  void qk_block_bf16(const WorkItem& w, int64_t block, int64_t next, int o0, int o1, float* s, int ld,
                     Scratch& sc, float scale) const {
#if defined(CPU_CAPABILITY_AVX512)
    const int rows_per_head = (w.t1 - w.t0) * group_;
    for (int kvh = w.h0; kvh < w.h1; ++kvh) {
      const int r0 = (kvh - w.h0) * rows_per_head;
      const C* k = key_at<C>(block, o0, kvh);
      const C* pf = next >= 0 ? key_at<C>(next, o0, kvh) : k;
      qk_span_bf16_hd(sc.qb.data() + size_t(r0) * hd_, rows_per_head, hd_, k, p_.kc_stride_token, o1 - o0, pf,
                      scale, s + size_t(r0) * ld, ld);
    }
#endif
  }

  // pv_block with bf16 products: p holds the rows' bf16 probabilities (row stride ld), and the
  // accumulators' dims stay permuted until unpermute_rows.
  template <typename C>
  void pv_block_bf16(const WorkItem& w, int64_t block, int64_t next, int o0, int o1, const uint16_t* p,
                     int ld, Scratch& sc) const {
#if defined(CPU_CAPABILITY_AVX512)
    const int rows_per_head = (w.t1 - w.t0) * group_;
    for (int kvh = w.h0; kvh < w.h1; ++kvh) {
      const int r0 = (kvh - w.h0) * rows_per_head;
      const C* v = value_at<C>(block, o0, kvh);
      const C* pf = next >= 0 ? value_at<C>(next, o0, kvh) : v;
      pv_span_bf16(sc.acc.data() + size_t(r0) * hdp_, hdp_, p + size_t(r0) * ld, ld, rows_per_head, hd_, v,
                   p_.vc_stride_token, o1 - o0, pf);
    }
#endif
  }

  void row_to_bf16(const float* p, int n, uint16_t* dst, float mul) const {
#if defined(CPU_CAPABILITY_AVX512)
    probs_to_bf16(p, n, dst, mul);
#endif
  }

  // The fp32 decode passes over an fp8 cache: per kv head, the block's rows [o0, o1) decoded
  // exactly into fp32 scratch (the rows of block `next` pulled into L2 meanwhile), then the
  // same register blocks as over a float cache.
  void qk_block_fp8_f32(const WorkItem& w, int64_t block, int64_t next, int o0, int o1, float* s, int ld,
                        Scratch& sc) const {
#if defined(CPU_CAPABILITY_AVX512)
    const int rows_per_head = (w.t1 - w.t0) * group_;
    grow(sc.kf, size_t(p_.block_size) * hdp_);
    for (int kvh = w.h0; kvh < w.h1; ++kvh) {
      const int r0 = (kvh - w.h0) * rows_per_head;
      fp8_rows_to_f32(key_at<uint8_t>(block, o0, kvh), p_.kc_stride_token, o1 - o0,
                      next >= 0 ? key_at<uint8_t>(next, o0, kvh) : nullptr, sc.kf.data());
      scores(sc.q.data() + size_t(r0) * hdp_, sc.kf.data(), hdp_, o1 - o0, rows_per_head, s + size_t(r0) * ld, ld);
    }
#endif
  }

  void pv_block_fp8_f32(const WorkItem& w, int64_t block, int64_t next, int o0, int o1, const float* p,
                        int ld, Scratch& sc) const {
#if defined(CPU_CAPABILITY_AVX512)
    const int rows_per_head = (w.t1 - w.t0) * group_;
    for (int kvh = w.h0; kvh < w.h1; ++kvh) {
      const int r0 = (kvh - w.h0) * rows_per_head;
      fp8_rows_to_f32(value_at<uint8_t>(block, o0, kvh), p_.vc_stride_token, o1 - o0,
                      next >= 0 ? value_at<uint8_t>(next, o0, kvh) : nullptr, sc.vf.data());
      pv_direct(sc.acc.data() + size_t(r0) * hdp_, p + size_t(r0) * ld, ld, sc.vf.data(), hdp_, o1 - o0,
                rows_per_head, sc);
    }
#endif
  }

#if defined(CPU_CAPABILITY_AVX512)
  // n fp8 rows of hd_ bytes (row j at src + j * ks) to fp32 dst[j * hdp_ + d], exactly
  // (fp8_to_f32x16); each 64 bytes read prefetch the same bytes of row pf + j * ks.
  void fp8_rows_to_f32(const uint8_t* src, int64_t ks, int n, const uint8_t* pf, float* dst) const {
    for (int j = 0; j < n; ++j) {
      for (int d = 0; d < hd_; d += 16) {
        if (pf != nullptr && d % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(pf + j * ks + d), _MM_HINT_T1);
        _mm512_storeu_ps(dst + size_t(j) * hdp_ + d, fp8_to_f32x16(src + j * ks + d));
      }
    }
  }
#endif

  void unpermute_rows(int rows, Scratch& sc) const {
#if defined(CPU_CAPABILITY_AVX512)
    for (int r = 0; r < rows; ++r) unpermute_acc_bf16(sc.acc.data() + size_t(r) * hdp_, hd_);
#endif
  }

  // Row (block, off, kvh) of the caches, read as elements of C (the strides count the cache's own
  // elements: T, or bytes of an fp8 cache; uint16_t views a bf16 cache's bits).
  template <typename C>
  const C* key_at(int64_t block, int off, int kvh) const {
    return static_cast<const C*>(p_.key_cache) + block * p_.kc_stride_block + off * p_.kc_stride_token +
           kvh * p_.kc_stride_head;
  }
  template <typename C>
  const C* value_at(int64_t block, int off, int kvh) const {
    return static_cast<const C*>(p_.value_cache) + block * p_.vc_stride_block + off * p_.vc_stride_token +
           kvh * p_.vc_stride_head;
  }
  const T* key_row(int64_t block, int off, int kvh) const { return key_at<T>(block, off, kvh); }
  const T* value_row(int64_t block, int off, int kvh) const { return value_at<T>(block, off, kvh); }

  // LOCALITY 3: into L1 (prefetcht0), 2: into L2 (prefetcht1).
  template <int LOCALITY = 3, typename C = T>
  void prefetch_rows(const C* row, int64_t stride, int n = -1) const {
    const int bytes = hd_ * int(sizeof(C));
    if (n < 0) n = p_.block_size;
    for (int j = 0; j < n; ++j)
      for (int b = 0; b < bytes; b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(row + j * stride) + b, 0, LOCALITY);
  }

  int head_of(const WorkItem& w, int r) const {
    const int rows_per_head = (w.t1 - w.t0) * group_;
    return (w.h0 + r / rows_per_head) * group_ + r % group_;
  }
  int token_of(const WorkItem& w, int r) const {
    return w.t0 + (r % ((w.t1 - w.t0) * group_)) / group_;
  }

  // Q rows into fp32 scratch, pre-scaled, zero padded; softmax state reset.
  // (convert false: the bf16 paths, which read the queries as they are, skip the fp32 copy)
  void load_queries(const WorkItem& w, int q_start, int pos0, Scratch& sc, bool convert = true) const {
    const fVec vscale(p_.scale);
    const int rows = (w.t1 - w.t0) * group_ * (w.h1 - w.h0);
    for (int r = 0; r < rows; ++r) {
      const int t = token_of(w, r);
      if (convert) {
        const T* src = static_cast<const T*>(p_.query) + int64_t(q_start + t) * p_.q_stride_token +
                       int64_t(head_of(w, r)) * p_.q_stride_head;
        float* dst = sc.q.data() + size_t(r) * hdp_;
        for (int c = 0; c < nfull_; ++c) (load_f(src + c * kVec) * vscale).store(dst + c * kVec);
        if (tail_ > 0) (load_f_partial(src + nfull_ * kVec, tail_) * vscale).store(dst + nfull_ * kVec);
      }
      std::fill(sc.acc.data() + size_t(r) * hdp_, sc.acc.data() + size_t(r + 1) * hdp_, 0.f);
      sc.m[r] = kNegInf;
      sc.l[r] = 0.f;
      sc.pos[r] = float(pos0 + t);
    }
  }

  // (K: the cache's T rows, stride ks = the cache's token stride; or fp32 rows of an fp8 block)
  template <typename K>
  void scores(const float* q, const K* kbase, int64_t ks, int nk, int rows, float* s, int lds) const {
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
      const K* k = kbase + j * ks;
      int r = 0;
      for (; r + kRowBlock <= rows; r += kRowBlock)
        dot_rows_4keys<kRowBlock>(q + r * hdp_, hdp_, k, ks, nfull_, tail_, s + r * lds + j, lds);
      for (; r < rows; ++r) dot_rows_4keys<1>(q + r * hdp_, hdp_, k, ks, nfull_, tail_, s + r * lds + j, lds);
    }
    for (; j < nk; ++j) {
      const K* k = kbase + int64_t(j) * ks;
      int r = 0;
      for (; r + 8 <= rows; r += 8) dot_rows<8>(q + r * hdp_, hdp_, k, nfull_, tail_, s + r * lds + j, lds);
      for (; r + 4 <= rows; r += 4) dot_rows<4>(q + r * hdp_, hdp_, k, nfull_, tail_, s + r * lds + j, lds);
      for (; r < rows; ++r) dot_rows<1>(q + r * hdp_, hdp_, k, nfull_, tail_, s + r * lds + j, lds);
    }
  }

  // Masks, caps and exponentiates one row's scores s[0, n) (keys j0 + i) in place, padded to
  // whole vectors; returns false if all masked. corr rescales the row's previous accumulator.
  bool softmax_span(float* s, int r, int h, int j0, int n, Scratch& sc, float& corr) const {
    const float pos = sc.pos[r];
    const fVec vpos(pos), vlo(p_.sliding_window > 0 ? pos - p_.sliding_window : -1.f);
    const fVec vinf(kNegInf), vnk(float(j0 + n));
    const float slope = p_.alibi_slopes != nullptr ? p_.alibi_slopes[h] : 0.f;
    const int np = (n + kVec - 1) / kVec * kVec;
    fVec vmax(kNegInf);
    const fVec iota = fVec::arange(0.f, 1.f);
    for (int c = 0; c < np; c += kVec) {
      const fVec j = iota + fVec(float(j0 + c));
      fVec x = fVec::loadu(s + c);
      if (p_.soft_cap > 0.f) x = fVec(p_.soft_cap) * (x / fVec(p_.soft_cap)).tanh();
      if (slope != 0.f) x = at::vec::fmadd(fVec(slope), j - vpos, x);
      const fVec ok = (j <= vpos) & (j > vlo) & (j < vnk);
      x = fVec::blendv(vinf, x, ok);
      x.store(s + c);
      vmax = at::vec::maximum(vmax, x);
    }
    const float bmax = hmax(vmax);
    if (bmax == kNegInf) return false;
    const float m_new = std::max(sc.m[r], bmax);
    corr = std::exp(sc.m[r] - m_new);
    fVec vsum(0.f);
    const fVec vm(m_new);
    for (int c = 0; c < np; c += kVec) {
      const fVec e = (fVec::loadu(s + c) - vm).exp_u20();
      e.store(s + c);
      vsum = vsum + e;
    }
    sc.l[r] = sc.l[r] * corr + hsum(vsum);
    sc.m[r] = m_new;
    return true;
  }

  // acc rows [0, rows) (stride hdp_) += p rows (stride ldp) x V rows [0, nk) read from the cache.
  // (V: the cache's T rows, stride vs = the cache's token stride; or fp32 rows of an fp8 block,
  // whose head sizes are whole vectors)
  template <typename V>
  void pv_direct(float* acc0, const float* p, int ldp, const V* v0, int64_t vs, int nk, int rows, Scratch& sc) const {
    if constexpr (std::is_same_v<V, T>) {
      if (tail_ != 0) {  // partial last chunk: V rows through fp32 scratch
        convert_rows(v0, vs, nk, sc.vf.data());
        for (int i = 0; i < rows; ++i)
          pv_tile_chunks<1>(acc0 + size_t(i) * hdp_, hdp_, p + i * ldp, 1, sc.vf.data(), hdp_, nk, hdp_ / kVec);
        return;
      }
    }
    const int nchunks = hdp_ / kVec;
    for (int c = 0; c < nchunks; c += 4) {
      const int nc = std::min(4, nchunks - c);
      int i = 0;
      if (nc == 4) {
        for (; i + kRowBlock <= rows; i += kRowBlock)
          pv_rows_direct<kRowBlock, 4>(acc0 + size_t(i) * hdp_ + c * kVec, hdp_, p + i * ldp, ldp, v0 + c * kVec, vs, nk);
      }
      for (; i < rows; ++i) {
        float* a1 = acc0 + size_t(i) * hdp_ + c * kVec;
        const float* p1 = p + i * ldp;
        const V* v = v0 + c * kVec;
        switch (nc) {
          case 4: pv_rows_direct<1, 4>(a1, hdp_, p1, ldp, v, vs, nk); break;
          case 3: pv_rows_direct<1, 3>(a1, hdp_, p1, ldp, v, vs, nk); break;
          case 2: pv_rows_direct<1, 2>(a1, hdp_, p1, ldp, v, vs, nk); break;
          default: pv_rows_direct<1, 1>(a1, hdp_, p1, ldp, v, vs, nk); break;
        }
      }
    }
  }

  void store_output(const WorkItem& w, int q_start, const Scratch& sc) const {
    const int rows = (w.t1 - w.t0) * group_ * (w.h1 - w.h0);
    for (int r = 0; r < rows; ++r) {
      T* dst = static_cast<T*>(p_.out) + int64_t(q_start + token_of(w, r)) * p_.o_stride_token +
               int64_t(head_of(w, r)) * p_.o_stride_head;
      const float* acc = sc.acc.data() + size_t(r) * hdp_;
      const fVec inv(sc.l[r] > 0.f ? p_.out_scale / sc.l[r] : 0.f);
      for (int c = 0; c < nfull_; ++c) store_f(dst + c * kVec, fVec::loadu(acc + c * kVec) * inv);
      if (tail_ > 0) store_f_partial(dst + nfull_ * kVec, fVec::loadu(acc + nfull_ * kVec) * inv, tail_);
    }
  }

  const PagedAttentionParams& p_;
  const int group_, hd_, nfull_, tail_, hdp_, bsp_;
  const bool kv_fp8_;  // decode items straight from an fp8 cache (the only items such a call runs)
  // V pairs shared by the AMX prefill items of a sequence (share_values)
  const uint32_t* vp_base_ = nullptr;
  const int64_t* vp_off_ = nullptr;
  const int64_t* vp_rows_ = nullptr;
};

// Decode-like sequences (few query rows) take all kv heads in one item, so each cache block is
// read as one contiguous run; they are split over kv heads only when there are too few items
// for the threads. Prefill sequences get one item per (kv head, chunk of tokens).
// skip[s] != 0 (skip may be null): sequence s has no items here.
void make_items(const PagedAttentionParams& p, int num_threads, std::vector<WorkItem>& items,
                const uint8_t* skip) {
  items.clear();
  const int group = p.num_heads / p.num_kv_heads;
  const int chunk = std::max(1, kTargetRows / group);
  int64_t base_items = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    if (skip != nullptr && skip[s]) continue;
    const int q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    base_items += q_len * p.num_heads <= kDecodeRows ? (q_len > 0)
                                                     : int64_t(p.num_kv_heads) * ((q_len + chunk - 1) / chunk);
  }
  const int64_t want = 4 * int64_t(num_threads);
  const int splits = int(std::min<int64_t>(p.num_kv_heads, (want + base_items - 1) / std::max<int64_t>(base_items, 1)));
  const int heads_per_split = (p.num_kv_heads + splits - 1) / splits;
  for (int s = 0; s < p.num_seqs; ++s) {
    if (skip != nullptr && skip[s]) continue;
    const int q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    const int ctx = p.seq_lens[s];
    const bool decode_like = q_len * p.num_heads <= kDecodeRows;
    const int tok_chunk = decode_like ? std::max(q_len, 1) : chunk;
    const int head_step = decode_like ? heads_per_split : 1;
    // kv heads outer: a thread's consecutive items share one head's keys and values (in L2)
    for (int h0 = 0; h0 < p.num_kv_heads; h0 += head_step) {
      const int h1 = std::min(p.num_kv_heads, h0 + head_step);
      for (int t0 = 0; t0 < q_len; t0 += tok_chunk) {
        const int t1 = std::min(q_len, t0 + tok_chunk);
        int64_t keys = ctx - q_len + t1;  // keys seen by the last row
        if (p.sliding_window > 0) keys = std::min<int64_t>(keys, p.sliding_window + t1 - t0);
        const int64_t cost = (int64_t(t1 - t0) * group * (keys + 16) + keys * 4) * (h1 - h0);
        items.push_back({s, h0, h1, t0, t1, cost});
      }
    }
  }
}

// Sequences whose prefill splits into several AMX items per kv head get their V paired once,
// up front (vp_off[s] >= 0; rows: pairs per head, past the context and a whole key chunk zero),
// instead of once per item and key chunk (2040-token prefill attention -17..-25% in the kernel lab).
template <typename T>
void share_values(const PagedAttentionParams& p, const uint8_t* skip, Attention<T>& attn,
                  std::vector<uint32_t>& buf, std::vector<int64_t>& off, std::vector<int64_t>& rows) {
#if defined(CPU_CAPABILITY_AVX512)
  if (!attn.amx_prefill_shares_values()) return;
  const int group = p.num_heads / p.num_kv_heads, chunk = std::max(1, kTargetRows / group);
  off.assign(p.num_seqs, -1);
  rows.assign(p.num_seqs, 0);
  int64_t total = 0;
  std::vector<std::pair<int, int>> tasks;  // (sequence, kv head)
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    if (q_len * p.num_heads <= kDecodeRows || q_len <= chunk) continue;  // one item per head
    if (skip != nullptr && skip[s]) continue;
    off[s] = total;
    rows[s] = (p.seq_lens[s] + 1) / 2 + kAmxKeys / 2;
    total += rows[s] * p.num_kv_heads * p.head_size;
  }
  if (total == 0) return;
  if (int64_t(buf.size()) < total) buf.resize(total);
  for (int s = 0; s < p.num_seqs; ++s)
    if (off[s] >= 0)
      for (int h = 0; h < p.num_kv_heads; ++h) tasks.push_back({s, h});
  at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int s = tasks[i].first, h = tasks[i].second;
      attn.pair_values(p.block_table + int64_t(s) * p.bt_stride, h, 0, p.seq_lens[s], rows[s],
                       buf.data() + off[s] + int64_t(h) * rows[s] * p.head_size);
    }
  });
  attn.set_shared_values(buf.data(), off.data(), rows.data());
#endif
}

// The items of every sequence not skipped (skip may be null).
template <typename T>
void run_items(const PagedAttentionParams& p, const uint8_t* skip) {
  Attention<T> attn(p);
  // Reused across calls; bound to references so worker threads see the caller's vectors.
  static thread_local std::vector<WorkItem> items_buf;
  static thread_local std::vector<int64_t> prefix_buf, vp_off_buf, vp_rows_buf;
  static thread_local std::vector<uint32_t> vpairs_buf;
  std::vector<WorkItem>& items = items_buf;
  std::vector<int64_t>& prefix = prefix_buf;
  make_items(p, at::get_num_threads(), items, skip);
  const int64_t n = int64_t(items.size());
  if (n == 0) return;
  share_values(p, skip, attn, vpairs_buf, vp_off_buf, vp_rows_buf);
  prefix.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + items[i].cost;
  // Contiguous item ranges of equal cost, a few per thread.
  const int64_t parts = std::min<int64_t>(n, int64_t(at::get_num_threads()) * 4);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    static thread_local Scratch scratch;
    for (int64_t part = begin; part < end; ++part) {
      const int64_t lo_cost = prefix[n] * part / parts, hi_cost = prefix[n] * (part + 1) / parts;
      const int64_t i0 = std::lower_bound(prefix.begin(), prefix.begin() + n, lo_cost) - prefix.begin();
      const int64_t i1 = part + 1 == parts ? n
          : std::lower_bound(prefix.begin(), prefix.begin() + n, hi_cost) - prefix.begin();
      for (int64_t i = i0; i < i1; ++i) attn.run(items[i], scratch);
    }
  });
}

// fp8 caches, sequences not skipped: their context's K/V rows decoded into T caches of their
// own (one block per block of the sequence, its table rebuilt), then the items of the T kernel.
// Prefill sequences take this way (their AMX/tile passes read T rows), and everything does where
// the decode passes cannot read fp8 (no avx512_bf16, head sizes other than 32..256 in 32s).
template <typename T>
void run_dequantized(const PagedAttentionParams& p, const uint8_t* skip) {
  static const std::array<float, 256> lut = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = fp8_kv_decode(uint8_t(b));
    return t;
  }();
  static thread_local std::vector<T> kbuf, vbuf;
  static thread_local std::vector<int32_t> table;
  const int bs = p.block_size, hk = p.num_kv_heads, hd = p.head_size;
  const int64_t row = int64_t(hk) * hd, block_elems = bs * row;
  int max_nb = 1;
  std::vector<std::pair<int, int>> tasks;  // (sequence, block index in it)
  for (int s = 0; s < p.num_seqs; ++s) {
    if ((skip != nullptr && skip[s]) || p.query_start_loc[s + 1] == p.query_start_loc[s]) continue;
    const int nb = (p.seq_lens[s] + bs - 1) / bs;
    max_nb = std::max(max_nb, nb);
    for (int b = 0; b < nb; ++b) tasks.push_back({s, b});
  }
  if (tasks.empty()) return;
  const int64_t total = int64_t(tasks.size());
  if (int64_t(kbuf.size()) < total * block_elems) {
    kbuf.resize(total * block_elems);
    vbuf.resize(total * block_elems);
  }
  table.assign(size_t(p.num_seqs) * max_nb, 0);
  for (int64_t i = 0; i < total; ++i) table[size_t(tasks[i].first) * max_nb + tasks[i].second] = int32_t(i);
  T* kb = kbuf.data();
  T* vb = vbuf.data();
  at::parallel_for(0, total, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int s = tasks[i].first, b = tasks[i].second;
      const int64_t src_block = p.block_table[int64_t(s) * p.bt_stride + b];
      const int ntok = std::min(bs, p.seq_lens[s] - b * bs);
      for (int t = 0; t < ntok; ++t)
        for (int h = 0; h < hk; ++h) {
          const uint8_t* ks = static_cast<const uint8_t*>(p.key_cache) + src_block * p.kc_stride_block +
                              t * p.kc_stride_token + h * p.kc_stride_head;
          const uint8_t* vs = static_cast<const uint8_t*>(p.value_cache) + src_block * p.vc_stride_block +
                              t * p.vc_stride_token + h * p.vc_stride_head;
          T* kd = kb + i * block_elems + t * row + int64_t(h) * hd;
          T* vd = vb + i * block_elems + t * row + int64_t(h) * hd;
          int d = 0;
#if defined(CPU_CAPABILITY_AVX512)
          for (; d + 16 <= hd; d += 16) {   // fp8_kv_decode 16 at a time
            store_f(kd + d, fVec(fp8_to_f32x16(ks + d)));
            store_f(vd + d, fVec(fp8_to_f32x16(vs + d)));
          }
#endif
          for (; d < hd; ++d) {
            kd[d] = static_cast<T>(lut[ks[d]]);
            vd[d] = static_cast<T>(lut[vs[d]]);
          }
        }
    }
  });
  PagedAttentionParams q = p;
  q.key_cache = kb;
  q.value_cache = vb;
  q.kc_stride_block = q.vc_stride_block = block_elems;
  q.kc_stride_token = q.vc_stride_token = row;
  q.kc_stride_head = q.vc_stride_head = hd;
  q.block_table = table.data();
  q.bt_stride = max_nb;
  q.kv_fp8 = false;
  run_items<T>(q, skip);
}

template <typename T>
void paged_attention_impl(const PagedAttentionParams& p) {
  if (!p.kv_fp8) {
    run_items<T>(p, nullptr);
    return;
  }
  // fp8 caches: decode-like sequences read the cache directly where the decode passes can,
  // the others through dequantized copies of their blocks.
  const bool direct = Attention<T>::fp8_decode_supported(p);
  std::vector<uint8_t> is_direct(p.num_seqs), not_direct(p.num_seqs);
  bool any_direct = false, any_other = false;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    is_direct[s] = direct && q_len * p.num_heads <= kDecodeRows;
    not_direct[s] = !is_direct[s];
    any_direct |= is_direct[s] && q_len > 0;
    any_other |= !is_direct[s] && q_len > 0;
  }
  if (any_other) run_dequantized<T>(p, is_direct.data());
  if (any_direct) run_items<T>(p, not_direct.data());
}

}  // namespace

void paged_attention_kernel(const PagedAttentionParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { paged_attention_impl<scalar_t>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(paged_attention_kernel, PagedAttentionParams)

namespace octavo {

void paged_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& query_start_loc,
                         const at::Tensor& seq_lens, const at::Tensor& block_table, double scale,
                         int64_t sliding_window, double soft_cap,
                         const std::optional<at::Tensor>& alibi_slopes, double k_scale,
                         double v_scale) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &query, &key_cache, &value_cache, &query_start_loc,
                              &seq_lens, &block_table})
    TORCH_CHECK(t->device().is_cpu(), "paged_attention: all tensors must be on the CPU");
  TORCH_CHECK(query.dim() == 3, "paged_attention: query must be [T, Hq, hd], got ", query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "paged_attention: out ", out.sizes(),
              " must match query ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "paged_attention: caches must be [num_blocks, block_size, Hk, hd], got ",
              key_cache.sizes(), " and ", value_cache.sizes());
  const int64_t num_heads = query.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == query.size(2), "paged_attention: cache head size ",
              key_cache.size(3), " != query head size ", query.size(2));
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "paged_attention: Hq=",
              num_heads, " is not a multiple of Hk=", num_kv_heads);
  OCTAVO_CHECK_SAME_DTYPE(query, out);
  OCTAVO_CHECK_SAME_DTYPE(key_cache, value_cache);
  // fp8 caches (kv_cache_dtype="fp8", written by reshape_and_cache) serve queries of any float dtype
  const bool fp8 = key_cache.scalar_type() == at::kFloat8_e4m3fn;
  if (!fp8) OCTAVO_CHECK_SAME_DTYPE(query, key_cache);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &query, &key_cache, &value_cache})
    TORCH_CHECK(t->size(-1) <= 1 || t->stride(-1) == 1,
                "paged_attention: query/out/caches must have a unit last stride");
  const int64_t num_seqs = seq_lens.size(0);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&query_start_loc, &seq_lens, &block_table})
    TORCH_CHECK(t->scalar_type() == at::kInt, "paged_attention: query_start_loc, seq_lens and "
                "block_table must be int32");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.is_contiguous(), "paged_attention: seq_lens must be contiguous [S]");
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.size(0) == num_seqs + 1 &&
                  query_start_loc.is_contiguous(),
              "paged_attention: query_start_loc must be contiguous [S+1]");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == num_seqs && block_table.stride(1) == 1,
              "paged_attention: block_table must be [S, max_blocks] with a unit last stride");
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t block_size = key_cache.size(1), max_blocks = block_table.size(1);
  TORCH_CHECK(num_seqs == 0 || (qsl[0] == 0 && qsl[num_seqs] <= query.size(0)),
              "paged_attention: query_start_loc must start at 0 and end within T");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s];
    TORCH_CHECK(q_len >= 0 && lens[s] >= q_len && lens[s] <= max_blocks * block_size,
                "paged_attention: sequence ", s, " has q_len ", q_len, " and seq_len ", lens[s],
                " (need q_len <= seq_len <= max_blocks * block_size = ", max_blocks * block_size, ")");
  }
  if (alibi_slopes.has_value()) {
    TORCH_CHECK(alibi_slopes->device().is_cpu() && alibi_slopes->scalar_type() == at::kFloat &&
                    alibi_slopes->numel() == num_heads && alibi_slopes->is_contiguous(),
                "paged_attention: alibi_slopes must be a contiguous float32 [Hq] CPU tensor");
  }
  TORCH_CHECK(sliding_window >= 0, "paged_attention: sliding_window must be >= 0");
  TORCH_CHECK(soft_cap >= 0, "paged_attention: soft_cap must be >= 0");
  cpu::check_kv_scales(k_scale, v_scale, "paged_attention");
  cpu::PagedAttentionParams p{};
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.query_start_loc = qsl;
  p.seq_lens = lens;
  p.block_table = block_table.data_ptr<int32_t>();
  p.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  p.q_stride_token = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.o_stride_token = out.stride(0);
  p.o_stride_head = out.stride(1);
  p.kc_stride_block = key_cache.stride(0);
  p.kc_stride_token = key_cache.stride(1);
  p.kc_stride_head = key_cache.stride(2);
  p.vc_stride_block = value_cache.stride(0);
  p.vc_stride_token = value_cache.stride(1);
  p.vc_stride_head = value_cache.stride(2);
  p.bt_stride = block_table.stride(0);
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_size = static_cast<int>(query.size(2));
  p.block_size = static_cast<int>(block_size);
  // an fp8 cache's K scale multiplies every score (folded into the softmax scale), its V scale
  // every output (folded into the softmax's 1/l); other caches ignore both
  p.scale = static_cast<float>(fp8 ? scale * k_scale : scale);
  p.out_scale = static_cast<float>(fp8 ? v_scale : 1.0);
  p.soft_cap = static_cast<float>(soft_cap);
  p.sliding_window = static_cast<int>(sliding_window);
  p.dtype = cpu::to_dtype(query, "paged_attention");
  p.kv_fp8 = fp8;
  OCTAVO_CALL_CPU_KERNEL(paged_attention_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
