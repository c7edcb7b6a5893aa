// Dense linear out[M, N] = x[M, K] @ weight[N, K]^T (+ bias) on CPU for the small M of decode:
// each weight row is streamed from memory once per call and used for all M rows.
#include <ATen/Parallel.h>

#include <cstdlib>

#include "cpu/cpu_types.h"

namespace octavo::cpu::CPU_CAPABILITY {

// Register block: up to kMaxMB rows of x times kNB weight rows, one K-dot accumulator each.
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
  static void run(const T* x, int64_t xs, const T* w, int64_t k, float* sums) {
    // x: [MB, k] row stride xs; w: [NB, k] contiguous
    fVec acc[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) acc[m][n] = fVec(0.f);
    int64_t i = 0;
    for (; i + kVec <= k; i += kVec) {
      fVec wv[NB];
      for (int n = 0; n < NB; ++n) wv[n] = load_f(w + n * k + i);
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
  template <int MB, int NB>
  __attribute__((target("avx512bf16"))) static void run(const c10::BFloat16* x, int64_t xs,
                                                        const c10::BFloat16* w, int64_t k,
                                                        float* sums) {
    // x: [MB, k] row stride xs; w: [NB, k] contiguous
    __m512 acc[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      __m512i wv[NB];
      for (int n = 0; n < NB; ++n) wv[n] = _mm512_loadu_si512(w + n * k + i);
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
static void call_nb(int nb, const T* x, int64_t xs, const T* w, int64_t k, float* sums) {
  switch (nb) {
    case 1: Block::template run<MB, 1>(x, xs, w, k, sums); break;
    case 2: Block::template run<MB, 2>(x, xs, w, k, sums); break;
    case 3: Block::template run<MB, 3>(x, xs, w, k, sums); break;
    default: Block::template run<MB, kNB>(x, xs, w, k, sums); break;
  }
}

template <class Block, typename T>
static void call_block(int mb, int nb, const T* x, int64_t xs, const T* w, int64_t k,
                       float* sums) {
  switch (mb) {
    case 1: call_nb<Block, 1>(nb, x, xs, w, k, sums); break;
    case 2: call_nb<Block, 2>(nb, x, xs, w, k, sums); break;
    case 3: call_nb<Block, 3>(nb, x, xs, w, k, sums); break;
    default: call_nb<Block, kMaxMB>(nb, x, xs, w, k, sums); break;
  }
}

// Threads split the N blocks; each walks its weight rows once, all M rows per block of rows.
template <typename T, class Block>
static void linear_impl(const LinearParams& p) {
  const T* x = static_cast<const T*>(p.x);            // [M, K] row stride x_stride
  const T* w = static_cast<const T*>(p.weight);       // [N, K]
  const T* bias = static_cast<const T*>(p.bias);      // [N] or null
  T* out = static_cast<T*>(p.out);                    // [M, N] row stride out_stride
  const int64_t k = p.k, nblocks = (p.n + kNB - 1) / kNB;
  // at least ~64 KiB of weight per task, so small layers do not pay for a thread handoff
  const int64_t block_bytes = std::max<int64_t>(1, kNB * k * static_cast<int64_t>(sizeof(T)));
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / block_bytes);
  at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
    float sums[kMaxMB * kNB];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kNB;
      const int nb = static_cast<int>(std::min<int64_t>(kNB, p.n - n0));
      for (int64_t m0 = 0; m0 < p.m; m0 += kMaxMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, p.m - m0));
        call_block<Block>(mb, nb, x + m0 * p.x_stride, p.x_stride, w + n0 * k, k, sums);
        for (int m = 0; m < mb; ++m) {
          T* o = out + (m0 + m) * p.out_stride + n0;
          for (int n = 0; n < nb; ++n)
            o[n] = from_f<T>(sums[m * nb + n] + (bias ? to_f(bias[n0 + n]) : 0.f));
        }
      }
    }
  });
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

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
