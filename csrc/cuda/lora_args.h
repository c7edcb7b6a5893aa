// Tensor checks and launcher arguments of the LoRA kernels, shared by the CUDA wrappers and the
// emulator's CPU wrappers: `dev` is where every tensor must live. Slot indices are not read on
// the host (that would sync): the kernels treat one outside [0, L) as "no adapter".
#pragma once

#include "cuda/lora_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

inline void lora_check_common(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& indices, at::DeviceType dev, const char* op) {
  using List = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : List{&out, &x, &w, &indices}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on ", x.device());
  }
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && w.dim() == 3, op,
              ": expected 2-D out and x and a 3-D w, got ", out.sizes(), ", ", x.sizes(), ", ",
              w.sizes());
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == x.size(0) && indices.is_contiguous() &&
                  indices.scalar_type() == at::kLong, op,
              ": indices must be a contiguous int64 [", x.size(0), "] tensor");
  TORCH_CHECK(out.size(0) == x.size(0), op, ": out and x must have the same rows");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": x must have a unit last stride");
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, op, ": out must have a unit last stride");
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous");
}

inline cuda::LoraShrinkArgs lora_shrink(at::Tensor& out,             // [T, R] float32
                                        const at::Tensor& x,         // [T, K]
                                        const at::Tensor& w,         // [L, R, K]
                                        const at::Tensor& indices,   // [T] int64
                                        double scale, at::DeviceType dev) {
  const char* op = "lora_shrink";
  lora_check_common(out, x, w, indices, dev, op);
  TORCH_CHECK(w.size(2) == x.size(1) && out.size(1) == w.size(1), op, ": shapes do not match: x ",
              x.sizes(), ", w ", w.sizes(), ", out ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out must be float32");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": x and w dtypes differ");
  cuda::LoraShrinkArgs a{};
  a.out = out.data_ptr<float>();
  a.x = x.data_ptr();
  a.w = w.data_ptr();
  a.indices = indices.data_ptr<int64_t>();
  a.out_stride = out.stride(0);
  a.x_stride = x.stride(0);
  a.num_tokens = x.size(0);
  a.num_slots = w.size(0);
  a.rank = w.size(1);
  a.k = w.size(2);
  a.scale = static_cast<float>(scale);
  a.dtype = to_dtype(x, op);
  return a;
}

inline cuda::LoraExpandArgs lora_expand(at::Tensor& out,             // [T, N_total]
                                        const at::Tensor& x,         // [T, R] float32
                                        const at::Tensor& w,         // [L, N, R]
                                        const at::Tensor& indices,   // [T] int64
                                        int64_t offset, at::DeviceType dev) {
  const char* op = "lora_expand";
  lora_check_common(out, x, w, indices, dev, op);
  TORCH_CHECK(w.size(2) == x.size(1), op, ": shapes do not match: x ", x.sizes(), ", w ",
              w.sizes());
  TORCH_CHECK(offset >= 0 && offset + w.size(1) <= out.size(1), op, ": columns [", offset, ", ",
              offset + w.size(1), ") are outside out's ", out.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32");
  TORCH_CHECK(w.scalar_type() == out.scalar_type(), op, ": out and w dtypes differ");
  TORCH_CHECK(w.size(2) <= 12 * 1024, op, ": rank ", w.size(2), " is too large for shared memory");
  cuda::LoraExpandArgs a{};
  a.out = out.data_ptr();
  a.x = x.data_ptr<float>();
  a.w = w.data_ptr();
  a.indices = indices.data_ptr<int64_t>();
  a.out_stride = out.stride(0);
  a.x_stride = x.stride(0);
  a.num_tokens = out.size(0);
  a.num_slots = w.size(0);
  a.n = w.size(1);
  a.rank = w.size(2);
  a.offset = offset;
  a.dtype = to_dtype(out, op);
  return a;
}

}  // namespace octavo::cuda_args
