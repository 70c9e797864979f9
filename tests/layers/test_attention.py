"""Attention and KVCache against a plain-torch softmax(QK^T * scale + causal mask) V."""

import math

import pytest
import torch

from streamquant.layers.attention import Attention, KVCache, causal_mask

B, H, D = 2, 4, 8


def reference(q, k, v, scale, start_pos=0):
    """Plain loops-free reference in fp64: query i at absolute position start_pos + i."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    qpos = torch.arange(q.shape[2])[:, None] + start_pos
    kpos = torch.arange(k.shape[2])[None, :]
    scores = scores.masked_fill(kpos > qpos, -math.inf)
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def qkv(tokens, kv_heads, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, tokens, H, D, generator=g)
    k = torch.randn(B, tokens, kv_heads, D, generator=g)
    v = torch.randn(B, tokens, kv_heads, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tokens", [1, 7])
def test_full_forward_matches_reference(kv_heads, tokens):
    q, k, v = qkv(tokens, kv_heads)
    attn = Attention(H, D, kv_heads, scale=0.3)
    out = attn(q, k, v)
    assert out.shape == (B, tokens, H * D)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("chunks", [[5, 1, 1, 1], [3, 4, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
def test_incremental_decoding_equals_full_forward(kv_heads, chunks):
    total = sum(chunks)
    q, k, v = qkv(total, kv_heads, seed=1)
    attn = Attention(H, D, kv_heads, scale=D**-0.5)
    full = attn(q, k, v)
    cache = KVCache(num_layers=2, batch_size=B, max_len=total + 3, num_kv_heads=kv_heads, head_size=D,
                    dtype=torch.float32, device="cpu")
    outs, pos = [], 0
    for n in chunks:
        sl = slice(pos, pos + n)
        outs.append(attn(q[:, sl], k[:, sl], v[:, sl], kv_cache=cache.layer(1), start_pos=pos))
        torch.testing.assert_close(outs[-1].double(), reference(q[:, sl], k[:, :pos + n], v[:, :pos + n],
                                                                D**-0.5, start_pos=pos), atol=1e-5, rtol=1e-5)
        pos = cache.advance(n)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == total
    assert torch.equal(cache.k[1, :, :total], k) and torch.equal(cache.v[1, :, :total], v)
    assert not cache.k[0].any()  # the other layer's storage was never touched


def test_bf16_runs_and_stays_close():
    q, k, v = qkv(6, 2, dtype=torch.bfloat16)
    out = Attention(H, D, 2, scale=D**-0.5)(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v, D**-0.5), atol=2e-2, rtol=2e-2)


def test_causal_mask_is_bottom_right_aligned():
    assert causal_mask(2, 4, torch.device("cpu")).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_cache_bounds_and_shape_errors():
    cache = KVCache(1, B, 4, 2, D, dtype=torch.float32)
    layer = cache.layer(0)
    q, k, v = qkv(3, 2)
    with pytest.raises(ValueError, match="do not fit a KV cache of length 4"):
        layer.update(k, v, start_pos=2)
    with pytest.raises(ValueError, match="do not fit"):
        layer.update(k[:, :, :1], v[:, :, :1], start_pos=0)
    with pytest.raises(ValueError, match="advance"):
        cache.advance(5)
    with pytest.raises(ValueError, match="kv_cache"):
        Attention(H, D, 2, scale=1.0)(q, k, v, start_pos=1)
    with pytest.raises(ValueError, match="grouped"):
        Attention(H, D, 3, scale=1.0)


def test_values_of_another_size_are_cached_and_attended():
    """Keys [.., D] and values [.., Dv] (latent attention): the cache holds each at its size, and a decode
    step over the cache equals the full forward, against the reference."""
    cache = KVCache(1, B, 6, 2, D, dtype=torch.float32, value_size=3)
    assert cache.k.shape[-1] == D and cache.v.shape[-1] == 3
    q, k, _ = qkv(5, 2)
    v = torch.randn(B, 5, 2, 3, generator=torch.Generator().manual_seed(7))
    attn = Attention(H, D, 2, scale=0.3)
    full = attn(q, k, v)
    assert full.shape == (B, 5, H * 3)
    torch.testing.assert_close(full, reference(q, k, v, 0.3).float())
    layer = cache.layer(0)
    attn(q[:, :4], k[:, :4], v[:, :4], layer, start_pos=0)
    torch.testing.assert_close(attn(q[:, 4:], k[:, 4:], v[:, 4:], layer, start_pos=4), full[:, 4:])
    with pytest.raises(ValueError, match="do not fit a KV cache of shapes"):
        layer.update(k[:, :1], k[:, :1], start_pos=0)  # values of the key size
