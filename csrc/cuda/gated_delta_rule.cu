// Launchers of the gated delta rule: the recurrent kernel (gated_delta_rule.cuh) for decode
// rows and the chunked one (gated_delta_rule_chunk.cuh) for prefill rows; grids depend on shapes
// only.
#include "cuda/gated_delta_rule.cuh"
#include "cuda/gated_delta_rule_chunk.cuh"

namespace octavo::cuda {

template <typename T, int C>
void launch_gated_delta_rule_chunk(const GdrArgs& a, dim3 grid, cudaStream_t stream) {
  const size_t smem = sizeof(float) * static_cast<size_t>(gdr_chunk_smem_floats(a.kdim, C));
#ifndef OCTAVO_SIMT
  // over the default 48 KiB: opt in (a failure shows as the launch's error)
  (void)cudaFuncSetAttribute(gated_delta_rule_chunk_kernel<T, C>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
#endif
  launch(gated_delta_rule_chunk_kernel<T, C>, grid, dim3(32 * kGdrWarps), smem, stream, a);
}

bool launch_gated_delta_rule(const GdrArgs& a, cudaStream_t stream) {
  if (a.num_seqs == 0 || a.heads == 0 || a.vdim == 0) return true;
  const dim3 grid(static_cast<unsigned>(a.num_seqs), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>((a.vdim + kGdrCols - 1) / kGdrCols));
  const size_t smem = sizeof(float) * static_cast<size_t>(a.kdim * (kGdrCols + 3));
  // without query_start_loc every sequence is one token: no prefill row
  const bool prefill = a.query_start_loc != nullptr;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    launch(gated_delta_rule_kernel<scalar_t>, grid, dim3(32 * kGdrWarps), smem, stream, a);
    if (prefill && a.kdim <= kGdrChunkMaxKeyDim)
      launch_gated_delta_rule_chunk<scalar_t, kGdrChunk>(a, grid, stream);
    else if (prefill)
      launch_gated_delta_rule_chunk<scalar_t, kGdrChunkLargeK>(a, grid, stream);
  });
}

}  // namespace octavo::cuda
