"""Bytes and seconds per refit of a real optimizer loop: fp8 delta sync beside the full fp8 send and the bf16 send.

The trainer (rank 0, one process) is a transformers Llama built from the synthetic demo checkpoint
(`--spec demo`: 12 layers, hidden 1024, vocab 32000, ~200M parameters; any key of BENCH_SPECS), fp32 master
weights, `torch.optim.Adam` at each learning rate of `--lrs` (default 1e-6,1e-5; a fresh trainer per
rate), taking `--steps` steps of a language-modelling loss on seeded random token batches. After every
step it refits the inference side (rank 1, `--scheme` fp8-block, TP=1, over gloo) three or four ways,
one after the other, each to its own WeightReceiver:
  bf16         WeightSender(dtype=bf16): every weight in bf16, quantized by the receiver;
  fp8          WeightSender(quantization=plan): every fp8 code, scale and bf16 weight, quantized on the
               trainer, installed as they are (into the same model as bf16);
  delta        WeightSender(quantization=plan, delta=True): only what changed since the last step, the
               receiver's copy rebuilt and checked against the sender's SHA-256 digests, only the changed
               tensors loaded (into a model of its own); its first step is a full send;
  delta-nodig  the same with fingerprint=False (no digests: what hashing costs), into a third model.
Per row: MiB on the wire (`SyncStats.bytes`, headers included), seconds of the refit (`SyncStats.seconds`:
quantization, encoding and digests on the trainer, transfer, and the receiver's apply -- the send ends
with the receivers' reports), and from the delta's own changes the fraction of fp8 codes, bf16 values
and scales that changed since the last step. `equal`: the delta model's `weights_fingerprint` equals the
fp8 model's after the step (the same weights, one by deltas, one by full sends).
Writes a table and `--json` (default benchmarks/results/delta_sync.json). On one machine, gloo's loopback
is fast, so seconds here say what encoding and hashing cost, not what a network would save.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, machine_info, write_results  # noqa: E402

MODES = ("bf16", "fp8", "delta", "delta-nodig")
KINDS = {"float8_e4m3fn": "codes", "float32": "scales", "bfloat16": "bf16"}


def changed_fractions(changes) -> dict[str, float | None]:
    """Changed elements / elements, per kind of tensor (fp8 codes, float32 scales, bf16 weights)."""
    counts: dict[str, list[int]] = {kind: [0, 0] for kind in KINDS.values()}
    for c in changes:
        kind = KINDS.get(c.dtype)
        if kind is not None:
            counts[kind][0] += c.count
            counts[kind][1] += c.numel
    return {kind: (n / total if total else None) for kind, (n, total) in counts.items()}


def _senders(checkpoint: str, scheme: str) -> dict:
    import torch

    from streamquant.checkpoint.reader import load_hf_config
    from streamquant.formats import get_format
    from streamquant.offline import QuantizePlan
    from streamquant.rl.sync import WeightSender

    plan = QuantizePlan(load_hf_config(checkpoint), scheme, get_format("compressed-tensors"), torch.bfloat16)
    return {"bf16": WeightSender(src=0, dtype=torch.bfloat16, progress=False),
            "fp8": WeightSender(src=0, quantization=plan, progress=False),
            "delta": WeightSender(src=0, quantization=plan, delta=True, progress=False),
            "delta-nodig": WeightSender(src=0, quantization=plan, delta=True, fingerprint=False, progress=False)}


def _rank(checkpoint: str, scheme: str, lr: float, steps: int, batch: tuple[int, int]) -> list[dict] | None:
    import torch
    import torch.distributed as dist

    from streamquant import load_model, weights_fingerprint
    from streamquant.parallel.context import TPContext
    from streamquant.rl.sync import WeightReceiver

    if dist.get_rank() == 1:
        models = {name: load_model(checkpoint, quantization=scheme, tp=TPContext()) for name in ("fp8", "delta",
                                                                                                  "delta-nodig")}
        models["bf16"] = models["fp8"]
        receivers = {mode: WeightReceiver(src=0) for mode in MODES}
        for _ in range(steps):
            for mode in MODES:
                receivers[mode].reload(models[mode], atomic=False)
            equal = weights_fingerprint(models["delta"]) == weights_fingerprint(models["fp8"])
            dist.gather_object(equal, None, dst=0)
        return None
    import transformers

    torch.manual_seed(0)
    trainer = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    optimizer = torch.optim.Adam(trainer.parameters(), lr=lr)
    senders, g, rows = _senders(checkpoint, scheme), torch.Generator().manual_seed(0), []
    for step in range(steps):
        start = time.perf_counter()
        ids = torch.randint(0, trainer.config.vocab_size, batch, generator=g)
        trainer(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"lr": lr, "step": step, "train_seconds": time.perf_counter() - start}
        for mode in MODES:
            stats = senders[mode].send(trainer.named_parameters())
            row[mode] = {"mib": stats.bytes / 2**20, "header_mib": stats.header_bytes / 2**20,
                         "seconds": stats.seconds, "delta": stats.delta}
            if mode == "delta":
                row["changed"] = changed_fractions(stats.changes) if stats.delta else None
        gathered = [None, None]
        dist.gather_object(None, gathered, dst=0)
        row["equal"] = gathered[1]
        rows.append(row)
        print(f"  lr {lr:g} step {step} done", flush=True)
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3f}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'lr':>6}{'step':>5}{'sync':>6}{'delta MiB':>11}{'fp8 MiB':>9}{'bf16 MiB':>10}{'delta/fp8':>10}"
          f"{'s delta':>9}{'s nodig':>9}{'s fp8':>7}{'s bf16':>8}{'% codes':>9}{'% bf16':>8}{'% scales':>9}"
          f"{'equal':>7}")
    for r in rows:
        changed = r["changed"] or {}
        print(f"{r['lr']:>6g}{r['step']:>5}{'delta' if r['delta']['delta'] else 'full':>6}{r['delta']['mib']:>11.2f}"
              f"{r['fp8']['mib']:>9.1f}{r['bf16']['mib']:>10.1f}{r['delta']['mib'] / r['fp8']['mib']:>10.4f}"
              f"{r['delta']['seconds']:>9.2f}{r['delta-nodig']['seconds']:>9.2f}{r['fp8']['seconds']:>7.2f}"
              f"{r['bf16']['seconds']:>8.2f}{_pct(changed.get('codes')):>9}{_pct(changed.get('bf16')):>8}"
              f"{_pct(changed.get('scales')):>9}{str(r['equal']):>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="demo", help="a key of streamquant.checkpoint.synthetic.BENCH_SPECS")
    parser.add_argument("--scheme", default="fp8-block")
    parser.add_argument("--lrs", default="1e-6,1e-5")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per learning rate (the first "
                        "refit is a full send for the delta senders too)")
    parser.add_argument("--batch", default="4x64", help="token batch per step, BATCHxLENGTH")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results") / "delta_sync.json")
    args = parser.parse_args()

    from streamquant.checkpoint.synthetic import BENCH_SPECS, default_cache_dir, ensure_synthetic_checkpoint
    from streamquant.parallel.launch import launch

    checkpoint = str(ensure_synthetic_checkpoint(default_cache_dir(), BENCH_SPECS[args.spec]))
    batch = tuple(int(x) for x in args.batch.split("x"))
    machine = machine_info()
    print(banner(machine, f"delta sync, {args.spec} Llama, {args.scheme}, Adam lr {args.lrs}, {args.steps} steps",
                 1), flush=True)
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        rows += launch(_rank, 2, checkpoint, args.scheme, lr, args.steps, batch, timeout_s=1800)
    print_table(rows)
    write_results(args.json, machine, spec=args.spec, scheme=args.scheme, batch=list(batch), rows=rows)


if __name__ == "__main__":
    main()
