"""Small deterministic tokenizers built offline (no hub downloads) for tests.

make_tokenizer(): GPT-2 style byte-level BPE.  make_llama_tokenizer(): Llama style
sentencepiece-like BPE ("▁" word marker, byte fallback <0xNN> tokens).
Both have <unk>, <s> (bos) and </s> (eos) as special ids 0, 1, 2.
"""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time, there was a little robot who loved to read books.",
    "In the beginning the engine was small, and the tokens were few.",
    "Numbers like 12345 and 6789 appear in text, as do symbols: #, $, %, &.",
    "A stop string can span two tokens, so the detokenizer must look back.",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
    "def main():\n    print('hello')\n    return 0\n",
    "Large language models generate text one token at a time.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 unicode text, emoji \U0001F600 and \u4f60\u597d\u4e16\u754c.",
]


def _wrap(tok: Tokenizer, tmpdir, **kwargs) -> PreTrainedTokenizerFast:
    if tmpdir is not None:
        os.makedirs(tmpdir, exist_ok=True)
        tok.save(os.path.join(str(tmpdir), "tokenizer.json"))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs
    )
    if tmpdir is not None:
        hf.save_pretrained(str(tmpdir))
    return hf


def _train(tok: Tokenizer, vocab_size: int, initial_alphabet) -> None:
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=initial_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)


def make_tokenizer(tmpdir=None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style). Saved to tmpdir (tokenizer.json + HF files) if given."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _train(tok, vocab_size, pre_tokenizers.ByteLevel.alphabet())
    return _wrap(tok, tmpdir)


def make_llama_tokenizer(tmpdir=None, vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """Llama-like BPE: Metaspace "▁" pre-tokenizer (prepend on first word), byte fallback."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    _train(tok, vocab_size - 256, [])
    # Re-index the trained vocab after the 256 byte-fallback tokens <0x00>..<0xFF>, as in Llama.
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in trained:
        if t not in vocab:
            vocab[t] = len(vocab)
    spec["model"]["vocab"] = vocab
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    # Like Llama, encode() prepends <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return _wrap(tok, tmpdir)
