// Rotary position embedding on CPU (neox and GPT-J styles, partial rotary), in place on
// query/key views with a unit last stride and any token/head strides.
#include <ATen/Parallel.h>

#include <atomic>

#include "cpu/cpu_types.h"

namespace octavo::cpu::CPU_CAPABILITY {

// Rotates one head in place; cos/sin hold half = rot_dim / 2 floats.
template <typename T>
static void rotate_head(T* x, const float* cos, const float* sin, int half, bool is_neox) {
  if (is_neox) {
    int i = 0;
    for (; i + kVec <= half; i += kVec) {
      const fVec x1 = load_f(x + i), x2 = load_f(x + half + i);
      const fVec c = fVec::loadu(cos + i), s = fVec::loadu(sin + i);
      store_f(x + i, x1 * c - x2 * s);
      store_f(x + half + i, x2 * c + x1 * s);
    }
    for (; i < half; ++i) {
      const float x1 = to_f(x[i]), x2 = to_f(x[half + i]);
      x[i] = from_f<T>(x1 * cos[i] - x2 * sin[i]);
      x[half + i] = from_f<T>(x2 * cos[i] + x1 * sin[i]);
    }
  } else {
    for (int i = 0; i < half; ++i) {
      const float x1 = to_f(x[2 * i]), x2 = to_f(x[2 * i + 1]);
      x[2 * i] = from_f<T>(x1 * cos[i] - x2 * sin[i]);
      x[2 * i + 1] = from_f<T>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

template <typename T, typename C>
static void rotary_impl(const RotaryParams& p, std::atomic<bool>& bad_position) {
  const int half = p.rot_dim / 2;
  const int64_t grain = std::max<int64_t>(1, 64 / (p.num_q_heads + p.num_k_heads));
  at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float cos[512], sin[512];  // half <= 512 is checked by the launcher
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pos = p.positions[t];
      if (pos < 0 || pos >= p.max_pos) {
        bad_position = true;
        continue;
      }
      const C* cs = static_cast<const C*>(p.cos_sin) + pos * p.cos_sin_stride;
      for (int i = 0; i < half; ++i) {
        cos[i] = to_f(cs[i]);
        sin[i] = to_f(cs[half + i]);
      }
      T* q = static_cast<T*>(p.query) + t * p.q_stride_token;
      for (int h = 0; h < p.num_q_heads; ++h) rotate_head(q + h * p.q_stride_head, cos, sin, half, p.is_neox);
      if (p.key != nullptr) {
        T* k = static_cast<T*>(p.key) + t * p.k_stride_token;
        for (int h = 0; h < p.num_k_heads; ++h) rotate_head(k + h * p.k_stride_head, cos, sin, half, p.is_neox);
      }
    }
  });
}

bool rotary_embedding_kernel(const RotaryParams& p) {
  std::atomic<bool> bad_position{false};
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] {
    if (p.cos_sin_is_float) {
      rotary_impl<scalar_t, float>(p, bad_position);
    } else {
      rotary_impl<scalar_t, scalar_t>(p, bad_position);
    }
  });
  return !bad_position.load();
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

namespace octavo::cpu::DEFAULT { bool rotary_embedding_kernel(const RotaryParams&); }
#if defined(OCTAVO_CPU_X86)
namespace octavo::cpu::AVX2 { bool rotary_embedding_kernel(const RotaryParams&); }
namespace octavo::cpu::AVX512 { bool rotary_embedding_kernel(const RotaryParams&); }
#endif

namespace octavo {

// Views t ([T, H*hd] or [T, H, hd]) as (token stride, head stride, num heads).
static void head_layout(const at::Tensor& t, int64_t num_tokens, int64_t head_size,
                        const char* name, int64_t& s_tok, int64_t& s_head, int& heads) {
  OCTAVO_CHECK_CPU(t);
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "rotary_embedding: ", name,
              " must be [T, H*head_size] or [T, H, head_size], got ", t.sizes());
  TORCH_CHECK(t.size(0) == num_tokens, "rotary_embedding: ", name, " has ", t.size(0),
              " tokens, positions has ", num_tokens);
  OCTAVO_CHECK_LAST_CONTIG(t);
  s_tok = t.stride(0);
  if (t.dim() == 2) {
    TORCH_CHECK(t.size(1) % head_size == 0, "rotary_embedding: ", name, " last dim ", t.size(1),
                " is not a multiple of head_size ", head_size);
    heads = static_cast<int>(t.size(1) / head_size);
    s_head = head_size;
  } else {
    TORCH_CHECK(t.size(2) == head_size, "rotary_embedding: ", name, " head dim ", t.size(2),
                " != head_size ", head_size);
    heads = static_cast<int>(t.size(1));
    s_head = t.stride(1);
  }
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query,
                          const std::optional<at::Tensor>& key, int64_t head_size,
                          const at::Tensor& cos_sin_cache, bool is_neox) {
  OCTAVO_CHECK_CPU(positions);
  OCTAVO_CHECK_CPU(cos_sin_cache);
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong,
              "rotary_embedding: positions must be a 1-D int64 tensor");
  TORCH_CHECK(positions.is_contiguous(), "rotary_embedding: positions must be contiguous");
  TORCH_CHECK(cos_sin_cache.dim() == 2, "rotary_embedding: cos_sin_cache must be [max_pos, rot_dim]");
  OCTAVO_CHECK_LAST_CONTIG(cos_sin_cache);
  const int64_t rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rot_dim % 2 == 0 && rot_dim <= head_size && rot_dim <= 1024,
              "rotary_embedding: rot_dim ", rot_dim, " must be even and <= head_size ", head_size);
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat ||
                  cos_sin_cache.scalar_type() == query.scalar_type(),
              "rotary_embedding: cos_sin_cache must be float32 or the query dtype");
  cpu::RotaryParams p{};
  p.num_tokens = positions.size(0);
  head_layout(query, p.num_tokens, head_size, "query", p.q_stride_token, p.q_stride_head,
              p.num_q_heads);
  if (key.has_value()) {
    OCTAVO_CHECK_SAME_DTYPE(query, (*key));
    head_layout(*key, p.num_tokens, head_size, "key", p.k_stride_token, p.k_stride_head,
                p.num_k_heads);
    p.key = key->data_ptr();
  }
  p.positions = positions.data_ptr<int64_t>();
  p.query = query.data_ptr();
  p.cos_sin = cos_sin_cache.data_ptr();
  p.cos_sin_stride = cos_sin_cache.stride(0);
  p.max_pos = cos_sin_cache.size(0);
  p.head_size = static_cast<int>(head_size);
  p.rot_dim = static_cast<int>(rot_dim);
  p.is_neox = is_neox;
  p.cos_sin_is_float = cos_sin_cache.scalar_type() == at::kFloat;
  p.dtype = cpu::to_dtype(query, "rotary_embedding");
  bool ok = true;
  switch (cpu::cpu_capability()) {
#if defined(OCTAVO_CPU_X86)
    case cpu::Capability::kAvx512: ok = cpu::AVX512::rotary_embedding_kernel(p); break;
    case cpu::Capability::kAvx2: ok = cpu::AVX2::rotary_embedding_kernel(p); break;
#endif
    default: ok = cpu::DEFAULT::rotary_embedding_kernel(p); break;
  }
  TORCH_CHECK(ok, "rotary_embedding: a position is outside [0, ", p.max_pos, ")");
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
