"""Hybrid models whose config.json is in the form their released checkpoints carry, not the one
transformers 5 writes: legacy layer types ("mamba" / "attention" / "hybrid"), flat rope_theta,
torch_dtype, Kimi-Linear's `linear_attn_config` sub-dict and its own MoE field names. Each test
rewrites a tiny transformers-written model's config.json into the released form (same weights)
and checks octavo's greedy ids and top-5 logprobs against transformers run on the original
directory."""
from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoConfig

from parity import PROMPTS, assert_matches_hf
from test_kimi_linear_parity import build_kimi
from test_zamba2_parity import build_zamba2
from tiny_models import build_tiny_ssm_model

ARCHITECTURES = ["JambaForCausalLM", "BambaForCausalLM", "GraniteMoeHybridForCausalLM",
                 "Zamba2ForCausalLM", "KimiLinearForCausalLM"]

LEGACY = {"linear_attention": "mamba", "full_attention": "attention"}


def _common(c: dict) -> dict:
    """Fields every released config of the 4.x era has in place of transformers 5's."""
    c = dict(c)
    c["torch_dtype"] = c.pop("dtype")
    c["transformers_version"] = "4.48.0"
    rope = c.pop("rope_parameters", None)
    if rope is not None:
        c["rope_theta"] = rope["rope_theta"]
        c["rope_scaling"] = None
    c.pop("time_step_limit", None)             # released Bamba / Granite 4.0 configs omit it
    return c


def jamba_released(c: dict) -> dict:
    """ai21labs/Jamba-v0.1: n_ctx, mamba_inner_layernorms, calc_logits_for_entire_prompt.
    (transformers ignores n_ctx and keeps its default of 262144 positions, which is what the
    released n_ctx says: the test passes max_model_len.)"""
    c = _common(c)
    c["n_ctx"] = c.pop("max_position_embeddings")
    c.update(mamba_inner_layernorms=True, calc_logits_for_entire_prompt=False,
             sliding_window=None)
    for key in ("use_associative_scan", "layer_norm_epsilon"):
        c.pop(key, None)
    return c


