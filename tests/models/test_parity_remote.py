"""Hugging Face parity of the remote-code checkpoints: InternLM2, InternLM3, Baichuan (7B and 13B /
Baichuan 2), MiniCPM and ChatGLM (2/3, GLM-4).

transformers has no class for these, so each test builds the checkpoint from an equivalent
transformers model: a tiny random model is saved (norm weights randomised), its tensors are
renamed and repacked into the remote layout (InternLM2's per-group wqkv, Baichuan's W_pack,
ChatGLM's query_key_value / dense_h_to_4h ...), and a config.json with the remote field names
plus a minimal configuration_*.py (loaded with trust_remote_code, as real checkpoints are) is
written next to it. octavo loads the converted directory; the reference is the transformers model:
  InternLM2, InternLM3, Baichuan-7B    Llama
  Baichuan 13B (ALiBi)                 Llama with rotary switched off and ALiBi added through a
                                       registered attention function
  Baichuan 2 NormHead                  the reference's lm_head rows are unit-normalised; the
                                       converted checkpoint stores them rescaled at random
  MiniCPM                              Granite: embedding_multiplier = scale_emb, residual_multiplier
                                       = scale_depth / sqrt(layers), logits_scaling = hidden /
                                       dim_model_base, attention_multiplier = head_dim ** -0.5
  ChatGLM                              Glm: partial rotary 0.5 in GPT-J pairs, qkv bias, rope
                                       base 10000 * rope_ratio, gate|up fused
`test_feature_changes_reference_output` shows the features bite: switching one off in the
reference changes its logits, so parity could not hold with octavo ignoring it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

from tiny_models import save_tiny_model
from parity import (assert_changes_logits, assert_matches_hf, assert_two_ranks_match_one, logits,
                    longest_prompt_ids, per_case, randomise_norms)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, INTER = 64, 4, 2, 16, 4, 128
COMMON = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False, initializer_range=0.08, rms_norm_eps=1e-5)
# the remote configs' Llama-style fields
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id", "pad_token_id", "tie_word_embeddings", "vocab_size")
CHATGLM_VOCAB = 1032  # padded past the test tokenizer's vocabulary, as ChatGLM's is

CONFIG_PY = '''from transformers import PretrainedConfig


class RemoteConfig(PretrainedConfig):
    model_type = "{model_type}"
'''


# ---------------------------------------------------------------- checkpoint conversions
def _rename(tensors: dict, pairs: list[tuple[str, str]]) -> dict:
    out = {}
    for name, t in tensors.items():
        for old, new in pairs:
            name = name.replace(old, new)
        out[name] = t
    return out


def _fuse(tensors: dict, parts: list[str], fused: str, pack) -> dict:
    """Replace every layer's `parts` (e.g. q_proj, k_proj, v_proj) weight/bias by one `fused`
    tensor made by pack([tensors])."""
    out = dict(tensors)
    for name in list(tensors):
        if f".{parts[0]}." not in name:
            continue
        names = [name.replace(f".{parts[0]}.", f".{p}.") for p in parts]
        out[name.replace(f".{parts[0]}.", f".{fused}.")] = pack([out.pop(n) for n in names])
    return out


def _group_qkv(num_heads: int, num_kv: int):
    """[q | k | v] -> [kv head, (group q heads | k | v), head_dim] (InternLM2's wqkv)."""
    def pack(qkv):
        q, k, v = qkv
        rest = q.shape[1:]
        q = q.reshape(num_kv, num_heads // num_kv, HEAD_DIM, *rest)
        k, v = (t.reshape(num_kv, 1, HEAD_DIM, *rest) for t in (k, v))
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)
    return pack


def _cat(parts):
    return torch.cat(parts)


def to_internlm2(tensors: dict, num_kv: int = KV_HEADS) -> dict:
    tensors = _fuse(tensors, ["q_proj", "k_proj", "v_proj"], "wqkv", _group_qkv(HEADS, num_kv))
    return _rename(tensors, [("model.embed_tokens.", "model.tok_embeddings."),
                             ("self_attn.wqkv", "attention.wqkv"), ("self_attn.o_proj", "attention.wo"),
                             ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
                             ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
                             ("post_attention_layernorm", "ffn_norm"), ("lm_head.", "output.")])


def to_baichuan(tensors: dict) -> dict:
    return _fuse(tensors, ["q_proj", "k_proj", "v_proj"], "W_pack", _cat)


def to_chatglm(multi_query: bool):
    def convert(tensors: dict) -> dict:
        pack = _cat if multi_query else _group_qkv(HEADS, HEADS)  # MHA: per-head q|k|v
        tensors = _fuse(tensors, ["q_proj", "k_proj", "v_proj"], "query_key_value", pack)
        return _rename(tensors, [
            ("model.embed_tokens.", "transformer.embedding.word_embeddings."),
            ("model.layers.", "transformer.encoder.layers."), ("self_attn.", "self_attention."),
            ("o_proj", "dense"), ("mlp.gate_up_proj", "mlp.dense_h_to_4h"),
            ("mlp.down_proj", "mlp.dense_4h_to_h"), ("model.norm.", "transformer.encoder.final_layernorm."),
            ("lm_head.", "transformer.output_layer.")])
    return convert


def _zero_o_proj_bias(tensors: dict) -> None:
    for name in tensors:
        if name.endswith("o_proj.bias"):
            tensors[name] = torch.zeros_like(tensors[name])


def _drop_o_proj_bias(tensors: dict) -> dict:
    return {n: t for n, t in tensors.items() if not n.endswith("o_proj.bias")}


def _normalise_lm_head(tensors: dict) -> None:
    tensors["lm_head.weight"] = torch.nn.functional.normalize(tensors["lm_head.weight"], dim=-1)


def _rescale_lm_head(tensors: dict) -> dict:
    # what a Baichuan 2 checkpoint holds: rows NormHead will normalise, of arbitrary norms
    gen = torch.Generator().manual_seed(3)
    head = tensors["lm_head.weight"]
    scales = 0.5 + 1.5 * torch.rand(head.shape[0], 1, generator=gen)
    return {**tensors, "lm_head.weight": head * scales}


# ---------------------------------------------------------------- cases
@dataclass
class Case:
    arch: str                    # the remote `architectures` name
    model_type: str              # the remote model_type
    ref_type: str                # transformers model_type of the reference
    ref_fields: dict             # reference config fields (over COMMON)
    remote_fields: dict          # remote config.json fields (over LLAMA_FIELDS taken from COMMON)
    convert: object = None       # tensors -> remote tensors
    edit_reference: object = None  # in-place change of the reference's tensors before saving
    alibi: bool = False          # reference gets ALiBi and no rotary
    llama_fields: bool = True    # copy LLAMA_FIELDS into the remote config
    features: list = field(default_factory=list)  # reference config changes that must matter


def _minicpm_ref(scale_emb=4.0, scale_depth=1.4, dim_model_base=16):
    return dict(embedding_multiplier=scale_emb, residual_multiplier=scale_depth / math.sqrt(LAYERS),
                logits_scaling=HIDDEN / dim_model_base, attention_multiplier=HEAD_DIM ** -0.5)


def _chatglm_remote(multi_query: bool) -> dict:
    return dict(num_layers=LAYERS, padded_vocab_size=CHATGLM_VOCAB, vocab_size=CHATGLM_VOCAB,
                hidden_size=HIDDEN, ffn_hidden_size=INTER, kv_channels=HEAD_DIM,
                num_attention_heads=HEADS, seq_length=512, layernorm_epsilon=1e-5, rmsnorm=True,
                apply_residual_connection_post_layernorm=False, post_layer_norm=True,
                add_bias_linear=False, add_qkv_bias=True, multi_query_attention=multi_query,
                multi_query_group_num=KV_HEADS, rope_ratio=2.0, original_rope=True,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


GLM_REF = dict(vocab_size=CHATGLM_VOCAB, attention_bias=True,
               rope_parameters={"rope_type": "default", "rope_theta": 20000.0,
                                "partial_rotary_factor": 0.5})
GLM_FEATURES = [dict(rope_parameters={"rope_type": "default", "rope_theta": 20000.0,
                                      "partial_rotary_factor": 1.0}),
                dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.5})]

