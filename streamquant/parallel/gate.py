"""Fail fast across tensor-parallel ranks: a load's check-ins on the process group's key-value store.

A layer's collective (the amax all-reduce of quantized weights at TP > 1) that one rank never enters
-- its source raised, its values were refused, its process stopped -- would keep the other ranks in it
until the process group's timeout (30 minutes for torch's default group). A `Gate`, opened once per
load or update on every rank, keeps that from happening: before each step that may run a collective
(a layer's processing), `gate.step(where)` checks this rank in on the store the group already has
(`ProcessGroup.get_group_store()`) and returns once every rank has checked in for that step. A rank
that fails calls `gate.fail(exc)`: its reason takes the place of its next check-in, so every other
rank raises `RankFailedError`, naming it and its reason, as soon as it reaches that step -- without
entering the collective, so the group stays in step and a later collective (the update's `agree`)
pairs. A rank that does not check in within the store's timeout is named as the one that stopped
answering (`RankStoppedError`).

Protocol, under "streamquant/gate/<n>/" (n: how many gates this rank opened in this group, the same on
every rank since they open them in the same order): step k sets "k/<rank>" to "" (a store sends a set
without waiting for an answer) and reads every other rank's "k/<q>" in one `multi_get`, which the
store answers once they all exist (or its timeout raises). A failure sets "k/<rank>" to its reason,
for the first step this rank has not checked in. `close()` deletes this rank's keys that no rank can
still be reading.

Cost: one store round trip per step (~0.1 ms on loopback), one to open the gate and one per step to
close it; none at TP = 1 or without an initialized process group (a test's "rank 1 of 2" in one process).

Invariants: a rank enters the collectives of step k only after every rank checked in for k without a
failure, so no rank waits in a collective for a rank that failed before it; once a gate raised or
posted a failure it posts nothing more. How long a silent rank is waited for is the group's store
timeout: `parallel.rank` and `parallel.torchrun` (env://) set it to the collectives' timeout.

Limitations: a rank that fails inside a step (after its check-in, before the layer's collectives end,
e.g. out of memory while quantizing) still leaves its peers in the collective until the group's timeout
(non-finite values are handled by the collective itself: `quant.scaled.weights`); with three or more
ranks, one failed and another silent, the others report after the store's timeout; after a rank was
named as stopped, the group is no more usable than after a collective's timeout.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from streamquant.parallel.context import TPContext

GATE_PREFIX = "streamquant/gate"  # (a PrefixStore puts "/" after its prefix)
REASON_CHARS = 500  # a failure's reason as other ranks show it: its type and first line, at most this long
# How long `posted_reason` waits for a failed rank's reason: it posts it before the collective that tells
# the others it failed, so it is there at once unless it posted none.
REASON_WAIT_S = 2.0


class RankFailedError(RuntimeError):
    """Another tensor-parallel rank failed (`rank`, and its `reason`), so this one stops too."""

    def __init__(self, message: str, rank: int, reason: str):
        super().__init__(message)
        self.rank, self.reason = rank, reason

    def __reduce__(self):  # travels between processes (a `RankPool` report) with its fields
        return type(self), (str(self), self.rank, self.reason)


class RankStoppedError(RankFailedError):
    """Another tensor-parallel rank stopped answering: no check-in for the group's store timeout."""


