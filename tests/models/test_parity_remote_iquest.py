"""Parity of IQuest-Coder-V1 (IQuestCoderForCausalLM) and IQuest-Coder-V1 Loop
(IQuestLoopCoderForCausalLM), both remote code with no transformers class.

IQuestCoder is Llama plus two switches: `clip_qkv` (q, k, v clamped after their projections) and
Qwen2's sliding window from layer `max_window_layers` on. The checkpoint keeps Llama's tensor
names, so the reference is transformers' Llama with both applied from outside: forward hooks clamp
q_proj / k_proj / v_proj, and a registered attention function masks keys older than the window
on the windowed layers.

The Loop model's public modeling file is third-party code that stays out of this repository, so
its reference is a plain-PyTorch re-implementation of that file's full-sequence forward
(`IQuestLoopCoderModel._forward_loop` of the first public release, the semantics vLLM also
implements), written in this test: pass 1 causal; each later pass mixes, per head,
g * attention(q, pass-1 K/V) + (1 - g) * window-attention(q, own K/V), g = sigmoid(q . w + b) on
the rotated query. It recomputes the whole sequence for every generated token, so it shares no
caching logic with octavo's two cache layers per decoder layer. Its greedy tokens and top-5
logprobs must match with whole prefills, chunked prefills, prefix-cache hits and batched decode.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

from tiny_models import save_tiny_model
from octavo import LLM, SamplingParams
from parity import PROMPTS, assert_changes_logits, assert_matches_hf, logits, longest_prompt_ids
from test_parity_remote import (COMMON, CONFIG_PY, HEAD_DIM, HEADS, LAYERS, LLAMA_FIELDS,
                                _randomise_norms)
from test_parity_remote_internlm import randomise_biases

ARCHITECTURES = ["IQuestCoderForCausalLM", "IQuestLoopCoderForCausalLM"]
ROPE_THETA = 10000.0
WINDOW = 8   # the Loop window: shorter than most prompts, so prefill and decode both slide


# ---------------------------------------------------------------- IQuestCoder reference
def _window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """Eager attention for one unpadded sequence with IQuestCoder's sliding window on layers
    >= max_window_layers: query [1, H, Tq, hd], key/value [1, Hk, Tk, hd] -> [1, Tq, H, hd]."""
    config = module.config
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    tq, tk = query.shape[2], key.shape[2]
    rel = torch.arange(tk).view(1, -1) - torch.arange(tk - tq, tk).view(-1, 1)  # key - query pos
    allowed = rel <= 0
    window = config.octavo_window
    if window is not None and module.layer_idx >= config.octavo_first_window_layer:
        allowed &= rel > -window
    scores = (query @ key.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("octavo_test_iquest_window", _window_attention)


def iquest_reference(ref_dir: str, clip_qkv=None, window=None, max_window_layers=0):
    config = AutoConfig.from_pretrained(ref_dir)
    config.octavo_window, config.octavo_first_window_layer = window, max_window_layers
    model = AutoModelForCausalLM.from_pretrained(ref_dir, config=config, dtype=torch.float32,
                                                 attn_implementation="octavo_test_iquest_window")
    if clip_qkv is not None:
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.register_forward_hook(lambda m, i, out: out.clamp(-clip_qkv, clip_qkv))
    return model.eval()


# ---------------------------------------------------------------- Loop reference
def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x, positions, theta):
    # x: [H, T, hd] -> rotated in the rotate-half (neox) layout
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = positions.float()[:, None] * inv_freq[None]          # [T, hd/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + half * sin


def _attend(q, k, v, window=None):
    # q: [H, T, hd]; k, v: [Hk, T, hd] -> [H, T, hd]; causal, optionally the last `window` keys
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    t = q.shape[1]
    rel = torch.arange(t)[None, :] - torch.arange(t)[:, None]
    allowed = (rel <= 0) & ((rel > -window) if window else True)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


class LoopReference:
    """IQuestLoopCoder in plain PyTorch, from the checkpoint's tensors and config.json fields.
    `generate` offers the part of transformers' generate that parity.hf_greedy uses."""

    def __init__(self, model_dir: str, **changes):
        tensors = changes.pop("tensors", {})
        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = {**json.load(f), **changes}
        self.w = {**load_file(os.path.join(model_dir, "model.safetensors")), **tensors}

    def _linear(self, x, name):
        bias = self.w.get(f"{name}.bias")
        return torch.nn.functional.linear(x, self.w[f"{name}.weight"], bias)

    def _qkv(self, i, x, positions):
        p, c, t = f"model.layers.{i}.self_attn", self.cfg, x.shape[0]
        h = _rms(x, self.w[f"model.layers.{i}.input_layernorm.weight"], c["rms_norm_eps"])
        heads = [c["num_attention_heads"], c["num_key_value_heads"], c["num_key_value_heads"]]
        q, k, v = (self._linear(h, f"{p}.{n}_proj").view(t, n_heads, c["head_dim"]).transpose(0, 1)
                   for n, n_heads in zip("qkv", heads))
        theta = c["rope_theta"]
        return _rotate(q, positions, theta), _rotate(k, positions, theta), v

    def _finish(self, i, x, attn):
        # attn: [H, T, hd] -> the layer's output hidden state
        x = x + self._linear(attn.transpose(0, 1).flatten(1), f"model.layers.{i}.self_attn.o_proj")
        p, eps = f"model.layers.{i}", self.cfg["rms_norm_eps"]
        h = _rms(x, self.w[f"{p}.post_attention_layernorm.weight"], eps)
        gate, up = self._linear(h, f"{p}.mlp.gate_proj"), self._linear(h, f"{p}.mlp.up_proj")
        return x + self._linear(torch.nn.functional.silu(gate) * up, f"{p}.mlp.down_proj")

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        c = self.cfg
        positions = torch.arange(len(ids))
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        kv1 = []
        for i in range(c["num_hidden_layers"]):                 # pass 1
            q, k, v = self._qkv(i, x, positions)
            kv1.append((k, v))
            x = self._finish(i, x, _attend(q, k, v))
        for _ in range(1, c["loop_num"]):                       # later passes: gated mix
            for i, (k1, v1) in enumerate(kv1):
                q, k, v = self._qkv(i, x, positions)
                w, b = (self.w[f"model.gate_projections.{i}.{n}"] for n in ("weight", "bias"))
                g = torch.sigmoid(torch.einsum("htd,hd->ht", q, w) + b[:, None]).unsqueeze(-1)
                mixed = g * _attend(q, k1, v1) + (1 - g) * _attend(q, k, v, c["loop_window_size"])
                x = self._finish(i, x, mixed)
        x = _rms(x, self.w["model.norm.weight"], c["rms_norm_eps"])
        return x @ self.w["lm_head.weight"].T

    def generate(self, input_ids, max_new_tokens: int, **_):
        ids, steps = input_ids[0].tolist(), []
        for _ in range(max_new_tokens):
            step = self.logits(ids)[-1:]
            steps.append(step)
            ids.append(int(step.argmax()))
        return SimpleNamespace(sequences=torch.tensor([ids]), logits=steps)


