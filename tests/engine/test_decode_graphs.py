"""Decode buckets, padding and static buffers (engine/decode_graphs.py), shared by the CUDA-graph
path and the CPU path: bucket choice, what padding rows hold, that padding never writes the KV
cache, and that the padded static path gives the eager varlen path's tokens and logprobs.
Capture/replay itself needs a GPU (test_cuda_graphs_match_eager)."""
import gc

import numpy as np
import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.decode_graphs import DecodeGraphs, StaticDecodeInputs, decode_batch_sizes, pick_bucket
from octavo.model_runner import InputBuffers

PROMPTS = ["Hello, my name is", "The capital of France is", "A",
           "Once upon a time, there was a little robot", "She sells sea shells",
           "Numbers like 12345 and 6789", "The quick brown fox", "def main():", "Hi there"]
MIB = 1 << 20


def test_batch_sizes():
    assert decode_batch_sizes(256, 8192) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert decode_batch_sizes(20, 2048) == [1, 2, 4, 8, 16, 20]     # max_num_seqs is a bucket
    assert decode_batch_sizes(3, 2048) == [1, 2, 3]
    assert decode_batch_sizes(64, 24) == [1, 2, 4, 8, 16, 24]       # the token budget caps it
    assert decode_batch_sizes(4096, 8192)[-1] == 512


def test_pick_bucket():
    sizes = decode_batch_sizes(40, 2048)                             # 1 2 4 8 16 32 40
    assert [pick_bucket(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 33, 40)] == \
        [1, 2, 4, 8, 8, 16, 32, 40, 40]
    assert pick_bucket(41, sizes) is None


def _host(rows, max_blocks=6):
    host = InputBuffers(max_tokens=16, max_seqs=16, max_blocks=max_blocks)
    for i, (tok, pos, slot, seq_len, table) in enumerate(rows):
        host.input_ids[i], host.positions[i], host.slot_mapping[i] = tok, pos, slot
        host.seq_lens[i] = seq_len
        host.block_table[i, :len(table)] = table
    return host


def test_static_inputs_pad_rows():
    static = StaticDecodeInputs(max_bs=8, max_blocks=6, device=torch.device("cpu"))
    # an earlier, larger step leaves stale values in every buffer
    stale = _host([(9, 40, 77, 41, [5, 4, 3])] * 8)
    static.load(stale, 8, 8)
    host = _host([(11, 5, 21, 6, [5, 2]), (12, 0, 8, 1, [2]), (13, 9, 3 * 4 + 1, 10, [1, 4, 3])])
    static.load(host, 3, 4)
    ids, pos, md = static.view(4, max_seq_len=64)
    assert ids.tolist() == [11, 12, 13, 0]
    assert pos.tolist() == [5, 0, 9, 0]
    assert md.slot_mapping.tolist() == [21, 8, 13, -1]              # padding is never written
    assert md.seq_lens.tolist() == [6, 1, 10, 1]                    # padding reads one key
    assert md.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert md.block_table[3].tolist() == [0] * 6
    assert md.block_table[:3, :3].tolist() == [[5, 2, 0], [2, 0, 0], [1, 4, 3]]
    assert md.max_query_len == 1 and md.max_seq_len == 64
    assert static.input_ids[4:].tolist() == [9] * 4                # rows past the bucket untouched


class _Recorder(torch.nn.Module):
    """Stands in for a model: returns input_ids as hidden states and records the metadata."""

    def forward(self, input_ids, positions, md):
        self.seen = (input_ids.clone(), md.slot_mapping.clone(), md.seq_lens.clone())
        return input_ids.float()[:, None].expand(-1, 3) + positions.float()[:, None]


def test_run_returns_real_rows_only():
    sizes = decode_batch_sizes(8, 64)
    graphs = DecodeGraphs(_Recorder(), sizes, max_blocks=6, max_model_len=24,
                          device=torch.device("cpu"))
    assert graphs.bucket([1, 1, 1]) == 4
    assert graphs.bucket([1, 2]) is None                  # a prefill chunk: not a decode step
    assert graphs.bucket([1] * 9) is None                 # more rows than the largest bucket
    host = _host([(11, 5, 21, 6, [5, 2]), (12, 0, 8, 1, [2]), (13, 9, 13, 10, [1, 4, 3])])
    hidden = graphs.run(host, 3, 4)
    assert hidden.shape == (3, 3)
    assert hidden[:, 0].tolist() == [16.0, 12.0, 22.0]
    ids, slots, seq_lens = graphs.model.seen
    assert ids.tolist() == [11, 12, 13, 0] and slots.tolist()[-1] == -1 and seq_lens[-1] == 1


