// Fused MoE over weight-only int8 experts on CPU: gate_up -> act-and-mul -> down -> weighted sum
// over top-k, W = code * scale + offset per (output, group of K). GGUF Q8_0 / Q5_K / Q6_K expert
// stacks (and 4-bit ones sharing a layer with them) keep their codes and exact scales this way.
// Each expert's weights are packed once by ops_native.prepare_moe_int8_weights in the dense
// weight-only int8 layout (int8_gemm.cpp): 16-output panels, codes [K, 16], scales then offsets
// per group [G, 2, 16]. Codes are sign-extended and converted to fp32 in registers and FMA'd
// against fp32 copies of the rows; the offsets enter once per group through the rows' group sums.
// Work is split over (expert, panel) so both threads stream weights even for one token.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/cpu_types.h"
#include "cpu/moe_act.h"

namespace octavo::cpu {

struct MoeInt8Params {
  void* out;                  // [T, H], row stride out_stride
  const void* hidden;         // [T, H], row stride hidden_stride
  const int8_t* w13;          // [E, 2 * ceil(I/16), H, 16]: gate panels, then up panels
  const float* w13_so;        // [E, 2 * ceil(I/16), G13, 2, 16]: scales, then offsets
  const int8_t* w2;           // [E, ceil(H/16), I, 16]
  const float* w2_so;         // [E, ceil(H/16), G2, 2, 16]
  const float* topk_weights;  // [T * top_k]
  const int32_t* topk_ids;    // [T * top_k], each in [0, E)
  int64_t out_stride, hidden_stride;
  int64_t num_tokens, hidden_size, inter_size, top_k, num_experts;
  int64_t gs13, groups13, gs2, groups2;  // group size (or the whole K) and count per K
  int act;                    // 0 silu, 1 gelu (erf), 2 gelu (tanh)
  DType dtype;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

constexpr int kP = 16;               // outputs per panel
constexpr int64_t kChunk = 1024;     // tokens per pass: bounds the scratch buffers
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMB = 8;               // rows per pass over a panel: one zmm accumulator each
#else
constexpr int kMB = 4;               // AVX2: two ymm accumulators per row
#endif

struct Panel {
  const int8_t* qw;   // [k, 16]
  const float* sz;    // [groups, 2, 16]
  int64_t k, gs, groups;
};

// tot[m * 16 + j] = sum over groups of scale_j * (x_m . q_j) + offset_j * sum(x_m over the group).
template <int MB>
static void panel(const Panel& w, const float* const* x, const float* const* xsum, float* tot) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 t[MB];
  for (int m = 0; m < MB; ++m) t[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t k0 = g * w.gs, k1 = std::min(w.k, k0 + w.gs);
    // k in steps of 4 (one 64-byte line of codes, one prefetch); with fewer than 4 rows the
    // steps rotate over NA accumulators per row, so that 4+ FMA chains are in flight
    constexpr int NA = MB == 1 ? 4 : MB == 2 ? 2 : 1;
    __m512 a[NA][MB];
    for (int u = 0; u < NA; ++u)
      for (int m = 0; m < MB; ++m) a[u][m] = _mm512_setzero_ps();
    auto step = [&](int64_t k, __m512 (&acc)[MB]) __attribute__((always_inline)) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qw + k * kP))));
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m][k]), wv, acc[m]);
    };
    int64_t k = k0;
    for (; k + 3 < k1; k += 4) {
      __builtin_prefetch(w.qw + (k + 64) * kP, 0, 3);  // 1 KiB ahead
      step(k, a[0]);
      step(k + 1, a[1 % NA]);
      step(k + 2, a[2 % NA]);
      step(k + 3, a[3 % NA]);
    }
    for (; k < k1; ++k) step(k, a[0]);
    for (int u = 1; u < NA; ++u)
      for (int m = 0; m < MB; ++m) a[0][m] = _mm512_add_ps(a[0][m], a[u][m]);
    const float* s = w.sz + g * 2 * kP;
    const __m512 sc = _mm512_loadu_ps(s), of = _mm512_loadu_ps(s + kP);
    for (int m = 0; m < MB; ++m)
      t[m] = _mm512_fmadd_ps(a[0][m], sc, _mm512_fmadd_ps(_mm512_set1_ps(xsum[m][g]), of, t[m]));
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(tot + m * kP, t[m]);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 t[MB][2];
  for (int m = 0; m < MB; ++m) t[m][0] = t[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t k0 = g * w.gs, k1 = std::min(w.k, k0 + w.gs);
    constexpr int NA = MB <= 2 ? 2 : 1;
    __m256 a[NA][MB][2];
    for (int u = 0; u < NA; ++u)
      for (int m = 0; m < MB; ++m) a[u][m][0] = a[u][m][1] = _mm256_setzero_ps();
    auto step = [&](int64_t k, __m256 (&acc)[MB][2]) __attribute__((always_inline)) {
      const int8_t* b = w.qw + k * kP;
      __builtin_prefetch(b + 64 * kP, 0, 3);
      const __m256 w0 = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
      const __m256 w1 = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8))));
      for (int m = 0; m < MB; ++m) {
        const __m256 xb = _mm256_broadcast_ss(x[m] + k);
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
    const float* s = w.sz + g * 2 * kP;
    const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
    const __m256 o0 = _mm256_loadu_ps(s + kP), o1 = _mm256_loadu_ps(s + kP + 8);
    for (int m = 0; m < MB; ++m) {
      const __m256 xs = _mm256_set1_ps(xsum[m][g]);
      t[m][0] = _mm256_fmadd_ps(a[0][m][0], s0, _mm256_fmadd_ps(xs, o0, t[m][0]));
      t[m][1] = _mm256_fmadd_ps(a[0][m][1], s1, _mm256_fmadd_ps(xs, o1, t[m][1]));
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm256_storeu_ps(tot + m * kP, t[m][0]);
    _mm256_storeu_ps(tot + m * kP + 8, t[m][1]);
  }
#else
  // any CPU: fp32 math over contiguous lanes, so that it vectorizes
  for (int i = 0; i < MB * kP; ++i) tot[i] = 0.f;
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t k0 = g * w.gs, k1 = std::min(w.k, k0 + w.gs);
    alignas(64) float acc[MB][kP] = {};
    for (int64_t k = k0; k < k1; ++k) {
      alignas(64) float wf[kP];
      for (int j = 0; j < kP; ++j) wf[j] = static_cast<float>(w.qw[k * kP + j]);
      for (int m = 0; m < MB; ++m) {
        const float xv = x[m][k];
        for (int j = 0; j < kP; ++j) acc[m][j] += xv * wf[j];
      }
    }
    const float* s = w.sz + g * 2 * kP;
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < kP; ++j) tot[m * kP + j] += acc[m][j] * s[j] + xsum[m][g] * s[kP + j];
  }
