"""GGUF MoE experts kept quantized: tiny Qwen2-MoE and Qwen3-MoE files written the way llama.cpp
writes them (test_gguf_archs' writer) with the expert stacks ffn_{gate,up,down}_exps in Q4_0,
Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, or a per-layer mix in which one layer's down stack is of another
type (as Q4_K_M writes some in Q6_K). octavo keeps a layer's experts on the INT4 MoE kernel when
its three stacks are 4-bit types and on the weight-only INT8 MoE kernel when they are other kept
types, holds exactly the values the gguf package dequantizes, uses less memory than the
dequantized load, and generates what transformers generates from the same file; two tensor
parallel ranks equal one."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from parity import PROMPTS, hf_greedy
from test_gguf_archs import write_arch_gguf
from test_gguf_quantized import quantize_k
from tiny_models import TINY_COMMON
from tokenizer_util import make_tokenizer
from tp_util import run_two_ranks

from octavo import LLM, SamplingParams, ops, ops_native

# GGUF architecture -> transformers model_type and fields. transformers maps no expert sizes
# from GGUF, so the config classes' defaults hold: experts of I = 1408 with a 5632 shared
# expert (Qwen2-MoE), I = 768 (Qwen3-MoE); K-quant rows need a hidden size of whole 256s
ARCHS = {"qwen2moe": ("qwen2_moe", {}), "qwen3moe": ("qwen3_moe", {"head_dim": 64})}
FIELDS = {**TINY_COMMON, "hidden_size": 256, "num_experts": 4, "num_experts_per_tok": 2}
FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
EIGHT_BIT = ("Q5_K", "Q6_K", "Q8_0")     # kept on the INT8 kernel (and 4-bit stacks beside them)


def layer_types(arch: str, case: str) -> list[tuple[str, str, str]]:
    """(gate, up, down) ggml types of each of the two layers' expert stacks."""
    # Qwen2-MoE's I = 1408 is no multiple of 256: no K type for its down stacks (llama.cpp
    # falls back to a 32-block type there too)
    k_down, other_down = ("Q4_K", "Q6_K") if arch == "qwen3moe" else ("Q4_1", "Q8_0")
    if case == "Q4_K":
        return [("Q4_K", "Q4_K", k_down)] * 2
    if case == "mixed":     # layer 0 has an 8/6-bit down stack; layer 1 mixes the 4-bit types
        return [("Q4_K", "Q4_K", other_down), ("Q4_K", "Q4_1", "Q4_0")]
    return [(case, case, case)] * 2


def quantize_blocks(a: np.ndarray, qtype: str) -> np.ndarray:
    import gguf
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qtype.endswith("_K"):       # the gguf package quantizes no K types: test_gguf_quantized's
        return quantize_k(a.reshape(-1, a.shape[-1]), qtype).reshape(*a.shape[:-1], -1)
    return gguf.quants.quantize(a, getattr(gguf.GGMLQuantizationType, qtype))


