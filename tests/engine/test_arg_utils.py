"""EngineArgs (octavo.arg_utils): every flag reaches EngineConfig from every entry point that
builds an engine, the entry points expose the same flags, and vLLM's compatibility options
(runner, generation_config="vllm", max_logprobs, ...) behave as vLLM's do or fail clearly."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import pytest
from transformers import AutoTokenizer

from octavo import LLM, SamplingParams
from octavo.arg_utils import DTYPE_CHOICES, EngineArgs
from octavo.config import _DTYPES, EngineConfig
from octavo.entrypoints.cli import build_parser
from octavo.entrypoints.openai.cli_args import make_arg_parser
from octavo.llm_engine import LLMEngine

KV = 1 << 24
from octavo.spec_decode.config import SpeculativeConfig  # noqa: E402

FIELDS = [f.name for f in dataclasses.fields(EngineArgs)]


def flag(name: str, cli_seed: bool = False) -> str:
    """The flag of a field: kebab-case; generate/chat call the engine seed --engine-seed."""
    return "--engine-seed" if cli_seed and name == "seed" else "--" + name.replace("_", "-")


# Per field: (the command-line words after the flag, or None for a boolean flag given bare or
# as --no-...; the value EngineConfig must hold). Non-default values wherever octavo accepts
# one; fields with a single accepted value get it explicitly, so that the flag is still parsed.
def field_cases(model: str, tmp: str) -> dict[str, tuple[list[str] | None, object]]:
    return {
        "model": ([model], model),
        "tokenizer": ([model], model),
        "revision": (["v1.0"], "v1.0"),
        "tokenizer_revision": (["tok-rev"], "tok-rev"),
        "download_dir": ([tmp], tmp),
        "tokenizer_mode": (["auto"], "auto"),
        "trust_remote_code": ([], True),
        "runner": (["generate"], "generate"),
        "dtype": (["bfloat16"], "bfloat16"),
        "max_model_len": (["64"], 64),
        "load_format": (["safetensors"], "safetensors"),
        "generation_config": (["vllm"], "octavo"),      # vLLM's name for octavo's
        "seed": (["7"], 7),
        "max_logprobs": (["5"], 5),
        "quantization": (None, None),                   # gptq, awq, int4 (bad values tested below)
        "kv_cache_dtype": (["fp8_e4m3"], "fp8"),        # vLLM's other name for fp8
        "calculate_kv_scales": ([], True),
        "block_size": (["8"], 8),
        "enable_prefix_caching": (["--no-enable-prefix-caching"], False),
        "enable_state_snapshots": (["--no-enable-state-snapshots"], False),
        "kv_cache_memory": (["3MiB"], 3 << 20),
        "gpu_memory_utilization": (["0.5"], 0.5),
        "swap_space": (["2"], 2.0),
        "device": (["cpu"], "cpu"),
        "tensor_parallel_size": (["1"], 1),
        "pipeline_parallel_size": (["1"], 1),
        "distributed_executor_backend": (["uni"], "uni"),
        "max_num_seqs": (["3"], 3),
        "max_num_batched_tokens": (["32"], 32),
        "enforce_eager": ([], True),
        "disable_log_stats": ([], True),
        "enable_lora": ([], True),
        "max_loras": (["2"], 2),
        "max_lora_rank": (["8"], 8),
        "max_cpu_loras": (["3"], 3),
        "speculative_config": (['{"method": "ngram", "num_speculative_tokens": 2}'],
                               SpeculativeConfig("ngram", 2, None, 4, 1)),
    }


def command_line(cases, cli_seed: bool) -> list[str]:
    argv = []
    for name, (words, _) in cases.items():
        if words is None:
            continue
        if words and words[0].startswith("--"):      # a --no-x form
            argv += words
        else:
            argv += [flag(name, cli_seed), *words]
    return argv


# Each entry point that builds an engine: (parse argv -> namespace, uses --engine-seed).
ENTRY_POINTS = {
    "generate": (lambda argv: build_parser("generate").parse_args(["generate", "hi", *argv]), True),
    "chat": (lambda argv: build_parser("chat").parse_args(["chat", *argv]), True),
    "serve": (lambda argv: make_arg_parser().parse_args(argv), False),
    "octavo serve": (lambda argv: build_parser("serve").parse_args(["serve", *argv]), False),
    "bench throughput": (lambda argv: build_parser("bench").parse_args(
        ["bench", "throughput", *argv]), False),
    "bench latency": (lambda argv: build_parser("bench").parse_args(
        ["bench", "latency", *argv]), False),
}


def test_the_cases_cover_every_field(llama_dir, tmp_path):
    assert set(field_cases(llama_dir, str(tmp_path))) == set(FIELDS)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_flag_reaches_engine_config(entry, llama_dir, tmp_path):
    parse, cli_seed = ENTRY_POINTS[entry]
    cases = field_cases(llama_dir, str(tmp_path))
    args = parse(command_line(cases, cli_seed))
    config = EngineArgs.from_cli_args(args).create_engine_config()
    for name, (_, expected) in cases.items():
        assert getattr(config, name) == expected, name


def test_serve_takes_the_model_as_an_optional_positional(llama_dir):
    assert EngineArgs.from_cli_args(make_arg_parser().parse_args([llama_dir])).model == llama_dir
    assert EngineArgs.from_cli_args(make_arg_parser().parse_args(["--model", llama_dir])
                                    ).model == llama_dir
    assert EngineArgs.from_cli_args(make_arg_parser().parse_args([])).model is None
    with pytest.raises(ValueError, match="give the model once"):
        EngineArgs.from_cli_args(make_arg_parser().parse_args([llama_dir, "--model", "/other"]))


def test_defaults_are_engine_config_defaults():
    """An unset flag must mean what LLM(...) without that keyword means."""
    config_fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    for f in dataclasses.fields(EngineArgs):
        assert f.name in config_fields, f"EngineConfig has no field {f.name}"
        if f.name != "model":
            assert config_fields[f.name].default == f.default, f.name
    assert set(DTYPE_CHOICES) == {"auto", *_DTYPES}
    import octavo
    assert octavo.EngineArgs is EngineArgs          # `from octavo import EngineArgs`, as vLLM's


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_entry_points_expose_every_engine_flag():
    expected = {flag(f.name) for f in dataclasses.fields(EngineArgs)}
    aliases = {a for f in dataclasses.fields(EngineArgs) for a in f.metadata.get("aliases", ())}
    negations = {"--no-" + flag(f.name)[2:] for f in dataclasses.fields(EngineArgs)
                 if f.metadata.get("action") is argparse.BooleanOptionalAction}
    assert {"-tp", "-pp", "-q"} <= aliases and "--no-enable-prefix-caching" in negations
    parsers = {"generate": (subparser(build_parser("generate"), "generate"), True),
               "chat": (subparser(build_parser("chat"), "chat"), True),
               "serve": (subparser(build_parser("serve"), "serve"), False),
               "bench throughput": (subparser(build_parser("bench"), "bench", "throughput"), False),
               "bench latency": (subparser(build_parser("bench"), "bench", "latency"), False)}
    for name, (parser, cli_seed) in parsers.items():
        flags = option_strings(parser)
        want = {flag(f, cli_seed) for f in FIELDS} | aliases | negations
        assert want <= flags, (name, sorted(want - flags))
    # generate and chat keep --seed for the sampling seed
    gen = build_parser("generate").parse_args(["generate", "x", "--seed", "3", "--engine-seed", "4"])
    assert gen.seed == 3 and EngineArgs.from_cli_args(gen).seed == 4


def test_help_of_no_effect_flags_says_so():
    for name in ("swap_space", "disable_log_stats"):
        f = next(f for f in dataclasses.fields(EngineArgs) if f.name == name)
        assert "no effect" in f.metadata["help"], name


@pytest.mark.parametrize("argv, match", [
    (["--dtype", "float8"], "invalid choice"),
    (["--runner", "draft"], "invalid choice"),
    (["--load-format", "npcache"], "invalid choice"),
    (["--tokenizer-mode", "slow"], "invalid choice"),
    (["--max-model-len", "long"], "invalid int value"),
    (["--kv-cache-memory", "lots"], "not a size"),
    (["--gpu-memory-utilization", "most"], "invalid float value"),
])
def test_bad_flag_values_exit_2(argv, match, llama_dir, capsys):
    with pytest.raises(SystemExit) as e:
        make_arg_parser().parse_args([llama_dir, *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--runner", "pooling"], "not supported: octavo runs generative models only"),
    (["--kv-cache-dtype", "fp8_e5m2"], "kv_cache_dtype='fp8_e5m2' is not supported"),
    (["-tp", "0"], "tensor_parallel_size must be a positive integer"),
    (["--pipeline-parallel-size", "0"], "pipeline_parallel_size must be a positive integer"),
    (["--distributed-executor-backend", "ray"], "pip install ray"),
    (["-q", "fp9"], "quantization='fp9' is not supported"),
    (["--max-logprobs", "-2"], "max_logprobs must be"),
    (["--swap-space", "-1"], "swap_space must be"),
    (["--load-format", "gguf"], "does not match model"),
    (["--load-format", "pt"], "octavo would load model.safetensors"),
    (["--block-size", "12"], "power of two"),
])
def test_unsupported_values_raise_value_error(argv, match, llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)         # as if Ray were not installed
    args = make_arg_parser().parse_args([llama_dir, *argv])
    with pytest.raises(ValueError, match=match):
        EngineArgs.from_cli_args(args).create_engine_config()


def test_runner_keyword(llama_dir):
    assert EngineConfig(model=llama_dir, runner="auto").runner == "generate"
    with pytest.raises(ValueError, match="runner='pooling' is not supported: octavo runs "
                                         "generative models only"):
        LLM(llama_dir, runner="pooling")
    with pytest.raises(ValueError, match="runner must be"):
        EngineConfig(model=llama_dir, runner="embed")


def test_load_format_pt_reads_a_bin_checkpoint(llama_dir, tmp_path):
    """A directory with only pytorch_model.bin: pt matches what the loader reads."""
    import torch
    from safetensors.torch import load_file

    path = tmp_path / "bin_model"
    shutil.copytree(llama_dir, path)
    weights = load_file(str(path / "model.safetensors"))
    os.remove(path / "model.safetensors")
    torch.save(weights, path / "pytorch_model.bin")
    assert EngineConfig(model=str(path), load_format="pt").load_format == "pt"
    with pytest.raises(ValueError, match="octavo would load pytorch_model.bin"):
        EngineConfig(model=str(path), load_format="safetensors")


def test_vllm_style_llm_construction(llama_dir, tmp_path):
    """vLLM code: LLM(model, runner=..., generation_config="vllm", revision=..., download_dir=...,
    swap_space=..., disable_log_stats=...), then llm.get_tokenizer() and llm.llm_engine."""
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    with open(model / "generation_config.json", "w") as f:
        json.dump({"temperature": 0.6, "top_k": 20, "max_new_tokens": 7}, f)
    llm = LLM(str(model), runner="generate", generation_config="vllm", revision=None,
              download_dir=str(tmp_path / "dl"), swap_space=0, disable_log_stats=True,
              kv_cache_memory=KV)
    assert llm.get_default_sampling_params() == SamplingParams()   # the file was ignored
    auto = LLM(str(model), kv_cache_memory=KV).get_default_sampling_params()
    assert (auto.temperature, auto.top_k, auto.max_tokens) == (0.6, 20, 7)   # and is read
    reference = AutoTokenizer.from_pretrained(llama_dir)
    text = "Hello, my name is octavo"
    assert llm.get_tokenizer().encode(text) == reference.encode(text)
    engine = llm.llm_engine
    assert isinstance(engine, LLMEngine) and engine.get_tokenizer() is llm.get_tokenizer()
    assert engine.config.runner == "generate" and engine.config.download_dir == str(tmp_path / "dl")
    # vLLM's LLMEngine.from_engine_args gives the same greedy text as LLM
    params = SamplingParams(temperature=0, max_tokens=4)
    other = LLMEngine.from_engine_args(EngineArgs(model=llama_dir, kv_cache_memory=KV))
    other.add_request("r", text, params)
    while other.has_unfinished_requests():
        outs = other.step()
    assert outs[0].outputs[0].text == llm.generate(text, params, use_tqdm=False)[0].outputs[0].text


def test_max_logprobs_caps_requests(llama_dir):
    llm = LLM(llama_dir, max_logprobs=3, kv_cache_memory=KV)
    ok = llm.generate("Hello", SamplingParams(max_tokens=2, logprobs=3, prompt_logprobs=3),
                      use_tqdm=False)[0]
    # vLLM returns the top-k plus the sampled token when it is not among them
    assert all(3 <= len(step) <= 4 for step in ok.outputs[0].logprobs)
    for kw in ({"logprobs": 4}, {"prompt_logprobs": 4}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"{name}=4 is more than this engine allows "
                                             r"\(max_logprobs=3\)"):
            llm.generate("Hello", SamplingParams(max_tokens=2, **kw), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    # the default cap is vLLM's 20; -1 lifts it
    assert EngineConfig(model=llama_dir).max_logprobs == 20
    free = LLM(llama_dir, max_logprobs=-1, kv_cache_memory=KV)
    out = free.generate("Hello", SamplingParams(max_tokens=1, logprobs=25), use_tqdm=False)[0]
    assert len(out.outputs[0].logprobs[0]) >= 25


def test_arg_utils_imports_without_torch():
    import subprocess
    import sys
    code = ("import sys; from octavo.entrypoints.cli import build_parser; "
            "build_parser('generate'); build_parser('chat'); "
            "import octavo.arg_utils, octavo.entrypoints.openai.cli_args; "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_tokenizer_revision_and_download_dir_reach_the_hub_tokenizer(llama_dir, tmp_path):
    """--tokenizer as a Hub id: the tokenizer comes from download_dir's Hub cache at
    tokenizer_revision (laid out here, offline), and not from another revision."""
    import subprocess
    import sys
    cache = tmp_path / "hub"
    repo = cache / "models--test-org--tok"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "v2").write_text(commit)
    code = """
import sys
from octavo import LLM
def load(revision):
    return LLM(sys.argv[1], tokenizer="test-org/tok", tokenizer_revision=revision,
               download_dir=sys.argv[2], kv_cache_memory=1 << 24).get_tokenizer()
tok = load("v2")
print(tok.name_or_path, tok.encode("hello world"))
try:
    load(None)          # main: a revision the cache does not hold
except Exception as e:
    print("main:", type(e).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    res = subprocess.run([sys.executable, "-c", code, llama_dir, str(cache)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    expected = AutoTokenizer.from_pretrained(llama_dir).encode("hello world")
    first, second = res.stdout.strip().splitlines()
    assert first == f"test-org/tok {expected}" and second.startswith("main:")
