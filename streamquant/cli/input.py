"""What the command line accepts: argument types, and the checks that run before anything is loaded.

A bad argument must cost the user nothing: these reject it in one line (argparse's, or
`streamquant: error:` with exit status 2) before a checkpoint is opened, where the alternative
would be a long load followed by a failure (a `--json` path that cannot be written, a device this
machine lacks).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected at least one non-negative token id, got {text!r}")
    return ids


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def check_device(name: str) -> None:
    """Raise ValueError unless `name` is a device torch knows and this machine has (before any loading)."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--device {name!r} is not a device torch knows: {first}") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise ValueError(f"--device {name}: this machine has no {device.type} device (torch {torch.__version__}"
                         f"{', a CPU-only build' if device.type == 'cuda' and torch.version.cuda is None else ''})")
    devices = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= devices:
        raise ValueError(f"--device {name}: only {devices} {device.type} device(s) here")


def check_json_path(path: Path | None, flag: str = "--json") -> None:
    """Raise ValueError if `flag`'s file could not be written to `path` (checked before loading, not after)."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: permission denied")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def byte_size(text: str) -> int:
    """A positive size such as 5GB, 500MB, 2GiB or 1000000 (bytes)."""
    stripped = text.strip().upper().replace(" ", "")
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number):]
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return int(value)