def write_moe_gguf(model, arch: str, tok_dir: str, path: str, types) -> str:
    """write_arch_gguf's file (2-D weights F32) with expert stack `part` of layer i in
    types[i][('gate', 'up', 'down').index(part)]."""
    import gguf
    real_add = gguf.GGUFWriter.add_tensor

    def add_tensor(self, name, tensor, *args, **kwargs):
        m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight", name)
        if m is None:
            return real_add(self, name, tensor, *args, **kwargs)
        qtype = types[int(m[1])][("gate", "up", "down").index(m[2])]
        return real_add(self, name, quantize_blocks(tensor, qtype),
                        raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))

    gguf.GGUFWriter.add_tensor = add_tensor
    try:
        return write_arch_gguf(model, arch, tok_dir, path, "F32")
    finally:
        gguf.GGUFWriter.add_tensor = real_add


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """arch -> (the transformers model the files are written from, a tokenizer folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tok_dir = str(tmp_path_factory.mktemp("tok"))
    tok = make_tokenizer()
    tok.save_pretrained(tok_dir)
    models = {}
    for arch, (model_type, fields) in ARCHS.items():
        config = AutoConfig.for_model(model_type, **{**FIELDS, "vocab_size": len(tok), **fields})
        torch.manual_seed(0)
        models[arch] = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return models, tok_dir


@pytest.fixture(scope="module")
def gguf_file(hf_models, tmp_path_factory):
    cache = {}

    def make(arch: str, case: str) -> str:
        if (arch, case) not in cache:
            models, tok_dir = hf_models
            folder = tmp_path_factory.mktemp(f"{arch}-{case}")      # no tokenizer files beside it
            cache[arch, case] = write_moe_gguf(models[arch], arch, tok_dir,
                                               str(folder / f"tiny-{arch}-{case}.gguf"),
                                               layer_types(arch, case))
        return cache[arch, case]
    return make


def _moes(model):
    from octavo.models.layers.fused_moe import FusedMoE
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def _load(path):
    from octavo.models.gguf_loader import load_gguf_config
    from octavo.models.loader import load_weights
    from octavo.models.registry import get_model_class

    cfg = load_gguf_config(path)
    model = get_model_class(cfg)(cfg)
    load_weights(model, path)
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            try:
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
            except NotImplementedError:              # opaque (oneDNN-packed) tensors
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _weight_bytes(model) -> int:
    # parameters, buffers and the experts' packed copies (FusedMoE._prepared), each once
    return _storage_bytes([*model.parameters(), *model.buffers(),
                           *(t for m in _moes(model) for t in (m._prepared or ()))])


def _file_experts(path: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) of one layer as the gguf package dequantizes them."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    stacks = {}
    for t in GGUFReader(path).tensors:
        m = re.fullmatch(rf"blk\.{layer}\.ffn_(gate|up|down)_exps\.weight", t.name)
        if m:
            shape = [int(d) for d in reversed(t.shape)]
            stacks[m[1]] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))
                                            .reshape(shape))
    return torch.cat([stacks["gate"], stacks["up"]], 1), stacks["down"]


def _kept(arch: str, case: str) -> list[str]:
    """The method each layer's experts must get."""
    return ["GGUFInt4MoEMethod" if all(t in FOUR_BIT for t in types) else "GGUFInt8MoEMethod"
            for types in layer_types(arch, case)]


# Qwen2-MoE's I = 1408 takes no K type for its down stacks
CASES = [(arch, case) for arch in sorted(ARCHS) for case in ("Q4_0", "Q4_1", "Q4_K", "mixed")] + [
    ("qwen2moe", "Q8_0"), ("qwen3moe", "Q5_K"), ("qwen3moe", "Q6_K")]


@pytest.mark.parametrize("arch,case", CASES)
def test_matches_transformers_loading_the_same_file(arch, case, gguf_file):
    from transformers import AutoModelForCausalLM
    path = gguf_file(arch, case)
    llm = LLM(path, dtype="float32", kv_cache_memory=1 << 24)
    moes = _moes(llm.llm_engine.runner.model)
    assert [type(m.quant_method).__name__ for m in moes] == _kept(arch, case)
    outs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=8, logprobs=5,
                                                    ignore_eos=True), use_tqdm=False)
    folder, name = os.path.split(path)
    ref_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32).eval()
    ref_model.generation_config.eos_token_id = None         # both run on past EOS
    ref = hf_greedy(ref_model, [o.prompt_token_ids for o in outs], 8)
    for out, (tokens, logprobs) in zip(outs, ref):
        assert out.outputs[0].token_ids == tokens, (arch, case)
        for step, (entry, lp) in enumerate(zip(out.outputs[0].logprobs, logprobs)):
            values, ids = lp.topk(5)
            for value, tok_id in zip(values.tolist(), ids.tolist()):
                assert tok_id in entry, f"{arch} {case}: step {step} misses top-5 token {tok_id}"
                assert entry[tok_id].logprob == pytest.approx(value, abs=2e-4)


@pytest.mark.parametrize("arch,case", [("qwen2moe", "Q4_0"), ("qwen3moe", "Q4_K"),
                                       ("qwen3moe", "mixed"), ("qwen2moe", "mixed"),
                                       ("qwen2moe", "Q8_0"), ("qwen3moe", "Q5_K"),
                                       ("qwen3moe", "Q6_K")])
