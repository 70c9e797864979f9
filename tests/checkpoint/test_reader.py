"""checkpoint.reader: file choice and order, lazy iteration, config parsing and clear errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from streamquant.checkpoint.reader import (
    CheckpointError,
    checkpoint_bytes,
    checkpoint_files,
    iterate_weights,
    load_hf_config,
    resolve_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tensors(seed: int, names) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(3, 2 + i, generator=gen) for i, n in enumerate(names)}


def _write_config(directory: Path) -> None:
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=16)
    config.save_pretrained(directory)


def _write_sharded(directory: Path, shards: dict[str, dict[str, torch.Tensor]], index: str, save) -> None:
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    for file, tensors in shards.items():
        save(tensors, directory / file)
    # reversed order in the index: the reader must order shards by file name, not index order
    weight_map = dict(reversed(list(weight_map.items())))
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _assert_weights(path, expected: list[tuple[str, torch.Tensor]]) -> None:
    got = list(iterate_weights(path))
    assert [n for n, _ in got] == [n for n, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_safetensors_file(tmp_path):
    tensors = _tensors(0, ["z.weight", "a.weight", "m.bias"])
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    _write_config(tmp_path)
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]
    _assert_weights(tmp_path, sorted(tensors.items()))
    assert checkpoint_bytes(tmp_path) == (tmp_path / "model.safetensors").stat().st_size


def test_sharded_safetensors_follow_index_in_file_name_order(tmp_path):
    shard_a = _tensors(1, ["layers.1.w", "layers.0.w"])
    shard_b = _tensors(2, ["embed.w"])
    shards = {"model-00001-of-00002.safetensors": shard_a, "model-00002-of-00002.safetensors": shard_b}
    _write_sharded(tmp_path, shards, "model.safetensors.index.json", safetensors.torch.save_file)
    (tmp_path / "stray.safetensors").write_bytes(b"not listed in the index, so never read")
    assert checkpoint_files(tmp_path) == [tmp_path / f for f in shards]
    _assert_weights(tmp_path, sorted(shard_a.items()) + sorted(shard_b.items()))
    assert checkpoint_bytes(tmp_path) == sum((tmp_path / f).stat().st_size for f in shards)


def test_loose_safetensors_without_index_are_sorted(tmp_path):
    for file, seed in (("b.safetensors", 3), ("a.safetensors", 4)):
        safetensors.torch.save_file(_tensors(seed, [f"{file}.x"]), tmp_path / file)
    assert checkpoint_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]


def test_bin_fallback_single_file(tmp_path):
    tensors = _tensors(5, ["q", "b", "k"])
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    assert checkpoint_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    _assert_weights(tmp_path, sorted(tensors.items()))


def test_bin_fallback_sharded(tmp_path):
    shards = {"pytorch_model-00002-of-00002.bin": _tensors(6, ["y"]),
              "pytorch_model-00001-of-00002.bin": _tensors(7, ["x", "w"])}
    _write_sharded(tmp_path, shards, "pytorch_model.bin.index.json", torch.save)
    assert [p.name for p in checkpoint_files(tmp_path)] == sorted(shards)
    expected = [(n, t) for f in sorted(shards) for n, t in sorted(shards[f].items())]
    _assert_weights(tmp_path, expected)


def test_safetensors_preferred_over_bin(tmp_path):
    safetensors.torch.save_file(_tensors(8, ["a"]), tmp_path / "model.safetensors")
    torch.save(_tensors(9, ["a"]), tmp_path / "pytorch_model.bin")
    assert checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_iteration_is_lazy_per_file(tmp_path):
    shards = {"model-00001-of-00002.safetensors": _tensors(10, ["a"]),
              "model-00002-of-00002.safetensors": _tensors(11, ["b"])}
    _write_sharded(tmp_path, shards, "model.safetensors.index.json", safetensors.torch.save_file)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"corrupt")
    weights = iterate_weights(tmp_path)
    assert next(weights)[0] == "a"  # the corrupt second shard has not been opened yet
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        next(weights)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_iteration_is_zero_copy_and_copy_on_write(tmp_path):
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(_tensors(12, ["a", "b"]), file)
    _, tensor = next(iterate_weights(tmp_path))
    mapped = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if int(line.split("-")[0], 16) <= tensor.data_ptr() < int(line.split()[0].split("-")[1], 16)]
    assert mapped == [str(file)]  # the tensor's memory is a mapping of the file itself
    tensor.add_(1.0)  # private mapping: the file must not change
    torch.testing.assert_close(dict(iterate_weights(tmp_path))["a"], _tensors(12, ["a", "b"])["a"],
                               rtol=0, atol=0)


def test_index_naming_a_missing_shard(tmp_path):
    shards = {"model-00001-of-00002.safetensors": _tensors(15, ["a"]),
              "model-00002-of-00002.safetensors": _tensors(16, ["b"])}
    _write_sharded(tmp_path, shards, "model.safetensors.index.json", safetensors.torch.save_file)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        checkpoint_files(tmp_path)


def test_malformed_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="malformed index"):
        checkpoint_files(tmp_path)


def test_no_weights_lists_directory_contents(tmp_path):
    _write_config(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="config.json, tokenizer.json"):
        checkpoint_files(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="<empty>"):
        list(iterate_weights(empty))


def test_local_directory_without_config(tmp_path):
    safetensors.torch.save_file(_tensors(13, ["a"]), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*config.json"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_config(tmp_path)
    with pytest.raises(CheckpointError, match="revision"):
        resolve_checkpoint(tmp_path, revision="main")


def test_load_hf_config(tmp_path):
    _write_config(tmp_path)
    config = load_hf_config(tmp_path)
    assert isinstance(config, transformers.LlamaConfig)
    assert (config.hidden_size, config.num_key_value_heads, config.vocab_size) == (8, 1, 16)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed"):
        load_hf_config(tmp_path)


def _resolve_in_subprocess(hf_home: Path, model_ids: list[str]) -> list[dict]:
    """huggingface_hub reads HF_HUB_OFFLINE / HF_HOME at import, so a fresh process sees them."""
    script = textwrap.dedent(f"""
        import json
        from streamquant.checkpoint.reader import CheckpointError, resolve_checkpoint
        for model_id in {model_ids!r}:
            try:
                print(json.dumps({{"path": str(resolve_checkpoint(model_id))}}))
            except CheckpointError as exc:
                print(json.dumps({{"error": str(exc)}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO_ROOT)}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(model_ids):]]


def test_hub_id_offline(tmp_path):
    """Offline: an uncached id is a clear error; a cached snapshot (hub cache layout) is found."""
    hf_home = tmp_path / "hf_home"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / "models--cached-org--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _write_config(snapshot)
    safetensors.torch.save_file(_tensors(14, ["a"]), snapshot / "model.safetensors")

    missing, cached = _resolve_in_subprocess(hf_home, ["some-org/some-model", "cached-org/tiny"])
    assert "path" not in missing
    assert "'some-org/some-model' is not a local directory and could not be fetched" in missing["error"]
    assert "offline" in missing["error"] and "LocalEntryNotFoundError" in missing["error"]
    assert Path(cached["path"]).resolve() == snapshot.resolve()
