"""Time and peak CPU memory of `reload_weights` (the RL refit path) beside a cold load and a memcpy floor.

A is the synthetic bf16 Llama (BENCH_SPEC: 28 layers, ~1 GB; `--spec demo`: 12 layers, ~400 MB; `--spec
7b-2layer`: two layers of Qwen2-7B's shapes, ~1 GB; `--spec 7b`: all 28, ~15 GB). B has
A's config, shards and names, each tensor A's plus seeded noise w + 0.01 * max(std(w), |mean(w)|) * randn
(the |mean| term changes the RMSNorm weights too: near 1.0 a bf16 ulp is 2^-7), written once under
default_cache_dir()/reload-bench-B-<spec>. Rows, per scheme q of `--schemes` (none: unquantized bf16):
  floor              pure memcpy, one row for all schemes: on load_model(A) unquantized (not measured),
                     `param.copy_(src)` for every parameter from a pre-made list of same-shaped random
                     bf16 tensors: every bf16 weight written in place, nothing else (no mapping or checks);
  cold:q             load_model(A, quantization=q) from disk;
  reload-disk:q      reload_weights(model, B_dir) on a model cold-loaded from A (not measured); B is
                     mmapped from its files again (page cache warm: written or read before);
  reload-memory:q    reload_weights(model, state_dict.items()), state_dict = {name: tensor.clone()} of B
                     in checkpoint naming, built before the measurement (RL trainers hold weights in memory);
  reload-shuffled:q  the same items in a seeded random order (many layers in flight, staged, at once);
  reload-budget:q    reload-shuffled with staging_budget = the largest layer's bf16 staging bytes (tensors
                     of further layers wait as references instead of being staged);
  reload-atomic:q    reload-memory with atomic=True (a snapshot of the inference weights is taken first);
  reloader:q         a Reloader (buffers kept between calls) after one unmeasured warm-up reload of A:
                     the steady state of an RL loop; reloader-atomic:q the same with atomic=True;
  sync:q             trainer -> inference over gloo (two processes on this machine): rank 0 holds B in
                     memory and sends it with WeightSender (64 MiB buckets); rank 1, the fp8 model cold-
                     loaded from A, runs WeightReceiver.reload; seconds and peak are rank 1's;
  sync-quantized:q   the same with trainer-side quantization: WeightSender(quantization=QuantizePlan(q))
                     sends fp8 codes and scales, rank 1 installs them (no bf16 on the inference side);
                     both sync rows also give the bytes sent and the sender's seconds (quantization
                     included).
`--torch-kernels`: every quantized row again as NAME@torch, on the pure-torch CPU kernels
(STREAMQUANT_CPU_KERNELS=torch), so the native kernels' share shows in the same run.
`--device cuda`: the model on the GPU; the in-memory sources and the floor's sources on the GPU too (a
trainer colocated with the engine), reload-disk reads from disk to the GPU; times wait for the queued
kernels; peaks are the CUDA allocator's (the file column is 0); sync rows run NCCL on 2 GPUs.
Correctness, outside the timed region: after each reload-memory, reload-budget, reloader-atomic and sync
measurement the child cold-loads B
with the same scheme and compares `model.state_dict()` bitwise: `equals_cold`. Reload children also
record whether every tensor a reload writes kept its data_ptr (`addresses_unchanged`).

How (as benchmarks/peak_memory.py): every repeat of every row runs in a fresh child (`--one NAME`),
repeats round-robin over the rows;
imports and unmeasured setup come first, then the measured call runs in PeakMemorySampler("cpu"):
anonymous RSS (RssAnon) above entry, sampled every 5 ms after a malloc_trim(0); file-backed RSS
(mmapped checkpoint pages) is reported apart, never added. Time is time.perf_counter() around the
call. Rows show the median time and the max peak over `--repeats`. "kept MiB" is RssAnon above entry
after the call and one more malloc_trim(0): what the call leaves allocated (cold: the model; a reload
or the floor: should be ~0). An exception or a crashed child is recorded as the row's error. The
machine may be shared: each child records the 1-minute load average at its start (`loadavg_1m_all`).

Goal lines, after the table (the refit targets; the exit status never depends on them), per quantized
scheme q: reload-memory:q at most 2x the floor, reloader:q at most 1.5x the floor, cold:q at most 1.2x
cold:none (run with `--schemes fp8,none`); each says met, or by what factor it missed.

Reading the ratios:
  time/cold   seconds / the cold load's seconds for the same scheme. A refit should beat a fresh load
              (< 1): a cold load also builds, allocates and page-faults the model; a reload only writes.
  time/floor  seconds / the floor's seconds. A reload also maps names, checks every incoming tensor for
              NaN/Inf, stages fused layers (qkv, gate_up) in checkpoint format and, for fp8, computes
              amax and quantizes; 1.0 is out of reach, the ratio says what that machinery costs.
  peak anon   for a reload: staging and temporaries only (the model and the source exist before
              entry); reload-atomic adds its snapshot (about the model's bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, completed_runs, interleaved, machine_info, parse_schemes, select_rows, spawn  # noqa: E402  (benchmarks/common.py, beside this script)

import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from streamquant.api import load_model  # noqa: E402
from streamquant.checkpoint.reader import SAFETENSORS_INDEX, checkpoint_bytes, iterate_weights  # noqa: E402
from streamquant.checkpoint.synthetic import (  # noqa: E402
    BENCH_SPECS, default_cache_dir, ensure_synthetic_checkpoint)
from streamquant.parallel.launch import launch  # noqa: E402
from streamquant.loading.streaming import largest_layer_staging_bytes  # noqa: E402
from streamquant.memory import PeakMemorySampler, read_rss, trim_heap  # noqa: E402
from streamquant.quant.math.native import build  # noqa: E402
from streamquant.loading.contract import inference_tensors  # noqa: E402
from streamquant.reload import Reloader, reload_weights  # noqa: E402

SCHEMES = ("fp8", "fp8-channel", "fp8-block", "none")
KINDS = ("cold", "reload-disk", "reload-memory", "reload-shuffled", "reload-budget", "reload-atomic", "reloader",
         "reloader-atomic", "sync", "sync-quantized")
MARKER, MIB, B_MARKER = "RELOAD_RESULT ", 2**20, "reload-bench-B.json"


def ensure_checkpoint_b(a: Path, spec: str) -> tuple[Path, dict]:
    """Checkpoint B (see the module doc), written shard by shard into a sibling renamed at the end."""
    target = default_cache_dir() / f"reload-bench-B-{spec}"
    try:
        marker = json.loads((target / B_MARKER).read_text())
        if marker["source"] == a.name:
            return target, marker
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(target, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    generator, changed, total = torch.Generator().manual_seed(1), 0, 0
    for file in sorted(a.glob("*.json")):  # config.json, generation_config.json; the index: same shards as A
        if file.name != "streamquant-synthetic.json":  # not A's marker
            shutil.copy(file, staging / file.name)
    for shard in sorted(set(json.loads((a / SAFETENSORS_INDEX).read_text())["weight_map"].values())):
        tensors = {}
        with safetensors.safe_open(a / shard, framework="pt") as handle:
            for name in sorted(handle.keys()):
                w = handle.get_tensor(name)
                x = w.float()
                scale = 0.01 * max(x.std().item() if x.numel() > 1 else 0.0, x.mean().abs().item())
                tensors[name] = (x + scale * torch.randn(x.shape, generator=generator)).to(w.dtype)
                changed, total = changed + (not torch.equal(tensors[name], w)), total + 1
        safetensors.torch.save_file(tensors, staging / shard, metadata={"format": "pt"})
        del tensors  # one shard at a time
    marker = {"source": a.name, "tensors": total, "tensors_differing_from_a": changed}
    (staging / B_MARKER).write_text(json.dumps(marker))
    os.rename(staging, target)
    return target, marker


def measured(fn, device: str = "cpu") -> tuple[dict, object]:
    """Run fn() in the sampler of `device`; returns (seconds, peaks, kept bytes) and fn's result (kept
    alive). On CUDA the time includes waiting for the queued kernels; peaks are the allocator's."""
    gc.collect()  # cycles of the setup must not be freed inside the measurement
    with PeakMemorySampler(device) as sampler:
        start = time.perf_counter()
        out = fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = sampler.result
    trim_heap()
    now = torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else read_rss()[0]
    return {"seconds": seconds, "peak_bytes": peak.peak_bytes, "file_backed_peak_bytes": peak.file_backed_peak_bytes or 0,
            "kept_bytes": now - peak.baseline_bytes}, out


