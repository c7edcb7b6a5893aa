"""The server with speculative decoding: `--speculative-config` JSON, the same greedy text as
plain decoding, and the acceptance counters in /metrics."""
import json

import httpx
import openai
from server_util import RunningServer, metric_value

from octavo import LLM, SamplingParams

PROMPT = "a b c d a b c d a b c d a b"


def test_ngram_server_answers_and_counts_drafts(chat_model_dir):
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 3})
    argv = [chat_model_dir, "--dtype", "float32", "--kv-cache-memory", "16MiB",
            "--served-model-name", "tiny", "--uvicorn-log-level", "warning",
            "--speculative-config", spec]
    plain = LLM(chat_model_dir, dtype="float32", kv_cache_memory=16 << 20).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    with RunningServer(argv) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == plain[0].outputs[0].text
        text = httpx.get(srv.url + "/metrics").text
        drafts = metric_value(text, "octavo:spec_decode_num_draft_tokens_total")
        accepted = metric_value(text, "octavo:spec_decode_num_accepted_tokens_total")
        assert metric_value(text, "octavo:spec_decode_num_drafts_total") > 0
        assert 0 < accepted <= drafts
