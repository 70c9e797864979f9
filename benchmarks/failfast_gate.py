"""What failing fast across tensor-parallel ranks costs a refit (`parallel/gate.py`), and how fast a failure spreads.

Two gloo ranks on this machine (one `RankPool`), each with the `--spec` checkpoint (demo: 12 Llama layers,
~400 MB bf16; tiny: 2 layers, <1 MB) loaded with fp8 (not measured), and B = A's tensors x 1.01 in memory
in checkpoint naming. Rows:
  refit:gate      `reload_weights(model, B)`, as shipped: before each layer's processing every rank checks
                  in on the group's key-value store (a gate opened and closed per refit);
  refit:no-gate   the same with the gate switched off (opened as at one rank: no store traffic): the refit
                  as it was before failing fast;
  refit:allreduce the gate's steps replaced by a 1-element gloo all-reduce each: what any other per-layer
                  rendezvous of the ranks would cost; the three rows alternate, repeat by repeat;
  step            one gate step alone (`Gate.step`), a loop of `--steps`: the store round trip per layer;
  fail            rank 1's source raises after half of B, the group's collectives waiting up to 1800 s:
                  seconds from rank 1's raise until rank 0 raised (`RankFailedError`, at its next layer).
Refit times are the slower rank's (each rank times its own call between barriers); rows show the median
and the min over `--repeats`, the refit overhead (gate - no-gate medians) per refit and per gate step.
Writes a table and `--json`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this working tree, whatever is installed

from common import banner, machine_info, write_results  # noqa: E402

SPECS = ("demo", "tiny")
GROUP_TIMEOUT_S = 1800


def _gathered(row):
    import torch.distributed as dist

    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def _timed(call) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(path: str, repeats: int, steps: int) -> dict:
    """On every rank: the rows of the module doc (rank 0's return value is the result)."""
    import torch
    import torch.distributed as dist

    from streamquant.api import load_model
    from streamquant.checkpoint.reader import iterate_weights
    from streamquant.loading.contract import staged_params
    from streamquant.parallel.context import TPContext
    from streamquant.parallel.gate import Gate
    from streamquant.reload import reload_weights

    tp = TPContext.from_process_group()
    model = load_model(path, quantization="fp8", tp=tp)
    items = [(n, t * 1.01) for n, t in iterate_weights(path)]
    opened_as_one_rank = Gate.__init__

    def no_gate(self, _tp):
        opened_as_one_rank(self, None)

    def all_reduce_step(self, where):
        dist.all_reduce(torch.zeros(1), group=tp.group)

    times = {"refit:gate": [], "refit:no-gate": [], "refit:allreduce": []}
    reload_weights(model, items)  # warm-up: staging pool, kernels
    for _ in range(repeats):
        times["refit:gate"].append(_timed(lambda: reload_weights(model, items)))
        with mock.patch.object(Gate, "__init__", no_gate):
            times["refit:no-gate"].append(_timed(lambda: reload_weights(model, items)))
            with mock.patch.object(Gate, "step", all_reduce_step):
                times["refit:allreduce"].append(_timed(lambda: reload_weights(model, items)))
    gate = Gate(tp)
    step = _timed(lambda: [gate.step(f"step {k}") for k in range(steps)]) / steps
    dist.barrier()
    gate.close(every_rank_done=True)
    lags = []
    for _ in range(repeats):
        raised_at = []

        def source():
            for i, item in enumerate(items):
                if tp.rank == 1 and i == len(items) // 2:
                    raised_at.append(time.time())
                    raise ConnectionError("rank 1's trainer went away")
                yield item

        dist.barrier()
        try:
            reload_weights(model, source(), atomic=False)
        except Exception as exc:  # noqa: BLE001 -- every rank raises; rank 0 names rank 1
            failed = (type(exc).__name__, time.time())
        rows = _gathered((failed, raised_at))
        lags.append((rows[0][0][0], rows[0][0][1] - rows[1][1][0]))
    gated_layers = sum(bool(staged_params(m)) for m in model.modules())  # layers quantized from what they staged
    return {"times": _gathered(times), "step_seconds": max(_gathered(step)), "fail": lags,
            "gated_layers": gated_layers}


def run(spec: str, repeats: int, steps: int) -> dict:
    from streamquant.checkpoint.synthetic import DEMO_SPEC, TINY_SPEC, default_cache_dir, ensure_synthetic_checkpoint
    from streamquant.parallel.launch import RankPool

    path = ensure_synthetic_checkpoint(default_cache_dir(), {"demo": DEMO_SPEC, "tiny": TINY_SPEC}[spec])
    with RankPool(2, timeout_s=GROUP_TIMEOUT_S) as pool:
        result = pool.run(measure, str(path), repeats, steps)
    rows = {}
    for name in ("refit:gate", "refit:no-gate", "refit:allreduce"):
        slower = [max(per_rank) for per_rank in zip(*(r[name] for r in result["times"]))]
        rows[name] = {"median_s": statistics.median(slower), "min_s": min(slower), "runs_s": slower}
    gate, bare = rows["refit:gate"]["median_s"], rows["refit:no-gate"]["median_s"]
    rendezvous = rows["refit:allreduce"]["median_s"] - bare
    lags = [lag for kind, lag in result["fail"]]
    return {"spec": spec, "rows": rows, "gated_layers": result["gated_layers"],
            "overhead_ms_per_refit": 1e3 * (gate - bare), "overhead_fraction": gate / bare - 1,
            "allreduce_overhead_ms_per_refit": 1e3 * rendezvous,
            "step_us": 1e6 * result["step_seconds"], "fail_kinds": sorted({kind for kind, _ in result["fail"]}),
            "fail_lag_s": {"median": statistics.median(lags), "max": max(lags), "runs": lags}}


def print_table(results: list[dict]) -> None:
    print(f"{'spec':<6}{'row':<16}{'median ms':>11}{'min ms':>9}")
    for r in results:
        for name, row in r["rows"].items():
            print(f"{r['spec']:<6}{name:<16}{1e3 * row['median_s']:>11.1f}{1e3 * row['min_s']:>9.1f}")
        print(f"{r['spec']:<6}overhead: {r['overhead_ms_per_refit']:+.2f} ms per refit ({100 * r['overhead_fraction']:+.1f}%), "
              f"{r['gated_layers']} gate steps per refit (a 1-element all-reduce there instead: "
              f"{r['allreduce_overhead_ms_per_refit']:+.2f} ms); one step alone {r['step_us']:.0f} us")
        print(f"{r['spec']:<6}fail: rank 0 raised {'/'.join(r['fail_kinds'])} {r['fail_lag_s']['median']:.3f} s "
              f"(max {r['fail_lag_s']['max']:.3f} s) after rank 1's source raised, group timeout {GROUP_TIMEOUT_S} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default="demo,tiny", help=f"comma-separated, of {','.join(SPECS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000, help="gate steps timed in the `step` row")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "failfast_gate.json")
    args = parser.parse_args()
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    if not specs or set(specs) - set(SPECS) or args.repeats < 1 or args.steps < 1:
        parser.error(f"--specs must name some of {','.join(SPECS)}; --repeats and --steps must be >= 1")
    machine = machine_info()
    print(banner(machine, "TP=2 fp8 refit with and without the fail-fast gate", args.repeats))
    results = [run(spec, args.repeats, args.steps) for spec in specs]
    print_table(results)
    write_results(args.json, machine, results=results)


if __name__ == "__main__":
    main()
