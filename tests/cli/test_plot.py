"""streamquant/cli/plot.py and the commands that draw with it: `load --plot FILE.png` and `demo` write a PNG
that is read back (its size, and that it is not blank: curves of the run's colours are on it); without
matplotlib, `--plot` is one error line naming the extra to install, before anything loads, and `demo`
says it skipped its picture."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from matplotlib.image import imread

import streamquant.cli.demo as cli_demo
import streamquant.cli.main as cli
from streamquant.checkpoint.synthetic import TINY_SPEC
from streamquant.cli.plot import PLOT_EXTRA, PlotUnavailableError, plot_demo, plot_load, require_matplotlib

MIB = 2**20


def run(peak_mib: int, seconds: float = 1.0) -> dict:
    """A load result as cli/load.py writes it: a rise to the peak and a fall to the model."""
    times = np.linspace(0, seconds, 50)
    anon = [int(min(t / seconds * 2, 1) * peak_mib * MIB) for t in times]
    return {"peak_memory_bytes": peak_mib * MIB, "peak_memory_method": "cpu_rss_anon_sampled_5ms",
            "model_bytes": 250 * MIB, "checkpoint_bf16_bytes": 380 * MIB, "quantization": "fp8",
            "memory_timeline": [[float(t), b] for t, b in zip(times, anon)],
            "file_backed_timeline": [[float(t), b // 2] for t, b in zip(times, anon)]}


def picture(path) -> np.ndarray:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    return image[..., :3]


def has_colour(image: np.ndarray, rgb: tuple[float, float, float]) -> bool:
    return bool((np.abs(image - np.array(rgb)).max(axis=-1) < 0.05).sum() > 200)


RED, BLUE = (0.839, 0.153, 0.157), (0.122, 0.467, 0.706)  # tab:red (naive), tab:blue (streaming / load)


def test_demo_picture_draws_both_loads(tmp_path):
    result = {**run(260), "naive": run(390)}
    image = picture(plot_demo(result, tmp_path / "demo.png"))
    assert image.std() > 0.05 and has_colour(image, RED) and has_colour(image, BLUE)


def test_load_picture_without_a_timeline_draws_the_peak(tmp_path):
    cuda = {**run(260), "memory_timeline": [], "peak_memory_method": "cuda_max_memory_allocated"}
    del cuda["file_backed_timeline"]
    image = picture(plot_load(cuda, tmp_path / "cuda.png"))
    assert has_colour(image, BLUE) and not has_colour(image, RED)


def test_load_plot_writes_the_loads_timeline(checkpoint, tmp_path, capsys):
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    assert cli.main(["load", str(checkpoint), "--quantization", "fp8", "--plot", str(png), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["file_backed_timeline"] and result["checkpoint_bf16_bytes"] > result["model_bytes"]
    image = picture(png)
    assert image.std() > 0.05 and has_colour(image, BLUE)
    assert f"memory plot       {png}" in capsys.readouterr().out


def test_demo_writes_its_picture_in_the_cache_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli_demo, "DEMO_SPEC", TINY_SPEC)  # the real demo model is ~400 MB
    assert cli.main(["demo", "--cache-dir", str(tmp_path), "--no-progress"]) == 0
    png = tmp_path / cli_demo.DEMO_PLOT
    assert f"memory plot: {png}" in capsys.readouterr().out
    image = picture(png)
    assert has_colour(image, RED) and has_colour(image, BLUE)


def test_without_matplotlib_plot_is_refused_and_demo_skips(monkeypatch, checkpoint, tmp_path, capsys):
    for name in ("matplotlib", "matplotlib.figure"):  # `import matplotlib` now fails, as when not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(PlotUnavailableError, match="streamquant\\[plot\\]"):
        require_matplotlib()
    loads = []
    monkeypatch.setattr("streamquant.cli.load.load_model", lambda *a, **k: loads.append(a))
    assert cli.main(["load", str(checkpoint), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"streamquant: error: --plot needs matplotlib, which is not installed: {PLOT_EXTRA}"]
    assert not loads and not (tmp_path / "x.png").exists()  # refused before the load
    assert cli_demo.write_demo_plot(run(1), tmp_path / "demo.png") == (
        f"memory plot skipped: matplotlib is not installed ({PLOT_EXTRA})")
    with pytest.raises(PlotUnavailableError, match="streamquant\\[plot\\]"):
        plot_load(run(1), tmp_path / "y.png")
