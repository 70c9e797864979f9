"""Running under torchrun (`parallel/torchrun.py`): the environment says so, and `init_from_env` joins the
group it describes (a one-process group in a subprocess) and `shutdown` leaves it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from streamquant.parallel.launch import free_port
from streamquant.parallel.torchrun import under_torchrun

REPO = Path(__file__).resolve().parents[2]


def test_under_torchrun_reads_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not under_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert under_torchrun()


def test_init_from_env_joins_the_described_group():
    code = (
        "from streamquant.parallel.torchrun import init_from_env, shutdown\n"
        "import torch.distributed as dist\n"
        "tp = init_from_env()\n"
        "print(tp.rank, tp.size, dist.get_backend())\n"
        "shutdown()\n"
        "print(dist.is_initialized())\n"
    )
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "gloo", "False"]
