#!/usr/bin/env python3
"""Long-context evaluation of a LongGen Megatron checkpoint: synthetic retrieval tasks and
perplexity by position, written as report.json, summary.md and PNG figures (an NIAH-style
heatmap per depth-swept task, perplexity by position; ``tools/plot.py`` overlays several).

Example (one process, TP = PP = 1; ``--load`` may also be an HF export or Llama folder):

    python tools/evaluate.py --load ckpt/longgen-tiny --tokenizer-model tok.model \\
        --tasks passkey,niah,variable_tracking --lengths 1024,2048,4096 \\
        --depths 0,0.25,0.5,0.75,1 --samples-per-cell 4 --output-dir eval/longgen

Tensor parallel over the GPUs of one node (rank 0 writes the report):

    torchrun --nproc-per-node 8 tools/evaluate.py --device cuda --tensor-model-parallel-size 8 ...

The KV-eviction baseline on a full-attention model: add ``--all-full`` (every layer causal)
and ``--evict-sink 4 --evict-window 1024`` (StreamingLLM: the prompt streams through the
sink + window cache; ``--evict-after-prefill`` evicts only after a full prefill).
Perplexity by position: ``--ppl-text file.txt`` or ``--ppl-data-path PREFIX`` (an indexed
dataset; both repeatable) with ``--ppl-seq-length`` and ``--ppl-bucket``.
"""

import argparse
import contextlib
import itertools
import os
import sys
from typing import List, Optional

from megatron_longgen.utils.accelerators import quiet_fallback_warnings

quiet_fallback_warnings()  # before Megatron-Core is imported

from megatron_longgen.utils.cli import check_output_directory, fail, run_main  # noqa: E402


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from megatron_longgen.eval.tasks import TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True,
                   help="Megatron checkpoint root or iter_* directory, or an HF folder (config.json: "
                        "a LongGen export keeps its hybrid layout, a plain Llama runs all full)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece model file or local HF tokenizer directory")
    p.add_argument("--tokenizer-type", default=None,
                   help="SentencePieceTokenizer or HuggingFaceTokenizer (default: from the path)")
    p.add_argument("--output-dir", required=True,
                   help="where report.json, summary.md and the plots go (created)")
    p.add_argument("--tasks", default="passkey,niah", help=f"comma-separated, from {','.join(TASKS)}; "
                   "empty for perplexity only")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048], help="prompt lengths in tokens")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths in [0, 1] (0: start of the haystack, 1: end)")
    p.add_argument("--samples-per-cell", type=int, default=1,
                   help="items per (task, length, depth) cell, each with its own seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated items")
    p.add_argument("--haystack", default=None, help="text or .jsonl corpus (default: bundled essays)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts (or ppl windows) per forward")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk length")
    p.add_argument("--all-full", action="store_true", help="run every layer with full attention")
    p.add_argument("--evict-sink", type=int, default=None,
                   help="KV-eviction baseline: sink tokens the full-attention layers keep (with "
                        "--evict-window); the prompt streams through that cache (StreamingLLM)")
    p.add_argument("--evict-window", type=int, default=None,
                   help="KV-eviction baseline: recent tokens the full-attention layers keep")
    p.add_argument("--evict-after-prefill", action="store_true",
                   help="with --evict-sink: prefill with full attention and evict for decode only")
    p.add_argument("--ppl-text", action="append", default=None,
                   help="held-out text file, one document (repeatable)")
    p.add_argument("--ppl-data-path", action="append", default=None,
                   help="held-out Megatron indexed dataset prefix (PREFIX.bin/.idx, repeatable)")
    p.add_argument("--ppl-seq-length", type=int, default=None, help="default: the longest length")
    p.add_argument("--ppl-bucket", type=int, default=256, help="positions per perplexity bucket")
    p.add_argument("--ppl-max-windows", type=int, default=64,
                   help="at most this many --ppl-seq-length windows are scored")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: one GPU per rank (LOCAL_RANK under torchrun)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="split heads/MLP/vocabulary over this many ranks (torchrun, one node; "
                        "Megatron checkpoints)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return p


def load_model(args):
    """This rank's model: an HF folder in memory (TP = 1), or a Megatron checkpoint resharded to
    ``--tensor-model-parallel-size``."""
    from megatron_longgen.checkpoint import load_hf_as_megatron
    from megatron_longgen.checkpoint.megatron_io import load_inference_model

    tp = args.tensor_model_parallel_size
    if os.path.isfile(os.path.join(args.load, "config.json")):
        if tp != 1:
            fail("HF folders are evaluated in one process; for tensor parallelism convert first "
                 "(tools/convert_hf_to_megatron.py)")
        return load_hf_as_megatron(args.load, "fp32" if args.device == "cpu" else "bf16",
                                   args.device)
    return load_inference_model(args.load, args.iteration, tp, args.device)


