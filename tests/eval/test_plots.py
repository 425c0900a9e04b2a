"""The figures (eval/plots.py), the quickstart's heatmap and tools/plot.py: each file opens as a
PNG of the expected size, and the axes carry the labels, ticks, values and legends a reader
needs."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from megatron_longgen.eval import plots
from megatron_longgen.training.logger import MetricsLogger

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(name, path):
    """An entry-point script as a module; the environment it sets for its child processes
    (``quiet_fallback_warnings``) is put back."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))
        spec.loader.exec_module(module)
    return module


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()  # the whole file decodes
        return image.size


def tick_labels(axis):
    return [t.get_text() for t in axis.get_ticklabels()]


def cell_texts(ax):
    return [t.get_text() for t in ax.texts]


def colour_bar(fig):
    """The colour bar's axes: the one besides the image's."""
    return fig.axes[1]


def test_niah_heatmap_labels_every_cell(tmp_path):
    values = np.array([[1.0, 0.5, np.nan], [0.25, 0.0, 1.0]])
    path = str(tmp_path / "niah.png")
    fig = plots.niah_heatmap(path, [0.0, 0.5], [1024, 2048, 3000], values, "niah: exact match, m")
    assert png_size(path) == (int(5.6 * plots.DPI), int(3.2 * plots.DPI))  # 3 columns x 2 rows
    ax = fig.axes[0]
    assert ax.get_title() == "niah: exact match, m"
    assert ax.get_xlabel() == "context length (tokens)"
    assert ax.get_ylabel() == "needle depth (% of the context)"
    assert tick_labels(ax.xaxis) == ["1K", "2K", "3000"]
    assert tick_labels(ax.yaxis) == ["0%", "50%"]  # depth 0 (the start of the context) on top
    assert ax.get_ylim()[0] > ax.get_ylim()[1]
    assert cell_texts(ax) == ["100", "50", "n/a", "25", "0", "100"]  # row by row
    bar = colour_bar(fig)
    assert bar.get_ylabel() == "exact match (%)" and bar.get_ylim() == (0.0, 100.0)


def test_perplexity_overlay_starts_at_zero(tmp_path):
    curve = {"bucket_size": 256, "bucket_starts": [0, 256, 512], "loss": [2.0, 1.8, 1.79]}
    other = {**curve, "loss": [2.1, 1.81, 1.80]}
    path = str(tmp_path / "ppl.png")
    fig = plots.perplexity_by_position(path, {"hybrid": curve, "all-full": other}, "Perplexity")
    assert png_size(path) == (960, 600)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("position in the window (tokens")
    assert ax.get_ylabel().startswith("perplexity")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["hybrid", "all-full"]
    hybrid = ax.get_lines()[0]
    assert list(hybrid.get_xdata()) == [127.5, 383.5, 639.5]  # the middle of each bucket
    assert np.allclose(hybrid.get_ydata(), [math.exp(v) for v in curve["loss"]])
    bottom, top = ax.get_ylim()
    assert bottom == 0 and math.exp(2.1) < top < 1.2 * math.exp(2.1)  # no zoom onto a 1% spread


def write_metrics_log(path, rows, start=0, validation=()):
    logger = MetricsLogger(train_iters=max(rows) if rows else 1, metrics_log=str(path),
                           start_iteration=start)
    for it in rows:
        logger.log(it, {"lm loss": rows[it], "lr": 1e-3 * it, "MFU %": None}, start)
    for it, loss in validation:
        logger.log_validation(it, loss)
    logger.close()


