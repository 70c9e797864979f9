"""The mismatch probe (`rl/mismatch.py`): its KL against torch's own kl_div, identical policies give exactly
0 / 1, the probe's teacher-forced logprobs equal the sampler's own, and fp8 runs give small, sane numbers.
The command line over it: tests/cli/test_mismatch.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_cases import CASES, make_checkpoint

from streamquant import load_model
from streamquant.inference.generation import generate_sequences
from streamquant.rl.mismatch import compare, completion_logprobs, mismatch
from streamquant.inference.sampling import SamplingParams


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path_factory.mktemp("mm"))


def test_compare_against_kl_div_and_identity():
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(5, 11, generator=g).log_softmax(-1) for _ in range(3)]
    q = [x + 0.1 * torch.randn(x.shape, generator=g) for x in p]
    q = [x.log_softmax(-1) for x in q]
    completions = [[1, 2, 3, 4, 5], [0, 0, 10, 9, 8], [7, 7, 7, 7, 7]]
    got = compare(p, q, completions)
    want = F.kl_div(torch.cat(q), torch.cat(p), log_target=True, reduction="none").sum(-1)
    assert got["kl_mean"] == pytest.approx(float(want.mean()), rel=1e-5) and got["tokens"] == 15
    same = compare(p, p, completions)
    assert same["kl_mean"] == 0 and same["ratio_p50"] == 1 and same["ratio_share_outside"] == 0
    assert same["top1_agreement"] == 1 and same["abs_logprob_diff_mean"] == 0


def test_probe_logprobs_are_the_samplers_and_numbers_are_sane(llama):
    model = load_model(llama, quantization="fp8", dtype="float32")
    prompts = [[5, 9, 13, 2], [3, 8]]
    params = SamplingParams(temperature=0.8, max_new_tokens=5, seed=1, stop_token_ids=(), logprobs=0)
    sequences = generate_sequences(model, prompts, params)
    forced = completion_logprobs(model, [s.prompt_ids for s in sequences], [s.completion_ids for s in sequences], 0.8)
    for s, logp in zip(sequences, forced):
        teacher = logp.gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1)
        assert torch.allclose(teacher, torch.tensor(s.logprobs), atol=1e-4)
    result = mismatch(llama, ["fp8-block"], prompts=prompts, params=params, dtype="float32")
    assert set(result["runs"]) == {"fp8-block", "fp8-block+weight-only"}
    for run in result["runs"].values():
        assert run["tokens"] == 10 and 0 <= run["kl_mean"] < 0.05 and run["top1_agreement"] >= 0.8
        assert run["ratio_p1"] <= run["ratio_p50"] <= run["ratio_p99"]
