"""MultiHeadLatentAttention against transformers' own DeepseekV3Attention (random weights, float32), with
and without the q low rank, through a prefill and decode steps of the latent KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import yarn_apply_mscale
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from streamquant.layers.attention import KVCache
from streamquant.layers.mla import MLADims, MultiHeadLatentAttention
from streamquant.layers.rotary import get_rope
from streamquant.loading.mapping import WeightMapping
from streamquant.loading.streaming import stream_weights
from streamquant.parallel.context import TPContext

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.9, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 16}


def _config(q_lora_rank, interleave: bool) -> DeepseekV3Config:
    config = DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
                              kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                              max_position_embeddings=64, rope_parameters=YARN, rope_interleave=interleave,
                              attention_bias=True)
    config._attn_implementation = "sdpa"
    return config


def _ours(config, tp: TPContext = TPContext()) -> MultiHeadLatentAttention:
    dims = MLADims(config.hidden_size, config.num_attention_heads, config.q_lora_rank, config.kv_lora_rank,
                   config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.rms_norm_eps, True)
    rope = get_rope(dims.qk_rope_head_dim, config, dtype=torch.float32, interleaved=config.rope_interleave)
    scale = yarn_apply_mscale(config.rope_parameters, dims.qk_head_dim**-0.5)
    with torch.device("meta"):
        return MultiHeadLatentAttention(dims, rope, scale, tp=tp, params_dtype=torch.float32, prefix="attn")


@pytest.mark.parametrize("q_lora_rank,interleave", [(16, True), (None, False)])
def test_prefill_and_cached_decode_match_transformers(q_lora_rank, interleave):
    config = _config(q_lora_rank, interleave)
    torch.manual_seed(0)
    hf = DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    ours = _ours(config)
    stream_weights(ours, list(hf.state_dict().items()), WeightMapping(), device="cpu")
    x = torch.randn(2, 9, config.hidden_size)
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        want, _ = hf(x, DeepseekV3RotaryEmbedding(config)(x, positions), attention_mask=None)
        assert (ours(positions, x, None, 0) - want).abs().max() < 1e-5
        cache = KVCache(1, 2, 9, 1, config.kv_lora_rank, dtype=torch.float32, value_size=config.qk_rope_head_dim)
        steps = [ours(positions[:, :6], x[:, :6], cache.layer(0), 0)]
        steps += [ours(positions[:, t:t + 1], x[:, t:t + 1], cache.layer(0), t) for t in range(6, 9)]
    assert (torch.cat(steps, dim=1) - want).abs().max() < 1e-5


def test_heads_split_across_ranks_and_latent_stays_whole():
    config = _config(16, True)
    ranks = [_ours(config, TPContext(r, 2)) for r in range(2)]
    for m in ranks:
        assert m.num_heads == 2 and m.attn.num_heads == 2
        assert m.q_b_proj.weight.shape == (2 * 16, 16) and m.kv_b_proj.weight.shape == (2 * 20, 24)
        assert m.o_proj.weight.shape == (32, 2 * 12)
        assert m.q_a_proj.weight.shape == (16, 32) and m.kv_a_proj_with_mqa.weight.shape == (24 + 8, 32)
    with pytest.raises(ValueError, match="attn: number of attention heads 4 is not divisible by tensor-parallel size 3"):
        _ours(config, TPContext(0, 3))
