// FP8 (E4M3) weight GEMM on CPU: out[M, N] = x[M, K] @ W^T (+ bias), W[n, k] = e4m3(q[n, k]) *
// scale[n / block_n, k / block_k] (per-tensor, per-channel and 128 x 128 blocks are all block
// grids). Weights stay 1 byte each in their checkpoint layout [N, K] and are widened to fp32 in
// registers by bit operations; decode (M = 1..8) streams each weight byte from memory once.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_types.h"

namespace octavo::cpu {

struct Fp8GemmParams {
  void* out;               // [M, N], row stride out_stride
  const void* x;           // [M, K], row stride x_stride: float dtype, or e4m3 bytes (x_scale)
  const float* x_scale;    // [M] per-row scales of e4m3 x (W8A8), or null
  const uint8_t* w;        // [N, K] e4m3 bytes, contiguous
  const float* scale;      // [ceil(N/block_n), kblocks] fp32, contiguous
  const void* bias;        // [N] in the output dtype, or null
  int64_t out_stride, x_stride;
  int64_t m, n, k, block_n, block_k, kblocks;
  DType x_dtype, out_dtype;  // x_dtype ignored when x_scale is set
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int kR = 4;     // output rows per pass (their 4 byte streams share each x load)
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMB = 4;    // x rows per pass: 16 accumulators + 4 weights + x in 32 registers
#else
constexpr int kMB = 2;    // 16 registers: 8 accumulators + 4 weights + x
#endif
constexpr int64_t kMTile = 64;  // x rows kept (as fp32) in cache while all weights stream by

// e4m3 -> fp32 by bit operations: the 7 magnitude bits shifted into fp32's exponent/mantissa
// fields give a value 2^-120 times too small (exact for subnormals too, as an fp32 denormal
// that the multiply renormalizes); the sign moves to bit 31. 0x7f (NaN in e4m3fn) reads as 480.
inline float e4m3_to_float(uint8_t b) {
  const uint32_t bits = (static_cast<uint32_t>(b & 0x7F) << 20) | (static_cast<uint32_t>(b & 0x80) << 24);
  float f;
  std::memcpy(&f, &bits, 4);
  return f * 0x1p120f;
}

// kVec consecutive codes -> fp32.
inline fVec load_e4m3(const uint8_t* p) {
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
  for (int i = 0; i < kVec; ++i) t[i] = e4m3_to_float(p[i]);
  return fVec::loadu(t);
#endif
}

// n < kVec codes, zero padded (a block's or K's tail).
inline fVec load_e4m3_partial(const uint8_t* p, int n) {
  alignas(64) uint8_t t[64] = {};
  std::memcpy(t, p, n);
  return load_e4m3(t);
}

// tot[m * kR + r] = sum_k xf[m][k] * W[n0 + r][k] for MB rows of xf and kR weight rows (rows past
// N repeat the last one; the caller drops them).
template <int MB>
static void rows_pass(const Fp8GemmParams& p, const float* xf, int64_t xs, int64_t n0, float* tot) {
  const uint8_t* wr[kR];
  const float* sr[kR];
  for (int r = 0; r < kR; ++r) {
    const int64_t row = std::min(n0 + r, p.n - 1);
    wr[r] = p.w + row * p.k;
    sr[r] = p.scale + (row / p.block_n) * p.kblocks;
  }
  fVec total[MB][kR];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < kR; ++r) total[m][r] = fVec(0.f);
  for (int64_t kb = 0; kb < p.kblocks; ++kb) {
    const int64_t k0 = kb * p.block_k, k1 = std::min(p.k, k0 + p.block_k);
    fVec acc[MB][kR];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < kR; ++r) acc[m][r] = fVec(0.f);
    int64_t kk = k0;
    for (; kk + kVec <= k1; kk += kVec) {
      fVec w[kR];
      for (int r = 0; r < kR; ++r) w[r] = load_e4m3(wr[r] + kk);
      for (int m = 0; m < MB; ++m) {
        const fVec xv = fVec::loadu(xf + m * xs + kk);
        for (int r = 0; r < kR; ++r) acc[m][r] = at::vec::fmadd(xv, w[r], acc[m][r]);
      }
    }
    if (kk < k1) {  // zero weights past k1 (x is zero padded to a whole vector past K only)
      const int rest = static_cast<int>(k1 - kk);
      fVec w[kR];
      for (int r = 0; r < kR; ++r) w[r] = load_e4m3_partial(wr[r] + kk, rest);
      for (int m = 0; m < MB; ++m) {
        const fVec xv = fVec::loadu(xf + m * xs + kk);
        for (int r = 0; r < kR; ++r) acc[m][r] = at::vec::fmadd(xv, w[r], acc[m][r]);
      }
    }
    for (int r = 0; r < kR; ++r) {
      const fVec s(sr[r][kb]);
      for (int m = 0; m < MB; ++m) total[m][r] = at::vec::fmadd(acc[m][r], s, total[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m) hsum4(total[m], tot + m * kR);
}

static void rows_pass_any(const Fp8GemmParams& p, const float* xf, int64_t xs, int64_t n0, int mb,
                          float* tot) {
  switch (mb) {
    case 1: rows_pass<1>(p, xf, xs, n0, tot); break;
#if defined(CPU_CAPABILITY_AVX512)
    case 2: rows_pass<2>(p, xf, xs, n0, tot); break;
    case 3: rows_pass<3>(p, xf, xs, n0, tot); break;
    default: rows_pass<4>(p, xf, xs, n0, tot); break;
#else
    default: rows_pass<2>(p, xf, xs, n0, tot); break;
#endif
  }
}

// x rows [m0, m0 + mt) -> fp32 [mt, xs], zero padded past K (W8A8: e4m3 code * row scale).
template <typename T>
static void convert_x(const Fp8GemmParams& p, int64_t m0, int64_t mt, int64_t xs, float* xf) {
  at::parallel_for(0, mt, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* dst = xf + i * xs;
      if (p.x_scale != nullptr) {
        const uint8_t* src = static_cast<const uint8_t*>(p.x) + (m0 + i) * p.x_stride;
        const float s = p.x_scale[m0 + i];
        for (int64_t k = 0; k < p.k; ++k) dst[k] = e4m3_to_float(src[k]) * s;
      } else {
        const T* src = static_cast<const T*>(p.x) + (m0 + i) * p.x_stride;
        int64_t k = 0;
        for (; k + kVec <= p.k; k += kVec) load_f(src + k).store(dst + k);
        for (; k < p.k; ++k) dst[k] = to_f(src[k]);
      }
      std::fill(dst + p.k, dst + xs, 0.f);
    }
  });
}

template <typename TOut>
static void fp8_gemm_tiles(const Fp8GemmParams& p) {
  TOut* out = static_cast<TOut*>(p.out);
  const TOut* bias = static_cast<const TOut*>(p.bias);
  const int64_t xs = (p.k + kVec - 1) / kVec * kVec;
  const int64_t blocks = (p.n + kR - 1) / kR;
  std::vector<float> xf(std::min(p.m, kMTile) * xs);
  for (int64_t m0 = 0; m0 < p.m; m0 += kMTile) {
    const int64_t mt = std::min(kMTile, p.m - m0);
    OCTAVO_CPU_DTYPE_SWITCH(p.x_dtype, [&] { convert_x<scalar_t>(p, m0, mt, xs, xf.data()); });
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float tot[kMB * kR];
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n0 = b * kR;
        const int valid = static_cast<int>(std::min<int64_t>(kR, p.n - n0));
        for (int64_t i = 0; i < mt; i += kMB) {
          const int mb = static_cast<int>(std::min<int64_t>(kMB, mt - i));
          rows_pass_any(p, xf.data() + i * xs, xs, n0, mb, tot);
          for (int m = 0; m < mb; ++m) {
            TOut* o = out + (m0 + i + m) * p.out_stride + n0;
            for (int r = 0; r < valid; ++r)
              o[r] = from_f<TOut>(tot[m * kR + r] + (bias ? to_f(bias[n0 + r]) : 0.f));
          }
        }
      }
    });
  }
}

