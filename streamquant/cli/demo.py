"""`streamquant demo`: write a small synthetic checkpoint (no network), load it and generate from a fixed
prompt. A quantized demo (fp8 by default) also loads the naive way, compares the two loads and draws
both memory timelines in one picture (`--plot`, default `DEMO_PLOT` in the cache directory; skipped,
saying so, without matplotlib).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from streamquant.checkpoint.synthetic import DEMO_SPEC, default_cache_dir, ensure_synthetic_checkpoint
from streamquant.cli.generate import check_generation_request, generation
from streamquant.cli.load import add_loading_flags, add_plot_flag, measured_load
from streamquant.cli.output import print_summary
from streamquant.cli.plot import PLOT_EXTRA, matplotlib_available, plot_demo, plot_load

DEMO_PROMPT = (1, 2, 3, 4)
DEMO_NEW_TOKENS = 8
DEMO_PLOT = "demo_memory.png"  # in the cache directory, beside the checkpoint
NAIVE_KEYS = ("load_seconds", "peak_memory_bytes", "peak_memory_method", "model_bytes", "memory_timeline",
              "file_backed_timeline")


def add_demo_command(commands) -> None:
    demo = commands.add_parser("demo", help="write a small synthetic checkpoint (no network), load it, generate")
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="where the synthetic checkpoint is kept (default: streamquant's cache directory)")
    add_loading_flags(demo)
    add_plot_flag(demo, f"{DEMO_PLOT} in the cache directory")
    demo.set_defaults(quantization="fp8")


def demo_plot_path(args: argparse.Namespace) -> Path:
    """Where the demo's memory picture goes: --plot, or the cache directory."""
    return args.plot if args.plot is not None else (args.cache_dir or default_cache_dir()) / DEMO_PLOT


def demo_options(options: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`options` with the synthetic checkpoint (written on first use), the fixed prompt and length."""
    path = ensure_synthetic_checkpoint(args.cache_dir or default_cache_dir(), DEMO_SPEC)
    return {**options, "path": str(path), "prompt_ids": list(DEMO_PROMPT), "max_new_tokens": DEMO_NEW_TOKENS}


def models_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Every parameter and buffer bitwise equal (same names, dtypes, shapes, bits)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape
        and torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8))
        for k in sa
    )


def run_demo(options: dict[str, Any]) -> dict[str, Any]:
    """`demo` in this process (or on this rank): a generate on the synthetic checkpoint.

    A quantized demo first loads the naive way (all bf16 weights first, then quantize), then
    streaming, reports both and checks that the two models are bitwise equal.
    """
    naive = None
    check_generation_request(options)
    if options["quantization"]:
        naive, naive_result = measured_load({**options, "streaming": False, "offload_before_quant": False,
                                             "quantize_on": None})
    model, result = measured_load(options)
    if naive is not None:
        result["naive"] = {k: naive_result[k] for k in NAIVE_KEYS if k in naive_result}
        result["naive_equals_streaming"] = models_equal(naive, model)
        del naive
    return {**result, **generation(model, options)}


def write_demo_plot(result: dict[str, Any], path: Path) -> str:
    """Draw the demo's memory picture to `path` (naive and streaming, or the one load of an unquantized
    demo); the line to print: where it is, or that it was skipped."""
    if not matplotlib_available():
        return f"memory plot skipped: matplotlib is not installed ({PLOT_EXTRA})"
    drawn = plot_demo(result, path) if "naive" in result else plot_load(result, path)
    return f"memory plot: {drawn}"


def print_demo(result: dict[str, Any]) -> None:
    print("streamquant demo: a synthetic Llama checkpoint with random weights (its ids carry no meaning)")
    print_summary(result)