# ---------------------------------------------------------------- checkpoints
def _remote_config(arch: str, model_type: str, vocab_size: int, fields: dict) -> dict:
    config = {k: COMMON[k] for k in LLAMA_FIELDS if k in COMMON}
    config.update(vocab_size=vocab_size, head_dim=HEAD_DIM, rope_theta=ROPE_THETA, **fields)
    return dict(config, architectures=[arch], model_type=model_type,
                auto_map={"AutoConfig": "configuration_remote.RemoteConfig"})


def _write_remote(path: str, ref_dir: str, tensors: dict, config: dict) -> None:
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "configuration_remote.py"), "w") as f:
        f.write(CONFIG_PY.format(model_type=config["model_type"]))
    for name in os.listdir(ref_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(ref_dir, name), path)


def _llama_tensors(root: str, **fields) -> tuple[str, dict]:
    ref_dir = os.path.join(root, "reference")
    save_tiny_model(ref_dir, "llama", "LlamaForCausalLM", **{**COMMON, **fields})
    file = os.path.join(ref_dir, "model.safetensors")
    tensors = load_file(file)
    _randomise_norms(tensors, seed=1)
    randomise_biases(tensors, seed=2)
    save_file(tensors, file, metadata={"format": "pt"})
    return ref_dir, tensors


# name -> (IQuestCoder config fields, reference settings)
IQUEST_CASES = {
    # clip_qkv that bites, attention biases, a window of 6 on the last two of four layers
    "iquest": (dict(attention_bias=True, clip_qkv=0.5, use_sliding_window=True, sliding_window=6,
                    max_window_layers=2),
               dict(clip_qkv=0.5, window=6, max_window_layers=2)),
    # what the published checkpoints ship: both switches present and off
    "iquest-published": (dict(attention_bias=False, clip_qkv=None, use_sliding_window=False,
                              sliding_window=None, max_window_layers=0), dict()),
}
IQUEST_FEATURES = [dict(clip_qkv=None), dict(window=None), dict(max_window_layers=LAYERS),
                   dict(max_window_layers=0)]

