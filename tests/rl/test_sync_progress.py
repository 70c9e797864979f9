"""The progress bars of a sync (streamquant/rl/sync.py): the sender's bar and, when asked, a receiver's count
every tensor and byte of the send against the plan's totals; `progress=False` (the sender) and the
receiver's default draw nothing. Runs on two gloo ranks: rank 0 sends, rank 1 receives."""

from __future__ import annotations

import io

import torch
import torch.distributed as dist

import streamquant.rl.protocol as protocol
from streamquant.progress import WeightBar
from streamquant.rl.sync import WeightReceiver, WeightSender


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(f"w{i}", torch.randn(64 * (i + 1), generator=g).bfloat16()) for i in range(12)]


def _count(stream) -> int:
    return sum(1 for _ in stream)


def _sync_with_bars():
    """Two sends: the first with bars on both sides, the second with none; each rank's bars, as numbers."""
    bars = []

    class Recorded(WeightBar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, stream=io.StringIO(), **kwargs)
            bars.append(self)

    original, protocol.WeightBar = protocol.WeightBar, Recorded
    try:
        if dist.get_rank() == 0:
            stats = [WeightSender(src=0, bucket_bytes=1024, progress=progress).send(_tensors()) for progress in
                     (True, False)]
        else:
            stats = [WeightReceiver(src=0, progress=True).receive(_count), WeightReceiver(src=0).receive(_count)]
    finally:
        protocol.WeightBar = original
    shown = [(b.bar.desc, b.bar.n, b.bar.total, b.tensors, b.total_tensors, b.bar.fp.getvalue()) for b in bars]
    gathered = [None, None]
    dist.all_gather_object(gathered, (stats, shown))
    return gathered


def test_sender_and_receiver_bars_count_the_whole_send(ranks):
    (sent, sender_bars), (received, receiver_bars) = ranks.run(_sync_with_bars, 2)
    nbytes, tensors = sent[0].bytes - sent[0].header_bytes, sent[0].tensors  # the bars count the buckets
    assert received == [tensors, tensors] and sent[0].buckets > 3  # many buckets, each counted as it left
    (send,), (receive,) = sender_bars, receiver_bars  # the second send drew nothing on either side
    assert send[:5] == ("send", nbytes, nbytes, tensors, tensors)
    assert receive[:5] == ("receive", nbytes, nbytes, tensors, tensors)
    assert f"0/{tensors} tensors" in send[5] and f"0/{tensors} tensors" in receive[5]
