"""Streaming load: a layer's checkpoint-format weights exist only while the layer is in flight.

`stream_weights` is the one driver of every load and reload (a reload runs it on the live model;
the naive baseline runs it with `hold_layers=True`). The model is built on `meta`. The first tensor
written into a module (the direct owner of a parameter) materializes all of that module's meta
loadables (`contract.py`); when every element of every one has been written (exact coverage, see
`coverage.py`), the session gives the tensors its quant method derives memory on the target, the
method runs `process_weights_after_loading` (which may quantize into them), and the module's
checkpoint-format copies (`contract.staged_params`) are released at once into a per-load
`StagingPool` of flat buffers the next layers reuse (no page faults per layer). On CPU the glibc
heap is trimmed every ~3% of the model released (`TRIM_FRACTION`), and once at the end. Tied
parameters belong to every module that holds them and complete together. On failure every module
still in flight is released: a failed load gives its memory back.

`staging_budget` (bytes, optional) bounds the checkpoint-format staging of the layers in flight:
a tensor that would start another layer while the budget is spent is deferred and retried when a
layer finishes; those left at the end are loaded grouped by layer, so each layer completes at once.
A deferred host tensor is kept as a reference (a zero-copy view of an mmapped file); one on an
accelerator spills to host memory (pinned for CUDA), so device memory never grows with the backlog;
with `transient_source=True` (a source that reuses a tensor's storage once the next is requested, e.g.
a broadcast bucket) host tensors are copied too.

`offload` (an `OffloadPlan`, see `offload.py`): staging in host memory, quantized on the target one
layer at a time or on the host; only codes and scales (and unquantized weights) are placed on the target.

Tensor parallel: processing a layer's staged weights runs collectives (the amax reduction), so every
rank checks in on the load's `Gate` (`parallel.gate`) before it processes such a layer, and a cold load
once more at its end: a rank that failed (`gate.fail`) or stopped makes the others raise, naming it,
instead of waiting in the collective. Known limitation: all ranks must see the checkpoint in the same order.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable

import torch

from streamquant.loading.contract import (derived_tensors, method_of, module_loadables, release_staging,
                                         staged_params, staging_bytes)
from streamquant.loading.errors import DuplicateWeightError, NonFiniteWeightError
from streamquant.loading.mapping import WeightMapping
from streamquant.loading.materialize import StagingPool, materialize_, release_
from streamquant.loading.offload import OffloadPlan, host_device, quantize_placement
from streamquant.loading.session import WeightLoadSession
from streamquant.memory import trim_heap
from streamquant.parallel.gate import Gate


# On CPU the glibc heap is trimmed each time checkpoint-format bytes worth 1/TRIM_FRACTION of the
# model's (at least TRIM_MIN_BYTES) were released. Without trims, freed temporaries and staging stay
# resident in a fragmented heap (1 GB load: peak 1.20x the final fp8 model instead of 1.04x);
# trimming after every layer re-faults freed pages (+25% load time); every 1/32 costs ~3%.
TRIM_FRACTION = 32
TRIM_MIN_BYTES = 8 << 20


def largest_layer_staging_bytes(model: torch.nn.Module) -> int:
    """Checkpoint-format bytes of the model's largest quantized layer on this rank (0 if none): the
    staging one in-order layer needs, and the smallest useful `staging_budget`."""
    return max((staging_bytes(m) for m in model.modules()), default=0)


def staging_pool(device: torch.device | str, offload: OffloadPlan | None) -> StagingPool:
    """The staging pool of a load to `device`: host buffers pinned for CUDA when offloading; with
    offload (quantize_on="cpu") a layer's fp8 temporaries are pooled too, so 3 idle buffers."""
    if offload is None:
        return StagingPool()
    return StagingPool(keep=3, pin_memory=torch.device(device).type == "cuda")


