// Tensor checks and launcher arguments of the FP8 GEMM kernel, shared by the CUDA wrapper and the
// emulator's CPU wrapper: `dev` is where every tensor must live.
#pragma once

#include <optional>

#include "cuda/fp8_gemm_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

inline bool is_fp8_bytes(const at::Tensor& t) {
  return t.scalar_type() == at::kByte || t.scalar_type() == at::kFloat8_e4m3fn;
}

inline cuda::Fp8GemmArgs fp8_gemm(at::Tensor& out,                // [M, N] bf16 / fp16
                                  const at::Tensor& x,            // [M, K] (e4m3 with x_scale)
                                  const at::Tensor& weight,       // [N, K] e4m3
                                  const at::Tensor& scale,        // [N/bn, K/bk] fp32
                                  int64_t block_n, int64_t block_k,
                                  const std::optional<at::Tensor>& x_scale,  // [M] fp32
                                  const std::optional<at::Tensor>& bias,     // [N]
                                  bool fp8_mma, at::DeviceType dev) {
  const char* op = "fp8_gemm";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &x, &weight, &scale}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on ", x.device());
  }
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && weight.dim() == 2 && out.size(0) == x.size(0) &&
                  weight.size(1) == x.size(1) && out.size(1) == weight.size(0),
              op, ": expected x [M, K], weight [N, K] and out [M, N], got ", x.sizes(), ", ",
              weight.sizes(), " and ", out.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": x needs a unit last stride");
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, op, ": out needs a unit last stride");
  TORCH_CHECK(is_fp8_bytes(weight) && weight.is_contiguous(), op,
              ": weight must be a contiguous float8_e4m3fn (or uint8) [N, K], got ", weight.scalar_type());
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(block_n > 0 && block_k > 0, op, ": block_n and block_k must be positive");
  const int64_t nb = (n + block_n - 1) / block_n, kblocks = (k + block_k - 1) / block_k;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == nb &&
                  scale.size(1) == kblocks && scale.is_contiguous(),
              op, ": scale must be a contiguous float32 [", nb, ", ", kblocks, "], got ",
              scale.scalar_type(), " ", scale.sizes());
  const int step = fp8_mma ? cuda::kFp8StepK32 : cuda::kFp8StepK16;
  TORCH_CHECK(kblocks == 1 || block_k % step == 0, op, ": block_k (", block_k,
              ") must be a multiple of ", step, " or cover all of K");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf, op,
              ": the tensor-core kernel writes bfloat16 or float16, got ", out.scalar_type());
  if (x_scale.has_value()) {
    check_on(*x_scale, dev, op, "x_scale");
    TORCH_CHECK(is_fp8_bytes(x), op, ": with x_scale, x must hold e4m3 codes, got ", x.scalar_type());
    TORCH_CHECK(x_scale->scalar_type() == at::kFloat && x_scale->dim() == 1 &&
                    x_scale->size(0) == m && x_scale->is_contiguous(),
                op, ": x_scale must be a contiguous float32 [", m, "], got ", x_scale->sizes());
  } else {
    TORCH_CHECK(!fp8_mma, op, ": e4m3 tensor cores need e4m3 activations (x_scale)");
    TORCH_CHECK(x.scalar_type() == out.scalar_type(), op, ": x and out dtypes differ: ",
                x.scalar_type(), " vs ", out.scalar_type());
  }
  if (bias.has_value()) {
    check_on(*bias, dev, op, "bias");
    TORCH_CHECK(bias->scalar_type() == out.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == n && bias->is_contiguous(),
                op, ": bias must be a contiguous [", n, "] of out's dtype");
  }
  cuda::Fp8GemmArgs a{};
  a.out = out.data_ptr();
  a.x = x.data_ptr();
  a.x_scale = x_scale.has_value() ? x_scale->data_ptr<float>() : nullptr;
  a.w = static_cast<const uint8_t*>(weight.data_ptr());
  a.scale = scale.data_ptr<float>();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.out_stride = out.stride(0);
  a.x_stride = x.stride(0);
  a.m = m;
  a.n = n;
  a.k = k;
  a.block_n = block_n;
  a.block_k = block_k;
  a.kblocks = kblocks;
  a.dtype = to_dtype(out, op);
  a.fp8_mma = fp8_mma;
  return a;
}

}  // namespace octavo::cuda_args
