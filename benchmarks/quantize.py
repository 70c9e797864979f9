"""Offline quantization, side by side: `streamquant quantize` against llm-compressor's `model_free_ptq`.

On the synthetic bf16 Llama of `--spec` (default `bench`: 28 layers of hidden 1024, ~1 GB; `7b-2layer`:
two Qwen2-7B-shaped layers, ~1.3 GB) it runs, each repeat in a fresh child process, repeats
round-robin over the rows:
  streamquant:<scheme>:w<N>   `quantize_checkpoint(..., workers=N, formula=--formula)` for the
                              --schemes (default fp8, fp8-channel, fp8-block; also int8, int4 and
                              int4-asym: int4 with zero points), N in --workers (default 1,2);
  floor:write                 writing the bytes streamquant's fp8 output has, from memory, with the same
                              reserved-file + pwrite path: the disk / page-cache floor both tools pay
                              (on this VM, writing runs at ~0.4-0.9 GB/s, so the write is most of a run);
  llmcompressor:<preset>      llm-compressor 0.14 `model_free_ptq(scheme=FP8_DYNAMIC | FP8_BLOCK | W8A8 |
                              W4A16 | W4A16_ASYM, ignore=["lm_head"])` for the schemes asked for (its
                              per-tensor FP8 preset needs calibration), run with the Python named by
                              --llmcompressor-python or $STREAMQUANT_LLMCOMPRESSOR_PYTHON (an environment
                              with llm-compressor installed; rows are skipped without one).
Reported per row (median seconds, max peaks over repeats): seconds, GB/s of bf16 input, seconds /
the fastest streamquant row of the same scheme, peak anonymous RSS and peak file-backed RSS (sampled
every 5 ms in the child, above its value at entry; for N workers the largest process's: workers
are separate processes), output bytes. Then, for each llm-compressor preset, a bitwise comparison
of its output with streamquant's output of the matching scheme: the tensors both write (llm-compressor
also quantizes embed_tokens, which streamquant keeps in bf16) and how many differ. With
--formula compressed-tensors (the default here) they should all be equal.
Writes a table and `--json` (default benchmarks/results/quantize.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, interleaved, machine_info, spawn, write_results  # noqa: E402  (benchmarks/common.py, beside this script)

MARKER = "QUANTIZE_BENCH "
SCHEMES = ("fp8", "fp8-channel", "fp8-block")
PRESETS = {"FP8_DYNAMIC": "fp8-channel", "FP8_BLOCK": "fp8-block", "W8A8": "int8", "W4A16": "int4",
           "W4A16_ASYM": "int4-asym"}
SCHEME_OPTIONS = {"int4-asym": ("int4", {"symmetric": False})}  # row scheme -> quantize_checkpoint's scheme, options


def _source(spec_name: str) -> Path:
    from streamquant.checkpoint.synthetic import BENCH_SPECS, default_cache_dir, ensure_synthetic_checkpoint

    return ensure_synthetic_checkpoint(Path(os.environ.get("STREAMQUANT_CACHE") or default_cache_dir()),
                                       BENCH_SPECS[spec_name])


def run_one(name: str, spec_name: str, out: Path, formula: str) -> dict:
    """In a child: one row, one repeat."""
    from streamquant.memory import PeakMemorySampler

    source = _source(spec_name)
    kind, _, rest = name.partition(":")
    if kind == "streamquant":  # imports before the sampler and the clock
        from streamquant.checkpoint.reader import load_hf_config
        from streamquant.offline import quantize_checkpoint

        # transformers imports its model registry lazily, on the first config read (~0.7 s here); the
        # llm-compressor row's `import llmcompressor` has paid that before its clock starts: so do we
        load_hf_config(source)
    elif kind == "floor":
        floor_bytes, chunk = _output_bytes(source), _chunk()
    else:
        from llmcompressor import model_free_ptq
    shutil.rmtree(out, ignore_errors=True)
    with PeakMemorySampler("cpu") as sampler:
        start = time.perf_counter()
        if kind == "floor":
            _write_floor(out, floor_bytes, chunk)
            workers_peak = 0
        elif kind == "streamquant":
            scheme, _, workers = rest.partition(":w")
            scheme, options = SCHEME_OPTIONS.get(scheme, (scheme, {}))
            report = quantize_checkpoint(source, out, scheme, formula=formula, workers=int(workers), **options)
            workers_peak = report.peak_anon_bytes
        else:
            model_free_ptq(str(source), str(out), scheme=rest, ignore=["lm_head"])
            workers_peak = 0
        seconds = time.perf_counter() - start
    peak = sampler.result
    bytes_in = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    return {"name": name, "seconds": seconds, "bytes_in": bytes_in,
            "bytes_out": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            "peak_anon_bytes": max(peak.peak_bytes, workers_peak), "peak_file_bytes": peak.file_backed_peak_bytes}


def _output_bytes(source: Path) -> int:
    """Bytes of streamquant's fp8 output of `source` (planned from headers, nothing quantized)."""
    import torch

    from streamquant.checkpoint.reader import load_hf_config
    from streamquant.formats import get_format
    from streamquant.offline import QuantizePlan
    from streamquant.offline.quantize import _source_units

    plan = QuantizePlan(load_hf_config(source), "fp8", get_format("compressed-tensors"), torch.bfloat16)
    return sum(spec.nbytes for unit in _source_units(source, plan)[0] for spec in unit.outputs)


