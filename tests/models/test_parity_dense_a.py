"""Hugging Face parity of GPT-2, OPT, BLOOM, GPTBigCode, StarCoder2 and Phi-3 on tiny random
configs (tests/models/parity.py: fp32, greedy tokens identical, top-5 logprobs close).

The parity prompts are 2 to 69 tokens long (test tokenizer) and 20 tokens are generated, so
sliding windows of 8 fall inside them, and Phi-3's original_max_position_embeddings of 40 lies
between the short prompts and the long ones."""
import pytest
from transformers import AutoTokenizer

from tiny_models import save_tiny_model
from parity import PROMPTS, assert_matches_hf

IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
# hidden 64, 4 heads of 16, 2 layers; 128 positions cover the longest prompt + 20 new tokens
GPT_COMMON = dict(IDS, n_embd=64, n_head=4, n_layer=2, n_positions=128, initializer_range=0.08)
OPT_COMMON = dict(IDS, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.08)
BLOOM_COMMON = dict(IDS, hidden_size=64, n_head=4, n_layer=2, initializer_range=0.08)
LLAMA_LIKE = dict(IDS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=0.08)
PHI3_ORIGINAL_MAX = 40
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.25 * i for i in range(8)],
            "long_factor": [2.0 + 1.5 * i for i in range(8)]}

CASES = {
    # GPT-2's defaults: head tied to wte, gelu_new, Conv1D weights
    "gpt2": ("gpt2", "GPT2LMHeadModel", dict(GPT_COMMON, activation_function="gelu_new")),
    "gpt2-untied-inverse-layer-scale": (
        "gpt2", "GPT2LMHeadModel",
        dict(GPT_COMMON, tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)),
    "opt": ("opt", "OPTForCausalLM", dict(OPT_COMMON, do_layer_norm_before=True)),
    # OPT-350m's shape: post-LayerNorm blocks, no final norm, 32-wide word embeddings
    "opt-post-norm-projected": ("opt", "OPTForCausalLM",
                                dict(OPT_COMMON, do_layer_norm_before=False,
                                     word_embed_proj_dim=32)),
    "opt-pre-norm-projected": ("opt", "OPTForCausalLM",
                               dict(OPT_COMMON, word_embed_proj_dim=32)),
    "bloom": ("bloom", "BloomForCausalLM", BLOOM_COMMON),
    # 6 heads: the ALiBi slopes of a head count that is not a power of two
    "bloom-6-heads-residual-post-norm": (
        "bloom", "BloomForCausalLM",
        dict(BLOOM_COMMON, hidden_size=96, n_head=6, apply_residual_connection_post_layernorm=True)),
    "gpt-bigcode-mqa": ("gpt_bigcode", "GPTBigCodeForCausalLM",
                        dict(GPT_COMMON, multi_query=True)),
    "gpt-bigcode-mha": ("gpt_bigcode", "GPTBigCodeForCausalLM",
                        dict(GPT_COMMON, multi_query=False, activation_function="gelu")),
    "starcoder2": ("starcoder2", "Starcoder2ForCausalLM",
                   dict(LLAMA_LIKE, sliding_window=8, use_bias=True, norm_epsilon=1e-5)),
    "phi3-longrope": ("phi3", "Phi3ForCausalLM",
                      dict(LLAMA_LIKE, original_max_position_embeddings=PHI3_ORIGINAL_MAX,
                           rope_scaling=LONGROPE)),
    # Phi-4-mini's shape: partial rotary; plus Phi-3-mini's sliding window
    "phi3-partial-rotary-sliding": ("phi3", "Phi3ForCausalLM",
                                    dict(LLAMA_LIKE, partial_rotary_factor=0.75, sliding_window=8,
                                         tie_word_embeddings=True)),
}

