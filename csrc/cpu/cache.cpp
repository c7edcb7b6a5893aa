// reshape_and_cache on CPU: scatter each token's K/V heads into its cache slot (-1 = skip).
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_types.h"
#include "cpu/fp8_kv.h"

namespace octavo::cpu::CPU_CAPABILITY {

// n values to fp8 KV bytes (fp8_kv.h); on AVX-512 16 at a time, the same bit operations as
// fp8_kv_encode with the special ranges as masked moves (the scalar loop did not vectorize:
// a 2040-token prefill's cache writes took ~6x the bf16 copy).
template <typename T>
static void encode_fp8(uint8_t* dst, const T* src, int n, float scale) {
  int i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), half = _mm512_set1_epi32(0x7ffff);
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(120 << 3);
  for (; i + kVec <= n; i += kVec) {
    __m512 f = static_cast<__m512>(load_f(src + i));
    if (scale != 1.f) f = _mm512_div_ps(f, vscale);
    const __m512i x = _mm512_castps_si512(f);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(x, 24), _mm512_set1_epi32(0x80));
    const __m512i u = _mm512_and_si512(x, abs_mask);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 20), one);
    __m512i mag = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half), lsb), 20), bias);
    mag = _mm512_mask_mov_epi32(mag, _mm512_cmplt_epu32_mask(u, _mm512_set1_epi32(0x3c800000)), _mm512_set1_epi32(0x08));
    mag = _mm512_mask_mov_epi32(mag, _mm512_cmplt_epu32_mask(u, _mm512_set1_epi32(0x3c000000)), _mm512_setzero_si512());
    mag = _mm512_mask_mov_epi32(mag, _mm512_cmpge_epu32_mask(u, _mm512_set1_epi32(0x43e00000)), _mm512_set1_epi32(0x7e));
    mag = _mm512_mask_mov_epi32(mag, _mm512_cmpgt_epu32_mask(u, _mm512_set1_epi32(0x7f800000)), _mm512_set1_epi32(0x7f));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtepi32_epi8(_mm512_or_si512(mag, sign)));
  }
#endif
  for (; i < n; ++i) dst[i] = fp8_kv_encode(scale != 1.f ? static_cast<float>(src[i]) / scale : static_cast<float>(src[i]));
}

// n values of a key/value row into a cache of element type C: copied (C = T) or divided by scale
// (in fp32) and rounded to fp8 KV bytes (C = uint8_t).
template <typename T, typename C>
static void write_values(C* dst, const T* src, int n, float scale) {
  if constexpr (std::is_same_v<C, T>) std::memcpy(dst, src, sizeof(T) * n);
  else encode_fp8(dst, src, n, scale);
}

template <typename T, typename C>
static void write_heads(C* dst, int64_t dst_head_stride, const T* src, int64_t src_head_stride,
                        int heads, int head_size, float scale) {
  if (dst_head_stride == head_size && src_head_stride == head_size) {
    write_values(dst, src, heads * head_size, scale);
    return;
  }
  for (int h = 0; h < heads; ++h)
    write_values(dst + h * dst_head_stride, src + h * src_head_stride, head_size, scale);
}

template <typename T, typename C>
static bool cache_impl(const CacheParams& p) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, p.num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = p.slot_mapping[t];
      if (slot < 0) continue;
      if (slot >= p.num_slots) {
        ok = false;
        continue;
      }
      const int64_t block = slot / p.block_size, off = slot % p.block_size;
      write_heads(static_cast<C*>(p.key_cache) + block * p.kc_stride_block + off * p.kc_stride_token,
                  p.kc_stride_head, static_cast<const T*>(p.key) + t * p.k_stride_token,
                  p.k_stride_head, p.num_kv_heads, p.head_size, p.k_scale);
      write_heads(static_cast<C*>(p.value_cache) + block * p.vc_stride_block + off * p.vc_stride_token,
                  p.vc_stride_head, static_cast<const T*>(p.value) + t * p.v_stride_token,
                  p.v_stride_head, p.num_kv_heads, p.head_size, p.v_scale);
    }
  });
  return ok.load();
}

void reshape_and_cache_kernel(const CacheParams& p) {
  bool ok = true;
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] {
    ok = p.cache_fp8 ? cache_impl<scalar_t, uint8_t>(p) : cache_impl<scalar_t, scalar_t>(p);
  });
  *p.ok = ok;
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(reshape_and_cache_kernel, CacheParams)

namespace octavo {

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping, double k_scale,
                           double v_scale) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&key, &value, &key_cache, &value_cache, &slot_mapping})
    TORCH_CHECK(t->device().is_cpu(), "reshape_and_cache: all tensors must be on the CPU");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(),
              "reshape_and_cache: key/value must be [T, Hk, hd], got ", key.sizes(), " and ",
              value.sizes());
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "reshape_and_cache: caches must be [num_blocks, block_size, Hk, hd], got ",
              key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
              "reshape_and_cache: cache heads/head size ", key_cache.sizes(),
              " do not match key ", key.sizes());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "reshape_and_cache: slot_mapping must be a contiguous [T] int64 tensor");
  OCTAVO_CHECK_SAME_DTYPE(key, value);
  OCTAVO_CHECK_SAME_DTYPE(key_cache, value_cache);
  // fp8 caches (kv_cache_dtype="fp8") take keys/values of any float dtype, quantized on write
  const bool fp8 = key_cache.scalar_type() == at::kFloat8_e4m3fn;
  if (!fp8) OCTAVO_CHECK_SAME_DTYPE(key, key_cache);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&key, &value, &key_cache, &value_cache})
    TORCH_CHECK(t->size(-1) <= 1 || t->stride(-1) == 1,
                "reshape_and_cache: tensors must have a unit last stride");
  cpu::CacheParams p{};
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.k_stride_token = key.stride(0);
  p.k_stride_head = key.stride(1);
  p.v_stride_token = value.stride(0);
  p.v_stride_head = value.stride(1);
  p.kc_stride_block = key_cache.stride(0);
  p.kc_stride_token = key_cache.stride(1);
  p.kc_stride_head = key_cache.stride(2);
  p.vc_stride_block = value_cache.stride(0);
  p.vc_stride_token = value_cache.stride(1);
  p.vc_stride_head = value_cache.stride(2);
  p.num_tokens = key.size(0);
  p.num_slots = key_cache.size(0) * key_cache.size(1);
  p.num_kv_heads = static_cast<int>(key.size(1));
  p.head_size = static_cast<int>(key.size(2));
  p.block_size = static_cast<int>(key_cache.size(1));
  p.dtype = cpu::to_dtype(key, "reshape_and_cache");
  p.cache_fp8 = fp8;
  cpu::check_kv_scales(k_scale, v_scale, "reshape_and_cache");
  p.k_scale = static_cast<float>(fp8 ? k_scale : 1.0);
  p.v_scale = static_cast<float>(fp8 ? v_scale : 1.0);
  // the best build this CPU runs (fp8's rounding is vectorized; a copy is a memcpy in any build)
  bool ok = true;
  p.ok = &ok;
  OCTAVO_CALL_CPU_KERNEL(reshape_and_cache_kernel, p);
  TORCH_CHECK(ok, "reshape_and_cache: a slot is >= num_blocks * block_size = ", p.num_slots);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
