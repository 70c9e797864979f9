"""Write deterministic random checkpoints shaped like Hugging Face models (no network needed).

Owns: the ``SyntheticSpec`` value and its presets, writing ``config.json`` plus sharded
safetensors (``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``) with the
exact tensor names and shapes of HF ``LlamaForCausalLM`` (or ``DeepseekV3ForCausalLM``: its names and
shapes read off transformers' own model built on ``meta``, expert stacks split into the per-expert
names checkpoints use), and a spec-keyed cache of them.

Invariants:
- A tensor's values depend only on (seed, tensor name, shape, dtype): not on sharding or order.
- A directory at its final path is complete: everything is written into a temporary sibling
  that is renamed at the end; the marker file (written last) records the spec's cache key and
  every file's size, so ``ensure_synthetic_checkpoint`` can tell complete from damaged.
- Peak memory is a small multiple of one shard, whatever the model size: tensors are generated
  and written shard by shard (the serializer may buffer the shard once more).
- An index is always written, even for a single shard.

Limitations: Llama and DeepSeek-V3 only. Weights are random with a realistic scale (matrices N(0, 0.02), norms
1 + N(0, 0.02)), so outputs are meaningless. A tensor larger than ``max_shard_bytes`` gets a
shard of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import safetensors.torch
import torch
import transformers

FORMAT_VERSION = 1  # bump when generated content changes, so cached checkpoints are rebuilt
MARKER_FILE = "streamquant-synthetic.json"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "DeepseekV3ForCausalLM")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Shape, dtype, seed and sharding of a synthetic checkpoint; defaults are the demo model."""

    architecture: str = "LlamaForCausalLM"
    num_layers: int = 12
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_heads: int = 16
    num_kv_heads: int = 4
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    max_shard_bytes: int = 256 * 2**20
    # further config.json fields as sorted (name, value) pairs (DeepSeek-V3: latent ranks, experts, groups)
    extra_config: tuple[tuple[str, int | float | bool | None], ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} not in {SUPPORTED_ARCHITECTURES}")
        sizes = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                 "vocab_size", "max_position_embeddings", "max_shard_bytes")
        for field in sizes:
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype {self.dtype} not in {FLOAT_DTYPES}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_json_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["dtype"] = str(self.dtype).removeprefix("torch.")
        if not self.extra_config:  # absent when empty: the cache keys of the Llama specs stay as they were
            del values["extra_config"]
        else:
            values["extra_config"] = dict(self.extra_config)
        return values

    def cache_key(self) -> str:
        """Hash of every field and the format version; names a cached checkpoint."""
        text = json.dumps({"format": FORMAT_VERSION, **self.to_json_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


DEMO_SPEC = SyntheticSpec(num_layers=12, hidden_size=1024, intermediate_size=2816, num_heads=16,
                          num_kv_heads=4, vocab_size=32000)  # about 400 MB in bf16
BENCH_SPEC = SyntheticSpec(num_layers=28, hidden_size=1024, intermediate_size=4096, num_heads=8,
                           num_kv_heads=4, vocab_size=32000)  # about 1.0 GB in bf16
QWEN2_7B_2LAYER_SPEC = SyntheticSpec(num_layers=2, hidden_size=3584, intermediate_size=18944, num_heads=28,
                                     num_kv_heads=4, vocab_size=32000)  # Qwen2-7B's layer shapes, about 1.0 GB
QWEN2_7B_SPEC = SyntheticSpec(num_layers=28, hidden_size=3584, intermediate_size=18944, num_heads=28,
                              num_kv_heads=4, vocab_size=152064,
                              max_shard_bytes=4 * 2**30)  # Qwen2-7B's shapes (Llama layout), about 15.2 GB
# DeepSeek-V3's layer shapes (hidden 7168, 128 heads, q / kv latent ranks 1536 / 512, dense MLP 18432, experts of
# 2048 in 8 groups, a shared expert) in 3 layers: one dense, two MoE of 16 experts (of 256); a 32000 vocabulary (of
# 129280). About 5.8 GB in bf16 (the real model: 1.3 TB): what fits a 24 GB machine with a naive load's room.
DEEPSEEK_V3_3LAYER_SPEC = SyntheticSpec(
    architecture="DeepseekV3ForCausalLM", num_layers=3, hidden_size=7168, intermediate_size=18432, num_heads=128,
    num_kv_heads=128, vocab_size=32000, extra_config=(
        ("first_k_dense_replace", 1), ("kv_lora_rank", 512), ("moe_intermediate_size", 2048), ("n_group", 8),
        ("n_routed_experts", 16), ("n_shared_experts", 1), ("num_experts_per_tok", 8), ("q_lora_rank", 1536),
        ("qk_nope_head_dim", 128), ("qk_rope_head_dim", 64), ("topk_group", 4), ("v_head_dim", 128)))
# Named presets of the benchmarks (`--spec NAME`): the small default shapes, real 7B shapes, DeepSeek-V3's.
BENCH_SPECS = {"demo": DEMO_SPEC, "bench": BENCH_SPEC, "7b-2layer": QWEN2_7B_2LAYER_SPEC, "7b": QWEN2_7B_SPEC,
               "deepseek-v3-3layer": DEEPSEEK_V3_3LAYER_SPEC}
TINY_SPEC = SyntheticSpec(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4,
                          num_kv_heads=2, vocab_size=512, max_position_embeddings=256,
                          max_shard_bytes=256 * 1024)  # under 1 MB, four shards


def _layout(spec: SyntheticSpec) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, mean) of every tensor, in HF module order; std is always INIT_STD."""
    if spec.architecture != "LlamaForCausalLM":
        return list(_transformers_layout(spec))
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    entries = [("model.embed_tokens.weight", (spec.vocab_size, h), 0.0)]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        entries += [
            (p + "self_attn.q_proj.weight", (h, h), 0.0),
            (p + "self_attn.k_proj.weight", (kv, h), 0.0),
            (p + "self_attn.v_proj.weight", (kv, h), 0.0),
            (p + "self_attn.o_proj.weight", (h, h), 0.0),
            (p + "mlp.gate_proj.weight", (spec.intermediate_size, h), 0.0),
            (p + "mlp.up_proj.weight", (spec.intermediate_size, h), 0.0),
            (p + "mlp.down_proj.weight", (h, spec.intermediate_size), 0.0),
            (p + "input_layernorm.weight", (h,), 1.0),
            (p + "post_attention_layernorm.weight", (h,), 1.0),
        ]
    entries.append(("model.norm.weight", (h,), 1.0))
    if not spec.tie_word_embeddings:
        entries.append(("lm_head.weight", (spec.vocab_size, h), 0.0))
    return entries


@functools.lru_cache(maxsize=4)  # building the meta model takes seconds at real sizes; a spec is a frozen value
def _transformers_layout(spec: SyntheticSpec) -> tuple[tuple[str, tuple[int, ...], float], ...]:
    """The layout of transformers' own model for the spec's config (built on meta: no memory); 1-D norm
    weights have mean 1. Expert stacks (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I], as
    transformers 5 holds them) are written as checkpoints store them: `experts.{e}.{gate,up,down}_proj.weight`."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(spec))
    entries = []
    for name, tensor in model.state_dict().items():
        stem, _, leaf = name.rpartition("experts.")
        if stem and leaf in ("gate_up_proj", "down_proj") and tensor.dim() == 3:
            experts, rows, cols = tensor.shape
            projs = (("down_proj", rows),) if leaf == "down_proj" else (("gate_proj", rows // 2), ("up_proj", rows // 2))
            entries += [(f"{stem}experts.{e}.{proj}.weight", (n, cols), 0.0) for e in range(experts) for proj, n in projs]
            continue
        norm = tensor.dim() == 1 and "norm" in name.rpartition(".")[0].rpartition(".")[2]
        entries.append((name, tuple(tensor.shape), 1.0 if norm else 0.0))
    return tuple(entries)


def tensor_shapes(spec: SyntheticSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the checkpoint holds, in HF module order."""
    return {name: shape for name, shape, _ in _layout(spec)}


def total_bytes(spec: SyntheticSpec) -> int:
    """Bytes of tensor data (no headers) in the checkpoint."""
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    return sum(itemsize * torch.Size(shape).numel() for shape in tensor_shapes(spec).values())


def hf_config(spec: SyntheticSpec) -> transformers.PreTrainedConfig:
    config_class = transformers.LlamaConfig if spec.architecture == "LlamaForCausalLM" else transformers.DeepseekV3Config
    return config_class(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, dtype=spec.dtype,
        architectures=[spec.architecture], **dict(spec.extra_config),
    )


def _random_tensor(spec: SyntheticSpec, name: str, shape: tuple[int, ...], mean: float) -> torch.Tensor:
    digest = hashlib.sha256(f"{spec.seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    return values.mul_(INIT_STD).add_(mean).to(spec.dtype)


def _shard_plan(spec: SyntheticSpec) -> list[list[tuple[str, tuple[int, ...], float]]]:
    """Greedy packing of the layout, in order, into shards of at most max_shard_bytes."""
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    shards: list[list] = [[]]
    used = 0
    for entry in _layout(spec):
        size = itemsize * torch.Size(entry[1]).numel()
        if shards[-1] and used + size > spec.max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def _write_contents(directory: pathlib.Path, spec: SyntheticSpec) -> None:
    hf_config(spec).save_pretrained(directory)
    plan = _shard_plan(spec)
    weight_map: dict[str, str] = {}
    for number, entries in enumerate(plan, start=1):
        file_name = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: _random_tensor(spec, name, shape, mean) for name, shape, mean in entries}
        safetensors.torch.save_file(tensors, directory / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors  # keep peak memory at one shard
    index = {"metadata": {"total_size": total_bytes(spec)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())}
    marker = {"cache_key": spec.cache_key(), "spec": spec.to_json_dict(), "files": files}
    (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2))


def write_synthetic_checkpoint(out_dir: str | os.PathLike, spec: SyntheticSpec) -> pathlib.Path:
    """Write a complete checkpoint at ``out_dir`` (which must not exist) and return its path."""
    target = pathlib.Path(out_dir)
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _write_contents(staging, spec)
        os.rename(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if target.exists():  # another writer finished first
            raise FileExistsError(f"{target} appeared while writing it") from exc
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def is_complete(directory: str | os.PathLike, spec: SyntheticSpec) -> bool:
    """Whether ``directory`` holds an intact checkpoint written for exactly ``spec``."""
    directory = pathlib.Path(directory)
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
        files = marker["files"]
        if marker["cache_key"] != spec.cache_key() or not files:
            return False
        return all((directory / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def ensure_synthetic_checkpoint(cache_dir: str | os.PathLike, spec: SyntheticSpec) -> pathlib.Path:
    """Return the cached checkpoint for ``spec`` under ``cache_dir``, writing it if absent or damaged."""
    target = pathlib.Path(cache_dir) / f"synthetic-{spec.architecture}-{spec.cache_key()}"
    if is_complete(target, spec):
        return target
    if target.exists():
        shutil.rmtree(target)
    try:
        return write_synthetic_checkpoint(target, spec)
    except FileExistsError:
        if is_complete(target, spec):  # a concurrent caller wrote it first
            return target
        raise


def default_cache_dir() -> pathlib.Path:
    """``$STREAMQUANT_CACHE`` if set, else ``~/.cache/streamquant``."""
    configured = os.environ.get("STREAMQUANT_CACHE")
    return pathlib.Path(configured or "~/.cache/streamquant").expanduser()
