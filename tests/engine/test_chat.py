"""LLM.chat and octavo.chat_utils: rendering with the tokenizer's chat template (transformers'
sandboxed Jinja), tokenizing without extra special tokens, and clear errors."""
from __future__ import annotations

import pytest

from octavo import LLM, SamplingParams
from octavo.chat_utils import apply_chat_template, load_chat_template

GREEDY = SamplingParams(temperature=0, max_tokens=6)
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def chat_llm(chat_model_dir):
    return LLM(chat_model_dir, kv_cache_memory=1 << 24)


def expected_ids(llm, text):
    # CHAT_TEMPLATE writes <s> itself, so the tokenizer must not prepend another one.
    return llm.get_tokenizer().encode(text, add_special_tokens=False)


def test_chat_renders_template_and_generates_like_generate(chat_llm):
    text = "<s>system\nbe brief</s>\n<s>user\nHello</s>\n<s>assistant\n"
    out = chat_llm.chat(CONVERSATION, GREEDY, use_tqdm=False)
    assert len(out) == 1
    ids = expected_ids(chat_llm, text)
    assert out[0].prompt == text
    assert out[0].prompt_token_ids == ids
    assert ids.count(1) == 3                               # one <s> per template marker, no extra
    ref = chat_llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


def test_chat_batch_keeps_order(chat_llm):
    convs = [[{"role": "user", "content": c}] for c in ("one", "two words", "three more words")]
    outs = chat_llm.chat(convs, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == [f"<s>user\n{c[0]['content']}</s>\n<s>assistant\n"
                                        for c in convs]


def test_content_parts_and_continue_final_message(chat_llm):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "The"}]
    out = chat_llm.chat(msgs, GREEDY, use_tqdm=False, add_generation_prompt=False,
                        continue_final_message=True)
    assert out[0].prompt == "<s>user\na\nb</s>\n<s>assistant\nThe"
    with pytest.raises(ValueError, match="cannot both be true"):
        chat_llm.chat(msgs, continue_final_message=True)
    with pytest.raises(ValueError, match="image_url"):
        chat_llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_model_without_template_says_how_to_pass_one(llama_dir):
    llm = LLM(llama_dir, kv_cache_memory=1 << 24)
    with pytest.raises(ValueError, match="chat_template="):
        llm.chat(CONVERSATION)
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}"
    out = llm.chat(CONVERSATION, GREEDY, use_tqdm=False, chat_template=template,
                   add_generation_prompt=False)
    assert out[0].prompt == "[system] be brief [user] Hello "


def test_kwargs_and_tools_reach_the_template(chat_llm):
    template = ("{{ greeting }}|{% for t in tools %}{{ t.function.name }},{% endfor %}|"
                "{{ messages[-1].content }}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    out = chat_llm.chat(CONVERSATION, GREEDY, use_tqdm=False, chat_template=template,
                        chat_template_kwargs={"greeting": "hi"}, tools=tools)
    assert out[0].prompt == "hi|get_weather,|Hello"
    with pytest.raises(ValueError, match="chat_template_kwargs may not set"):
        chat_llm.chat(CONVERSATION, chat_template_kwargs={"messages": []})


def test_template_errors_and_sandbox(chat_llm):
    tok = chat_llm.get_tokenizer()
    with pytest.raises(ValueError, match="only user turns"):
        apply_chat_template(tok, CONVERSATION,
                            chat_template="{{ raise_exception('only user turns') }}")
    # The sandbox refuses attribute access into Python internals.
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="could not be rendered"):
        apply_chat_template(tok, CONVERSATION, chat_template=escape)
    with pytest.raises(ValueError, match="list of"):
        chat_llm.chat("Hello")
    with pytest.raises(ValueError, match="role"):
        chat_llm.chat([{"content": "no role"}])


def test_load_chat_template(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}\n")
    assert load_chat_template(str(path)) == "{{ messages[0]['content'] }}\n"
    assert load_chat_template(path) == "{{ messages[0]['content'] }}\n"
    assert load_chat_template("{{ x }}\\n") == "{{ x }}\n"        # escapes, as from a shell
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