#endif
}

static void panel_rows(const Panel& w, const float* const* x, const float* const* xsum, int mb,
                       float* tot) {
  switch (mb) {
    case 1: panel<1>(w, x, xsum, tot); break;
    case 2: panel<2>(w, x, xsum, tot); break;
    case 3: panel<3>(w, x, xsum, tot); break;
#if defined(CPU_CAPABILITY_AVX512)
    case 4: panel<4>(w, x, xsum, tot); break;
    case 5: panel<5>(w, x, xsum, tot); break;
    case 6: panel<6>(w, x, xsum, tot); break;
    case 7: panel<7>(w, x, xsum, tot); break;
    default: panel<8>(w, x, xsum, tot); break;
#else
    default: panel<4>(w, x, xsum, tot); break;
#endif
  }
}

// rows [r0, r1) of buf [*, k] -> their sums over each group of gs columns
static void group_sums(const float* buf, int64_t k, int64_t r0, int64_t r1, int64_t gs,
                       int64_t groups, float* sums) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = buf + r * k;
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0.f;
      for (int64_t c = g * gs; c < std::min(k, (g + 1) * gs); ++c) acc += row[c];
      sums[r * groups + g] = acc;
    }
  }
}

// One pass over tokens [t0, t1).
template <typename T>
static void moe_int8_chunk(const MoeInt8Params& p, int64_t t0, int64_t t1) {
  const int64_t h = p.hidden_size, i = p.inter_size, k = p.top_k, e_count = p.num_experts;
  const int64_t nt = t1 - t0, pairs = nt * k;
  const int64_t pi = (i + kP - 1) / kP, ph = (h + kP - 1) / kP;
  const int64_t bytes13 = h * kP, bytes2 = i * kP;
  const int64_t so13 = p.groups13 * 2 * kP, so2 = p.groups2 * 2 * kP;

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

  // the chunk's hidden rows in fp32 and their group sums
  std::vector<float> xin(nt * h), xs13(nt * p.groups13);
  const T* hidden = static_cast<const T*>(p.hidden);
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t c = 0; c < h; ++c) xin[t * h + c] = to_f(hidden[(t0 + t) * p.hidden_stride + c]);
  group_sums(xin.data(), h, 0, nt, p.gs13, p.groups13, xs13.data());

  // 1. inter[pos, 16q..] = act(gate) * up, pos = the pair's place in expert order
  std::vector<float> inter(pairs * i);
  at::parallel_for(0, na * pi, 1, [&](int64_t b, int64_t end) {
    alignas(64) float g[kMB * kP], u[kMB * kP];
    const float* rows[kMB];
    const float* sums[kMB];
    for (int64_t task = b; task < end; ++task) {
      const int64_t e = active[task / pi], q = task % pi;
      const Panel gate{p.w13 + (e * 2 * pi + q) * bytes13, p.w13_so + (e * 2 * pi + q) * so13, h,
                       p.gs13, p.groups13};
      const Panel up{gate.qw + pi * bytes13, gate.sz + pi * so13, h, p.gs13, p.groups13};
      const int valid = static_cast<int>(std::min<int64_t>(kP, i - q * kP));
      for (int64_t c0 = start[e]; c0 < start[e + 1]; c0 += kMB) {
        const int mb = static_cast<int>(std::min<int64_t>(kMB, start[e + 1] - c0));
        for (int r = 0; r < mb; ++r) {
          const int64_t tok = order[c0 + r] / k;
          rows[r] = xin.data() + tok * h;
          sums[r] = xs13.data() + tok * p.groups13;
        }
        panel_rows(gate, rows, sums, mb, g);
        panel_rows(up, rows, sums, mb, u);
        for (int r = 0; r < mb; ++r) {
          float* dst = inter.data() + (c0 + r) * i + q * kP;
          for (int j = 0; j < valid; ++j) dst[j] = activate(g[r * kP + j], p.act) * u[r * kP + j];
        }
      }
    }
  });
  std::vector<float> xs2(pairs * p.groups2);
  at::parallel_for(0, pairs, std::max<int64_t>(1, 16384 / i), [&](int64_t b, int64_t end) {
    group_sums(inter.data(), i, b, end, p.gs2, p.groups2, xs2.data());
  });

  // 2. out[t, 16q..] = sum over the active experts of weight * (w2[e] panel q @ inter): tasks
  //    own output columns, so the sums need no atomics and run in expert order
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, ph, 1, [&](int64_t b, int64_t end) {
    alignas(64) float y[kMB * kP];
    std::vector<float> acc(nt * kP);
    const float* rows[kMB];
    const float* sums[kMB];
    for (int64_t q = b; q < end; ++q) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const int valid = static_cast<int>(std::min<int64_t>(kP, h - q * kP));
      for (const int64_t e : active) {
        const Panel down{p.w2 + (e * ph + q) * bytes2, p.w2_so + (e * ph + q) * so2, i, p.gs2,
                         p.groups2};
        for (int64_t c0 = start[e]; c0 < start[e + 1]; c0 += kMB) {
          const int mb = static_cast<int>(std::min<int64_t>(kMB, start[e + 1] - c0));
          for (int r = 0; r < mb; ++r) {
            rows[r] = inter.data() + (c0 + r) * i;
            sums[r] = xs2.data() + (c0 + r) * p.groups2;
          }
          panel_rows(down, rows, sums, mb, y);
          for (int r = 0; r < mb; ++r) {
            const int64_t pair = order[c0 + r];
            const float wgt = p.topk_weights[t0 * k + pair];
            float* dst = acc.data() + (pair / k) * kP;
            for (int j = 0; j < valid; ++j) dst[j] += wgt * y[r * kP + j];
          }
        }
      }
      for (int64_t t = 0; t < nt; ++t) {
        T* o = out + (t0 + t) * p.out_stride + q * kP;
        for (int j = 0; j < valid; ++j) o[j] = from_f<T>(acc[t * kP + j]);
      }
    }
  });
}

