"""W4A16 decode on CPU: bf16 beside int4 dequantize-then-matmul and int4 through torch's CPU int4 kernel.

Rows (each repeat of each row in a fresh child, round-robin over rows; medians over `--repeats` of
each child's numbers, which are the fastest of their timed calls: other processes on a shared
machine only add time):
  demo:<path>     the demo checkpoint (`DEMO_SPEC`: 12 Llama layers, hidden 1024, intermediate 2816,
                  vocab 32000): model MiB (`load_report.model_bytes`), decode tokens/s at batch 1 (greedy,
                  after a 16-token prompt: `(N - 1) / (t(N new tokens) - t(1 new token))`, so the
                  prompt's prefill is not in it; fastest of 2 and of 3 calls), prefill tokens/s (one
                  forward over 256 tokens, fastest of 2), and the logits of a fixed [1, 32] sequence against
                  the bf16 model's and the int4-dequantize model's (relative Frobenius error);
  layers:<path>   the linear layers of a 7B Llama decoder layer, one at a time, batch 1: [4096, 4096]
                  (q, k, v, o), [11008, 4096] (gate, up), [4096, 11008] (down), each a streamquant
                  `ReplicatedLinear` (bf16, or int4 group 128 loaded through its loader): ms per call
                  (fastest of `--calls`),
                  and bytes per weight element (the int4 tensors, plus the kernel's copy for int4-kernel).
                  `7B linears tok/s` = 1 / (32 x (4 t_4096x4096 + 2 t_11008x4096 + t_4096x11008)): the
                  linear layers of a 32-layer 7B model only (no attention, norms, embeddings or LM head).
Paths: bf16 (unquantized), int4-dequantize (`int4_kernel=False`: unpack and dequantize at each
call), int4-kernel (`int4_kernel=True`, the default: `quant/scaled/int4_kernel.py`). A row name with
`@avx2` appended runs with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (torch's and oneDNN's
AVX2 kernels on an AVX-512 machine: what an AVX2-only CPU runs, at this machine's clock and memory).
Writes `--json` (default benchmarks/results/int4_decode.json).
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

MARKER = "INT4_DECODE_BENCH "
PATHS = {"bf16": None, "int4-dequantize": False, "int4-kernel": True}  # path -> int4_kernel
KINDS = ("demo", "layers")
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
LAYER_SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "4096x11008": (4096, 11008)}
LAYERS_7B, PER_LAYER_7B = 32, {"4096x4096": 4, "11008x4096": 2, "4096x11008": 1}
GROUP = 128
PREFILL = 256  # prompt tokens of the demo's prefill row (the kernel's cost grows with the rows; bf16's less)


def _fastest_seconds(fn, calls: int) -> float:
    """The fastest of `calls` timed calls after a warm-up (first-call allocations): on a shared machine
    other processes only ever add time, so the fastest call is the least disturbed one."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _options(path: str) -> dict:
    kernel = PATHS[path]
    return {} if kernel is None else {"quantization": "int4", "int4_kernel": kernel}


def _logits_file(logits_dir: Path, name: str) -> Path:
    return logits_dir / (name.replace(":", "_").replace("@", "_") + ".pt")


