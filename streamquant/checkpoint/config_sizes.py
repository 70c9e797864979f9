"""A config's sizes checked against its own checkpoint, before any model is built or memory given.

A `config.json` is input like any other: a layer count of a billion would build a billion modules
(hours of Python, then the memory), a vocabulary of a billion would allocate its embedding at the
first tensor. `check_config_sizes` refuses such configs from the checkpoint's headers alone (no
tensor data is read), naming the field:
  - every size field present (layers, hidden, intermediate, vocab, heads, kv heads, head_dim,
    experts, MoE intermediate sizes, max positions, DeepSeek's latent ranks and head parts) is a positive integer;
  - heads divide the hidden size (unless `head_dim` is given) and kv heads divide the heads;
  - no size other than `max_position_embeddings` exceeds both the largest dimension of any
    checkpoint tensor and the number of tensors (a hidden size, vocabulary or intermediate size is
    some tensor's dimension; a layer or expert count is at most the number of tensors, or a
    dimension of fused expert tensors). Positions are allocated per request (`inference/generation.py`), so
    a large `max_position_embeddings` costs nothing until generation asks for it.
`check_model_fits` then compares the meta-built model with the checkpoint: one rank never holds
more parameter elements than the checkpoint has (plus vocabulary padding), so a config whose sizes
are each plausible but together describe a bigger model than the checkpoint is refused before the
first allocation.
"""

from __future__ import annotations

import math

import torch

from streamquant.checkpoint.reader import CheckpointError

SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "num_experts", "moe_intermediate_size",
               "shared_expert_intermediate_size", "ffn_dim", "word_embed_proj_dim", "max_position_embeddings",
               "n_routed_experts", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
UNBOUNDED = ("max_position_embeddings",)  # not a tensor dimension for rotary models
PADDING_SLACK = 1.05  # relative: vocabulary padding (at most 64 * tp - 1 rows) and replicas of small tensors
ABSOLUTE_SLACK = 2**16  # elements: the same for tiny models


def _sizes(config) -> dict[str, object]:
    return {f: getattr(config, f) for f in SIZE_FIELDS if getattr(config, f, None) is not None}


def check_config_sizes(config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError naming the first size field that is not a positive integer or cannot fit `shapes`."""
    sizes = _sizes(config)
    for field, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"config.json: {field} must be a positive integer, got {value!r}")
    heads, kv = sizes.get("num_attention_heads"), sizes.get("num_key_value_heads")
    if heads and "head_dim" not in sizes and sizes.get("hidden_size", 0) % heads:
        raise CheckpointError(f"config.json: hidden_size {sizes['hidden_size']} is not divisible by "
                              f"num_attention_heads {heads}")
    if heads and kv and heads % kv:
        raise CheckpointError(f"config.json: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
    bound = max([len(shapes), *(d for shape in shapes.values() for d in shape)], default=0)
    for field, value in sizes.items():
        if field not in UNBOUNDED and value > bound:
            raise CheckpointError(f"config.json: {field} = {value} cannot fit this checkpoint: no tensor has a "
                                  f"dimension that large and it holds only {len(shapes)} tensors (largest "
                                  f"dimension {bound})")


def check_model_fits(model: torch.nn.Module, loadable: dict[str, torch.Tensor],
                     shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError if one rank's loadable parameters (on meta) hold more elements than the checkpoint."""
    model_elements = sum(p.numel() for p in loadable.values())
    checkpoint_elements = sum(math.prod(shape) for shape in shapes.values())
    if model_elements > checkpoint_elements * PADDING_SLACK + ABSOLUTE_SLACK:
        raise CheckpointError(
            f"config.json describes {type(model).__name__} with {model_elements:,} weight elements on one rank, but "
            f"the checkpoint holds only {checkpoint_elements:,}: its sizes ({_describe(model)}) do not match the "
            "checkpoint")


def _describe(model: torch.nn.Module) -> str:
    return ", ".join(f"{k}={v}" for k, v in _sizes(model.config).items())