def reason_of(exc: BaseException) -> str:
    """`exc` in one line as other ranks show it: its type and its message's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


def group_store(group: dist.ProcessGroup) -> dist.Store:
    """The key-value store `group` was formed over (through torch's own helper where a torch lacks the method)."""
    getter = getattr(group, "get_group_store", None)
    return getter() if getter is not None else dist.distributed_c10d._get_process_group_store(group)


class Gate:
    """One load's (or update's) check-ins, on this rank (see the module doc)."""

    def __init__(self, tp: TPContext | None):
        self.rank = tp.rank if tp is not None else 0
        self.others = [q for q in range(tp.size) if q != self.rank] if tp is not None else []
        self.store: dist.Store | None = None
        self.checked_in = 0  # steps this rank set a key for (a check-in or its failure): its next key's index
        self.passed = 0  # steps every rank checked in for, as this rank saw
        self.deleted = 0  # this rank's keys deleted so far (indices below it)
        self.ended = False  # raised or posted a failure: nothing more is posted
        if not self.others or not dist.is_available() or not dist.is_initialized():
            return
        base = dist.PrefixStore(GATE_PREFIX, group_store(tp.group or dist.group.WORLD))
        self.number = base.add(f"opened/{self.rank}", 1)
        self.store = dist.PrefixStore(str(self.number), base)
        self.silence_s = self.store.timeout.total_seconds()

    def step(self, where: str) -> None:
        """Check in for the next step and return once every rank did; `where` names the step in errors
        ("layer 'model.layers.3.mlp.down_proj'"). Raises `RankFailedError` / `RankStoppedError`."""
        if self.store is None:
            return
        if self.ended:
            raise RuntimeError(f"step({where!r}) on a gate that already failed")
        k = self.checked_in
        self.store.set(f"{k}/{self.rank}", "")
        self.checked_in += 1
        try:
            words = self.store.multi_get([f"{k}/{q}" for q in self.others])
        except RuntimeError:  # the store's timeout (DistStoreError), or the store is gone
            self.ended = True
            raise self._stopped(k, where) from None
        for q, word in zip(self.others, words):
            if word:
                self.ended = True
                reason = word.decode(errors="replace")
                raise RankFailedError(f"tensor-parallel rank {q} failed ({reason}); rank {self.rank} stopped "
                                      f"before {where} instead of waiting for it", q, reason)
        self.passed = k + 1

    def _stopped(self, k: int, where: str) -> RankStoppedError:
        try:
            silent = [q for q in self.others if not self.store.check([f"{k}/{q}"])]
        except RuntimeError:  # the store itself does not answer: every rank is silent
            silent = list(self.others)
        silent = silent or list(self.others)  # they checked in just after the timeout: name them all
        who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {silent}"
        return RankStoppedError(f"tensor-parallel {who} stopped answering at {where}: rank {self.rank} heard "
                                f"nothing from it for {self.silence_s:g} s", silent[0], "stopped answering")

    def fail(self, exc: BaseException) -> None:
        """Tell every other rank that this one failed with `exc` (once; nothing after a gate error)."""
        if self.store is None or self.ended:
            return
        self.ended = True
        try:
            self.store.set(f"{self.checked_in}/{self.rank}", reason_of(exc))
        except RuntimeError:  # the store is gone: the others will name this rank as silent
            return
        self.checked_in += 1

    def posted_reason(self, rank: int) -> str | None:
        """The reason `rank` posted where it fails after this rank's last check-in (the key of the first
        step this rank did not check in for), waiting at most `REASON_WAIT_S` for it; None if none."""
        if self.store is None:
            return None
        key = f"{self.checked_in}/{rank}"
        try:
            self.store.wait([key], timedelta(seconds=REASON_WAIT_S))
            return self.store.get(key).decode(errors="replace") or None
        except RuntimeError:  # it posted nothing there (it failed at a gate, or its store is gone)
            return None

    def close(self, every_rank_done: bool = False) -> None:
        """Delete this rank's keys that no rank can still read: those of every step before the last one
        this rank passed, or (`every_rank_done`: each rank has left its steps, e.g. all met in a later
        collective) all of them."""
        if self.store is None:
            return
        end = self.checked_in if every_rank_done else max(self.passed - 1, 0)
        try:
            for k in range(self.deleted, end):
                self.store.delete_key(f"{k}/{self.rank}")
                self.deleted = k + 1
        except RuntimeError:  # housekeeping only: a store that is gone keeps them
            pass