def compare(model: torch.nn.Module, reference: torch.nn.Module) -> dict:
    """Bitwise comparison of two state dicts: names, dtypes, shapes and bytes."""
    got, want = model.state_dict(), reference.state_dict()
    same = lambda x, y: (x.dtype == y.dtype and x.shape == y.shape  # noqa: E731
                         and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)))
    bad = sorted(n for n in got.keys() | want.keys() if n not in got or n not in want or not same(got[n], want[n]))
    return {"equals_cold": not bad, "mismatched_count": len(bad), "mismatched": bad[:10]}


def _sync_ranks(a: Path, b: Path, q: str | None, quantized: bool = False, device: str = "cpu") -> dict:
    """Rank 0 sends B, rank 1 receives into a model loaded from A (see the module doc); rank 1's row
    with the sender's bytes and seconds."""
    import torch.distributed as dist

    from streamquant.checkpoint.reader import load_hf_config
    from streamquant.formats import get_format
    from streamquant.offline import QuantizePlan
    from streamquant.parallel.context import TPContext
    from streamquant.rl.sync import WeightReceiver, WeightSender

    row: dict = {}
    if dist.get_rank() == 0:
        state_dict = {n: t.clone() for n, t in iterate_weights(b)}
        plan = QuantizePlan(load_hf_config(a), q, get_format("compressed-tensors"), torch.bfloat16) if quantized else None
        dist.barrier()
        stats = WeightSender(src=0, quantization=plan).send(state_dict.items())
        row.update(bytes_sent=stats.bytes, sender_seconds=stats.seconds, buckets=stats.buckets)
    else:
        single = TPContext()  # the world holds the trainer too: the inference model is one rank of its own
        model = load_model(a, quantization=q, tp=single, device=device)
        before = {n: t.data_ptr() for n, t in inference_tensors(model).items()}
        dist.barrier()
        result, loaded = measured(lambda: WeightReceiver(src=0).reload(model), device)
        row.update(result, model_bytes=model.load_report.model_bytes, tensors_loaded=len(loaded),
                   addresses_unchanged=before == {n: t.data_ptr() for n, t in inference_tensors(model).items()},
                   **compare(model, load_model(b, quantization=q, tp=single, device=device)))
    rows = [None, None] if dist.get_rank() == 0 else None
    dist.gather_object(row, rows, dst=0)
    return {**rows[1], **rows[0]} if rows else {}


