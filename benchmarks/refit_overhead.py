"""Per-tensor cost of a refit on MoE models with many experts: the loader's bookkeeping beside a bare copy.

An MoE checkpoint names every expert's gate / up / down projection apart (a 128-expert, 48-layer model:
18,432 tensors), so what a reload spends per tensor -- mapping the name, the weight loader, the
coverage check, the finiteness check -- adds up before any weight is quantized. On a Qwen3-MoE with
hidden 64 and `--layers` layers (tiny weights: the work per tensor is almost nil) for each expert count
of `--experts` (default 32,128), one fresh child per row and repeat, median of `--repeats`:
  floor:E            a Python loop of `dst.copy_(src)`, one call per checkpoint tensor into same-shaped
                     preallocated tensors: the least any per-tensor refit can cost;
  reload:q:E         `reload_weights(model, tensors)` into a model loaded with quantization q (none: bf16),
                     best of 3 calls after one warm-up;
  stacked:q:E        the same weights as a transformers 5 trainer holds them: each layer's experts in two
                     stacks (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]),
                     one checkpoint tensor per stack instead of one per expert projection.
Rows report microseconds per tensor, the ratio to the floor at the same expert count (a per-tensor cost
that grows with E is a cost quadratic in the experts), and milliseconds per refit (stacked rows: also
the ratio to the per-expert reload of the same scheme). Writes a table and `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, interleaved, machine_info, spawn  # noqa: E402

MARKER = "REFIT_OVERHEAD "


def checkpoint(root: Path, experts: int, layers: int) -> Path:
    import torch
    import transformers

    out = root / f"qwen3moe-e{experts}-l{layers}"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.Qwen3MoeConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=experts, num_experts_per_tok=8,
            max_position_embeddings=128)
        transformers.Qwen3MoeForCausalLM(config).save_pretrained(out)
    return out


def stacked(tensors: list[tuple[str, "torch.Tensor"]]) -> list[tuple[str, "torch.Tensor"]]:
    """`tensors` with every layer's per-expert projections replaced by transformers 5's two expert stacks."""
    import re

    import torch

    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = []
    for name, t in tensors:
        hit = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if hit is None:
            out.append((name, t))
        else:
            experts.setdefault(hit[1], {})[int(hit[2]), hit[3]] = t
    for prefix, parts in experts.items():
        count = 1 + max(e for e, _ in parts)
        out.append((f"{prefix}.gate_up_proj", torch.stack(
            [torch.cat([parts[e, "gate"], parts[e, "up"]]) for e in range(count)])))
        out.append((f"{prefix}.down_proj", torch.stack([parts[e, "down"] for e in range(count)])))
    return out


def run_one(name: str, root: Path, layers: int) -> dict:
    import torch

    from streamquant import load_model, reload_weights
    from streamquant.checkpoint.reader import iterate_weights

    kind, *rest = name.split(":")
    experts = int(rest[-1])
    path = checkpoint(root, experts, layers)
    tensors = [(n, t.clone()) for n, t in iterate_weights(path)]
    if kind == "stacked":
        tensors = stacked(tensors)
    if kind == "floor":
        targets = [torch.empty_like(t) for _, t in tensors]

        def call():
            for dst, (_, src) in zip(targets, tensors):
                dst.copy_(src)
    else:
        scheme = None if rest[0] == "none" else rest[0]
        model = load_model(path, quantization=scheme)

        def call():
            reload_weights(model, tensors)
    call()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return {"name": name, "tensors": len(tensors), "us_per_tensor": best / len(tensors) * 1e6, "ms_per_refit": best * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default="32,128")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--schemes", default="none,fp8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("/tmp/streamquant-refit-overhead"))
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results") / "refit_overhead.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)  # spawn's calling convention; unused
    args = parser.parse_args()
    if args.one:
        print(MARKER + json.dumps(run_one(args.one, args.root, args.layers)), flush=True)
        return
    experts = [int(e) for e in args.experts.split(",")]
    names = [f"floor:{e}" for e in experts] + [f"{kind}:{q}:{e}" for q in args.schemes.split(",")
                                               for kind in ("reload", "stacked") for e in experts]
    machine = machine_info()
    print(banner(machine, f"refit overhead, Qwen3-MoE hidden 64, {args.layers} layers", args.repeats), flush=True)
    script = str(Path(__file__).resolve())
    extra = ("--layers", str(args.layers), "--root", str(args.root))
    results = interleaved(names, args.repeats, lambda n: spawn(script, MARKER, n, "-", args=extra))
    rows = []
    for name in names:
        ok = [r for r in results[name] if "error" not in r]
        rows.append({"name": name, "tensors": ok[0]["tensors"], "us_per_tensor": statistics.median(
            r["us_per_tensor"] for r in ok), "ms_per_refit": statistics.median(r["ms_per_refit"] for r in ok)}
                    if ok else {"name": name, "error": results[name][-1]["error"]})
    floors = {r["name"].split(":")[-1]: r["us_per_tensor"] for r in rows if r["name"].startswith("floor") and "error" not in r}
    per_expert = {r["name"].partition(":")[2]: r["ms_per_refit"] for r in rows
                  if r["name"].startswith("reload:") and "error" not in r}
    print(f"\n{'row':<22}{'tensors':>9}{'us/tensor':>11}{'x floor':>9}{'ms/refit':>10}{'x reload':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<22}  error: {r['error'][:90]}")
            continue
        floor = floors.get(r["name"].split(":")[-1]) if not r["name"].startswith("stacked:") else None
        r["x_floor"] = r["us_per_tensor"] / floor if floor else None  # stacked: a stack is not one expert tensor
        reload_ms = per_expert.get(r["name"].partition(":")[2]) if r["name"].startswith("stacked:") else None
        r["x_per_expert_reload"] = r["ms_per_refit"] / reload_ms if reload_ms else None
        ratio = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
        print(f"{r['name']:<22}{r['tensors']:>9}{r['us_per_tensor']:>11.1f}{ratio(r['x_floor'], '.1f'):>9}"
              f"{r['ms_per_refit']:>10.1f}{ratio(r['x_per_expert_reload'], '.2f'):>10}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "layers": args.layers, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
