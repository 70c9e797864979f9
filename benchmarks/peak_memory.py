"""Peak CPU memory and load time of fp8 quantize-on-load, side by side, on one synthetic checkpoint.

Loads the same synthetic bf16 Llama checkpoint (BENCH_SPEC: 28 layers of hidden 1024, ~1 GB; `--spec
demo`: 12 layers, ~400 MB; `--spec 7b-2layer`: two layers of Qwen2-7B's shapes, hidden 3584 /
intermediate 18944, ~1 GB; `--spec 7b`: all 28 such layers, ~15 GB; `--spec deepseek-v3-3layer`: three layers of
DeepSeek-V3's shapes, one dense and two MoE of 16 experts, ~5.8 GB; several, comma-separated, in one run with
their repeats interleaved, each with its own bf16 floor) on CPU as
  bf16                  streamquant unquantized: the time floor the time ratios divide by;
  naive:<q>             streamquant `streaming=False`: whole bf16 model first, then quantize;
  streaming:<q>         streamquant quantize-on-load (the native CPU kernels, where they build);
  torch-kernels:<q>     the same with the pure-torch kernels (STREAMQUANT_CPU_KERNELS=torch): what the
                        native kernels changed, in the same run;
  shuffled:<q>, by-type:<q>  streaming, fed the checkpoint shuffled / grouped by parameter type across
                        layers (every layer in flight at once: shows what out-of-order costs);
  offload-device:<q>, offload-cpu:<q>  streaming with `offload_before_quant=True`, quantize_on="device" /
                        "cpu". With `--device cuda` the peak column is the DEVICE peak
                        (torch.cuda.max_memory_allocated): what offload is for. On CPU host and device
                        are the same memory: these rows show the cost of the extra staging copies
                        (time) and that the peak stays that of streaming, nothing is saved;
  compiled:<q>          the same with `compile=True`; each child first does one warm-up compiled load
                        with an empty inductor cache (a cold first compile), excluded from the table
                        and reported as compile_seconds;
  prequantized:<q>      load_model of the fp8 checkpoint `streamquant quantize` made of the same checkpoint
                        (compressed-tensors, written once before any timing, cached beside it): codes and
                        scales loaded as they are, nothing quantized;
  prequantized-hf:fp8-block  the same from the hf-fp8 checkpoint (`weight_scale_inv`, DeepSeek's own format);
  transformers+torchao  from_pretrained with TorchAoConfig(Float8WeightOnlyConfig()).
An exception in a load, or a crashed child, is recorded as the row's error instead of stopping the run.

How: every repeat of every configuration runs in a fresh child (`--one NAME`), repeats round-robin
over the configurations (a slow spell of a shared machine then hits every row alike): RSS high-water marks
and glibc heap state left by one load would contaminate the next. In the child, imports come first,
then the load runs in `streamquant.memory.PeakMemorySampler("cpu")`: anonymous RSS (RssAnon) above
entry, sampled every 5 ms (longer when the loader holds the GIL: see mean_interval_ms in the JSON),
after a `malloc_trim(0)`; file-backed RSS (mmapped checkpoint pages) is reported apart, never added.
Time is `time.perf_counter()` around the load call. Rows show the max peak and median time over
`--repeats`. "trimmed MiB" is anonymous RSS above entry after the load and one more `malloc_trim(0)`:
what the load really keeps; a peak far above it is free memory glibc held (the OS counts it anyway).

Reading the ratios (targets are pass/fail flags; the exit status never depends on them):
  peak/final  peak anonymous RSS / bytes of the model's parameters and buffers; 1.0: the load never
              held more than its result. Naive fp8 holds the whole bf16 model: 1.5-1.8 here, not 2,
              as embeddings and lm_head stay bf16. Target for streaming and compiled rows: <= 1.10.
  time/bf16   median seconds / median seconds of the bf16 load. Below 1 is possible: the floor
              writes every byte into fresh memory, fp8 about half as many. Target: <= 1.2 (issue 23). The
              machine may be shared: the JSON records the load average.
The streaming:fp8 timeline check gives the largest dip below the running max, overall and up to the
peak (dips are staging buffers freed: mid-load when the pool lets one go, at the end when it clears).
transformers+torchao final bytes: the inner `qdata`/`scale` of torchao subclasses (`__tensor_flatten__`),
not the wrapper's `untyped_storage()` (bf16-sized for Float8Tensor). Its unquantized tensors stay mmap
views of the checkpoint (file-backed, not anonymous), so its peak/final can fall below 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from unittest import mock
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, completed_runs, interleaved, machine_info, parse_schemes, select_rows, spawn  # noqa: E402  (benchmarks/common.py, beside this script)

import torch  # noqa: E402

from streamquant.api import load_model  # noqa: E402
from streamquant.checkpoint.reader import checkpoint_bytes, iterate_weights  # noqa: E402
from streamquant.checkpoint.synthetic import (  # noqa: E402
    BENCH_SPECS, default_cache_dir, ensure_synthetic_checkpoint)
from streamquant.memory import PeakMemorySampler, read_rss, trim_heap  # noqa: E402
from streamquant.quant.math.native import build  # noqa: E402

ORDERS = ("shuffled", "by-type")  # streaming rows fed the checkpoint out of layer order
OFFLOAD = ("offload-device", "offload-cpu")  # streaming with offload_before_quant, quantize_on= the suffix
SCHEMES = ("fp8", "fp8-channel", "fp8-block")
TRANSFORMERS = "transformers+torchao"
MARKER, MIB = "PEAK_MEMORY_RESULT ", 2**20
PEAK_TARGET, TIME_TARGET, MONOTONIC_NOISE, TIMELINE_POINTS = 1.10, 1.2, 0.02, 200


def config_names(schemes: list[str]) -> list[str]:
    """Every configuration, in table order."""
    kinds = ("naive", "streaming", "torch-kernels", *OFFLOAD, "compiled", *ORDERS, "prequantized")
    hf_fp8 = ["prequantized-hf:fp8-block"] if "fp8-block" in schemes else []  # the format stores block scales only
    return ["bf16", *(f"{kind}:{q}" for kind in kinds for q in schemes), *hf_fp8, TRANSFORMERS]


def reordered(kind: str):
    """`iterate_weights` replacement yielding the checkpoint out of layer order (lazy mmap views)."""
    def iterate(path):
        items = list(iterate_weights(path))
        if kind == "shuffled":
            random.Random(0).shuffle(items)
        else:  # grouped by parameter type across layers, as TensorRT-LLM's test sends them
            items.sort(key=lambda kv: (kv[0].split(".")[-2:], kv[0]))
        return iter(items)
    return iterate


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct storages behind parameters and buffers, looking inside tensor subclasses."""
    seen, total, stack = set(), 0, [*module.parameters(), *module.buffers()]
    while stack:
        t = stack.pop()
        if hasattr(t, "__tensor_flatten__"):  # torchao Float8Tensor: inner qdata and scale
            names, _ = t.__tensor_flatten__()
            stack += [getattr(t, n) for n in names]
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def timeline_stats(timeline: tuple[tuple[float, int], ...]) -> dict:
    """Largest drop below the running max, overall and before the peak, and a thinned timeline.

    Drops are computed on the full timeline; the thinned copy (<= 200 points) keeps the peak. The
    sampler thread needs the GIL, so its real interval can exceed 5 ms: `mean_interval_ms` says.
    """
    peak_at = max(range(len(timeline)), key=lambda i: timeline[i][1], default=0)
    running, drop, drop_before_peak = 0, 0, 0
    for i, (_, b) in enumerate(timeline):
        running = max(running, b)
        drop = max(drop, running - b)
        drop_before_peak = drop if i <= peak_at else drop_before_peak
    step = max(1, -(-len(timeline) // (TIMELINE_POINTS - 1)))
    keep = sorted(set(range(0, len(timeline), step)) | ({peak_at} if timeline else set()))
    span = timeline[-1][0] if timeline else 0.0
    return {"max_drop_mib": drop / MIB, "max_drop_before_peak_mib": drop_before_peak / MIB, "samples": len(timeline),
            "mean_interval_ms": 1000 * span / max(len(timeline) - 1, 1),
            "timeline": [(round(timeline[i][0], 4), round(timeline[i][1] / MIB, 2)) for i in keep]}


def prequantized_checkpoint(path: Path, scheme: str, fmt: str = "compressed-tensors") -> Path:
    """`streamquant quantize` output of `path` for `scheme` in format `fmt`, made once and cached beside it."""
    from streamquant.offline import quantize_checkpoint

    target = path.parent / f"{path.name}-{scheme}-{fmt}"
    if not (target / "config.json").exists():
        quantize_checkpoint(path, target, scheme, format=fmt, overwrite=True)
    return target


PREQUANTIZED_FORMATS = {"prequantized": "compressed-tensors", "prequantized-hf": "hf-fp8"}


def load_once(name: str, path: Path, device: str = "cpu") -> tuple[torch.nn.Module, float]:
    """Load with configuration `name`; returns (model, seconds)."""
    if name == TRANSFORMERS:
        from torchao.quantization import Float8WeightOnlyConfig
        from transformers import AutoModelForCausalLM, TorchAoConfig

        config = TorchAoConfig(Float8WeightOnlyConfig())
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config,
                                                     device_map=device)
        return model, time.perf_counter() - start
    kind, _, scheme = name.partition(":")
    if kind in PREQUANTIZED_FORMATS:
        fp8_path = prequantized_checkpoint(path, scheme, PREQUANTIZED_FORMATS[kind])  # made by the parent
        start = time.perf_counter()
        return load_model(fp8_path, device=device), time.perf_counter() - start
    if kind == "torch-kernels":  # this child runs the pure-torch kernels (read per call)
        os.environ[build.ENV], kind = "torch", "streaming"
    kwargs = {"compile": True} if kind == "compiled" else {}
    if kind in OFFLOAD:
        kwargs.update(offload_before_quant=True, quantize_on=kind.removeprefix("offload-"))
    order = mock.patch("streamquant.api.iterate_weights", reordered(kind)) if kind in ORDERS else nullcontext()
    with order:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "offload_before_quant=True with a CPU target")
            model = load_model(path, quantization=scheme or None, dtype="bfloat16", device=device,
                               streaming=kind != "naive", **kwargs)
        return model, time.perf_counter() - start


