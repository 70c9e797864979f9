"""Find a checkpoint's files and iterate its tensors lazily.

Owns: turning a local path or a Hugging Face model id into a local directory, choosing and
ordering the weight files, and yielding ``(name, tensor)`` pairs from them.

Invariants:
- File choice, in order of preference: ``model.safetensors``; the shards named by
  ``model.safetensors.index.json``; every ``*.safetensors``; ``pytorch_model.bin``; the shards
  named by ``pytorch_model.bin.index.json``. Shards are deduplicated and ordered by file name.
- ``iterate_weights`` is deterministic (files in the order above, names sorted within a file)
  and zero-copy: tensors live in private (copy-on-write) mmaps of the files, so pages are read
  only when a tensor is touched and writing to a tensor never changes the file.
- Every failure a user can cause (missing config, missing or corrupt shard, unreachable hub id,
  malformed config or index) is a ``CheckpointError`` naming the path or file at fault.
- Nothing from a checkpoint runs: shards named by an index stay inside its directory (no absolute
  paths, no ``..``, no folder symlinked outside; a symlinked shard file, as in the Hugging Face
  cache, is followed), ``config.json`` is parsed with ``trust_remote_code=False`` (an ``auto_map``
  that would need the checkpoint's code is refused, never prompted for), and ``.bin`` files are
  unpickled with ``weights_only=True`` (a pickle that wants more is refused). A ``model_type`` in
  ``CONFIG_ALIASES`` (Kimi K2's ``kimi_k2``, whose shipped configuration code is DeepSeek-V3's) is
  parsed with the transformers configuration class it aliases, its ``auto_map`` ignored.

Limitations: ``.bin`` files must use torch's zipfile format (the default since torch 1.6),
because mmap loading needs it. Duplicate tensor names across files are passed through; the
load session reports them. Non-tensor entries in a ``.bin`` state dict are rejected.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
from collections.abc import Iterator

import huggingface_hub
import safetensors
import torch
import transformers

CONFIG_FILE = "config.json"
# model_type -> the transformers model type whose configuration class parses it (the checkpoint ships the same
# class as its own code: Kimi K2's `configuration_deepseek.DeepseekV3Config`)
CONFIG_ALIASES = {"kimi_k2": "deepseek_v3"}
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
HUB_PATTERNS = ("*.json", "*.safetensors", "*.bin")


class CheckpointError(ValueError):
    """A checkpoint cannot be found, is incomplete, or is malformed."""


def resolve_checkpoint(
    path_or_id: str | os.PathLike, *, revision: str | None = None
) -> pathlib.Path:
    """Return a local checkpoint directory for a directory path or a Hugging Face model id.

    A local directory is returned as given (``revision`` must then be None). Anything else goes
    through ``huggingface_hub.snapshot_download``, which honours the local cache and
    ``HF_HUB_OFFLINE``; only json, safetensors and bin files are fetched.
    """
    local = pathlib.Path(path_or_id).expanduser()
    try:
        local.stat()
    except PermissionError:
        raise CheckpointError(f"cannot read {local}: permission denied") from None
    except OSError:
        pass  # absent: maybe a hub id
    if local.is_dir():
        if revision is not None:
            raise CheckpointError(f"{local} is a local directory; revision={revision!r} does not apply")
        _require_config(local)
        return local
    if local.exists():
        raise CheckpointError(f"{local} is a file; expected a checkpoint directory or a model id")
    try:
        fetched = huggingface_hub.snapshot_download(
            str(path_or_id), revision=revision, allow_patterns=list(HUB_PATTERNS)
        )
    except Exception as exc:  # any hub/cache/validation failure gets the same user-facing advice
        raise CheckpointError(
            f"{str(path_or_id)!r} is not a local directory and could not be fetched from the "
            f"Hugging Face hub (offline, or not in the local cache?): {type(exc).__name__}: {exc}"
        ) from exc
    snapshot = pathlib.Path(fetched)
    _require_config(snapshot)
    return snapshot


def _require_config(directory: pathlib.Path) -> None:
    """The directory's config.json must exist and be readable (unreadable is said so, not "missing")."""
    config = directory / CONFIG_FILE
    try:
        with open(config, "rb"):
            pass
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint directory {directory} has no {CONFIG_FILE}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{config} is a directory, not a file") from None
    except PermissionError:
        raise CheckpointError(f"cannot read {config}: permission denied") from None


def checkpoint_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The weight files of a checkpoint directory, in load order (see module docstring)."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    if (directory / SAFETENSORS_FILE).is_file():
        return [directory / SAFETENSORS_FILE]
    if (directory / SAFETENSORS_INDEX).is_file():
        return _index_shards(directory / SAFETENSORS_INDEX)
    loose = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if loose:
        return loose
    if (directory / BIN_FILE).is_file():
        return [directory / BIN_FILE]
    if (directory / BIN_INDEX).is_file():
        return _index_shards(directory / BIN_INDEX)
    contents = sorted(p.name for p in directory.iterdir()) or ["<empty>"]
    raise CheckpointError(
        f"no weight files ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, *.safetensors, {BIN_FILE}, "
        f"{BIN_INDEX}) in {directory}; it contains: {', '.join(contents)}"
    )