def run_one(name: str, a: Path, b: Path, device: str = "cpu") -> dict:
    """One measured configuration in this process (the `--one` child); returns one result row."""
    base, _, kernels = name.partition("@")
    if kernels:  # `NAME@torch`: this child runs the pure-torch CPU kernels (read per call)
        os.environ[build.ENV] = kernels
    kind, _, scheme = base.partition(":")
    q = None if scheme in ("", "none") else scheme
    row: dict = {"name": name, "loadavg_1m": os.getloadavg()[0], "device": device}
    try:
        if kind in ("sync", "sync-quantized"):
            os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))  # rank 1 gets every core, as the other rows
            return {**row, **launch(_sync_ranks, 2, a, b, q, kind == "sync-quantized", device, device=device)}
        if kind == "cold":
            result, model = measured(lambda: load_model(a, quantization=q, device=device), device)
            return {**row, **result, "model_bytes": model.load_report.model_bytes}
        model = load_model(a, quantization=q, device=device)
        row["model_bytes"] = model.load_report.model_bytes
        if kind == "floor":
            params = [p for p in model.parameters() if not p.is_meta]
            sources = [torch.randn(p.shape, dtype=p.dtype, device=device) for p in params]
            with torch.no_grad():
                result, _ = measured(lambda: [p.copy_(s) for p, s in zip(params, sources)], device)
            return {**row, **result, "source_bytes": sum(s.nbytes for s in sources)}
        source = b
        if kind != "reload-disk":  # on CUDA the trainer's tensors are on the device too (a colocated trainer)
            state_dict = {n: t.to(device, copy=True) for n, t in iterate_weights(b)}
            row["source_bytes"] = sum(t.nbytes for t in state_dict.values())
            source = state_dict.items()
            if kind in ("reload-shuffled", "reload-budget"):
                source = list(source)
                random.Random(0).shuffle(source)
        budget = None
        if kind == "reload-budget":
            budget = largest_layer_staging_bytes(model)
            row["staging_budget"] = budget
        before = {n: t.data_ptr() for n, t in inference_tensors(model).items()}
        if kind.startswith("reloader"):
            reloader = Reloader(model, atomic=kind == "reloader-atomic")
            reloader(iterate_weights(a))  # warm-up: the buffers a loop keeps
            row["held_bytes"] = reloader.held_bytes
            result, loaded = measured(lambda: reloader(source), device)
        else:
            result, loaded = measured(lambda: reload_weights(model, source, atomic=kind == "reload-atomic",
                                                             staging_budget=budget), device)
        after = {n: t.data_ptr() for n, t in inference_tensors(model).items()}
        row.update(result, tensors_loaded=len(loaded), weights_version=model.weights_version,
                   addresses_unchanged=before == after)
        if kind in ("reload-memory", "reload-budget", "reloader-atomic"):  # (sync compares in _sync_ranks)
            row.update(compare(model, load_model(b, quantization=q, device=device)))
    except Exception as exc:  # recorded as the row's error; the run goes on
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def summarize(name: str, runs: list[dict]) -> dict:
    """Median time, max peaks over the repeats; equals_cold / addresses_unchanged must hold in all."""
    ok, failed = completed_runs(name, runs)
    if failed:
        return failed
    row = {**max(ok, key=lambda r: r["peak_bytes"]), "name": name, "repeats": len(ok),
           "seconds": statistics.median(r["seconds"] for r in ok), "seconds_all": [r["seconds"] for r in ok],
           "peak_bytes_all": [r["peak_bytes"] for r in ok], "loadavg_1m_all": [r["loadavg_1m"] for r in ok],
           **{k: max(r[k] for r in ok) for k in ("file_backed_peak_bytes", "kept_bytes")}}
    for flag in ("equals_cold", "addresses_unchanged"):
        if flag in row:
            row[flag] = all(r[flag] for r in ok)
    if len(ok) < len(runs):
        row["failed_repeats"] = [r["error"] for r in runs if "error" in r]
    return row


