"""Causal self-attention over this rank's heads, with an optional static KV cache.

Owns the attention computation (torch SDPA, grouped-query attention via `enable_gqa`) and the KV
cache layout. No weights: the q/k/v and output projections live in the model's linear layers.

Invariants:
- Layout everywhere is [B, T, heads, head_size]; the output is [B, T, heads * head_size], ready for
  the row-parallel output projection.
- The T new tokens sit at absolute positions `start_pos .. start_pos + T - 1`: query i attends to
  every cached key and to the new keys up to and including its own position.
- A `LayerKVCache` is written only at the position the caller names (`update(k, v, start_pos)`),
  so the layers of one forward never depend on a shared mutable counter; `KVCache.length` is a
  convenience the model advances once per forward.

- Ragged batches: `KVCache.key_mask` [B, max_len] (all True by default) says which cached positions
  hold real tokens; a left-padded prompt marks its pads False, so no query attends to them. A pad
  query attends to itself only (never to nothing: an all-masked SDPA row is NaN, and a NaN value
  would reach real queries through a zero weight). Every row still shares the cache's slot indices.

- Sliding window (`sliding_window=W`, per layer): a query sees the W most recent slots, itself
  included, as transformers does; the cache still holds every position.

- Keys and values may differ in size (`KVCache(value_size=...)`): multi-head latent attention
  (`mla.py`) caches its latent and its rotated rope key as one shared "head" of two sizes, and
  computes with keys and values of different head sizes (`Attention.attend`).

Limitations: no paged cache; no attention sinks, no logit soft-capping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerKVCache:
    """One layer's keys and values, [B, max_len, Hkv, D] each (views into `KVCache`'s storage), and
    the cache's `key_mask` [B, max_len] (None: every position valid)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
        self.k = k
        self.v = v
        self.key_mask = key_mask

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k [B, T, Hkv, D] and v [B, T, Hkv, Dv] at `start_pos`; return all keys/values
        [B, start_pos + T, Hkv, D / Dv]."""
        end = start_pos + k.shape[1]
        if start_pos < 0 or end > self.max_len:
            raise ValueError(f"positions [{start_pos}, {end}) do not fit a KV cache of length {self.max_len}")
        if (k.shape[:3] != v.shape[:3] or k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[2:]
                or v.shape[3:] != self.v.shape[3:]):
            raise ValueError(
                f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit a KV cache of shapes {tuple(self.k.shape)} / "
                f"{tuple(self.v.shape)}"
            )
        self.k[:, start_pos:end] = k
        self.v[:, start_pos:end] = v
        return self.k[:, :end], self.v[:, :end]


class KVCache:
    """Static keys/values for every layer of a model: [num_layers, B, max_len, Hkv, D] each (values
    [..., value_size] when given)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        value_size: int | None = None,
    ):
        shape = (num_layers, batch_size, max_len, num_kv_heads)
        self.k = torch.zeros((*shape, head_size), dtype=dtype, device=device)
        self.v = torch.zeros((*shape, value_size or head_size), dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions written by every layer so far; advanced by the model
        self.key_mask: torch.Tensor | None = None  # [B, max_len] bool once `mask_keys` was called

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    def layer(self, i: int) -> LayerKVCache:
        return LayerKVCache(self.k[i], self.v[i], self.key_mask)

    def mask_keys(self, valid: torch.Tensor, start: int = 0) -> None:
        """Mark positions [start, start + T) of each row real (True) or padding (False) from `valid` [B, T]."""
        if self.key_mask is None:
            self.key_mask = torch.ones(self.k.shape[1:3], dtype=torch.bool, device=self.k.device)
        self.key_mask[:, start : start + valid.shape[1]] = valid.to(self.key_mask.device)

    def advance(self, n: int) -> int:
        """Record that every layer wrote `n` more positions; returns the new length."""
        if n < 0 or self.length + n > self.max_len:
            raise ValueError(f"cannot advance a KV cache of length {self.length}/{self.max_len} by {n}")
        self.length += n
        return self.length

    def reset(self) -> None:
        """Start a new sequence (the stored values are simply overwritten later)."""
        self.length = 0


def causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, S] mask, True where query i (at absolute position S - T + i) may attend key j."""
    ones = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    return ones.tril(diagonal=num_keys - num_queries)


def attention_mask(num_queries: int, num_keys: int, device: torch.device, key_mask: torch.Tensor | None = None,
                   window: int | None = None) -> torch.Tensor | None:
    """Boolean mask [T, S] or [B, 1, T, S] (True: may attend), or None where plain causal SDPA is right.

    Query i sits at cache slot S - T + i. Causal; with `window`, only the `window` most recent slots
    (key slot > query slot - window, as transformers' sliding window); with `key_mask` [B, S], real
    keys only, and each query always its own slot (see the module docstring)."""
    windowed = window is not None and num_keys > window
    if key_mask is None and not windowed:
        return None if num_queries in (1, num_keys) else causal_mask(num_queries, num_keys, device)
    q_slot = num_keys - num_queries + torch.arange(num_queries, device=device)[:, None]
    k_slot = torch.arange(num_keys, device=device)[None, :]
    allowed = k_slot <= q_slot
    if windowed:
        allowed &= k_slot > q_slot - window
    if key_mask is None:
        return allowed
    return (allowed[None] & key_mask[:, None, :] | (k_slot == q_slot)[None]).unsqueeze(1)


class Attention(nn.Module):
    """Causal SDPA over per-rank heads: q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H * D]."""

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of positions, got {sliding_window}")
        self.sliding_window = sliding_window
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"{num_heads} query heads cannot be grouped over {num_kv_heads} kv heads")
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: LayerKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)
        elif start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs a kv_cache holding the earlier positions")
        key_mask = kv_cache.key_mask if kv_cache is not None else None
        return self.attend(q, k, v, key_mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, T, H, D] over every key so far, k [B, S, Hkv, D] and v [B, S, Hkv, Dv] (the new tokens
        last; `key_mask` [B, >= S] the cache's) -> [B, T, H * Dv]."""
        batch, num_tokens = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, heads, T, D]
        num_keys = k.shape[2]
        key_mask = key_mask[:, :num_keys] if key_mask is not None else None
        mask = attention_mask(num_tokens, num_keys, q.device, key_mask, self.sliding_window)
        # is_causal aligns the mask top-left, which is only right when queries and keys coincide.
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and num_tokens == num_keys and num_tokens > 1,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.transpose(1, 2).reshape(batch, num_tokens, self.num_heads * v.shape[-1])

    def extra_repr(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window else ""
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_size={self.head_size}, scale={self.scale}{window}"
