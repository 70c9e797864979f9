"""The fp8-vs-bf16 policy mismatch probe: how far an fp8 rollout policy drifts from the bf16 trainer's.

`mismatch(path, schemes)` loads the checkpoint in bf16 (the trainer's view) and once per fp8 variant
(each scheme, dynamic activations and weight-only), samples rollouts with the fp8 model
(`generate_sequences`), then teacher-forces both models on those exact sequences and reports, over
every sampled completion token (at the sampling temperature):
  - per-token KL(bf16 || fp8) of the full next-token distributions: mean, p50, p99;
  - mean |logp_bf16(token) - logp_fp8(token)| of the sampled tokens;
  - the importance ratio exp(logp_bf16 - logp_fp8) of the sampled tokens: p1, p50, p99, and the share
    outside [1/2, 2] (the usual truncation bounds);
  - top-1 agreement of the two distributions.
The numbers RL users tune truncated importance sampling on; deterministic for a fixed `seed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from streamquant.api import load_model
from streamquant.inference.generation import generate_sequences, teacher_forced_logprobs
from streamquant.inference.sampling import SamplingParams

DEFAULT_PROMPTS = 8
DEFAULT_PROMPT_LENGTH = 16
RATIO_BOUNDS = (0.5, 2.0)


def default_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Fixed random prompts (a synthetic checkpoint's ids carry no meaning; real checkpoints take --prompts)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (DEFAULT_PROMPTS, DEFAULT_PROMPT_LENGTH), generator=g).tolist()


def completion_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                        temperature: float) -> list[torch.Tensor]:
    """Per sequence, float32 log-softmax(logits / temperature) [len(completion), V] at each completion token."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    logps = teacher_forced_logprobs(model, rows, temperature)
    return [logp[len(logp) - len(c):].cpu() for logp, c in zip(logps, completions)]


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if x.numel() else float("nan")


def compare(reference: list[torch.Tensor], rollout: list[torch.Tensor], completions: Sequence[Sequence[int]]) -> dict:
    """The probe's numbers (module docstring) from the two models' log-probs on the same tokens."""
    p, q = torch.cat(reference), torch.cat(rollout)
    tokens = torch.tensor([t for c in completions for t in c], dtype=torch.long)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0)
    lp, lq = p.gather(-1, tokens[:, None]).squeeze(-1), q.gather(-1, tokens[:, None]).squeeze(-1)
    ratio = (lp - lq).exp()
    low, high = RATIO_BOUNDS
    return {"tokens": int(tokens.numel()), "kl_mean": float(kl.mean()), "kl_p50": _quantile(kl, 0.5),
            "kl_p99": _quantile(kl, 0.99), "abs_logprob_diff_mean": float((lp - lq).abs().mean()),
            "ratio_p1": _quantile(ratio, 0.01), "ratio_p50": _quantile(ratio, 0.5), "ratio_p99": _quantile(ratio, 0.99),
            "ratio_share_outside": float(((ratio < low) | (ratio > high)).double().mean()),
            "top1_agreement": float((p.argmax(-1) == q.argmax(-1)).double().mean())}


def mismatch(path, schemes: Sequence[str] = ("fp8", "fp8-channel", "fp8-block"), *,
             prompts: Sequence[Sequence[int]] | None = None, params: SamplingParams | None = None,
             weight_only: bool = True, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
             progress: bool | None = None) -> dict:
    """{"runs": {name: numbers}} for every scheme (and "<scheme>+weight-only" with `weight_only`); `progress`:
    each load's bar (`load_model(progress=)`)."""
    params = params or SamplingParams(temperature=1.0, max_new_tokens=32, seed=0, stop_token_ids=())
    if params.greedy:
        raise ValueError("the probe samples: give a temperature > 0")
    reference = load_model(path, dtype=dtype, device=device, progress=progress)
    prompts = [list(p) for p in prompts] if prompts is not None else default_prompts(reference.config.vocab_size)
    variants = [(s, {}) for s in schemes] + ([(f"{s}+weight-only", {"activation_scheme": "none"}) for s in schemes]
                                             if weight_only else [])
    runs = {}
    for name, options in variants:
        model = load_model(path, quantization=name.split("+")[0], dtype=dtype, device=device, progress=progress,
                           **options)
        sequences = generate_sequences(model, prompts, params)
        used = [s.prompt_ids for s in sequences]
        completions = [s.completion_ids for s in sequences]
        runs[name] = compare(completion_logprobs(reference, used, completions, params.temperature),
                             completion_logprobs(model, used, completions, params.temperature), completions)
        del model
    return {"prompts": len(prompts), "temperature": params.temperature, "max_new_tokens": params.max_new_tokens,
            "seed": params.seed, "runs": runs}