def bamba_released(c: dict) -> dict:
    """ibm-ai-platform/Bamba-9B: flat rope_theta, attn_rotary_emb (half the head), mamba_dt_rank,
    use_mamba_kernels; no partial_rotary_factor, no time_step_limit."""
    c = _common(c)
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    c.update(attn_rotary_emb=head_dim // 2, mamba_dt_rank=4, use_mamba_kernels=True)
    return c


def granite_released(c: dict) -> dict:
    """ibm-granite/granite-4.0-h-*: layer_types "mamba" / "attention", init_method,
    normalization_function, flat rope_theta."""
    c = _common(c)
    c["layer_types"] = [LEGACY[t] for t in c["layer_types"]]
    c.update(init_method="mup", normalization_function="rmsnorm")
    return c


def zamba2_released(c: dict) -> dict:
    """Zyphra/Zamba2-*: layers_block_type "mamba" / "hybrid", Megatron-style extras
    (ffn_hidden_size, use_shared_mlp_adapter), flat rope_theta, no derived attention sizes."""
    c = _common(c)
    c["layers_block_type"] = [LEGACY.get(t, t) for t in c["layers_block_type"]]
    c.update(ffn_hidden_size=c["intermediate_size"], use_shared_mlp_adapter=True)
    for key in ("attention_head_dim", "attention_hidden_size"):
        c.pop(key)
    return c


def kimi_released(c: dict) -> dict:
    """moonshotai/Kimi-Linear-48B-A3B-*: layer kinds in `linear_attn_config` (1-based layer
    numbers), KDA sizes there too, first_k_dense_replace instead of mlp_layer_types, and the
    checkpoint's own names for fields transformers renames."""
    c = _common(c)
    kinds, mlp = c.pop("layer_types"), c.pop("mlp_layer_types")
    c["linear_attn_config"] = {
        "full_attn_layers": [i + 1 for i, k in enumerate(kinds) if k == "full_attention"],
        "kda_layers": [i + 1 for i, k in enumerate(kinds) if k == "linear_attention"],
        "num_heads": c.pop("linear_num_heads"), "head_dim": c.pop("linear_head_dim"),
        "short_conv_kernel_size": c.pop("linear_conv_kernel_dim")}
    first_sparse = mlp.index("sparse")
    assert mlp == ["dense"] * first_sparse + ["sparse"] * (len(mlp) - first_sparse)
    c.update(first_k_dense_replace=first_sparse, moe_layer_freq=1, mla_use_nope=True,
             moe_router_activation_func="sigmoid", use_grouped_topk=True,
             num_nextn_predict_layers=0, head_dim=72)
    for key in ("qk_head_dim", "pretraining_tp", "output_router_logits"):
        c.pop(key)
    return c


def _released_copy(src: str, dst: str, convert) -> str:
    shutil.copytree(src, dst)
    with open(f"{src}/config.json") as f:
        config = json.load(f)
    with open(f"{dst}/config.json", "w") as f:
        json.dump(convert(config), f, indent=2)
    return dst


CASES = {
    "JambaForCausalLM": (lambda p: build_tiny_ssm_model(p, "JambaForCausalLM"), jamba_released),
    "BambaForCausalLM": (lambda p: build_tiny_ssm_model(p, "BambaForCausalLM"), bamba_released),
    "GraniteMoeHybridForCausalLM": (
        lambda p: build_tiny_ssm_model(p, "GraniteMoeHybridForCausalLM"), granite_released),
    # granite-4.0-h-micro / h-1b: no routed experts (the shared MLP alone), no position encoding
    "GraniteMoeHybridForCausalLM-dense-nope": (
        lambda p: build_tiny_ssm_model(p, "GraniteMoeHybridForCausalLM", num_local_experts=0,
                                       position_embedding_type="nope"), granite_released),
    "Zamba2ForCausalLM": (build_zamba2, zamba2_released),
    "KimiLinearForCausalLM": (build_kimi, kimi_released),
}


@pytest.fixture(scope="module", params=list(CASES))
def model_pair(request, tmp_path_factory):
    """(transformers-form dir, released-form dir) of one architecture, same weights."""
    build, convert = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    new = build(str(root / "transformers_form"))
    return new, _released_copy(new, str(root / "released_form"), convert)


def test_released_form_matches_transformers(model_pair):
    new, released = model_pair
    assert_matches_hf(released, prompts=PROMPTS[:5], max_tokens=8, reference=new,
                      max_num_batched_tokens=16, max_num_seqs=4, max_model_len=512)


# Kimi-Linear and Jamba-v0.1 ship their own config classes (config.json's auto_map) that keep
# the checkpoint's fields as they are; with trust_remote_code (what vLLM's instructions for
# Kimi-Linear say) AutoConfig builds that class instead of transformers'. This stand-in keeps
# every field as given and derives nothing (the released classes derive none of the fields that
# transformers adds: layer_types, linear_num_heads, mlp_layer_types, ...).
REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class {name}(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
'''
REMOTE = {"KimiLinearForCausalLM": ("configuration_kimi", "KimiLinearConfig", "kimi_linear",
                                    ("layer_types", "linear_num_heads", "mlp_layer_types")),
          "JambaForCausalLM": ("configuration_jamba", "JambaConfig", "jamba",
                               ("layers_block_type", "layers_num_experts"))}


@pytest.mark.parametrize("arch", list(REMOTE))
def test_released_config_class_through_trust_remote_code(arch, tmp_path):
    module, name, model_type, derived = REMOTE[arch]
    build, convert = CASES[arch]
    new = build(str(tmp_path / "transformers_form"))
    released = _released_copy(new, str(tmp_path / "released_form"), convert)
    with open(f"{released}/{module}.py", "w") as f:
        f.write(REMOTE_CONFIG.format(name=name, model_type=model_type))
    with open(f"{released}/config.json") as f:
        config = json.load(f)
    config["auto_map"] = {"AutoConfig": f"{module}.{name}"}
    with open(f"{released}/config.json", "w") as f:
        json.dump(config, f, indent=2)
    remote = AutoConfig.from_pretrained(released, trust_remote_code=True)
    assert type(remote).__module__.endswith(module)
    assert not any(hasattr(remote, field) for field in derived)
    assert_matches_hf(released, prompts=PROMPTS[:5], max_tokens=8, reference=new,
                      trust_remote_code=True, max_num_batched_tokens=16, max_num_seqs=4,
                      max_model_len=512)


# moonshotai/Kimi-Linear-48B-A3B-Instruct's config.json (the fields that shape the model)
KIMI_48B = dict(
    architectures=["KimiLinearForCausalLM"], model_type="kimi_linear", first_k_dense_replace=1,
    head_dim=72, hidden_act="silu", hidden_size=2304, intermediate_size=9216, kv_lora_rank=512,
    linear_attn_config={"full_attn_layers": [4, 8, 12, 16, 20, 24, 27], "head_dim": 128,
                        "kda_layers": [i for i in range(1, 27) if i % 4], "num_heads": 32,
                        "short_conv_kernel_size": 4},
    mla_use_nope=True, model_max_length=1048576, moe_intermediate_size=1024, moe_layer_freq=1,
    moe_renormalize=True, moe_router_activation_func="sigmoid", num_attention_heads=32,
    num_expert_group=1, num_experts=256, num_experts_per_token=8, num_hidden_layers=27,
    num_key_value_heads=32, num_shared_experts=1, q_lora_rank=None, qk_nope_head_dim=128,
    qk_rope_head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, routed_scaling_factor=2.446,
    tie_word_embeddings=False, topk_group=1, use_grouped_topk=True, v_head_dim=128,
    vocab_size=163840)


def test_kimi_normalize_config_agrees_with_transformers_on_the_48b_layout():
    """The fields octavo derives from the released class's raw config equal the ones
    transformers' KimiLinearConfig derives from the same config.json."""
    from types import SimpleNamespace

    from octavo.models.kimi_linear import normalize_config

    raw = SimpleNamespace(**json.loads(json.dumps(KIMI_48B)))
    normalize_config(raw)
    hf = AutoConfig.for_model(**KIMI_48B)
    fields = ("layer_types", "mlp_layer_types", "linear_num_heads", "linear_head_dim",
              "linear_conv_kernel_dim", "num_local_experts", "num_experts_per_tok", "n_group",
              "norm_topk_prob", "n_shared_experts", "max_position_embeddings")
    assert {f: getattr(raw, f) for f in fields} == {f: getattr(hf, f) for f in fields}
    assert raw.layer_types.count("full_attention") == 7 and raw.mlp_layer_types[0] == "dense"
