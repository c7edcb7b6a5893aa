// INT8 GEMMs on CPU, weights repacked once at load into 16-output panels (ops_native.pack_int8_*):
//  * int8_gemm (W8A8): out = sx[m] sw[n] (sum_k xq[m,k] wq[n,k] - azp[m] colsum[n]) + bias, with
//    xq the activations quantized per token here (or with a static scale), integer dot products
//    exact in int32 (AVX2: int8 widened to int16 pairs, vpmaddwd; exact for every int8 value,
//    -128 included, where vpmaddubsw would saturate).
//  * int8_woq_gemm (W8A16, weight-only): out = x @ W^T + bias, W[n,k] = q * scale + offset per
//    (n, group of K): GPTQ 8-bit, GGUF Q8_0 / Q5_K / Q6_K; codes widened to fp32 in registers.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_types.h"

namespace octavo::cpu {

struct Int8GemmParams {
  void* out;              // [M, N], row stride out_stride
  const int16_t* xq;      // [M, K2 * 2] quantized activations (int8 values), zero padded
  const float* xscale;    // [M]
  const int32_t* azp;     // [M] activation zero points
  const int8_t* qw;       // [P, K2, 16, 2] packed weight codes, P = ceil(N/16)
  const float* wscale;    // [N]
  const int32_t* colsum;  // [N] sum_k wq[n, k]
  const void* bias;       // [N] or null
  int64_t out_stride;
  int64_t m, n, k2;
  DType dtype;
};

struct Int8WoqParams {
  void* out;              // [M, N], row stride out_stride
  const float* x;         // [M, K] fp32 copy of the activations
  const float* xsum;      // [M, G] sum of each row of x over each group
  const int8_t* qw;       // [P, K, 16] packed codes
  const float* sz;        // [P, G, 2, 16]: scales, then offsets, of each panel's 16 outputs
  const void* bias;       // [N] or null
  int64_t out_stride;
  int64_t m, n, k, group_size, groups;
  DType dtype;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int kP = 16;  // outputs per panel
constexpr int kMB = 4;  // rows of x per pass over a panel (AVX2: 8 accumulators of 16 registers)

// ---- W8A8 ------------------------------------------------------------------------------------

// acc[m * 16 + j] = sum over K pairs of the int16 pair products (exact int32).
template <int MB>
static void w8a8_panel(const Int8GemmParams& p, int64_t pi, int64_t m0, int32_t* acc) {
  const int8_t* w = p.qw + pi * p.k2 * 2 * kP;
  const int64_t xs = p.k2 * 2;
  const int16_t* x = p.xq + m0 * xs;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  __m256i a[MB][2];
  for (int m = 0; m < MB; ++m) a[m][0] = a[m][1] = _mm256_setzero_si256();
  for (int64_t kk = 0; kk < p.k2; ++kk) {
    const int8_t* b = w + kk * 2 * kP;
    // bytes 2j+i: output j, k = 2kk+i -> int16 pairs of outputs 0..7 and 8..15
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    for (int m = 0; m < MB; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * xs + 2 * kk, 4);
      const __m256i xb = _mm256_set1_epi32(pair);
      a[m][0] = _mm256_add_epi32(a[m][0], _mm256_madd_epi16(w0, xb));
      a[m][1] = _mm256_add_epi32(a[m][1], _mm256_madd_epi16(w1, xb));
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + m * kP), a[m][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + m * kP + 8), a[m][1]);
  }
#else
  for (int i = 0; i < MB * kP; ++i) acc[i] = 0;
  for (int64_t kk = 0; kk < p.k2; ++kk) {
    const int8_t* b = w + kk * 2 * kP;
    for (int m = 0; m < MB; ++m) {
      const int32_t x0 = x[m * xs + 2 * kk], x1 = x[m * xs + 2 * kk + 1];
      int32_t* a = acc + m * kP;
      for (int j = 0; j < kP; ++j) a[j] += x0 * b[2 * j] + x1 * b[2 * j + 1];
    }
  }
#endif
}

static void w8a8_panel_any(const Int8GemmParams& p, int64_t pi, int64_t m0, int mb, int32_t* acc) {
  switch (mb) {
    case 1: w8a8_panel<1>(p, pi, m0, acc); break;
    case 2: w8a8_panel<2>(p, pi, m0, acc); break;
    case 3: w8a8_panel<3>(p, pi, m0, acc); break;
    default: w8a8_panel<4>(p, pi, m0, acc); break;
  }
}

