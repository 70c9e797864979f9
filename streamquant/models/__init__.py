"""Supported architectures: a literal table from HF `architectures` names to model classes."""

from __future__ import annotations

from streamquant.models.deepseek_v3 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from streamquant.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from streamquant.models.opt import OPTForCausalLM
from streamquant.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,  # also Kimi K2
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's `architectures` names no model streamquant implements."""


def get_model_class(hf_config) -> type:
    """The model class for `hf_config.architectures` (first supported entry)."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {names or '(config.json has no architectures)'}; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