def _chunk():
    import torch

    return torch.randint(0, 255, (64 << 20,), dtype=torch.uint8).numpy()


def _write_floor(out: Path, nbytes: int, chunk) -> None:
    out.mkdir(parents=True)
    with open(out / "floor.safetensors", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, nbytes)
    with open(out / "floor.safetensors", "r+b", buffering=0) as f:
        for offset in range(0, nbytes, len(chunk)):
            os.pwrite(f.fileno(), chunk[: min(len(chunk), nbytes - offset)], offset)


def _tensors(directory: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            out.update({n: handle.get_tensor(n) for n in handle.keys()})
    return out


def compare(ours: Path, theirs: Path) -> dict:
    """Bitwise comparison of the tensors both outputs hold; the share of fp8 codes that differ."""
    import torch

    a, b = _tensors(ours), _tensors(theirs)
    shared = sorted(set(a) & set(b))
    differ, codes, codes_differ = [], 0, 0
    for n in shared:
        x, y = a[n], b[n]
        if x.dtype != y.dtype or x.shape != y.shape:
            differ.append(n)
            continue
        xb, yb = (x.view(torch.uint8), y.view(torch.uint8)) if x.dtype.itemsize == 1 else (x, y)
        if not torch.equal(xb, yb):
            differ.append(n)
        if x.dtype.itemsize == 1:
            codes += x.numel()
            codes_differ += int((xb != yb).sum())
    return {"shared": len(shared), "differ": differ, "only_streamquant": sorted(set(a) - set(b)),
            "only_llmcompressor": sorted(set(b) - set(a)), "code_share_differ": codes_differ / max(1, codes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="bench")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--formula", default="compressed-tensors")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llmcompressor-python", default=os.environ.get("STREAMQUANT_LLMCOMPRESSOR_PYTHON"))
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results") / "quantize.json")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the outputs are written (default: the temp dir); /dev/shm takes the disk's "
                             "writeback, which is noisy on a shared VM, out of both tools' numbers")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(MARKER + json.dumps(run_one(args.one, args.spec, args.out, args.formula)), flush=True)
        return
    schemes = [s for s in args.schemes.split(",") if s]
    names = ["floor:write"] + [f"streamquant:{s}:w{w}" for s in schemes for w in args.workers.split(",")]
    lc = args.llmcompressor_python
    names += [f"llmcompressor:{p}" for p, s in PRESETS.items() if lc and s in schemes]
    machine = machine_info()
    print(banner(machine, f"offline quantization of --spec {args.spec}", args.repeats), flush=True)
    _source(args.spec)  # written once, before any timing
    root = Path(tempfile.mkdtemp(prefix="sq-quantize-bench-", dir=args.out_dir))
    outs = {n: root / n.replace(":", "_") for n in names}
    script = str(Path(__file__).resolve())

    def run(name: str) -> dict:
        python = lc if name.startswith("llmcompressor") else None
        return spawn(script, MARKER, name, args.spec, args=("--out", str(outs[name]), "--formula", args.formula),
                     python=python)

    try:
        results = interleaved(names, args.repeats, run)
        rows = [_row(name, results[name]) for name in names]
        comparisons = {p: compare(outs[f"streamquant:{s}:w1"], outs[f"llmcompressor:{p}"])
                       for p, s in PRESETS.items() if f"llmcompressor:{p}" in names and f"streamquant:{s}:w1" in names
                       and "error" not in rows[names.index(f"llmcompressor:{p}")]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _print(rows, comparisons)
    write_results(args.json, machine, spec=args.spec, formula=args.formula,
                  out_dir=str(args.out_dir or tempfile.gettempdir()), rows=rows, bitwise=comparisons)


def _row(name: str, repeats: list[dict]) -> dict:
    errors = [r["error"] for r in repeats if "error" in r]
    if errors:
        return {"name": name, "error": errors[0]}
    seconds = statistics.median(r["seconds"] for r in repeats)
    return {"name": name, "seconds": seconds, "all_seconds": [r["seconds"] for r in repeats],
            "input_gb_per_s": repeats[0]["bytes_in"] / seconds / 1e9, "bytes_in": repeats[0]["bytes_in"],
            "bytes_out": repeats[0]["bytes_out"], "peak_anon_bytes": max(r["peak_anon_bytes"] for r in repeats),
            "peak_file_bytes": max((r["peak_file_bytes"] or 0) for r in repeats)}


def _scheme_of(name: str) -> str | None:
    kind, _, rest = name.partition(":")
    return rest.partition(":w")[0] if kind == "streamquant" else PRESETS.get(rest)


def _print(rows: list[dict], comparisons: dict) -> None:
    best = {}
    for r in rows:
        if "error" not in r and r["name"].startswith("streamquant"):
            s = _scheme_of(r["name"])
            best[s] = min(best.get(s, r["seconds"]), r["seconds"])
    floor = next((r["seconds"] for r in rows if r["name"] == "floor:write" and "error" not in r), float("nan"))
    print(f"\n{'row':<28}{'seconds':>9}{'GB/s in':>9}{'x best sq':>10}{'x write':>9}{'anon MiB':>10}{'file MiB':>10}"
          f"{'out MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<28}  error: {r['error'][:90]}")
            continue
        ratio = r["seconds"] / best[_scheme_of(r["name"])] if _scheme_of(r["name"]) in best else float("nan")
        r["x_best_streamquant"], r["x_write_floor"] = ratio, r["seconds"] / floor
        print(f"{r['name']:<28}{r['seconds']:>9.2f}{r['input_gb_per_s']:>9.2f}{ratio:>10.2f}{r['x_write_floor']:>9.2f}"
              f"{r['peak_anon_bytes'] / 2**20:>10.1f}{r['peak_file_bytes'] / 2**20:>10.1f}{r['bytes_out'] / 2**20:>9.1f}")
    for preset, c in comparisons.items():
        print(f"bitwise {preset} vs streamquant {PRESETS[preset]}: {c['shared']} shared tensors, {len(c['differ'])} "
              f"differ {c['differ'][:3]}, codes differing {c['code_share_differ']:.2e}; only llm-compressor: "
              f"{c['only_llmcompressor'][:3]}")


if __name__ == "__main__":
    main()
