// The CPU decoder stack run from C++ (octavo.DecoderPlan): the Llama-family layer (pre-norm
// attention, then a gated MLP or a top-k MoE) over the layers a model holds, calling the CPU
// kernels directly. A decode step runs hundreds of small ops; from Python each costs a module
// call, argument checks and a dispatcher trip, which on a 2-core CPU was a quarter of a MoE
// step. The plan runs the same kernels, on the same inputs, in the same order as the Python
// layers (models/llama.py, models/layers/*), so its results are bit-identical to theirs;
// models/layers/decoder_plan.py decides which layers qualify and builds it from their modules.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "ops.h"

// a profiler scope named like the op it times (octavo bench latency --profile sorts by name);
// costs a flag test when no profiler runs
#define OCTAVO_RECORD(name) \
  RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{})

namespace octavo {
namespace {

using TensorDict = c10::Dict<std::string, at::Tensor>;
using IntDict = c10::Dict<std::string, int64_t>;
using FloatDict = c10::Dict<std::string, double>;
using StrDict = c10::Dict<std::string, std::string>;

std::optional<at::Tensor> opt(const TensorDict& d, const char* key) {
  auto it = d.find(key);
  return it == d.end() ? std::nullopt : std::optional<at::Tensor>(it->value());
}

at::Tensor need(const TensorDict& d, const char* key) {
  auto it = d.find(key);
  TORCH_CHECK(it != d.end(), "DecoderPlan: layer is missing tensor '", key, "'");
  return it->value();
}

template <typename D>
auto need_value(const D& d, const char* key) {
  auto it = d.find(key);
  TORCH_CHECK(it != d.end(), "DecoderPlan: layer is missing '", key, "'");
  return it->value();
}

// torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, bias, "none", [], ""): a boxed call, as
// the op is registered by torch's mkldnn library rather than declared in ATen's headers
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  OCTAVO_RECORD("mkldnn::_linear_pointwise");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x.contiguous());
  stack.emplace_back(w);
  stack.emplace_back(bias);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::optional<std::string>(""));
  op.callBoxed(stack);
  return stack.back().toTensor();
}

// A linear layer's weight as its CPU kernel takes it, with its optional bias:
//   kind 0: bf16 [n, K] packed by pack_linear_panels (linear_packed)
//   kind 1: INT4 (int4_gemm; perm: act-order columns of x, as ops.int4_gemm_prepared gathers)
//   kind 2: weight-only INT8 (int8_woq_gemm)
//   kind 3: a plain [n, K] weight (at::linear, as F.linear: unpacked or dequantized at load)
//   kind 4: oneDNN's prepacked weight (mkldnn::_linear_pointwise, as cpu_gemm.linear: fp32)
struct Linear {
  int64_t kind = 0;
  at::Tensor packed, scales_offsets;
  int64_t n = 0, group_size = 0;
  std::optional<at::Tensor> bias, perm;

  // models/layers/cpu_gemm.linear / ops.int4_gemm_prepared / ops.int8_woq_gemm_prepared for a
  // 2-D input
  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == 3) return at::linear(x, packed, bias);
    if (kind == 4) return onednn_linear(x, packed, bias);
    OCTAVO_RECORD(kind == 0 ? "octavo::linear_packed" : kind == 1 ? "octavo::int4_gemm"
                                                                   : "octavo::int8_woq_gemm");
    at::Tensor xin = perm ? x.index_select(1, *perm) : x.stride(-1) == 1 ? x : x.contiguous();
    at::Tensor out = at::empty({x.size(0), n}, x.options());
    if (kind == 0) {
      linear_packed_cpu(out, xin, packed, bias);
      return out;
    }
    std::optional<at::Tensor> b = bias;  // the quantized paths cast it to x's dtype per call
    if (b && b->scalar_type() != x.scalar_type()) b = b->to(x.scalar_type());
    if (kind == 1) {
      int4_gemm_cpu(out, xin, packed, scales_offsets, group_size, b);
    } else {
      int8_woq_gemm_cpu(out, xin, packed, scales_offsets, group_size, b);
    }
    return out;
  }
};

