"""`quantize_checkpoint`: a high-precision checkpoint directory in, a quantized (fp8, int8, int4) one out.

Streams tensor by tensor: no model is materialized (a `meta` model only decides which tensors are
quantized, `plan.py`), each source tensor is read from its mmapped shard, quantized with
`tensors.quantize_tensor` and its bytes written at once into a safetensors shard whose header was
planned from the source headers (`checkpoint/writer.py`). Memory: one tensor's copy in the model
dtype (only when the source dtype differs) plus its codes and a few MB of scratch per worker,
whatever the model or shard size; the source's pages are file-backed (page cache), counted apart.

`workers=N` runs N processes (`jobs.py`), each quantizing a consecutive run of the source tensors (about
equal bytes) and writing their bytes at offsets planned up front, so the files are bitwise the same for
every N. Workers are forked and run one intra-op thread each (so use up to one worker per core); with
one worker the run stays in this process and uses torch's threads. `progress` draws one bar over the
source's bytes and tensors, whatever N. The run is all-or-nothing: it writes into a hidden sibling of `dst`
and renames it onto `dst` at the end; a failure (or Ctrl-C) removes the partial output. A non-empty
`dst` is refused unless `overwrite=True`. Besides the weights it writes `config.json` with the
format's `quantization_config` and copies every other non-weight file (tokenizer, generation config).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors
import torch

from streamquant.config import resolve_dtype
from streamquant.checkpoint.reader import CONFIG_FILE, CheckpointError, checkpoint_files, load_hf_config, resolve_checkpoint
from streamquant.checkpoint.writer import (
    SAFETENSORS_DTYPES,
    TensorSpec,
    check_destination,
    create_shard,
    plan_shards,
    publish,
    shard_name,
    staging_directory,
    write_index,
)
from streamquant.formats import get_format
from streamquant.memory import PeakMemorySampler
from streamquant.offline.jobs import Unit, WriteJob, run_jobs, split_units
from streamquant.offline.plan import QuantizePlan
from streamquant.progress import WeightBar, wants_progress
from streamquant.quant.error_log import QuantErrorLog

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_DTYPE_OF = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def _source_units(directory: Path, plan: QuantizePlan) -> tuple[list[Unit], dict[str, tuple[int, ...]], int]:
    units, shapes, nbytes = [], {}, 0
    for file in checkpoint_files(directory):
        if file.suffix != ".safetensors":
            raise CheckpointError(f"{file.name}: offline quantization reads safetensors checkpoints only")
        with safetensors.safe_open(file, framework="pt") as handle:
            for name in sorted(handle.keys()):
                view = handle.get_slice(name)
                shape, dtype = tuple(view.get_shape()), _DTYPE_OF.get(view.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"checkpoint tensor {name!r} has dtype {view.get_dtype()}, not loadable")
                shapes[name] = shape
                nbytes += TensorSpec(name, dtype, shape).nbytes
                rule = plan.rule(name)
                out_dtype = plan.dtype if dtype.is_floating_point else dtype
                outputs = rule.outputs(shape, out_dtype, plan.fmt) if rule else [TensorSpec(name, out_dtype, shape)]
                units.append(Unit(str(file), name, rule, tuple(outputs)))
    return units, shapes, nbytes


@dataclass(frozen=True)
class QuantizeReport:
    """What one `quantize_checkpoint` run read, wrote and cost."""

    source: str
    destination: str
    quantization: str
    format: str
    formula: str
    workers: int
    shards: int
    tensors_in: int
    quantized_tensors: int
    bytes_in: int  # tensor bytes of the source checkpoint
    bytes_out: int  # bytes of the written weight files
    seconds: float
    input_gb_per_s: float
    peak_anon_bytes: int  # the largest process's anonymous RSS high-water mark over its start (sampled)
    peak_file_bytes: int | None  # the same for file-backed pages (the mmapped source)
    quantization_error: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _copy_other_files(source: Path, destination: Path) -> None:
    """Every non-weight file of the source (tokenizer, generation config, ...), config.json aside."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or relative.parts[0].startswith(".") or relative.name == CONFIG_FILE and len(relative.parts) == 1:
            continue
        if any(relative.match(pattern) for pattern in WEIGHT_FILES):
            continue
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination / relative)


def written_config(raw: dict, quantization_config: dict, dtype: torch.dtype) -> dict:
    """The source's config.json with the format's `quantization_config` and the dtype the tensors were written
    in: transformers 5 reads `dtype`, older versions `torch_dtype`; each the source has is rewritten (neither:
    `dtype` is added)."""
    keys = [key for key in ("dtype", "torch_dtype") if key in raw] or ["dtype"]
    return {**raw, **{key: str(dtype).removeprefix("torch.") for key in keys}, "quantization_config": quantization_config}


