"""Pipeline stages of every kind of decoder, in one process: each architecture is built as two
stages (set_pipeline_parallel(r, 2), as a worker does), the first stage's output is fed to the
second, and the chained logits must equal the one-stage model's on a batched prefill, a chunked
prefill and decodes (paged cache, shuffled block tables). The multi-process engine runs the same
stage forward (test_parallel_parity.py); this covers the architectures it does not start."""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch
from torch import nn

from octavo.models.layers.parallel_state import set_pipeline_parallel
from octavo.models.layers.pipeline import PPMissingLayer, StageLayers, check_parallel_support
from octavo.models.loader import load_weights
from octavo.models.registry import get_model_class
from tiny_models import save_tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "models"))
import test_parity_deepseek as deepseek  # noqa: E402
import test_parity_dense_a as dense_a  # noqa: E402
import test_parity_dense_b as dense_b  # noqa: E402
import test_parity_longcat as longcat  # noqa: E402
import test_parity_moe as moe  # noqa: E402
import test_parity_remote_mla as remote_mla  # noqa: E402
from test_model_forward import MiniRunner  # noqa: E402

TWO_LAYERS = dict(num_hidden_layers=2)


def _tagged(module, arch_first: bool) -> dict:
    """case -> (arch, model_type, fields) of a parity module's CASES."""
    return {name: (c[0], c[1], c[2]) if arch_first else (c[1], c[0], c[2])
            for name, c in module.CASES.items()}


def _hf_cases() -> dict:
    """case -> (arch, model_type, config fields with an even layer count) of the transformers
    architectures, from the parity tests' tiny configs."""
    from tiny_models import TINY_ARCHS, TINY_COMMON
    cases = {arch: (arch, f["model_type"], {**TINY_COMMON, **{k: v for k, v in f.items()
                                                               if k != "model_type"}})
             for arch, f in TINY_ARCHS.items()}
    for name, (arch, model_type, fields) in _tagged(dense_a, False).items():
        cases[name] = (arch, model_type, fields)
    for name, (arch, model_type, fields) in _tagged(dense_b, True).items():
        cases[name] = (arch, model_type, {**dense_b.COMMON, **fields})
    for name, (arch, model_type, fields) in _tagged(moe, True).items():
        extra = dict(n_layers=2) if arch == "DbrxForCausalLM" else TWO_LAYERS
        base = moe.DBRX if arch == "DbrxForCausalLM" else moe.COMMON
        cases[name] = (arch, model_type, {**base, **fields, **extra})
    for name, (arch, model_type, fields) in _tagged(deepseek, True).items():
        cases[name] = (arch, model_type, {**deepseek.COMMON, **fields, **TWO_LAYERS})
    for name, fields in longcat.CASES.items():
        cases[name] = ("LongcatFlashForCausalLM", "longcat_flash", {**longcat.COMMON, **fields})
    for name, fields in remote_mla.CASES.items():
        cases[name] = ("MiniCPM3ForCausalLM", "minicpm3",
                       {**remote_mla.COMMON, **fields, **TWO_LAYERS})
    return cases


HF_CASES = _hf_cases()


def _build(name: str, root: str) -> tuple[str, bool]:
    """(checkpoint dir, trust_remote_code) of a case."""
    path = os.path.join(root, name)
    if name in HF_CASES:
        arch, model_type, fields = HF_CASES[name]
        return save_tiny_model(path, model_type, arch, **fields), False
    if name == "arctic":
        from test_parity_remote_arctic import build_arctic
        return build_arctic(name, path)[0], True
    if name == "iquest":
        from test_parity_remote_iquest import build_iquest
        return build_iquest(name, path)[1], True
    if name == "internlm":
        from test_parity_remote_internlm import build_case
        return build_case(name, path)[1], True
    from test_parity_remote import build_case   # ChatGLM, InternLM2/3, Baichuan, MiniCPM
    return build_case(name, path)[1], True


# the remote-code checkpoints (built by converting a transformers model): case -> architecture
REMOTE = {"arctic": "ArcticForCausalLM", "iquest": "IQuestCoderForCausalLM",
          "internlm": "InternLMForCausalLM", "internlm2": "InternLM2ForCausalLM",
          "internlm3": "InternLM3ForCausalLM", "baichuan-7b": "BaiChuanForCausalLM",
          "baichuan-13b": "BaichuanForCausalLM", "minicpm": "MiniCPMForCausalLM",
          "chatglm": "ChatGLMModel"}


def _first_case_per_architecture() -> list[str]:
    first: dict[str, str] = {}
    for name, (arch, _, _) in HF_CASES.items():
        first.setdefault(arch, name)
    return sorted(first.values())


# one case per architecture with attention, plus the variants whose stage split differs (OPT's
# projections and post-norm, BLOOM's residual after the norm, DeepSeek-V2-Lite without a dense
# layer, Baichuan-13B's ALiBi slopes set per stage)
CASES = [*_first_case_per_architecture(), "opt-post-norm-projected", "opt-pre-norm-projected",
         "bloom-6-heads-residual-post-norm", "deepseek_v2-lite", *REMOTE]


