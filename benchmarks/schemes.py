"""Every scheme side by side on one checkpoint, online and pre-quantized: memory, load and reload time, CPU
speed, accuracy.

On the synthetic checkpoint of `--spec` (default `demo`: 12 Llama layers of hidden 1024, ~400 MB in
bf16), one row per scheme (`--rows`, default all): bf16 (none), fp8, fp8-channel, fp8-block, int8
(W8A8: per-token int8 activations, `torch._int_mm`), int8-wo (int8 weights, bf16 activations),
mxfp8, mxfp8-wo, int4 (W4A16, groups of 128, packed), and the torchao presets that run on CPU (`quant/torchao.py`, needs torchao):
ao-int8-wo, ao-int8-dyn, ao-fp8-wo, ao-int4-wo (int4 weights, groups of 32), ao-int8-int4 (int8 dynamic
activations, int4 weights); fp8-wo and fp8-block-wo are fp8 weight-only (bf16 activations); any row
name with `@torch` appended runs that row on the pure-torch CPU kernels (STREAMQUANT_CPU_KERNELS=torch)
beside the native ones. Pre-quantized rows load, with `load_model(dir)` and no quantization argument, what
`quantize_checkpoint` (this tree's writer) made of the same checkpoint in compressed-tensors format, written
once into a temporary directory before any timing: ct-fp8, ct-int8 (`int-quantized`, W8A8),
ct-int4 (`pack-quantized` W4A16, symmetric, groups of 128), ct-int4-asym (the same with zero points).
Each repeat of each row runs in a fresh child (round-robin over rows) that measures:
  model MiB       bytes of the loaded model's storages (`load_report.model_bytes`)
  peak MiB        load peak anon RSS above the child's baseline (`PeakMemorySampler`)
  peak/model      load peak anon RSS over the final model bytes (the streaming promise: near 1)
  load s          seconds of the `load_model` call
  load/bf16       load seconds over the bf16 row's load seconds
  reload/copy     `reload_weights` of the checkpoint's tensors already in memory (bf16), over an
                  in-place copy of the same tensors measured in the same child (the memcpy floor)
  decode b1, b8   new tokens/s of greedy `generate` (16-token prompts, `--new-tokens` new tokens)
  prefill         prompt tokens/s of one forward over [2, 64] tokens
  decode/bf16     decode tokens/s (batch 1) over the bf16 row's
  rel err, top-1, KL   logits of a fixed [2, 64] sequence against the bf16 model's (loaded in the
                  same child after the timings): ||l - l_bf16|| / ||l_bf16||, the share of positions
                  whose argmax agrees, mean KL(p_bf16 || p) in nats
Rows report medians over `--repeats` (`--best`: the fastest repeat's seconds and tokens/s, for a
shared machine whose slow spells only ever add time); the table answers "which scheme makes CPU
decoding faster than bf16, and by how much" in its decode/bf16 column. Writes `--json` (default
benchmarks/results/schemes.json). Measured numbers: README, "Quantization schemes".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, completed_runs, interleaved, machine_info, spawn, write_results  # noqa: E402

MARKER = "SCHEMES_BENCH "
WEIGHT_ONLY = {"activation_scheme": "none"}
ROWS = {"bf16": (None, {}), "fp8": ("fp8", {}), "fp8-wo": ("fp8", WEIGHT_ONLY), "fp8-channel": ("fp8-channel", {}),
        "fp8-block": ("fp8-block", {}), "fp8-block-wo": ("fp8-block", WEIGHT_ONLY),
        "int8": ("int8", {}), "int8-wo": ("int8", WEIGHT_ONLY), "mxfp8": ("mxfp8", {}),
        "mxfp8-wo": ("mxfp8", WEIGHT_ONLY), "int4": ("int4", {}), "ao-int8-wo": ("torchao:int8-weight-only", {}),
        "ao-int8-dyn": ("torchao:int8-dynamic", {}), "ao-fp8-wo": ("torchao:float8-weight-only", {}),
        "ao-int4-wo": ("torchao:int4-weight-only", {}), "ao-int8-int4": ("torchao:int8-dynamic-int4", {})}
PREQUANTIZED = {"ct-fp8": ("fp8", {}), "ct-int8": ("int8", {}),
                "ct-int4": ("int4", {"group_size": 128, "symmetric": True}),
                "ct-int4-asym": ("int4", {"group_size": 128, "symmetric": False})}  # quantize_checkpoint's arguments
ALL_ROWS = (*ROWS, *PREQUANTIZED)
PROMPT, PREFILL, ACCURACY = (16, None), (2, 64), (2, 64)  # (batch, tokens); decode batch from --batches


def _ids(vocab: int, batch: int, tokens: int, seed: int):
    import torch

    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def checkpoint(spec: str) -> Path:
    """The synthetic bf16 checkpoint of `spec` (made once, cached under $STREAMQUANT_CACHE or the default)."""
    from streamquant.checkpoint.synthetic import BENCH_SPECS, default_cache_dir, ensure_synthetic_checkpoint

    cache = Path(os.environ.get("STREAMQUANT_CACHE") or default_cache_dir())
    return ensure_synthetic_checkpoint(cache, BENCH_SPECS[spec])


def write_prequantized(path: Path, names: list[str], directory: Path) -> None:
    """The checkpoints of the pre-quantized rows among `names`, written from `path` into `directory/<row>`."""
    from streamquant.offline import quantize_checkpoint

    for name in names:
        if name in PREQUANTIZED:
            scheme, options = PREQUANTIZED[name]
            quantize_checkpoint(path, directory / name, scheme, **options)


def run_one(name: str, spec: str, new: int, batches: list[int], prequantized_dir: Path | None) -> dict:
    import torch

    from streamquant import load_model
    from streamquant.checkpoint.reader import iterate_weights
    from streamquant.inference.generation import generate
    from streamquant.memory import PeakMemorySampler
    from streamquant.reload import reload_weights

    path = checkpoint(spec)
    base, _, kernels = name.partition("@")
    if kernels:
        os.environ["STREAMQUANT_CPU_KERNELS"] = kernels
    source, (scheme, options) = path, ROWS.get(base, (None, {}))
    if base in PREQUANTIZED:  # codes and scales read as they are: no quantization argument
        source = prequantized_dir / base
    with PeakMemorySampler("cpu") as sampler:
        start = time.perf_counter()
        model = load_model(source, quantization=scheme, **options)
        load_s = time.perf_counter() - start
    row = {"name": name, "load_s": load_s, "peak_bytes": sampler.result.peak_bytes,
           "model_bytes": model.load_report.model_bytes}
    items = [(n, t.to(torch.bfloat16) if t.is_floating_point() else t.clone()) for n, t in iterate_weights(path)]
    row["reload_s"] = _seconds(lambda: reload_weights(model, items))
    copies = [torch.empty_like(t) for _, t in items]
    row["copy_s"] = _seconds(lambda: [c.copy_(t) for c, (_, t) in zip(copies, items)])
    del copies, items
    vocab = model.config.vocab_size
    with torch.inference_mode():
        prefill = _ids(vocab, *PREFILL, seed=1)
        model(prefill[:1, :8])  # warm-up: first-call allocations
        row["prefill_tokens_per_s"] = prefill.numel() / _seconds(lambda: model(prefill))
        for batch in batches:
            prompt = _ids(vocab, batch, PROMPT[0], seed=2)
            row[f"decode_b{batch}_tokens_per_s"] = batch * new / _seconds(lambda: generate(model, prompt, new))
        sequence = _ids(vocab, *ACCURACY, seed=3)
        logits = model(sequence).float()
        del model
        reference = load_model(path)(sequence).float()
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    row["rel_err"] = float((logits - reference).norm() / reference.norm())
    row["top1_agree"] = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    row["kl"] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return row


def summarize(results: dict[str, list[dict]], best: bool = False) -> list[dict]:
    """Median of every measured number per row (`best`: the minimum of seconds, the maximum of tokens/s),
    then the ratios to the bf16 row and to the copy floor."""
    rows = []
    for name, runs in results.items():
        ok, failed = completed_runs(name, runs)
        if failed:
            rows.append(failed)
            continue
        row = {"name": name, "repeats": len(ok)}
        for key in ok[0]:
            if key != "name":
                pick = (max if key.endswith("_per_s") else min if key.endswith("_s") else statistics.median) \
                    if best else statistics.median
                row[key] = pick(r[key] for r in ok)
        row["reload_over_copy"] = statistics.median(r["reload_s"] / r["copy_s"] for r in ok)
        row["peak_over_model"] = row["peak_bytes"] / row["model_bytes"]
        rows.append(row)
    base = next((r for r in rows if r["name"] == "bf16" and "error" not in r), None)
    for row in rows:
        if base and "error" not in row:
            row["load_over_bf16"] = row["load_s"] / base["load_s"]
            decode = [k for k in row if k.startswith("decode_b")]
            for key in decode:
                row[key.replace("_tokens_per_s", "_over_bf16")] = row[key] / base[key]
    return rows


def print_table(rows: list[dict], batches: list[int]) -> None:
    head = ["row", "model MiB", "peak MiB", "peak/model", "load s", "load/bf16", "reload/copy",
            *(f"dec b{b} t/s" for b in batches), "prefill t/s", *(f"dec b{b}/bf16" for b in batches),
            "rel err", "top-1", "KL"]
    print("".join(f"{h:>13}" if i else f"{h:<13}" for i, h in enumerate(head)))
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<13}  error: {r['error'][:100]}")
            continue
        cells = [r["model_bytes"] / 2**20, r["peak_bytes"] / 2**20, r["peak_over_model"], r["load_s"],
                 r.get("load_over_bf16"), r["reload_over_copy"],
                 *(r[f"decode_b{b}_tokens_per_s"] for b in batches), r["prefill_tokens_per_s"],
                 *(r.get(f"decode_b{b}_over_bf16") for b in batches), r["rel_err"], r["top1_agree"], r["kl"]]
        text = [f"{c:>13.4g}" if c is not None else f"{'-':>13}" for c in cells]
        print(f"{r['name']:<13}" + "".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="demo", help="synthetic checkpoint (demo, bench, 7b-2layer, 7b)")
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated rows of {', '.join(ALL_ROWS)}")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--best", action="store_true", help="report the fastest repeat's seconds and tokens/s, "
                                                            "not the median")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results") / "schemes.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--prequantized-dir", type=Path, help=argparse.SUPPRESS)  # the child's: where the parent wrote
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.one:
        row = run_one(args.one, args.spec, args.new_tokens, batches, args.prequantized_dir)
        print(MARKER + json.dumps(row), flush=True)
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    if not names or {n.removesuffix("@torch") for n in names} - set(ALL_ROWS) or args.repeats < 1 or not batches:
        parser.error(f"--rows must name some of {', '.join(ALL_ROWS)}; --repeats >= 1; --batches non-empty")
    if "bf16" not in names:
        names.insert(0, "bf16")  # the ratios' base
    machine = machine_info()
    print(banner(machine, f"schemes on --spec {args.spec}", args.repeats), flush=True)
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="schemes_prequantized_") as directory:
        write_prequantized(checkpoint(args.spec), [n.removesuffix("@torch") for n in names], Path(directory))
        extra = ("--new-tokens", str(args.new_tokens), "--batches", args.batches, "--prequantized-dir", directory)
        results = interleaved(names, args.repeats, lambda n: spawn(script, MARKER, n, args.spec, args=extra))
    rows = summarize(results, args.best)
    print()
    print_table(rows, batches)
    write_results(args.json, machine, spec=args.spec, new_tokens=args.new_tokens,
                  statistic="best" if args.best else "median", rows=rows)


if __name__ == "__main__":
    main()
