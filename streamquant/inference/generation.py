"""Decoding with the model's KV cache: greedy `generate`, and `generate_sequences` for rollouts.

Owns the decode loops: prefill the whole prompt once, then feed one token per step at `start_pos`.
`generate(model, prompts, SamplingParams(...))` is `generate_sequences`; `generate(model, input_ids,
max_new_tokens)` is greedy and matches Hugging Face `generate(do_sample=False)`: prompt followed by
the new tokens.
`generate_sequences(model, prompts, SamplingParams(...))` takes prompts of different lengths (left-
padded into one batch; the KV cache's `key_mask` hides the pads, each row gets its own positions),
samples with `inference/sampling.py`, stops each sequence at its own stop token or budget, and returns one
`Completion` per sequence (the `n` completions of a prompt together, prompts in order). A finished
sequence leaves the batch and the KV cache (a copy of the cache's live rows, each time one stops).

Requests are checked before any work: token ids inside the vocabulary, prompt plus new tokens
within `max_position_embeddings` (`check_request`).

`score` / `teacher_forced_logprobs` give the teacher-forced logprobs of given sequences (ragged).

Limitations: greedy `generate(model, input_ids, max_new_tokens)` takes one prompt length per batch
and never stops early (the `SamplingParams` form has ragged prompts and stop tokens). Ties in the
argmax pick the lowest token id, as `torch.argmax` does (and as Hugging Face does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streamquant.inference.sampling import SamplingParams, sample, sequence_generators, step_logprobs


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


def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]] | torch.Tensor,
             sampling: "SamplingParams | int | None" = None, *, max_new_tokens: int | None = None,
             drop_finished: bool = True) -> "list[Completion] | torch.Tensor":
    """Generate after `prompts`, in one of two forms chosen by the third argument:

    - `generate(model, prompts, SamplingParams(...))`: rollouts. `prompts` are token-id lists of any
      lengths (or a [B, T] tensor); one `Completion` per sequence (`generate_sequences`).
    - `generate(model, input_ids, max_new_tokens)` (or `max_new_tokens=`): greedy, one prompt length
      per batch; the [B, T + max_new_tokens] ids (prompt, then new tokens), as Hugging Face's
      `generate(do_sample=False)`.
    """
    if isinstance(sampling, SamplingParams):
        if max_new_tokens is not None:
            raise TypeError("generate() with SamplingParams takes max_new_tokens inside them, not as a keyword")
        return generate_sequences(model, prompts, sampling, drop_finished=drop_finished)
    if sampling is not None and max_new_tokens is not None:
        raise TypeError("generate() got max_new_tokens twice (positionally and as a keyword)")
    budget = max_new_tokens if sampling is None else sampling
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"generate() takes SamplingParams or an int max_new_tokens, got {type(budget).__name__}")
    return generate_with_logits(model, prompts, budget).tokens


@dataclass(frozen=True)
class Completion:
    """One sampled sequence: ids, the float32 logprob of each completion token (when asked), and
    why it ended ("stop": a stop token, kept as the last id; "length": `max_new_tokens`)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


def token_rows(sequences: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    """Token-id lists from lists of ids or a [B, T] tensor."""
    return [list(map(int, s)) for s in (sequences.tolist() if isinstance(sequences, torch.Tensor) else sequences)]


def stop_ids(config, params: SamplingParams) -> set[int]:
    """`params.stop_token_ids`, or the config's `eos_token_id` (an int or a list) when None."""
    if params.stop_token_ids is not None:
        return set(params.stop_token_ids)
    eos = getattr(config, "eos_token_id", None)
    return set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] long ids, [B, T] bool real-token mask) of prompts left-padded to the longest."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = True
    return ids, mask


def ragged_prefill(model: torch.nn.Module, rows: list[list[int]], extra: int = 0):
    """Left-pad `rows` into one batch and prefill a KV cache of `extra` more positions (the pads hidden
    by its `key_mask`, each row at its own positions): (ids [B, W], logits [B, W, V], cache, positions)."""
    ids, mask = left_pad(rows)
    check_request(model.config, ids, extra)
    device = _model_device(model)
    ids, mask = ids.to(device), mask.to(device)
    cache = model.new_kv_cache(ids.shape[0], ids.shape[1] + extra)
    cache.mask_keys(mask)
    positions = (mask.long().cumsum(1) - 1).clamp_(min=0)
    return ids, model(ids, positions=positions, kv_cache=cache, start_pos=0), cache, positions


