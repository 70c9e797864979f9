"""What the commands put out (`cli/output.py`): the --json file, byte sizes, the summary lines and the
naive-vs-streaming table, and a memory timeline thinned to about N samples that keeps its peak."""

from __future__ import annotations

import json

from streamquant.cli.output import format_bytes, print_summary, thin_timeline, write_json

RESULT = {"checkpoint": "/ckpt", "checkpoint_bytes": 3 * 2**20, "model_bytes": 2**20, "load_seconds": 1.23456,
          "peak_memory_bytes": 5 * 2**19, "peak_memory_method": "cpu_rss_anon_sampled_5ms"}


def test_json_file_and_byte_sizes(tmp_path):
    write_json(None, {"a": 1})  # no --json: nothing written, no error
    out = tmp_path / "r.json"
    write_json(out, {"a": [1, 2], "b": None})
    assert out.read_text().endswith("\n") and json.loads(out.read_text()) == {"a": [1, 2], "b": None}
    assert format_bytes(3 * 2**20 + 2**19) == "3.5 MiB (3,670,016 bytes)"
    assert format_bytes(0) == "0.0 MiB (0 bytes)"


def test_summary_names_each_measurement_once(capsys):
    print_summary(RESULT)
    lines = capsys.readouterr().out.splitlines()
    assert [line[:18].rstrip() for line in lines] == ["checkpoint", "checkpoint bytes", "model bytes", "load seconds",
                                                      "peak memory"]
    assert lines[3].endswith("1.235") and lines[4].endswith("2.5 MiB (2,621,440 bytes) [cpu_rss_anon_sampled_5ms]")
    result = {**RESULT, "file_backed_peak_bytes": 2**20, "quantization": "fp8", "quantized_weight_bytes": 2**19,
              "quantization_error": {"weights": 14, "sqnr_db_min": 30.04, "sqnr_db_median": 31.06, "measure_seconds": 0.5},
              "sequences": [{"finish_reason": "stop"}, {"finish_reason": "length"}, {"finish_reason": "length"}],
              "prompt_ids": [1, 2], "tokens": [3, 4]}
    print_summary(result)
    lines = capsys.readouterr().out.splitlines()
    width = len("quantized weight bytes") + 2  # one column of labels, two spaces past the longest
    rows = {line[:width].rstrip(): line[width:] for line in lines}
    assert all(line[width - 2:width] == "  " and line[width] != " " for line in lines)
    assert rows["file-backed peak"] == "1.0 MiB (1,048,576 bytes)" and rows["quantization"] == "fp8"
    assert rows["quantized weight bytes"] == "0.5 MiB (524,288 bytes)"
    assert rows["weight SQNR dB"] == "min 30.0, median 31.1 over 14 weights (0.500 s, not in load seconds)"
    assert rows["sequences"].startswith("3 (1 stopped, 2 at max-new-tokens)")
    assert rows["generated ids"] == "[3, 4]"


def test_demo_table_compares_naive_and_streaming(capsys):
    result = {**RESULT, "naive": {"peak_memory_bytes": 3 * 2**20, "load_seconds": 2.0}, "naive_equals_streaming": True}
    print_summary(result)
    text = capsys.readouterr().out
    naive = next(line for line in text.splitlines() if line.startswith("naive:"))
    streaming = next(line for line in text.splitlines() if line.startswith("streaming:"))
    assert naive.split()[-3:] == ["3.0", "3.00x", "2.00"]  # peak MiB, peak / final model, seconds
    assert streaming.split()[-3:] == ["2.5", "2.50x", "1.23"]
    assert "naive and streaming models bitwise equal: True" in text


def test_timeline_is_thinned_evenly_and_keeps_its_peak():
    timeline = [(i * 0.001, 100 + i) for i in range(1000)]
    timeline[333] = (0.333, 10**6)  # the peak, off the even grid
    thin = thin_timeline(timeline, 100)
    assert len(thin) == 101 and [0.333, 10**6] in thin
    assert thin == sorted(thin) and thin[0] == [0.0, 100]
    assert all(isinstance(t, float) and t == round(t, 4) for t, _ in thin)
    assert thin_timeline([], 10) == []
    assert thin_timeline([(0.00001, 5)], 10) == [[0.0, 5]]