def test_metrics_log_round_trip_and_resume(tmp_path):
    from megatron_longgen.training.logger import read_metrics_log

    path = tmp_path / "ckpt" / "metrics.jsonl"
    write_metrics_log(path, {1: 5.0, 2: 4.0, 3: 3.5, 4: 3.4}, validation=[(4, 3.6)])
    # A crash after iteration 4, a resume from the checkpoint at 2: 3 and 4 are run again.
    write_metrics_log(path, {3: 3.0, 4: 2.9, 5: 2.8}, start=2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("event") for r in records].count("start") == 2  # appended, not truncated
    assert all("MFU %" not in r and "time" in r for r in records)
    series = read_metrics_log(str(path))
    assert series["lm loss"] == {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.9, 5: 2.8}
    assert series["lr"][5] == pytest.approx(5e-3)
    assert series.get("lm loss validation", {}) == {}  # logged at 4 by the superseded run
    # A last line cut short by a crash is skipped; a broken line elsewhere is an error.
    with open(path, "a") as f:
        f.write('{"iteration": 6, "lm lo')
    assert max(read_metrics_log(str(path))["lm loss"]) == 5
    path.write_text('{"iteration": 1, "lm loss": 2}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not a metrics record"):
        read_metrics_log(str(path))


def test_training_curves(tmp_path):
    runs = {"base": {"lm loss": {1: 5.0, 2: 4.0, 3: 3.0}, "lr": {1: 1e-3, 2: 2e-3, 3: 3e-3},
                     "lm loss validation": {3: 3.2}},
            "extension": {"lm loss": {1: 3.0, 2: 2.5}, "lr": {1: 1e-4, 2: 1e-4}}}
    path = str(tmp_path / "training.png")
    fig = plots.training_curves(path, runs, "Training")
    assert png_size(path) == (960, 840)
    loss_ax, lr_ax = fig.axes
    assert loss_ax.get_title() == "Training" and loss_ax.get_ylabel().startswith("LM loss")
    assert lr_ax.get_xlabel() == "iteration" and lr_ax.get_ylabel() == "learning rate"
    legend = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert legend == ["base train", "base validation", "extension train"]
    assert list(loss_ax.get_lines()[1].get_xdata()) == [3]
    assert list(lr_ax.get_lines()[0].get_ydata()) == [1e-3, 2e-3, 3e-3]


def test_quickstart_heatmap_bins_depths_per_model(tmp_path):
    quickstart = load_script("quickstart", "examples/quickstart.py")
    depths = [0.05, 0.15, 0.16, 0.45, 0.31]  # bins of 0.1 over 0-0.5; none in 0.2-0.3
    results = {"LongGen hybrid (1/3 full)": {"per_item_depth": depths, "per_item_exact": [1, 1, 0, 1, 0]},
               "every layer sparse": {"per_item_depth": depths, "per_item_exact": [0, 0, 0, 1, 1]}}
    path = tmp_path / "passkey_heatmap.png"
    fig = quickstart.write_heatmap(path, results, (0.0, 0.5), length=128)
    assert png_size(str(path)) == (int(4.8 * plots.DPI), int(4.0 * plots.DPI))
    ax = fig.axes[0]
    assert ax.get_title().replace("\n", " ") == "Passkey at 128 tokens: exact match by depth and model"
    assert ax.get_xlabel() == "model" and ax.get_ylabel() == "needle depth (% of the context)"
    assert tick_labels(ax.yaxis) == ["0-10%\n1 prompt", "10-20%\n2 prompts", "20-30%\n0 prompts",
                                     "30-40%\n1 prompt", "40-50%\n1 prompt"]
    assert [t.replace("\n", " ") for t in tick_labels(ax.xaxis)] == list(results)
    # Rows top to bottom, hybrid then sparse in each row.
    assert cell_texts(ax) == ["100", "0", "50", "0", "n/a", "n/a", "0", "100", "100", "100"]
    assert colour_bar(fig).get_ylabel() == "exact match (%)"


# ---- tools/plot.py ----


@pytest.fixture(scope="module")
def plot_cli():
    return load_script("plot_cli", "tools/plot.py")


def write_report(path, model, loss):
    from megatron_longgen.eval.runner import PerplexityByPosition

    os.makedirs(path, exist_ok=True)
    ppl = PerplexityByPosition(32, [0, 32, 64], loss, [64, 64, 64])
    report = {"model": model, "config": {}, "perplexity_by_position": ppl.__dict__,
              "summary": {"niah": {"grid": [{"depth": d, "length": n, "exact": e, "items": 1}
                                            for d, n, e in [(0.0, 128, 1.0), (1.0, 128, 0.0),
                                                            (0.0, 256, 0.5), (1.0, 256, 1.0)]]}}}
    with open(os.path.join(path, "report.json"), "w") as f:
        json.dump(report, f)
    return os.path.join(path, "report.json")


def test_plot_tool_draws_each_figure(plot_cli, tmp_path):
    a = write_report(tmp_path / "a", "hybrid", [3.0, 2.5, 2.4])
    b = write_report(tmp_path / "b", "hybrid", [3.1, 2.6, 2.5])
    out = tmp_path / "ppl.png"
    assert plot_cli.main(["ppl", a, b, "-o", str(out)]) == 0
    assert png_size(str(out)) == (960, 600)
    assert plot_cli.main(["niah", a, "-o", str(tmp_path / "niah.png")]) == 0
    assert png_size(str(tmp_path / "niah.png")) == (int(4.8 * plots.DPI), int(3.2 * plots.DPI))
    log = tmp_path / "run" / "metrics.jsonl"
    write_metrics_log(log, {1: 4.0, 2: 3.0}, validation=[(2, 3.3)])
    assert plot_cli.main(["training", str(log), "-o", str(tmp_path / "training.svg")]) == 0
    assert "<svg" in (tmp_path / "training.svg").read_text()[:1000]
    # Same model twice: the legend tells the lines apart.
    assert plot_cli.legend_labels(None, ["hybrid", "hybrid", "full"]) == ["hybrid (1)", "hybrid (2)", "full"]


@pytest.mark.parametrize("argv, message", [
    (["ppl", "missing.json"], "cannot read the report missing.json"),
    (["ppl", "{log}"], "is not JSON"),
    (["ppl", "{report}", "--labels", "x", "y"], "--labels gives 2 labels for 1 inputs"),
    (["niah", "{report}", "--task", "passkey"], "no depth x length grid for --task passkey; its depth-swept tasks: niah"),
    (["training", "{report}"], "line 1 is not a metrics record"),
    (["training", "{log}", "-o", "curves.jpeg"], "give a file ending in .png, .svg, .pdf"),
    (["training", "{log}", "-o", "no/such/dir/curves.png"], "the folder does not exist"),
])
def test_plot_tool_errors_are_one_line(plot_cli, tmp_path, monkeypatch, capsys, argv, message):
    from megatron_longgen.utils.cli import USAGE_ERROR, run_main

    report = write_report(tmp_path, "m", [1.0, 1.0, 1.0])
    log = tmp_path / "metrics.jsonl"
    write_metrics_log(log, {1: 4.0})
    argv = [a.format(report=report, log=log) for a in argv]
    monkeypatch.chdir(tmp_path)
    assert run_main(plot_cli.main, argv) == USAGE_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
