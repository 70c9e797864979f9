"""checkpoint.synthetic: HF-exact names and shapes, determinism, sharding, and the spec-keyed cache."""

import dataclasses
import json
import os

import pytest
import safetensors
import torch
import transformers

from streamquant.api import load_model
from streamquant.checkpoint.reader import checkpoint_files, iterate_weights, load_hf_config
from streamquant.checkpoint.synthetic import (
    BENCH_SPEC,
    DEEPSEEK_V3_3LAYER_SPEC,
    DEMO_SPEC,
    MARKER_FILE,
    TINY_SPEC,
    SyntheticSpec,
    default_cache_dir,
    ensure_synthetic_checkpoint,
    tensor_shapes,
    total_bytes,
    write_synthetic_checkpoint,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", TINY_SPEC)


def _hf_model(spec: SyntheticSpec) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        tie_word_embeddings=spec.tie_word_embeddings)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_strictly_and_runs(tmp_path, tied):
    spec = dataclasses.replace(TINY_SPEC, tie_word_embeddings=tied)
    path = write_synthetic_checkpoint(tmp_path / "ckpt", spec)
    model, info = transformers.LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected or mismatched
    assert model.dtype == torch.bfloat16
    ckpt = dict(iterate_weights(path))
    state = model.state_dict()
    assert ("lm_head.weight" in ckpt) is not tied
    for name, tensor in ckpt.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, spec.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 7, spec.vocab_size)
    assert torch.isfinite(logits).all()


def test_names_and_shapes_match_transformers_model(tiny):
    expected = {n: tuple(t.shape) for n, t in _hf_model(TINY_SPEC).state_dict().items()}
    assert tensor_shapes(TINY_SPEC) == expected
    assert {n: tuple(t.shape) for n, t in iterate_weights(tiny)} == expected


def test_config_round_trips(tiny):
    config = load_hf_config(tiny)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 128, 256)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.vocab_size, config.max_position_embeddings) == (512, 256)
    assert config.dtype == torch.bfloat16 and config.tie_word_embeddings is False


def test_iterate_weights_every_name_once_in_deterministic_order(tiny):
    names = [n for n, _ in iterate_weights(tiny)]
    assert len(names) == len(set(names)) == len(tensor_shapes(TINY_SPEC))
    assert names == [n for n, _ in iterate_weights(tiny)]
    per_file = []
    for file in checkpoint_files(tiny):
        with safetensors.safe_open(file, framework="pt") as handle:
            per_file += sorted(handle.keys())
    assert names == per_file


def test_index_weight_map_matches_shard_files(tiny):
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    count = len(files)
    assert count > 1  # TINY_SPEC is sharded on purpose
    assert files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for file in files:
        with safetensors.safe_open(tiny / file, framework="pt") as handle:
            assert set(handle.keys()) == {n for n, f in index["weight_map"].items() if f == file}
        assert (tiny / file).stat().st_size <= TINY_SPEC.max_shard_bytes + 4096  # + header
    assert index["metadata"]["total_size"] == sum(t.nbytes for _, t in iterate_weights(tiny))
    assert index["metadata"]["total_size"] == total_bytes(TINY_SPEC)


def test_values_deterministic_and_independent_of_sharding(tiny, tmp_path):
    unsharded = dataclasses.replace(TINY_SPEC, max_shard_bytes=2**40)
    one_shard = write_synthetic_checkpoint(tmp_path / "one", unsharded)
    reseeded = write_synthetic_checkpoint(tmp_path / "seed1", dataclasses.replace(TINY_SPEC, seed=1))
    assert len(checkpoint_files(one_shard)) == 1
    same, other = dict(iterate_weights(one_shard)), dict(iterate_weights(reseeded))
    for name, tensor in iterate_weights(tiny):
        torch.testing.assert_close(same[name], tensor, rtol=0, atol=0)
        assert not torch.equal(other[name], tensor)


