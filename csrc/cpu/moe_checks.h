// Input checks shared by the fused-MoE launchers (moe.cpp, moe_int4.cpp, moe_int8.cpp; their
// default-capability TUs only, like check.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace octavo::cpu {

// moe_act.h's activation kind of a name: 0 silu, 1 gelu (erf), 2 gelu (tanh).
inline int moe_activation_kind(const std::string& activation, const char* op) {
  if (activation == "silu") return 0;
  if (activation == "gelu") return 1;
  if (activation == "gelu_tanh") return 2;
  TORCH_CHECK(false, op, ": activation must be 'silu', 'gelu' or 'gelu_tanh', got '", activation,
              "'");
}

// topk_ids a contiguous int32 [tokens, k], topk_weights a contiguous float32 of its shape.
inline void check_moe_routing(const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                              int64_t tokens, const char* op) {
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == tokens &&
                  topk_ids.scalar_type() == at::kInt && topk_ids.is_contiguous(),
              op, ": topk_ids must be a contiguous [T, k] int32 tensor");
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() &&
                  topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(),
              op, ": topk_weights must be a contiguous float32 tensor shaped like topk_ids");
}

// Every routed expert id in [0, num_experts).
inline void check_expert_ids(const at::Tensor& topk_ids, int64_t num_experts, const char* op) {
  const int32_t* ids = topk_ids.data_ptr<int32_t>();
  for (int64_t q = 0; q < topk_ids.numel(); ++q)
    TORCH_CHECK(ids[q] >= 0 && ids[q] < num_experts, op, ": expert id ", ids[q], " is not in [0, ",
                num_experts, ")");
}

}  // namespace octavo::cpu