# name -> (Loop config fields, llama fields of the reference weights)
LOOP_CASES = {
    "loop": (dict(loop_num=2, loop_window_size=WINDOW), dict()),
    # three passes (two local cache layers per layer), MHA, attention and MLP biases
    "loop-3": (dict(loop_num=3, loop_window_size=5, num_key_value_heads=HEADS, attention_bias=True,
                    mlp_bias=True),
               dict(num_key_value_heads=HEADS, attention_bias=True, mlp_bias=True)),
}


def build_iquest(name: str, root: str) -> tuple[str, str]:
    fields, _ = IQUEST_CASES[name]
    ref_dir, tensors = _llama_tensors(root, attention_bias=fields["attention_bias"])
    remote = os.path.join(root, name)
    config = _remote_config("IQuestCoderForCausalLM", "iquestcoder",
                            AutoConfig.from_pretrained(ref_dir).vocab_size, fields)
    _write_remote(remote, ref_dir, tensors, config)
    return ref_dir, remote


def _gate_tensors(seed: int, heads: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(LAYERS):  # large enough that the gate moves with the query
        prefix = f"model.gate_projections.{i}"
        out[f"{prefix}.weight"] = 0.5 * torch.randn(heads, HEAD_DIM, generator=gen)
        out[f"{prefix}.bias"] = torch.randn(heads, generator=gen)
    return out


def build_loop(name: str, root: str) -> str:
    fields, llama_fields = LOOP_CASES[name]
    ref_dir, tensors = _llama_tensors(root, **llama_fields)
    tensors.update(_gate_tensors(seed=7, heads=HEADS))
    remote = os.path.join(root, name)
    config = _remote_config("IQuestLoopCoderForCausalLM", "iquestloopcoder",
                            AutoConfig.from_pretrained(ref_dir).vocab_size, fields)
    _write_remote(remote, ref_dir, tensors, config)
    return remote


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    cache: dict[str, object] = {}

    def make(name: str):
        if name not in cache:
            root = str(tmp_path_factory.mktemp(name))
            build = build_iquest if name in IQUEST_CASES else build_loop
            cache[name] = build(name, root)
        return cache[name]

    return make


# ---------------------------------------------------------------- IQuestCoder tests
@pytest.mark.parametrize("name", list(IQUEST_CASES))
def test_iquest_coder_matches_transformers(name, dirs):
    ref_dir, remote = dirs(name)
    assert_matches_hf(remote, reference=iquest_reference(ref_dir, **IQUEST_CASES[name][1]),
                      trust_remote_code=True, block_size=4)


@pytest.mark.parametrize("changes", IQUEST_FEATURES, ids=lambda c: "-".join(map(str, c.items())))
def test_iquest_coder_features_change_reference_output(changes, dirs):
    ids = longest_prompt_ids()
    ref_dir, _ = dirs("iquest")
    settings = IQUEST_CASES["iquest"][1]
    assert_changes_logits(logits(iquest_reference(ref_dir, **settings), ids),
                          logits(iquest_reference(ref_dir, **{**settings, **changes}), ids),
                          f"iquest: {changes}")


def test_iquest_coder_refuses_a_nonpositive_clip():
    from transformers import PretrainedConfig

    from octavo.models.iquest_coder import IQuestCoderForCausalLM
    config = PretrainedConfig(**_remote_config("IQuestCoderForCausalLM", "iquestcoder", 64,
                                               dict(clip_qkv=0.0)))
    with pytest.raises(ValueError, match="clip_qkv must be positive"):
        IQuestCoderForCausalLM(config)


# ---------------------------------------------------------------- Loop tests
@pytest.mark.parametrize("name", list(LOOP_CASES))
def test_loop_coder_matches_reference(name, dirs):
    remote = dirs(name)
    assert_matches_hf(remote, reference=LoopReference(remote), trust_remote_code=True,
                      block_size=4)


def test_loop_coder_chunked_prefill_matches_reference(dirs):
    """A 5-token budget: prompts are prefilled in chunks that start mid-window and mid-block."""
    remote = dirs("loop")
    assert_matches_hf(remote, prompts=PROMPTS[3:5] + PROMPTS[7:8], max_tokens=12,
                      reference=LoopReference(remote), trust_remote_code=True, block_size=4,
                      max_num_batched_tokens=5)


def test_loop_coder_prefix_cache_hits_give_the_same_output(dirs):
    """The second run of the same prompts starts from cached blocks of both passes."""
    remote = dirs("loop")
    llm = LLM(model=remote, dtype="float32", trust_remote_code=True, block_size=4,
              kv_cache_memory=1 << 24, enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=5)
    prompts = [PROMPTS[3], PROMPTS[4], PROMPTS[7]]
    first = llm.generate(prompts, params, use_tqdm=False)
    hits = llm.llm_engine.kv.prefix_hits
    second = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.kv.prefix_hits - hits >= 3 * 4, "no prefix-cache hits"
    reference = LoopReference(remote)
    for a, b in zip(first, second):
        ours = b.outputs[0]
        assert ours.token_ids == a.outputs[0].token_ids
        expected = reference.generate(torch.tensor([b.prompt_token_ids]), 12)
        assert ours.token_ids == expected.sequences[0, len(b.prompt_token_ids):].tolist()
        for entry, ref in zip(ours.logprobs, expected.logits):
            ref = torch.log_softmax(ref[0], -1)
            for value, token in zip(*ref.topk(5)):
                assert entry[int(token)].logprob == pytest.approx(float(value), abs=2e-4)


def test_loop_coder_holds_a_cache_layer_per_pass(dirs):
    from transformers import AutoConfig as Config

    from octavo.models.iquest_loopcoder import IQuestLoopCoderForCausalLM
    from octavo.models.layers.attention import Attention
    for name, passes in (("loop", 2), ("loop-3", 3)):
        model = IQuestLoopCoderForCausalLM(Config.from_pretrained(dirs(name),
                                                                  trust_remote_code=True))
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(layers) == passes * LAYERS
        window = LOOP_CASES[name][0]["loop_window_size"]
        assert sorted(a.sliding_window for a in layers) == \
            [0] * LAYERS + [window] * (passes - 1) * LAYERS


def test_loop_coder_without_a_cache_matches_reference(dirs):
    """Before the runner allocates the cache (the profiling forward) the later passes attend
    over pass 1's K/V of the step itself: whole prompts still give the reference logits."""
    from transformers import AutoConfig as Config

    from octavo.models.layers.attention import AttentionMetadata
    from octavo.models.loader import load_weights
    from octavo.models.registry import get_model_class

    remote = dirs("loop")
    config = Config.from_pretrained(remote, trust_remote_code=True)
    model = get_model_class(config)(config)
    load_weights(model, remote)
    seqs = [list(range(3, 23)), list(range(40, 51))]
    lens = [len(s) for s in seqs]
    md = AttentionMetadata(slot_mapping=torch.full((sum(lens),), -1),
                           query_start_loc=torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32),
                           seq_lens=torch.tensor(lens, dtype=torch.int32),
                           block_table=torch.zeros(2, 1, dtype=torch.int32),
                           max_query_len=max(lens), max_seq_len=max(lens))
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        got = model.compute_logits(model(torch.tensor(seqs[0] + seqs[1]), positions, md))
    reference = LoopReference(remote)
    want = torch.cat([reference.logits(s) for s in seqs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


LOOP_FEATURES = {
    "second pass": dict(loop_num=1),
    "window": dict(loop_window_size=10_000),
    "gate weight": dict(tensors={f"model.gate_projections.{i}.weight": torch.zeros(HEADS, HEAD_DIM)
                                 for i in range(LAYERS)}),
    "gate bias": dict(tensors={f"model.gate_projections.{i}.bias": torch.zeros(HEADS)
                               for i in range(LAYERS)}),
}


@pytest.mark.parametrize("what", list(LOOP_FEATURES))
def test_loop_coder_features_change_reference_output(what, dirs):
    ids = longest_prompt_ids()
    remote = dirs("loop")
    assert_changes_logits(LoopReference(remote).logits(ids),
                          LoopReference(remote, **LOOP_FEATURES[what]).logits(ids), f"loop: {what}")


@pytest.mark.parametrize("fields", [dict(loop_num=0), dict(loop_window_size=-1),
                                    dict(loop_num=1.5)], ids=["loop0", "window-1", "loop1.5"])
def test_loop_coder_refuses_bad_loop_settings(fields):
    from transformers import PretrainedConfig

    from octavo.models.iquest_loopcoder import IQuestLoopCoderForCausalLM
    config = PretrainedConfig(**_remote_config("IQuestLoopCoderForCausalLM", "iquestloopcoder",
                                               64, fields))
    with pytest.raises(ValueError, match="loop_num|loop_window_size"):
        IQuestLoopCoderForCausalLM(config)


# ---------------------------------------------------------------- tensor parallel
def test_tensor_parallel_two_ranks_match_one(dirs, tmp_path):
    """Heads (and with them the Loop gate's rows and both passes' cache layers) split across
    two ranks give the one-rank logits."""
    from tp_util import one_rank_logits, two_rank_logits

    seqs = [list(range(3, 16)), list(range(40, 61))]
    paths = [dirs("iquest")[1], dirs("loop")]
    for path, got in zip(paths, two_rank_logits(paths, seqs, str(tmp_path))):
        torch.testing.assert_close(got, one_rank_logits(path, seqs), atol=1e-4, rtol=0,
                                   msg=lambda m, path=path: f"{path}: {m}")
