#!/usr/bin/env python3
"""Figures from the files runs leave behind: perplexity by position overlaid from several
evaluation reports, an NIAH heatmap from one, training curves from metrics logs.

    python tools/plot.py ppl eval/longgen/report.json eval/full/report.json -o ppl.png
    python tools/plot.py niah eval/longgen/report.json --task niah -o niah.png
    python tools/plot.py training ckpt/longgen/metrics.jsonl -o training.png

Reports are the ``report.json`` that ``tools/evaluate.py`` writes; metrics logs the
``metrics.jsonl`` that training writes next to its checkpoints.
"""

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

from megatron_longgen.utils.accelerators import quiet_fallback_warnings
from megatron_longgen.utils.cli import fail, run_main

quiet_fallback_warnings()  # before Megatron-Core is imported (the niah grid reader imports it)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True, metavar="{ppl,niah,training}")

    ppl = sub.add_parser("ppl", help="perplexity by position, one line per report")
    ppl.add_argument("reports", nargs="+", metavar="REPORT.json",
                     help="tools/evaluate.py reports run with --ppl-text or --ppl-data-path")
    ppl.add_argument("--title", default="Perplexity by position",
                     help="figure title (default: %(default)s)")

    niah = sub.add_parser("niah", help="exact match by needle depth and context length")
    niah.add_argument("report", metavar="REPORT.json", help="a tools/evaluate.py report")
    niah.add_argument("--task", default="niah",
                      help="a depth-swept task of the report (default: %(default)s)")
    niah.add_argument("--title", default=None, help="figure title (default: the task and the model)")

    training = sub.add_parser("training", help="loss, validation loss and learning rate by iteration")
    training.add_argument("logs", nargs="+", metavar="METRICS.jsonl", help="training metrics logs")
    training.add_argument("--title", default="Training", help="figure title (default: %(default)s)")

    for parser, output, label in ((ppl, "ppl_by_position.png", "each report's model"),
                                  (niah, "heatmap.png", None),
                                  (training, "training_curves.png", "each log's folder")):
        parser.add_argument("-o", "--output", default=output,
                            help="figure to write: .png, .svg or .pdf (default: %(default)s)")
        if label:
            parser.add_argument("--labels", nargs="+", default=None,
                                help=f"legend label per input, in order (default: {label})")
    return p


def load_report(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as err:
        fail(f"cannot read the report {path}: {err.strerror}")
    except ValueError:
        fail(f"{path} is not JSON; give the report.json that tools/evaluate.py writes")
    if not isinstance(report, dict) or "summary" not in report:
        fail(f"{path} is not an evaluation report (no 'summary'); give the report.json that "
             f"tools/evaluate.py writes")
    return report


def report_model(report: dict, path: str) -> str:
    """The report's model name; reports without one are named by their folder."""
    return report.get("model") or os.path.basename(os.path.dirname(os.path.abspath(path)))


def legend_labels(given: Optional[Sequence[str]], defaults: Sequence[str]) -> List[str]:
    """``--labels`` if given (one per input), else the defaults, numbered where they repeat."""
    if given is not None:
        if len(given) != len(defaults):
            fail(f"--labels gives {len(given)} labels for {len(defaults)} inputs; give one per input")
        if len(set(given)) != len(given):
            fail(f"--labels {' '.join(given)} repeats a label; give each input its own")
        return list(given)
    return [f"{d} ({defaults[:i].count(d) + 1})" if defaults.count(d) > 1 else d
            for i, d in enumerate(defaults)]


def plot_ppl(args) -> None:
    from megatron_longgen.eval import plots
    reports = [load_report(p) for p in args.reports]
    for path, report in zip(args.reports, reports):
        if not report.get("perplexity_by_position"):
            fail(f"{path} has no perplexity by position; run tools/evaluate.py with --ppl-text "
                 f"or --ppl-data-path")
    labels = legend_labels(args.labels, [report_model(r, p) for p, r in zip(args.reports, reports)])
    plots.perplexity_by_position(args.output, {label: r["perplexity_by_position"]
                                               for label, r in zip(labels, reports)}, args.title)


def plot_niah(args) -> None:
    from megatron_longgen.eval import plots
    from megatron_longgen.eval.runner import grid_matrix
    report = load_report(args.report)
    swept = sorted(t for t, s in report["summary"].items() if s.get("grid"))
    if args.task not in swept:
        fail(f"{args.report} has no depth x length grid for --task {args.task}; "
             f"its depth-swept tasks: {', '.join(swept) or 'none'}")
    title = args.title or f"{args.task}: exact match, {report_model(report, args.report)}"
    plots.niah_heatmap(args.output, *grid_matrix(report["summary"][args.task]), title=title)


def plot_training(args) -> None:
    from megatron_longgen.eval import plots
    from megatron_longgen.training.logger import read_metrics_log
    runs = [read_metrics_log(p) for p in args.logs]
    for path, run in zip(args.logs, runs):
        if "lm loss" not in run:
            fail(f"{path} has no logged iterations (no 'lm loss'); did the run reach --log-interval?")
    labels = legend_labels(args.labels, [os.path.basename(os.path.dirname(os.path.abspath(p)))
                                         for p in args.logs])
    plots.training_curves(args.output, dict(zip(labels, runs)), args.title)


FORMATS = (".png", ".svg", ".pdf")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if os.path.splitext(args.output)[1].lower() not in FORMATS:
        fail(f"--output {args.output}: give a file ending in {', '.join(FORMATS)}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        fail(f"--output {args.output}: the folder does not exist; create it first")
    {"ppl": plot_ppl, "niah": plot_niah, "training": plot_training}[args.figure](args)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
