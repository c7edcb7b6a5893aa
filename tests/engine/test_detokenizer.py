"""Incremental detokenization and stop strings, on tokenizers built offline."""
import os
import sys

import pytest

from octavo.detokenizer import (IncrementalDetokenizer, check_stop_strings, decode_token,
                                fill_decoded_tokens)
from octavo.outputs import CompletionOutput, Logprob, RequestOutput
from octavo.sampling_params import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer_util import make_llama_tokenizer, make_tokenizer  # noqa: E402

TEXTS = [
    " Paris. The capital of Italy is Rome.",
    "Hello world! 12345 and symbols: #, $, %",
    " caf\u00e9 na\u00efve \u2014 emoji \U0001F600 and \u4f60\u597d\u4e16\u754c.",
    "\n\ndef main():\n    print('hello')\n    return 0\n",
    " zebra xylophone quokka",  # mostly unseen words: many byte-level / byte-fallback tokens
]


@pytest.fixture(scope="module", params=["bytelevel", "llama"])
def tok(request):
    return make_tokenizer() if request.param == "bytelevel" else make_llama_tokenizer()


def run(tok, prompt, out_ids, **kw):
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(**kw))
    stop = None
    for t in out_ids:
        stop = d.update([t])
        if stop is not None:
            break
    return d, stop


