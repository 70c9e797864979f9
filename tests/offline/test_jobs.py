"""streamquant/offline/jobs.py: units split into consecutive runs of about equal bytes, and the progress of
the jobs, counted in this process (workers=1) or from the shared counters forked workers write, ends at
every source tensor and byte, the same files either way (bitwise equality across worker counts:
test_quantize.py)."""

from __future__ import annotations

import io

import pytest
import torch

from streamquant.checkpoint.synthetic import TINY_SPEC, write_synthetic_checkpoint
from streamquant.checkpoint.writer import TensorSpec
from streamquant.offline import quantize_checkpoint
from streamquant.offline.jobs import SharedCount, Unit, split_units
from streamquant.progress import WeightBar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def unit(name: str, nbytes: int) -> Unit:
    return Unit("f", name, None, (TensorSpec(name, torch.uint8, (nbytes,)),))


def test_split_keeps_order_and_balances_bytes():
    units = [unit(f"t{i}", n) for i, n in enumerate([10, 10, 10, 10, 10, 10, 20, 20])]
    parts = split_units(units, 2)
    assert [u for part in parts for u in part] == units  # consecutive runs, in order
    assert [sum(u.outputs[0].nbytes for u in part) for part in parts] == [50, 50]
    # a unit goes where its first byte falls: the 40-byte unit starting at byte 40 of 100 stays in part 0
    uneven = split_units([unit(f"u{i}", n) for i, n in enumerate([10, 10, 10, 10, 40, 10, 10])], 2)
    assert [len(part) for part in uneven] == [5, 2]
    assert split_units(units[:1], 3) == [units[:1]]  # no empty parts


def test_shared_count_adds_into_its_row():
    counts = torch.zeros(2, 2, dtype=torch.int64)
    advance = SharedCount(counts[1])
    advance(100)
    advance(20, 2)
    assert counts.tolist() == [[0, 0], [120, 3]]


@pytest.mark.parametrize("workers", [1, 2])
def test_quantize_progress_reaches_every_tensor(tmp_path, monkeypatch, workers):
    src = tmp_path / "src"
    write_synthetic_checkpoint(src, TINY_SPEC)
    bars = []

    class Recorded(WeightBar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, stream=FakeTerminal(), **kwargs)
            bars.append(self)

    monkeypatch.setattr("streamquant.offline.quantize.WeightBar", Recorded)
    report = quantize_checkpoint(src, tmp_path / "q", "fp8-block", max_shard_size=100_000, workers=workers,
                                 progress=True)
    (bar,) = bars
    assert (bar.bar.n, bar.tensors) == (report.bytes_in, report.tensors_in)
    assert bar.bar.total == report.bytes_in and bar.total_tensors == report.tensors_in
    assert f"{report.tensors_in}/{report.tensors_in} tensors" in bar.bar.fp.getvalue()
    quantize_checkpoint(src, tmp_path / "quiet", "fp8-block", workers=workers, progress=False)
    assert len(bars) == 1  # progress=False draws nothing