@pytest.fixture(scope="module")
def eager_and_bucketed(llama_dir):
    kw = dict(model=llama_dir, dtype="float32", kv_cache_memory=8 * MIB, block_size=4)
    return LLM(enforce_eager=True, **kw), LLM(**kw)


def test_bucketed_decode_matches_eager(eager_and_bucketed, monkeypatch):
    eager, bucketed = eager_and_bucketed
    assert eager.llm_engine.runner.decode_graphs is None
    graphs = bucketed.llm_engine.runner.decode_graphs
    used = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda host, n, bs: used.append((n, bs)) or run(host, n, bs))
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=3, ignore_eos=True)
    # 9 prompts decode in a bucket of 16, then fewer as max_tokens differ: 5 -> 8, 3 -> 4
    many = [SamplingParams(temperature=0, max_tokens=m, logprobs=3, ignore_eos=True)
            for m in (10, 10, 10, 6, 6, 3, 3, 3, 3)]
    for per_prompt in (params, many):
        want = eager.generate(PROMPTS, per_prompt, use_tqdm=False)
        got = bucketed.generate(PROMPTS, per_prompt, use_tqdm=False)
        for w, g in zip(want, got):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            for ws, gs in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                for tok, lp in ws.items():
                    assert gs[tok].logprob == pytest.approx(lp.logprob, abs=1e-4)
    assert {bs for n, bs in used} >= {16, 8, 4}
    assert all(n < bs or n == bs for n, bs in used) and any(n < bs for n, bs in used)


def test_padding_never_writes_the_cache(llama_dir, monkeypatch):
    llm = LLM(model=llama_dir, dtype="float32", kv_cache_memory=4 * MIB, block_size=4,
              enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    assert llm.llm_engine.kv.pool.allocate(1) == [0]     # block 0 (what padding reads) is no one's
    for layer in runner.attn_layers:
        layer.k_cache.fill_(float("nan"))
        layer.v_cache.fill_(float("nan"))
    real_slots, buckets = set(), []
    fill = runner._fill_host

    def spy(out):
        result = fill(out)
        real_slots.update(runner.buf.slot_mapping[:result[0]].tolist())
        return result
    monkeypatch.setattr(runner, "_fill_host", spy)
    run = runner.decode_graphs.run
    monkeypatch.setattr(runner.decode_graphs, "run",
                        lambda host, n, bs: buckets.append((n, bs)) or run(host, n, bs))
    llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                 use_tqdm=False)
    assert (3, 4) in buckets                               # a padded decode step ran
    for layer in runner.attn_layers:
        for cache in (layer.k_cache, layer.v_cache):
            rows = cache.flatten(0, 1)                     # [num_blocks * block_size, Hk, hd]
            written = {s for s in range(rows.shape[0]) if not torch.isnan(rows[s]).all()}
            assert written == real_slots


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")
def test_cuda_graphs_match_eager(llama_dir):
    kw = dict(model=llama_dir, dtype="float32", block_size=16, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = LLM(enforce_eager=True, **kw)
    want = eager.generate(PROMPTS, params, use_tqdm=False)
    del eager                       # its KV cache would count against the second engine's share
    gc.collect()
    torch.cuda.empty_cache()
    graphed = LLM(**kw)
    assert graphed.llm_engine.runner.decode_graphs.graphs       # captured
    got = graphed.generate(PROMPTS, params, use_tqdm=False)
    assert [g.outputs[0].token_ids for g in got] == [w.outputs[0].token_ids for w in want]


def test_host_buffers_are_numpy():
    # the static path copies straight from the runner's numpy buffers
    host = InputBuffers(4, 4, 2)
    assert isinstance(host.seq_lens, np.ndarray) and host.seq_lens.dtype == np.int32
