"""Chat templates: turn OpenAI-style messages into one prompt string with the tokenizer's
Jinja template (rendered by transformers in its sandboxed Jinja environment, never eval).

The rendered prompt already holds the template's special tokens (BOS and role markers), so
tokenize it with `add_special_tokens=False` (see `encode_chat_prompt`).
"""
from __future__ import annotations

import codecs
import os
from typing import Any, Sequence

Message = dict[str, Any]

# Jinja source always has one of these; a path to a template file usually has none.
_JINJA_CHARS = "{}\n"
# Arguments apply_chat_template sets itself: chat_template_kwargs may not override them.
_RESERVED_KWARGS = ("conversation", "messages", "chat_template", "tokenize",
                    "add_generation_prompt", "continue_final_message", "tools")


def load_chat_template(path_or_string: str | os.PathLike | None) -> str | None:
    """A chat template from a file path, or the Jinja source given inline; None stays None.

    A string that looks like a path (no '{', '}' or newline) but cannot be opened raises
    ValueError. Inline templates have their backslash escapes ("\\n") interpreted, as on a
    command line.
    """
    if path_or_string is None:
        return None
    try:
        with open(path_or_string, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        if isinstance(path_or_string, os.PathLike) or not any(
                c in path_or_string for c in _JINJA_CHARS):
            raise ValueError(f"the chat template {str(path_or_string)!r} looks like a file path "
                             f"but could not be opened ({e}): pass an existing file or the "
                             "Jinja template itself") from e
    try:
        return codecs.decode(path_or_string.encode("latin-1"), "unicode_escape")
    except UnicodeError:       # characters beyond latin-1: no escapes to interpret
        return path_or_string


def apply_chat_template(tokenizer: Any, messages: Sequence[Message], *,
                        chat_template: str | None = None, add_generation_prompt: bool = True,
                        continue_final_message: bool = False,
                        tools: list[dict[str, Any]] | None = None,
                        chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """Render one conversation as a prompt string. Bad input raises ValueError saying what to
    change: a model without a template, malformed messages, a template that fails to render."""
    template = chat_template if chat_template is not None else getattr(
        tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template: pass one with "
                         "chat_template=<Jinja string or file path> (LLM.chat, or "
                         "--chat-template on the server), or use generate() with a plain prompt")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true: "
                         "set add_generation_prompt=False to continue the final message")
    conversation = normalize_messages(messages)
    if continue_final_message and (not conversation or
                                   conversation[-1].get("role") != "assistant"):
        raise ValueError("continue_final_message=True needs the last message to be an "
                         "assistant message to continue")
    extra = dict(chat_template_kwargs or {})
    clash = sorted(k for k in extra if k in _RESERVED_KWARGS)
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {clash}: pass them as arguments")
    try:
        prompt = tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools, **extra)
    except ValueError:
        raise
    except Exception as e:    # jinja2 TemplateError (incl. raise_exception()), TypeError, ...
        raise ValueError(f"the chat template could not be rendered: {type(e).__name__}: {e}; "
                         "check the messages and the template") from e
    if not isinstance(prompt, str):
        raise ValueError("the chat template did not render to a string")
    return prompt


def encode_chat_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a rendered chat prompt: the template already wrote the special tokens."""
    return tokenizer.encode(prompt, add_special_tokens=False)


def normalize_messages(messages: Sequence[Message]) -> list[Message]:
    """Check the messages' shape; content given as OpenAI text parts becomes one string."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} must be a dict with a string 'role', got {m!r:.80}")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = _join_text_parts(i, content)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of text parts")
        out.append(m)
    return out


def _join_text_parts(i: int, parts: list[Any]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(
                part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"message {i}: content part of type {kind!r} is not supported; "
                             "only text parts ({'type': 'text', 'text': ...}) are")
    return "\n".join(texts)
