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
