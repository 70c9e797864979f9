"""Logits -> next tokens and their logprobs: the sampling parameters and the pure math of one step.

`SamplingParams` uses vLLM's names: `temperature` (0 = greedy), `top_p`, `top_k` (0 or -1: off),
`max_new_tokens`, `stop_token_ids` (None: the model config's eos ids), `seed`, `n` (completions per
prompt), `logprobs` (None: none; 0: the sampled token's; k: also the k most likely tokens') and
`logprobs_mode`:
  - "processed" (default, what an RL importance ratio needs): log-probabilities under the
    distribution the token was actually drawn from: logits / temperature, tokens outside top-k /
    top-p removed, renormalized. A greedy step (temperature 0) reports the raw log-softmax.
  - "raw": log-softmax of the model's raw logits (vLLM's default), whatever the sampling did.
All logprobs are float32, from float32 logits.

Sampling draws, for each sequence, from that sequence's own `torch.Generator` (seeded from `seed`
and the sequence's index in the request), with the exponential race (`argmax p_i / E_i`, `E_i ~
Exp(1)`: an exact draw from `p`); so a fixed seed gives the same samples whatever the batch
composition or the tensor-parallel size (every rank sees the same gathered logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class LogprobsMode(str, Enum):
    PROCESSED = "processed"
    RAW = "raw"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    logprobs_mode: LogprobsMode = LogprobsMode.PROCESSED

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1: off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an int >= 0, got {self.logprobs!r}")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        try:
            object.__setattr__(self, "logprobs_mode", LogprobsMode(self.logprobs_mode))
        except ValueError:
            raise ValueError(f"logprobs_mode must be 'processed' or 'raw', got {self.logprobs_mode!r}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sequence_generators(seed: int | None, count: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sequence: sequence i of a request seeded `seed * 1_000_003 + i` (a fresh
    random seed when `seed` is None), so its draws never depend on the other sequences."""
    base = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
    return [torch.Generator(device=device).manual_seed(base * 1_000_003 + i) for i in range(count)]


def processed_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 [B, V]: logits / temperature with everything outside top-k and top-p set to -inf.

    top-k keeps the k largest (ties at the k-th value all kept); top-p keeps the smallest set of
    most likely tokens whose probability reaches `top_p` (the most likely token always)."""
    out = logits.float()
    if params.greedy:
        return out
    out = out / params.temperature
    if params.top_k > 0 and params.top_k < out.shape[-1]:
        kth = out.topk(params.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Next token ids [B] (long) from logits [B, V]: argmax when greedy, else an exact draw from the
    processed distribution with row b's noise from `generators[b]`."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = processed_logits(logits, params).softmax(dim=-1)
    noise = torch.stack([torch.empty(probs.shape[-1], device=probs.device).exponential_(generator=g)
                         for g in generators])
    return (probs / noise).argmax(dim=-1)


@dataclass(frozen=True)
class StepLogprobs:
    """Logprobs of one step: the chosen tokens' [B] and (when asked) the top-k [B, k] ids and values."""

    chosen: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_values: torch.Tensor | None = None


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> StepLogprobs:
    """float32 logprobs of `tokens` under the distribution `params.logprobs_mode` names (module doc)."""
    source = logits.float() if params.logprobs_mode is LogprobsMode.RAW else processed_logits(logits, params)
    logp = source.log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens.view(-1, 1)).squeeze(-1)
    if not params.logprobs:
        return StepLogprobs(chosen)
    top = logp.topk(min(params.logprobs, logp.shape[-1]), dim=-1)
    return StepLogprobs(chosen, top.indices, top.values)