def test_tokenizer_util_is_deterministic_and_has_specials(tmp_path):
    a, b = make_tokenizer(tmp_path), make_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert 300 <= len(a) <= 500 and (a.bos_token_id, a.eos_token_id) == (1, 2)
    assert (tmp_path / "tokenizer.json").exists()
    c = make_llama_tokenizer()
    assert 300 <= len(c) <= 600 and (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert c.encode("hi")[0] == 1 and c.convert_ids_to_tokens(c.encode(" x")[1]).startswith("\u2581")


@pytest.mark.parametrize("text", TEXTS)
def test_text_matches_hf_decode(tok, text):
    prompt = tok.encode("The capital of France is")
    out = tok.encode(text, add_special_tokens=False)
    d, _ = run(tok, prompt, out)
    full = tok.decode(prompt + out, skip_special_tokens=True)
    head = tok.decode(prompt, skip_special_tokens=True)
    assert d.output_text == full[len(head):]
    if tok.backend_tokenizer.decoder.__class__.__name__ == "ByteLevel":
        assert d.output_text == tok.decode(out, skip_special_tokens=True)
    assert d.token_ids == out


def test_llama_first_token_keeps_its_leading_space():
    tok = make_llama_tokenizer()
    prompt = tok.encode("The capital of France is")
    out = tok.encode("Paris", add_special_tokens=False)            # "▁Paris"
    assert tok.decode(out) == "Paris"                                 # decode() strips it ...
    assert run(tok, prompt, out)[0].output_text == " Paris"           # ... after a prompt: kept
    assert run(tok, [], out)[0].output_text == "Paris"                # no prompt: like decode()


def test_streaming_deltas_concatenate_to_text(tok):
    out = tok.encode(TEXTS[2], add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("Say:"), SamplingParams())
    pieces = []
    for t in out:
        d.update([t])
        pieces.append(d.get_next_output_text(finished=False, delta=True))
    pieces.append(d.get_next_output_text(finished=True, delta=True))
    assert "".join(pieces) == d.output_text
    assert "\ufffd" not in d.output_text


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    hello = tok.encode("Hello world", add_special_tokens=False)
    out = hello[:1] + [tok.eos_token_id, tok.bos_token_id] + hello[1:]
    d, _ = run(tok, tok.encode("Hi"), out, skip_special_tokens=skip)
    text = d.output_text
    assert ("</s>" in text) == (not skip) and ("<s>" in text) == (not skip)
    assert text.replace("</s>", "").replace("<s>", "").strip() == "Hello world"


def test_stop_string_truncates_and_is_reported(tok):
    out = tok.encode(" Paris, said the fox. More text", add_special_tokens=False)
    d, stop = run(tok, tok.encode("Q:"), out, stop=["fox", "said"])
    assert stop == "said" and d.output_text.strip() == "Paris,"
    d, stop = run(tok, tok.encode("Q:"), out, stop=["fox", "said"], include_stop_str_in_output=True)
    assert stop == "said" and d.output_text.strip() == "Paris, said"
    d, stop = run(tok, tok.encode("Q:"), out, stop=["nothing here"])
    assert stop is None and d.output_text.strip() == "Paris, said the fox. More text"


def test_stop_string_spanning_two_tokens(tok):
    out = tok.encode(" the lazy dog", add_special_tokens=False)
    # a stop string made of the last 2 chars of token 2's text and the first 2 of token 3's
    full = run(tok, tok.encode("Q:"), out)[0].output_text
    boundary = len(run(tok, tok.encode("Q:"), out[:2])[0].output_text)
    stop_str = full[boundary - 2:boundary + 2]
    assert len(out) >= 3 and len(stop_str) == 4
    d, stop = run(tok, tok.encode("Q:"), out, stop=[stop_str])
    assert stop == stop_str and d.output_text == full[:full.index(stop_str)]
    assert len(d.token_ids) == 3   # matched when the token that completes it arrived


def test_stop_buffer_holds_back_partial_stop_string(tok):
    out = tok.encode(" one two three", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("Q:"), SamplingParams(stop=["three!"]))
    streamed = ""
    for t in out:
        assert d.update([t]) is None
        streamed += d.get_next_output_text(finished=False, delta=True)
        assert d.output_text.startswith(streamed)
        assert len(d.output_text) - len(streamed) == min(5, len(d.output_text))
    assert d.get_next_output_text(finished=True, delta=False) == d.output_text
    assert streamed + d.get_next_output_text(finished=True, delta=True) == d.output_text


def test_detokenize_false_tracks_ids_only(tok):
    out = tok.encode(" Paris", add_special_tokens=False)
    d, stop = run(tok, [1, 2, 3], out, detokenize=False)
    assert d.output_text == "" and d.token_ids == out and stop is None


def test_unknown_token_ids_decode_to_nothing(tok):
    d, _ = run(tok, tok.encode("Q:"), [len(tok) + 5] + tok.encode(" ok", add_special_tokens=False))
    assert d.output_text.strip() == "ok"


def test_check_stop_strings_unit():
    assert check_stop_strings("abc STOP def", 3, ["STOP"], False) is None   # old match, not new
    assert check_stop_strings("abc ST", 2, ["STOP"], False) is None
    assert check_stop_strings("abc STOP", 2, ["STOP"], False) == ("STOP", 4)
    assert check_stop_strings("abc STOP", 2, ["STOP"], True) == ("STOP", 8)
    # earliest match wins, whichever order the stop list has
    assert check_stop_strings("xx ab cd", 8, ["cd", "ab"], False) == ("ab", 3)
    assert check_stop_strings("abc", 0, ["c"], False) is None


def test_decoded_tokens_for_logprobs(tok):
    ids = tok.encode(" Paris", add_special_tokens=False)
    assert "".join(decode_token(tok, t) for t in ids).strip() == "Paris"
    assert decode_token(tok, tok.eos_token_id) == "</s>"
    lps = [{ids[0]: Logprob(-0.1, 1), tok.eos_token_id: Logprob(-3.0, 2)}, None]
    fill_decoded_tokens(tok, lps)
    assert lps[0][tok.eos_token_id].decoded_token == "</s>"
    assert lps[0][ids[0]].decoded_token == decode_token(tok, ids[0])


def test_outputs_repr_and_finished():
    c = CompletionOutput(0, "hi", [5], -0.5, None)
    assert not c.finished()
    c.finish_reason, c.stop_reason = "stop", "\n"
    assert c.finished() and "finish_reason=stop" in repr(c) and "stop_reason='\\n'" in repr(c)
    r = RequestOutput("r0", "Hello", [1, 2], None, [c], True)
    assert r.metrics is None and r.num_cached_tokens is None and r.lora_request is None
    assert repr(r).startswith("RequestOutput(request_id=r0, prompt='Hello'")
    assert Logprob(-1.0) == Logprob(logprob=-1.0, rank=None, decoded_token=None)
