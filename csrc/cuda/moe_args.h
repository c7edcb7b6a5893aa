// Tensor checks and launcher arguments of fused_moe with e4m3 experts, shared by the CUDA wrapper
// and the emulator's CPU wrapper: `dev` is where every tensor must live.
#pragma once

#include "cuda/moe_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

inline cuda::FusedMoeArgs fused_moe_fp8(at::Tensor& out,                 // [T, H] bf16 / fp16
                                        const at::Tensor& hidden,        // [T, H]
                                        const at::Tensor& w13,           // [E, 2I, H] e4m3
                                        const at::Tensor& w2,            // [E, H, I] e4m3
                                        const at::Tensor& w13_scale,     // [E, 2I, ceil(H/bk13)] fp32
                                        const at::Tensor& w2_scale,      // [E, H, ceil(I/bk2)] fp32
                                        const at::Tensor& topk_weights,  // [T, k] fp32
                                        const at::Tensor& topk_ids,      // [T, k] int32
                                        int64_t block_k13, int64_t block_k2,
                                        const std::string& activation, at::DeviceType dev,
                                        MoeWorkspace& ws) {
  const char* op = "fused_moe_fp8";
  for (const at::Tensor* w : {&w13, &w2})
    TORCH_CHECK(w->scalar_type() == at::kByte || w->scalar_type() == at::kFloat8_e4m3fn, op,
                ": w13 and w2 must be e4m3 codes (uint8 or float8_e4m3fn), got ", w->scalar_type());
  TORCH_CHECK(block_k13 >= 1 && block_k2 >= 1, op, ": block_k must be positive");
  check_2d(hidden, hidden, dev, op, "hidden");
  check_2d(out, hidden, dev, op, "out");
  TORCH_CHECK(out.sizes() == hidden.sizes(), op, ": out ", out.sizes(), " must match hidden ", hidden.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf, op,
              ": the CUDA kernel takes bfloat16 or float16, got ", hidden.scalar_type());
  const int64_t t = hidden.size(0), h = hidden.size(1);
  for (const at::Tensor* w : {&w13, &w2})
    TORCH_CHECK(w->device() == hidden.device() && w->is_contiguous() && w->dim() == 3, op,
                ": w13 and w2 must be contiguous 3-D tensors on ", hidden.device());
  const int64_t e = w13.size(0), i = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) % 2 == 0 && w13.size(2) == h && w2.size(0) == e && w2.size(1) == h &&
                  w2.size(2) == i,
              op, ": w13 must be [E, 2I, ", h, "] and w2 [E, ", h, ", I], got ", w13.sizes(), " and ", w2.sizes());
  const int64_t kb13 = (h + block_k13 - 1) / block_k13, kb2 = (i + block_k2 - 1) / block_k2;
  TORCH_CHECK(w13_scale.device() == hidden.device() && w13_scale.scalar_type() == at::kFloat &&
                  w13_scale.is_contiguous() && w13_scale.dim() == 3 && w13_scale.size(0) == e &&
                  w13_scale.size(1) == 2 * i && w13_scale.size(2) == kb13,
              op, ": w13_scale must be a contiguous float32 [", e, ", ", 2 * i, ", ", kb13,
              "] tensor (ops_native.fp8_moe_row_scales), got ", w13_scale.sizes());
  TORCH_CHECK(w2_scale.device() == hidden.device() && w2_scale.scalar_type() == at::kFloat &&
                  w2_scale.is_contiguous() && w2_scale.dim() == 3 && w2_scale.size(0) == e &&
                  w2_scale.size(1) == h && w2_scale.size(2) == kb2,
              op, ": w2_scale must be a contiguous float32 [", e, ", ", h, ", ", kb2,
              "] tensor (ops_native.fp8_moe_row_scales), got ", w2_scale.sizes());
  TORCH_CHECK(topk_ids.device() == hidden.device() && topk_ids.dim() == 2 && topk_ids.size(0) == t &&
                  topk_ids.scalar_type() == at::kInt && topk_ids.is_contiguous(),
              op, ": topk_ids must be a contiguous [T, k] int32 tensor on ", hidden.device());
  TORCH_CHECK(topk_weights.device() == hidden.device() && topk_weights.sizes() == topk_ids.sizes() &&
                  topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
              op, ": topk_weights must be a contiguous float32 tensor shaped like topk_ids");
  const int64_t k = topk_ids.size(1), n = t * k;
  TORCH_CHECK(e <= 65536 && k >= 1, op, ": at most 65536 experts and top_k >= 1");
  const int64_t p = cuda::moe_padded_len(n, e, cuda::kMoeBlockM);
  TORCH_CHECK(p <= INT32_MAX && p / cuda::kMoeBlockM <= INT32_MAX, op, ": too many pairs");
  const auto i32 = hidden.options().dtype(at::kInt);
  ws.sorted_token_ids = at::empty({p}, i32);
  ws.expert_ids = at::empty({p / cuda::kMoeBlockM}, i32);
  ws.num_tokens_post_pad = at::empty({1}, i32);
  ws.inter = at::empty({p, i}, hidden.options());
  ws.partial = at::empty({n, h}, hidden.options().dtype(at::kFloat));
  cuda::FusedMoeArgs a{};
  a.out = out.data_ptr();
  a.hidden = hidden.data_ptr();
  a.w13 = w13.data_ptr();
  a.w2 = w2.data_ptr();
  a.w13_scale = w13_scale.data_ptr<float>();
  a.w2_scale = w2_scale.data_ptr<float>();
  a.block_k13 = block_k13;
  a.block_k2 = block_k2;
  a.topk_weights = topk_weights.data_ptr<float>();
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.sorted_token_ids = ws.sorted_token_ids.data_ptr<int32_t>();
  a.expert_ids = ws.expert_ids.data_ptr<int32_t>();
  a.num_tokens_post_pad = ws.num_tokens_post_pad.data_ptr<int32_t>();
  a.inter = ws.inter.data_ptr();
  a.partial = ws.partial.data_ptr<float>();
  a.out_stride = out.stride(0);
  a.hidden_stride = hidden.stride(0);
  a.num_tokens = t;
  a.hidden_size = h;
  a.inter_size = i;
  a.padded_len = p;
  a.num_experts = static_cast<int>(e);
  a.top_k = static_cast<int>(k);
  a.act = moe_activation(activation);
  a.dtype = to_dtype(hidden, op);
  return a;
}

}  // namespace octavo::cuda_args
