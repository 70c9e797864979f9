"""Greedy decoding with the model's KV cache.

Owns one loop: prefill the whole prompt once, then feed one token per step at `start_pos`. The
result matches Hugging Face `generate(do_sample=False)`: prompt followed by the new tokens.

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


@torch.inference_mode()
def generate_with_logits(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
    """Greedy-decode `max_new_tokens` after `input_ids` ([B, T]); also return the prefill's last logits."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {list(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
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
