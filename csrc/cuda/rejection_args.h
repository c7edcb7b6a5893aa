// Tensor checks and launcher arguments of the rejection sampler, shared by the CUDA wrapper and
// the emulator's CPU wrapper: `dev` is where every tensor must live. num_draft_tokens and the
// draft ids are not read on the host (that would sync): the kernel checks them.
#pragma once

#include "cuda/rejection_params.h"
#include "cuda/torch_args.h"

namespace octavo::cuda_args {

inline cuda::RejectionArgs rejection_sample(at::Tensor& out,                   // [B, K+1] int64
                                            const at::Tensor& draft_token_ids, // [B, K] int64
                                            const at::Tensor& num_draft_tokens,  // [B] int64
                                            const std::optional<at::Tensor>& draft_probs,
                                            const at::Tensor& target_probs,    // [B, K+1, V]
                                            const at::Tensor& uniform,         // [B, K] float64
                                            const at::Tensor& exp_noise,       // [B, K+1, V]
                                            const at::Tensor& greedy,          // [B] bool
                                            at::DeviceType dev) {
  const char* op = "rejection_sample";
  using List = std::initializer_list<const at::Tensor*>;
  for (const at::Tensor* t : List{&out, &draft_token_ids, &num_draft_tokens, &target_probs,
                                  &uniform, &exp_noise, &greedy}) {
    check_on(*t, dev, op, "every tensor");
    TORCH_CHECK(t->device() == target_probs.device(), op, ": all tensors must be on ",
                target_probs.device());
  }
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.scalar_type() == at::kLong, op,
              ": draft_token_ids must be int64 [B, K]");
  const int64_t batch = draft_token_ids.size(0), k = draft_token_ids.size(1);
  const int64_t vocab = target_probs.dim() == 3 ? target_probs.size(2) : 0;
  TORCH_CHECK(k <= 1 || draft_token_ids.stride(1) == 1, op,
              ": draft_token_ids needs a unit last stride");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == batch && out.size(1) == k + 1 &&
                  out.is_contiguous() && out.scalar_type() == at::kLong,
              op, ": out must be a contiguous int64 [", batch, ", ", k + 1, "] tensor");
  TORCH_CHECK(num_draft_tokens.dim() == 1 && num_draft_tokens.size(0) == batch &&
                  num_draft_tokens.is_contiguous() && num_draft_tokens.scalar_type() == at::kLong,
              op, ": num_draft_tokens must be a contiguous int64 [", batch, "] tensor");
  TORCH_CHECK(greedy.dim() == 1 && greedy.size(0) == batch && greedy.is_contiguous() &&
                  greedy.scalar_type() == at::kBool,
              op, ": greedy must be a contiguous bool [", batch, "] tensor");
  TORCH_CHECK(uniform.dim() == 2 && uniform.size(0) == batch && uniform.size(1) == k &&
                  uniform.scalar_type() == at::kDouble && (k <= 1 || uniform.stride(1) == 1),
              op, ": uniform must be float64 [", batch, ", ", k, "] with a unit last stride");
  for (const at::Tensor* t : List{&target_probs, &exp_noise})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == k + 1 &&
                    t->size(2) == vocab && t->scalar_type() == at::kFloat &&
                    (vocab <= 1 || t->stride(2) == 1),
                op, ": target_probs and exp_noise must be float32 [", batch, ", ", k + 1,
                ", V] with a unit last stride, got ", t->sizes());
  TORCH_CHECK(vocab >= 1 && vocab <= INT32_MAX, op, ": the vocabulary must have 1 to 2^31 - 1 "
              "entries, got ", vocab);
  TORCH_CHECK(batch <= INT32_MAX, op, ": at most 2^31 - 1 rows, got ", batch);
  if (draft_probs.has_value()) {
    const at::Tensor& q = *draft_probs;
    TORCH_CHECK(q.device() == target_probs.device() && q.dim() == 3 && q.size(0) == batch &&
                    q.size(1) == k && q.size(2) == vocab && q.scalar_type() == at::kFloat &&
                    (vocab <= 1 || q.stride(2) == 1),
                op, ": draft_probs must be a float32 [", batch, ", ", k, ", ", vocab,
                "] tensor with a unit last stride on ", target_probs.device(), ", got ",
                q.sizes());
  }
  cuda::RejectionArgs a{};
  a.out = out.data_ptr<int64_t>();
  a.draft_token_ids = draft_token_ids.data_ptr<int64_t>();
  a.num_draft_tokens = num_draft_tokens.data_ptr<int64_t>();
  a.draft_probs = draft_probs.has_value() ? draft_probs->data_ptr<float>() : nullptr;
  a.target_probs = target_probs.data_ptr<float>();
  a.uniform = uniform.data_ptr<double>();
  a.exp_noise = exp_noise.data_ptr<float>();
  a.greedy = greedy.data_ptr<bool>();
  a.draft_stride = draft_token_ids.stride(0);
  a.q_stride_b = draft_probs.has_value() ? draft_probs->stride(0) : 0;
  a.q_stride_k = draft_probs.has_value() ? draft_probs->stride(1) : 0;
  a.p_stride_b = target_probs.stride(0);
  a.p_stride_k = target_probs.stride(1);
  a.u_stride = uniform.stride(0);
  a.n_stride_b = exp_noise.stride(0);
  a.n_stride_k = exp_noise.stride(1);
  a.batch = batch;
  a.k = k;
  a.vocab = vocab;
  return a;
}

}  // namespace octavo::cuda_args