def ppl_windows(args, tokenizer) -> List[List[int]]:
    """The perplexity windows of ``--ppl-text`` / ``--ppl-data-path``, made before any model is
    loaded so that documents too short for ``--ppl-seq-length`` fail fast."""
    from megatron_longgen.eval import runner

    seq = args.ppl_seq_length or max(args.lengths)
    # Text files framed as the preprocessor frames documents (BOS first).
    docs = itertools.chain(
        (tokenizer.encode_document(open(f, encoding="utf-8").read(), append_eod=False)
         for f in args.ppl_text or []),
        *(runner.documents_from_indexed(p) for p in args.ppl_data_path or []))
    windows = runner.windows_from_documents(docs, seq, args.ppl_max_windows)
    if not windows:
        fail(f"no perplexity window: every --ppl-text / --ppl-data-path document is shorter than "
             f"--ppl-seq-length {seq} + 1 tokens; lower --ppl-seq-length")
    return windows


def check_args(args) -> List[str]:
    """Usage errors found from the flags alone, before any loading; returns the task names."""
    from megatron_longgen.eval.tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        fail(f"unknown task {unknown[0]!r} in --tasks; choose from {', '.join(TASKS)}")
    if not tasks and not (args.ppl_text or args.ppl_data_path):
        fail("nothing to evaluate: give --tasks, --ppl-text or --ppl-data-path")
    if not args.lengths or min(args.lengths) < 1:
        fail(f"--lengths must be positive token counts, got {args.lengths}")
    bad = [d for d in args.depths if not 0.0 <= d <= 1.0]
    if bad or not args.depths:
        fail(f"--depths must lie in [0, 1] (0: start, 1: end of the haystack), got {bad or 'none'}")
    for flag in ("samples_per_cell", "batch_size", "chunk_size", "ppl_bucket", "ppl_max_windows"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if (args.evict_sink is None) != (args.evict_window is None):
        fail("--evict-sink and --evict-window go together")
    if args.evict_after_prefill and args.evict_sink is None:
        fail("--evict-after-prefill needs --evict-sink and --evict-window")
    files = [("--haystack", args.haystack)] if args.haystack else []
    files += [("--ppl-text", path) for path in args.ppl_text or []]
    files += [("--ppl-data-path", prefix + ext) for prefix in args.ppl_data_path or []
              for ext in (".bin", ".idx")]
    for flag, path in files:
        if not os.path.isfile(path):
            fail(f"{flag}: {path} is not a file")
    check_output_directory(args.output_dir, "--output-dir")
    return tasks


def model_label(args) -> str:
    """The evaluated model as the summary, the figures and report.json name it: the checkpoint's
    folder and the attention it ran with."""
    name = os.path.basename(os.path.normpath(args.load))
    if args.all_full:
        name += ", all-full"
    if args.evict_sink is not None:
        name += (f", sink {args.evict_sink} + window {args.evict_window} eviction"
                 f"{' after a full prefill' if args.evict_after_prefill else ', streamed prompt'}")
    return name


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = check_args(args)
    from megatron_longgen.checkpoint.megatron_io import all_full_attention
    from megatron_longgen.data.tokenizer import build_tokenizer
    from megatron_longgen.eval import runner
    from megatron_longgen.eval.tasks import build_items, load_haystack
    from megatron_longgen.inference.engine import InferenceEngine
    from megatron_longgen.utils.accelerators import describe

    import torch

    tokenizer = build_tokenizer(args.tokenizer_model, args.tokenizer_type)
    items = build_items(tokenizer, tasks, args.lengths, args.depths, args.samples_per_cell,
                        args.seed, load_haystack(args.haystack)) if tasks else []
    longest = max([len(tokenizer.encode(it.prompt)) + 1 + it.max_new_tokens for it in items] + [1])
    windows = ppl_windows(args, tokenizer) if args.ppl_text or args.ppl_data_path else None
    model = load_model(args)
    rank = torch.distributed.get_rank()
    if longest > model.max_sequence_length:
        fail(f"prompts need {longest} positions (prompt + answer tokens), the model has "
             f"{model.max_sequence_length}: lower --lengths")
    if windows and len(windows[0]) - 1 > model.max_sequence_length:
        fail(f"--ppl-seq-length {len(windows[0]) - 1} exceeds the model's "
             f"{model.max_sequence_length} positions")
    if rank == 0:
        print(f"accelerators: {describe()}", file=sys.stderr)
        print(f"{len(items)} items over tasks {tasks}, lengths {args.lengths}", file=sys.stderr)

    with all_full_attention(model) if args.all_full else contextlib.nullcontext():
        if args.evict_sink is not None:
            engine = runner.EvictingEngine(model, longest, args.evict_sink, args.evict_window,
                                           chunk_size=args.chunk_size,
                                           streaming=not args.evict_after_prefill)
        else:
            engine = InferenceEngine(model, longest, chunk_size=args.chunk_size)
        results = runner.run_items(engine, tokenizer, items, args.batch_size,
                                   progress=rank == 0 and not args.no_progress) if items else []
        ppl = None
        if windows is not None:
            ppl = runner.perplexity_by_position(model, windows, args.ppl_bucket, args.batch_size)

    if rank != 0:  # every rank ran the same items; rank 0 reports
        return 0
    config = {k: v for k, v in vars(args).items()}
    label = model_label(args)
    paths = runner.write_report(args.output_dir, results, ppl, config,
                                f"Long-context evaluation: {label}", label)
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read())
    for name, path in paths.items():
        print(f"{name}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