ARCHITECTURES = sorted({arch for _, arch, _ in CASES.values()})  # read by test_registry.py


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, tmp_path_factory):
    model_type, arch, fields = CASES[case]
    path = save_tiny_model(str(tmp_path_factory.mktemp(case)), model_type, arch, **fields)
    prompts = PROMPTS
    if case == "phi3-longrope":
        prompts = phi3_prompts_with_one_factor_set(path)
    assert_matches_hf(path, prompts=prompts, block_size=16)


def phi3_prompts_with_one_factor_set(path, max_tokens=20):
    """The prompts that are longer than original_max from the start (long factors) or stay within
    it for all 20 new tokens (short factors), batched together: transformers picks the set per
    sequence by its length, and so must octavo. A sequence that grows past original_max while
    decoding is left out: transformers then recomputes its whole KV cache with the long factors,
    which octavo does not do (models/layers/longrope.py)."""
    tok = AutoTokenizer.from_pretrained(path)
    lengths = [len(tok(p).input_ids) for p in PROMPTS]
    long = [p for p, n in zip(PROMPTS, lengths) if n > PHI3_ORIGINAL_MAX]
    short = [p for p, n in zip(PROMPTS, lengths) if n + max_tokens <= PHI3_ORIGINAL_MAX]
    assert len(long) >= 2 and len(short) >= 4, (lengths, PHI3_ORIGINAL_MAX)
    return short + long


_TP_WORKER = r'''
import os, sys
import torch, torch.distributed as dist, transformers
sys.path.insert(0, sys.argv[1])
from test_model_forward import MiniRunner
from octavo.models.layers.parallel_state import set_tensor_parallel
from octavo.models.loader import load_weights
from octavo.models.registry import get_model_class
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
set_tensor_parallel(rank, 2)
seqs = torch.load(sys.argv[2])
for i, model_dir in enumerate(sys.argv[3:]):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = get_model_class(config)(config)
    load_weights(model, model_dir)
    runner = MiniRunner(model)
    logits = [runner.step([(j, s[:-1]) for j, s in enumerate(seqs)]),
              runner.step([(j, s[-1:]) for j, s in enumerate(seqs)])]
    if rank == 0:
        torch.save(torch.cat(logits), os.path.join(os.path.dirname(sys.argv[2]), f"out{i}.pt"))
dist.barrier()  # no rank tears down gloo while the other still has traffic in flight
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip C++ static destructors: tp_util's note on a gloo teardown abort
'''

# Conv1D shards, ALiBi slopes per rank with interleaved qkv, one kv head replicated on both
# ranks, OPT's replicated project_in/out
TP_CASES = ["gpt2", "bloom-6-heads-residual-post-norm", "gpt-bigcode-mqa",
            "opt-post-norm-projected"]


def test_tensor_parallel_two_ranks_match_one(tmp_path):
    import os

    import torch
    from test_model_forward import MiniRunner
    from tp_util import run_two_ranks
    from transformers import AutoConfig

    from octavo.models.loader import load_weights
    from octavo.models.registry import get_model_class

    seqs = [list(range(3, 12)), list(range(40, 54))]
    torch.save(seqs, tmp_path / "seqs.pt")
    dirs, wants = [], []
    for case in TP_CASES:
        model_type, arch, fields = CASES[case]
        path = save_tiny_model(str(tmp_path / case), model_type, arch, **fields)
        config = AutoConfig.from_pretrained(path)
        model = get_model_class(config)(config)
        load_weights(model, path)
        runner = MiniRunner(model)
        wants.append(torch.cat([runner.step([(j, s[:-1]) for j, s in enumerate(seqs)]),
                                runner.step([(j, s[-1:]) for j, s in enumerate(seqs)])]))
        dirs.append(path)
    (tmp_path / "worker.py").write_text(_TP_WORKER)
    run_two_ranks(tmp_path / "worker.py", [os.path.dirname(__file__), tmp_path / "seqs.pt", *dirs],
                  timeout=180)
    for i, (case, want) in enumerate(zip(TP_CASES, wants)):
        got = torch.load(tmp_path / f"out{i}.pt")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"{case}: {m}")