def run_one(name: str, path: Path, device: str = "cpu") -> dict:
    """One measured load in this process (the `--one` child); returns one result row."""
    if name == TRANSFORMERS:  # imports stay outside the timed, sampled load (streamquant's are at the top)
        import torchao.quantization  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
    row: dict = {"name": name}
    if name.startswith("compiled:"):  # warm-up: the model is dropped at once, its time kept
        row["compile_seconds"] = load_once(name, path, device)[1]
        gc.collect()  # a cycle in the warm-up model must not be freed during the measured load
    try:
        with PeakMemorySampler(device) as sampler:
            model, row["load_seconds"] = load_once(name, path, device)
    except Exception as exc:  # transformers+torchao may not run here: record it, do not crash
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    peak, report = sampler.result, getattr(model, "load_report", None)
    trim_heap()  # what stays resident once glibc gives back what it kept: live data, not heap retention
    row.update(peak_bytes=peak.peak_bytes, file_backed_peak_bytes=peak.file_backed_peak_bytes,
               anon_after_trim_bytes=read_rss()[0] - peak.baseline_bytes if device == "cpu" else None,
               method=peak.method, model_bytes=report.model_bytes if report else tensor_bytes(model),
               model_bytes_method="load_report.model_bytes" if report else "inner tensors of subclasses",
               **timeline_stats(peak.timeline))
    return row


