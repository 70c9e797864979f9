"""Rotary position embeddings (RoPE), numerically identical to transformers 5.23.

Owns the inverse frequencies and their application to q and k in the [B, T, heads, D] layout.
Every scaled rope type takes its frequencies from transformers' own `ROPE_INIT_FUNCTIONS`, so the
scaling rules are HF's code, not a re-derivation; "default" copies the Llama-family
`compute_default_rope_parameters` (plus `partial_rotary_factor`, as the Phi family does).

Invariants:
- cos/sin are computed per call in fp32 from `positions`, scaled by `attention_scaling`, cast to
  q's dtype, and applied as `q * cos + rotate_half(q) * sin`: the op sequence of HF's Llama, so
  bf16 results are bit-identical to transformers on the same device.
- `inv_freq` is a non-persistent buffer computed at construction on the CPU (also when the model
  is built under a `meta` device context); loading never touches it. A model materialized with
  `to_empty` must rebuild its rotary modules, since `to_empty` leaves buffers uninitialized.
- With `rotary_dim < head_size` the rotation applies to the first `rotary_dim` channels of each
  head and the rest pass through unchanged (HF's partial-rotary models).

- `interleaved=True` (DeepSeek's `rope_interleave`: the rotary channels are pairs (x0, x1), (x2, x3),
  ... each turned by one frequency) takes the even channels, then the odd ones, and rotates that
  NeoX-style: the output stays in that de-interleaved order, as transformers' DeepSeek-V3 returns it
  (q and k alike, so q . k is the interleaved rotation's); the same bits, since `a + (-b) * s` is
  `a - b * s` exactly.

Limitations: rope types default, linear, dynamic, yarn, llama3 and longrope only; no per-layer-type
rope parameters (nested dicts), no multimodal rope.
Dynamic NTK and longrope are stateless: the frequencies depend only on this call's largest
position. That equals HF for a fresh module and for non-decreasing positions (prefill then
decode); HF additionally keeps a grown dynamic-NTK cache for later, shorter calls above the
original length, which is not reproduced.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dimension (HF's NeoX-style rotation)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """`[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]` over the last dimension (pairs to halves)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def _check_shapes(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    batch, tokens = q.shape[:2]
    ok = positions.dim() == 2 and positions.shape[0] in (1, batch) and positions.shape[1] == tokens
    if not ok or k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"positions {tuple(positions.shape)} must be [B, T] or [1, T] for q {tuple(q.shape)} and k {tuple(k.shape)}"
        )


def default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """Unscaled RoPE frequencies `1 / base^(2i / rotary_dim)`, as HF's default init computes them."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))


class RotaryEmbedding(nn.Module):
    """Fixed frequencies (default, linear, yarn, llama3): `forward(positions, q, k) -> (q, k)`."""

    def __init__(self, head_size: int, inv_freq: torch.Tensor, attention_scaling: float, *, dtype: torch.dtype):
        super().__init__()
        rotary_dim = 2 * inv_freq.numel()
        if rotary_dim > head_size:
            raise ValueError(f"rotary dim {rotary_dim} (from the rope config) exceeds head size {head_size}")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.attention_scaling = float(attention_scaling)
        self.interleaved = False  # set by `get_rope(interleaved=True)`: pairs of channels (module doc)
        # The model's activation dtype, recorded only: cos/sin follow q's dtype per call, as in HF.
        self.dtype = dtype
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """The inverse frequencies to use for this call's `positions`."""
        return self.inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [B, T, rotary_dim] in `dtype`, computed in fp32."""
        inv_freq = self.frequencies(positions).to(device=positions.device, dtype=torch.float)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [B, T, H, D] and k [B, T, Hkv, D] at `positions` [B, T] (or [1, T], shared by the batch)."""
        _check_shapes(positions, q, k)
        if self.interleaved:
            q, k = deinterleave(q), deinterleave(k)
        cos, sin = self.cos_sin(positions, q.dtype)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def extra_repr(self) -> str:
        interleaved = ", interleaved" if self.interleaved else ""
        return f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, scaling={self.attention_scaling}{interleaved}"


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """Dynamic NTK: past the original context, frequencies are recomputed for the call's length."""

    def __init__(self, head_size: int, hf_config, *, dtype: torch.dtype):
        with torch.device("cpu"):
            inv_freq, scaling = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, torch.device("cpu"))
        super().__init__(head_size, inv_freq, scaling, dtype=dtype)
        self.hf_config = hf_config
        self.original_max_seq_len = hf_config.max_position_embeddings

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        seq_len = positions.max() + 1
        if seq_len <= self.original_max_seq_len:
            return self.inv_freq
        # Same call, with the same tensor-valued seq_len, as HF's dynamic_rope_update.
        inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](self.hf_config, positions.device, seq_len=seq_len)
        return inv_freq


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """LongRoPE (Phi-3): short factors up to the original context, long factors beyond it."""

    def __init__(self, head_size: int, hf_config, *, dtype: torch.dtype):
        init = ROPE_INIT_FUNCTIONS["longrope"]
        original = hf_config.rope_parameters["original_max_position_embeddings"]
        cpu = torch.device("cpu")
        with cpu:
            short, scaling = init(hf_config, cpu)
            long, _ = init(hf_config, cpu, seq_len=original + 1)
        super().__init__(head_size, short, scaling, dtype=dtype)
        self.register_buffer("long_inv_freq", long, persistent=False)
        self.original_max_position_embeddings = original

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        long = positions.max() + 1 > self.original_max_position_embeddings
        return torch.where(long, self.long_inv_freq, self.inv_freq)


