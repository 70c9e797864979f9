"""Shared helpers for the command-line tests: the prompt of the generation tests, the `generate` command
line, and the check of its result against transformers' (the `reference` fixture of conftest.py)."""

from __future__ import annotations

import torch

PROMPT = [3, 17, 42, 9, 100]
NEW_TOKENS = 6


def generate_args(checkpoint, json_file, *extra) -> list[str]:
    prompt = ",".join(map(str, PROMPT))
    return ["generate", str(checkpoint), "--prompt-ids", prompt, "--max-new-tokens", str(NEW_TOKENS),
            "--dtype", "fp32", "--json", str(json_file), *extra]


def check_generation(result: dict, reference: dict) -> None:
    assert result["tokens"] == reference["tokens"]
    torch.testing.assert_close(torch.tensor(result["last_logits"]), reference["last_logits"], atol=1e-4, rtol=1e-4)
