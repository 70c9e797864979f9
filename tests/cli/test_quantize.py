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


def test_cli_writes_int4_with_zero_points_and_int8_weight_only(checkpoint, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["quantize", str(checkpoint), str(tmp_path / "q4"), "--quantization", "int4", "--group-size", "64",
                 "--zero-points", "--formula", "compressed-tensors", "--measure-error", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["quantization"] == "int4" and result["formula"] == "compressed-tensors"
    assert result["quantization_error"]["weights"] == 14 and result["quantization_error"]["sqnr_db_min"] > 10
    weights = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 64, False)
    assert main(["quantize", str(checkpoint), str(tmp_path / "q8"), "--quantization", "int8",
                 "--activation-scheme", "none"]) == 0
    config = json.loads((tmp_path / "q8" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["input_activations"] is None
    capsys.readouterr()
    assert main(["quantize", str(checkpoint), str(tmp_path / "bad"), "--quantization", "int8", "--zero-points"]) == 2
    err = capsys.readouterr().err
    assert "symmetric=False (zero points) applies to quantization='int4' only" in err and len(err.splitlines()) == 1
    assert main(["quantize", str(checkpoint), str(tmp_path / "bad"), "--quantization", "int4", "--group-size", "96"]) == 2
    err = capsys.readouterr().err
    assert "input size 128 is not a multiple of group_size 96" in err and not (tmp_path / "bad").exists()
