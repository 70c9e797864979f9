"""`streamquant load` (`cli/load.py`) against the load it runs: the --json result and the summary report
the sizes, seconds and peak memory the load measured, the quantization and its error (only when asked);
the loading flags reach the load (int4 options, --fp32-all-reduce); a pre-quantized checkpoint loads
without flags, and flags that disagree with it are refused."""

from __future__ import annotations

import json

import pytest
import torch

import streamquant.cli.load as cli_load
import streamquant.cli.main as cli
from streamquant.api import load_model
from streamquant.fingerprint import weights_fingerprint
from streamquant.memory import PeakMemorySampler
from streamquant.offline import quantize_checkpoint


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
    assert result["weights_fingerprint"] == weights_fingerprint(load_model(checkpoint, quantization=scheme))
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


def test_cli_loads_a_pre_quantized_checkpoint_without_flags(checkpoint, tmp_path, capsys):
    quantize_checkpoint(checkpoint, tmp_path / "q", "fp8-block", format="hf-fp8", formula="transformers")
    out = tmp_path / "load.json"
    assert cli.main(["load", str(tmp_path / "q"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["quantization"] == "fp8-block"
    assert cli.main(["load", str(tmp_path / "q"), "--quantization", "fp8"]) == 2
    assert "disagrees with the checkpoint" in capsys.readouterr().err
    assert cli.main(["load", str(checkpoint), "--formula", "transformers"]) == 2  # an fp8 option, nothing to quantize
    assert "need a quantization scheme" in capsys.readouterr().err