Linear linear_of(const TensorDict& t, const IntDict& i, const std::string& name) {
  Linear l;
  l.kind = need_value(i, (name + ".kind").c_str());
  TORCH_CHECK(l.kind >= 0 && l.kind <= 4, "DecoderPlan: unknown linear kind ", l.kind);
  l.packed = need(t, (name + ".packed").c_str());
  l.n = need_value(i, (name + ".n").c_str());
  l.bias = opt(t, (name + ".bias").c_str());
  if (l.kind == 1 || l.kind == 2) {
    l.scales_offsets = need(t, (name + ".scales_offsets").c_str());
    l.group_size = need_value(i, (name + ".group_size").c_str());
    l.perm = opt(t, (name + ".perm").c_str());
  }
  return l;
}

// The gated MLP: down(act(gate_up(x))).
struct Mlp {
  Linear gate_up, down;
  std::string act;  // "silu" | "gelu" | "gelu_tanh"

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor gu = gate_up(x);
    at::Tensor a = at::empty({gu.size(0), gu.size(1) / 2}, gu.options());
    {
      OCTAVO_RECORD("octavo::act_and_mul");
      if (act == "silu") {
        silu_and_mul_cpu(a, gu);
      } else {
        gelu_and_mul_cpu(a, gu, act == "gelu_tanh" ? "tanh" : "none");
      }
    }
    return down(a);
  }
};

Mlp mlp_of(const TensorDict& t, const IntDict& i, const StrDict& s, const std::string& prefix) {
  return Mlp{linear_of(t, i, prefix + "gate_up"), linear_of(t, i, prefix + "down"),
             need_value(s, (prefix + "act").c_str())};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  OCTAVO_RECORD("octavo::rms_norm");
  at::Tensor out = at::empty_like(x);
  rms_norm_cpu(out, x, w, eps);
  return out;
}

// models/llama.add_and_norm: (norm(hidden + residual), hidden + residual), updating hidden and
// res in place as the fused kernel does; no residual yet: (norm(hidden), hidden); no norm: the
// sum is both.
at::Tensor add_and_norm(const std::optional<at::Tensor>& w, double eps, at::Tensor& hidden,
                        at::Tensor& res) {
  if (!w) {
    res = res.defined() ? hidden + res : hidden;
    return res;
  }
  if (!res.defined()) {
    at::Tensor h = rms_norm(hidden.contiguous(), *w, eps);
    res = hidden;
    return h;
  }
  if (!hidden.is_contiguous() || !res.is_contiguous()) {
    hidden = hidden.contiguous();
    res = res.contiguous();
  }
  OCTAVO_RECORD("octavo::fused_add_rms_norm");
  fused_add_rms_norm_cpu(hidden, res, *w, eps);
  return hidden;
}

struct Layer {
  // RMSNorms around attention and MLP (absent where the family has none: OLMo2 has no pre-norms,
  // Gemma 2/3 and OLMo2 post-norms), and the multiplier on each block's output (Granite)
  std::optional<at::Tensor> pre_attn, post_attn, pre_mlp, post_mlp;
  double pre_attn_eps = 0, post_attn_eps = 0, pre_mlp_eps = 0, post_mlp_eps = 0;
  double residual_scale = 1;
  // attention
  Linear qkv, o;
  int64_t q_size = 0, kv_size = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  std::optional<at::Tensor> q_norm, k_norm;  // over q_norm_size / k_norm_size values at a time
  double qk_eps = 0, clip = 0;                // clip: clamp q, k, v to [-clip, clip] (0: no)
  int64_t q_norm_size = 0, k_norm_size = 0;
  std::optional<at::Tensor> cos_sin;
  bool neox = true;
  mutable at::Tensor k_cache, v_cache;  // written through by reshape_and_cache
  double scale = 1, soft_cap = 0;
  double k_scale = 1, v_scale = 1;  // an fp8 cache's K/V scales
  int64_t window = 0;
  // MLP: dense, or router + experts (+ a shared expert, optionally gated)
  bool moe = false;
  Mlp mlp;
  Linear router;
  int64_t top_k = 1, n_group = 1, topk_group = 1, inter = 0;
  bool renormalize = true, router_fp32 = false;
  std::string scoring, group_score, moe_act;
  double routed_scaling = 1;
  std::optional<at::Tensor> score_bias;
  at::Tensor w13, w2;
  bool has_shared = false;
  Mlp shared;
  std::optional<Linear> shared_gate;

