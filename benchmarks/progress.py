"""What a progress bar costs a load: the same load with and without its bar, side by side, on one synthetic checkpoint.

Rows, for each scheme of `--schemes` (default none,fp8: a bf16 load and a streaming fp8 load):
  <scheme>:quiet   load_model(..., progress=False), what `--no-progress` runs;
  <scheme>:bar     load_model(..., progress=True), the bar a terminal gets.
In both the child's stderr is a pseudo-terminal of 30x120 (`pty.openpty`) that a thread drains, as a
terminal would, so the rows differ only in the bar: tqdm's counting, formatting and writes (the
`drawn_bytes` column: what the bar wrote). Every repeat of every row is a fresh child (`--one`), the
repeats round-robin over the rows so a slow spell of a shared machine hits every row alike, and one
discarded round first warms the page cache. Time is `time.perf_counter()` around the `load_model` call.

Printed: each row's median and min seconds, and per scheme the ratio bar / quiet of the medians; the
spread of the quiet row's own repeats ((max - min) / median) is the noise the ratio is read against.
JSON (default benchmarks/results/progress.json): every repeat's seconds, the medians, the ratios and
the machine. The exit status never depends on the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import pty
import statistics
import struct
import sys
import termios
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, completed_runs, interleaved, machine_info, spawn, write_results  # noqa: E402  (benchmarks/common.py)

from streamquant.api import load_model  # noqa: E402
from streamquant.checkpoint.synthetic import BENCH_SPECS, default_cache_dir, ensure_synthetic_checkpoint  # noqa: E402

MARKER = "PROGRESS_RESULT "
SCHEMES = ("none", "fp8", "fp8-channel", "fp8-block")
MODES = ("quiet", "bar")


@contextlib.contextmanager
def terminal_stderr():
    """sys.stderr on a fresh 30x120 pseudo-terminal whose other end a thread reads; yields the byte count read."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    drawn = [0]

    def drain():
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # the slave end was closed
                return
            if not data:
                return
            drawn[0] += len(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stream = io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), encoding="utf-8", write_through=True)
    try:
        with contextlib.redirect_stderr(stream):
            yield drawn
    finally:
        stream.close()
        reader.join(timeout=5)
        os.close(master)


def run_one(name: str, path: Path) -> dict:
    """One measured load in this process (the `--one` child)."""
    scheme, _, mode = name.partition(":")
    with terminal_stderr() as drawn:
        assert sys.stderr.isatty()
        start = time.perf_counter()
        load_model(path, quantization=None if scheme == "none" else scheme, dtype="bfloat16",
                   progress=mode == "bar")
        seconds = time.perf_counter() - start
    return {"name": name, "load_seconds": seconds, "drawn_bytes": drawn[0]}


def summarize(results: dict[str, list[dict]], schemes: list[str]) -> tuple[list[dict], dict]:
    rows = []
    for name, runs in results.items():
        ok, failed = completed_runs(name, runs)
        if failed:
            rows.append(failed)
            continue
        seconds = [r["load_seconds"] for r in ok]
        median = statistics.median(seconds)
        rows.append({"name": name, "repeats": len(ok), "median_seconds": median, "min_seconds": min(seconds),
                     "spread": (max(seconds) - min(seconds)) / median, "seconds_all": seconds,
                     "drawn_bytes": statistics.median(r["drawn_bytes"] for r in ok)})
    by_name = {r["name"]: r for r in rows}
    ratios = {}
    for scheme in schemes:
        quiet, bar = by_name.get(f"{scheme}:quiet", {}), by_name.get(f"{scheme}:bar", {})
        if "median_seconds" in quiet and "median_seconds" in bar:
            ratios[scheme] = {"bar_over_quiet_median": bar["median_seconds"] / quiet["median_seconds"],
                              "bar_over_quiet_min": bar["min_seconds"] / quiet["min_seconds"],
                              "quiet_spread": quiet["spread"]}
    return rows, ratios


def print_table(rows: list[dict], ratios: dict) -> None:
    print(f"{'row':<18}{'median s':>10}{'min s':>9}{'spread':>9}{'drawn bytes':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<18}  FAILED: {r['error'][:300]}")
            continue
        print(f"{r['name']:<18}{r['median_seconds']:>10.3f}{r['min_seconds']:>9.3f}{r['spread']:>8.1%}"
              f"{r['drawn_bytes']:>13,.0f}")
    for scheme, ratio in ratios.items():
        print(f"{scheme}: bar / quiet = {ratio['bar_over_quiet_median']:.3f} (medians), "
              f"{ratio['bar_over_quiet_min']:.3f} (minima); the quiet row's own spread: {ratio['quiet_spread']:.1%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--spec", default="bench", choices=sorted(BENCH_SPECS),
                        help="synthetic checkpoint (default bench: 28 layers of hidden 1024, ~1 GB bf16)")
    parser.add_argument("--schemes", default="none,fp8", help=f"comma-separated subset of {','.join(SCHEMES)}")
    parser.add_argument("--repeats", type=int, default=5, help="fresh child processes per row (default 5)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "progress.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    path = ensure_synthetic_checkpoint(default_cache_dir(), BENCH_SPECS[args.spec])
    if args.one is not None:
        print(MARKER + json.dumps(run_one(args.one, path)), flush=True)
        return
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not schemes or set(schemes) - set(SCHEMES) or args.repeats < 1:
        parser.error(f"--schemes must name some of {','.join(SCHEMES)}; --repeats must be >= 1")
    names = [f"{scheme}:{mode}" for scheme in schemes for mode in MODES]
    machine = machine_info()
    print(banner(machine, f"progress bar cost, spec {args.spec} ({path})", args.repeats))
    interleaved(names, 1, lambda name: spawn(__file__, MARKER, name, args.spec))  # warms the page cache: discarded
    results = interleaved(names, args.repeats, lambda name: spawn(__file__, MARKER, name, args.spec))
    rows, ratios = summarize(results, schemes)
    print_table(rows, ratios)
    write_results(args.json, machine, spec=args.spec, rows=rows, ratios=ratios)


if __name__ == "__main__":
    main()