CASES = {
    "internlm2": Case("InternLM2ForCausalLM", "internlm2", "llama", dict(attention_bias=True),
                      dict(bias=True, rope_theta=10000.0, rope_scaling=None), to_internlm2),
    # no biases, one q head per kv head (wqkv groups of q|k|v per head)
    "internlm2-mha": Case("InternLM2ForCausalLM", "internlm2", "llama",
                          dict(num_key_value_heads=HEADS),
                          dict(num_key_value_heads=HEADS, bias=False, rope_theta=10000.0),
                          lambda t: to_internlm2(t, num_kv=HEADS)),
    "internlm3": Case("InternLM3ForCausalLM", "internlm3", "llama",
                      dict(attention_bias=True, mlp_bias=True),
                      dict(head_dim=HEAD_DIM, qkv_bias=True, bias=True, rope_theta=10000.0)),
    "internlm3-qkv-bias": Case("InternLM3ForCausalLM", "internlm3", "llama",
                               dict(attention_bias=True),
                               dict(head_dim=HEAD_DIM, qkv_bias=True, bias=False),
                               _drop_o_proj_bias, edit_reference=_zero_o_proj_bias),
    "baichuan-7b": Case("BaiChuanForCausalLM", "baichuan", "llama",
                        dict(num_key_value_heads=HEADS), dict(num_key_value_heads=None),
                        to_baichuan),
    # 6 heads: ALiBi slopes for a head count that is not a power of two (Baichuan-13B has 40)
    "baichuan-13b": Case("BaichuanForCausalLM", "baichuan", "llama",
                         dict(hidden_size=6 * HEAD_DIM, num_attention_heads=6, num_key_value_heads=6),
                         dict(hidden_size=6 * HEAD_DIM, num_attention_heads=6,
                              num_key_value_heads=None, max_position_embeddings=None,
                              model_max_length=512), to_baichuan, alibi=True),
    "baichuan2-13b": Case("BaichuanForCausalLM", "baichuan", "llama",
                          dict(num_key_value_heads=HEADS),
                          dict(num_key_value_heads=None, max_position_embeddings=None,
                               model_max_length=512, z_loss_weight=0),
                          lambda t: _rescale_lm_head(to_baichuan(t)),
                          edit_reference=_normalise_lm_head, alibi=True),
    "minicpm": Case("MiniCPMForCausalLM", "minicpm", "granite",
                    dict(_minicpm_ref(), tie_word_embeddings=True),
                    dict(scale_emb=4.0, scale_depth=1.4, dim_model_base=16,
                         tie_word_embeddings=None),  # MiniCPMConfig's default: tied
                    features=[dict(embedding_multiplier=1.0), dict(residual_multiplier=1.0),
                              dict(logits_scaling=1.0)]),
    "minicpm-untied": Case("MiniCPMForCausalLM", "minicpm", "granite", _minicpm_ref(),
                           dict(scale_emb=4.0, scale_depth=1.4, dim_model_base=16,
                                tie_word_embeddings=False)),
    "chatglm": Case("ChatGLMModel", "chatglm", "glm", GLM_REF, _chatglm_remote(True),
                    to_chatglm(True), llama_fields=False, features=GLM_FEATURES),
    "chatglm-mha": Case("ChatGLMModel", "chatglm", "glm", dict(GLM_REF, num_key_value_heads=HEADS),
                        _chatglm_remote(False), to_chatglm(False), llama_fields=False),
}
ARCHITECTURES = sorted({case.arch for case in CASES.values()})


