// Tensor checks and launcher arguments of fused_moe_int8_packed (weight-only int8 experts in the
// CPU kernel's layout, ops_native.prepare_moe_int8_weights), shared by the CUDA wrapper and the
// emulator's CPU wrapper: `dev` is where every tensor must live.
#pragma once

#include <string>

#include "cuda/int8_woq_gemm_params.h"
#include "cuda/moe_int8_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

// Checks one packed expert stack (codes [E, panels, k, 16], scales_offsets [E, panels, G, 2, 16])
// and describes it; group_size -1 is one group over all of k.
inline cuda::MoeInt8Stack moe_int8_stack(const at::Tensor& packed, const at::Tensor& so,
                                         const at::Tensor& hidden, int64_t e, int64_t panels,
                                         int64_t k, int64_t group_size, const char* name) {
  const char* op = "fused_moe_int8_packed";
  const int64_t gs = group_size == -1 ? k : group_size;
  TORCH_CHECK(gs > 0 && (gs % cuda::kInt8WoqStepK == 0 || gs >= k), op, ": ", name, " group_size must "
              "be -1 or a multiple of ", cuda::kInt8WoqStepK, " (or at least K = ", k, ") on CUDA, got ",
              group_size);
  const int64_t groups = (k + gs - 1) / gs;
  TORCH_CHECK(packed.device() == hidden.device() && packed.scalar_type() == at::kChar &&
                  packed.is_contiguous() && packed.dim() == 4 && packed.size(0) == e &&
                  packed.size(1) == panels && packed.size(2) == k && packed.size(3) == 16,
              op, ": ", name, " must be a contiguous int8 [", e, ", ", panels, ", ", k, ", 16] on ",
              hidden.device(), " (ops_native.prepare_moe_int8_weights), got ", packed.scalar_type(), " ",
              packed.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0, op, ": ", name,
              " must be 16-byte aligned");
  TORCH_CHECK(so.device() == hidden.device() && so.scalar_type() == at::kFloat && so.is_contiguous() &&
                  so.dim() == 5 && so.size(0) == e && so.size(1) == panels && so.size(2) == groups &&
                  so.size(3) == 2 && so.size(4) == 16,
              op, ": ", name, " scales_offsets must be a contiguous float32 [", e, ", ", panels, ", ",
              groups, ", 2, 16] on ", hidden.device(), ", got ", so.scalar_type(), " ", so.sizes());
  return {packed.data_ptr<int8_t>(), so.data_ptr<float>(), panels, k, groups, gs};
}

inline cuda::MoeInt8Args fused_moe_int8(at::Tensor& out,                 // [T, H]
                                        const at::Tensor& hidden,        // [T, H] fp32 / bf16 / fp16
                                        const at::Tensor& w13,           // int8 [E, 2 ceil(I/16), H, 16]
                                        const at::Tensor& w2,            // int8 [E, ceil(H/16), I, 16]
                                        const at::Tensor& w13_so,        // f32 [E, 2 ceil(I/16), G13, 2, 16]
                                        const at::Tensor& w2_so,         // f32 [E, ceil(H/16), G2, 2, 16]
                                        const at::Tensor& topk_weights,  // [T, k] fp32
                                        const at::Tensor& topk_ids,      // [T, k] int32
                                        int64_t inter_size, int64_t group_size13, int64_t group_size2,
                                        const std::string& activation, at::DeviceType dev,
                                        MoeWorkspace& ws) {
  const char* op = "fused_moe_int8_packed";
  check_2d(hidden, hidden, dev, op, "hidden");
  check_2d(out, hidden, dev, op, "out");
  TORCH_CHECK(out.sizes() == hidden.sizes(), op, ": out ", out.sizes(), " must match hidden ", hidden.sizes());
  const int64_t t = hidden.size(0), h = hidden.size(1), i = inter_size;
  TORCH_CHECK(h >= 1 && i >= 1, op, ": hidden and inter sizes must be positive, got ", h, " and ", i);
  TORCH_CHECK(w13.dim() == 4, op, ": w13 must be 4-D (ops_native.prepare_moe_int8_weights), got ", w13.sizes());
  const int64_t e = w13.size(0);
  const cuda::MoeInt8Stack s13 = moe_int8_stack(w13, w13_so, hidden, e, 2 * ((i + 15) / 16), h, group_size13, "w13");
  const cuda::MoeInt8Stack s2 = moe_int8_stack(w2, w2_so, hidden, e, (h + 15) / 16, i, group_size2, "w2");
  TORCH_CHECK(topk_ids.device() == hidden.device() && topk_ids.dim() == 2 && topk_ids.size(0) == t &&
                  topk_ids.scalar_type() == at::kInt && topk_ids.is_contiguous(),
              op, ": topk_ids must be a contiguous [T, k] int32 tensor on ", hidden.device());
  TORCH_CHECK(topk_weights.device() == hidden.device() && topk_weights.sizes() == topk_ids.sizes() &&
                  topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
              op, ": topk_weights must be a contiguous float32 tensor shaped like topk_ids");
  const int64_t k = topk_ids.size(1), n = t * k;
  TORCH_CHECK(e >= 1 && e <= 65536, op, ": 1 to 65536 experts, got ", e);
  const int64_t p = cuda::moe_padded_len(n, e, cuda::kMoeBlockM);
  TORCH_CHECK(p <= INT32_MAX && p / cuda::kMoeBlockM <= INT32_MAX, op, ": too many pairs");
  const auto i32 = hidden.options().dtype(at::kInt);
  ws.sorted_token_ids = at::empty({p}, i32);
  ws.expert_ids = at::empty({p / cuda::kMoeBlockM}, i32);
  ws.num_tokens_post_pad = at::empty({1}, i32);
  ws.inter = at::empty({p, i}, hidden.options());
  ws.partial = at::empty({n, h}, hidden.options().dtype(at::kFloat));
  cuda::MoeInt8Args a{};
  a.out = out.data_ptr();
  a.hidden = hidden.data_ptr();
  a.w13 = s13;
  a.w2 = s2;
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
  a.hidden_vec16 = reinterpret_cast<uintptr_t>(hidden.data_ptr()) % 16 == 0 &&
                   (hidden.stride(0) * hidden.element_size()) % 16 == 0;
  a.dtype = to_dtype(hidden, op);
  return a;
}

}  // namespace octavo::cuda_args