def test_experts_stay_quantized(arch, case, gguf_file, monkeypatch):
    path = gguf_file(arch, case)
    model = _load(path)
    monkeypatch.setenv("OCTAVO_GGUF_INT4", "0")        # everything dequantized at load
    plain = _load(path)
    assert _weight_bytes(model) < _weight_bytes(plain)
    for layer, (m, p, kept, types) in enumerate(zip(_moes(model), _moes(plain), _kept(arch, case),
                                                    layer_types(arch, case))):
        got, fp32 = _storage_bytes(m._prepared), _storage_bytes(p._prepared)
        assert type(m.quant_method).__name__ == kept and p.quant_method is None
        assert all(t.numel() == 0 for t in (m.w13_weight, m.w2_weight, m.w13_qweight))
        if kept == "GGUFInt4MoEMethod":
            assert isinstance(m._prepared, ops.MoEInt4Weights) and m._prepared.w13.dtype == torch.uint8
            # half a byte per weight plus a scale and an offset per 32: under a quarter of fp32
            assert got < 0.25 * fp32, (got, fp32)
            w13, w2 = ops_native.unpack_moe_int4_weights(m._prepared)
        else:
            assert isinstance(m._prepared, ops.MoEInt8Weights) and m._prepared.w13.dtype == torch.int8
            gs = [min(16 if t == "Q6_K" else 32 for t in types[:2]), 16 if types[2] == "Q6_K" else 32]
            assert [m._prepared.group_size13, m._prepared.group_size2] == gs
            # a byte per weight plus a scale and an offset per 16 or 32: under 40% of fp32
            assert got < 0.4 * fp32, (got, fp32)
            w13, w2 = ops_native.unpack_moe_int8_weights(m._prepared)
        # exactly the values the gguf package dequantizes (codes * scale + offset in fp32)
        ref13, ref2 = _file_experts(path, layer)
        torch.testing.assert_close(w13, ref13, rtol=0, atol=0)
        torch.testing.assert_close(w2, ref2, rtol=0, atol=0)


def test_mixed_file_names_each_stack():
    # a layer is kept in 4 bits when all three of its stacks are 4-bit types, on the INT8
    # kernel when they are all of a kept type (group sizes: gate / up's smaller one, down's own)
    from octavo.models.layers.quantization.gguf import (GGUFConfig, GGUFInt4MoEMethod,
                                                        GGUFInt8MoEMethod)
    from octavo.models.gguf_loader import expert_weight_name

    class Moe:
        local_size, hidden_size = 128, 256

    def types(gate, up, down, prefix="model.layers.0.mlp.experts"):
        return {expert_weight_name(prefix, p): t
                for p, t in zip(("gate_proj", "up_proj", "down_proj"), (gate, up, down))}

    q4_0, q4_1, q4_k, q8_0, q6_k, f16 = 2, 3, 12, 8, 14, 1
    layer1 = "model.layers.1.mlp.experts"
    config = GGUFConfig({**types(q4_k, q4_1, q4_0), **types(q4_k, q4_k, q6_k, layer1)}, {})
    assert isinstance(config.get_moe_method("model.layers.0.mlp.experts", Moe()), GGUFInt4MoEMethod)
    method = config.get_moe_method(layer1, Moe())
    assert isinstance(method, GGUFInt8MoEMethod) and method.gs == {"w13": 32, "w2": 16}
    assert config.get_moe_method("model.layers.2.mlp.experts", Moe()) is None   # F32 / absent
    assert set(config.kept) == set(types(q4_k, q4_1, q4_0)) | set(types(q4_k, q4_k, q6_k, layer1))
    assert {config.kept[n] for n in types(q4_k, q4_k, q6_k, layer1)} == {("int8", 32), ("int8", 16)}
    config = GGUFConfig(types(q6_k, q4_0, q8_0), {})
    method = config.get_moe_method("model.layers.0.mlp.experts", Moe())
    assert isinstance(method, GGUFInt8MoEMethod) and method.gs == {"w13": 16, "w2": 32}
    config = GGUFConfig({n: t for n, t in types(q4_0, q4_0, q8_0).items() if "down" not in n}, {})
    assert config.get_moe_method("model.layers.0.mlp.experts", Moe()) is None and not config.kept