  // LlamaDecoderLayer._finish: a block's output through its post-norm, times residual_scale
  at::Tensor finish(at::Tensor out, const std::optional<at::Tensor>& norm, double eps) const {
    if (norm) out = rms_norm(out.contiguous(), *norm, eps);
    if (residual_scale != 1.0) out = out * residual_scale;
    return out;
  }

  at::Tensor attention(const at::Tensor& h, const at::Tensor& positions, const at::Tensor& slots,
                       const at::Tensor& qsl, const at::Tensor& seq_lens,
                       const at::Tensor& block_table) const {
    const int64_t t = h.size(0);
    at::Tensor qkv_out = qkv(h);
    at::Tensor q = qkv_out.narrow(1, 0, q_size);
    at::Tensor k = qkv_out.narrow(1, q_size, kv_size);
    at::Tensor v = qkv_out.narrow(1, q_size + kv_size, kv_size);
    if (q_norm) {  // per head (head_dim values) or over all heads (OLMo2), as make_qk_norm made it
      q = rms_norm(q.reshape({-1, q_norm_size}).contiguous(), *q_norm, qk_eps).view({t, q_size});
      k = rms_norm(k.reshape({-1, k_norm_size}).contiguous(), *k_norm, qk_eps).view({t, kv_size});
    }
    if (clip != 0) {
      q = q.clamp(-clip, clip);
      k = k.clamp(-clip, clip);
      v = v.clamp(-clip, clip);
    }
    if (cos_sin) {
      OCTAVO_RECORD("octavo::rotary_embedding");
      rotary_embedding_cpu(positions, q, k, head_dim, *cos_sin, neox);
    }
    at::Tensor q3 = q.view({t, num_heads, head_dim});
    {
      OCTAVO_RECORD("octavo::reshape_and_cache");
      reshape_and_cache_cpu(k.view({t, num_kv_heads, head_dim}),
                            v.view({t, num_kv_heads, head_dim}), k_cache, v_cache, slots, k_scale,
                            v_scale);
    }
    at::Tensor attn = at::empty_like(q3);
    {
      OCTAVO_RECORD("octavo::paged_attention");
      paged_attention_cpu(attn, q3, k_cache, v_cache, qsl, seq_lens, block_table, scale, window,
                          soft_cap, std::nullopt, k_scale, v_scale);
    }
    return o(attn.view({t, num_heads * head_dim}));
  }

  at::Tensor feed_forward(const at::Tensor& x) const {
    if (!moe) return mlp(x);
    at::Tensor logits = router(router_fp32 ? x.to(at::kFloat) : x);
    const int64_t t = x.size(0);
    at::Tensor weights = at::empty({t, top_k}, x.options().dtype(at::kFloat));
    at::Tensor ids = at::empty({t, top_k}, x.options().dtype(at::kInt));
    {
      OCTAVO_RECORD("octavo::topk_routing");
      topk_routing_cpu(weights, ids, logits, scoring, renormalize, score_bias, n_group, topk_group,
                       group_score, routed_scaling);
    }
    at::Tensor out = at::empty_like(x);
    {
      OCTAVO_RECORD("octavo::fused_moe_packed");
      fused_moe_packed_cpu(out, x, w13, w2, weights, ids, inter, moe_act);
    }
    if (has_shared) {  // MoEBlock: out + (sigmoid(shared_gate(x)) *) shared_expert(x)
      at::Tensor s = shared(x);
      if (shared_gate) s = at::sigmoid((*shared_gate)(x)) * s;
      out = out + s;
    }
    return out;
  }
};

}  // namespace

struct DecoderPlan : torch::CustomClassHolder {
  std::vector<Layer> layers;

