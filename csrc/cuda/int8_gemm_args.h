// Tensor checks and launcher arguments of the INT8 W8A8 GEMM, shared by the CUDA wrapper and the
// emulator's CPU wrapper: `dev` is where every tensor must live. The operands are the CPU
// kernel's (ops_native.int8_prepare); the per-token workspace is allocated here (on the caching
// allocator's stream, so CUDA-graph capture works) and lives in the returned call.
#pragma once

#include <cstdint>
#include <optional>

#include "cuda/int8_gemm_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

struct Int8GemmCall {
  cuda::Int8GemmArgs args;
  at::Tensor xq, xscale, azp, in_scale, in_zp;   // keep the workspace alive until the launch
};

inline Int8GemmCall int8_gemm(at::Tensor& out,                 // [M, N]
                              const at::Tensor& x,             // [M, K] of out's dtype
                              const at::Tensor& qweight,       // int8 [ceil(N/16), ceil(K/2), 16, 2]
                              const at::Tensor& w_scales,      // float32 [N]
                              const at::Tensor& w_colsum,      // int32 [N]
                              const std::optional<at::Tensor>& input_scale,       // one value
                              const std::optional<at::Tensor>& input_zero_point,  // one value
                              bool asymmetric, const std::optional<at::Tensor>& bias,  // [N]
                              at::DeviceType dev) {
  const char* op = "int8_gemm";
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&out, &x, &qweight, &w_scales, &w_colsum}) {
    check_on(*t, dev, op, "every tensor but input_scale / input_zero_point");
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on ", x.device());
  }
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0), op,
              ": expected x [M, K] and out [M, N], got ", x.sizes(), " and ", out.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": x needs a unit last stride");
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, op, ": out needs a unit last stride");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": x and out dtypes differ: ",
              x.scalar_type(), " vs ", out.scalar_type());
  const int64_t m = x.size(0), n = out.size(1), k = x.size(1), panels = (n + 15) / 16, k2 = (k + 1) / 2;
  TORCH_CHECK(k > 0, op, ": K must be positive");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 4 && qweight.size(0) == panels &&
                  qweight.size(1) == k2 && qweight.size(2) == 16 && qweight.size(3) == 2 &&
                  qweight.is_contiguous(),
              op, ": qweight must be a contiguous int8 [", panels, ", ", k2,
              ", 16, 2] (ops_native.pack_int8_panels), got ", qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.dim() == 1 && w_scales.size(0) == n &&
                  w_scales.is_contiguous(),
              op, ": w_scales must be a contiguous float32 [", n, "], got ", w_scales.scalar_type(), " ",
              w_scales.sizes());
  TORCH_CHECK(w_colsum.scalar_type() == at::kInt && w_colsum.dim() == 1 && w_colsum.size(0) == n &&
                  w_colsum.is_contiguous(),
              op, ": w_colsum must be a contiguous int32 [", n, "], got ", w_colsum.scalar_type(), " ",
              w_colsum.sizes());
  TORCH_CHECK(!input_zero_point.has_value() || input_scale.has_value(), op,
              ": input_zero_point needs input_scale");
  if (bias.has_value()) {
    check_on(*bias, dev, op, "bias");
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() &&
                    bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
                op, ": bias must be a contiguous [", n, "] of x's dtype and device");
  }
  Int8GemmCall call;
  const int64_t kq = (k + cuda::kInt8RowAlign - 1) / cuda::kInt8RowAlign * cuda::kInt8RowAlign;
  call.xq = at::empty({m, kq}, x.options().dtype(at::kChar));
  call.xscale = at::empty({m}, x.options().dtype(at::kFloat));
  call.azp = at::empty({m}, x.options().dtype(at::kInt));
  if (input_scale.has_value()) {
    // a static per-tensor scale: read on the device (no host sync); a CPU value is copied over
    TORCH_CHECK(input_scale->numel() == 1, op, ": input_scale must be one value (per-tensor), got ",
                input_scale->sizes());
    call.in_scale = input_scale->to(x.device(), at::kFloat).reshape({1}).contiguous();
    if (input_zero_point.has_value()) {
      TORCH_CHECK(input_zero_point->numel() == 1, op, ": input_zero_point must be one value, got ",
                  input_zero_point->sizes());
      call.in_zp = input_zero_point->to(x.device(), at::kInt).reshape({1}).contiguous();
    }
  }
  cuda::Int8GemmArgs& a = call.args;
  a = cuda::Int8GemmArgs{};
  a.out = out.data_ptr();
  a.x = x.data_ptr();
  a.xq = call.xq.data_ptr<int8_t>();
  a.xscale = call.xscale.data_ptr<float>();
  a.azp = call.azp.data_ptr<int32_t>();
  a.qw = qweight.data_ptr<int8_t>();
  a.wscale = w_scales.data_ptr<float>();
  a.colsum = w_colsum.data_ptr<int32_t>();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.in_scale = call.in_scale.defined() ? call.in_scale.data_ptr<float>() : nullptr;
  a.in_zp = call.in_zp.defined() ? call.in_zp.data_ptr<int32_t>() : nullptr;
  a.out_stride = out.stride(0);
  a.x_stride = x.stride(0);
  a.m = m;
  a.n = n;
  a.k = k;
  a.k2 = k2;
  a.kq = kq;
  a.panels = panels;
  a.asymmetric = asymmetric;
  a.dtype = to_dtype(x, op);
  return call;
}

}  // namespace octavo::cuda_args