def _rotary_dim(head_size: int, params: dict) -> int:
    return int(head_size * params.get("partial_rotary_factor", 1.0))


def _default_rope(head_size: int, hf_config, *, dtype: torch.dtype) -> RotaryEmbedding:
    params = hf_config.rope_parameters
    with torch.device("cpu"):
        inv_freq = default_inv_freq(_rotary_dim(head_size, params), params["rope_theta"])
    return RotaryEmbedding(head_size, inv_freq, 1.0, dtype=dtype)


def _fixed_rope(head_size: int, hf_config, *, dtype: torch.dtype) -> RotaryEmbedding:
    init = ROPE_INIT_FUNCTIONS[hf_config.rope_parameters["rope_type"]]
    with torch.device("cpu"):
        inv_freq, scaling = init(hf_config, torch.device("cpu"))
    return RotaryEmbedding(head_size, inv_freq, scaling, dtype=dtype)


ROPE_BUILDERS = {
    "default": _default_rope,
    "linear": _fixed_rope,
    "yarn": _fixed_rope,
    "llama3": _fixed_rope,
    "dynamic": DynamicNTKRotaryEmbedding,
    "longrope": LongRopeRotaryEmbedding,
}


def get_rope(head_size: int, hf_config, *, dtype: torch.dtype, interleaved: bool = False) -> RotaryEmbedding:
    """The rotary embedding a transformers 5 config describes (`config.rope_parameters`); `interleaved`:
    DeepSeek's pairwise channel layout (module doc)."""
    params = getattr(hf_config, "rope_parameters", None)
    if not params or "rope_theta" not in params:
        raise ValueError(
            f"{type(hf_config).__name__} has no flat rope_parameters with rope_theta (got {params!r}); "
            "per-layer-type rope parameters are not supported"
        )
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_BUILDERS:
        raise NotImplementedError(f"rope type {rope_type!r} is not supported; supported: {sorted(ROPE_BUILDERS)}")
    rope = ROPE_BUILDERS[rope_type](head_size, hf_config, dtype=dtype)
    if rope.rotary_dim != _rotary_dim(head_size, params):
        raise ValueError(
            f"rope config gives rotary dim {rope.rotary_dim}, but head size {head_size} with "
            f"partial_rotary_factor {params.get('partial_rotary_factor', 1.0)} needs {_rotary_dim(head_size, params)}"
        )
    if interleaved and rope.rotary_dim != head_size:
        raise ValueError(f"interleaved rotary needs the whole head rotated (rotary dim {rope.rotary_dim}, head {head_size})")
    rope.interleaved = interleaved
    return rope
