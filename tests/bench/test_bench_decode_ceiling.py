"""decode_ceiling: active-parameter counting by hand, and the suite end to end on a tiny MoE."""
import json

from transformers import AutoConfig

from octavo.bench.decode_ceiling import active_parameters, main

from tiny_models import save_tiny_model

TINY_MOE = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_experts=6,
                num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _by_hand(config, tied: bool) -> tuple[int, int]:
    h, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    attn = 2 * h * (4 * 8) + 2 * h * (2 * 8) + 2 * 8    # q, o; k, v; q/k norms of head_dim
    router, norms = config.num_experts * h, 2 * h
    experts = config.num_experts * 3 * h * config.moe_intermediate_size
    total = layers * (attn + router + norms + experts) + h + v * h * (1 if tied else 2)
    active = total - layers * experts * 4 // 6 - (0 if tied else v * h)
    return total, active


def test_active_parameters_by_hand():
    for tied in (True, False):
        config = AutoConfig.for_model("qwen3_moe", vocab_size=100, tie_word_embeddings=tied,
                                      **TINY_MOE)
        assert active_parameters(config) == _by_hand(config, tied)
    dense = AutoConfig.for_model("llama", vocab_size=100, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 tie_word_embeddings=True)
    total, active = active_parameters(dense)
    assert total == active


def test_suite_runs_both_backends(tmp_path, capsys):
    path = save_tiny_model(str(tmp_path / "moe"), "qwen3_moe", "Qwen3MoeForCausalLM",
                           tie_word_embeddings=True, **TINY_MOE)
    out = tmp_path / "r.jsonl"
    main(["--model", path, "--dtype", "float32", "--input-len", "5", "--output-len", "4",
          "--num-iters", "1", "--kv-cache-memory", str(1 << 22), "--output-json", str(out)])
    printed = capsys.readouterr().out
    assert "octavo batch-1 TPOT" in printed and "transformers batch-1 TPOT" in printed
    record = json.loads(out.read_text())
    assert record["suite"] == "decode_ceiling" and record["dtype"] == "float32"
    assert record["active_bytes"] == 4 * record["active_params"]
    assert record["octavo_tpot"] > 0 and record["hf_tpot"] > 0 and record["ceiling_tpot"] > 0
    assert len(record["octavo_tpots"]) == len(record["hf_tpots"]) == 1
    assert record["copy_gbs"] > 0 and record["read_gbs"] > 0



def test_weight_memory_counts_packed_experts(tmp_path):
    # the experts are packed at load into FusedMoE's private prepared weights: they must count
    from octavo import LLM
    from octavo.bench.utils import engine_weight_bytes
    shape = dict(TINY_MOE, hidden_size=64, moe_intermediate_size=64, head_dim=16)
    path = save_tiny_model(str(tmp_path / "moe"), "qwen3_moe", "Qwen3MoeForCausalLM",
                           tie_word_embeddings=True, vocab_size=128, **shape)
    total, _ = active_parameters(AutoConfig.from_pretrained(path))
    got = engine_weight_bytes(LLM(path, dtype="bfloat16", kv_cache_memory=1 << 22).llm_engine)
    # bf16, every weight once; the routers' 6 rows are padded to a 64-row panel (+4%)
    assert 2 * total <= got <= 1.1 * 2 * total, (got, 2 * total)
