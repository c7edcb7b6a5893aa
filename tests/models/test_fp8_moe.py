"""FP8 MoE checkpoints: tiny DeepSeek-V3 (MLA with an fp8 kv_b_proj, routed and shared experts),
Qwen3-MoE and Mixtral written here in the `fp8` block (weight_scale_inv, 128 x 128) / per-tensor
layouts and compressed-tensors per-channel / per-tensor, loaded with their experts kept in e4m3
and compared with transformers running the dequantized weights; `quantization="fp8"` on a float
MoE checkpoint; the experts' weight bytes."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8_checkpoints import LINEARS, write_fp8
from parity import PROMPTS, assert_matches_hf
from test_fp8_formats import _reference, assert_matches_w8a8
from tiny_models import save_tiny_model

from octavo import LLM, ops_native

# hidden 160 and expert intermediate 144: several 128-blocks, none whole, and gate/up's blocks
# meet inside a 128-row block of the stacked w13
COMMON = dict(hidden_size=160, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, initializer_range=0.08, rms_norm_eps=1e-5, tie_word_embeddings=False,
              num_experts_per_tok=2)
MODELS = {
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=6, moe_intermediate_size=144, n_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4,
        q_lora_rank=48, kv_lora_rank=40, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=40)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", dict(
        num_experts=6, moe_intermediate_size=144, norm_topk_prob=True, head_dim=40)),
    "mixtral": ("mixtral", "MixtralForCausalLM", dict(num_local_experts=6, intermediate_size=144)),
}
MLA_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
MOE_LINEARS = LINEARS + MLA_LINEARS + ("w1", "w2", "w3")   # not the routers (mlp.gate)
CASES = {   # fmt, model, weight scales, activations
    "fp8-deepseek_v3-block": ("fp8", "deepseek_v3", "block", None),
    "fp8-qwen3_moe-block": ("fp8", "qwen3_moe", "block", None),
    "ct-deepseek_v3-block-w8a16": ("compressed-tensors", "deepseek_v3", "block", None),
    "ct-qwen3_moe-channel-w8a16": ("compressed-tensors", "qwen3_moe", "channel", None),
    "ct-mixtral-tensor-w8a16": ("compressed-tensors", "mixtral", "tensor", None),
    "fp8-mixtral-tensor-dynamic": ("fp8", "mixtral", "tensor", "dynamic"),
    # as released Mixtral FP8 files: static input scales (the experts' are not used)
    "fp8-mixtral-tensor-static": ("fp8", "mixtral", "tensor", "static"),
}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    cache = {}

    def make(model):
        if model not in cache:
            model_type, arch, fields = MODELS[model]
            cache[model] = save_tiny_model(str(tmp_path_factory.mktemp(f"float-{model}")),
                                           model_type, arch, **dict(COMMON, **fields))
        return cache[model]
    return make


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory, float_dir):
    cache = {}

    def make(case):
        if case not in cache:
            fmt, model, kind, act = CASES[case]
            root = tmp_path_factory.mktemp(case)
            q, d = str(root / "q"), str(root / "deq")
            scales = write_fp8(float_dir(model), q, d, fmt, kind, act, linears=MOE_LINEARS)
            cache[case] = (q, d, scales)
        return cache[case]
    return make


def test_writer_quantizes_experts_and_kv_b_proj(fp8_dirs):
    qdir, _, _ = fp8_dirs("fp8-deepseek_v3-block")
    state = load_file(os.path.join(qdir, "model.safetensors"))
    w = state["model.layers.1.mlp.experts.3.gate_proj.weight"]
    assert w.dtype == torch.float8_e4m3fn and w.shape == (144, 160)
    assert state["model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv"].shape == (2, 2)
    assert state["model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv"].shape == (2, 2)
    assert state["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert state["model.layers.1.mlp.gate.weight"].dtype == torch.float32


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers_on_dequantized_weights(case, fp8_dirs):
    qdir, deq, input_scales = fp8_dirs(case)
    activation = CASES[case][3]
    if activation is None:
        assert_matches_hf(qdir, prompts=PROMPTS[:5], max_tokens=12, reference=deq)
    else:   # attention's linears round their inputs to e4m3; experts run W8A16 (Fp8MoEMethod)
        assert_matches_w8a8(qdir, _reference(deq, activation, input_scales), deq)


def _load(path, quantization=None):
    from octavo.models.loader import load_weights
    from octavo.models.registry import get_model_class
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    model = get_model_class(cfg)(cfg)
    load_weights(model, path, quantization)
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model


def _expert_bytes(model) -> tuple[int, int]:
    """(bytes the experts' prepared weights hold, E * 3 * I * H)."""
    from octavo.models.layers.fused_moe import FusedMoE
    held = expected = 0
    for m in model.modules():
        if isinstance(m, FusedMoE):
            weights = [t for t in m._prepared if isinstance(t, torch.Tensor)][:2]
            assert all(t.element_size() == 1 for t in weights)
            held += sum(t.numel() for t in weights)
            expected += m.num_experts * 3 * m.local_size * m.hidden_size
            # no float copy: the parameters were released, or are the e4m3 codes themselves
            assert all(p.numel() == 0 or p.element_size() == 1 for p in (m.w13_weight, m.w2_weight))
    return held, expected


def test_experts_and_kv_b_proj_stay_fp8(fp8_dirs):
    from octavo.models.layers.quantization.fp8 import Fp8LinearMethod, Fp8MoEMethod
    model = _load(fp8_dirs("fp8-deepseek_v3-block")[0])
    layer = model.model.layers[1]
    assert isinstance(layer.mlp.experts.quant_method, Fp8MoEMethod)
    kv_b = layer.self_attn.kv_b_proj
    assert isinstance(kv_b.quant_method, Fp8LinearMethod) and kv_b.weight.dtype == torch.float8_e4m3fn
    assert layer.self_attn.w_uk.dtype == torch.float32       # dequantized once, model dtype
    held, expected = _expert_bytes(model)
    # 1 byte per weight; padding to 64-row panels: 144 -> 192 rows of gate / up, 160 -> 192 of down
    assert expected <= held <= expected * 192 / 144


def test_fp8_at_load_matches_transformers_on_its_dequantized_weights(float_dir, tmp_path):
    # quantization="fp8" on a float MoE checkpoint: experts per output channel in e4m3 (run
    # W8A16), the other linears as for dense models (W8A8 per token); the reference is
    # transformers on those per-channel e4m3 weights with the linears' inputs rounded alike
    src, deq = float_dir("qwen3_moe"), str(tmp_path / "deq")
    state = load_file(os.path.join(src, "model.safetensors"))
    for name, t in state.items():
        if name.rsplit(".", 2)[-2] in LINEARS and ".mlp.gate." not in name:
            state[name] = ops_native.fp8_dequantize(*ops_native.fp8_quantize_weight(t))
    shutil.copytree(src, deq, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(state, os.path.join(deq, "model.safetensors"))
    assert_matches_w8a8(src, _reference(deq, "dynamic", {}), deq, quantization="fp8")
    held, expected = _expert_bytes(_load(src, "fp8"))
    assert expected <= held <= expected * 192 / 144


def test_expert_scale_errors(fp8_dirs, tmp_path):
    qdir, _, _ = fp8_dirs("fp8-qwen3_moe-block")
    bad = str(tmp_path / "bad")
    shutil.copytree(qdir, bad)
    path = os.path.join(bad, "model.safetensors")
    state = load_file(path)
    state["model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"] = torch.ones(1, 2)
    save_file(state, path)
    with pytest.raises(ValueError, match=r"experts.2.up_proj.weight_scale_inv.*must be \[2, 2\]"):
        LLM(model=bad, kv_cache_memory=1 << 24)


def test_decompressed_prefill_with_fp8_kv_b_proj(fp8_dirs, monkeypatch):
    # whole prompts of at least decompress_min_tokens run MLA decompressed through the fp8
    # kv_b_proj itself (the shorter ones above through its dequantized absorbed halves)
    from octavo.models.layers.mla import MultiHeadLatentAttention
    monkeypatch.setattr(MultiHeadLatentAttention, "decompress_min_tokens", 4)
    qdir, deq, _ = fp8_dirs("fp8-deepseek_v3-block")
    assert_matches_hf(qdir, prompts=PROMPTS[3:6], max_tokens=6, reference=deq)


def test_tensor_parallel_two_ranks_match_one(fp8_dirs, tmp_path):
    # each rank holds its slice of every expert's I (gate / up rows, down columns) with the
    # matching per-channel / per-tensor scale rows
    from tp_util import one_rank_logits, two_rank_logits

    cases = ["ct-qwen3_moe-channel-w8a16", "ct-mixtral-tensor-w8a16"]
    seqs = [list(range(3, 16)), list(range(40, 61))]
    dirs = [fp8_dirs(case)[0] for case in cases]
    for case, path, got in zip(cases, dirs, two_rank_logits(dirs, seqs, str(tmp_path))):
        torch.testing.assert_close(got, one_rank_logits(path, seqs), atol=1e-4, rtol=0,
                                   msg=lambda m, case=case: f"{case}: {m}")


def test_block_experts_refuse_a_tensor_parallel_split_inside_a_block(fp8_dirs, monkeypatch):
    from octavo.models.layers import fused_moe
    from octavo.models.layers.quantization.fp8 import Fp8MoEMethod
    monkeypatch.setattr(fused_moe, "get_tp_size", lambda: 2)
    monkeypatch.setattr(fused_moe, "get_tp_rank", lambda: 0)
    moe = fused_moe.FusedMoE(6, 2, 160, 144)        # 72 columns of I per rank: not whole blocks
    with pytest.raises(ValueError, match="whole number of fp8 blocks of 128"):
        moe.set_quant_method(Fp8MoEMethod("block", "weight_scale_inv", (128, 128)))
