// Launcher for the paged attention kernels (attention.cuh). Every launch configuration follows
// from tensor shapes only (no host read of seq_lens / query_start_loc), so the decode path can
// be captured in a CUDA graph.
#include <algorithm>
#include <type_traits>

#include "cuda/attention.cuh"
#include "cuda/attention_prefill.cuh"

namespace octavo::cuda {
namespace {

// A batch with one query row per sequence (T == S) takes the split-context decode kernels.
bool is_decode(const PagedAttentionArgs& a) { return a.num_tokens == a.num_seqs; }

// The decode split of the longest context the block table holds, from shapes only: enough
// partitions for about kDecodeBlocks blocks and at most kMaxPartitionChunks chunks each, but
// never more than kMaxPartitions (each a multiple of kChunk keys). A big batch fills the GPU
// without splits; a small one splits its contexts; blocks past a short context exit at once.
struct DecodeSplit {
  int partitions, partition_keys;
};
DecodeSplit decode_split(const PagedAttentionArgs& a) {
  const int64_t max_keys = int64_t(a.max_blocks) * a.block_size;
  const int64_t chunks = (max_keys + attn::kChunk - 1) / attn::kChunk;
  const int64_t heads_seqs = std::max<int64_t>(1, int64_t(a.num_heads) * a.num_seqs);
  int64_t parts = std::max((attn::kDecodeBlocks + heads_seqs - 1) / heads_seqs,
                           (chunks + attn::kMaxPartitionChunks - 1) / attn::kMaxPartitionChunks);
  parts = std::max<int64_t>(1, std::min<int64_t>({parts, attn::kMaxPartitions, chunks}));
  const int64_t keys = std::max<int64_t>(1, (chunks + parts - 1) / parts) * attn::kChunk;
  return {static_cast<int>((max_keys + keys - 1) / keys), static_cast<int>(keys)};
}

// Runs BODY with HD_MAX bound to the head-size bucket (attn::head_bucket).
template <typename F>
void head_switch(int head_size, F&& body) {
  switch (attn::head_bucket(head_size)) {
    case 32: body(std::integral_constant<int, 32>{}); break;
    case 64: body(std::integral_constant<int, 64>{}); break;
    case 128: body(std::integral_constant<int, 128>{}); break;
    default: body(std::integral_constant<int, 256>{}); break;
  }
}

template <typename T, typename C, int HD_MAX>
void launch_decode(const PagedAttentionArgs& a, cudaStream_t stream) {
  const DecodeSplit split = decode_split(a);
  const int parts = split.partitions > 0 ? split.partitions : 1;
  PagedAttentionArgs d = a;
  if (parts == 1) d.workspace = nullptr;  // one partition: the kernel writes the output itself
  launch(attn::paged_decode_kernel<T, C, HD_MAX>, dim3(a.num_heads, a.num_seqs, parts),
         dim3(attn::kThreads), 0, stream, d, split.partition_keys);
  if (parts > 1)
    launch(attn::paged_decode_merge_kernel<T>, dim3(a.num_heads, a.num_seqs), dim3(attn::kThreads),
           0, stream, d, parts);
}

template <typename T, typename C, int HD_MAX>
void launch_prefill(const PagedAttentionArgs& a, cudaStream_t stream) {
  // The tensor-core prefill (attention_prefill.cuh) goes first; this kernel serves the shapes
  // and dtypes it declines (fp32 queries, head sizes outside {32, 64, 80, 96, 128}, unaligned
  // rows).
  if (launch_paged_prefill_mma(a, stream)) return;
  constexpr int rows = attn::PrefillShape<HD_MAX>::kRows;
  const int64_t tiles = a.num_tokens / rows + a.num_seqs;  // upper bound, see attn::tile_seq
  launch(attn::paged_prefill_kernel<T, C, HD_MAX>, dim3(tiles, a.num_heads), dim3(attn::kThreads), 0,
         stream, a);
}

// Query/output type T, cache element type C (T, or Fp8Kv for an fp8 cache).
template <typename T, typename C, int HD_MAX>
void launch_attention(const PagedAttentionArgs& a, cudaStream_t stream) {
  if (is_decode(a)) launch_decode<T, C, HD_MAX>(a, stream);
  else launch_prefill<T, C, HD_MAX>(a, stream);
}

}  // namespace

int64_t paged_attention_workspace_floats(const PagedAttentionArgs& a) {
  if (!is_decode(a) || a.num_tokens == 0) return 0;
  const int64_t parts = decode_split(a).partitions;
  return parts > 1 ? a.num_tokens * a.num_heads * parts * (a.head_size + 2) : 0;
}

bool launch_paged_attention(const PagedAttentionArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.num_seqs == 0) return true;
  OCTAVO_CUDA_DTYPE_SWITCH(a.dtype, [&] {
    head_switch(a.head_size, [&](auto hd_max) {
      if (a.cache_fp8) launch_attention<scalar_t, Fp8Kv, hd_max.value>(a, stream);
      else launch_attention<scalar_t, scalar_t, hd_max.value>(a, stream);
    });
  });
}

}  // namespace octavo::cuda
