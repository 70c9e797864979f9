"""What the benchmarks share: the measured commit, and running one configuration in a fresh child.

Each benchmark script runs every measured configuration as `python SCRIPT --one NAME --spec SPEC`
in a fresh interpreter (memory high-water marks and allocator state of one load must not
contaminate the next); the child prints one line `MARKER + json` that `spawn` parses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_revision() -> str:
    """The commit measured (`-dirty`: the working tree differs from it)."""
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True, text=True)
    return git.stdout.strip() or "unknown"


def spawn(script: str, marker: str, name: str, spec: str, env: dict[str, str] | None = None,
          args: tuple[str, ...] = (), python: str | None = None) -> dict:
    """Run `script --one name --spec spec *args` in a fresh interpreter (`python`, default this one);
    its result row (or an error row)."""
    proc = subprocess.run([python or sys.executable, script, "--one", name, "--spec", spec, *args],
                          capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker)]
    if proc.returncode or not lines:
        return {"name": name, "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(lines[-1][len(marker):])


def machine_info() -> dict:
    """What the numbers were measured on (the load average changes: read it again at the end)."""
    return {"torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_num_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "loadavg_1m_at_start": os.getloadavg()[0], "git": git_revision()}


def banner(machine: dict, what: str, repeats: int) -> str:
    """The first line of a benchmark run: commit, what is measured, torch, cores, load, repeats."""
    return (f"streamquant {machine['git']}, {what}, torch {machine['torch']}, {machine['cpu_count']} CPUs, "
            f"{machine['torch_num_threads']} torch threads, load average {machine['loadavg_1m_at_start']:.2f}, "
            f"{repeats} repeat(s)")


def parse_schemes(parser, text: str, allowed: tuple[str, ...], repeats: int) -> list[str]:
    """The comma-separated `--schemes` (validated against `allowed`), or a parser error."""
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    if not schemes or set(schemes) - set(allowed) or repeats < 1:
        parser.error(f"--schemes must name some of {','.join(allowed)}; --repeats must be >= 1")
    return schemes


def select_rows(names: list[str], only: str | None, always: tuple[str, ...]) -> list[str]:
    """The rows `--only` asks for: names whose kind (before ':') is listed, plus the `always` kinds (ratio bases)."""
    if not only:
        return names
    kinds = {k.strip() for k in only.split(",")} | set(always)
    return [n for n in names if n.partition(":")[0] in kinds]


def completed_runs(name: str, runs: list[dict]) -> tuple[list[dict], dict | None]:
    """The repeats of row `name` that succeeded, and the row to report instead when none did (its last error)."""
    ok = [r for r in runs if "error" not in r]
    return ok, (None if ok else {"name": name, "error": runs[-1]["error"], "repeats": len(runs)})


def interleaved(names: list[str], repeats: int, run) -> dict[str, list[dict]]:
    """`run(name)` `repeats` times per name, round-robin (every row's first repeat, then every row's
    second, ...), so that a slow spell of a shared machine spreads over all rows instead of biasing
    the ratios of the few rows measured during it."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            results[name].append(run(name))
        print(f"  repeat {repeat + 1}/{repeats} of {len(names)} rows done", flush=True)
    return results



def write_results(path: Path, machine: dict, **fields) -> None:
    """Write `{"machine": ..., **fields}` as JSON to `path` (the load average read again at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    machine["loadavg_1m_at_end"] = os.getloadavg()[0]
    path.write_text(json.dumps({"machine": machine, **fields}, indent=2) + "\n")
    print(f"wrote {path}")
