"""What the commands put out: the --json file every command writes, and what `load`, `generate` and
`demo` print (a summary, the naive-vs-streaming table) and the memory timeline they write to --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")


def format_bytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB ({n:,} bytes)"


def print_summary(result: dict[str, Any]) -> None:
    lines = [
        ("checkpoint", result["checkpoint"]),
        ("checkpoint bytes", format_bytes(result["checkpoint_bytes"])),
        ("model bytes", format_bytes(result["model_bytes"])),
        ("load seconds", f"{result['load_seconds']:.3f}"),
        ("peak memory", f"{format_bytes(result['peak_memory_bytes'])} [{result['peak_memory_method']}]"),
    ]
    if "file_backed_peak_bytes" in result:
        lines.append(("file-backed peak", format_bytes(result["file_backed_peak_bytes"])))
    if result.get("quantization"):
        lines += [("quantization", result["quantization"]),
                  ("quantized weight bytes", format_bytes(result["quantized_weight_bytes"]))]
    error = result.get("quantization_error")
    if error and error.get("weights"):
        lines.append(("weight SQNR dB", f"min {error['sqnr_db_min']:.1f}, median {error['sqnr_db_median']:.1f} "
                                        f"over {error['weights']} weights ({error['measure_seconds']:.3f} s, "
                                        "not in load seconds)"))
    if "sequences" in result:
        reasons = [seq["finish_reason"] for seq in result["sequences"]]
        lines.append(("sequences", f"{len(reasons)} ({reasons.count('stop')} stopped, {reasons.count('length')} at "
                                   "max-new-tokens); all of them in --json"))
    if "tokens" in result:
        lines += [("prompt ids", result["prompt_ids"]), ("generated ids", result["tokens"])]
    width = max(len(key) for key, _ in lines) + 2  # labels in one column, however long the longest
    for key, value in lines:
        print(f"{key:<{width}}{value}")
    if "naive" in result:
        _print_comparison(result)


def _print_comparison(result: dict[str, Any]) -> None:
    naive, final = result["naive"], result["model_bytes"]
    print(f"\n{'fp8 load':<34}{'peak MiB':>10}{'peak / model':>14}{'seconds':>9}")
    rows = [("naive: bf16 model, then quantize", naive), ("streaming: quantize per layer", result)]
    for label, row in rows:
        peak = row["peak_memory_bytes"]
        print(f"{label:<34}{peak / 2**20:>10.1f}{peak / final:>13.2f}x{row['load_seconds']:>9.2f}")
    print(f"final fp8 model {final / 2**20:.1f} MiB; naive and streaming models bitwise equal: "
          f"{result['naive_equals_streaming']}")


def thin_timeline(timeline, points: int) -> list[list[float]]:
    """At most about `points` (seconds, bytes) samples, evenly spaced, always keeping the highest."""
    step = max(1, -(-len(timeline) // points))
    kept = list(timeline[::step])
    if timeline:
        top = max(timeline, key=lambda sample: sample[1])
        if top not in kept:
            kept = sorted([*kept, top])
    return [[round(t, 4), b] for t, b in kept]