def add_ratios(rows: list[dict]) -> None:
    ok = {r["name"]: r for r in rows if "error" not in r}
    floor = ok.get("floor", {}).get("seconds")
    for row in ok.values():
        cold = ok.get("cold:" + row["name"].partition(":")[2], {}).get("seconds")
        row["time_over_cold"] = row["seconds"] / cold if cold and row["name"] != "floor" else None
        row["time_over_floor"] = row["seconds"] / floor if floor else None


def print_table(rows: list[dict]) -> None:
    head = ("config", "seconds", "peak anon MiB", "file peak MiB", "kept MiB", "time/cold", "time/floor", "equals cold")
    print("{:<28}{:>9}{:>15}{:>15}{:>10}{:>11}{:>12}{:>13}".format(*head))
    ratio = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<28}  FAILED: {r['error'][:300]}")
            continue
        equal = {True: "yes", False: "NO"}.get(r.get("equals_cold"), "-")
        moved = "" if r.get("addresses_unchanged", True) else "  (data_ptr changed)"
        sent = (f"  sent {r['bytes_sent'] / MIB:.1f} MiB, sender {r['sender_seconds']:.3f} s"
                if "bytes_sent" in r else "")
        print(f"{r['name']:<28}{r['seconds']:>9.3f}{r['peak_bytes'] / MIB:>15.1f}"
              f"{r['file_backed_peak_bytes'] / MIB:>15.1f}{r['kept_bytes'] / MIB:>10.1f}"
              f"{ratio(r['time_over_cold']):>11}{ratio(r['time_over_floor']):>12}{equal:>13}{moved}{sent}")


# (row kind, reference row, most allowed seconds / reference seconds) for each quantized scheme
REFIT_GOALS = (("reload-memory", "floor", 2.0), ("reloader", "floor", 1.5), ("cold", "cold:none", 1.2))


