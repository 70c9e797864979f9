"""`begin_update`: the push-style weight update RL frameworks drive (begin / load / finish / abort).

    update = begin_update(model, atomic=True)      # on every tensor-parallel rank
    for name, tensor in bucket:                    # any order, any bucketing, from any transport
        update.load(name, tensor)                  # the caller may reuse `tensor` as soon as it returns
    update.finish(expected_fingerprint=None)       # commit on every rank, or fail closed on every rank
    # or update.abort(): the model exactly as before (atomic=True) or marked not ready

Each `load` runs the cold load's own session on the live model (`loading.streaming`): a layer is
re-quantized INTO its codes and scales the moment its last element arrived (addresses unchanged, so
captured CUDA graphs stay valid). Completion is by coverage of every element of every parameter (or,
with `expected`, of exactly those checkpoint names), never by counts. `finish` checks completeness,
then every rank learns whether all ranks succeeded (one 1-element all-reduce), then, with
`expected_fingerprint`, the `weights_fingerprint` of the result is compared; only then does
`weights_version` advance. Any failure (a refused tensor, a source that raised, a name missing at
finish, another rank's failure, a fingerprint mismatch) fails closed: `atomic=True` restores the
snapshot taken at begin, otherwise the model is marked not ready (`forward` raises) if anything was
written. Between begin and finish the model is not ready either: its weights are mixed.

Lifecycle rules, each a `WeightUpdateError` naming what was wrong: one active update per model (a
second `begin_update` is refused), `load` / `finish` / `abort` only while active, `finish` and
`abort` once. A `load` that raised leaves the update failed: `finish` then raises that error (after
agreeing with the other ranks) and `abort` ends it. `reload_weights` and `Reloader` (and through them
`WeightReceiver`) are thin users of this class: one path.

Tensor parallel, failing fast: each update opens a `parallel.gate.Gate`; every rank checks in on it
before it quantizes a layer (whose amax all-reduce is a collective), and a rank whose `load` raised,
whose source raised, whose `finish` found a fault or that called `abort` posts its reason on it at
once. The other ranks then raise `RankFailedError` at their next such layer, naming that rank and its
reason, without entering the collective -- whatever the process group's timeout -- and all meet in
`finish` / `abort`'s agreement, so the model on every rank ends as `atomic` says. A rank that fails
after the other ranks' last such layer (or in an update with none: unquantized, or pre-quantized
codes, whose layers run no collective when loaded) is named by the agreement (`RankFailedError`
too), once the others reach `finish`. A rank that stops
answering is named by `RankStoppedError` after the group's store timeout (the collectives' timeout
under `parallel.launch` and `torchrun`).

Limitation: a rank that raises inside a layer's processing on its own (after its check-in, e.g. out of
memory) still leaves its peers in that layer's collective until the process group's timeout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from streamquant.fingerprint import digest_mismatches, weights_digests, weights_fingerprint
from streamquant.loading.contract import inference_tensors
from streamquant.loading.errors import (
    DuplicateWeightError,
    MissingWeightsError,
    NonFiniteWeightError,
    UnexpectedWeightError,
    WeightLoadError,
)
from streamquant.loading.materialize import StagingPool
from streamquant.loading.streaming import StreamingLoadSession
from streamquant.loading.validate import is_finite
from streamquant.parallel.context import TPContext, all_reduce
from streamquant.parallel.gate import Gate, RankFailedError, RankStoppedError
from streamquant.snapshot import WeightSnapshot, model_device


class WeightUpdateError(RuntimeError):
    """A weight update used out of its lifecycle (begin once, load while active, finish or abort once)."""


class FingerprintMismatchError(WeightLoadError):
    """The weights after an update are not the ones the caller expected (`finish(expected_fingerprint=)`)."""


class ProcessedCopy:
    """`checkpoint_format=False`: tensors in the model's own format (this rank's processed tensors,
    named as `inference_tensors` names them) copied into place, checked exactly."""

    def __init__(self, model: torch.nn.Module, strict: bool, check_finite: bool):
        self.targets = inference_tensors(model)
        self.strict, self.check_finite = strict, check_finite
        self.loaded: set[str] = set()

    def load(self, name: str, tensor: torch.Tensor) -> None:
        target = self.targets.get(name)
        if target is None:
            if self.strict:
                raise UnexpectedWeightError(f"{name!r} is not one of the model's tensors (checkpoint_format=False "
                                            f"takes names like {next(iter(self.targets))!r})")
            return
        if name in self.loaded:
            raise DuplicateWeightError(f"{name!r} arrived twice")
        if tensor.shape != target.shape or tensor.dtype != target.dtype:
            raise WeightLoadError(f"{name!r}: expected {target.dtype} {list(target.shape)} (this rank's processed "
                                  f"tensor), received {tensor.dtype} {list(tensor.shape)}")
        if self.check_finite and not is_finite(tensor):
            raise NonFiniteWeightError(f"{name!r} holds NaN or Inf; refusing to reload it")
        target.copy_(tensor)
        self.loaded.add(name)

    def complete(self) -> None:
        absent = sorted(set(self.targets) - self.loaded)
        if self.strict and absent:
            raise MissingWeightsError(f"{len(absent)} tensor(s) never arrived: {', '.join(absent[:8])}"
                                      + (" ..." if len(absent) > 8 else ""))

    def close(self, keep_pool: bool = False) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass


def agree(tp: TPContext | None, failure: BaseException | None, gate: Gate | None = None) -> BaseException | None:
    """Every tensor-parallel rank learns whether all ranks succeeded (one 1-element MIN all-reduce: the
    first failed rank); the error this rank must raise, or None when every rank succeeded: commit on all
    ranks or on none. `gate`: where the failed rank posted its reason, to name it."""
    if tp is None or tp.size == 1 or isinstance(failure, RankStoppedError):
        return failure  # (a rank that stopped answering would not join the agreement either)
    first = torch.tensor([tp.rank if failure is not None else tp.size], dtype=torch.int32)
    all_reduce(first, tp, dist.ReduceOp.MIN)
    failed = int(first)
    if failure is None and failed < tp.size:
        reason = gate.posted_reason(failed) if gate is not None else None
        return RankFailedError(f"tensor-parallel rank {failed} failed" + (f" ({reason})" if reason else "") +
                               f", so rank {tp.rank}'s update does not commit either", failed, reason or "")
    return failure


class WeightUpdate:
    """One update of a loaded model's weights (see the module doc); made by `begin_update`."""

    def __init__(self, model: torch.nn.Module, *, atomic: bool = False, expected: Iterable[str] | None = None,
                 strict: bool = True, checkpoint_format: bool = True, quantized_source: bool = False,
                 staging_budget: int | None = None, transient_source: bool = True, check_finite: bool = True,
                 snapshot: WeightSnapshot | None = None, pool: StagingPool | None = None):
        if model.active_update is not None:
            raise WeightUpdateError("a weight update is already active on this model: finish() or abort() it "
                                    "before beginning another")
        self.model, self.pool = model, pool
        self.expected = frozenset(expected) if expected is not None else None
        self.snapshot = snapshot if snapshot is not None else (WeightSnapshot(model) if atomic else None)
        self.tp: TPContext | None = getattr(model, "tp", None)
        self.gate = Gate(self.tp)  # the ranks check in before each layer; a failure is posted on it at once
        self.session = self._session(strict and self.expected is None, checkpoint_format, quantized_source,
                                     staging_budget, transient_source, check_finite)
        self.written: list[str] = []  # names handed to the session (what a failure may have written)
        self.failure: BaseException | None = None
        model.active_update = self  # forward refuses until finish or abort: the weights are mixed

    def _session(self, strict, checkpoint_format, quantized_source, staging_budget, transient_source, check_finite):
        if not checkpoint_format:
            return ProcessedCopy(self.model, strict, check_finite)
        offload = None if quantized_source else getattr(self.model, "offload_plan", None)
        return StreamingLoadSession(self.model, self.model.weight_mapping, device=model_device(self.model),
                                    strict=strict, staging_budget=staging_budget, transient_source=transient_source,
                                    pool=self.pool, offload=offload, check_finite=check_finite,
                                    quantized_source=quantized_source, gate=self.gate)

    @property
    def active(self) -> bool:
        return self.model.active_update is self

    def _require_active(self, step: str) -> None:
        if not self.active:
            raise WeightUpdateError(f"{step}() on a weight update that already ended (finish or abort ran)")

    def load(self, name: str, tensor: torch.Tensor) -> None:
        """Write one checkpoint tensor (full, unsharded: each rank takes its shard)."""
        self._require_active("load")
        if self.failure is not None:
            raise WeightUpdateError(f"load({name!r}) after this update failed ({type(self.failure).__name__}: "
                                    f"{self.failure}); call abort() or finish()")
        try:
            if self.expected is not None and name not in self.expected:
                raise UnexpectedWeightError(f"checkpoint tensor {name!r} is not among the names this update expects")
            self.written.append(name)
            with torch.no_grad():
                self.session.load(name, tensor)
        except Exception as exc:
            self._failed(exc)
            raise
        except BaseException as exc:  # KeyboardInterrupt & co.: fail closed at once, no collective after them
            self._fail_closed(exc)
            raise

    def load_many(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        """`load` each pair; an error of the iterable itself fails the update too."""
        try:
            for name, tensor in pairs:
                self.load(name, tensor)
        except Exception as exc:
            self._failed(exc)
            raise
        except BaseException as exc:  # from the iterable itself (load already failed closed on its own)
            if self.active:
                self._fail_closed(exc)
            raise

    def finish(self, expected_fingerprint: str | dict[str, str] | None = None) -> set[str]:
        """Commit on every rank or on none; returns the names loaded on this rank. `expected_fingerprint`:
        the `weights_fingerprint` (a collective: pass it on every rank) or this rank's `weights_digests`."""
        self._require_active("finish")
        failure = self.failure
        if failure is None:
            try:
                with torch.no_grad():
                    self.session.complete()
                    self._check_expected_arrived()
                self.session.close(keep_pool=self.pool is not None)
            except Exception as exc:
                failure = exc
                self._failed(exc)
        failure = agree(self.tp, failure, self.gate)
        self._close_gate(failure)
        if failure is None and expected_fingerprint is not None:
            failure = agree(self.tp, self._fingerprint_mismatch(expected_fingerprint))
        if failure is not None:
            self._fail_closed(failure)
            raise failure
        self.model.weights_version += 1
        self.model.not_ready_reason = None
        self.model.active_update = None
        return set(self.session.loaded)

    def abort(self) -> None:
        """End the update without committing, on this rank and (through the agreement a concurrent
        `finish` on another rank takes part in) on every rank."""
        self._require_active("abort")
        failure = self.failure or WeightUpdateError("the update was aborted")
        self.gate.fail(failure)
        self._close_gate(agree(self.tp, failure))
        self._fail_closed(failure)

    def _close_gate(self, agreed: BaseException | None) -> None:
        """Delete this rank's keys on the gate after the agreement: all of them when every rank succeeded
        (none reads a step any more), else those the others passed (they may still read the failure's
        reason, `agree`); none after a rank stopped answering (there was no agreement)."""
        if not isinstance(agreed, RankStoppedError):
            self.gate.close(every_rank_done=agreed is None)

    def _failed(self, exc: Exception) -> None:
        """Record this update's first failure and tell the other ranks at once (they may be waiting to
        process a layer with this one)."""
        self.failure = self.failure or exc
        self.gate.fail(exc)

    def _check_expected_arrived(self) -> None:
        if self.expected is None:
            return
        missing = sorted(self.expected - set(self.written))
        if missing:
            raise MissingWeightsError(f"{len(missing)} expected checkpoint tensor(s) never arrived: "
                                      f"{', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))

    def _fingerprint_mismatch(self, expected: str | dict[str, str]) -> FingerprintMismatchError | None:
        digests = weights_digests(self.model)
        rank = self.tp.rank if self.tp is not None else 0
        if isinstance(expected, dict):
            wrong = digest_mismatches(digests, expected)
            return FingerprintMismatchError(f"rank {rank}: {len(wrong)} tensor(s) differ from the expected digests: "
                                            f"{', '.join(wrong[:8])}") if wrong else None
        got = weights_fingerprint(self.model, digests)
        if got == expected:
            return None
        return FingerprintMismatchError(f"weights fingerprint {got} after the update, expected {expected}")

    def _fail_closed(self, failure: BaseException) -> None:
        self.gate.fail(failure)  # (a KeyboardInterrupt & co. reach here first: no agreement after them)
        self.session.fail(failure)
        self.model.active_update = None
        if self.snapshot is not None:
            self.snapshot.restore(self.model)  # exactly as before, readiness included
        elif self.written:
            first = str(failure).splitlines()[0] if str(failure) else ""
            self.model.not_ready_reason = (
                f"a weight update failed after {len(self.written)} checkpoint tensor(s) (first {self.written[0]!r}) "
                f"were written: {type(failure).__name__}: {first}; the weights are a mix of old and new; run a "
                "complete update (reload_weights or begin_update ... finish)")


def begin_update(model: torch.nn.Module, *, atomic: bool = False, expected: Iterable[str] | None = None,
                 quantized_source: bool = False, staging_budget: int | None = None,
                 check_finite: bool = True) -> WeightUpdate:
    """Begin a push-style update of `model` (see the module doc). `expected`: the checkpoint names to
    wait for (default: every tensor the model takes); `quantized_source=True`: codes and scales arrive
    pre-quantized (`offline.quantize_weights`); `staging_budget` (bytes) bounds the high-precision
    staging of layers in flight (a deferred tensor is copied: the caller may reuse its memory)."""
    return WeightUpdate(model, atomic=atomic, expected=expected, quantized_source=quantized_source,
                        staging_budget=staging_budget, check_finite=check_finite)