def run_demo(name: str, path: str, new: int, logits_dir: Path) -> dict:
    import torch

    from streamquant import load_model
    from streamquant.checkpoint.synthetic import DEMO_SPEC, default_cache_dir, ensure_synthetic_checkpoint
    from streamquant.inference.generation import generate

    ckpt = ensure_synthetic_checkpoint(Path(os.environ.get("STREAMQUANT_CACHE") or default_cache_dir()), DEMO_SPEC)
    model = load_model(ckpt, **_options(path))
    prompt = torch.randint(0, DEMO_SPEC.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        one = _fastest_seconds(lambda: generate(model, prompt, 1), 3)
        many = _fastest_seconds(lambda: generate(model, prompt, new), 2)
        sequence = torch.randint(0, DEMO_SPEC.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
        torch.save(model(sequence).float(), _logits_file(logits_dir, name))
        long = torch.randint(0, DEMO_SPEC.vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(4))
        prefill = _fastest_seconds(lambda: model(long), 2)
    return {"model_bytes": model.load_report.model_bytes, "decode_tokens_per_s": (new - 1) / (many - one),
            "prefill_tokens_per_s": PREFILL / prefill}


def run_layers(path: str, calls: int) -> dict:
    import torch

    from streamquant.layers.linear import ReplicatedLinear
    from streamquant.quant.scaled.config import ScaledConfig

    row = {}
    for label, (out, inp) in LAYER_SHAPES.items():
        kernel = PATHS[path]
        config = None if kernel is None else ScaledConfig("int4", group_size=GROUP, int4_kernel=kernel)
        layer = ReplicatedLinear(inp, out, quant_config=config, params_dtype=torch.bfloat16)
        w = (torch.randn(out, inp, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
        slot = layer.checkpoint_params["weight"] if config is not None else layer.weight
        with torch.no_grad():
            slot.weight_loader(slot, w)
        layer.quant_method.process_weights_after_loading(layer)
        del w
        x = torch.randn(1, inp, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        with torch.inference_mode():
            row[f"ms_{label}"] = 1e3 * _fastest_seconds(lambda: layer(x), calls)
        kept = [t for n, t in [*layer.named_parameters(), *layer.named_buffers()] if not t.is_meta]
        row[f"bytes_per_weight_{label}"] = sum(t.numel() * t.element_size() for t in kept) / (out * inp)
        del layer
    step = LAYERS_7B * sum(n * row[f"ms_{label}"] for label, n in PER_LAYER_7B.items()) / 1e3
    row["linears_7b_tokens_per_s"] = 1 / step
    return row


def run_one(name: str, new: int, calls: int, logits_dir: Path) -> dict:
    kind, _, path = name.partition(":")
    path = path.partition("@")[0]
    row = run_demo(name, path, new, logits_dir) if kind == "demo" else run_layers(path, calls)
    return {"name": name, **row}


def summarize(results: dict[str, list[dict]], logits_dir: Path) -> list[dict]:
    """Medians per row, ratios to the bf16 row of the same kind and ISA, logit errors of the demo rows."""
    import torch

    rows = []
    for name, runs in results.items():
        ok, failed = completed_runs(name, runs)
        rows.append(failed or {"name": name, "repeats": len(ok),
                               **{k: statistics.median(r[k] for r in ok) for k in ok[0] if k != "name"}})
    by_name = {r["name"]: r for r in rows if "error" not in r}
    for row in by_name.values():
        kind, _, rest = row["name"].partition(":")
        path, _, isa = rest.partition("@")
        base = by_name.get(f"{kind}:bf16" + (f"@{isa}" if isa else ""))
        key = "decode_tokens_per_s" if kind == "demo" else "linears_7b_tokens_per_s"
        if base:
            row["speed_over_bf16"] = row[key] / base[key]
        if kind == "demo" and path != "bf16":
            logits = torch.load(_logits_file(logits_dir, row["name"]))
            for ref in ("bf16", "int4-dequantize"):
                other = _logits_file(logits_dir, f"demo:{ref}" + (f"@{isa}" if isa else ""))
                if other.exists() and ref != path:
                    other = torch.load(other)
                    row[f"logits_rel_err_vs_{ref}"] = float((logits - other).norm() / other.norm())
    return rows


def print_table(rows: list[dict]) -> None:
    demo = [r for r in rows if r["name"].startswith("demo:")]
    layers = [r for r in rows if r["name"].startswith("layers:")]
    fmt = lambda v: f"{v:>12.4g}" if isinstance(v, (int, float)) else f"{'-':>12}"  # noqa: E731
    if demo:
        head = ["model MiB", "decode t/s", "/ bf16", "prefill t/s", "err vs bf16", "err vs deq"]
        print(f"{'demo (batch 1)':<28}" + "".join(f"{h:>12}" for h in head))
        for r in demo:
            if "error" in r:
                print(f"{r['name']:<28}  error: {r['error'][:100]}")
                continue
            cells = [r["model_bytes"] / 2**20, r["decode_tokens_per_s"], r.get("speed_over_bf16"),
                     r["prefill_tokens_per_s"], r.get("logits_rel_err_vs_bf16"), r.get("logits_rel_err_vs_int4-dequantize")]
            print(f"{r['name']:<28}" + "".join(fmt(c) for c in cells))
    if layers:
        head = [*(f"ms {s}" for s in LAYER_SHAPES), "B/weight", "7B lin t/s", "/ bf16"]
        print(f"\n{'7B layer shapes (batch 1)':<28}" + "".join(f"{h:>15}" for h in head))
        for r in layers:
            if "error" in r:
                print(f"{r['name']:<28}  error: {r['error'][:100]}")
                continue
            cells = [*(r[f"ms_{s}"] for s in LAYER_SHAPES), r["bytes_per_weight_4096x4096"],
                     r["linears_7b_tokens_per_s"], r.get("speed_over_bf16")]
            print(f"{r['name']:<28}" + "".join(f"{c:>15.4g}" if c is not None else f"{'-':>15}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [f"{k}:{p}" for k in KINDS for p in PATHS]
    parser.add_argument("--rows", default=",".join(names + [f"layers:{p}@avx2" for p in PATHS]),
                        help=f"comma-separated rows among {', '.join(names)}, each optionally with @avx2")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--calls", type=int, default=10, help="timed calls per layer shape (median)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results") / "int4_decode.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)  # common.spawn passes one; the rows name their shapes
    parser.add_argument("--logits-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(MARKER + json.dumps(run_one(args.one, args.new_tokens, args.calls, args.logits_dir)), flush=True)
        return
    rows = [n.strip() for n in args.rows.split(",") if n.strip()]
    if not rows or {r.partition("@")[0] for r in rows} - set(names) or {r.partition("@")[2] for r in rows} - {"", "avx2"} \
            or args.repeats < 1 or args.new_tokens < 2:
        parser.error(f"--rows must name some of {', '.join(names)} (optionally @avx2); --repeats >= 1; --new-tokens >= 2")
    for row in list(rows):  # each kind's bf16 row is its ratios' base
        kind, _, rest = row.partition(":")
        base = f"{kind}:bf16" + rest[rest.index("@"):] if "@" in rest else f"{kind}:bf16"
        if base not in rows:
            rows.insert(0, base)
    machine = machine_info()
    print(banner(machine, "int4 (W4A16) decode: bf16, int4-dequantize, int4-kernel", args.repeats), flush=True)
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        extra = ("--new-tokens", str(args.new_tokens), "--calls", str(args.calls), "--logits-dir", tmp)
        results = interleaved(rows, args.repeats, lambda n: spawn(script, MARKER, n, "demo", args=extra,
                                                                  env=AVX2_ENV if n.endswith("@avx2") else None))
        summary = summarize(results, Path(tmp))
    print()
    print_table(summary)
    write_results(args.json, machine, new_tokens=args.new_tokens, group_size=GROUP, rows=summary)


if __name__ == "__main__":
    main()
