"""Fixtures of the command-line tests: a tiny synthetic checkpoint (TINY_SPEC, four shards) and what
transformers generates from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from streamquant.checkpoint.synthetic import TINY_SPEC, ensure_synthetic_checkpoint

from .helpers import NEW_TOKENS, PROMPT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return ensure_synthetic_checkpoint(tmp_path_factory.mktemp("cache"), TINY_SPEC)


@pytest.fixture(scope="module")
def reference(checkpoint) -> dict:
    """transformers' greedy tokens and last-prompt-position logits, in float32."""
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = hf(prompt).logits[0, -1]
        out = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return {"model": hf, "tokens": out[0, len(PROMPT) :].tolist(), "last_logits": logits}