class StreamingLoadSession(WeightLoadSession):
    """`WeightLoadSession` that materializes modules at first write and finishes them at last write."""

    def __init__(self, model: torch.nn.Module, mapping: WeightMapping, *, device: torch.device | str,
                 strict: bool = True, fill: float | None = None, staging_budget: int | None = None,
                 transient_source: bool = False, pool: StagingPool | None = None,
                 offload: OffloadPlan | None = None, check_finite: bool = True, quantized_source: bool = False,
                 hold_layers: bool = False, gate: Gate | None = None):
        super().__init__(model, mapping, strict=strict, check_finite=check_finite, quantized_source=quantized_source)
        self.gate = gate if gate is not None else Gate(None)  # the ranks check in before each layer's processing
        self.staging_budget = staging_budget
        self.hold_layers = hold_layers  # process no layer before the whole checkpoint arrived (`finish_held`)
        self.transient_source = transient_source
        self.spilled_bytes = 0  # deferred tensors copied to host memory (accelerator or transient sources)
        self.staged_bytes = 0  # checkpoint-format bytes of the modules in flight
        self.peak_staged_bytes = 0
        self.pending: list[tuple[str, torch.Tensor]] = []  # deferred by the budget: references, not copies
        self.draining = False
        self.device = torch.device(device)
        self.fill = fill
        name_of = {id(p): n for n, p in self.params.items()}
        self.members: dict[str, list[str]] = {}
        self.owners: dict[str, list[str]] = {}
        self.modules = dict(model.named_modules())
        for mod_name, module in self.modules.items():
            names = [name_of[id(p)] for p in module_loadables(module, quantized_source).values()]
            if names:
                self.members[mod_name] = names
                for n in names:
                    self.owners.setdefault(n, []).append(mod_name)
        # checkpoint-format copies (staging, released after processing) come from the pool; permanent
        # parameters get exactly their own memory
        self.staged = {id(p) for m in self.modules.values() for p in staged_params(m).values()}
        self.in_flight: set[str] = set()
        self.materialized: set[str] = set()  # parameters this session gave storage (they were on meta)
        self.finished: list[str] = []
        self.offload = offload
        # staging lives on the target, or (offload) in host memory, pinned for CUDA; `target_pool`:
        # the target buffers offloaded layers are quantized in (quantize_on="device")
        self.staging_device = host_device() if offload is not None else self.device
        self.pool = pool if pool is not None else staging_pool(self.device, offload)
        self.target_pool = StagingPool()
        self.since_trim = 0  # checkpoint-format bytes released since the heap was last trimmed
        total = sum(p.numel() * p.element_size() for p in self.params.values())
        self.trim_every = max(TRIM_MIN_BYTES, total // TRIM_FRACTION)

    def before_write(self, param_name: str) -> None:
        for mod_name in self.owners[param_name]:
            if mod_name not in self.in_flight and mod_name not in self.finished:
                self.in_flight.add(mod_name)
                for n in self.members[mod_name]:
                    param = self.params[n]
                    if param.is_meta:
                        self.materialized.add(n)
                    staged = id(param) in self.staged
                    materialize_(param, self.staging_device if staged else self.device, self.fill,
                                 self.pool if staged else None)
                self.staged_bytes += self._staging_bytes(mod_name)
                self.peak_staged_bytes = max(self.peak_staged_bytes, self.staged_bytes)

    def after_write(self, param_name: str) -> None:
        if self.hold_layers:
            return
        for mod_name in self.owners[param_name]:
            if mod_name in self.in_flight and all(self.coverage[n].complete for n in self.members[mod_name]):
                self.finish(mod_name)

    def finish(self, mod_name: str) -> None:
        """Run the module's quant method on its complete weights (still in flight if that fails): its
        derived tensors get memory on the target first, its checkpoint-format staging is released after."""
        module = self.modules[mod_name]
        method = method_of(module)
        if method is not None:
            staged = list(staged_params(module).values())
            if any(not p.is_meta for p in staged):  # quantizing what it staged runs collectives at TP > 1
                self.gate.step(f"layer {mod_name!r}")
            derived = [t for t in derived_tensors(module).values() if isinstance(t, torch.nn.Parameter)]
            for param in derived:
                materialize_(param, self.device)
            try:
                if self.offload is not None and staged:
                    with quantize_placement(staged, derived, self.offload, self.device, self.pool, self.target_pool):
                        method.process_weights_after_loading(module)
                else:
                    method.process_weights_after_loading(module)
            except NonFiniteWeightError as e:
                raise self.name_source(mod_name, e) from None
            released = self._staging_bytes(mod_name)  # what this session gave the staging (none for codes)
            for param in staged:
                release_(param, self.pool)
            self.since_trim += released
            self.staged_bytes -= released
            if self.staging_device.type == "cpu" and self.since_trim >= self.trim_every:
                trim_heap()
                self.since_trim = 0
        self.in_flight.discard(mod_name)
        self.finished.append(mod_name)
        self._drain()

    def name_source(self, mod_name: str, error: NonFiniteWeightError) -> NonFiniteWeightError:
        """`error` restated with the checkpoint tensor that wrote the non-finite element."""
        param_name = f"{mod_name}.{error.param}" if mod_name else error.param
        coverage = self.coverage.get(param_name)
        source = coverage.source_at(error.index) if coverage is not None and error.index else None
        if source is None:
            return error
        return NonFiniteWeightError(
            f"checkpoint tensor {source!r} holds NaN or Inf (element {list(error.index)} of parameter "
            f"{param_name!r}); refusing to quantize {mod_name!r}", param=error.param, index=error.index)

    def _staging_bytes(self, mod_name: str) -> int:
        return sum(self.params[n].numel() * self.params[n].element_size()
                   for n in self.members[mod_name] if id(self.params[n]) in self.staged)

    def _new_staging_bytes(self, name: str) -> int:
        """Staging bytes that loading checkpoint tensor `name` would newly give memory (0: its modules are in flight)."""
        if self.mapping.should_skip(name):
            return 0
        owners = self.owners.get(self.mapping.map(name)[0], ())
        return sum(self._staging_bytes(m) for m in owners if m not in self.in_flight and m not in self.finished)

    def load(self, name: str, tensor: torch.Tensor) -> str | None:
        """Load, or defer (keeping a reference) while the staging budget is spent by other layers in flight."""
        if self.staging_budget is not None and not self.draining and self.staged_bytes:
            need = self._new_staging_bytes(name)
            if need and self.staged_bytes + need > self.staging_budget:
                if name in self.loaded or any(name == n for n, _ in self.pending):
                    raise DuplicateWeightError(f"checkpoint tensor {name!r} arrived twice")
                self.pending.append((name, self._hold(tensor)))
                return None
        return super().load(name, tensor)

    def _hold(self, tensor: torch.Tensor) -> torch.Tensor:
        """What a deferred tensor is kept as: itself (host memory, stable), else a host copy."""
        if tensor.device.type == "cpu" and not self.transient_source:
            return tensor
        held = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        held.copy_(tensor)
        self.spilled_bytes += held.numel() * held.element_size()
        return held

    def _owner_of(self, name: str) -> str:
        return self.owners.get(self.mapping.map(name)[0], [""])[0]

    def _drain(self) -> None:
        """Retry deferred tensors (after a layer finished and freed budget)."""
        items, self.pending = self.pending, []
        for name, tensor in items:
            self.load(name, tensor)

    def complete(self) -> None:
        """After the last tensor: load the deferred tensors, grouped by layer so each completes at
        once; raise if anything is missing (strict); process held layers."""
        self.draining = True
        items, self.pending = sorted(self.pending, key=lambda item: self._owner_of(item[0])), []
        for name, tensor in items:
            super().load(name, tensor)
        self.check_complete()
        self.finish_held()

    def fail(self, exc: BaseException) -> None:
        """After `exc`: release what this pass materialized for unfinished layers. The failed step's
        finished frames hold views of staged weights, which would pin them (and make releasing them
        fail, hiding `exc`): their locals are dropped first; the traceback keeps its lines."""
        traceback.clear_frames(exc.__traceback__)
        self.abort()

    def finish_held(self) -> None:
        """`hold_layers=True`: process every complete layer, in model order, now that all weights arrived."""
        for mod_name in [m for m in self.modules if m in self.in_flight]:
            if all(self.coverage[n].complete for n in self.members[mod_name]):
                self.finish(mod_name)

    def close(self, keep_pool: bool = False) -> None:
        """After a successful pass: release the staging of layers never completed (strict=False: never
        processed), empty the pools (`keep_pool`: the caller's pool keeps its idle buffers), trim the heap."""
        for mod_name in sorted(self.in_flight):
            release_staging(self.modules[mod_name], self.pool)
        if not keep_pool:
            self.pool.clear()
        self.target_pool.clear()
        if self.staging_device.type == "cpu":
            trim_heap()

    def abort(self) -> None:
        """Release what this session materialized for the modules still in flight (after a failure);
        parameters that already had storage (a live model being reloaded) keep it."""
        for mod_name in sorted(self.in_flight):
            for n in self.members[mod_name]:
                if n in self.materialized:
                    release_(self.params[n])
        self.in_flight.clear()
        self.pending.clear()
        self.pool.clear()
        self.target_pool.clear()


def stream_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapping: WeightMapping, *,
                   device: torch.device | str, strict: bool = True, fill: float | None = None,
                   staging_budget: int | None = None, transient_source: bool = False, offload: OffloadPlan | None = None,
                   check_finite: bool = True, quantized_source: bool = False, pool: StagingPool | None = None,
                   hold_layers: bool = False) -> StreamingLoadSession:
    """Stream `weights` into `model` (built on `meta` for a load, live for a reload): the one driver
    of every load and reload. Returns the finished session (loaded names, order of layers).
    `quantized_source=True`: layers take pre-quantized codes and scales (`contract.module_loadables`).
    `pool`: a staging pool the caller keeps between passes (a `Reloader`); its idle buffers survive.
    `hold_layers=True`: the naive baseline; no layer is processed before every tensor arrived. On
    failure what this pass materialized for unfinished layers is released, the other tensor-parallel
    ranks are told (they raise at their next layer, or at the end) and the error propagates."""
    gate = Gate(getattr(model, "tp", None))
    session = StreamingLoadSession(model, mapping, device=device, strict=strict, fill=fill,
                                   staging_budget=staging_budget, transient_source=transient_source, offload=offload,
                                   check_finite=check_finite, quantized_source=quantized_source, pool=pool,
                                   hold_layers=hold_layers, gate=gate)
    try:
        with torch.no_grad():
            session.load_all(weights)
            session.complete()
        gate.step("the end of the load")  # every rank loaded, or every rank raises
    except BaseException as exc:
        gate.fail(exc)
        session.fail(exc)
        raise
    gate.close()
    session.close(keep_pool=pool is not None)
    return session
