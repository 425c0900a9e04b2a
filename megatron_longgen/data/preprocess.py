"""Tokenize named text sources into Megatron-Core indexed datasets plus a blend file.

Input formats (chosen by file name):
  * `*.jsonl` / `*.json`: one JSON object per line; the document is the string under `json_key`.
    Blank lines are skipped.
  * anything else: plain UTF-8 text. `text_document="file"` makes each file one document;
    `"paragraph"` makes each blank-line-separated block one document. Leading and trailing
    whitespace of a document is stripped; whitespace-only documents are skipped and counted.

Each document is written as `[BOS] + tokens + [EOS]` (Llama's framing; both can be switched off).
Outputs (all written under temporary names, renamed only when everything succeeded):
  * `{output_prefix}_{source}_document.{bin,idx}` per source,
  * `{output_prefix}_{source}_long_document.{bin,idx}` per source when long-document upsampling
    is on and the source has documents at least `upsample_long_min_tokens` long,
  * `{output_prefix}_blend.json` (see `blend.py`) and `{output_prefix}_stats.json`.

Mixture semantics: every written prefix gets the weight
    tokens(prefix) * (upsample_factor if it is a "long" prefix else 1) * source_weight(source),
normalised over all prefixes. With factor 1 and no source weights this is the natural mixture
(each token seen about once per epoch); a long-document token is drawn `upsample_factor` times
as often as a short-document token of the same source, without duplicating anything on disk.
"""

from __future__ import annotations

import glob
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_longgen.data.blend import BLEND_FORMAT
from megatron_longgen.data.tokenizer import TokenizerSpec
from megatron_longgen.utils.cli import UsageError, check_output_directory

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
JSON_SUFFIXES = (".jsonl", ".json")


class DataError(UsageError):
    """Bad input data or options; the message names the file (and line) at fault."""


@dataclass
class PreprocessConfig:
    inputs: List[Tuple[str, str]]
    """(source name, path or glob) pairs; a name may repeat to add more files to a source."""
    output_prefix: str
    tokenizer_model: str
    tokenizer_type: Optional[str] = None
    """SentencePieceTokenizer / HuggingFaceTokenizer; inferred from the path when None."""
    json_key: str = "text"
    text_document: str = "file"
    """Plain text: "file" (a file is a document) or "paragraph" (blank-line-separated blocks)."""
    prepend_bos: bool = True
    append_eod: bool = True
    workers: int = 1
    chunk_size: int = 16
    """Documents handed to a worker at a time."""
    upsample_long_min_tokens: Optional[int] = None
    """Documents with at least this many tokens (BOS/EOS included) count as long."""
    upsample_factor: float = 1.0
    """Sampling weight multiplier of long documents relative to the rest of their source."""
    source_weights: Dict[str, float] = field(default_factory=dict)
    """Optional per-source multipliers on the natural (token-proportional) weight."""
    progress: bool = True


@dataclass
class SubsetReport:
    subset: str  # "base" or "long"
    prefix: str
    documents: int = 0
    tokens: int = 0
    weight: float = 0.0


@dataclass
class SourceReport:
    name: str
    files: List[str]
    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    long_documents: int = 0
    long_tokens: int = 0
    max_document_tokens: int = 0
    histogram: Dict[str, int] = field(default_factory=dict)
    subsets: List[SubsetReport] = field(default_factory=list)


@dataclass
class PreprocessReport:
    sources: List[SourceReport]
    histogram: Dict[str, int]
    blend_path: str
    stats_path: str
    prefixes: List[str]
    weights: List[float]
    config: Dict

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.sources)

    def to_dict(self) -> Dict:
        return {
            "total_documents": sum(s.documents for s in self.sources),
            "total_tokens": self.total_tokens,
            "histogram": self.histogram,
            "sources": [asdict(s) for s in self.sources],
            "blend": {"prefixes": self.prefixes, "weights": self.weights},
            "config": self.config,
        }


# --------------------------------------------------------------------------------------------
# Histogram: log2 buckets, keyed by the bucket's lower bound ("1", "2", "4", ...).


def log2_bucket(n_tokens: int) -> int:
    return 1 << (max(int(n_tokens), 1).bit_length() - 1)


def histogram_of(lengths: Sequence[int]) -> Dict[str, int]:
    counts: Dict[int, int] = {}
    for n in lengths:
        b = log2_bucket(n)
        counts[b] = counts.get(b, 0) + 1
    return {str(b): counts[b] for b in sorted(counts)}


