"""Tiny Hugging Face models (random init, then every tensor randomized so biases and norms matter)
saved with `save_pretrained`, one per supported architecture and layout variant."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import safetensors.torch
import torch
import transformers

from streamquant.checkpoint.reader import iterate_weights


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config_cls: str
    model_cls: str
    kwargs: tuple

    def config(self):
        return getattr(transformers, self.config_cls)(**dict(self.kwargs))


def _case(name, config_cls, model_cls, **kw) -> Case:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    base.update(kw)
    return Case(name, config_cls, model_cls, tuple(sorted(base.items())))


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# DeepSeek-V3's shapes scaled down: latent attention (q low rank), one dense layer then MoE layers with
# 8 experts in 4 groups (2 chosen) and a shared expert; yarn rope with both mscales, as DeepSeek configures it
DEEPSEEK_V3 = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16,
                   v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                   topk_group=2, first_k_dense_replace=1, moe_intermediate_size=32, routed_scaling_factor=2.5,
                   tie_word_embeddings=False,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.9,
                                    "mscale_all_dim": 1.0, "original_max_position_embeddings": 32,
                                    "beta_fast": 32, "beta_slow": 1})
CASES = [
    _case("llama", "LlamaConfig", "LlamaForCausalLM"),
    _case("llama-tied-mqa-llama3rope", "LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True,
          num_key_value_heads=1, attention_bias=True, mlp_bias=True,
          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    _case("mistral", "MistralConfig", "MistralForCausalLM", num_key_value_heads=1),
    _case("qwen2-tied", "Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True),
    _case("qwen3", "Qwen3Config", "Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=False),
    _case("qwen2moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", shared_expert_intermediate_size=48,
          norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=False, **MOE),
    _case("qwen3moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", norm_topk_prob=True, head_dim=16,
          tie_word_embeddings=False, **MOE),
    _case("deepseek-v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", **DEEPSEEK_V3),
    Case("opt", "OPTConfig", "OPTForCausalLM", tuple(sorted(dict(
        vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64).items()))),
    Case("opt-350m-style", "OPTConfig", "OPTForCausalLM", tuple(sorted(dict(
        vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False).items()))),
]
CASE_IDS = [c.name for c in CASES]


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random: weights ~N(0, 0.05^2)·√(64/fan_in)-ish, norms 1 ± 0.1, biases ±0.1; so are
    saved float buffers (DeepSeek-V3's e_score_correction_bias, zero at init), as biases."""
    g = torch.Generator().manual_seed(seed)
    saved = model.state_dict()
    buffers = [(n, b) for n, b in model.named_buffers() if n in saved and b.is_floating_point()]
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *buffers]:
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and ("norm" in name or "layernorm" in name):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * (1.0 / p.shape[-1]) ** 0.5)


def make_checkpoint(case: Case, root: Path) -> Path:
    """Save the case's HF model (float32) under root/case.name; reuse if present."""
    out = root / case.name
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    model = getattr(transformers, case.model_cls)(case.config()).float()
    randomize_(model)
    model.save_pretrained(out)
    return out


def hf_logits(path: Path, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # eager experts: the per-expert loop streamquant's experts mirror (DeepSeek-V3's default, grouped_mm,
    # sums in another order: bf16 logits about 1% apart, float32 ones equal within 1e-5)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits.float()


def write_variant(src, out, edit=None, seed=1):
    """A copy of checkpoint `src` with every float tensor moved by 1% noise (an optimizer step), then `edit`."""
    out.mkdir(parents=True, exist_ok=True)
    for extra in src.iterdir():
        if extra.suffix == ".json" and not extra.name.endswith(".index.json"):
            (out / extra.name).write_text(extra.read_text())
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: (t + 0.01 * t.std() * torch.randn(t.shape, generator=gen)).to(t.dtype) for n, t in iterate_weights(src)}
    if edit is not None:
        edit(tensors)
    safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
