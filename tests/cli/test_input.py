"""Every user error on the command line is one `streamquant: error:` line and exit 2, found before
any checkpoint is loaded (a spy on load_model proves nothing was loaded)."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch

import streamquant.cli.load as cli_load
import streamquant.cli.main as cli
from streamquant.api import load_model
from streamquant.checkpoint.reader import CheckpointError, resolve_checkpoint
from streamquant.checkpoint.synthetic import TINY_SPEC, ensure_synthetic_checkpoint
from streamquant.inference.generation import generate
from streamquant.parallel.gate import RankStoppedError
from streamquant.parallel.launch import LaunchError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return ensure_synthetic_checkpoint(tmp_path_factory.mktemp("cache"), TINY_SPEC)


@pytest.fixture
def loads(monkeypatch):
    """The load_model calls the CLI made (none, for errors caught up front)."""
    calls = []
    monkeypatch.setattr(cli_load, "load_model", lambda *a, **k: calls.append(a) or pytest.fail("loaded"))
    return calls


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamquant: error:"), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_json_path_that_is_a_directory_or_has_no_folder(checkpoint, tmp_path, capsys, loads):
    assert cli.main(["load", str(checkpoint), "--json", str(tmp_path)]) == 2
    assert "is a directory" in one_error_line(capsys)
    assert cli.main(["load", str(checkpoint), "--json", str(tmp_path / "no" / "such" / "out.json")]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert loads == []


@pytest.mark.parametrize("device, message", [("nosuchdevice", "not a device torch knows"),
                                             ("cuda", "has no cuda device"), ("cuda:7", "cuda")])
def test_unknown_or_absent_device(checkpoint, capsys, loads, device, message):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert cli.main(["load", str(checkpoint), "--device", device]) == 2
    assert message in one_error_line(capsys)
    assert loads == []


def test_generation_beyond_the_position_limit_or_vocabulary(checkpoint, capsys, loads):
    limit, vocab = TINY_SPEC.max_position_embeddings, TINY_SPEC.vocab_size
    assert cli.main(["generate", str(checkpoint), "--prompt-ids", "1,2", "--max-new-tokens", str(limit)]) == 2
    assert f"max_position_embeddings = {limit}" in one_error_line(capsys)
    assert cli.main(["generate", str(checkpoint), "--prompt-ids", "1,2", "--max-new-tokens", str(10**12)]) == 2
    assert "exceeds the model's position limit" in one_error_line(capsys)
    assert cli.main(["generate", str(checkpoint), "--prompt-ids", f"1,{vocab}", "--max-new-tokens", "2"]) == 2
    assert f"token id {vocab} (prompt 0, position 1) is outside the vocabulary [0, {vocab})" in one_error_line(capsys)
    assert loads == []


def test_negative_new_tokens_is_an_argument_error(checkpoint, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", str(checkpoint), "--prompt-ids", "1", "--max-new-tokens", "-1"])
    assert info.value.code == 2 and "expected a number >= 0" in capsys.readouterr().err


def test_api_generate_names_the_bad_token_id(checkpoint):
    model = load_model(checkpoint)
    with pytest.raises(ValueError, match=r"token id -3 \(prompt 1, position 0\)"):
        generate(model, torch.tensor([[1, 2], [-3, 4]]), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=TINY_SPEC.max_position_embeddings)


def test_unreadable_config_says_permission_denied(checkpoint, monkeypatch, capsys):
    """As root, file modes do not stop reads: the refusal is simulated where the reader opens the file."""
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file).endswith("config.json"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(CheckpointError, match="permission denied"):
        resolve_checkpoint(checkpoint)
    assert cli.main(["load", str(checkpoint)]) == 2
    assert "permission denied" in one_error_line(capsys)


STOPPED = RankStoppedError("tensor-parallel rank 1 stopped answering at layer 'model.layers.0.mlp.down_proj': "
                           "rank 0 heard nothing from it for 7.5 s", 1, "stopped answering")


@pytest.mark.parametrize("failure, said", [
    (LaunchError(1, "process exited with code -9 without reporting"),
     "rank 1: process exited with code -9 without reporting"),
    (LaunchError(0, "failed", "traceback text", RuntimeError("[gloo] Timed out waiting 7500ms for recv"),
                 unreported=(1,)),
     "tensor-parallel rank 1 stopped answering: rank 0 waited 7.5 s for it in a collective"),
    (LaunchError(0, "failed", "traceback text", RuntimeError("[gloo] Connection closed by peer"), unreported=(1,)),
     "rank 0: [gloo] Connection closed by peer; ranks that had not answered: [1]"),
    (LaunchError(0, "failed", "traceback text", STOPPED, unreported=(1,)), str(STOPPED)),
])
def test_a_dead_or_silent_rank_is_one_line_naming_it(checkpoint, monkeypatch, capsys, failure, said):
    def fail(*args, **kwargs):
        assert kwargs["timeout_s"] == 7.5  # --timeout reaches the process group
        raise failure

    monkeypatch.setattr(cli, "launch", fail)
    assert cli.main(["load", str(checkpoint), "--tp", "2", "--timeout", "7.5"]) == 2
    line = one_error_line(capsys)
    assert line == f"streamquant: error: {said} (the other ranks were ended)"
