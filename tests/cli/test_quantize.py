"""`streamquant quantize` (`cli/quantize.py`): the --json report of the run (tensors, format, shards, bytes,
quantization error), and bad input (a destination that is not empty) is one `streamquant: error:` line
with exit status 2."""

from __future__ import annotations

import json

from streamquant.cli.main import main


def test_cli_writes_the_report_and_names_bad_input(checkpoint, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["quantize", str(checkpoint), str(tmp_path / "q"), "--quantization", "fp8-block", "--format", "hf-fp8",
                 "--max-shard-size", "200KB", "--measure-error", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["quantized_tensors"] == 14 and result["format"] == "hf-fp8" and result["shards"] >= 2
    assert result["quantization_error"]["weights"] == 14 and result["quantization_error"]["sqnr_db_min"] > 25
    assert result["bytes_out"] < result["bytes_in"]
    capsys.readouterr()
    assert main(["quantize", str(checkpoint), str(tmp_path / "q"), "--quantization", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamquant: error: ") and "not empty" in err and len(err.splitlines()) == 1
