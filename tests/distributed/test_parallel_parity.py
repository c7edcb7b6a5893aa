"""Tensor / pipeline parallelism on CPU processes (gloo): greedy ids, logprobs and prompt
logprobs identical to the single-process engine for TP=2, PP=2 and TP=2 x PP=2, on batched
prompts with chunked prefill (a token budget of 16) and preemption (a KV cache of a few blocks
per rank), over Llama (GQA), BLOOM (ALiBi, tied head), Qwen2 (tied head, one KV head replicated
over the TP ranks), Gemma 2, Qwen3-MoE and DeepSeek-V2 (MLA, MoE); and TP=2 of the
state-space and hybrid models (Mamba, Falcon-Mamba, Mamba-2, Jamba, Bamba, Granite 4.0 hybrid,
Zamba2, Kimi-Linear).

The matrix runs as torchrun would (parallel_ranks.py, external_launcher): per parallel shape the
ranks start once and run every model, which keeps the whole matrix to one process start-up per
rank and shape. The multiprocess executor (the default) runs one case end to end."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from parallel_ranks import ENGINE, KV_BLOCKS, summarize, wait_ranks
from tiny_models import build_tiny_model, build_tiny_ssm_model, save_tiny_model
from octavo import LLM

LAYERS4 = dict(num_hidden_layers=4)
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA2 = dict(IDS, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, query_pre_attn_scalar=24, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"] * 2,
              attn_logit_softcapping=4.0, final_logit_softcapping=3.0, initializer_range=0.2,
              tie_word_embeddings=True)
BLOOM = dict(IDS, hidden_size=64, n_head=4, n_layer=2, initializer_range=0.08)
# layer 0 dense (mlp_only_layers), layer 1 MoE: each pipeline stage holds one kind
QWEN3_MOE = dict(IDS, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=512, initializer_range=0.08, num_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                 mlp_only_layers=[0], tie_word_embeddings=False)
DEEPSEEK_V2 = dict(IDS, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                   initializer_range=0.08, n_routed_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1,
                   topk_method="greedy", q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=12, tie_word_embeddings=False)
# Zamba2: mamba, hybrid (block 0), mamba, hybrid (block 1), hybrid (block 0 again); tied blocks
# with per-use adapters and rotary: the shared blocks' heads, MLP and adapters split over ranks
ZAMBA2 = dict(IDS, hidden_size=64, num_hidden_layers=5,
              layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid"],
              mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=8,
              chunk_size=8, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
              num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=8,
              use_mem_rope=True, max_position_embeddings=512, initializer_range=0.08,
              rms_norm_eps=1e-5, tie_word_embeddings=True)
# Kimi-Linear: KDA + dense MLP, MLA + MoE, KDA + MoE (experts in 2 groups, a shared expert)
KIMI_LINEAR = dict(IDS, hidden_size=64, num_hidden_layers=3,
                   layer_types=["linear_attention", "full_attention", "linear_attention"],
                   mlp_layer_types=["dense", "sparse", "sparse"], intermediate_size=96,
                   moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
                   kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                   v_head_dim=16, linear_num_heads=4, linear_head_dim=16,
                   linear_conv_kernel_dim=4, num_local_experts=8, num_experts_per_tok=2,
                   n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5,
                   norm_topk_prob=True, max_position_embeddings=512, initializer_range=0.08,
                   rms_norm_eps=1e-5, tie_word_embeddings=False)

MODELS = ["llama-gqa", "bloom-alibi", "qwen2-tied-1kv", "gemma2", "qwen3-moe", "deepseek-v2-mla"]
SHAPES = [(2, 1), (1, 2), (2, 2)]
# state-space and hybrid models: tensor parallel only (mixers whole on each rank), in the
# TP=2 start of the ranks; a KV budget of its own (state slots and blocks), preemption aside
SSM_MODELS = ["MambaForCausalLM", "FalconMambaForCausalLM", "Mamba2ForCausalLM",
              "JambaForCausalLM", "BambaForCausalLM", "GraniteMoeHybridForCausalLM",
              "Zamba2ForCausalLM", "KimiLinearForCausalLM"]
SSM_KV_BYTES = 1 << 22


def _build(name: str, root: str) -> str:
    path = os.path.join(root, name)
    if name == "llama-gqa":            # 4 heads, 2 KV heads
        return build_tiny_model(path, "LlamaForCausalLM", **LAYERS4)
    if name == "qwen2-tied-1kv":       # tied embeddings; 1 KV head, replicated over 2 TP ranks
        return build_tiny_model(path, "Qwen2ForCausalLM", num_key_value_heads=1,
                                use_sliding_window=False, **LAYERS4)
    if name == "gemma2":
        return save_tiny_model(path, "gemma2", "Gemma2ForCausalLM", **GEMMA2)
    if name == "bloom-alibi":
        return save_tiny_model(path, "bloom", "BloomForCausalLM", **BLOOM)
    if name == "qwen3-moe":
        return save_tiny_model(path, "qwen3_moe", "Qwen3MoeForCausalLM", **QWEN3_MOE)
    if name == "deepseek-v2-mla":
        return save_tiny_model(path, "deepseek_v2", "DeepseekV2ForCausalLM", **DEEPSEEK_V2)
    if name == "Zamba2ForCausalLM":
        return save_tiny_model(path, "zamba2", name, **ZAMBA2)
    if name == "KimiLinearForCausalLM":
        return save_tiny_model(path, "kimi_linear", name, **KIMI_LINEAR)
    return build_tiny_ssm_model(path, name)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (model dir, the single-process engine's summary, bytes of one KV block)"""
    root = str(tmp_path_factory.mktemp("models"))
    refs = {}
    for name in MODELS + SSM_MODELS:
        path = _build(name, root)
        llm = LLM(model=path, kv_cache_memory=SSM_KV_BYTES if name in SSM_MODELS else 1 << 22,
                  **ENGINE)
        refs[name] = (path, summarize(llm), llm.llm_engine.runner.bytes_per_block())
    return refs


