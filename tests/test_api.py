"""load_model and generate against transformers' own Llama (saved with save_pretrained, float32). The
validation of what a load is asked for (dtypes, schemes, options): tests/test_config.py."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import transformers

from streamquant.api import LoadReport, load_model
from streamquant.inference.generation import generate, generate_with_logits
from streamquant.loading.errors import UnexpectedWeightError


def tiny_llama(directory, *, tie: bool = False) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(directory)
    return model


def unique_buffer_bytes(model) -> int:
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in model.buffers()}
    return sum(storages.values())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return directory, tiny_llama(directory)


@pytest.fixture(scope="module")
def ours(llama):
    return load_model(llama[0], dtype=torch.float32)


PROMPT = torch.tensor([[1, 5, 9, 3, 7], [4, 4, 8, 0, 2]])


def test_logits_match_transformers(llama, ours):
    _, hf = llama
    with torch.no_grad():
        expected = hf(PROMPT).logits
    actual = ours(PROMPT)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert not ours.training


def test_load_report(llama, ours):
    directory, hf = llama
    report = ours.load_report
    assert isinstance(report, LoadReport)
    assert report.checkpoint_bytes == sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    param_bytes = sum(p.numel() for p in hf.parameters()) * 4
    assert report.model_bytes == param_bytes + unique_buffer_bytes(ours)
    assert report.load_seconds > 0
    with pytest.raises(AttributeError):
        report.model_bytes = 0  # frozen


def test_tied_embeddings_counted_once(tmp_path):
    hf = tiny_llama(tmp_path, tie=True)
    model = load_model(tmp_path, dtype=torch.float32)
    expected = sum(p.numel() for p in hf.parameters()) * 4 + unique_buffer_bytes(model)  # HF counts the tie once
    assert model.load_report.model_bytes == expected
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT), hf(PROMPT).logits, atol=1e-5, rtol=1e-5)


def test_package_exports_the_api():
    import streamquant
    from streamquant import api, memory
    from streamquant.inference import generation
    from streamquant.parallel import launch

    assert streamquant.load_model is api.load_model and streamquant.generate is generation.generate
    assert streamquant.LaunchError is launch.LaunchError and streamquant.PeakMemorySampler is memory.PeakMemorySampler
    with pytest.raises(AttributeError):
        streamquant.no_such_name


def test_strict_flag_passed_through(tmp_path):
    tiny_llama(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    tensors["model.extra.weight"] = torch.zeros(3)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(UnexpectedWeightError, match="model.extra.weight"):
        load_model(tmp_path, dtype=torch.float32)
    model = load_model(tmp_path, dtype=torch.float32, strict=False)
    assert model.load_report.model_bytes > 0


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        logits = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_equals_full_recompute(ours):
    with torch.inference_mode():
        expected = greedy_without_cache(ours, PROMPT, 7)
    assert torch.equal(generate(ours, PROMPT, 7), expected)


def test_generate_equals_transformers(llama, ours):
    _, hf = llama
    prompt = PROMPT[:1]
    expected = hf.generate(prompt, max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert expected.shape == (1, prompt.shape[1] + 9)
    assert torch.equal(generate(ours, prompt, 9), expected)


def test_generate_with_logits(ours):
    out = generate_with_logits(ours, PROMPT, 3)
    assert out.tokens.shape == (2, PROMPT.shape[1] + 3) and torch.equal(out.tokens[:, : PROMPT.shape[1]], PROMPT)
    with torch.inference_mode():
        torch.testing.assert_close(out.last_prompt_logits, ours(PROMPT)[:, -1], atol=1e-6, rtol=0)


def test_generate_edge_cases(ours):
    assert torch.equal(generate(ours, PROMPT, 0), PROMPT)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, PROMPT, -1)
    with pytest.raises(ValueError, match="length >= 1"):
        generate(ours, PROMPT[:, :0], 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_and_generate_on_cuda(llama, ours):
    model = load_model(llama[0], dtype=torch.float32, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    with torch.inference_mode():
        torch.testing.assert_close(model(PROMPT.cuda()).cpu(), ours(PROMPT), atol=1e-4, rtol=1e-4)
    assert torch.equal(generate(model, PROMPT, 5), generate(ours, PROMPT, 5))
