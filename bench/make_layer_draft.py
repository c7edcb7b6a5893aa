"""Save the first N decoder layers of a model as a draft model for speculative decoding.

python -m octavo.bench.make_layer_draft --model DIR_OR_GGUF --num-layers 8 --out DRAFT_DIR
The draft keeps the target's embedding, final norm, LM head and tokenizer, so it shares the
vocabulary, and costs num_layers / num_hidden_layers of the target per token (a "smaller copy
of the target", as LayerSkip's early exit). A GGUF file is read (dequantized) by transformers;
without --num-layers the whole model is saved: a plain float copy of a GGUF, as a target whose
4-bit GGUF can then draft for it. --dtype: the saved weights' dtype (default float32).
"""
from __future__ import annotations

import argparse
import os

import torch


def make_layer_draft(model: str, num_layers: int | None, out: str,
                     dtype: torch.dtype = torch.float32) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    if model.endswith(".gguf"):
        kw["gguf_file"] = os.path.basename(model)
        model = os.path.dirname(os.path.abspath(model))
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kw)
    total = m.config.num_hidden_layers
    num_layers = total if num_layers is None else num_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"--num-layers must be in [1, {total}] (the model has {total} "
                         f"layers), got {num_layers}")
    m.model.layers = m.model.layers[:num_layers]
    m.config.num_hidden_layers = num_layers
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = m.config.layer_types[:num_layers]
    if getattr(m, "hf_quantizer", None) is not None:      # GGUF: save as the plain weights
        config = m.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(m.state_dict())
        m = plain
    m.to(dtype).save_pretrained(out)
    AutoTokenizer.from_pretrained(model, **kw).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model directory or .gguf file")
    p.add_argument("--num-layers", type=int, help="default: all (a plain copy)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    try:
        print(make_layer_draft(args.model, args.num_layers, args.out, getattr(torch, args.dtype)))
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