def gguf_logits(path: str, seqs: list[list[int]]) -> tuple[torch.Tensor, list[str]]:
    """Logits of a batched prefill of every sequence but its last token, then a one-token
    decode (test_model_forward's MiniRunner), and the experts' method names."""
    from test_model_forward import MiniRunner
    from octavo.models.gguf_loader import load_gguf_config
    from octavo.models.loader import load_weights
    from octavo.models.registry import get_model_class

    cfg = load_gguf_config(path)
    model = get_model_class(cfg)(cfg)
    load_weights(model, path)
    runner = MiniRunner(model)
    logits = torch.cat([runner.step([(j, s[:-1]) for j, s in enumerate(seqs)]),
                        runner.step([(j, s[-1:]) for j, s in enumerate(seqs)])])
    return logits, [type(m.quant_method).__name__ for m in _moes(model)]


_TP_WORKER = r'''
import os, sys
import torch, torch.distributed as dist
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]
from test_gguf_moe import gguf_logits
from octavo.models.layers.parallel_state import set_tensor_parallel
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
set_tensor_parallel(rank, 2)
seqs = torch.load(sys.argv[2])
results = [gguf_logits(path, seqs) for path in sys.argv[4:]]
if rank == 0:
    torch.save(results, sys.argv[3])
dist.barrier()  # no rank tears down gloo while the other still has traffic in flight
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip C++ static destructors: tp_util's note on a gloo teardown abort
'''


def test_tensor_parallel_two_ranks_match_one(gguf_file, tmp_path):
    # each rank holds its slice of I: gate / up rows, down columns and their groups (4-bit
    # layers; a Q6_K-down layer beside a 4-bit one; Q8_0 layers)
    paths = [gguf_file("qwen2moe", "Q4_0"), gguf_file("qwen3moe", "Q4_K"),
             gguf_file("qwen3moe", "mixed"), gguf_file("qwen2moe", "Q8_0")]
    seqs = [list(range(3, 16)), list(range(40, 61))]
    torch.save(seqs, tmp_path / "seqs.pt")
    worker = tmp_path / "worker.py"
    worker.write_text(_TP_WORKER)
    run_two_ranks(worker, [os.path.dirname(__file__), tmp_path / "seqs.pt", tmp_path / "out.pt",
                           *paths], timeout=600)
    for path, (got, methods), want in zip(paths, torch.load(tmp_path / "out.pt"),
                                          (["GGUFInt4MoEMethod"] * 2, ["GGUFInt4MoEMethod"] * 2,
                                           ["GGUFInt8MoEMethod", "GGUFInt4MoEMethod"],
                                           ["GGUFInt8MoEMethod"] * 2)):
        assert methods == want, methods
        one, _ = gguf_logits(path, seqs)
        torch.testing.assert_close(got, one, atol=1e-4, rtol=0,
                                   msg=lambda m, path=path: f"{path}: {m}")


@pytest.mark.parametrize("native", [False, True])
def test_int8_experts_dequantized_off_the_kernel(native):
    # off CPU octavo has no INT8 MoE kernel: the experts are dequantized once at load in the
    # layer's dtype (forced here on CPU); both forms must give the kernel's answer
    from types import SimpleNamespace
    from octavo.models.layers.quantization.int8_moe import apply_int8_experts, prepare_int8_experts

    g = torch.Generator().manual_seed(0)
    e, h, i = 4, 64, 48
    q13, q2 = (torch.randint(-128, 128, s, generator=g).to(torch.int8) for s in ((e, 2 * i, h), (e, h, i)))
    s13, s2 = torch.rand(e, 2 * i, h // 32, generator=g) / 400, torch.rand(e, h, i // 16, generator=g) / 300
    o13, o2 = torch.randn(s13.shape, generator=g) / 50, torch.randn(s2.shape, generator=g) / 50
    moe = SimpleNamespace(w13_weight=torch.empty(0), activation="silu")
    hidden = torch.randn(5, h, generator=g)
    tw, ti = ops.topk_routing(torch.randn(5, e, generator=g), 2)
    runs = []
    for kernel in (True, False):
        moe._prepared = prepare_int8_experts(moe, q13, s13, o13, q2, s2, o2, 32, 16, kernel=kernel)
        assert isinstance(moe._prepared, ops.MoEInt8Weights) == kernel
        runs.append(apply_int8_experts(moe, hidden, tw, ti, native=native))
    want = ops_native.fused_moe_int8(hidden.double(), q13, s13, o13, q2, s2, o2, tw, ti, 32, 16)
    for out in runs:
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
