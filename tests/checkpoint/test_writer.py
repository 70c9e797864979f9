"""checkpoint.writer: shard plans, shards written tensor by tensor at planned offsets (read back by the
`safetensors` library, bitwise), the index, and the all-or-nothing staging directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from streamquant.checkpoint.writer import (
    INDEX_FILE,
    ShardFiles,
    TensorSpec,
    check_destination,
    create_shard,
    plan_shards,
    publish,
    shard_name,
    staging_directory,
    write_index,
)


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, t.dtype, tuple(t.shape))


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` in row-major order (NaN-safe, any dtype)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_plan_packs_groups_greedily_and_never_splits_one():
    a, b, c, d = (TensorSpec(n, torch.uint8, (size,)) for n, size in (("a", 40), ("b", 30), ("c", 100), ("d", 10)))
    plan = plan_shards([[a], [b, TensorSpec("b_scale", torch.float32, (2,))], [c], [d]], max_shard_bytes=80)
    assert [[[t.name for t in g] for g in shard] for shard in plan] == [[["a"], ["b", "b_scale"]], [["c"]], [["d"]]]
    assert plan_shards([], 10) == []
    with pytest.raises(ValueError, match="max_shard_bytes must be positive"):
        plan_shards([[a]], 0)
    assert shard_name(0, 3) == "model-00001-of-00003.safetensors"


def test_shards_written_in_any_order_read_back_bitwise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(7, 5, generator=gen).bfloat16().t(),  # a strided view
        "codes": torch.randn(3, 16, generator=gen).to(torch.float8_e4m3fn),
        "scale": torch.rand(3, 1, generator=gen),
        "ids": torch.randint(-9, 9, (4,), generator=gen),
        "mask": torch.rand(6, generator=gen) > 0.5,
        "half": torch.randn(1, 3, generator=gen).half(),
    }
    shards = [[spec_of(n, tensors[n]) for n in ("w", "codes", "scale")], [spec_of(n, tensors[n]) for n in ("ids", "mask", "half")]]
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    offsets = {}
    for file, specs in zip(names, shards):
        offsets.update({n: (tmp_path / file, o) for n, o in create_shard(tmp_path / file, specs).items()})
    files = ShardFiles(offsets)
    for spec in reversed([s for specs in shards for s in specs]):  # not in file order
        files.write(spec, tensors[spec.name])
    files.close()
    write_index(tmp_path, shards, names)
    for file, specs in zip(names, shards):
        with safe_open(tmp_path / file, "pt") as handle:
            assert set(handle.keys()) == {s.name for s in specs} and handle.metadata() == {"format": "pt"}
            for spec in specs:
                got, want = handle.get_tensor(spec.name), tensors[spec.name]
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(raw(got), raw(want)), spec.name
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == {s.name: f for f, specs in zip(names, shards) for s in specs}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_a_tensor_unlike_its_plan_or_dtype_is_refused(tmp_path):
    spec = TensorSpec("x", torch.float32, (2, 2))
    files = ShardFiles({"x": (tmp_path / "s.safetensors", create_shard(tmp_path / "s.safetensors", [spec])["x"])})
    with pytest.raises(ValueError, match=r"x: planned torch.float32 \[2, 2\], produced torch.float16 \[2, 2\]"):
        files.write(spec, torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"planned torch.float32 \[2, 2\], produced torch.float32 \[4\]"):
        files.write(spec, torch.zeros(4))
    files.close()
    with pytest.raises(ValueError, match="safetensors cannot store torch.complex64"):
        create_shard(tmp_path / "c.safetensors", [TensorSpec("c", torch.complex64, (1,))])


def test_destination_rules_and_all_or_nothing_publish(tmp_path):
    dst = tmp_path / "out"
    check_destination(dst, overwrite=False)  # absent: fine
    dst.mkdir()
    check_destination(dst, overwrite=False)  # an empty directory: fine
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
        check_destination(dst, overwrite=False)
    check_destination(dst, overwrite=True)

    with pytest.raises(RuntimeError, match="boom"):
        with staging_directory(dst) as staging:
            (staging / "half.bin").write_bytes(b"1")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the failed run left nothing beside it
    assert (dst / "keep.txt").read_text() == "mine"

    with staging_directory(dst) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.partial-")
        (staging / "config.json").write_text("{}")
    publish(staging, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    fresh = tmp_path / "new"
    with staging_directory(fresh) as staging:
        (staging / "a").write_text("a")
    publish(staging, fresh)
    assert (fresh / "a").read_text() == "a"
