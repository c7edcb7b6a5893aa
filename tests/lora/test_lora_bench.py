"""octavo bench throughput with LoRA adapters: random PEFT-format adapters (bench/lora_adapters)
load into the engine and change its logits; the suite spreads prompts over them."""
import json

import pytest

from octavo import LLM, SamplingParams
from octavo.bench import throughput
from octavo.bench.lora_adapters import random_lora_requests


def test_random_adapters_load_and_change_logits(llama_dir, tmp_path):
    (req,) = random_lora_requests(llama_dir, 1, 4, str(tmp_path))
    llm = LLM(model=llama_dir, dtype="float32", enable_lora=True, max_lora_rank=4,
              kv_cache_memory=1 << 24)
    p = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    base, lora = (llm.generate("Hello there", p, use_tqdm=False, lora_request=r)[0]
                  for r in (None, req))
    top = next(iter(base.outputs[0].logprobs[0]))
    diff = abs(base.outputs[0].logprobs[0][top].logprob -
               lora.outputs[0].logprobs[0].get(top, base.outputs[0].logprobs[0][top]).logprob)
    assert diff > 1e-4 and llm.list_loras() == {1}


def test_throughput_spreads_prompts_over_adapters(llama_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    throughput.main(["--model", llama_dir, "--num-prompts", "5", "--input-len", "9",
                     "--output-len", "4", "--enable-lora", "--max-loras", "2",
                     "--max-lora-rank", "4", "--num-lora-adapters", "3",
                     "--kv-cache-memory", "16MiB", "--output-json", str(out)])
    (rec,) = [json.loads(line) for line in open(out)]
    assert rec["total_output_tokens"] == 5 * 4 and rec["num_lora_adapters"] == 3
    assert rec["engine"]["enable_lora"] and rec["engine"]["max_loras"] == 2


def test_num_lora_adapters_needs_enable_lora(llama_dir, capsys):
    with pytest.raises(SystemExit) as e:
        throughput.main(["--model", llama_dir, "--num-lora-adapters", "2"])
    assert e.value.code == 2 and "--enable-lora" in capsys.readouterr().err