def spawn_one(name: str, spec: str, device: str = "cpu") -> dict:
    """Run `--one name` in a fresh interpreter with a cold inductor cache."""
    with tempfile.TemporaryDirectory(prefix="peak_memory_inductor_") as cache:
        return spawn(__file__, MARKER, name, spec, {"TORCHINDUCTOR_CACHE_DIR": cache}, ("--device", device))


def summarize(name: str, runs: list[dict]) -> dict:
    """Max peak and median time over the repeats of one configuration."""
    ok, failed = completed_runs(name, runs)
    if failed:
        return failed
    worst = max(ok, key=lambda r: r["peak_bytes"])  # its timeline, model bytes and method are reported
    row = {**worst, "name": name, "repeats": len(ok),
           "file_backed_peak_bytes": max(r["file_backed_peak_bytes"] or 0 for r in ok),
           "peak_bytes_all": [r["peak_bytes"] for r in ok],
           "load_seconds": statistics.median(r["load_seconds"] for r in ok),
           "load_seconds_all": [r["load_seconds"] for r in ok]}
    if "compile_seconds" in worst:
        row["compile_seconds"] = statistics.median(r["compile_seconds"] for r in ok)
    if len(ok) < len(runs):
        row["failed_repeats"] = [r["error"] for r in runs if "error" in r]
    return row


