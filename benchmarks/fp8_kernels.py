"""fp8 quantization kernels in GB/s of bf16 input, per scheme and weight shape, beside torch's own copy and cast.

For each shape and scheme (fp8: per tensor, fp8-channel: per row, fp8-block: 128x128) on one bf16
N(0, 0.02) weight, median over `--repeats` of:
  copy        `dst.copy_(w)` into an existing bf16 tensor: the memory floor;
  div-cast    `torch.div(w, scale, out=fp8)` into existing fp8 codes: the formula's arithmetic in one
              torch call with nothing around it (per-tensor scale), what "torch alone gives";
  scales      `compute_scales`: the amax pass (and the scale formula);
  into        `quantize_window_` into existing codes with existing scales (a reload's second pass);
  quantize    `quantize`: scales, fresh codes and the quantization pass (a cold load's work);
  compiled    `quantize(compiled=True)` (inductor CPU kernel for the quantization pass; warmed up first).
Each runs with 1 torch thread (the per-core figure the goal is stated in) and with all threads
(`torch.get_num_threads()` at start). Codes of eager and compiled are compared bitwise on every row.

Families (`--shapes`): `bench` (the layer weights of BENCH_SPEC, hidden 1024), `7b` (Qwen2-7B's:
hidden 3584, intermediate 18944, 4 kv heads of 128), `edges` (every pair of 64, 512, 4096, 32768 up
to `--max-elements`). `--chunk-elements 262144,1048576` repeats the eager rows with other processing
chunk sizes (streamquant.quant.fp8_kernels.CHUNK_ELEMENTS); `--busy N` keeps N busy-looping processes
running during the measurement (a loaded machine: every intra-op parallel region then waits for a
descheduled thread, so the number of kernel calls per weight matters more than their size).
Goal flag per row: quantize >= 1 GB/s with 1 thread. Writes benchmarks/results/fp8_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, machine_info  # noqa: E402  (benchmarks/common.py, beside this script)

import torch  # noqa: E402

from streamquant.quant import fp8_kernels, fp8_math  # noqa: E402
from streamquant.quant.granularity import PerBlock, PerRow, PerTensor, Window, tile_shape  # noqa: E402

SCHEMES = {"fp8": PerTensor(), "fp8-channel": PerRow(), "fp8-block": PerBlock((128, 128))}
EDGE_SIDES = (64, 512, 4096, 32768)
GOAL_GBPS = 1.0


def shape_family(name: str, max_elements: int) -> list[tuple[str, tuple[int, int]]]:
    """(label, [out, in]) of every weight of a family."""
    if name == "bench":
        return [("bench qkv", (2048, 1024)), ("bench o", (1024, 1024)), ("bench gate_up", (8192, 1024)),
                ("bench down", (1024, 4096))]
    if name == "7b":
        return [("7b q/o", (3584, 3584)), ("7b k/v", (512, 3584)), ("7b qkv", (4608, 3584)),
                ("7b gate/up", (18944, 3584)), ("7b down", (3584, 18944))]
    return [(f"edge {r}x{c}", (r, c)) for r in EDGE_SIDES for c in EDGE_SIDES if r * c <= max_elements]


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_shape(shape: tuple[int, int], scheme: str, repeats: int, device: torch.device, compiled: bool) -> dict:
    """GB/s of every kernel on one weight, at the current thread count and chunk size."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    granularity, gb = SCHEMES[scheme], w.numel() * w.element_size() / 1e9
    window, tile = Window(0, 0, *shape), tile_shape(granularity, shape)
    scales = fp8_math.compute_scales(w, granularity)
    codes, copy_dst = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device), torch.empty_like(w)
    one_scale = scales.amax().reshape(())
    row = {
        "copy": timed(lambda: copy_dst.copy_(w), repeats, device),
        "div-cast": timed(lambda: torch.div(w, one_scale, out=codes), repeats, device),
        "scales": timed(lambda: fp8_math.compute_scales(w, granularity), repeats, device),
        "into": timed(lambda: fp8_math.quantize_window_(codes, w, scales, window, tile, scales_cover_amax=True),
                      repeats, device),
        "quantize": timed(lambda: fp8_math.quantize(w, granularity), repeats, device),
    }
    eager_codes = fp8_math.quantize(w, granularity)[0]
    if compiled:
        row["compiled"] = timed(lambda: fp8_math.quantize(w, granularity, compiled=True), repeats, device)
        row["compiled_bitwise_eager"] = torch.equal(fp8_math.quantize(w, granularity, compiled=True)[0].view(torch.uint8),
                                                    eager_codes.view(torch.uint8))
    return {k: (gb / v if isinstance(v, float) else v) for k, v in row.items()}


