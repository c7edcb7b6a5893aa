// Tensor checks and launcher arguments of fused_moe_int4_packed (4-bit experts in the CPU
// kernel's layout, ops_native.prepare_moe_int4_weights), shared by the CUDA wrapper and the
// emulator's CPU wrapper: `dev` is where every tensor must live.
#pragma once

#include <string>

#include "cuda/int4_gemm_params.h"
#include "cuda/moe_int4_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

// Checks one packed expert stack (codes [E, panels, ceil(k/2), 32], scales_offsets [E, panels,
// G, 2, 32]) and describes it; group_size -1 is one group over all of k.
inline cuda::MoeInt4Stack moe_int4_stack(const at::Tensor& packed, const at::Tensor& so,
                                         const at::Tensor& hidden, int64_t e, int64_t panels,
                                         int64_t k, int64_t group_size, const char* name) {
  const char* op = "fused_moe_int4_packed";
  const int64_t gs = group_size == -1 ? k : group_size;
  TORCH_CHECK(gs > 0 && (gs % cuda::kInt4StepK == 0 || gs >= k), op, ": group_size must be -1 or a "
              "multiple of ", cuda::kInt4StepK, " (or at least K = ", k, ") on CUDA, got ", group_size);
  const int64_t groups = (k + gs - 1) / gs;
  TORCH_CHECK(packed.device() == hidden.device() && packed.scalar_type() == at::kByte &&
                  packed.is_contiguous() && packed.dim() == 4 && packed.size(0) == e &&
                  packed.size(1) == panels && packed.size(2) == (k + 1) / 2 && packed.size(3) == 32,
              op, ": ", name, " must be a contiguous uint8 [", e, ", ", panels, ", ", (k + 1) / 2,
              ", 32] on ", hidden.device(), " (ops_native.prepare_moe_int4_weights), got ",
              packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(so.device() == hidden.device() && so.scalar_type() == at::kFloat && so.is_contiguous() &&
                  so.dim() == 5 && so.size(0) == e && so.size(1) == panels && so.size(2) == groups &&
                  so.size(3) == 2 && so.size(4) == 32,
              op, ": ", name, " scales_offsets must be a contiguous float32 [", e, ", ", panels, ", ",
              groups, ", 2, 32] on ", hidden.device(), ", got ", so.scalar_type(), " ", so.sizes());
  return {static_cast<const uint8_t*>(packed.data_ptr()), so.data_ptr<float>(), panels, k, (k + 1) / 2,
          groups, gs};
}

inline cuda::MoeInt4Args fused_moe_int4(at::Tensor& out,                 // [T, H] bf16 / fp16
                                        const at::Tensor& hidden,        // [T, H]
                                        const at::Tensor& w13,           // uint8 [E, 2 ceil(I/32), ceil(H/2), 32]
                                        const at::Tensor& w2,            // uint8 [E, ceil(H/32), ceil(I/2), 32]
                                        const at::Tensor& w13_so,        // f32 [E, 2 ceil(I/32), G13, 2, 32]
                                        const at::Tensor& w2_so,         // f32 [E, ceil(H/32), G2, 2, 32]
                                        const at::Tensor& topk_weights,  // [T, k] fp32
                                        const at::Tensor& topk_ids,      // [T, k] int32
                                        int64_t inter_size, int64_t group_size,
                                        const std::string& activation,
                                        const std::optional<at::Tensor>& w13_perm,  // int32 [E, H]
                                        at::DeviceType dev, MoeWorkspace& ws) {
  const char* op = "fused_moe_int4_packed";
  check_2d(hidden, hidden, dev, op, "hidden");
  check_2d(out, hidden, dev, op, "out");
  TORCH_CHECK(out.sizes() == hidden.sizes(), op, ": out ", out.sizes(), " must match hidden ", hidden.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf, op,
              ": the CUDA kernel takes bfloat16 or float16 activations, got ", hidden.scalar_type());
  const int64_t t = hidden.size(0), h = hidden.size(1), i = inter_size;
  TORCH_CHECK(h >= 1 && i >= 1, op, ": hidden and inter sizes must be positive, got ", h, " and ", i);
  TORCH_CHECK(w13.dim() == 4, op, ": w13 must be 4-D (ops_native.prepare_moe_int4_weights), got ", w13.sizes());
  const int64_t e = w13.size(0);
  const cuda::MoeInt4Stack s13 = moe_int4_stack(w13, w13_so, hidden, e, 2 * ((i + 31) / 32), h, group_size, "w13");
  const cuda::MoeInt4Stack s2 = moe_int4_stack(w2, w2_so, hidden, e, (h + 31) / 32, i, group_size, "w2");
  TORCH_CHECK(topk_ids.device() == hidden.device() && topk_ids.dim() == 2 && topk_ids.size(0) == t &&
                  topk_ids.scalar_type() == at::kInt && topk_ids.is_contiguous(),
              op, ": topk_ids must be a contiguous [T, k] int32 tensor on ", hidden.device());
  TORCH_CHECK(topk_weights.device() == hidden.device() && topk_weights.sizes() == topk_ids.sizes() &&
                  topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
              op, ": topk_weights must be a contiguous float32 tensor shaped like topk_ids");
  if (w13_perm.has_value()) {
    const at::Tensor& pm = *w13_perm;
    TORCH_CHECK(pm.device() == hidden.device() && pm.scalar_type() == at::kInt && pm.dim() == 2 &&
                    pm.size(0) == e && pm.size(1) == h && pm.is_contiguous(),
                op, ": w13_perm must be a contiguous int32 [E, H] = [", e, ", ", h, "] on ",
                hidden.device(), " (ops_native.prepare_moe_int4_weights), got ", pm.scalar_type(),
                " ", pm.sizes(), " on ", pm.device());
  }
  const int64_t k = topk_ids.size(1), n = t * k;
  TORCH_CHECK(e >= 1 && e <= 65536 && k >= 1, op, ": 1 to 65536 experts and top_k >= 1");
  const int64_t p = cuda::moe_padded_len(n, e, cuda::kMoeBlockM);
  TORCH_CHECK(p <= INT32_MAX && p / cuda::kMoeBlockM <= INT32_MAX, op, ": too many pairs");
  const auto i32 = hidden.options().dtype(at::kInt);
  ws.sorted_token_ids = at::empty({p}, i32);
  ws.expert_ids = at::empty({p / cuda::kMoeBlockM}, i32);
  ws.num_tokens_post_pad = at::empty({1}, i32);
  ws.inter = at::empty({p, i}, hidden.options());
  ws.partial = at::empty({n, h}, hidden.options().dtype(at::kFloat));
  cuda::MoeInt4Args a{};
  a.out = out.data_ptr();
  a.hidden = hidden.data_ptr();
  a.w13 = s13;
  a.w2 = s2;
  a.topk_weights = topk_weights.data_ptr<float>();
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.w13_perm = w13_perm.has_value() ? w13_perm->data_ptr<int32_t>() : nullptr;
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
  a.hidden_vec16 = reinterpret_cast<uintptr_t>(hidden.data_ptr()) % 16 == 0 && (hidden.stride(0) * 2) % 16 == 0;
  a.dtype = to_dtype(hidden, op);
  return a;
}

}  // namespace octavo::cuda_args
