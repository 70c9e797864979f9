"""The command line against transformers on a tiny synthetic checkpoint (TINY_SPEC, four shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

import streamquant.cli.demo as cli_demo
import streamquant.cli.load as cli_load
import streamquant.cli.main as cli
from streamquant.checkpoint.synthetic import TINY_SPEC, ensure_synthetic_checkpoint
from streamquant.memory import PeakMemorySampler

REPO = Path(__file__).resolve().parents[2]  # the repository root, for the subprocess's PYTHONPATH
PROMPT = [3, 17, 42, 9, 100]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return ensure_synthetic_checkpoint(tmp_path_factory.mktemp("cache"), TINY_SPEC)


@pytest.fixture(scope="module")
def reference(checkpoint) -> dict:
    """transformers' greedy tokens and last-prompt-position logits, in float32."""
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = hf(prompt).logits[0, -1]
        out = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return {"model": hf, "tokens": out[0, len(PROMPT) :].tolist(), "last_logits": logits}


def generate_args(checkpoint, json_file, *extra) -> list[str]:
    prompt = ",".join(map(str, PROMPT))
    return ["generate", str(checkpoint), "--prompt-ids", prompt, "--max-new-tokens", str(NEW_TOKENS),
            "--dtype", "fp32", "--json", str(json_file), *extra]


def check_generation(result: dict, reference: dict) -> None:
    assert result["tokens"] == reference["tokens"]
    torch.testing.assert_close(torch.tensor(result["last_logits"]), reference["last_logits"], atol=1e-4, rtol=1e-4)


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


def test_load_writes_json(checkpoint, tmp_path, capsys, monkeypatch):
    peaks = []  # what the load's sampler measured (its own accuracy: tests/test_memory.py)

    class Recording(PeakMemorySampler):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            peaks.append(self.result)

    monkeypatch.setattr(cli_load, "PeakMemorySampler", Recording)
    out = tmp_path / "load.json"
    assert cli.main(["load", str(checkpoint), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["checkpoint_bytes"] == sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    assert result["model_bytes"] > 0 and result["load_seconds"] > 0
    (peak,) = peaks
    # the loaded model is still resident at the sampler's last sample, so anonymous memory grew
    assert result["peak_memory_bytes"] == peak.peak_bytes and peak.peak_bytes > 0
    assert result["peak_memory_method"] == "cpu_rss_anon_sampled_5ms"
    assert peak.file_backed_peak_bytes is not None and result["file_backed_peak_bytes"] == peak.file_backed_peak_bytes
    text = capsys.readouterr().out
    assert "peak memory" in text
    assert f"({result['file_backed_peak_bytes']:,} bytes)" in next(
        line for line in text.splitlines() if line.startswith("file-backed peak"))


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel", "fp8-block", "int8", "mxfp8", "torchao:int8-weight-only"])
def test_load_fp8_reports_quantization(checkpoint, tmp_path, capsys, scheme):
    out = tmp_path / "load.json"
    assert cli.main(["load", str(checkpoint), "--quantization", scheme, "--measure-error", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["quantization"] == scheme
    assert 0 < result["quantized_weight_bytes"] < result["model_bytes"]
    assert result["fp8_weight_bytes"] == result["quantized_weight_bytes"]  # the deprecated key, one more release
    error = result["quantization_error"]
    assert error["weights"] > 0 and 15 < error["sqnr_db_min"] <= error["sqnr_db_median"]
    timeline = result["memory_timeline"]
    assert timeline and all(len(sample) == 2 for sample in timeline)
    assert max(b for _, b in timeline) <= result["peak_memory_bytes"]
    text = capsys.readouterr().out
    assert "weight SQNR dB" in text and "quantized weight bytes" in text


def test_load_int4_options_reach_the_config(checkpoint, tmp_path):
    out = tmp_path / "load.json"
    argv = ["load", str(checkpoint), "--quantization", "int4", "--group-size", "32", "--measure-error", "--json", str(out)]
    assert cli.main(argv) == 0
    symmetric = json.loads(out.read_text())["quantization_error"]["sqnr_db_median"]
    assert cli.main(argv + ["--zero-points"]) == 0
    asymmetric = json.loads(out.read_text())["quantization_error"]["sqnr_db_median"]
    assert 15 < symmetric < asymmetric  # the zero points add a 16th level per group


def test_load_measures_error_only_when_asked(checkpoint, tmp_path, capsys):
    out = tmp_path / "load.json"
    assert cli.main(["load", str(checkpoint), "--quantization", "fp8", "--measure-error", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["quantization_error"]["measure_seconds"] > 0
    assert cli.main(["load", str(checkpoint), "--quantization", "fp8", "--json", str(out)]) == 0
    assert "quantization_error" not in json.loads(out.read_text())
    assert cli.main(["load", str(checkpoint), "--measure-error"]) == 2
    assert "measure_error need a quantization scheme" in capsys.readouterr().err


def test_unquantized_load_reports_no_quantization(checkpoint, tmp_path):
    out = tmp_path / "load.json"
    assert cli.main(["load", str(checkpoint), "--quantization", "none", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["quantization"] is None and result["quantized_weight_bytes"] == 0
    assert "quantization_error" not in result


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


@pytest.mark.parametrize("flag,expected", [((), None), (("--fp32-all-reduce",), torch.float32)])
def test_fp32_all_reduce_flag_reaches_the_tp_context(checkpoint, monkeypatch, flag, expected):
    """The flag becomes `TPContext.reduce_dtype` of the load (what it does: tests/models/test_tp_reduce_dtype.py)."""
    seen = []
    real = cli_load.load_model

    def recording(*args, tp=None, **kwargs):
        seen.append(tp)
        return real(*args, tp=tp, **kwargs)

    monkeypatch.setattr(cli_load, "load_model", recording)
    assert cli.main(["load", str(checkpoint), *flag]) == 0
    assert [tp.reduce_dtype for tp in seen] == [expected]