def test_weight_scale_is_realistic(tiny):
    weights = dict(iterate_weights(tiny))
    q = weights["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.mean()) < 2e-3 and 0.018 < q.std() < 0.022
    norm = weights["model.layers.1.input_layernorm.weight"].float()
    assert abs(norm.mean() - 1) < 0.01 and 0 < norm.std() < 0.05


def test_ensure_reuses_then_regenerates(tmp_path):
    first = ensure_synthetic_checkpoint(tmp_path, TINY_SPEC)
    assert first.parent == tmp_path
    shard = checkpoint_files(first)[0]
    os.utime(shard, ns=(1_000_000_000, 1_000_000_000))  # a sentinel mtime a rewrite would change
    assert ensure_synthetic_checkpoint(tmp_path, TINY_SPEC) == first
    assert shard.stat().st_mtime_ns == 1_000_000_000

    (first / MARKER_FILE).unlink()  # as if a writer died before finishing
    assert ensure_synthetic_checkpoint(tmp_path, TINY_SPEC) == first
    assert shard.stat().st_mtime_ns != 1_000_000_000 and (first / MARKER_FILE).is_file()

    os.utime(shard, ns=(1_000_000_000, 1_000_000_000))
    with open(shard, "r+b") as handle:
        handle.truncate(100)  # a damaged shard is noticed through the recorded sizes
    ensure_synthetic_checkpoint(tmp_path, TINY_SPEC)
    assert shard.stat().st_mtime_ns != 1_000_000_000
    assert len(dict(iterate_weights(first))) == len(tensor_shapes(TINY_SPEC))
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging directories left


def test_ensure_keys_by_spec(tmp_path):
    a = ensure_synthetic_checkpoint(tmp_path, TINY_SPEC)
    b = ensure_synthetic_checkpoint(tmp_path, dataclasses.replace(TINY_SPEC, seed=3))
    assert a != b and a.is_dir() and b.is_dir()


def test_write_refuses_existing_directory(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        write_synthetic_checkpoint(tmp_path / "taken", TINY_SPEC)


def test_presets_have_the_promised_sizes():
    assert 300e6 <= total_bytes(DEMO_SPEC) <= 450e6
    assert BENCH_SPEC.num_layers >= 24 and 0.9e9 <= total_bytes(BENCH_SPEC) <= 1.2e9
    assert total_bytes(TINY_SPEC) < 4e6
    assert DEMO_SPEC.dtype == BENCH_SPEC.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [
    {"num_heads": 5}, {"num_kv_heads": 3}, {"num_layers": 0}, {"dtype": torch.int8},
    {"architecture": "GPT2LMHeadModel"}, {"max_shard_bytes": 0},
])
def test_spec_validation(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(TINY_SPEC, **bad)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMQUANT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("STREAMQUANT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "streamquant"


def test_deepseek_layout_is_transformers_checkpoint_layout(tmp_path):
    """Names and shapes as transformers' own save_pretrained writes them (per-expert names), and streamquant
    loads it strictly; the benchmark preset has DeepSeek-V3's layer shapes."""
    extra = dict(DEEPSEEK_V3_3LAYER_SPEC.extra_config, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16)
    spec = dataclasses.replace(DEEPSEEK_V3_3LAYER_SPEC, hidden_size=32, intermediate_size=48, num_heads=4,
                               num_kv_heads=4, vocab_size=64, extra_config=tuple(sorted(extra.items())))
    path = write_synthetic_checkpoint(tmp_path / "ckpt", spec)
    transformers.DeepseekV3ForCausalLM(load_hf_config(path)).save_pretrained(tmp_path / "hf")
    expected = {n: tuple(t.shape) for n, t in iterate_weights(tmp_path / "hf")}
    assert tensor_shapes(spec) == expected == {n: tuple(t.shape) for n, t in iterate_weights(path)}
    assert "model.layers.2.mlp.experts.15.up_proj.weight" in expected
    model = load_model(path, quantization="fp8-block")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
    assert 5.5e9 <= total_bytes(DEEPSEEK_V3_3LAYER_SPEC) <= 6.0e9
    assert tensor_shapes(DEEPSEEK_V3_3LAYER_SPEC)["model.layers.1.self_attn.kv_b_proj.weight"] == (128 * 256, 512)
