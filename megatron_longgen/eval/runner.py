"""Run task items through a model and write the report.

Generation is greedy and batched through the inference engine (chunked prefill, pattern-sized
cache). Items are sorted by prompt length before batching so a batch pads little.

The KV-eviction baseline (``EvictingEngine``) runs an unchanged model whose full-attention
layers read only the first ``sink`` tokens and the last ``window`` ones: StreamingLLM-style
cache dropping without training (the prompt streamed through that cache, or, with
``streaming=False``, a full prefill and eviction at decode), the comparison the LongGen paper
draws against.

Outputs (``write_report``): ``report.json`` (every item and the aggregates),
``summary.md`` (tables per task, per length and the depth x length grid) and figures
(``eval/plots.py``): ``heatmap_<task>.png`` for depth-swept tasks and ``ppl_by_position.png``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_longgen.attention.patterns import AttnSinkPattern
from megatron_longgen.eval import plots
from megatron_longgen.eval.scoring import score
from megatron_longgen.eval.tasks import EvalItem
from megatron_longgen.inference.engine import InferenceEngine
from megatron_longgen.inference.generate import SamplingConfig, generate


@dataclass
class ItemResult:
    task: str
    length: int
    depth: Optional[float]
    prompt_tokens: int
    answers: List[str]
    generated: str
    exact: float
    partial: float
    metadata: Dict[str, object] = field(default_factory=dict)


class EvictingEngine(InferenceEngine):
    """Sink + window KV eviction on the full-attention layers of an unchanged model.

    ``streaming=True`` (StreamingLLM): the prompt streams through caches that hold the first
    ``sink`` and the last ``window`` tokens, so every token, the prompt's too, reads only those
    and the caches are sink + window sized. ``streaming=False``: a full-attention prefill (the
    prompt's last token, and so the first answer token, still sees everything), then the
    caches are cut to sink + window for decode: the timing of SnapKV/PyramidKV-style
    compression. Runs the exact attention path: the fast path reads the model's patterns.
    """

    def __init__(self, model, max_length: int, sink: int, window: int, chunk_size: int = 512,
                 streaming: bool = True):
        super().__init__(model, max_length, chunk_size, attention="exact")
        self.eviction = AttnSinkPattern(sink_tokens=sink, window_size=window)
        self.streaming = streaming

    def cache_patterns(self) -> list:
        patterns = super().cache_patterns()
        if not self.streaming:
            return patterns
        return [self.eviction if p.name == "causal" else p for p in patterns]

    def prefill(self, prompts, chunk_size: int = None):
        cache, logits = super().prefill(prompts, chunk_size)
        if self.streaming:
            return cache, logits
        for lc in cache.layers:
            if lc.kind == "causal":
                # Masks are rebuilt from the layer's pattern at every decode step, so swapping
                # the pattern evicts; dropping the positions makes the eviction explicit.
                lc.pattern = self.eviction
                length = cache.lengths.view(-1, 1, 1)
                # The next query sits at `length`: keep what it may read.
                keep = (lc.pos >= 0) & self.eviction.allowed(length, lc.pos)
                lc.pos.masked_fill_(~keep, -1)
        return cache, logits


def _progress(done: int, total: int, start: float, label: str) -> None:
    rate = done / max(time.time() - start, 1e-9)
    sys.stderr.write(f"\r{label}: {done}/{total} items ({rate:.2f}/s)")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_items(engine: InferenceEngine, tokenizer, items: Sequence[EvalItem], batch_size: int = 8,
              progress: bool = False, label: str = "eval") -> List[ItemResult]:
    """Greedy answers to ``items`` scored against their answers, in the items' order."""
    prompts = [[tokenizer.bos_id] + tokenizer.encode(it.prompt) for it in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    stop = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    results: List[Optional[ItemResult]] = [None] * len(items)
    start = time.time()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        new_tokens = max(items[i].max_new_tokens for i in idx)
        cfg = SamplingConfig(max_new_tokens=new_tokens, stop_tokens=stop)
        outputs = generate(engine, [prompts[i] for i in idx], cfg)
        for i, out in zip(idx, outputs):
            it = items[i]
            text = tokenizer.decode(out[:it.max_new_tokens])
            s = score(it.task, text, it.answers)
            results[i] = ItemResult(it.task, it.length, it.depth, len(prompts[i]), list(it.answers),
                                    text, s.exact, s.partial, dict(it.metadata))
        if progress:
            _progress(b + len(idx), len(items), start, label)
    return results


# ---- perplexity by position ----


@dataclass
class PerplexityByPosition:
    bucket_size: int
    bucket_starts: List[int]
    loss: List[float]
    """Mean next-token loss of the positions in each bucket (position = index of the target)."""
    tokens: List[int]

    @property
    def perplexity(self) -> List[float]:
        return [math.exp(x) for x in self.loss]


def documents_from_indexed(prefix: str) -> Iterator[np.ndarray]:
    """The documents of a Megatron indexed dataset (``prefix.bin``/``.idx``, as
    ``tools/preprocess_data.py`` writes them, BOS and EOD included), read lazily in order:
    each document's sequences concatenated."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices
    for d in range(len(bounds) - 1):
        yield np.concatenate([dataset[i] for i in range(bounds[d], bounds[d + 1])])


def windows_from_documents(documents: Iterable[Sequence[int]], seq_length: int,
                           max_windows: Optional[int] = None) -> List[List[int]]:
    """Non-overlapping ``seq_length + 1``-token windows (inputs plus the last target), each
    from a single document, so position p always has p tokens of real context."""
    out = []
    for doc in documents:
        for s in range(0, len(doc) - seq_length, seq_length + 1):
            out.append([int(t) for t in doc[s:s + seq_length + 1]])
            if max_windows is not None and len(out) >= max_windows:
                return out
    return out


@torch.no_grad()
def perplexity_by_position(model, windows: Sequence[Sequence[int]], bucket_size: int,
                           batch_size: int = 4) -> PerplexityByPosition:
    """Loss per position bucket over equal-length windows, by a plain forward of the model."""
    if not windows:
        raise ValueError("no evaluation windows: documents shorter than the sequence length?")
    device = next(model.parameters()).device
    seq = len(windows[0]) - 1
    total = torch.zeros(seq, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for b in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[b:b + batch_size], device=device)
        tokens, labels = ids[:, :-1], ids[:, 1:]
        positions = torch.arange(seq, device=device)[None].expand_as(tokens)
        loss = model(tokens, positions, None, labels=labels)  # [b, s] per-token loss
        total += loss.float().sum(0).double().cpu()
    model.train(was_training)
    starts = list(range(0, seq, bucket_size))
    mean = total / len(windows)
    buckets = [float(mean[s:s + bucket_size].mean()) for s in starts]
    counts = [len(windows) * len(range(s, min(s + bucket_size, seq))) for s in starts]
    return PerplexityByPosition(bucket_size, starts, buckets, counts)


# ---- aggregates and report ----


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(results: Sequence[ItemResult]) -> Dict[str, dict]:
    """Per task: overall exact / partial, per length, and per (depth, length) cell."""
    by_task: Dict[str, List[ItemResult]] = defaultdict(list)
    for r in results:
        by_task[r.task].append(r)
    out = {}
    for task, rs in by_task.items():
        per_length = defaultdict(list)
        cells = defaultdict(list)
        for r in rs:
            per_length[r.length].append(r)
            if r.depth is not None:
                cells[(r.depth, r.length)].append(r)
        out[task] = {
            "items": len(rs),
            "exact": _mean(r.exact for r in rs),
            "partial": _mean(r.partial for r in rs),
            "by_length": {str(n): {"exact": _mean(r.exact for r in g), "partial": _mean(r.partial for r in g),
                                   "items": len(g)} for n, g in sorted(per_length.items())},
            "grid": [{"depth": d, "length": n, "exact": _mean(r.exact for r in g), "items": len(g)}
                     for (d, n), g in sorted(cells.items())],
        }
    return out


def grid_matrix(task_summary: dict) -> Tuple[List[float], List[int], np.ndarray]:
    """(depths, lengths, exact accuracy [depths, lengths]) of a task's grid; NaN where empty."""
    grid = task_summary["grid"]
    depths = sorted({c["depth"] for c in grid})
    lengths = sorted({c["length"] for c in grid})
    m = np.full((len(depths), len(lengths)), np.nan)
    for c in grid:
        m[depths.index(c["depth"]), lengths.index(c["length"])] = c["exact"]
    return depths, lengths, m


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def markdown_summary(summary: Dict[str, dict], ppl: Optional[PerplexityByPosition] = None,
                     title: str = "Long-context evaluation") -> str:
    lines = [f"# {title}", "", "| task | items | exact | partial |", "|---|---|---|---|"]
    for task, s in summary.items():
        lines.append(f"| {task} | {s['items']} | {_fmt(s['exact'])} | {_fmt(s['partial'])} |")
    for task, s in summary.items():
        lengths = list(s["by_length"])
        lines += ["", f"## {task}", "", "| length | " + " | ".join(lengths) + " |",
                  "|---|" + "---|" * len(lengths),
                  "| exact | " + " | ".join(_fmt(s["by_length"][n]["exact"]) for n in lengths) + " |",
                  "| partial | " + " | ".join(_fmt(s["by_length"][n]["partial"]) for n in lengths) + " |"]
        if s["grid"]:
            depths, lens, m = grid_matrix(s)
            lines += ["", f"Exact match by depth (rows) x length (columns); `heatmap_{task}.png`.",
                      "", "| depth \\ length | " + " | ".join(map(str, lens)) + " |",
                      "|---|" + "---|" * len(lens)]
            for d, row in zip(depths, m):
                lines.append(f"| {d:g} | " + " | ".join(_fmt(float(v)) for v in row) + " |")
    if ppl is not None:
        lines += ["", "## Perplexity by position", "", "`ppl_by_position.png`", "",
                  "| positions | loss | perplexity |", "|---|---|---|"]
        for s, l, p in zip(ppl.bucket_starts, ppl.loss, ppl.perplexity):
            lines.append(f"| {s}-{s + ppl.bucket_size - 1} | {l:.3f} | {p:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, results: Sequence[ItemResult],
                 ppl: Optional[PerplexityByPosition] = None, config: Optional[dict] = None,
                 title: str = "Long-context evaluation", model: str = "model") -> Dict[str, str]:
    """Write report.json, summary.md and the figures; returns {name: path}. ``model`` names the
    evaluated model in the figures' titles and legends (and in report.json, for
    ``tools/plot.py``)."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results)
    paths = {"json": os.path.join(out_dir, "report.json"),
             "markdown": os.path.join(out_dir, "summary.md")}
    report = {"model": model, "config": config or {}, "summary": summary,
              "items": [asdict(r) for r in results],
              "perplexity_by_position": asdict(ppl) if ppl is not None else None}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown_summary(summary, ppl, title))
    for task, s in summary.items():
        if s["grid"]:
            paths[f"heatmap_{task}"] = os.path.join(out_dir, f"heatmap_{task}.png")
            plots.niah_heatmap(paths[f"heatmap_{task}"], *grid_matrix(s),
                               title=f"{task}: exact match, {model}")
    if ppl is not None:
        paths["ppl"] = os.path.join(out_dir, "ppl_by_position.png")
        plots.perplexity_by_position(paths["ppl"], {model: asdict(ppl)},
                                     title=f"Perplexity by position, {model}")
    return paths