# ---------------------------------------------------------------- ALiBi reference
def _baichuan_slopes(n: int) -> list[float]:
    """Baichuan-13B's ALiBi slopes, as its modeling code builds them: a geometric sequence for a
    power of two, else that of the largest power of two below n followed by every other slope
    of the next power of two."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return _baichuan_slopes(closest) + _baichuan_slopes(2 * closest)[0::2][: n - closest]


def _alibi_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """Eager attention plus Baichuan-13B's ALiBi bias slope[h] * (key_pos - query_pos), for one
    unpadded sequence: query, key, value [1, H, T, hd] (kv repeated here) -> [1, Tq, H, hd]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    tq, tk = query.shape[2], key.shape[2]
    q_pos = torch.arange(tk - tq, tk).view(-1, 1)
    distance = (torch.arange(tk).view(1, -1) - q_pos).float()   # [Tq, Tk], <= 0 where visible
    slopes = torch.tensor(_baichuan_slopes(query.shape[1])).view(-1, 1, 1)
    scores = query @ key.transpose(-1, -2) * scaling + slopes * distance
    scores = scores.masked_fill(distance > 0, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("octavo_test_alibi", _alibi_attention)


def _reference(case: Case, ref_dir: str, alibi: bool | None = None, **changes):
    """The transformers model octavo must match; for ALiBi cases rotary is off and `alibi`
    (default: the case's) says whether the ALiBi bias is added."""
    config = AutoConfig.from_pretrained(ref_dir)
    for key, value in changes.items():
        setattr(config, key, value)
    alibi = case.alibi if alibi is None else alibi
    kwargs = dict(attn_implementation="octavo_test_alibi" if alibi else "eager")
    model = AutoModelForCausalLM.from_pretrained(ref_dir, config=config, dtype=torch.float32,
                                                 **kwargs)
    if case.alibi:  # rotary off: every frequency 0 makes cos 1 and sin 0
        model.model.rotary_emb.inv_freq.zero_()
        if isinstance(getattr(model.model.rotary_emb, "original_inv_freq", None), torch.Tensor):
            model.model.rotary_emb.original_inv_freq.zero_()
    return model.eval()


# ---------------------------------------------------------------- building the directories
_randomise_norms = randomise_norms  # the name the other remote-code parity modules import


REF_ARCH = {"llama": "LlamaForCausalLM", "granite": "GraniteForCausalLM", "glm": "GlmForCausalLM"}


def _remote_config(case: Case, vocab_size: int) -> dict:
    config = {}
    if case.llama_fields:
        config = {k: COMMON[k] for k in LLAMA_FIELDS if k in COMMON}
        config["vocab_size"] = vocab_size
    config.update(case.remote_fields)
    config = {k: v for k, v in config.items() if v is not None}  # None: the field is absent
    return dict(config, architectures=[case.arch], model_type=case.model_type,
                auto_map={"AutoConfig": "configuration_remote.RemoteConfig"})


def build_case(name: str, root: str) -> tuple[str, str]:
    """(reference dir, remote checkpoint dir) for CASES[name] under `root`."""
    case = CASES[name]
    ref_dir, remote_dir = os.path.join(root, "reference"), os.path.join(root, name)
    save_tiny_model(ref_dir, case.ref_type, REF_ARCH[case.ref_type], **{**COMMON, **case.ref_fields})
    file = os.path.join(ref_dir, "model.safetensors")
    tensors = load_file(file)
    randomise_norms(tensors, seed=1)
    if case.edit_reference:
        case.edit_reference(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    write_remote(remote_dir, ref_dir, case.convert(tensors) if case.convert else dict(tensors),
                 _remote_config(case, AutoConfig.from_pretrained(ref_dir).vocab_size))
    return ref_dir, remote_dir


def write_remote(path: str, ref_dir: str, tensors: dict, config: dict) -> None:
    """A remote-code checkpoint directory: the tensors, config.json with an auto_map to a minimal
    configuration class (written beside it) and the reference's tokenizer files."""
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "configuration_remote.py"), "w") as f:
        f.write(CONFIG_PY.format(model_type=config["model_type"]))
    for name in os.listdir(ref_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(ref_dir, name), path)


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory):
    return per_case(tmp_path_factory, build_case)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_greedy_and_logprobs_match_transformers(name, case_dirs):
    ref_dir, remote_dir = case_dirs(name)
    assert_matches_hf(remote_dir, reference=_reference(CASES[name], ref_dir),
                      trust_remote_code=True, block_size=16)


