"""examples/rl_loop.py runs refit-rollout steps on a tiny model (full bf16 sends, or fp8 deltas): trainer + 2 fp8
TP ranks, each refit bitwise equal to a cold load of the weights sent, rollouts with logprobs back to the trainer."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib.image

from hf_cases import CASES, make_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import rl_loop  # noqa: E402


def test_two_steps_of_the_loop(tmp_path):
    checkpoint = make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path)
    rows = rl_loop.main(["--checkpoint", str(checkpoint), "--steps", "2", "--prompts", "3", "--new-tokens", "4",
                         "--lr", "1e-2", "--json", str(tmp_path / "loop.json"), "--plot", str(tmp_path / "loop.png")])
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["equals_cold_load"] for r in rows)
    assert all(math.isfinite(r["mismatch"]) and 0 <= r["reward"] <= 1 for r in rows)
    assert all(r["sent_mib"] > 0 for r in rows)  # the refit moved the weights
    assert (tmp_path / "loop.json").exists()
    image = matplotlib.image.imread(tmp_path / "loop.png")  # a PNG matplotlib reads back: 3 panels, 1200 x 300
    assert image.shape[:2] == (300, 1200)


def test_the_loop_with_delta_sync(tmp_path):
    """--delta: a full fp8 send, then only changes (smaller), every refit bitwise a cold load."""
    checkpoint = make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path)
    rows = rl_loop.main(["--checkpoint", str(checkpoint), "--steps", "3", "--prompts", "2", "--new-tokens", "3",
                         "--lr", "1e-4", "--delta", "--json", str(tmp_path / "loop.json"),
                         "--plot", str(tmp_path / "loop.png")])
    assert [r["delta"] for r in rows] == [False, True, True]
    assert all(r["equals_cold_load"] for r in rows)
    assert all(0 < r["sent_mib"] < rows[0]["sent_mib"] / 2 for r in rows[1:])
    assert json.loads((tmp_path / "loop.json").read_text()) == rows
