"""The write jobs of `quantize_checkpoint`: units of work, their split over workers, and running them.

A `Unit` is one source tensor and the output tensors it becomes; a `WriteJob` is a consecutive run
of units and the planned (file, byte offset) of each output. `run_jobs` runs the jobs in this
process (`workers=1`: torch's own threads) or in forked worker processes of one intra-op thread
each; either way the files are bitwise the same.

Progress: `write_units` calls `advance(bytes, tensors)` after each unit. In this process that is the
bar's own `update`; in a worker it is a `SharedCount`, one (bytes, tensors) row of a tensor in shared
memory, which the parent reads every `POLL_S` while it waits for the workers and draws.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context

import safetensors
import torch

from streamquant.checkpoint.writer import ShardFiles, TensorSpec
from streamquant.memory import PeakMemorySampler
from streamquant.offline.plan import QuantizedTensor, QuantizePlan
from streamquant.offline.tensors import cast, quantize_tensor
from streamquant.progress import WeightBar, tensor_bytes
from streamquant.quant.error_log import QuantErrorLog
from streamquant.quant.math.granularity import Window
from streamquant.quant.math.int4 import dequantize_window_asymmetric
from streamquant.quant.math.quantize import dequantize

POLL_S = 0.25  # how often the parent reads its workers' counts while a bar is drawn


@dataclass(frozen=True)
class Unit:
    """One source tensor and what it becomes."""

    file: str
    name: str
    rule: QuantizedTensor | None
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class WriteJob:
    """Units one writer quantizes, and where every output goes (file, byte offset)."""

    units: tuple[Unit, ...]
    offsets: dict[str, tuple[str, int]]
    measure_error: bool


class SharedCount:
    """A worker's (bytes, tensors) done: a row of a shared-memory tensor (pickled to the worker as a
    handle to the same memory), which the parent reads."""

    def __init__(self, row: torch.Tensor):
        self.row = row

    def __call__(self, nbytes: int, tensors: int = 1) -> None:
        self.row[0] += nbytes
        self.row[1] += tensors


def write_units(job: WriteJob, plan: QuantizePlan, threads: int | None = None,
                advance: Callable[[int, int], None] | None = None) -> dict:
    """Quantize and write one job's units; returns the writer's peak memory and (measure_error) errors.
    `advance(bytes, tensors)` is told each source tensor done."""
    if threads:
        torch.set_num_threads(threads)
    log = QuantErrorLog()
    files = ShardFiles(job.offsets)
    with PeakMemorySampler("cpu") as sampler:
        handles: dict[str, object] = {}
        try:
            for unit in job.units:
                if unit.file not in handles:
                    handles[unit.file] = safetensors.safe_open(unit.file, framework="pt")
                tensor = handles[unit.file].get_tensor(unit.name)
                _write_unit(files, unit, tensor, plan, log if job.measure_error else None)
                if advance is not None:
                    advance(tensor_bytes(tensor), 1)
                del tensor
        finally:
            files.close()
            handles.clear()
    peak = sampler.result
    return {"peak_anon_bytes": peak.peak_bytes, "peak_file_bytes": peak.file_backed_peak_bytes,
            "errors": log.entries, "error_seconds": log.seconds}


def _write_unit(files: ShardFiles, unit: Unit, tensor: torch.Tensor, plan: QuantizePlan,
                log: QuantErrorLog | None) -> None:
    if unit.rule is None:
        files.write(unit.outputs[0], cast(tensor, plan.dtype))
        return
    out = quantize_tensor(unit.name, tensor, unit.rule, plan)
    for spec, (name, value) in zip(unit.outputs, out.disk, strict=True):
        if spec.name != name:
            raise AssertionError(f"planned {spec.name!r}, the format wrote {name!r}")
        files.write(spec, value)
    if log is not None:
        _record_error(log, unit, out)


def split_units(units: list[Unit], parts: int) -> list[list[Unit]]:
    """Consecutive runs of units with about equal input bytes (each writer reads its files in order)."""
    sizes = [sum(spec.nbytes for spec in unit.outputs) for unit in units]
    total, out, acc = sum(sizes), [[] for _ in range(parts)], 0
    for unit, size in zip(units, sizes):
        out[min(parts - 1, acc * parts // max(1, total))].append(unit)
        acc += size
    return [part for part in out if part]


def _record_error(log: QuantErrorLog, unit: Unit, out) -> None:
    start = time.perf_counter()
    ref, (codes, scales, zeros) = out.weight.float(), out.quantized
    granularity = unit.rule.spec.granularity
    if zeros is None:
        noise = dequantize(codes, scales, granularity, torch.float32).sub_(ref)
    else:
        window = Window(0, 0, *codes.shape[-2:])
        noise = dequantize_window_asymmetric(codes, scales, zeros, window, granularity.block_size, torch.float32).sub_(ref)
    log.record(unit.name, float(ref.square().sum(dtype=torch.float64)), float(noise.square_().sum(dtype=torch.float64)))
    log.seconds += time.perf_counter() - start


def _worker(job: WriteJob, plan_args: tuple, threads: int, advance: SharedCount | None) -> dict:
    """A worker process: rebuild the (meta) plan, write its units."""
    torch.set_num_threads(threads)
    return write_units(job, QuantizePlan(*plan_args[:4], **plan_args[4]), threads, advance)


def run_jobs(jobs: list[WriteJob], plan: QuantizePlan, plan_args: tuple, workers: int,
             bar: WeightBar | None = None) -> list[dict]:
    """Every job's `write_units` result, in job order; `bar` (if any) follows the units written."""
    if workers == 1:
        return [write_units(job, plan, advance=bar.update if bar is not None else None) for job in jobs]
    counts = torch.zeros(len(jobs), 2, dtype=torch.int64).share_memory_() if bar is not None else None
    # forked workers start at once (no import of torch again: spawned ones took ~2 s each here); each
    # runs ONE intra-op thread, which also keeps OpenMP out of the forked children (libgomp's thread
    # pool does not survive a fork): the workers are the parallelism
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        futures = [pool.submit(_worker, job, plan_args, 1, SharedCount(counts[i]) if counts is not None else None)
                   for i, job in enumerate(jobs)]
        _follow(futures, counts, bar)
        return [future.result() for future in futures]


def _follow(futures: list[Future], counts: torch.Tensor | None, bar: WeightBar | None) -> None:
    """Wait for the workers (until all are done or one failed), moving `bar` to their counts meanwhile."""
    while True:
        done, pending = wait(futures, timeout=POLL_S if bar is not None else None, return_when=FIRST_EXCEPTION)
        if bar is not None:
            totals = counts.sum(dim=0).tolist()
            bar.update_to(totals[0], totals[1])
        if not pending or any(future.exception() is not None for future in done):
            return