def _merge_histograms(hists: Sequence[Dict[str, int]]) -> Dict[str, int]:
    total: Dict[int, int] = {}
    for h in hists:
        for k, v in h.items():
            total[int(k)] = total.get(int(k), 0) + v
    return {str(b): total[b] for b in sorted(total)}


# --------------------------------------------------------------------------------------------
# Reading documents.


def expand_inputs(inputs: Sequence[Tuple[str, str]]) -> Dict[str, List[str]]:
    """Group input paths by source name, expanding globs; checks names and that files exist."""
    sources: Dict[str, List[str]] = {}
    for name, pattern in inputs:
        if not _SOURCE_NAME.match(name or ""):
            raise DataError(f"bad source name {name!r}: use letters, digits, '_', '-', '.'")
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not paths:
            raise DataError(f"source {name!r}: no file matches {pattern!r}")
        for path in paths:
            if not os.path.exists(path):
                raise DataError(f"source {name!r}: input file {path!r} does not exist")
            if not os.path.isfile(path):
                raise DataError(f"source {name!r}: input {path!r} is not a regular file")
            if not os.access(path, os.R_OK):
                raise DataError(f"source {name!r}: input file {path!r} is not readable")
            if os.path.getsize(path) == 0:
                raise DataError(f"{path}: empty file")
        sources.setdefault(name, []).extend(paths)
    if not sources:
        raise DataError("no inputs given")
    return sources