template <typename T>
static void int8_gemm_impl(const Int8GemmParams& p) {
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t panels = (p.n + kP - 1) / kP;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[kMB * kP];
    for (int64_t pi = begin; pi < end; ++pi) {
      const int64_t n0 = pi * kP;
      const int valid = static_cast<int>(std::min<int64_t>(kP, p.n - n0));
      for (int64_t m0 = 0; m0 < p.m; m0 += kMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMB, p.m - m0));
        w8a8_panel_any(p, pi, m0, mb, acc);
        for (int m = 0; m < mb; ++m) {
          const int64_t r = m0 + m;
          const float sx = p.xscale[r];
          const int32_t z = p.azp[r];
          T* o = out + r * p.out_stride + n0;
          for (int j = 0; j < valid; ++j) {
            const int32_t v = acc[m * kP + j] - z * p.colsum[n0 + j];
            const float y = static_cast<float>(v) * (sx * p.wscale[n0 + j]);
            o[j] = from_f<T>(bias ? y + to_f(bias[n0 + j]) : y);
          }
        }
      }
    }
  });
}

void int8_gemm_kernel(const Int8GemmParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { int8_gemm_impl<scalar_t>(p); });
}

// ---- W8A16 (weight-only) ---------------------------------------------------------------------

// tot[m * 16 + j] = sum over groups of scale * (x . q) + offset * sum(x) for the panel's outputs.
template <int MB>
static void woq_panel(const Int8WoqParams& p, int64_t pi, int64_t m0, float* tot) {
  const int8_t* w = p.qw + pi * p.k * kP;
  const float* sz = p.sz + pi * p.groups * 2 * kP;
  const float* x = p.x + m0 * p.k;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // Codes sign-extended straight from memory (vpmovsxbd), group sums and the running totals
  // kept in registers: the scale / offset step is 2 FMAs per 8 outputs per group.
  __m256 t[MB][2];
  for (int m = 0; m < MB; ++m) t[m][0] = t[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group_size, k1 = std::min(p.k, k0 + p.group_size);
    // With 1-2 rows, even and odd k go to separate accumulators: 4+ independent FMA chains.
    constexpr int NA = MB <= 2 ? 2 : 1;
    __m256 a[NA][MB][2];
    for (int u = 0; u < NA; ++u)
      for (int m = 0; m < MB; ++m) a[u][m][0] = a[u][m][1] = _mm256_setzero_ps();
    auto step = [&](int64_t k, __m256 (&acc)[MB][2]) __attribute__((always_inline)) {
      const int8_t* b = w + k * kP;
      __builtin_prefetch(b + 64 * kP, 0, 3);  // 1 KiB ahead
      const __m256 w0 = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
      const __m256 w1 = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8))));
      for (int m = 0; m < MB; ++m) {
        const __m256 xb = _mm256_broadcast_ss(x + m * p.k + k);
        acc[m][0] = _mm256_fmadd_ps(xb, w0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(xb, w1, acc[m][1]);
      }
    };
    int64_t k = k0;
    if constexpr (NA == 2)
      for (; k + 1 < k1; k += 2) {
        step(k, a[0]);
        step(k + 1, a[NA - 1]);
      }
    for (; k < k1; ++k) step(k, a[0]);
    if constexpr (NA == 2)
      for (int m = 0; m < MB; ++m) {
        a[0][m][0] = _mm256_add_ps(a[0][m][0], a[1][m][0]);
        a[0][m][1] = _mm256_add_ps(a[0][m][1], a[1][m][1]);
      }
    const float* s = sz + g * 2 * kP;
    const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
    const __m256 o0 = _mm256_loadu_ps(s + kP), o1 = _mm256_loadu_ps(s + kP + 8);
    for (int m = 0; m < MB; ++m) {
      const __m256 xs = _mm256_set1_ps(p.xsum[(m0 + m) * p.groups + g]);
      t[m][0] = _mm256_fmadd_ps(a[0][m][0], s0, _mm256_fmadd_ps(xs, o0, t[m][0]));
      t[m][1] = _mm256_fmadd_ps(a[0][m][1], s1, _mm256_fmadd_ps(xs, o1, t[m][1]));
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm256_storeu_ps(tot + m * kP, t[m][0]);
    _mm256_storeu_ps(tot + m * kP + 8, t[m][1]);
  }
