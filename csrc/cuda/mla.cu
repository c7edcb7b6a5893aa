// Launcher of the MLA attention kernel over the paged latent cache (mla.cuh).
#include "cuda/mla.cuh"

namespace octavo::cuda {

bool launch_mla_paged_attention(const MlaAttentionArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.num_heads == 0) return true;
  const dim3 grid(a.num_tokens, (a.num_heads + kMlaHeadsPerBlock - 1) / kMlaHeadsPerBlock);
  const size_t smem = mla_smem_bytes(a.latent_size, a.kv_lora_rank);
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    launch(mla_paged_attention_kernel<scalar_t>, grid, dim3(32 * kMlaHeadsPerBlock), smem, stream, a);
  });
}

}  // namespace octavo::cuda