def iter_documents(path: str, json_key: str = "text", text_document: str = "file") -> Iterator[str]:
    """Yield the documents of one file (stripped; possibly empty strings, which callers skip)."""
    try:
        if path.endswith(JSON_SUFFIXES):
            yield from _iter_jsonl(path, json_key)
        else:
            yield from _iter_text(path, text_document)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _iter_jsonl(path: str, json_key: str) -> Iterator[str]:
    found = False
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: bad JSON line ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if json_key not in obj:
                raise DataError(f"{path}:{lineno}: missing field {json_key!r} (fields: {', '.join(sorted(obj)) or 'none'})")
            text = obj[json_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {json_key!r} is {type(text).__name__}, not a string")
            found = True
            yield text.strip()
    if not found:
        raise DataError(f"{path}: empty file (no JSON lines)")


def _iter_text(path: str, text_document: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path}: empty file (only whitespace)")
    if text_document == "file":
        yield text.strip()
    elif text_document == "paragraph":
        for block in _PARAGRAPH_BREAK.split(text):
            yield block.strip()
    else:
        raise DataError(f"unknown text_document mode {text_document!r}; choose 'file' or 'paragraph'")


# --------------------------------------------------------------------------------------------
# Tokenization workers: each process loads its own tokenizer once.

_WORKER: Dict[str, object] = {}


def _worker_init(spec: TokenizerSpec, prepend_bos: bool, append_eod: bool) -> None:
    _WORKER["tokenizer"] = spec.build()
    _WORKER["framing"] = (prepend_bos, append_eod)


def _pool_worker_init(spec: TokenizerSpec, prepend_bos: bool, append_eod: bool) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (and cleans up), so
    # the workers print no tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_init(spec, prepend_bos, append_eod)


def _start_pool(workers: int, initargs: tuple):
    """A fork pool whose workers ignore SIGINT from their first instruction: forked while the
    parent ignores it (the initializer alone left a window in which a Ctrl-C to the process
    group killed a starting worker and could hang the pool's shutdown)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        return multiprocessing.get_context("fork").Pool(workers, initializer=_pool_worker_init,
                                                        initargs=initargs)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _worker_encode(text: str) -> Optional[numpy.ndarray]:
    if not text:
        return None
    prepend_bos, append_eod = _WORKER["framing"]
    ids = _WORKER["tokenizer"].encode_document(text, prepend_bos, append_eod)
    return numpy.asarray(ids, dtype=numpy.int64)


class _Progress:
    """One stderr status line; rewritten in place on a terminal, every 10 s otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = self.last = time.time()

    def update(self, source: str, docs: int, tokens: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.time()
        if not force and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-6)
        line = f"[{source}] {docs:,} docs, {tokens:,} tokens, {rate:,.0f} tokens/s"
        sys.stderr.write(("\r" + line.ljust(78)) if self.tty else line + "\n")
        if force and self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# The whole job.


def output_paths(output_prefix: str, source: str) -> Dict[str, str]:
    return {
        "base": f"{output_prefix}_{source}_document",
        "long": f"{output_prefix}_{source}_long_document",
    }


def _check_config(cfg: PreprocessConfig) -> None:
    if not cfg.output_prefix:
        raise DataError("no output prefix given (--output-prefix)")
    if not os.path.basename(cfg.output_prefix):
        raise DataError(f"--output-prefix {cfg.output_prefix!r} ends in a directory separator; give "
                        "a file-name prefix such as data/tok/corpus")
    try:
        check_output_directory(os.path.dirname(os.path.abspath(cfg.output_prefix)), "--output-prefix")
    except UsageError as err:
        raise DataError(str(err)) from None
    if cfg.workers < 1:
        raise DataError("workers must be at least 1")
    if cfg.text_document not in ("file", "paragraph"):
        raise DataError(f"unknown text_document mode {cfg.text_document!r}; choose 'file' or 'paragraph'")
    if cfg.upsample_factor <= 0:
        raise DataError("upsample_factor must be positive")
    if cfg.upsample_factor != 1.0 and cfg.upsample_long_min_tokens is None:
        raise DataError("upsample_factor needs upsample_long_min_tokens (which documents are long)")
    if cfg.upsample_long_min_tokens is not None and cfg.upsample_long_min_tokens < 1:
        raise DataError("upsample_long_min_tokens must be positive")
    for name, w in cfg.source_weights.items():
        if not w > 0:
            raise DataError(f"source weight of {name!r} must be positive")


def preprocess(cfg: PreprocessConfig) -> PreprocessReport:
    """Run the whole job; on any error, raise and leave no new output files behind."""
    _check_config(cfg)
    sources = expand_inputs(cfg.inputs)
    unknown = sorted(set(cfg.source_weights) - set(sources))
    if unknown:
        raise DataError(f"source weights given for unknown sources: {', '.join(unknown)}")

    spec = TokenizerSpec(cfg.tokenizer_model, cfg.tokenizer_type)
    tokenizer = spec.build()  # fail early on a bad tokenizer, before any output exists
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    split_long = cfg.upsample_long_min_tokens is not None

    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    made_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp_tag = f".tmp-{os.getpid()}"
    pending: List[Tuple[str, str]] = []  # (temporary path, final path)

    def temp_for(final: str) -> str:
        pending.append((final + tmp_tag, final))
        return final + tmp_tag

    pool = None
    try:
        if cfg.workers > 1:
            pool = _start_pool(cfg.workers, (spec, cfg.prepend_bos, cfg.append_eod))
            encode = lambda docs: pool.imap(_worker_encode, docs, chunksize=cfg.chunk_size)  # noqa: E731
        else:
            _worker_init(spec, cfg.prepend_bos, cfg.append_eod)
            encode = lambda docs: map(_worker_encode, docs)  # noqa: E731

        progress = _Progress(cfg.progress)
        reports: List[SourceReport] = []
        for name, paths in sources.items():
            report = SourceReport(name=name, files=[os.path.abspath(p) for p in paths])
            prefixes = output_paths(cfg.output_prefix, name)
            subsets = ["base", "long"] if split_long else ["base"]
            builders = {s: IndexedDatasetBuilder(temp_for(prefixes[s] + ".bin"), dtype=dtype) for s in subsets}
            subset_reports = {s: SubsetReport(subset=s, prefix=prefixes[s]) for s in subsets}
            lengths: List[int] = []

            def documents() -> Iterator[str]:
                for path in paths:
                    yield from iter_documents(path, cfg.json_key, cfg.text_document)

            for ids in encode(documents()):
                if ids is None:
                    report.skipped_empty += 1
                    continue
                n = int(ids.size)
                subset = "long" if split_long and n >= cfg.upsample_long_min_tokens else "base"
                builders[subset].add_item(torch.from_numpy(ids))
                builders[subset].end_document()
                subset_reports[subset].documents += 1
                subset_reports[subset].tokens += n
                lengths.append(n)
                report.documents += 1
                report.tokens += n
                progress.update(name, report.documents, report.tokens)
            progress.update(name, report.documents, report.tokens, force=True)

            if report.documents == 0:
                raise DataError(f"source {name!r}: no non-empty documents in {', '.join(paths)}")
            for s in subsets:
                builders[s].finalize(temp_for(prefixes[s] + ".idx"))
            if split_long:
                report.long_documents = subset_reports["long"].documents
                report.long_tokens = subset_reports["long"].tokens
            report.max_document_tokens = max(lengths)
            report.histogram = histogram_of(lengths)
            # An empty subset cannot be part of a blend: drop its files.
            report.subsets = [r for r in subset_reports.values() if r.documents > 0]
            for s in subsets:
                if subset_reports[s].documents == 0:
                    for suffix in (".bin", ".idx"):
                        _remove_pending(pending, prefixes[s] + suffix)
            reports.append(report)

        prefixes, weights = _mixture_weights(reports, cfg)
        histogram = _merge_histograms([r.histogram for r in reports])
        blend_path = f"{cfg.output_prefix}_blend.json"
        stats_path = f"{cfg.output_prefix}_stats.json"
        report = PreprocessReport(
            sources=reports,
            histogram=histogram,
            blend_path=blend_path,
            stats_path=stats_path,
            prefixes=prefixes,
            weights=weights,
            config={k: v for k, v in asdict(cfg).items() if k != "progress"},
        )
        _write_json(temp_for(blend_path), _blend_json(reports, blend_path, prefixes, weights, cfg))
        _write_json(temp_for(stats_path), report.to_dict())

        # Everything is on disk: publish. os.replace is atomic per file on one filesystem.
        for tmp, final in pending:
            os.replace(tmp, final)
        pending.clear()
        return report
    except BaseException:
        for tmp, _ in pending:
            if os.path.exists(tmp):
                os.remove(tmp)
        if made_dir and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _WORKER.clear()


def _remove_pending(pending: List[Tuple[str, str]], final: str) -> None:
    for i, (tmp, fin) in enumerate(pending):
        if fin == final:
            if os.path.exists(tmp):
                os.remove(tmp)
            del pending[i]
            return


def _mixture_weights(reports: Sequence[SourceReport], cfg: PreprocessConfig) -> Tuple[List[str], List[float]]:
    prefixes, raw = [], []
    for r in reports:
        source_weight = cfg.source_weights.get(r.name, 1.0)
        for sub in r.subsets:
            factor = cfg.upsample_factor if sub.subset == "long" else 1.0
            prefixes.append(sub.prefix)
            raw.append(sub.tokens * factor * source_weight)
    total = sum(raw)
    weights = [w / total for w in raw]
    for r in reports:
        for sub in r.subsets:
            sub.weight = weights[prefixes.index(sub.prefix)]
    return prefixes, weights


def _blend_json(reports, blend_path, prefixes, weights, cfg) -> Dict:
    base = os.path.dirname(os.path.abspath(blend_path))
    rel = lambda p: os.path.relpath(os.path.abspath(p), base)  # noqa: E731
    entries = []
    for r in reports:
        for sub in r.subsets:
            entries.append({
                "source": r.name,
                "subset": sub.subset,
                "prefix": rel(sub.prefix),
                "documents": sub.documents,
                "tokens": sub.tokens,
                "weight_factor": cfg.upsample_factor if sub.subset == "long" else 1.0,
                "source_weight": cfg.source_weights.get(r.name, 1.0),
                "weight": sub.weight,
            })
    return {
        "format": BLEND_FORMAT,
        "prefixes": [rel(p) for p in prefixes],
        "weights": weights,
        "upsample_long_min_tokens": cfg.upsample_long_min_tokens,
        "upsample_factor": cfg.upsample_factor,
        "entries": entries,
    }


def _write_json(path: str, obj: Dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def format_report(report: PreprocessReport) -> str:
    """A human-readable summary: per-source counts, blend weights and length histograms."""
    lines = [f"{'source':<16}{'docs':>10}{'tokens':>14}{'long docs':>11}{'long tokens':>14}{'skipped':>9}"]
    for s in report.sources:
        lines.append(f"{s.name:<16}{s.documents:>10,}{s.tokens:>14,}{s.long_documents:>11,}"
                     f"{s.long_tokens:>14,}{s.skipped_empty:>9,}")
    lines.append(f"{'total':<16}{sum(s.documents for s in report.sources):>10,}{report.total_tokens:>14,}")
    lines.append("")
    lines.append("blend (weight  prefix):")
    for p, w in zip(report.prefixes, report.weights):
        lines.append(f"  {w:.6f}  {p}")
    for title, hist in [("all sources", report.histogram)] + [(s.name, s.histogram) for s in report.sources]:
        lines.append("")
        lines.append(f"document length histogram, {title} (tokens, log2 buckets):")
        peak = max(hist.values())
        for lo, count in hist.items():
            lo = int(lo)
            bar = "#" * max(1, round(40 * count / peak))
            lines.append(f"  [{lo:>9,}, {2 * lo:>9,})  {count:>8,}  {bar}")
    lines.append("")
    lines.append(f"blend file: {report.blend_path}")
    lines.append(f"stats file: {report.stats_path}")
    return "\n".join(lines)
