"""generate(model, prompts, SamplingParams) / generate_sequences: ragged prompts (left-padded, key mask) greedy-equal to transformers' own
left-padded `generate`; returned logprobs equal transformers' teacher-forced ones (fp32, 1e-4);
stop tokens end each sequence on its own; `n` completions per prompt with a fixed seed reproducible."""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_cases import CASES, make_checkpoint

from streamquant import generate, load_model
from streamquant.inference.generation import generate_sequences
from streamquant.inference.sampling import SamplingParams

PROMPTS = [[5, 9, 13, 2, 40, 7], [3, 8], [11, 12, 60, 1]]
NEW = 6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {c.name: make_checkpoint(c, root) for c in CASES
            if c.name in ("llama", "qwen3", "qwen2moe", "opt", "deepseek-v3")}


def hf_greedy(path, prompts, new):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0)
    return hf, out[:, width:].tolist()


def hf_logprobs(hf, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = hf(input_ids=ids).logits.float().log_softmax(-1)[0]
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion)]


@pytest.mark.parametrize("case", ["llama", "qwen3", "qwen2moe", "opt", "deepseek-v3"])  # deepseek: the latent cache
def test_ragged_greedy_equals_transformers_and_logprobs_match(checkpoints, case):
    model = load_model(checkpoints[case], dtype="float32")
    got = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=NEW, stop_token_ids=(), logprobs=0))
    hf, want = hf_greedy(checkpoints[case], PROMPTS, NEW)
    assert [c.completion_ids for c in got] == want
    assert all(c.finish_reason == "length" and c.prompt_ids == p for c, p in zip(got, PROMPTS))
    for c in got:
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(hf_logprobs(hf, c.prompt_ids, c.completion_ids)),
                              atol=1e-4, rtol=0)


def test_stop_tokens_end_each_sequence_and_seeds_reproduce(checkpoints):
    model = load_model(checkpoints["llama"], dtype="float32")
    greedy = generate_sequences(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=NEW, stop_token_ids=()))
    stop = greedy[1].completion_ids[2]  # the third token of the second prompt's greedy completion
    stopped = generate_sequences(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=NEW,
                                                                stop_token_ids=(stop,)))
    for full, cut in zip(greedy, stopped):
        if stop in full.completion_ids:
            end = full.completion_ids.index(stop) + 1
            assert cut.completion_ids == full.completion_ids[:end] and cut.finish_reason == "stop"
        else:
            assert cut.completion_ids == full.completion_ids and cut.finish_reason == "length"
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=NEW, seed=3, n=2, stop_token_ids=(),
                            logprobs=2)
    a, b = generate_sequences(model, PROMPTS, params), generate_sequences(model, PROMPTS, params)
    assert len(a) == 6 and [c.completion_ids for c in a] == [c.completion_ids for c in b]
    assert a[0].prompt_ids == a[1].prompt_ids == PROMPTS[0] and len(a[0].top_logprobs[0]) == 2
    assert all(lp <= 0 for c in a for lp in c.logprobs)


def test_score_is_teacher_forced_logprobs_of_ragged_sequences(checkpoints):
    from streamquant.inference.generation import score

    model = load_model(checkpoints["qwen2moe"], dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["qwen2moe"], dtype=torch.float32)
    sequences = [[5, 9, 13, 2, 40, 7, 8], [3, 8], [11, 12, 60, 1, 4]]
    got = score(model, sequences)
    for seq, values in zip(sequences, got):
        want = hf_logprobs(hf, seq[:1], seq[1:])
        assert len(values) == len(seq) - 1
        assert torch.allclose(torch.tensor(values), torch.tensor(want), atol=1e-4, rtol=0)


SLIDING = [  # (name, config class, model class, window settings): windows shorter than the sequences
    ("mistral-window", "MistralConfig", "MistralForCausalLM", dict(sliding_window=4, num_key_value_heads=1)),
    ("qwen2-window", "Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=3,
                                                               max_window_layers=1)),
    ("qwen3-window", "Qwen3Config", "Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=5,
                                                               max_window_layers=0, head_dim=16)),
]


@pytest.mark.parametrize("name,config_cls,model_cls,window", SLIDING, ids=[s[0] for s in SLIDING])
def test_sliding_window_matches_transformers_beyond_the_window(tmp_path, name, config_cls, model_cls, window):
    from hf_cases import _case

    case = _case(name, config_cls, model_cls, **window)
    path = make_checkpoint(case, tmp_path)
    model = load_model(path, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert any(layer.self_attn.attn.sliding_window for layer in model.model.layers)
    ids = torch.tensor([[5, 9, 13, 2, 40, 7, 8, 21, 30, 3, 17, 6]])
    with torch.no_grad():
        want = hf(input_ids=ids).logits.float()
    assert torch.allclose(model(ids), want, atol=1e-4, rtol=0)
    got = generate_sequences(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=()))
    assert [c.completion_ids for c in got] == hf_greedy(path, PROMPTS, 8)[1]


def test_dropping_finished_sequences_changes_no_sample(checkpoints):
    """Stop on the even ids: sequences end at different steps and leave the batch; every sample, logprob
    and finish reason is what the batch that keeps them computes."""
    model = load_model(checkpoints["qwen3"], dtype="float32")
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11, n=3, logprobs=0,
                            stop_token_ids=tuple(range(0, 97, 2)))
    dropped = generate_sequences(model, PROMPTS, params)
    kept = generate_sequences(model, PROMPTS, params, drop_finished=False)
    assert len({len(c.completion_ids) for c in dropped}) > 2  # they did stop at different steps
    assert [c.completion_ids for c in dropped] == [c.completion_ids for c in kept]
    assert [c.finish_reason for c in dropped] == [c.finish_reason for c in kept]
    for a, b in zip(dropped, kept):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_generate_forms(checkpoints):
    """The greedy form answers positionally and by keyword alike; a mixed or wrong call is a TypeError."""
    model = load_model(checkpoints["llama"], dtype="float32")
    ids = torch.tensor([PROMPTS[0]])
    greedy = generate(model, ids, max_new_tokens=3)
    assert torch.equal(generate(model, ids, 3), greedy) and greedy.shape == (1, len(PROMPTS[0]) + 3)
    sampled = generate(model, [PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=3, stop_token_ids=()))
    assert sampled[0].completion_ids == greedy[0, len(PROMPTS[0]):].tolist()
    for bad in (dict(sampling=3, max_new_tokens=3), dict(sampling="3"),
                dict(sampling=SamplingParams(max_new_tokens=3), max_new_tokens=3)):
        with pytest.raises(TypeError):
            generate(model, ids, **bad)
