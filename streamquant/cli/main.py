"""The `streamquant` command line: `load`, `generate`, `demo`, `quantize` (`cli/quantize.py`) and
`mismatch` (`cli/rollout.py`).

Every command is a function of a plain, picklable options dict that returns a JSON-able result
dict (`run_command`), so the same code runs in this process, on the ranks `launch()` spawns for
`--tp N`, or on each rank of `torchrun`; only rank 0's result is printed and written.

Bad input (missing checkpoint, unsupported architecture or quantization, a checkpoint that does not
fit its model) prints one line to stderr and exits with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from streamquant.api import DTYPE_NAMES, SUPPORTED_QUANTIZATION, UnsupportedQuantizationError, load_model
from streamquant.checkpoint.reader import CheckpointError, load_hf_config, resolve_checkpoint
from streamquant.checkpoint.synthetic import DEMO_SPEC, default_cache_dir, ensure_synthetic_checkpoint
from streamquant.cli.input import check_device, check_json_path, count, positive_seconds, prompt_ids
from streamquant.cli.output import print_summary, thin_timeline
from streamquant.cli.rollout import (
    add_mismatch_command,
    add_sampling_flags,
    print_mismatch,
    prompts_as_batch,
    read_prompts,
    run_mismatch,
    run_sequences,
    sampling_params,
)
from streamquant.cli.quantize import add_quantize_command, print_quantize_summary, run_quantize, write_json
from streamquant.inference.generation import check_request, generate_with_logits
from streamquant.parallel.launch import LaunchError, launch
from streamquant.parallel.rank import DEFAULT_TIMEOUT_S
from streamquant.parallel.torchrun import init_from_env, shutdown, under_torchrun
from streamquant.loading.session import WeightLoadError
from streamquant.loading.offload import DEFAULT_QUANTIZE_ON, QUANTIZE_ON
from streamquant.memory import PeakMemorySampler
from streamquant.models import UnsupportedArchitectureError
from streamquant.parallel.context import TPContext, is_peer_failure
from streamquant.quant.scaled.config import FP8_DTYPES, ActivationScheme
from streamquant.quant.math.formula import Formula

TIMELINE_POINTS = 200  # memory timeline samples kept in the JSON (evenly thinned, the peak always kept)
# Bad input, reported in one line. ValueError also covers sizes that do not fit (a --tp that does not
# divide the heads); the named subclasses are listed for the reader.
USER_ERRORS = (
    CheckpointError,
    UnsupportedArchitectureError,
    UnsupportedQuantizationError,
    WeightLoadError,
    ValueError,
    OSError,
)
DEMO_PROMPT = (1, 2, 3, 4)
DEMO_NEW_TOKENS = 8
EXIT_BAD_INPUT = 2


def _check_request(options: dict[str, Any]) -> None:
    """Generation requests checked against the checkpoint's config before the (long) load."""
    if options["command"] == "load":
        return
    config = load_hf_config(resolve_checkpoint(options["path"]))
    if options.get("prompts") is not None:
        sampling_params(options)  # bad sampling values are named before the load
        prompt = prompts_as_batch(options["prompts"])
    else:
        prompt = torch.tensor([options["prompt_ids"]], dtype=torch.long)
    check_request(config, prompt, options["max_new_tokens"])


def _add_loading_flags(parser: argparse.ArgumentParser) -> None:
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
    add("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help=f"with --tp or torchrun: how long a collective waits for another rank before failing "
             f"(default: {DEFAULT_TIMEOUT_S:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamquant", description="Load Hugging Face checkpoints into streamquant's tensor-parallel models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    load = commands.add_parser("load", help="load a checkpoint; report its size, load time and peak memory")
    load.add_argument("path", help="checkpoint directory or Hugging Face hub id")
    _add_loading_flags(load)
    load.add_argument("--measure-error", action="store_true",
                      help="with --quantization: also measure each quantized weight's SQNR (two more passes over "
                           "the weights; their seconds are reported apart, not in load seconds)")
    gen = commands.add_parser("generate", help="load a checkpoint and generate: greedy from --prompt-ids, or sampled "
                                                "rollouts of every prompt in --prompts FILE.jsonl")
    gen.add_argument("path", help="checkpoint directory or Hugging Face hub id")
    gen.add_argument("--prompt-ids", type=prompt_ids, default=None, metavar="IDS",
                     help="prompt token ids, comma-separated (e.g. 1,2,3)")
    gen.add_argument("--max-new-tokens", type=count, required=True, metavar="N",
                     help="number of tokens to generate (prompt + N must fit the model's max_position_embeddings)")
    _add_loading_flags(gen)
    add_sampling_flags(gen)
    demo = commands.add_parser("demo", help="write a small synthetic checkpoint (no network), load it, generate")
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="where the synthetic checkpoint is kept (default: streamquant's cache directory)")
    _add_loading_flags(demo)
    demo.set_defaults(quantization="fp8")
    add_quantize_command(commands)
    add_mismatch_command(commands)
    return parser


