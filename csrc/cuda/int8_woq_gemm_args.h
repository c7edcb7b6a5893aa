// Tensor checks and launcher arguments of the weight-only INT8 GEMM, shared by the CUDA wrapper
// and the emulator's CPU wrapper: `dev` is where every tensor must live. The operands are the CPU
// kernel's (ops_native.int8_woq_prepare), so a prepared weight moved to the GPU runs unchanged.
#pragma once

#include <cstdint>
#include <optional>

#include "cuda/int8_woq_gemm_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

inline cuda::Int8WoqGemmArgs int8_woq_gemm(at::Tensor& out,                  // [M, N]
                                           const at::Tensor& x,              // [M, K] of out's dtype
                                           const at::Tensor& qweight,        // int8 [ceil(N/16), K, 16]
                                           const at::Tensor& scales_offsets, // float32 [ceil(N/16), G, 2, 16]
                                           int64_t group_size,
                                           const std::optional<at::Tensor>& bias,  // [N]
                                           at::DeviceType dev) {
  const char* op = "int8_woq_gemm";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &x, &qweight, &scales_offsets}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on ", x.device());
  }
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0), op,
              ": expected x [M, K] and out [M, N], got ", x.sizes(), " and ", out.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": x needs a unit last stride");
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, op, ": out needs a unit last stride");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": x and out dtypes differ: ",
              x.scalar_type(), " vs ", out.scalar_type());
  const int64_t m = x.size(0), n = out.size(1), k = x.size(1), panels = (n + 15) / 16;
  TORCH_CHECK(k > 0, op, ": K must be positive");
  TORCH_CHECK(group_size > 0 && (group_size % cuda::kInt8WoqStepK == 0 || group_size >= k), op,
              ": group_size must be a multiple of ", cuda::kInt8WoqStepK, " (or at least K = ", k,
              ") on CUDA, got ", group_size);
  const int64_t groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 3 && qweight.size(0) == panels &&
                  qweight.size(1) == k && qweight.size(2) == 16 && qweight.is_contiguous(),
              op, ": qweight must be a contiguous int8 [", panels, ", ", k,
              ", 16] (ops_native.pack_int8_woq_panels), got ", qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, op,
              ": qweight must be 16-byte aligned");
  TORCH_CHECK(scales_offsets.scalar_type() == at::kFloat && scales_offsets.dim() == 4 &&
                  scales_offsets.size(0) == panels && scales_offsets.size(1) == groups &&
                  scales_offsets.size(2) == 2 && scales_offsets.size(3) == 16 &&
                  scales_offsets.is_contiguous(),
              op, ": scales_offsets must be a contiguous float32 [", panels, ", ", groups,
              ", 2, 16], got ", scales_offsets.scalar_type(), " ", scales_offsets.sizes());
  if (bias.has_value()) {
    check_on(*bias, dev, op, "bias");
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() &&
                    bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
                op, ": bias must be a contiguous [", n, "] of x's dtype and device");
  }
  cuda::Int8WoqGemmArgs a{};
  a.out = out.data_ptr();
  a.x = x.data_ptr();
  a.qw = qweight.data_ptr<int8_t>();
  a.so = scales_offsets.data_ptr<float>();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.out_stride = out.stride(0);
  a.x_stride = x.stride(0);
  a.m = m;
  a.n = n;
  a.k = k;
  a.panels = panels;
  a.groups = groups;
  a.group_size = group_size;
  a.x_vec16 = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.stride(0) * x.element_size()) % 16 == 0;
  a.dtype = to_dtype(x, op);
  return a;
}

}  // namespace octavo::cuda_args
