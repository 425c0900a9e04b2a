"""The project's figures, drawn with matplotlib: one function per figure, each writing a PNG
and returning its ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never
through ``pyplot``: nothing global (backend, open-figure list) changes, so plotting is safe in
training jobs, worker processes and tests, with or without a display. matplotlib is imported
only when a figure is drawn.
"""

from __future__ import annotations

import math
import textwrap
from typing import Dict, Mapping, Sequence

import numpy as np

DPI = 150
ACCURACY_CMAP = "RdYlGn"  # red 0% through yellow to green 100%, as NIAH heatmaps are drawn
SHOW_POINTS = 50  # curves with at most this many points mark them (one logged step is a dot)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(ax, fig, title: str) -> None:
    """``title`` wrapped to the figure's width (about 9 characters per inch at 12 pt)."""
    ax.set_title(textwrap.fill(title, max(30, int(9 * fig.get_figwidth())), break_on_hyphens=False))


def _save(fig, path: str):
    fig.savefig(path, dpi=DPI)
    return fig


def tokens_label(n: int) -> str:
    """4096 -> '4K', 131072 -> '128K', 1500 -> '1500'."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _accuracy_cmap():
    from matplotlib import colormaps

    return colormaps[ACCURACY_CMAP].with_extremes(bad="lightgrey")  # grey: no data


def _accuracy_heatmap(path: str, values: np.ndarray, row_labels: Sequence[str],
                      col_labels: Sequence[str], xlabel: str, ylabel: str, title: str):
    """``values`` [rows, cols] in [0, 1] (NaN: no data) as a 0-100% heatmap with each cell's
    value written in it; row 0 at the top."""
    values = np.asarray(values, dtype=float)
    rows, cols = values.shape
    fig = _figure(max(4.8, 2.0 + 1.2 * cols), max(3.2, 1.5 + 0.5 * rows))
    ax = fig.add_subplot()
    image = ax.imshow(100 * values, cmap=_accuracy_cmap(), vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(cols), col_labels)
    ax.set_yticks(range(rows), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, fig, title)
    ax.tick_params(length=0)
    for r in range(rows):
        for c in range(cols):
            v = values[r, c]
            red, green, blue, _ = image.cmap(image.norm(100 * v))
            dark = not math.isnan(v) and 0.299 * red + 0.587 * green + 0.114 * blue < 0.45
            ax.text(c, r, "n/a" if math.isnan(v) else f"{100 * v:.0f}", ha="center", va="center",
                    fontsize=9, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="exact match (%)", ticks=range(0, 101, 20))
    return _save(fig, path)


def niah_heatmap(path: str, depths: Sequence[float], lengths: Sequence[int], values: np.ndarray,
                 title: str):
    """Exact match by needle depth (rows, top: the start of the context) and context length
    (columns, left: the shortest); ``values`` [depths, lengths] as ``runner.grid_matrix`` gives."""
    return _accuracy_heatmap(path, values, [f"{100 * d:g}%" for d in depths],
                             [tokens_label(n) for n in lengths], "context length (tokens)",
                             "needle depth (% of the context)", title)


def depth_by_model_heatmap(path: str, depth_bins: Sequence[str], models: Sequence[str],
                           values: np.ndarray, title: str):
    """Exact match by needle depth (rows, top: the start of the context) and model (columns)
    at one context length; ``values`` [depth bins, models]."""
    names = [textwrap.fill(m, 13) for m in models]
    return _accuracy_heatmap(path, values, depth_bins, names, "model",
                             "needle depth (% of the context)", title)


def perplexity_by_position(path: str, curves: Mapping[str, Mapping[str, object]], title: str):
    """One line per model: perplexity of each position bucket against the bucket's middle
    position. ``curves`` maps a label to a ``PerplexityByPosition`` as a dict (``bucket_size``,
    ``bucket_starts``, ``loss``). The y axis starts at 0 so that gaps read in proportion."""
    from matplotlib.ticker import FuncFormatter

    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    top = 0.0
    for label, ppl in curves.items():
        size = int(ppl["bucket_size"])
        x = [s + (size - 1) / 2 for s in ppl["bucket_starts"]]
        y = [math.exp(v) for v in ppl["loss"]]
        top = max([top] + [v for v in y if math.isfinite(v)])
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_ylim(0, 1.1 * top if top > 0 else 1)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tokens_label(int(v)) if v == int(v) else ""))
    ax.set_xlabel("position in the window (tokens; middle of each bucket)")
    ax.set_ylabel("perplexity (exp of mean next-token loss)")
    _title(ax, fig, title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return _save(fig, path)


def training_curves(path: str, runs: Mapping[str, Mapping[str, Dict[int, float]]],
                    title: str = "Training"):
    """Loss (training line, validation markers) over learning rate against iterations, one
    colour per run. ``runs`` maps a label to ``{"lm loss": {iteration: value}, "lr": ...,
    "lm loss validation": ...}`` (``logger.read_metrics_log``); missing series are left out."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(6.4, 5.6)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for i, (label, series) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        for ax, key, name, style in ((loss_ax, "lm loss", " train", {"linewidth": 1.2}),
                                     (loss_ax, "lm loss validation", " validation",
                                      {"marker": "o", "linestyle": "--"}),
                                     (lr_ax, "lr", "", {"linewidth": 1.2})):
            points = sorted((series.get(key) or {}).items())
            if points:
                sparse = {"marker": "."} if len(points) <= SHOW_POINTS else {}
                ax.plot(*zip(*points), color=colour, label=label + name, **{**sparse, **style})
    loss_ax.set_ylabel("LM loss (nats per token)")
    _title(loss_ax, fig, title)
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="upper right", fontsize=8)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("iteration")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_ax.set_ylim(bottom=0)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_ax.grid(alpha=0.3)
    return _save(fig, path)

