"""LongCat-Flash (LongcatFlashForCausalLM): each of num_layers decoder layers holds two MLA
attention sublayers and two dense MLPs, plus one "shortcut" MoE whose input is the normed state
after the first attention sublayer and whose output joins the residual stream only after the
second MLP. The MoE router (an fp32 softmax over n_routed_experts + zero_expert_num experts, the
choice steered by e_score_correction_bias, weights not renormalised, times routed_scaling_factor)
may pick "zero-computation" experts: an identity, so the token contributes weight * x for each.

Attention is DeepSeek-V3's MLA (models/layers/mla.py, latent cache: 2 cache layers per decoder
layer) with interleaved rotary and LoRA scalings: q times sqrt(hidden / q_lora_rank) (folded into
the softmax scale) and the normed kv latent times sqrt(hidden / kv_lora_rank) (so cached scaled).
The checkpoint's MTP layers (model.mtp.*) are not used and are skipped by the loader.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from octavo import ops, ops_native
from octavo.models.deepseek_v2 import mla_softmax_scale
from octavo.models.layers.attention import AttentionMetadata
from octavo.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from octavo.models.layers.fused_moe import FusedMoE, MoEWeightRouting, moe_activation
from octavo.models.layers.layernorm import RMSNorm
from octavo.models.layers.linear import ReplicatedLinear
from octavo.models.layers.mla import MultiHeadLatentAttention
from octavo.models.layers.pipeline import StageLayers, run_stage
from octavo.models.llama import LlamaMLP, add_and_norm

# transformers' LongcatFlashMLA builds its q_a / kv_a norms without the config's eps
LORA_NORM_EPS = 1e-6


class ScaledRMSNorm(RMSNorm):
    """RMSNorm whose output is multiplied by a constant (LongCat's kv LoRA scaling)."""

    def __init__(self, hidden_size: int, eps: float, scale: float):
        super().__init__(hidden_size, eps=eps)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class LongcatFlashMLA(MultiHeadLatentAttention):
    def __init__(self, config):
        if not getattr(config, "q_lora_rank", None):
            raise ValueError("LongCat-Flash needs q_lora_rank (its MLA always compresses q)")
        head_dim = getattr(config, "head_dim", None)
        if head_dim is not None and head_dim != config.qk_rope_head_dim:
            raise ValueError(f"LongCat-Flash rotates qk_rope_head_dim={config.qk_rope_head_dim} "
                             f"values with a rotary of head_dim={head_dim}: they must be equal")
        q_scale = (config.hidden_size / config.q_lora_rank) ** 0.5
        # q (nope and rope parts) times q_scale only scales the attention logits
        super().__init__(config, rope_neox=False, scale=mla_softmax_scale(config) * q_scale)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=LORA_NORM_EPS)
        self.kv_a_layernorm = ScaledRMSNorm(
            config.kv_lora_rank, eps=LORA_NORM_EPS,
            scale=(config.hidden_size / config.kv_lora_rank) ** 0.5)