@torch.inference_mode()
def generate_sequences(model: torch.nn.Module, prompts: Sequence[Sequence[int]] | torch.Tensor,
                       params: SamplingParams, *, drop_finished: bool = True) -> list[Completion]:
    """Sample `params.n` completions of every prompt (see the module docstring).

    `drop_finished=True` removes a sequence from the batch (and its rows from the KV cache) once it
    stops, so later steps compute only the live ones; False keeps it and discards its tokens. The
    samples are the same either way (each sequence draws from its own generator)."""
    rows = [row for row in token_rows(prompts) for _ in range(params.n)]
    ids, logits, cache, positions = ragged_prefill(model, rows, params.max_new_tokens)
    logits = logits[:, -1]
    batch, width = ids.shape
    generators = sequence_generators(params.seed, batch, ids.device)
    stops, next_pos = stop_ids(model.config, params), positions[:, -1:] + 1
    out: list[list[int]] = [[] for _ in range(batch)]
    logps: list[list[float]] = [[] for _ in range(batch)]
    tops: list[list[dict[int, float]]] = [[] for _ in range(batch)]
    reason: list[str | None] = [None] * batch
    live = list(range(batch))  # the request row of each batch row
    for step in range(params.max_new_tokens):
        tokens = sample(logits, params, generators)
        lp = step_logprobs(logits, tokens, params) if params.logprobs is not None else None
        for b, row in enumerate(live):
            if reason[row] is not None:
                continue
            out[row].append(int(tokens[b]))
            if lp is not None:
                logps[row].append(float(lp.chosen[b]))
                if lp.top_ids is not None:
                    tops[row].append(dict(zip(lp.top_ids[b].tolist(), lp.top_values[b].tolist())))
            if int(tokens[b]) in stops:
                reason[row] = "stop"
        if all(r is not None for r in reason) or step + 1 == params.max_new_tokens:
            break
        keep = [b for b, row in enumerate(live) if reason[row] is None]
        if drop_finished and len(keep) < len(live):
            index = torch.tensor(keep, device=tokens.device)
            cache.k, cache.v, cache.key_mask = cache.k[:, index], cache.v[:, index], cache.key_mask[index]
            tokens, next_pos = tokens[index], next_pos[index]
            generators, live = [generators[b] for b in keep], [live[b] for b in keep]
        logits = model(tokens.view(-1, 1), positions=next_pos + step, kv_cache=cache, start_pos=width + step)[:, -1]
    return [Completion(rows[i], out[i], reason[i] or "length",
                       logps[i] if params.logprobs is not None else None,
                       tops[i] if params.logprobs else None) for i in range(batch)]


@torch.inference_mode()
def teacher_forced_logprobs(model: torch.nn.Module, sequences: Sequence[Sequence[int]] | torch.Tensor,
                            temperature: float = 1.0) -> list[torch.Tensor]:
    """Per sequence, float32 `log_softmax(logits / temperature)` [len - 1, V] predicting each token after
    the first (the full distributions); sequences of different lengths run as one ragged batch."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = token_rows(sequences)
    ids, logits, _, _ = ragged_prefill(model, rows)
    logp = (logits.float() / temperature).log_softmax(-1)
    width = ids.shape[1]
    return [logp[i, width - len(r) : width - 1] for i, r in enumerate(rows)]


def score(model: torch.nn.Module, sequences: Sequence[Sequence[int]] | torch.Tensor,
          temperature: float = 1.0) -> list[list[float]]:
    """Teacher-forced float32 logprobs of every token after the first of each sequence (what a
    trainer recomputes): `log_softmax(logits / temperature)` at the position before it. Sequences of
    different lengths run as one left-padded batch; entry i has `len(sequences[i]) - 1` values."""
    rows = token_rows(sequences)
    logps = teacher_forced_logprobs(model, rows, temperature)
    return [logp.gather(-1, torch.tensor(r[1:], device=logp.device)[:, None]).squeeze(-1).tolist()
            for logp, r in zip(logps, rows)]
