"""The Llama decoder family: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

One decoder definition serves all four; the differences are a frozen `DecoderSpec` read from the
HF config. Other families reuse `LlamaDecoderLayer` and `LlamaForCausalLM` with another MLP
(`make_mlp`: the MoE families) or another attention (`make_attention`: DeepSeek's latent attention).
Sliding-window attention follows the config (`layer_sliding_window`): Mistral's `sliding_window` on
every layer, Qwen's on the layers its `layer_types` names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamquant.layers.activation import SiluAndMul
from streamquant.layers.attention import Attention, LayerKVCache
from streamquant.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from streamquant.layers.norm import RMSNorm
from streamquant.layers.rotary import get_rope
from streamquant.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from streamquant.loading.mapping import WeightMapping
from streamquant.models.base import AttentionGeometry, CausalLM, stacked_rules
from streamquant.parallel.context import TPContext
from streamquant.quant.base import QuantConfig


@dataclass(frozen=True)
class DecoderSpec:
    """Where a family's decoder differs from Llama's."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


@dataclass(frozen=True)
class Build:
    """What every layer constructor needs besides its sizes."""

    tp: TPContext
    quant_config: QuantConfig | None
    params_dtype: torch.dtype

    def kw(self, prefix: str) -> dict:
        return dict(tp=self.tp, quant_config=self.quant_config, prefix=prefix, params_dtype=self.params_dtype)


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The layer's attention window: `sliding_window` (None or 0: none) for the layers `layer_types` calls
    "sliding_attention", or for every layer when the config has no `layer_types` (Mistral)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return int(window) if types[layer_idx] == "sliding_attention" else None
    return None if getattr(config, "use_sliding_window", True) is False else int(window)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(torch.nn.Module):
    """gate_up (merged column) -> SiLU * up -> down (row)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool, build: Build, prefix: str,
                 reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias, **build.kw(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias, reduce_results=reduce_results, **build.kw(f"{prefix}.down_proj"))
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(torch.nn.Module):
    """Fused qkv projection, optional per-head q/k RMSNorm, rotary, causal attention, o_proj."""

    def __init__(self, config, spec: DecoderSpec, *, build: Build, prefix: str, layer_idx: int = 0):
        super().__init__()
        head_dim = head_dim_of(config)
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, num_kv, bias=spec.qkv_bias,
            **build.kw(f"{prefix}.qkv_proj"))
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, bias=spec.o_bias, **build.kw(f"{prefix}.o_proj"))
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        if spec.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, params_dtype=build.params_dtype)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, params_dtype=build.params_dtype)
        self.qk_norm = spec.qk_norm
        self.rotary_emb = get_rope(head_dim, config, dtype=build.params_dtype)
        self.attn = Attention(self.num_heads, head_dim, self.num_kv_heads, scale=head_dim**-0.5,
                              sliding_window=layer_sliding_window(config, layer_idx))

    def forward(self, positions, x, kv_cache: LayerKVCache | None, start_pos: int) -> torch.Tensor:
        b, t, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, start_pos))


class LlamaDecoderLayer(torch.nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)); `attn(positions, x, kv_cache, start_pos)`."""

    def __init__(self, config, attn: torch.nn.Module, mlp: torch.nn.Module, *, build: Build):
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype=build.params_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype=build.params_dtype)

    def forward(self, positions, x, kv_cache, start_pos):
        h = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, start_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(torch.nn.Module):
    """Embedding, decoder layers, final norm (HF's `model.*` names)."""

    def __init__(self, config, make_attention, make_mlp, *, build: Build):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp=build.tp, quant_config=build.quant_config,
            params_dtype=build.params_dtype, prefix="model.embed_tokens")
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(config, make_attention(i, f"model.layers.{i}.self_attn"),
                              make_mlp(i, f"model.layers.{i}.mlp"), build=build)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype=build.params_dtype)

    def forward(self, input_ids, positions, kv_cache, start_pos):
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(positions, h, kv_cache.layer(i) if kv_cache is not None else None, start_pos)
        return self.norm(h)


class LlamaForCausalLM(CausalLM):
    """Llama (and Llama-style configs such as Mistral's)."""

    def __init__(self, hf_config, *, tp: TPContext = TPContext(), quant_config: QuantConfig | None = None,
                 params_dtype: torch.dtype = torch.bfloat16):
        super().__init__(hf_config, tp, params_dtype)
        build = Build(tp, quant_config, params_dtype)
        self.model = LlamaModel(hf_config, lambda i, p: self.make_attention(i, p, build),
                                lambda i, p: self.make_mlp(i, p, build), build=build)
        self.lm_head = ParallelLMHead(
            hf_config.vocab_size, hf_config.hidden_size, tp=tp, quant_config=quant_config, params_dtype=params_dtype,
            prefix="lm_head")
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        if tied:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self.weight_mapping = WeightMapping(
            rules=self.mapping_rules(),
            skip=self.skipped_names() + (("lm_head.weight",) if tied else ()),
        )
        self.geometry = self.attention_geometry()

    @staticmethod
    def decoder_spec(config) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))

    def mapping_rules(self):
        return stacked_rules()

    def skipped_names(self) -> tuple[str, ...]:
        """Checkpoint tensors the model has no parameter for, by design (patterns of `WeightMapping.skip`)."""
        return ("rotary_emb.inv_freq",)

    def attention_geometry(self) -> AttentionGeometry:
        attn = self.model.layers[0].self_attn
        return AttentionGeometry(self.config.num_hidden_layers, attn.num_kv_heads, attn.head_dim)

    def make_attention(self, layer_idx: int, prefix: str, build: Build) -> torch.nn.Module:
        return LlamaAttention(self.config, self.decoder_spec(self.config), build=build, prefix=prefix, layer_idx=layer_idx)

    def make_mlp(self, layer_idx: int, prefix: str, build: Build) -> torch.nn.Module:
        spec = self.decoder_spec(self.config)
        return LlamaMLP(self.config.hidden_size, self.config.intermediate_size, bias=spec.mlp_bias, build=build, prefix=prefix)

    def compute_logits(self, input_ids, positions, kv_cache, start_pos):
        return self.lm_head(self.model(input_ids, positions, kv_cache, start_pos))


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama without biases, sliding-window attention on every layer."""

    @staticmethod
    def decoder_spec(config) -> DecoderSpec:
        return DecoderSpec()


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: bias on q/k/v, none on o_proj."""

    @staticmethod
    def decoder_spec(config) -> DecoderSpec:
        return DecoderSpec(qkv_bias=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: per-head RMSNorm on q and k before rotary."""

    @staticmethod
    def decoder_spec(config) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(qkv_bias=bias, o_bias=bias, qk_norm=True)
