"""`streamquant generate --prompts FILE.jsonl`: sampled rollouts from the command line.

`FILE.jsonl` holds one JSON list of token ids per line (blank lines skipped). Every prompt gets `--n`
completions sampled with `--temperature` (default 0 here: greedy, as `generate` always was),
`--top-p`, `--top-k`, `--seed`, `--max-new-tokens`, `--logprobs`, `--stop-token-ids`; the result
lists every sequence in prompt order, the `n` completions of a prompt together:
`{"prompt_ids": [...], "completion_ids": [...], "logprobs": [...] | null, "finish_reason": "stop" | "length"}`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from streamquant.cli.input import count
from streamquant.inference.generation import generate_sequences, left_pad
from streamquant.inference.sampling import SamplingParams


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--prompts", type=Path, default=None, metavar="FILE.jsonl",
        help="sample completions of every prompt in FILE (one JSON list of token ids per line) instead of --prompt-ids")
    add("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample (with --prompts)")
    add("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    add("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    add("--seed", type=int, default=None, help="seed of the per-sequence generators (default: random)")
    add("--n", type=count, default=1, help="completions per prompt (default 1)")
    add("--logprobs", type=int, nargs="?", const=0, default=None, metavar="K",
        help="return each sampled token's logprob; with K > 0 also the K most likely tokens' (a bare --logprobs "
             "means 0, as vLLM's logprobs=0: the sampled token's only)")
    add("--stop-token-ids", type=lambda t: [int(x) for x in t.split(",") if x.strip()], default=None, metavar="IDS",
        help="comma-separated ids that end a sequence (default: the config's eos ids)")


def read_prompts(path: Path) -> list[list[int]]:
    """The prompts of a JSONL file; a line that is not a non-empty list of ints is named."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{path}:{number}: expected a non-empty JSON list of token ids, got {line.strip()[:80]}")
        prompts.append(ids)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def sampling_params(options: dict[str, Any]) -> SamplingParams:
    return SamplingParams(temperature=options["temperature"], top_p=options["top_p"], top_k=options["top_k"],
                          max_new_tokens=options["max_new_tokens"], seed=options["seed"], n=options["n"],
                          logprobs=options["logprobs"],
                          stop_token_ids=None if options["stop_token_ids"] is None else tuple(options["stop_token_ids"]))


def prompts_as_batch(prompts: list[list[int]]) -> torch.Tensor:
    """The left-padded ids of the prompts (what the request checks read)."""
    return left_pad(prompts)[0]


def run_sequences(model: torch.nn.Module, options: dict[str, Any]) -> list[dict]:
    return [asdict(c) for c in generate_sequences(model, options["prompts"], sampling_params(options))]
