import sys
from pathlib import Path

# tests import small shared helpers (e.g. tests/models/hf_cases.py) by module name
for sub in ("models",):
    sys.path.insert(0, str(Path(__file__).parent / sub))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skip them on machines without it (CI never has one)."""
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture
def last_session(monkeypatch):
    """A dict whose "session" entry is the most recent StreamingLoadSession (to read its staging counters)."""
    from streamquant.loading.streaming import StreamingLoadSession

    seen = {}
    original_init = StreamingLoadSession.__init__

    def spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        seen["session"] = self

    monkeypatch.setattr(StreamingLoadSession, "__init__", spy)
    return seen


class SharedRanks:
    """One `RankPool` per tensor-parallel size for the whole test session, made on first use and
    made again after a job failed (which closes a pool): a TP test pays for a job, not for starting
    processes, importing torch and forming a group (~5-7 s per launch on a 2-core CI machine)."""

    def __init__(self):
        self.pools = {}

    def run(self, fn, tp_size: int, *args):
        from streamquant.parallel.launch import RankPool

        pool = self.pools.get(tp_size)
        if pool is None or pool.closed:
            pool = self.pools[tp_size] = RankPool(tp_size)
        return pool.run(fn, *args)

    def close(self):
        for pool in self.pools.values():
            pool.close()


@pytest.fixture(scope="session")
def ranks():
    """`ranks.run(fn, tp_size, *args)`: `launch(fn, tp_size, *args)` on ranks shared by the session's tests."""
    shared = SharedRanks()
    yield shared
    shared.close()