FEATURES = [(name, changes) for name, case in CASES.items() for changes in case.features]


@pytest.mark.parametrize("name, changes", FEATURES,
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)))
def test_feature_changes_reference_output(name, changes, case_dirs):
    ids = longest_prompt_ids()
    ref_dir, _ = case_dirs(name)
    assert_changes_logits(logits(_reference(CASES[name], ref_dir), ids),
                          logits(_reference(CASES[name], ref_dir, **changes), ids),
                          f"{name}: {changes}")


def test_alibi_and_normhead_change_reference_output(case_dirs):
    """ALiBi (the reference with zero slopes is rotary-free attention without positions) and
    NormHead (the checkpoint's rescaled lm_head used as is) both change the logits."""
    ids = longest_prompt_ids()
    ref_dir, remote_dir = case_dirs("baichuan2-13b")
    model = _reference(CASES["baichuan2-13b"], ref_dir)
    base = logits(model, ids)
    head = model.lm_head.weight.data.clone()
    model.lm_head.weight.data.copy_(load_file(os.path.join(remote_dir, "model.safetensors"))
                                    ["lm_head.weight"])
    assert_changes_logits(base, logits(model, ids), "NormHead")
    model.lm_head.weight.data.copy_(head)
    plain = _reference(CASES["baichuan2-13b"], ref_dir, alibi=False)  # no positions at all
    assert_changes_logits(base, logits(plain, ids), "ALiBi")


