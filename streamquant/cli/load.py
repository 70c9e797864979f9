"""`streamquant load PATH`, and the loading that `generate` and `demo` share: the loading flags all
three accept, and the load itself, measured (size, seconds, peak memory and its timeline).

The command runs on an options dict (the parsed flags, picklable) and returns a JSON-able result,
so the same function runs here or on each tensor-parallel rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from streamquant.api import load_model
from streamquant.config import DTYPE_NAMES, SUPPORTED_QUANTIZATION
from streamquant.fingerprint import weights_fingerprint
from streamquant.cli.input import positive_seconds
from streamquant.cli.output import thin_timeline
from streamquant.cli.plot import PLOT_EXTRA
from streamquant.loading.offload import DEFAULT_QUANTIZE_ON, QUANTIZE_ON
from streamquant.memory import PeakMemorySampler
from streamquant.parallel.context import TPContext
from streamquant.parallel.rank import DEFAULT_TIMEOUT_S
from streamquant.quant.math.formula import Formula
from streamquant.quant.scaled.config import FP8_DTYPES, ActivationScheme

TIMELINE_POINTS = 200  # memory timeline samples kept in the JSON (evenly thinned, the peak always kept)


def add_loading_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `load`, `generate` and `demo`: the model to build, then how the load runs."""
    _add_model_flags(parser)
    _add_run_flags(parser)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """dtype, device, ranks, and the quantization scheme with its options."""
    add = parser.add_argument
    add("--dtype", default="bfloat16", choices=list(DTYPE_NAMES), help="parameter dtype (default: bfloat16)")
    add("--device", default="cpu", help="device to load onto, e.g. cpu or cuda (default: cpu)")
    add("--tp", type=int, default=None, metavar="N",
        help="tensor-parallel ranks, one process each (default: 1; under torchrun: its world size)")
    add("--quantization", choices=[q for q in SUPPORTED_QUANTIZATION if q] + ["none"], default=None,
        help="quantize while loading: fp8 with per-tensor, per-output-channel or 128x128-block weight scales; "
             "int8 with per-output-channel scales (W8A8 via torch._int_mm); mxfp8 (OCP MX: 1x32 blocks, "
             "power-of-two scales); none: keep the checkpoint dtype (default: none; demo: fp8)")
    add("--fp8-dtype", default=None, choices=[k for k in FP8_DTYPES if not k.startswith("float8")],
        help="fp8 format of the fp8 schemes (default: e4m3fn, max 448; e4m3fnuz has max 240)")
    add("--activation-scheme", default=None, choices=[a.value for a in ActivationScheme],
        help="dynamic: quantize activations at each matmul (default; a pre-quantized checkpoint: what it says); "
             "none: quantized weights only (W8A16)")
    add("--formula", default=None, choices=[f.value for f in Formula],
        help="whose fp8 arithmetic: streamquant's (default; a pre-quantized checkpoint: the one it was written "
             "with), or compressed-tensors' / transformers' bit for bit")
    add("--group-size", type=int, default=None, metavar="N", help="int4: input elements per scale (default 128)")
    add("--zero-points", action="store_true", default=None, help="int4: asymmetric, a zero point per group")
    add("--ignore", action="append", default=[], metavar="REGEX",
        help="keep layers whose module name matches REGEX (re.search) unquantized; repeatable")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Rank arithmetic, host staging, the --json file and the collective timeout."""
    add = parser.add_argument
    add("--tp-invariant-activations", action="store_true", default=None,
        help="with --tp and dynamic fp8 activations: all-reduce each token's activation amax in row-parallel "
             "layers, so the outputs are TP=1's (one small collective per such matmul)")
    add("--fp32-all-reduce", action="store_true",
        help="with --tp and a bf16/fp16 model: compute and all-reduce row-parallel partial sums in float32, "
             "rounding once after the sum as TP=1 does (costs float32 matmuls in those layers)")
    add("--offload-before-quant", action="store_true",
        help="stage the high-precision weights in host memory (pinned for CUDA) until each layer is quantized, "
             "so the device only receives fp8 weights (needs --quantization; no effect on a CPU target)")
    add("--quantize-on", choices=list(QUANTIZE_ON), default=None,
        help=f"with --offload-before-quant: quantize each layer on the device (one bf16 layer there at a time) "
             f"or on the cpu (the device never holds bf16 weights) (default: {DEFAULT_QUANTIZE_ON})")
    add("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON to FILE")
    add_progress_flag(parser)
    add("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help=f"with --tp or torchrun: how long a rank waits for another (in a collective, or at a layer of "
             f"the load) before failing, naming the silent rank (default: {DEFAULT_TIMEOUT_S:g})")


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """--no-progress: no bar (one is drawn on stderr only where stderr is a terminal; at --tp N by rank 0)."""
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="draw no progress bar (default: a bar of bytes and tensors on stderr where stderr is a "
                             "terminal)")


def add_plot_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help=f"draw the memory timeline of the load to FILE.png (needs matplotlib: {PLOT_EXTRA}; "
                             f"default: {default})")


def add_load_command(commands) -> None:
    load = commands.add_parser("load", help="load a checkpoint; report its size, load time and peak memory")
    load.add_argument("path", help="checkpoint directory or Hugging Face hub id")
    add_loading_flags(load)
    load.add_argument("--measure-error", action="store_true",
                      help="with --quantization: also measure each quantized weight's SQNR (two more passes over "
                           "the weights; their seconds are reported apart, not in load seconds)")
    add_plot_flag(load, "none")


def _quantization_options(options: dict[str, Any]) -> dict[str, Any]:
    """The quantization options given; load_model says when one needs a scheme."""
    given = dict(fp8_dtype=options.get("fp8_dtype"), activation_scheme=options.get("activation_scheme"),
                 ignore=options.get("ignore") or None, formula=options.get("formula"),
                 measure_error=options.get("measure_error") or None,
                 tp_invariant_activations=options.get("tp_invariant_activations") or None,
                 group_size=options.get("group_size"), symmetric=False if options.get("zero_points") else None)
    return {k: v for k, v in given.items() if v is not None}


def measured_load(options: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load with peak-memory sampling; the model and the load measurements."""
    with PeakMemorySampler(options["device"]) as sampler:
        model = load_model(
            options["path"], quantization=options["quantization"], dtype=options["dtype"], device=options["device"],
            streaming=options.get("streaming", True), offload_before_quant=options["offload_before_quant"],
            quantize_on=options["quantize_on"], progress=options.get("progress"), **_quantization_options(options),
            tp=TPContext.from_process_group(reduce_dtype=torch.float32 if options.get("fp32_all_reduce") else None),
        )
    return model, _load_result(options, model.load_report, sampler.result)


