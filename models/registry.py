"""HF `architectures` name -> octavo model class (imported lazily)."""
from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "SmolLM3ForCausalLM": ("smollm3", "SmolLM3ForCausalLM"),
    "Ernie4_5ForCausalLM": ("ernie45", "Ernie4_5ForCausalLM"),
    "Glm4ForCausalLM": ("glm4", "Glm4ForCausalLM"),
    "GraniteForCausalLM": ("granite", "GraniteForCausalLM"),
    "Olmo2ForCausalLM": ("olmo2", "Olmo2ForCausalLM"),
    "CohereForCausalLM": ("cohere", "CohereForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "BloomForCausalLM": ("bloom", "BloomForCausalLM"),
    "GPTBigCodeForCausalLM": ("gpt_bigcode", "GPTBigCodeForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "InternLMForCausalLM": ("internlm", "InternLMForCausalLM"),
    "InternLM2ForCausalLM": ("internlm2", "InternLM2ForCausalLM"),
    "InternLM3ForCausalLM": ("internlm3", "InternLM3ForCausalLM"),
    "BaichuanForCausalLM": ("baichuan", "BaichuanForCausalLM"),
    "BaiChuanForCausalLM": ("baichuan", "BaiChuanForCausalLM"),
    "MiniCPMForCausalLM": ("minicpm", "MiniCPMForCausalLM"),
    "MiniCPM3ForCausalLM": ("minicpm3", "MiniCPM3ForCausalLM"),
    "ChatGLMModel": ("chatglm", "ChatGLMModel"),
    "IQuestCoderForCausalLM": ("iquest_coder", "IQuestCoderForCausalLM"),
    "IQuestLoopCoderForCausalLM": ("iquest_loopcoder", "IQuestLoopCoderForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "OlmoeForCausalLM": ("olmoe", "OlmoeForCausalLM"),
    "GraniteMoeForCausalLM": ("granitemoe", "GraniteMoeForCausalLM"),
    "GraniteMoeSharedForCausalLM": ("granitemoe", "GraniteMoeSharedForCausalLM"),
    "PhimoeForCausalLM": ("phimoe", "PhimoeForCausalLM"),
    "DbrxForCausalLM": ("dbrx", "DbrxForCausalLM"),
    "Ernie4_5_MoeForCausalLM": ("ernie45_moe", "Ernie4_5_MoeForCausalLM"),
    "Glm4MoeForCausalLM": ("glm4_moe", "Glm4MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v2", "DeepseekV3ForCausalLM"),
    "LongcatFlashForCausalLM": ("longcat_flash", "LongcatFlashForCausalLM"),
    "ArcticForCausalLM": ("arctic", "ArcticForCausalLM"),
    "MambaForCausalLM": ("mamba", "MambaForCausalLM"),
    "FalconMambaForCausalLM": ("mamba", "FalconMambaForCausalLM"),
    "Mamba2ForCausalLM": ("mamba2", "Mamba2ForCausalLM"),
    "JambaForCausalLM": ("jamba", "JambaForCausalLM"),
    "BambaForCausalLM": ("bamba", "BambaForCausalLM"),
    "GraniteMoeHybridForCausalLM": ("granitemoehybrid", "GraniteMoeHybridForCausalLM"),
    "Zamba2ForCausalLM": ("zamba2", "Zamba2ForCausalLM"),
    "KimiLinearForCausalLM": ("kimi_linear", "KimiLinearForCausalLM"),
}


# Shown in README's table (`python -m octavo.models.registry --markdown` prints it).
EXAMPLE_MODELS = {
    "LlamaForCausalLM": "Llama 2/3, SmolLM2, TinyLlama",
    "MistralForCausalLM": "Mistral 7B (sliding window)",
    "Qwen2ForCausalLM": "Qwen2, Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3 (dense)",
    "Gemma2ForCausalLM": "Gemma 2",
    "Gemma3ForCausalLM": "Gemma 3 (text-only checkpoints, e.g. gemma-3-1b)",
    "SmolLM3ForCausalLM": "SmolLM3",
    "Ernie4_5ForCausalLM": "ERNIE 4.5 (dense, e.g. 0.3B)",
    "Glm4ForCausalLM": "GLM-4-0414",
    "GraniteForCausalLM": "Granite 3.x (dense)",
    "Olmo2ForCausalLM": "OLMo 2",
    "CohereForCausalLM": "Command R, Command R+, Aya 23",
    "GPT2LMHeadModel": "GPT-2, DistilGPT-2",
    "OPTForCausalLM": "OPT",
    "BloomForCausalLM": "BLOOM, BLOOMZ",
    "GPTBigCodeForCausalLM": "StarCoder, SantaCoder",
    "Starcoder2ForCausalLM": "StarCoder2",
    "Phi3ForCausalLM": "Phi-3, Phi-3.5, Phi-4-mini",
    "InternLMForCausalLM": "InternLM (v1): internlm-7b, internlm-chat-7b, internlm-20b "
                           "(trust_remote_code)",
    "InternLM2ForCausalLM": "InternLM2, InternLM2.5 (trust_remote_code)",
    "InternLM3ForCausalLM": "InternLM3 (trust_remote_code)",
    "BaichuanForCausalLM": "Baichuan-13B, Baichuan2-7B/13B (trust_remote_code)",
    "BaiChuanForCausalLM": "Baichuan-7B (trust_remote_code)",
    "MiniCPMForCausalLM": "MiniCPM-1B/2B, MiniCPM 2.x (dense; trust_remote_code)",
    "MiniCPM3ForCausalLM": "MiniCPM3-4B",
    "ChatGLMModel": "ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B (trust_remote_code)",
    "IQuestCoderForCausalLM": "IQuest-Coder-V1 Base/Instruct/Thinking (trust_remote_code)",
    "IQuestLoopCoderForCausalLM": "IQuest-Coder-V1 Loop-Instruct/Loop-Thinking (two passes; "
                                  "trust_remote_code)",
    "MixtralForCausalLM": "Mixtral 8x7B, 8x22B",
    "Qwen2MoeForCausalLM": "Qwen1.5-MoE, Qwen2-57B-A14B",
    "Qwen3MoeForCausalLM": "Qwen3-30B-A3B, Qwen3-235B-A22B",
    "OlmoeForCausalLM": "OLMoE-1B-7B",
    "GraniteMoeForCausalLM": "Granite 3.0/3.1 MoE (1B-A400M, 3B-A800M)",
    "GraniteMoeSharedForCausalLM": "Granite MoE with a shared expert",
    "PhimoeForCausalLM": "Phi-3.5-MoE",
    "DbrxForCausalLM": "DBRX (dbrx-base, dbrx-instruct)",
    "Ernie4_5_MoeForCausalLM": "ERNIE 4.5 MoE (e.g. ERNIE-4.5-21B-A3B, text)",
    "Glm4MoeForCausalLM": "GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7",
    "DeepseekV2ForCausalLM": "DeepSeek-V2, DeepSeek-V2-Lite, DeepSeek-V2.5 (MLA latent cache)",
    "DeepseekV3ForCausalLM": "DeepSeek-V3, DeepSeek-R1 (bf16 weights; MTP layers skipped)",
    "LongcatFlashForCausalLM": "LongCat-Flash-Chat (zero-computation experts; MTP layers skipped)",
    "ArcticForCausalLM": "Snowflake Arctic Base/Instruct (trust_remote_code)",
    "MambaForCausalLM": "Mamba (state-spaces/mamba-*-hf; per-request state, no prefix caching)",
    "FalconMambaForCausalLM": "Falcon-Mamba-7B (per-request state, no prefix caching)",
    "Mamba2ForCausalLM": "Mamba-2, Mamba-Codestral-7B (per-request state, no prefix caching)",
    "JambaForCausalLM": "Jamba-v0.1, Jamba 1.5 Mini/Large (attention + Mamba + MoE; no prefix "
                        "caching)",
    "BambaForCausalLM": "Bamba-9B (attention + Mamba-2; no prefix caching)",
    "GraniteMoeHybridForCausalLM": "Granite 4.0 (H-Micro/Tiny/Small: attention + Mamba-2 + MoE; "
                                   "no prefix caching)",
    "Zamba2ForCausalLM": "Zamba2-1.2B/2.7B/7B (Mamba-2 + shared attention blocks; no prefix "
                         "caching)",
    "KimiLinearForCausalLM": "Kimi-Linear-48B-A3B (KDA linear attention + NoPE MLA + MoE; no "
                             "prefix caching)",
}

def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(hf_config):
    """The class for the first supported name in hf_config.architectures."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for name in architectures:
        if name in _MODELS:
            module, cls = _MODELS[name]
            return getattr(importlib.import_module(f"octavo.models.{module}"), cls)
    found = architectures or "no `architectures` entry in the config"
    raise ValueError(f"Model architectures {found} are not supported by octavo. "
                     f"Supported architectures: {', '.join(supported_architectures())}")


def markdown_table() -> str:
    """README's supported-architectures table, one row per registered architecture."""
    rows = ["| architecture | example models |", "|---|---|"]
    rows += [f"| `{name}` | {EXAMPLE_MODELS.get(name, '')} |" for name in _MODELS]
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="octavo's supported model architectures")
    parser.add_argument("--markdown", action="store_true", help="print README's table")
    args = parser.parse_args()
    print(markdown_table() if args.markdown else "\n".join(supported_architectures()))