def goals(rows: list[dict]) -> list[dict]:
    """The refit goals whose rows ran: ratio, limit, met, and by what factor a missed one missed."""
    ok = {r["name"]: r["seconds"] for r in rows if "error" not in r}
    out = []
    for name in ok:
        kind, _, scheme = name.partition(":")
        for goal_kind, reference, limit in REFIT_GOALS:
            if kind == goal_kind and scheme != "none" and reference in ok:
                ratio = ok[name] / ok[reference]
                out.append({"row": name, "reference": reference, "limit": limit, "ratio": ratio,
                            "met": ratio <= limit, "missed_by": max(1.0, ratio / limit)})
    return out


def print_goals(results: list[dict]) -> None:
    for g in results:
        verdict = "met" if g["met"] else f"MISSED by {g['missed_by']:.1f}x"
        print(f"goal {g['row']:<22} <= {g['limit']:.1f}x {g['reference']:<10} {g['ratio']:6.2f}x  {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--spec", choices=sorted(BENCH_SPECS), default="bench",
                        help="synthetic checkpoint: bench (28 layers, hidden 1024, ~1 GB bf16), demo (12 layers, ~400 MB), "
                             "7b-2layer (two layers of Qwen2-7B's shapes, hidden 3584 / intermediate 18944, ~1 GB) "
                             "or 7b (all 28 such layers, vocab 152064, ~15.2 GB: needs ~16 GB free memory and disk)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh child processes per configuration (default 3)")
    parser.add_argument("--schemes", default="fp8",
                        help=f"comma-separated subset of {','.join(SCHEMES)} (none: unquantized bf16; default fp8)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "reload.json",
                        help="where to write the results (default benchmarks/results/reload.json)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the model lives (default cpu); cuda: the in-memory sources on the GPU too, "
                             "peaks from the CUDA allocator; the sync rows need 2 GPUs (NCCL)")
    parser.add_argument("--only", default=None, metavar="KINDS",
                        help="comma-separated row kinds to run (e.g. reload-memory,reloader); floor and cold always run")
    parser.add_argument("--torch-kernels", action="store_true",
                        help="also run every quantized row on the pure-torch CPU kernels (rows NAME@torch)")
    parser.add_argument("--one", metavar="NAME", help="internal: run one configuration in this process, print one "
                                                      "JSON line (NAME: floor, cold:fp8, reload-memory:none, ...)")
    args = parser.parse_args(argv)
    a = ensure_synthetic_checkpoint(default_cache_dir(), BENCH_SPECS[args.spec])
    b, b_marker = ensure_checkpoint_b(a, args.spec)
    if args.one:
        print(MARKER + json.dumps(run_one(args.one, a, b, args.device)), flush=True)
        return
    schemes = parse_schemes(parser, args.schemes, SCHEMES, args.repeats)
    machine = machine_info()
    print(banner(machine, f"A {a} ({checkpoint_bytes(a) / MIB:.1f} MiB), B {b} ({b_marker['tensors_differing_from_a']}/"
                          f"{b_marker['tensors']} tensors differ from A)", args.repeats), flush=True)
    rows = []
    names = ["floor", *(f"{kind}:{q}" for q in schemes for kind in KINDS)]
    selected = select_rows(names, args.only, always=("floor", "cold"))
    if args.torch_kernels:  # the same rows on the pure-torch CPU kernels, in the same run
        selected += [f"{n}@torch" for n in selected if n != "floor" and not n.endswith(":none")]
    runs = interleaved(selected, args.repeats,
                       lambda name: spawn(__file__, MARKER, name, args.spec, args=("--device", args.device)))
    rows += [summarize(name, runs[name]) for name in selected]
    add_ratios(rows)
    print_table(rows)
    met = goals(rows)
    print_goals(met)
    result = {"goals": met, "device": args.device, "spec": args.spec, "checkpoint_a": str(a), "checkpoint_b": str(b), "checkpoint_b_info": b_marker,
              "checkpoint_bytes": checkpoint_bytes(a), "machine": {**machine, "loadavg_1m_at_end": os.getloadavg()[0]},
              "repeats": args.repeats, "schemes": schemes, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
