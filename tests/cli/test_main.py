"""The `streamquant` command line (`cli/main.py`): the parser lists the commands and their flags, and bad
input, found before or during the load, is one `streamquant: error:` line with exit status 2. Each
command against what it runs: test_load.py, test_generate.py, test_demo.py, test_quantize.py,
test_mismatch.py, test_rollout.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch

import streamquant.cli.main as cli


def test_help_lists_commands_and_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("load", "generate", "demo"))
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    flags = ("--prompt-ids", "--max-new-tokens", "--tp", "--dtype", "--quantization", "--json")
    assert all(flag in text for flag in flags)


def broken_checkpoint(kind: str, checkpoint: Path, reference: dict, directory: Path) -> Path:
    if kind == "missing":
        return directory / "does-not-exist"
    if kind == "fine":
        return checkpoint
    reference["model"].save_pretrained(directory)
    if kind == "architecture":
        config = json.loads((directory / "config.json").read_text())
        config["architectures"] = ["NoSuchModelForCausalLM"]
        (directory / "config.json").write_text(json.dumps(config))
    elif kind == "incomplete":
        tensors = safetensors.torch.load_file(directory / "model.safetensors")
        del tensors["model.norm.weight"]
        safetensors.torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize(
    ("kind", "extra", "message"),
    [
        ("missing", [], "does-not-exist"),
        ("architecture", [], "NoSuchModelForCausalLM"),
        ("incomplete", [], "model.norm.weight"),
        ("fine", ["--quantization", "fp8", "--ignore", "nosuchlayer"], "matches no linear or MoE layer"),
        ("fine", ["--tp", "0"], "--tp must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(kind, extra, message, checkpoint, reference, tmp_path, capsys):
    path = broken_checkpoint(kind, checkpoint, reference, tmp_path / "ckpt")
    capsys.readouterr()  # drop save_pretrained's progress bars
    assert cli.main(["load", str(path), *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamquant: error:") and message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