void fused_moe_int8_kernel(const MoeInt8Params& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] {
    for (int64_t t0 = 0; t0 < p.num_tokens; t0 += kChunk)
      moe_int8_chunk<scalar_t>(p, t0, std::min(p.num_tokens, t0 + kChunk));
  });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <string>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "cpu/moe_checks.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(fused_moe_int8_kernel, MoeInt8Params)

namespace octavo {
namespace {

void check_int8_stack(const at::Tensor& packed, const at::Tensor& so, int64_t e, int64_t panels,
                      int64_t k, int64_t groups, const char* name) {
  OCTAVO_CHECK_CPU(packed);
  OCTAVO_CHECK_CPU(so);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(0) == e &&
                  packed.size(1) == panels && packed.size(2) == k && packed.size(3) == 16 &&
                  packed.is_contiguous(),
              "fused_moe_int8: ", name, "_packed must be a contiguous int8 [", e, ", ", panels, ", ",
              k, ", 16] (ops_native.prepare_moe_int8_weights), got ", packed.scalar_type(), " ",
              packed.sizes());
  TORCH_CHECK(so.scalar_type() == at::kFloat && so.dim() == 5 && so.size(0) == e &&
                  so.size(1) == panels && so.size(2) == groups && so.size(3) == 2 &&
                  so.size(4) == 16 && so.is_contiguous(),
              "fused_moe_int8: ", name, "_scales_offsets must be a contiguous float32 [", e, ", ",
              panels, ", ", groups, ", 2, 16], got ", so.scalar_type(), " ", so.sizes());
}

int64_t resolve_group(int64_t group_size, int64_t k, const char* name) {
  TORCH_CHECK(group_size == -1 || group_size > 0, "fused_moe_int8: ", name,
              " must be positive or -1, got ", group_size);
  return group_size == -1 ? std::max<int64_t>(k, 1) : group_size;
}

}  // namespace