def _load(options: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load with peak-memory sampling; the model and the load measurements."""
    given = dict(fp8_dtype=options.get("fp8_dtype"), activation_scheme=options.get("activation_scheme"),
                 ignore=options.get("ignore") or None, formula=options.get("formula"),
                 measure_error=options.get("measure_error") or None,
                 tp_invariant_activations=options.get("tp_invariant_activations") or None,
                 group_size=options.get("group_size"), symmetric=False if options.get("zero_points") else None)
    fp8 = {k: v for k, v in given.items() if v is not None}  # fp8 options; load_model says when one needs a scheme
    with PeakMemorySampler(options["device"]) as sampler:
        model = load_model(
            options["path"], quantization=options["quantization"], dtype=options["dtype"], device=options["device"],
            streaming=options.get("streaming", True), offload_before_quant=options["offload_before_quant"],
            quantize_on=options["quantize_on"], **fp8,
            tp=TPContext.from_process_group(reduce_dtype=torch.float32 if options.get("fp32_all_reduce") else None),
        )
    report, peak = model.load_report, sampler.result
    result = {
        "checkpoint": str(options["path"]),
        "checkpoint_bytes": report.checkpoint_bytes,
        "model_bytes": report.model_bytes,
        "load_seconds": report.load_seconds,
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_method": peak.method,
    }
    if peak.file_backed_peak_bytes is not None:
        result["file_backed_peak_bytes"] = peak.file_backed_peak_bytes
    result["memory_timeline"] = thin_timeline(peak.timeline, TIMELINE_POINTS)
    result["quantization"] = report.quantization
    result["fp8_weight_bytes"] = report.fp8_weight_bytes
    if report.quantization_error is not None:
        result["quantization_error"] = report.quantization_error
    return model, result


def models_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Every parameter and buffer bitwise equal (same names, dtypes, shapes, bits)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape
        and torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8))
        for k in sa
    )


def run_command(options: dict[str, Any]) -> dict[str, Any]:
    """Run `load` or `generate` (demo is a generate) in this process; returns the JSON-able result.

    A quantized demo first loads the naive way (all bf16 weights first, then quantize), then
    streaming, reports both and checks that the two models are bitwise equal.
    """
    naive = None
    _check_request(options)
    if options["command"] == "demo" and options["quantization"]:
        naive, naive_result = _load({**options, "streaming": False, "offload_before_quant": False,
                                     "quantize_on": None})
    model, result = _load(options)
    if naive is not None:
        result["naive"] = {k: naive_result[k] for k in ("load_seconds", "peak_memory_bytes", "model_bytes")}
        result["naive_equals_streaming"] = models_equal(naive, model)
        del naive
    if options.get("prompts") is not None:
        result["sequences"] = run_sequences(model, options)
    elif options["command"] != "load":
        prompt = torch.tensor([options["prompt_ids"]], dtype=torch.long)
        out = generate_with_logits(model, prompt, options["max_new_tokens"])
        result["prompt_ids"] = list(options["prompt_ids"])
        result["tokens"] = out.tokens[0, prompt.shape[1] :].tolist()
        result["last_logits"] = out.last_prompt_logits[0].tolist()
    return result


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = {k: v for k, v in vars(args).items() if k not in ("json", "cache_dir")}
    if options["quantization"] == "none":
        options["quantization"] = None
    if args.command == "demo":
        options["path"] = str(ensure_synthetic_checkpoint(args.cache_dir or default_cache_dir(), DEMO_SPEC))
        options["prompt_ids"] = list(DEMO_PROMPT)
        options["max_new_tokens"] = DEMO_NEW_TOKENS
    if args.command == "generate":
        if (args.prompt_ids is None) == (args.prompts is None):
            raise ValueError("generate needs exactly one of --prompt-ids and --prompts")
        options["prompts"] = read_prompts(args.prompts) if args.prompts is not None else None
    return options


def _dispatch(options: dict[str, Any]) -> dict[str, Any] | None:
    """Run on the right ranks; rank 0's result, or None on the other torchrun ranks."""
    if under_torchrun():
        tp = init_from_env(options["device"], options["timeout"])
        try:
            if options["tp"] not in (None, tp.size):
                raise ValueError(f"--tp {options['tp']} does not match torchrun's world size {tp.size}")
            result = run_command(options)
        finally:
            shutdown()
        return result if tp.rank == 0 else None
    if (options["tp"] or 1) > 1:
        return launch(run_command, options["tp"], options, device=options["device"], timeout_s=options["timeout"])
    return run_command(options)


def _one_line(exc: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text if len(text) <= 500 else text[:497] + "..."


def _single_process_main(args: argparse.Namespace, run, show) -> int:
    """`quantize` and `mismatch`: one process, no --tp."""
    try:
        check_json_path(args.json)
        result = run(args)
    except (*USER_ERRORS, FileExistsError) as exc:
        print(f"streamquant: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    show(result)
    write_json(args.json, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "quantize":
        return _single_process_main(args, run_quantize, print_quantize_summary)
    if args.command == "mismatch":
        return _single_process_main(args, run_mismatch, print_mismatch)
    if args.tp is not None and args.tp < 1:
        print(f"streamquant: error: --tp must be >= 1, got {args.tp}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        check_device(args.device)
        check_json_path(args.json)
        result = _dispatch(_options(args))
    except LaunchError as exc:
        if exc.exception is None or is_peer_failure(exc.exception):  # died, or a peer did
            cause = _one_line(exc.exception) if exc.exception is not None else str(exc).splitlines()[0]
            silent = f"; ranks that had not answered: {list(exc.unreported)}" if exc.unreported else ""
            print(f"streamquant: error: rank {exc.rank}: {cause}{silent} (the other ranks were ended)", file=sys.stderr)
            return EXIT_BAD_INPUT
        if not isinstance(exc.exception, USER_ERRORS):
            raise
        print(f"streamquant: error: rank {exc.rank}: {_one_line(exc.exception)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except USER_ERRORS as exc:
        print(f"streamquant: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result is None:
        return 0
    if args.command == "demo":
        print("streamquant demo: a synthetic Llama checkpoint with random weights (its ids carry no meaning)")
    print_summary(result)
    write_json(args.json, result)
    return 0
