// The one registration table: every octavo op's schema (TORCH_LIBRARY(octavo)) and its CPU,
// CUDA and Meta implementations. Outputs are preallocated by octavo.ops and marked Tensor!.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace {

// Meta (fake tensor) kernels: every op only writes preallocated outputs, so nothing to do.
void rms_norm_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, double) {}
void fused_add_rms_norm_meta(at::Tensor&, at::Tensor&, const at::Tensor&, double) {}
void linear_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                 const std::optional<at::Tensor>&) {}
void linear_packed_meta(at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&) {}
void silu_and_mul_meta(at::Tensor&, const at::Tensor&) {}
void gelu_and_mul_meta(at::Tensor&, const at::Tensor&, const std::string&) {}
void rotary_embedding_meta(const at::Tensor&, at::Tensor&, const std::optional<at::Tensor>&,
                           int64_t, const at::Tensor&, bool) {}
void reshape_and_cache_meta(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                            const at::Tensor&) {}
void paged_attention_meta(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,
                          double, const std::optional<at::Tensor>&) {}

}  // namespace

TORCH_LIBRARY(octavo, m) {
  // out = x / rms(x) * weight, rows of x [T, H]
  m.def("rms_norm(Tensor! out, Tensor x, Tensor weight, float eps) -> ()");
  // residual <- x + residual; x <- rms_norm(residual) * weight (both in place)
  m.def("fused_add_rms_norm(Tensor! x, Tensor! residual, Tensor weight, float eps) -> ()");
  // out [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N]); CPU only (small-M decode GEMM)
  m.def("linear(Tensor! out, Tensor x, Tensor weight, Tensor? bias) -> ()");
  // the same with a bf16 weight packed as [ceil(N/64), ceil(K/2), 64, 2] (64-output panels of K pairs)
  m.def("linear_packed(Tensor! out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  // out [T, D] = silu(x[:, :D]) * x[:, D:]
  m.def("silu_and_mul(Tensor! out, Tensor x) -> ()");
  // out [T, D] = gelu(x[:, :D], approximate) * x[:, D:]; approximate: "none" | "tanh"
  m.def("gelu_and_mul(Tensor! out, Tensor x, str approximate) -> ()");
  // rotates the first rot_dim dims of each query/key head in place (neox or GPT-J pairs)
  m.def("rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, "
        "Tensor cos_sin_cache, bool is_neox) -> ()");
  // writes key/value [T, Hk, hd] into the paged caches at slot_mapping (-1 skipped)
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
        "Tensor slot_mapping) -> ()");
  // causal varlen attention of query [T, Hq, hd] over the paged caches (prefill and decode)
  m.def("paged_attention(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
        "Tensor query_start_loc, Tensor seq_lens, Tensor block_table, float scale, "
        "int sliding_window, float soft_cap, Tensor? alibi_slopes) -> ()");
}

TORCH_LIBRARY_IMPL(octavo, CPU, m) {
  m.impl("rms_norm", &octavo::rms_norm_cpu);
  m.impl("fused_add_rms_norm", &octavo::fused_add_rms_norm_cpu);
  m.impl("linear", &octavo::linear_cpu);
  m.impl("linear_packed", &octavo::linear_packed_cpu);
  m.impl("silu_and_mul", &octavo::silu_and_mul_cpu);
  m.impl("gelu_and_mul", &octavo::gelu_and_mul_cpu);
  m.impl("rotary_embedding", &octavo::rotary_embedding_cpu);
  m.impl("reshape_and_cache", &octavo::reshape_and_cache_cpu);
  m.impl("paged_attention", &octavo::paged_attention_cpu);
}

#if defined(OCTAVO_WITH_CUDA)
TORCH_LIBRARY_IMPL(octavo, CUDA, m) {
  m.impl("rms_norm", &octavo::rms_norm_cuda);
  m.impl("fused_add_rms_norm", &octavo::fused_add_rms_norm_cuda);
  m.impl("silu_and_mul", &octavo::silu_and_mul_cuda);
  m.impl("gelu_and_mul", &octavo::gelu_and_mul_cuda);
  m.impl("rotary_embedding", &octavo::rotary_embedding_cuda);
  m.impl("reshape_and_cache", &octavo::reshape_and_cache_cuda);
  m.impl("paged_attention", &octavo::paged_attention_cuda);
}
#endif

TORCH_LIBRARY_IMPL(octavo, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_meta);
  m.impl("linear", &linear_meta);
  m.impl("linear_packed", &linear_packed_meta);
  m.impl("silu_and_mul", &silu_and_mul_meta);
  m.impl("gelu_and_mul", &gelu_and_mul_meta);
  m.impl("rotary_embedding", &rotary_embedding_meta);
  m.impl("reshape_and_cache", &reshape_and_cache_meta);
  m.impl("paged_attention", &paged_attention_meta);
}

// `import octavo._C` loads this library (and so registers the ops); the module itself is empty.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "octavo kernels (torch.ops.octavo)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
