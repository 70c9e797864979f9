"""`reload_weights`: new checkpoint-format weights into a loaded model, in place (the RL refit path).

A reload is a pull over the push-style update (`update.begin_update`): every tensor of the source is
`load`ed, then `finish` commits; one path. It runs the cold load's own session on the live model: every fp8 layer gets
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

`quantized_source=True` takes pre-quantized codes and scales (int4: zero points, group indices) in checkpoint layout (a quantized
checkpoint directory, which says so itself; `offline.quantize_weights`; a `WeightSender(quantization=)`)
and writes them straight into the quantized parameters, with the same strictness and failure handling;
nothing is quantized, and no high-precision staging exists.

`Reloader(model, atomic=..., staging_budget=...)` is the same for a loop of reloads (the RL case):
it keeps the atomic snapshot (`WeightSnapshot`, one flat buffer) and an idle staging buffer between
calls instead of allocating and page-faulting them every step.

A pull whose update failed still reads an iterable source to its end before `finish` (a source fed by
collectives, like `WeightReceiver`'s broadcasts, needs every rank to read it); a checkpoint directory
is not read further.

Limitations: all tensor-parallel ranks must see the same order; a tensor deferred by the staging
budget is a reference to the caller's tensor, which must not change until the reload returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from streamquant.checkpoint.reader import checkpoint_totals, iterate_weights, resolve_checkpoint
from streamquant.formats.prequantized import reload_source
from streamquant.loading.streaming import staging_pool
from streamquant.progress import progress_over, wants_progress
from streamquant.snapshot import WeightSnapshot, model_device
from streamquant.update import WeightUpdate

WeightSource = str | Path | Iterable[tuple[str, torch.Tensor]]


def _tensors(weights: WeightSource) -> Iterable[tuple[str, torch.Tensor]]:
    """A checkpoint directory or hub id is read again from disk on every call (never cached)."""
    if isinstance(weights, (str, Path)):
        return iterate_weights(resolve_checkpoint(weights))
    return weights


def reload_weights(model: torch.nn.Module, weights: WeightSource, *, checkpoint_format: bool = True,
                   strict: bool = True, atomic: bool = False, staging_budget: int | None = None,
                   transient_source: bool = False, check_finite: bool = True,
                   quantized_source: bool | None = None, expected: Iterable[str] | None = None,
                   progress: bool | None = None) -> set[str]:
    """Write `weights` into `model` in place; returns the checkpoint names loaded (see the module doc).

    `weights`: a checkpoint directory / hub id, or an iterable of `(name, tensor)` in checkpoint
    naming and layout (full, unsharded tensors: each rank takes its shard). `staging_budget`
    (bytes) bounds the high-precision staging when tensors arrive out of layer order: later
    layers' tensors are held as references until budget frees (accelerator tensors spill to host
    memory; with `transient_source=True`, for a source that reuses a tensor's storage once the next
    one is requested, every deferred tensor is copied). `check_finite=False` skips the NaN / Inf
    check of every incoming tensor (one `aminmax` pass each). `quantized_source=True`: the tensors are
    pre-quantized (codes and scales in checkpoint layout, e.g. from `offline.quantize_weights` or
    a `WeightSender(quantization=...)`) and are installed as they are, no high-precision staging; a
    checkpoint directory says itself whether it is (its `quantization_config`). `expected`: the
    checkpoint names `weights` holds when it updates only some tensors (`begin_update(expected=)`: each
    must arrive, nothing else may; default: every tensor the model takes). `progress`: a bar of
    bytes and tensors on stderr (`streamquant/progress.py`); None (default): for a checkpoint directory
    where stderr is a terminal, never for an iterable (a refit loop's every step); only tensor-parallel
    rank 0 draws. Increments `model.weights_version` on success. One-shot: the atomic snapshot and the staging buffers are allocated for this call;
    `Reloader` keeps them for the next.
    """
    return _reload(model, weights, checkpoint_format=checkpoint_format, strict=strict, atomic=atomic,
                   snapshot=None, staging_budget=staging_budget, transient_source=transient_source, pool=None,
                   check_finite=check_finite, quantized_source=quantized_source, expected=expected, progress=progress)


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
        self.pool = staging_pool(model_device(model), getattr(model, "offload_plan", None))

    def __call__(self, weights: WeightSource, *, checkpoint_format: bool = True, transient_source: bool = False,
                 quantized_source: bool | None = None, expected: Iterable[str] | None = None,
                 progress: bool | None = None) -> set[str]:
        if self.snapshot is not None:
            self.snapshot.save(self.model)
        return _reload(self.model, weights, checkpoint_format=checkpoint_format, strict=self.strict,
                       atomic=self.snapshot is not None, snapshot=self.snapshot, staging_budget=self.staging_budget,
                       transient_source=transient_source, pool=self.pool, check_finite=self.check_finite,
                       quantized_source=quantized_source, expected=expected, progress=progress)

    @property
    def held_bytes(self) -> int:
        """Memory this reloader keeps between calls (snapshot + idle staging)."""
        return (self.snapshot.buffer.numel() if self.snapshot is not None else 0) + self.pool.idle_bytes

    def close(self) -> None:
        self.snapshot = None
        self.pool.clear()


def _reload(model: torch.nn.Module, weights: WeightSource, *, checkpoint_format: bool, strict: bool, atomic: bool,
            snapshot: WeightSnapshot | None, staging_budget: int | None, transient_source: bool,
            pool, check_finite: bool, quantized_source: bool | None, expected: Iterable[str] | None,
            progress: bool | None) -> set[str]:
    """A pull over the push-style update: begin, load every tensor of the source, finish."""
    weights = resolve_checkpoint(weights) if isinstance(weights, (str, Path)) else weights
    if checkpoint_format:
        tensors, quantized = reload_source(model, weights, quantized_source)
    else:
        tensors, quantized = _tensors(weights), False
    update = WeightUpdate(model, atomic=atomic, expected=expected, strict=strict,
                          checkpoint_format=checkpoint_format, quantized_source=quantized,
                          staging_budget=staging_budget, transient_source=transient_source, check_finite=check_finite,
                          snapshot=snapshot, pool=pool)
    tp = getattr(model, "tp", None)
    from_disk = isinstance(weights, Path)  # an iterable (a refit loop's every step) only when asked
    enabled = wants_progress(progress, rank=tp.rank if tp is not None else 0) and (from_disk or progress is True)
    with progress_over(tensors, "reload", enabled=enabled,
                       totals=(lambda: checkpoint_totals(weights)) if from_disk else None) as counted_tensors:
        tensors_left = iter(counted_tensors)
        try:
            update.load_many(tensors_left)
        except Exception:  # noqa: BLE001  recorded in the update: finish agrees with the other ranks, then raises it
            if not from_disk:
                _drain(tensors_left)
        return update.finish()


def _drain(tensors) -> None:
    """Read a failed pull's source to its end (a source that raised is at its end already): a source fed
    by collectives (a `WeightReceiver`'s broadcasts) needs every rank to read it before the ranks meet
    in `finish`'s agreement."""
    try:
        for _ in tensors:
            pass
    except Exception:  # noqa: BLE001  the update's first failure is the one to report
        pass