def add_ratios(rows: list[dict]) -> None:
    """peak/final, time/bf16 and, for streaming rows, the target flags."""
    floor = rows[0].get("load_seconds")
    for row in rows:
        if "error" in row:
            continue
        row["peak_ratio"] = row["peak_bytes"] / row["model_bytes"]
        row["time_ratio"] = row["load_seconds"] / floor if floor else float("nan")  # nan: bf16 failed
        if row["name"].startswith(("streaming:", "compiled:", "torch-kernels:")):
            row["targets"] = {f"peak_ratio<={PEAK_TARGET}": row["peak_ratio"] <= PEAK_TARGET,
                              f"time_ratio<={TIME_TARGET}": row["time_ratio"] <= TIME_TARGET}


def print_table(rows: list[dict]) -> None:
    head = ("config", "peak anon MiB", "final MiB", "peak/final", "file peak MiB", "load s", "time/bf16", "trimmed MiB")
    print("{:<22}{:>14}{:>11}{:>11}{:>15}{:>9}{:>10}{:>13}".format(*head))
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<22}  FAILED: {r['error'][:300]}")
            continue
        extra = f"  (+{r['compile_seconds']:.1f} s warm-up compile, excluded)" if "compile_seconds" in r else ""
        print(f"{r['name']:<22}{r['peak_bytes'] / MIB:>14.1f}{r['model_bytes'] / MIB:>11.1f}{r['peak_ratio']:>11.2f}"
              f"{r['file_backed_peak_bytes'] / MIB:>15.1f}{r['load_seconds']:>9.2f}{r['time_ratio']:>10.2f}"
              f"{(r['anon_after_trim_bytes'] or 0) / MIB:>13.1f}{extra}")


