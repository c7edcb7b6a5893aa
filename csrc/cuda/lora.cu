// Launchers of the batched LoRA kernels (lora.cuh); grids depend on shapes only.
#include "cuda/lora.cuh"

namespace octavo::cuda {

bool launch_lora_shrink(const LoraShrinkArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.rank == 0) return true;
  const dim3 grid(static_cast<unsigned>(a.num_tokens),
                  static_cast<unsigned>((a.rank + kLoraShrinkWarps - 1) / kLoraShrinkWarps));
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    launch(lora_shrink_kernel<scalar_t>, grid, dim3(32 * kLoraShrinkWarps), 0, stream, a.out,
           static_cast<const scalar_t*>(a.x), static_cast<const scalar_t*>(a.w), a.indices,
           a.out_stride, a.x_stride, a.num_slots, a.rank, a.k, a.scale);
  });
}

bool launch_lora_expand(const LoraExpandArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.n == 0) return true;
  const dim3 grid(static_cast<unsigned>(a.num_tokens),
                  static_cast<unsigned>((a.n + kLoraExpandThreads - 1) / kLoraExpandThreads));
  const size_t smem = sizeof(float) * static_cast<size_t>(a.rank > 0 ? a.rank : 1);
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    launch(lora_expand_kernel<scalar_t>, grid, dim3(kLoraExpandThreads), smem, stream,
           static_cast<scalar_t*>(a.out), a.x, static_cast<const scalar_t*>(a.w), a.indices,
           a.out_stride, a.x_stride, a.num_slots, a.n, a.rank, a.offset);
  });
}

}  // namespace octavo::cuda
