// Rotary embedding kernel: rotates the first rot_dim dims of every query/key head in place,
// neox (halves) or GPT-J (interleaved pairs) style, fp32 math (no torch headers).
#pragma once

#include "cuda/launch.cuh"

namespace octavo::cuda {

// grid: (T); each thread rotates pairs (head, i) of the token, i < rot_dim / 2.
template <typename T, typename C>
__global__ void rotary_embedding_kernel(RotaryArgs a) {
  const int64_t t = blockIdx.x;
  const int64_t pos = a.positions[t];
  OCTAVO_DEVICE_CHECK(pos >= 0 && pos < a.max_pos, "rotary_embedding: position out of range");
  const int half = a.rot_dim / 2;
  const C* cs = static_cast<const C*>(a.cos_sin) + pos * a.cos_sin_stride;
  const int heads = a.num_q_heads + (a.key ? a.num_k_heads : 0);
  for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int h = idx / half, i = idx % half;
    T* x = h < a.num_q_heads
               ? static_cast<T*>(a.query) + t * a.q_stride_token + h * a.q_stride_head
               : static_cast<T*>(a.key) + t * a.k_stride_token + (h - a.num_q_heads) * a.k_stride_head;
    const int i1 = a.is_neox ? i : 2 * i, i2 = a.is_neox ? i + half : 2 * i + 1;
    const float c = to_float(cs[i]), s = to_float(cs[half + i]);
    const float x1 = to_float(x[i1]), x2 = to_float(x[i2]);
    x[i1] = from_float<T>(x1 * c - x2 * s);
    x[i2] = from_float<T>(x2 * c + x1 * s);
  }
}

}  // namespace octavo::cuda