def _index_shards(index_path: pathlib.Path) -> list[pathlib.Path]:
    """Shard files named by an index's weight_map, deduplicated, sorted, all present."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()), key=str)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"malformed index {index_path}: {type(exc).__name__}: {exc}") from exc
    if not names:
        raise CheckpointError(f"index {index_path} has an empty weight_map")
    shards = [_inside(index_path, name) for name in names]
    missing = [name for name, shard in zip(names, shards) if not shard.is_file()]
    if missing:
        raise CheckpointError(f"index {index_path} names missing shard(s): {', '.join(missing)}")
    return shards


def _inside(index_path: pathlib.Path, name: object) -> pathlib.Path:
    """The shard `name` of an index, refused unless it stays inside the checkpoint directory.

    A name is a relative path with no `..` part whose folders (resolved, symlinks followed) are the
    directory or below it; the file itself may be a symlink (the Hugging Face cache stores shards
    so, pointing into its blobs folder).
    """
    directory = index_path.parent
    pure = pathlib.PurePosixPath(name) if isinstance(name, str) else None
    if (pure is None or not name or pure.is_absolute() or ".." in pure.parts or "\\" in name
            or pathlib.PureWindowsPath(name).drive):
        raise CheckpointError(f"index {index_path} names shard {name!r}, which is not a file inside the checkpoint "
                              "directory (absolute paths and '..' are refused)")
    shard = directory / pure
    if not shard.parent.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"index {index_path} names shard {name!r}, whose folder leads outside the checkpoint "
                              "directory (through a symlink)")
    return shard


def iterate_weights(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a checkpoint directory, lazily, zero-copy."""
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            yield from _iterate_safetensors(file)
        else:
            yield from _iterate_bin(file)


def _open_safetensors(file: pathlib.Path):
    """`safetensors.safe_open(file)` (lazy, mmapped), its failures a CheckpointError naming the file."""
    try:
        return safetensors.safe_open(file, framework="pt")
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot open {file}: {type(exc).__name__}: {exc}") from exc


def _iterate_safetensors(file: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    with _open_safetensors(file) as handle:
        for name in sorted(handle.keys()):
            yield name, handle.get_tensor(name)


def _iterate_bin(file: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: the file wants code run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{file} holds more than tensors (its pickle would run code, which streamquant never "
                              f"allows; convert it to safetensors): {first}") from exc
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"cannot mmap-load {file}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict")
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{file}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        yield name, tensor


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, from safetensors headers (no tensor data read; `.bin`: mmapped)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files(path):
        if file.suffix != ".safetensors":
            shapes.update((name, tuple(t.shape)) for name, t in _iterate_bin(file))
            continue
        with _open_safetensors(file) as handle:
            shapes.update((name, tuple(handle.get_slice(name).get_shape())) for name in handle.keys())
    return shapes


def checkpoint_totals(path: str | os.PathLike) -> tuple[int, int]:
    """(tensors, bytes of tensor data) that `iterate_weights` yields, from the safetensors headers (`.bin`:
    mmapped): a progress bar's totals."""
    tensors = nbytes = 0
    for file in checkpoint_files(path):
        if file.suffix != ".safetensors":
            sizes = [t.numel() * t.element_size() for _, t in _iterate_bin(file)]
            tensors, nbytes = tensors + len(sizes), nbytes + sum(sizes)
            continue
        with _open_safetensors(file) as handle:
            tensors += len(handle.keys())
        with open(file, "rb") as raw:  # 8-byte header length, the header, then the tensors' bytes without gaps
            nbytes += file.stat().st_size - 8 - int.from_bytes(raw.read(8), "little")
    return tensors, nbytes


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Total size on disk of the weight files, headers included (sum of file sizes)."""
    return sum(file.stat().st_size for file in checkpoint_files(path))


def load_hf_config(path: str | os.PathLike) -> transformers.PreTrainedConfig:
    """The checkpoint's ``config.json`` parsed by ``transformers.AutoConfig``."""
    directory = pathlib.Path(path)
    _require_config(directory)
    auto_map = _auto_map(directory)
    try:  # never the checkpoint's own Python: no prompt, no import of its code, whatever config.json says
        raw = json.loads((directory / CONFIG_FILE).read_text())
        alias = CONFIG_ALIASES.get(raw.get("model_type")) if isinstance(raw, dict) else None
        if alias is not None:
            return transformers.CONFIG_MAPPING[alias].from_dict({k: v for k, v in raw.items() if k != "auto_map"})
        return transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 -- parsing a user's file: any failure is a malformed config
        if auto_map:
            raise CheckpointError(
                f"{directory / CONFIG_FILE} needs the checkpoint's own Python code (auto_map: {auto_map}), which "
                "streamquant never runs; not supported"
            ) from exc
        raise CheckpointError(
            f"malformed {directory / CONFIG_FILE}: {type(exc).__name__}: {exc}"
        ) from exc


def _auto_map(directory: pathlib.Path) -> dict | None:
    """config.json's `auto_map` (classes defined by code shipped with the checkpoint), if any."""
    try:
        value = json.loads((directory / CONFIG_FILE).read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, dict) and value else None
