"""The transformers config of a local model directory, without transformers' slow import chain
for plain Llama checkpoints.

transformers' `configuration_llama` imports its type validators, which import
`transformers.activations` -> hub kernels -> core_model_loading -> torch.distributed.tensor,
FSDP, accelerate and sympy: about a second of a small model's cold start, for a config. A
config.json of model_type "llama" (no remote code) is therefore read by transformers' own
`PreTrainedConfig.get_config_dict` / `from_dict` into `LlamaConfig` below, a mirror of
transformers' class (same name, fields, defaults, `__post_init__` and checks, so that the base
class's RoPE standardisation, dtype handling and the auto mappings, which look classes up by
name, treat it as theirs). tests/engine/test_startup_imports.py compares the two field by field
and on config files of many shapes. Everything else goes through `AutoConfig`.
"""
# (no `from __future__ import annotations`: huggingface_hub's strict dataclasses read the
# field types at run time)
import json
import os
from typing import Any

try:        # transformers 5 (dataclass configs); with transformers 4 everything takes AutoConfig
    from huggingface_hub.dataclasses import strict, validated_field
    from transformers.configuration_utils import PreTrainedConfig
    from transformers.modeling_rope_utils import RopeParameters
except ImportError:
    PreTrainedConfig = None


def load_hf_config(model_dir: str, trust_remote_code: bool = False,
                   revision: str | None = None) -> Any:
    """AutoConfig.from_pretrained(model_dir, ...), with the Llama mirror for plain Llama dirs."""
    if PreTrainedConfig is not None:
        kwargs = {"_from_auto": True, "name_or_path": model_dir, "revision": revision}
        config_dict, unused = PreTrainedConfig.get_config_dict(model_dir, **kwargs)
        if config_dict.get("model_type") == "llama" and "auto_map" not in config_dict:
            return LlamaConfig.from_dict(config_dict, **unused)
    from transformers import AutoConfig     # here: `transformers.models` scans every model's files

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                      revision=revision)


def load_tokenizer(path: str, hf_config: Any = None, **kwargs: Any) -> Any:
    """AutoTokenizer.from_pretrained(path, config=hf_config, **kwargs). For the Llama mirror's
    directories whose tokenizer_config.json names TokenizersBackend (what save_pretrained
    writes for a tokenizer.json tokenizer), the class AutoTokenizer would pick is called
    directly: importing AutoTokenizer imports `transformers.models`, which scans every model's
    files (the test compares the two)."""
    if PreTrainedConfig is not None and isinstance(hf_config, LlamaConfig) and \
            _names_tokenizers_backend(path):
        import transformers

        kwargs.pop("trust_remote_code", None)
        return transformers.TokenizersBackend.from_pretrained(path, _from_auto=True, **kwargs)
    from transformers import AutoTokenizer

    if hf_config is not None:
        kwargs["config"] = hf_config          # not read (and imported) a second time
    return AutoTokenizer.from_pretrained(path, **kwargs)


def _names_tokenizers_backend(path: str) -> bool:
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            tokenizer_config = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(tokenizer_config, dict) and "auto_map" not in tokenizer_config
            and tokenizer_config.get("tokenizer_class") == "TokenizersBackend"
            and os.path.isfile(os.path.join(path, "tokenizer.json")))


def _unit_interval(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Value must be within [0.0, 1.0], got {value}")


if PreTrainedConfig is not None:
    @strict
    class LlamaConfig(PreTrainedConfig):
        """transformers' LlamaConfig, declared on the base class (see the module docstring)."""

        model_type = "llama"
        base_model_tp_plan = {
            "layers.*.self_attn.q_proj": "colwise",
            "layers.*.self_attn.k_proj": "colwise",
            "layers.*.self_attn.v_proj": "colwise",
            "layers.*.self_attn.o_proj": "rowwise",
            "layers.*.mlp.gate_proj": "colwise",
            "layers.*.mlp.up_proj": "colwise",
            "layers.*.mlp.down_proj": "rowwise",
        }
        base_model_pp_plan = {
            "embed_tokens": (["input_ids"], ["inputs_embeds"]),
            "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
            "norm": (["hidden_states"], ["hidden_states"]),
        }

        vocab_size: int = 32000
        hidden_size: int = 4096
        intermediate_size: int = 11008
        num_hidden_layers: int = 32
        num_attention_heads: int = 32
        num_key_value_heads: int | None = None
        hidden_act: str = "silu"
        max_position_embeddings: int = 2048
        initializer_range: float = validated_field(_unit_interval, default=0.02)
        rms_norm_eps: float = 1e-6
        use_cache: bool = True
        pad_token_id: int | None = None
        bos_token_id: int | None = 1
        eos_token_id: int | list[int] | None = 2
        pretraining_tp: int | None = 1
        tie_word_embeddings: bool = False
        rope_parameters: RopeParameters | dict | None = None
        attention_bias: bool = False
        attention_dropout: int | float | None = 0.0
        mlp_bias: bool = False
        head_dim: int | None = None

        def __post_init__(self, **kwargs):
            if self.head_dim is None:
                self.head_dim = self.hidden_size // self.num_attention_heads
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            super().__post_init__(**kwargs)

        def validate_architecture(self):
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(f"The hidden size ({self.hidden_size}) is not a multiple of the "
                                 f"number of attention heads ({self.num_attention_heads}).")