class ZeroExpertFusedMoE(FusedMoE):
    """FusedMoE whose router also chooses among `num_zero_experts` identity experts (ids E and
    up): the fused op runs the routed pairs, and each zero-expert pair adds weight * x. A
    zero-expert pair is handed to the fused op with weight 0 on an expert its token already
    chose (none chosen: expert 0), so the op reads no extra expert weights for it."""

    def __init__(self, num_experts: int, num_zero_experts: int, top_k: int, hidden_size: int,
                 intermediate_size: int, **kwargs):
        super().__init__(num_experts, top_k, hidden_size, intermediate_size, score_bias=True,
                         **kwargs)
        self.num_zero_experts = num_zero_experts
        total = num_experts + num_zero_experts
        self.e_score_correction_bias = nn.Parameter(torch.zeros(total, dtype=torch.float32),
                                                    requires_grad=False)
        self.e_score_correction_bias.weight_loader = self._bias_loader

    def weight_loader(self, param, loaded: torch.Tensor, shard_id) -> None:
        # transformers' stacked gate_up_proj has rows for the zero experts too: [E + Z, 2I, H]
        if shard_id == "w13" and loaded.shape[0] == self.num_experts + self.num_zero_experts:
            loaded = loaded[:self.num_experts]
        super().weight_loader(param, loaded, shard_id)

    def _split(self, weights: torch.Tensor, ids: torch.Tensor):
        # weights, ids [T, k] over E + Z experts -> the fused op's (weights, ids) and the
        # identity weight [T, 1]
        routed = ids < self.num_experts
        chosen = torch.where(routed, ids, self.num_experts).amin(dim=1, keepdim=True)
        stand_in = torch.where(chosen == self.num_experts, 0, chosen)
        identity = torch.where(routed, 0.0, weights).sum(dim=1, keepdim=True)
        return (torch.where(routed, weights, 0.0), torch.where(routed, ids, stand_in).int(),
                identity)

    def forward_ops(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids, identity = self._split(*self._route(ops, router_logits))
        if self._prepared is None:
            self.process_weights_after_loading()
        out = ops.fused_moe_prepared(hidden, self._prepared, weights, ids, self.activation)
        return self._reduce(out) + (identity * hidden.float()).to(hidden.dtype)

    def forward_native(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids, identity = self._split(*self._route(ops_native, router_logits))
        w13, w2 = self.w13_weight, self.w2_weight
        if w13.numel() == 0:
            p = self._prepared
            w13, w2 = ops_native.unpack_moe_weights(p.w13, p.w2, p.hidden_size, p.inter_size)
        out = ops_native.fused_moe(hidden, w13, w2, weights, ids, self.activation)
        return self._reduce(out) + (identity * hidden.float()).to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, zero_experts={self.num_zero_experts}"


class LongcatFlashMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        zero = getattr(config, "zero_expert_num", 0) or 0
        self.router = ReplicatedLinear(config.hidden_size, config.n_routed_experts + zero,
                                       bias=bool(getattr(config, "router_bias", False)),
                                       params_dtype=torch.float32)
        self.experts = ZeroExpertFusedMoE(
            config.n_routed_experts, zero, config.moe_topk, config.hidden_size,
            config.expert_ffn_hidden_size, renormalize=False, scoring="softmax",
            routed_scaling_factor=config.routed_scaling_factor,
            activation=moe_activation(config.hidden_act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.router(x.float()))


class LongcatFlashDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = nn.ModuleList(LongcatFlashMLA(config) for _ in range(2))
        self.mlps = nn.ModuleList(LlamaMLP(config) for _ in range(2))
        self.input_layernorm = nn.ModuleList(RMSNorm(h, eps=eps) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(RMSNorm(h, eps=eps) for _ in range(2))
        self.mlp = LongcatFlashMoE(config)

    def forward(self, positions, hidden, residual, attn_metadata):
        # (hidden, residual) as in the Llama decoder: the layer's state is their sum
        shortcut = None
        for i in range(2):
            hidden, residual = add_and_norm(self.input_layernorm[i], hidden, residual)
            hidden = self.self_attn[i](positions, hidden, attn_metadata)
            hidden, residual = self.post_attention_layernorm[i](hidden, residual)
            if i == 0:
                shortcut = self.mlp(hidden)
            hidden = self.mlps[i](hidden)
        return hidden + shortcut, residual


class LongcatFlashModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = StageLayers(config.num_layers, lambda i: LongcatFlashDecoderLayer(config))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, attn_metadata, intermediate=None):
        return run_stage(self.layers, intermediate,
                         embed=lambda: (self.embed_tokens(input_ids), None),
                         step=lambda layer, state: layer(positions, *state, attn_metadata),
                         finish=lambda state: add_and_norm(self.norm, *state)[0])


class LongcatFlashForCausalLM(MoEWeightRouting, nn.Module):
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    checkpoint_renames = (
        (r"\.mlp\.router\.classifier\.", ".mlp.router."),
        (r"\.mlp\.router\.e_score_correction_bias$", ".mlp.experts.e_score_correction_bias"),
    )

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LongcatFlashModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.model.embed_tokens)

    def route_weight(self, name: str):
        # per-expert checkpoints also store gate/up projections for the zero experts: unused
        one = re.fullmatch(r".*\.mlp\.experts\.(\d+)\.\w+\.weight", name)
        if one and int(one.group(1)) >= self.config.n_routed_experts:
            return f"{name} (a zero expert's unused projection)", None
        return super().route_weight(name)

    supports_pipeline_parallel = True
    pp_intermediate_tensors = 2          # (hidden, residual)
    pp_layers_config_key = "num_layers"  # num_hidden_layers counts its 2 attentions per layer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, intermediate=None) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size] (on a pipeline stage but
        # the last: (hidden, residual))
        return self.model(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
