"""Greedy decoding with the model's KV cache.

Owns one loop: prefill the whole prompt once, then feed one token per step at `start_pos`. The
result matches Hugging Face `generate(do_sample=False)`: prompt followed by the new tokens.

Requests are checked before any work: token ids inside the vocabulary, prompt plus new tokens
within `max_position_embeddings` (`check_request`).

Limitations: greedy only, every row of the batch has the same prompt length (no padding or
attention mask), no stop tokens. Ties in the argmax pick the lowest token id, as `torch.argmax`
does (and as Hugging Face does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Generation:
    """Output of `generate_with_logits`."""

    tokens: torch.Tensor  # [B, T + max_new_tokens]: prompt, then the generated ids
    last_prompt_logits: torch.Tensor  # [B, V] float32: logits at the last prompt position


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def check_request(config, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Raise ValueError naming the first token id outside [0, vocab_size), or a prompt plus
    `max_new_tokens` longer than the model's `max_position_embeddings` (its KV cache would be
    allocated for that length up front, and positions beyond it were never trained)."""
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    bad = (input_ids < 0) | (input_ids >= config.vocab_size)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"token id {int(input_ids[row, col])} (prompt {row}, position {col}) is outside the "
                         f"vocabulary [0, {config.vocab_size})")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"position limit (max_position_embeddings = {limit})")


@torch.inference_mode()
def generate_with_logits(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
    """Greedy-decode `max_new_tokens` after `input_ids` ([B, T]); also return the prefill's last logits."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {list(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_request(model.config, input_ids, max_new_tokens)
    batch, length = input_ids.shape
    prompt = input_ids.to(_model_device(model), dtype=torch.long)
    cache = model.new_kv_cache(batch, length + max_new_tokens)
    logits = model(prompt, kv_cache=cache, start_pos=0)
    last_prompt_logits = logits[:, -1].float()
    new_tokens = []
    next_token = last_prompt_logits.argmax(dim=-1, keepdim=True)
    for step in range(max_new_tokens):
        new_tokens.append(next_token)
        if step + 1 == max_new_tokens:
            break  # the last token needs no forward pass: nothing reads its logits
        logits = model(next_token, kv_cache=cache, start_pos=length + step)
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
    tokens = torch.cat([prompt, *new_tokens], dim=1).to(input_ids.device)
    return Generation(tokens=tokens, last_prompt_logits=last_prompt_logits.to(input_ids.device))


def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding: `input_ids` ([B, T]) followed by `max_new_tokens` new ids ([B, T + max_new_tokens])."""
    return generate_with_logits(model, input_ids, max_new_tokens).tokens