def _load_result(options: dict[str, Any], report, peak) -> dict[str, Any]:
    result = {
        "checkpoint": str(options["path"]),
        "checkpoint_bytes": report.checkpoint_bytes,
        "checkpoint_bf16_bytes": 2 * report.checkpoint_elements,
        "model_bytes": report.model_bytes,
        "load_seconds": report.load_seconds,
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_method": peak.method,
    }
    if peak.file_backed_peak_bytes is not None:
        result["file_backed_peak_bytes"] = peak.file_backed_peak_bytes
    result["memory_timeline"] = thin_timeline(peak.timeline, TIMELINE_POINTS)
    if peak.file_backed_peak_bytes is not None:
        result["file_backed_timeline"] = thin_timeline(peak.file_backed_timeline, TIMELINE_POINTS)
    result["quantization"] = report.quantization
    result["quantized_weight_bytes"] = report.quantized_weight_bytes
    result["fp8_weight_bytes"] = report.quantized_weight_bytes  # the old key: deprecated, removed in 0.3
    if report.quantization_error is not None:
        result["quantization_error"] = report.quantization_error
    return result


def run_load(options: dict[str, Any]) -> dict[str, Any]:
    """`load` in this process (or on this rank): the load measurements and, outside them and only for
    --json (it reads every byte of the model once), the model's `weights_fingerprint` (a collective at
    TP > 1: every rank runs this)."""
    model, result = measured_load(options)
    if options.get("fingerprint"):
        result["weights_fingerprint"] = weights_fingerprint(model)
    return result
