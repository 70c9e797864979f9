"""inference/sampling.py: exact draws (a chi-square test with a stated false-failure rate), top-k / top-p sets
against a by-hand reference, seeded reproducibility independent of the batch, logprob modes."""

from __future__ import annotations

import math

import pytest
import torch

from streamquant.inference.sampling import SamplingParams, processed_logits, sample, sequence_generators, step_logprobs


def test_temperature_one_samples_match_the_distribution():
    """Pearson chi-square over 6 outcomes (5 dof) from 20,000 draws; the test fails when the p-value is
    below 1e-6, so a correct sampler fails with probability 1e-6 (and, seeded, never here)."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    logits = probs.log().unsqueeze(0)
    params = SamplingParams(temperature=1.0)
    (g,) = sequence_generators(1234, 1)
    draws = torch.stack([sample(logits, params, [g]) for _ in range(20_000)]).flatten()
    counts = torch.bincount(draws, minlength=6).double()
    expected = probs.double() * draws.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    p_value = float(torch.special.gammaincc(torch.tensor(2.5, dtype=torch.float64), torch.tensor(chi2 / 2)))
    assert p_value > 1e-6, (counts.tolist(), chi2)


def by_hand(logits: list[float], temperature: float, top_k: int, top_p: float) -> set[int]:
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    if top_k > 0:
        kth = scaled[order[top_k - 1]]
        order = [i for i in order if scaled[i] >= kth]
    z = sum(math.exp(scaled[i]) for i in order)
    kept, mass = [], 0.0
    for i in order:
        if kept and mass >= top_p:
            break
        kept.append(i)
        mass += math.exp(scaled[i]) / z
    return set(kept)


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (3, 1.0, 0.7), (0, 0.6, 1.0), (4, 0.8, 1.3),
                                                     (-1, 0.05, 2.0)])
def test_top_k_top_p_keep_the_reference_set(top_k, top_p, temperature):
    logits = [2.0, -1.0, 0.5, 1.5, 0.0, -3.0, 1.0]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    out = processed_logits(torch.tensor([logits]), params)[0]
    kept = {i for i in range(len(logits)) if out[i] > float("-inf")}
    assert kept == by_hand(logits, temperature, top_k, top_p)
    generators = sequence_generators(0, 1)
    assert {int(sample(torch.tensor([logits]), params, generators)) for _ in range(300)} <= kept


def test_seeded_samples_do_not_depend_on_the_batch():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.9, top_p=0.95)
    together = sample(logits, params, sequence_generators(7, 5))
    alone = [int(sample(logits[i : i + 1], params, [sequence_generators(7, 5)[i]])) for i in range(5)]
    assert together.tolist() == alone
    assert sample(logits, params, sequence_generators(7, 5)).tolist() == together.tolist()


def test_greedy_and_logprob_modes():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    greedy = SamplingParams(temperature=0, logprobs=2)
    token = sample(logits, greedy, sequence_generators(0, 1))
    assert token.tolist() == [1]
    lp = step_logprobs(logits, token, greedy)
    assert torch.allclose(lp.chosen, logits.log_softmax(-1)[:, 1]) and lp.top_ids.tolist() == [[1, 2]]
    params = SamplingParams(temperature=0.5, top_k=2)
    processed = step_logprobs(logits, torch.tensor([2]), params).chosen
    want = torch.tensor([2.0 / 0.5]) - torch.logsumexp(torch.tensor([3.0 / 0.5, 2.0 / 0.5]), 0)
    assert torch.allclose(processed, want)
    raw = step_logprobs(logits, torch.tensor([2]), SamplingParams(temperature=0.5, top_k=2, logprobs_mode="raw"))
    assert torch.allclose(raw.chosen, logits.log_softmax(-1)[:, 2])


def test_bad_parameters_are_named():
    for kwargs, message in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                            ({"n": 0}, "n must"), ({"logprobs": -1}, "logprobs must"),
                            ({"logprobs_mode": "logits"}, "logprobs_mode")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)