def _per_rank_bytes(path: str, single_bytes: int, tp: int, pp: int) -> int:
    """Bytes of a KV block on one rank: the layers of its stage and its share of the KV heads
    (a KV head replicated when there are fewer heads than ranks; MLA's latent on every rank)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "kv_lora_rank", None):
        return single_bytes // pp
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return single_bytes * max(kv // tp, 1) // kv // pp


@pytest.fixture(scope="module")
def ranks(references, tmp_path_factory):
    """(tp, pp) -> every rank's summaries of every model, from one start of the ranks."""
    cache: dict[tuple[int, int], list[dict]] = {}

    def run(tp: int, pp: int) -> list[dict]:
        if (tp, pp) not in cache:
            work = tmp_path_factory.mktemp(f"tp{tp}pp{pp}")
            cases = [dict(name=name, path=path, kwargs={},
                          kv_cache_memory=KV_BLOCKS * _per_rank_bytes(path, per_block, tp, pp))
                     for name, (path, _, per_block) in references.items() if name in MODELS]
            if (tp, pp) == (2, 1):
                cases += [dict(name=name, path=references[name][0], kwargs={},
                               kv_cache_memory=SSM_KV_BYTES) for name in SSM_MODELS]
            job = work / "job.json"
            job.write_text(json.dumps(dict(tp=tp, pp=pp, cases=cases)))
            cache[(tp, pp)] = _launch(str(job), tp * pp)
        return cache[(tp, pp)]

    return run


def _launch(job: str, world: int) -> list[dict]:
    script = os.path.join(os.path.dirname(__file__), "parallel_ranks.py")
    folder, port = os.path.dirname(job), _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   OMP_WAIT_POLICY="PASSIVE")
        with open(os.path.join(folder, f"rank{rank}.log"), "w") as log:   # files: no pipe fills
            procs.append(subprocess.Popen([sys.executable, script, job], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    failed = wait_ranks(procs, timeout=600)
    if failed is not None:
        with open(os.path.join(folder, f"rank{failed}.log")) as log:
            pytest.fail(f"rank {failed} failed or hung:\n{log.read()[-4000:]}")
    return [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(world)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tp,pp", SHAPES, ids=[f"tp{t}-pp{p}" for t, p in SHAPES])
@pytest.mark.parametrize("name", MODELS)
def test_parallel_greedy_ids_match_single_process(references, ranks, name, tp, pp):
    _, expected, _ = references[name]
    per_rank = [results[name] for results in ranks(tp, pp)]
    for got in per_rank:                 # every rank sampled the same tokens
        assert got["blocks"] == KV_BLOCKS
        assert got["preemptions"] > 0
        assert got["ids"] == expected["ids"]
        for ours, ref in zip(got["logprobs"], expected["logprobs"]):
            _assert_logprobs_close(ours, ref)
        _assert_logprobs_close(got["prompt"], expected["prompt"])


@pytest.mark.parametrize("name", SSM_MODELS)
def test_state_space_models_on_two_tensor_parallel_ranks_match_single_process(references, ranks,
                                                                             name):
    _, expected, _ = references[name]
    for results in ranks(2, 1):
        got = results[name]
        assert got["ids"] == expected["ids"]
        for ours, ref in zip(got["logprobs"], expected["logprobs"]):
            _assert_logprobs_close(ours, ref)
        _assert_logprobs_close(got["prompt"], expected["prompt"])


def test_multiprocess_executor_matches_single_process(references):
    """The default executor (spawned workers, pipes to the driver) on two pipeline stages
    (its tensor-parallel runs: test_executor_lifecycle.py)."""
    path, expected, per_block = references["gemma2"]
    llm = LLM(model=path, pipeline_parallel_size=2,
              kv_cache_memory=KV_BLOCKS * _per_rank_bytes(path, per_block, 1, 2), **ENGINE)
    try:
        assert llm.llm_engine.runner is None and llm.llm_engine.kv.num_blocks == KV_BLOCKS
        got = summarize(llm)
    finally:
        llm.llm_engine.executor.shutdown()
    assert all(not p.is_alive() for p in llm.llm_engine.executor.procs)
    assert got["preemptions"] > 0 and got["ids"] == expected["ids"]
    for ours, ref in zip(got["logprobs"], expected["logprobs"]):
        _assert_logprobs_close(ours, ref)
    _assert_logprobs_close(got["prompt"], expected["prompt"])


def _assert_logprobs_close(ours: list, ref: list) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        if b is None:                   # the first prompt token has none
            assert a is None
            continue
        assert a.keys() == b.keys()
        for token in b:
            assert a[token] == pytest.approx(b[token], abs=1e-4)