void fused_moe_int8_packed_cpu(at::Tensor& out, const at::Tensor& hidden,
                               const at::Tensor& w13_packed, const at::Tensor& w2_packed,
                               const at::Tensor& w13_scales_offsets,
                               const at::Tensor& w2_scales_offsets, const at::Tensor& topk_weights,
                               const at::Tensor& topk_ids, int64_t inter_size,
                               int64_t group_size13, int64_t group_size2,
                               const std::string& activation) {
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&out, &hidden, &topk_weights, &topk_ids})
    OCTAVO_CHECK_CPU(*x);
  TORCH_CHECK(hidden.dim() == 2 && out.sizes() == hidden.sizes(),
              "fused_moe_int8: hidden and out must be [T, H], got ", hidden.sizes(), " and ",
              out.sizes());
  OCTAVO_CHECK_SAME_DTYPE(hidden, out);
  OCTAVO_CHECK_LAST_CONTIG(hidden);
  OCTAVO_CHECK_LAST_CONTIG(out);
  const int64_t t = hidden.size(0), h = hidden.size(1), i = inter_size;
  TORCH_CHECK(i > 0 && h > 0, "fused_moe_int8: hidden and inter sizes must be positive");
  TORCH_CHECK(w13_packed.dim() == 4, "fused_moe_int8: w13_packed must be [E, 2 * ceil(I/16), H, 16]");
  const int64_t e = w13_packed.size(0);
  const int64_t gs13 = resolve_group(group_size13, h, "group_size13");
  const int64_t gs2 = resolve_group(group_size2, i, "group_size2");
  const int64_t g13 = (h + gs13 - 1) / gs13, g2 = (i + gs2 - 1) / gs2;
  check_int8_stack(w13_packed, w13_scales_offsets, e, 2 * ((i + 15) / 16), h, g13, "w13");
  check_int8_stack(w2_packed, w2_scales_offsets, e, (h + 15) / 16, i, g2, "w2");
  cpu::check_moe_routing(topk_ids, topk_weights, t, "fused_moe_int8");
  const int act = cpu::moe_activation_kind(activation, "fused_moe_int8");
  const cpu::DType dtype = cpu::to_dtype(hidden, "fused_moe_int8");
  if (t == 0) return;
  const int64_t k = topk_ids.size(1);
  if (k == 0) {
    out.zero_();
    return;
  }
  cpu::check_expert_ids(topk_ids, e, "fused_moe_int8");
  cpu::MoeInt8Params p{};
  p.out = out.data_ptr();
  p.hidden = hidden.data_ptr();
  p.w13 = w13_packed.data_ptr<int8_t>();
  p.w13_so = w13_scales_offsets.data_ptr<float>();
  p.w2 = w2_packed.data_ptr<int8_t>();
  p.w2_so = w2_scales_offsets.data_ptr<float>();
  p.topk_weights = topk_weights.data_ptr<float>();
  p.topk_ids = topk_ids.data_ptr<int32_t>();
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
  OCTAVO_CALL_CPU_KERNEL(fused_moe_int8_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