def quantize_checkpoint(src: str | Path, dst: str | Path, quantization: str, *, format: str = "compressed-tensors",
                        dtype: torch.dtype | str = torch.bfloat16, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
                        workers: int = 1, overwrite: bool = False, measure_error: bool = False,
                        progress: bool | None = None, **options) -> QuantizeReport:
    """Write a quantized checkpoint of `src` to `dst` (see the module docstring); returns a `QuantizeReport`.

    `quantization`: "fp8", "fp8-channel", "fp8-block", "int8" (W8A8, or W8A16 with activation_scheme
    "none") or "int4" (W4A16); `format`: "compressed-tensors" (default; int8 / int4 as its
    `int-quantized` / `pack-quantized`) or "hf-fp8" (fp8-block only); `options`: the options of
    `config.make_quant_config` (`ignore`, `formula`, `activation_scheme`, `block_size`, `group_size`
    and `symmetric` for int4, `fp8_dtype`: e4m3fn only). `dtype`: the model dtype
    floating-point tensors are written in and quantized from (as `load_model(dtype=...)` would).
    `measure_error=True` adds each quantized weight's SQNR (two more passes, their seconds apart).
    `progress`: a bar of the source's bytes and tensors on stderr (`streamquant/progress.py`); None
    (default): only where stderr is a terminal. The new `config.json` says `dtype` (and `torch_dtype`,
    where the source has that older key) = the dtype the unquantized tensors were written in.
    """
    start = time.perf_counter()
    fmt = get_format(format)
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    source = resolve_checkpoint(src)
    destination = Path(dst).expanduser().absolute()
    if destination.resolve() == source.resolve():
        raise ValueError(f"destination {destination} is the source checkpoint")
    raw = json.loads((source / CONFIG_FILE).read_text())
    if raw.get("quantization_config"):
        raise CheckpointError(f"{source} is already quantized (quantization_config.quant_method = "
                              f"{raw['quantization_config'].get('quant_method')!r})")
    model_dtype = resolve_dtype(dtype)
    plan_args = (load_hf_config(source), quantization, fmt, model_dtype, dict(options))
    plan = QuantizePlan(*plan_args[:4], **plan_args[4])
    if plan.config.fp8_dtype not in (None, torch.float8_e4m3fn):  # None: integer codes
        raise ValueError(f"format {fmt.name!r} stores float8_e4m3fn codes; fp8_dtype={plan.config.fp8_dtype} is not "
                         "supported there")
    units, shapes, bytes_in = _source_units(source, plan)
    quantization_config = fmt.write_config(plan.config, plan.high_precision_modules(shapes))
    check_destination(destination, overwrite)
    shards = plan_shards([list(u.outputs) for u in units], max_shard_size)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    bar = WeightBar("quantize", total_bytes=bytes_in, total_tensors=len(units)) if wants_progress(progress) else None
    with PeakMemorySampler("cpu") as sampler, staging_directory(destination) as staging:
        offsets = {}
        for file, shard in zip(names, shards):
            at = create_shard(staging / file, [spec for group in shard for spec in group])
            offsets.update({name: (str(staging / file), offset) for name, offset in at.items()})
        jobs = [WriteJob(tuple(part), {s.name: offsets[s.name] for u in part for s in u.outputs}, measure_error)
                for part in split_units(units, int(workers))]
        try:
            results = run_jobs(jobs, plan, plan_args, int(workers), bar)
        finally:
            if bar is not None:
                bar.close()
        write_index(staging, [[s for g in shard for s in g] for shard in shards], names)
        (staging / CONFIG_FILE).write_text(json.dumps(written_config(raw, quantization_config, model_dtype), indent=2)
                                           + "\n")
        _copy_other_files(source, staging)
        publish(staging, destination)
    return _report(source, destination, plan, fmt.name, workers, names, units, bytes_in, results, sampler.result,
                   time.perf_counter() - start)


def _report(source, destination, plan, fmt_name, workers, names, units, bytes_in, results, parent, seconds):
    log = QuantErrorLog([entry for r in results for entry in r["errors"]], sum(r["error_seconds"] for r in results))
    seconds -= log.seconds
    file_peaks = [r["peak_file_bytes"] for r in results if r["peak_file_bytes"] is not None]
    return QuantizeReport(
        source=str(source), destination=str(destination), quantization=plan.config.scheme.value, format=fmt_name,
        formula=plan.config.formula.value, workers=int(workers), shards=len(names), tensors_in=len(units),
        quantized_tensors=sum(u.rule is not None for u in units), bytes_in=bytes_in,
        bytes_out=sum((destination / n).stat().st_size for n in names), seconds=seconds,
        input_gb_per_s=bytes_in / seconds / 1e9 if seconds > 0 else 0.0,
        peak_anon_bytes=max([parent.peak_bytes] + [r["peak_anon_bytes"] for r in results]),
        peak_file_bytes=max([parent.file_backed_peak_bytes or 0] + file_peaks) if parent.file_backed_peak_bytes is not None else None,
        quantization_error=log.summary() if log.entries else None,
    )
