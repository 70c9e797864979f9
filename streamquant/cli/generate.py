"""`streamquant generate PATH`: load, then greedy tokens from --prompt-ids or sampled rollouts of every
prompt in --prompts FILE.jsonl (`cli/rollout.py`); and the two generation steps `demo` shares: the
request checked against the checkpoint's config before the load, and the generation after it.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from streamquant.checkpoint.reader import load_hf_config, resolve_checkpoint
from streamquant.cli.input import count, prompt_ids
from streamquant.cli.load import add_loading_flags, measured_load
from streamquant.cli.rollout import add_sampling_flags, prompts_as_batch, read_prompts, run_sequences, sampling_params
from streamquant.inference.generation import check_request, generate_with_logits


def add_generate_command(commands) -> None:
    gen = commands.add_parser("generate", help="load a checkpoint and generate: greedy from --prompt-ids, or sampled "
                                                "rollouts of every prompt in --prompts FILE.jsonl")
    gen.add_argument("path", help="checkpoint directory or Hugging Face hub id")
    gen.add_argument("--prompt-ids", type=prompt_ids, default=None, metavar="IDS",
                     help="prompt token ids, comma-separated (e.g. 1,2,3)")
    gen.add_argument("--max-new-tokens", type=count, required=True, metavar="N",
                     help="number of tokens to generate (prompt + N must fit the model's max_position_embeddings)")
    add_loading_flags(gen)
    add_sampling_flags(gen)


def generate_options(options: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`options` with the prompts of --prompts read (exactly one of --prompt-ids and --prompts)."""
    if (args.prompt_ids is None) == (args.prompts is None):
        raise ValueError("generate needs exactly one of --prompt-ids and --prompts")
    return {**options, "prompts": read_prompts(args.prompts) if args.prompts is not None else None}


def check_generation_request(options: dict[str, Any]) -> None:
    """Generation requests checked against the checkpoint's config before the (long) load."""
    config = load_hf_config(resolve_checkpoint(options["path"]))
    if options.get("prompts") is not None:
        sampling_params(options)  # bad sampling values are named before the load
        prompt = prompts_as_batch(options["prompts"])
    else:
        prompt = torch.tensor([options["prompt_ids"]], dtype=torch.long)
    check_request(config, prompt, options["max_new_tokens"])


def generation(model: torch.nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """The sampled sequences of --prompts, or the greedy tokens and last prompt logits of --prompt-ids."""
    if options.get("prompts") is not None:
        return {"sequences": run_sequences(model, options)}
    prompt = torch.tensor([options["prompt_ids"]], dtype=torch.long)
    out = generate_with_logits(model, prompt, options["max_new_tokens"])
    return {
        "prompt_ids": list(options["prompt_ids"]),
        "tokens": out.tokens[0, prompt.shape[1] :].tolist(),
        "last_logits": out.last_prompt_logits[0].tolist(),
    }


def run_generate(options: dict[str, Any]) -> dict[str, Any]:
    """`generate` in this process (or on this rank): the load measurements and the generation."""
    check_generation_request(options)
    model, result = measured_load(options)
    return {**result, **generation(model, options)}
