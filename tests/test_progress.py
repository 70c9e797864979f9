"""streamquant/progress.py: a bar is drawn only on rank 0 and only where the stream is a terminal (unless
forced or refused), it counts every tensor's bytes once the consumer is done with it, against totals read
only when a bar is drawn; switched off, the iterable passes unchanged. `load_model(progress=)` and
`reload_weights(progress=)` draw it on stderr (the command line under a real pseudo-terminal:
tests/cli/test_load_progress.py)."""

from __future__ import annotations

import io

import pytest
import torch

from streamquant.api import load_model
from streamquant.checkpoint.reader import checkpoint_totals, iterate_weights
from streamquant.checkpoint.synthetic import TINY_SPEC, ensure_synthetic_checkpoint
from streamquant.progress import WeightBar, counted, progress_over, wants_progress
from streamquant.reload import reload_weights


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal (and has no file descriptor, so no size)."""

    def isatty(self) -> bool:
        return True


class ClosedTerminal(FakeTerminal):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ensure_synthetic_checkpoint(tmp_path_factory.mktemp("progress"), TINY_SPEC)


def pairs(n: int = 3) -> list[tuple[str, torch.Tensor]]:
    return [(f"w{i}", torch.zeros(10 * (i + 1), dtype=torch.bfloat16)) for i in range(n)]


def test_who_draws():
    assert wants_progress(None, stream=FakeTerminal())
    assert not wants_progress(None, stream=io.StringIO())  # a pipe, a file, a captured stream
    assert not wants_progress(None, stream=ClosedTerminal())
    assert wants_progress(True, stream=io.StringIO())  # forced
    assert not wants_progress(False, stream=FakeTerminal())
    assert not wants_progress(True, rank=1) and not wants_progress(None, rank=1, stream=FakeTerminal())


def test_switched_off_the_iterable_passes_unchanged_and_no_totals_are_read():
    weights = iter(pairs())

    def totals():
        raise AssertionError("totals read for a bar that is not drawn")

    with progress_over(weights, "load", enabled=False, totals=totals) as out:
        assert out is weights


def test_bar_counts_bytes_and_tensors_once_the_consumer_is_done():
    stream = FakeTerminal()
    items = pairs()
    sizes = [t.numel() * t.element_size() for _, t in items]
    seen = []
    with WeightBar("load", total_bytes=sum(sizes), total_tensors=3, stream=stream) as bar:
        for _ in counted(items, bar):
            seen.append((bar.bar.n, bar.tensors))  # the tensor in hand is not counted yet
    assert seen == [(0, 0), (sizes[0], 1), (sizes[0] + sizes[1], 2)]
    assert bar.bar.n == sum(sizes) and bar.tensors == 3
    text = stream.getvalue()
    assert "load: 100%" in text and "3/3 tensors" in text and "120/120" in text  # 20 + 40 + 60 bytes


def test_progress_over_draws_with_totals_and_without():
    stream = FakeTerminal()
    with progress_over(iter(pairs()), "quantize", enabled=True, totals=lambda: (3, 120), stream=stream) as out:
        assert [name for name, _ in out] == ["w0", "w1", "w2"]
    assert "quantize: 100%" in stream.getvalue() and "3/3 tensors" in stream.getvalue()
    open_stream = FakeTerminal()
    with progress_over(iter(pairs()), "reload", enabled=True, stream=open_stream) as out:
        list(out)
    assert "reload: 120" in open_stream.getvalue() and "3 tensors" in open_stream.getvalue()
    assert "%" not in open_stream.getvalue()  # no total: no percentage, no ETA


def test_update_to_follows_absolute_counts():
    stream = FakeTerminal()
    with WeightBar("quantize", total_bytes=100, total_tensors=4, stream=stream) as bar:
        bar.update_to(60, 3)
        bar.update_to(60, 3)  # nothing new
        bar.update_to(100, 4)
    assert (bar.bar.n, bar.tensors) == (100, 4) and "4/4 tensors" in stream.getvalue()


def test_checkpoint_totals_are_what_iterating_yields(checkpoint):
    tensors = list(iterate_weights(checkpoint))
    assert checkpoint_totals(checkpoint) == (len(tensors), sum(t.numel() * t.element_size() for _, t in tensors))


def test_load_and_reload_draw_on_stderr_only_when_asked_or_on_a_terminal(checkpoint, capsys):
    tensors, nbytes = checkpoint_totals(checkpoint)
    model = load_model(checkpoint, dtype="float32", progress=True)
    err = capsys.readouterr().err
    assert "load: 100%" in err and f"{tensors}/{tensors} tensors" in err
    load_model(checkpoint, dtype="float32")  # default: pytest's captured stderr is no terminal
    load_model(checkpoint, dtype="float32", progress=False)
    assert capsys.readouterr().err == ""
    reload_weights(model, checkpoint, progress=True)
    err = capsys.readouterr().err
    assert "reload: 100%" in err and f"{tensors}/{tensors} tensors" in err
    reload_weights(model, iterate_weights(checkpoint))  # an iterable: no bar by default (a refit loop)
    reload_weights(model, checkpoint)
    assert capsys.readouterr().err == ""
    reload_weights(model, iterate_weights(checkpoint), progress=True)  # forced: counts, no total
    assert f"{tensors} tensors" in capsys.readouterr().err


def test_a_bar_changes_no_loaded_bit(checkpoint, capsys):
    quiet = load_model(checkpoint, quantization="fp8", progress=False).state_dict()
    drawn = load_model(checkpoint, quantization="fp8", progress=True).state_dict()
    assert quiet.keys() == drawn.keys()
    assert all(torch.equal(quiet[k].view(torch.uint8), drawn[k].view(torch.uint8)) for k in quiet)