#else
  for (int i = 0; i < MB * kP; ++i) tot[i] = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group_size, k1 = std::min(p.k, k0 + p.group_size);
    alignas(64) float acc[MB][kP];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < kP; ++j) acc[m][j] = 0.f;
    for (int64_t k = k0; k < k1; ++k) {
      alignas(64) float wf[kP];
      for (int j = 0; j < kP; ++j) wf[j] = static_cast<float>(w[k * kP + j]);
      for (int m = 0; m < MB; ++m) {
        const float xv = x[m * p.k + k];
        for (int j = 0; j < kP; ++j) acc[m][j] += xv * wf[j];
      }
    }
    const float* s = sz + g * 2 * kP;
    for (int m = 0; m < MB; ++m) {
      const float xs = p.xsum[(m0 + m) * p.groups + g];
      for (int j = 0; j < kP; ++j) tot[m * kP + j] += acc[m][j] * s[j] + xs * s[kP + j];
    }
  }
#endif
}

static void woq_panel_any(const Int8WoqParams& p, int64_t pi, int64_t m0, int mb, float* tot) {
  switch (mb) {
    case 1: woq_panel<1>(p, pi, m0, tot); break;
    case 2: woq_panel<2>(p, pi, m0, tot); break;
    case 3: woq_panel<3>(p, pi, m0, tot); break;
    default: woq_panel<4>(p, pi, m0, tot); break;
  }
}

// Panels per parallel task: at least ~64 KiB of weights each, so a small matrix (a decode step's
// K/V projection) runs on one thread rather than paying an OpenMP wake-up comparable to its work.
static int64_t min_panels_per_task(int64_t panel_bytes) {
  return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, panel_bytes));
}

template <typename T>
static void int8_woq_impl(const Int8WoqParams& p) {
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t panels = (p.n + kP - 1) / kP;
  at::parallel_for(0, panels, min_panels_per_task(p.k * kP + p.groups * 2 * kP * 4),
                   [&](int64_t begin, int64_t end) {
    alignas(64) float tot[kMB * kP];
    for (int64_t pi = begin; pi < end; ++pi) {
      const int64_t n0 = pi * kP;
      const int valid = static_cast<int>(std::min<int64_t>(kP, p.n - n0));
      for (int64_t m0 = 0; m0 < p.m; m0 += kMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMB, p.m - m0));
        woq_panel_any(p, pi, m0, mb, tot);
        for (int m = 0; m < mb; ++m) {
          T* o = out + (m0 + m) * p.out_stride + n0;
          for (int j = 0; j < valid; ++j)
            o[j] = from_f<T>(tot[m * kP + j] + (bias ? to_f(bias[n0 + j]) : 0.f));
        }
      }
    }
  });
}

