"""OPT: learned positions (offset 2), LayerNorm, ReLU MLP with biases, optional project_in/out.

Checkpoints saved from `OPTModel` (names starting with `decoder.`) are renamed to `model.decoder.`.
The LM head is always tied to the token embedding, as in transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from streamquant.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from streamquant.layers.attention import Attention
from streamquant.layers.norm import LayerNorm
from streamquant.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from streamquant.loading.default_loader import default_weight_loader
from streamquant.loading.mapping import MappingRule, WeightMapping
from streamquant.loading.parameters import BaseParameter
from streamquant.models.base import AttentionGeometry, CausalLM
from streamquant.models.llama import Build
from streamquant.parallel.context import TPContext

POSITION_OFFSET = 2


class OPTLearnedPositionalEmbedding(torch.nn.Module):
    """Replicated table of `max_positions + 2` rows, indexed by position + 2."""

    def __init__(self, num_positions: int, dim: int, params_dtype: torch.dtype):
        super().__init__()
        data = torch.empty(num_positions + POSITION_OFFSET, dim, dtype=params_dtype)
        self.weight = BaseParameter(data=data, weight_loader=default_weight_loader)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + POSITION_OFFSET, self.weight)


def _layer_norm(config, dim: int, build: Build) -> LayerNorm:
    if not getattr(config, "layer_norm_elementwise_affine", True):
        raise ValueError("OPT configs with layer_norm_elementwise_affine=False are not supported")
    return LayerNorm(dim, params_dtype=build.params_dtype)


class OPTDecoderLayer(torch.nn.Module):
    def __init__(self, config, *, build: Build, prefix: str):
        super().__init__()
        d, heads, bias = config.hidden_size, config.num_attention_heads, config.enable_bias
        self.head_dim = d // heads
        self.qkv_proj = QKVParallelLinear(d, self.head_dim, heads, heads, bias=bias, **build.kw(f"{prefix}.qkv_proj"))
        self.out_proj = RowParallelLinear(d, d, bias=bias, **build.kw(f"{prefix}.out_proj"))
        self.num_heads = self.qkv_proj.num_heads
        self.attn = Attention(self.num_heads, self.head_dim, self.num_heads, scale=1.0)
        self.self_attn_layer_norm = _layer_norm(config, d, build)
        self.fc1 = ColumnParallelLinear(d, config.ffn_dim, bias=bias, **build.kw(f"{prefix}.fc1"))
        self.fc2 = RowParallelLinear(config.ffn_dim, d, bias=bias, **build.kw(f"{prefix}.fc2"))
        self.final_layer_norm = _layer_norm(config, d, build)
        self.act = ACT2FN[config.activation_function]
        self.pre_norm = config.do_layer_norm_before

    def _attention(self, x, kv_cache, start_pos):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        q = q * self.head_dim**-0.5  # transformers scales q before attention, not inside it
        shape = (b, t, self.num_heads, self.head_dim)
        return self.out_proj(self.attn(q.view(shape), k.view(shape), v.view(shape), kv_cache, start_pos))

    def forward(self, x, kv_cache, start_pos):
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self._attention(h, kv_cache, start_pos)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(torch.nn.Module):
    def __init__(self, config, *, build: Build):
        super().__init__()
        proj = config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, proj, tp=build.tp, quant_config=build.quant_config, params_dtype=build.params_dtype,
            prefix="model.decoder.embed_tokens")
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size, build.params_dtype)
        self.project_in = self.project_out = None
        if proj != config.hidden_size:
            self.project_in = ReplicatedLinear(proj, config.hidden_size, bias=False, **build.kw("model.decoder.project_in"))
            self.project_out = ReplicatedLinear(config.hidden_size, proj, bias=False, **build.kw("model.decoder.project_out"))
        self.final_layer_norm = None
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            self.final_layer_norm = _layer_norm(config, config.hidden_size, build)
        self.layers = torch.nn.ModuleList(
            OPTDecoderLayer(config, build=build, prefix=f"model.decoder.layers.{i}") for i in range(config.num_hidden_layers))

    def forward(self, input_ids, positions, kv_cache, start_pos):
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + self.embed_positions(positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, kv_cache.layer(i) if kv_cache is not None else None, start_pos)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        return self.project_out(h) if self.project_out is not None else h


class _OPTModel(torch.nn.Module):
    def __init__(self, config, *, build: Build):
        super().__init__()
        self.decoder = OPTDecoder(config, build=build)


class OPTForCausalLM(CausalLM):
    def __init__(self, hf_config, *, tp: TPContext = TPContext(), quant_config=None, params_dtype: torch.dtype = torch.bfloat16):
        super().__init__(hf_config, tp, params_dtype)
        build = Build(tp, quant_config, params_dtype)
        self.model = _OPTModel(hf_config, build=build)
        self.lm_head = ParallelLMHead(
            hf_config.vocab_size, hf_config.word_embed_proj_dim, tp=tp, quant_config=quant_config,
            params_dtype=params_dtype, prefix="lm_head")
        self.lm_head.tie_weights(self.model.decoder.embed_tokens)
        self.weight_mapping = WeightMapping(
            rules=tuple(MappingRule.make(f"self_attn.{s}_proj", "qkv_proj", shard_id=s) for s in "qkv")
            + (MappingRule.make("self_attn.out_proj", "out_proj"),),
            skip=("lm_head.weight",),
            prefix_renames=(("decoder", "model.decoder"),),
        )
        layer = self.model.decoder.layers[0]
        self.geometry = AttentionGeometry(hf_config.num_hidden_layers, layer.num_heads, layer.head_dim)

    def compute_logits(self, input_ids, positions, kv_cache, start_pos):
        return self.lm_head(self.model.decoder(input_ids, positions, kv_cache, start_pos))
