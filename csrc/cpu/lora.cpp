// Batched LoRA on CPU (punica's BGMV shape): each row of a batch uses its own adapter slot.
// shrink: out [T, R] fp32 = scale * w[idx[t]] @ x[t]; expand: out[t, off:off+N] += w[idx[t]] @ x[t].
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/cpu_types.h"

namespace octavo::cpu {

struct LoraShrinkParams {
  float* out;                // [T, R], row stride out_stride
  const void* x;             // [T, K], row stride x_stride
  const void* w;             // [L, R, K] contiguous
  const int64_t* indices;    // [T], -1: no adapter
  int64_t out_stride, x_stride;
  int64_t num_tokens, rank, k;
  float scale;
  DType dtype;
};

struct LoraExpandParams {
  void* out;                 // [T, N_total], row stride out_stride; columns [offset, offset+N)
  const float* x;            // [T, R], row stride x_stride
  const void* w;             // [L, N, R] contiguous
  const int64_t* indices;    // [T], -1: no adapter
  int64_t out_stride, x_stride;
  int64_t num_tokens, n, rank, offset;
  DType dtype;
};

}  // namespace octavo::cpu

namespace octavo::cpu::CPU_CAPABILITY {

// sum_i a[i] * b[i] in float32, a of type T, b of type U
template <typename T, typename U>
static inline float dot(const T* a, const U* b, int64_t n) {
  fVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * kVec <= n; i += 2 * kVec) {
    acc0 = at::vec::fmadd(load_f(a + i), load_f(b + i), acc0);
    acc1 = at::vec::fmadd(load_f(a + i + kVec), load_f(b + i + kVec), acc1);
  }
  for (; i + kVec <= n; i += kVec) acc0 = at::vec::fmadd(load_f(a + i), load_f(b + i), acc0);
  float s = hsum(acc0 + acc1);
  for (; i < n; ++i) s += to_f(a[i]) * to_f(b[i]);
  return s;
}

template <typename T>
static void lora_shrink_impl(const LoraShrinkParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  // one work item = (token, rank row); a token's rank rows share x[t] and w[slot] (in cache)
  const int64_t items = p.num_tokens * p.rank;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(p.k, 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / p.rank, r = i % p.rank;
      const int64_t slot = p.indices[t];
      float* o = p.out + t * p.out_stride + r;
      if (slot < 0) {
        *o = 0.f;
        continue;
      }
      const T* wr = w + (slot * p.rank + r) * p.k;
      *o = p.scale * dot(wr, x + t * p.x_stride, p.k);
    }
  });
}

template <typename T>
static void lora_expand_impl(const LoraExpandParams& p) {
  const T* w = static_cast<const T*>(p.w);
  T* out = static_cast<T*>(p.out);
  constexpr int64_t kChunk = 64;          // output columns per work item
  const int64_t chunks = (p.n + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(p.rank * kChunk, 1));
  at::parallel_for(0, p.num_tokens * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / chunks, c0 = (i % chunks) * kChunk;
      const int64_t slot = p.indices[t];
      if (slot < 0) continue;
      const float* xr = p.x + t * p.x_stride;
      T* o = out + t * p.out_stride + p.offset;
      const int64_t c1 = std::min(p.n, c0 + kChunk);
      for (int64_t c = c0; c < c1; ++c) {
        const T* wr = w + (slot * p.n + c) * p.rank;
        o[c] = from_f<T>(to_f(o[c]) + dot(wr, xr, p.rank));
      }
    }
  });
}

void lora_shrink_kernel(const LoraShrinkParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { lora_shrink_impl<scalar_t>(p); });
}

void lora_expand_kernel(const LoraExpandParams& p) {
  OCTAVO_CPU_DTYPE_SWITCH(p.dtype, [&] { lora_expand_impl<scalar_t>(p); });
}

}  // namespace octavo::cpu::CPU_CAPABILITY

#if defined(OCTAVO_CPU_LAUNCHERS)
#include <ATen/ATen.h>

