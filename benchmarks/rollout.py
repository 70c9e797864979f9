"""Rollout throughput: batched sampling (new tokens/s) of streamquant beside transformers' `generate`.

On the synthetic checkpoint of `--spec` (default `demo`, 12 layers of hidden 1024), each row samples
`--new-tokens` (default 32) after random 16-token prompts, temperature 1, no stop tokens, for batch
sizes `--batches` (default 1,8,32):
  streamquant:<q>        `generate_sequences` on the model loaded with quantization q (none = bf16);
  transformers           `AutoModelForCausalLM.generate(do_sample=True)`, bf16, the same prompts;
  tp2:<q> / tp2-invariant:<q>  streamquant at TP=2 (two processes over gloo on this machine), without
                         and with `tp_invariant_activations` (the cost of the extra collective);
  tp2-fp32sum:<q>        TP=2 with float32 partial sums (`TPContext(reduce_dtype=torch.float32)`),
                         bf16 and fp8-block (the latter with tp_invariant_activations too).
Every repeat of every row runs in a fresh child, repeats round-robin; rows report the median new
tokens/s over `--repeats` and the ratio to transformers at the same batch. Writes a table and `--json`.
On CPU, fp8 is a storage format (FORMATS.md: `_scaled_mm` is slower than bf16 here): the fp8 rows
show what dynamic activation quantization and fp8 matmuls cost on CPU, not GPU speed.
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

from common import banner, interleaved, machine_info, spawn, write_results  # noqa: E402

MARKER = "ROLLOUT_BENCH "
PROMPT_LENGTH = 16


def _prompts(vocab: int, batch: int) -> list[list[int]]:
    import torch

    return torch.randint(0, vocab, (batch, PROMPT_LENGTH), generator=torch.Generator().manual_seed(batch)).tolist()


def _tp_rank(path: str, scheme: str, kind: str, batch: int, new: int) -> float:
    from streamquant import load_model
    from streamquant.inference.generation import generate_sequences
    from streamquant.parallel.context import TPContext
    from streamquant.inference.sampling import SamplingParams

    import torch

    wide = kind == "tp2-fp32sum"
    options = {"tp_invariant_activations": True} if kind == "tp2-invariant" or (wide and scheme) else {}
    tp = TPContext.from_process_group(reduce_dtype=torch.float32 if wide else None)
    model = load_model(path, quantization=scheme, tp=tp, **options)
    params = SamplingParams(temperature=1.0, max_new_tokens=new, seed=0, stop_token_ids=())
    start = time.perf_counter()
    generate_sequences(model, _prompts(model.config.vocab_size, batch), params)
    return batch * new / (time.perf_counter() - start)


def run_one(name: str, spec: str, new: int) -> dict:
    import torch

    from streamquant.checkpoint.synthetic import BENCH_SPECS, default_cache_dir, ensure_synthetic_checkpoint

    path = ensure_synthetic_checkpoint(Path(os.environ.get("STREAMQUANT_CACHE") or default_cache_dir()), BENCH_SPECS[spec])
    kind, scheme, batch = name.split(":")
    batch, scheme = int(batch), (None if scheme == "none" else scheme)
    if kind.startswith("tp2"):
        from streamquant.parallel.launch import launch

        return {"name": name, "tokens_per_s": launch(_tp_rank, 2, str(path), scheme, kind, batch, new)}
    if kind == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        ids = torch.tensor(_prompts(model.config.vocab_size, batch))
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                           top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    else:
        from streamquant import load_model
        from streamquant.inference.generation import generate_sequences
        from streamquant.inference.sampling import SamplingParams

        model = load_model(path, quantization=scheme)
        params = SamplingParams(temperature=1.0, max_new_tokens=new, seed=0, stop_token_ids=())
        prompts = _prompts(model.config.vocab_size, batch)
        start = time.perf_counter()
        generate_sequences(model, prompts, params)
    return {"name": name, "tokens_per_s": batch * new / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="demo")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--schemes", default="none,fp8,fp8-channel,fp8-block")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tp-batch", type=int, default=8, help="batch of the tp2 rows (0: skip them)")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results") / "rollout.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(MARKER + json.dumps(run_one(args.one, args.spec, args.new_tokens)), flush=True)
        return
    batches = [int(b) for b in args.batches.split(",")]
    schemes = [s for s in args.schemes.split(",") if s]
    names = [f"transformers:none:{b}" for b in batches] + [f"streamquant:{s}:{b}" for s in schemes for b in batches]
    if args.tp_batch:
        names += [f"{k}:none:{args.tp_batch}" for k in ("tp2", "tp2-fp32sum")]
        names += [f"{k}:fp8-block:{args.tp_batch}" for k in ("tp2", "tp2-invariant", "tp2-fp32sum")]
    machine = machine_info()
    print(banner(machine, f"rollout throughput on --spec {args.spec}", args.repeats), flush=True)
    script = str(Path(__file__).resolve())
    results = interleaved(names, args.repeats, lambda n: spawn(script, MARKER, n, args.spec,
                                                               args=("--new-tokens", str(args.new_tokens))))
    rows = []
    for name in names:
        ok = [r["tokens_per_s"] for r in results[name] if "error" not in r]
        rows.append({"name": name, "tokens_per_s": statistics.median(ok)} if ok
                    else {"name": name, "error": results[name][-1]["error"]})
    hf = {r["name"].split(":")[2]: r["tokens_per_s"] for r in rows if r["name"].startswith("transformers") and "error" not in r}
    print(f"\n{'row':<30}{'new tok/s':>11}{'x transformers':>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<30}  error: {r['error'][:90]}")
            continue
        base = hf.get(r["name"].split(":")[2])
        r["x_transformers"] = r["tokens_per_s"] / base if base else None
        ratio = f"{r['x_transformers']:.2f}" if base else "-"
        print(f"{r['name']:<30}{r['tokens_per_s']:>11.1f}{ratio:>16}")
    write_results(args.json, machine, spec=args.spec, new_tokens=args.new_tokens, rows=rows)


if __name__ == "__main__":
    main()
