"""The memory picture: `streamquant load --plot FILE.png`, and the figure `streamquant demo` writes.

Drawn from a load's JSON-able result (`cli/load.py`): `memory_timeline` (anonymous memory above its
level at the load's start: RssAnon on CPU) as a solid line, `file_backed_timeline` (RssFile: pages of
the mmapped checkpoint, which the OS may drop and read again; never added to the first) dashed, and
two levels: the final model (`model_bytes`) and the checkpoint's size in bf16 (`checkpoint_bf16_bytes`,
what the naive "load bf16, then quantize" path holds at once). `demo` draws its naive and its
streaming load on the same axes: the project's claim at a glance.

matplotlib is optional (the `plot` extra, `PLOT_EXTRA`): it is imported when a picture is drawn, not
with the command line, so every other command starts without it (the one function-local import
here, of a third-party package). Only its object API is used (`Figure`, no pyplot): no global figure
state, no display needed. `require_matplotlib` lets `--plot` fail before a load; `demo` skips its
picture instead.

Limitation: on CUDA the sampler keeps no timeline (only `max_memory_allocated`): the peak is drawn as
a level of its own.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

PLOT_EXTRA = "pip install 'streamquant[plot]'"
COLORS = {"naive": "tab:red", "streaming": "tab:blue", "load": "tab:blue"}


class PlotUnavailableError(ValueError):
    """A picture was asked for, and matplotlib is not installed."""


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib(flag: str = "--plot") -> None:
    if not matplotlib_available():
        raise PlotUnavailableError(f"{flag} needs matplotlib, which is not installed: {PLOT_EXTRA}")


def plot_load(result: dict[str, Any], path: Path) -> Path:
    """One load's memory over time (the `load --plot` picture)."""
    what = result.get("quantization") or "unquantized"
    title = f"streamquant load ({what}): peak {_ratio(result)} the final model"
    return _draw(path, [("load", result)], result, title)


def plot_demo(result: dict[str, Any], path: Path) -> Path:
    """The naive and the streaming load of `demo` on the same axes."""
    title = (f"fp8 load of the demo checkpoint: naive peak {_ratio(result['naive'], result['model_bytes'])}, "
             f"streaming {_ratio(result)} the final model")
    return _draw(path, [("naive", result["naive"]), ("streaming", result)], result, title)


def _ratio(run: dict[str, Any], model_bytes: int | None = None) -> str:
    return f"{run['peak_memory_bytes'] / (model_bytes or run['model_bytes']):.2f}x"


def _draw(path: Path, runs: list[tuple[str, dict[str, Any]]], final: dict[str, Any], title: str) -> Path:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailableError(f"drawing {path} needs matplotlib, which is not installed: {PLOT_EXTRA}") from None
    scale, unit = _unit(max(final["checkpoint_bf16_bytes"], *(run["peak_memory_bytes"] for _, run in runs)))
    figure = Figure(figsize=(8, 5), dpi=100)
    axes = figure.add_subplot()
    for label, run in runs:
        _draw_run(axes, label, run, scale, unit)
    for key, style, name in (("model_bytes", ":", "final model"), ("checkpoint_bf16_bytes", "-.", "checkpoint in bf16")):
        level = final[key] / scale
        axes.axhline(level, color="black", linestyle=style, linewidth=1, label=f"{name}: {level:,.0f} {unit}")
    axes.set_xlabel("seconds since the load started")
    axes.set_ylabel(f"{unit} above the level at the start")
    axes.set_title(title, fontsize=10)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)  # below: no curve hidden
    figure.savefig(path, bbox_inches="tight")
    return path


def _draw_run(axes, label: str, run: dict[str, Any], scale: float, unit: str) -> None:
    color = COLORS.get(label, "tab:green")
    peak = run["peak_memory_bytes"] / scale
    anon = run.get("memory_timeline") or []
    if anon:
        axes.plot([t for t, _ in anon], [b / scale for _, b in anon], color=color, linewidth=2,
                  label=f"{label}: anonymous memory (peak {peak:,.0f} {unit})")
    else:  # CUDA: a peak, no timeline
        axes.axhline(peak, color=color, linewidth=2, label=f"{label}: peak {peak:,.0f} {unit} "
                                                           f"({run.get('peak_memory_method', '')}, no timeline)")
    file_backed = run.get("file_backed_timeline") or []
    if file_backed:
        axes.plot([t for t, _ in file_backed], [b / scale for _, b in file_backed], color=color, linewidth=1,
                  linestyle="--", alpha=0.7, label=f"{label}: file-backed (mmapped checkpoint pages)")


def _unit(largest: int) -> tuple[float, str]:
    return (2.0**30, "GiB") if largest >= 2 * 2**30 else (2.0**20, "MiB")
