"""`reload_weights`: new checkpoint-format weights into a loaded model, in place (the RL refit path).

A reload is the cold load's own driver (`loading.streaming.stream_weights`) run on the live model: every fp8 layer gets
its checkpoint-format copy back from the staging pool at its first tensor, the same weight loaders
write it, and at its last element it is quantized INTO the codes and scales the model already
holds (their storage and `data_ptr` never change, so captured CUDA graphs stay valid); unquantized
parameters are written in place by their loaders (vocab pads zeroed again). Buffers are not
touched. So a complete reload is bitwise a cold load of the same weights, by construction, in any
arrival order.

Fails closed. With `strict=True`, an unknown name, a wrong shape, a duplicate, NaN / Inf in any
incoming tensor, a source that raises, or a source that ends before every weight arrived raises.
Then, with `atomic=True` (one extra copy of the inference weights, taken before reading) the model
is restored exactly as before; with `atomic=False` the model is marked not ready and `forward`
raises `ModelNotReadyError` until a reload completes. `strict=False` allows a partial update on
purpose: only the layers whose weights arrived completely change (an incomplete fp8 layer keeps
its codes; an incomplete unquantized layer keeps what arrived).

`checkpoint_format=False` takes tensors already in the model's own format -- this rank's shards,
processed (fp8 codes and scales), named as `inference_tensors(model)` names them (a tied weight by
its first name) -- and copies each into place after checking its shape, dtype and finiteness; the
same strictness and failure handling apply.

`quantized_source=True` takes pre-quantized fp8 codes and scales in checkpoint layout (an fp8
checkpoint directory, which says so itself; `offline.quantize_weights`; a `WeightSender(quantization=)`)
and writes them straight into the fp8 parameters, with the same strictness and failure handling;
nothing is quantized, and no high-precision staging exists.

`Reloader(model, atomic=..., staging_budget=...)` is the same for a loop of reloads (the RL case):
it keeps the atomic snapshot (`WeightSnapshot`, one flat buffer) and an idle staging buffer between
calls instead of allocating and page-faulting them every step.

Limitations: all tensor-parallel ranks must see the same order; a tensor deferred by the staging
budget is a reference to the caller's tensor, which must not change until the reload returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from streamquant.checkpoint.reader import checkpoint_totals, iterate_weights, resolve_checkpoint
from streamquant.loading.contract import derived_tensors, loadable_parameters
from streamquant.loading.errors import (
    DuplicateWeightError,
    MissingWeightsError,
    NonFiniteWeightError,
    UnexpectedWeightError,
    WeightLoadError,
)
from streamquant.loading.materialize import StagingPool, align_up, byte_view
from streamquant.loading.streaming import staging_pool, stream_weights
from streamquant.loading.validate import is_finite
from streamquant.parallel.context import TPContext, all_reduce
from streamquant.formats.prequantized import reload_source
from streamquant.progress import WeightBar, counted, wants_progress

WeightSource = str | Path | Iterable[tuple[str, torch.Tensor]]


def _tensors(weights: WeightSource) -> Iterable[tuple[str, torch.Tensor]]:
    """A checkpoint directory or hub id is read again from disk on every call (never cached)."""
    if isinstance(weights, (str, Path)):
        return iterate_weights(resolve_checkpoint(weights))
    return weights


def _tracked(weights: Iterable[tuple[str, torch.Tensor]], seen: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights`, recording each name as it is handed on (what a failure may have written)."""
    for name, tensor in weights:
        seen.append(name)
        yield name, tensor


