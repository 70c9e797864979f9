"""Multi-head latent attention (MLA, DeepSeek-V2 / V3), computed as transformers 5.25 computes it.

  q:  hidden -> q_a_proj -> q_a_layernorm -> q_b_proj (or one q_proj when `q_lora_rank` is None),
      per head [q_nope (qk_nope_head_dim) | q_pe (qk_rope_head_dim)];
  kv: hidden -> kv_a_proj_with_mqa -> [latent (kv_lora_rank) | k_pe (qk_rope_head_dim, one head
      shared by all)]; the latent goes through kv_a_layernorm; rotary turns q_pe and k_pe only;
      kv_b_proj expands the latent of every position into k_nope and v per head;
  attention of [q_nope | q_pe] against [k_nope | k_pe] with v, scaled by the model's softmax scale
  (DeepSeek: qk_head_dim^-0.5 times yarn's mscale(factor, mscale_all_dim)^2), then o_proj.

The KV cache holds what transformers caches: per token the normalized latent (its key slot, one
"head" of kv_lora_rank) and the rotated k_pe (its value slot, qk_rope_head_dim): 576 values a token
for DeepSeek-V3 instead of 2 x 128 heads x 192. Every forward expands the whole cache through
kv_b_proj again (O(positions) per decoded token, as transformers does).

Tensor parallelism splits the heads: q_b_proj / q_proj and kv_b_proj are column-parallel (their
rows are grouped by head, so an even split of the rows is a split of the heads), o_proj is
row-parallel; q_a_proj, kv_a_proj_with_mqa and both norms are replicated, so every rank computes
(and caches) the same whole latent. Every projection, kv_b_proj included, takes the model's quant
config: kv_b_proj is only ever used as a plain linear (never absorbed into q or o), so fp8 codes serve.

Limitations: no weight-absorbed (latent-space) attention; no sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamquant.layers.attention import Attention, LayerKVCache
from streamquant.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from streamquant.layers.norm import RMSNorm
from streamquant.layers.rotary import RotaryEmbedding
from streamquant.parallel.context import TPContext, divide
from streamquant.quant.base import QuantConfig


@dataclass(frozen=True)
class MLADims:
    """The sizes of one latent attention layer (the HF config's names)."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float = 1e-6
    bias: bool = False  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MultiHeadLatentAttention(torch.nn.Module):
    """`forward(positions, x [B, T, hidden], kv_cache, start_pos) -> [B, T, hidden]` (module doc)."""

    def __init__(self, dims: MLADims, rotary_emb: RotaryEmbedding, scale: float, *, tp: TPContext = TPContext(),
                 quant_config: QuantConfig | None = None, params_dtype: torch.dtype | None = None, prefix: str = ""):
        super().__init__()
        if rotary_emb.rotary_dim != dims.qk_rope_head_dim:
            raise ValueError(f"{prefix}: rotary dim {rotary_emb.rotary_dim} is not qk_rope_head_dim {dims.qk_rope_head_dim}")
        self.dims = dims
        self.num_heads = divide(dims.num_heads, tp.size, f"{prefix}: number of attention heads")

        def kw(name: str) -> dict:
            return dict(quant_config=quant_config, params_dtype=params_dtype, prefix=f"{prefix}.{name}")

        q_out = dims.num_heads * dims.qk_head_dim
        if dims.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(dims.hidden_size, q_out, tp=tp, **kw("q_proj"))
        else:
            self.q_a_proj = ReplicatedLinear(dims.hidden_size, dims.q_lora_rank, bias=dims.bias, tp=tp, **kw("q_a_proj"))
            self.q_a_layernorm = RMSNorm(dims.q_lora_rank, dims.rms_norm_eps, params_dtype=params_dtype)
            self.q_b_proj = ColumnParallelLinear(dims.q_lora_rank, q_out, tp=tp, **kw("q_b_proj"))
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            dims.hidden_size, dims.kv_lora_rank + dims.qk_rope_head_dim, bias=dims.bias, tp=tp, **kw("kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(dims.kv_lora_rank, dims.rms_norm_eps, params_dtype=params_dtype)
        self.kv_b_proj = ColumnParallelLinear(
            dims.kv_lora_rank, dims.num_heads * (dims.qk_nope_head_dim + dims.v_head_dim), tp=tp, **kw("kv_b_proj"))
        self.o_proj = RowParallelLinear(dims.num_heads * dims.v_head_dim, dims.hidden_size, bias=dims.bias, tp=tp,
                                        **kw("o_proj"))
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, dims.qk_head_dim, self.num_heads, scale=scale)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: LayerKVCache | None,
                start_pos: int) -> torch.Tensor:
        d, heads = self.dims, self.num_heads
        b, t, _ = x.shape
        q_nope, q_pe = self._query(x).view(b, t, heads, d.qk_head_dim).split([d.qk_nope_head_dim, d.qk_rope_head_dim], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([d.kv_lora_rank, d.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(b, t, 1, d.kv_lora_rank)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.view(b, t, 1, d.qk_rope_head_dim))
        if kv_cache is not None:
            latent, k_pe = kv_cache.update(latent, k_pe, start_pos)  # every position so far
        elif start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs a kv_cache holding the earlier positions")
        s = latent.shape[1]
        kv = self.kv_b_proj(latent.view(b, s, d.kv_lora_rank)).view(b, s, heads, d.qk_nope_head_dim + d.v_head_dim)
        k_nope, v = kv.split([d.qk_nope_head_dim, d.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(b, s, heads, d.qk_rope_head_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        key_mask = kv_cache.key_mask if kv_cache is not None else None
        return self.o_proj(self.attn.attend(q, k, v, key_mask))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, q_lora_rank={self.dims.q_lora_rank}, kv_lora_rank={self.dims.kv_lora_rank}"