def _model(path: str, remote: bool, stage: int, stages: int) -> nn.Module:
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    set_pipeline_parallel(stage, stages)
    try:
        model = get_model_class(config)(config)
    finally:
        set_pipeline_parallel(0, 1)
    load_weights(model, path)
    return model.eval()


class TwoStages(nn.Module):
    """Stage 0 then stage 1, as two workers run them (the state is what a worker sends)."""

    def __init__(self, first: nn.Module, last: nn.Module, hidden_size: int):
        super().__init__()
        self.first, self.last, self.hidden_size = first, last, hidden_size

    def forward(self, input_ids, positions, attn_metadata):
        state = self.first(input_ids, positions, attn_metadata)
        assert isinstance(state, tuple) and len(state) == self.first.pp_intermediate_tensors
        assert all(t.shape == (len(input_ids), self.hidden_size) for t in state)
        # the worker receives the state as one [n, T, H] buffer
        return self.last(input_ids, positions, attn_metadata, tuple(torch.stack(state).clone()))

    def compute_logits(self, hidden):
        return self.last.compute_logits(hidden)


def _held_layer_indices(model: nn.Module) -> set[int]:
    """Indices of the decoder layers that have parameters (checkpoint names keep them)."""
    stacks = [name for name, m in model.named_modules() if isinstance(m, StageLayers)]
    assert len(stacks) == 1
    pattern = re.compile(re.escape(stacks[0]) + r"\.(\d+)\.")
    return {int(m.group(1)) for name, _ in model.named_parameters()
            if (m := pattern.match(name))}


def _steps(runner, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (13, 5, 21)]
    out = [runner.step([(0, seqs[0][:9]), (1, seqs[1][:4]), (2, seqs[2][:6])]),  # batched prefill
           runner.step([(0, seqs[0][9:12]), (2, seqs[2][6:20])]),   # chunked prefill + catch-up
           runner.step([(0, seqs[0][12:]), (1, seqs[1][4:]), (2, seqs[2][20:])])]   # decodes
    return torch.cat(out)