def test_alibi_slopes_are_baichuans():
    from octavo.models.layers.position import alibi_slopes
    for heads in (4, 6, 40):
        torch.testing.assert_close(alibi_slopes(heads), torch.tensor(_baichuan_slopes(heads)))


def test_baichuan_position_encoding_follows_model_size():
    from types import SimpleNamespace

    from octavo.models.baichuan import is_baichuan2, uses_alibi
    assert not uses_alibi(SimpleNamespace(hidden_size=4096))   # Baichuan(2)-7B: rotary
    assert uses_alibi(SimpleNamespace(hidden_size=5120))       # Baichuan(2)-13B: ALiBi
    assert is_baichuan2(SimpleNamespace(vocab_size=125696))
    assert not is_baichuan2(SimpleNamespace(vocab_size=64000))  # Baichuan-13B: plain lm_head


@pytest.mark.parametrize("fields", [dict(position_encoding_2d=True),      # ChatGLM-6B (v1)
                                    dict(vision_config={"hidden_size": 8}),  # GLM-4V
                                    dict(num_layers=None)],                 # not a ChatGLM config
                         ids=["chatglm-v1", "glm-4v", "missing-fields"])
def test_unsupported_chatglm_configs_are_refused(fields):
    from transformers import PretrainedConfig

    from octavo.models.chatglm import ChatGLMModel
    remote = {k: v for k, v in {**_chatglm_remote(True), **fields}.items() if v is not None}
    with pytest.raises(ValueError, match="ChatGLM2/3 (and|or) GLM-4"):
        ChatGLMModel(PretrainedConfig(**remote))


# Grouped wqkv, W_pack with ALiBi slopes and NormHead rows, multi-query and per-head interleaved
# query_key_value: each split across ranks after the layout is fixed
TP_CASES = ["internlm2", "baichuan2-13b", "chatglm", "chatglm-mha"]


def test_tensor_parallel_two_ranks_match_one(case_dirs, tmp_path):
    assert_two_ranks_match_one({name: case_dirs(name)[1] for name in TP_CASES}, tmp_path)
