"""`streamquant demo` (`cli/demo.py`): given only a cache directory, it writes its checkpoint, loads it (fp8
by default) the naive and the streaming way, generates, and says the two loads are bitwise equal."""

from __future__ import annotations

import json
from pathlib import Path

import streamquant.cli.demo as cli_demo
import streamquant.cli.main as cli
from streamquant.checkpoint.synthetic import TINY_SPEC


def test_demo_runs_without_arguments_beyond_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli_demo, "DEMO_SPEC", TINY_SPEC)  # the real demo model is ~400 MB
    out = tmp_path / "demo.json"
    assert cli.main(["demo", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert Path(result["checkpoint"]).parent == tmp_path / "cache"
    assert len(result["tokens"]) == cli_demo.DEMO_NEW_TOKENS and result["prompt_ids"] == list(cli_demo.DEMO_PROMPT)
    assert result["quantization"] == "fp8"  # the demo's default
    assert result["naive_equals_streaming"] is True
    assert result["naive"]["model_bytes"] == result["model_bytes"]
    text = capsys.readouterr().out
    assert "generated ids" in text and "naive" in text and "streaming" in text
