"""GGUF files of non-Llama architectures: a tiny random model of each architecture that
transformers maps from GGUF is written the way llama.cpp's converter writes it (metadata keys of
transformers' GGUF_CONFIG_MAPPING, tensor names from the gguf package's TensorNameMap, Gemma's
norms stored as 1 + w, MoE experts stacked as ffn_{gate,up,down}_exps, GPT-2's Conv1D weights
transposed, Bloom's qkv regrouped, Mamba's A as -exp(A_log)), its 2-D layer weights in Q8_0 (kept
quantized by octavo) or F32, with a chat template; octavo must generate what transformers
generates from the same file and apply the file's template."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from parity import PROMPTS, hf_greedy
from tiny_models import TINY_COMMON
from tokenizer_util import make_tokenizer

from octavo import LLM, SamplingParams

# GGUF architecture -> (transformers model_type, config fields)
ARCHS = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    # llama.cpp's gemma2 has no output tensor: the embedding is tied
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 8, "tie_word_embeddings": True}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 8}),
    "starcoder2": ("starcoder2", {"norm_epsilon": 1e-5, "use_bias": True}),
    # transformers maps no expert sizes from GGUF: the config classes' defaults must hold
    "qwen2moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2}),
    "qwen3moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2}),
    # GPT-2's Conv1D weights are stored transposed ([out, in]); the feed-forward size is not
    # read from GGUF (transformers maps it to no GPT2Config field): 4 * hidden must hold
    # (the converter writes n_ctx as context_length; transformers' model keeps GPT2Config's
    # default n_positions, 1024, as GPT-2's own)
    "gpt2": ("gpt2", {"tie_word_embeddings": True, "max_position_embeddings": 1024,
                      "n_ctx": 1024}),
    # q/k/v regrouped from per-head to q|k|v; the converter writes the tied head as output
    "bloom": ("bloom", {"tie_word_embeddings": True}),
    # A stored as -exp(A_log), the conv weight as [d_inner, d_conv]
    "mamba": ("mamba", {"tie_word_embeddings": True}),
    # written as GGUF "mamba" with ssm.dt_b_c_rms set (llama.cpp's FalconMambaModel)
    "falcon_mamba": ("falcon_mamba", {"tie_word_embeddings": True}),
}
GGUF_ARCH = {"falcon_mamba": "mamba"}       # test case -> GGUF general.architecture
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_arch_gguf(model, arch: str, tok_dir: str, path: str, layer_type: str) -> str:
    """The converter's output for `model` (a transformers model of GGUF architecture `arch`)."""
    import gguf
    from gguf_util import _add_tokenizer
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    cfg = model.config.to_dict()
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    cfg.setdefault("rope_theta", rope)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    # keyed by transformers' spelling (qwen2_moe) where it differs from GGUF's (qwen2moe)
    mapping = GGUF_CONFIG_MAPPING.get(arch) or GGUF_CONFIG_MAPPING[model.config.model_type]
    for key, field in mapping.items():
        value = (cfg.get(field, getattr(model.config, field, None))   # (attribute aliases)
                 if field else None)
        if value is None:
            continue
        full = f"{arch}.{key}"
        if isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, int(value))
    if model.config.model_type == "falcon_mamba":
        w.add_ssm_dt_b_c_rms(True)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if layer_type == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(w, json.load(open(os.path.join(tok_dir, "tokenizer.json"))))
    w.add_chat_template(CHAT_TEMPLATE)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(cfg["pad_token_id"])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":      # the converter writes no output.weight
            continue
        a = _converter_layout(arch, hf_name, t.float().numpy(), model.config)
        if arch == "bloom" and hf_name == "transformer.word_embeddings.weight":
            w.add_tensor("output.weight", a)        # llama.cpp's Bloom duplicates the tied head
        if hf_name.endswith("mlp.experts.gate_up_proj"):     # [E, 2I, H] -> gate and up experts
            blk = f"blk.{hf_name.split('.')[2]}"
            half = a.shape[1] // 2
            w.add_tensor(f"{blk}.ffn_gate_exps.weight", np.ascontiguousarray(a[:, :half]))
            w.add_tensor(f"{blk}.ffn_up_exps.weight", np.ascontiguousarray(a[:, half:]))
            continue
        if hf_name.endswith("shared_expert_gate.weight"):    # [1, H] is written as [H]
            a = a.reshape(-1)
        stem, suffix = hf_name.rsplit(".", 1)
        if hf_name.endswith("experts.down_proj"):           # stacked [E, H, I]: no .weight
            stem, suffix = hf_name, "weight"
        if suffix in ("A_log", "D"):                        # Mamba's: GGUF names without suffix
            stem, suffix = hf_name, ""
        name = names.get_name(stem)
        if name is None and arch == "bloom":        # its map names BloomModel's tensors
            name = names.get_name(stem.removeprefix("transformer."))
        assert name is not None, hf_name
        if arch.startswith("gemma") and "norm" in name:
            a = a + 1                       # Gemma's RMSNorm scales by 1 + w; GGUF stores 1 + w
        name = f"{name}.{suffix}" if suffix else name
        # (rows of a length that is no multiple of Q8_0's block stay F32, as in llama.cpp)
        if (a.ndim == 2 and name.startswith("blk.") and layer_type == "Q8_0"
                and a.shape[1] % 32 == 0):
            t8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, t8), raw_dtype=t8)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _converter_layout(arch: str, hf_name: str, a: np.ndarray, config) -> np.ndarray:
    """The layout changes llama.cpp's convert_hf_to_gguf.py makes for `arch`."""
    if arch == "gpt2" and a.ndim == 2 and hf_name.endswith(("c_attn.weight", "c_proj.weight",
                                                            "c_fc.weight")):
        return np.ascontiguousarray(a.T)            # Conv1D [in, out] -> [out, in]
    if arch == "bloom" and "query_key_value" in hf_name:
        heads = config.n_head
        # [head, q|k|v, head_dim, ...] -> [q|k|v, head, head_dim, ...]
        grouped = a.reshape(heads, 3, a.shape[0] // heads // 3, *a.shape[1:])
        return np.ascontiguousarray(grouped.swapaxes(0, 1)).reshape(a.shape)
    if arch == "mamba" and hf_name.endswith("A_log"):
        return -np.exp(a)
    if arch == "mamba" and hf_name.endswith("conv1d.weight"):
        return np.ascontiguousarray(a.squeeze(1))   # [d_inner, 1, d_conv] -> [d_inner, d_conv]
    return a


@pytest.mark.parametrize("layer_type", ["Q8_0", "F32"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_matches_transformers_loading_the_same_file(arch, layer_type, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields = ARCHS[arch]
    tok = make_tokenizer()
    tok.save_pretrained(str(tmp_path))
    config = AutoConfig.for_model(model_type, **{**TINY_COMMON, "vocab_size": len(tok), **fields})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    name = f"tiny-{arch}-{layer_type}.gguf"
    path = write_arch_gguf(model, GGUF_ARCH.get(arch, arch), str(tmp_path), str(tmp_path / name),
                           layer_type)
    os.remove(tmp_path / "tokenizer.json")          # the tokenizer comes from the file
    os.remove(tmp_path / "tokenizer_config.json")

    from octavo.models.gguf_loader import q4_weight_names
    kept = q4_weight_names(path)         # Q8_0 layer weights are handed over as codes
    assert (len(kept) > 0) == (layer_type == "Q8_0")
    llm = LLM(path, dtype="float32", kv_cache_memory=1 << 24)
    held = {n for n, m in llm.llm_engine.runner.model.named_modules() if hasattr(m, "qweight")}
    assert (len(held) > 0) == (layer_type == "Q8_0"), held
    chat = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}],
                                                   tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>hi\n<|assistant|>"           # the file's chat template
    outs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=8, logprobs=5,
                                                    ignore_eos=True), use_tqdm=False)
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=name,
                                                     dtype=torch.float32).eval()
    if layer_type == "F32":      # the writer does what the converter does: transformers gets
        got = ref_model.state_dict()         # back the model it was written from
        for key, value in model.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, key=key: f"{key}: {m}")
    if arch == "falcon_mamba":
        # transformers reads the file as a plain Mamba (it ignores ssm.dt_b_c_rms): the
        # reference is its FalconMamba holding the weights transformers read from the file
        assert ref_model.config.model_type == "mamba"
        falcon = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        falcon.load_state_dict(ref_model.state_dict())
        ref_model = falcon.eval()
    ref = hf_greedy(ref_model, [o.prompt_token_ids for o in outs], 8)
    for out, (tokens, logprobs) in zip(outs, ref):
        assert out.outputs[0].token_ids == tokens, arch
        for entry, lp in zip(out.outputs[0].logprobs, logprobs):
            tok_id = int(lp.argmax())
            assert entry[tok_id].logprob == pytest.approx(lp[tok_id].item(), abs=2e-4)