void int8_woq_gemm_kernel(const Int8WoqParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { int8_woq_impl<scalar_t>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(int8_gemm_kernel, Int8GemmParams)
OCTAVO_DECLARE_CPU_KERNEL(int8_woq_gemm_kernel, Int8WoqParams)

namespace octavo {
namespace {

// Row r of x as fp32 into dst[0..k).
void row_to_float(const at::Tensor& x, int64_t r, float* dst) {
  const int64_t k = x.size(1);
  const char* row = static_cast<const char*>(x.data_ptr()) + r * x.stride(0) * x.element_size();
  switch (x.scalar_type()) {
    case at::kFloat: std::memcpy(dst, row, k * sizeof(float)); break;
    case at::kBFloat16:
      for (int64_t i = 0; i < k; ++i) dst[i] = reinterpret_cast<const c10::BFloat16*>(row)[i];
      break;
    default:
      for (int64_t i = 0; i < k; ++i) dst[i] = reinterpret_cast<const c10::Half*>(row)[i];
      break;
  }
}

void check_out_x(const at::Tensor& out, const at::Tensor& x, const char* op) {
  OCTAVO_CHECK_CPU(out);
  OCTAVO_CHECK_CPU(x);
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0), op,
              ": expected x [M, K] and out [M, N], got ", x.sizes(), " and ", out.sizes());
  OCTAVO_CHECK_SAME_DTYPE(x, out);
  OCTAVO_CHECK_LAST_CONTIG(x);
  OCTAVO_CHECK_LAST_CONTIG(out);
  TORCH_CHECK(x.size(1) > 0, op, ": K must be positive");
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n, const char* op) {
  if (!bias.has_value()) return;
  OCTAVO_CHECK_CPU(*bias);
  OCTAVO_CHECK_SAME_DTYPE(x, *bias);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(), op,
              ": bias must be a contiguous [", n, "], got ", bias->sizes());
}

// Per-token quantization exactly as ops_native.int8_quantize_per_token (compiled with default
// flags: no FMA contraction, so the fp32 roundings are torch's). q is int16 [k2 * 2], padded.
void quantize_row(const float* xf, int64_t k, bool asym, float static_inv, float static_scale,
                  int32_t static_zp, bool is_static, int16_t* q, float* scale, int32_t* zp) {
  float inv, s;
  int32_t z = 0;
  if (is_static) {
    inv = static_inv;
    s = static_scale;
    z = static_zp;
  } else if (asym) {
    float mn = 0.f, mx = 0.f;
    for (int64_t i = 0; i < k; ++i) {
      mn = std::min(mn, xf[i]);
      mx = std::max(mx, xf[i]);
    }
    const float range = mx - mn;
    inv = range > 0.f ? 255.f / range : 0.f;
    s = range > 0.f ? range / 255.f : 1.f;
    const float zf = std::nearbyint(-128.f - mn * inv);
    z = static_cast<int32_t>(std::min(127.f, std::max(-128.f, zf)));
  } else {
    float amax = 0.f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(xf[i]));
    inv = amax > 0.f ? 127.f / amax : 0.f;
    s = amax > 0.f ? amax / 127.f : 1.f;
  }
  for (int64_t i = 0; i < k; ++i) {
    const float v = std::nearbyint(xf[i] * inv) + static_cast<float>(z);
    q[i] = static_cast<int16_t>(std::min(127.f, std::max(-128.f, v)));
  }
  *scale = s;
  *zp = z;
}

}  // namespace

void int8_gemm_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                   const at::Tensor& w_scales, const at::Tensor& w_colsum,
                   const std::optional<at::Tensor>& input_scale,
                   const std::optional<at::Tensor>& input_zero_point, bool asymmetric,
                   const std::optional<at::Tensor>& bias) {
  check_out_x(out, x, "int8_gemm");
  OCTAVO_CHECK_CPU(qweight);
  const int64_t n = out.size(1), k = x.size(1), panels = (n + 15) / 16, k2 = (k + 1) / 2;
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 4 &&
                  qweight.size(0) == panels && qweight.size(1) == k2 && qweight.size(2) == 16 &&
                  qweight.size(3) == 2 && qweight.is_contiguous(),
              "int8_gemm: qweight must be a contiguous int8 [", panels, ", ", k2,
              ", 16, 2] (ops_native.pack_int8_panels), got ", qweight.scalar_type(), " ",
              qweight.sizes());
  TORCH_CHECK(w_scales.device().is_cpu() && w_scales.scalar_type() == at::kFloat &&
                  w_scales.dim() == 1 && w_scales.size(0) == n && w_scales.is_contiguous(),
              "int8_gemm: w_scales must be a contiguous float32 [", n, "], got ",
              w_scales.scalar_type(), " ", w_scales.sizes());
  TORCH_CHECK(w_colsum.device().is_cpu() && w_colsum.scalar_type() == at::kInt &&
                  w_colsum.dim() == 1 && w_colsum.size(0) == n && w_colsum.is_contiguous(),
              "int8_gemm: w_colsum must be a contiguous int32 [", n, "], got ",
              w_colsum.scalar_type(), " ", w_colsum.sizes());
  TORCH_CHECK(!input_zero_point.has_value() || input_scale.has_value(),
              "int8_gemm: input_zero_point needs input_scale");
  float static_scale = 1.f, static_inv = 1.f;
  int32_t static_zp = 0;
  if (input_scale.has_value()) {
    TORCH_CHECK(input_scale->device().is_cpu() && input_scale->numel() == 1,
                "int8_gemm: input_scale must be one CPU value (per-tensor), got ", input_scale->sizes());
    static_scale = input_scale->to(at::kFloat).item<float>();
    TORCH_CHECK(static_scale > 0.f && std::isfinite(static_scale),
                "int8_gemm: input_scale must be positive and finite, got ", static_scale);
    static_inv = 1.f / static_scale;
    if (input_zero_point.has_value()) {
      TORCH_CHECK(input_zero_point->device().is_cpu() && input_zero_point->numel() == 1,
                  "int8_gemm: input_zero_point must be one CPU value, got ", input_zero_point->sizes());
      static_zp = static_cast<int32_t>(input_zero_point->to(at::kInt).item<int>());
    }
  }
  check_bias(bias, x, n, "int8_gemm");
  const int64_t m = x.size(0);
  if (m == 0 || n == 0) return;
  const cpu::DType dtype = cpu::to_dtype(x, "int8_gemm");
  std::vector<int16_t> xq(m * k2 * 2, 0);
  std::vector<float> xscale(m);
  std::vector<int32_t> azp(m);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(k);
    for (int64_t r = begin; r < end; ++r) {
      row_to_float(x, r, xf.data());
      quantize_row(xf.data(), k, asymmetric, static_inv, static_scale, static_zp,
                   input_scale.has_value(), xq.data() + r * k2 * 2, &xscale[r], &azp[r]);
    }
  });
  cpu::Int8GemmParams p{};
  p.out = out.data_ptr();
  p.xq = xq.data();
  p.xscale = xscale.data();
  p.azp = azp.data();
  p.qw = qweight.data_ptr<int8_t>();
  p.wscale = w_scales.data_ptr<float>();
  p.colsum = w_colsum.data_ptr<int32_t>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out_stride = out.stride(0);
  p.m = m;
  p.n = n;
  p.k2 = k2;
  p.dtype = dtype;
  OCTAVO_CALL_CPU_KERNEL(int8_gemm_kernel, p);
}

