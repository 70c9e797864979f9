"""Per-shard vs one shared per-tensor scale for fused layers (q/k/v, gate/up): the accuracy effect.

streamquant gives each logical shard of a fused parameter its own scale (q, k and v quantized as
the separate layers they are in the checkpoint). vLLM's online fp8 uses one scale over the fused
weight, so a shard with smaller weights than its neighbours gets fewer fp8 codes. This measures
the signal-to-quantization-noise ratio (dB, higher is better) of each shard under both choices,
for fused weights whose shards differ in magnitude by a factor r (r = 1: identical statistics).
fp8 is a floating-point format, so a shared scale costs nothing until the smaller shard's values
fall into e4m3's subnormal range (about 2^8 below the largest value): what matters is the ratio
between the largest element of the fused weight (an outlier in q, say) and a shard's typical
values.

Only per-tensor scales are affected: per-channel scales are per row either way, and 128x128
blocks differ only in tiles straddling a shard boundary.

    python benchmarks/fused_scales.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from streamquant.quant.math.quantize import dequantize, quantize
from streamquant.quant.math.granularity import PerTensor

SHARDS = {"q": 4096, "k": 1024, "v": 1024}  # rows of a GQA q/k/v projection (hidden 4096, 8 kv heads)
HIDDEN = 4096


def sqnr_db(w: torch.Tensor, deq: torch.Tensor) -> float:
    w64 = w.double()
    return float(10 * torch.log10(w64.square().sum() / (w64 - deq.double()).square().sum()))


def measure(ratio: float, seed: int = 0) -> dict[str, dict[str, float]]:
    """SQNR per shard; the k and v shards' weights are `ratio` times smaller than q's."""
    gen = torch.Generator().manual_seed(seed)
    parts = {name: torch.randn(rows, HIDDEN, generator=gen) * (1.0 if name == "q" else 1.0 / ratio)
             for name, rows in SHARDS.items()}
    parts = {name: (w * 0.02).to(torch.bfloat16) for name, w in parts.items()}
    fused = torch.cat(list(parts.values()))
    q, s = quantize(fused, PerTensor())
    shared = dequantize(q, s, PerTensor(), torch.float32).split(list(SHARDS.values()))
    out = {}
    for (name, w), deq_shared in zip(parts.items(), shared):
        qs, ss = quantize(w, PerTensor())
        out[name] = {"per_shard": sqnr_db(w, dequantize(qs, ss, PerTensor(), torch.float32)),
                     "shared": sqnr_db(w, deq_shared)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results") / "fused_scales.json")
    args = parser.parse_args()
    results = {str(r): measure(r) for r in (1.0, 16.0, 256.0, 1024.0, 4096.0)}
    print(f"{'k,v smaller by':>14} {'shard':>6} {'per-shard dB':>13} {'shared dB':>10} {'loss dB':>8}")
    for ratio, shards in results.items():
        for name, v in shards.items():
            print(f"{ratio:>14} {name:>6} {v['per_shard']:>13.2f} {v['shared']:>10.2f} "
                  f"{v['per_shard'] - v['shared']:>8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"shards": SHARDS, "hidden": HIDDEN, "sqnr_db": results}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
