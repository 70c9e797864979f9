"""`streamquant generate` (`cli/generate.py`): the greedy tokens and the last prompt position's logits
equal transformers', in this process and at TP=2 through `python -m streamquant` (rank 0 holds a shard
and alone prints; stderr, a pipe, gets no progress bar)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import streamquant.cli.main as cli

from .helpers import check_generation, generate_args

REPO = Path(__file__).resolve().parents[2]  # the repository root, for the subprocess's PYTHONPATH


def test_generate_matches_transformers(checkpoint, reference, tmp_path):
    out = tmp_path / "gen.json"
    assert cli.main(generate_args(checkpoint, out)) == 0
    check_generation(json.loads(out.read_text()), reference)


def test_generate_tp2_in_subprocess(checkpoint, reference, tmp_path):
    out = tmp_path / "gen_tp2.json"
    assert (REPO / "streamquant" / "cli" / "main.py").is_file()  # this tree, not an installed copy
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "streamquant", *generate_args(checkpoint, out, "--tp", "2")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    check_generation(result, reference)
    full_bytes = sum(p.numel() for p in reference["model"].parameters()) * 4
    assert result["model_bytes"] < full_bytes  # rank 0 holds a shard
    assert proc.stdout.count("generated ids") == 1  # only rank 0 prints
    assert "tensors]" not in proc.stderr  # stderr is a pipe here: no progress bar (one on a terminal: test_load_progress.py)
