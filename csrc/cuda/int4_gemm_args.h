// Tensor checks and launcher arguments of the INT4 weight-only GEMM, shared by the CUDA wrapper
// and the emulator's CPU wrapper: `dev` is where every tensor must live. The operands are the CPU
// kernel's (ops_native.int4_prepare), so a prepared weight moved to the GPU runs unchanged.
#pragma once

#include <cstdint>
#include <optional>

#include "cuda/int4_gemm_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

inline cuda::Int4GemmArgs int4_gemm(at::Tensor& out,                  // [M, N] bf16 / fp16
                                    const at::Tensor& x,              // [M, K] of out's dtype
                                    const at::Tensor& qweight,        // uint8 [ceil(N/32), ceil(K/2), 32]
                                    const at::Tensor& scales_offsets, // float32 [ceil(N/32), G, 2, 32]
                                    int64_t group_size,
                                    const std::optional<at::Tensor>& bias,  // [N]
                                    at::DeviceType dev) {
  const char* op = "int4_gemm";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &x, &qweight, &scales_offsets}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on ", x.device());
  }
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0), op,
              ": expected x [M, K] and out [M, N], got ", x.sizes(), " and ", out.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": x needs a unit last stride");
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, op, ": out needs a unit last stride");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": the tensor-core kernel takes bfloat16 or float16 activations, got ", x.scalar_type());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": x and out dtypes differ: ",
              x.scalar_type(), " vs ", out.scalar_type());
  const int64_t m = x.size(0), n = out.size(1), k = x.size(1), panels = (n + 31) / 32;
  TORCH_CHECK(k > 0, op, ": K must be positive");
  TORCH_CHECK(group_size > 0 && (group_size % cuda::kInt4StepK == 0 || group_size >= k), op,
              ": group_size must be a multiple of ", cuda::kInt4StepK, " (or at least K = ", k,
              ") on CUDA, got ", group_size);
  const int64_t groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 && qweight.size(0) == panels &&
                  qweight.size(1) == (k + 1) / 2 && qweight.size(2) == 32 && qweight.is_contiguous(),
              op, ": qweight must be a contiguous uint8 [", panels, ", ", (k + 1) / 2,
              ", 32] (ops_native.pack_int4_panels), got ", qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(scales_offsets.scalar_type() == at::kFloat && scales_offsets.dim() == 4 &&
                  scales_offsets.size(0) == panels && scales_offsets.size(1) == groups &&
                  scales_offsets.size(2) == 2 && scales_offsets.size(3) == 32 &&
                  scales_offsets.is_contiguous(),
              op, ": scales_offsets must be a contiguous float32 [", panels, ", ", groups,
              ", 2, 32], got ", scales_offsets.scalar_type(), " ", scales_offsets.sizes());
  if (bias.has_value()) {
    check_on(*bias, dev, op, "bias");
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() &&
                    bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
                op, ": bias must be a contiguous [", n, "] of x's dtype and device");
  }
  cuda::Int4GemmArgs a{};
  a.out = out.data_ptr();
  a.x = x.data_ptr();
  a.qw = static_cast<const uint8_t*>(qweight.data_ptr());
  a.so = scales_offsets.data_ptr<float>();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.out_stride = out.stride(0);
  a.x_stride = x.stride(0);
  a.m = m;
  a.n = n;
  a.k = k;
  a.k2 = (k + 1) / 2;
  a.panels = panels;
  a.groups = groups;
  a.group_size = group_size;
  a.x_vec16 = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.stride(0) * 2) % 16 == 0;
  a.dtype = to_dtype(x, op);
  return a;
}

}  // namespace octavo::cuda_args
