"""Quantization kernels in GB/s of bf16 input, per scheme and weight shape, beside the bf16 copy of the same tensor.

For each shape and scheme on one bf16 N(0, 0.02) weight, median over `--repeats`, for each CPU kernel
implementation (`native`: the C++ kernels of streamquant/quant/native; `torch`: the pure-torch
fallback; `compiled`: the torch fallback with compiled=True, with --compiled):
  copy        `dst.copy_(w)` into an existing bf16 tensor: the memory floor (one per row);
  scales      `compute_scales`: the amax pass and the scale formula;
  into        `quantize_window_` into existing codes with existing scales (the quantization pass);
  pass        scales + into: both passes over the weight into existing memory;
  one-read    native only, tile-local schemes (channel, block, int8, mxfp8): `quantize_local_tiles_`, amax,
              scale and codes per tile in one read, into existing memory (what a load or reload runs
              there; per-tensor scales take the two passes);
  quantize    `quantize`: scales and the pass into FRESH codes (a cold load's work; a large fresh
              tensor pays its page faults, which a copy into an existing tensor does not);
  dequant     `dequantize_window` into an existing bf16 tensor (the CPU matmul fallback, readback).
`best/copy` is the GB/s of the route the loader takes (one-read where it applies, else pass) over
copy's, all into existing memory; goal (issue 23): >= 0.5 at every shape of 1M elements and up, at
all threads. Every implementation's codes are compared bitwise with
the first's.
Rows run with all threads (`torch.get_num_threads()` at start) and, with --one-thread too, with 1.

Schemes: fp8 (per tensor), fp8-channel (per row), fp8-block (128x128), int8 (per row), mxfp8 (1x32).
Families (`--shapes`): `bench` (the layer weights of BENCH_SPEC, hidden 1024), `7b` (Qwen2-7B's:
hidden 3584, intermediate 18944, 4 kv heads of 128), `edges` (every pair of 64, 512, 4096, 32768 up to
`--max-elements`). Writes benchmarks/results/fp8_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, machine_info  # noqa: E402  (benchmarks/common.py, beside this script)

import torch  # noqa: E402

from streamquant.quant.math import quantize as fp8_math  # noqa: E402
from streamquant.quant.math.code_format import E4M3FN, INT8, MXFP8  # noqa: E402
from streamquant.quant.math.granularity import PerBlock, PerRow, PerTensor, Window, tile_shape  # noqa: E402
from streamquant.quant.math.native import build  # noqa: E402

SCHEMES = {"fp8": (PerTensor(), E4M3FN), "fp8-channel": (PerRow(), E4M3FN), "fp8-block": (PerBlock((128, 128)), E4M3FN),
           "int8": (PerRow(), INT8), "mxfp8": (PerBlock((1, 32)), MXFP8)}
EDGE_SIDES = (64, 512, 4096, 32768)
GOAL_RATIO, GOAL_MIN_ELEMENTS = 0.5, 1 << 20
KERNELS = ("scales", "into", "pass", "one-read", "quantize", "dequant")


def shape_family(name: str, max_elements: int) -> list[tuple[str, tuple[int, int]]]:
    """(label, [out, in]) of every weight of a family."""
    if name == "bench":
        return [("bench qkv", (2048, 1024)), ("bench o", (1024, 1024)), ("bench gate_up", (8192, 1024)),
                ("bench down", (1024, 4096))]
    if name == "7b":
        return [("7b q/o", (3584, 3584)), ("7b k/v", (512, 3584)), ("7b qkv", (4608, 3584)),
                ("7b gate/up", (18944, 3584)), ("7b down", (3584, 18944))]
    return [(f"edge {r}x{c}", (r, c)) for r in EDGE_SIDES for c in EDGE_SIDES if r * c <= max_elements]


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_impl(w: torch.Tensor, scheme: str, impl: str, repeats: int) -> tuple[dict, torch.Tensor]:
    """GB/s of every kernel of one implementation on one weight, and its codes."""
    os.environ[build.ENV] = "native" if impl == "native" else "torch"
    compiled = impl == "compiled"
    granularity, fmt = SCHEMES[scheme]
    window, tile = Window(0, 0, *w.shape), tile_shape(granularity, tuple(w.shape))
    codes, scales = fp8_math.quantize(w, granularity, fmt, compiled=compiled)
    out = torch.empty_like(w)
    times = {
        "scales": timed(lambda: fp8_math.compute_scales(w, granularity, fmt), repeats),
        "into": timed(lambda: fp8_math.quantize_window_(codes, w, scales, window, tile, compiled,
                                                        scales_cover_amax=fmt.scales_cover_amax, fmt=fmt), repeats),
        "quantize": timed(lambda: fp8_math.quantize(w, granularity, fmt, compiled=compiled), repeats),
        "dequant": timed(lambda: fp8_math.dequantize_window(codes, scales, window, tile, torch.bfloat16, out=out), repeats),
    }
    times["pass"] = times["scales"] + times["into"]
    scale_out = torch.empty_like(scales)
    if impl == "native" and fp8_math.quantize_local_tiles_(codes, w, scale_out, window, tile, fmt) is not None:
        times["one-read"] = timed(lambda: fp8_math.quantize_local_tiles_(codes, w, scale_out, window, tile, fmt), repeats)
    gb = w.numel() * w.element_size() / 1e9
    rates = {k: gb / v for k, v in times.items()}
    rates["best"] = max(rates["pass"], rates.get("one-read", 0.0))
    return rates, codes


def measure_shape(shape: tuple[int, int], scheme: str, impls: list[str], repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    copy_dst = torch.empty_like(w)
    row = {"copy": w.numel() * w.element_size() / 1e9 / timed(lambda: copy_dst.copy_(w), repeats)}
    reference = None
    for impl in impls:
        result, codes = measure_impl(w, scheme, impl, repeats)
        row[impl] = result
        reference = codes if reference is None else reference
        row[impl]["bitwise_first"] = torch.equal(codes.view(torch.uint8), reference.view(torch.uint8))
    return row


def print_table(rows: list[dict], impls: list[str]) -> None:
    head = f"{'shape':<16}{'scheme':<12}{'thr':>4}{'copy':>7}"
    for impl in impls:
        head += "".join(f"{impl[:3] + ' ' + k[:6]:>11}" for k in KERNELS) + f"{impl[:3] + ' b/copy':>11}"
    print(head + "  goal")
    for r in rows:
        line = f"{r['label']:<16}{r['scheme']:<12}{r['threads']:>4}{r['copy']:>7.2f}"
        for impl in impls:
            line += "".join(f"{r[impl][k]:>11.2f}" if k in r[impl] else f"{'-':>11}" for k in KERNELS)
            line += f"{r[impl]['best'] / r['copy']:>11.2f}"
        print(line + f"  {goal_mark(r, impls[0])}")


def goal_mark(r: dict, impl: str) -> str:
    if r["elements"] < GOAL_MIN_ELEMENTS:
        return "-"
    ratio = r[impl]["best"] / r["copy"]
    return "met" if ratio >= GOAL_RATIO else f"MISSED by {GOAL_RATIO / ratio:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--shapes", default="bench,7b", help="comma-separated families: bench, 7b, edges (default bench,7b)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated subset of {','.join(SCHEMES)}")
    parser.add_argument("--impls", default="native,torch", help="comma-separated: native, torch (default both)")
    parser.add_argument("--compiled", action="store_true", help="also the torch fallback with compiled=True")
    parser.add_argument("--one-thread", action="store_true", help="also run every row with 1 torch thread")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per kernel, median reported (default 5)")
    parser.add_argument("--max-elements", type=int, default=1 << 28, help="largest edge shape (default 2^28)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "fp8_kernels.json")
    args = parser.parse_args(argv)
    schemes, families = [s for s in args.schemes.split(",") if s], [f for f in args.shapes.split(",") if f]
    impls = [i for i in args.impls.split(",") if i] + (["compiled"] if args.compiled else [])
    if (set(schemes) - set(SCHEMES) or set(families) - {"bench", "7b", "edges"} or args.repeats < 1
            or set(impls) - {"native", "torch", "compiled"} or not impls):
        parser.error("unknown --schemes, --shapes or --impls entry, or --repeats < 1")
    if "native" in impls and build.cpu_kernels() is None:
        parser.error("the native kernels could not be built here; run with --impls torch")
    all_threads, machine = torch.get_num_threads(), machine_info()
    print(banner(machine, "quantization kernels on CPU, GB/s of bf16 input (median)", args.repeats), flush=True)
    rows = []
    try:
        for label, shape in (s for f in families for s in shape_family(f, args.max_elements)):
            for scheme in schemes:
                for threads in sorted({all_threads, 1 if args.one_thread else all_threads}, reverse=True):
                    torch.set_num_threads(threads)
                    result = measure_shape(shape, scheme, impls, args.repeats)
                    rows.append({"label": label, "shape": list(shape), "elements": shape[0] * shape[1],
                                 "scheme": scheme, "threads": threads, **result})
                    print(f"  {label} {scheme} threads={threads}: copy {result['copy']:.2f} GB/s, "
                          + ", ".join(f"{i} best {result[i]['best']:.2f}" for i in impls), flush=True)
    finally:
        torch.set_num_threads(all_threads)
    print_table(rows, impls)
    judged = [r for r in rows if r["threads"] == all_threads and r["elements"] >= GOAL_MIN_ELEMENTS]
    missed = [f"{r['label']} {r['scheme']}" for r in judged if goal_mark(r, impls[0]) != "met"]
    print(f"goal {impls[0]} best route >= {GOAL_RATIO}x the bf16 copy, >= {GOAL_MIN_ELEMENTS} elements, {all_threads} "
          f"threads: {len(judged) - len(missed)}/{len(judged)} rows" + (f"; missed: {', '.join(missed)}" if missed else ""))
    differ = [f"{r['label']} {r['scheme']} {i}" for r in rows for i in impls if not r[i]["bitwise_first"]]
    print(f"codes bitwise {impls[0]}'s on every row" if not differ else f"CODES DIFFER: {differ}")
    result = {"machine": {**machine, "loadavg_1m_at_end": os.getloadavg()[0], "cpu": build._cpu_signature().split("\n")[0]},
              "repeats": args.repeats, "unit": "GB/s of bf16 input", "goal": {"ratio": GOAL_RATIO, "missed": missed},
              "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