def start_busy(n: int) -> list[subprocess.Popen]:
    """n local busy-looping processes (a loaded machine); ended by `stop_busy`."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


KERNELS = ("copy", "div-cast", "scales", "into", "quantize", "compiled")


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':<20}{'scheme':<13}{'threads':>8}{'chunk':>9}" + "".join(f"{k:>10}" for k in KERNELS)
          + f"{'q/div':>7}  goal")
    for r in rows:
        cells = "".join(f"{r[k]:>10.2f}" if k in r else f"{'-':>10}" for k in KERNELS)
        goal = "" if r["threads"] != 1 else ("PASS" if r["quantize"] >= GOAL_GBPS else "FAIL")
        print(f"{r['label']:<20}{r['scheme']:<13}{r['threads']:>8}{r['chunk_elements']:>9}{cells}"
              f"{r['quantize'] / r['div-cast']:>7.2f}  {goal}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--shapes", default="bench,7b,edges", help="comma-separated families: bench, 7b, edges "
                                                                    "(default: all three)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated subset of {','.join(SCHEMES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per kernel, median reported (default 5)")
    parser.add_argument("--max-elements", type=int, default=1 << 28, help="largest edge shape (default 2^28)")
    parser.add_argument("--chunk-elements", default=str(fp8_kernels.CHUNK_ELEMENTS),
                        help="comma-separated eager chunk sizes to compare (default: the library's)")
    parser.add_argument("--busy", type=int, default=0, metavar="N", help="busy-looping processes during the run")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled column")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "fp8_kernels.json")
    args = parser.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    families = [f for f in args.shapes.split(",") if f]
    if set(schemes) - set(SCHEMES) or set(families) - {"bench", "7b", "edges"} or args.repeats < 1:
        parser.error("unknown --schemes or --shapes entry, or --repeats < 1")
    chunks = [int(c) for c in args.chunk_elements.split(",")]
    device, all_threads, machine = torch.device(args.device), torch.get_num_threads(), machine_info()
    print(banner(machine, f"fp8 kernels on {device}, GB/s of bf16 input (median)", args.repeats), flush=True)
    shapes = [s for f in families for s in shape_family(f, args.max_elements)]
    rows, busy = [], start_busy(args.busy)
    try:
        for (label, shape), scheme, chunk in ((s, q, c) for s in shapes for q in schemes for c in chunks):
            for threads in sorted({1, all_threads}):
                torch.set_num_threads(threads)
                fp8_kernels.CHUNK_ELEMENTS = chunk
                result = measure_shape(shape, scheme, args.repeats, device, not args.no_compile and chunk == chunks[0]
                                       and device.type == "cpu")
                rows.append({"label": label, "shape": list(shape), "scheme": scheme, "threads": threads,
                             "chunk_elements": chunk, **result})
                print(f"  {label} {scheme} threads={threads} chunk={chunk}: quantize {result['quantize']:.2f} GB/s",
                      flush=True)
    finally:
        stop_busy(busy)
        torch.set_num_threads(all_threads)
    print_table(rows)
    per_core = [r for r in rows if r["threads"] == 1 and r["chunk_elements"] == chunks[0]]
    failing = [f"{r['label']} {r['scheme']}" for r in per_core if r["quantize"] < GOAL_GBPS]
    print(f"goal quantize >= {GOAL_GBPS} GB/s with 1 thread: {len(per_core) - len(failing)}/{len(per_core)} rows"
          + (f"; below: {', '.join(failing)}" if failing else ""))
    not_bitwise = [f"{r['label']} {r['scheme']}" for r in rows if r.get("compiled_bitwise_eager") is False]
    print("compiled codes bitwise eager on every row" if not not_bitwise else f"COMPILED DIFFERS: {not_bitwise}")
    result = {"device": str(device), "machine": {**machine, "loadavg_1m_at_end": os.getloadavg()[0]},
              "busy_processes": args.busy, "repeats": args.repeats, "unit": "GB/s of bf16 input", "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
