"""The `streamquant` command line: the parser (one module per command adds its own: `cli/load.py`,
`cli/generate.py`, `cli/demo.py`, `cli/quantize.py`, `cli/mismatch.py`), dispatch and `main`.

`load`, `generate` and `demo` are functions of a plain, picklable options dict that return a
JSON-able result dict (`run_command`), so the same code runs in this process, on the ranks
`launch()` spawns for `--tp N`, or on each rank of `torchrun`; only rank 0's result is printed and
written. `quantize` and `mismatch` run in this one process.

Bad input (missing checkpoint, unsupported architecture or quantization, a checkpoint that does not
fit its model) prints one line to stderr and exits with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from streamquant.checkpoint.reader import CheckpointError
from streamquant.cli.demo import add_demo_command, demo_options, demo_plot_path, print_demo, run_demo, write_demo_plot
from streamquant.cli.generate import add_generate_command, generate_options, run_generate
from streamquant.cli.input import check_device, check_json_path
from streamquant.cli.load import add_load_command, run_load
from streamquant.cli.mismatch import add_mismatch_command, print_mismatch, run_mismatch
from streamquant.cli.output import print_summary, write_json
from streamquant.cli.plot import plot_load, require_matplotlib
from streamquant.cli.quantize import add_quantize_command, print_quantize_summary, run_quantize
from streamquant.config import UnsupportedQuantizationError
from streamquant.loading.errors import WeightLoadError
from streamquant.models import UnsupportedArchitectureError
from streamquant.parallel.context import is_peer_failure, is_peer_timeout
from streamquant.parallel.gate import RankFailedError
from streamquant.parallel.launch import LaunchError, launch
from streamquant.parallel.torchrun import init_from_env, shutdown, under_torchrun

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
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamquant", description="Load Hugging Face checkpoints into streamquant's tensor-parallel models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_load_command(commands)
    add_generate_command(commands)
    add_demo_command(commands)
    add_quantize_command(commands)
    add_mismatch_command(commands)
    return parser


def run_command(options: dict[str, Any]) -> dict[str, Any]:
    """Run `load`, `generate` or `demo` in this process (or on this rank); returns the JSON-able result."""
    if options["command"] == "demo":
        return run_demo(options)
    if options["command"] == "generate":
        return run_generate(options)
    return run_load(options)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags of `load`, `generate` or `demo` as the options dict its run takes."""
    options = {k: v for k, v in vars(args).items() if k not in ("json", "cache_dir", "plot")}
    if options["quantization"] == "none":
        options["quantization"] = None
    options["fingerprint"] = args.json is not None  # load --json writes weights_fingerprint
    if args.command == "demo":
        return demo_options(options, args)
    if args.command == "generate":
        return generate_options(options, args)
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


def _launch_error_line(exc: LaunchError, timeout_s: float) -> str | None:
    """The one error line of a failed rank, or None where its exception is a bug (to be re-raised)."""
    if isinstance(exc.exception, RankFailedError):  # it stopped because another rank failed or went silent
        return f"streamquant: error: {_one_line(exc.exception)} (the other ranks were ended)"
    if exc.exception is not None and is_peer_timeout(exc.exception) and exc.unreported:
        who = f"rank {exc.unreported[0]}" if len(exc.unreported) == 1 else f"one of ranks {list(exc.unreported)}"
        return (f"streamquant: error: tensor-parallel {who} stopped answering: rank {exc.rank} waited "
                f"{timeout_s:g} s for it in a collective (the other ranks were ended)")
    if exc.exception is None or is_peer_failure(exc.exception):  # died, or a peer did
        cause = (_one_line(exc.exception) if exc.exception is not None
                 else str(exc).splitlines()[0].removeprefix(f"rank {exc.rank}: "))
        silent = f"; ranks that had not answered: {list(exc.unreported)}" if exc.unreported else ""
        return f"streamquant: error: rank {exc.rank}: {cause}{silent} (the other ranks were ended)"
    if not isinstance(exc.exception, USER_ERRORS):
        return None
    return f"streamquant: error: rank {exc.rank}: {_one_line(exc.exception)}"


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
        if getattr(args, "plot", None) is not None:  # load and demo: refused before the load, not after it
            require_matplotlib()
            check_json_path(args.plot, "--plot")
        result = _dispatch(_options(args))
    except LaunchError as exc:
        line = _launch_error_line(exc, args.timeout)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return EXIT_BAD_INPUT
    except USER_ERRORS as exc:
        print(f"streamquant: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result is None:
        return 0
    (print_demo if args.command == "demo" else print_summary)(result)
    write_json(args.json, result)
    if args.command == "demo":
        print(write_demo_plot(result, demo_plot_path(args)))
    elif getattr(args, "plot", None) is not None:
        print(f"{'memory plot':<18}{plot_load(result, args.plot)}")
    return 0