#include "cpu/check.h"
#include "cpu/dispatch.h"
#include "ops.h"

OCTAVO_DECLARE_CPU_KERNEL(lora_shrink_kernel, LoraShrinkParams)
OCTAVO_DECLARE_CPU_KERNEL(lora_expand_kernel, LoraExpandParams)

namespace octavo {

static void check_indices(const at::Tensor& indices, int64_t num_tokens, int64_t num_slots,
                          const char* op) {
  OCTAVO_CHECK_CPU(indices);
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == num_tokens && indices.is_contiguous(),
              op, ": indices must be a contiguous [", num_tokens, "] tensor, got ",
              indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ",
              indices.scalar_type());
  const int64_t* idx = indices.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(idx[t] >= -1 && idx[t] < num_slots, op, ": indices[", t, "] = ", idx[t],
                " is outside [-1, ", num_slots, ")");
  }
}

void lora_shrink_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& indices, double scale) {
  const char* op = "lora_shrink";
  OCTAVO_CHECK_CPU(out);
  OCTAVO_CHECK_CPU(x);
  OCTAVO_CHECK_CPU(w);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && out.dim() == 2, op,
              ": expected x [T, K], w [L, R, K], out [T, R], got ", x.sizes(), ", ", w.sizes(),
              ", ", out.sizes());
  TORCH_CHECK(w.size(2) == x.size(1) && out.size(0) == x.size(0) && out.size(1) == w.size(1), op,
              ": shapes do not match: x ", x.sizes(), ", w ", w.sizes(), ", out ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out must be float32, got ",
              out.scalar_type());
  OCTAVO_CHECK_SAME_DTYPE(x, w);
  OCTAVO_CHECK_LAST_CONTIG(x);
  OCTAVO_CHECK_LAST_CONTIG(out);
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous");
  check_indices(indices, x.size(0), w.size(0), op);
  cpu::LoraShrinkParams p{};
  p.out = out.data_ptr<float>();
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.num_tokens = x.size(0);
  p.rank = w.size(1);
  p.k = w.size(2);
  p.scale = static_cast<float>(scale);
  p.dtype = cpu::to_dtype(x, op);
  if (p.num_tokens == 0 || p.rank == 0) return;
  OCTAVO_CALL_CPU_KERNEL(lora_shrink_kernel, p);
}

void lora_expand_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& indices, int64_t offset) {
  const char* op = "lora_expand";
  OCTAVO_CHECK_CPU(out);
  OCTAVO_CHECK_CPU(x);
  OCTAVO_CHECK_CPU(w);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && out.dim() == 2, op,
              ": expected out [T, N_total], x [T, R], w [L, N, R], got ", out.sizes(), ", ",
              x.sizes(), ", ", w.sizes());
  TORCH_CHECK(w.size(2) == x.size(1) && out.size(0) == x.size(0), op,
              ": shapes do not match: out ", out.sizes(), ", x ", x.sizes(), ", w ", w.sizes());
  TORCH_CHECK(offset >= 0 && offset + w.size(1) <= out.size(1), op, ": columns [", offset, ", ",
              offset + w.size(1), ") are outside out's ", out.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  OCTAVO_CHECK_SAME_DTYPE(out, w);
  OCTAVO_CHECK_LAST_CONTIG(x);
  OCTAVO_CHECK_LAST_CONTIG(out);
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous");
  check_indices(indices, out.size(0), w.size(0), op);
  cpu::LoraExpandParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr<float>();
  p.w = w.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.num_tokens = out.size(0);
  p.n = w.size(1);
  p.rank = w.size(2);
  p.offset = offset;
  p.dtype = cpu::to_dtype(out, op);
  if (p.num_tokens == 0 || p.n == 0) return;
  OCTAVO_CALL_CPU_KERNEL(lora_expand_kernel, p);
}

}  // namespace octavo
#endif  // OCTAVO_CPU_LAUNCHERS
