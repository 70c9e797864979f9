"""`streamquant generate --prompts FILE.jsonl` (`cli/rollout.py`): every prompt's sampled completions, with
their logprobs and finish reasons, are what `generate_sequences` gives with the same sampling flags; a
prompt file that is not lists of token ids is bad input (exit status 2)."""

from __future__ import annotations

import pytest

from streamquant import load_model
from streamquant.inference.generation import generate_sequences
from streamquant.inference.sampling import SamplingParams

from hf_cases import CASES, make_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    return {c.name: make_checkpoint(c, root) for c in CASES if c.name == "llama"}


@pytest.mark.parametrize(("flags", "want"), [([], None), (["--logprobs"], 0), (["--logprobs", "0"], 0),
                                             (["--logprobs", "3"], 3), (["--logprobs", "--n", "2"], 0)])
def test_logprobs_flag_bare_means_the_sampled_tokens(flags, want):
    """vLLM's logprobs=0: a bare --logprobs asks for the sampled token's logprob only."""
    from streamquant.cli.main import build_parser

    args = build_parser().parse_args(["generate", "ckpt", "--prompts", "p.jsonl", "--max-new-tokens", "2", *flags])
    assert args.logprobs == want


def test_cli_generate_prompts_jsonl(checkpoints, tmp_path):
    from streamquant.cli.main import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("[5, 9, 13]\n\n[3, 8]\n")
    out = tmp_path / "r.json"
    args = ["generate", str(checkpoints["llama"]), "--prompts", str(prompts), "--max-new-tokens", "4",
            "--temperature", "0.7", "--top-k", "20", "--seed", "5", "--n", "2", "--logprobs",  # bare: 0
            "--stop-token-ids", "", "--dtype", "float32", "--json", str(out)]
    assert main(args) == 0
    import json

    sequences = json.loads(out.read_text())["sequences"]
    assert [s["prompt_ids"] for s in sequences] == [[5, 9, 13]] * 2 + [[3, 8]] * 2
    model = load_model(checkpoints["llama"], dtype="float32")
    want = generate_sequences(model, [[5, 9, 13], [3, 8]], SamplingParams(
        temperature=0.7, top_k=20, seed=5, n=2, logprobs=0, max_new_tokens=4, stop_token_ids=()))
    assert [s["completion_ids"] for s in sequences] == [c.completion_ids for c in want]
    assert all(len(s["logprobs"]) == 4 and s["finish_reason"] == "length" for s in sequences)
    assert [s["logprobs"] for s in sequences] == [c.logprobs for c in want]
    prompts.write_text("[5, 9]\n[1.5]\n")
    assert main(args) == 2