@pytest.mark.parametrize("name", CASES)
def test_two_stages_chained_equal_one_stage(name, tmp_path):
    path, remote = _build(name, str(tmp_path))
    whole = _model(path, remote, 0, 1)
    first, last = _model(path, remote, 0, 2), _model(path, remote, 1, 2)
    n = len(next(m for m in whole.modules() if isinstance(m, StageLayers)))
    assert _held_layer_indices(whole) == set(range(n))
    assert _held_layer_indices(first) == set(range(n // 2))
    assert _held_layer_indices(last) == set(range(n // 2, n))
    config = whole.config
    vocab = getattr(config, "padded_vocab_size", None) or config.vocab_size
    expected = _steps(MiniRunner(whole), vocab)
    got = _steps(MiniRunner(TwoStages(first, last, config.hidden_size)), vocab)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def stage_logits(path: str, remote: bool, stages: int) -> torch.Tensor:
    """_steps' logits of the model in `stages` (1 or 2) stages, on this tensor-parallel rank."""
    if stages == 1:
        model = _model(path, remote, 0, 1)
    else:
        first, last = _model(path, remote, 0, 2), _model(path, remote, 1, 2)
        model = TwoStages(first, last, first.config.hidden_size)
        model.config = first.config
    vocab = getattr(model.config, "padded_vocab_size", None) or model.config.vocab_size
    return _steps(MiniRunner(model), vocab)


_TP_WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
sys.path[:0] = sys.argv[1:3]                 # tests/distributed, tests
from octavo.models.layers.parallel_state import set_tensor_parallel
from test_pipeline_stages import stage_logits
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
set_tensor_parallel(rank, 2)
work = sys.argv[3]
for i, (path, remote) in enumerate(json.load(open(os.path.join(work, "cases.json")))):
    logits = stage_logits(path, remote, 2)
    if rank == 0:
        torch.save(logits, os.path.join(work, f"out{i}.pt"))
dist.barrier()  # no rank tears down gloo while the other still has traffic in flight
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip C++ static destructors: tp_util's note on a gloo teardown abort
'''

# the decoders with their own stage forward, MLA, MoE and a post-norm/ALiBi variant
TP_PP_CASES = ["gpt2", "gpt-bigcode-mqa", "opt-post-norm-projected",
               "bloom-6-heads-residual-post-norm", "chatglm", "longcat", "deepseek_v3", "minicpm3",
               "dbrx", "gemma3", "phi3-longrope", "arctic", "baichuan-13b"]


def test_two_stages_on_two_tensor_parallel_ranks_equal_one_process(tmp_path):
    """TP=2 x PP=2 in two processes: each TP rank chains its shards of the two stages."""
    import json
    import socket
    import subprocess
    built = [_build(name, str(tmp_path / "models")) for name in TP_PP_CASES]
    wants = [stage_logits(path, remote, 1) for path, remote in built]
    (tmp_path / "cases.json").write_text(json.dumps(built))
    (tmp_path / "worker.py").write_text(_TP_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from parallel_ranks import wait_ranks
    here = os.path.dirname(__file__)
    procs = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(tmp_path / "worker.py"), here, os.path.dirname(here),
                 str(tmp_path)], stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port), OMP_NUM_THREADS="1")))
    failed = wait_ranks(procs, timeout=300)
    if failed is not None:
        pytest.fail(f"rank {failed}:\n{(tmp_path / f'rank{failed}.log').read_text()[-3000:]}")
    for i, (name, want) in enumerate(zip(TP_PP_CASES, wants)):
        got = torch.load(tmp_path / f"out{i}.pt")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"{name}: {m}")


def test_stage_layers_build_only_their_range():
    built = []
    set_pipeline_parallel(1, 3)
    try:
        layers = StageLayers(6, lambda i: built.append(i) or nn.Linear(2, 2))
    finally:
        set_pipeline_parallel(0, 1)
    assert built == [2, 3] and (layers.start_layer, layers.end_layer) == (2, 4)
    assert [type(m) is PPMissingLayer for m in layers] == [True, True, False, False, True, True]
    assert layers.held() == [layers[2], layers[3]] and not layers.is_last_stage


def test_layers_that_do_not_divide_raise_naming_the_numbers(tmp_path):
    from transformers import AutoConfig
    set_pipeline_parallel(0, 2)
    try:
        with pytest.raises(ValueError, match="3 layers do not divide into 2 pipeline stages"):
            StageLayers(3, lambda i: nn.Identity())
    finally:
        set_pipeline_parallel(0, 1)
    # LongCat counts decoder layers in num_layers (num_hidden_layers is twice that)
    path = save_tiny_model(str(tmp_path / "longcat"), "longcat_flash", "LongcatFlashForCausalLM",
                           **{**longcat.COMMON, **longcat.CASES["longcat"], "num_layers": 3})
    config = AutoConfig.from_pretrained(path)
    assert config.num_hidden_layers == 6
    with pytest.raises(ValueError, match=r"LongcatFlashForCausalLM has 3 decoder layers "
                                         r"\(num_layers\), which do not divide into "
                                         r"pipeline_parallel_size=2 stages: pick a divisor of 3"):
        check_parallel_support(get_model_class(config), config, 1, 2)
    check_parallel_support(get_model_class(config), config, 1, 3)


@pytest.mark.parametrize("arch", ["MambaForCausalLM", "JambaForCausalLM", "BambaForCausalLM",
                                  "GraniteMoeHybridForCausalLM", "FalconMambaForCausalLM",
                                  "Mamba2ForCausalLM"])
def test_state_space_models_refuse_pipeline_parallelism_naming_the_model(arch):
    from octavo.models import registry
    cls = registry.get_model_class(type("C", (), {"architectures": [arch]})())
    with pytest.raises(ValueError, match=f"{arch} does not support pipeline parallelism \\(its "
                                         "Mamba layers keep a per-request state\\): use "
                                         "pipeline_parallel_size=1"):
        check_parallel_support(cls, None, 2, 2)
    check_parallel_support(cls, None, 2, 1)     # tensor parallel (test_parallel_parity.py)


@pytest.mark.parametrize("arch,layers", [("Zamba2ForCausalLM", "Mamba"),
                                         ("KimiLinearForCausalLM", "KDA")])
def test_hybrids_with_state_layers_refuse_pipeline_parallelism_only(arch, layers):
    cls = get_model_class(type("C", (), {"architectures": [arch]})())
    with pytest.raises(ValueError, match=f"{arch} does not support pipeline parallelism \\(its "
                                         f"{layers} layers keep a per-request state\\): use "
                                         "pipeline_parallel_size=1"):
        check_parallel_support(cls, None, 2, 2)
    check_parallel_support(cls, None, 2, 1)     # tensor parallel (test_parallel_parity.py)


def test_loop_coder_refuses_pipeline_parallelism_only():
    from octavo.models.iquest_loopcoder import IQuestLoopCoderForCausalLM
    with pytest.raises(ValueError, match="IQuestLoopCoderForCausalLM does not support pipeline "
                                         "parallelism .*use pipeline_parallel_size=1"):
        check_parallel_support(IQuestLoopCoderForCausalLM, None, 1, 2)
    check_parallel_support(IQuestLoopCoderForCausalLM, None, 2, 1)


def test_every_registered_architecture_runs_in_stages_or_refuses():
    from octavo.models.registry import supported_architectures
    covered = {HF_CASES[c][0] for c in CASES if c in HF_CASES} | set(REMOTE.values())
    for arch in supported_architectures():
        if arch in covered:
            continue
        cls = get_model_class(type("Config", (), {"architectures": [arch]})())
        with pytest.raises(ValueError, match=f"{arch} .*pipeline_parallel_size=1"):
            check_parallel_support(cls, None, 1, 2)


def test_a_class_without_tensor_parallelism_is_refused_by_name():
    no_tp = type("NoTensorParallel", (), {"supports_tensor_parallel": False})
    with pytest.raises(ValueError, match="NoTensorParallel does not support tensor parallelism: "
                                         "use tensor_parallel_size=1"):
        check_parallel_support(no_tp, None, 2, 1)
    check_parallel_support(no_tp, None, 1, 1)