void int8_woq_gemm_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                       const at::Tensor& scales_offsets, int64_t group_size,
                       const std::optional<at::Tensor>& bias) {
  check_out_x(out, x, "int8_woq_gemm");
  OCTAVO_CHECK_CPU(qweight);
  OCTAVO_CHECK_CPU(scales_offsets);
  const int64_t n = out.size(1), k = x.size(1), panels = (n + 15) / 16;
  TORCH_CHECK(group_size > 0, "int8_woq_gemm: group_size must be positive, got ", group_size);
  const int64_t groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 3 &&
                  qweight.size(0) == panels && qweight.size(1) == k && qweight.size(2) == 16 &&
                  qweight.is_contiguous(),
              "int8_woq_gemm: qweight must be a contiguous int8 [", panels, ", ", k,
              ", 16] (ops_native.pack_int8_woq_panels), got ", qweight.scalar_type(), " ",
              qweight.sizes());
  TORCH_CHECK(scales_offsets.scalar_type() == at::kFloat && scales_offsets.dim() == 4 &&
                  scales_offsets.size(0) == panels && scales_offsets.size(1) == groups &&
                  scales_offsets.size(2) == 2 && scales_offsets.size(3) == 16 &&
                  scales_offsets.is_contiguous(),
              "int8_woq_gemm: scales_offsets must be a contiguous float32 [", panels, ", ", groups,
              ", 2, 16], got ", scales_offsets.scalar_type(), " ", scales_offsets.sizes());
  check_bias(bias, x, n, "int8_woq_gemm");
  const int64_t m = x.size(0);
  if (m == 0 || n == 0) return;
  const cpu::DType dtype = cpu::to_dtype(x, "int8_woq_gemm");
  std::vector<float> xf(m * k), xsum(m * groups, 0.f);
  for (int64_t r = 0; r < m; ++r) {
    row_to_float(x, r, xf.data() + r * k);
    for (int64_t i = 0; i < k; ++i) xsum[r * groups + i / group_size] += xf[r * k + i];
  }
  cpu::Int8WoqParams p{};
  p.out = out.data_ptr();
  p.x = xf.data();
  p.xsum = xsum.data();
  p.qw = qweight.data_ptr<int8_t>();
  p.sz = scales_offsets.data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out_stride = out.stride(0);
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  p.groups = groups;
  p.dtype = dtype;
  OCTAVO_CALL_CPU_KERNEL(int8_woq_gemm_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