def print_verdicts(rows: list[dict]) -> dict | None:
    """Target lines for streaming rows and the monotonicity check of streaming:fp8; returns the latter."""
    for r in rows:
        for target, ok in r.get("targets", {}).items():
            print(f"target {r['name']:<22} {target:<18} {'PASS' if ok else 'FAIL'}")
    row = next((r for r in rows if r["name"] == "streaming:fp8" and "error" not in r), None)
    if row is None:
        return None
    allowed = MONOTONIC_NOISE * row["peak_bytes"] / MIB
    check = {"max_drop_mib": row["max_drop_mib"], "max_drop_before_peak_mib": row["max_drop_before_peak_mib"],
             "allowed_drop_mib": allowed, "monotonic": row["max_drop_mib"] <= allowed,
             "monotonic_until_peak": row["max_drop_before_peak_mib"] <= allowed}
    verdict = {True: "monotonic", False: "NOT monotonic"}
    print(f"streaming:fp8 timeline (allowed drop {allowed:.1f} MiB = 2% of peak): max drop below running max "
          f"{check['max_drop_mib']:.1f} MiB: {verdict[check['monotonic']]}; up to the peak "
          f"{check['max_drop_before_peak_mib']:.1f} MiB: {verdict[check['monotonic_until_peak']]}")
    return check


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--spec", default="bench", metavar="SPEC[,SPEC]",
                        help="synthetic checkpoint(s), comma-separated, measured in one run with repeats interleaved: "
                             "bench (28 layers, hidden 1024, ~1 GB bf16), demo (12 layers, ~400 MB), 7b-2layer (two "
                             "layers of Qwen2-7B's shapes, hidden 3584 / intermediate 18944, ~1 GB) or 7b (all 28 "
                             "such layers, vocab 152064, ~15.2 GB: needs ~16 GB free memory and disk) or "
                             "deepseek-v3-3layer (three layers of DeepSeek-V3's shapes, one dense and two MoE of 16 "
                             "experts, ~5.8 GB: the naive row needs ~9 GB free)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh child processes per configuration (default 3)")
    parser.add_argument("--schemes", default="fp8", help=f"comma-separated subset of {','.join(SCHEMES)} for the "
                                                         "naive/streaming/compiled rows (default fp8)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "peak_memory.json",
                        help="where to write the results (default benchmarks/results/peak_memory.json)")
    parser.add_argument("--only", default=None, metavar="KINDS",
                        help="comma-separated row kinds to run (e.g. streaming,offload-device,offload-cpu); the bf16 "
                             "floor always runs (default: every row)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="load target (default cpu); cuda: peaks are device peaks (allocator high-water mark)")
    parser.add_argument("--one", metavar="NAME", help="internal: run one configuration in this process, print one "
                                                      "JSON line (NAME: bf16, naive:fp8, ..., transformers+torchao)")
    args = parser.parse_args(argv)
    specs = [x.strip() for x in args.spec.split(",") if x.strip()]
    if not specs or set(specs) - set(BENCH_SPECS):
        parser.error(f"--spec takes some of {','.join(BENCH_SPECS)}, got {args.spec!r}")
    paths = {spec: ensure_synthetic_checkpoint(default_cache_dir(), BENCH_SPECS[spec]) for spec in specs}
    if args.one:
        print(MARKER + json.dumps(run_one(args.one, paths[specs[0]], args.device)), flush=True)
        return
    schemes = parse_schemes(parser, args.schemes, SCHEMES, args.repeats)
    machine = machine_info()
    sizes = ", ".join(f"{spec}: {paths[spec]} ({checkpoint_bytes(paths[spec]) / MIB:.1f} MiB)" for spec in specs)
    print(banner(machine, f"checkpoints {sizes}", args.repeats), flush=True)
    names = select_rows(config_names(schemes), args.only, always=("bf16",))
    keys = [f"{spec}/{name}" for spec in specs for name in names]
    for key in keys:  # fp8 checkpoints for the prequantized rows, before any timing
        spec_name, _, row_name = key.partition("/")
        kind, _, scheme = row_name.partition(":")
        if kind in PREQUANTIZED_FORMATS:
            prequantized_checkpoint(paths[spec_name], scheme, PREQUANTIZED_FORMATS[kind])
    runs = interleaved(keys, args.repeats, lambda key: spawn_one(key.split("/")[1], key.split("/")[0], args.device))
    results = {}
    for spec in specs:
        rows = [summarize(name, runs[f"{spec}/{name}"]) for name in names]
        add_ratios(rows)
        print(f"\n--spec {spec}: {paths[spec]}")
        print_table(rows)
        monotonic = print_verdicts(rows)
        rows = [r if r["name"] == "streaming:fp8" else {k: v for k, v in r.items() if k != "timeline"} for r in rows]
        results[spec] = {"checkpoint": str(paths[spec]), "checkpoint_bytes": checkpoint_bytes(paths[spec]),
                         "rows": rows, "streaming_fp8_timeline_check": monotonic}
    result = {"device": args.device, "machine": {**machine, "loadavg_1m_at_end": os.getloadavg()[0]},
              "repeats": args.repeats, "schemes": schemes, "specs": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")

if __name__ == "__main__":
    main()
