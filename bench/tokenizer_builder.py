"""An offline Llama-style tokenizer for random-weight bench models (no hub download).

A BPE with a "▁" word marker and byte fallback (<0x00>..<0xFF>), trained on a small built-in
corpus, then padded with filler tokens to exactly `vocab_size` so that every id a random model
can emit decodes to some text. Ids 0, 1, 2 are <unk>, <s> (bos), </s> (eos).
"""
from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time, there was a little robot who loved to read books.",
    "Large language models generate text one token at a time.",
    "An inference engine batches requests and keeps a paged cache of keys and values.",
    "Numbers like 12345 and 6789 appear in text, as do symbols: #, $, %, &.",
    "def main():\n    print('hello')\n    return 0\n",
]


def build_llama_tokenizer(vocab_size: int = 32000) -> PreTrainedTokenizerFast:
    if vocab_size < 600:
        raise ValueError(f"vocab_size must be at least 600 (specials, 256 bytes, merges), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    # Filler pieces: never produced by encoding (no merges lead to them) but decodable.
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"\u2581w{i}", len(vocab))
        i += 1
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
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