def inference_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a reload writes, by name: loadable parameters with storage, and the tensors quant
    methods derive from checkpoint-format weights (`derived_tensors`: fp8 / int8 codes and scales, a
    torchao weight's inner tensors)."""
    out = {n: p for n, p in loadable_parameters(model).items() if not p.is_meta}
    for mod_name, module in model.named_modules():
        for name, tensor in derived_tensors(module).items():
            out[f"{mod_name}.{name}"] = tensor
    return out


def _device(model: torch.nn.Module) -> torch.device:
    return next(t.device for t in model.parameters() if not t.is_meta)


def reload_weights(model: torch.nn.Module, weights: WeightSource, *, checkpoint_format: bool = True,
                   strict: bool = True, atomic: bool = False, staging_budget: int | None = None,
                   transient_source: bool = False, check_finite: bool = True,
                   quantized_source: bool | None = None, progress: bool | None = None) -> set[str]:
    """Write `weights` into `model` in place; returns the checkpoint names loaded (see the module doc).

    `weights`: a checkpoint directory / hub id, or an iterable of `(name, tensor)` in checkpoint
    naming and layout (full, unsharded tensors: each rank takes its shard). `staging_budget`
    (bytes) bounds the high-precision staging when tensors arrive out of layer order: later
    layers' tensors are held as references until budget frees (accelerator tensors spill to host
    memory; with `transient_source=True`, for a source that reuses a tensor's storage once the next
    one is requested, every deferred tensor is copied). `check_finite=False` skips the NaN / Inf
    check of every incoming tensor (one `aminmax` pass each). `quantized_source=True`: the tensors are
    pre-quantized (fp8 codes and scales in checkpoint layout, e.g. from `offline.quantize_weights` or
    a `WeightSender(quantization=...)`) and are installed as they are, no high-precision staging; a
    checkpoint directory says itself whether it is (its `quantization_config`). `progress`: a bar of
    bytes and tensors on stderr (`streamquant/progress.py`); None (default): for a checkpoint directory
    where stderr is a terminal, never for an iterable (a refit loop's every step); only tensor-parallel
    rank 0 draws. Increments `model.weights_version` on success. One-shot: the atomic snapshot and the staging buffers are allocated for this call;
    `Reloader` keeps them for the next.
    """
    snapshot = WeightSnapshot(model) if atomic else None
    return _reload(model, weights, checkpoint_format=checkpoint_format, strict=strict, snapshot=snapshot,
                   staging_budget=staging_budget, transient_source=transient_source, pool=None,
                   check_finite=check_finite, quantized_source=quantized_source, progress=progress)


class WeightSnapshot:
    """One flat buffer holding a copy of every tensor a reload writes (`inference_tensors`).

    `device` defaults to the model's; "cpu" for a CUDA model keeps the copy in pinned host memory
    (no device memory, slower copies)."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None, *, save: bool = True):
        tensors = inference_tensors(model)
        model_device = _device(model)
        device = torch.device(device) if device is not None else model_device
        offsets, total = {}, 0
        for name, t in tensors.items():
            offsets[name] = total
            total += align_up(t.numel() * t.element_size())
        self.buffer = torch.empty(total, dtype=torch.uint8, device=device,
                                  pin_memory=device.type == "cpu" and model_device.type == "cuda")
        self.views = {n: byte_view(self.buffer, offsets[n], t.shape, t.dtype) for n, t in tensors.items()}
        if save:
            self.save(model)

    def save(self, model: torch.nn.Module) -> None:
        live = inference_tensors(model)
        if live.keys() != self.views.keys():
            raise ValueError("the model's tensors changed since this snapshot was made")
        with torch.no_grad():
            for name, t in live.items():
                self.views[name].copy_(t)

    def restore(self, model: torch.nn.Module) -> None:
        live = inference_tensors(model)
        with torch.no_grad():
            for name, saved in self.views.items():
                live[name].copy_(saved)


class Reloader:
    """Repeated reloads of one model (the RL loop), with buffers kept between calls.

    Holds, between reloads, the atomic snapshot (with `atomic=True`: one copy of the inference
    weights, on `snapshot_device`) and one idle staging buffer (about the largest layer's bf16
    checkpoint-format bytes), so a refit does not allocate and page-fault them again every step.
    `reloader(weights, ...)` takes what `reload_weights` takes after `weights`; `close()` frees the
    buffers. Same guarantees as `reload_weights`."""

    def __init__(self, model: torch.nn.Module, *, atomic: bool = False, strict: bool = True,
                 staging_budget: int | None = None, snapshot_device: torch.device | str | None = None,
                 check_finite: bool = True):
        self.model, self.strict, self.staging_budget = model, strict, staging_budget
        self.check_finite = check_finite
        self.snapshot = WeightSnapshot(model, snapshot_device, save=False) if atomic else None
        self.pool = staging_pool(_device(model), getattr(model, "offload_plan", None))

    def __call__(self, weights: WeightSource, *, checkpoint_format: bool = True, transient_source: bool = False,
                 quantized_source: bool | None = None, progress: bool | None = None) -> set[str]:
        if self.snapshot is not None:
            self.snapshot.save(self.model)
        return _reload(self.model, weights, checkpoint_format=checkpoint_format, strict=self.strict,
                       snapshot=self.snapshot, staging_budget=self.staging_budget,
                       transient_source=transient_source, pool=self.pool, check_finite=self.check_finite,
                       quantized_source=quantized_source, progress=progress)

    @property
    def held_bytes(self) -> int:
        """Memory this reloader keeps between calls (snapshot + idle staging)."""
        return (self.snapshot.buffer.numel() if self.snapshot is not None else 0) + self.pool.idle_bytes

    def close(self) -> None:
        self.snapshot = None
        self.pool.clear()


def _reload(model: torch.nn.Module, weights: WeightSource, *, checkpoint_format: bool, strict: bool,
            snapshot: WeightSnapshot | None, staging_budget: int | None, transient_source: bool,
            pool: StagingPool | None, check_finite: bool = True, quantized_source: bool | None = None,
            progress: bool | None = None) -> set[str]:
    seen: list[str] = []
    failure: Exception | None = None
    try:
        weights = resolve_checkpoint(weights) if isinstance(weights, (str, Path)) else weights
        with _progress(model, weights, progress) as bar:
            if checkpoint_format:
                loaded = _stream(model, weights, strict=strict, staging_budget=staging_budget,
                                 transient_source=transient_source, pool=pool, check_finite=check_finite, seen=seen,
                                 quantized_source=quantized_source, bar=bar)
            else:
                loaded = _copy_processed(model, _tracked(bar(_tensors(weights)), seen), strict, check_finite)
    except Exception as exc:
        failure = exc
    except BaseException as exc:  # KeyboardInterrupt & co.: fail closed at once, no collective after them
        _fail(model, snapshot, seen, exc)
        raise
    failure = _agree(getattr(model, "tp", None), failure)
    if failure is not None:
        _fail(model, snapshot, seen, failure)
        raise failure
    model.weights_version += 1
    model.not_ready_reason = None
    return loaded


def _stream(model: torch.nn.Module, weights: WeightSource, *, strict: bool, staging_budget: int | None,
            transient_source: bool, pool: StagingPool | None, check_finite: bool, seen: list[str],
            quantized_source: bool | None, bar) -> set[str]:
    """checkpoint_format=True: the cold load's streaming driver on the live model."""
    tensors, quantized = reload_source(model, weights, quantized_source)
    session = stream_weights(model, _tracked(bar(tensors), seen), model.weight_mapping, device=_device(model),
                             strict=strict, staging_budget=staging_budget, transient_source=transient_source,
                             pool=pool, offload=None if quantized else getattr(model, "offload_plan", None),
                             check_finite=check_finite, quantized_source=quantized)
    return session.loaded


@contextmanager
def _progress(model: torch.nn.Module, weights: WeightSource, progress: bool | None):
    """A function that wraps the reload's tensors in its bar, if one is drawn (see `reload_weights`)."""
    tp = getattr(model, "tp", None)
    from_disk = isinstance(weights, Path)
    enabled = wants_progress(progress, rank=tp.rank if tp is not None else 0) and (from_disk or progress is True)
    if not enabled:
        yield lambda tensors: tensors
        return
    totals = checkpoint_totals(weights) if from_disk else (None, None)
    with WeightBar("reload", total_bytes=totals[1], total_tensors=totals[0]) as bar:
        yield lambda tensors: counted(tensors, bar)


def _agree(tp: TPContext | None, failure: Exception | None) -> Exception | None:
    """Every tensor-parallel rank learns whether all ranks' reloads succeeded (one 1-element MIN
    all-reduce); the error this rank must raise, or None when every rank succeeded. A reload commits
    on all ranks or on none."""
    if tp is None or tp.size == 1:
        return failure
    ok = torch.tensor([0 if failure is not None else 1], dtype=torch.int32)
    all_reduce(ok, tp, dist.ReduceOp.MIN)
    if failure is None and int(ok) == 0:
        return WeightLoadError(f"tensor-parallel rank {tp.rank}: another rank's reload failed, so this rank's "
                               "reload does not commit either")
    return failure


def _copy_processed(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]], strict: bool,
                    check_finite: bool) -> set[str]:
    """checkpoint_format=False: copy tensors in the model's own format into place, checked exactly."""
    targets = inference_tensors(model)
    done: set[str] = set()
    for name, tensor in weights:
        target = targets.get(name)
        if target is None:
            if strict:
                raise UnexpectedWeightError(f"{name!r} is not one of the model's tensors (checkpoint_format=False "
                                            f"takes names like {next(iter(targets))!r})")
            continue
        if name in done:
            raise DuplicateWeightError(f"{name!r} arrived twice")
        if tensor.shape != target.shape or tensor.dtype != target.dtype:
            raise WeightLoadError(f"{name!r}: expected {target.dtype} {list(target.shape)} (this rank's processed "
                                  f"tensor), received {tensor.dtype} {list(tensor.shape)}")
        if check_finite and not is_finite(tensor):
            raise NonFiniteWeightError(f"{name!r} holds NaN or Inf; refusing to reload it")
        with torch.no_grad():
            target.copy_(tensor)
        done.add(name)
    absent = sorted(set(targets) - done)
    if strict and absent:
        raise MissingWeightsError(f"{len(absent)} tensor(s) never arrived: {', '.join(absent[:8])}"
                                  + (" ..." if len(absent) > 8 else ""))
    return done


def _fail(model: torch.nn.Module, snapshot: WeightSnapshot | None, seen: list[str], exc: BaseException) -> None:
    """Restore the snapshot (atomic) or, if anything was written, mark the model not ready."""
    if snapshot is not None:
        snapshot.restore(model)
        return
    if seen:
        model.not_ready_reason = (
            f"a reload failed after {len(seen)} checkpoint tensor(s) (first {seen[0]!r}) were written: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; the weights are a mix of "
            "old and new; run a complete reload_weights"
        )