void fp8_gemm_kernel(const Fp8GemmParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.out_dtype, [&] { fp8_gemm_tiles<scalar_t>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(fp8_gemm_kernel, Fp8GemmParams)

namespace octavo {

static bool is_fp8_bytes(const at::Tensor& t) {
  return t.scalar_type() == at::kByte || t.scalar_type() == at::kFloat8_e4m3fn;
}

void fp8_gemm_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                  const at::Tensor& scale, int64_t block_n, int64_t block_k,
                  const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& bias) {
  OCTAVO_CHECK_CPU(out);
  OCTAVO_CHECK_CPU(x);
  OCTAVO_CHECK_CPU(weight);
  OCTAVO_CHECK_CPU(scale);
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && weight.dim() == 2 && out.size(0) == x.size(0) &&
                  weight.size(1) == x.size(1) && out.size(1) == weight.size(0),
              "fp8_gemm: expected x [M, K], weight [N, K] and out [M, N], got ", x.sizes(), ", ",
              weight.sizes(), " and ", out.sizes());
  OCTAVO_CHECK_LAST_CONTIG(x);
  OCTAVO_CHECK_LAST_CONTIG(out);
  TORCH_CHECK(is_fp8_bytes(weight) && weight.is_contiguous(),
              "fp8_gemm: weight must be a contiguous float8_e4m3fn (or uint8) [N, K], got ",
              weight.scalar_type());
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(block_n > 0 && block_k > 0, "fp8_gemm: block_n and block_k must be positive");
  const int64_t nb = (n + block_n - 1) / block_n, kblocks = (k + block_k - 1) / block_k;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == nb &&
                  scale.size(1) == kblocks && scale.is_contiguous(),
              "fp8_gemm: scale must be a contiguous float32 [", nb, ", ", kblocks, "] (blocks of ",
              block_n, " x ", block_k, "), got ", scale.scalar_type(), " ", scale.sizes());
  const cpu::DType out_dtype = cpu::to_dtype(out, "fp8_gemm");
  cpu::DType x_dtype = out_dtype;
  if (x_scale.has_value()) {
    OCTAVO_CHECK_CPU(*x_scale);
    TORCH_CHECK(is_fp8_bytes(x), "fp8_gemm: with x_scale, x must hold e4m3 codes, got ",
                x.scalar_type());
    TORCH_CHECK(x_scale->scalar_type() == at::kFloat && x_scale->dim() == 1 &&
                    x_scale->size(0) == m && x_scale->is_contiguous(),
                "fp8_gemm: x_scale must be a contiguous float32 [", m, "], got ", x_scale->sizes());
  } else {
    OCTAVO_CHECK_SAME_DTYPE(x, out);
  }
  if (bias.has_value()) {
    OCTAVO_CHECK_CPU(*bias);
    OCTAVO_CHECK_SAME_DTYPE(out, *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
                "fp8_gemm: bias must be a contiguous [", n, "], got ", bias->sizes());
  }
  if (m == 0 || n == 0) return;
  if (k == 0) {
    out.zero_();
    if (bias.has_value()) out.add_(*bias);
    return;
  }
  cpu::Fp8GemmParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.x_scale = x_scale.has_value() ? x_scale->data_ptr<float>() : nullptr;
  p.w = static_cast<const uint8_t*>(weight.data_ptr());
  p.scale = scale.data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.m = m;
  p.n = n;
  p.k = k;
  p.block_n = block_n;
  p.block_k = block_k;
  p.kblocks = kblocks;
  p.x_dtype = x_dtype;
  p.out_dtype = out_dtype;
  OCTAVO_CALL_CPU_KERNEL(fp8_gemm_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
