"""make_random_model: the llama-100m preset's shape, and a saved model octavo and HF both load."""
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from octavo.bench.make_random_model import PRESETS, main


def test_llama_100m_preset_size():
    fields = dict(PRESETS["llama-100m"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert 100e6 < n < 120e6
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == \
        (768, 12, 12, 2048, 32000, True)


def test_llama_medium_preset_size():
    """The peers' medium Llama, counted by hand: untied 32000 x 2048 embedding and head, 16
    layers of q/o 2048x2048, k/v 512x2048, gate/up/down 2048x5632, two norms; a final norm."""
    fields = dict(PRESETS["llama-medium"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    h, kv, inter, vocab = 2048, 512, 5632, 32000
    layer = 2 * h * h + 2 * kv * h + 3 * h * inter + 2 * h
    assert sum(p.numel() for p in model.parameters()) == 2 * vocab * h + 16 * layer + h \
        == 852_559_872


def test_saved_tiny_model_is_bf16_with_full_vocab_tokenizer(tmp_path, capsys):
    out = str(tmp_path / "m")
    main(["--out", out, "--preset", "llama-tiny"])
    assert "llama-tiny" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    assert len(tok) == config.vocab_size
    assert isinstance(tok.decode(list(range(config.vocab_size))), str)
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False)) == "Hello world"
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_qwen3_moe_1b_preset_size_and_active_parameters():
    """About 1B parameters, of which the attention, router, norms, tied embedding and 2 of 16
    experts per layer (about 194M) are read for each token."""
    from octavo.bench.decode_ceiling import active_parameters

    fields = dict(PRESETS["qwen3-moe-1b"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    total, active = active_parameters(config)
    h, layers, inter, e = 1024, 18, 1024, 16
    experts = layers * e * 3 * h * inter
    assert 0.95e9 < total < 1.05e9
    assert total - active == experts * (e - 2) // e
    assert (config.num_experts, config.num_experts_per_tok, config.hidden_size,
            config.moe_intermediate_size, config.num_hidden_layers) == (e, 2, h, inter, layers)
