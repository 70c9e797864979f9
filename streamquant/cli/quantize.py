"""`streamquant quantize SRC DST`: the command line of `offline.quantize_checkpoint`.

Bad input (a missing or already quantized source, an unsupported architecture or option, a
non-empty destination without --overwrite, NaN / Inf in a weight) prints one line and exits with 2,
and leaves no destination behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamquant.config import DTYPE_NAMES
from streamquant.cli.input import byte_size, count
from streamquant.cli.load import add_progress_flag
from streamquant.formats import DEFAULT_FORMAT, FORMATS
from streamquant.offline import quantize_checkpoint
from streamquant.offline.plan import OFFLINE_SCHEMES
from streamquant.offline.quantize import DEFAULT_MAX_SHARD_BYTES
from streamquant.quant.scaled.config import ActivationScheme
from streamquant.quant.math.formula import Formula


def add_quantize_command(commands) -> None:
    q = commands.add_parser("quantize", help="write an fp8, int8 or int4 checkpoint (compressed-tensors, or hf-fp8 for "
                                             "fp8 blocks) of a high-precision one, tensor by tensor, without building "
                                             "the model")
    add = q.add_argument
    add("src", help="high-precision checkpoint directory or Hugging Face hub id")
    add("dst", type=Path, help="output directory (must not exist or be empty, unless --overwrite)")
    add("--quantization", required=True, choices=[s.value for s in OFFLINE_SCHEMES],
        help="fp8 with per-tensor, per-output-channel or 128x128-block weight scales; int8 with per-output-channel "
             "scales (W8A8; W8A16 with --activation-scheme none); int4 (W4A16) with a scale per group of inputs")
    add("--format", default=DEFAULT_FORMAT, choices=list(FORMATS),
        help=f"on-disk format (default: {DEFAULT_FORMAT}; hf-fp8 stores block scales only)")
    add("--formula", default=Formula.STREAMQUANT.value, choices=[f.value for f in Formula],
        help="whose arithmetic: streamquant's (default), or compressed-tensors' (llm-compressor's round-to-nearest "
             "output, bit for bit) / transformers' (fp8 only)")
    add("--activation-scheme", default=None, choices=[a.value for a in ActivationScheme],
        help="what the config tells readers about activations: dynamic (default; fp8 or int8 per token) or none "
             "(weight-only; int4 always is)")
    add("--group-size", type=int, default=None, metavar="N", help="int4: input elements per scale (default 128)")
    add("--zero-points", action="store_true", default=None,
        help="int4: asymmetric, a zero point per group (llm-compressor's W4A16_ASYM)")
    add("--ignore", action="append", default=[], metavar="REGEX",
        help="keep layers whose streamquant module name matches REGEX (re.search) in high precision; repeatable")
    add("--dtype", default="bfloat16", choices=list(DTYPE_NAMES),
        help="model dtype: unquantized tensors are written in it and weights quantized from it (default: bfloat16)")
    add("--max-shard-size", type=byte_size, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
        help="largest output shard, e.g. 5GB or 500MB (default: 5GB)")
    add("--workers", type=count, default=1, metavar="N",
        help="processes writing shards in parallel (the files are bitwise the same for any N; default: 1)")
    add("--overwrite", action="store_true", help="replace a non-empty destination (only once the new one is complete)")
    add("--measure-error", action="store_true",
        help="also measure each quantized weight's SQNR (two more passes; its seconds are reported apart)")
    add("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON to FILE")
    add_progress_flag(q)


def run_quantize(args: argparse.Namespace) -> dict:
    given = {"formula": args.formula, "activation_scheme": args.activation_scheme, "group_size": args.group_size,
             "symmetric": False if args.zero_points else None, "ignore": args.ignore or None}
    options = {k: v for k, v in given.items() if v is not None}
    report = quantize_checkpoint(args.src, args.dst, args.quantization, format=args.format, dtype=args.dtype,
                                 max_shard_size=args.max_shard_size, workers=args.workers, overwrite=args.overwrite,
                                 measure_error=args.measure_error, progress=args.progress, **options)
    return report.to_json()


def print_quantize_summary(result: dict) -> None:
    gib = 2**30
    lines = [
        ("source", result["source"]), ("destination", result["destination"]),
        ("scheme", f"{result['quantization']} ({result['format']}, formula {result['formula']})"),
        ("tensors", f"{result['quantized_tensors']} of {result['tensors_in']} quantized, {result['shards']} shard(s)"),
        ("bytes in / out", f"{result['bytes_in'] / gib:.3f} GiB / {result['bytes_out'] / gib:.3f} GiB"),
        ("seconds", f"{result['seconds']:.3f} ({result['input_gb_per_s']:.2f} GB/s of input, "
                    f"{result['workers']} worker(s))"),
        ("peak memory", f"{result['peak_anon_bytes'] / 2**20:.1f} MiB anonymous"
                        + (f", {result['peak_file_bytes'] / 2**20:.1f} MiB file-backed"
                           if result["peak_file_bytes"] is not None else "")),
    ]
    error = result.get("quantization_error")
    if error and error.get("weights"):
        lines.append(("weight SQNR dB", f"min {error['sqnr_db_min']:.1f}, median {error['sqnr_db_median']:.1f} "
                                        f"over {error['weights']} weights"))
    for key, value in lines:
        print(f"{key:<16}{value}")
