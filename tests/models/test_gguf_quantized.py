"""GGUF weights kept quantized beyond Q4_0 / Q4_1: a tiny Llama whose layer weights are written
(with the `gguf` package) as Q8_0, Q4_K, Q5_K, Q6_K and Q4_K_M's mix (Q4_K with attn_v /
ffn_down in Q6_K); octavo keeps them quantized (INT4 / weight-only INT8 layers) and generates
what transformers generates from the same file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import PROMPTS, hf_greedy
from tiny_models import TINY_COMMON
from tokenizer_util import make_tokenizer

from octavo import LLM, SamplingParams

# K-quant super-blocks hold 256 values: every linear input must be a multiple of 256
FIELDS = {**TINY_COMMON, "hidden_size": 256, "intermediate_size": 512}


# ---- a small K-quant writer (the gguf package quantizes Q8_0 but not the K types) -----------

def _f16_bytes(x):
    return np.asarray(x, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def quantize_k(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, K] -> [rows, K/256 * block bytes] uint8 blocks of Q4_K / Q5_K / Q6_K
    (ggml's block layouts; min/max quantization, not llama.cpp's search)."""
    rows = w.shape[0]
    b = w.reshape(-1, 256).astype(np.float32)                  # super-blocks
    nb = b.shape[0]
    if qtype == "Q6_K":
        sub = b.reshape(nb, 16, 16)
        amax = np.abs(sub).max(-1)                             # [nb, 16]
        d = np.maximum(amax.max(-1) / 32 / 127, 1e-8).astype(np.float16)   # super scale
        sc = np.clip(np.round(amax / 32 / d.astype(np.float32)[:, None]), 1, 127).astype(np.int8)
        step = d.astype(np.float32)[:, None, None] * sc.astype(np.float32)[..., None]
        q = (np.clip(np.round(sub / step), -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 128)
        ql = np.concatenate([(q[:, :, 0:32] & 15) | ((q[:, :, 64:96] & 15) << 4),
                             (q[:, :, 32:64] & 15) | ((q[:, :, 96:128] & 15) << 4)], axis=2)
        qh = ((q[:, :, 0:32] >> 4) | ((q[:, :, 32:64] >> 4) << 2) | ((q[:, :, 64:96] >> 4) << 4)
              | ((q[:, :, 96:128] >> 4) << 6))
        out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                              _f16_bytes(d)], axis=1)
        return out.reshape(rows, -1)
    levels = 15 if qtype == "Q4_K" else 31
    sub = b.reshape(nb, 8, 32)
    lo = np.minimum(sub.min(-1), 0)
    hi = np.maximum(sub.max(-1), 0)
    scale, mn = (hi - lo) / levels, -lo                         # [nb, 8]
    d = np.maximum(scale.max(-1) / 63, 1e-8).astype(np.float16)
    dmin = np.maximum(mn.max(-1) / 63, 1e-8).astype(np.float16)
    sc = np.clip(np.round(scale / d.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(mn / dmin.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    off = (dmin.astype(np.float32)[:, None] * m)[..., None]
    q = np.clip(np.round((sub + off) / step), 0, levels).astype(np.uint8)          # [nb, 8, 32]
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)   # 12 bytes
    qs = ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).reshape(nb, 128)
    parts = [_f16_bytes(d), _f16_bytes(dmin), scales]
    if qtype == "Q5_K":
        parts.append(sum(((q[:, j] >> 4) & 1) << j for j in range(8)).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def write_gguf(hf_dir, path, types):
    """gguf_util's tiny-Llama writer with each layer weight in types[short name] (or 'default')."""
    import gguf
    import gguf_util

    real_add = gguf.GGUFWriter.add_tensor

    def add_tensor(self, name, tensor, *args, **kwargs):
        if tensor.ndim == 2 and name.startswith("blk."):
            part = name.split(".")[2]
            qtype = types.get(part, types["default"])
            t = getattr(gguf.GGMLQuantizationType, qtype)
            data = (gguf.quants.quantize(tensor.astype(np.float32), t) if qtype == "Q8_0"
                    else quantize_k(tensor, qtype))
            return real_add(self, name, data, raw_dtype=t)
        return real_add(self, name, tensor, *args, **kwargs)

    gguf.GGUFWriter.add_tensor = add_tensor
    try:
        return gguf_util.write_llama_gguf(hf_dir, path)
    finally:
        gguf.GGUFWriter.add_tensor = real_add


TYPES = {"Q8_0": {"default": "Q8_0"}, "Q4_K": {"default": "Q4_K"}, "Q5_K": {"default": "Q5_K"},
         "Q6_K": {"default": "Q6_K"},
         "Q4_K_M": {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K"}}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM
    path = str(tmp_path_factory.mktemp("kquant_hf"))
    tok = make_tokenizer()
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"],
                                  **{**FIELDS, "vocab_size": len(tok)})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_writer_blocks_dequantize_close(qtype):
    # the writer's blocks are what the gguf package reads back, near the float weights
    import gguf
    w = np.random.default_rng(0).normal(0, 0.05, (8, 512)).astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    back = gguf.quants.dequantize(quantize_k(w, qtype), t).reshape(w.shape)
    rel = np.abs(back - w).max() / np.abs(w).max()
    assert rel < {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype], rel


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_codes_reproduce_gguf_dequantize(qtype):
    # the loader's codes / scales / offsets stand for exactly the package's values
    import gguf
    from octavo.models.gguf_loader import gguf_codes
    w = np.random.default_rng(1).normal(0, 0.05, (6, 512)).astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, t) if qtype == "Q8_0" else quantize_k(w, qtype)
    codes, scales, offsets, gs = gguf_codes(raw, int(t))
    g = torch.arange(512) // gs
    ours = codes.float() * scales[:, g] + (0 if offsets is None else offsets[:, g])
    ref = torch.from_numpy(gguf.quants.dequantize(raw, t).reshape(w.shape))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_matches_transformers_loading_the_same_file(name, hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    path = write_gguf(hf_dir, str(tmp_path / f"tiny-{name}.gguf"), TYPES[name])
    llm = LLM(path, dtype="float32", kv_cache_memory=1 << 24)
    outs = llm.generate(PROMPTS[:5], SamplingParams(temperature=0, max_tokens=10, logprobs=5,
                                                    ignore_eos=True), use_tqdm=False)
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"tiny-{name}.gguf",
                                                     dtype=torch.float32).eval()
    ref = hf_greedy(ref_model, [o.prompt_token_ids for o in outs], 10)
    for out, (tokens, logprobs) in zip(outs, ref):
        assert out.outputs[0].token_ids == tokens
        for entry, lp in zip(out.outputs[0].logprobs, logprobs):
            tok_id = int(lp.argmax())
            assert entry[tok_id].logprob == pytest.approx(lp[tok_id].item(), abs=2e-4)


@pytest.mark.parametrize("name,qkv,down", [("Q8_0", "int8_woq", "int8_woq"),
                                           ("Q4_K", "int4_weight", "int4_weight"),
                                           ("Q4_K_M", "int8_woq", "int8_woq"),
                                           ("Q6_K", "int8_woq", "int8_woq")])
def test_layers_stay_quantized(name, qkv, down, hf_dir, tmp_path):
    from octavo.models.gguf_loader import load_gguf_config
    from octavo.models.loader import load_weights
    from octavo.models.registry import get_model_class

    path = write_gguf(hf_dir, str(tmp_path / "t.gguf"), TYPES[name])
    cfg = load_gguf_config(path)
    model = get_model_class(cfg)(cfg)
    load_weights(model, path)
    layer = model.model.layers[0]
    for module, attr in ((layer.self_attn.qkv_proj, qkv), (layer.mlp.down_proj, down)):
        module.process_weights_after_loading()
        assert getattr(module, attr, None) is not None, (name, attr)
    if name == "Q4_K_M":       # gate_up holds only Q4_K: the INT4 kernel
        layer.mlp.gate_up_proj.process_weights_after_loading()
        assert layer.mlp.gate_up_proj.int4_weight is not None