  void add_layer(TensorDict t, IntDict i, FloatDict f, StrDict s) {
    Layer l;
    l.pre_attn = opt(t, "pre_attn_norm");
    l.post_attn = opt(t, "post_attn_norm");
    l.pre_mlp = opt(t, "pre_mlp_norm");
    l.post_mlp = opt(t, "post_mlp_norm");
    if (l.pre_attn) l.pre_attn_eps = need_value(f, "pre_attn_eps");
    if (l.post_attn) l.post_attn_eps = need_value(f, "post_attn_eps");
    if (l.pre_mlp) l.pre_mlp_eps = need_value(f, "pre_mlp_eps");
    if (l.post_mlp) l.post_mlp_eps = need_value(f, "post_mlp_eps");
    l.residual_scale = need_value(f, "residual_scale");
    l.clip = need_value(f, "clip");
    l.qkv = linear_of(t, i, "qkv");
    l.o = linear_of(t, i, "o");
    l.q_size = need_value(i, "q_size");
    l.kv_size = need_value(i, "kv_size");
    l.num_heads = need_value(i, "num_heads");
    l.num_kv_heads = need_value(i, "num_kv_heads");
    l.head_dim = need_value(i, "head_dim");
    l.q_norm = opt(t, "q_norm");
    l.k_norm = opt(t, "k_norm");
    TORCH_CHECK(l.q_norm.has_value() == l.k_norm.has_value(), "DecoderPlan: q_norm without k_norm");
    if (l.q_norm) {
      l.qk_eps = need_value(f, "qk_eps");
      l.q_norm_size = need_value(i, "q_norm_size");
      l.k_norm_size = need_value(i, "k_norm_size");
    }
    l.cos_sin = opt(t, "cos_sin");
    l.neox = need_value(i, "neox") != 0;
    l.k_cache = need(t, "k_cache");
    l.v_cache = need(t, "v_cache");
    l.scale = need_value(f, "scale");
    l.soft_cap = need_value(f, "soft_cap");
    l.k_scale = need_value(f, "k_scale");
    l.v_scale = need_value(f, "v_scale");
    l.window = need_value(i, "window");
    l.moe = need_value(i, "moe") != 0;
    if (!l.moe) {
      l.mlp = mlp_of(t, i, s, "mlp.");
    } else {
      l.router = linear_of(t, i, "router");
      l.router_fp32 = need_value(i, "router_fp32") != 0;
      l.top_k = need_value(i, "top_k");
      l.n_group = need_value(i, "n_group");
      l.topk_group = need_value(i, "topk_group");
      l.inter = need_value(i, "inter");
      l.renormalize = need_value(i, "renormalize") != 0;
      l.scoring = need_value(s, "scoring");
      l.group_score = need_value(s, "group_score");
      l.moe_act = need_value(s, "moe_act");
      l.routed_scaling = need_value(f, "routed_scaling");
      l.score_bias = opt(t, "score_bias");
      l.w13 = need(t, "w13");
      l.w2 = need(t, "w2");
      l.has_shared = i.contains("shared.gate_up.n");
      if (l.has_shared) l.shared = mlp_of(t, i, s, "shared.");
      if (t.contains("shared_gate.packed")) l.shared_gate = linear_of(t, i, "shared_gate");
    }
    layers.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers.size()); }

  // (hidden, residual) after every layer, as LlamaDecoderLayer.forward returns them in turn;
  // residual None: the first layer's input is the embedding itself.
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor hidden, std::optional<at::Tensor> residual,
                                         at::Tensor positions, at::Tensor slot_mapping,
                                         at::Tensor query_start_loc, at::Tensor seq_lens,
                                         at::Tensor block_table) const {
    OCTAVO_RECORD("octavo::DecoderPlan.run");
    TORCH_CHECK(hidden.dim() == 2 && hidden.device().is_cpu(),
                "DecoderPlan.run: hidden must be a CPU [T, H] tensor");
    at::Tensor res;
    if (residual) {
      res = *residual;
    }
    for (const Layer& l : layers) {
      at::Tensor h = add_and_norm(l.pre_attn, l.pre_attn_eps, hidden, res);
      at::Tensor a = l.finish(
          l.attention(h, positions, slot_mapping, query_start_loc, seq_lens, block_table),
          l.post_attn, l.post_attn_eps);
      h = add_and_norm(l.pre_mlp, l.pre_mlp_eps, a, res);
      hidden = l.finish(l.feed_forward(h), l.post_mlp, l.post_mlp_eps);
    }
    return {hidden, res};
  }
};

void register_decoder_plan(torch::Library& m) {
  m.class_<DecoderPlan>("DecoderPlan")
      .def(torch::init<>())
      .def("add_layer", &DecoderPlan::add_layer)
      .def("num_layers", &DecoderPlan::num_layers)
      .def("run", &DecoderPlan::run);
}

}  // namespace octavo
